"""Idle-session memory benchmark (not a test): ``python3 -m tests.bench.bench_idle [N]``.

Opens N IMAP sessions through ``xoauth2-proxy serve`` (its own process, as in production),
each logged in, INBOX selected and in IDLE, with TLS on both sides of the proxy, and
prints how much the proxy's resident memory grew per session (the target, in
ARCHITECTURE.md: at most 40 KiB). Dovecot's own memory for the same sessions
(proportional set size of all its processes) is printed beside it for scale.

Each session costs the Dovecot rig two processes (imap-login as its TLS proxy, and imap),
so N is bounded by the machine's processes and memory, not by the proxy: the default of
500 gives a stable per-session figure.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.bench_proxy import (
    CLIENT_ID,
    PASSWORD,
    SECRET,
    USER,
    _config,
    _free_port,
    _wait_for_port,
)
from tests.support.certs import TestPki
from tests.support.dovecot import Dovecot
from tests.support.entra import EntraEmulator

DEFAULT_SESSIONS = 500

#: Enough Dovecot processes for the sessions (the defaults stop at 100).
_DOVECOT_LIMITS = """
default_process_limit = 5000
default_client_limit = 10000
service imap-login {
  process_limit = 5000
}
service imap {
  process_limit = 5000
}
"""


def _rss_kib(pid: int) -> int:
    """Resident memory of one process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def _dovecot_pss_kib() -> int:
    """Proportional memory (shared pages divided among their users) of every Dovecot
    process: each session has processes of its own, and their RSS would count the shared
    libraries once per process."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if b"dovecot" not in (entry / "cmdline").read_bytes():
                continue
            for line in (entry / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total


def _read_until(conn: ssl.SSLSocket, marker: bytes) -> bytes:
    received = b""
    while marker not in received:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before {marker!r}: {received[-200:]!r}")
        received += chunk
    return received


def _idle_session(context: ssl.SSLContext, port: int) -> ssl.SSLSocket:
    """A session through the proxy, logged in, INBOX selected, in IDLE."""
    conn = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname="localhost"
    )
    _read_until(conn, b"\r\n")
    conn.sendall(f'a1 LOGIN "{USER}" "{PASSWORD}"\r\n'.encode())
    if b"a1 OK" not in _read_until(conn, b"a1 "):
        raise RuntimeError("login refused")
    conn.sendall(b"a2 SELECT INBOX\r\na3 IDLE\r\n")
    _read_until(conn, b"+ ")
    return conn


def main() -> int:
    sessions = int(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SESSIONS
    # Each session holds a client socket here, two in the proxy and more in Dovecot.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 4 * sessions + 100:
        print(f"the open files limit ({hard}) is too low for {sessions} sessions")
        return 2
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
                extra_config=_DOVECOT_LIMITS,
            ) as dovecot:
                port = _free_port()
                config = _config(work, pki, idp, dovecot, port)
                with config.open("a") as out:  # all sessions come from one address
                    out.write(
                        f"\n[limits]\nmax_connections = {sessions + 10}\n"
                        f"max_connections_per_network = {sessions + 10}\n"
                    )
                command = ["serve", "-c", str(config)]
                proxy = subprocess.Popen(
                    [sys.executable, "-m", "proxy", "--log-level", "warning", *command],
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
                held: list[ssl.SSLSocket] = []
                try:
                    _wait_for_port(port, time.monotonic() + 30)
                    # Warm up: the token, the verified-password cache, imports, pools.
                    for _ in range(5):
                        _idle_session(context, port).close()
                    time.sleep(1)
                    proxy_before = _rss_kib(proxy.pid)
                    dovecot_before = _dovecot_pss_kib()
                    started = time.perf_counter()
                    for _ in range(sessions):
                        held.append(_idle_session(context, port))
                    opened = time.perf_counter() - started
                    time.sleep(2)  # let the sessions settle into IDLE
                    proxy_after = _rss_kib(proxy.pid)
                    dovecot_after = _dovecot_pss_kib()
                    per_proxy = (proxy_after - proxy_before) / sessions
                    per_dovecot = (dovecot_after - dovecot_before) / sessions
                    print(
                        f"{sessions} idle IMAP sessions (TLS on both sides), opened in "
                        f"{opened:.1f} s"
                    )
                    print("| process  | before MiB | after MiB | per session KiB |")
                    print("|----------|------------|-----------|-----------------|")
                    for name, before, after, per in (
                        ("proxy", proxy_before, proxy_after, per_proxy),
                        ("dovecot", dovecot_before, dovecot_after, per_dovecot),
                    ):
                        print(
                            f"| {name:<8} | {before / 1024:>10.1f} | {after / 1024:>9.1f} | "
                            f"{per:>15.1f} |"
                        )
                finally:
                    for conn in held:
                        conn.close()
                    proxy.terminate()
                    proxy.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
