"""App identities end to end: TLS client certificates with SASL EXTERNAL (and with a
password), app keys swapped for the real token, and mailbox policies.

Every login that succeeds is verified by Dovecot, which checks the token the proxy obtained
from the emulated Entra; every refusal must look like a wrong password to the client.
"""

from __future__ import annotations

import base64
import hashlib
import imaplib
import json
import secrets
import smtplib
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.e2e.conftest import (
    MAILBOX,
    OTHER_MAILBOX,
    PASSWORD,
    Listener,
    ProxyRig,
    RunningProxy,
    start_proxy,
)
from tests.e2e.helpers import in_thread, message, msmtp_send, run, starttls_listener, tls_context
from tests.support.certs import TestPki

if TYPE_CHECKING:
    from pathlib import Path

    import trio

    from tests.support.dovecot import Dovecot
    from tests.support.smtpsink import SmtpSink

pytestmark = [pytest.mark.e2e]


@dataclass(frozen=True)
class ClientCertificate:
    key: Path
    chain: Path
    fingerprint: str
    subject: str

    def context(self, pki: TestPki) -> ssl.SSLContext:
        """A client context that trusts the proxy and presents this certificate."""
        context = tls_context(pki)
        context.load_cert_chain(self.chain, self.key)
        return context


@dataclass(frozen=True)
class ClientPki:
    """A CA for client certificates, separate from the one that issued the proxy's."""

    ca_file: Path
    scanner: ClientCertificate  # configured by fingerprint
    printer: ClientCertificate  # configured by subject
    stranger: ClientCertificate  # issued by the same CA, configured for no one


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> ClientPki:
    pki = TestPki(tmp_path_factory.mktemp("client-pki"))

    def issue(name: str) -> ClientCertificate:
        key, chain = pki.issue_split(name, f"{name}.contoso.com")
        leaf = x509.load_pem_x509_certificate(chain.read_bytes())
        return ClientCertificate(
            key,
            chain,
            leaf.fingerprint(hashes.SHA256()).hex(),
            leaf.subject.rfc4514_string(),
        )

    return ClientPki(pki.ca_file, issue("scanner"), issue("printer"), issue("stranger"))


def toml(value: str | list[str]) -> str:
    return json.dumps(value)  # TOML basic strings and arrays of them are JSON's


def client_ca(clients: ClientPki, mode: str = "optional") -> dict[str, str]:
    return {"client_ca_file": toml(str(clients.ca_file)), "client_certificates": toml(mode)}


def audit(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "xoauth2_proxy.audit"]


def imap(proxy: RunningProxy, context: ssl.SSLContext) -> imaplib.IMAP4_SSL:
    return imaplib.IMAP4_SSL("localhost", proxy.port, ssl_context=context, timeout=30)


def authenticate(client: imaplib.IMAP4, mechanism: str, first: bytes) -> str:
    """AUTHENTICATE with ``first`` as the response to the first challenge and an empty one
    to any error challenge after it; return the tagged reply's text, OK or NO."""
    responses = iter((first,))
    try:
        typ, _ = client.authenticate(mechanism, lambda _challenge: next(responses, b""))
    except imaplib.IMAP4.error as exc:
        return f"NO {exc}"
    return str(typ)


def read_inbox(client: imaplib.IMAP4) -> int:
    """SELECT INBOX through the relayed session; the number of messages in it."""
    typ, data = client.select("INBOX")
    assert typ == "OK", data
    assert data[0] is not None
    return int(data[0])


# === TLS client certificates ==============================================================


