"""The one-match fast paths of the SMTP core against the checks they stand for (gateways/smtp/lines.py, policy.py).

A line that the one regular expression takes must be one that every check
one by one takes, with the same parse, and a line it leaves must be one of
them refuses: else the fast path would pass what the strict path refuses.
"""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from gateways.smtp.lines import GOOD_REPLY_LINE, Malformed, good_command, parse_reply_line, split_command
from gateways.smtp.policy import Domains, RejectList, domain_of

# A start that the checks care about, then bytes at their edges, then a line end (or none).
STARTS = st.sampled_from([b"", b"250", b"250 ", b"250-", b"354", b"599", b"600", b"25", b"2x0", b"MAIL", b"MAIL ",
                          b"mail FROM:<a@b.c>", b"NOOP", b"X" * 16, b"X" * 17, b" ", b"-"])
EDGES = st.one_of(st.sampled_from([b"\t", b"\r", b"\x00", b"\x08", b"\x0b", b"\x1f", b" ", b"~", b"\x7f", b"\x80", b"\xff",
                                   b"\xc3\xa9", b"a", b"-", b":"]), st.binary(max_size=3))
ENDS = st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r\r\n", b""])
LINE = st.builds(lambda start, middle, end: start + b"".join(middle) + end, STARTS, st.lists(EDGES, max_size=5), ENDS)


def one_by_one_reply(line: bytes) -> bool:
    """The checks of a reply line with its LF before the one match took their place."""
    if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
        return False
    try:
        parse_reply_line(line[:-2])
    except Malformed:
        return False
    return True


@settings(max_examples=600, deadline=None)
@given(LINE)
def test_a_reply_line_is_good_exactly_when_every_check_passes(body: bytes) -> None:
    line = body.split(b"\n", 1)[0] + b"\n"  # what the core takes: up to the first LF
    good = GOOD_REPLY_LINE.fullmatch(line) is not None
    assert good == one_by_one_reply(line), line
    if good:
        parsed = parse_reply_line(line[:-2])
        assert (parsed.code, parsed.last, parsed.text) == (int(line[:3]), line[3:4] != b"-", line[4:-2])


def one_by_one_command(line: bytes) -> tuple[str, bytes] | None:
    if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
        return None
    try:
        return split_command(line[:-2], utf8=False)
    except Malformed:
        return None


@settings(max_examples=600, deadline=None)
@given(LINE)
def test_a_command_line_is_good_exactly_when_every_check_passes(body: bytes) -> None:
    line = body.split(b"\n", 1)[0] + b"\n"
    assert good_command(line) == one_by_one_command(line), line


def reference_domain_matches(domain: str, entries: list[str]) -> bool:
    """The list's rule as docs/config.md words it, entry by entry."""
    domain = domain.lower().rstrip(".")
    return any(e.lower() == "*" or domain == e.lower() or (e.startswith(".") and domain.endswith(e.lower()))
               for e in entries)


NAMES = st.lists(st.sampled_from(["a", "B", "example", "com", ".", "*", "@", "x@", "\u0130", ""]), max_size=4).map("".join)


@settings(max_examples=600, deadline=None)
@given(st.lists(NAMES, max_size=5), NAMES)
def test_the_compiled_lists_match_as_entry_by_entry(entries: list[str], mailbox: str) -> None:
    assert (domain_of(mailbox) in Domains(entries)) == reference_domain_matches(domain_of(mailbox), entries)
    addresses = {e.lower() for e in entries if "@" in e}
    domains = [e for e in entries if "@" not in e]
    named = mailbox.lower() in addresses or reference_domain_matches(domain_of(mailbox), domains)
    assert (mailbox in RejectList(entries)) == named
