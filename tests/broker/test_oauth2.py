"""The generic OAuth 2.0 and Google providers against a standards-compliant token endpoint."""

from __future__ import annotations

import base64
import datetime
import logging
from dataclasses import replace
from typing import TYPE_CHECKING

import jwt
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from broker.claims import decode_claims
from broker.errors import BrokerError, PermanentTokenError, TemporaryTokenError
from broker.model import GOOGLE_SCOPE, App, Secret
from broker.providers import build_provider
from broker.providers._http import oauth_fix
from broker.providers.google import GoogleProvider
from broker.providers.oauth2 import ASSERTION_LIFETIME, OAuth2Provider
from broker.source import CachingTokenSource
from tests.support.oauth2 import AuthorizationServer

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

#: With characters that client_secret_basic must form-urlencode (RFC 6749 section 2.3.1).
SECRET = "s3cr3t+with:odd%chars&=/never-logged"
SERVICE_ACCOUNT = "mail-relay@contoso-mail.iam.gserviceaccount.com"
USERS = ("reports@contoso.com", "scanner@contoso.com")


PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def pem(key: PrivateKey) -> Secret:
    text = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return Secret(text, origin="file /etc/key.pem")


@pytest.fixture(scope="module")
def client_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def server(tmp_path: Path, client_key: rsa.RSAPrivateKey) -> Iterator[AuthorizationServer]:
    with AuthorizationServer(tmp_path, users=USERS) as s:
        s.register_client("mail-client", secret=SECRET, scopes=["mail", "imap"])
        s.register_client("jwt-client", public_key=client_key.public_key())
        s.register_service_account(SERVICE_ACCOUNT, "key-1", client_key.public_key())
        yield s


def oauth2_app(server: AuthorizationServer, **changes: object) -> App:
    app = App(
        name="keycloak",
        provider="oauth2",
        client_id="mail-client",
        client_secret=Secret(SECRET, origin="env KC_SECRET"),
        token_url=server.token_url,
        scope="mail imap",
        ca_file=server.ca_file,
    )
    return replace(app, **changes)  # type: ignore[arg-type]


def google_app(server: AuthorizationServer, key: rsa.RSAPrivateKey) -> App:
    return App(
        name="gmail",
        provider="google",
        client_id=SERVICE_ACCOUNT,
        private_key=pem(key),
        key_id="key-1",
        token_url=server.token_url,
        scope=GOOGLE_SCOPE,
        ca_file=server.ca_file,
    )


async def fetch_error(app: App) -> BrokerError:
    provider = OAuth2Provider(app)
    with pytest.raises(BrokerError) as caught:
        await provider.fetch()
    return caught.value


# -- generic client credentials ------------------------------------------------------------


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
async def test_client_secret_methods(server: AuthorizationServer, method: str) -> None:
    provider = OAuth2Provider(oauth2_app(server, auth_method=method))
    token = await provider.fetch()
    claims = decode_claims(token.value)
    assert claims["client_id"] == "mail-client"
    assert token.scope == "imap mail"  # as granted by the server
    (form, headers) = server.requests[0]
    assert form["grant_type"] == "client_credentials"
    assert form["scope"] == "mail imap"
    if method == "client_secret_basic":
        assert "client_secret" not in form
        encoded = base64.b64decode(headers["authorization"][6:]).decode()
        assert encoded == "mail-client:s3cr3t%2Bwith%3Aodd%25chars%26%3D%2Fnever-logged"
    else:
        assert form["client_secret"] == SECRET
        assert "authorization" not in headers


