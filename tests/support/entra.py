"""An HTTPS emulation of Microsoft Entra ID's v2.0 endpoints, for tests only.

The real identity provider cannot be reached from the test machines, so the broker's real msal
client is pointed at this server instead (``authority=https://127.0.0.1:PORT/TENANT``,
``instance_discovery=False``). It serves what msal and Dovecot need, shaped like Entra's:

- ``GET /{tenant}/v2.0/.well-known/openid-configuration`` -- the discovery document;
- ``GET /{tenant}/discovery/v2.0/keys`` -- the JWKS with the emulator's signing key;
- ``POST /{tenant}/oauth2/v2.0/token`` -- the client-credentials grant, with a client secret
  (form body or HTTP Basic) or a certificate-signed client assertion (RFC 7523); and, for
  apps people sign in to (delegated permissions), the device code, authorization code (with
  PKCE) and refresh token grants;
- ``POST /{tenant}/oauth2/v2.0/devicecode`` -- a device sign-in (RFC 8628), for public
  clients ("Allow public client flows"); the person enters the code at ``/devicelogin``;
- ``GET /{tenant}/oauth2/v2.0/authorize`` -- a browser sign-in: a page whose form (account,
  consent) posts back to the same URL, which redirects to the app's loopback redirect URI
  (any port) with a code, or with ``response_mode=form_post`` gives a form posting it there.

``{tenant}`` is the tenant's domain or its GUID, or for sign-ins ``common``,
``organizations`` or ``consumers``. People (:meth:`EntraEmulator.add_person`) sign in with
the forms' ``login`` and ``consent`` fields (tests/support/browser.py fills them); their
consent is remembered per app, and renewals honour it as Entra does: refresh tokens rotate
(the old ones stay valid), a changed password (:meth:`EntraEmulator.change_password`) makes
every earlier refresh token fail with AADSTS50173, withdrawn consent with AADSTS65001.

Failures use Entra's JSON error shape (``error``, ``error_description`` starting
``AADSTS<code>: ``, ``error_codes``, ``timestamp``, ``trace_id``, ``correlation_id``,
``error_uri``) and its codes.

A person's tokens are v1 access tokens for ``https://outlook.office.com`` with ``scp`` (the
delegated permissions granted), ``upn`` and ``unique_name``, and come with an ID token
(``preferred_username``, ``nonce``) and a refresh token. App tokens are app-only v1 access
tokens for Exchange Online. Both are signed RS256 with a per-emulator key, with the claims
Dovecot's local JWT validation looks at: header ``typ``/``alg``/``kid``; ``aud``, ``iss``,
``sub``, ``exp``, and ``iat``/``nbf`` five minutes in the past, as Entra does (Dovecot
allows no clock leeway). ``public_key_pem()`` is what Dovecot's key dictionary needs.

The server runs in background threads (stdlib ``ThreadingHTTPServer``); every attribute the
tests read or set is safe to use from the test's thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Final, Self
from urllib.parse import parse_qs, unquote, urlsplit

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.support.certs import TestPki
from tests.support.people import Page, PersonError, SignIn, SignIns, loopback_match

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Sequence
    from pathlib import Path
    from types import TracebackType

__all__ = ["DEFAULT_ROLES", "OUTLOOK_RESOURCE", "EntraEmulator"]

OUTLOOK_RESOURCE: Final = "https://outlook.office365.com"
DEFAULT_ROLES: Final = ("IMAP.AccessAsApp", "POP.AccessAsApp", "SMTP.SendAsApp")
#: Resources the emulated tenant knows (application ID URIs), mapped to the ``aud`` they get.
_RESOURCES: Final = {
    "https://outlook.office365.com": OUTLOOK_RESOURCE,
    "https://outlook.office.com": "https://outlook.office.com",
}
_ASSERTION_TYPE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_DEVICE_GRANT: Final = "urn:ietf:params:oauth:grant-type:device_code"
#: The delegated permissions of Office 365 Exchange Online for IMAP, POP3 and SMTP.
DELEGATED_PERMISSIONS: Final = ("IMAP.AccessAsUser.All", "POP.AccessAsUser.All", "SMTP.Send")
#: Scopes of OpenID Connect that any sign-in may ask for.
_OIDC_SCOPES: Final = frozenset({"openid", "profile", "offline_access", "email"})
#: Tenants that sign in people of any tenant, or personal accounts.
_SHARED_TENANTS: Final = ("common", "organizations", "consumers")
#: What the emulator's errors for people's grants say (error, AADSTS code).
_PERSON_ERRORS: Final[dict[str, tuple[str, int]]] = {
    "authorization_pending": ("authorization_pending", 70016),
    "slow_down": ("slow_down", 70016),
    "expired_token": ("expired_token", 70020),
    "declined": ("authorization_declined", 70000),
    "bad_verification_code": ("bad_verification_code", 70019),
    "invalid_grant": ("invalid_grant", 70000),
    "revoked": ("invalid_grant", 50173),
    "consent": ("invalid_grant", 65001),
}
#: How far in the past Entra dates ``iat`` and ``nbf``.
_BACKDATE: Final = 300


@dataclass
class _Registration:
    client_id: str
    display_name: str
    object_id: str
    secret: str | None
    certificates: list[x509.Certificate]
    roles: tuple[str, ...]
    #: Subject name + issuer trust (Entra's "trustedCertificateSubjects"): any certificate
    #: with this subject, issued by this CA and sent in x5c, is the app's.
    trusted_subject: tuple[str, x509.Certificate] | None = None
    #: "Allow public client flows": people may sign in without a client credential.
    public_client: bool = False
    #: Delegated permissions people may consent to (none: an app-only registration).
    delegated: tuple[str, ...] = ()
    #: Redirect URIs of the "Mobile and desktop applications" platform (loopback: any port).
    redirect_uris: tuple[str, ...] = ()


@dataclass
class _Failure:
    status: int
    error: str
    aadsts: int | None
    retry_after: int | None


@dataclass
class _Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    #: Seconds between the body's bytes (0: all at once).
    trickle: float = 0.0
    #: A page for a person's browser instead of JSON.
    html: str | None = None


class _EntraError(Exception):
    """An OAuth error response, in Entra's shape."""

    def __init__(self, status: int, error: str, code: int, text: str) -> None:
        super().__init__(f"AADSTS{code}: {text}")
        self.status = status
        self.error = error
        self.code = code
        self.text = text


