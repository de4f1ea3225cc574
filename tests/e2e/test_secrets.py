"""No secret in any log record, at any level, whatever the protocol or the outcome, in
the text format and in the JSON one.

Every way a secret crosses the proxy is exercised (IMAP LOGIN and AUTHENTICATE PLAIN,
POP3 USER/PASS, AUTH PLAIN and AUTH LOGIN, SMTP AUTH PLAIN and AUTH LOGIN, an app key
over XOAUTH2, wrong passwords and keys too), then every captured record is searched for
each secret raw, in base64 at each of the three alignments it can have inside a longer
base64 message, and for the whole SASL messages as they travelled.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import imaplib
import json
import poplib
import smtplib
from typing import TYPE_CHECKING

import pytest

from proxy.ops.logs import JsonFormatter
from tests.e2e.conftest import CLIENT_SECRET, MAILBOX, PASSWORD, Listener, ProxyRig, start_proxy
from tests.e2e.helpers import in_thread, starttls_listener, tls_context

if TYPE_CHECKING:
    from collections.abc import Iterator

    import trio

    from tests.support.certs import TestPki
    from tests.support.dovecot import Dovecot

pytestmark = [pytest.mark.e2e]

WRONG = "wrong-" + PASSWORD
APP_KEY = "xo2k_test-app-key-for-the-secrets-scan-0123456789"


def encodings(secret: bytes) -> Iterator[bytes]:
    """``secret`` raw, and the base64 characters that encode only it when it starts at any
    offset of a longer base64 message (the first and last few characters also carry its
    neighbours, so they are left out)."""
    yield secret
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + secret + b"\0\0\0")
        start = -(-offset * 4 // 3) + 1  # past the characters shared with the prefix
        end = (offset + len(secret)) * 4 // 3 - 1
        yield encoded[start:end]


def plain(login: str, password: str) -> bytes:
    return base64.b64encode(f"\0{login}\0{password}".encode())


async def test_no_secret_in_any_log_record(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert dovecot.ports.submission is not None
    rig.limits.update(failure_delay=0)
    rig.add_user(
        "erp",
        None,
        mailbox=MAILBOX,
        extra={"app_key_hash": f'"sha256:{hashlib.sha256(APP_KEY.encode()).hexdigest()}"'},
    )
    proxy = await start_proxy(
        nursery,
        rig.write(
            [
                Listener(upstream_port=dovecot.ports.imaps),
                Listener(protocol="pop3", upstream_port=dovecot.ports.pop3s),
                starttls_listener(dovecot),
            ]
        ),
    )
    context = tls_context(pki)

    def imap() -> None:
        for password in (PASSWORD, WRONG):
            with imaplib.IMAP4_SSL("localhost", proxy.port_of(0), ssl_context=context) as client:
                try:
                    client.login(MAILBOX, password)
                except imaplib.IMAP4.error:
                    continue
                client.select("INBOX")
        with imaplib.IMAP4_SSL("localhost", proxy.port_of(0), ssl_context=context) as client:
            client.authenticate("PLAIN", lambda _: f"\0{MAILBOX}\0{PASSWORD}".encode())
        for key in (APP_KEY, "not-" + APP_KEY):
            bearer = f"user={MAILBOX}\x01auth=Bearer {key}\x01\x01".encode()
            with (
                imaplib.IMAP4_SSL("localhost", proxy.port_of(0), ssl_context=context) as client,
                contextlib.suppress(imaplib.IMAP4.error),
            ):

                def respond(challenge: bytes, bearer: bytes = bearer) -> bytes:
                    # The bearer message, then an empty answer to the error challenge.
                    return b"" if challenge else bearer

                client.authenticate("XOAUTH2", respond)

    def pop3() -> None:
        for password in (PASSWORD, WRONG):
            client = poplib.POP3_SSL("localhost", proxy.port_of(1), context=context)
            try:
                client.user(MAILBOX)
                client.pass_(password)
                client.stat()
            except poplib.error_proto:
                pass
            finally:
                client.close()
        client = poplib.POP3_SSL("localhost", proxy.port_of(1), context=context)
        try:
            client._shortcmd("AUTH PLAIN " + plain(MAILBOX, PASSWORD).decode())  # type: ignore[attr-defined]
            client.quit()
        finally:
            client.close()
        client = poplib.POP3_SSL("localhost", proxy.port_of(1), context=context)
        try:
            client._shortcmd("AUTH LOGIN")  # type: ignore[attr-defined]
            client._shortcmd(base64.b64encode(MAILBOX.encode()).decode())  # type: ignore[attr-defined]
            client._shortcmd(base64.b64encode(PASSWORD.encode()).decode())  # type: ignore[attr-defined]
            client.quit()
        finally:
            client.close()

    def smtp() -> None:
        for mechanism, password in (("PLAIN", PASSWORD), ("LOGIN", PASSWORD), ("PLAIN", WRONG)):
            with smtplib.SMTP("localhost", proxy.port_of(2), timeout=30) as client:
                client.starttls(context=context)
                client.ehlo()
                client.user, client.password = MAILBOX, password
                authobject = client.auth_plain if mechanism == "PLAIN" else client.auth_login
                with contextlib.suppress(smtplib.SMTPAuthenticationError):
                    client.auth(mechanism, authobject)

    await in_thread(imap)
    await in_thread(pop3)
    await in_thread(smtp)
    audit = [r for r in caplog.records if r.name == "xoauth2_proxy.audit"]
    assert len(audit) == 12, [r.getMessage() for r in audit]  # every attempt was made

    token = (await proxy.tokens.token("contoso")).value  # the token every login used
    secrets = [PASSWORD, WRONG, CLIENT_SECRET, token, APP_KEY]
    messages = [
        plain(MAILBOX, PASSWORD),
        plain(MAILBOX, WRONG),
        base64.b64encode(f"user={MAILBOX}\x01auth=Bearer {token}\x01\x01".encode()),
        base64.b64encode(f"user={MAILBOX}\x01auth=Bearer {APP_KEY}\x01\x01".encode()),
    ]
    text = "\n".join(f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records)
    # The JSON log format writes every field a record carries: decoded, so that escaping
    # (a quote in the password is written \") cannot hide a secret from the scan.
    formatter = JsonFormatter()
    as_json = "\n".join(
        " ".join(str(v) for v in json.loads(formatter.format(r)).values()) for r in caplog.records
    )
    records = f"{text}\n{as_json}".encode()
    assert len(records) > 10_000  # DEBUG records of every library are in the scan
    for secret in secrets:
        for form in encodings(secret.encode()):
            assert form not in records, f"a secret ({len(secret)} chars) is in the log"
    for message in messages:
        assert message not in records
