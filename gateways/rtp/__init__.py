"""The ``rtp`` gateway kind: RTP and RTCP validated and relayed, latched, limited (docs/rtp.md).

- ``parse``: RTP header and compound RTCP checks (RFC 3550 section 5.1,
  6.4, appendix A), RFC 5761's RTP/RTCP demultiplexing; pure functions that
  return a value or a ``Problem``.
- ``settings``: ``RtpSettings``, the kind's ``[gateway.settings]`` as a
  frozen pydantic model, and the ``Policy`` the core reads.
- ``core``: ``RtpCore``, sans-IO: streams (a destination port pair), the
  latch, SSRC, rate and no-media limits, adjacent-port rule requests, the
  offload of validated streams and their kernel-carried end.
- ``gateway``: ``RtpGateway``, the asyncio adapter on gateways/udp_flows.py
  (G:g, one leg B per flow, the lookups): the layer's rule and offload
  requests, the core's clock.
"""
