"""The Dovecot rig verifies Entra-style tokens the way Exchange Online would.

These tests sign tokens themselves and log in with the standard library clients, so they prove
the rig (tests/support/dovecot.py and smtpsink.py) before any proxy test relies on it: valid
app-only tokens open the mailbox on every protocol and port, messages come back byte-exact,
and every kind of bad token, or an unknown mailbox, gets the protocol's permanent failure
after the error challenge has been answered.
"""

from __future__ import annotations

import base64
import imaplib
import json
import os
import poplib
import re
import secrets
import smtplib
import socket
import ssl
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support import dovecot as dovecot_module
from tests.support.certs import TestPki
from tests.support.dovecot import Dovecot, DovecotPorts, key_file_name
from tests.support.smtpsink import SmtpSink

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

pytestmark = pytest.mark.e2e

AUDIENCE = "https://outlook.office365.com"
TENANT = str(uuid.UUID(int=0x72F988BF86F141AF91AB2D7CD011DB47))
ISSUER = f"https://sts.windows.net/{TENANT}/"
APP_ID = "11111111-2222-3333-4444-555555555555"
SERVICE_PRINCIPAL = "9f3c2a1e-7b4d-4e8f-a6c5-1d2e3f4a5b6c"
# Contains both characters Dovecot escapes in key paths, so every login here proves the escaping.
KID = "rig-key/2025%1"
MAILBOX = "reports@contoso.com"
POP3_MAILBOX = "scanner@contoso.com"  # POP3 sessions lock their mailbox: keep them apart
MAILBOXES = (MAILBOX, POP3_MAILBOX)

XOAUTH2_ERROR = {"status": "401", "schemes": "bearer", "scope": "mail"}
OAUTHBEARER_ERROR = {"status": "invalid_token"}


# -- tokens and messages ---------------------------------------------------------------------


