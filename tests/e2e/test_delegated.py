"""Delegated access end to end: a person signs in once with ``xoauth2-proxy authorize``, run
as an operator runs it, and a legacy client then logs in through ``serve`` with its local
password, with a token of that person that Dovecot verifies -- including that it is that
person's (``upn``, ``email`` or ``sub`` must be the mailbox logging in).

- Microsoft: the emulated Entra, the device sign-in and the browser sign-in, through the
  real msal client; Dovecot verifies the JWTs locally;
- Google: the emulated Google, the browser sign-in with the address pasted back (as from a
  browser on another machine); Dovecot asks Google's tokeninfo about each opaque token;
- any OAuth 2.0 server: the npm package oidc-provider, both sign-ins, with refresh tokens
  rotated at every renewal and a reused one revoking the grant, token revocation, and what
  the proxy then says (log, audit, doctor) until the person signs in again;
- a crash between receiving a rotated refresh token and storing it.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import os
import poplib
import re
import secrets
import signal
import ssl
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

from broker import build_source, signin
from broker.cache import CacheKey
from broker.cache.file import FileTokenCache
from broker.delegated import SignInRequired
from broker.model import Secret
from proxy.config import load_config
from proxy.identities import hash_password
from proxy.net.server import ProxyServer
from tests.e2e.conftest import PASSWORD, TEST_HASH
from tests.e2e.helpers import ROOT, ServeProcess, in_thread, private_file
from tests.e2e.test_imap import login_reply
from tests.e2e.test_secrets import encodings
from tests.support.browser import Browser
from tests.support.dovecot import Dovecot
from tests.support.entra import DELEGATED_PERMISSIONS
from tests.support.oauth2 import AuthorizationServer
from tests.support.oidc_provider import OidcProvider

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from broker.delegated import AuthorizationRequest, DeviceAuthorization
    from tests.support.certs import TestPki
    from tests.support.entra import EntraEmulator

pytestmark = pytest.mark.e2e

JANE = "jane@contoso.com"
BOB = "bob@contoso.com"
PUBLIC_CLIENT_ID = "dddddddd-1111-2222-3333-444444444444"
GOOGLE_CLIENT_ID = "42-desktop.apps.googleusercontent.com"
GOOGLE_SECRET = "GOCSPX-emulated-desktop-secret"
MAIL_RESOURCE = "imap://mail.contoso.test"
CACHE_KEY = base64.b64encode(secrets.token_bytes(32)).decode()


# -- the parties ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def entra(idp: EntraEmulator) -> EntraEmulator:
    idp.register_app(PUBLIC_CLIENT_ID, public_client=True, delegated=DELEGATED_PERMISSIONS)
    idp.add_person(JANE)
    idp.add_person(BOB)
    return idp


@pytest.fixture(scope="module")
def person_dovecot(
    tmp_path_factory: pytest.TempPathFactory, pki: TestPki, entra: EntraEmulator
) -> Iterator[Dovecot]:
    """Verifies a person's Entra tokens: signature, issuer, Outlook's audience, and that
    their ``upn`` is the mailbox logging in."""
    with Dovecot(
        tmp_path_factory.mktemp("person-dovecot"),
        pki=pki,
        jwt_public_key_pem=entra.public_key_pem(),
        kid=entra.kid,
        issuer=entra.issuer,
        audience="https://outlook.office.com",
        username_attribute="upn",
        mailboxes=(JANE, BOB),
    ) as server:
        yield server


@pytest.fixture(scope="module")
def google(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthorizationServer]:
    with AuthorizationServer(tmp_path_factory.mktemp("google")) as server:
        server.register_google_client(GOOGLE_CLIENT_ID, GOOGLE_SECRET)
        server.add_person(JANE)
        server.add_person(BOB)
        yield server


@pytest.fixture(scope="module")
def gmail_dovecot(
    tmp_path_factory: pytest.TempPathFactory, pki: TestPki, google: AuthorizationServer
) -> Iterator[Dovecot]:
    """Asks the emulated Google's tokeninfo about each token; its email must be the login."""
    with Dovecot(
        tmp_path_factory.mktemp("gmail-dovecot"),
        pki=pki,
        introspection_url=google.tokeninfo_url,
        introspection_mode="get",
        introspection_ca_file=google.ca_file,
        username_attribute="email",
        audience=None,
        mailboxes=(JANE, BOB),
    ) as server:
        yield server


