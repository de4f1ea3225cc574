"""The pool of warm upstream connections, against a real TLS server on loopback."""

from __future__ import annotations

import dataclasses
import logging
import ssl
from typing import TYPE_CHECKING

import pytest
import trio

from proxy.config import ListenerConfig, Protocol, UpstreamClientAddress
from proxy.net.pool import UpstreamPool
from proxy.net.tls import SessionCache, upstream_context
from proxy.net.tlssocket import TlsSocketStream
from proxy.ops.metrics import Metrics
from proxy.protocol.modes import ClientTls, UpstreamTls
from tests.support.certs import TestPki

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

GREETING = b"* OK ready\r\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki(tmp_path_factory.mktemp("pki"))


class Upstream:
    """Greets every connection, then waits until the client closes; counts them."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.accepted = 0
        self.closed = 0
        self.port = 0
        #: Connections still to close right after the TLS handshake, without a greeting.
        self.refuse = 0
        #: Never greet: connections wait after the TLS handshake until the client closes.
        self.silent = False
        self.handshakes = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        tls = TlsSocketStream.wrap(stream, self.context, server_side=True)
        try:
            await tls.do_handshake()
            self.handshakes += 1
            if self.silent:
                await tls.wait_send_all_might_not_block()
                while await tls.receive_some():
                    pass
                return
            if self.refuse:
                self.refuse -= 1
                await tls.aclose()  # a clean TLS close: the client reads an end of stream
                return
            await tls.send_all(GREETING)
            while await tls.receive_some():
                pass
        except trio.BrokenResourceError:
            pass
        finally:
            self.closed += 1
            await trio.aclose_forcefully(tls)


@pytest.fixture
async def upstream(pki: TestPki) -> AsyncIterator[Upstream]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.issue("upstream", "localhost"))
    server = Upstream(context)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


def listener(port: int, upstream_tls: UpstreamTls = UpstreamTls.IMPLICIT) -> ListenerConfig:
    return ListenerConfig(
        protocol=Protocol.IMAP,
        host="127.0.0.1",
        port=1993,
        tls=ClientTls.NONE,
        certificate=None,
        upstream_host="localhost",
        upstream_port=port,
        upstream_tls=upstream_tls,
    )


def pool(
    pki: TestPki,
    port: int,
    *,
    size: int = 2,
    max_age: float = 60.0,
    retry: float = 1.0,
    metrics: Metrics | None = None,
) -> UpstreamPool:
    sessions = SessionCache(upstream_context(pki.ca_file))
    return UpstreamPool(
        listener(port),
        sessions.context,
        sessions,
        size=size,
        max_age=max_age,
        timeout=10,
        retry=retry,
        metrics=metrics,
    )


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (at most 10 s) until ``condition()`` holds: the pool works in its own task."""
    with trio.fail_after(10):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.01)


def counted(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "xoauth2_proxy_upstream_pool_connections_total",
        {"listener": "imap@127.0.0.1:1993", "outcome": outcome},
    )
    return value or 0.0


async def test_the_pool_fills_while_logins_come_and_serves_each_connection_once(
    pki: TestPki, upstream: Upstream
) -> None:
    metrics = Metrics()
    warm = pool(pki, upstream.port, metrics=metrics)
    async with trio.open_nursery() as nursery:
        await nursery.start(warm.run)
        assert warm.take() is None  # empty: this login connects on its own
        assert len(warm) == 0
        assert warm.take() is None  # a second login soon after: logins come, fill up
        await until(lambda: len(warm) == 2, "two ready")
        taken = [warm.take(), warm.take()]
        for connection in taken:
            assert connection is not None
            assert connection.greeting == GREETING
            assert isinstance(connection.stream, TlsSocketStream)
        assert taken[0] is not taken[1]
        await until(lambda: len(warm) == 2, "refilled")
        assert upstream.accepted == 4
        for connection in taken:
            assert connection is not None
            await connection.stream.aclose()
        nursery.cancel_scope.cancel()
    # What was ready when the pool stopped is closed, not left behind.
    await until(lambda: upstream.closed == 4, "all closed")
    assert counted(metrics, "missed") == 2
    assert counted(metrics, "taken") == 2
    handshakes = {
        resumed: metrics.registry.get_sample_value(
            "xoauth2_proxy_upstream_tls_handshakes_total",
            {"listener": "imap@127.0.0.1:1993", "resumed": resumed},
        )
        for resumed in ("yes", "no")
    }
    # The first had no session to resume (nor, if it began before the first had one, the
    # second); the refills resumed.
    assert handshakes["no"] in (1, 2)
    assert handshakes["yes"] == 4 - handshakes["no"]


