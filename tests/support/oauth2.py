"""An HTTPS OAuth 2.0 authorization server for tests: generic and Google-style token grants.

``POST {path}/token`` implements, per the RFCs, with RFC 6749 section 5.2 error responses:

- the client-credentials grant (RFC 6749 section 4.4) with ``client_secret_basic`` (credentials
  form-urlencoded before base64, section 2.3.1), ``client_secret_post``, ``client_secret_jwt``
  and ``private_key_jwt`` (RFC 7523 section 2.2: signature, ``iss`` = ``sub`` = client,
  ``aud`` = the token URL or, as :attr:`AuthorizationServer.assertion_audience` says, the
  issuer, ``exp``, single-use ``jti``), ``tls_client_auth`` and
  ``self_signed_tls_client_auth`` (RFC 8705: the certificate of the TLS handshake, by subject
  or by the very certificate; at the ``{path}/mtls/token`` alias when
  :attr:`AuthorizationServer.mtls_alias` is set);
- RFC 8707 resource indicators: each ``resource`` must be registered
  (:meth:`AuthorizationServer.register_resource`), and becomes an audience of the token;
- metadata (RFC 8414 at ``/.well-known/oauth-authorization-server{path}``, OpenID Connect
  Discovery at ``{path}/.well-known/openid-configuration``, as :attr:`discovery` says);
- the JWT bearer grant (RFC 7523 section 2.1) the way Google serves service accounts with
  domain-wide delegation: ``iss`` a registered service account, ``kid`` one of its keys,
  ``sub`` a user of the domain, ``scope`` authorised for delegation, at most an hour of
  validity; Google's error codes and texts (``unauthorized_client``, ``invalid_grant: Invalid
  email or User ID``, ``invalid_grant: Invalid JWT Signature.``).

Client-credentials tokens are RS256 JWTs (header ``typ`` ``JWT`` and ``kid``, so Dovecot can
verify them) with ``iss``, ``sub``, ``scope``, ``aud``, ``client_id``, ``iat``/``nbf`` (a
minute in the past) and ``exp``; or opaque, as :attr:`token_format` says. Service-account
tokens are opaque, like Google's (``ya29.`` and random text), and ``GET
{path}/tokeninfo?access_token=...`` describes them as Google's tokeninfo endpoint does
(``azp``, ``aud``, ``sub``, ``email``, ``scope``, ``exp``, ``expires_in``), which is what
Dovecot's token introspection reads. Failures can be injected (5xx, 429 with Retry-After).
The server runs in background threads; use it as a context manager.

People sign in to *Google* "Desktop app" clients (:meth:`AuthorizationServer.
register_google_client`) as they do at Google: the browser sign-in at ``{path}/auth`` (a
page whose form, ``login`` and ``consent``, posts back; then a redirect to the client's
loopback redirect URI, any port, with a code bound to its PKCE challenge), the
authorization code and refresh token grants at the token endpoint (``client_secret`` in
the form; refresh tokens do not rotate), ``openid email`` giving an ID token from
``https://accounts.google.com`` with ``email`` and ``email_verified``. The device sign-in
(``{path}/device/code``, Google's ``verification_url``; the person at ``{path}/device``)
refuses Gmail's scope with ``invalid_scope``, as Google does, and works for others. People's
access tokens are opaque, described by tokeninfo with their ``email``. A changed password
(:meth:`AuthorizationServer.change_password`) or removed access (``withdraw_consent``) make
refresh tokens fail with ``invalid_grant``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import secrets
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Final, Self
from urllib.parse import parse_qs, unquote_plus, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt as jose_jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OctKey, OKPKey, RSAKey

from tests.support.certs import TestPki
from tests.support.people import Page, PersonError, SignIn, SignIns, loopback_match

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path
    from types import TracebackType

    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

__all__ = ["AuthorizationServer"]

CLIENT_ASSERTION_TYPE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_BEARER: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"
DEVICE_GRANT: Final = "urn:ietf:params:oauth:grant-type:device_code"
GMAIL_SCOPE: Final = "https://mail.google.com/"
GOOGLE_ISSUER: Final = "https://accounts.google.com"
ASSERTION_ALGORITHMS: Final = ["RS256", "ES256", "ES384", "ES512", "Ed25519"]
#: How far in the past issued JWTs date ``iat`` and ``nbf`` (Dovecot allows no leeway).
BACKDATE: Final = 60
ALL_METHODS: Final = (
    "client_secret_basic",
    "client_secret_post",
    "client_secret_jwt",
    "private_key_jwt",
    "tls_client_auth",
    "self_signed_tls_client_auth",
)


class _OAuthError(Exception):
    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description


@dataclass
class _Client:
    secret: str | None
    public_key: PublicKeyTypes | None
    scopes: frozenset[str]
    #: tls_client_auth: the certificate subject (RFC 4514) a CA-issued certificate must have.
    tls_subject: str | None = None
    #: self_signed_tls_client_auth: the DER certificate itself.
    self_signed: bytes | None = None
    #: A Google "Desktop app" client people sign in to, at these redirect URIs.
    redirect_uris: tuple[str, ...] = ()


@dataclass
class _ServiceAccount:
    keys: dict[str, PublicKeyTypes]
    #: Scopes a Workspace administrator delegated to it; empty: no delegation.
    delegated: frozenset[str]


@dataclass
class _Request:
    path: str
    query: dict[str, str]
    form: dict[str, str]
    #: Every value of each form field (``resource`` may repeat).
    fields: dict[str, list[str]]
    headers: dict[str, str]
    #: The client's TLS certificate (DER), if it sent one.
    certificate: bytes | None = None


@dataclass
class _Issued:
    """What the server knows of a token it issued."""

    claims: dict[str, Any]
    opaque: bool = field(default=False)


class AuthorizationServer:
    """An authorization server at ``https://127.0.0.1:PORT{path}``; trust :attr:`ca_file`.

    ``path`` is the issuer's path (``/realms/mail`` for a Keycloak-style issuer). Client
    certificates are asked for (not required) and checked against :attr:`ca_file`, the CA of
    :attr:`pki`, which tests use to issue them.
    """

    def __init__(self, pki_dir: Path, *, users: Iterable[str] = (), path: str = "") -> None:
        self.pki = TestPki(pki_dir / "oauth2")
        self.ca_file = self.pki.ca_file
        self._server_pem = self.pki.issue("oauth2-server", "127.0.0.1", "localhost")
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "oauth2-test-key"
        self.path = path.rstrip("/")
        self.lifetime = 3600
        #: Delay added to every token request, in seconds.
        self.latency = 0.0
        #: Claims of every token issued, in order.
        self.issued: list[dict[str, Any]] = []
        #: Form fields and headers of every token request, in order.
        self.requests: list[tuple[dict[str, str], dict[str, str]]] = []
        #: Metadata: "rfc8414", "openid" or None (no metadata document).
        self.discovery: str | None = "rfc8414"
        #: Overrides the metadata's issuer (a server misconfigured or impersonated).
        self.metadata_issuer: str | None = None
        #: Overrides the iss of issued tokens (a server that does not know its public name).
        self.token_issuer: str | None = None
        #: GET requests for the metadata document.
        self.metadata_requests = 0
        #: token_endpoint_auth_methods_supported (None: not listed).
        self.auth_methods: tuple[str, ...] | None = ALL_METHODS
        #: Publish and serve the RFC 8705 mutual-TLS alias; then certificates work only there.
        self.mtls_alias = False
        #: What client assertions must name as aud: "token_endpoint", "issuer" or "either".
        self.assertion_audience = "either"
        #: Client-credentials tokens: "jwt" or "opaque".
        self.token_format = "jwt"
        #: The aud of tokens asked for without resource (None: no audience).
        self.default_audience: str | None = "mail"
        #: Unknown scopes: refused (invalid_scope), or dropped silently as some servers do.
        self.drop_unknown_scopes = False
        #: Say which scope was granted in the token response.
        self.state_scope = True
        #: JWT header typ (RFC 9068 says "at+jwt"; Dovecot 2.3 needs "JWT").
        self.typ = "JWT"
        self._users = {u.lower() for u in users}
        #: People signing in to Google clients.
        self.people = SignIns(rotate=False)
        self._clients: dict[str, _Client] = {}
        self._accounts: dict[str, _ServiceAccount] = {}
        self._resources: dict[str, str] = {}
        self._failures: list[tuple[int, int | None]] = []
        self._jtis: set[str] = set()
        self._tokens: dict[str, _Issued] = {}
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._context: ssl.SSLContext | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Self:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self._server_pem)
        context.load_verify_locations(cafile=str(self.ca_file))
        context.verify_mode = ssl.CERT_OPTIONAL
        self._context = context
        server = _Server(("127.0.0.1", 0), _Handler)
        server.owner = self
        server.context = context
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
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join()

    @property
    def origin(self) -> str:
        assert self._server is not None, "use the server in a with statement"
        return f"https://127.0.0.1:{self._server.server_address[1]}"

    @property
    def issuer(self) -> str:
        return self.origin + self.path

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/token"

    @property
    def mtls_token_url(self) -> str:
        return f"{self.issuer}/mtls/token"

    @property
    def tokeninfo_url(self) -> str:
        """Google's tokeninfo: append the token (Dovecot's ``introspection_mode = get``)."""
        return f"{self.issuer}/tokeninfo?access_token="

    @property
    def token_requests(self) -> int:
        with self._lock:
            return len(self.requests)

    def public_key_pem(self) -> bytes:
        """The key that signs JWT access tokens, for Dovecot's local validation."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    # -- configuration --------------------------------------------------------------------

    def register_client(
        self,
        client_id: str,
        *,
        secret: str | None = None,
        public_key: PublicKeyTypes | None = None,
        scopes: Iterable[str] = ("mail",),
        tls_subject: str | None = None,
        self_signed_pem: bytes | None = None,
    ) -> None:
        """A client with a secret, a public key (JWT assertions), a certificate subject
        (tls_client_auth, certificates from :attr:`pki`) or a self-signed certificate."""
        der = None
        if self_signed_pem is not None:
            certificate = x509.load_pem_x509_certificate(self_signed_pem)
            der = certificate.public_bytes(serialization.Encoding.DER)
            assert self._context is not None, "register self-signed clients once running"
            # Python's ssl verifies any certificate it asks for: trust this one as its own CA.
            self._context.load_verify_locations(cadata=der)
        with self._lock:
            self._clients[client_id] = _Client(
                secret, public_key, frozenset(scopes), tls_subject, der
            )

    def register_google_client(
        self,
        client_id: str,
        secret: str,
        *,
        redirect_uris: Iterable[str] = ("http://localhost", "http://127.0.0.1"),
        scopes: Iterable[str] = (GMAIL_SCOPE, "openid", "email", "profile"),
    ) -> None:
        """A Google OAuth client of type "Desktop app" that people sign in to."""
        with self._lock:
            self._clients[client_id] = _Client(
                secret, None, frozenset(scopes), redirect_uris=tuple(redirect_uris)
            )

    def add_person(self, email: str) -> None:
        """A Google account that can sign in (numeric ``sub``, as Google's)."""
        self.people.add_person(email, str(secrets.randbelow(10**20)))

    def change_password(self, email: str) -> None:
        self.people.change_password(email)

    def withdraw_consent(self, email: str, client_id: str) -> None:
        self.people.withdraw_consent(email, client_id)

    @property
    def authorization_url(self) -> str:
        return f"{self.issuer}/auth"

    @property
    def device_url(self) -> str:
        return f"{self.issuer}/device"

    def register_resource(self, resource: str, audience: str | None = None) -> None:
        """An RFC 8707 resource; tokens asked for it get ``audience`` (default: itself)."""
        with self._lock:
            self._resources[resource] = audience or resource

    def register_service_account(
        self,
        email: str,
        key_id: str,
        public_key: PublicKeyTypes,
        *,
        delegated: Iterable[str] = ("https://mail.google.com/",),
    ) -> None:
        with self._lock:
            self._accounts[email] = _ServiceAccount({key_id: public_key}, frozenset(delegated))

    def add_users(self, *users: str) -> None:
        with self._lock:
            self._users |= {u.lower() for u in users}

    def fail_next(self, status: int, *, retry_after: int | None = None, count: int = 1) -> None:
        with self._lock:
            self._failures = [(status, retry_after)] * count

    # -- the endpoints --------------------------------------------------------------------

    def _handle_get(self, request: _Request) -> tuple[int, dict[str, Any], dict[str, str]]:
        path = request.path
        rfc8414 = f"/.well-known/oauth-authorization-server{self.path}"
        openid = f"{self.path}/.well-known/openid-configuration"
        if path in (rfc8414, openid):
            with self._lock:
                self.metadata_requests += 1
        if (path == rfc8414 and self.discovery == "rfc8414") or (
            path == openid and self.discovery == "openid"
        ):
            return 200, self._metadata(), {}
        if path == f"{self.path}/tokeninfo":
            return self._tokeninfo(request.query.get("access_token", ""))
        if path == f"{self.path}/auth":
            return self._authorize(request.query)
        if path == f"{self.path}/device":
            return _page(self.people.device_page(f"{self.path}/device"))
        return 404, {"error": "not_found"}, {}

    def _metadata(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "issuer": self.metadata_issuer or self.issuer,
            "token_endpoint": self.token_url,
            "grant_types_supported": ["client_credentials", JWT_BEARER],
            "scopes_supported": ["mail"],
            "token_endpoint_auth_signing_alg_values_supported": ["HS256", *ASSERTION_ALGORITHMS],
        }
        if self.auth_methods is not None:
            document["token_endpoint_auth_methods_supported"] = list(self.auth_methods)
        if self.mtls_alias:
            document["mtls_endpoint_aliases"] = {"token_endpoint": self.mtls_token_url}
        return document

    def _tokeninfo(self, value: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self._lock:
            issued = self._tokens.get(value)
        if issued is None or issued.claims["exp"] <= time.time():
            return 400, {"error": "invalid_token", "error_description": "Invalid Value"}, {}
        claims = issued.claims
        info = {
            "azp": claims["client_id"],
            "aud": claims["client_id"],
            "sub": claims["sub"],
            "scope": claims["scope"],
            "exp": str(claims["exp"]),
            "expires_in": str(int(claims["exp"] - time.time())),
            "access_type": "online",
        }
        if "@" in claims["sub"]:
            info.update(email=claims["sub"], email_verified="true")
        return 200, info, {}

    def _authorize(self, query: dict[str, str]) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self._lock:
            client = self._clients.get(query.get("client_id", ""))
        redirect = query.get("redirect_uri", "")
        if client is None or not any(loopback_match(r, redirect) for r in client.redirect_uris):
            return _page(Page(400, "<html><body>Error 400: redirect_uri_mismatch</body></html>"))
        if not set(query.get("scope", "").split()) <= client.scopes:
            return _page(Page(400, "<html><body>Error 400: invalid_scope</body></html>"))
        return _page(self.people.authorize_page(query, f"{self.path}/auth", require_pkce=False))

    def _person_endpoint(self, request: _Request) -> tuple[int, dict[str, Any], dict[str, str]]:
        """The POSTs of people and of their sign-ins, other than token requests."""
        if request.path == f"{self.path}/auth":
            return _page(self.people.authorize_submit(request.form))
        if request.path == f"{self.path}/device":
            return _page(self.people.device_submit(request.form))
        # The device sign-in's start (Google: verification_url; no Gmail scope there).
        form = request.form
        with self._lock:
            client = self._clients.get(form.get("client_id", ""))
        if client is None or not client.redirect_uris:
            return 401, {"error": "invalid_client", "error_description": "Unknown client."}, {}
        scopes = tuple(form.get("scope", "").split())
        if GMAIL_SCOPE in scopes or not set(scopes) <= client.scopes:
            return 400, {"error": "invalid_scope", "error_description": "Invalid scope."}, {}
        device_code, device = self.people.start_device(form["client_id"], scopes)
        return (
            200,
            {
                "device_code": device_code,
                "user_code": device.user_code,
                "verification_url": self.device_url,
                "expires_in": self.people.device_lifetime,
                "interval": self.people.device_interval,
            },
            {},
        )

    def _person_grant(self, form: dict[str, str]) -> dict[str, Any]:
        client_id = form.get("client_id", "")
        self._check_secret(
            client_id,
            form.get("client_secret", ""),
            _OAuthError(401, "invalid_client", "Unauthorized"),
        )
        people, grant = self.people, form.get("grant_type")
        try:
            if grant == "authorization_code":
                sign_in = people.redeem_code(
                    form.get("code", ""),
                    client_id,
                    form.get("redirect_uri", ""),
                    form.get("code_verifier", ""),
                )
            elif grant == DEVICE_GRANT:
                sign_in = people.poll_device(form.get("device_code", ""), client_id)
            else:
                sign_in = people.renew(form.get("refresh_token", ""), client_id)
        except PersonError as exc:
            error = "access_denied" if exc.reason == "declined" else exc.error
            description = (
                "Token has been expired or revoked."
                if exc.reason in ("revoked", "consent")
                else exc.description
            )
            # Google's statuses for the device grant's answers.
            status = {"authorization_pending": 428, "slow_down": 403, "access_denied": 403}
            raise _OAuthError(status.get(error, 400), error, description) from None
        return self._issue_person(sign_in, refresh=grant != "refresh_token")

    def _issue_person(self, sign_in: SignIn, *, refresh: bool) -> dict[str, Any]:
        """Google's answer: an opaque token, the ID token, and (not on renewals) a
        refresh token."""
        person = self.people.person(sign_in.login)
        assert person is not None
        scope = " ".join(sign_in.scopes)
        reply = self._issue(sign_in.login, sign_in.client_id, scope, None, opaque=True)
        if refresh:
            reply["refresh_token"] = self.people.issue_refresh_token(sign_in)
        if "openid" in sign_in.scopes:
            now = int(time.time())
            id_claims: dict[str, Any] = {
                "iss": GOOGLE_ISSUER,
                "azp": sign_in.client_id,
                "aud": sign_in.client_id,
                "sub": person.subject,
                "iat": now,
                "exp": now + 3600,
            }
            if "email" in sign_in.scopes:
                id_claims.update(email=person.login, email_verified=True)
            reply["id_token"] = jwt.encode(
                id_claims, self._key, algorithm="RS256", headers={"kid": self.kid}
            )
        return reply

    def _handle(self, request: _Request) -> tuple[int, dict[str, Any], dict[str, str]]:
        if request.path in (
            f"{self.path}/auth",
            f"{self.path}/device",
            f"{self.path}/device/code",
        ):
            return self._person_endpoint(request)
        with self._lock:
            self.requests.append((request.form, request.headers))
            failure = self._failures.pop(0) if self._failures else None
            latency = self.latency
        if latency:
            time.sleep(latency)
        at_alias = self.mtls_alias and request.path == f"{self.path}/mtls/token"
        if request.path != f"{self.path}/token" and not at_alias:
            return 404, {"error": "not_found"}, {}
        if failure is not None:
            status, retry_after = failure
            extra = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            return status, {"error": "temporarily_unavailable"}, extra
        try:
            grant = request.form.get("grant_type")
            if grant == "client_credentials":
                return 200, self._client_credentials(request, at_alias), {}
            if grant == JWT_BEARER:
                return 200, self._jwt_bearer(request.form), {}
            if grant in ("authorization_code", "refresh_token", DEVICE_GRANT):
                return 200, self._person_grant(request.form), {}
            raise _OAuthError(400, "unsupported_grant_type", f"grant_type {grant!r}")
        except _OAuthError as exc:
            return exc.status, {"error": exc.error, "error_description": exc.description}, {}

    def _client_credentials(self, request: _Request, at_alias: bool) -> dict[str, Any]:
        client_id = self._authenticate(request, at_alias)
        with self._lock:
            client = self._clients[client_id]
            resources = dict(self._resources)
        requested = set(request.form.get("scope", "").split())
        if not requested <= client.scopes:
            if not self.drop_unknown_scopes:
                raise _OAuthError(400, "invalid_scope", f"scopes not allowed: {sorted(requested)}")
            requested &= client.scopes
        audiences = []
        for resource in request.fields.get("resource", []):
            parts = urlsplit(resource)
            if not parts.scheme or parts.fragment:
                raise _OAuthError(400, "invalid_target", f"not an absolute URI: {resource!r}")
            if resource not in resources:
                raise _OAuthError(400, "invalid_target", f"unknown resource {resource!r}")
            audiences.append(resources[resource])
        audience: str | list[str] | None = self.default_audience
        if audiences:
            audience = audiences[0] if len(audiences) == 1 else audiences
        return self._issue(
            client_id,
            client_id,
            " ".join(sorted(requested)),
            audience,
            opaque=self.token_format == "opaque",
        )

    def _authenticate(self, request: _Request, at_alias: bool) -> str:
        form, authorization = request.form, request.headers.get("authorization", "")
        methods = []
        if authorization.lower().startswith("basic "):
            methods.append("basic")
        if "client_secret" in form:
            methods.append("post")
        if "client_assertion" in form:
            methods.append("jwt")
        invalid = _OAuthError(401, "invalid_client", "Client authentication failed.")
        if not methods and request.certificate is not None:
            return self._authenticate_certificate(request, at_alias, invalid)
        if len(methods) != 1:
            raise _OAuthError(400, "invalid_request", "exactly one client authentication method")
        if methods == ["basic"]:
            try:
                decoded = base64.b64decode(authorization[6:], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise invalid from None
            raw_id, sep, raw_secret = decoded.partition(":")
            if not sep:
                raise invalid
            client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
            self._check_secret(client_id, secret, invalid)
            return client_id
        if methods == ["post"]:
            client_id = form.get("client_id", "")
            self._check_secret(client_id, form["client_secret"], invalid)
            return client_id
        if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
            raise _OAuthError(400, "invalid_request", "bad client_assertion_type")
        return self._check_assertion(form, invalid)

    def _authenticate_certificate(
        self, request: _Request, at_alias: bool, invalid: _OAuthError
    ) -> str:
        client_id = request.form.get("client_id", "")
        with self._lock:
            client = self._clients.get(client_id)
        if client is None or request.certificate is None:
            raise invalid
        if self.mtls_alias and not at_alias:
            raise _OAuthError(401, "invalid_client", "use the mtls_endpoint_aliases endpoint")
        if client.self_signed is not None:
            if not hmac.compare_digest(client.self_signed, request.certificate):
                raise invalid
            return client_id
        certificate = x509.load_der_x509_certificate(request.certificate)
        if client.tls_subject is None or certificate.subject.rfc4514_string() != (
            client.tls_subject
        ):
            raise invalid
        return client_id

    def _check_assertion(self, form: dict[str, str], invalid: _OAuthError) -> str:
        assertion = form["client_assertion"]
        try:
            claimed = jwt.decode(assertion, options={"verify_signature": False})
            header = jwt.get_unverified_header(assertion)
        except jwt.DecodeError:
            raise invalid from None
        client_id = str(claimed.get("sub", ""))
        with self._lock:
            client = self._clients.get(client_id)
        if client is None:
            raise invalid
        if header.get("alg") == "HS256":
            if client.secret is None:
                raise invalid
            key: Any = OctKey.import_key(client.secret)
        elif client.public_key is not None:
            public = client.public_key
            der = public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            if isinstance(public, rsa.RSAPublicKey):
                key = RSAKey.import_key(der)
            elif isinstance(public, ec.EllipticCurvePublicKey):
                key = ECKey.import_key(der)
            else:
                key = OKPKey.import_key(der)
        else:
            raise invalid
        try:
            token = jose_jwt.decode(assertion, key, algorithms=["HS256", *ASSERTION_ALGORITHMS])
        except (JoseError, ValueError) as exc:
            raise _OAuthError(401, "invalid_client", f"client assertion: {exc}") from None
        claims = token.claims
        for name in ("iss", "sub", "aud", "exp", "jti"):
            if name not in claims:
                raise _OAuthError(401, "invalid_client", f"client assertion lacks {name}")
        accepted = {
            "token_endpoint": {self.token_url, self.mtls_token_url},
            "issuer": {self.issuer},
            "either": {self.token_url, self.mtls_token_url, self.issuer},
        }[self.assertion_audience]
        audience = claims["aud"]
        if not (audience in accepted if isinstance(audience, str) else False):
            raise _OAuthError(401, "invalid_client", f"client assertion: wrong aud {audience!r}")
        if claims["exp"] < time.time() or claims["exp"] - claims.get("iat", 0) > 300:
            raise _OAuthError(401, "invalid_client", "client assertion expired or too long")
        if claims["iss"] != client_id or form.get("client_id", client_id) != client_id:
            raise invalid
        with self._lock:
            if claims["jti"] in self._jtis:
                raise _OAuthError(401, "invalid_client", "client assertion replayed")
            self._jtis.add(claims["jti"])
        return client_id

    def _check_secret(self, client_id: str, secret: str, invalid: _OAuthError) -> None:
        with self._lock:
            client = self._clients.get(client_id)
        if client is None or client.secret is None:
            raise invalid
        if not hmac.compare_digest(secret.encode(), client.secret.encode()):
            raise invalid

    def _jwt_bearer(self, form: dict[str, str]) -> dict[str, Any]:
        assertion = form.get("assertion", "")
        try:
            header = jwt.get_unverified_header(assertion)
            claimed = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.DecodeError:
            raise _OAuthError(400, "invalid_grant", "Invalid JWT.") from None
        email = str(claimed.get("iss", ""))
        with self._lock:
            account = self._accounts.get(email)
        if account is None:
            raise _OAuthError(401, "invalid_client", "The OAuth client was not found.")
        key = account.keys.get(str(header.get("kid", "")))
        if key is None:
            raise _OAuthError(400, "invalid_grant", "Invalid JWT Signature.")
        try:
            claims = jwt.decode(
                assertion,
                key,  # type: ignore[arg-type]
                algorithms=["RS256"],
                audience=self.token_url,
                options={"require": ["iss", "aud", "exp", "iat"]},
            )
        except jwt.InvalidSignatureError:
            raise _OAuthError(400, "invalid_grant", "Invalid JWT Signature.") from None
        except jwt.InvalidTokenError as exc:
            raise _OAuthError(400, "invalid_grant", f"Invalid JWT: {exc}") from None
        if claims["exp"] - claims["iat"] > 3600:
            raise _OAuthError(
                400,
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                "reasonable timeframe. Check your iat and exp values in the JWT claim.",
            )
        scopes = set(str(claims.get("scope", "")).split())
        if not scopes or not scopes <= account.delegated:
            raise _OAuthError(
                401,
                "unauthorized_client",
                "Client is unauthorized to retrieve access tokens using this method, or client "
                "not authorized for any of the scopes requested.",
            )
        subject = str(claims.get("sub", ""))
        with self._lock:
            known = subject.lower() in self._users
        if not known:
            raise _OAuthError(400, "invalid_grant", "Invalid email or User ID")
        # Google's tokens for service accounts are opaque.
        return self._issue(subject, email, " ".join(sorted(scopes)), None, opaque=True)

    def _issue(
        self,
        subject: str,
        client_id: str,
        scope: str,
        audience: str | list[str] | None,
        *,
        opaque: bool,
    ) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.token_issuer or self.issuer,
            "sub": subject,
            "client_id": client_id,
            "scope": scope,
            "iat": now - BACKDATE,
            "nbf": now - BACKDATE,
            "exp": now + self.lifetime,
            "jti": str(uuid.uuid4()),
        }
        if audience is not None:
            claims["aud"] = audience
        if opaque:
            token = "ya29." + secrets.token_urlsafe(96)
        else:
            token = jwt.encode(
                claims, self._key, algorithm="RS256", headers={"typ": self.typ, "kid": self.kid}
            )
        with self._lock:
            self.issued.append(claims)
            self._tokens[token] = _Issued(claims, opaque)
        reply: dict[str, Any] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.lifetime,
        }
        if self.state_scope:
            reply["scope"] = scope
        return reply


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: AuthorizationServer
    context: ssl.SSLContext

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(10)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up mid-request are normal in failure tests: stay quiet."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def _request(self, body: bytes) -> _Request:
        parts = urlsplit(self.path)
        fields = parse_qs(body.decode("utf-8", "replace"))
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        certificate = self.connection.getpeercert(binary_form=True)
        return _Request(
            path=parts.path,
            query=query,
            form={k: v[-1] for k, v in fields.items()},
            fields=fields,
            headers={k.lower(): v for k, v in self.headers.items()},
            certificate=certificate,
        )

    def do_GET(self) -> None:
        self._reply(*self.server.owner._handle_get(self._request(b"")))

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._reply(*self.server.owner._handle(self._request(body)))

    def _reply(self, status: int, reply: dict[str, Any], extra: dict[str, str]) -> None:
        page = extra.pop("X-Page", None)
        payload = page.encode() if page is not None else json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html" if page is not None else "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """No access log on stderr."""


def _page(page: Page) -> tuple[int, dict[str, Any], dict[str, str]]:
    """A page for a person's browser, through the handler's ``X-Page`` convention."""
    extra = {"X-Page": page.html}
    if page.location:
        extra["Location"] = page.location
    return page.status, {}, extra
