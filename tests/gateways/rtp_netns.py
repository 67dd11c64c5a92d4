"""The rtp gateway under `nfgate run` in the basic lab: for tests/gateways/test_rtp_netns.py.

ext (203.0.113.10, and 203.0.113.11 as a third host) - router (wan0
203.0.113.1, lan0 192.168.1.1) - lan (192.168.1.10). The router forwards
wan udp 5004-5081 to lan, keeping the ports, and every port of that range
that a test uses is a selector of an rtp gateway, so nothing reaches lan on
it but through a gateway (a port forward alone is accepted by the kernel).
ext routes 192.168.1.0/24 through the router (the rig adds it), and lan
reaches ext's udp 5060-5063 only through ``rtp-out`` and ``rtp-out-off``.

Each test has its own pair, each gateway a variant, all with a no-media
timeout of 2 s and 3 s rules:

- ``rtp`` (ssrc_change "drop"): the pairs 5004, 5010, 5020 and 5030;
- ``rtp-allow`` (ssrc_change "allow"): 5040;
- ``rtp-off`` (offload "after-validation" after 50 RTP datagrams): 5050, 5052, 5054;
- ``rtp-out``: lan -> wan, 5060; ``rtp-out-off``: the same with offload, 5062
  (routed: no port forward's accept in the forward chain carries it);
- ``rtp-proc`` (adjacent "processor"): 5070; the processor's own rules live
  ``adjacent_ttl`` = 1 s here.

``ffmpeg_stream``, ``gateway``, ``send`` and ``RtpRunning`` (with another
config) serve the IPv6 test too (tests/gateways/test_rtp_ipv6_netns.py, the
dual lab): an IPv6 sender and receiver make an IPv6 stream.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from ipaddress import ip_address
from pathlib import Path
from typing import Any, Callable

from firewall.lab.wait import wait_for
from tests.bindtable import dynamic_elements
from tests.firewall.run_harness import Running
from tests.labconfig import RUN, ZONES

EXT = "203.0.113.10"
EXT2 = "203.0.113.11"  # a third host on the wan side
WAN = "203.0.113.1"
LAN = "192.168.1.10"
PEERS = str(Path(__file__).with_name("rtp_peers.py"))

GATEWAY = """
[[gateway]]
name = "{name}"
kind = "rtp"

[[gateway.traffic]]
from = "{src}"
to = "{dst}"
proto = "udp"
ports = {ports}

[gateway.settings]
adjacent = "{adjacent}"
no_media_timeout = 2
adjacent_rule_ttl = 3
ssrc_change = "{ssrc}"
{extra}
"""


def gateway(name: str, ports: str, ssrc: str = "drop", adjacent: str = "gateway", src: str = "wan",
            dst: str = "lan", extra: str = "") -> str:
    return GATEWAY.format(name=name, ports=ports, ssrc=ssrc, adjacent=adjacent, src=src, dst=dst, extra=extra)


OFFLOAD_AFTER = 50  # RTP datagrams: 1 s of 20 ms audio



def base_config(ports: str, processor: str = "") -> str:
    """The lab router forwarding wan udp ``ports`` to lan, dropping the rest, one processor failing closed."""
    return f"""
{ZONES}
[[nat.forward]]
name = "rtp-in"
from = "wan"
proto = "udp"
port = "{ports}"
to = "192.168.1.10"

# The filter decides what reaches a gateway (docs/datapath.md): lan's phones
# may send media out on 5060-5063, through rtp-out and rtp-out-off.
[[rule]]
name = "media-out"
from = "lan"
to = "wan"
proto = "udp"
ports = "5060-5063"

