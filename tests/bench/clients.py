"""Benchmark clients, each in a worker process of its own; and the SMTP sink's process.

``python -m tests.bench.clients worker SPEC`` prepares the operation that the JSON ``SPEC``
names (see :class:`Spec`), prints ``ready``, then on each line of its standard input runs
operations and answers with one JSON line:

- ``run N``: N operations, one after the other;
- ``for S``: operations until S seconds have passed;
- ``quit``: exit.

The answer holds each operation's duration in seconds (``times``), the worker's CPU
seconds meanwhile (``cpu``) and the wall time of the whole run (``elapsed``).

The clients are lean on purpose: a few lines of Python per command, reading replies in
large chunks, so that the proxy's share of the time is not hidden behind the client's own
(a client library such as :mod:`imaplib` parses every line in Python, which makes any
server look relatively faster). ``imaplib-cycle`` is there to compare with one.

``python -m tests.bench.clients sink`` runs :class:`~tests.support.smtpsink.SmtpSink` (where
Dovecot's submission service relays) and prints its port.
"""

from __future__ import annotations

import base64
import imaplib
import json
import resource
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tests.support.smtpsink import SmtpSink

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Spec"]


@dataclass(frozen=True, slots=True)
class Spec:
    """What a worker does: ``op`` against the endpoint (see :class:`tests.bench.rig.Endpoint`).

    ``op`` is one of ``cycle`` (connect, TLS, login, SELECT, LOGOUT), ``imaplib-cycle``
    (the same with :mod:`imaplib`), ``fetch`` (FETCH of message 1, whole, over one session),
    ``retr`` (POP3 RETR of message 1, over one session) and ``smtp`` (a session: connect,
    TLS, login, then ``messages`` messages of ``size`` bytes, QUIT). ``resume``: offer the
    previous connection's TLS session (ticket) to the next.
    """

    op: str
    protocol: str
    port: int
    direct: bool
    user: str
    secret: str
    ca_file: str
    resume: bool = False
    messages: int = 100
    size: int = 4096
    expect: int = 0  # bytes the fetched message has, checked


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Conn:
    """One TLS connection with a buffered reader."""

    def __init__(self, spec: Spec, context: ssl.SSLContext, session: ssl.SSLSession | None) -> None:
        raw = socket.create_connection(("127.0.0.1", spec.port), timeout=60)
        self.tls = context.wrap_socket(raw, server_hostname="localhost", session=session)
        self._buffer = bytearray()

    def line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self._buffer[: end + 2])
        del self._buffer[: end + 2]
        return line

    def until(self, marker: bytes, *, start: bool = False) -> int:
        """Read up to and including ``marker`` (at the start of the input, or after a
        CRLF); return how many bytes that was."""
        pattern = marker if start else b"\r\n" + marker
        searched = 0
        while True:
            if start and self._buffer.startswith(marker):
                found = 0
            else:
                found = self._buffer.find(pattern, max(0, searched - len(pattern)))
                if found >= 0:
                    found += 0 if start else 2
            if found >= 0:
                end = self._buffer.find(b"\r\n", found) + 2
                if end >= 2:
                    del self._buffer[:end]
                    return end
            searched = len(self._buffer)
            self._fill()

    def _fill(self) -> None:
        chunk = self.tls.recv(1 << 20)
        if not chunk:
            raise ConnectionError("connection closed")
        self._buffer += chunk

    def send(self, data: bytes) -> None:
        self.tls.sendall(data)

    def reply(self, command: bytes, ok: bytes) -> bytes:
        self.send(command)
        line = self.line()
        if not line.startswith(ok):
            raise RuntimeError(f"{command[:20]!r}: unexpected reply {line!r}")
        return line

    def close(self) -> ssl.SSLSession | None:
        session = self.tls.session
        self.tls.close()
        return session


def _xoauth2(spec: Spec) -> bytes:
    raw = f"user={spec.user}\x01auth=Bearer {spec.secret}\x01\x01".encode()
    return base64.b64encode(raw)


