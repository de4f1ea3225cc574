"""The proxy's connections to a real Dovecot: TLS sessions resumed, warm connections
waiting for logins, Nagle off on both sides.

Dovecot resumes TLS sessions only when one login process serves many connections
(``ONE_LOGIN_PROCESS``); with its default, a process per connection, nothing can resume,
and logins must work all the same.
"""

from __future__ import annotations

import imaplib
import os
import socket
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from proxy.config import load_config
from proxy.net.tlssocket import TlsSocketStream
from tests.e2e.conftest import MAILBOX, PASSWORD, Listener, ProxyRig, RunningProxy, start_proxy
from tests.e2e.helpers import in_thread, tls_context
from tests.support.dovecot import ONE_LOGIN_PROCESS, Dovecot

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from proxy.net.pool import UpstreamPool
    from tests.support.certs import TestPki
    from tests.support.entra import EntraEmulator

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def resuming_dovecot(
    tmp_path_factory: pytest.TempPathFactory, pki: TestPki, idp: EntraEmulator
) -> Iterator[Dovecot]:
    with Dovecot(
        tmp_path_factory.mktemp("dovecot-resuming"),
        pki=pki,
        jwt_public_key_pem=idp.public_key_pem(),
        kid=idp.kid,
        issuer=idp.issuer,
        mailboxes=(MAILBOX,),
        extra_config=ONE_LOGIN_PROCESS,
    ) as server:
        yield server


def login_select_logout(pki: TestPki, port: int) -> None:
    imap = imaplib.IMAP4_SSL("localhost", port, ssl_context=tls_context(pki), timeout=30)
    imap.login(MAILBOX, PASSWORD)
    assert imap.select("INBOX")[0] == "OK"
    imap.logout()


@pytest.mark.parametrize("resuming", [True, False], ids=["one-login-process", "default"])
async def test_logins_resume_the_upstream_tls_session_when_dovecot_can(
    nursery: trio.Nursery,
    tmp_path: Path,
    pki: TestPki,
    idp: EntraEmulator,
    dovecot: Dovecot,
    resuming_dovecot: Dovecot,
    caplog: pytest.LogCaptureFixture,
    resuming: bool,
) -> None:
    upstream = resuming_dovecot if resuming else dovecot
    rig = ProxyRig(tmp_path, pki, idp, upstream)
    rig.add_user(MAILBOX, PASSWORD)
    rig.limits["upstream_pool"] = 0  # every login's own connection
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=upstream.ports.imaps)]))
    for _ in range(3):
        await in_thread(lambda: login_select_logout(pki, proxy.port))
    resumed = caplog.text.count("upstream TLS session resumed")
    assert resumed == (2 if resuming else 0)
    assert caplog.text.count(f"login {MAILBOX!r} accepted") == 3


def _tcp_sockets() -> Iterator[socket.socket]:
    """Every TCP socket of this process (the proxy runs in it), as duplicates."""
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue  # not a socket, or gone
        if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6):
            yield sock
        else:
            sock.close()


async def test_nagle_is_off_on_both_sides_of_a_relayed_session(
    nursery: trio.Nursery, rig: ProxyRig, pki: TestPki, dovecot: Dovecot
) -> None:
    """A small reply must not wait for the previous one's acknowledgement on either hop."""
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)]))
    imap = await in_thread(
        lambda: imaplib.IMAP4_SSL("localhost", proxy.port, ssl_context=tls_context(pki))
    )
    try:
        await in_thread(lambda: imap.login(MAILBOX, PASSWORD))
        client_port = imap.sock.getsockname()[1]
        found = {}
        for sock in _tcp_sockets():
            with sock:
                try:
                    here, there = sock.getsockname()[1], sock.getpeername()[1]
                except OSError:
                    continue  # a listener
                if (here, there) == (proxy.port, client_port):
                    side = "client"
                elif there == dovecot.ports.imaps:
                    side = "upstream"
                else:
                    continue
                found[side] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert found == {"client": 1, "upstream": 1}
    finally:
        await in_thread(imap.logout)


def pool_of(proxy: RunningProxy) -> UpstreamPool:
    (pool,) = proxy.server._pools.values()
    return pool


