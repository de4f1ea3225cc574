"""TLS straight on the kernel socket: a :class:`trio.abc.Stream` over a non-blocking
:class:`ssl.SSLSocket`, for the connections that relay mail.

Theory of operation
-------------------

:class:`trio.SSLStream` runs OpenSSL over memory BIOs on top of any trio stream. That is
general, but it costs a checkpoint and a Python-level round trip per TLS *record*: OpenSSL's
``SSL_read`` returns at most one record, and Dovecot writes records of about 4 KB, so
relaying a 10 MB message took some 2,500 ``receive_some`` calls, each followed by a
``send_all`` that encrypted those 4 KB into a record of their own with its own socket
call: three scheduler passes per record. The relay was bound by trio's scheduler, at a
third of the direct throughput (the target, in ARCHITECTURE.md, is 0.95).

:class:`TlsSocketStream` lets OpenSSL read and write the socket itself (its socket BIO) and
uses trio only to *wait*, with ``trio.lowlevel.wait_readable`` / ``wait_writable``, when
OpenSSL raises ``SSLWantReadError`` / ``SSLWantWriteError``. The unit of work changes:

* :meth:`TlsSocketStream.receive_some` decrypts every record that has already arrived, up
  to ``max_bytes``, and returns them in one piece: one checkpoint per burst, not per record;
* :meth:`TlsSocketStream.send_all` hands the whole buffer to ``SSL_write``, which writes
  full 16 KiB records without coming back to Python.

And because Python sets ``SSL_MODE_RELEASE_BUFFERS``, an idle connection holds no OpenSSL
buffers, whereas a memory BIO keeps its high-water mark (64 KiB after one bulk read) for
the life of the connection: about 20 KiB per idle connection end instead of up to 190 KiB.

Rules this module keeps, each as :class:`trio.SSLStream` (``https_compatible=False``):

* *The handshake is explicit*: :meth:`do_handshake`, whose deadline the caller owns;
  ``receive_some`` and ``send_all`` run it first if nobody did. OpenSSL checks the
  certificate and the host name (``server_hostname``) during the handshake.
* *One task may receive while another sends* (the relay does). trio lets only one task wait
  for each kind of readiness of a file descriptor, and either direction can need the other
  kind (a handshake step, a TLS 1.2 renegotiation, an alert), so a task that finds the slot
  taken parks until the waiter wakes, then retries its OpenSSL call.
* *Nothing decrypted is dropped*: a read that has collected data returns it and keeps the
  error it met (ragged EOF, reset) for the next call.
* *End of stream*: the peer's ``close_notify`` gives ``b""``, on every call from then on; a
  TCP EOF without it (a "ragged" EOF, maybe a truncation) and socket errors raise
  :exc:`trio.BrokenResourceError`, with the :mod:`ssl` or ``OSError`` as ``__cause__``.
* *Cancellation*: cancelling ``receive_some`` is always safe; cancelling ``send_all`` or the
  handshake part-way breaks the stream, since OpenSSL may hold a partly written record that
  only a retry with the same bytes could finish.
* *Checkpoints*: ``receive_some`` and ``send_all`` are checkpoints, as trio's streams
  promise. :meth:`TlsSocketStream.write_all` is ``send_all`` for the relay, which yields
  only when it has to wait for the socket: a loop that alternates receives and sends is
  kept fair by the receive's yield, and a second one after each send would cost a pass
  through trio's scheduler per message for nothing.
* :meth:`aclose` sends ``close_notify`` without waiting for the peer's, then closes the
  socket. It skips ``close_notify`` (the peer then sees a ragged EOF, as it should when data
  may be missing) if the stream is broken, if another task is sending, or if the call is
  cancelled before it could send (:func:`trio.aclose_forcefully`).

What :class:`trio.SSLStream` does that a socket BIO cannot:

* Run over any stream. :func:`wrap_tls` falls back to :class:`trio.SSLStream` for streams
  that are not sockets (the in-memory streams of driver tests).
* Hold back a TLS 1.3 server's session tickets until its first write (trio issue 819).
  OpenSSL writes them at the end of the handshake; mail clients read them with the
  greeting or the first reply, so nothing is lost.
* Answer any post-handshake message while one of its own writes is pending: a memory BIO
  never leaves a write half done. With a socket BIO, OpenSSL (3.0) waits for the pending
  write to finish before it answers a KeyUpdate or starts a renegotiation the server asked
  for (both checked by hand), and queues alerts the same way; but it answers a TLS 1.3
  request for a client certificate after the handshake at once, and fails with
  ``BAD_LENGTH``. Client contexts with ``post_handshake_auth`` are therefore refused.

STARTTLS: :meth:`TlsSocketStream.wrap` takes the socket out of a :class:`trio.SocketStream`,
which is an empty shell afterwards. The caller guarantees that nothing past the reply to
STARTTLS was read from it; the kernel's buffer is untouched, so the handshake starts
exactly where the plaintext ended.
"""

