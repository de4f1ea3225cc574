"""Every provider kind end to end: tokens from an authorization server, a login through the
proxy, and Dovecot verifying the token -- by its signature, or by asking the server.

- a generic app against the emulated authorization server (tests/support/oauth2.py), found by
  discovery, whose JWTs Dovecot verifies locally;
- a Google app against the emulated Google, whose opaque per-mailbox tokens Dovecot
  introspects (tokeninfo), checking that each names its mailbox;
- a generic app against a real third-party authorization server, the npm package
  oidc-provider (tests/support/oidc_provider.py): every client authentication method, JWT
  access tokens Dovecot verifies, opaque ones it introspects, and what such a server does when
  the scope or the resource is wrong;
- the checks on tokens before they are used, for Microsoft apps too (tenant, audience).
"""

from __future__ import annotations

import base64
import json
import time
from typing import TYPE_CHECKING, Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from joserfc.jwk import ECKey, OKPKey, RSAKey

from broker.model import AccessToken
from broker.source import CachingTokenSource
from proxy.config import load_config
from proxy.identities import hash_password
from proxy.net.server import ProxyServer
from tests.e2e.conftest import (
    MAILBOX,
    OTHER_MAILBOX,
    PASSWORD,
    TEST_HASH,
    Listener,
    ProxyRig,
    start_proxy,
)
from tests.e2e.helpers import ServeProcess, in_thread, private_file
from tests.e2e.test_imap import login_reply
from tests.support.dovecot import Dovecot
from tests.support.oauth2 import AuthorizationServer
from tests.support.oidc_provider import OidcProvider

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import trio

    from tests.support.certs import TestPki
    from tests.support.entra import EntraEmulator

pytestmark = pytest.mark.e2e

#: The resource indicator (and token audience) of the test mail server.
MAIL_RESOURCE = "imap://mail.contoso.test"
OPAQUE_RESOURCE = "imap://introspected.contoso.test"
AT_JWT_RESOURCE = "imap://rfc9068.contoso.test"
SECRET = "client-secret+with:odd%chars&=/at-least-32-bytes-long"
SERVICE_ACCOUNT = "mail-relay@contoso-mail.iam.gserviceaccount.com"
#: Dovecot's own client for token introspection (its URL carries it: no URL escapes).
INTROSPECTION_SECRET = "dovecot-introspects-tokens-0123456789abcdef"


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# -- the emulated authorization server and Google, and their Dovecots --------------------------


@pytest.fixture(scope="module")
def authz(
    tmp_path_factory: pytest.TempPathFactory, rsa_key: rsa.RSAPrivateKey
) -> Iterator[AuthorizationServer]:
    with AuthorizationServer(
        tmp_path_factory.mktemp("authz"), users=(MAILBOX, OTHER_MAILBOX), path="/realms/mail"
    ) as server:
        server.register_client("mail-proxy", secret=SECRET)
        server.register_resource(MAIL_RESOURCE)
        server.register_service_account(SERVICE_ACCOUNT, "sa-key-1", rsa_key.public_key())
        yield server


@pytest.fixture(scope="module")
def generic_dovecot(
    tmp_path_factory: pytest.TempPathFactory, pki: TestPki, authz: AuthorizationServer
) -> Iterator[Dovecot]:
    """Verifies the authorization server's JWTs: signature, issuer, audience."""
    with Dovecot(
        tmp_path_factory.mktemp("generic-dovecot"),
        pki=pki,
        jwt_public_key_pem=authz.public_key_pem(),
        kid=authz.kid,
        issuer=authz.issuer,
        audience=MAIL_RESOURCE,
        mailboxes=(MAILBOX, OTHER_MAILBOX),
    ) as server:
        yield server


@pytest.fixture(scope="module")
def google_dovecot(
    tmp_path_factory: pytest.TempPathFactory, pki: TestPki, authz: AuthorizationServer
) -> Iterator[Dovecot]:
    """Introspects Google-style opaque tokens; each must name the mailbox logging in."""
    with Dovecot(
        tmp_path_factory.mktemp("google-dovecot"),
        pki=pki,
        introspection_url=authz.tokeninfo_url,
        introspection_mode="get",
        introspection_ca_file=authz.ca_file,
        username_attribute="email",
        audience=None,
        mailboxes=(MAILBOX, OTHER_MAILBOX),
    ) as server:
        yield server


