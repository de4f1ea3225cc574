"""TlsSocketStream: real TLS over loopback TCP, against itself and against trio.SSLStream."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import struct
from typing import TYPE_CHECKING, Protocol

import pytest
import trio
import trio.testing
from cryptography import x509

from proxy.net.relay import relay
from proxy.net.tls import describe_tls_error
from proxy.net.tlssocket import TlsSocketStream, wrap_tls
from tests.support.certs import TestPki

if TYPE_CHECKING:
    from pathlib import Path

#: Either implementation, over a TCP socket.
Tls = TlsSocketStream | trio.SSLStream[trio.SocketStream]


class Wrap(Protocol):
    def __call__(
        self,
        stream: trio.SocketStream,
        context: ssl.SSLContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
    ) -> Tls: ...


MiB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server_cert(pki: TestPki) -> Path:
    return pki.issue("server", "localhost", "127.0.0.1")


def server_context(cert: Path, *, tls12: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert)
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def client_context(pki: TestPki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca_file))


@pytest.fixture
def server_ctx(server_cert: Path) -> ssl.SSLContext:
    return server_context(server_cert)


@pytest.fixture
def client_ctx(pki: TestPki) -> ssl.SSLContext:
    return client_context(pki)


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected (client, server) pair of plain TCP streams on loopback."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        port = listeners[0].socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listeners[0].accept()
    finally:
        for listener in listeners:
            await listener.aclose()
    return client, server


def ours(
    stream: trio.SocketStream,
    context: ssl.SSLContext,
    *,
    server_side: bool = False,
    server_hostname: str | None = None,
) -> Tls:
    return TlsSocketStream.wrap(
        stream, context, server_side=server_side, server_hostname=server_hostname
    )


def trios(
    stream: trio.SocketStream,
    context: ssl.SSLContext,
    *,
    server_side: bool = False,
    server_hostname: str | None = None,
) -> Tls:
    return trio.SSLStream(stream, context, server_side=server_side, server_hostname=server_hostname)


async def handshake(*streams: Tls | trio.SSLStream[trio.abc.Stream]) -> None:
    async with trio.open_nursery() as nursery:
        for stream in streams:
            nursery.start_soon(stream.do_handshake)


async def tls_pair(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    *,
    client: Wrap = ours,
    server: Wrap = ours,
) -> tuple[Tls, Tls]:
    """(client, server), handshaken, over loopback TCP."""
    client_tcp, server_tcp = await tcp_pair()
    c = client(client_tcp, client_ctx, server_hostname="localhost")
    s = server(server_tcp, server_ctx, server_side=True)
    with trio.fail_after(5):
        await handshake(c, s)
    return c, s


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise AssertionError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


async def receive_until_eof(stream: trio.abc.ReceiveStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data += chunk
    return bytes(data)


def close_without_close_notify(stream: trio.abc.Stream) -> None:
    """Close the TCP connection under a TLS stream, the way a crashed peer would."""
    assert isinstance(stream, TlsSocketStream)
    stream.socket.close()


# -- handshakes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "server"),
    [(ours, ours), (ours, trios), (trios, ours)],
    ids=["both-ours", "ours-client", "ours-server"],
)
@pytest.mark.parametrize("tls12", [False, True], ids=["tls13", "tls12"])
async def test_handshake_and_exchange(
    pki: TestPki, server_cert: Path, client: Wrap, server: Wrap, tls12: bool
) -> None:
    c, s = await tls_pair(
        server_context(server_cert, tls12=tls12), client_context(pki), client=client, server=server
    )
    ours_side = c if isinstance(c, TlsSocketStream) else s
    assert isinstance(ours_side, TlsSocketStream)
    assert ours_side.socket.version() == ("TLSv1.2" if tls12 else "TLSv1.3")
    if isinstance(c, TlsSocketStream):
        cert = c.socket.getpeercert()
        assert cert is not None
        assert ("DNS", "localhost") in cert["subjectAltName"]
    await c.send_all(b"a1 CAPABILITY\r\n")
    assert await receive_exactly(s, 15) == b"a1 CAPABILITY\r\n"
    await s.send_all(b"* CAPABILITY IMAP4rev1\r\n")
    assert await receive_exactly(c, 24) == b"* CAPABILITY IMAP4rev1\r\n"
    await c.aclose()
    assert await s.receive_some(10) == b""
    await s.aclose()


async def test_implicit_handshake_on_first_use(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    client_tcp, server_tcp = await tcp_pair()
    c = TlsSocketStream.wrap(client_tcp, client_ctx, server_hostname="localhost")
    s = TlsSocketStream.wrap(server_tcp, server_ctx, server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(c.send_all, b"hello")
        assert await receive_exactly(s, 5) == b"hello"
    # A second explicit handshake is a no-op.
    await c.do_handshake()
    await s.do_handshake()
    await c.aclose()
    await s.aclose()


async def refused_handshake(c: Tls, s: Tls) -> trio.BrokenResourceError:
    """Handshake ``c`` with ``s``, both expected to fail; return the client's error."""

    async def server() -> None:
        with pytest.raises(trio.BrokenResourceError):
            await s.do_handshake()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            with pytest.raises(trio.BrokenResourceError) as caught:
                await c.do_handshake()
    return caught.value