@pytest.fixture(scope="module")
def oidc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    server = OidcProvider(
        tmp_path_factory.mktemp("oidc-people"),
        clients=[
            {
                "client_id": "mail-proxy",
                "token_endpoint_auth_method": "none",
                "application_type": "native",
                "grant_types": [
                    "authorization_code",
                    "refresh_token",
                    "urn:ietf:params:oauth:grant-type:device_code",
                ],
                "response_types": ["code"],
                "redirect_uris": ["http://127.0.0.1/"],
            }
        ],
        resources={
            MAIL_RESOURCE: {
                "scope": "mail",
                "audience": MAIL_RESOURCE,
                "format": "jwt",
                "typ": "JWT",
            }
        },
        scopes=["openid", "email", "offline_access", "mail"],
        # Shorter than the broker's minimum validity: every login renews the token, and
        # with it the refresh token the package rotates.
        ttl=30,
        people=[JANE, BOB],
    )
    with server:
        yield server


@pytest.fixture(scope="module")
def oidc_dovecot(
    tmp_path_factory: pytest.TempPathFactory, pki: TestPki, oidc: OidcProvider
) -> Iterator[Dovecot]:
    """Verifies oidc-provider's JWTs; their ``sub`` (the account) must be the login."""
    with Dovecot(
        tmp_path_factory.mktemp("oidc-people-dovecot"),
        pki=pki,
        jwt_public_key_pem=oidc.public_key_pem(),
        kid=oidc.kid,
        issuer=oidc.issuer,
        audience=MAIL_RESOURCE,
        username_attribute="sub",
        mailboxes=(JANE, BOB),
    ) as server:
        yield server


# -- the operator's side ------------------------------------------------------------------------


def write_config(
    directory: Path,
    pki: TestPki,
    dovecot: Dovecot,
    app: str,
    users: tuple[str, ...],
    *,
    pop3: bool = False,
    control: Path | None = None,
) -> Path:
    """One IMAP listener in front of ``dovecot`` (and a POP3 one with ``pop3``), the file
    cache, ``app`` as [apps.people], and a user per mailbox in ``users`` (login: its local
    part) with the test password."""
    cert = pki.issue("proxy", "localhost", "127.0.0.1")
    private_file(directory / "cache.key", CACHE_KEY)
    hashed = hash_password(PASSWORD, TEST_HASH)
    pop3_listener = f"""
[[listeners]]
protocol = "pop3"
listen = "127.0.0.1:0"
tls = "implicit"
certificate = {{ file = "{cert}" }}
upstream = "127.0.0.1:{dovecot.ports.pop3s}"
upstream_tls = "implicit"
upstream_ca_file = "{dovecot.ca_file}"
"""
    blocks = "".join(
        f'[users."{mailbox.split("@")[0]}"]\npassword_hash = "{hashed}"\napp = "people"\n'
        f'mailbox = "{mailbox}"\n\n'
        for mailbox in users
    )
    return private_file(
        directory / "config.toml",
        f"""[apps.people]
{app}
[cache]
kind = "file"
path = "tokens"
key = {{ file = "cache.key" }}

[[listeners]]
protocol = "imap"
listen = "127.0.0.1:0"
tls = "implicit"
certificate = {{ file = "{cert}" }}
upstream = "127.0.0.1:{dovecot.ports.imaps}"
upstream_tls = "implicit"
upstream_ca_file = "{dovecot.ca_file}"
{pop3_listener if pop3 else ""}
{f'[control]{chr(10)}socket = "{control}"{chr(10)}' if control else ""}
[limits]
login_timeout = 20
upstream_timeout = 5
token_timeout = 10

{blocks}""",
    )


def entra_app(entra: EntraEmulator) -> str:
    return f"""provider = "microsoft"
delegated = true
tenant = "organizations"
client_id = "{PUBLIC_CLIENT_ID}"
authority = "{entra.authority}"
ca_file = "{entra.ca_file}"
"""