def write_config(directory: Path, pki: TestPki, dovecot: Dovecot, apps: str) -> Path:
    """One IMAP listener in front of ``dovecot``, the users of MAILBOX and OTHER_MAILBOX on
    app ``mail``, and ``apps`` (TOML)."""
    cert = pki.issue("proxy", "localhost", "127.0.0.1")
    hashed = hash_password(PASSWORD, TEST_HASH)
    users = "".join(
        f'[users."{login}"]\npassword_hash = "{hashed}"\napp = "mail"\n\n'
        for login in (MAILBOX, OTHER_MAILBOX)
    )
    return private_file(
        directory / "config.toml",
        f"""{apps}

[[listeners]]
protocol = "imap"
listen = "127.0.0.1:0"
tls = "implicit"
certificate = {{ file = "{cert}" }}
upstream = "127.0.0.1:{dovecot.ports.imaps}"
upstream_tls = "implicit"
upstream_ca_file = "{dovecot.ca_file}"

[limits]
login_timeout = 20
upstream_timeout = 5
token_timeout = 10

{users}""",
    )


def logged_in(dovecot: Dovecot, since: int, mailbox: str = MAILBOX) -> None:
    dovecot.wait_for_log(f"Login: user=<{mailbox}>, method=XOAUTH2", since=since)


def test_generic_app_through_serve(
    tmp_path: Path, pki: TestPki, authz: AuthorizationServer, generic_dovecot: Dovecot
) -> None:
    private_file(tmp_path / "secret", SECRET)
    config = write_config(
        tmp_path,
        pki,
        generic_dovecot,
        f"""[apps.mail]
provider = "oauth2"
issuer = "{authz.issuer}"
client_id = "mail-proxy"
client_secret = {{ file = "secret" }}
resource = "{MAIL_RESOURCE}"
scope = "mail"
ca_file = "{authz.ca_file}"
""",
    )
    serve = ServeProcess(config, tmp_path / "serve.log")
    try:
        since = len(generic_dovecot.log_text())
        reply = login_reply(pki, serve.port(), MAILBOX, PASSWORD)
        assert reply.startswith(b"a1 OK"), (reply, serve.text())
        logged_in(generic_dovecot, since)
        claims = authz.issued[-1]
        assert (claims["aud"], claims["iss"]) == (MAIL_RESOURCE, authz.issuer)
    finally:
        serve.close()


