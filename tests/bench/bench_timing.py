"""Refusal timing (not a test): ``python3 -m tests.bench.bench_timing [ROUNDS]``.

A wrong password must take as long to refuse as an unknown user, or the timing tells an
attacker which logins exist. ``xoauth2-proxy serve`` runs as a process with users whose
passwords are checked in every way the proxy knows: a hash at the default cost, an old
cheap hash, a user with only an app key, one with only a client certificate; plus a login
that no user has. Each round sends one wrong LOGIN for each, in turn, over an open TLS
connection, and times it from the command to the tagged reply. Printed: the median and
the spread (quartiles) per case, and the ratio of each median to the unknown user's.
Failure delays and lockouts are switched off, so only the password check is measured.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proxy.identities import HashParameters, hash_password
from tests.bench.rig import free_port, wait_for_port
from tests.support.certs import TestPki
from tests.support.dovecot import Dovecot
from tests.support.entra import EntraEmulator

CLIENT_ID = "00000000-0000-4000-8000-0000000000dd"
SECRET = "bench-secret"
MAILBOX = "timing@contoso.com"
CASES = {
    "unknown user": "nobody@contoso.com",
    "wrong password, default-cost hash": "default@contoso.com",
    "wrong password, old cheap hash": "cheap@contoso.com",
    "user with only an app key": "erp",
    "user with only a client certificate": "scanner",
}


def _config(work: Path, pki: TestPki, idp: EntraEmulator, dovecot: Dovecot, port: int) -> Path:
    (work / "secret").write_text(SECRET)
    (work / "secret").chmod(0o600)
    cheap = HashParameters(memory_cost=256, iterations=1, lanes=1)
    key_hash = hashlib.sha256(b"xo2k_bench").hexdigest()
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

[limits]
failure_delay = 0
lockout_after = 100000
trusted_lockout_after = 100000
network_lockout_after = 100000
credential_cache_ttl = 0

[users."default@contoso.com"]
password_hash = "{hash_password("right")}"
app = "contoso"
mailbox = "{MAILBOX}"

[users."cheap@contoso.com"]
password_hash = "{hash_password("right", cheap)}"
app = "contoso"
mailbox = "{MAILBOX}"

[users."erp"]
app_key_hash = "sha256:{key_hash}"
app = "contoso"
mailbox = "{MAILBOX}"

[users."scanner"]
certificate_fingerprint = "sha256:{"ab" * 32}"
app = "contoso"
mailbox = "{MAILBOX}"
""")
    config.chmod(0o600)
    return config


class _Client:
    """One TLS connection kept open; each attempt is a LOGIN on it."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.tls = context.wrap_socket(sock, server_hostname="localhost")
        self.stream = self.tls.makefile("rwb")
        self.stream.readline()
        self.tag = 0

    def attempt(self, login: str) -> float:
        self.tag += 1
        tag = f"a{self.tag}".encode()
        started = time.perf_counter()
        self.stream.write(tag + f' LOGIN "{login}" "wrong"\r\n'.encode())
        self.stream.flush()
        while not (line := self.stream.readline()).startswith(tag + b" "):
            if not line:
                raise RuntimeError("the proxy closed the connection")
        elapsed = time.perf_counter() - started
        if b"AUTHENTICATIONFAILED" not in line:
            raise RuntimeError(f"unexpected reply: {line!r}")
        return elapsed

    def close(self) -> None:
        self.stream.close()
        self.tls.close()


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    times: dict[str, list[float]] = {case: [] for case in CASES}
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
                config = _config(work, pki, idp, dovecot, port)
                proxy = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "proxy",
                        "--log-level",
                        "error",
                        "serve",
                        "-c",
                        str(config),
                    ],
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
                try:
                    wait_for_port(port, time.monotonic() + 30)
                    for _ in range(rounds):
                        for case, login in CASES.items():
                            # A new connection per attempt: three failures end one.
                            client = _Client(port, context)
                            try:
                                times[case].append(client.attempt(login))
                            finally:
                                client.close()
                finally:
                    proxy.terminate()
                    proxy.wait(30)
    reference = statistics.median(times["unknown user"])
    print(f"wrong-password refusals through serve, {rounds} rounds, interleaved")
    print(f"| {'case':<38} | {'median':>9} | {'quartiles':>17} | ratio |")
    print(f"|{'-' * 40}|{'-' * 11}|{'-' * 19}|-------|")
    for case, spent in times.items():
        q1, median, q3 = statistics.quantiles(spent, n=4)
        print(
            f"| {case:<38} | {median * 1e3:>6.0f} ms | {q1 * 1e3:>6.0f} - {q3 * 1e3:>4.0f} ms | "
            f"{median / reference:>5.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
