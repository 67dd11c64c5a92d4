"""nfgate's NAT-traversal tunnel: mediation system, control server, and the
channel protocol between them (seed 000_893168e991dbb348.txt).

The protocol is specified in docs/tunnel-protocol.md. Its logic is sans-IO
(DESIGN.md invariant 9): bytes and datagrams go in, commands and events come
out, and a thin asyncio layer carries the commands out.

- ``frames``: the TCP channel's frames, ``encode_frame`` and ``FrameDecoder``.
- ``wire``: field encodings shared by the frames (addresses, text, ints).
- ``datagrams``: the UDP channels' authenticated datagrams (their replay window
  is ``firewall.replay``).
- ``errors``: ``ErrorCode``, and ``ProtocolError`` (peer's fault) versus
  ``LocalProtocolError`` (caller's bug) and ``LimitError``.
- ``states``: the channel and port state machines, as tables.
- ``settings``: every timer and limit, with defaults (``MediatorSettings``,
  ``ServerSettings``, ``MediatorLimits``).
- ``policy``: verdict hooks: the mediator's allow-list, the server's login.
- ``commands``: what the cores return: commands to carry out, events to note.
- ``channel``: what both cores share (decoding, state moves, closing).
- ``window``: per-connection credit windows (version 3), ``StreamWindow``.
- ``mediator_core``: ``MediatorCore``, the mediation system's side.
- ``server_core``: ``ServerSession``, the control server's side of one mediator.

The asyncio layers around the cores, and how they are run:

- ``tls``: pins (SHA-256 of the DER) and TLS contexts.
- ``keygen``: keys and self-signed certificates (``nfgate tunnel keygen``).
- ``pacing``: reconnect ``Backoff`` (bounded, full jitter) and the bytes/s
  ``TokenBucket``.
- ``aio``: flow-control and reset helpers both ends share.
- ``events``: one log line per event, text or JSON.
- ``config``: the standalone TOML files (server, mediators, mediator).
- ``mediator``: ``Mediator``, the mediation system: channel, sockets, reconnects;
  ``run_mediator``.
- ``warm``: the mediator's ``WarmPool``, connections made to a publication's
  target ahead of its next public client.
- ``session``: ``Session``, the server's side of one channel, with awaitable requests.
- ``publish``: publications: public TCP connections and UDP flows relayed
  through the tunnel.
- ``server``: ``TunnelServer`` (sessions, mediator records, publications,
  operator operations) and ``StandaloneFrontend``.
- ``gateway``: ``GatewayFrontend``, the server as the ``tunnel`` gateway kind;
  ``kind``: that kind's declaration (gateways/kind.py).
- ``operator``: the operator's commands, served on nfgate's root-only control
  socket (``firewall.control``, which also has the client).
- ``service``: ``run_server``, ``run_gateway``.
- ``cli``: the ``nfgate tunnel`` command group (``python -m tunnel.cli``).
"""
