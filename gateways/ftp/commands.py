"""The FTP command table: what the gateway knows of each command, as data (STYLE.md, pyftpdlib's proto_cmds).

One generic check runs before any command's own handling (``FtpControl``):

1. the verb is known and allowed: unknown verbs get 500, known verbs the
   operator did not allow get 502 (RFC 959 section 4.2: "500 Syntax error,
   command unrecognized", "502 Command not implemented"); both count as bad
   commands;
2. the argument is there when needed and absent when not (501, bad);
3. ``login``: the command needs a completed login (530, not counted). The
   gateway opens no data port before the server has said 230: an
   unauthenticated peer can make no dynamic rule.

``role`` names the few commands the core treats specially; every other
command is forwarded with its argument unchanged.

The default allow-list (``DEFAULT_ALLOWED``) is every command here except
``SITE``, whose subcommands (SITE EXEC, SITE CHMOD) are server-specific and a
classic attack surface (RFC 2577 section 9). ``[gateway.settings]``
``allow_commands`` adds verbs (a verb not in the table is then forwarded with
an optional argument, and needs a login), ``deny_commands`` removes them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterable, Mapping


class Arg(enum.Enum):
    NONE = "none"
    REQUIRED = "required"
    OPTIONAL = "optional"


class Role(enum.Enum):
    """What the core does with a command beyond forwarding it."""

    PLAIN = "plain"
    USER = "user"  # length limit; a new login starts
    PASS = "pass"  # length limit; 530 replies count against max_login_failures
    ACCT = "acct"
    PORT = "port"  # active mode: checked, rewritten, rule after the 200
    EPRT = "eprt"
    PASV = "pasv"  # passive mode: rule when the 227 answers it
    EPSV = "epsv"
    AUTH = "auth"  # TLS: refused, or the control channel goes opaque after 234
    FEAT = "feat"  # the reply's feature list is filtered
    REIN = "rein"  # logs out


@dataclass(frozen=True)
class Spec:
    arg: Arg
    login: bool
    role: Role
    help: str


_N, _R, _O = Arg.NONE, Arg.REQUIRED, Arg.OPTIONAL


def _s(arg: Arg, login: bool, help: str, role: Role = Role.PLAIN) -> Spec:
    return Spec(arg, login, role, help)


# RFC 959 section 4.1 unless noted. ``login`` is True for everything that
# touches files or the data connection.
COMMANDS: Mapping[str, Spec] = MappingProxyType({
    # access control (RFC 959 4.1.1)
    "USER": _s(_R, False, "USER <name>: start a login", Role.USER),
    "PASS": _s(_O, False, "PASS <password>", Role.PASS),
    "ACCT": _s(_R, False, "ACCT <account>", Role.ACCT),
    "CWD": _s(_R, True, "CWD <path>: change directory"),
    "XCWD": _s(_R, True, "XCWD <path>: CWD (RFC 775)"),
    "CDUP": _s(_N, True, "CDUP: to the parent directory"),
    "XCUP": _s(_N, True, "XCUP: CDUP (RFC 775)"),
    "REIN": _s(_N, False, "REIN: log out, keep the connection", Role.REIN),
    "QUIT": _s(_N, False, "QUIT: end the session"),
    # transfer parameters (RFC 959 4.1.2, RFC 2428)
    "PORT": _s(_R, True, "PORT h1,h2,h3,h4,p1,p2: active mode", Role.PORT),
    "EPRT": _s(_R, True, "EPRT |1|address|port|: active mode (RFC 2428)", Role.EPRT),
    "PASV": _s(_N, True, "PASV: passive mode", Role.PASV),
    "EPSV": _s(_O, True, "EPSV [1|ALL]: passive mode (RFC 2428)", Role.EPSV),
    "TYPE": _s(_R, True, "TYPE A|I|L 8"),
    "STRU": _s(_R, True, "STRU F"),
    "MODE": _s(_R, True, "MODE S"),
    # service commands (RFC 959 4.1.3)
    "RETR": _s(_R, True, "RETR <path>: download"),
    "STOR": _s(_R, True, "STOR <path>: upload"),
    "STOU": _s(_O, True, "STOU: upload to a unique name"),
    "APPE": _s(_R, True, "APPE <path>: append"),
    "ALLO": _s(_R, True, "ALLO <bytes>"),
    "REST": _s(_R, True, "REST <offset>: restart (RFC 3659 section 5)"),
    "RNFR": _s(_R, True, "RNFR <path>: rename from"),
    "RNTO": _s(_R, True, "RNTO <path>: rename to"),
    "ABOR": _s(_N, False, "ABOR: abort the transfer"),
    "DELE": _s(_R, True, "DELE <path>: delete"),
    "RMD": _s(_R, True, "RMD <path>: remove a directory"),
    "XRMD": _s(_R, True, "XRMD <path>: RMD (RFC 775)"),
    "MKD": _s(_R, True, "MKD <path>: make a directory"),
    "XMKD": _s(_R, True, "XMKD <path>: MKD (RFC 775)"),
    "PWD": _s(_N, True, "PWD: the current directory"),
    "XPWD": _s(_N, True, "XPWD: PWD (RFC 775)"),
    "LIST": _s(_O, True, "LIST [<path>]"),
    "NLST": _s(_O, True, "NLST [<path>]"),
    "MLSD": _s(_O, True, "MLSD [<path>] (RFC 3659 section 7)"),
    "MLST": _s(_O, True, "MLST [<path>] (RFC 3659 section 7)"),
    "SIZE": _s(_R, True, "SIZE <path> (RFC 3659 section 4)"),
    "MDTM": _s(_R, True, "MDTM <path> (RFC 3659 section 3)"),
    "SITE": _s(_R, True, "SITE <command>: server-specific"),
    "SYST": _s(_N, False, "SYST: the server's system type"),
    "STAT": _s(_O, False, "STAT [<path>]"),
    "HELP": _s(_O, False, "HELP [<command>]"),
    "NOOP": _s(_N, False, "NOOP"),
    # extensions
    "FEAT": _s(_N, False, "FEAT: the server's features (RFC 2389)", Role.FEAT),
    "OPTS": _s(_R, False, "OPTS <command> <options> (RFC 2389)"),
    "LANG": _s(_O, False, "LANG [<tag>] (RFC 2640)"),
    "HOST": _s(_R, False, "HOST <name> (RFC 7151)"),
    "CLNT": _s(_R, False, "CLNT <client name>"),
    "AUTH": _s(_R, False, "AUTH TLS (RFC 4217, RFC 2228)", Role.AUTH),
    "PBSZ": _s(_R, False, "PBSZ 0 (RFC 4217)"),
    "PROT": _s(_R, False, "PROT C|P (RFC 4217)"),
    "CCC": _s(_N, False, "CCC: clear command channel (RFC 4217)"),
})

DEFAULT_ALLOWED: frozenset[str] = frozenset(COMMANDS) - {"SITE"}

# Security extensions of RFC 2228 / RFC 4217 that only make sense after AUTH:
# hidden from FEAT when TLS is refused.
SECURITY_FEATURES = frozenset({"AUTH", "PBSZ", "PROT", "CCC", "ADAT", "MIC", "CONF", "ENC"})

# A verb the operator allows that the table does not know.
UNKNOWN_ALLOWED = Spec(Arg.OPTIONAL, True, Role.PLAIN, "allowed by allow_commands")


def allowed_commands(allow: Iterable[str] = (), deny: Iterable[str] = ()) -> frozenset[str]:
    """The allow-list from the defaults and the two settings (verbs upper-cased)."""
    return (DEFAULT_ALLOWED | {v.upper() for v in allow}) - {v.upper() for v in deny}


def spec_of(verb: str) -> Spec:
    return COMMANDS.get(verb, UNKNOWN_ALLOWED)