class EntraEmulator:
    """An emulated Entra tenant over HTTPS on 127.0.0.1; use it as a context manager.

    ``pki_dir`` receives the emulator's own throwaway CA (in an ``entra`` subdirectory, so it
    never overwrites another :class:`TestPki` in the same directory); trust :attr:`ca_file`.
    The token signing key is a fresh RSA key unless ``signing_key`` is given (test suites
    may share one to save the key generation per emulator).
    """

    def __init__(
        self,
        pki_dir: Path,
        tenant: str = "contoso.onmicrosoft.com",
        *,
        signing_key: rsa.RSAPrivateKey | None = None,
    ) -> None:
        self.tenant = tenant
        self.tenant_id = str(uuid.uuid4())
        self.issuer = f"https://sts.windows.net/{self.tenant_id}/"
        #: Lifetime of issued tokens, in seconds.
        self.lifetime: float = 3600.0
        #: Delay added to every token request, in seconds.
        self.latency: float = 0.0
        #: Seconds between the bytes of each token response body (0: all at once): a server
        #: so slow that no single read times out, until the emulator is closed.
        self.trickle: float = 0.0
        #: Claims of every token issued, in order.
        self.issued: list[dict[str, Any]] = []
        #: Overrides the tid of issued tokens (an app consented in another tenant).
        self.token_tenant_id: str | None = None
        #: People, their consent, and their sign-ins.
        self.people = SignIns(rotate=True)
        self._pki = TestPki(pki_dir / "entra")
        self.ca_file = self._pki.ca_file
        self._server_pem = self._pki.issue("entra-server", "127.0.0.1", "localhost")
        self._key = signing_key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        der = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.kid = _b64url(hashlib.sha1(der).digest())
        self._lock = threading.Lock()
        self._apps: dict[str, _Registration] = {}
        self._failures: list[_Failure] = []
        self._token_requests = 0
        self._closing = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Self:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self._server_pem)
        server = _Server(("127.0.0.1", 0), _Handler, emulator=self, context=context)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._closing.set()  # ends trickling responses
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join()

    # -- what tests read ------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the emulator is not running: use it in a with statement")
        return int(self._server.server_address[1])

    @property
    def authority(self) -> str:
        """The authority host URL, without the tenant (``App.authority``)."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        """The token endpoint as the discovery document advertises it (tenant GUID form)."""
        return f"{self.authority}/{self.tenant_id}/oauth2/v2.0/token"

    @property
    def token_requests(self) -> int:
        """How many POSTs reached the token endpoint (failed ones included)."""
        with self._lock:
            return self._token_requests

    def public_key_pem(self) -> bytes:
        """The token signing key, as a PEM public key (for Dovecot's local validation)."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    # -- what tests configure -------------------------------------------------------------

    def register_app(
        self,
        client_id: str,
        *,
        secret: str | None = None,
        certificate_pem: bytes | None = None,
        roles: Sequence[str] = DEFAULT_ROLES,
        display_name: str | None = None,
        trusted_subject: tuple[str, bytes] | None = None,
        public_client: bool = False,
        delegated: Sequence[str] = (),
        redirect_uris: Sequence[str] = ("http://127.0.0.1", "http://localhost"),
    ) -> None:
        """Register (or replace) an application with a secret and/or a certificate.

        ``delegated`` permissions (e.g. :data:`DELEGATED_PERMISSIONS`) let people sign in to
        it, at ``redirect_uris`` (loopback: any port), and with ``public_client`` without a
        credential (device sign-ins need that).

        ``certificate_pem`` may hold a private key as well (as :meth:`TestPki.issue` writes
        it); only its first certificate is registered, as the Entra portal does on upload.
        ``trusted_subject`` (an RFC 4514 subject and the issuing CA's PEM) trusts, instead
        of an uploaded certificate, any certificate with that subject from that CA that the
        client sends in the assertion's x5c header (subject name + issuer authentication).
        """
        certificates: list[x509.Certificate] = []
        if certificate_pem is not None:
            certificates.append(x509.load_pem_x509_certificates(certificate_pem)[0])
        registration = _Registration(
            client_id=client_id,
            display_name=display_name or f"xoauth2-proxy test app {client_id[:8]}",
            object_id=str(uuid.uuid4()),
            secret=secret,
            certificates=certificates,
            roles=tuple(roles),
            trusted_subject=(
                (trusted_subject[0], x509.load_pem_x509_certificate(trusted_subject[1]))
                if trusted_subject
                else None
            ),
            public_client=public_client,
            delegated=tuple(delegated),
            redirect_uris=tuple(redirect_uris),
        )
        with self._lock:
            self._apps[client_id.lower()] = registration

    def fail_next(
        self,
        status: int,
        *,
        error: str = "temporarily_unavailable",
        aadsts: int | None = None,
        retry_after: int | None = None,
        count: int = 1,
    ) -> None:
        """Answer the next ``count`` token requests with ``status`` (e.g. 500, 503, 429).

        Replaces any injected failures still pending: ``count=0`` clears them.
        """
        with self._lock:
            self._failures = [_Failure(status, error, aadsts, retry_after)] * count

    def add_person(self, upn: str) -> None:
        """An account of the tenant (or a personal account) that can sign in."""
        self.people.add_person(upn, str(uuid.uuid4()))

    def change_password(self, upn: str) -> None:
        """Revoke every refresh token of ``upn`` issued so far (AADSTS50173 from now on)."""
        self.people.change_password(upn)

    def withdraw_consent(self, upn: str, client_id: str) -> None:
        """``upn`` removes the app's permissions (AADSTS65001 at the next renewal)."""
        self.people.withdraw_consent(upn, client_id.lower())

    @property
    def device_login_url(self) -> str:
        """Where people enter a device sign-in's code (Entra's microsoft.com/devicelogin)."""
        return f"{self.authority}/devicelogin"

    # -- the endpoints (run in the server's threads) ----------------------------------------

    def _route(self, method: str, path: str, headers: dict[str, str], body: bytes) -> _Reply:
        split = urlsplit(path)
        parts = [unquote(p) for p in split.path.split("/") if p]
        if parts == ["devicelogin"]:
            if method == "GET":
                return _page(self.people.device_page("/devicelogin"))
            return _page(self.people.device_submit(_form(body)))
        if len(parts) < 2:
            return _Reply(404, {"error": "not_found"})
        tenant, rest = parts[0], parts[1:]
        try:
            if method == "GET" and rest == ["v2.0", ".well-known", "openid-configuration"]:
                self._check_tenant(tenant, error="invalid_tenant", people=True)
                return _Reply(200, self._openid_configuration(tenant))
            if method == "GET" and rest == ["discovery", "v2.0", "keys"]:
                self._check_tenant(tenant, error="invalid_tenant", people=True)
                return _Reply(200, self._jwks())
            if method == "POST" and rest == ["oauth2", "v2.0", "token"]:
                return self._token(tenant, headers, body)
            if method == "POST" and rest == ["oauth2", "v2.0", "devicecode"]:
                self._check_tenant(tenant, people=True)
                return self._devicecode(_form(body))
            if rest == ["oauth2", "v2.0", "authorize"]:
                self._check_tenant(tenant, people=True)
                if method == "GET":
                    query = {k: v[-1] for k, v in parse_qs(split.query).items()}
                    return self._authorize(query, split.path)
                return _page(self.people.authorize_submit(_form(body)))
        except _EntraError as exc:
            return self._error_reply(exc.status, exc.error, exc.code, exc.text)
        return _Reply(404, {"error": "not_found"})

    def _check_tenant(
        self, tenant: str, *, error: str = "invalid_request", people: bool = False
    ) -> None:
        if people and tenant.lower() in _SHARED_TENANTS:
            return
        if tenant.lower() not in (self.tenant.lower(), self.tenant_id):
            raise _EntraError(
                400,
                error,
                90002,
                f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant "
                "ID and are signing into the correct cloud. Check with your subscription "
                "administrator, this may happen if there are no active subscriptions for the "
                "tenant.",
            )

    def _openid_configuration(self, tenant: str = "") -> dict[str, Any]:
        shared = tenant.lower() in _SHARED_TENANTS
        base = f"{self.authority}/{tenant.lower() if shared else self.tenant_id}"
        return {
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "private_key_jwt",
                "client_secret_basic",
            ],
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{self.authority}/{{tenantid}}/v2.0" if shared else f"{base}/v2.0",
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nbf", "tid", "oid", "roles"],
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
        }

    def _jwks(self) -> dict[str, Any]:
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        jwk.update(kid=self.kid, use="sig", issuer=f"{self.authority}/{self.tenant_id}/v2.0")
        return {"keys": [jwk]}

    def _token(self, tenant: str, headers: dict[str, str], body: bytes) -> _Reply:
        with self._lock:
            self._token_requests += 1
            failure = self._failures.pop(0) if self._failures else None
            latency, trickle = self.latency, self.trickle
        if latency > 0:
            time.sleep(latency)
        try:
            reply = self._token_reply(tenant, headers, body, failure)
        except _EntraError as exc:
            reply = self._error_reply(exc.status, exc.error, exc.code, exc.text)
        reply.trickle = trickle
        return reply

    def _token_reply(
        self, tenant: str, headers: dict[str, str], body: bytes, failure: _Failure | None
    ) -> _Reply:
        if failure is not None:
            reply = self._error_reply(
                failure.status,
                failure.error,
                failure.aadsts if failure.aadsts is not None else 90033,
                "A transient error has occurred. Please try again."
                if failure.aadsts is None
                else f"Injected failure ({failure.error}).",
            )
            if failure.retry_after is not None:
                reply.headers["Retry-After"] = str(failure.retry_after)
            return reply
        self._check_tenant(tenant, people=True)
        form = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        basic_id, basic_secret = _basic_credentials(headers.get("authorization", ""))
        client_id = form.get("client_id") or basic_id
        if form.get("grant_type") in (_DEVICE_GRANT, "authorization_code", "refresh_token"):
            return self._person_grant(form, client_id or "", basic_secret)
        if tenant.lower() in _SHARED_TENANTS:
            self._check_tenant(tenant)
        if form.get("grant_type") != "client_credentials":
            raise _EntraError(
                400,
                "unsupported_grant_type",
                70003,
                f"The app requested an unsupported grant type '{form.get('grant_type', '')}'.",
            )
        if not client_id:
            raise _EntraError(
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'client_id'.",
            )
        with self._lock:
            app = self._apps.get(client_id.lower())
        if app is None:
            raise _EntraError(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory "
                f"'{self.tenant}'. This can happen if the application has not been installed "
                "by the administrator of the tenant or consented to by any user in the tenant. "
                "You may have sent your authentication request to the wrong tenant.",
            )
        audience = self._check_scope(form.get("scope", ""))
        method = self._authenticate(app, form, basic_secret)
        return _Reply(200, self._issue(app, audience, method))

    # -- people's sign-ins ------------------------------------------------------------------

    def _registration(self, client_id: str) -> _Registration:
        with self._lock:
            app = self._apps.get(client_id.lower())
        if app is None:
            raise _EntraError(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory "
                f"'{self.tenant}'.",
            )
        return app

    def _delegated_scopes(self, app: _Registration, scope: str) -> tuple[str, ...]:
        """The scopes asked for, if the app may ask for each of them."""
        scopes = tuple(scope.split())
        for item in scopes:
            if item.lower() in _OIDC_SCOPES:
                continue
            resource, _, permission = item.rpartition("/")
            if resource not in _RESOURCES or permission not in app.delegated:
                raise _EntraError(
                    400,
                    "invalid_scope",
                    70011,
                    f"The provided request must include a 'scope' input parameter. The "
                    f"provided value for the input parameter 'scope' is not valid: {item}.",
                )
        return scopes

    def _devicecode(self, form: dict[str, str]) -> _Reply:
        app = self._registration(form.get("client_id", ""))
        if not app.public_client:
            raise _EntraError(
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' "
                "or 'client_secret'.",
            )
        scopes = self._delegated_scopes(app, form.get("scope", ""))
        device_code, device = self.people.start_device(app.client_id.lower(), scopes)
        return _Reply(
            200,
            {
                "user_code": device.user_code,
                "device_code": device_code,
                "verification_uri": self.device_login_url,
                "expires_in": self.people.device_lifetime,
                "interval": self.people.device_interval,
                "message": f"To sign in, use a web browser to open the page "
                f"{self.device_login_url} and enter the code {device.user_code} to "
                "authenticate.",
            },
        )

    def _authorize(self, query: dict[str, str], path: str) -> _Reply:
        app = self._registration(query.get("client_id", ""))
        redirect = query.get("redirect_uri", "")
        if not any(loopback_match(r, redirect) for r in app.redirect_uris):
            raise _EntraError(
                400,
                "invalid_request",
                50011,
                f"The redirect URI '{redirect}' specified in the request does not match the "
                f"redirect URIs configured for the application '{app.client_id}'.",
            )
        self._delegated_scopes(app, query.get("scope", ""))
        query["client_id"] = app.client_id.lower()
        return _page(self.people.authorize_page(query, path, require_pkce=app.public_client))

    def _person_grant(self, form: dict[str, str], client_id: str, basic: str | None) -> _Reply:
        app = self._registration(client_id)
        if not app.delegated:
            raise _EntraError(
                400,
                "invalid_grant",
                65001,
                f"The user or administrator has not consented to use the application with "
                f"ID '{app.client_id}'.",
            )
        if not app.public_client:
            self._authenticate(app, form, basic)
        people, client = self.people, app.client_id.lower()
        try:
            grant = form.get("grant_type")
            if grant == _DEVICE_GRANT:
                sign_in = people.poll_device(form.get("device_code", ""), client)
            elif grant == "authorization_code":
                sign_in = people.redeem_code(
                    form.get("code", ""),
                    client,
                    form.get("redirect_uri", ""),
                    form.get("code_verifier", ""),
                )
            else:
                sign_in = people.renew(form.get("refresh_token", ""), client)
        except PersonError as exc:
            error, code = _PERSON_ERRORS.get(exc.reason, ("invalid_grant", 70000))
            raise _EntraError(400, error, code, exc.description) from None
        return _Reply(200, self._issue_delegated(app, sign_in))

    def _issue_delegated(self, app: _Registration, sign_in: SignIn) -> dict[str, Any]:
        person = self.people.person(sign_in.login)
        assert person is not None
        now = int(time.time())
        with self._lock:
            lifetime = int(self.lifetime)
        granted = [s for s in sign_in.scopes if s.lower() not in _OIDC_SCOPES]
        audience = _RESOURCES[granted[0].rpartition("/")[0]] if granted else OUTLOOK_RESOURCE
        tid = self.token_tenant_id or self.tenant_id
        claims: dict[str, Any] = {
            "aud": audience,
            "iss": self.issuer,
            "iat": now - _BACKDATE,
            "nbf": now - _BACKDATE,
            "exp": now + lifetime,
            "appid": app.client_id,
            "appidacr": "0" if app.public_client else "1",
            "idtyp": "user",
            "oid": person.subject,
            "scp": " ".join(s.rpartition("/")[2] for s in granted),
            "sub": _b64url(hashlib.sha256(f"{person.subject}{app.client_id}".encode()).digest()),
            "tid": tid,
            "upn": person.login,
            "unique_name": person.login,
            "ver": "1.0",
        }
        token = jwt.encode(
            claims, self._key, algorithm="RS256", headers={"typ": "JWT", "kid": self.kid}
        )
        with self._lock:
            self.issued.append(claims)
        reply: dict[str, Any] = {
            "token_type": "Bearer",
            "scope": " ".join(granted),
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": token,
            "client_info": _b64url(json.dumps({"uid": person.subject, "utid": tid}).encode()),
        }
        if "offline_access" in sign_in.scopes:
            reply["refresh_token"] = self.people.issue_refresh_token(sign_in)
        if "openid" in sign_in.scopes:
            id_claims = {
                "aud": app.client_id,
                "iss": f"{self.authority}/{tid}/v2.0",
                "iat": now - _BACKDATE,
                "nbf": now - _BACKDATE,
                "exp": now + lifetime,
                "name": person.login.split("@")[0],
                "oid": person.subject,
                "preferred_username": person.login,
                "sub": claims["sub"],
                "tid": tid,
                "ver": "2.0",
            }
            if sign_in.nonce:
                id_claims["nonce"] = sign_in.nonce
            reply["id_token"] = jwt.encode(
                id_claims, self._key, algorithm="RS256", headers={"typ": "JWT", "kid": self.kid}
            )
        return reply

    def _check_scope(self, scope: str) -> str:
        if not scope:
            raise _EntraError(
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'scope'.",
            )
        scopes = scope.split()
        resource_scopes = [s for s in scopes if s.endswith("/.default")]
        if len(resource_scopes) != 1 or len(scopes) != 1:
            raise _EntraError(
                400,
                "invalid_scope",
                1002012,
                f"The provided value for scope {scope} is not valid. Client credential flows "
                "must have a scope value with /.default suffixed to the resource identifier "
                "(application ID URI).",
            )
        resource = resource_scopes[0].removesuffix("/.default")
        audience = _RESOURCES.get(resource)
        if audience is None:
            raise _EntraError(
                400,
                "invalid_resource",
                500011,
                f"The resource principal named {resource} was not found in the tenant named "
                f"{self.tenant}. This can happen if the application has not been installed by "
                "the administrator of the tenant or consented to by any user in the tenant.",
            )
        return audience

    def _authenticate(self, app: _Registration, form: dict[str, str], basic: str | None) -> str:
        """Check the client's credential; return Entra's ``appidacr`` (1 secret, 2 cert)."""
        secret = form.get("client_secret") or basic
        assertion = form.get("client_assertion")
        if secret is not None:
            if app.secret is None or not hmac.compare_digest(
                secret.encode("utf-8"), app.secret.encode("utf-8")
            ):
                raise _EntraError(
                    401,
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the "
                    "request is the client secret value, not the client secret ID, for a "
                    f"secret added to app '{app.client_id}'.",
                )
            return "1"
        if assertion is not None:
            if form.get("client_assertion_type") != _ASSERTION_TYPE:
                raise _EntraError(
                    400,
                    "invalid_request",
                    70002,
                    "The client_assertion_type must be '" + _ASSERTION_TYPE + "'.",
                )
            self._verify_assertion(app, assertion)
            return "2"
        raise _EntraError(
            401,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or "
            "'client_secret'.",
        )

    def _verify_assertion(self, app: _Registration, assertion: str) -> None:
        def bad(reason: str) -> _EntraError:
            return _EntraError(
                401,
                "invalid_client",
                700027,
                f"Client assertion failed signature validation. [Reason - {reason}]",
            )

        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.DecodeError as exc:
            raise bad("The client assertion is not a well-formed JWT.") from exc
        algorithm = header.get("alg")
        digest: hashes.HashAlgorithm
        if algorithm == "RS256" and "x5t" in header:
            digest, thumbprint = hashes.SHA1(), header["x5t"]  # Entra still accepts SHA-1 x5t
        elif algorithm == "PS256" and "x5t#S256" in header:
            digest, thumbprint = hashes.SHA256(), header["x5t#S256"]
        else:
            raise bad(
                "The client assertion must be signed RS256 with an x5t header or PS256 with "
                f"an x5t#S256 header; got alg {algorithm!r}."
            )
        certificate = next(
            (
                c
                for c in app.certificates
                if _b64url(c.fingerprint(digest)) == str(thumbprint).rstrip("=")
            ),
            None,
        )
        if certificate is None and app.trusted_subject is not None:
            certificate = self._trusted_by_subject(app.trusted_subject, header, bad)
        if certificate is None:
            raise bad(
                f"The key was not found., Thumbprint of key used by client: '{thumbprint}', "
                f"no certificate with it is registered on application '{app.client_id}'"
            )
        if "x5c" in header:
            try:
                first = base64.b64decode(header["x5c"][0], validate=False)
            except (binascii.Error, IndexError, TypeError) as exc:
                raise bad("The x5c header is malformed.") from exc
            if first != certificate.public_bytes(serialization.Encoding.DER):
                raise bad("The first x5c certificate is not the one the thumbprint names.")
        base = f"{self.authority}/"
        audiences = [f"{base}{t}/oauth2/v2.0/token" for t in (self.tenant, self.tenant_id)] + [
            f"{base}{t}/oauth2/token" for t in (self.tenant, self.tenant_id)
        ]
        try:
            claims = jwt.decode(
                assertion,
                certificate.public_key(),  # type: ignore[arg-type]
                algorithms=[algorithm],
                audience=audiences,
                options={"require": ["aud", "iss", "sub", "exp"]},
            )
        except (jwt.ExpiredSignatureError, jwt.ImmatureSignatureError) as exc:
            raise _EntraError(
                401,
                "invalid_client",
                700024,
                f"Client assertion is not within its valid time range. ({exc})",
            ) from exc
        except jwt.InvalidAudienceError as exc:
            raise bad(f"The audience claim does not name this token endpoint ({exc}).") from exc
        except jwt.InvalidTokenError as exc:
            raise bad(f"The provided signature value did not match ({exc}).") from exc
        if claims.get("iss") != app.client_id or claims.get("sub") != app.client_id:
            raise _EntraError(
                401,
                "invalid_client",
                700021,
                "Client assertion application identifier doesn't match 'client_id' parameter.",
            )

    @staticmethod
    def _trusted_by_subject(
        trust: tuple[str, x509.Certificate],
        header: dict[str, Any],
        bad: Callable[[str], _EntraError],
    ) -> x509.Certificate:
        """The certificate in x5c, if its subject and issuer are the trusted ones."""
        subject, issuer = trust
        try:
            leaf = x509.load_der_x509_certificate(base64.b64decode(header["x5c"][0]))
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise bad(
                "Subject name and issuer authentication needs the certificate in x5c."
            ) from exc
        try:
            leaf.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise bad("The x5c certificate is not issued by the trusted issuer.") from exc
        if leaf.subject.rfc4514_string() != subject:
            raise bad(f"The x5c certificate's subject is not {subject!r}.")
        return leaf

    def _issue(self, app: _Registration, audience: str, appidacr: str) -> dict[str, Any]:
        now = int(time.time())
        with self._lock:
            lifetime = self.lifetime
        claims: dict[str, Any] = {
            "aud": audience,
            "iss": self.issuer,
            "iat": now - _BACKDATE,
            "nbf": now - _BACKDATE,
            "exp": now + int(lifetime),
            "aio": _b64url(uuid.uuid4().bytes),
            "app_displayname": app.display_name,
            "appid": app.client_id,
            "appidacr": appidacr,
            "idp": self.issuer,
            "idtyp": "app",
            "oid": app.object_id,
            "rh": "0.emulated.",
            "roles": list(app.roles),
            "sid": str(uuid.uuid4()),
            "sub": app.object_id,
            "tid": self.token_tenant_id or self.tenant_id,
            "uti": _b64url(uuid.uuid4().bytes),
            "ver": "1.0",
            "wids": ["0997a1d0-0d1d-4acb-b408-d5ca73121e90"],
        }
        token = jwt.encode(
            claims, self._key, algorithm="RS256", headers={"typ": "JWT", "kid": self.kid}
        )
        with self._lock:
            self.issued.append(claims)
        return {
            "token_type": "Bearer",
            "expires_in": int(lifetime),
            "ext_expires_in": int(lifetime),
            "access_token": token,
        }

    def _error_reply(self, status: int, error: str, code: int, text: str) -> _Reply:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        trace_id, correlation_id = str(uuid.uuid4()), str(uuid.uuid4())
        return _Reply(
            status,
            {
                "error": error,
                "error_description": (
                    f"AADSTS{code}: {text}\r\nTrace ID: {trace_id}\r\n"
                    f"Correlation ID: {correlation_id}\r\nTimestamp: {stamp}"
                ),
                "error_codes": [code],
                "timestamp": stamp,
                "trace_id": trace_id,
                "correlation_id": correlation_id,
                "error_uri": f"{self.authority}/error?code={code}",
            },
        )


