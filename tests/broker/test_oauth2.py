"""The generic OAuth 2.0 and Google providers against a standards-compliant token endpoint."""

from __future__ import annotations

import base64
import logging
from dataclasses import replace
from typing import TYPE_CHECKING

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.claims import decode_claims
from broker.errors import BrokerError, PermanentTokenError, TemporaryTokenError
from broker.model import GOOGLE_SCOPE, App, Secret
from broker.providers import build_provider
from broker.providers.google import GoogleProvider
from broker.providers.oauth2 import OAuth2Provider
from broker.source import CachingTokenSource
from tests.support.oauth2 import AuthorizationServer

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

#: With characters that client_secret_basic must form-urlencode (RFC 6749 section 2.3.1).
SECRET = "s3cr3t+with:odd%chars&=/never-logged"
SERVICE_ACCOUNT = "mail-relay@contoso-mail.iam.gserviceaccount.com"
USERS = ("reports@contoso.com", "scanner@contoso.com")


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> Secret:
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


@pytest.mark.parametrize("curve", [None, ec.SECP256R1()])
async def test_private_key_jwt(
    server: AuthorizationServer, client_key: rsa.RSAPrivateKey, curve: ec.EllipticCurve | None
) -> None:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = client_key
    if curve is not None:
        key = ec.generate_private_key(curve)
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
    assert header["alg"] == ("RS256" if curve is None else "ES256")
    claims = decode_claims(assertion)
    assert claims["iss"] == claims["sub"] == "jwt-client"
    assert claims["aud"] == server.token_url
    assert isinstance(claims["exp"], int)
    assert isinstance(claims["iat"], int)
    assert claims["exp"] - claims["iat"] == 300


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
        ({"token_url": ""}, "token_url is required"),
        ({"auth_method": "client_secret_jwt"}, "auth_method must be one of"),
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
    assert decode_claims(a.value)["scope"] == GOOGLE_SCOPE
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
    apps = {
        "basic": oauth2_app(server),
        "post": oauth2_app(server, auth_method="client_secret_post"),
        "wrong": oauth2_app(server, client_secret=Secret(SECRET[::-1])),
        "gmail": google_app(server, client_key),
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
    assert len(tokens) == 3
    secrets = [SECRET, SECRET[::-1], *key_lines, *tokens]
    for text in texts:
        for secret in secrets:
            assert secret not in text
            assert base64.b64encode(secret.encode()).decode() not in text
        assert "eyJ" not in text
