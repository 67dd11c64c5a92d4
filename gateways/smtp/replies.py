"""The SMTP gateway's own replies (RFC 5321 section 4.2, RFC 3463 enhanced codes), for ``core`` and ``chunking``.

The replies about message content are in ``data``; those of the adapter
(too many sessions, no server) in ``gateway``.
"""

from __future__ import annotations

from gateways.smtp.model import Reply

UNRECOGNIZED = Reply(500, "5.5.2", "Syntax error, command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long (RFC 5321 section 4.5.3.1.4)")
BARE_LINE_END = Reply(500, "5.5.2", "Bare CR or LF in a command")
BAD_ARGUMENT = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
BAD_PARAMETER = Reply(555, "5.5.4", "MAIL FROM/RCPT TO parameters not recognized or not implemented")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
TOO_MANY_MESSAGES = Reply(452, "4.7.1", "Too many messages in this session")
NO_RELAY = Reply(550, "5.7.1", "Relay access denied")
NO_VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
NO_EXPN = Reply(502, "5.5.1", "EXPN not available")
NO_STARTTLS = Reply(502, "5.5.1", "STARTTLS not available")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors; closing")
EARLY_TALKER = Reply(554, "5.5.0", "Client spoke before the greeting; closing")
PIPELINED_AFTER_DATA = Reply(554, "5.5.0", "Commands pipelined after DATA; closing")
PIPELINED_AFTER_STARTTLS = Reply(554, "5.5.0", "Commands pipelined after STARTTLS; closing")
TOO_MUCH_INPUT = Reply(421, "4.7.0", "Too much pipelined input; closing")
SERVER_REFUSED = Reply(421, "4.4.0", "The server's reply was refused; closing")
SERVER_GONE = Reply(421, "4.4.2", "The server closed the connection")
TLS_FAILED = Reply(421, "4.7.0", "TLS towards the server failed; closing")
START_TLS = Reply(220, "2.0.0", "Ready to start TLS")

# CHUNKING (RFC 3030, ``chunking``).
NO_CHUNKING = Reply(502, "5.5.1", "CHUNKING is not offered (RFC 3030)")
# Without a size the chunk's end is unknown, and a chunk past the limit is
# not read: either way the client's next bytes cannot be told apart from
# commands, so the session ends (RFC 3030 section 2).
BAD_BDAT = Reply(501, "5.5.4", "Syntax: BDAT <size> [LAST]; closing")
CHUNK_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size; closing")
