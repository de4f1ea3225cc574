"""TLS session resumption towards the upstream: the cache, the stream's hook, the rules.

Real TLS over loopback TCP: a small trio server (our own TlsSocketStream, server side)
plays the upstream, with TLS 1.3 tickets or TLS 1.2 tickets and session IDs.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from typing import TYPE_CHECKING, cast

import pytest
import trio

from proxy.config import ListenerConfig, Protocol
from proxy.net.session import UpstreamUnavailable, connect_tcp, open_upstream
from proxy.net.tls import SessionCache, upstream_context
from proxy.net.tlssocket import TlsSocketStream
from proxy.protocol.modes import ClientTls, UpstreamTls
from tests.support.certs import TestPki

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server_cert(pki: TestPki) -> Path:
    return pki.issue("upstream", "localhost", "127.0.0.1")


def server_context(cert: Path, *, tls12: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert)
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


class Upstream:
    """A TLS server on loopback that greets, then records whether each handshake resumed.

    Its context can be swapped (``context``): a new one has new ticket keys and cannot
    resume what the old one issued.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.resumed: list[bool] = []
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        tls = TlsSocketStream.wrap(stream, self.context, server_side=True)
        try:
            await tls.do_handshake()
            self.resumed.append(tls.session_reused)
            await tls.send_all(b"* OK ready\r\n")
            await tls.receive_some(10)  # until the client closes
        except trio.BrokenResourceError:
            self.resumed.append(False)
        finally:
            await trio.aclose_forcefully(tls)


@pytest.fixture
async def upstream(server_cert: Path) -> AsyncIterator[Upstream]:
    server = Upstream(server_context(server_cert))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


def listener(port: int, host: str = "localhost") -> ListenerConfig:
    return ListenerConfig(
        protocol=Protocol.IMAP,
        host="127.0.0.1",
        port=1993,
        tls=ClientTls.NONE,
        certificate=None,
        upstream_host=host,
        upstream_port=port,
        upstream_tls=UpstreamTls.IMPLICIT,
    )


async def login(config: ListenerConfig, sessions: SessionCache) -> bool:
    """Connect as the proxy does, read the greeting, close; return whether it resumed."""
    with trio.fail_after(10):
        stream = await open_upstream(config, sessions.context, sessions)
        assert isinstance(stream, TlsSocketStream)
        assert await stream.receive_some(100) == b"* OK ready\r\n"
        resumed = stream.session_reused
        await stream.aclose()
    return resumed


# -- the cache ------------------------------------------------------------------------------


class FakeSession:
    """What SessionCache reads of an ssl.SSLSession: when it was made, how long it lasts."""

    def __init__(self, made: int, timeout: int) -> None:
        self.time = made
        self.timeout = timeout


def fake(made: int = 1000, timeout: int = 7200) -> ssl.SSLSession:
    return cast("ssl.SSLSession", FakeSession(made, timeout))


def cache(max_servers: int = 16, now: list[float] | None = None) -> SessionCache:
    clock = now if now is not None else [1000.0]
    return SessionCache(
        ssl.create_default_context(), max_servers=max_servers, clock=lambda: clock[0]
    )


def test_sessions_are_kept_per_server_name_and_port() -> None:
    sessions = cache()
    a, b, c = fake(1000), fake(1000), fake(1000)
    sessions.remember("mail.example.com", 993, a)
    sessions.remember("mail.example.com", 995, b)
    sessions.remember("other.example.com", 993, c)
    assert sessions.get("mail.example.com", 993) is a
    assert sessions.get("mail.example.com", 995) is b
    assert sessions.get("other.example.com", 993) is c
    assert sessions.get("mail.example.org", 993) is None
    sessions.forget("mail.example.com", 993)
    assert sessions.get("mail.example.com", 993) is None
    sessions.forget("never.example.com", 1)  # nothing to forget: no error
    assert len(sessions) == 2


def test_the_newest_session_replaces_the_one_before() -> None:
    sessions = cache()
    old, new = fake(1000), fake(1000)
    sessions.remember("mail.example.com", 993, old)
    sessions.remember("mail.example.com", 993, new)
    assert sessions.get("mail.example.com", 993) is new
    assert len(sessions) == 1


def test_the_cache_is_bounded_least_recently_stored_first_out() -> None:
    sessions = cache(max_servers=2)
    first, second, third = fake(1000), fake(1000), fake(1000)
    sessions.remember("a.example", 1, first)
    sessions.remember("b.example", 1, second)
    sessions.remember("a.example", 1, first)  # stored again: the most recent now
    sessions.remember("c.example", 1, third)
    assert len(sessions) == 2
    assert sessions.get("b.example", 1) is None
    assert sessions.get("a.example", 1) is first
    assert sessions.get("c.example", 1) is third
    assert repr(sessions) == "<SessionCache 2/2 servers>"
    with pytest.raises(ValueError, match="at least 1"):
        cache(max_servers=0)


def test_an_expired_session_is_dropped_not_offered() -> None:
    now = [1000.0]
    sessions = cache(now=now)
    session = fake(1000, timeout=300)
    sessions.remember("mail.example.com", 993, session)
    now[0] = 1299.0
    assert sessions.get("mail.example.com", 993) is session
    now[0] = 1300.0
    assert sessions.get("mail.example.com", 993) is None
    assert len(sessions) == 0


# -- resumption with a real server ----------------------------------------------------------