def sign(
    key: rsa.RSAPrivateKey,
    *,
    kid: str = KID,
    audience: str = AUDIENCE,
    issuer: str = ISSUER,
    valid_from: int = -300,
    lifetime: int = 3600,
    typ: str | None = "JWT",
) -> str:
    """An app-only access token shaped like Entra's v1 tokens for Exchange Online."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "aud": audience,
        "iss": issuer,
        "iat": now + valid_from,
        "nbf": now + valid_from,
        "exp": now + valid_from + lifetime,
        "aio": base64.b64encode(secrets.token_bytes(90)).decode(),
        "app_displayname": "Contoso reports",
        "appid": APP_ID,
        "appidacr": "1",
        "idp": issuer,
        "idtyp": "app",
        "oid": SERVICE_PRINCIPAL,
        "rh": "0.AQ4A" + secrets.token_urlsafe(40) + ".",
        "roles": ["IMAP.AccessAsApp", "POP.AccessAsApp", "SMTP.SendAsApp"],
        "sid": str(uuid.uuid4()),
        "sub": SERVICE_PRINCIPAL,
        "tid": TENANT,
        "uti": secrets.token_urlsafe(16),
        "ver": "1.0",
        "wids": ["0997a1d0-0d1d-4acb-b408-d5ca73121e90"],
    }
    headers = {"typ": typ, "kid": kid, "x5t": secrets.token_urlsafe(20)}
    # PyJWT adds typ=JWT unless told typ=None, which leaves typ out.
    return jwt.encode(claims, key, algorithm="RS256", headers=headers)


def xoauth2(user: str, token: str) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def oauthbearer(user: str, token: str) -> bytes:
    return f"n,a={user},\x01auth=Bearer {token}\x01\x01".encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def new_message(tag: str) -> tuple[str, bytes]:
    """A CRLF message with 8-bit text and lines that need dot-stuffing; returns (id, bytes)."""
    message_id = f"<{tag}.{secrets.token_hex(8)}@rig.test>"
    head = (
        f"From: Contoso Reports <{MAILBOX}>\r\n"
        "To: Someone <someone@example.com>\r\n"
        f"Subject: rig {tag}\r\n"
        f"Message-ID: {message_id}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
    )
    body = "Caf\u00e9 \u2615\r\n.leading dot\r\n..two dots\r\n.\r\n\r\nend\r\n"
    return message_id, (head + body).encode()


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def public_pem(signing_key: rsa.RSAPrivateKey) -> bytes:
    return signing_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


@pytest.fixture(scope="module")
def dovecot(
    tmp_path_factory: pytest.TempPathFactory, public_pem: bytes, sink: SmtpSink
) -> Iterator[Dovecot]:
    pki = TestPki(tmp_path_factory.mktemp("pki"))
    with Dovecot(
        tmp_path_factory.mktemp("dovecot"),
        pki=pki,
        jwt_public_key_pem=public_pem,
        kid=KID,
        issuer=ISSUER,
        audience=AUDIENCE,
        mailboxes=MAILBOXES,
        smtp_relay=sink.address,
    ) as dc:
        yield dc


@pytest.fixture(autouse=True)
def _show_dovecot_log_on_failure(dovecot: Dovecot) -> Iterator[None]:
    """Print this test's part of Dovecot's log; pytest shows it only if the test fails."""
    start = len(dovecot.log_text())
    yield
    print(f"--- Dovecot log during this test ---\n{dovecot.log_text()[start:]}")


@pytest.fixture
def tls(dovecot: Dovecot) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(dovecot.ca_file))


@pytest.fixture
def token(signing_key: rsa.RSAPrivateKey) -> str:
    return sign(signing_key)


# -- protocol helpers --------------------------------------------------------------------------


@dataclass
class Outcome:
    """How one authentication ended, and the challenges the server sent on the way."""

    ok: bool
    reply: str
    challenges: list[bytes] = field(default_factory=list)


def sasl_responder(
    initial: bytes, error_answer: bytes = b""
) -> tuple[Callable[[bytes], bytes], list[bytes]]:
    """An imaplib authobject: the initial response first, then ``error_answer`` to anything."""
    challenges: list[bytes] = []

    def respond(challenge: bytes) -> bytes:
        challenges.append(challenge)
        return initial if len(challenges) == 1 else error_answer

    return respond, challenges


def imap_auth(imap: imaplib.IMAP4, mechanism: str, initial: bytes) -> Outcome:
    respond, challenges = sasl_responder(initial, b"\x01" if mechanism == "OAUTHBEARER" else b"")
    try:
        typ, data = imap.authenticate(mechanism, respond)
    except imaplib.IMAP4.error as exc:
        return Outcome(False, str(exc), challenges)
    return Outcome(typ == "OK", str(data), challenges)


def imaps_login(dc: Dovecot, tls: ssl.SSLContext, user: str, token: str) -> Outcome:
    with imaplib.IMAP4_SSL(dc.host, dc.ports.imaps, ssl_context=tls) as imap:
        return imap_auth(imap, "XOAUTH2", xoauth2(user, token))


def pop3_command(pop: poplib.POP3, line: str) -> bytes:
    """Send one line and read the one-line reply; poplib has no public call for AUTH."""
    reply: bytes = pop._shortcmd(line)  # type: ignore[attr-defined]
    return reply


def pop3_auth(pop: poplib.POP3, user: str, token: str) -> Outcome:
    """AUTH XOAUTH2 in two steps: the token never goes on the AUTH line (RFC 5034 limits)."""
    challenges = [pop3_command(pop, "AUTH XOAUTH2")]
    try:
        reply = pop3_command(pop, b64(xoauth2(user, token)))
        if reply.startswith(b"+ "):  # error challenge: answer it with an empty line
            challenges.append(reply)
            reply = pop3_command(pop, "")
    except poplib.error_proto as exc:
        return Outcome(False, str(exc.args[0], "ascii"), challenges)
    return Outcome(reply.startswith(b"+OK"), reply.decode(), challenges)


def pop3s_login(dc: Dovecot, tls: ssl.SSLContext, user: str, token: str) -> Outcome:
    pop = poplib.POP3_SSL(dc.host, dc.ports.pop3s, context=tls)
    try:
        return pop3_auth(pop, user, token)
    finally:
        pop.close()


def smtp_auth(smtp: smtplib.SMTP, user: str, token: str) -> Outcome:
    """AUTH XOAUTH2, wait for 334, then the token: Dovecot refuses it on the AUTH line."""
    code, text = smtp.docmd("AUTH", "XOAUTH2")
    challenges = [text]
    assert code == 334, (code, text)
    code, text = smtp.docmd(b64(xoauth2(user, token)))
    if code == 334:  # error challenge: answer it with an empty line
        challenges.append(text)
        code, text = smtp.docmd("")
    return Outcome(code == 235, f"{code} {text.decode()}", challenges)


def submissions_login(dc: Dovecot, tls: ssl.SSLContext, user: str, token: str) -> Outcome:
    assert dc.ports.submissions is not None
    with smtplib.SMTP_SSL(dc.host, dc.ports.submissions, context=tls) as smtp:
        smtp.ehlo()
        return smtp_auth(smtp, user, token)


def decode_challenge(challenge: bytes) -> object:
    """The JSON inside an error challenge, as the client library handed it over."""
    text = challenge.removeprefix(b"+ ")
    raw = text if text.startswith(b"{") else base64.b64decode(text, validate=True)
    return json.loads(raw)


def fetch_by_message_id(imap: imaplib.IMAP4, message_id: str) -> bytes:
    typ, data = imap.uid("SEARCH", "HEADER", "Message-ID", message_id)
    assert typ == "OK", data
    uids = data[0].split() if isinstance(data[0], bytes) else []
    assert len(uids) == 1, f"{message_id} matched {uids}"
    typ, data = imap.uid("FETCH", uids[0].decode(), "(BODY.PEEK[])")
    assert typ == "OK", data
    part = data[0]
    assert isinstance(part, tuple), data
    body = part[1]
    assert isinstance(body, bytes), data
    return body


# -- the rig itself ----------------------------------------------------------------------------


def test_starts_quickly_on_private_loopback_ports(dovecot: Dovecot) -> None:
    assert dovecot.host == "127.0.0.1"
    assert dovecot.startup_seconds is not None
    assert dovecot.startup_seconds < 2, dovecot.startup_seconds
    ports = dovecot.ports
    assert isinstance(ports, DovecotPorts)
    values = [ports.imap, ports.imaps, ports.pop3, ports.pop3s, ports.submission, ports.submissions]
    assert None not in values
    assert len(set(values)) == 6
    config = dovecot.config_file.read_text()
    assert "/etc/dovecot" not in config
    assert f"base_dir = {dovecot.base_dir}" in config
    assert "listen = 127.0.0.1, 127.0.0.2" in config
    key = dovecot.keys_dir / "default" / "RS256" / "rig-key%2f2025%251"
    assert key.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")


def test_key_file_name_escapes_like_dovecot() -> None:
    assert key_file_name("a/b%c") == "a%2fb%25c"
    assert key_file_name("nOo3ZDrODXEK1jKWhXslHR_KXEg") == "nOo3ZDrODXEK1jKWhXslHR_KXEg"
    assert key_file_name("a.b+c=") == "a.b+c="
    with pytest.raises(ValueError, match="unusable"):
        key_file_name("..")


def test_deliver_refuses_what_would_not_come_back_byte_exact(dovecot: Dovecot) -> None:
    with pytest.raises(ValueError, match="CRLF"):
        dovecot.deliver(MAILBOX, b"Subject: bare LF\n\nbody\n")
    with pytest.raises(ValueError, match="unknown mailbox"):
        dovecot.deliver("nobody@contoso.com", b"Subject: x\r\n\r\nbody\r\n")


def test_stop_reaps_every_process_even_when_the_test_fails(
    tmp_path: Path, public_pem: bytes
) -> None:
    pki = TestPki(tmp_path / "pki")
    dc = Dovecot(tmp_path / "dovecot", pki=pki, jwt_public_key_pem=public_pem, kid="k")
    seen: dict[str, int] = {}

    def failing_test_body() -> None:
        with dc:
            seen["pgid"] = dc.pid
            raise RuntimeError("test body failed")

    with pytest.raises(RuntimeError, match="test body failed"):
        failing_test_body()
    assert not dc.running
    with pytest.raises(ProcessLookupError):
        os.killpg(seen["pgid"], 0)
    ports = dc.ports
    assert ports.submission is None  # no relay, no submission service
    for port in (ports.imap, ports.imaps, ports.pop3, ports.pop3s):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((dc.host, port), timeout=1).close()
    if not dc.mail_root.is_relative_to(dc.workdir):
        assert not dc.mail_root.exists(), "private mail directory left behind"


def test_survives_a_taken_port_and_a_deep_work_directory(
    tmp_path: Path, public_pem: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port grabbed between picking and binding means a retry; long paths a short base_dir."""
    real_pick = dovecot_module._pick_ports
    with socket.create_server((dovecot_module.HOST, 0)) as squatter:
        taken = squatter.getsockname()[1]
        picks = iter([replace(real_pick(submission=False), pop3s=taken)])
        monkeypatch.setattr(
            dovecot_module,
            "_pick_ports",
            lambda submission: next(picks, None) or real_pick(submission=submission),
        )
        deep = tmp_path / ("d" * 60) / ("e" * 60)
        pki = TestPki(tmp_path / "pki")
        with Dovecot(deep, pki=pki, jwt_public_key_pem=public_pem, kid="k") as dc:
            assert "Address already in use" in dc.log_text()  # from the first attempt
            assert dc.running
            assert taken not in (dc.ports.imap, dc.ports.imaps, dc.ports.pop3, dc.ports.pop3s)
            assert not dc.base_dir.is_relative_to(deep)
            private_base_dir = dc.base_dir
            socket.create_connection((dc.host, dc.ports.imap), timeout=1).close()
    assert not private_base_dir.exists()


