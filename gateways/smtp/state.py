"""The SMTP session's states and transitions, as a table (after h11's ``_state.py``).

Theory of operation
-------------------

An SMTP session is lock-step at heart (RFC 5321 section 4.1.4): the server
greets, the client names itself (EHLO or HELO), then each mail transaction
is MAIL, one or more RCPT, DATA and the content up to CRLF.CRLF. PIPELINING
(RFC 2920) lets the client send several commands before their replies, so
the core keeps two readings of the same table:

- ``confirmed``: the state the server's replies have put the session in.
  A command moves it only when its reply is positive (2xx, or 354 to DATA):
  a refused MAIL leaves the session where it was.
- ``expected``: ``confirmed`` with every command still awaiting its reply
  assumed to succeed. The core checks a new client command against it, so
  a pipelined ``MAIL, RCPT, RCPT, DATA`` passes, and an RCPT with no MAIL
  before it is refused by the gateway (503) without reaching the server.
  When a reply is negative, ``expected`` is worked out again from
  ``confirmed`` and the commands still pending.

``TRANSITIONS[state][verb]`` is the state a positive reply to ``verb``
leads to; a verb not in the row of ``expected`` is out of sequence (503).
``ANYTIME`` verbs are valid in every state after the greeting and change
nothing, except RSET, which ends a transaction (its own row entries).
``GREETING`` and ``END_OF_DATA`` are the two events that are not commands:
the server's greeting, and the reply to the end of a message's content.

CHUNKING (RFC 3030): ``BDAT <size>`` is valid once a recipient is in
(``RCPT``) and leads to ``BDAT``, where only more chunks, RSET and the
ANYTIME verbs are in sequence: DATA, MAIL and RCPT get 503 (section 2, no
mixing of BDAT and DATA). ``BDAT <size> LAST`` (the pseudo-verb
``BDAT_LAST``) ends the transaction (``READY``). A chunk the server
refuses leaves the session in ``BDAT_FAILED`` (the core sets it), where
the client must RSET (or EHLO/HELO) before anything else of a transaction
(section 2: "MUST NOT send any additional BDAT segments").
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    GREETING = "greeting"  # waiting for the server's 220 (RFC 5321 section 4.3.1)
    INIT = "init"  # greeted: EHLO or HELO first (section 4.1.4)
    READY = "ready"  # named: no transaction in progress
    MAIL = "mail"  # MAIL accepted: RCPT next
    RCPT = "rcpt"  # at least one RCPT accepted: more RCPT, or DATA
    DATA = "data"  # 354 given: message content up to CRLF.CRLF (section 4.1.1.4)
    BDAT = "bdat"  # chunks accepted, no LAST yet (RFC 3030 section 2)
    BDAT_FAILED = "bdat_failed"  # the server refused a chunk: RSET first (RFC 3030 section 2)
    TLS = "tls"  # STARTTLS answered 220: a handshake, or bytes only (RFC 3207 section 4.2)
    CLOSED = "closed"

    # Members are singletons: the identity hash, in C, not Enum's hash of the
    # name in Python, for the table look-ups of every command and reply.
    __hash__ = object.__hash__


GREETING = "<greeting>"
END_OF_DATA = "<end-of-data>"
BDAT_LAST = "BDAT LAST"  # the last chunk's command: its reply ends the transaction

S = State
TRANSITIONS: dict[State, dict[str, State]] = {
    S.GREETING: {GREETING: S.INIT},
    S.INIT: {"EHLO": S.READY, "HELO": S.READY, "RSET": S.INIT},
    S.READY: {"EHLO": S.READY, "HELO": S.READY, "RSET": S.READY, "MAIL": S.MAIL, "STARTTLS": S.TLS},
    S.MAIL: {"EHLO": S.READY, "HELO": S.READY, "RSET": S.READY, "RCPT": S.RCPT},
    S.RCPT: {"EHLO": S.READY, "HELO": S.READY, "RSET": S.READY, "RCPT": S.RCPT, "DATA": S.DATA,
             "BDAT": S.BDAT, BDAT_LAST: S.READY},
    S.DATA: {END_OF_DATA: S.READY},
    S.BDAT: {"EHLO": S.READY, "HELO": S.READY, "RSET": S.READY, "BDAT": S.BDAT, BDAT_LAST: S.READY},
    S.BDAT_FAILED: {"EHLO": S.READY, "HELO": S.READY, "RSET": S.READY},
    S.TLS: {},
    S.CLOSED: {},
}

# Valid in every state where commands are read; they leave the state as it is.
ANYTIME = frozenset({"NOOP", "QUIT", "VRFY", "EXPN", "HELP", "RSET"})

# States in which the core reads command lines (DATA reads content; TLS and
# CLOSED read nothing of the client's as commands).
COMMAND_STATES = frozenset({S.INIT, S.READY, S.MAIL, S.RCPT, S.BDAT, S.BDAT_FAILED})


def after(state: State, verb: str) -> State:
    """The state a positive reply to ``verb`` leads to from ``state``."""
    return TRANSITIONS[state].get(verb, state)


def in_sequence(state: State, verb: str) -> bool:
    """Whether ``verb`` may be sent in ``state`` (else 503, RFC 5321 section 4.3.2)."""
    return verb in TRANSITIONS[state] or (verb in ANYTIME and state in COMMAND_STATES)