class _Worker:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.context = ssl.create_default_context(cafile=spec.ca_file)
        self.session: ssl.SSLSession | None = None
        self.conn: _Conn | None = None
        self.imap: imaplib.IMAP4_SSL | None = None
        self.message = self._smtp_message(spec.size)
        operations: dict[str, Callable[[], None]] = {
            "cycle": self.cycle,
            "imaplib-cycle": self.imaplib_cycle,
            "fetch": self.fetch,
            "retr": self.retr,
            "smtp": self.smtp_session,
        }
        self.operation = operations[spec.op]
        if spec.op in ("fetch", "retr"):
            self.conn = self._login()
            if spec.op == "fetch":
                self.conn.reply(b"s SELECT INBOX\r\n", b"*")
                self.conn.until(b"s OK", start=True)
        self.operation()  # warm up: the first login, caches

    @staticmethod
    def _smtp_message(size: int) -> bytes:
        head = b"From: bench@contoso.com\r\nTo: bench@contoso.com\r\nSubject: bench\r\n\r\n"
        line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
        body = (line * (size // len(line) + 1))[: max(0, size - len(head) - 2)]
        return head + body.rstrip(b"\r\n") + b"\r\n"

    def _connect(self) -> _Conn:
        return _Conn(self.spec, self.context, self.session if self.spec.resume else None)

    def _done(self, conn: _Conn) -> None:
        session = conn.close()
        if self.spec.resume:
            self.session = session

    def _login(self) -> _Conn:
        spec = self.spec
        conn = self._connect()
        conn.line()  # greeting
        if spec.protocol == "imap":
            if spec.direct:
                conn.reply(b"a AUTHENTICATE XOAUTH2 " + _xoauth2(spec) + b"\r\n", b"a OK")
            else:
                conn.reply(f'a LOGIN "{spec.user}" "{spec.secret}"\r\n'.encode(), b"a OK")
        elif spec.protocol == "pop3":
            if spec.direct:
                conn.reply(b"AUTH XOAUTH2\r\n", b"+")
                conn.reply(_xoauth2(spec) + b"\r\n", b"+OK")
            else:
                conn.reply(f"USER {spec.user}\r\n".encode(), b"+OK")
                conn.reply(f"PASS {spec.secret}\r\n".encode(), b"+OK")
        else:
            conn.send(b"EHLO bench.test\r\n")
            conn.until(b"250 ", start=True)
            if spec.direct:  # Dovecot refuses a token on the AUTH line (see DESIGN notes)
                conn.reply(b"AUTH XOAUTH2\r\n", b"334")
                conn.reply(_xoauth2(spec) + b"\r\n", b"235")
            else:
                plain = base64.b64encode(f"\0{spec.user}\0{spec.secret}".encode())
                conn.reply(b"AUTH PLAIN " + plain + b"\r\n", b"235")
        return conn

    # -- operations -----------------------------------------------------------------------

    def cycle(self) -> None:
        conn = self._login()
        conn.send(b"s SELECT INBOX\r\n")
        conn.until(b"s OK", start=True)
        conn.send(b"z LOGOUT\r\n")
        conn.until(b"z OK", start=True)
        self._done(conn)

    def imaplib_cycle(self) -> None:
        spec = self.spec
        imap = imaplib.IMAP4_SSL("localhost", spec.port, ssl_context=self.context)
        if spec.direct:
            imap.authenticate("XOAUTH2", lambda _: base64.b64decode(_xoauth2(spec)))
        else:
            imap.login(spec.user, spec.secret)
        imap.select("INBOX")
        imap.logout()

    def fetch(self) -> None:
        conn = self.conn
        assert conn is not None
        conn.send(b"f FETCH 1 BODY.PEEK[]\r\n")
        size = conn.until(b"f OK", start=True)
        if size < self.spec.expect:
            raise RuntimeError(f"FETCH gave {size} bytes, expected {self.spec.expect}")

    def retr(self) -> None:
        conn = self.conn
        assert conn is not None
        conn.send(b"RETR 1\r\n")
        size = conn.until(b".\r\n")
        if size < self.spec.expect:
            raise RuntimeError(f"RETR gave {size} bytes, expected {self.spec.expect}")

    def smtp_session(self) -> None:
        conn = self._login()
        data = self.message + b".\r\n"
        for _ in range(self.spec.messages):
            conn.reply(f"MAIL FROM:<{self.spec.user}>\r\n".encode(), b"250")
            conn.reply(f"RCPT TO:<{self.spec.user}>\r\n".encode(), b"250")
            conn.reply(b"DATA\r\n", b"354")
            conn.reply(data, b"250")
        conn.reply(b"QUIT\r\n", b"221")
        self._done(conn)

    # -- the protocol with the parent -----------------------------------------------------

    def serve(self) -> None:
        print("ready", flush=True)
        for command in sys.stdin:
            verb, _, argument = command.strip().partition(" ")
            if verb == "quit":
                return
            times: list[float] = []
            cpu = _cpu()
            started = time.perf_counter()
            if verb == "run":
                for _ in range(int(argument)):
                    begin = time.perf_counter()
                    self.operation()
                    times.append(time.perf_counter() - begin)
            elif verb == "for":
                until = started + float(argument)
                while (begin := time.perf_counter()) < until:
                    self.operation()
                    times.append(time.perf_counter() - begin)
            else:
                raise ValueError(f"unknown command {command!r}")
            elapsed = time.perf_counter() - started
            result = {"times": times, "cpu": _cpu() - cpu, "elapsed": elapsed}
            print(json.dumps(result), flush=True)


def main() -> int:
    if sys.argv[1] == "sink":
        with SmtpSink() as sink:
            print(sink.address[1], flush=True)
            sys.stdin.read()  # until the parent closes our input or ends us
        return 0
    if sys.argv[1] == "worker":
        _Worker(Spec(**json.loads(sys.argv[2]))).serve()
        return 0
    raise SystemExit(f"usage: {sys.argv[0]} sink | worker SPEC")


if __name__ == "__main__":
    sys.exit(main())
