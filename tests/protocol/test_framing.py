"""LineBuffer, literal announcements and printable(): whole, byte by byte, with trailers."""

from __future__ import annotations

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from proxy.protocol.errors import FrameError
from proxy.protocol.framing import LineBuffer, Literal, literal_at_end, printable

FUZZ = settings(
    max_examples=200,
    deadline=None,
    # No "explain" phase: it imports libcst, whose DeprecationWarning our
    # filterwarnings=error turns into an INTERNALERROR that hides the real failure.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)


def feed(buffer: LineBuffer, data: bytes, step: int) -> list[bytes]:
    """Feed ``data`` in ``step``-sized chunks, collecting every line that completes."""
    lines: list[bytes] = []
    for start in range(0, len(data), step):
        buffer.receive_data(data[start : start + step])
        while (line := buffer.next_line()) is not None:
            lines.append(line)
    return lines


@pytest.mark.parametrize("step", [1, 2, 7, 1000], ids=lambda s: f"step{s}")
def test_lines_with_crlf_or_bare_lf(step: int) -> None:
    buffer = LineBuffer(100)
    assert feed(buffer, b"a1 NOOP\r\nb\n\r\n\nlast", step) == [b"a1 NOOP", b"b", b"", b""]
    assert len(buffer) == 4
    assert buffer.take_all() == b"last"
    assert len(buffer) == 0
    assert buffer.next_line() is None


def test_a_lone_cr_is_part_of_the_line() -> None:
    buffer = LineBuffer(100)
    assert feed(buffer, b"a\rb\r\r\n", 1) == [b"a\rb\r"]


@pytest.mark.parametrize("step", [1, 3, 1000], ids=lambda s: f"step{s}")
def test_line_limit_includes_the_line_ending(step: int) -> None:
    buffer = LineBuffer(10)
    assert feed(buffer, b"12345678\r\n", step) == [b"12345678"]
    with pytest.raises(FrameError):
        feed(buffer, b"123456789\r\n", step)


def test_line_limit_with_bare_lf() -> None:
    buffer = LineBuffer(10)
    assert feed(buffer, b"123456789\n", 1) == [b"123456789"]


def test_an_endless_line_is_refused_once_it_cannot_fit() -> None:
    buffer = LineBuffer(10)
    for _ in range(9):
        buffer.receive_data(b"x")
        assert buffer.next_line() is None
    buffer.receive_data(b"x")
    with pytest.raises(FrameError):
        buffer.next_line()


def test_searching_resumes_where_it_stopped() -> None:
    buffer = LineBuffer(100_000)
    for _ in range(5000):
        buffer.receive_data(b"x")
        assert buffer.next_line() is None
    # The buffer remembers that the 5000 bytes hold no line feed (O(n) over the input).
    assert buffer._scanned == 5000
    buffer.receive_data(b"\r\nrest")
    assert buffer.next_line() == b"x" * 5000
    assert buffer._scanned == 0


@pytest.mark.parametrize("step", [1, 4, 1000], ids=lambda s: f"step{s}")
def test_literals_are_taken_by_size(step: int) -> None:
    buffer = LineBuffer(20)
    data = b"a LOGIN {5}\r\nal\r\nc {0}\r\n rest\r\n"
    pending = list(data)
    results: list[bytes | None] = []
    wants: list[int | None] = [None, 5, None, 0, None]
    for want in wants:
        while True:
            result = buffer.next_line() if want is None else buffer.next_bytes(want)
            if result is not None or not pending:
                break
            chunk, pending = bytes(pending[:step]), pending[step:]
            buffer.receive_data(chunk)
        results.append(result)
    assert results == [b"a LOGIN {5}", b"al\r\nc", b" {0}", b"", b" rest"]


def test_literal_bytes_may_exceed_the_line_limit() -> None:
    buffer = LineBuffer(4)
    buffer.receive_data(b"0123456789")
    assert buffer.next_bytes(10) == b"0123456789"


def test_next_bytes_rejects_negative_sizes() -> None:
    with pytest.raises(ValueError, match="negative"):
        LineBuffer(10).next_bytes(-1)


def test_max_line_must_fit_a_line_ending() -> None:
    with pytest.raises(ValueError, match="line ending"):
        LineBuffer(1)


def test_repr_never_shows_the_contents() -> None:
    buffer = LineBuffer(100)
    buffer.receive_data(b"a LOGIN alice hunter2")
    assert "hunter2" not in repr(buffer)
    assert "21 bytes" in repr(buffer)


def test_consumed_space_is_given_back() -> None:
    buffer = LineBuffer(100)
    buffer.receive_data(b"0123456789abcdef\r\n" * 2000 + b"tail")
    for _ in range(2000):
        assert buffer.next_line() == b"0123456789abcdef"
    assert buffer.take_all() == b"tail"


@FUZZ
@given(
    lines=st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), max_size=20),
    trailer=st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"")),
    step=st.integers(min_value=1, max_value=50),
)
def test_any_chunking_gives_the_same_lines(lines: list[bytes], trailer: bytes, step: int) -> None:
    data = b"".join(line + b"\r\n" for line in lines) + trailer
    buffer = LineBuffer(64)
    got = feed(buffer, data, step)
    assert got == lines
    assert buffer.take_all() == trailer


@FUZZ
@given(data=st.binary(max_size=400), step=st.integers(min_value=1, max_value=64))
def test_memory_stays_bounded_whatever_the_input(data: bytes, step: int) -> None:
    buffer = LineBuffer(32)
    try:
        for start in range(0, len(data), step):
            buffer.receive_data(data[start : start + step])
            while buffer.next_line() is not None:
                pass
            assert len(buffer) < 32 + step
    except FrameError:
        pass


# === literal_at_end ========================================================================


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"a LOGIN {5}", Literal(5, synchronizing=True)),
        (b"a LOGIN {5+}", Literal(5, synchronizing=False)),
        (b"{0}", Literal(0, synchronizing=True)),
        (b"alice {007+}", Literal(7, synchronizing=False)),
        (b"a LOGIN alice", None),
        (b"a LOGIN {}", None),
        (b"a LOGIN {+}", None),
        (b"a LOGIN {5", None),
        (b"a LOGIN {x5}", None),
        (b"a LOGIN {5-}", None),
        (b"a LOGIN {5} ", None),
        (b"a LOGIN {-5}", None),
        (b"}", None),
        (b"", None),
    ],
)
def test_literal_announcements(line: bytes, expected: Literal | None) -> None:
    assert literal_at_end(line, 100) == expected


@pytest.mark.parametrize("line", [b"a {101}", b"a {101+}", b"a {99999999999999999999}"])
def test_oversized_literals_fail(line: bytes) -> None:
    with pytest.raises(FrameError):
        literal_at_end(line, 100)


def test_printable_escapes_controls_and_cuts() -> None:
    assert printable(b"ok\r\n\x1b[31mred\xff") == "ok\\r\\n\\x1b[31mred\ufffd"
    assert printable("x" * 10, limit=4) == "xxxx..."
    assert printable("tab\there") == "tab\\there"
