"""TLS relay micro-benchmark (not a test): ``python3 -m tests.bench.bench_tls``.

Three processes, as in production: an *upstream* that answers ``GET <n>`` with ``n`` bytes
written in small TLS records (Dovecot writes about 4 KB per record), a *client* (this
process, blocking :mod:`ssl`), and between them, when not measuring the direct path, a
trio *proxy* that terminates TLS on both sides and copies with :func:`proxy.net.relay.relay`.
The proxy's TLS is one of:

- ``sslstream``: :class:`trio.SSLStream` over :class:`trio.SocketStream` (memory BIOs);
- ``sslstream-bufs``: the same with 1 MiB kernel socket buffers on both connections;
- ``tlssocket``: :class:`proxy.net.tlssocket.TlsSocketStream` (OpenSSL on the socket).

Prints one row per variant: median times per transfer, direct and through the proxy (the
two alternate, so both see the same load on the machine), the proxy's MiB/s, the time
ratio proxy / direct (the target, in ARCHITECTURE.md: bulk transfer at 0.95 times the
direct throughput or better), and the proxy process's CPU time per transfer (the most
stable figure on a busy machine).
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Final

import trio

from proxy.net.relay import relay
from proxy.net.tlssocket import TlsSocketStream
from tests.support.certs import TestPki

VARIANTS: Final = ("sslstream", "sslstream-bufs", "tlssocket")
BIG_BUFFERS: Final = 1 << 20


def _upstream(cert: Path, record: int) -> None:
    """Serve ``GET <n>\\n`` requests in ``record``-byte writes, a thread per connection."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert)
    payload = bytes(range(256)) * (record // 256 + 1)

    def serve(raw: socket.socket) -> None:
        with context.wrap_socket(raw, server_side=True) as conn, conn.makefile("rb") as lines:
            for line in lines:
                remaining = int(line.split()[1])
                while remaining:
                    n = min(record, remaining)
                    conn.sendall(payload[:n])
                    remaining -= n

    with socket.create_server(("127.0.0.1", 0)) as listener:
        print(listener.getsockname()[1], flush=True)
        while True:
            threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()


async def _proxy(cert: Path, ca: Path, upstream_port: int, variant: str) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert)
    client_context = ssl.create_default_context(cafile=str(ca))

    def tune(stream: trio.SocketStream) -> None:
        if variant == "sslstream-bufs":
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BIG_BUFFERS)
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BIG_BUFFERS)

    async def handle(client_plain: trio.SocketStream) -> None:
        tune(client_plain)
        server_plain = await trio.open_tcp_stream("127.0.0.1", upstream_port)
        tune(server_plain)
        client: trio.abc.Stream
        server: trio.abc.Stream
        if variant == "tlssocket":
            client_tls = TlsSocketStream.wrap(client_plain, server_context, server_side=True)
            server_tls = TlsSocketStream.wrap(
                server_plain, client_context, server_hostname="localhost"
            )
            await client_tls.do_handshake()
            await server_tls.do_handshake()
            client, server = client_tls, server_tls
        else:
            client_ssl = trio.SSLStream(client_plain, server_context, server_side=True)
            server_ssl = trio.SSLStream(server_plain, client_context, server_hostname="localhost")
            await client_ssl.do_handshake()
            await server_ssl.do_handshake()
            client, server = client_ssl, server_ssl
        try:
            await relay(client, server)
        finally:
            await trio.aclose_forcefully(client)
            await trio.aclose_forcefully(server)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    await trio.serve_listeners(handle, listeners)


def _spawn(*args: str) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.bench_tls", *args], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    return process, int(process.stdout.readline())


class _Client:
    """A blocking TLS client that asks for ``size`` bytes and times their arrival."""

    def __init__(self, port: int, ca: Path, size: int) -> None:
        context = ssl.create_default_context(cafile=str(ca))
        raw = socket.create_connection(("127.0.0.1", port))
        self._conn = context.wrap_socket(raw, server_hostname="localhost")
        self._request = f"GET {size}\n".encode()
        self._buffer = memoryview(bytearray(size))
        self.transfer()  # warm up

    def transfer(self) -> float:
        started = time.perf_counter()
        self._conn.sendall(self._request)
        got = 0
        while got < len(self._buffer):
            n = self._conn.recv_into(self._buffer[got:])
            if not n:
                raise ConnectionError("closed early")
            got += n
        return time.perf_counter() - started

    def close(self) -> None:
        self._conn.close()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=8, help="size of one transfer")
    parser.add_argument("--rounds", type=int, default=5, help="transfers per block")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--record", type=int, default=3800, help="upstream write size")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--role", choices=("upstream", "proxy"), help=argparse.SUPPRESS)
    parser.add_argument("--cert", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ca", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--upstream-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "upstream":
        _upstream(args.cert, args.record)
        return 0
    if args.role == "proxy":
        trio.run(partial(_proxy, args.cert, args.ca, args.upstream_port, args.variant))
        return 0
    size = args.mib << 20
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        pki = TestPki(Path(tmp))
        cert = pki.issue("server", "localhost")
        common = ("--cert", str(cert), "--ca", str(pki.ca_file))
        upstream, upstream_port = _spawn(
            "--role", "upstream", "--record", str(args.record), *common
        )
        print(
            f"{args.mib} MiB per transfer, upstream records of {args.record} bytes; "
            f"direct and proxied transfers alternate in {args.blocks} blocks of {args.rounds}; "
            "medians\n"
        )
        print(f"| {'variant':<15} | direct ms | proxy ms | MiB/s | ratio | proxy CPU ms |")
        print(f"|{'-' * 17}|-----------|----------|-------|-------|--------------|")
        try:
            for variant in args.variants.split(","):
                proxy, port = _spawn(
                    "--role",
                    "proxy",
                    "--variant",
                    variant,
                    "--upstream-port",
                    str(upstream_port),
                    *common,
                )
                direct_times: list[float] = []
                proxy_times: list[float] = []
                cpu = 0.0
                try:
                    direct = _Client(upstream_port, pki.ca_file, size)
                    proxied = _Client(port, pki.ca_file, size)
                    for _ in range(args.blocks):
                        direct_times += [direct.transfer() for _ in range(args.rounds)]
                        before = _cpu_seconds(proxy.pid)
                        proxy_times += [proxied.transfer() for _ in range(args.rounds)]
                        cpu += _cpu_seconds(proxy.pid) - before
                    direct.close()
                    proxied.close()
                finally:
                    proxy.terminate()
                    proxy.wait(10)
                a = statistics.median(direct_times)
                b = statistics.median(proxy_times)
                print(
                    f"| {variant:<15} | {a * 1e3:>9.1f} | {b * 1e3:>8.1f} | {args.mib / b:>5.0f} "
                    f"| {b / a:>5.2f} | {cpu / len(proxy_times) * 1e3:>12.1f} |"
                )
        finally:
            upstream.terminate()
            upstream.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
