"""An HTTPS OAuth 2.0 authorization server for tests: generic and Google-style token grants.

``POST /token`` implements, per the RFCs, with RFC 6749 section 5.2 error responses:

- the client-credentials grant (RFC 6749 section 4.4) with ``client_secret_basic`` (credentials
  form-urlencoded before base64, section 2.3.1), ``client_secret_post``, and ``private_key_jwt``
  (RFC 7523 section 2.2: signature, ``iss`` = ``sub`` = client, ``aud`` = token URL, ``exp``,
  single-use ``jti``);
- the JWT bearer grant (RFC 7523 section 2.1) the way Google serves service accounts with
  domain-wide delegation: ``iss`` a registered service account, ``kid`` one of its keys,
  ``sub`` a user of the domain, ``scope`` authorised for delegation, at most an hour of
  validity; Google's error codes and texts (``unauthorized_client``, ``invalid_grant: Invalid
  email or User ID``, ``invalid_grant: Invalid JWT Signature.``).

Issued tokens are RS256 JWTs (so tests can read them) with ``sub``, ``scope``, ``aud``,
``client_id``, ``iat`` and ``exp``. Failures can be injected (5xx, 429 with Retry-After).
The server runs in background threads; use it as a context manager.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Final, Self
from urllib.parse import parse_qs, unquote_plus

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.certs import TestPki

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path
    from types import TracebackType

    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

__all__ = ["AuthorizationServer"]

CLIENT_ASSERTION_TYPE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_BEARER: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"


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


@dataclass
class _ServiceAccount:
    keys: dict[str, PublicKeyTypes]
    #: Scopes a Workspace administrator delegated to it; empty: no delegation.
    delegated: frozenset[str]


class AuthorizationServer:
    """A token endpoint at ``https://127.0.0.1:PORT/token``; trust :attr:`ca_file`."""

    def __init__(self, pki_dir: Path, *, users: Iterable[str] = ()) -> None:
        self._pki = TestPki(pki_dir / "oauth2")
        self.ca_file = self._pki.ca_file
        self._server_pem = self._pki.issue("oauth2-server", "127.0.0.1", "localhost")
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.lifetime = 3600
        #: Delay added to every token request, in seconds.
        self.latency = 0.0
        self.issued: list[dict[str, Any]] = []
        #: Form fields and headers of every token request, in order.
        self.requests: list[tuple[dict[str, str], dict[str, str]]] = []
        self._users = {u.lower() for u in users}
        self._clients: dict[str, _Client] = {}
        self._accounts: dict[str, _ServiceAccount] = {}
        self._failures: list[tuple[int, int | None]] = []
        self._jtis: set[str] = set()
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Self:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self._server_pem)
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
    def token_url(self) -> str:
        assert self._server is not None, "use the server in a with statement"
        return f"https://127.0.0.1:{self._server.server_address[1]}/token"

    @property
    def token_requests(self) -> int:
        with self._lock:
            return len(self.requests)

    # -- configuration --------------------------------------------------------------------

    def register_client(
        self,
        client_id: str,
        *,
        secret: str | None = None,
        public_key: PublicKeyTypes | None = None,
        scopes: Iterable[str] = ("mail",),
    ) -> None:
        with self._lock:
            self._clients[client_id] = _Client(secret, public_key, frozenset(scopes))

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

    # -- the endpoint ---------------------------------------------------------------------

    def _handle(
        self, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        form = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        with self._lock:
            self.requests.append((form, headers))
            failure = self._failures.pop(0) if self._failures else None
            latency = self.latency
        if latency:
            time.sleep(latency)
        if path != "/token":
            return 404, {"error": "not_found"}, {}
        if failure is not None:
            status, retry_after = failure
            extra = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            return status, {"error": "temporarily_unavailable"}, extra
        try:
            grant = form.get("grant_type")
            if grant == "client_credentials":
                return 200, self._client_credentials(form, headers), {}
            if grant == JWT_BEARER:
                return 200, self._jwt_bearer(form), {}
            raise _OAuthError(400, "unsupported_grant_type", f"grant_type {grant!r}")
        except _OAuthError as exc:
            return exc.status, {"error": exc.error, "error_description": exc.description}, {}

    def _client_credentials(self, form: dict[str, str], headers: dict[str, str]) -> dict[str, Any]:
        client_id = self._authenticate(form, headers.get("authorization", ""))
        with self._lock:
            client = self._clients[client_id]
        requested = set(form.get("scope", "").split())
        if not requested <= client.scopes:
            raise _OAuthError(400, "invalid_scope", f"scopes not allowed: {sorted(requested)}")
        return self._issue(client_id, client_id, " ".join(sorted(requested)))

    def _authenticate(self, form: dict[str, str], authorization: str) -> str:
        methods = []
        if authorization.lower().startswith("basic "):
            methods.append("basic")
        if "client_secret" in form:
            methods.append("post")
        if "client_assertion" in form:
            methods.append("jwt")
        if len(methods) != 1:
            raise _OAuthError(400, "invalid_request", "exactly one client authentication method")
        invalid = _OAuthError(401, "invalid_client", "Client authentication failed.")
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
        assertion = form["client_assertion"]
        try:
            claimed = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.DecodeError:
            raise invalid from None
        client_id = str(claimed.get("sub", ""))
        with self._lock:
            client = self._clients.get(client_id)
        if client is None or client.public_key is None:
            raise invalid
        try:
            claims = jwt.decode(
                assertion,
                client.public_key,  # type: ignore[arg-type]
                algorithms=["RS256", "ES256", "ES384", "ES512"],
                audience=self.token_url,
                options={"require": ["iss", "sub", "aud", "exp", "jti"]},
            )
        except jwt.InvalidTokenError as exc:
            raise _OAuthError(401, "invalid_client", f"client assertion: {exc}") from None
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
        return self._issue(subject, email, " ".join(sorted(scopes)))

    def _issue(self, subject: str, client_id: str, scope: str) -> dict[str, Any]:
        now = int(time.time())
        claims = {
            "iss": self.token_url.removesuffix("/token"),
            "sub": subject,
            "aud": "mail",
            "client_id": client_id,
            "scope": scope,
            "iat": now,
            "exp": now + self.lifetime,
            "jti": str(uuid.uuid4()),
        }
        with self._lock:
            self.issued.append(claims)
        token = jwt.encode(claims, self._key, algorithm="RS256", headers={"typ": "JWT"})
        return {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.lifetime,
            "scope": scope,
        }


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

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, reply, extra = self.server.owner._handle(self.path, headers, body)
        payload = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """No access log on stderr."""
