"""MicrosoftProvider against the Entra emulator, through the real msal client."""

from __future__ import annotations

import email.utils
import socket
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from broker.claims import decode_claims
from broker.errors import BrokerError, PermanentTokenError, TemporaryTokenError
from broker.model import App, Secret
from broker.providers import build_provider
from broker.providers._http import MAX_RETRY_AFTER
from broker.providers._http import retry_after as _retry_after
from broker.providers.microsoft import MicrosoftProvider
from tests.broker.helpers import CERT_CLIENT_ID, CLIENT_SECRET, SECRET_CLIENT_ID

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.support.entra import EntraEmulator


@pytest.fixture
def provider(secret_app: App) -> Iterator[MicrosoftProvider]:
    with MicrosoftProvider(secret_app) as p:
        yield p


async def fetch_error(app: App, **kwargs: float) -> BrokerError:
    with MicrosoftProvider(app, **kwargs) as p, pytest.raises(BrokerError) as caught:
        await p.fetch()
    return caught.value


async def test_client_secret(idp: EntraEmulator, provider: MicrosoftProvider) -> None:
    before = time.time()
    token = await provider.fetch()
    claims = decode_claims(token.value)
    assert claims == idp.issued[0]
    assert claims["appid"] == SECRET_CLIENT_ID
    assert claims["appidacr"] == "1"
    assert claims["aud"] == "https://outlook.office365.com"
    assert claims["roles"] == ["IMAP.AccessAsApp", "POP.AccessAsApp", "SMTP.SendAsApp"]
    assert before + 3600 <= token.expires_at <= time.time() + 3600
    assert token.scope == "https://outlook.office365.com/.default"


async def test_certificate(idp: EntraEmulator, cert_app: App) -> None:
    with MicrosoftProvider(cert_app) as p:
        token = await p.fetch()
    claims = decode_claims(token.value)
    assert claims["appid"] == CERT_CLIENT_ID
    assert claims["appidacr"] == "2"  # authenticated with a certificate
    assert claims["tid"] == idp.tenant_id


async def test_every_fetch_asks_the_idp(idp: EntraEmulator, provider: MicrosoftProvider) -> None:
    """msal's own token cache would answer the second call: we disabled it on purpose."""
    idp.lifetime = 900  # inside our refresh window, outside msal's five-minute one
    first = await provider.fetch()
    second = await provider.fetch()
    assert idp.token_requests == 2
    assert first.value != second.value


async def test_error_is_not_replayed_by_msal(
    idp: EntraEmulator, provider: MicrosoftProvider
) -> None:
    """msal's HTTP cache would replay a 503 for 5 s and a 400 for 60 s: disabled."""
    idp.fail_next(503)
    with pytest.raises(TemporaryTokenError):
        await provider.fetch()
    await provider.fetch()
    idp.fail_next(400, error="invalid_request", aadsts=90014)
    with pytest.raises(PermanentTokenError):
        await provider.fetch()
    await provider.fetch()
    assert idp.token_requests == 4


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"client_secret": Secret("the-secret-ID-not-its-value")}, "AADSTS7000215"),
        ({"client_id": "00000000-dead-beef-0000-000000000000"}, "AADSTS700016"),
        ({"tenant": "fabrikam.onmicrosoft.com"}, "AADSTS90002"),
        ({"scope": "https://outlook.office365.com/IMAP.AccessAsUser.All"}, "AADSTS1002012"),
        ({"scope": "https://graph.example/.default"}, "AADSTS500011"),
    ],
)
async def test_permanent_aadsts_errors(
    secret_app: App, change: dict[str, object], code: str
) -> None:
    error = await fetch_error(replace(secret_app, **change))  # type: ignore[arg-type]
    assert type(error) is PermanentTokenError
    assert error.code == code
    assert error.fix
    assert code in str(error)
    assert "contoso" in str(error)  # names the app


async def test_unregistered_certificate(idp: EntraEmulator, cert_app: App) -> None:
    leaf = trustme.CA().issue_cert("other.example", key_type=trustme.KeyType.RSA)
    pem = leaf.private_key_pem.bytes() + leaf.cert_chain_pems[0].bytes()
    error = await fetch_error(replace(cert_app, certificate=Secret(pem.decode())))
    assert type(error) is PermanentTokenError
    assert error.code == "AADSTS700027"
    assert "Upload this certificate" in error.fix
    assert idp.token_requests == 1


