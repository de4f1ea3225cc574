"""The Entra emulator itself, spoken to over raw HTTPS: it must be as strict as Entra."""

from __future__ import annotations

import base64
import ssl
import time
import uuid
from typing import TYPE_CHECKING, Any

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.broker.helpers import (
    CERT_CLIENT_ID,
    CLIENT_SECRET,
    SECRET_CLIENT_ID,
    rsa_certificate_pem,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.support.entra import EntraEmulator

SCOPE = "https://outlook.office365.com/.default"


@pytest.fixture
def http(idp: EntraEmulator) -> Iterator[httpx.Client]:
    context = ssl.create_default_context(cafile=str(idp.ca_file))
    with httpx.Client(verify=context, timeout=5) as client:
        yield client


def secret_form(**changes: str) -> dict[str, str]:
    form = {
        "grant_type": "client_credentials",
        "client_id": SECRET_CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "scope": SCOPE,
    }
    form.update(changes)
    return form


def assertion(
    idp: EntraEmulator,
    pem: bytes,
    *,
    algorithm: str = "RS256",
    audience: str | None = None,
    client_id: str = CERT_CLIENT_ID,
    lifetime: float = 600,
    x5c: bool = True,
) -> str:
    key = serialization.load_pem_private_key(pem, password=None)
    cert = x509.load_pem_x509_certificates(pem)[0]
    headers: dict[str, Any] = {}
    if algorithm == "RS256":
        headers["x5t"] = base64.urlsafe_b64encode(cert.fingerprint(hashes.SHA1())).decode()
    else:
        digest = cert.fingerprint(hashes.SHA256())
        headers["x5t#S256"] = base64.urlsafe_b64encode(digest).decode()
    if x5c:
        der = cert.public_bytes(serialization.Encoding.DER)
        headers["x5c"] = [base64.b64encode(der).decode()]
    now = time.time()
    claims = {
        "aud": audience or idp.token_url,
        "iss": client_id,
        "sub": client_id,
        "exp": now + lifetime,
        "iat": now,
        "jti": str(uuid.uuid4()),
    }
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)  # type: ignore[arg-type]


def assertion_form(token: str, client_id: str = CERT_CLIENT_ID) -> dict[str, str]:
    return {
        "grant_type": "client_credentials",
        "client_id": client_id,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": token,
        "scope": SCOPE,
    }


def entra_error(response: httpx.Response, status: int, error: str, code: int) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error
    assert body["error_codes"] == [code]
    assert body["error_description"].startswith(f"AADSTS{code}: ")
    for key in ("timestamp", "trace_id", "correlation_id"):
        assert body[key]


@pytest.mark.parametrize("by_guid", [False, True])
def test_discovery_by_domain_or_guid(idp: EntraEmulator, http: httpx.Client, by_guid: bool) -> None:
    tenant = idp.tenant_id if by_guid else idp.tenant
    doc = http.get(f"{idp.authority}/{tenant}/v2.0/.well-known/openid-configuration").json()
    assert doc["token_endpoint"] == idp.token_url
    assert doc["issuer"] == f"{idp.authority}/{idp.tenant_id}/v2.0"
    assert doc["authorization_endpoint"].endswith("/oauth2/v2.0/authorize")
    keys = http.get(doc["jwks_uri"]).json()["keys"]
    assert [k["kid"] for k in keys] == [idp.kid]


def test_unknown_tenant_is_aadsts90002(idp: EntraEmulator, http: httpx.Client) -> None:
    url = f"{idp.authority}/fabrikam.example/v2.0/.well-known/openid-configuration"
    entra_error(http.get(url), 400, "invalid_tenant", 90002)
    token_url = f"{idp.authority}/fabrikam.example/oauth2/v2.0/token"
    entra_error(http.post(token_url, data=secret_form()), 400, "invalid_request", 90002)


def test_issued_token_is_what_dovecot_verifies(idp: EntraEmulator, http: httpx.Client) -> None:
    url = f"{idp.authority}/{idp.tenant}/oauth2/v2.0/token"
    body = http.post(url, data=secret_form()).json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    token = body["access_token"]
    assert jwt.get_unverified_header(token) == {"typ": "JWT", "alg": "RS256", "kid": idp.kid}
    # Verifies with the published key, and with the PEM Dovecot gets.
    jwks = http.get(f"{idp.authority}/{idp.tenant}/discovery/v2.0/keys").json()
    jwk_key = jwt.PyJWK(jwks["keys"][0]).key
    pem_key = serialization.load_pem_public_key(idp.public_key_pem())
    claims, again = (
        jwt.decode(
            token,
            key,  # type: ignore[arg-type]
            algorithms=["RS256"],
            audience="https://outlook.office365.com",
            issuer=idp.issuer,
        )
        for key in (jwk_key, pem_key)
    )
    assert claims == again
    now = time.time()
    assert claims["tid"] == idp.tenant_id
    assert claims["appid"] == SECRET_CLIENT_ID
    assert claims["roles"] == ["IMAP.AccessAsApp", "POP.AccessAsApp", "SMTP.SendAsApp"]
    assert claims["idtyp"] == "app"
    assert claims["sub"] == claims["oid"]
    assert claims["app_displayname"]
    assert now - 310 <= claims["iat"] == claims["nbf"] <= now - 290
    assert now + 3590 <= claims["exp"] <= now + 3610
    assert idp.issued == [claims]
    assert idp.token_requests == 1


