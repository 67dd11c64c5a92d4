"""The sans-IO SMTP core, playbook style: exact bytes in, exact bytes and closes out (gateways/smtp/core.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from hypothesis import HealthCheck, given, settings, strategies as st

from gateways.kinds import KINDS
from gateways.smtp.core import MAX_ANSWERS_PER_TURN, MAX_BACKLOG, SmtpRelay
from gateways.smtp.model import Close, Policy, ToClient
from gateways.smtp.policy import policy_of
from gateways.smtp.settings import SmtpSettings
from tests.gateways.smtp_dialogue import ANY, EHLO_REPLY, GREETING, Seen, play, session, strict_line_ends

OK = b"250 2.0.0 Ok\r\n"
MAIL = b"MAIL FROM:<alice@example.org>\r\n"
RCPT = b"RCPT TO:<bob@example.com>\r\n"

ONE_MESSAGE = session(
    ("c", MAIL + RCPT + b"DATA\r\n"),
    ("s", OK + OK + b"354 End data with <CR><LF>.<CR><LF>\r\n"),
    ("c", b"Subject: hi\r\n\r\nline one\r\n..leading dot\r\n.\r\n"),
    ("s", b"250 2.0.0 Ok: queued as ABC\r\n"),
    ("c", b"QUIT\r\n"),
    ("s", b"221 2.0.0 Bye\r\n"),
)


def test_a_pipelined_message_passes_with_the_ehlo_reply_rebuilt() -> None:
    seen = play(ONE_MESSAGE)
    assert seen.to_server == (
        b"EHLO client.example.org\r\n" + MAIL + RCPT + b"DATA\r\n"
        b"Subject: hi\r\n\r\nline one\r\n..leading dot\r\n.\r\nQUIT\r\n"
    )
    assert seen.to_client == (
        GREETING + b"250-mx.example.com\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-ENHANCEDSTATUSCODES\r\n"
        b"250 8BITMIME\r\n" + OK + OK + b"354 End data with <CR><LF>.<CR><LF>\r\n"
        b"250 2.0.0 Ok: queued as ABC\r\n221 2.0.0 Bye\r\n"
    )
    assert seen.closed == "quit" and "message.accepted" in seen.events


@pytest.mark.parametrize("split", [1, 2, 3, 7, 64])
def test_the_dialogue_fed_in_pieces_gives_the_same_bytes(split: int) -> None:
    whole = play(ONE_MESSAGE)
    cut = play(ONE_MESSAGE, split=split)
    assert (cut.to_server, cut.to_client, cut.closed) == (whole.to_server, whole.to_client, whole.closed)


def test_the_dialogue_split_at_every_offset_gives_the_same_bytes() -> None:
    whole = play(ONE_MESSAGE)
    for i, (side, data) in enumerate(ONE_MESSAGE):
        for at in range(1, len(data)):
            steps = ONE_MESSAGE[:i] + [(side, data[:at]), (side, data[at:])] + ONE_MESSAGE[i + 1:]
            cut = play(steps)
            assert (cut.to_server, cut.to_client, cut.closed) == (whole.to_server, whole.to_client, whole.closed), (i, at)


def test_ehlo_keeps_only_the_allowed_extensions_and_the_smaller_size() -> None:
    policy = Policy(recipient=ANY, extensions=frozenset({"SIZE", "SMTPUTF8", "DSN"}), max_message_size=1000)
    seen = play(session(), policy)
    assert seen.to_client.endswith(b"250-mx.example.com\r\n250-SIZE 1000\r\n250-DSN\r\n250 SMTPUTF8\r\n")


def test_size_zero_from_the_server_means_ours() -> None:
    steps = [("s", GREETING), ("c", b"EHLO c\r\n"), ("s", b"250-mx\r\n250 SIZE 0\r\n")]
    assert play(steps).to_client.endswith(b"250-mx\r\n250 SIZE 26214400\r\n")


def test_starttls_is_offered_per_mode() -> None:
    assert b"STARTTLS" not in play(session()).to_client
    assert b"250-STARTTLS" in play(session(), Policy(recipient=ANY, starttls="passthrough")).to_client
    assert b"STARTTLS" not in play(session(), Policy(recipient=ANY, starttls="terminate")).to_client  # no certificate
    assert b"250-STARTTLS" in play(session(), Policy(recipient=ANY, starttls="terminate", tls_available=True)).to_client


# ---- limits: at the limit and one past it ---------------------------------------------------


def test_command_line_limit() -> None:
    def line(n: int) -> bytes:  # a NOOP line of n bytes with its CRLF
        return b"NOOP " + b"x" * (n - 7) + b"\r\n"

    at = play(session(("c", line(512))))
    assert at.to_server.endswith(b"NOOP\r\n")
    past = play(session(("c", line(513))))
    assert not past.to_server.endswith(b"NOOP\r\n") and past.to_client.endswith(b"500 5.5.6 Line too long (RFC 5321 section 4.5.3.1.4)\r\n")
    assert "refused.line_too_long" in past.events and past.closed is None


def test_an_overlong_command_line_in_pieces_is_refused_once_and_the_next_line_works() -> None:
    steps = session(("c", b"NOOP " + b"x" * 600), ("c", b"y" * 600), ("c", b"\r\nRSET\r\n"))
    seen = play(steps)
    assert seen.to_client.count(b"500 5.5.6") == 1 and seen.to_server.endswith(b"RSET\r\n")


def data_steps(content: bytes, policy_size: int | None = None) -> list:
    return session(("c", MAIL + RCPT + b"DATA\r\n"), ("s", OK + OK + b"354 go\r\n"), ("c", content))


def test_text_line_limit() -> None:
    at = play(data_steps(b"a" * 998 + b"\r\n.\r\n"))
    assert at.to_server.endswith(b"a" * 998 + b"\r\n.\r\n") and at.closed is None
    past = play(data_steps(b"a" * 999 + b"\r\n.\r\n"))
    assert b"a" * 999 not in past.to_server and not past.to_server.endswith(b".\r\n")
    assert past.to_client.endswith(b"554 5.6.0 Message line too long (RFC 5321 section 4.5.3.1.6); message refused\r\n")
    assert past.closed == "content_refused"


def test_text_line_limit_across_chunks() -> None:
    past = play(data_steps(b"a" * 999 + b"\r\n.\r\n"), split=100)
    assert past.closed == "content_refused" and not past.to_server.endswith(b"\r\n.\r\n")


def test_reply_line_limit() -> None:
    text = b"250 " + b"x" * 506 + b"\r\n"
    assert len(text) == 512
    at = play([("s", GREETING), ("c", b"NOOP\r\n"), ("s", text)])
    assert at.to_client.endswith(text) and at.closed is None
    past = play([("s", GREETING), ("c", b"NOOP\r\n"), ("s", b"250 " + b"x" * 507 + b"\r\n")])
    assert past.to_client.endswith(b"421 4.4.0 The server's reply was refused; closing\r\n") and past.closed == "server_protocol"


def test_message_size_limit_on_content() -> None:
    policy = Policy(recipient=ANY, max_message_size=2000)
    body = (b"x" * 98 + b"\r\n") * 20  # 2000 bytes
    at = play(data_steps(body + b".\r\n"), policy)
    assert at.to_server.endswith(body + b".\r\n") and at.closed is None
    past = play(data_steps(body + b"y\r\n.\r\n"), policy)
    assert past.to_client.endswith(b"552 5.3.4 Message size exceeds fixed maximum message size\r\n")
    assert past.closed == "content_refused" and not past.to_server.endswith(b".\r\n")


def test_mail_size_parameter_against_the_limit() -> None:
    # The server offers 10240000; the smaller of it and ours is what counts.
    at = play(session(("c", b"MAIL FROM:<a@example.org> SIZE=10240000\r\n")))
    assert at.to_server.endswith(b"MAIL FROM:<a@example.org> SIZE=10240000\r\n")
    past = play(session(("c", b"MAIL FROM:<a@example.org> SIZE=10240001\r\n")))
    assert past.to_client.endswith(b"552 5.3.4 Message size exceeds fixed maximum message size\r\n")
    assert b"SIZE=10240001" not in past.to_server


def test_recipient_limit() -> None:
    policy = Policy(recipient=ANY, max_recipients=3)
    rcpts = b"".join(b"RCPT TO:<r%d@example.com>\r\n" % i for i in range(4))
    seen = play(session(("c", MAIL + rcpts), ("s", OK * 4)), policy)
    assert seen.to_server.count(b"RCPT TO:") == 3 and b"r3@" not in seen.to_server
    assert seen.replies()[-4:] == [b"250 2.0.0 Ok"] * 3 + [b"452 4.5.3 Too many recipients"]


def test_a_refused_recipient_does_not_count() -> None:
    policy = Policy(recipient=ANY, max_recipients=2)
    steps = session(("c", MAIL + RCPT + RCPT), ("s", OK + b"550 5.1.1 unknown\r\n" + OK), ("c", RCPT), ("s", b"452 4.5.3 full\r\n"))
    seen = play(steps, policy)
    assert seen.to_server.count(b"RCPT TO:") == 3  # the third went to the server: one of two was refused


def test_message_limit() -> None:
    policy = Policy(recipient=ANY, max_messages=2)
    one = [("c", MAIL + RCPT + b"DATA\r\n"), ("s", OK + OK + b"354 go\r\n"), ("c", b"hi\r\n.\r\n"), ("s", OK)]
    seen = play(session(*one, *one, ("c", MAIL)), policy)
    assert seen.to_server.count(b"MAIL FROM") == 2
    assert seen.to_client.endswith(b"452 4.7.1 Too many messages in this session\r\n")


def test_unknown_commands_are_answered_then_the_session_closes() -> None:
    policy = Policy(recipient=ANY, max_bad_commands=2)
    at = play(session(("c", b"XYZZY\r\nBDAT 10 LAST\r\n")), policy)
    assert at.replies()[-2:] == [b"500 5.5.2 Syntax error, command unrecognized", b"502 5.5.1 CHUNKING is not offered (RFC 3030)"]
    assert at.closed is None
    past = play(session(("c", b"XYZZY\r\nBDAT 10 LAST\r\nFOO\r\n")), policy)
    assert past.to_client.endswith(b"421 4.7.0 Too many errors; closing\r\n") and past.closed == "too_many_errors"
    assert b"XYZZY" not in past.to_server and b"BDAT" not in past.to_server


# ---- smuggling: the end of data is CRLF.CRLF and nothing else -------------------------------

SMUGGLED = b"MAIL FROM:<admin@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nFrom: admin\r\n\r\nspoofed\r\n"
VARIANTS = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r\r\n", b"\r\n\x00.\r\n", b"\n.\r\r\n", b"\r.\r\n", b"\r\n.\r"]


@pytest.mark.parametrize("end", VARIANTS, ids=repr)
@pytest.mark.parametrize("split", [None, 1, 5])
def test_smuggled_end_of_data_never_makes_a_second_message(end: bytes, split: int | None) -> None:
    content = b"Subject: real\r\n\r\nreal" + end + SMUGGLED + b".\r\n"
    seen = play(data_steps(content), split=split)
    # The server sees neither an end of data nor the smuggled commands.
    assert b"admin@" not in seen.to_server and not seen.to_server.endswith(b".\r\n")
    assert strict_line_ends(seen.to_server)
    why = b"NUL" if b"\x00" in end else b"Bare CR or LF"
    assert seen.closed == "content_refused" and seen.to_client.endswith(b"554 5.6.0 " + why + b" in message content; message refused\r\n")


def test_dots_are_undone_and_redone() -> None:
    seen = play(data_steps(b".single\r\n..double\r\n...triple\r\nx.y\r\n.\r\n"))
    assert seen.to_server.endswith(b"DATA\r\nsingle\r\n..double\r\n...triple\r\nx.y\r\n.\r\n")


def test_an_empty_message_ends_at_once() -> None:
    assert play(data_steps(b".\r\n")).to_server.endswith(b"DATA\r\n.\r\n")


# ---- pipelining ---------------------------------------------------------------------------


def test_replies_keep_their_order_around_the_gateways_own() -> None:
    policy = policy_of(SmtpSettings(recipient_domains=("example.com",)))
    steps = session(("c", MAIL + b"RCPT TO:<x@elsewhere.net>\r\n" + RCPT + b"XYZ\r\n"), ("s", OK + OK))
    seen = play(steps, policy)
    assert seen.replies()[-4:] == [b"250 2.0.0 Ok", b"550 5.7.1 Relay access denied", b"250 2.0.0 Ok",
                                   b"500 5.5.2 Syntax error, command unrecognized"]
    assert b"elsewhere" not in seen.to_server


def test_no_recipient_hook_relays_nothing() -> None:
    seen = play(session(("c", MAIL + RCPT), ("s", OK)), Policy())
    assert seen.replies()[-1] == b"550 5.7.1 Relay access denied" and b"RCPT" not in seen.to_server


def test_postmaster_always_passes() -> None:
    seen = play(session(("c", MAIL + b"RCPT TO:<Postmaster>\r\n")), Policy())
    assert seen.to_server.endswith(b"RCPT TO:<Postmaster>\r\n")


def test_commands_pipelined_after_data_are_refused() -> None:
    seen = play(session(("c", MAIL + RCPT + b"DATA\r\nSubject: early\r\n")))
    assert seen.closed == "pipelined_after_data" and b"DATA" not in seen.to_server
    late = play(session(("c", MAIL + RCPT + b"DATA\r\n"), ("s", OK + OK), ("c", b"Subject: early\r\n")))
    assert late.closed == "pipelined_after_data" and late.to_client.endswith(b"554 5.5.0 Commands pipelined after DATA; closing\r\n")


def test_starttls_strip_refuses_it_and_anything_pipelined_after_it() -> None:
    alone = play(session(("c", b"STARTTLS\r\n")))
    assert alone.to_client.endswith(b"502 5.5.1 STARTTLS not available\r\n") and alone.closed is None
    piped = play(session(("c", b"STARTTLS\r\nMAIL FROM:<a@example.org>\r\n")))
    assert piped.closed == "pipelined_after_starttls" and b"STARTTLS" not in piped.to_server and b"MAIL" not in piped.to_server


def test_starttls_passthrough_goes_opaque_after_220() -> None:
    policy = Policy(recipient=ANY, starttls="passthrough")
    seen = play(session(("c", b"STARTTLS\r\n"), ("s", b"220 2.0.0 Ready\r\n")), policy)
    assert seen.opaque and seen.to_server.endswith(b"STARTTLS\r\n") and seen.to_client.endswith(b"220 2.0.0 Ready\r\n")
    piped = play(session(("c", b"STARTTLS\r\n"), ("c", b"MAIL FROM:<a@b.c>\r\n"), ("s", b"220 go\r\n")), policy)
    assert piped.closed == "pipelined_after_starttls" and not piped.opaque


def test_starttls_terminate_hands_over_and_forgets_the_session() -> None:
    policy = Policy(recipient=ANY, starttls="terminate", tls_available=True)
    core = SmtpRelay(policy)
    for side, data in session(("c", b"STARTTLS\r\n")):
        (core.client_data if side == "c" else core.server_data)(data)
    out = core.server_data(b"220 2.0.0 Ready\r\n")
    assert [type(o).__name__ for o in out] == ["StartTls"]
    core.tls_started()
    assert core.offered == frozenset()
    assert core.client_data(b"MAIL FROM:<a@b.c>\r\n")[-1].data.startswith(b"503")  # EHLO again first


def test_a_failed_handshake_towards_the_server_tells_the_client() -> None:
    policy = Policy(recipient=ANY, starttls="terminate", tls_available=True)
    for leg, told in (("server", b"421 4.7.0 TLS towards the server failed; closing\r\n"), ("client", b"")):
        core = SmtpRelay(policy)
        for side, data in session(("c", b"STARTTLS\r\n"), ("s", b"220 2.0.0 Ready\r\n")):
            (core.client_data if side == "c" else core.server_data)(data)
        out = core.tls_failed("certificate verify failed", leg)
        assert [o.data for o in out if isinstance(o, ToClient)] == ([told] if told else [])
        assert isinstance(out[-1], Close) and core.closed


def test_server_plaintext_after_its_220_is_refused() -> None:
    policy = Policy(recipient=ANY, starttls="passthrough")
    seen = play(session(("c", b"STARTTLS\r\n"), ("s", b"220 go\r\n250 injected\r\n")), policy)
    assert seen.closed == "server_protocol" and not seen.opaque


# ---- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("line", [b"NOOP\n", b"NO\rOP\r\n", b"MAIL FROM:<a@b.c>\nRCPT TO:<x@y.z>\r\n"], ids=repr)
def test_bare_cr_or_lf_in_a_command_is_refused_and_not_forwarded(line: bytes) -> None:
    seen = play(session(("c", line)))
    assert b"500 5.5.2 Bare CR or LF in a command" in seen.to_client
    assert seen.to_server.endswith(b"EHLO client.example.org\r\n")


def test_nul_and_garbage_are_refused() -> None:
    seen = play(session(("c", b"MAIL\x00 FROM:<a@b.c>\r\n\xff\xfe\r\n")))
    assert seen.replies()[-2:] == [b"500 5.5.2 Syntax error, command unrecognized"] * 2
    assert b"MAIL" not in seen.to_server


def test_bad_paths_and_parameters() -> None:
    seen = play(session(("c", b"MAIL FROM:a@b.c\r\nMAIL FROM:<a@b.c> BODY=BINARYMIME\r\nMAIL FROM:<a@b.c> AUTH=<>\r\n")))
    assert seen.replies()[-3:] == [b"501 5.5.4 Syntax error in parameters or arguments",
                                   b"555 5.5.4 MAIL FROM/RCPT TO parameters not recognized or not implemented",
                                   b"555 5.5.4 MAIL FROM/RCPT TO parameters not recognized or not implemented"]


def test_out_of_sequence_is_refused_by_the_gateway() -> None:
    seen = play([("s", GREETING), ("c", b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nDATA\r\n")])
    assert seen.replies()[-3:] == [b"503 5.5.1 Bad sequence of commands"] * 3 and seen.to_server == b""


def test_a_client_that_talks_first_is_closed() -> None:
    seen = play([("c", b"EHLO early\r\n"), ("s", GREETING)])
    assert seen.closed == "early_talker" and seen.to_server == b""


@pytest.mark.parametrize("reply", [b"250 ok\n", b"250 o\rk\r\n", b"25x ok\r\n", b"250-a\r\n251 b\r\n", b"250 a\x00b\r\n"], ids=repr)
def test_bad_server_replies_close_the_session(reply: bytes) -> None:
    seen = play([("s", GREETING), ("c", b"NOOP\r\n"), ("s", reply)])
    assert seen.closed == "server_protocol" and seen.to_client.endswith(b"421 4.4.0 The server's reply was refused; closing\r\n")


def test_an_unsolicited_421_is_passed_on_and_closes() -> None:
    seen = play([("s", GREETING), ("s", b"421 4.3.2 shutting down\r\n")])
    assert seen.to_client.endswith(b"421 4.3.2 shutting down\r\n") and seen.closed == "server_421"


def test_vrfy_and_expn_per_policy() -> None:
    seen = play(session(("c", b"VRFY bob\r\nEXPN staff\r\n")))
    assert seen.replies()[-2:] == [b"252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
                                   b"502 5.5.1 EXPN not available"]
    allowed = play(session(("c", b"VRFY bob\r\n")), Policy(recipient=ANY, allow_vrfy=True))
    assert allowed.to_server.endswith(b"VRFY bob\r\n")


def test_the_gateways_own_answers_come_a_turn_at_a_time() -> None:
    """200 pipelined VRFYs: MAX_ANSWERS_PER_TURN answers per input, the rest on ``more``."""
    core = SmtpRelay(Policy(recipient=ANY))
    core.server_data(GREETING)
    core.client_data(b"EHLO c\r\n")
    core.server_data(EHLO_REPLY)
    counts = [Seen().take(core.client_data(b"VRFY bob\r\n" * 200)).to_client.count(b"\r\n")]
    while core.wants_more:
        counts.append(Seen().take(core.more()).to_client.count(b"\r\n"))
    assert counts == [MAX_ANSWERS_PER_TURN] * 3 + [200 - 3 * MAX_ANSWERS_PER_TURN]
    seen = Seen().take(core.client_data(MAIL))
    assert seen.to_server == MAIL and not core.wants_more  # forwarded commands are not counted


def test_idle_expiry_says_421() -> None:
    core = SmtpRelay()
    core.server_data(GREETING)
    out = core.expired("idle")
    assert out[-2].data == b"421 4.4.2 Idle timeout; closing\r\n" and core.closed


def test_too_much_pipelined_input_behind_a_sync_command_closes() -> None:
    seen = play(session(("c", b"EHLO again\r\n" + b"NOOP\r\n" * (MAX_BACKLOG // 6 + 1))))
    assert seen.closed == "too_much_input"


def test_the_server_closing_with_replies_due_says_421() -> None:
    core = SmtpRelay()
    core.server_data(GREETING)
    core.client_data(b"EHLO c\r\n")
    out = core.server_eof()
    assert out[0].data == b"421 4.4.2 The server closed the connection\r\n"


# ---- the config's policy ---------------------------------------------------------------------


def test_policy_of_settings_relays_only_named_domains() -> None:
    policy = policy_of(SmtpSettings(recipient_domains=("example.com", ".example.net"), reject_recipients=("spam@example.com",),
                                    sender_domains=("example.org",), reject_senders=("evil.org",)))
    assert policy.recipient("bob@example.com") is None
    assert policy.recipient("bob@mx.example.net") is None
    assert policy.recipient("bob@example.net").code == 550
    assert policy.recipient("Spam@Example.com").text == "Recipient address rejected"
    assert policy.sender("a@example.org") is None and policy.sender("a@evil.org").code == 550
    assert policy.sender("a@other.org").text == "Sender domain not allowed here"


def test_the_config_takes_the_kinds_model_and_refuses_in_its_words() -> None:
    """The smtp kind's declaration is what nfgate check reads (gateways/kinds.py)."""
    assert KINDS["smtp"].settings is SmtpSettings and KINDS["smtp"].entry().__name__ == "for_gateway"
    with pytest.raises(ValidationError, match="is not a mail domain"):
        SmtpSettings.model_validate({"recipient_domains": ["not a domain"]})
    with pytest.raises(ValidationError, match=r"511 is out of range \(512 to 65536\)"):
        SmtpSettings.model_validate({"max_command_line": 511})


