"""A minimal SMTP server that records what it is sent: the relay target of the test Dovecot.

Theory of operation: one listening socket on 127.0.0.1, one thread accepting, one thread per
connection. Each connection runs the RFC 5321 state machine that a relay client needs: greeting,
EHLO/HELO, MAIL, RCPT, DATA (with dot-unstuffing, section 4.5.2), RSET, NOOP, QUIT, with the
reply codes of sections 4.2 and 4.3.2 and the RFC 3463 enhanced status codes. It offers no
STARTTLS and no AUTH: Dovecot relays to it in plaintext on loopback. Every accepted message is
recorded byte-exact, as the bytes between the ``354`` reply and the terminating ``.`` line with
dot-stuffing removed (so it ends with the CRLF of its last line).

It is a test fixture, not a mail server: it keeps messages in memory, accepts every address,
and does no queueing. Blocking calls (:meth:`SmtpSink.wait_for`) are for synchronous tests; from
trio, call them through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import TYPE_CHECKING, NamedTuple, Self

if TYPE_CHECKING:
    from io import BufferedReader
    from types import TracebackType

__all__ = ["SmtpMessage", "SmtpSink"]

_MAX_COMMAND_LINE = 2048  # RFC 5321 4.5.3.1.4 says 512; be generous with parameters.
_MAX_TEXT_LINE = 1 << 16  # longer than RFC 5321's 1000, so tests can probe long lines.
_MAX_MESSAGE = 64 << 20
_IDLE_TIMEOUT = 60.0

# Replies, named like aiosmtpd's status codes.
_R_READY = b"220 %s ESMTP SmtpSink ready\r\n"
_R_BYE = b"221 2.0.0 Bye\r\n"
_R_OK = b"250 2.0.0 OK\r\n"
_R_SENDER_OK = b"250 2.1.0 Sender OK\r\n"
_R_RCPT_OK = b"250 2.1.5 Recipient OK\r\n"
_R_QUEUED = b"250 2.0.0 OK queued as %d\r\n"
_R_CANNOT_VRFY = b"252 2.1.5 Cannot VRFY user, but will accept message\r\n"
_R_START_DATA = b"354 End data with <CR><LF>.<CR><LF>\r\n"
_R_TIMEOUT = b"421 4.4.2 Idle timeout, closing connection\r\n"
_R_UNRECOGNIZED = b"500 5.5.2 Command unrecognized\r\n"
_R_LINE_TOO_LONG = b"500 5.5.2 Line too long\r\n"
_R_SYNTAX = b"501 5.5.4 Syntax error in parameters or arguments\r\n"
_R_NEED_HELO = b"503 5.5.1 Send HELO or EHLO first\r\n"
_R_NESTED_MAIL = b"503 5.5.1 Sender already specified\r\n"
_R_NEED_MAIL = b"503 5.5.1 Need MAIL command first\r\n"
_R_NEED_RCPT = b"503 5.5.1 Need RCPT command first\r\n"
_R_TOO_BIG = b"552 5.3.4 Message too big\r\n"

_EHLO_KEYWORDS = (b"8BITMIME", b"ENHANCEDSTATUSCODES", b"PIPELINING", b"SMTPUTF8")


class SmtpMessage(NamedTuple):
    """One accepted message: envelope sender, envelope recipients, and the data, byte-exact."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes


class _LineTooLongError(Exception):
    pass


class SmtpSink:
    """An SMTP server on a free loopback port that records every message it accepts.

    Use it as a context manager; :attr:`address` is ``(host, port)`` once started.
    """

    def __init__(self, *, host: str = "127.0.0.1", hostname: str = "sink.test") -> None:
        self.hostname = hostname
        self._host = host
        self._listener: socket.socket | None = None
        self._address: tuple[str, int] | None = None
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._messages: list[SmtpMessage] = []
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._closing = False

    def __repr__(self) -> str:
        where = self._address or "not started"
        return f"<SmtpSink {where} messages={len(self._messages)}>"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Bind a free port on the loopback address and start accepting connections."""
        if self._listener is not None:
            raise RuntimeError("SmtpSink already started")
        listener = socket.create_server((self._host, 0))
        self._listener = listener
        host, port = listener.getsockname()[:2]
        self._address = (str(host), int(port))
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"smtpsink-accept-{self.address[1]}", daemon=True
        )
        self._accept_thread.start()

    def close(self) -> None:
        """Stop accepting, close every open connection, and wait for the threads to end."""
        with self._lock:
            if self._closing or self._listener is None:
                return
            self._closing = True
            listener = self._listener
            connections = dict(self._connections)
        # shutdown() wakes the thread blocked in accept(); close() alone may not.
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        for conn, thread in connections.items():
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- what tests read -------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the sink listens on."""
        if self._address is None:
            raise RuntimeError("SmtpSink not started")
        return self._address

    @property
    def messages(self) -> list[SmtpMessage]:
        """A snapshot of the messages accepted so far, oldest first."""
        with self._lock:
            return list(self._messages)

    def wait_for(self, n: int, timeout: float = 5.0) -> list[SmtpMessage]:
        """Block until at least ``n`` messages have arrived; return all of them.

        Raises :class:`TimeoutError` if fewer than ``n`` arrive within ``timeout`` seconds.
        """
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self._messages) >= n, timeout):
                raise TimeoutError(
                    f"SmtpSink received {len(self._messages)} message(s), expected {n}, "
                    f"within {timeout} s"
                )
            return list(self._messages)

    def clear(self) -> None:
        """Forget the messages received so far."""
        with self._lock:
            self._messages.clear()

    # -- server ----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closing:
                    conn.close()
                    return
                thread = threading.Thread(
                    target=self._serve, args=(conn,), name="smtpsink-conn", daemon=True
                )
                self._connections[conn] = thread
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(_IDLE_TIMEOUT)
            with conn, conn.makefile("rb") as reader:
                _Session(self, conn, reader).run()
        except OSError:
            pass  # peer went away, or close() shut the socket down
        finally:
            with self._lock:
                self._connections.pop(conn, None)

    def _record(self, message: SmtpMessage) -> int:
        with self._arrived:
            self._messages.append(message)
            self._arrived.notify_all()
            return len(self._messages)