async def test_host_name_mismatch_is_refused(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    client_tcp, server_tcp = await tcp_pair()
    c = TlsSocketStream.wrap(client_tcp, client_ctx, server_hostname="imap.example.org")
    s = TlsSocketStream.wrap(server_tcp, server_ctx, server_side=True)
    error = await refused_handshake(c, s)
    assert isinstance(error.__cause__, ssl.SSLCertVerificationError)
    assert describe_tls_error(error).startswith("certificate verification failed")
    assert "Hostname mismatch" in describe_tls_error(error)
    with pytest.raises(trio.BrokenResourceError):
        await c.send_all(b"x")
    await c.aclose()
    await s.aclose()


async def test_untrusted_certificate_is_refused(tmp_path: Path, server_ctx: ssl.SSLContext) -> None:
    stranger = TestPki(tmp_path / "other")
    client_tcp, server_tcp = await tcp_pair()
    c = TlsSocketStream.wrap(client_tcp, client_context(stranger), server_hostname="localhost")
    s = TlsSocketStream.wrap(server_tcp, server_ctx, server_side=True)
    error = await refused_handshake(c, s)
    assert isinstance(error.__cause__, ssl.SSLCertVerificationError)
    await c.aclose()
    await s.aclose()


async def test_check_hostname_requires_server_hostname(client_ctx: ssl.SSLContext) -> None:
    client_tcp, server_tcp = await tcp_pair()
    with pytest.raises(ValueError, match="server_hostname"):
        TlsSocketStream.wrap(client_tcp, client_ctx)
    await client_tcp.aclose()  # wrap closed the socket it took; this is harmless
    await server_tcp.aclose()


async def test_post_handshake_auth_is_refused(pki: TestPki) -> None:
    context = client_context(pki)
    context.post_handshake_auth = True
    client_tcp, server_tcp = await tcp_pair()
    with pytest.raises(ValueError, match="post-handshake"):
        TlsSocketStream.wrap(client_tcp, context, server_hostname="localhost")
    await client_tcp.aclose()
    await server_tcp.aclose()


async def test_handshake_deadline(server_ctx: ssl.SSLContext) -> None:
    """A peer that never speaks TLS: the caller's deadline ends the handshake, and the
    stream is broken afterwards."""
    client_tcp, server_tcp = await tcp_pair()
    s = TlsSocketStream.wrap(server_tcp, server_ctx, server_side=True)
    with pytest.raises(trio.TooSlowError):
        with trio.fail_after(0.2):
            await s.do_handshake()
    with pytest.raises(trio.BrokenResourceError):
        await s.receive_some(10)
    with pytest.raises(trio.BrokenResourceError):
        await s.send_all(b"x")
    with trio.fail_after(1):
        await s.aclose()
    assert await client_tcp.receive_some(10) == b""  # closed, no close_notify
    await client_tcp.aclose()


async def test_handshake_with_a_plaintext_peer_fails(server_ctx: ssl.SSLContext) -> None:
    client_tcp, server_tcp = await tcp_pair()
    s = TlsSocketStream.wrap(server_tcp, server_ctx, server_side=True)
    await client_tcp.send_all(b"a1 LOGIN user password\r\n")
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError) as caught:
        await s.do_handshake()
    assert isinstance(caught.value.__cause__, ssl.SSLError)
    await s.aclose()
    await client_tcp.aclose()


