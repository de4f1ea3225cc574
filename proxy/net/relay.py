"""The post-authentication relay: bytes copied both ways, unchanged, with backpressure."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from proxy.net.tlssocket import TlsSocketStream

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["eager_sender", "relay", "send_eagerly"]

#: Largest read per call. Reads are bounded, and each is written before the next read, so
#: a session holds at most this much in flight per direction.
CHUNK = 65536


def eager_sender(stream: trio.abc.SendStream) -> Callable[[bytes | bytearray], Awaitable[object]]:
    """``stream``'s ``send_all``, or for TLS on a socket its ``write_all``, which yields to
    the scheduler only when it waits (see :mod:`proxy.net.tlssocket`): for loops whose
    receives already yield."""
    return stream.write_all if isinstance(stream, TlsSocketStream) else stream.send_all


async def send_eagerly(stream: trio.abc.SendStream, data: bytes | bytearray) -> None:
    """Send all of ``data`` with :func:`eager_sender`."""
    await eager_sender(stream)(data)


async def _copy(
    source: trio.abc.ReceiveStream,
    sink: trio.abc.SendStream,
    done: trio.CancelScope,
    endings: list[bool],
    tap: Callable[[bytes | bytearray], None] | None = None,
) -> None:
    """Copy until ``source`` ends; record in ``endings`` whether it ended cleanly (True: an
    end of stream, for TLS a close_notify) or broke (False). ``tap`` is shown each chunk
    before it is sent on."""
    send = eager_sender(sink)
    try:
        while data := await source.receive_some(CHUNK):
            if tap is not None:
                tap(data)
            await send(data)
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


async def relay(
    client: trio.abc.Stream,
    server: trio.abc.Stream,
    *,
    to_server: Callable[[bytes | bytearray], None] | None = None,
    to_client: Callable[[bytes | bytearray], None] | None = None,
) -> bool:
    """Copy ``client`` → ``server`` and back until either side ends or breaks.

    ``to_server`` and ``to_client`` are shown every chunk copied in that direction (to
    count bytes, or to watch the first lines); they must not block.

    Returns whether the session ended cleanly: no side broke off (a reset, or TLS cut
    without close_notify). The caller closes both streams afterwards, and should pass a
    break on as one (close without close_notify), so that a truncation is never shown to
    the other side as a clean end.
    """
    endings: list[bool] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_copy, server, client, nursery.cancel_scope, endings, to_client)
        # The other direction runs in this task: one task fewer per session.
        await _copy(client, server, nursery.cancel_scope, endings, to_server)
    return all(endings)
