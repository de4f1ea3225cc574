"""Client-side helpers shared by the end-to-end tests (blocking code, run in threads)."""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest
import trio

from tests.e2e.conftest import MAILBOX, Listener

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.support.certs import TestPki
    from tests.support.dovecot import Dovecot

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]


async def in_thread(fn: Callable[[], T]) -> T:
    """Run a blocking client in a worker thread while the proxy serves in this trio loop."""
    with trio.fail_after(60):
        return await trio.to_thread.run_sync(fn)


def tls_context(pki: TestPki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca_file))


def message(size: int, subject: str = "report") -> bytes:
    """A message of about ``size`` bytes with CRLF line endings and a unique subject."""
    header = (
        f"From: erp@contoso.com\r\nTo: {MAILBOX}\r\nSubject: {subject}\r\n"
        "Message-ID: <" + subject + "@test>\r\n\r\n"
    ).encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!#$%&'()*+,-./:;<=>?\r\n"
    body = (line * (size // len(line) + 1))[:size]
    return header + body.rstrip(b"\r\n") + b"\r\n"


def raw_session(
    pki: TestPki, port: int, script: bytes, until: bytes, *, use_tls: bool = True
) -> bytes:
    """Read the greeting, send ``script``, read until ``until`` is seen or the peer closes;
    return everything received (greeting included).

    The whole script fits in the socket's send buffer, so that sending it never waits for
    the proxy to read: a proxy that refuses it and closes before reading it all (and so
    resets the connection) must not fail the send, only show in what comes back.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * len(script) + 65536)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", port))
        conn: socket.socket = (
            tls_context(pki).wrap_socket(sock, server_hostname="localhost") if use_tls else sock
        )
        with conn:
            received = b""
            while b"\r\n" not in received:
                chunk = conn.recv(65536)
                if not chunk:
                    return received
                received += chunk
            conn.sendall(script)
            while until not in received:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                received += chunk
            return received


def run(
    command: list[str], *, home: Path, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    """Run a command-line client as a user would (own HOME, C locale); a failure fails the
    test with the client's output."""
    done = subprocess.run(
        command,
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
        env={"PATH": os.environ["PATH"], "HOME": str(home), "LC_ALL": "C"},
    )
    if done.returncode != 0:
        pytest.fail(
            f"{command[0]} exited {done.returncode}\n--- stdout\n"
            f"{done.stdout.decode(errors='replace')}\n--- stderr\n"
            f"{done.stderr.decode(errors='replace')}"
        )
    return done


def private_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def starttls_listener(dovecot: Dovecot) -> Listener:
    """SMTP submission, port 587 style on both sides."""
    assert dovecot.ports.submission is not None
    return Listener(
        protocol="smtp",
        tls="starttls",
        upstream_port=dovecot.ports.submission,
        upstream_tls="starttls",
    )


def msmtp_send(pki: TestPki, port: int, home: Path, *, auth: str, secret: str, body: bytes) -> None:
    """Send ``body`` as MAILBOX with msmtp over STARTTLS, as a job on a legacy host does:
    ``auth`` is msmtp's mechanism, ``secret`` what its passwordeval prints."""
    config = private_file(
        home / "msmtprc",
        "account proxy\n"
        "host localhost\n"
        f"port {port}\n"
        "tls on\n"
        "tls_starttls on\n"
        f"tls_trust_file {pki.ca_file}\n"
        f"auth {auth}\n"
        f"user {MAILBOX}\n"
        f"passwordeval printf '%s' '{secret}'\n"
        f"from {MAILBOX}\n",
    )
    run(["msmtp", "-C", str(config), "-a", "proxy", "someone@example.com"], home=home, stdin=body)


class ServeProcess:
    """``xoauth2-proxy serve`` as a process of the code under test, logging to ``log``."""

    def __init__(
        self,
        config: Path,
        log: Path,
        *,
        grace: float = 2,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.log = log
        self._log_file = log.open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxy",
                "serve",
                "-c",
                str(config),
                "--grace",
                str(grace),
                *args,
            ],
            cwd=ROOT,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, what: Callable[[], bool], description: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            if self.process.poll() is not None:
                pytest.fail(f"serve exited ({self.process.returncode}):\n{self.text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {description}:\n{self.text()}")
            time.sleep(0.05)

    def port(self) -> int:
        self.wait_for(lambda: "listening on" in self.text(), "the listener")
        found = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.text())
        assert found is not None
        return int(found.group(1))

    def ports(self, count: int) -> list[int]:
        """The first ``count`` listeners' ports, in the order they were logged."""
        self.wait_for(
            lambda: len(re.findall(r"listening on 127\.0\.0\.1:\d+", self.text())) >= count,
            f"{count} listeners",
        )
        return [int(p) for p in re.findall(r"listening on 127\.0\.0\.1:(\d+)", self.text())]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log_file.close()