# -- IMAP --------------------------------------------------------------------------------------


def test_imaps_xoauth2_select_and_fetch_byte_exact(
    dovecot: Dovecot, tls: ssl.SSLContext, token: str
) -> None:
    message_id, message = new_message("imaps")
    dovecot.deliver(MAILBOX, message)
    with imaplib.IMAP4_SSL(dovecot.host, dovecot.ports.imaps, ssl_context=tls) as imap:
        assert "AUTH=XOAUTH2" in imap.capabilities
        outcome = imap_auth(imap, "XOAUTH2", xoauth2(MAILBOX, token))
        assert outcome.ok, outcome
        assert outcome.challenges == [b""]  # imaplib sends no SASL-IR: one empty "+ "
        typ, _ = imap.select("INBOX")
        assert typ == "OK"
        assert fetch_by_message_id(imap, message_id) == message


def test_imap_starttls_xoauth2_and_fetch(dovecot: Dovecot, tls: ssl.SSLContext, token: str) -> None:
    message_id, message = new_message("imap-starttls")
    dovecot.deliver(MAILBOX, message)
    with imaplib.IMAP4(dovecot.host, dovecot.ports.imap) as imap:
        assert "STARTTLS" in imap.capabilities
        typ, _ = imap.starttls(ssl_context=tls)
        assert typ == "OK"
        assert "STARTTLS" not in imap.capabilities
        # Login names are case-insensitive, as with Exchange (auth_username_format = %Lu).
        outcome = imap_auth(imap, "XOAUTH2", xoauth2(MAILBOX.upper(), token))
        assert outcome.ok, outcome
        imap.select("INBOX", readonly=True)
        assert fetch_by_message_id(imap, message_id) == message