@pytest.mark.parametrize("tls12", [False, True], ids=["tls13-tickets", "tls12-tickets"])
async def test_the_second_connection_resumes(server_cert: Path, pki: TestPki, tls12: bool) -> None:
    server = Upstream(server_context(server_cert, tls12=tls12))
    sessions = SessionCache(upstream_context(pki.ca_file))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        config = listener(server.port)
        assert not await login(config, sessions)
        assert len(sessions) == 1
        remembered = sessions.get("localhost", server.port)
        assert await login(config, sessions)
        assert await login(config, sessions)
        # A resumed session stays good: it is not read again (Python copies it each time).
        assert sessions.get("localhost", server.port) is remembered
        nursery.cancel_scope.cancel()
    assert server.resumed == [False, True, True]


@pytest.fixture
def openssl_server(pki: TestPki) -> Iterator[int]:
    """OpenSSL's own server, TLS 1.2 without tickets (sessions by ID), for three
    connections; its port."""
    key, chain = pki.issue_split("sid-upstream", "localhost")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    command = ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(chain)]
    command += ["-key", str(key), "-no_ticket", "-tls1_2", "-quiet", "-naccept", "3"]
    server = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while True:  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield port
    finally:
        server.kill()
        server.wait()


async def test_tls12_session_ids_resume(openssl_server: int, pki: TestPki) -> None:
    """A TLS 1.2 server without tickets resumes by session ID (Python's own server keeps
    no session cache, so OpenSSL's plays the upstream)."""
    port = openssl_server
    sessions = SessionCache(upstream_context(pki.ca_file))
    resumed = []
    with trio.fail_after(20):
        for _ in range(2):
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            tls = TlsSocketStream.wrap(
                tcp,
                sessions.context,
                server_hostname="localhost",
                session=sessions.get("localhost", port),
                on_session=sessions.recorder("localhost", port),
            )
            await tls.do_handshake()
            session = sessions.get("localhost", port)
            assert session is not None
            assert not session.has_ticket
            assert session.id
            resumed.append(tls.session_reused)
            await tls.aclose()
    assert resumed == [False, True]


async def test_the_tls13_ticket_is_taken_after_the_first_read_not_before(
    server_cert: Path, pki: TestPki
) -> None:
    server = Upstream(server_context(server_cert))
    context = upstream_context(pki.ca_file)
    seen: list[ssl.SSLSession] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        tcp = await trio.open_tcp_stream("127.0.0.1", server.port)
        tls = TlsSocketStream.wrap(
            tcp, context, server_hostname="localhost", on_session=seen.append
        )
        await tls.do_handshake()
        assert tls.socket.version() == "TLSv1.3"
        assert seen == []  # no ticket yet: nothing worth keeping
        await tls.receive_some(100)
        assert len(seen) == 1
        assert seen[0].has_ticket
        await tls.aclose()
        nursery.cancel_scope.cancel()


async def test_no_session_crosses_to_another_server_name(upstream: Upstream, pki: TestPki) -> None:
    """The certificate names both; a session made for one name is never offered to the
    other, though it is the same server and port (fails if the cache keys by port only)."""
    sessions = SessionCache(upstream_context(pki.ca_file))
    by_name, by_address = listener(upstream.port, "localhost"), listener(upstream.port, "127.0.0.1")
    assert not await login(by_name, sessions)
    assert not await login(by_address, sessions)
    assert await login(by_name, sessions)
    assert await login(by_address, sessions)
    assert upstream.resumed == [False, False, True, True]


async def test_a_refused_session_gets_a_full_handshake_with_every_check(
    upstream: Upstream, pki: TestPki, tmp_path: Path
) -> None:
    """Offering a session skips nothing unless the server accepts it: a server that cannot
    resume it (new ticket keys) and shows a certificate we do not trust is refused, and
    the session is forgotten."""
    sessions = SessionCache(upstream_context(pki.ca_file))
    config = listener(upstream.port)
    assert not await login(config, sessions)
    assert sessions.get("localhost", upstream.port) is not None
    stranger = TestPki(tmp_path / "other")
    upstream.context = server_context(stranger.issue("impostor", "localhost"))
    with pytest.raises(UpstreamUnavailable, match="certificate verification failed") as failed:
        await login(config, sessions)
    assert failed.value.tls
    assert sessions.get("localhost", upstream.port) is None


async def test_a_session_never_crosses_to_another_context(upstream: Upstream, pki: TestPki) -> None:
    """Each listener's upstream context (its upstream_ca_file) has its own cache; Python
    itself refuses a session from another context, so even a shared cache fails closed."""
    first = SessionCache(upstream_context(pki.ca_file))
    config = listener(upstream.port)
    assert not await login(config, first)
    other = upstream_context(pki.ca_file)
    session = first.get("localhost", upstream.port)
    assert session is not None
    tcp = await trio.open_tcp_stream("127.0.0.1", upstream.port)
    with pytest.raises(ValueError, match="different SSLContext"):
        TlsSocketStream.wrap(tcp, other, server_hostname="localhost", session=session)
    await tcp.aclose()


# -- connecting -----------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"], ids=["address", "name"])
async def test_connect_tcp_by_address_or_name(host: str) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    stream = await connect_tcp(host, port)
    accepted = await listeners[0].accept()
    assert stream.socket.getpeername() == accepted.socket.getsockname()
    # Nagle off, as on every socket the proxy relays through.
    assert stream.socket.getsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY)
    await stream.aclose()
    await accepted.aclose()
    await listeners[0].aclose()


async def test_connect_tcp_refused() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    with pytest.raises(OSError):  # noqa: PT011 (the errno varies)
        await connect_tcp("127.0.0.1", port)
