"""Proxy benchmarks (not tests): ``python3 -m tests.bench.bench_proxy``. Prints a table.

The same Dovecot is reached twice in one run: directly (the client logs in with SASL
XOAUTH2 and a token, as a modern client would) and through ``xoauth2-proxy serve``,
running as its own process as in production (the client sends a password). Each row
gives both median timings (the two alternate) and their ratio, proxy / direct:

- a whole session: TLS handshake, login, SELECT, LOGOUT (the proxy adds a second TLS
  handshake and the password check; verified passwords are cached, as in production);
- FETCH of a message of several megabytes (the relay's throughput).
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.identities import hash_password
from tests.support.certs import TestPki
from tests.support.dovecot import Dovecot
from tests.support.entra import EntraEmulator

if TYPE_CHECKING:
    from collections.abc import Callable

CLIENT_ID = "00000000-0000-4000-8000-0000000000bb"
SECRET = "bench-secret"
USER = "bench@contoso.com"
PASSWORD = "bench-password"
SESSIONS = 100
FETCHES = 10
MESSAGE_SIZE = 8 * 1024 * 1024


def _message() -> bytes:
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?()[]<>\r\n"
    body = (line * (MESSAGE_SIZE // len(line) + 1))[:MESSAGE_SIZE]
    header = f"From: bench@contoso.com\r\nTo: {USER}\r\nSubject: big\r\n\r\n".encode()
    return header + body.rstrip(b"\r\n") + b"\r\n"


def _config(work: Path, pki: TestPki, idp: EntraEmulator, dovecot: Dovecot, port: int) -> Path:
    (work / "secret").write_text(SECRET)
    (work / "secret").chmod(0o600)
    config = work / "config.toml"
    config.write_text(f"""\
[apps.contoso]
provider = "microsoft"
tenant = "{idp.tenant}"
client_id = "{CLIENT_ID}"
client_secret = {{ file = "secret" }}
authority = "{idp.authority}"
ca_file = "{idp.ca_file}"

[[listeners]]
protocol = "imap"
listen = "127.0.0.1:{port}"
tls = "implicit"
certificate = {{ file = "{pki.issue("proxy", "localhost", "127.0.0.1")}" }}
upstream = "127.0.0.1:{dovecot.ports.imaps}"
upstream_tls = "implicit"
upstream_ca_file = "{dovecot.ca_file}"

[users."{USER}"]
password_hash = "{hash_password(PASSWORD)}"
app = "contoso"
""")
    config.chmod(0o600)
    return config


def _wait_for_port(port: int, deadline: float) -> None:
    """Wait until something accepts on the port (the proxy this benchmark started)."""
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"the proxy did not start listening on port {port}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _compare(
    direct: Callable[[], object], proxied: Callable[[], object], rounds: int
) -> tuple[float, float]:
    """Median seconds per call of each; the two alternate, so that both see the same load
    on the machine (a shared machine's noise otherwise lands on one side only)."""
    direct()  # warm up: the first token, the first password check, caches
    proxied()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for fn, spent in zip((direct, proxied), times, strict=True):
            started = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - started)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="xoauth2-proxy-bench-") as tmp:
        work = Path(tmp)
        pki = TestPki(work / "pki")
        context = ssl.create_default_context(cafile=str(pki.ca_file))
        with EntraEmulator(work / "idp") as idp:
            idp.register_app(CLIENT_ID, secret=SECRET)
            with Dovecot(
                work / "dovecot",
                pki=pki,
                jwt_public_key_pem=idp.public_key_pem(),
                kid=idp.kid,
                issuer=idp.issuer,
                mailboxes=(USER,),
            ) as dovecot:
                big = _message()
                dovecot.deliver(USER, big)
                port = _free_port()
                config = _config(work, pki, idp, dovecot, port)
                token = subprocess.run(
                    [sys.executable, "-m", "proxy", "token", "contoso", "-c", str(config)],
                    capture_output=True,
                    check=True,
                    text=True,
                ).stdout.strip()
                xoauth2 = f"user={USER}\x01auth=Bearer {token}\x01\x01".encode()
                proxy = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "proxy",
                        "--log-level",
                        "warning",
                        "serve",
                        "-c",
                        str(config),
                    ],
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
                try:
                    _wait_for_port(port, time.monotonic() + 30)

                    def direct() -> imaplib.IMAP4_SSL:
                        imap = imaplib.IMAP4_SSL(
                            "localhost", dovecot.ports.imaps, ssl_context=context
                        )
                        imap.authenticate("XOAUTH2", lambda _: xoauth2)
                        return imap

                    def proxied() -> imaplib.IMAP4_SSL:
                        imap = imaplib.IMAP4_SSL("localhost", port, ssl_context=context)
                        imap.login(USER, PASSWORD)
                        return imap

                    def session(connect: Callable[[], imaplib.IMAP4_SSL]) -> Callable[[], None]:
                        def run() -> None:
                            imap = connect()
                            imap.select("INBOX", readonly=True)
                            imap.logout()

                        return run

                    def fetch(connect: Callable[[], imaplib.IMAP4_SSL]) -> Callable[[], None]:
                        imap = connect()
                        imap.select("INBOX", readonly=True)

                        def run() -> None:
                            _, data = imap.fetch("1", "(BODY.PEEK[])")
                            part = data[0]
                            assert isinstance(part, tuple)
                            assert part[1] == big

                        return run

                    print(f"| {'what':<36} | {'direct':>10} | {'proxy':>10} | ratio |")
                    print(f"|{'-' * 38}|{'-' * 12}|{'-' * 12}|-------|")
                    timings: dict[str, tuple[float, float]] = {}
                    for name, make, rounds in (
                        ("session (TLS, login, SELECT, LOGOUT)", session, SESSIONS),
                        (f"FETCH {MESSAGE_SIZE >> 20} MiB", fetch, FETCHES),
                    ):
                        a, b = _compare(make(direct), make(proxied), rounds)
                        timings[name] = (a, b)
                        print(
                            f"| {name:<36} | {a * 1e3:>7.2f} ms | {b * 1e3:>7.2f} ms | "
                            f"{b / a:>5.2f} |"
                        )
                    mib = MESSAGE_SIZE / (1 << 20)
                    direct_fetch, proxied_fetch = timings[f"FETCH {MESSAGE_SIZE >> 20} MiB"]
                    print(
                        f"\nFETCH throughput: {mib / proxied_fetch:.0f} MiB/s through the proxy, "
                        f"{mib / direct_fetch:.0f} MiB/s direct"
                    )
                finally:
                    proxy.terminate()
                    proxy.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
