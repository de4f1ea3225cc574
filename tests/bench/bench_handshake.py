"""TLS handshake cost by listener key (not a test): ``python -m tests.bench.bench_handshake``.

Runs full TLS handshakes (no resumption) between a client and a server context made as the
proxy makes its listeners' (:func:`proxy.net.tls.client_side_context`), over socket pairs
in one process, the server in its own thread, and prints the CPU time per handshake of
the server and of the client (which verifies the certificate chain) for an ECDSA P-256
and an RSA-2048 certificate, full and resumed (TLS 1.3 tickets). The proxy is the server
towards its clients, and the client towards the upstream, whose sessions it resumes.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import statistics
import tempfile
import threading
import time
from pathlib import Path

import trustme

from proxy.net.tls import client_side_context
from tests.support.certs import TestPki


def _cpu(
    server: ssl.SSLContext, client: ssl.SSLContext, count: int, *, resume: bool
) -> tuple[float, float]:
    """Seconds of CPU per handshake over ``count`` handshakes: the server's and the
    client's (medians)."""
    cpu: list[float] = []
    client_cpu: list[float] = []
    session: ssl.SSLSession | None = None
    for _ in range(count):
        a, b = socket.socketpair()
        spent = [0.0]

        def serve(sock: socket.socket = b, spent: list[float] = spent) -> None:
            began = time.thread_time()
            with server.wrap_socket(sock, server_side=True) as tls:
                tls.sendall(b"* OK\r\n")  # TLS 1.3 tickets go out with the first data
                tls.recv(10)
            spent[0] = time.thread_time() - began

        thread = threading.Thread(target=serve)
        thread.start()
        began = time.thread_time()
        with client.wrap_socket(a, server_hostname="localhost", session=session) as tls:
            tls.recv(10)
            tls.sendall(b"x")
            if resume:
                if session is not None and not tls.session_reused:
                    raise RuntimeError("the session was not resumed")
                if session is None:  # once, as the proxy does: Python copies it each time
                    session = tls.session
        client_cpu.append(time.thread_time() - began)
        thread.join()
        cpu.append(spent[0])
    skip = 1 if resume else 0  # the first of a resumed series is a full handshake
    return statistics.median(cpu[skip:]), statistics.median(client_cpu[skip:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=400, help="handshakes per figure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        pki = TestPki(Path(directory))
        client = ssl.create_default_context(cafile=str(pki.ca_file))
        print(
            "| server key | full handshake: server CPU | client CPU "
            "| resumed (TLS 1.3 ticket): server CPU | client CPU |"
        )
        print("|---|---:|---:|---:|---:|")
        for name, key in (
            ("ECDSA P-256", trustme.KeyType.ECDSA),
            ("RSA-2048", trustme.KeyType.RSA),
        ):
            server = client_side_context(pki.issue(f"listener-{name}", "localhost", key_type=key))
            full = _cpu(server, client, args.count, resume=False)
            resumed = _cpu(server, client, args.count, resume=True)
            print(
                f"| {name} | {full[0] * 1e3:.2f} ms | {full[1] * 1e3:.2f} ms "
                f"| {resumed[0] * 1e3:.2f} ms | {resumed[1] * 1e3:.2f} ms |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
