"""Idle sessions (not a test): ``python -m tests.bench.bench_idle [N] [--help]``.

Opens N IMAP sessions (9,000 by default) through one ``xoauth2-proxy serve`` (its own
process, as in production, :mod:`tests.bench.rig`), each logged in, INBOX selected and in
IDLE, with TLS on both sides of the proxy; checks that every one of them is alive (each
leaves IDLE, gets its ``OK`` and goes back into IDLE) and prints how much the proxy's
resident memory grew per session (the target: at most 40 KiB), with Dovecot's own memory
for the same sessions beside it (proportional set size of all its processes).

What it takes, printed before the run:

- open files: the proxy holds two sockets per session, this process one; the benchmark
  raises its own limit (``RLIMIT_NOFILE``) to the hard limit, and the proxy inherits it;
- Dovecot: a session is a TLS connection in an ``imap-login`` process (two descriptors
  each, so several processes share them) and an ``imap`` process, which Dovecot replaces
  by a place in ``imap-hibernate`` once the session has idled for
  ``imap_hibernate_timeout``; without hibernation it would need N ``imap`` processes. And
  ``mail_max_userip_connections`` at least N, since every session is the same user from
  the same address. :func:`dovecot_config` writes all that.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import resource
import socket
import ssl
import sys
import time
from pathlib import Path

from tests.bench.rig import PASSWORD, USER, Rig

#: Sessions per imap-login process (each holds two descriptors per session).
LOGIN_CLIENTS = 2500


def dovecot_config(sessions: int) -> str:
    """Dovecot's settings for ``sessions`` idle IMAP sessions from one user and address."""
    login_processes = -(-sessions // LOGIN_CLIENTS) + 1
    return f"""
default_process_limit = {sessions + 200}
default_client_limit = {sessions + 200}
default_vsz_limit = 1G
mail_max_userip_connections = {sessions + 100}
imap_hibernate_timeout = 2 secs
service imap-login {{
  service_count = 0
  process_min_avail = {login_processes}
  process_limit = {login_processes}
  client_limit = {LOGIN_CLIENTS}
}}
service imap {{
  process_limit = {sessions + 200}
  extra_groups = $default_internal_group
  unix_listener imap-master {{
    user = $default_internal_user
  }}
}}
service imap-hibernate {{
  client_limit = {sessions + 200}
  process_limit = 2
  unix_listener imap-hibernate {{
    mode = 0660
    group = $default_internal_group
  }}
}}
"""


def _dovecot_pss_kib(leader: int) -> int:
    """Proportional memory (shared pages divided among their users) of every process in
    Dovecot's group: each session has processes of its own, and their RSS would count the
    shared libraries once per process."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError):
            stat = (entry / "stat").read_bytes()
            if int(stat[stat.rindex(b")") + 2 :].split()[2]) != leader:
                continue
            for line in (entry / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total


def _dovecot_processes(leader: int) -> dict[str, int]:
    """How many processes of each kind (``imap``, ``imap-login``...) Dovecot runs."""
    kinds: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            stat = (entry / "stat").read_bytes()
            if int(stat[stat.rindex(b")") + 2 :].split()[2]) != leader:
                continue
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            kind = title.rsplit("/", 1)[-1].split()[0]
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


class _Session:
    """A session through the proxy, logged in, INBOX selected, in IDLE."""

    def __init__(self, context: ssl.SSLContext, port: int) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.conn = context.wrap_socket(raw, server_hostname="localhost")
        self._read_until(b"\r\n")
        self.conn.sendall(f'a1 LOGIN "{USER}" "{PASSWORD}"\r\n'.encode())
        if b"a1 OK" not in self._read_until(b"a1 "):
            raise RuntimeError("login refused")
        self.conn.sendall(b"a2 SELECT INBOX\r\na3 IDLE\r\n")
        self._read_until(b"+ ")
        self.tag = 3

    def _read_until(self, marker: bytes) -> bytes:
        received = b""
        while marker not in received:
            chunk = self.conn.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before {marker!r}: {received[-200:]!r}")
            received += chunk
        return received

    def check(self) -> None:
        """Leave IDLE, expect its OK, and go back into IDLE."""
        self.conn.sendall(b"DONE\r\n")
        if f"a{self.tag} OK".encode() not in self._read_until(f"a{self.tag} ".encode()):
            raise RuntimeError("IDLE not completed")
        self.tag += 1
        self.conn.sendall(f"a{self.tag} IDLE\r\n".encode())
        self._read_until(b"+ ")

    def close(self) -> None:
        self.conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sessions", type=int, nargs="?", default=9000)
    parser.add_argument("--threads", type=int, default=8, help="sessions opened at once")
    args = parser.parse_args()
    sessions = args.sessions
    needed = 2 * sessions + sessions + 200
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(
        f"{sessions} sessions: open files needed by the proxy about {2 * sessions + 100}, "
        f"by this process about {sessions + 100}; limit raised to {hard}"
    )
    if hard < 2 * sessions + 100:
        print(f"the hard limit on open files ({hard}) is too low; {needed} would do")
        return 2
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print("Dovecot needs (written to its configuration):" + dovecot_config(sessions))
    with Rig(dovecot_config=dovecot_config(sessions)) as rig:
        context = ssl.create_default_context(cafile=str(rig.pki.ca_file))
        port = rig.ports["imap"]
        for _ in range(5):  # warm up: the token, the verified password, imports
            _Session(context, port).close()
        time.sleep(1)
        proxy_before = rig.proxy_rss_kib()
        dovecot_before = _dovecot_pss_kib(rig.dovecot.pid)
        held: list[_Session] = []
        started = time.perf_counter()
        try:
            with concurrent.futures.ThreadPoolExecutor(args.threads) as pool:
                futures = [pool.submit(_Session, context, port) for _ in range(sessions)]
                for future in futures:
                    held.append(future.result())
            opened = time.perf_counter() - started
            time.sleep(5)  # into hibernation, and settled
            began = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.threads) as pool:
                list(pool.map(_Session.check, held))
            checked = time.perf_counter() - began
            time.sleep(5)
            proxy_after = rig.proxy_rss_kib()
            dovecot_after = _dovecot_pss_kib(rig.dovecot.pid)
            kinds = _dovecot_processes(rig.dovecot.pid)
            shown = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
            print(
                f"\n{sessions} idle IMAP sessions (TLS on both sides), opened in {opened:.0f} s; "
                f"all {len(held)} alive (each left IDLE, got its OK and went back into IDLE, "
                f"in {checked:.0f} s); Dovecot's processes: {shown}"
            )
            print("\n| process | before MiB | after MiB | per session KiB |")
            print("|---|---:|---:|---:|")
            for name, before, after in (
                ("proxy (RSS)", proxy_before, proxy_after),
                ("Dovecot (PSS, all processes)", dovecot_before, dovecot_after),
            ):
                print(
                    f"| {name} | {before / 1024:.1f} | {after / 1024:.1f} | "
                    f"{(after - before) / sessions:.1f} |"
                )
        finally:
            for session in held:
                session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