from __future__ import annotations

import enum
import socket
import ssl
from typing import TYPE_CHECKING, Final

import trio

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

__all__ = ["TlsSocketStream", "wrap_tls"]

#: ``receive_some()`` without ``max_bytes`` returns at most this much.
DEFAULT_RECEIVE_SIZE: Final = 65536


class _State(enum.Enum):
    OK = enum.auto()
    BROKEN = enum.auto()
    CLOSED = enum.auto()


class _Conflict:
    """Raise :exc:`trio.BusyResourceError` when two tasks use one direction at once."""

    __slots__ = ("_message", "busy")

    def __init__(self, message: str) -> None:
        self.busy = False
        self._message = message

    def __enter__(self) -> None:
        if self.busy:
            raise trio.BusyResourceError(self._message)
        self.busy = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.busy = False


class _Readiness:
    """One kind of readiness (readable or writable) of one socket, shared by tasks.

    trio allows a single waiter per kind per file descriptor. The first task to need it
    waits on the socket; the others park until that wait ends, then retry their own
    operation, which either succeeds or brings them back here.
    """

    __slots__ = ("_lot", "_sock", "_wait", "_waiting")

    def __init__(self, sock: socket.socket, *, writable: bool) -> None:
        self._sock = sock
        self._wait = trio.lowlevel.wait_writable if writable else trio.lowlevel.wait_readable
        #: Made when a second task first needs to wait (rare), not for every socket.
        self._lot: trio.lowlevel.ParkingLot | None = None
        self._waiting = False

    async def wait(self) -> None:
        if self._waiting:
            if self._lot is None:
                self._lot = trio.lowlevel.ParkingLot()
            await self._lot.park()
            return
        self._waiting = True
        try:
            await self._wait(self._sock)
        finally:
            self._waiting = False
            if self._lot is not None:
                self._lot.unpark_all()


