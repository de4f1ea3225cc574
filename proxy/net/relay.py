"""The post-authentication relay: bytes copied both ways, unchanged, with backpressure."""

from __future__ import annotations

import trio

__all__ = ["relay"]

#: Largest read per call. Reads are bounded, and each is written before the next read, so
#: a session holds at most this much in flight per direction.
CHUNK = 65536


async def _copy(
    source: trio.abc.ReceiveStream,
    sink: trio.abc.SendStream,
    done: trio.CancelScope,
    endings: list[bool],
) -> None:
    """Copy until ``source`` ends; record in ``endings`` whether it ended cleanly (True: an
    end of stream, for TLS a close_notify) or broke (False)."""
    try:
        while data := await source.receive_some(CHUNK):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        endings.append(False)
        done.cancel()
        return
    endings.append(True)
    # End of stream from ``source``: pass the half-close on where the transport can
    # express it (plain TCP), else end the whole session (TLS cannot half-close).
    if isinstance(sink, trio.abc.HalfCloseableStream):
        try:
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            done.cancel()
        return
    done.cancel()


async def relay(client: trio.abc.Stream, server: trio.abc.Stream) -> bool:
    """Copy ``client`` → ``server`` and back until either side ends or breaks.

    Returns whether the session ended cleanly: no side broke off (a reset, or TLS cut
    without close_notify). The caller closes both streams afterwards, and should pass a
    break on as one (close without close_notify), so that a truncation is never shown to
    the other side as a clean end.
    """
    endings: list[bool] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_copy, server, client, nursery.cancel_scope, endings)
        # The other direction runs in this task: one task fewer per session.
        await _copy(client, server, nursery.cancel_scope, endings)
    return all(endings)