class Authorize:
    """``xoauth2-proxy authorize`` as a process of the code under test."""

    def __init__(self, config: Path, user: str, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "authorize", "-c", str(config), user, *args],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._out: list[str] = []
        self._err: list[str] = []
        self._readers = [
            threading.Thread(target=self._drain, args=(stream, into), daemon=True)
            for stream, into in ((self.process.stdout, self._out), (self.process.stderr, self._err))
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _drain(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    @property
    def output(self) -> str:
        return "".join(self._out) + "".join(self._err)

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, "".join(self._out))
            if found:
                return found
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"no {pattern!r} from authorize:\n{self.output}")
            time.sleep(0.05)

    def paste(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def finish(self, timeout: float = 60) -> int:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"authorize did not finish:\n{self.output}")
        for reader in self._readers:
            reader.join(10)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        return code


def device_sign_in(config: Path, user: str, ca_file: Path, login: str) -> Authorize:
    """Run authorize with the device sign-in and have ``login`` enter the code."""
    process = Authorize(config, user)
    code = process.wait_for(r"enter the code\s+(\S+)").group(1)
    url = process.wait_for(r"open\s+(https://\S+)").group(1)
    browser = Browser(ssl.create_default_context(cafile=str(ca_file)), login=login, user_code=code)
    try:
        browser.open(url)
    finally:
        browser.close()
    return process


def browser_sign_in(config: Path, user: str, ca_file: Path, login: str) -> Authorize:
    process = Authorize(config, user, "--browser")
    url = process.wait_for(r"on this machine:\s+(https://\S+)").group(1)
    browser = Browser(ssl.create_default_context(cafile=str(ca_file)), login=login)
    try:
        browser.open(url)
    finally:
        browser.close()
    return process


