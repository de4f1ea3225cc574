"""Restart storm (not a test): ``python3 -m tests.bench.bench_storm [USERS] [CONNECTIONS]``.

A freshly started ``xoauth2-proxy serve`` (its own process, users hashed at the default
argon2id cost, nothing cached but the app's token) receives USERS x CONNECTIONS first
logins at the same moment, as after a restart. Clients behave like legacy programs: on a
temporary reply they wait a second and try again. The same number of clients then log in
to the same Dovecot directly with XOAUTH2, all at once, for comparison.

Printed: the time until the last client is in, how many temporary replies were needed,
the proxy's CPU time, and the floor no proxy can beat: one hash per user (identical
attempts share one), USERS x (CPU seconds per hash) / cores.
"""

from __future__ import annotations

import concurrent.futures
import imaplib
import os
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.identities import DEFAULT_PARAMETERS, _verify, hash_password
from tests.bench.rig import free_port, wait_for_port
from tests.support.certs import TestPki
from tests.support.dovecot import Dovecot
from tests.support.entra import EntraEmulator

if TYPE_CHECKING:
    from collections.abc import Callable

CLIENT_ID = "00000000-0000-4000-8000-0000000000cc"
SECRET = "bench-secret"
MAILBOX = "storm@contoso.com"


def _config(
    work: Path, pki: TestPki, idp: EntraEmulator, dovecot: Dovecot, port: int, users: int
) -> Path:
    (work / "secret").write_text(SECRET)
    (work / "secret").chmod(0o600)
    lines = [
        "[apps.contoso]",
        'provider = "microsoft"',
        f'tenant = "{idp.tenant}"',
        f'client_id = "{CLIENT_ID}"',
        'client_secret = { file = "secret" }',
        f'authority = "{idp.authority}"',
        f'ca_file = "{idp.ca_file}"',
        "",
        "[[listeners]]",
        'protocol = "imap"',
        f'listen = "127.0.0.1:{port}"',
        'tls = "implicit"',
        f'certificate = {{ file = "{pki.issue("proxy", "localhost", "127.0.0.1")}" }}',
        f'upstream = "127.0.0.1:{dovecot.ports.imaps}"',
        'upstream_tls = "implicit"',
        f'upstream_ca_file = "{dovecot.ca_file}"',
        "",
    ]
    for n in range(users):
        lines += [
            f'[users."user{n}@contoso.com"]',
            f'password_hash = "{hash_password(f"password {n}")}"',  # the default cost
            'app = "contoso"',
            f'mailbox = "{MAILBOX}"',
            "",
        ]
    config = work / "config.toml"
    config.write_text("\n".join(lines))
    config.chmod(0o600)
    return config


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _storm(clients: int, login: Callable[[int], None]) -> tuple[float, int]:
    """Release ``clients`` threads at once; seconds until the last is in, retries."""
    barrier = threading.Barrier(clients + 1)
    retries = [0]
    lock = threading.Lock()

    def client(n: int) -> float:
        barrier.wait()
        while True:
            try:
                login(n)
                return time.perf_counter()
            except imaplib.IMAP4.error as exc:
                if "UNAVAILABLE" not in str(exc):
                    raise
                with lock:
                    retries[0] += 1
                time.sleep(1)  # as a legacy client retries a temporary failure

    with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
        futures = [pool.submit(client, n) for n in range(clients)]
        barrier.wait()
        started = time.perf_counter()
        last = max(f.result(timeout=600) for f in futures)
    return last - started, retries[0]


def main() -> int:
    users = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    per_user = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    clients = users * per_user
    sample = hash_password("sample")
    before = time.process_time()
    _verify("sample", sample)
    cpu_per_hash = time.process_time() - before
    cores = os.cpu_count() or 1
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
                mailboxes=(MAILBOX,),
            ) as dovecot:
                port = free_port()
                config = _config(work, pki, idp, dovecot, port, users)
                token = subprocess.run(
                    [sys.executable, "-m", "proxy", "token", "contoso", "-c", str(config)],
                    capture_output=True,
                    check=True,
                    text=True,
                ).stdout.strip()
                xoauth2 = f"user={MAILBOX}\x01auth=Bearer {token}\x01\x01".encode()

                def direct(n: int) -> None:
                    with imaplib.IMAP4_SSL(
                        "localhost", dovecot.ports.imaps, ssl_context=context, timeout=120
                    ) as imap:
                        imap.authenticate("XOAUTH2", lambda _: xoauth2)
                        imap.logout()

                def proxied(n: int) -> None:
                    user = n % users
                    with imaplib.IMAP4_SSL(
                        "localhost", port, ssl_context=context, timeout=120
                    ) as imap:
                        imap.login(f"user{user}@contoso.com", f"password {user}")
                        imap.logout()

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
                    stderr=subprocess.DEVNULL,
                )
                try:
                    wait_for_port(port, time.monotonic() + 30)
                    time.sleep(1)  # the background refresh has the token
                    cpu_before = _cpu_seconds(proxy.pid)
                    through, retries = _storm(clients, proxied)
                    cpu = _cpu_seconds(proxy.pid) - cpu_before
                finally:
                    proxy.terminate()
                    proxy.wait(30)
                straight, _ = _storm(clients, direct)
    floor = users * cpu_per_hash / cores
    print(f"restart storm: {users} users x {per_user} connections = {clients} first logins")
    print(f"| {'what':<46} | {'figure':>10} |")
    print(f"|{'-' * 48}|{'-' * 12}|")
    rows = [
        ("last login in, through the proxy", f"{through:.2f} s"),
        ("last login in, direct (XOAUTH2, same Dovecot)", f"{straight:.2f} s"),
        ("floor: users x CPU per hash / cores", f"{floor:.2f} s"),
        ("proxy CPU for the storm", f"{cpu:.2f} s"),
        ("CPU per argon2id hash (m=65536,t=3,p=4)", f"{cpu_per_hash * 1e3:.0f} ms"),
        ("temporary replies retried", f"{retries}"),
    ]
    for what, figure in rows:
        print(f"| {what:<46} | {figure:>10} |")
    print(f"\nratio to direct: {through / straight:.1f}x; to the floor: {through / floor:.1f}x")
    print(f"(default cost {DEFAULT_PARAMETERS}; {cores} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
