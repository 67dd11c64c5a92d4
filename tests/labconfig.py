"""The parts of an nfgate config that every `nfgate run` in a basic lab shares.

The netns harnesses (FTP, SMTP, RTP, offload, the run tests) build their
configs from these, so a change to what a lab run needs is one edit here.
``{gwns}`` and ``{tmp}`` are filled in by the harness with ``str.format``.
"""

# The basic lab's two zones, and a router that drops what no rule passes.
ZONES = """
[zones.wan]
interfaces = ["wan0"]
networks = ["203.0.113.0/24"]

[zones.lan]
interfaces = ["lan0"]
networks = ["192.168.1.0/24"]

[policy]
forward = "drop"
input = "drop"
"""

# Its own gateway namespace, key and control socket, and quick restarts.
RUN = """
[gateway_link]
netns = "{gwns}"

[signalling]
key_file = "{tmp}/signalling.key"

[supervisor]
control_socket = "{tmp}/run/control.sock"
restart_initial = 0.2
stop_timeout = 8
"""