@pytest.mark.parametrize("same_issuer", [True, False])
async def test_subject_name_and_issuer_authentication(
    idp: EntraEmulator, cert_app: App, same_issuer: bool
) -> None:
    """No certificate uploaded: the app trusts a subject from an issuer (Entra's subject
    name + issuer authentication). It works only because the provider sends the public
    certificate (x5c) with the assertion, and only for a certificate from that issuer."""
    issuer = trustme.CA(key_type=trustme.KeyType.RSA)
    impostor = trustme.CA(key_type=trustme.KeyType.RSA)
    leaf = (issuer if same_issuer else impostor).issue_cert(
        "mail-proxy.contoso.com", common_name="mail-proxy", key_type=trustme.KeyType.RSA
    )
    subject = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).subject
    idp.register_app(
        CERT_CLIENT_ID,
        trusted_subject=(subject.rfc4514_string(), issuer.cert_pem.bytes()),
    )
    pem = leaf.private_key_pem.bytes() + b"".join(c.bytes() for c in leaf.cert_chain_pems)
    app = replace(cert_app, certificate=Secret(pem.decode()))
    if same_issuer:
        with MicrosoftProvider(app) as p:
            token = await p.fetch()
        assert decode_claims(token.value)["appidacr"] == "2"
    else:
        error = await fetch_error(app)
        assert error.code == "AADSTS700027"


@pytest.mark.parametrize(
    ("status", "error", "aadsts", "code"),
    [
        (401, "invalid_client", 7000222, "AADSTS7000222"),
        (401, "invalid_client", 700024, "AADSTS700024"),
        (400, "invalid_request", 50049, "AADSTS50049"),
        (400, "invalid_client", 9999999, "AADSTS9999999"),  # unknown code: still permanent
    ],
)
async def test_injected_permanent_errors(
    idp: EntraEmulator, provider: MicrosoftProvider, status: int, error: str, aadsts: int, code: str
) -> None:
    idp.fail_next(status, error=error, aadsts=aadsts)
    with pytest.raises(PermanentTokenError) as caught:
        await provider.fetch()
    assert caught.value.code == code
    assert caught.value.fix


async def test_expired_secret_fix(idp: EntraEmulator, provider: MicrosoftProvider) -> None:
    idp.fail_next(401, error="invalid_client", aadsts=7000222)
    with pytest.raises(PermanentTokenError) as caught:
        await provider.fetch()
    assert "expired" in caught.value.fix


@pytest.mark.parametrize(
    ("status", "retry_after", "code"),
    [
        (500, None, "AADSTS90033"),
        (503, 30, "AADSTS90033"),
        (429, 12, "AADSTS90033"),
        (400, None, "AADSTS90033"),  # error "temporarily_unavailable" in a 400
    ],
)
async def test_temporary_errors(
    idp: EntraEmulator,
    provider: MicrosoftProvider,
    status: int,
    retry_after: int | None,
    code: str,
) -> None:
    idp.fail_next(status, retry_after=retry_after)
    with pytest.raises(TemporaryTokenError) as caught:
        await provider.fetch()
    assert caught.value.retry_after == retry_after
    assert caught.value.code == code
    if retry_after is not None:
        assert f"retry after {retry_after} s" in str(caught.value)


async def test_throttled_without_entra_json(
    idp: EntraEmulator, provider: MicrosoftProvider
) -> None:
    idp.fail_next(502, error="server_error", aadsts=None, retry_after=3)
    with pytest.raises(TemporaryTokenError) as caught:
        await provider.fetch()
    assert caught.value.retry_after == 3
    assert "HTTP 502" in str(caught.value)