def test_secret_by_http_basic(idp: EntraEmulator, http: httpx.Client) -> None:
    form = secret_form()
    del form["client_secret"], form["client_id"]
    response = http.post(idp.token_url, data=form, auth=(SECRET_CLIENT_ID, CLIENT_SECRET))
    assert response.status_code == 200, response.text
    bad = http.post(idp.token_url, data=form, auth=(SECRET_CLIENT_ID, "nope"))
    entra_error(bad, 401, "invalid_client", 7000215)


def test_lifetime_and_roles_are_configurable(idp: EntraEmulator, http: httpx.Client) -> None:
    idp.lifetime = 120
    idp.register_app("cafe0000-0000-0000-0000-000000000000", secret="s", roles=["IMAP.AccessAsApp"])
    form = secret_form(client_id="cafe0000-0000-0000-0000-000000000000", client_secret="s")
    body = http.post(idp.token_url, data=form).json()
    assert body["expires_in"] == 120
    assert idp.issued[-1]["roles"] == ["IMAP.AccessAsApp"]


@pytest.mark.parametrize(
    ("changes", "status", "error", "code"),
    [
        ({"client_secret": "wrong"}, 401, "invalid_client", 7000215),
        ({"client_id": str(uuid.UUID(int=7))}, 400, "unauthorized_client", 700016),
        ({"scope": "https://outlook.office365.com/IMAP.AccessAsUser.All"}, 400, "invalid_scope",
         1002012),
        ({"scope": "https://graph.example/.default"}, 400, "invalid_resource", 500011),
        ({"grant_type": "password"}, 400, "unsupported_grant_type", 70003),
        ({"client_secret": ""}, 401, "invalid_client", 7000218),
    ],
)  # fmt: skip
def test_token_endpoint_errors(
    idp: EntraEmulator,
    http: httpx.Client,
    changes: dict[str, str],
    status: int,
    error: str,
    code: int,
) -> None:
    form = {k: v for k, v in secret_form(**changes).items() if v}
    entra_error(http.post(idp.token_url, data=form), status, error, code)
    assert idp.issued == []


@pytest.mark.parametrize("algorithm", ["RS256", "PS256"])
def test_certificate_assertion_accepted(
    idp: EntraEmulator, http: httpx.Client, certificate_pem: bytes, algorithm: str
) -> None:
    token = assertion(idp, certificate_pem, algorithm=algorithm)
    response = http.post(idp.token_url, data=assertion_form(token))
    assert response.status_code == 200, response.text
    assert idp.issued[-1]["appid"] == CERT_CLIENT_ID
    assert idp.issued[-1]["appidacr"] == "2"


def test_certificate_assertion_checks(
    idp: EntraEmulator, http: httpx.Client, certificate_pem: bytes
) -> None:
    def post(token: str, client_id: str = CERT_CLIENT_ID) -> httpx.Response:
        return http.post(idp.token_url, data=assertion_form(token, client_id))

    unregistered = rsa_certificate_pem("intruder")
    entra_error(post(assertion(idp, unregistered)), 401, "invalid_client", 700027)
    wrong_aud = assertion(idp, certificate_pem, audience="https://elsewhere.example/token")
    entra_error(post(wrong_aud), 401, "invalid_client", 700027)
    expired = assertion(idp, certificate_pem, lifetime=-60)
    entra_error(post(expired), 401, "invalid_client", 700024)
    # Signed by the registered certificate, but claiming to be another app.
    idp.register_app("beef0000-0000-0000-0000-000000000000", certificate_pem=certificate_pem)
    other = assertion(idp, certificate_pem, client_id=CERT_CLIENT_ID)
    entra_error(post(other, "beef0000-0000-0000-0000-000000000000"), 401, "invalid_client", 700021)
    # A signature made by another key under the registered certificate's thumbprint.
    forged = assertion(idp, certificate_pem).split(".")
    forged[2] = assertion(idp, unregistered).split(".")[2]
    entra_error(post(".".join(forged)), 401, "invalid_client", 700027)
    entra_error(post("not-a-jwt"), 401, "invalid_client", 700027)
    assert idp.issued == []


def test_fail_next_injects_failures(idp: EntraEmulator, http: httpx.Client) -> None:
    idp.fail_next(429, error="temporarily_unavailable", retry_after=7, count=2)
    first = http.post(idp.token_url, data=secret_form())
    assert first.status_code == 429
    assert first.headers["Retry-After"] == "7"
    assert first.json()["error"] == "temporarily_unavailable"
    assert first.json()["error_codes"] == [90033]
    assert http.post(idp.token_url, data=secret_form()).status_code == 429
    assert http.post(idp.token_url, data=secret_form()).status_code == 200
    idp.fail_next(503, count=3)
    third = http.post(idp.token_url, data=secret_form())
    assert third.status_code == 503
    assert "Retry-After" not in third.headers
    idp.fail_next(500, count=0)  # replaces what is pending: clears it
    assert http.post(idp.token_url, data=secret_form()).status_code == 200
    assert idp.token_requests == 5
    assert len(idp.issued) == 2
