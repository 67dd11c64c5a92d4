"""nfgate's user-mode application gateways and the deNAT/reNAT layer they share.

Each gateway runs as its own process in the gateway network namespace, at the
end of the blind-track link from the router (DESIGN.md, "The parts"), and
sees a redirected flow as a connection from a firewall-side endpoint F:f to
its own G:g. The layer tells it the flow's original tuple, learnt by
signalling with the packet processor (docs/signalling.md), and leg B leaves
by connecting back to F:f, where the processor restores it (docs/datapath.md).

- ``kind``: what a gateway kind declares (``Kind``), and ``kinds``: the
  registry, one line per kind. The config, the processor, the supervisor and
  ``__main__`` read it; adding a kind is its module and one line there.
- ``session``: the outputs every sans-IO session core shares (``Close``, ``Event``).
- ``manifest``: the gateway's manifest, all a gateway process reads
  (docs/manifest.md).
- ``layer/``: the deNAT/reNAT layer (the seed's "Signalling in general"):
  ``core`` (sans-IO flow table, push/pull lookups, rule requests) and its
  ``outputs``,
  ``instances`` (which processor instance owns a flow, where each listens),
  ``endpoint`` (``GatewayLayer``, the asyncio adapter, leg B),
  ``events`` (one log line per event, text or JSON).
- ``relay/``: relaying a TCP stream between leg A and leg B: a sans-IO
  ``core`` (data, backpressure, half-close, resets, idle, byte limits, the
  inspection hook) and the one asyncio ``driver`` that carries it out, with
  ``os.splice`` where nothing inspects the bytes, once a direction carries bulk.
- ``tcp_server``: what every TCP gateway shares: listening on G:g (pausing
  when out of descriptors), a task per connection, errors contained,
  bounded close, ``reset``.
- ``tcp_relay``: the ``tcp-relay`` kind (its settings and ``KIND`` too):
  relays TCP both ways (``relay/``) and logs each connection's real
  addresses, or only logs them (``mode = "log-only"``).
- ``udp_flows``: what every UDP gateway shares: G:g, a lookup per new F:f
  with a bounded queue of early datagrams, one leg B socket per flow,
  ``max_flows``, close.
- ``udp_relay``: the ``udp-relay`` kind: the same for UDP flows (on
  ``udp_flows``), handed to the kernel after ``offload_after`` datagrams.
- ``ftp/``: the ``ftp`` kind (docs/ftp.md; ``kind``: its settings and
  declaration): a sans-IO control-channel core
  (``core``, ``commands``, ``parse``) that asks the processor for exact,
  one-shot data-port rules, its asyncio adapter (``gateway``), and what its
  data connections add to ``relay/`` (``data``: the size limit and the
  content hook of inspect mode).
- ``smtp/``: the ``smtp`` kind (docs/smtp.md): a sans-IO SMTP core
  (``core``, ``state``, ``commands``, ``lines``, ``data``) between client and
  server, its policy hooks (``policy``), its settings model and declaration (``settings``)
  and its asyncio adapter (``gateway``).
- ``rtp/``: the ``rtp`` kind (docs/rtp.md): RTP/RTCP checks (``parse``),
  the kind's settings model and declaration (``settings``), a sans-IO core of streams,
  latching, limits, adjacent-port rule requests and offload (``core``) and its
  asyncio adapter on ``udp_flows`` (``gateway``).
- ``__main__``: ``python -m gateways --manifest PATH [--log-json]``, one
  gateway process, as the supervisor starts it: it runs the entry point its
  kind declares, the ``tunnel`` kind's included (``tunnel.service.run_gateway``).
  Nothing in this package imports it.
"""
