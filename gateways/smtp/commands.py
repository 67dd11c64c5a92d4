"""The SMTP command table and the extension table, as data (STYLE.md, after pyftpdlib and aiosmtpd).

One generic check runs before a command's own handling (``SmtpRelay``):

1. the line is a verb of letters, optionally a space and an argument, in
   printable US-ASCII (UTF-8 too once SMTPUTF8 is offered);
2. the verb is in ``COMMANDS``: an unknown verb gets 500, a verb the
   gateway knows and does not relay (``REFUSED``) gets 502 (RFC 5321
   section 4.2.4); both count as bad commands, and past
   ``max_bad_commands`` the session is closed (aiosmtpd's rule);
3. the argument is there when needed and absent when not (501);
4. the verb is in sequence (``state.in_sequence``, else 503).

``sync``: the core reads no further client line before this command's
reply has come, because what follows depends on it (EHLO: the extensions
offered; QUIT: the end). ``barrier``: nothing at all may follow before the
reply: after DATA comes content only once 354 is given, after STARTTLS a
TLS handshake only once 220 is given (RFC 2920 section 3.1, RFC 3207
section 4.2, CVE-2011-0411); bytes that arrive meanwhile are refused.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping


class Arg(enum.Enum):
    NONE = "none"
    REQUIRED = "required"
    OPTIONAL = "optional"


@dataclass(frozen=True)
class Spec:
    arg: Arg
    sync: bool
    barrier: bool
    help: str


_N, _R, _O = Arg.NONE, Arg.REQUIRED, Arg.OPTIONAL

# RFC 5321 section 4.1.1 unless noted.
COMMANDS: Mapping[str, Spec] = MappingProxyType({
    "EHLO": Spec(_R, True, False, "EHLO <domain>: name the client, ask for extensions (4.1.1.1)"),
    "HELO": Spec(_R, True, False, "HELO <domain>: name the client, no extensions (4.1.1.1)"),
    "MAIL": Spec(_R, False, False, "MAIL FROM:<reverse-path> [params]: start a transaction (4.1.1.2)"),
    "RCPT": Spec(_R, False, False, "RCPT TO:<forward-path> [params]: one recipient (4.1.1.3)"),
    "DATA": Spec(_N, True, True, "DATA: the content follows the 354 reply (4.1.1.4)"),
    "BDAT": Spec(_R, False, False, "BDAT <size> [LAST]: <size> bytes of content follow (RFC 3030); with CHUNKING"),
    "RSET": Spec(_N, False, False, "RSET: abort the transaction (4.1.1.5)"),
    "VRFY": Spec(_R, False, False, "VRFY <string>: verify a user (4.1.1.6); per policy"),
    "EXPN": Spec(_R, False, False, "EXPN <string>: expand a list (4.1.1.7); per policy"),
    "HELP": Spec(_O, False, False, "HELP [<string>] (4.1.1.8)"),
    "NOOP": Spec(_O, False, False, "NOOP [<string>] (4.1.1.9)"),
    "QUIT": Spec(_N, True, False, "QUIT: end the session (4.1.1.10)"),
    "STARTTLS": Spec(_N, True, True, "STARTTLS: TLS follows the 220 reply (RFC 3207); per policy"),
})

# Verbs of real SMTP extensions the gateway does not relay: 502, counted.
REFUSED: Mapping[str, str] = MappingProxyType({
    "AUTH": "AUTH is not offered (RFC 4954)",
    "TURN": "TURN is obsolete (RFC 5321 section F.1)",
    "ATRN": "ATRN is not offered (RFC 2645)",
    "ETRN": "ETRN is not offered (RFC 1985)",
    "SEND": "SEND is obsolete (RFC 5321 section F.6)",
    "SOML": "SOML is obsolete (RFC 5321 section F.6)",
    "SAML": "SAML is obsolete (RFC 5321 section F.6)",
    "VERB": "VERB is not offered",
    "XCLIENT": "XCLIENT is not offered",
    "XFORWARD": "XFORWARD is not offered",
})


# The EHLO keywords the gateway can check, with the MAIL and RCPT parameters
# each one brings. A keyword not here is removed from the server's EHLO
# reply; a parameter whose keyword was not offered is refused with 555
# (RFC 5321 section 4.1.1.11).
@dataclass(frozen=True)
class Extension:
    mail: frozenset[str]
    rcpt: frozenset[str]
    rfc: str


EXTENSIONS: Mapping[str, Extension] = MappingProxyType({
    "SIZE": Extension(frozenset({"SIZE"}), frozenset(), "RFC 1870"),
    "8BITMIME": Extension(frozenset({"BODY"}), frozenset(), "RFC 6152"),
    "PIPELINING": Extension(frozenset(), frozenset(), "RFC 2920"),
    "ENHANCEDSTATUSCODES": Extension(frozenset(), frozenset(), "RFC 2034"),
    "SMTPUTF8": Extension(frozenset({"SMTPUTF8"}), frozenset(), "RFC 6531"),
    "DSN": Extension(frozenset({"RET", "ENVID"}), frozenset({"NOTIFY", "ORCPT"}), "RFC 3461"),
    "STARTTLS": Extension(frozenset(), frozenset(), "RFC 3207"),
    "CHUNKING": Extension(frozenset(), frozenset(), "RFC 3030"),
})
