"""The proxy's connections to a real Dovecot: TLS sessions resumed, Nagle off on both sides.

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

from tests.e2e.conftest import MAILBOX, PASSWORD, Listener, ProxyRig, start_proxy
from tests.e2e.helpers import in_thread, tls_context
from tests.support.dovecot import ONE_LOGIN_PROCESS, Dovecot

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import trio

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
