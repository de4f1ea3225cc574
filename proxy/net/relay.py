"""The post-authentication relay: bytes copied both ways, unchanged, with backpressure."""

from __future__ import annotations

import trio

__all__ = ["relay"]

#: Largest read per call. Reads are bounded, and each is written before the next read, so
#: a session holds at most this much in flight per direction.
CHUNK = 65536


async def _copy(
    source: trio.abc.ReceiveStream, sink: trio.abc.SendStream, done: trio.CancelScope
) -> int:
    total = 0
    try:
        while data := await source.receive_some(CHUNK):
            await sink.send_all(data)
            total += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        done.cancel()
        return total
    # End of stream from ``source``: pass the half-close on where the transport can
    # express it (plain TCP), else end the whole session (TLS cannot half-close).
    if isinstance(sink, trio.abc.HalfCloseableStream):
        try:
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            done.cancel()
        return total
    done.cancel()
    return total


async def relay(client: trio.abc.Stream, server: trio.abc.Stream) -> None:
    """Copy ``client`` → ``server`` and back until either side ends or breaks.

    The caller closes both streams afterwards.
    """
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_copy, server, client, nursery.cancel_scope)
        # The other direction runs in this task: one task fewer per session.
        await _copy(client, server, nursery.cancel_scope)
