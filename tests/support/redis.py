"""A private Redis server for tests: ``redis-server`` (Debian package) on a free loopback port.

It keeps nothing on disk (no RDB snapshots, no AOF) and runs in its own temporary directory;
``close()`` (or leaving the ``with`` block) stops it. With ``tls`` it speaks only TLS
(Debian's redis-server is built with it), presenting the given certificate to clients, and
:attr:`RedisServer.url` is a ``rediss://`` URL.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from pathlib import Path
    from types import TracebackType

__all__ = ["RedisServer", "RedisTls", "redis_available"]


def redis_available() -> bool:
    return shutil.which("redis-server") is not None


@dataclass(frozen=True)
class RedisTls:
    """The server's key and certificate chain (PEM files), and the CA that issued them."""

    key_file: Path
    cert_file: Path
    ca_file: Path


class RedisServer:
    """``redis-server`` on 127.0.0.1, in ``directory``; TLS only if ``tls`` is given."""

    def __init__(
        self,
        directory: Path,
        *,
        tls: RedisTls | None = None,
        password: str | None = None,
        port: int = 0,
    ) -> None:
        self.directory = directory
        self.tls = tls
        #: The port to take (0: a free one), as a server restarted at the same address.
        self._wanted_port = port
        #: Clients must AUTH with it (``requirepass``), if set.
        self.password = password
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls is not None else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def __enter__(self) -> Self:
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # another process may take the port between probe and bind
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", self._wanted_port))
                self.port = probe.getsockname()[1]
            if self.tls is None:
                listen = ["--port", str(self.port)]
            else:
                listen = [
                    "--port", "0",
                    "--tls-port", str(self.port),
                    "--tls-cert-file", str(self.tls.cert_file),
                    "--tls-key-file", str(self.tls.key_file),
                    "--tls-ca-cert-file", str(self.tls.ca_file),
                    "--tls-auth-clients", "no",
                ]  # fmt: skip
            self._process = subprocess.Popen(
                [
                    "redis-server",
                    *listen,
                    "--bind", "127.0.0.1",
                    "--dir", str(self.directory),
                    "--save", "",
                    "--appendonly", "no",
                    "--daemonize", "no",
                    "--logfile", str(self.directory / "redis.log"),
                    *(["--requirepass", self.password] if self.password else []),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            if self._wait_ready():
                return self
            self.close()
        raise RuntimeError(f"redis-server did not start; see {self.directory / 'redis.log'}")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def command(self, *args: str) -> bytes:
        """Send one command (RESP), return the raw reply: enough for tests' bookkeeping."""
        parts: list[bytes] = []
        for command in ([("AUTH", self.password)] if self.password else []) + [args]:
            parts.append(f"*{len(command)}\r\n".encode())
            for arg in command:
                data = arg.encode()
                parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw:
            conn = raw
            if self.tls is not None:
                # Our own bookkeeping: trust the CA, whatever name the certificate has.
                context = ssl.create_default_context(cafile=str(self.tls.ca_file))
                context.check_hostname = False
                conn = context.wrap_socket(raw)
            with conn:
                conn.sendall(b"".join(parts))
                reply = conn.recv(65536)
                if self.password:  # the AUTH's +OK comes first
                    while b"\r\n" not in reply:
                        reply += conn.recv(65536)
                    reply = reply.split(b"\r\n", 1)[1] or conn.recv(65536)
                return reply

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                return False
            try:
                if self.command("PING").startswith(b"+PONG"):
                    return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def close(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
