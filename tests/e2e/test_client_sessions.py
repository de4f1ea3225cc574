"""Clients resume their TLS sessions with the proxy's listeners (TLS 1.3 tickets, TLS 1.2
tickets), and the ticket keys change: on rotation, on reload, never from disk.

A resumed handshake skips the certificate signature and the key exchange's verification on
both sides; clients that reconnect every few minutes (fetchmail, scanners) are exactly the
ones that offer tickets.
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import TYPE_CHECKING

import pytest
import trio

from proxy.config import load_config
from tests.e2e.conftest import Listener, ProxyRig, RunningProxy, start_proxy
from tests.e2e.helpers import in_thread, tls_context

if TYPE_CHECKING:
    from pathlib import Path

    from tests.support.certs import TestPki
    from tests.support.dovecot import Dovecot


class Client:
    """A stdlib TLS client that keeps the last session the proxy gave it."""

    def __init__(self, pki: TestPki, port: int, version: ssl.TLSVersion) -> None:
        self.context = tls_context(pki)
        self.context.maximum_version = version
        self.port = port
        self.version = version
        self.session: ssl.SSLSession | None = None

    def connect(self) -> bool:
        """Connect (offering the kept session), read the greeting, log out; did it resume?"""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        with self.context.wrap_socket(
            raw, server_hostname="localhost", session=self.session
        ) as conn:
            assert (
                conn.version()
                == {
                    ssl.TLSVersion.TLSv1_3: "TLSv1.3",
                    ssl.TLSVersion.TLSv1_2: "TLSv1.2",
                }[self.version]
            )
            # TLS 1.3 tickets come after the handshake: the greeting is read after them.
            assert conn.recv(1000).startswith(b"* OK")
            conn.sendall(b"a1 LOGOUT\r\n")
            while conn.recv(1000):
                pass
            resumed = conn.session_reused is True
            self.session = conn.session
        return resumed


@pytest.fixture(params=[ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls13", "tls12"])
def version(request: pytest.FixtureRequest) -> ssl.TLSVersion:
    value: ssl.TLSVersion = request.param
    return value


async def serve(
    nursery: trio.Nursery, rig: ProxyRig, dovecot: Dovecot
) -> tuple[RunningProxy, Path]:
    path = rig.write([Listener(upstream_port=dovecot.ports.imaps)])
    return await start_proxy(nursery, path), path


async def test_a_client_resumes_until_the_ticket_keys_rotate(
    nursery: trio.Nursery,
    rig: ProxyRig,
    pki: TestPki,
    dovecot: Dovecot,
    version: ssl.TLSVersion,
) -> None:
    proxy, _ = await serve(nursery, rig, dovecot)
    client = Client(pki, proxy.port, version)
    assert [await in_thread(client.connect) for _ in range(3)] == [False, True, True]
    assert proxy.server.rotate_ticket_keys()
    # The old ticket is refused quietly: a full handshake, a new ticket, resumed again.
    assert [await in_thread(client.connect) for _ in range(2)] == [False, True]


async def test_a_reload_starts_new_ticket_keys(
    nursery: trio.Nursery, rig: ProxyRig, pki: TestPki, dovecot: Dovecot
) -> None:
    """As README says: after a reload, each client does one full handshake."""
    proxy, path = await serve(nursery, rig, dovecot)
    client = Client(pki, proxy.port, ssl.TLSVersion.TLSv1_3)
    assert [await in_thread(client.connect) for _ in range(2)] == [False, True]
    assert await proxy.server.reload(load_config(path), proxy.tokens)
    assert [await in_thread(client.connect) for _ in range(2)] == [False, True]


async def test_keys_stay_when_a_certificate_cannot_be_read_at_rotation(
    nursery: trio.Nursery,
    rig: ProxyRig,
    pki: TestPki,
    dovecot: Dovecot,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy, _ = await serve(nursery, rig, dovecot)
    certificate = proxy.listeners[0].config.certificate
    assert certificate is not None
    client = Client(pki, proxy.port, ssl.TLSVersion.TLSv1_3)
    assert [await in_thread(client.connect) for _ in range(2)] == [False, True]
    saved = certificate.read_bytes()
    certificate.write_text("not a certificate\n")
    try:
        assert not proxy.server.rotate_ticket_keys()
    finally:
        certificate.write_bytes(saved)
    assert "TLS session ticket keys not rotated, the previous ones stay" in caplog.text
    assert await in_thread(client.connect)  # the same keys: it still resumes


async def test_ticket_keys_rotate_every_ticket_key_lifetime(
    nursery: trio.Nursery,
    rig: ProxyRig,
    pki: TestPki,
    dovecot: Dovecot,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="xoauth2_proxy.server")
    rig.limits["ticket_key_lifetime"] = 0.05
    proxy, _ = await serve(nursery, rig, dovecot)
    first = proxy.server._client_contexts[proxy.listeners[0].config]
    with trio.fail_after(20):
        while proxy.server._client_contexts[proxy.listeners[0].config] is first:  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert "TLS session ticket keys rotated" in caplog.text


@pytest.mark.parametrize("which", ["certificate", "client_ca_file"])
async def test_keys_stay_when_a_file_breaks_the_rules_at_rotation(
    nursery: trio.Nursery,
    rig: ProxyRig,
    pki: TestPki,
    dovecot: Dovecot,
    caplog: pytest.LogCaptureFixture,
    which: str,
) -> None:
    """A rotation loads the listener's files as a reload would: a certificate others may
    read, or a client CA file others may write, is refused, and the keys in use stay."""
    extra = {"client_ca_file": f'"{pki.ca_file}"', "client_certificates": '"optional"'}
    path = rig.write([Listener(upstream_port=dovecot.ports.imaps, extra=extra)])
    proxy = await start_proxy(nursery, path)
    listener = proxy.listeners[0].config
    unsafe = listener.certificate if which == "certificate" else listener.client_ca_file
    assert unsafe is not None
    client = Client(pki, proxy.port, ssl.TLSVersion.TLSv1_3)
    assert [await in_thread(client.connect) for _ in range(2)] == [False, True]
    mode = unsafe.stat().st_mode
    unsafe.chmod(0o644 if which == "certificate" else 0o666)
    try:
        assert not proxy.server.rotate_ticket_keys()
    finally:
        unsafe.chmod(mode)
    problem = "is accessible to its group" if which == "certificate" else "is writable by"
    assert f"{unsafe} {problem}" in caplog.text
    assert await in_thread(client.connect)  # the same keys: it still resumes
    assert proxy.server.rotate_ticket_keys()  # with the file put right, they rotate