def test_retry_after_forms() -> None:
    assert _retry_after(None) is None
    assert _retry_after("120") == 120
    assert _retry_after("garbage") is None
    assert _retry_after("999999999") == MAX_RETRY_AFTER
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= (_retry_after(in_a_minute) or 0) <= 61
    assert _retry_after(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0


async def test_unreachable_idp(secret_app: App) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with trio.fail_after(30):  # a refused connection is an answer, not a wait
        error = await fetch_error(replace(secret_app, authority=f"https://127.0.0.1:{port}"))
    assert type(error) is TemporaryTokenError
    assert "unreachable" in str(error)
    assert error.retry_after is None


async def test_slow_idp_times_out(idp: EntraEmulator, secret_app: App) -> None:
    idp.latency = 1.0
    error = await fetch_error(secret_app, io_timeout=0.2)
    assert type(error) is TemporaryTokenError
    assert "timed out" in str(error)


async def test_untrusted_idp_certificate(idp: EntraEmulator, secret_app: App) -> None:
    error = await fetch_error(replace(secret_app, ca_file=None))
    assert type(error) is PermanentTokenError
    assert error.code == "CERTIFICATE_VERIFY_FAILED"
    assert "not trusted" in str(error)
    assert "ca_file" in error.fix
    assert idp.token_requests == 0


def test_https_only(secret_app: App) -> None:
    """Refused before msal (which would try the URL) is ever given the secret."""
    with pytest.raises(ValueError, match="authority must be an https:// URL"):
        MicrosoftProvider(replace(secret_app, authority="http://127.0.0.1:9"))


async def test_cancelled_fetch_returns_at_once(idp: EntraEmulator, secret_app: App) -> None:
    """msal runs in a worker thread that a cancelled caller abandons."""
    idp.latency = 0.3
    with MicrosoftProvider(secret_app) as p:
        with trio.move_on_after(0.05) as scope:
            await p.fetch()
        assert scope.cancelled_caught
        assert not idp.issued  # back before the IdP (0.3 s) had answered
        await trio.sleep(0.35)  # let the abandoned thread finish before closing
    assert idp.token_requests == 1


def test_build_provider(secret_app: App) -> None:
    provider = build_provider(secret_app)
    assert isinstance(provider, MicrosoftProvider)
    provider.close()
    with pytest.raises(ValueError, match="unknown provider 'yahoo'"):
        build_provider(replace(secret_app, provider="yahoo"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tenant": ""}, "tenant is required"),
        ({"tenant": "common"}, "cannot issue app-only tokens"),
        ({"client_secret": None}, "needs client_secret or certificate"),
        ({"client_secret": None, "certificate": Secret("no pem here")}, "no readable PEM"),
    ],
)
def test_bad_configuration_fails_at_construction(
    secret_app: App, change: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        MicrosoftProvider(replace(secret_app, **change))  # type: ignore[arg-type]


def test_certificate_must_be_rsa_and_match_its_key(secret_app: App, certificate_pem: bytes) -> None:
    ec = trustme.CA().issue_cert("ec.example")
    ec_pem = ec.private_key_pem.bytes() + ec.cert_chain_pems[0].bytes()
    with pytest.raises(ValueError, match="only RSA"):
        MicrosoftProvider(replace(secret_app, certificate=Secret(ec_pem.decode())))
    other = trustme.CA().issue_cert("x.example", key_type=trustme.KeyType.RSA)
    begin = certificate_pem.index(b"-----BEGIN CERTIFICATE-----")
    mismatched = other.private_key_pem.bytes() + certificate_pem[begin:]
    with pytest.raises(ValueError, match="does not belong to the private key"):
        MicrosoftProvider(replace(secret_app, certificate=Secret(mismatched.decode())))
    assert CLIENT_SECRET not in repr(MicrosoftProvider(secret_app))


async def test_expired_certificate_is_reported_without_asking(
    idp: EntraEmulator, cert_app: App
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired.example")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=400))
        .not_valid_after(now - timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ) + certificate.public_bytes(serialization.Encoding.PEM)
    error = await fetch_error(replace(cert_app, certificate=Secret(pem.decode(), origin="file c")))
    assert type(error) is PermanentTokenError
    assert error.code == "CERTIFICATE_EXPIRED"
    assert "expired on" in str(error)
    assert "Create a new certificate" in error.fix
    assert idp.token_requests == 0


# -- what tokens must say ---------------------------------------------------------------------


async def test_a_domain_tenant_is_resolved_to_its_id_once(
    idp: EntraEmulator, provider: MicrosoftProvider, secret_app: App
) -> None:
    assert secret_app.tenant == idp.tenant  # a domain, not the directory ID
    expected = await provider.expectations()
    assert expected.tenant_id == idp.tenant_id
    assert expected.audiences == ("https://outlook.office365.com",)
    assert await provider.expectations() is expected
    assert idp.token_requests == 0  # learned from tenant discovery, not from a token


async def test_a_token_from_another_tenant_is_refused(
    idp: EntraEmulator, provider: MicrosoftProvider, cert_app: App
) -> None:
    other = "99990000-1111-2222-3333-444455556666"
    idp.token_tenant_id = other
    for candidate in (provider, MicrosoftProvider(cert_app)):  # domain, then GUID tenant
        with pytest.raises(PermanentTokenError) as caught:
            await candidate.fetch()
        assert caught.value.code == "TOKEN_TID"
        assert f"tid is {other}, expected {idp.tenant_id}" in str(caught.value)
        assert "check tenant" in caught.value.fix
    idp.token_tenant_id = None
    await provider.fetch()