class _Server(ThreadingHTTPServer):
    """Accepts TCP on the listening thread; the TLS handshake runs in each request's thread."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        emulator: EntraEmulator,
        context: ssl.SSLContext,
    ) -> None:
        super().__init__(address, handler)
        self.emulator = emulator
        self.context = context

    def finish_request(self, request: Any, client_address: Any) -> None:
        raw: socket.socket = request
        raw.settimeout(10)
        try:
            tls = self.context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            return  # e.g. a client that does not trust our CA; the caller closes ``raw``
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up mid-request are normal in failure tests: stay quiet."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    server_version = "EntraEmulator/1.0"
    sys_version = ""

    def do_GET(self) -> None:
        self._dispatch(b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self._dispatch(self.rfile.read(length))

    def _dispatch(self, body: bytes) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        emulator = self.server.emulator
        reply = emulator._route(self.command, self.path, headers, body)
        html = reply.html is not None
        payload = reply.html.encode() if reply.html is not None else json.dumps(reply.body).encode()
        self.send_response(reply.status)
        self.send_header(
            "Content-Type",
            "text/html; charset=utf-8" if html else "application/json; charset=utf-8",
        )
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store, no-cache")
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if reply.trickle <= 0:
            self.wfile.write(payload)
            return
        for i in range(len(payload)):
            if emulator._closing.wait(reply.trickle):
                self.close_connection = True
                return
            self.wfile.write(payload[i : i + 1])

    def log_message(self, format: str, *args: Any) -> None:
        """No access log on stderr."""


def _page(page: Page) -> _Reply:
    headers = {"Location": page.location} if page.location else {}
    return _Reply(page.status, {}, headers, html=page.html)


def _form(body: bytes) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _basic_credentials(header: str) -> tuple[str | None, str | None]:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None, None
    return unquote(user.replace("+", " ")), unquote(password.replace("+", " "))
