"""The ``smtp`` gateway: SMTP checked against RFC 5321 (issue 10, docs/smtp.md).

The seed's main example of an application gateway: it "ensures that these
connections only proceed according to the SMTP specifications". Deployed
in front of a mail server in the LAN (inbound), or for LAN clients sending
out through masquerade (outbound).

- ``settings``: ``SmtpSettings``, the pydantic model of its
  ``[gateway.settings]`` (imports only pydantic: the config loader reads it).
- ``state``: the session's states and transitions, as a table.
- ``commands``: the command table (argument, sync, barrier) and the
  extension table (which MAIL/RCPT parameters each EHLO keyword brings).
- ``lines``: command lines, paths, parameters and replies, parsed strictly
  and written anew; the EHLO reply rebuilt from the allow-list.
- ``data``: the message content after 354: the strict end of data, dots,
  line ends, size; what makes it immune to SMTP smuggling. ``Chunks``: the
  same line rules on BDAT chunks (RFC 3030), checked as they stream.
- ``model``: the core's ``Policy`` and its outputs.
- ``policy``: the config's domain lists as the core's hooks.
- ``replies``: the gateway's own replies (code, enhanced code, text).
- ``chunking``: CHUNKING (RFC 3030): BDAT's command, chunks and replies,
  a mixin of ``SmtpRelay``.
- ``core``: ``SmtpRelay``, the sans-IO session: bytes from each peer in,
  bytes, TLS steps, closes and events out.
- ``gateway``: ``SmtpGateway``, the asyncio adapter on the shared layer.

This package's ``__init__`` imports nothing, so that the router's config
loader can import ``settings`` without the gateway.
"""