async def test_imap_external_opens_the_default_and_an_allowed_mailbox(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    clients: ClientPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig.add_user(
        "scanner01",
        None,
        mailbox=MAILBOX,
        extra={
            "certificate_fingerprint": toml("sha256:" + clients.scanner.fingerprint.upper()),
            "mailboxes": toml([MAILBOX, "scanner@*"]),
        },
    )
    listener = Listener(upstream_port=dovecot.ports.imaps, extra=client_ca(clients))
    proxy = await start_proxy(nursery, rig.write([listener]))
    dovecot.deliver(OTHER_MAILBOX, message(1000, "for-the-scanner"))

    def logins() -> list[tuple[str, bytes | None]]:
        """Each login's reply, and the messages with the scanner's subject it sees."""
        results: list[tuple[str, bytes | None]] = []
        for authzid in (b"", OTHER_MAILBOX.encode(), b"ceo@contoso.com"):
            with imap(proxy, clients.scanner.context(pki)) as client:
                assert "AUTH=EXTERNAL" in client.capabilities
                reply = authenticate(client, "EXTERNAL", authzid)
                found = None
                if reply.startswith("OK"):
                    read_inbox(client)
                    found = client.search(None, "SUBJECT", '"for-the-scanner"')[1][0]
                results.append((reply, found))
        return results

    default, other, outside = await in_thread(logins)
    assert default[0].startswith("OK")
    assert default[1] == b""  # the scanner's message is not in the default mailbox...
    assert other[0].startswith("OK")
    assert other[1]  # ...but in the one it asked for
    assert "[AUTHENTICATIONFAILED]" in outside[0]
    lines = audit(caplog)
    assert [(a["login"], a["kind"], a["mailbox"], a["result"]) for a in lines] == [
        ("scanner01", "certificate", MAILBOX, "success"),
        ("scanner01", "certificate", OTHER_MAILBOX, "success"),
        ("ceo@contoso.com", "certificate", "", "failure"),  # what the client asked for
    ]
    assert "mailbox 'ceo@contoso.com' is not in user 'scanner01'" in lines[2]["reason"]


async def test_external_after_starttls(
    nursery: trio.Nursery, rig: ProxyRig, dovecot: Dovecot, pki: TestPki, clients: ClientPki
) -> None:
    """The certificate comes with the TLS that STARTTLS starts, not with the connection."""
    rig.add_user(
        "scanner01",
        None,
        mailbox=MAILBOX,
        extra={"certificate_fingerprint": toml(clients.scanner.fingerprint)},
    )
    listener = Listener(tls="starttls", upstream_port=dovecot.ports.imaps, extra=client_ca(clients))
    proxy = await start_proxy(nursery, rig.write([listener]))

    def login() -> tuple[str, str]:
        with imaplib.IMAP4("localhost", proxy.port, timeout=30) as client:
            before = authenticate(client, "EXTERNAL", b"")  # refused before TLS
            client.starttls(ssl_context=clients.scanner.context(pki))
            after = authenticate(client, "EXTERNAL", b"")
            read_inbox(client)
            return before, after

    before, after = await in_thread(login)
    assert "[PRIVACYREQUIRED]" in before
    assert after.startswith("OK")


async def test_external_refuses_unknown_and_missing_certificates(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    clients: ClientPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig.add_user(
        "scanner01",
        None,
        extra={"certificate_fingerprint": toml(clients.scanner.fingerprint)},
        mailbox=MAILBOX,
    )
    listener = Listener(upstream_port=dovecot.ports.imaps, extra=client_ca(clients))
    proxy = await start_proxy(nursery, rig.write([listener]))

    def attempts() -> list[str]:
        replies = []
        for context in (clients.stranger.context(pki), tls_context(pki)):
            with imap(proxy, context) as client:
                replies.append(authenticate(client, "EXTERNAL", b""))
        return replies

    stranger, anonymous = await in_thread(attempts)
    assert "[AUTHENTICATIONFAILED]" in stranger
    assert "[AUTHENTICATIONFAILED]" in anonymous
    reasons = [a["reason"] for a in audit(caplog)]
    assert clients.stranger.fingerprint in reasons[0]
    assert "no client certificate" in reasons[1]


async def test_required_client_certificate_refuses_the_handshake(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    clients: ClientPki,
) -> None:
    rig.add_user(
        "printer",
        None,
        mailbox=MAILBOX,
        extra={"certificate_subject": toml(clients.printer.subject)},
    )
    listener = Listener(upstream_port=dovecot.ports.imaps, extra=client_ca(clients, "required"))
    proxy = await start_proxy(nursery, rig.write([listener]))

    def without_certificate() -> None:
        # TLS 1.3 reports the refused certificate at the client's first read.
        with pytest.raises((ssl.SSLError, imaplib.IMAP4.abort, ConnectionError, OSError)):
            imap(proxy, tls_context(pki))

    def with_certificate() -> str:
        with imap(proxy, clients.printer.context(pki)) as client:
            return authenticate(client, "EXTERNAL", b"")

    await in_thread(without_certificate)
    assert (await in_thread(with_certificate)).startswith("OK")


async def test_password_login_bound_to_a_certificate(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    clients: ClientPki,
) -> None:
    """A user with a certificate and a password needs both: LOGIN works only over a
    connection that presented that certificate."""
    rig.add_user(
        "kiosk",
        PASSWORD,
        mailbox=MAILBOX,
        extra={"certificate_fingerprint": toml(clients.scanner.fingerprint)},
    )
    rig.limits.update(failure_delay=0)
    listener = Listener(upstream_port=dovecot.ports.imaps, extra=client_ca(clients))
    proxy = await start_proxy(nursery, rig.write([listener]))

    def login(context: ssl.SSLContext) -> str:
        with imap(proxy, context) as client:
            try:
                typ, _ = client.login("kiosk", PASSWORD)
            except imaplib.IMAP4.error as exc:
                return f"NO {exc}"
            read_inbox(client)
            return str(typ)

    replies = await in_thread(
        lambda: [
            login(tls_context(pki)),
            login(clients.stranger.context(pki)),
            login(clients.scanner.context(pki)),
        ]
    )
    assert "[AUTHENTICATIONFAILED]" in replies[0]
    assert "[AUTHENTICATIONFAILED]" in replies[1]
    assert replies[2] == "OK"


async def test_pop3_and_smtp_external_with_curl(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    clients: ClientPki,
    sink: SmtpSink,
    tmp_path: Path,
) -> None:
    """curl as a scanner runs it: client certificate, ``AUTH=EXTERNAL``, no password."""
    assert dovecot.ports.submission is not None
    rig.add_user(
        "printer",
        None,
        mailbox=MAILBOX,
        extra={"certificate_subject": toml(clients.printer.subject)},
    )
    body = message(5000, "curl-external-pop3")
    dovecot.deliver(MAILBOX, body)
    proxy = await start_proxy(
        nursery,
        rig.write(
            [
                Listener(
                    protocol="pop3", upstream_port=dovecot.ports.pop3s, extra=client_ca(clients)
                ),
                Listener(
                    protocol="smtp",
                    upstream_port=dovecot.ports.submission,
                    upstream_tls="starttls",
                    extra=client_ca(clients),
                ),
            ]
        ),
    )
    certificate = clients.printer
    common = [
        "curl",
        "--silent",
        "--show-error",
        "--cacert",
        str(pki.ca_file),
        "--cert",
        str(certificate.chain),
        "--key",
        str(certificate.key),
        "--login-options",
        "AUTH=EXTERNAL",
        "--user",
        f"{MAILBOX}:",  # with EXTERNAL, curl sends the user name as the authorization id
    ]

    def list_and_fetch() -> list[bytes]:
        url = f"pop3s://localhost:{proxy.port_of(0)}/"
        listing = run([*common, url], home=tmp_path).stdout
        numbers = [line.split()[0].decode() for line in listing.splitlines() if line.strip()]
        return [run([*common, url + n], home=tmp_path).stdout for n in numbers]

    assert body in await in_thread(list_and_fetch)

    sent = message(3000, "curl-external-smtp")
    before = len(sink.messages)
    await in_thread(
        lambda: run(
            [
                *common,
                "--mail-from",
                MAILBOX,
                "--mail-rcpt",
                "someone@example.com",
                "--upload-file",
                "-",
                f"smtps://localhost:{proxy.port_of(1)}",
            ],
            home=tmp_path,
            stdin=sent,
        )
    )
    received = await in_thread(lambda: sink.wait_for(before + 1, timeout=10))
    assert any(m.data.endswith(sent) for m in received[before:])


# === App keys =============================================================================


def app_key() -> tuple[str, str]:
    """A key as ``xoauth2-proxy app-key`` makes one, and its configuration line's value."""
    key = secrets.token_urlsafe(32)
    return key, "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def xoauth2(user: str, token: str) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


async def test_imap_xoauth2_app_key_is_swapped_for_the_real_token(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    key, key_hash = app_key()
    rig.limits.update(failure_delay=0)
    rig.add_user(
        "erp",
        None,
        mailbox=MAILBOX,
        extra={"app_key_hash": toml(key_hash), "mailboxes": toml([MAILBOX])},
    )
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)]))
    dovecot.deliver(MAILBOX, message(2000, "app-key-imap"))

    def attempts() -> list[str]:
        replies = []
        for user, token in (
            (MAILBOX, key),
            (MAILBOX, "not-" + key),
            (OTHER_MAILBOX, key),  # outside the identity's mailbox policy
        ):
            with imap(proxy, tls_context(pki)) as client:
                assert "AUTH=XOAUTH2" in client.capabilities
                reply = authenticate(client, "XOAUTH2", xoauth2(user, token))
                if reply.startswith("OK"):
                    assert read_inbox(client) >= 1
                    typ, data = client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
                    assert typ == "OK"
                    assert isinstance(data[0], tuple)
                    assert b"Subject:" in data[0][1]
                replies.append(reply)
        return replies

    good, bad_key, other = await in_thread(attempts)
    assert good.startswith("OK")
    assert "[AUTHENTICATIONFAILED]" in bad_key
    assert "[AUTHENTICATIONFAILED]" in other
    lines = audit(caplog)
    assert [(a["kind"], a["result"]) for a in lines] == [
        ("app-key", "success"),
        ("app-key", "failure"),
        ("app-key", "failure"),
    ]
    assert OTHER_MAILBOX in lines[2]["reason"]
    logs = caplog.text
    assert key not in logs
    assert base64.b64encode(xoauth2(MAILBOX, key)).decode() not in logs