def test_imap_oauthbearer(dovecot: Dovecot, tls: ssl.SSLContext, token: str) -> None:
    with imaplib.IMAP4_SSL(dovecot.host, dovecot.ports.imaps, ssl_context=tls) as imap:
        outcome = imap_auth(imap, "OAUTHBEARER", oauthbearer(MAILBOX, token))
        assert outcome.ok, outcome


def test_only_oauth_mechanisms_are_offered(dovecot: Dovecot, tls: ssl.SSLContext) -> None:
    with imaplib.IMAP4(dovecot.host, dovecot.ports.imap) as imap:
        auth = sorted(c for c in imap.capabilities if c.startswith("AUTH="))
        assert auth == ["AUTH=OAUTHBEARER", "AUTH=XOAUTH2"]
        assert "LOGINDISABLED" in imap.capabilities
        with pytest.raises(imaplib.IMAP4.error, match="Unsupported authentication mechanism"):
            imap.login(MAILBOX, "password")
    pop = poplib.POP3(dovecot.host, dovecot.ports.pop3)
    try:
        assert pop.capa()["SASL"] == ["XOAUTH2", "OAUTHBEARER"]
    finally:
        pop.close()
    assert dovecot.ports.submission is not None
    with smtplib.SMTP(dovecot.host, dovecot.ports.submission) as smtp:
        smtp.ehlo()
        assert smtp.esmtp_features["auth"].split() == ["XOAUTH2", "OAUTHBEARER"]