class _Session:
    """The per-connection state: greeted, and the transaction being built."""

    def __init__(self, sink: SmtpSink, conn: socket.socket, reader: BufferedReader) -> None:
        self.sink = sink
        self.conn = conn
        self.reader = reader
        self.greeted = False
        self.mail_from: str | None = None
        self.rcpt_tos: list[str] = []

    def send(self, reply: bytes) -> None:
        self.conn.sendall(reply)

    def readline(self, limit: int) -> bytes:
        line = self.reader.readline(limit + 1)
        if len(line) > limit:
            # Discard the rest of the over-long line before answering.
            while line and not line.endswith(b"\n"):
                line = self.reader.readline(limit)
            raise _LineTooLongError
        return line

    def reset(self) -> None:
        self.mail_from = None
        self.rcpt_tos = []

    def run(self) -> None:
        self.send(_R_READY % self.sink.hostname.encode())
        while True:
            try:
                line = self.readline(_MAX_COMMAND_LINE)
            except _LineTooLongError:
                self.send(_R_LINE_TOO_LONG)
                continue
            except TimeoutError:
                self.send(_R_TIMEOUT)
                return
            if not line:
                return
            verb, _, arg = line.rstrip(b"\r\n").partition(b" ")
            if not self.dispatch(verb.upper(), arg.strip()):
                return

    def dispatch(self, verb: bytes, arg: bytes) -> bool:
        """Handle one command; return False when the connection should close."""
        match verb:
            case b"EHLO" | b"HELO":
                if not arg:
                    self.send(_R_SYNTAX)
                    return True
                self.reset()
                self.greeted = True
                name = self.sink.hostname.encode()
                if verb == b"HELO":
                    self.send(b"250 " + name + b"\r\n")
                else:
                    lines = [name, *_EHLO_KEYWORDS]
                    body = b"".join(b"250-" + kw + b"\r\n" for kw in lines[:-1])
                    self.send(body + b"250 " + lines[-1] + b"\r\n")
            case b"MAIL":
                self.mail(arg)
            case b"RCPT":
                self.rcpt(arg)
            case b"DATA":
                self.data(arg)
            case b"RSET":
                self.reset()
                self.send(_R_OK)
            case b"NOOP":
                self.send(_R_OK)
            case b"VRFY":
                self.send(_R_CANNOT_VRFY)
            case b"QUIT":
                self.send(_R_BYE)
                return False
            case _:
                self.send(_R_UNRECOGNIZED)
        return True

    def mail(self, arg: bytes) -> None:
        if not self.greeted:
            self.send(_R_NEED_HELO)
        elif self.mail_from is not None:
            self.send(_R_NESTED_MAIL)
        elif (path := _path_argument(arg, b"FROM:")) is None:
            self.send(_R_SYNTAX)
        else:
            self.mail_from = path
            self.send(_R_SENDER_OK)

    def rcpt(self, arg: bytes) -> None:
        if self.mail_from is None:
            self.send(_R_NEED_MAIL)
        elif not (path := _path_argument(arg, b"TO:")):
            self.send(_R_SYNTAX)
        else:
            self.rcpt_tos.append(path)
            self.send(_R_RCPT_OK)

    def data(self, arg: bytes) -> None:
        if arg:
            self.send(_R_SYNTAX)
            return
        if self.mail_from is None or not self.rcpt_tos:
            self.send(_R_NEED_RCPT if self.mail_from is not None else _R_NEED_MAIL)
            return
        self.send(_R_START_DATA)
        chunks: list[bytes] = []
        size = 0
        too_big = False
        while True:
            try:
                line = self.readline(_MAX_TEXT_LINE)
            except _LineTooLongError:
                too_big = True
                continue
            if not line:
                raise ConnectionResetError("connection closed during DATA")
            if line == b".\r\n":
                break
            if line.startswith(b"."):
                line = line[1:]  # RFC 5321 4.5.2: remove one leading dot
            size += len(line)
            if size > _MAX_MESSAGE:
                too_big = True
            if not too_big:
                chunks.append(line)
        if too_big:
            self.send(_R_TOO_BIG)
        else:
            assert self.mail_from is not None
            message = SmtpMessage(self.mail_from, tuple(self.rcpt_tos), b"".join(chunks))
            number = self.sink._record(message)
            self.send(_R_QUEUED % number)
        self.reset()


def _path_argument(arg: bytes, keyword: bytes) -> str | None:
    """Parse ``FROM:<path> [params]`` or ``TO:<path> [params]``; return the path or None.

    Parameters (SIZE=, BODY=8BITMIME, SMTPUTF8) are accepted and ignored.
    """
    if arg[: len(keyword)].upper() != keyword:
        return None
    rest = arg[len(keyword) :].lstrip(b" ")
    if not rest.startswith(b"<") or b">" not in rest:
        return None
    path, _, _params = rest[1:].partition(b">")
    try:
        return path.decode("utf-8")
    except UnicodeDecodeError:
        return None
