"""A TCP forwarder that delays every chunk by a fixed time in each direction: the upstream
as if it were across a network (``python -m tests.bench.latency DELAY_MS TARGET_PORT``;
prints the port it listens on).

One thread reads each direction and queues what it read with the time it may leave; one
thread per direction sends it then. Order is kept, and an end of stream travels with the
same delay. It is a benchmark aid: no limits, loopback only.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import sys
import threading
import time


def _pump(source: socket.socket, sink: socket.socket, delay: float) -> None:
    pending: queue.Queue[tuple[float, bytes]] = queue.Queue()

    def reader() -> None:
        try:
            while chunk := source.recv(1 << 16):
                pending.put((time.monotonic() + delay, chunk))
        except OSError:
            pass
        pending.put((time.monotonic() + delay, b""))

    def writer() -> None:
        while True:
            due, chunk = pending.get()
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            try:
                if not chunk:
                    sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(chunk)
            except OSError:
                return

    threading.Thread(target=reader, daemon=True).start()
    writer()


def _connection(client: socket.socket, port: int, delay: float) -> None:
    with client, socket.create_connection(("127.0.0.1", port)) as server:
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        back = threading.Thread(target=_pump, args=(server, client, delay), daemon=True)
        back.start()
        _pump(client, server, delay)
        back.join()


def main() -> int:
    delay = float(sys.argv[1]) / 1000
    target = int(sys.argv[2])
    with socket.create_server(("127.0.0.1", 0)) as listener:
        print(listener.getsockname()[1], flush=True)
        while True:
            client, _ = listener.accept()

            # The connection itself takes a round trip to set up.
            def start(c: socket.socket = client) -> None:
                time.sleep(2 * delay)
                with contextlib.suppress(OSError):
                    _connection(c, target, delay)

            threading.Thread(target=start, daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
