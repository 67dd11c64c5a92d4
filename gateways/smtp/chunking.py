"""CHUNKING (RFC 3030): BDAT in the SMTP session, mixed into ``core.SmtpRelay``.

Theory of operation
-------------------

``BDAT <size> [LAST]`` is a command whose argument says how many bytes of
content follow its line at once. ``SmtpRelay`` reads the line like any
other, then hands it to ``Chunking._bdat``:

- CHUNKING not offered (not in the policy's ``extensions``, or not by the
  server): 502, counted as a bad command, as before this existed;
- a size that is not 1 to 20 digits, or a second word other than LAST:
  501 and close, since the chunk's end is unknown;
- the state table (``state``) says whether BDAT or ``BDAT_LAST`` is in
  sequence: after RCPT and after an earlier chunk only. Out of sequence:
  503, and the chunk is read and dropped (section 2), so chunk bytes are
  never taken for commands. A size the gateway would not read anyway
  (past the message size) closes instead;
- the transaction's chunk bytes are counted before a byte of the chunk is
  read: past the message size (``size_limit``: the policy's or the
  server's smaller SIZE) 552 and close;
- else the command is forwarded and ``_chunk_left`` bytes of the client's
  input go to ``_chunk_piece``: streamed to the server as they come,
  checked by ``data.Chunks`` (CRLF only, no NUL, the text line limit), and
  a piece that breaks a rule closes both legs (part of the chunk may be at
  the server; cut mid-BDAT, it drops the transaction).

BDAT is not a sync command: chunks may be pipelined (section 4.2), and
their replies come back in order with the rest. ``_reply_bdat``: the reply
to ``BDAT ... LAST`` is the message's, and the transaction is over either
way; a refused chunk without LAST leaves the session in ``BDAT_FAILED``,
where only RSET, EHLO, HELO and the verbs valid anytime are in sequence.

The chunk's state (``_chunk_left``, ``_chunk_forward``, ``_chunk_last``,
``_chunked``, ``_chunks``) lives in ``SmtpRelay.__init__``; MAIL resets the
transaction's part of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateways.smtp.data import Chunks
from gateways.smtp.replies import BAD_BDAT, BAD_SEQUENCE, CHUNK_TOO_BIG, NO_CHUNKING
from gateways.smtp.state import BDAT_LAST, State, in_sequence

if TYPE_CHECKING:
    from gateways.smtp.lines import ReplyLine


class Chunking:
    """BDAT's command, chunk and reply handling for ``SmtpRelay`` (module docstring)."""

    def _bdat(self, arg: bytes) -> None:
        """``BDAT <size> [LAST]`` (RFC 3030 section 2): its chunk follows the line at once."""
        if "CHUNKING" not in self.offered:
            self._bad_command(NO_CHUNKING, "refused.not_implemented", verb="BDAT")
            return
        words = arg.split(b" ")
        if not (1 <= len(words) <= 2 and words[0].isdigit() and len(words[0]) <= 20
                and (len(words) == 1 or words[1].upper() == b"LAST")):
            self._violation(BAD_BDAT, "refused.bdat_argument")
            return
        size, last = int(words[0]), len(words) == 2
        verb = BDAT_LAST if last else "BDAT"
        if not in_sequence(self._expected, verb):
            if size > self.size_limit:
                self._violation(CHUNK_TOO_BIG, "refused.size", size=size, limit=self.size_limit)
                return
            self._refuse(BAD_SEQUENCE, "refused.sequence", verb="BDAT", state=self._expected.value)
            self._chunk_left, self._chunk_forward = size, False  # read and dropped (section 2)
            return
        if self._chunked + size > self.size_limit:
            self._violation(CHUNK_TOO_BIG, "refused.size", size=self._chunked + size, limit=self.size_limit)
            return
        self._chunked += size
        if self._chunks is None:
            self._chunks = Chunks(self.policy.max_text_line)
        self._forward(verb, b"BDAT %d%s" % (size, b" LAST" if last else b""), size=self._chunked)
        self._chunk_left, self._chunk_forward, self._chunk_last = size, True, last
        if size == 0 and last:
            self._chunk_piece(b"")

    def _chunk_piece(self, piece: bytes) -> None:
        """Bytes of the current chunk (at most what is left of it): to the server, checked, or dropped."""
        self._chunk_left -= len(piece)
        if not self._chunk_forward:
            return
        chunks = self._chunks
        assert chunks is not None
        problem = chunks.check(piece)
        if problem is None and self._chunk_left == 0 and self._chunk_last:
            problem = chunks.finish()
        if problem is not None:
            # Part of the chunk may be at the server: closing aborts its transaction.
            self._violation(problem, "refused.content", reason=problem.text, size=self._chunked)
            return
        if piece:
            self._to_server(piece)

    # ``head``: the core's ``_Pending`` (its verb, and the chunk bytes so far as size).
    def _reply_bdat(self, head: Any, ok: bool, code: int, lines: list[ReplyLine], wire: bytes) -> None:
        if head.verb == BDAT_LAST:
            # The reply to the whole message (RFC 3030 section 2): the transaction is over.
            self.state = State.READY
            self._recipients = 0
            if ok:
                self.delivered += 1
                self._event("message.accepted", size=head.size, code=code, chunked=True)
            else:
                self._event("message.refused_by_server", size=head.size, code=code, chunked=True)
        elif not ok:
            self.state = State.BDAT_FAILED  # no more chunks: RSET first (section 2)
            self._event("chunk.refused_by_server", size=head.size, code=code)
        self._to_client(wire)
