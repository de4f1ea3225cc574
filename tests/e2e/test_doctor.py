"""``xoauth2-proxy doctor``, run as an operator runs it, against the Dovecot rig and the
emulated Entra: every step it reports, and the fix it names for each failure."""

from __future__ import annotations

import base64
import os
import ssl
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
import trio

from tests.e2e.conftest import CLIENT_SECRET, MAILBOX, OTHER_MAILBOX, PASSWORD, Listener, ProxyRig
from tests.e2e.helpers import in_thread

if TYPE_CHECKING:
    from pathlib import Path

    from tests.support.certs import TestPki
    from tests.support.dovecot import Dovecot

pytestmark = [pytest.mark.e2e]


def doctor(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "doctor", "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def all_listeners(dovecot: Dovecot) -> list[Listener]:
    assert dovecot.ports.submission is not None
    return [
        Listener(upstream_port=dovecot.ports.imaps),
        Listener(protocol="pop3", upstream_port=dovecot.ports.pop3, upstream_tls="starttls"),
        Listener(protocol="smtp", upstream_port=dovecot.ports.submission, upstream_tls="starttls"),
    ]


def test_a_working_chain_is_all_ok(rig: ProxyRig, dovecot: Dovecot) -> None:
    done = doctor(rig.write(all_listeners(dovecot)), MAILBOX)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "[FAIL]" not in out
    for role in ("IMAP.AccessAsApp", "POP.AccessAsApp", "SMTP.SendAsApp"):
        assert f"the token has the {role} role" in out
    assert f"logged in as {MAILBOX}; EXAMINE INBOX: OK" in out
    assert f"logged in as {MAILBOX}; STAT: +OK" in out
    assert f"logged in as {MAILBOX}; MAIL FROM: 250" in out
    assert out.rstrip().endswith("checks, 0 failed")
    # Neither the secret nor the token, raw or in a login's base64, is shown.
    assert CLIENT_SECRET not in out + done.stderr
    assert "eyJ" not in out + done.stderr  # any JWT starts so
    assert "Bearer" not in out + done.stderr


def test_without_a_user_checks_every_app_and_upstream(rig: ProxyRig, dovecot: Dovecot) -> None:
    done = doctor(rig.write(all_listeners(dovecot)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "app 'contoso': the identity provider issued a token" in done.stdout
    assert "connected; TLS certificate and host name verified" in done.stdout
    assert done.stdout.count("STARTTLS and the login are checked with a user") == 2


def test_missing_role_names_the_permission_to_grant(rig: ProxyRig, dovecot: Dovecot) -> None:
    rig.add_user(OTHER_MAILBOX, PASSWORD, app="roleless", protocols=("imap",))
    done = doctor(rig.write(all_listeners(dovecot)), OTHER_MAILBOX)
    assert done.returncode == 1
    assert "[FAIL] app 'roleless': the token lacks the IMAP.AccessAsApp role" in done.stdout
    assert "Application permissions > IMAP.AccessAsApp; then Grant admin consent" in done.stdout
    # Only the protocols the user may use are checked.
    assert "POP.AccessAsApp" not in done.stdout


def test_bad_secret_is_reported_with_its_code_and_fix(rig: ProxyRig, dovecot: Dovecot) -> None:
    config = rig.write(all_listeners(dovecot))
    (config.parent / "client-secret").write_text("not-the-secret\n")
    done = doctor(config, MAILBOX)
    assert done.returncode == 1
    assert "[FAIL] app 'contoso': no token (permanent error [AADSTS7000215])" in done.stdout
    assert "fix: " in done.stdout
    assert "logged in" not in done.stdout  # no login is tried without a token


def test_upstream_refusal_shows_the_proxys_diagnosis(rig: ProxyRig, dovecot: Dovecot) -> None:
    rig.add_user("ghost", PASSWORD, mailbox="ghost@contoso.com")
    done = doctor(rig.write([Listener(upstream_port=dovecot.ports.imaps)]), "ghost")
    assert done.returncode == 1
    assert "login refused: NO [AUTHENTICATIONFAILED]" in done.stdout
    assert "the upstream rejected the token" in done.stdout
    assert "Likely causes" in done.stdout


def test_untrusted_upstream_certificate(rig: ProxyRig, dovecot: Dovecot) -> None:
    listener = Listener(upstream_port=dovecot.ports.imaps, trust_upstream=False)
    config = rig.write([listener])
    with_user = doctor(config, MAILBOX)
    assert with_user.returncode == 1
    assert "certificate verification failed" in with_user.stdout
    without = doctor(config)
    assert "[FAIL]" in without.stdout
    assert "certificate verification failed" in without.stdout
    assert "fix: upstream_ca_file" in without.stdout


def test_mailbox_outside_the_policy(rig: ProxyRig, dovecot: Dovecot) -> None:
    done = doctor(
        rig.write([Listener(upstream_port=dovecot.ports.imaps)]),
        MAILBOX,
        "--mailbox",
        OTHER_MAILBOX,
    )
    assert done.returncode == 1
    assert f"mailbox {OTHER_MAILBOX!r} is not in its mailboxes" in done.stdout


async def not_connected_upstream(
    pki: TestPki, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """An implicit-TLS IMAP server that behaves as Exchange does when the app may not open
    the mailbox: it accepts XOAUTH2, then refuses every command."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.issue("exchange-like", "localhost", "127.0.0.1"))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def handle(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, context, server_side=True)
        await tls.do_handshake()
        await tls.send_all(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n")
        buffer = b""
        while True:
            try:
                data = await tls.receive_some(65536)
            except trio.BrokenResourceError:  # the proxy hangs up without close_notify
                return
            if not data:
                return
            buffer += data
            while b"\r\n" in buffer:
                line, buffer = buffer.split(b"\r\n", 1)
                tag, _, rest = line.partition(b" ")
                if rest.upper().startswith(b"CAPABILITY"):
                    await tls.send_all(b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2\r\n")
                    await tls.send_all(tag + b" OK done\r\n")
                elif rest.upper().startswith(b"AUTHENTICATE XOAUTH2 "):
                    payload = base64.b64decode(rest.split()[-1])
                    assert payload.startswith(f"user={MAILBOX}\x01auth=Bearer ".encode())
                    await tls.send_all(tag + b" OK AUTHENTICATE completed.\r\n")
                else:
                    await tls.send_all(tag + b" BAD User is authenticated but not connected.\r\n")

    async with trio.open_nursery() as nursery:
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handle, listeners, handler_nursery=nursery)


async def test_authenticated_but_not_connected_names_the_mailbox_permission(
    nursery: trio.Nursery, rig: ProxyRig, pki: TestPki
) -> None:
    port = await nursery.start(not_connected_upstream, pki)
    config = rig.write([Listener(upstream_port=port)])
    done = await in_thread(lambda: doctor(config, MAILBOX))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "but EXAMINE INBOX failed: BAD User is authenticated but not connected" in done.stdout
    assert "Add-MailboxPermission" in done.stdout