async def test_peer_closes_during_handshake(client_ctx: ssl.SSLContext) -> None:
    client_tcp, server_tcp = await tcp_pair()
    c = TlsSocketStream.wrap(client_tcp, client_ctx, server_hostname="localhost")
    await server_tcp.aclose()
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
        await c.do_handshake()
    await c.aclose()


async def test_wrap_after_a_reset_is_a_broken_stream(server_ctx: ssl.SSLContext) -> None:
    """A client that resets the connection right after STARTTLS's reply: the wrap itself
    fails (the ssl module asks the socket for its peer), as a broken stream, and the
    socket is closed, not leaked."""
    client_tcp, server_tcp = await tcp_pair()
    client_tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await client_tcp.aclose()  # RST
    await trio.sleep(0.05)
    fileno = server_tcp.socket.fileno()
    with pytest.raises(trio.BrokenResourceError):
        TlsSocketStream.wrap(server_tcp, server_ctx, server_side=True)
    with pytest.raises(OSError):  # noqa: PT011 - EBADF is the point: nothing holds it open
        os.fstat(fileno)


# -- STARTTLS -------------------------------------------------------------------------------


@pytest.mark.parametrize("server_waits", [False, True], ids=["prompt", "late-server"])
async def test_starttls_upgrade(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_waits: bool
) -> None:
    """Plaintext first, then TLS on the same sockets. With ``late-server`` the
    ClientHello is already in the server's kernel buffer when it wraps its socket."""
    client_tcp, server_tcp = await tcp_pair()
    await server_tcp.send_all(b"* OK ready\r\n")
    assert await receive_exactly(client_tcp, 12) == b"* OK ready\r\n"
    await client_tcp.send_all(b"a STARTTLS\r\n")
    assert await receive_exactly(server_tcp, 12) == b"a STARTTLS\r\n"
    await server_tcp.send_all(b"a OK begin TLS\r\n")
    assert await receive_exactly(client_tcp, 16) == b"a OK begin TLS\r\n"

    c = TlsSocketStream.wrap(client_tcp, client_ctx, server_hostname="localhost")

    async def server() -> trio.abc.Stream:
        if server_waits:
            await trio.sleep(0.1)
        s = TlsSocketStream.wrap(server_tcp, server_ctx, server_side=True)
        await s.do_handshake()
        return s

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.do_handshake)
            s = await server()
    await c.send_all(b"b CAPABILITY\r\n")
    assert await receive_exactly(s, 14) == b"b CAPABILITY\r\n"
    await s.send_all(b"b OK\r\n")
    assert await receive_exactly(c, 6) == b"b OK\r\n"
    # The plain streams are empty shells now; closing them changes nothing.
    await client_tcp.aclose()
    await s.send_all(b"still here\r\n")
    assert await receive_exactly(c, 12) == b"still here\r\n"
    await c.aclose()
    await s.aclose()


