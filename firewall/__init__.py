"""nfgate's router side.

- ``config``: load and validate the TOML config (every error with its key
  path): pydantic models, and ``nfgate config schema``'s JSON Schema. What
  a gateway kind accepts comes from the kind registry (``gateways.kinds``);
  nothing in ``firewall/`` names a kind.
- ``fields``: the field types every TOML file's models share (ports, ranges,
  networks, marks, bounded numbers), each with its one-line refusal and its
  JSON Schema; ``problems``: pydantic's errors as key paths and those
  reasons (``Problem``, ``ConfigError``); ``locate``: a key path's line.
  Neither imports ``config``: the gateways and the tunnel use them.
- ``rules``: one typed rule model built from the config, rendered as nftables
  text or as iptables-restore input.
- ``backend``: detect what the kernel supports, apply a ruleset atomically,
  flush exactly what nfgate installed.
- ``packet``: parse IPv4 TCP/UDP headers from bytes (the processor's
  per-packet code; no scapy). ``packet6``: the same for IPv6, extension
  headers walked (the first packets of the IPv6 gateway flows).
- ``pools``: O(1) allocation of the double NAT's endpoints, sliced per instance.
- ``flows``: bindings and the binding table; a binding lives as long as its conntrack entries.
- ``signalling``: the authenticated UDP protocol between the processor and
  the gateways' deNAT/reNAT layer (docs/signalling.md).
- ``eventlog``: the one-line-per-event log format (text or JSON) that the
  gateways and the tunnel share.
- ``replay``: the one sliding ``ReplayWindow`` (RFC 4303 section 3.4.3) behind
  the signalling Guard and the tunnel's UDP channels.
- ``drive``: ``CoreDriver``, which carries out a sans-IO core's outputs and
  keeps its timer, for the gateways' layer and the tunnel's two ends.
- ``control``: the one JSON control socket (root-only unix socket, one request
  and one answer per connection, commands as data) and its client ``ask``.
- ``manifests``: each gateway's manifest, written from the config
  (docs/manifest.md; the format is ``gateways.manifest``).
- ``supervisor``: ``nfgate run``: blind track, rules, manifests, processors and
  gateways, restarts, the control socket.
- ``gwlink``: the blind track (the gateway namespace and its veth link).
- ``processor``: the packet processor: the first packet of each gateway flow
  (``core``, ``rulebook``), the kernel's maps and conntrack (``kernel``),
  the queue loop (``runner``).
- ``errors``: the error classes and their exit codes.
- ``namespaces``: the pyroute2 steps shared by the lab and ``gwlink`` (the
  blind track): veth pairs into a namespace, addresses, routes, sysctls inside
  a namespace, and the processes inside one.
- ``lab``: topologies as data, built as network namespaces with pyroute2.
- ``cli``: the ``nfgate`` command.
"""