class TlsSocketStream(trio.abc.Stream):
    """TLS over a connected socket, with OpenSSL doing the socket I/O.

    Build one with :meth:`wrap`, then call :meth:`do_handshake` under a deadline.

    .. warning:: Cancelling :meth:`send_all` or :meth:`do_handshake` part-way leaves the
       stream broken: later calls raise :exc:`trio.BrokenResourceError`. Cancelling
       :meth:`receive_some` is always safe.
    """

    def __init__(
        self,
        sock: ssl.SSLSocket,
        *,
        on_session: Callable[[ssl.SSLSession], None] | None = None,
    ) -> None:
        """Take ownership of ``sock``: connected, non-blocking, made by
        :meth:`ssl.SSLContext.wrap_socket` with ``do_handshake_on_connect=False`` and
        ``suppress_ragged_eofs=False``. :meth:`wrap` does all that.

        ``on_session`` (client side) is called once with the TLS session to resume later
        (see :meth:`wrap`)."""
        if sock.gettimeout() != 0.0:
            raise ValueError("the socket must be non-blocking")
        #: The underlying socket, for inspection (``version()``, ``getpeercert()``...).
        #: Reading or writing it directly corrupts the stream.
        self.socket: Final = sock
        self._state = _State.OK
        self._handshook = False
        #: A task is running the handshake; others wait in the lot (made only if needed).
        self._handshaking = False
        self._handshake_waiters: trio.lowlevel.ParkingLot | None = None
        self._readable = _Readiness(sock, writable=False)
        self._writable = _Readiness(sock, writable=True)
        self._receiving = _Conflict("another task is receiving on this TLS stream")
        self._sending = _Conflict("another task is sending on this TLS stream")
        #: An error met by a read that had already collected data; the next read raises it.
        self._deferred: trio.BrokenResourceError | None = None
        self._on_session = on_session
        #: ``on_session`` waits for the first data (see :meth:`_handshake_done`).
        self._session_after_read = False

    @classmethod
    def wrap(
        cls,
        stream: trio.SocketStream,
        context: ssl.SSLContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
        on_session: Callable[[ssl.SSLSession], None] | None = None,
    ) -> TlsSocketStream:
        """Take the socket out of ``stream`` and put TLS on it; no I/O happens yet.

        ``stream`` is an empty shell afterwards: close the returned stream instead (closing
        ``stream`` too is harmless). For STARTTLS the caller must not have read anything
        past the reply to the command. Raises :exc:`trio.BrokenResourceError` if the
        connection is already gone (the socket is then closed), and ``ValueError`` for a
        client ``context`` with ``post_handshake_auth`` (see the module's notes).

        Client side: ``session`` is a TLS session of ``context`` to offer for resumption
        (the server may refuse it; the handshake is then a full one, certificate checks
        included); ``on_session`` is called once with a session that a later connection
        to the same server can offer: right after the handshake for TLS 1.2, after the
        ticket has come (normally with the first data received) for TLS 1.3.
        """
        if context.post_handshake_auth and not server_side:
            raise ValueError(
                "post-handshake client authentication is not supported: a request for it "
                "while a write is pending breaks the connection"
            )
        trio_sock = stream.socket
        plain = socket.socket(
            trio_sock.family, trio_sock.type, trio_sock.proto, fileno=trio_sock.detach()
        )
        try:
            # A reset may already have come (a client that hangs up right after the reply
            # to STARTTLS). wrap_socket would notice too, but fail holding the socket and
            # leave it to the garbage collector; asking first keeps it ours to close.
            plain.getpeername()
            tls = context.wrap_socket(
                plain,
                server_side=server_side,
                server_hostname=server_hostname,
                do_handshake_on_connect=False,
                suppress_ragged_eofs=False,
                session=session,
            )
            tls.setblocking(False)
        except OSError as exc:
            plain.close()
            raise trio.BrokenResourceError(f"TLS: {exc}") from exc
        except BaseException:
            plain.close()
            raise
        return cls(tls, on_session=on_session)

    def __repr__(self) -> str:
        return f"<TlsSocketStream fd={self.socket.fileno()} {self._state.name.lower()}>"

    # -- state ----------------------------------------------------------------------------

    def _check_state(self) -> None:
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("the TLS stream is broken")
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("the TLS stream is closed")

    def _fail(self) -> None:
        """An operation failed part-way: the stream cannot be used again."""
        if self._state is _State.OK:
            self._state = _State.BROKEN

    def _translate(self, exc: OSError | ValueError) -> trio.BrokenResourceError:
        """The trio exception for an :mod:`ssl` or socket error; breaks the stream.

        ``ssl.SSLError`` (certificate and host name failures included) is an ``OSError``;
        the socket raises ``ValueError`` once closed.
        """
        if self._state is _State.CLOSED:  # closed by another task while we were waiting
            raise trio.ClosedResourceError("the TLS stream was closed") from exc
        self._fail()
        error = trio.BrokenResourceError(f"TLS: {exc}")
        error.__cause__ = exc
        return error

    # -- handshake ------------------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the TLS handshake if it has not run yet; the caller sets the deadline.

        Raises :exc:`trio.BrokenResourceError`, with the :mod:`ssl` error or ``OSError`` as
        its ``__cause__``, if it fails, including when the peer's certificate or host name
        does not verify.
        """
        self._check_state()
        if self._handshook:
            await trio.lowlevel.checkpoint()
            return
        if self._handshaking:
            # Another task runs it (say, a send while the relay's receive started it):
            # wait for its end, then share its outcome.
            if self._handshake_waiters is None:
                self._handshake_waiters = trio.lowlevel.ParkingLot()
            await self._handshake_waiters.park()
            self._check_state()
            return
        self._handshaking = True
        waited = False
        try:
            while True:
                # Wait outside the except clauses (see receive_some).
                try:
                    self.socket.do_handshake()
                except ssl.SSLWantReadError:
                    readiness = self._readable
                except ssl.SSLWantWriteError:
                    readiness = self._writable
                else:
                    break
                waited = True
                await readiness.wait()
        except (OSError, ValueError) as exc:
            raise self._translate(exc) from exc
        except BaseException:
            self._fail()
            raise
        finally:
            self._handshaking = False
            if self._handshake_waiters is not None:
                self._handshake_waiters.unpark_all()
                self._handshake_waiters = None
        self._handshook = True
        if self._on_session is not None:
            self._handshake_done()
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()

    @property
    def session_reused(self) -> bool:
        """Whether the handshake resumed an earlier TLS session."""
        return bool(self.socket.session_reused)

    def _handshake_done(self) -> None:
        """Serve ``on_session`` now (TLS 1.2), after the first read (TLS 1.3: the ticket
        comes in the server's first records after the handshake, before its data), or
        not at all after a resumption: the session just resumed stays good for the next
        connection, and Python copies a session (through its DER form, certificate
        included: about as much work as checking the certificate) every time one is read.
        """
        sock = self.socket
        if sock.session_reused:
            self._on_session = None
        elif sock.version() == "TLSv1.3":
            self._session_after_read = True
        else:
            self._deliver_session()

    def _deliver_session(self) -> None:
        self._session_after_read = False
        callback, self._on_session = self._on_session, None
        session = self.socket.session
        # Resumable once it has a ticket, or (TLS 1.2 without tickets) a session ID.
        if callback is not None and session is not None and (session.has_ticket or session.id):
            callback(session)

    # -- receiving ------------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return what has arrived (at least one byte), up to ``max_bytes``; ``b""`` once
        the peer has closed TLS cleanly, on this call and every later one.

        Raises :exc:`trio.BrokenResourceError` on a ragged EOF or a broken connection.
        """
        with self._receiving:
            if max_bytes is None:
                max_bytes = DEFAULT_RECEIVE_SIZE
            elif max_bytes < 1:
                raise ValueError("max_bytes must be at least 1")
            if self._deferred is not None:
                error, self._deferred = self._deferred, None
                await trio.lowlevel.checkpoint()
                raise error
            self._check_state()
            if not self._handshook:
                await self.do_handshake()
            await trio.lowlevel.checkpoint_if_cancelled()
            sock = self.socket
            chunks: list[bytes] = []
            wanted = max_bytes
            waited = False
            while wanted:
                # Wait outside the ``except`` clauses: an exception being handled stays
                # alive, with its traceback and frames, for as long as the wait lasts.
                try:
                    chunk = sock.recv(wanted)
                except ssl.SSLWantReadError:
                    readiness = self._readable
                except ssl.SSLWantWriteError:
                    readiness = self._writable
                except (OSError, ValueError) as exc:
                    error = self._translate(exc)
                    if not chunks:
                        raise error from exc
                    self._deferred = error
                    break
                else:
                    if not chunk:  # close_notify
                        break
                    chunks.append(chunk)
                    wanted -= len(chunk)
                    continue
                if chunks:
                    break
                waited = True
                await readiness.wait()
            if self._session_after_read and chunks:
                self._deliver_session()
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    # -- sending --------------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send all of ``data``; a checkpoint, as trio's streams promise.

        .. warning:: If this is cancelled, the stream is broken (as with
           :class:`trio.SSLStream`): OpenSSL may hold part of a record that only a retry
           with the same bytes could finish, and the caller cannot know what went out.
        """
        if not await self.write_all(data):
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def write_all(self, data: bytes | bytearray | memoryview) -> bool:
        """:meth:`send_all`, but a scheduling point only when it has to wait for the
        socket (always a cancellation point); returns whether it waited.

        For loops that alternate receives and sends (the relay): the receive's yield
        keeps them fair, and a second one after each send would cost a pass through
        trio's scheduler per message for nothing. Same warning as :meth:`send_all`.
        """
        with self._sending:
            self._check_state()
            if not self._handshook:
                await self.do_handshake()
            await trio.lowlevel.checkpoint_if_cancelled()
            sock = self.socket
            waited = False
            with memoryview(data) as view, view.cast("B") as remaining:
                try:
                    while remaining:
                        try:  # wait outside the except clauses (see receive_some)
                            sent = sock.send(remaining)
                        except ssl.SSLWantWriteError:
                            readiness = self._writable
                        except ssl.SSLWantReadError:
                            readiness = self._readable
                        else:
                            remaining = remaining[sent:]
                            continue
                        waited = True
                        await readiness.wait()
                except (OSError, ValueError) as exc:
                    raise self._translate(exc) from exc
                except BaseException:
                    self._fail()
                    raise
            return waited

    async def wait_send_all_might_not_block(self) -> None:
        with self._sending:
            self._check_state()
            await self._writable.wait()

    # -- closing --------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Send ``close_notify`` (without waiting for the peer's), then close the socket.

        The socket is closed without ``close_notify`` if the stream is broken, if the
        handshake never finished, if another task is sending, or if this call is
        cancelled before it could send (:func:`trio.aclose_forcefully`): the peer then sees
        a ragged EOF, as it should when the data may be incomplete.
        """
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        graceful = self._state is _State.OK and self._handshook and not self._sending.busy
        self._state = _State.CLOSED
        sock = self.socket
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if graceful:
                await self._send_close_notify()
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def _send_close_notify(self) -> None:
        sock = self.socket
        while True:
            try:
                sock.unwrap()  # SSL_shutdown: sends close_notify, then wants the peer's
            except ssl.SSLWantWriteError:
                await self._writable.wait()
                continue
            except (ssl.SSLWantReadError, OSError, ValueError):
                pass  # not waiting for the answer; or the peer is gone
            await trio.lowlevel.cancel_shielded_checkpoint()
            return


def wrap_tls(
    stream: trio.abc.Stream,
    context: ssl.SSLContext,
    *,
    server_side: bool = False,
    server_hostname: str | None = None,
    session: ssl.SSLSession | None = None,
    on_session: Callable[[ssl.SSLSession], None] | None = None,
) -> TlsSocketStream | trio.SSLStream[trio.abc.Stream]:
    """TLS over ``stream``, not yet handshaken: a :class:`TlsSocketStream` when ``stream``
    is a :class:`trio.SocketStream` (which it then owns), else a :class:`trio.SSLStream`
    (in-memory streams in tests), which neither resumes ``session`` nor reports one.

    Either way, close the returned stream, not ``stream``.
    """
    if isinstance(stream, trio.SocketStream):
        return TlsSocketStream.wrap(
            stream,
            context,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session,
            on_session=on_session,
        )
    return trio.SSLStream(stream, context, server_side=server_side, server_hostname=server_hostname)