def test_loopback_counts_as_secured(dovecot: Dovecot, token: str) -> None:
    """Dovecot lets 127.0.0.1 authenticate without TLS: a proxy skipping STARTTLS would pass.

    Its log tells the two apart: "TLS" after a TLS login, "secured" after a plaintext one.
    """
    since = len(dovecot.log_text())
    with imaplib.IMAP4(dovecot.host, dovecot.ports.imap) as imap:
        assert "AUTH=XOAUTH2" in imap.capabilities
        outcome = imap_auth(imap, "XOAUTH2", xoauth2(MAILBOX, token))
        assert outcome.ok, outcome
    log = dovecot.wait_for_log("imap-login: Info: Login: ", since=since)
    assert f"Login: user=<{MAILBOX}>, method=XOAUTH2, rip=127.0.0.1" in log
    assert ", secured, session=" in log
    assert ", TLS, session=" not in log


def test_remote_host_requires_tls_and_does_not_match_the_certificate(
    dovecot: Dovecot, tls: ssl.SSLContext, token: str
) -> None:
    """Through 127.0.0.2, Dovecot treats the client as remote, as a real server would."""
    with imaplib.IMAP4(dovecot.remote_host, dovecot.ports.imap) as imap:
        assert [c for c in imap.capabilities if c.startswith("AUTH=")] == []
        outcome = imap_auth(imap, "XOAUTH2", xoauth2(MAILBOX, token))
        assert outcome == Outcome(False, "[PRIVACYREQUIRED] Plaintext authentication disabled.")
        ignore_name = ssl.create_default_context(cafile=str(dovecot.ca_file))
        ignore_name.check_hostname = False
        imap.starttls(ssl_context=ignore_name)
        assert "AUTH=XOAUTH2" in imap.capabilities
        outcome = imap_auth(imap, "XOAUTH2", xoauth2(MAILBOX, token))
        assert outcome.ok, outcome
    with (
        socket.create_connection((dovecot.remote_host, dovecot.ports.imaps)) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"),
    ):
        tls.wrap_socket(raw, server_hostname=dovecot.remote_host)


# -- rejections --------------------------------------------------------------------------------


FINAL_FAILURE = {
    "imap": "[AUTHENTICATIONFAILED] Authentication failed.",
    "pop3": "-ERR [AUTH] Authentication failed.",
    "submission": "535 5.7.8 Authentication failed.",
}


@dataclass(frozen=True)
class Rejection:
    """One login that must fail: how to attempt it, and why Dovecot should refuse it."""

    attempt: Callable[[], Outcome]
    log_reason: str  # what Dovecot's auth process logs, proving the failure is the one meant
    protocol: str = "imap"
    error: object = field(default_factory=lambda: XOAUTH2_ERROR)  # the error challenge JSON