def test_google_app_through_serve(
    tmp_path: Path,
    pki: TestPki,
    authz: AuthorizationServer,
    google_dovecot: Dovecot,
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    account = {
        "type": "service_account",
        "client_email": SERVICE_ACCOUNT,
        "private_key": pem(rsa_key),
        "private_key_id": "sa-key-1",
        "token_uri": authz.token_url,
    }
    private_file(tmp_path / "sa.json", json.dumps(account))
    config = write_config(
        tmp_path,
        pki,
        google_dovecot,
        f"""[apps.mail]
provider = "google"
service_account = {{ file = "sa.json" }}
ca_file = "{authz.ca_file}"
""",
    )
    serve = ServeProcess(config, tmp_path / "serve.log")
    try:
        port = serve.port()
        for mailbox in (MAILBOX, OTHER_MAILBOX):
            since = len(google_dovecot.log_text())
            reply = login_reply(pki, port, mailbox, PASSWORD)
            assert reply.startswith(b"a1 OK"), (reply, serve.text())
            logged_in(google_dovecot, since, mailbox)
        # One opaque token per mailbox; Dovecot checked that each names its own.
        subjects = [c["sub"] for c in authz.issued if c["client_id"] == SERVICE_ACCOUNT]
        assert subjects[-2:] == [MAILBOX, OTHER_MAILBOX]
    finally:
        serve.close()


async def test_google_token_for_another_mailbox_is_refused_by_dovecot(
    authz: AuthorizationServer,
    google_dovecot: Dovecot,
    pki: TestPki,
    tmp_path: Path,
    rsa_key: rsa.RSAPrivateKey,
    nursery: trio.Nursery,
) -> None:
    """The rig's introspection really checks: a token for one mailbox opens no other."""
    private_file(
        tmp_path / "sa.json",
        json.dumps(
            {
                "type": "service_account",
                "client_email": SERVICE_ACCOUNT,
                "private_key": pem(rsa_key),
                "private_key_id": "sa-key-1",
                "token_uri": authz.token_url,
            }
        ),
    )
    config = write_config(
        tmp_path,
        pki,
        google_dovecot,
        f"""[apps.mail]
provider = "google"
service_account = {{ file = "sa.json" }}
ca_file = "{authz.ca_file}"
""",
    )
    proxy = await start_proxy(nursery, config)
    token = await proxy.tokens.token("mail", mailbox=MAILBOX)
    since = len(google_dovecot.log_text())

    def other_mailbox() -> bytes:
        import imaplib
        import ssl

        context = ssl.create_default_context(cafile=str(pki.ca_file))
        with imaplib.IMAP4_SSL("127.0.0.1", google_dovecot.ports.imaps, ssl_context=context) as im:
            with pytest.raises(imaplib.IMAP4.error) as caught:
                im.authenticate(
                    "XOAUTH2",
                    lambda _: f"user={OTHER_MAILBOX}\x01auth=Bearer {token.value}\x01\x01".encode(),
                )
            return str(caught.value).encode()

    assert b"AUTHENTICATIONFAILED" in await in_thread(other_mailbox)
    google_dovecot.wait_for_log("did not match", since=since)


# -- a real third-party authorization server: oidc-provider ------------------------------------


def jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> Any:
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if isinstance(key, rsa.RSAPrivateKey):
        return RSAKey.import_key(public).as_dict()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return ECKey.import_key(public).as_dict()
    return OKPKey.import_key(public).as_dict()


KEYS: dict[str, Any] = {
    "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ES256": ec.generate_private_key(ec.SECP256R1()),
    "Ed25519": ed25519.Ed25519PrivateKey.generate(),
}


def client(client_id: str, method: str, **metadata: Any) -> dict[str, Any]:
    return {
        "client_id": client_id,
        "token_endpoint_auth_method": method,
        "grant_types": ["client_credentials"],
        "redirect_uris": [],
        "response_types": [],
        **metadata,
    }


@pytest.fixture(scope="module")
def oidc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    directory = tmp_path_factory.mktemp("oidc-provider")
    server = OidcProvider(
        directory,
        clients=[],
        resources={
            MAIL_RESOURCE: {
                "scope": "mail",
                "audience": MAIL_RESOURCE,
                "format": "jwt",
                "typ": "JWT",
            },
            OPAQUE_RESOURCE: {"scope": "mail", "audience": OPAQUE_RESOURCE, "format": "opaque"},
            AT_JWT_RESOURCE: {"scope": "mail", "audience": AT_JWT_RESOURCE, "format": "jwt"},
        },
        issuer_audience_clients=["strict"],
    )
    # Certificates for tls_client_auth come from the server's own PKI.
    tls_cert = server.issue_client_certificate("mail-proxy.contoso.test")
    leaf = x509.load_pem_x509_certificates(tls_cert.read_bytes())[0]
    server.clients = [
        client("basic", "client_secret_basic", client_secret=SECRET),
        client("dovecot", "client_secret_basic", client_secret=INTROSPECTION_SECRET),
        client("post", "client_secret_post", client_secret=SECRET),
        client("hs256", "client_secret_jwt", client_secret=SECRET),
        *(
            client(f"jwt-{alg}", "private_key_jwt", jwks={"keys": [jwk(key)]})
            for alg, key in KEYS.items()
        ),
        client("strict", "private_key_jwt", jwks={"keys": [jwk(KEYS["RS256"])]}),
        client("tls", "tls_client_auth", tls_client_auth_subject_dn=leaf.subject.rfc4514_string()),
    ]
    with server:
        yield server


@pytest.fixture(scope="module")
def oidc_dovecot(
    tmp_path_factory: pytest.TempPathFactory, pki: TestPki, oidc: OidcProvider
) -> Iterator[Dovecot]:
    with Dovecot(
        tmp_path_factory.mktemp("oidc-dovecot"),
        pki=pki,
        jwt_public_key_pem=oidc.public_key_pem(),
        kid=oidc.kid,
        issuer=oidc.issuer,
        audience=MAIL_RESOURCE,
        mailboxes=(MAILBOX, OTHER_MAILBOX),
    ) as server:
        yield server


def oidc_app(oidc: OidcProvider, directory: Path, client_id: str, **settings: str) -> str:
    """``[apps.mail]`` for ``client_id`` of ``oidc``; ``settings`` values are TOML."""
    method = {
        "basic": "client_secret_basic",
        "post": "client_secret_post",
        "hs256": "client_secret_jwt",
        "tls": "tls_client_auth",
    }.get(client_id, "private_key_jwt")
    lines = [
        "[apps.mail]",
        'provider = "oauth2"',
        f'issuer = "{oidc.issuer}"',
        f'client_id = "{client_id}"',
        f'auth_method = "{method}"',
        f'ca_file = "{oidc.ca_file}"',
    ]
    if method.startswith("client_secret"):
        private_file(directory / "secret", SECRET)
        lines.append('client_secret = { file = "secret" }')
    elif method == "private_key_jwt":
        key = KEYS["RS256"] if client_id == "strict" else KEYS[client_id.removeprefix("jwt-")]
        private_file(directory / "client.key", pem(key))
        lines.append('private_key = { file = "client.key" }')
    else:
        certificate = oidc.issue_client_certificate("mail-proxy.contoso.test")
        private_file(directory / "client.pem", certificate.read_text())
        lines.append('client_certificate = { file = "client.pem" }')
    defaults = {"scope": '"mail"', "resource": f'"{MAIL_RESOURCE}"'}
    lines += [f"{k} = {v}" for k, v in {**defaults, **settings}.items() if v]
    return "\n".join(lines) + "\n"


def test_oidc_provider_through_serve(
    tmp_path: Path, pki: TestPki, oidc: OidcProvider, oidc_dovecot: Dovecot
) -> None:
    config = write_config(tmp_path, pki, oidc_dovecot, oidc_app(oidc, tmp_path, "jwt-RS256"))
    serve = ServeProcess(config, tmp_path / "serve.log")
    try:
        since = len(oidc_dovecot.log_text())
        reply = login_reply(pki, serve.port(), MAILBOX, PASSWORD)
        assert reply.startswith(b"a1 OK"), (reply, serve.text(), oidc.stderr())
        logged_in(oidc_dovecot, since)
    finally:
        serve.close()


@pytest.mark.parametrize(
    "client_id",
    ["basic", "post", "hs256", "jwt-RS256", "jwt-ES256", "jwt-Ed25519", "strict", "tls"],
)
async def test_oidc_provider_client_authentication(
    nursery: trio.Nursery,
    tmp_path: Path,
    pki: TestPki,
    oidc: OidcProvider,
    oidc_dovecot: Dovecot,
    client_id: str,
) -> None:
    config = write_config(tmp_path, pki, oidc_dovecot, oidc_app(oidc, tmp_path, client_id))
    proxy = await start_proxy(nursery, config)
    since = len(oidc_dovecot.log_text())
    reply = await in_thread(lambda: login_reply(pki, proxy.port, MAILBOX, PASSWORD))
    assert reply.startswith(b"a1 OK"), (reply, oidc.stderr())
    logged_in(oidc_dovecot, since)
    token = await proxy.tokens.token("mail")
    claims = jwt.decode(token.value, options={"verify_signature": False})
    assert claims["client_id"] == client_id
    assert claims["aud"] == MAIL_RESOURCE
    assert jwt.get_unverified_header(token.value)["typ"] == "JWT"


async def test_oidc_provider_wants_the_issuer_as_assertion_audience(
    nursery: trio.Nursery,
    tmp_path: Path,
    pki: TestPki,
    oidc: OidcProvider,
    oidc_dovecot: Dovecot,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The default with discovery works (the issuer, above); the token endpoint does not."""
    app = oidc_app(oidc, tmp_path, "strict", assertion_audience='"token_endpoint"')
    proxy = await start_proxy(nursery, write_config(tmp_path, pki, oidc_dovecot, app))
    reply = await in_thread(lambda: login_reply(pki, proxy.port, MAILBOX, PASSWORD))
    assert reply.startswith(b"a1 NO [UNAVAILABLE]"), reply
    assert "invalid_client" in caplog.text
    assert "assertion_audience" in caplog.text


@pytest.mark.parametrize(
    ("settings", "claim", "says"),
    [
        # No resource: an opaque token without audience, and the scope silently dropped.
        ({"resource": "", "expect_audience": "[]"}, "scope", "(not stated in the token response)"),
        # No resource, and the mail server's audience expected: the token is opaque.
        ({"resource": "", "expect_audience": f'"{MAIL_RESOURCE}"'}, "token", "opaque"),
        # An unknown scope: the server drops it and issues a JWT without scope.
        ({"scope": '"mail.send"'}, "scope", "(missing)"),
    ],
)
async def test_oidc_provider_tokens_that_would_be_refused(
    nursery: trio.Nursery,
    tmp_path: Path,
    pki: TestPki,
    oidc: OidcProvider,
    oidc_dovecot: Dovecot,
    caplog: pytest.LogCaptureFixture,
    settings: dict[str, str],
    claim: str,
    says: str,
) -> None:
    app = oidc_app(oidc, tmp_path, "basic", **settings)
    proxy = await start_proxy(nursery, write_config(tmp_path, pki, oidc_dovecot, app))
    since = len(oidc_dovecot.log_text())
    reply = await in_thread(lambda: login_reply(pki, proxy.port, MAILBOX, PASSWORD))
    assert reply.startswith(b"a1 NO [UNAVAILABLE]"), reply
    assert f"{claim} is {says}" in caplog.text
    assert "fix:" in caplog.text
    assert "method=XOAUTH2" not in oidc_dovecot.log_text()[since:]  # never sent upstream


async def test_oidc_provider_opaque_tokens_introspected_by_dovecot(
    nursery: trio.Nursery,
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
    pki: TestPki,
    oidc: OidcProvider,
) -> None:
    """RFC 7662: Dovecot posts the token to the server's introspection endpoint (as client
    "dovecot", whose credentials are in the URL) and reads active and client_id."""
    url = oidc.issuer.replace("https://", f"https://dovecot:{INTROSPECTION_SECRET}@")
    with Dovecot(
        tmp_path_factory.mktemp("introspecting-dovecot"),
        pki=pki,
        introspection_url=url + "/token/introspection",
        introspection_mode="post",
        introspection_ca_file=oidc.ca_file,
        username_attribute="client_id",
        username_format="basic",
        audience=None,
        oauth2_settings=("active_attribute = active", "active_value = true"),
        mailboxes=(MAILBOX,),
    ) as dovecot:
        app = oidc_app(
            oidc, tmp_path, "basic", resource=f'"{OPAQUE_RESOURCE}"', expect_audience="[]"
        )
        proxy = await start_proxy(nursery, write_config(tmp_path, pki, dovecot, app))
        since = len(dovecot.log_text())
        reply = await in_thread(lambda: login_reply(pki, proxy.port, MAILBOX, PASSWORD))
        assert reply.startswith(b"a1 OK"), (reply, dovecot.log_text()[since:])
        logged_in(dovecot, since)
        token = await proxy.tokens.token("mail")
        assert token.value.count(".") == 0  # opaque


async def test_dovecot_refuses_rfc9068_typ(
    nursery: trio.Nursery,
    tmp_path: Path,
    pki: TestPki,
    oidc: OidcProvider,
    oidc_dovecot: Dovecot,
) -> None:
    """What README tells operators: Dovecot 2.3 verifies only header typ "JWT", not RFC
    9068's "at+jwt" -- configure the authorization server accordingly."""
    app = oidc_app(
        oidc,
        tmp_path,
        "basic",
        resource=f'"{AT_JWT_RESOURCE}"',
        expect_audience=f'"{AT_JWT_RESOURCE}"',
    )
    proxy = await start_proxy(nursery, write_config(tmp_path, pki, oidc_dovecot, app))
    token = await proxy.tokens.token("mail")
    assert jwt.get_unverified_header(token.value)["typ"] == "at+jwt"
    since = len(oidc_dovecot.log_text())
    reply = await in_thread(lambda: login_reply(pki, proxy.port, MAILBOX, PASSWORD))
    assert reply.startswith(b"a1 NO [AUTHENTICATIONFAILED]"), reply
    oidc_dovecot.wait_for_log("Cannot find 'typ' field", since=since)


# -- tokens checked before use, for Microsoft apps ------------------------------------------------


async def test_microsoft_token_from_another_tenant_is_refused(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    idp: EntraEmulator,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    other = "99990000-1111-2222-3333-444455556666"
    idp.token_tenant_id = other
    try:
        proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)]))
        reply = await in_thread(lambda: login_reply(pki, proxy.port, MAILBOX, PASSWORD))
    finally:
        idp.token_tenant_id = None
    assert reply.startswith(b"a1 NO [UNAVAILABLE]"), reply
    assert f"tid is {other}, expected {idp.tenant_id}" in caplog.text
    assert "check tenant" in caplog.text