@pytest.mark.parametrize("kind", ["RS256", "ES256", "Ed25519"])
async def test_private_key_jwt(
    server: AuthorizationServer, client_key: rsa.RSAPrivateKey, kind: str
) -> None:
    key: PrivateKey = client_key
    if kind == "ES256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif kind == "Ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    server.register_client("jwt-client", public_key=key.public_key())
    app = oauth2_app(
        server,
        client_id="jwt-client",
        client_secret=None,
        private_key=pem(key),
        auth_method="private_key_jwt",
        key_id="k1",
        scope="mail",
    )
    provider = OAuth2Provider(app)
    first = await provider.fetch()
    second = await provider.fetch()  # a fresh assertion (jti) each time
    assert first.value != second.value
    form, _ = server.requests[0]
    assertion = form["client_assertion"]
    header = jwt.get_unverified_header(assertion)
    assert header["kid"] == "k1"
    assert header["alg"] == kind
    claims = decode_claims(assertion)
    assert claims["iss"] == claims["sub"] == "jwt-client"
    assert claims["aud"] == server.token_url
    assert isinstance(claims["exp"], int)
    assert isinstance(claims["iat"], int)
    assert claims["exp"] - claims["iat"] == ASSERTION_LIFETIME == 60
    assert decode_claims(server.requests[1][0]["client_assertion"])["jti"] != claims["jti"]


async def test_wrong_secret_is_permanent_with_a_fix(server: AuthorizationServer) -> None:
    error = await fetch_error(oauth2_app(server, client_secret=Secret("wrong")))
    assert type(error) is PermanentTokenError
    assert error.code == "invalid_client"
    assert "auth_method" in error.fix
    assert "keycloak" in str(error)


async def test_scope_not_granted(server: AuthorizationServer) -> None:
    error = await fetch_error(oauth2_app(server, scope="admin"))
    assert type(error) is PermanentTokenError
    assert error.code == "invalid_scope"


@pytest.mark.parametrize(("status", "retry_after"), [(503, 7), (429, 30), (500, None)])
async def test_temporary_failures(
    server: AuthorizationServer, status: int, retry_after: int | None
) -> None:
    server.fail_next(status, retry_after=retry_after)
    error = await fetch_error(oauth2_app(server))
    assert type(error) is TemporaryTokenError
    assert error.retry_after == retry_after
    assert error.code == f"HTTP {status}"


async def test_not_a_token_endpoint(server: AuthorizationServer) -> None:
    error = await fetch_error(oauth2_app(server, token_url=server.token_url + "/nope"))
    assert type(error) is PermanentTokenError
    assert "token_url" in error.fix


async def test_untrusted_certificate(server: AuthorizationServer) -> None:
    error = await fetch_error(oauth2_app(server, ca_file=None))
    assert type(error) is PermanentTokenError
    assert error.code == "CERTIFICATE_VERIFY_FAILED"
    assert server.token_requests == 0


async def test_unreachable(server: AuthorizationServer) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = await fetch_error(oauth2_app(server, token_url=f"https://127.0.0.1:{port}/token"))
    assert type(error) is TemporaryTokenError
    assert "unreachable" in str(error)


async def test_cancellation_returns_at_once(server: AuthorizationServer) -> None:
    server.latency = 0.5
    provider = OAuth2Provider(oauth2_app(server))
    with trio.move_on_after(0.05) as scope:
        await provider.fetch()
    assert scope.cancelled_caught


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"token_url": "http://idp/token"}, "https://"),
        ({"token_url": ""}, "set issuer"),
        ({"issuer": "https://idp"}, "not both"),
        ({"auth_method": "client_secret_jwt", "client_secret": Secret("short")}, "32 bytes"),
        ({"auth_method": "tls_client_auth"}, "needs client_certificate"),
        ({"auth_method": "mtls"}, "auth_method must be one of"),
        ({"client_secret": None}, "needs client_secret"),
        ({"auth_method": "private_key_jwt", "client_secret": None}, "needs private_key"),
        (
            {"auth_method": "private_key_jwt", "private_key": Secret("not a key")},
            "no readable PEM private key",
        ),
    ],
)
def test_bad_configuration(
    server: AuthorizationServer, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        OAuth2Provider(oauth2_app(server, **changes))


def test_small_rsa_keys_refused(server: AuthorizationServer) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="2048"):
        OAuth2Provider(oauth2_app(server, auth_method="private_key_jwt", private_key=pem(small)))


