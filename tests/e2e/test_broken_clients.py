"""Clients that break off: whatever a client does to its connection, at whatever stage,
the proxy logs no internal error, and every attempt it made is audited.

Issue: credentials over implicit TLS followed by a TCP FIN without close_notify made 57 of
90 connections log "internal error ... ValueError: handshake not done yet" (the client
certificate was read after the TLS error), and those attempts were never audited.
"""

from __future__ import annotations

import base64
import functools
import json
import random
import socket
import struct
from typing import TYPE_CHECKING

import pytest
import trio

from tests.e2e.conftest import MAILBOX, PASSWORD, Listener, ProxyRig, start_proxy
from tests.e2e.helpers import in_thread, tls_context

if TYPE_CHECKING:
    import ssl

    from tests.support.certs import TestPki
    from tests.support.dovecot import Dovecot
    from tests.support.entra import EntraEmulator

pytestmark = [pytest.mark.e2e]

QUOTED = PASSWORD.replace("\\", "\\\\").replace('"', '\\"')
#: One login command per protocol, and what comes before it.
LOGIN = {
    "imap": [f'a1 LOGIN "{MAILBOX}" "{QUOTED}"\r\n'.encode()],
    "pop3": [f"USER {MAILBOX}\r\n".encode(), f"PASS {PASSWORD}\r\n".encode()],
    "smtp": [
        b"EHLO client.example\r\n",
        b"AUTH PLAIN " + base64.b64encode(f"\0{MAILBOX}\0{PASSWORD}".encode()) + b"\r\n",
    ],
}


def audits(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "xoauth2_proxy.audit"]


def reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def fin_without_close_notify(tls: ssl.SSLSocket) -> None:
    """TCP FIN under a live TLS session: the peer sees a truncation, not a clean end."""
    raw = socket.socket(fileno=tls.detach())
    raw.shutdown(socket.SHUT_WR)
    raw.close()


async def test_credentials_then_fin_without_close_notify_is_audited_as_abandoned(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    idp: EntraEmulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)]))
    context = tls_context(pki)

    def send_and_leave() -> None:
        sock = socket.create_connection(("127.0.0.1", proxy.port), 30)
        tls = context.wrap_socket(sock, server_hostname="localhost")
        tls.recv(4096)  # the greeting
        tls.sendall(LOGIN["imap"][0])
        fin_without_close_notify(tls)

    idp.latency = 0.5  # the token request is under way when the client leaves
    try:
        for _ in range(10):
            await in_thread(send_and_leave)
        with trio.fail_after(20):
            while len(audits(caplog)) < 10:  # noqa: ASYNC110 (audit lines come from the proxy's tasks)
                await trio.sleep(0.05)
    finally:
        idp.latency = 0
    assert "internal error" not in caplog.text
    assert {a["result"] for a in audits(caplog)} == {"abandoned"}
    assert {a["reason"] for a in audits(caplog)} == {"the connection ended before the answer"}


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
async def test_random_breaks_at_every_stage_cause_no_internal_error(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
    protocol: str,
) -> None:
    """Seeded, so a failure is reproducible: 40 connections per protocol, each broken off
    at a random point (during the handshake, after the greeting, in the middle of a
    command, after the credentials, after the login) in a random way (FIN, FIN under TLS
    without close_notify, RST, a truncated TLS record)."""
    upstream = {
        "imap": dovecot.ports.imaps,
        "pop3": dovecot.ports.pop3s,
        "smtp": dovecot.ports.submissions or 0,
    }[protocol]
    rig.limits.update(failure_delay=0)
    proxy = await start_proxy(
        nursery, rig.write([Listener(protocol=protocol, upstream_port=upstream)])
    )
    context = tls_context(pki)
    chosen = random.Random(f"broken clients {protocol}")

    def one(stage: str, how: str, cut: int) -> None:
        sock = socket.create_connection(("127.0.0.1", proxy.port), 30)
        try:
            if stage == "handshake":
                hello = bytearray(chosen.randbytes(cut)) if how == "garbage" else b"\x16\x03\x01"
                sock.sendall(bytes(hello[:cut]))
                if how == "rst":
                    reset(sock)
                return
            tls = context.wrap_socket(sock, server_hostname="localhost")
            tls.recv(4096)
            script = b"".join(LOGIN[protocol])
            if stage == "mid-command":
                tls.sendall(script[: cut % len(script)])
            elif stage in ("credentials", "logged-in"):
                tls.sendall(script)
                if stage == "logged-in":
                    tls.settimeout(10)
                    tls.recv(65536)
            if how == "rst":
                reset(tls)
                tls.close()
            elif how == "fin":
                fin_without_close_notify(tls)
            elif how == "truncated-record":
                raw = socket.socket(fileno=tls.detach())
                raw.sendall(b"\x17\x03\x03\x40\x00" + b"\x00" * 10)  # a record cut short
                raw.close()
            else:
                tls.close()
        except OSError:
            pass  # the proxy may close first; that is not what is tested
        finally:
            sock.close()

    stages = ["handshake", "greeting", "mid-command", "credentials", "logged-in"]
    ways = ["fin", "rst", "truncated-record", "close"]
    plan = [
        (chosen.choice(stages), chosen.choice(ways), chosen.randrange(1, 200)) for _ in range(40)
    ]
    for stage, how, cut in plan:
        if stage == "handshake" and how != "rst":
            how = chosen.choice(["garbage", "partial"])
        await in_thread(functools.partial(one, stage, how, cut))
    with trio.fail_after(30):  # until the proxy has finished every session
        while proxy.server.sessions_open:  # noqa: ASYNC110 (no event to wait on)
            await trio.sleep(0.05)
    assert "internal error" not in caplog.text
    assert "Traceback" not in caplog.text
    results = {a["result"] for a in audits(caplog)}
    assert results <= {"success", "failure", "abandoned", "temporary-failure"}, results