# -- data -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "server"), [(ours, ours), (ours, trios)], ids=["both-ours", "ours-client"]
)
async def test_full_duplex_large_transfer_is_byte_exact(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, client: Wrap, server: Wrap
) -> None:
    """Both sides send 24 MiB at once, in writes of every size, while reading: the
    sockets fill up both ways, so each direction waits on the other's reader."""
    c, s = await tls_pair(server_ctx, client_ctx, client=client, server=server)
    size = 24 * MiB
    payloads = {c: os.urandom(size), s: os.urandom(size)}
    received: dict[Tls, bytes] = {}

    async def send(stream: Tls) -> None:
        data = memoryview(payloads[stream])
        offset, step = 0, 1
        while offset < size:
            await stream.send_all(data[offset : offset + step])
            offset += step
            step = min(step * 3 + 1, 2 * MiB)

    async def receive(stream: Tls) -> None:
        received[stream] = await receive_exactly(stream, size)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for stream in (c, s):
                nursery.start_soon(send, stream)
                nursery.start_soon(receive, stream)
    assert hashlib.sha256(received[s]).digest() == hashlib.sha256(payloads[c]).digest()
    assert hashlib.sha256(received[c]).digest() == hashlib.sha256(payloads[s]).digest()
    await c.aclose()
    await s.aclose()