def test_bad_tokens_and_unknown_mailboxes_are_rejected_after_the_error_challenge(
    dovecot: Dovecot, tls: ssl.SSLContext, signing_key: rsa.RSAPrivateKey
) -> None:
    """Every case fails permanently after the error challenge, for the reason we meant.

    Dovecot 2.3.19 holds a token failure for up to 0.5 s (auth_failure_delay = 0 does not
    avoid its 500 ms flush timer), so the cases run concurrently.
    """
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    good = sign(signing_key)

    def imaps(user: str, token: str) -> Callable[[], Outcome]:
        return lambda: imaps_login(dovecot, tls, user, token)

    def imaps_oauthbearer(token: str) -> Outcome:
        with imaplib.IMAP4_SSL(dovecot.host, dovecot.ports.imaps, ssl_context=tls) as imap:
            return imap_auth(imap, "OAUTHBEARER", oauthbearer(MAILBOX, token))

    cases = {
        "expired": Rejection(
            imaps(MAILBOX, sign(signing_key, valid_from=-7200)), "Token has expired"
        ),
        "garbled": Rejection(imaps(MAILBOX, "not-a-jwt"), "Not a JWT token"),
        "wrong audience": Rejection(
            imaps(MAILBOX, sign(signing_key, audience="https://graph.microsoft.com")),
            "client_id not found in aud field",
        ),
        "wrong key": Rejection(imaps(MAILBOX, sign(other_key)), "Bad signature"),
        "wrong issuer": Rejection(
            imaps(MAILBOX, sign(signing_key, issuer="https://sts.windows.net/evil/")),
            "Issuer 'https://sts.windows.net/evil/' is not allowed",
        ),
        "not yet valid: no clock leeway": Rejection(
            imaps(MAILBOX, sign(signing_key, valid_from=30)), "Token is not valid yet"
        ),
        "no typ header": Rejection(
            imaps(MAILBOX, sign(signing_key, typ=None)), "Cannot find 'typ' field"
        ),
        "unknown mailbox": Rejection(
            imaps("nobody@contoso.com", good),
            "passwd-file(nobody@contoso.com,127.0.0.1,",  # "<session>): unknown user"
        ),
        "oauthbearer garbled": Rejection(
            lambda: imaps_oauthbearer("not.a.jwt"),
            "Object doesn't begin with '{'",
            error=OAUTHBEARER_ERROR,
        ),
        "pop3 expired": Rejection(
            lambda: pop3s_login(dovecot, tls, POP3_MAILBOX, sign(signing_key, valid_from=-3900)),
            "Token has expired",
            protocol="pop3",
        ),
        "submission wrong audience": Rejection(
            lambda: submissions_login(dovecot, tls, MAILBOX, sign(signing_key, audience="x")),
            "client_id not found in aud field",
            protocol="submission",
        ),
    }
    since = len(dovecot.log_text())
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        futures = {name: pool.submit(case.attempt) for name, case in cases.items()}
        outcomes = {name: future.result(timeout=30) for name, future in futures.items()}

    for name, outcome in outcomes.items():
        case = cases[name]
        assert not outcome.ok, (name, outcome)
        assert outcome.reply == FINAL_FAILURE[case.protocol], (name, outcome)
        # The empty "+ " or "334 " that asked for the token, then the error challenge.
        assert len(outcome.challenges) == 2, (name, outcome)
        assert decode_challenge(outcome.challenges[1]) == case.error, (name, outcome)
    for reason, count in Counter(case.log_reason for case in cases.values()).items():
        dovecot.wait_for_log(reason, since=since, count=count)


# -- POP3 --------------------------------------------------------------------------------------


def retrieve_all(pop: poplib.POP3) -> list[bytes]:
    count, _ = pop.stat()
    messages = []
    for number in range(1, count + 1):
        _, lines, _ = pop.retr(number)  # poplib removes the dot-stuffing
        messages.append(b"".join(line + b"\r\n" for line in lines))
    return messages


@pytest.mark.parametrize("tls_mode", ["implicit", "stls"])
def test_pop3_xoauth2_in_two_steps_and_retr_byte_exact(
    dovecot: Dovecot, tls: ssl.SSLContext, token: str, tls_mode: str
) -> None:
    _, message = new_message(f"pop3-{tls_mode}")
    dovecot.deliver(POP3_MAILBOX, message)
    pop: poplib.POP3
    if tls_mode == "implicit":
        pop = poplib.POP3_SSL(dovecot.host, dovecot.ports.pop3s, context=tls)
    else:
        pop = poplib.POP3(dovecot.host, dovecot.ports.pop3)
        assert "STLS" in pop.capa()
        pop.stls(context=tls)
        assert "STLS" not in pop.capa()
    try:
        assert pop.getwelcome() == b"+OK Dovecot (Debian) ready."
        outcome = pop3_auth(pop, POP3_MAILBOX, token)
        assert outcome.ok, outcome
        assert outcome.challenges == [b"+ "]
        assert message in retrieve_all(pop)
        pop.quit()
    finally:
        pop.close()


# -- submission --------------------------------------------------------------------------------