async def test_through_the_source(server: AuthorizationServer) -> None:
    app = oauth2_app(server)
    source = CachingTokenSource({"keycloak": app})
    assert isinstance(build_provider(app), OAuth2Provider)
    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(source.token, "keycloak")
    assert server.token_requests == 1
    source.close()


# -- discovery (RFC 8414, OpenID Connect Discovery) -------------------------------------------


def discovered(server: AuthorizationServer, **changes: object) -> App:
    return oauth2_app(server, token_url="", issuer=server.issuer, **changes)


@pytest.mark.parametrize("kind", ["rfc8414", "openid"])
async def test_discovery_finds_the_token_endpoint(tmp_path: Path, kind: str) -> None:
    with AuthorizationServer(tmp_path, path="/realms/mail") as server:
        server.register_client("mail-client", secret=SECRET, scopes=["mail", "imap"])
        server.discovery = kind
        provider = OAuth2Provider(discovered(server))
        metadata = await provider.metadata()
        assert metadata is not None
        assert metadata.token_endpoint == server.token_url
        assert "client_secret_basic" in metadata.auth_methods
        token = await provider.fetch()
        await provider.fetch()
        assert decode_claims(token.value)["iss"] == server.issuer
        # Kept: one metadata request (two for OpenID's place, tried second), two tokens.
        assert server.metadata_requests == (1 if kind == "rfc8414" else 2)
        assert server.token_requests == 2


async def test_discovery_is_refreshed_after_a_failure(server: AuthorizationServer) -> None:
    provider = OAuth2Provider(discovered(server))
    await provider.fetch()
    server.fail_next(503)
    with pytest.raises(TemporaryTokenError):
        await provider.fetch()
    await provider.fetch()
    assert server.metadata_requests == 2


async def test_metadata_for_another_issuer_is_refused(server: AuthorizationServer) -> None:
    server.metadata_issuer = "https://evil.example.com"
    error = await fetch_error(discovered(server))
    assert type(error) is PermanentTokenError
    assert error.code == "ISSUER_MISMATCH"
    assert "evil.example.com" in str(error)
    assert server.token_requests == 0


async def test_no_metadata(server: AuthorizationServer) -> None:
    server.discovery = None
    error = await fetch_error(discovered(server))
    assert type(error) is PermanentTokenError
    assert error.code == "NO_METADATA"
    assert "token_url" in error.fix
    assert server.token_requests == 0


async def test_unoffered_auth_method_is_named(server: AuthorizationServer) -> None:
    server.auth_methods = ("private_key_jwt",)
    provider = OAuth2Provider(discovered(server, client_secret=Secret("wrong")))
    metadata = await provider.metadata()
    assert metadata is not None
    assert "client_secret_basic" in (provider.method_problem(metadata) or "")
    with pytest.raises(PermanentTokenError) as caught:
        await provider.fetch()
    assert "not among the methods the server offers (private_key_jwt" in caught.value.fix


# -- client authentication ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server_wants", "configured", "with_issuer", "works"),
    [
        ("issuer", "", True, True),  # the default with discovery: the issuer
        ("token_endpoint", "", True, False),
        ("token_endpoint", "token_endpoint", True, True),
        ("token_endpoint", "", False, True),  # the default without: the token endpoint
        ("issuer", "", False, False),
        ("issuer", "ISSUER", False, True),  # a literal value
    ],
)
async def test_assertion_audience(
    server: AuthorizationServer,
    client_key: rsa.RSAPrivateKey,
    server_wants: str,
    configured: str,
    with_issuer: bool,
    works: bool,
) -> None:
    server.assertion_audience = server_wants
    changes: dict[str, object] = {
        "client_id": "jwt-client",
        "client_secret": None,
        "private_key": pem(client_key),
        "auth_method": "private_key_jwt",
        "scope": "mail",
        "assertion_audience": server.issuer if configured == "ISSUER" else configured,
    }
    app = discovered(server, **changes) if with_issuer else oauth2_app(server, **changes)
    if works:
        await OAuth2Provider(app).fetch()
        return
    error = await fetch_error(app)
    assert error.code == "invalid_client"
    assert "assertion_audience" in error.fix