def doctor(config: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "doctor", "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    return done.stdout + done.stderr


def logged_in(dovecot: Dovecot, since: int, mailbox: str) -> None:
    dovecot.wait_for_log(f"Login: user=<{mailbox}>, method=XOAUTH2", since=since)


def logs_in(pki: TestPki, port: int, dovecot: Dovecot, login: str, mailbox: str) -> None:
    """``login`` logs in with its password through the proxy at ``port``, and Dovecot sees
    ``mailbox`` log in with a token."""
    since = len(dovecot.log_text())
    reply = login_reply(pki, port, login, PASSWORD)
    assert reply.startswith(b"a1 OK"), reply
    logged_in(dovecot, since, mailbox)


def serve_and_log_in(
    config: Path, pki: TestPki, dovecot: Dovecot, login: str, mailbox: str
) -> None:
    """``serve`` as a process, and one login through it as :func:`logs_in`."""
    serve = ServeProcess(config, config.parent / "serve.log")
    try:
        logs_in(pki, serve.port(), dovecot, login, mailbox)
    finally:
        serve.close()


# -- Microsoft -----------------------------------------------------------------------------------


def test_microsoft_from_nothing_to_a_login(
    tmp_path: Path, pki: TestPki, entra: EntraEmulator, person_dovecot: Dovecot
) -> None:
    """README's path: configure, authorize (device code), serve, log in with a password."""
    control = tmp_path / "control.sock"
    config = write_config(
        tmp_path, pki, person_dovecot, entra_app(entra), (JANE, BOB), control=control
    )
    serve = ServeProcess(config, tmp_path / "serve.log")
    try:
        port = serve.port()
        # Before anyone signs in: the temporary reply, and the log says what to run.
        reply = login_reply(pki, port, "jane", PASSWORD)
        assert reply.startswith(b"a1 NO [UNAVAILABLE]"), reply
        serve.wait_for(lambda: "authorize -c" in serve.text(), "the authorize hint")
        assert re.search(r"run `xoauth2-proxy authorize -c \S+config\.toml jane`", serve.text())
        process = device_sign_in(config, "jane", entra.ca_file, JANE)
        assert process.finish() == 0, process.output
        assert f"Signed in as {JANE} for user 'jane'" in process.output
        for secret in entra.people.secrets_issued():
            assert secret not in process.output  # no device code, no refresh token
        # The running proxy takes the sign-in up at its next look at the cache.
        since = len(person_dovecot.log_text())
        serve.wait_for(
            lambda: login_reply(pki, port, "jane", PASSWORD).startswith(b"a1 OK"),
            "a login with the new sign-in",
        )
        logged_in(person_dovecot, since, JANE)
        # Bob has not signed in: his logins alone are refused, temporarily.
        assert login_reply(pki, port, "bob", PASSWORD).startswith(b"a1 NO [UNAVAILABLE]")
        # status shows both sign-ins; Bob's missing one does not make the proxy unready.
        shown = subprocess.run(
            [sys.executable, "-m", "proxy", "status", "-c", str(config)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert shown.stdout.startswith("ready")
        assert f"people ({JANE})" in shown.stdout
        assert f"signed in as {JANE} on " in shown.stdout
        assert f"people ({BOB})" in shown.stdout
        assert "NOT SIGNED IN" in shown.stdout
        assert re.search(r"fix: Run `xoauth2-proxy authorize -c \S+ bob`", shown.stdout)
    finally:
        serve.close()
    out = doctor(config, "jane")
    assert f"sign-in of {JANE}: signed in as {JANE}" in out, out
    assert "the sign-in granted IMAP.AccessAsUser.All" in out
    assert f"logged in as {JANE}; EXAMINE INBOX: OK" in out, out
    out = doctor(config, "bob")
    assert "nobody has signed in yet" in out
    assert "authorize -c" in out
    assert " bob`" in out


def test_a_permission_not_granted_refuses_that_protocol_only(
    tmp_path: Path, pki: TestPki, entra: EntraEmulator, person_dovecot: Dovecot
) -> None:
    """Jane consented to IMAP only: IMAP logins work, POP3 ones get the temporary reply and
    the log names the missing permission; the doctor says the same."""
    app = entra_app(entra) + 'scope = "https://outlook.office.com/IMAP.AccessAsUser.All"\n'
    config = write_config(tmp_path, pki, person_dovecot, app, (JANE,), pop3=True)
    process = device_sign_in(config, "jane", entra.ca_file, JANE)
    assert process.finish() == 0, process.output
    serve = ServeProcess(config, tmp_path / "serve.log")
    try:
        imap_port = serve.port()
        ports = [int(p) for p in re.findall(r"listening on 127\.0\.0\.1:(\d+)", serve.text())]
        logs_in(pki, imap_port, person_dovecot, "jane", JANE)
        pop3 = poplib.POP3_SSL(
            "127.0.0.1",
            next(p for p in ports if p != imap_port),
            context=ssl.create_default_context(cafile=str(pki.ca_file)),
            timeout=30,
        )
        try:
            pop3.user("jane")
            with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
                pop3.pass_(PASSWORD)
        finally:
            pop3.close()
        serve.wait_for(lambda: "lacks the POP.AccessAsUser.All permission" in serve.text(), "log")
    finally:
        serve.close()
    out = doctor(config, "jane")
    assert "the sign-in granted IMAP.AccessAsUser.All" in out, out
    assert "the sign-in did not grant POP.AccessAsUser.All: POP3 logins are refused" in out
    out = doctor(config)
    assert f"sign-in of {JANE}: signed in as {JANE}" in out, out


def test_microsoft_browser_sign_in(
    tmp_path: Path, pki: TestPki, entra: EntraEmulator, person_dovecot: Dovecot
) -> None:
    config = write_config(tmp_path, pki, person_dovecot, entra_app(entra), (BOB,))
    process = browser_sign_in(config, "bob", entra.ca_file, BOB)
    assert process.finish() == 0, process.output
    # Entra posts the answer (form_post): pasting an address could never work, so it is
    # not offered; forwarding the port is.
    assert "the answer is posted to that address, not shown in it" in process.output
    assert "paste" not in process.output
    serve_and_log_in(config, pki, person_dovecot, "bob", BOB)


def test_signing_in_as_another_account_is_refused(
    tmp_path: Path, pki: TestPki, entra: EntraEmulator, person_dovecot: Dovecot
) -> None:
    config = write_config(tmp_path, pki, person_dovecot, entra_app(entra), (JANE,))
    process = device_sign_in(config, "jane", entra.ca_file, BOB)
    assert process.finish() == 1
    assert f"signed in as {BOB}, not as {JANE}; nothing was kept" in process.output
    assert "use a private window" in process.output
    assert "nobody has signed in yet" in doctor(config, "jane")


def test_a_crash_between_receiving_and_storing_a_rotated_refresh_token(
    tmp_path: Path, pki: TestPki, entra: EntraEmulator, person_dovecot: Dovecot
) -> None:
    """``token`` is killed after Entra answered a renewal with a new refresh token and
    before the cache took it (another process holds the cache's write lock): the cache
    still holds the old refresh token, whole, and the next renewal works with it."""
    config = write_config(tmp_path, pki, person_dovecot, entra_app(entra), (JANE,))
    process = device_sign_in(config, "jane", entra.ca_file, JANE)
    assert process.finish() == 0, process.output
    loaded = load_config(config)
    key = CacheKey.for_app(loaded.apps["people"], JANE)
    cache = FileTokenCache(tmp_path / "tokens", Secret(CACHE_KEY))
    before = trio_run(cache.load_grant(key))
    assert before is not None
    # The stored token is due: the next `token` renews it.
    entry = trio_run(cache.load(key))
    assert entry is not None
    aged = type(entry)(
        type(entry.token)(entry.token.value, time.time() + 30, entry.token.scope),
        entry.obtained_at,
    )
    trio_run(cache.store(key, aged))
    renewals = len(entra.people.renewals)
    holder = subprocess.Popen(
        [sys.executable, "-c", STOPPED_LOCK_HOLDER, str(tmp_path / "tokens.lock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    command = [sys.executable, "-m", "proxy", "token", "-c", str(config), "people"]
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        token = subprocess.Popen(
            [*command, "--mailbox", JANE], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 30
        while len(entra.people.renewals) == renewals:  # until Entra has answered
            assert time.monotonic() < deadline, "no renewal"
            assert token.poll() is None
            time.sleep(0.01)
        token.send_signal(signal.SIGKILL)
        token.wait()
        assert token.stdout is not None
        assert token.stderr is not None
        token.stdout.close()
        token.stderr.close()
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    assert entra.people.renewals[-1] == before.refresh_token
    assert trio_run(cache.load_grant(key)) == before  # nothing lost, nothing half-written
    again = subprocess.run(
        [*command, "--mailbox", JANE], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert again.returncode == 0, again.stderr
    assert entra.people.renewals[-1] == before.refresh_token  # the old one still works
    after = trio_run(cache.load_grant(key))
    assert after is not None
    assert after.refresh_token not in (before.refresh_token, "")


#: Takes the cache's write lock (flock), then stops itself while holding it.
STOPPED_LOCK_HOLDER = """
import fcntl, os, signal, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""


def token_command(config: Path, account: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "token", "-c", str(config), "people", "--mailbox", account],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def trio_run(awaitable: Any) -> Any:
    async def run() -> Any:
        return await awaitable

    return trio.run(run)


# -- Google ------------------------------------------------------------------------------------


def test_google_browser_sign_in_with_the_address_pasted(
    tmp_path: Path, pki: TestPki, google: AuthorizationServer, gmail_dovecot: Dovecot
) -> None:
    """The browser runs elsewhere: its redirect to this machine's loopback fails there, and
    the person pastes the address it was sent to."""
    private_file(tmp_path / "google.secret", GOOGLE_SECRET)
    app = f"""provider = "google"
delegated = true
client_id = "{GOOGLE_CLIENT_ID}"
client_secret = {{ file = "google.secret" }}
token_url = "{google.token_url}"
authorization_url = "{google.authorization_url}"
ca_file = "{google.ca_file}"
"""
    config = write_config(tmp_path, pki, gmail_dovecot, app, (JANE,))
    process = Authorize(config, "jane")  # Google: the browser sign-in by default
    url = process.wait_for(r"on this machine:\s+(https://\S+)").group(1)
    assert "access_type=offline" in url
    browser = Browser(
        ssl.create_default_context(cafile=str(google.ca_file)),
        login=JANE,
        stop_at="http://127.0.0.1",
    )
    try:
        visit = browser.open(url)
    finally:
        browser.close()
    process.paste(visit.urls[-1])
    assert process.finish() == 0, process.output
    assert "sign in there and paste here the address the browser ends on" in process.output
    assert f"Signed in as {JANE}" in process.output
    serve_and_log_in(config, pki, gmail_dovecot, "jane", JANE)


def test_google_refuses_the_device_sign_in_for_gmail(
    tmp_path: Path, pki: TestPki, google: AuthorizationServer, gmail_dovecot: Dovecot
) -> None:
    private_file(tmp_path / "google.secret", GOOGLE_SECRET)
    app = f"""provider = "google"
delegated = true
client_id = "{GOOGLE_CLIENT_ID}"
client_secret = {{ file = "google.secret" }}
token_url = "{google.token_url}"
authorization_url = "{google.authorization_url}"
ca_file = "{google.ca_file}"
"""
    config = write_config(tmp_path, pki, gmail_dovecot, app, (JANE,))
    process = Authorize(config, "jane", "--device")
    assert process.finish() == 1
    assert "invalid_scope" in process.output
    assert "authorize --browser" in process.output
    assert GOOGLE_SECRET not in process.output


# -- a real third-party authorization server ---------------------------------------------------


def oidc_app(oidc: OidcProvider) -> str:
    return f"""provider = "oauth2"
delegated = true
issuer = "{oidc.issuer}"
client_id = "mail-proxy"
auth_method = "none"
scope = "mail"
resource = "{MAIL_RESOURCE}"
ca_file = "{oidc.ca_file}"
"""


def test_oidc_provider_sign_ins_rotation_and_revocation(
    tmp_path: Path, pki: TestPki, oidc: OidcProvider, oidc_dovecot: Dovecot
) -> None:
    config = write_config(tmp_path, pki, oidc_dovecot, oidc_app(oidc), (JANE, BOB))
    process = device_sign_in(config, "jane", oidc.ca_file, JANE)
    assert process.finish() == 0, process.output + oidc.stderr()
    process = browser_sign_in(config, "bob", oidc.ca_file, BOB)
    assert process.finish() == 0, process.output + oidc.stderr()
    loaded = load_config(config)
    cache = FileTokenCache(tmp_path / "tokens", Secret(CACHE_KEY))
    jane_key = CacheKey.for_app(loaded.apps["people"], JANE)
    first = trio_run(cache.load_grant(jane_key))
    assert first is not None
    serve = ServeProcess(config, tmp_path / "serve.log")
    try:
        port = serve.port()
        for mailbox, login in ((JANE, "jane"), (BOB, "bob")):
            logs_in(pki, port, oidc_dovecot, login, mailbox)
        # Tokens live 30 s, less than the broker's minimum validity: every `token` renews,
        # beside the running proxy, and the package rotates the refresh token each time,
        # refusing -- and revoking the grant on -- any reuse.
        seen = {first.refresh_token}
        for _ in range(3):
            done = token_command(config, JANE)
            assert done.returncode == 0, done.stderr
            current = trio_run(cache.load_grant(jane_key))
            assert current is not None
            assert current.refresh_token not in seen
            seen.add(current.refresh_token)
        logs_in(pki, port, oidc_dovecot, "jane", JANE)
        current = trio_run(cache.load_grant(jane_key))
        assert current is not None
        # Jane removes the app's access: her refresh token is revoked.
        revoked = httpx.post(
            f"{oidc.issuer}/token/revocation",
            data={
                "token": current.refresh_token,
                "token_type_hint": "refresh_token",
                "client_id": "mail-proxy",
            },
            verify=ssl.create_default_context(cafile=str(oidc.ca_file)),
        )
        assert revoked.status_code == 200, revoked.text
        done = token_command(config, JANE)
        assert done.returncode == 1
        assert "refresh token was refused" in done.stderr
        assert "xoauth2-proxy authorize -c" in done.stderr
        # The proxy stops renewing Jane's tokens once its last one is due, and says why.
        serve.wait_for(
            lambda: login_reply(pki, port, "jane", PASSWORD).startswith(b"a1 NO [UNAVAILABLE]"),
            "the temporary reply for jane",
        )
        # Bob is not affected.
        assert login_reply(pki, port, "bob", PASSWORD).startswith(b"a1 OK")
        serve.wait_for(lambda: '"result": "temporary-failure"' in serve.text(), "the audit")
        text = serve.text()
        audit = [
            json.loads(line[line.index("{") :])
            for line in text.splitlines()
            if "xoauth2_proxy.audit" in line and '"login": "jane"' in line
        ]
        # The `token` command found it revoked, and recorded it: the proxy read that.
        assert audit[-1]["reason"].startswith(
            "sign-in required (SIGN_IN_REVOKED): run `xoauth2-proxy authorize -c"
        )
        assert audit[-1]["reason"].endswith(" jane`")
        assert re.search(r"login 'jane': no token: .*the identity provider refused its", text)
        stored = trio_run(cache.load_grant(jane_key))
        assert stored is not None
        assert stored.revoked.startswith("invalid_grant")
        out = doctor(config, "jane")
        assert "the identity provider refused the sign-in" in out, out
        # She signs in again; the running proxy takes it up without a restart.
        process = device_sign_in(config, "jane", oidc.ca_file, JANE)
        assert process.finish() == 0, process.output
        serve.wait_for(
            lambda: login_reply(pki, port, "jane", PASSWORD).startswith(b"a1 OK"),
            "a login after signing in again",
        )
    finally:
        serve.close()
    for secret in seen:
        assert secret not in serve.text()


# -- secrets --------------------------------------------------------------------------------------


async def test_no_refresh_token_device_code_or_code_in_any_log_record(
    nursery: trio.Nursery,
    tmp_path: Path,
    pki: TestPki,
    entra: EntraEmulator,
    person_dovecot: Dovecot,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Both sign-ins, a login through the proxy, a renewal that rotates the refresh token
    and one that finds it revoked, all in this process with every library logging at
    DEBUG: no refresh token, device code, authorization code, PKCE verifier or token of a
    person is in any record, raw or in base64."""
    config = load_config(write_config(tmp_path, pki, person_dovecot, entra_app(entra), (JANE, BOB)))
    source = build_source(
        config.apps,
        config.cache,
        accounts=config.delegated_accounts(),
        authorize_command="xoauth2-proxy authorize",
    )
    verifiers: list[str] = []

    def person(url: str, login: str, user_code: str = "") -> None:
        async def act() -> None:
            browser = Browser(
                ssl.create_default_context(cafile=str(entra.ca_file)),
                login=login,
                user_code=user_code,
            )
            try:
                await trio.to_thread.run_sync(browser.open, url)
            finally:
                browser.close()

        nursery.start_soon(act)

    def show_device(authorization: DeviceAuthorization) -> None:
        person(authorization.verification_uri, JANE, authorization.user_code)

    def show_browser(request: AuthorizationRequest) -> None:
        assert isinstance(request.handle, dict)
        verifiers.append(str(request.handle["code_verifier"]))
        person(request.url, BOB)

    await signin.sign_in(
        source, "people", JANE, functools.partial(signin.device_sign_in, show=show_device)
    )
    await signin.sign_in(
        source,
        "people",
        BOB,
        functools.partial(
            signin.browser_sign_in, redirect_uri="http://127.0.0.1", show=show_browser
        ),
    )
    server = ProxyServer(config, source, grace=1.0)
    bound = await nursery.start(server.serve)
    reply = await in_thread(lambda: login_reply(pki, bound[0].port, "jane", PASSWORD))
    assert reply.startswith(b"a1 OK"), reply
    # A renewal that rotates Jane's refresh token, and one that finds Bob's revoked.
    entra.change_password(BOB)
    tokens: list[str] = []
    for account in (JANE, BOB):
        state = source._states[source._key("people", account)]
        assert state.entry is not None
        tokens.append(state.entry.token.value)
        state.entry = dataclasses.replace(state.entry, refresh_at=0.0)
        state.entry = dataclasses.replace(
            state.entry,
            token=dataclasses.replace(state.entry.token, expires_at=time.time() + 30),
        )
    tokens.append((await source.token("people", mailbox=JANE)).value)
    with pytest.raises(SignInRequired):
        await source.token("people", mailbox=BOB)
    source.close()
    issued = entra.people.secrets_issued()
    assert len(issued) >= 5  # device code, code, refresh tokens (one rotated)
    records = "\n".join(
        f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records
    ).encode()
    assert b"refused the refresh token" in records  # the revocation was logged
    assert len(records) > 10_000  # every library's DEBUG records are in the scan
    for secret in [*issued, *verifiers, *tokens]:
        for form in encodings(secret.encode()):
            assert form not in records, f"a secret ({len(secret)} chars) is in the log"