def relayed_copy(sink: SmtpSink, message: bytes, count_before: int) -> tuple[bytes, bytes]:
    """Wait for the relayed message; split it into Dovecot's Received header and the rest."""
    for received in sink.wait_for(count_before + 1, timeout=10)[count_before:]:
        if received.data.endswith(message):
            prefix = received.data[: -len(message)]
            return prefix, received.data[len(prefix) :]
    raise AssertionError("message not relayed")


@pytest.mark.parametrize("tls_mode", ["starttls", "implicit"])
def test_submission_xoauth2_in_two_steps_relays_byte_exact(
    dovecot: Dovecot, sink: SmtpSink, tls: ssl.SSLContext, token: str, tls_mode: str
) -> None:
    _, message = new_message(f"submission-{tls_mode}")
    ports = dovecot.ports
    assert ports.submission is not None
    assert ports.submissions is not None
    count_before = len(sink.messages)
    smtp: smtplib.SMTP
    if tls_mode == "starttls":
        smtp = smtplib.SMTP(dovecot.host, ports.submission)
    else:
        smtp = smtplib.SMTP_SSL(dovecot.host, ports.submissions, context=tls)
    with smtp:
        code, greeting = smtp.ehlo()
        assert code == 250
        assert greeting.startswith(b"localhost\n")
        if tls_mode == "starttls":
            assert smtp.has_extn("starttls")
            smtp.starttls(context=tls)
            smtp.ehlo()
            assert not smtp.has_extn("starttls")
        outcome = smtp_auth(smtp, MAILBOX, token)
        assert outcome.ok, outcome
        assert outcome.challenges == [b""]  # "334 " with nothing after it
        refused = smtp.sendmail(MAILBOX, ["someone@example.com", "other@example.org"], message)
        assert refused == {}
    header, relayed = relayed_copy(sink, message, count_before)
    assert relayed == message
    # Dovecot's submission service prepends exactly one Received header, nothing else.
    assert re.fullmatch(rb"Received: from [^\r\n]*\r\n(?:\t[^\r\n]*\r\n)*", header), header
    envelope = next(m for m in sink.messages if m.data.endswith(message))
    assert envelope.mail_from == MAILBOX
    assert envelope.rcpt_tos == ("someone@example.com", "other@example.org")


def test_submission_refuses_the_token_on_the_auth_line(
    dovecot: Dovecot, tls: ssl.SSLContext, token: str
) -> None:
    initial_response = b64(xoauth2(MAILBOX, token))
    assert len(initial_response) > 1100  # realistic tokens: Entra's are 1.5 to 3 KB
    assert dovecot.ports.submissions is not None
    with smtplib.SMTP_SSL(dovecot.host, dovecot.ports.submissions, context=tls) as smtp:
        smtp.ehlo()
        assert smtp.docmd("AUTH", f"XOAUTH2 {initial_response}") == (500, b"5.5.2 Line too long")


# -- the SMTP sink on its own ------------------------------------------------------------------


def test_smtp_sink_enforces_the_command_sequence_and_unstuffs_dots() -> None:
    with SmtpSink() as sink, smtplib.SMTP(*sink.address) as smtp:
        assert smtp.docmd("MAIL", "FROM:<a@example.com>")[0] == 503  # no HELO yet
        assert smtp.helo("client")[0] == 250
        assert smtp.docmd("RCPT", "TO:<b@example.com>")[0] == 503  # no MAIL yet
        assert smtp.docmd("DATA")[0] == 503
        assert smtp.noop()[0] == 250
        assert smtp.docmd("MAIL", "FROM:<a@example.com> BODY=8BITMIME")[0] == 250
        assert smtp.rset()[0] == 250
        assert smtp.docmd("RCPT", "TO:<b@example.com>")[0] == 503  # RSET forgot the sender
        assert smtp.docmd("FROB")[0] == 500
        data = b"Subject: dots\r\n\r\n.\r\n..\r\n.x\r\nlast line without dots\r\n"
        assert smtp.sendmail("", ["b@example.com", "c@example.com"], data) == {}
        (received,) = sink.wait_for(1, timeout=5)
    assert received == ("", ("b@example.com", "c@example.com"), data)
    with pytest.raises(TimeoutError, match="received 1 message"):
        sink.wait_for(2, timeout=0.05)
