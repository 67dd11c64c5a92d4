"""CHUNKING/BDAT (RFC 3030) in the sans-IO core, playbook style (gateways/smtp/core.py, data.Chunks)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gateways.smtp.core import SmtpRelay
from gateways.smtp.model import Policy
from gateways.smtp.settings import SmtpSettings
from tests.gateways.smtp_dialogue import ANY, EHLO_REPLY, GREETING, play, session, strict_line_ends, unchunk

OK = b"250 2.0.0 Ok\r\n"
MAIL = b"MAIL FROM:<alice@example.org>\r\n"
RCPT = b"RCPT TO:<bob@example.com>\r\n"
CHUNKING = Policy(recipient=ANY, extensions=frozenset({"SIZE", "PIPELINING", "ENHANCEDSTATUSCODES", "CHUNKING"}))
QUEUED = b"250 2.0.0 Ok: queued as ABC\r\n"
BODY = b"Subject: hi\r\n\r\n.a line with a dot\r\nand a CRLF split "

ONE_MESSAGE = session(
    ("c", MAIL + RCPT + b"BDAT 10\r\n" + BODY[:10] + b"BDAT " + str(len(BODY) - 10 + 2).encode() + b" LAST\r\n"
     + BODY[10:] + b"\r\n"),
    ("s", OK + OK + b"250 2.0.0 Ok: 10 bytes\r\n" + QUEUED),
    ("c", b"QUIT\r\n"),
    ("s", b"221 2.0.0 Bye\r\n"),
)


def test_a_pipelined_chunked_message_passes_byte_for_byte() -> None:
    seen = play(ONE_MESSAGE, CHUNKING)
    assert seen.to_server == (
        b"EHLO client.example.org\r\n" + MAIL + RCPT + b"BDAT 10\r\n" + BODY[:10]
        + b"BDAT %d LAST\r\n" % (len(BODY) - 8) + BODY[10:] + b"\r\nQUIT\r\n")  # no dot-stuffing: bytes as sent
    assert seen.to_client.endswith(OK + OK + b"250 2.0.0 Ok: 10 bytes\r\n" + QUEUED + b"221 2.0.0 Bye\r\n")
    assert b"250 CHUNKING\r\n" in seen.to_client or b"250-CHUNKING\r\n" in seen.to_client
    assert seen.closed == "quit" and "message.accepted" in seen.events


def test_the_chunked_dialogue_split_at_every_offset_gives_the_same_bytes() -> None:
    whole = play(ONE_MESSAGE, CHUNKING)
    for split in (1, 2, 3, 7):
        cut = play(ONE_MESSAGE, CHUNKING, split=split)
        assert (cut.to_server, cut.to_client, cut.closed) == (whole.to_server, whole.to_client, whole.closed), split
    for i, (side, data) in enumerate(ONE_MESSAGE):
        for at in range(1, len(data)):
            steps = ONE_MESSAGE[:i] + [(side, data[:at]), (side, data[at:])] + ONE_MESSAGE[i + 1:]
            cut = play(steps, CHUNKING)
            assert (cut.to_server, cut.to_client, cut.closed) == (whole.to_server, whole.to_client, whole.closed), (i, at)


def test_chunking_is_offered_only_when_listed_and_offered_by_the_server() -> None:
    default = play(session(), Policy(recipient=ANY))
    assert b"CHUNKING" not in default.to_client
    listed = play(session(), CHUNKING)
    assert b"CHUNKING" in listed.to_client
    no_server = play([("s", GREETING), ("c", b"EHLO x\r\n"), ("s", EHLO_REPLY.replace(b"250 CHUNKING", b"250 HELP"))],
                     CHUNKING)
    assert b"CHUNKING" not in no_server.to_client
    assert "CHUNKING" not in SmtpSettings().extensions and "CHUNKING" in SmtpSettings(extensions=["CHUNKING"]).extensions


def test_bdat_when_chunking_is_not_offered_is_502() -> None:
    seen = play(session(("c", MAIL + RCPT), ("s", OK + OK), ("c", b"BDAT 3 LAST\r\n")), Policy(recipient=ANY))
    assert seen.replies()[-1] == b"502 5.5.1 CHUNKING is not offered (RFC 3030)"
    assert b"BDAT" not in seen.to_server


def _size_policy(limit: int) -> Policy:
    return Policy(recipient=ANY, extensions=frozenset({"CHUNKING"}), max_message_size=limit)


@pytest.mark.parametrize("split", [None, 1])
def test_chunks_at_the_size_limit_pass_and_one_byte_past_is_552_before_reading(split: int | None) -> None:
    limit = 2000
    head = session(("c", MAIL + RCPT), ("s", OK + OK))
    at = play(head + [("c", b"BDAT 1000\r\n" + b"x" * 998 + b"\r\n" + b"BDAT 1000 LAST\r\n" + b"y" * 998 + b"\r\n"),
                      ("s", OK + QUEUED)], _size_policy(limit), split=split)
    assert at.closed is None and at.to_server.endswith(b"y" * 998 + b"\r\n") and at.replies()[-1] == QUEUED[:-2]
    past = play(head + [("c", b"BDAT 1000\r\n" + b"x" * 998 + b"\r\n" + b"BDAT 1001 LAST\r\n" + b"y" * 100)],
                _size_policy(limit), split=split)
    assert past.closed == "size" and past.to_client.endswith(
        b"552 5.3.4 Message size exceeds fixed maximum message size; closing\r\n")
    assert b"BDAT 1001" not in past.to_server and b"y" not in past.to_server


def test_a_huge_bdat_is_refused_before_a_byte_of_it_is_read() -> None:
    seen = play(session(("c", MAIL + RCPT), ("s", OK + OK), ("c", b"BDAT 99999999999999999999 LAST\r\nzzz")),
                CHUNKING)
    assert seen.closed == "size" and b"BDAT" not in seen.to_server and b"zzz" not in seen.to_server


def test_bdat_0_last_ends_a_message() -> None:
    seen = play(session(("c", MAIL + RCPT + b"BDAT 4\r\nhi\r\nBDAT 0 LAST\r\n"), ("s", OK + OK + OK + QUEUED),
                        ("c", MAIL), ("s", OK)), CHUNKING)
    assert seen.to_server.endswith(b"BDAT 4\r\nhi\r\nBDAT 0 LAST\r\n" + MAIL)
    assert seen.replies()[-2:] == [QUEUED[:-2], OK[:-2]] and seen.events.count("message.accepted") == 1


def test_bdat_without_a_recipient_is_503_and_its_chunk_is_dropped_not_read_as_commands() -> None:
    smuggled = b"RCPT TO:<victim@example.com>\r\n"
    seen = play(session(("c", MAIL), ("s", OK), ("c", b"BDAT %d\r\n" % len(smuggled) + smuggled + b"NOOP\r\n"),
                        ("s", OK)), CHUNKING)
    assert b"victim" not in seen.to_server and seen.to_server.endswith(MAIL + b"NOOP\r\n")
    assert seen.replies()[-2:] == [b"503 5.5.1 Bad sequence of commands", OK[:-2]] and seen.closed is None


def test_data_after_bdat_is_503_and_bdat_after_data_is_503() -> None:
    mixed = play(session(("c", MAIL + RCPT + b"BDAT 4\r\nhi\r\n"), ("s", OK + OK + OK), ("c", b"DATA\r\n")), CHUNKING)
    assert mixed.replies()[-1] == b"503 5.5.1 Bad sequence of commands" and not mixed.to_server.endswith(b"DATA\r\n")
    after_data = play(session(("c", MAIL + RCPT + b"DATA\r\n"), ("s", OK + OK + b"354 go\r\n"), ("c", b"hi\r\n.\r\n"),
                              ("s", QUEUED), ("c", b"BDAT 2 LAST\r\nhi")), CHUNKING)
    assert after_data.replies()[-1] == b"503 5.5.1 Bad sequence of commands"
    assert b"BDAT" not in after_data.to_server


def test_a_refused_chunk_needs_rset_before_the_next_transaction() -> None:
    refused = b"554 5.7.1 No thanks\r\n"
    steps = session(("c", MAIL + RCPT + b"BDAT 4\r\nhi\r\n"), ("s", OK + OK + refused),
                    ("c", b"BDAT 2 LAST\r\nok"), ("c", MAIL), ("c", b"RSET\r\n"), ("s", OK), ("c", MAIL), ("s", OK))
    seen = play(steps, CHUNKING)
    assert seen.replies()[-5:] == [refused[:-2], b"503 5.5.1 Bad sequence of commands",
                                   b"503 5.5.1 Bad sequence of commands", OK[:-2], OK[:-2]]
    assert seen.to_server.endswith(b"BDAT 4\r\nhi\r\nRSET\r\n" + MAIL) and "chunk.refused_by_server" in seen.events


def test_more_bytes_than_the_size_are_read_as_the_next_command() -> None:
    seen = play(session(("c", MAIL + RCPT), ("s", OK + OK), ("c", b"BDAT 4 LAST\r\nhi\r\nextra line\r\n"),
                        ("s", QUEUED)), CHUNKING)
    assert seen.to_server.endswith(b"BDAT 4 LAST\r\nhi\r\n")
    assert seen.replies()[-2:] == [QUEUED[:-2], b"500 5.5.2 Syntax error, command unrecognized"]


@pytest.mark.parametrize("arg", [b"", b"LAST", b"-1", b"+5", b"5 last now", b"5  LAST", b"5 FIRST", b"x" * 21])
def test_a_bdat_without_a_valid_size_closes_the_session(arg: bytes) -> None:
    seen = play(session(("c", MAIL + RCPT), ("s", OK + OK), ("c", b"BDAT " + arg + b"\r\n")), CHUNKING)
    assert b"BDAT" not in seen.to_server
    if arg:
        assert seen.closed == "bdat_argument" and seen.replies()[-1] == b"501 5.5.4 Syntax: BDAT <size> [LAST]; closing"
    else:
        assert seen.replies()[-1] == b"501 5.5.4 Syntax error in parameters or arguments"


def test_bdat_last_is_case_blind() -> None:
    seen = play(session(("c", MAIL + RCPT), ("s", OK + OK), ("c", b"BDAT 2 last\r\nab"), ("s", QUEUED)), CHUNKING)
    assert seen.to_server.endswith(b"BDAT 2 LAST\r\nab") and "message.accepted" in seen.events


@pytest.mark.parametrize("chunks, reason", [
    ([b"a\nb"], "refused.content"),
    ([b"a\rb"], "refused.content"),
    ([b"a\x00b"], "refused.content"),
    ([b"ends with CR\r"], "refused.content"),  # the LAST chunk: a CR alone at the message's end
])
def test_chunk_content_breaking_the_line_rules_closes(chunks: list[bytes], reason: str) -> None:
    client = b"".join(b"BDAT %d%s\r\n" % (len(c), b" LAST" if i == len(chunks) - 1 else b"") + c
                      for i, c in enumerate(chunks))
    seen = play(session(("c", MAIL + RCPT), ("s", OK + OK), ("c", client)), CHUNKING)
    assert seen.closed == "content" and reason in seen.events
    assert seen.to_client.startswith(GREETING) and seen.replies()[-1].startswith(b"554 5.6.0")


def test_a_crlf_split_between_chunks_passes() -> None:
    client = b"BDAT 3\r\nab\rBDAT 3 LAST\r\n\ncd"
    seen = play(session(("c", MAIL + RCPT), ("s", OK + OK), ("c", client), ("s", OK + QUEUED)), CHUNKING)
    assert seen.closed is None and seen.to_server.endswith(client)


@pytest.mark.parametrize("split", [None, 1, 7])
def test_text_line_limit_in_chunks_at_the_limit_and_one_past(split: int | None) -> None:
    policy = Policy(recipient=ANY, extensions=frozenset({"CHUNKING"}), max_text_line=1000)
    at_line = b"a" * 998 + b"\r\n"
    at = play(session(("c", MAIL + RCPT), ("s", OK + OK), ("c", b"BDAT 500\r\n" + at_line[:500]),
                      ("c", b"BDAT 500 LAST\r\n" + at_line[500:]), ("s", OK + QUEUED)), policy, split=split)
    assert at.closed is None and at.events.count("message.accepted") == 1
    past_line = b"a" * 999 + b"\r\n"
    past = play(session(("c", MAIL + RCPT), ("s", OK + OK),
                        ("c", b"BDAT 1001 LAST\r\n" + past_line)), policy, split=split)
    # Streamed: what came before the 1000th byte of the line may be at the server; never the line.
    assert past.closed == "content" and past_line[:-1] not in past.to_server


def test_a_chunk_is_streamed_not_buffered() -> None:
    core = SmtpRelay(CHUNKING)
    for side, data in session(("c", MAIL + RCPT), ("s", OK + OK)):
        (core.client_data if side == "c" else core.server_data)(data)
    out = core.client_data(b"BDAT 1000000 LAST\r\n" + b"x" * 100)
    assert b"".join(o.data for o in out if type(o).__name__ == "ToServer") == b"BDAT 1000000 LAST\r\n" + b"x" * 100
    piece = (b"y" * 62 + b"\r\n") * 1024
    for _ in range(10):
        out = core.client_data(piece)
        assert [o.data for o in out if type(o).__name__ == "ToServer"] == [piece]
        assert core.buffered == 0


# ---- fuzzing: BDAT in every state it can meet ------------------------------------------------

LINES = st.sampled_from([
    MAIL, RCPT, b"BDAT 5\r\n", b"BDAT 3 LAST\r\n", b"BDAT 0 LAST\r\n", b"BDAT 99999 LAST\r\n", b"BDAT x\r\n",
    b"DATA\r\n", b"RSET\r\n", b"NOOP\r\n", b"EHLO x\r\n", b"\r\n", b"\r", b"\n", b"\x00", b"ab\r\n", b"QUIT\r\n",
])
REPLIES = st.sampled_from([OK, QUEUED, b"554 no\r\n", b"452 later\r\n", b"503 order\r\n", b"250-a\r\n", b"221 bye\r\n"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from("cs"), st.one_of(LINES, REPLIES, st.binary(max_size=20))), max_size=40))
def test_fuzz_bdat_both_sides(steps: list[tuple[str, bytes]]) -> None:
    # No 354 among the replies: no DATA content, so the server's stream parses back into commands and chunks.
    core = SmtpRelay(Policy(recipient=ANY, extensions=frozenset({"CHUNKING", "PIPELINING"}), max_message_size=50))
    to_server = b""
    closed = False
    for side, data in session(("c", MAIL + RCPT), ("s", OK + OK)) + steps:
        for o in (core.client_data(data) if side == "c" else core.server_data(data)):
            assert not closed
            name = type(o).__name__
            if name == "ToServer":
                to_server += o.data
            elif name == "Close":
                closed = True
            elif name == "ToClient":
                assert strict_line_ends(o.data)
    commands, messages = unchunk(to_server)
    assert strict_line_ends(commands)
    for message in messages:
        assert len(message) <= 50 and b"\x00" not in message
        assert strict_line_ends(message[:-1] if message.endswith(b"\r") else message)


@pytest.mark.parametrize("length, refused", [(1000, False), (1001, True)])
def test_text_line_limit_for_a_line_inside_a_chunk(length: int, refused: bool) -> None:
    policy = Policy(recipient=ANY, extensions=frozenset({"CHUNKING"}), max_text_line=1000)
    chunk = b"short\r\n" + b"a" * (length - 2) + b"\r\nshort\r\n"
    seen = play(session(("c", MAIL + RCPT), ("s", OK + OK), ("c", b"BDAT %d LAST\r\n" % len(chunk) + chunk),
                        ("s", QUEUED)), policy)
    assert (seen.closed == "content") is refused
    assert seen.to_server.endswith(chunk) is not refused
