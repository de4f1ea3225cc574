"""The benchmarks' rig: one Dovecot, reached directly and through ``xoauth2-proxy serve``.

Theory of operation
-------------------

:class:`Rig` starts, on loopback and in a temporary directory: a test PKI, the emulated
Entra (the proxy's token comes from it once, then from the cache), an SMTP sink in its own
process (where Dovecot's submission service relays), Dovecot with IMAP, POP3 and
submission, and ``xoauth2-proxy serve`` in its own process with one listener per protocol,
TLS on both sides, as in production. A *direct* client logs in to Dovecot with SASL XOAUTH2
and the same token the proxy uses (as a modern client would); a *proxied* client logs in
to the proxy with a password, as a legacy program does.

Clients run in worker processes (:mod:`tests.bench.clients`), one per concurrent client,
so that the measuring process stays idle and every client has a core's worth of Python to
itself. A worker prepares (connects, for the bulk operations), then runs operations when
told, and reports each one's duration and its own CPU time.

CPU time is read from ``/proc/<pid>/stat`` (user + system): the proxy's process, and
Dovecot's whole process group (every live process plus what the master has collected from
children that have exited, since Dovecot forks a process per login) together with the SMTP
sink as the *upstream*. Comparisons alternate direct and proxied blocks, so that both see
the same load on a shared machine, and report medians.

Dovecot is configured as its documentation recommends for a busy server ("high-performance
mode"): login processes serve many connections (``service_count = 0``). Each keeps its own
TLS session cache and ticket keys, so a client can only resume a TLS session with the
process that issued it; with one login process per service (``process_limit = 1``) every
resumption succeeds. :data:`DOVECOT_TUNING` is that configuration, and the
``--dovecot-default`` option of the benchmarks measures Dovecot's defaults instead (a new
login process per connection, which can never resume).
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Self

import trustme

from proxy.identities import hash_password
from tests.support.certs import TestPki
from tests.support.dovecot import ONE_LOGIN_PROCESS, Dovecot
from tests.support.entra import EntraEmulator

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "DOVECOT_TUNING",
    "Cpu",
    "Endpoint",
    "Rig",
    "cpu_of_group",
    "cpu_of_process",
    "free_port",
    "wait_for_port",
]

CLIENT_ID: Final = "00000000-0000-4000-8000-0000000000bb"
SECRET: Final = "bench-secret"
USER: Final = "bench@contoso.com"
PASSWORD: Final = "bench-password"

#: Dovecot as its documentation recommends for many connections: login processes that
#: serve many clients, one per service so that TLS sessions resume (see the module notes),
#: and room for every benchmark's processes.
DOVECOT_TUNING: Final = (
    ONE_LOGIN_PROCESS
    + """
default_process_limit = 12000
default_client_limit = 20000
default_vsz_limit = 1G
service imap {
  process_limit = 12000
}
"""
)

_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[bytes]:
    line = Path(f"/proc/{pid}/stat").read_bytes()
    # "pid (comm) state ...": comm may hold spaces and parentheses.
    return line[line.rindex(b")") + 2 :].split()


def cpu_of_process(pid: int) -> float:
    """User + system CPU seconds of process ``pid``, all its threads (Linux)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def cpu_of_group(leader: int) -> float:
    """CPU seconds of process group ``leader``: its live members, plus what the leader
    has collected from children that exited (Dovecot forks a process per login)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry.name))
        except (OSError, ValueError):
            continue  # exited meanwhile
        if int(fields[2]) != leader:
            continue
        total += int(fields[11]) + int(fields[12])
        if int(entry.name) == leader:
            total += int(fields[13]) + int(fields[14])  # cutime, cstime
    return total / _CLK_TCK


@dataclass(frozen=True, slots=True)
class Cpu:
    """CPU seconds of the three parties: the clients, the proxy, the upstream."""

    client: float = 0.0
    proxy: float = 0.0
    upstream: float = 0.0

    def __add__(self, other: Cpu) -> Cpu:
        return Cpu(
            self.client + other.client, self.proxy + other.proxy, self.upstream + other.upstream
        )

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(
            self.client - other.client, self.proxy - other.proxy, self.upstream - other.upstream
        )

    def per(self, count: int) -> Cpu:
        return Cpu(self.client / count, self.proxy / count, self.upstream / count)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a client connects and how it logs in: ``direct`` with XOAUTH2 and the token,
    or through the proxy with the password. Passed to worker processes as JSON."""

    protocol: str  # imap, pop3, smtp
    port: int
    direct: bool
    user: str
    secret: str  # the token when direct, else the password
    ca_file: str

    def as_dict(self) -> dict[str, object]:
        return {
            "protocol": self.protocol,
            "port": self.port,
            "direct": self.direct,
            "user": self.user,
            "secret": self.secret,
            "ca_file": self.ca_file,
        }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_port(port: int, deadline: float) -> None:
    """Wait until something accepts on the port (the proxy this benchmark started)."""
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"the proxy did not start listening on port {port}")