async def test_client_secret_jwt(server: AuthorizationServer) -> None:
    secret = "x" * 40
    server.register_client("hs-client", secret=secret)
    app = oauth2_app(
        server,
        client_id="hs-client",
        client_secret=Secret(secret),
        auth_method="client_secret_jwt",
        scope="mail",
    )
    await OAuth2Provider(app).fetch()
    form, headers = server.requests[0]
    assert jwt.get_unverified_header(form["client_assertion"])["alg"] == "HS256"
    assert "client_secret" not in form
    assert "authorization" not in headers
    server.register_client("hs-client", secret="y" * 40)
    assert (await fetch_error(app)).code == "invalid_client"


def client_certificate(server: AuthorizationServer, subject: str) -> Secret:
    path = server.pki.issue("client-" + subject, subject)
    return Secret(path.read_text(), origin=f"file {path}")


def self_signed() -> tuple[str, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mail-proxy")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    return pem(key).reveal() + cert_pem.decode(), cert_pem


@pytest.mark.parametrize("alias", [False, True])
async def test_tls_client_auth(server: AuthorizationServer, alias: bool) -> None:
    server.mtls_alias = alias
    credential = client_certificate(server, "mail-proxy.example.com")
    app = discovered(
        server,
        client_id="tls-client",
        client_secret=None,
        auth_method="tls_client_auth",
        client_certificate=credential,
        scope="mail",
    )
    leaf = x509.load_pem_x509_certificates(credential.reveal().encode())[0]
    subject = leaf.subject.rfc4514_string()
    server.register_client("tls-client", tls_subject=subject)
    # With the alias published, the server takes certificates only there.
    await OAuth2Provider(app).fetch()
    form, _ = server.requests[-1]
    assert form["client_id"] == "tls-client"
    assert "client_secret" not in form
    assert "client_assertion" not in form
    server.register_client("tls-client", tls_subject=subject + ",O=Other")
    assert (await fetch_error(app)).code == "invalid_client"


async def test_self_signed_tls_client_auth(server: AuthorizationServer) -> None:
    credential, cert_pem = self_signed()
    server.register_client("self-signed", self_signed_pem=cert_pem)
    app = oauth2_app(
        server,
        client_id="self-signed",
        client_secret=None,
        auth_method="self_signed_tls_client_auth",
        client_certificate=Secret(credential),
        scope="mail",
    )
    await OAuth2Provider(app).fetch()
    _, other_pem = self_signed()
    server.register_client("self-signed", self_signed_pem=other_pem)
    assert (await fetch_error(app)).code == "invalid_client"


def test_client_certificate_must_hold_key_and_certificate(server: AuthorizationServer) -> None:
    app = oauth2_app(
        server,
        client_secret=None,
        auth_method="tls_client_auth",
        client_certificate=Secret("-----BEGIN CERTIFICATE-----\nAA==\n", origin="env X"),
    )
    with pytest.raises(ValueError, match=r"client_certificate \(env X\)"):
        OAuth2Provider(app)


# -- audience and scope ---------------------------------------------------------------------------


async def test_resources_become_audiences(server: AuthorizationServer) -> None:
    server.register_resource("imap://mail.example.com")
    server.register_resource("smtp://mail.example.com")
    app = oauth2_app(
        server, resources=("imap://mail.example.com", "smtp://mail.example.com"), scope="mail"
    )
    token = await OAuth2Provider(app).fetch()
    audiences = ["imap://mail.example.com", "smtp://mail.example.com"]
    assert decode_claims(token.value)["aud"] == audiences
    assert server.requests[0][0]["resource"] == "smtp://mail.example.com"  # the last of two
    # A server may name the audience otherwise: expect_audience says what to expect.
    server.register_resource("smtp://mail.example.com", "submission")
    assert (await fetch_error(app)).code == "TOKEN_AUD"
    named = replace(app, expect_audience=("imap://mail.example.com", "submission"))
    await OAuth2Provider(named).fetch()
    error = await fetch_error(replace(app, resources=("imap://unknown.example.com",)))
    assert error.code == "invalid_target"
    assert "check resource" in error.fix


async def test_a_token_for_another_audience_is_refused(server: AuthorizationServer) -> None:
    # Without a resource the server gives its default audience, not the mail server's.
    app = oauth2_app(server, scope="mail", expect_audience=("imap://mail.example.com",))
    error = await fetch_error(app)
    assert type(error) is PermanentTokenError
    assert error.code == "TOKEN_AUD"
    assert "aud is mail, expected imap://mail.example.com" in str(error)
    assert 'resource = "..."' in error.fix
    assert "eyJ" not in str(error)


async def test_a_dropped_scope_is_refused(server: AuthorizationServer) -> None:
    server.drop_unknown_scopes = True
    error = await fetch_error(oauth2_app(server, scope="mail admin"))
    assert error.code == "TOKEN_SCOPE"
    assert "scope is mail, expected mail admin" in str(error)


async def test_an_opaque_token_with_unstated_scope(server: AuthorizationServer) -> None:
    server.token_format = "opaque"
    server.state_scope = False
    error = await fetch_error(oauth2_app(server, scope="mail"))
    assert error.code == "TOKEN_SCOPE"
    assert "not stated" in str(error)
    # The operator says the mail server checks scopes itself: then it is used.
    token = await OAuth2Provider(oauth2_app(server, scope="mail", expect_scope=())).fetch()
    assert token.scope == "mail"


async def test_a_token_from_another_issuer_is_refused(server: AuthorizationServer) -> None:
    server.token_issuer = "http://127.0.0.1:8080/realms/mail"  # a proxy hides the public name
    error = await fetch_error(discovered(server))
    assert error.code == "TOKEN_ISS"
    assert "behind a reverse proxy" in error.fix


async def test_fixes_follow_the_error_code_and_status(server: AuthorizationServer) -> None:
    # No token_url advice for a request the server found malformed.
    assert "token_url" not in oauth_fix("invalid_request", 400)
    assert "resource" in oauth_fix("invalid_request", 400)
    assert "credentials" in oauth_fix("invalid_request", 401)
    assert "forbids" in oauth_fix("", 403)
    assert "check issuer" in oauth_fix("invalid_request", 404, endpoint="issuer")
    error = await fetch_error(oauth2_app(server, token_url=server.issuer + "/nothing"))
    assert error.code == "HTTP 404"
    assert "check token_url" in error.fix


# -- Google service accounts --------------------------------------------------------------


async def test_google_tokens_are_per_mailbox(
    server: AuthorizationServer, client_key: rsa.RSAPrivateKey
) -> None:
    app = google_app(server, client_key)
    source = CachingTokenSource({"gmail": app})
    assert isinstance(build_provider(app), GoogleProvider)
    a = await source.token("gmail", mailbox="reports@contoso.com")
    assert await source.token("gmail", mailbox="Reports@Contoso.com") is a  # same mailbox
    b = await source.token("gmail", mailbox="scanner@contoso.com")
    assert a.value != b.value
    assert server.token_requests == 2
    assert [c["sub"] for c in server.issued] == ["reports@contoso.com", "scanner@contoso.com"]
    assert a.value.startswith("ya29.")  # opaque, as Google's are
    assert a.scope == GOOGLE_SCOPE
    assert server.issued[0]["scope"] == GOOGLE_SCOPE
    form, _ = server.requests[0]
    assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    claims = decode_claims(form["assertion"])
    assert claims["iss"] == SERVICE_ACCOUNT
    assert claims["sub"] == "reports@contoso.com"
    assert claims["scope"] == GOOGLE_SCOPE
    assert claims["aud"] == server.token_url
    with pytest.raises(PermanentTokenError, match="per mailbox"):
        await source.token("gmail")
    source.close()


async def test_google_unknown_mailbox_fails_alone(
    server: AuthorizationServer, client_key: rsa.RSAPrivateKey
) -> None:
    source = CachingTokenSource({"gmail": google_app(server, client_key)})
    with pytest.raises(PermanentTokenError) as caught:
        await source.token("gmail", mailbox="nobody@contoso.com")
    assert caught.value.code == "MAILBOX"
    assert "nobody@contoso.com" in str(caught.value)
    assert "not a user" in caught.value.fix
    await source.token("gmail", mailbox="reports@contoso.com")  # others are unaffected
    source.close()


async def test_google_without_delegation(
    server: AuthorizationServer, client_key: rsa.RSAPrivateKey
) -> None:
    server.register_service_account(SERVICE_ACCOUNT, "key-1", client_key.public_key(), delegated=())
    provider = GoogleProvider(google_app(server, client_key))
    with pytest.raises(PermanentTokenError) as caught:
        await provider.fetch_for("reports@contoso.com")
    assert caught.value.code == "unauthorized_client"
    assert "Domain Wide Delegation" in caught.value.fix


async def test_google_deleted_key(server: AuthorizationServer) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    provider = GoogleProvider(google_app(server, other))
    with pytest.raises(PermanentTokenError) as caught:
        await provider.fetch_for("reports@contoso.com")
    assert caught.value.code == "invalid_grant"
    assert "create a new key" in caught.value.fix


async def test_google_throttling_is_temporary(
    server: AuthorizationServer, client_key: rsa.RSAPrivateKey
) -> None:
    server.fail_next(429, retry_after=12)
    provider = GoogleProvider(google_app(server, client_key))
    with pytest.raises(TemporaryTokenError) as caught:
        await provider.fetch_for("reports@contoso.com")
    assert caught.value.retry_after == 12


async def test_no_secret_in_logs_or_errors(
    server: AuthorizationServer,
    client_key: rsa.RSAPrivateKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    key_text = pem(client_key).reveal()
    key_lines = [line for line in key_text.splitlines() if not line.startswith("-----")][:5]
    texts: list[str] = []
    tokens: list[str] = []
    certificate = client_certificate(server, "tls-client.example.com")
    leaf = x509.load_pem_x509_certificates(certificate.reveal().encode())[0]
    server.register_client("tls-client", tls_subject=leaf.subject.rfc4514_string())
    certificate_key = [
        line for line in certificate.reveal().split("-----END")[0].splitlines() if "---" not in line
    ][:5]
    apps = {
        "basic": oauth2_app(server),
        "post": oauth2_app(server, auth_method="client_secret_post"),
        "wrong": oauth2_app(server, client_secret=Secret(SECRET[::-1])),
        "gmail": google_app(server, client_key),
        "hs256": oauth2_app(server, auth_method="client_secret_jwt"),
        "hs-wrong": oauth2_app(
            server, auth_method="client_secret_jwt", client_secret=Secret(SECRET[::-1])
        ),
        "tls": oauth2_app(
            server,
            client_id="tls-client",
            client_secret=None,
            auth_method="tls_client_auth",
            client_certificate=certificate,
            scope="mail",
        ),
        "mismatch": oauth2_app(server, expect_audience=("imap://elsewhere.example.com",)),
    }
    source = CachingTokenSource(apps)
    for name in apps:
        try:
            token = await source.token(name, mailbox="reports@contoso.com")
        except BrokerError as exc:
            texts += [str(exc), repr(exc), exc.fix]
        else:
            tokens.append(token.value)
            texts += [repr(token), str(token)]
    server.fail_next(503, retry_after=1)
    try:
        await OAuth2Provider(apps["basic"]).fetch()
    except BrokerError as exc:
        texts += [str(exc), exc.fix]
    texts += [repr(source), *(repr(a) for a in apps.values())]
    texts += [r.getMessage() for r in caplog.records]
    source.close()
    assert len(tokens) == 5
    secrets = [SECRET, SECRET[::-1], *key_lines, *certificate_key, *tokens]
    for text in texts:
        for secret in secrets:
            assert secret not in text
            assert base64.b64encode(secret.encode()).decode() not in text
        assert "eyJ" not in text
        assert "ya29." not in text