async def test_one_login_now_and_then_opens_nothing_ahead(pki: TestPki, upstream: Upstream) -> None:
    """A login a minute (more than max_age apart) would only waste a connection each."""
    warm = pool(pki, upstream.port, max_age=0.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(warm.run)
        assert warm.take() is None
        assert not warm._wanted(trio.current_time())
        await trio.sleep(0.6)
        assert warm.take() is None  # 0.6 s after the first: longer than max_age
        assert not warm._wanted(trio.current_time())
        nursery.cancel_scope.cancel()
    assert upstream.accepted == 0


async def test_a_connection_older_than_max_age_is_closed_not_served(
    pki: TestPki, upstream: Upstream
) -> None:
    metrics = Metrics()
    warm = pool(pki, upstream.port, size=1, max_age=0.5, metrics=metrics)
    async with trio.open_nursery() as nursery:
        await nursery.start(warm.run)
        warm.take()
        warm.take()
        # One is opened; nobody asks again: it expires, is closed, and is not replaced.
        await until(lambda: upstream.closed == 1, "closed by the pool")
        assert len(warm) == 0
        assert counted(metrics, "expired") == 1
        assert not warm._wanted(trio.current_time())
        assert upstream.accepted == 1
        nursery.cancel_scope.cancel()


async def test_a_login_never_gets_a_connection_past_max_age(
    pki: TestPki, upstream: Upstream
) -> None:
    """Between its max_age and the pool's next round, an old connection may still be in
    the queue: a login that asks then gets none, and the pool closes it."""
    metrics = Metrics()
    warm = pool(pki, upstream.port, size=1, metrics=metrics)
    async with trio.open_nursery() as nursery:
        await nursery.start(warm.run)
        warm.take()
        warm.take()
        await until(lambda: len(warm) == 1, "one ready")
        (ready,) = warm._ready
        ready.born -= warm.max_age  # as old as allowed: not to be served
        assert warm.take() is None
        await until(lambda: upstream.closed == 1, "closed by the pool")
        nursery.cancel_scope.cancel()
    assert counted(metrics, "taken") == 0
    assert counted(metrics, "expired") == 1
    assert counted(metrics, "missed") == 3


async def test_an_unreachable_upstream_is_retried_later_and_logged_once(
    pki: TestPki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()  # nothing listens there now
    metrics = Metrics()
    warm = pool(pki, port, metrics=metrics, retry=600)
    async with trio.open_nursery() as nursery:
        await nursery.start(warm.run)
        warm.take()
        warm.take()
        await until(lambda: counted(metrics, "failed") >= 1, "a failure")
        # Both slots tried at once; then it waits before trying again.
        assert warm._retry_at > trio.current_time()
        assert not warm._wanted(trio.current_time())
        assert warm.failures in (1, 2)
        nursery.cancel_scope.cancel()
    warnings = [r for r in caplog.records if "warm upstream connection failed" in r.message]
    assert len(warnings) == 1
    assert "logins connect on their own" in warnings[0].message


async def test_an_upstream_that_closes_before_its_greeting_is_a_failure_and_then_recovers(
    pki: TestPki, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    """The upstream refuses twice (closes right after TLS), then works: the pool counts
    the failures, logs once that it failed and once that it works again, and fills."""
    caplog.set_level(logging.INFO)
    upstream.refuse = 2
    metrics = Metrics()
    warm = pool(pki, upstream.port, size=1, retry=0.01, metrics=metrics)
    async with trio.open_nursery() as nursery:
        await nursery.start(warm.run)
        warm.take()
        warm.take()
        await until(lambda: len(warm) == 1, "one ready after the failures")
        nursery.cancel_scope.cancel()
    assert counted(metrics, "failed") == 2
    assert warm.failures == 0
    messages = [r.getMessage() for r in caplog.records]
    assert sum("warm upstream connection failed" in m for m in messages) == 1
    assert any("closed before its greeting" in m for m in messages)
    assert sum("work again" in m for m in messages) == 1


async def test_a_connection_waiting_for_its_greeting_is_closed_when_the_pool_stops(
    pki: TestPki, upstream: Upstream
) -> None:
    upstream.silent = True
    warm = pool(pki, upstream.port, size=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(warm.run)
        warm.take()
        warm.take()
        await until(lambda: upstream.handshakes == 1, "connected, no greeting")
        nursery.cancel_scope.cancel()
    await until(lambda: upstream.closed == 1, "closed by the pool")
    assert warm._opening == 0
    assert len(warm) == 0


@pytest.mark.parametrize(
    "config",
    [
        listener(1, UpstreamTls.STARTTLS),
        dataclasses.replace(listener(1), upstream_client_address=UpstreamClientAddress.PROXY_V1),
        dataclasses.replace(listener(1), upstream_client_address=UpstreamClientAddress.PROXY_V2),
    ],
    ids=["starttls", "proxy-v1", "proxy-v2"],
)
async def test_starttls_upstreams_and_proxy_headers_are_not_pooled(
    pki: TestPki, config: ListenerConfig
) -> None:
    sessions = SessionCache(upstream_context(pki.ca_file))
    warm = UpstreamPool(config, sessions.context, sessions, size=4, max_age=20, timeout=10)
    assert warm.size == 0
    for _ in range(3):  # logins come, yet nothing is opened
        assert warm.take() is None
    assert not warm._wanted(trio.current_time())
    with trio.move_on_after(0.05):
        await warm.run()  # nothing to do: waits forever
    assert (len(warm), warm.failures) == (0, 0)  # no connection, not even a failed attempt


def test_bad_settings_are_refused(pki: TestPki) -> None:
    for size, max_age in ((-1, 20.0), (2, 0.0)):
        with pytest.raises(ValueError, match="pool size"):
            pool(pki, 1, size=size, max_age=max_age)
    assert repr(pool(pki, 1)) == "<UpstreamPool imap@127.0.0.1:1993: 0/2 ready>"
