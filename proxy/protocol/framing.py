"""The one place that slices bytes: a bounded line and literal buffer.

``LineBuffer`` follows h11's ``receive_data()`` / ``next_event()`` split: bytes go in as
they arrive, and complete units come out (a line without its line ending, or exactly *n*
bytes of a literal) once they are there. Searching is O(n) over the whole input however it
is chunked: the buffer remembers how far it has already looked for a line feed.

IMAP adds literals (RFC 3501 section 4.3, RFC 7888): a line that ends in ``{n}`` or
``{n+}`` announces *n* bytes of data that follow the line ending verbatim, after which the
command or response goes on with another line. :func:`literal_at_end` classifies a line
the way imap-codec does: no literal (the unit is complete), a literal of a given size,
synchronizing or not, or a failure (the announced size is over the limit).
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.protocol.errors import FrameError

__all__ = ["LineBuffer", "Literal", "literal_at_end", "printable"]

#: More digits than this cannot be a literal size we would accept anyway.
_MAX_SIZE_DIGITS = 10


@dataclass(frozen=True, slots=True)
class Literal:
    """An IMAP literal announced at the end of a line."""

    size: int
    #: ``{n}`` waits for the server's ``+`` continuation; ``{n+}`` (LITERAL+) does not.
    synchronizing: bool


def literal_at_end(line: bytes, max_size: int) -> Literal | None:
    """The literal that ``line`` (without its line ending) announces, if any.

    Raises :class:`FrameError` if the announced size is over ``max_size``: the peer would
    send that many bytes next, and the only safe answer is to close.
    """
    if not line.endswith(b"}"):
        return None
    start = line.rfind(b"{")
    if start < 0:
        return None
    inner = line[start + 1 : -1]
    synchronizing = not inner.endswith(b"+")
    digits = inner if synchronizing else inner[:-1]
    if not digits or not digits.isdigit():
        return None
    if len(digits) > _MAX_SIZE_DIGITS or int(digits) > max_size:
        raise FrameError(f"literal larger than {max_size} bytes")
    return Literal(int(digits), synchronizing)


def printable(data: bytes | str, limit: int = 200) -> str:
    """Peer-supplied text made safe for one log line: decoded leniently, control
    characters escaped, at most ``limit`` characters (``...`` marks a cut)."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    if len(text) > limit:
        text = text[:limit] + "..."
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def has_control_characters(text: str) -> bool:
    """Does ``text`` hold a C0 or C1 control character or a Unicode line separator? None
    belongs in a name or an address, and each can break a log line or a generated script."""
    return any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c in "\u2028\u2029" for c in text)


class LineBuffer:
    """Buffer bytes and extract lines (``\\r\\n``, or a bare ``\\n``) and fixed-size chunks.

    ``max_line`` bounds a line *including* its line ending; a line that cannot end within
    the bound raises :class:`FrameError` as soon as that is certain, so memory stays
    bounded by ``max_line`` plus one received chunk.
    """

    __slots__ = ("_buf", "_scanned", "_start", "max_line")

    def __init__(self, max_line: int) -> None:
        if max_line < 2:
            raise ValueError("max_line must allow at least a line ending")
        self.max_line = max_line
        self._buf = bytearray()
        self._start = 0  # first unconsumed byte
        self._scanned = 0  # bytes from _start already searched for b"\n"

    def __len__(self) -> int:
        return len(self._buf) - self._start

    def __repr__(self) -> str:
        # Never show the contents: they may be credentials.
        return f"<LineBuffer {len(self)} bytes pending, max_line={self.max_line}>"

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def next_line(self) -> bytes | None:
        """Return the next complete line without its line ending, or ``None`` for now."""
        found = self._buf.find(b"\n", self._start + self._scanned)
        if found < 0:
            self._scanned = len(self)
            if self._scanned >= self.max_line:
                raise FrameError(f"line longer than {self.max_line} bytes")
            return None
        if found + 1 - self._start > self.max_line:
            raise FrameError(f"line longer than {self.max_line} bytes")
        end = found - 1 if found > self._start and self._buf[found - 1] == 0x0D else found
        line = bytes(self._buf[self._start : end])
        self._consume(found + 1)
        return line

    def next_bytes(self, n: int) -> bytes | None:
        """Return exactly ``n`` bytes (an IMAP literal), or ``None`` until they are here."""
        if n < 0:
            raise ValueError("n must not be negative")
        if len(self) < n:
            return None
        chunk = bytes(self._buf[self._start : self._start + n])
        self._consume(self._start + n)
        return chunk

    def take_all(self) -> bytes:
        """Return and forget everything still buffered (the tail handed to the relay)."""
        rest = bytes(self._buf[self._start :])
        self._buf.clear()
        self._start = 0
        self._scanned = 0
        return rest

    def _consume(self, upto: int) -> None:
        self._start = upto
        self._scanned = 0
        if self._start == len(self._buf):
            self._buf.clear()
            self._start = 0
        elif self._start > 4096 and self._start * 2 > len(self._buf):
            del self._buf[: self._start]
            self._start = 0