class _StoredToken:
    """A provider standing for a token that reached the source unchecked (an older
    instance's, in a shared cache): the login path must check it all the same."""

    def __init__(self, value: str) -> None:
        self.value = value

    async def fetch(self) -> AccessToken:
        return AccessToken(self.value, time.time() + 3600, "")


async def test_the_login_path_checks_tokens_it_did_not_fetch(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    idp: EntraEmulator,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    claims = {
        "aud": "https://graph.microsoft.com",
        "tid": idp.tenant_id,
        "roles": ["IMAP.AccessAsApp"],
        "sub": "app",
        "exp": int(time.time()) + 3600,
    }
    value = jwt.encode(claims, "k" * 32, algorithm="HS256", headers={"typ": "JWT"})
    config = load_config(rig.write([Listener(upstream_port=dovecot.ports.imaps)]))
    source = CachingTokenSource(config.apps, providers={"contoso": _StoredToken(value)})
    server = ProxyServer(config, source, grace=1.0)
    (listener, *_) = await nursery.start(server.serve)
    since = len(dovecot.log_text())
    reply = await in_thread(lambda: login_reply(pki, listener.port, MAILBOX, PASSWORD))
    assert reply.startswith(b"a1 NO [UNAVAILABLE]"), reply
    assert (
        "its aud is https://graph.microsoft.com, expected https://outlook.office365.com. Fix:"
        in caplog.text
    )
    assert "method=XOAUTH2" not in dovecot.log_text()[since:]
    assert base64.b64encode(value.encode()).decode() not in caplog.text
    assert value not in caplog.text


async def test_doctor_speaks_the_providers_language(
    tmp_path: Path, pki: TestPki, authz: AuthorizationServer, generic_dovecot: Dovecot
) -> None:
    from broker import build_source
    from broker.cache.memory import MemoryTokenCache
    from proxy.ops import doctor

    private_file(tmp_path / "secret", SECRET)
    config = load_config(
        write_config(
            tmp_path,
            pki,
            generic_dovecot,
            f"""[apps.mail]
provider = "oauth2"
issuer = "{authz.issuer}"
client_id = "mail-proxy"
client_secret = {{ file = "secret" }}
resource = "{MAIL_RESOURCE}"
scope = "mail"
ca_file = "{authz.ca_file}"
""",
        )
    )
    source = build_source(config.apps, cache=MemoryTokenCache())
    try:
        findings = await doctor.diagnose(config, source, MAILBOX)
    finally:
        source.close()
    report = doctor.render(findings)
    assert all(f.status is doctor.Status.OK for f in findings), report
    assert "the token's iss, aud, scope are as expected" in report
    assert "logged in as reports@contoso.com; EXAMINE INBOX: OK" in report
    for microsoft in ("role", "Entra", "Exchange", "tenant"):
        assert microsoft not in report