async def until(condition: Callable[[], bool]) -> None:
    """Wait for the pool, which works in its own task, to get there."""
    with trio.fail_after(20):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_logins_take_warm_connections_that_dovecot_accepts(
    nursery: trio.Nursery,
    rig: ProxyRig,
    pki: TestPki,
    dovecot: Dovecot,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig.limits["upstream_pool"] = 2
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)]))
    pool = pool_of(proxy)
    for _ in range(2):  # logins come: the pool fills
        await in_thread(lambda: login_select_logout(pki, proxy.port))
    await until(lambda: len(pool) == 2)
    since = len(dovecot.log_text())
    for _ in range(3):
        await in_thread(lambda: login_select_logout(pki, proxy.port))
    assert caplog.text.count("warm upstream connection") >= 3
    assert dovecot.log_text()[since:].count(f"user=<{MAILBOX}>, method=XOAUTH2") == 3
    metrics = proxy.server.metrics.registry
    name = proxy.listeners[0].config.name
    taken = metrics.get_sample_value(
        "xoauth2_proxy_upstream_pool_connections_total", {"listener": name, "outcome": "taken"}
    )
    assert taken is not None
    assert taken >= 3


async def test_a_silent_client_past_the_early_limit_takes_no_warm_connection(
    nursery: trio.Nursery, rig: ProxyRig, pki: TestPki, dovecot: Dovecot
) -> None:
    """A warm connection is an upstream connection like any other: a client that has not
    said anything gets one only within max_early_upstreams, and otherwise when it speaks."""
    rig.limits.update(upstream_pool=2, max_early_upstreams=0)
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)]))
    pool = pool_of(proxy)
    for _ in range(2):
        await in_thread(lambda: login_select_logout(pki, proxy.port))
    await until(lambda: len(pool) == 2)

    def greeted() -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
        conn = tls_context(pki).wrap_socket(raw, server_hostname="localhost")
        assert conn.recv(1000).startswith(b"* OK")
        return conn

    conn = await in_thread(greeted)
    try:
        await trio.testing.wait_all_tasks_blocked()
        assert len(pool) == 2  # greeted, silent: nothing taken
        await in_thread(lambda: conn.sendall(b"a1 NOOP\r\n"))
        await until(lambda: len(pool) < 2)
    finally:
        conn.close()


async def test_a_reload_replaces_the_pool_and_closes_what_waited(
    nursery: trio.Nursery, rig: ProxyRig, pki: TestPki, dovecot: Dovecot
) -> None:
    rig.limits["upstream_pool"] = 1
    path = rig.write([Listener(upstream_port=dovecot.ports.imaps)])
    proxy = await start_proxy(nursery, path)
    old = pool_of(proxy)
    for _ in range(2):
        await in_thread(lambda: login_select_logout(pki, proxy.port))
    await until(lambda: len(old) == 1)
    (warm,) = old._ready
    assert await proxy.server.reload(load_config(path), proxy.tokens)
    new = pool_of(proxy)
    assert new is not old
    await until(lambda: len(old) == 0)
    with pytest.raises(trio.ClosedResourceError):
        await warm.stream.receive_some()
    await in_thread(lambda: login_select_logout(pki, proxy.port))


async def test_a_warm_connection_the_upstream_ended_is_replaced_by_a_new_one(
    nursery: trio.Nursery,
    rig: ProxyRig,
    pki: TestPki,
    dovecot: Dovecot,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server may drop a waiting connection (its own pre-login timeout, a restart): the
    login that takes it finds the end of stream and connects again, and still logs in."""
    rig.limits["upstream_pool"] = 1
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)]))
    pool = pool_of(proxy)
    for _ in range(2):
        await in_thread(lambda: login_select_logout(pki, proxy.port))
    await until(lambda: len(pool) == 1)
    (warm,) = pool._ready
    assert isinstance(warm.stream, TlsSocketStream)
    # From now on, reading this connection finds an end of stream, as if Dovecot had
    # closed it (after its greeting, which the pool has read).
    warm.stream.socket.shutdown(socket.SHUT_RD)
    since = len(dovecot.log_text())
    await in_thread(lambda: login_select_logout(pki, proxy.port))
    assert warm not in pool._ready
    taken = caplog.text.index("#3: warm upstream connection")
    assert "#3: reconnecting: the upstream closed the connection" in caplog.text[taken:]
    assert dovecot.log_text()[since:].count(f"user=<{MAILBOX}>, method=XOAUTH2") == 1