# ---- fuzzing ------------------------------------------------------------------------------

LINES = st.sampled_from([
    b"EHLO x\r\n", b"HELO x\r\n", MAIL, RCPT, b"DATA\r\n", b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"STARTTLS\r\n",
    b"BDAT 5\r\n", b".\r\n", b"..x\r\n", b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"text\r\n", b"\x00", b"\r", b"\n",
    b"MAIL FROM:<a@b.c> SIZE=99999999999\r\n", b"RCPT TO:<x@elsewhere>\r\n",
])
REPLIES = st.sampled_from([
    GREETING, EHLO_REPLY, OK, b"354 go\r\n", b"221 bye\r\n", b"220 ready\r\n", b"550 no\r\n", b"250-a\r\n",
    b"250 b\r\n", b"421 bye\r\n", b"\n", b"\r", b"999 x\r\n", b"250 " + b"x" * 600 + b"\r\n",
])


def _fuzz(steps: list[tuple[str, bytes]], starttls: str) -> None:
    core = SmtpRelay(Policy(recipient=ANY, starttls=starttls, tls_available=True, max_message_size=5000))
    seen_server = b""
    closed = False
    for side, data in steps:
        out = core.client_data(data) if side == "c" else core.server_data(data)
        for o in out:
            assert not closed
            name = type(o).__name__
            if name == "ToServer":
                seen_server += o.data
            elif name == "Close":
                closed = True
            elif name == "ToClient":
                assert strict_line_ends(o.data)
        if core.state.value == "tls":
            break
    assert strict_line_ends(seen_server)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from("cs"), st.one_of(LINES, REPLIES, st.binary(max_size=40))), max_size=40),
       st.sampled_from(["strip", "passthrough", "terminate"]))
def test_fuzz_both_sides(steps: list[tuple[str, bytes]], starttls: str) -> None:
    _fuzz([("s", GREETING), *steps], starttls)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(LINES, st.binary(max_size=60)), max_size=30))
def test_fuzz_the_client_in_a_message(chunks: list[bytes]) -> None:
    steps = data_steps(b"")[:-1] + [("c", c) for c in chunks]
    _fuzz(steps, "strip")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(REPLIES, st.binary(max_size=60)), max_size=30))
def test_fuzz_the_server(replies: list[bytes]) -> None:
    steps = [("s", GREETING), ("c", b"EHLO x\r\n")] + [("s", r) for r in replies]
    _fuzz(steps, "strip")