class Rig:
    """Everything a benchmark needs, started on enter and stopped on exit.

    ``key_type`` is the listener certificate's key (``ecdsa``: P-256, or ``rsa``: 2048
    bits); ``limits`` are extra lines for the proxy's ``[limits]`` section;
    ``dovecot_config`` is appended to Dovecot's configuration (:data:`DOVECOT_TUNING` by
    default). ``messages`` are delivered to the mailbox before the proxy starts.
    """

    def __init__(
        self,
        *,
        key_type: str = "ecdsa",
        limits: str = "",
        dovecot_config: str = DOVECOT_TUNING,
        messages: tuple[bytes, ...] = (),
        proxy_args: tuple[str, ...] = (),
        log_level: str = "warning",
        python: tuple[str, ...] = (sys.executable,),
        start_timeout: float = 30.0,
        upstream_delay_ms: float = 0.0,
    ) -> None:
        self.key_type = key_type
        self.limits = limits
        self.dovecot_config = dovecot_config
        self.messages = messages
        self.proxy_args = proxy_args
        self.log_level = log_level
        #: How to start the proxy's Python (a profiler can be put in front).
        self.python = python
        self.start_timeout = start_timeout
        #: One-way delay in front of Dovecot (for direct clients and the proxy alike).
        self.upstream_delay_ms = upstream_delay_ms
        #: Dovecot's ports as clients and the proxy reach them (through the delay).
        self.upstream_ports: dict[str, int] = {}
        self._stack = contextlib.ExitStack()
        self.work = Path()
        self.pki: TestPki
        self.dovecot: Dovecot
        self.proxy: subprocess.Popen[bytes]
        self.sink: subprocess.Popen[str]
        self.token = ""
        self.ports: dict[str, int] = {}
        self.config = Path()

    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()

    def _start(self) -> None:
        stack = self._stack
        self.work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="xo2-bench-")))
        # Dovecot's mail processes (user mail) reach sockets and mail under it; its files
        # keep their own modes.
        self.work.chmod(0o711)
        self.pki = TestPki(self.work / "pki")
        idp = stack.enter_context(EntraEmulator(self.work / "idp"))
        idp.register_app(CLIENT_ID, secret=SECRET)
        self.sink = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.clients", "sink"],
            stdin=subprocess.PIPE,  # it runs until its input ends
            stdout=subprocess.PIPE,
            text=True,
        )
        stack.callback(self._stop, self.sink)
        assert self.sink.stdout is not None
        sink_port = int(self.sink.stdout.readline())
        self.dovecot = stack.enter_context(
            Dovecot(
                self.work / "dovecot",
                pki=self.pki,
                jwt_public_key_pem=idp.public_key_pem(),
                kid=idp.kid,
                issuer=idp.issuer,
                mailboxes=(USER,),
                smtp_relay=("127.0.0.1", sink_port),
                extra_config=self.dovecot_config,
            )
        )
        for message in self.messages:
            self.dovecot.deliver(USER, message)
        ports = self.dovecot.ports
        real = {"imap": ports.imaps, "pop3": ports.pop3s, "smtp": ports.submissions}
        for protocol, port in real.items():
            assert port is not None
            if not self.upstream_delay_ms:
                self.upstream_ports[protocol] = port
                continue
            delay = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.bench.latency",
                    str(self.upstream_delay_ms),
                    str(port),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            stack.callback(self._stop, delay)
            assert delay.stdout is not None
            self.upstream_ports[protocol] = int(delay.stdout.readline())
        self.ports = {name: free_port() for name in ("imap", "pop3", "smtp")}
        self.config = self._write_config(idp)
        token = subprocess.run(
            [sys.executable, "-m", "proxy", "token", "contoso", "-c", str(self.config)],
            capture_output=True,
            check=False,
            text=True,
        )
        if token.returncode:
            raise RuntimeError(f"no token: {token.stderr}")
        self.token = token.stdout.strip()
        self.proxy = subprocess.Popen(
            [
                *self.python,
                "-m",
                "proxy",
                "--log-level",
                self.log_level,
                "serve",
                "-c",
                str(self.config),
                *self.proxy_args,
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        stack.callback(self._stop, self.proxy)
        deadline = time.monotonic() + self.start_timeout
        for port in self.ports.values():
            wait_for_port(port, deadline)

    @staticmethod
    def _stop(process: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _certificate(self) -> Path:
        if self.key_type == "ecdsa":
            return self.pki.issue("proxy", "localhost", "127.0.0.1")
        if self.key_type == "rsa":
            return self.pki.issue("proxy", "localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
        raise ValueError(f"unknown key type {self.key_type!r}")

    def _write_config(self, idp: EntraEmulator) -> Path:
        (self.work / "secret").write_text(SECRET)
        (self.work / "secret").chmod(0o600)
        certificate = self._certificate()
        upstreams = self.upstream_ports
        listeners = "".join(
            f"""
[[listeners]]
protocol = "{protocol}"
listen = "127.0.0.1:{port}"
tls = "implicit"
certificate = {{ file = "{certificate}" }}
upstream = "127.0.0.1:{upstreams[protocol]}"
upstream_tls = "implicit"
upstream_ca_file = "{self.dovecot.ca_file}"
"""
            for protocol, port in self.ports.items()
        )
        config = self.work / "config.toml"
        config.write_text(f"""\
[apps.contoso]
provider = "microsoft"
tenant = "{idp.tenant}"
client_id = "{CLIENT_ID}"
client_secret = {{ file = "secret" }}
authority = "{idp.authority}"
ca_file = "{idp.ca_file}"
{listeners}
[limits]
max_connections = 19000
max_connections_per_network = 19000
max_early_upstreams = 19000
{self.limits}

[users."{USER}"]
password_hash = "{hash_password(PASSWORD)}"
app = "contoso"
""")
        config.chmod(0o600)
        return config

    # -- what benchmarks use --------------------------------------------------------------

    def endpoint(self, protocol: str, *, direct: bool) -> Endpoint:
        if direct:
            port = self.upstream_ports[protocol]
            return Endpoint(protocol, port, True, USER, self.token, str(self.pki.ca_file))
        return Endpoint(
            protocol, self.ports[protocol], False, USER, PASSWORD, str(self.pki.ca_file)
        )

    def cpu(self, client: float = 0.0) -> Cpu:
        """The proxy's and the upstream's CPU seconds so far (``client`` as given)."""
        upstream = cpu_of_group(self.dovecot.pid) + cpu_of_process(self.sink.pid)
        return Cpu(client, cpu_of_process(self.proxy.pid), upstream)

    def proxy_rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proxy.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS for the proxy")


def client_context(ca_file: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file)