async def test_pop3_xoauth2_and_smtp_oauthbearer_app_keys(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    sink: SmtpSink,
    tmp_path: Path,
) -> None:
    assert dovecot.ports.submission is not None
    key, key_hash = app_key()
    rig.add_user("erp", None, mailbox=MAILBOX, extra={"app_key_hash": toml(key_hash)})
    body = message(4000, "app-key-pop3")
    dovecot.deliver(MAILBOX, body)
    proxy = await start_proxy(
        nursery,
        rig.write(
            [
                Listener(protocol="pop3", upstream_port=dovecot.ports.pop3s),
                Listener(
                    protocol="smtp", upstream_port=dovecot.ports.submission, upstream_tls="starttls"
                ),
            ]
        ),
    )

    def pop3() -> list[bytes]:
        """curl as a script runs it with ``--oauth2-bearer``: the app key is its token."""
        common = [
            "curl",
            "--silent",
            "--show-error",
            "--cacert",
            str(pki.ca_file),
            "--login-options",
            "AUTH=XOAUTH2",
            "--user",
            MAILBOX,
            "--oauth2-bearer",
            key,
        ]
        url = f"pop3s://localhost:{proxy.port_of(0)}/"
        listing = run([*common, url], home=tmp_path).stdout
        numbers = [line.split()[0].decode() for line in listing.splitlines() if line.strip()]
        return [run([*common, url + n], home=tmp_path).stdout for n in numbers]

    assert body in await in_thread(pop3)

    sent = message(2500, "app-key-smtp")
    before = len(sink.messages)

    def smtp() -> None:
        with smtplib.SMTP_SSL("localhost", proxy.port_of(1), context=tls_context(pki)) as client:
            client.ehlo()
            assert "OAUTHBEARER" in client.esmtp_features["auth"]
            bearer = f"n,a={MAILBOX},\x01auth=Bearer {key}\x01\x01"
            client.auth("OAUTHBEARER", lambda challenge=None: bearer)
            client.sendmail(MAILBOX, ["someone@example.com"], sent)

    await in_thread(smtp)
    received = await in_thread(lambda: sink.wait_for(before + 1, timeout=10))
    assert any(m.data.endswith(sent) for m in received[before:])


async def test_msmtp_sends_with_an_app_key(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    sink: SmtpSink,
    tmp_path: Path,
) -> None:
    """msmtp speaks XOAUTH2 itself: it holds an app key, never the tenant's secret."""
    key, key_hash = app_key()
    rig.add_user("erp", None, mailbox=MAILBOX, extra={"app_key_hash": toml(key_hash)})
    proxy = await start_proxy(nursery, rig.write([starttls_listener(dovecot)]))
    body = message(8000, "msmtp-app-key")
    before = len(sink.messages)
    await in_thread(
        lambda: msmtp_send(pki, proxy.port, tmp_path, auth="xoauth2", secret=key, body=body)
    )
    received = await in_thread(lambda: sink.wait_for(before + 1, timeout=10))
    assert any(m.data.endswith(body) for m in received[before:])