[processor]
queues = [0]
fail_mode = "closed"
{processor}""" + RUN


CONFIG = base_config("5004-5081", "adjacent_ttl = 1\n") + gateway("rtp", '["5004-5005", "5010-5011", "5020-5021", "5030-5031"]') \
    + gateway("rtp-allow", '["5040-5041"]', ssrc="allow") \
    + gateway("rtp-off", '["5050-5055"]', extra=f'offload = "after-validation"\noffload_after_packets = {OFFLOAD_AFTER}') \
    + gateway("rtp-out", '["5060-5061"]', src="lan", dst="wan") \
    + gateway("rtp-out-off", '["5062-5063"]', src="lan", dst="wan",
              extra=f'offload = "after-validation"\noffload_after_packets = {OFFLOAD_AFTER}') \
    + gateway("rtp-proc", '["5070-5071"]', adjacent="processor")

SDP = """v=0
o=- 0 0 IN IP{version} {sender}
s=nfgate rtp test
c=IN IP{version} {sender}
t=0 0
m=audio {port} RTP/AVP 0
a=rtpmap:0 PCMU/8000
"""


def ffmpeg_stream(lab: Any, tmp: Path, port: int, *, sender: str, receiver: str, src: str, dst: str, seconds: int,
                  during: Callable[[], None] | None = None) -> None:
    """ffmpeg in ``sender`` (address ``src``) streams ``seconds`` of PCMU with RTCP on port + 1 to ``dst``,
    where an ffmpeg in ``receiver`` reads an SDP; the receiver decodes all of it (its duration and size
    are checked). Either family: an IPv6 ``src`` and ``dst`` make an IPv6 stream. ``during`` runs
    while the sender streams."""
    version = ip_address(src).version
    sdp = tmp / f"stream-{port}.sdp"
    sdp.write_text(SDP.format(sender=src, port=port, version=version))
    out = tmp / f"received-{port}.wav"
    log_path = tmp / f"ffmpeg-receiver-{port}.log"
    log = open(log_path, "w")
    recv = lab.popen(receiver, ["ffmpeg", "-nostdin", "-hide_banner", "-y", "-protocol_whitelist", "file,udp,rtp",
                                "-i", str(sdp), "-c:a", "pcm_s16le", str(out)], stdout=log, stderr=subprocess.STDOUT)
    try:
        lab.wait_listening(receiver, port, "udp", timeout=10)
        host = f"[{dst}]" if version == 6 else dst
        send = lab.popen(sender, [
            "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-re", "-f", "lavfi",
            "-i", f"sine=frequency=440:duration={seconds}",
            "-c:a", "pcm_mulaw", "-ar", "8000", "-ac", "1", "-frame_size", "160", "-f", "rtp",
            f"rtp://{host}:{port}?pkt_size=172",
        ], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            if during is not None:
                during()
            _, err = send.communicate(timeout=60)
        finally:
            if send.poll() is None:
                send.kill()
                send.wait()
        assert send.returncode == 0, err
        # The receiver has everything once the stream is over; wait until the file stops growing.
        sizes: list[int] = []

        def settled() -> bool:
            sizes.append(out.stat().st_size if out.exists() else -1)
            return len(sizes) > 3 and sizes[-1] > 0 and len(set(sizes[-4:])) == 1

        wait_for(settled, timeout=20, interval=0.25, what="the receiver to write everything")
    finally:
        if recv.poll() is None:
            recv.terminate()  # ffmpeg finishes the file (the WAV header's sizes) on SIGTERM
            try:
                recv.wait(timeout=10)
            except subprocess.TimeoutExpired:
                recv.kill()
                recv.wait()
        log.close()
    probe = lab.run(receiver, ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", str(out)])
    duration = float(probe.stdout)
    assert abs(duration - seconds) <= 0.1, (duration, log_path.read_text())
    samples = out.stat().st_size - 44  # a canonical WAV header
    assert abs(samples - seconds * 8000 * 2) <= 2 * 160 * 2, samples  # within two packets


class RtpRunning(Running):
    """`nfgate run` with the rtp gateways of ``config`` in the lab router; their log, counters and rules."""

    def __init__(self, lab: Any, tmp: Path, config: str = CONFIG) -> None:
        super().__init__(lab, tmp, config=config)

    def counters(self, gateway: str = "rtp") -> dict[str, int]:
        """The gateway's counters now: SIGUSR1 makes it log a ``stats`` line."""
        proc = self.processes()[f"gateway-{gateway}"]
        before = len(self.events("stats", gateway))
        self.lab.run("router", ["kill", "-USR1", str(proc["pid"])])

        def stats() -> tuple[dict[str, int]] | None:
            lines = self.events("stats", gateway)
            if len(lines) == before:
                return None
            # A gateway that has relayed nothing yet logs no relay counter: an empty dict, in a
            # tuple so that wait_for takes it as an answer.
            return ({k[len("relay."):]: int(v) for k, v in re.findall(r" (relay\.\S+)=(\d+)", lines[-1])},)

        return wait_for(stats, timeout=10, interval=0.05, what=f"{gateway}'s stats line")[0]

    def events(self, name: str, gateway: str = "rtp") -> list[str]:
        """The gateway's log lines of event ``name``."""
        return [line for line in self.text().splitlines() if f"Z {gateway} {name} " in line]

    def rules_for(self, port: int) -> list[str]:
        """The binding table's dynamic elements that name ``port``."""
        return [e for e in dynamic_elements(self.lab) if re.search(rf"\b{port}\b", e.split(":", 1)[1])]


def send(lab: Any, src: str, sport: int, dport: int, plan: str, dst: str = WAN) -> int:
    """rtp_peers.py send in ext, from src:sport to dst:dport (the router's wan address by default)."""
    result = lab.run("ext", [sys.executable, PEERS, "send", src, str(sport), dst, str(dport), plan], check=False,
                     timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return int(json.loads(result.stdout)["sent"])


class Sink:
    """rtp_peers.py sink in lan: what reached each port, and from whom."""

    def __init__(self, lab: Any, *ports: int, seconds: float = 30, idle: float = 2.5) -> None:
        argv = [sys.executable, "-u", PEERS, "sink", str(seconds), str(idle), *map(str, ports)]
        self.proc = lab.popen("lan", argv, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def result(self) -> dict[int, list[list[Any]]]:
        out, _ = self.proc.communicate(timeout=60)
        return {int(k): v for k, v in json.loads(out).items()}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