async def test_receive_returns_all_records_that_have_arrived(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    """The point of this module: 1,000-byte records that have arrived come out in one
    read of 64 KiB, not one read each."""
    c, s = await tls_pair(server_ctx, client_ctx, server=trios)
    record = b"r" * 1000

    async def sender() -> None:
        for _ in range(200):
            await s.send_all(record)  # trio.SSLStream: one record per call

    reads = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await trio.sleep(0.2)  # on loopback by now, or blocked on full buffers
            total = 0
            while total < 200 * len(record):
                data = await c.receive_some(65536)
                assert data.count(b"r") == len(data)
                reads.append(len(data))
                total += len(data)
    # What had arrived (at least 64 KiB: the sender blocks only when buffers are full)
    # comes out whole; what arrives later comes as it comes.
    assert reads[0] == 65536
    await c.aclose()
    await s.aclose()


async def test_max_bytes_is_respected_and_nothing_waits_in_openssl(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    """A 16 KiB record read 1000 bytes at a time: the rest sits in OpenSSL, not in the
    socket, and must come out without waiting for the socket to become readable."""
    c, s = await tls_pair(server_ctx, client_ctx)
    data = os.urandom(50_000)
    await s.send_all(data)
    got = bytearray()
    with trio.fail_after(5):
        while len(got) < len(data):
            chunk = await c.receive_some(1000)
            assert 0 < len(chunk) <= 1000
            got += chunk
    assert bytes(got) == data
    with pytest.raises(ValueError, match="max_bytes"):
        await c.receive_some(0)
    await c.aclose()
    await s.aclose()


async def test_empty_send_is_a_no_op(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    c, s = await tls_pair(server_ctx, client_ctx)
    await c.send_all(b"")
    await c.send_all(b"x")
    assert await s.receive_some(10) == b"x"
    await c.aclose()
    await s.aclose()


async def test_generic_stream_behaviour(server_cert: Path, pki: TestPki) -> None:
    """trio's own conformance checks for two-way streams, as trio.SSLStream passes them."""

    async def stream_maker() -> tuple[Tls, Tls]:
        return await tls_pair(server_context(server_cert), client_context(pki))

    await trio.testing.check_two_way_stream(stream_maker, None)


# -- the end of the stream ------------------------------------------------------------------


@pytest.mark.parametrize("peer", [ours, trios], ids=["ours", "trio"])
async def test_clean_close_gives_eof_after_all_data(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, peer: Wrap
) -> None:
    c, s = await tls_pair(server_ctx, client_ctx, server=peer)
    data = os.urandom(3 * MiB)

    async def sender() -> None:
        await s.send_all(data)
        await s.aclose()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            assert await receive_until_eof(c) == data
    assert await c.receive_some(10) == b""  # and again
    await c.send_all(b"late")  # TLS allows it; the peer is gone, so nobody reads it
    await c.aclose()


@pytest.mark.parametrize("size", [100_003, 3 * MiB + 1], ids=["buffered", "streamed"])
async def test_ragged_eof_raises_after_all_data(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, size: int
) -> None:
    """No close_notify: every byte sent before still arrives, then BrokenResourceError
    (a truncation must not look like a clean end). ``buffered``: the data and the FIN are
    all in our buffer before the first read, so one read meets both."""
    c, s = await tls_pair(server_ctx, client_ctx)
    data = os.urandom(size)

    async def sender() -> None:
        await s.send_all(data)
        close_without_close_notify(s)

    got = bytearray()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await trio.sleep(0.1)
            with pytest.raises(trio.BrokenResourceError) as caught:  # noqa: PT012
                while True:
                    chunk = await c.receive_some(65536)
                    assert chunk, "a ragged EOF must not look like a clean one"
                    got += chunk
    assert bytes(got) == data
    assert isinstance(caught.value.__cause__, ssl.SSLEOFError)
    with pytest.raises(trio.BrokenResourceError):
        await c.receive_some(10)
    await c.aclose()


async def test_aclose_forcefully_skips_close_notify(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    c, s = await tls_pair(server_ctx, client_ctx)
    await s.send_all(b"last words")
    await trio.aclose_forcefully(s)
    assert await receive_exactly(c, 10) == b"last words"
    with pytest.raises(trio.BrokenResourceError):
        await c.receive_some(10)
    await c.aclose()


async def test_connection_reset(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
    c, s = await tls_pair(server_ctx, client_ctx)
    assert isinstance(s, TlsSocketStream)
    s.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.socket.close()  # RST
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError) as caught:
        await c.receive_some(10)
    assert isinstance(caught.value.__cause__, OSError)
    with pytest.raises(trio.BrokenResourceError):
        await c.send_all(b"x")
    await c.aclose()


async def test_send_to_a_vanished_peer(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    c, s = await tls_pair(server_ctx, client_ctx)
    close_without_close_notify(s)
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):  # noqa: PT012
        while True:  # the first writes may still fit in buffers
            await c.send_all(b"x" * 65536)
    await c.aclose()


async def test_closed_stream(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
    c, s = await tls_pair(server_ctx, client_ctx)
    await c.aclose()
    await c.aclose()  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        await c.receive_some(1)
    with pytest.raises(trio.ClosedResourceError):
        await c.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await c.wait_send_all_might_not_block()
    with pytest.raises(trio.ClosedResourceError):
        await c.do_handshake()
    assert await s.receive_some(1) == b""
    await s.aclose()


async def test_aclose_wakes_a_blocked_receiver(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    c, s = await tls_pair(server_ctx, client_ctx)

    async def receiver() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await c.receive_some(10)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            await c.aclose()
    assert await s.receive_some(10) == b""  # close_notify went out all the same
    await s.aclose()


# -- cancellation and concurrency -----------------------------------------------------------


async def test_cancelled_receive_is_harmless(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    c, s = await tls_pair(server_ctx, client_ctx)
    with trio.move_on_after(0.05) as scope:
        await c.receive_some(10)
    assert scope.cancelled_caught
    await s.send_all(b"after")
    assert await receive_exactly(c, 5) == b"after"
    await c.aclose()
    await s.aclose()


async def test_cancelled_send_breaks_the_stream(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    c, s = await tls_pair(server_ctx, client_ctx)
    with trio.move_on_after(0.2) as scope:
        await c.send_all(b"x" * (64 * MiB))  # the peer is not reading
    assert scope.cancelled_caught
    with pytest.raises(trio.BrokenResourceError):
        await c.send_all(b"more")
    await c.aclose()  # broken: no close_notify, just close
    await s.aclose()


async def test_concurrent_use_of_one_direction_is_refused(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    c, s = await tls_pair(server_ctx, client_ctx)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.receive_some, 10)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await c.receive_some(10)
            await s.send_all(b"x")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(c.send_all, b"y" * (64 * MiB))  # the peer is not reading
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await c.send_all(b"z")
        with pytest.raises(trio.BusyResourceError):
            await c.wait_send_all_might_not_block()
        nursery.cancel_scope.cancel()
    await c.aclose()
    await s.aclose()


async def test_wait_send_all_might_not_block(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    c, s = await tls_pair(server_ctx, client_ctx)
    with trio.fail_after(1):
        await c.wait_send_all_might_not_block()  # an idle connection: at once
    await c.send_all(b"ready")
    assert await s.receive_some(100) == b"ready"
    await c.aclose()
    await s.aclose()


async def test_tls13_tickets_and_handshake_messages_while_both_directions_block(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    """The client starts sending before it has read the server's session tickets, and
    the server starts sending before reading anything: both sockets fill up with the
    client's reads having post-handshake messages to process first."""
    client_tcp, server_tcp = await tcp_pair()
    c = TlsSocketStream.wrap(client_tcp, client_ctx, server_hostname="localhost")
    s = TlsSocketStream.wrap(server_tcp, server_ctx, server_side=True)
    size = 8 * MiB
    sent = {c: os.urandom(size), s: os.urandom(size)}
    got: dict[Tls, bytes] = {}

    async def receive(stream: Tls) -> None:
        await trio.sleep(0.2)  # let the writers block first
        got[stream] = await receive_exactly(stream, size)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for stream in (c, s):
                nursery.start_soon(stream.send_all, sent[stream])
                nursery.start_soon(receive, stream)
    assert got[s] == sent[c]
    assert got[c] == sent[s]
    await c.aclose()
    await s.aclose()


# -- wrap_tls -------------------------------------------------------------------------------


async def test_wrap_tls_picks_by_transport(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    client_tcp, server_tcp = await tcp_pair()
    wrapped = wrap_tls(server_tcp, server_ctx, server_side=True)
    assert isinstance(wrapped, TlsSocketStream)
    assert server_tcp.socket.fileno() == -1  # the socket moved
    await wrapped.aclose()
    await client_tcp.aclose()
    memory_client, memory_server = trio.testing.memory_stream_pair()
    fallback_client = wrap_tls(memory_client, client_ctx, server_hostname="localhost")
    fallback_server = wrap_tls(memory_server, server_ctx, server_side=True)
    assert isinstance(fallback_client, trio.SSLStream)
    assert isinstance(fallback_server, trio.SSLStream)
    with trio.fail_after(5):
        await handshake(fallback_client, fallback_server)


async def test_relay_of_small_upstream_records(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    """The production shape: client ⇄ [ours | relay | ours] ⇄ upstream, where the
    upstream (trio.SSLStream) writes 3,800-byte records."""
    client, proxy_front = await tls_pair(server_ctx, client_ctx, client=trios)
    proxy_back, upstream = await tls_pair(server_ctx, client_ctx, server=trios)
    message = os.urandom(8 * MiB)

    async def serve() -> None:
        assert await receive_exactly(upstream, 11) == b"a FETCH 1\r\n"
        for offset in range(0, len(message), 3800):
            await upstream.send_all(message[offset : offset + 3800])

    async def proxy() -> None:  # as Session.run does
        try:
            await relay(proxy_front, proxy_back)
        finally:
            await trio.aclose_forcefully(proxy_front)
            await trio.aclose_forcefully(proxy_back)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(proxy)
            nursery.start_soon(serve)
            await client.send_all(b"a FETCH 1\r\n")
            assert await receive_exactly(client, len(message)) == message
            await upstream.aclose()  # the relay ends, and the proxy closes the client
            with pytest.raises(trio.BrokenResourceError):
                await client.receive_some(10)
    await client.aclose()


async def test_concurrent_handshakes_share_one(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    client_tcp, server_tcp = await tcp_pair()
    c = TlsSocketStream.wrap(client_tcp, client_ctx, server_hostname="localhost")
    s = TlsSocketStream.wrap(server_tcp, server_ctx, server_side=True)
    with trio.fail_after(5):
        await handshake(c, c, s)
    assert "ok" in repr(c)
    await c.aclose()
    await s.aclose()
    assert "closed" in repr(c)


async def test_only_non_blocking_sockets(client_ctx: ssl.SSLContext) -> None:
    with (
        socket.socket() as plain,
        client_ctx.wrap_socket(
            plain, server_hostname="localhost", do_handshake_on_connect=False
        ) as blocking,
        pytest.raises(ValueError, match="non-blocking"),
    ):
        TlsSocketStream(blocking)


async def test_two_tasks_waiting_for_the_same_readiness() -> None:
    """A read that must wait for writability while a send already waits for it (or the
    reverse): the second task parks instead of breaking trio's one-waiter-per-fd rule, and
    returns when the first task's wait ends, for whatever reason; callers then retry their
    OpenSSL call, which waits again if it must."""
    from proxy.net.tlssocket import _Readiness

    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        readable = _Readiness(a, writable=False)
        woken: list[str] = []

        async def waiter(name: str) -> None:
            await readable.wait()
            woken.append(name)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter, "first")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(waiter, "second")
                await trio.testing.wait_all_tasks_blocked()
                assert woken == []
                b.send(b"x")
            assert sorted(woken) == ["first", "second"]
            a.recv(10)

            owner = trio.CancelScope()

            async def cancelled_owner() -> None:
                with owner:
                    await readable.wait()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancelled_owner)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(waiter, "parked")
                await trio.testing.wait_all_tasks_blocked()
                assert woken == ["first", "second"]
                owner.cancel()
            assert woken[-1] == "parked"  # woken by the owner's cancellation, to retry

            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter, "alone")  # the slot is free again
                await trio.testing.wait_all_tasks_blocked()
                assert woken[-1] == "parked"
                b.send(b"y")
            assert woken[-1] == "alone"


# -- the relay over TLS ---------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["close_notify", "truncated"])
async def test_relay_tells_a_clean_end_from_a_truncation(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, ending: str
) -> None:
    """The relay's verdict decides whether the session passes close_notify on: a cut-off
    upstream must not look like a clean end to the client."""
    mail_client, proxy_client_side = await tls_pair(server_ctx, client_ctx)
    proxy_upstream_side, upstream = await tls_pair(server_ctx, client_ctx)
    verdict: list[bool] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def session() -> None:
                verdict.append(await relay(proxy_client_side, proxy_upstream_side))

            nursery.start_soon(session)
            await upstream.send_all(b"* 1 FETCH (BODY[] {100000}\r\npartial")
            assert (
                await receive_exactly(mail_client, 35) == b"* 1 FETCH (BODY[] {100000}\r\npartial"
            )
            if ending == "close_notify":
                await upstream.aclose()
            else:
                close_without_close_notify(upstream)
    assert verdict == [ending == "close_notify"]
    for stream in (mail_client, proxy_client_side, proxy_upstream_side):
        await trio.aclose_forcefully(stream)


def test_client_certificates_need_their_ca(server_cert: Path) -> None:
    from proxy.config import ClientCertificates
    from proxy.net.tls import client_side_context

    with pytest.raises(ValueError, match="client certificates need a client_ca_file"):
        client_side_context(
            server_cert, client_ca_file=None, client_certificates=ClientCertificates.OPTIONAL
        )


def test_describing_a_failure_that_is_no_tls_error() -> None:
    from proxy.net.tls import describe_tls_error

    assert describe_tls_error(trio.BrokenResourceError("reset")) == ("TLS handshake failed: reset")


@pytest.mark.parametrize("wrap", [ours, trios])
async def test_the_peer_certificate_after_the_handshake_and_never_before(
    server_cert: Path, pki: TestPki, wrap: Wrap
) -> None:
    from proxy.net.tls import peer_certificate

    client_tcp, server_tcp = await tcp_pair()
    client = wrap(client_tcp, client_context(pki), server_hostname="localhost")
    server = wrap(server_tcp, server_context(server_cert), server_side=True)
    assert peer_certificate(client) is None  # no handshake yet: nothing, and no error
    with trio.fail_after(5):
        await handshake(client, server)
    der = peer_certificate(client)
    assert der is not None
    names = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert "localhost" in names.value.get_values_for_type(x509.DNSName)
    assert peer_certificate(server) is None  # the client presented none
    assert peer_certificate(client_tcp) is None  # not TLS at all
    await client.aclose()
    await server.aclose()


def test_listener_contexts_keep_the_defaults_and_add_the_hardening(server_cert: Path) -> None:
    from proxy.net.tls import client_side_context

    defaults = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).options
    context = client_side_context(server_cert)
    wanted = ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    assert context.options & (defaults | wanted) == defaults | wanted
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize(
    ("mode", "offered", "accepted"),
    [
        ("required", None, False),
        ("required", "ours", True),
        ("required", "stranger", False),
        ("optional", None, True),
        ("optional", "ours", True),
        ("optional", "stranger", False),
        ("none", "ours", True),
        ("none", "stranger", True),
    ],
)
async def test_client_certificates_at_the_listener(
    tmp_path: Path, server_cert: Path, pki: TestPki, mode: str, offered: str | None, accepted: bool
) -> None:
    """REQUIRED refuses a client without a certificate, both modes refuse one from any CA
    but client_ca_file, and a listener that asks for none sees none."""
    from proxy.config import ClientCertificates
    from proxy.net.tls import client_side_context, peer_certificate

    clients = TestPki(tmp_path / "clients")
    strangers = TestPki(tmp_path / "strangers")
    server_ctx = client_side_context(
        server_cert,
        client_ca_file=clients.ca_file,
        client_certificates=ClientCertificates(mode),
    )
    client_ctx = client_context(pki)
    if offered is not None:
        issuer = clients if offered == "ours" else strangers
        client_ctx.load_cert_chain(issuer.issue("client", "scanner.example"))
    client_tcp, server_tcp = await tcp_pair()
    client = trios(client_tcp, client_ctx, server_hostname="localhost")
    server = trios(server_tcp, server_ctx, server_side=True)
    try:
        with trio.fail_after(5):
            if not accepted:
                with pytest.RaisesGroup(
                    trio.BrokenResourceError, allow_unwrapped=True, flatten_subgroups=True
                ):
                    await handshake(client, server)
                return
            await handshake(client, server)
        seen = peer_certificate(server)
        if mode == "none" or offered is None:
            assert seen is None
        else:
            assert seen is not None
            subject = x509.load_der_x509_certificate(seen).subject
            names = subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            assert [name.value for name in names] == ["scanner.example"]
    finally:
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)


async def test_upstream_contexts_trust_the_system_store_and_the_ca_file_given(
    server_ctx: ssl.SSLContext, pki: TestPki
) -> None:
    from proxy.net.tls import upstream_context

    c, s = await tls_pair(server_ctx, upstream_context(pki.ca_file))
    await trio.aclose_forcefully(c)
    await trio.aclose_forcefully(s)
    # Without ca_file, a private CA is not trusted.
    client_tcp, server_tcp = await tcp_pair()
    client = trios(client_tcp, upstream_context(None), server_hostname="localhost")
    server = trios(server_tcp, server_ctx, server_side=True)
    try:
        with (
            trio.fail_after(5),
            pytest.RaisesGroup(
                trio.BrokenResourceError, allow_unwrapped=True, flatten_subgroups=True
            ),
        ):
            await handshake(client, server)
    finally:
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)
