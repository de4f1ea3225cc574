"""Generic OAuth 2.0 client credentials (RFC 6749 section 4.4), for any authorization server.

For mail servers that accept bearer tokens from an authorization server of their own
(Keycloak, Okta, Auth0, Authentik, oidc-provider...). The token endpoint is ``token_url``, or
comes from the metadata of ``issuer`` (RFC 8414 / OpenID Connect Discovery,
:mod:`broker.providers.discovery`). The request asks for ``scope`` and for each ``resource``
(RFC 8707 resource indicators: the audiences the token is for). The client authenticates with
``auth_method``:

- ``client_secret_basic`` (the default, RFC 6749 section 2.3.1): HTTP Basic with the client ID
  and secret, each form-urlencoded first as the RFC requires -- which authlib's own encoder
  skips, so secrets with ``+``, ``%`` or ``:`` would fail on strict servers;
- ``client_secret_post``: client ID and secret in the form body;
- ``client_secret_jwt`` and ``private_key_jwt`` (RFC 7523 section 2.2, OpenID Connect Core
  section 9): a JWT signed with the secret (HS256) or the client's private key (RSA, EC or
  Ed25519), built by authlib on joserfc -- ``iss`` and ``sub`` the client, a fresh random
  ``jti``, valid for :data:`ASSERTION_LIFETIME` seconds, and ``aud`` the issuer identifier
  when discovery gives one (draft-ietf-oauth-rfc7523bis, FAPI 2.0), else the token endpoint;
  ``assertion_audience`` chooses;
- ``tls_client_auth`` and ``self_signed_tls_client_auth`` (RFC 8705 section 2): the client
  certificate in the TLS handshake, and the client ID in the form; the metadata's
  ``mtls_endpoint_aliases.token_endpoint`` is used when it names one.

Every token is checked before it is handed out (:func:`broker.claims.check_token`): from
another issuer, for another audience, or without the scope asked for, it is a
:class:`~broker.errors.PermanentTokenError` naming the claim, its value and the fix. The
request and the classification of answers are :class:`~broker.providers._http.TokenEndpoint`'s.
"""

from __future__ import annotations

import base64
import time
from typing import TYPE_CHECKING, Final
from urllib.parse import quote_plus

from authlib.oauth2.rfc7523 import (  # type: ignore[import-untyped]
    client_secret_jwt_sign,
    private_key_jwt_sign,
)
from joserfc.jwk import OctKey

from broker.claims import check_token, expectations_for
from broker.errors import BrokerError, token_mismatch
from broker.model import AUTH_METHODS, PUBLIC_CLIENT
from broker.providers._http import CONNECT_TIMEOUT, IO_TIMEOUT, TokenEndpoint
from broker.providers._keys import SigningKey, load_signing_key
from broker.providers.discovery import Discovery, ServerMetadata

if TYPE_CHECKING:
    from collections.abc import Callable

    from broker.claims import Expectations
    from broker.model import AccessToken, App
    from broker.providers._http import OAuthError, TokenResponse

__all__ = ["ASSERTION_LIFETIME", "AUTH_METHODS", "OAuth2Provider"]

ASSERTION_TYPE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: Lifetime of a client assertion (seconds): used once, right away.
ASSERTION_LIFETIME: Final = 60
#: RFC 7518 section 3.2: an HS256 key has at least 256 bits.
MIN_JWT_SECRET: Final = 32
_SECRET_METHODS: Final = ("client_secret_basic", "client_secret_post", "client_secret_jwt")
_TLS_METHODS: Final = ("tls_client_auth", "self_signed_tls_client_auth")


class OAuth2Provider:
    """Client-credentials tokens for one client of a standards-compliant authorization server.

    Construction checks the configuration and parses the keys (``ValueError``); no I/O.
    """

    def __init__(
        self,
        app: App,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        io_timeout: float = IO_TIMEOUT,
    ) -> None:
        where = f"app {app.name!r}"
        if app.provider != "oauth2" and not (app.provider == "google" and app.delegated):
            raise ValueError(f"{where}: provider is {app.provider!r}, not 'oauth2'")
        method = app.auth_method or "client_secret_basic"
        methods = (*AUTH_METHODS, PUBLIC_CLIENT) if app.delegated else AUTH_METHODS
        if method not in methods:
            raise ValueError(
                f"{where}: auth_method must be one of {', '.join(methods)}, not {method!r}"
            )
        if bool(app.token_url) == bool(app.issuer):
            raise ValueError(f"{where}: set issuer (with discovery) or token_url, not both")
        self._app = app
        self._method = method
        self._key: SigningKey | None = None
        self._secret_key: OctKey | None = None
        secrets: tuple[str, ...] = ()
        if method in _SECRET_METHODS:
            if app.client_secret is None:
                raise ValueError(f"{where}: {method} needs client_secret")
            secrets = (app.client_secret.reveal(),)
            if method == "client_secret_jwt":
                if len(app.client_secret.reveal().encode()) < MIN_JWT_SECRET:
                    raise ValueError(
                        f"{where}: client_secret_jwt needs a client_secret of at least "
                        f"{MIN_JWT_SECRET} bytes (RFC 7518: an HS256 key has 256 bits)"
                    )
                self._secret_key = OctKey.import_key(app.client_secret.reveal())
        elif method == "private_key_jwt":
            if app.private_key is None:
                raise ValueError(f"{where}: private_key_jwt needs private_key")
            self._key = load_signing_key(app, app.private_key, "private_key")
            secrets = (app.private_key.reveal(),)
        elif method != PUBLIC_CLIENT and app.client_certificate is None:
            raise ValueError(f"{where}: {method} needs client_certificate")
        certificate = app.client_certificate if method in _TLS_METHODS else None
        if certificate is not None:
            secrets = (certificate.reveal(),)
        where = f"{where} (client {app.client_id} at {app.issuer or app.token_url})"
        self._where = where
        try:
            self._endpoint = TokenEndpoint(
                app.token_url,
                where=where,
                endpoint="issuer" if app.issuer else "token_url",
                ca_file=app.ca_file,
                client_certificate=certificate,
                secrets=secrets,
                connect_timeout=connect_timeout,
                io_timeout=io_timeout,
            )
        except ValueError as exc:
            raise ValueError(f"app {app.name!r}: {exc}") from None
        self._discovery = (
            Discovery(
                app.issuer,
                where=where,
                context=self._endpoint.context,
                connect_timeout=connect_timeout,
                io_timeout=io_timeout,
            )
            if app.issuer
            else None
        )
        self._expected = expectations_for(app)

    def __repr__(self) -> str:
        return f"OAuth2Provider(app={self._app.name!r}, auth_method={self._method!r})"

    @property
    def expected(self) -> Expectations:
        """What every token must say."""
        return self._expected

    async def metadata(self) -> ServerMetadata | None:
        """The server's metadata (``None`` without ``issuer``); broker errors if unavailable."""
        if self._discovery is None:
            return None
        return await self._discovery.metadata()

    def method_problem(self, metadata: ServerMetadata) -> str | None:
        """Why ``auth_method`` will not work with this server, if its metadata says so."""
        if self._method in metadata.auth_methods:
            return None
        return (
            f"auth_method {self._method!r} is not among the methods the server offers "
            f"({', '.join(metadata.auth_methods)}"
            + ("" if metadata.auth_methods_listed else ": none listed, RFC 8414's default")
            + f"; from {metadata.url})"
        )

    async def fetch(self) -> AccessToken:
        app = self._app
        metadata = await self.metadata()
        url = metadata.token_endpoint_for(self._method) if metadata else app.token_url
        form: dict[str, str | list[str]] = {"grant_type": "client_credentials"}
        if app.scope:
            form["scope"] = app.scope
        if app.resources:
            form["resource"] = list(app.resources)
        response = await self.token_request(form, url, metadata)
        token = response.token
        problems = check_token(self._expected, token, scope_stated=response.scope_stated)
        if problems:
            raise token_mismatch(self._where, problems)
        return token

    async def token_request(
        self,
        form: dict[str, str | list[str]],
        url: str,
        metadata: ServerMetadata | None,
        *,
        classify: Callable[[OAuthError], BrokerError | None] | None = None,
    ) -> TokenResponse:
        """POST ``form`` to the token endpoint ``url`` with the client's authentication."""
        headers = self.authenticate(form, url, metadata)
        try:
            return await self._endpoint.request(
                form, headers=headers, scope=self._app.scope, url=url, classify=classify
            )
        except BrokerError as exc:
            if self._discovery is not None:
                self._discovery.forget()  # the server may have moved: ask again next time
                if metadata is not None and exc.code == "invalid_client":
                    problem = self.method_problem(metadata)
                    if problem is not None:
                        exc.fix = f"{exc.fix} Note: {problem}."
            raise

    def authenticate(
        self, form: dict[str, str | list[str]], url: str, metadata: ServerMetadata | None
    ) -> dict[str, str]:
        """Add the client's authentication to ``form`` (for a request to ``url``); the
        headers the request needs."""
        app = self._app
        headers: dict[str, str] = {}
        if self._method == "client_secret_basic":
            assert app.client_secret is not None
            pair = f"{quote_plus(app.client_id)}:{quote_plus(app.client_secret.reveal())}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        elif self._method == "client_secret_post":
            assert app.client_secret is not None
            form["client_id"] = app.client_id
            form["client_secret"] = app.client_secret.reveal()
        elif self._method in (*_TLS_METHODS, PUBLIC_CLIENT):
            form["client_id"] = app.client_id  # RFC 8705 section 2, RFC 6749 section 3.2.1
        else:
            form["client_id"] = app.client_id
            form["client_assertion_type"] = ASSERTION_TYPE
            form["client_assertion"] = self._assertion(self._audience(metadata, url))
        return headers

    def _audience(self, metadata: ServerMetadata | None, url: str) -> str:
        """The client assertion's ``aud``."""
        wanted = self._app.assertion_audience
        if wanted == "token_endpoint":
            return url
        if wanted == "issuer" or (not wanted and metadata is not None):
            return self._app.issuer or url
        return wanted or url

    def _assertion(self, audience: str) -> str:
        now = int(time.time())
        app = self._app
        if self._secret_key is not None:
            header = {"alg": "HS256", "typ": "JWT"}
            signed = client_secret_jwt_sign(
                self._secret_key,
                app.client_id,
                audience,
                alg="HS256",
                header=header,
                issued_at=now,
                expires_at=now + ASSERTION_LIFETIME,
            )
            return str(signed)
        assert self._key is not None
        header = {"alg": self._key.algorithm, "typ": "JWT"}
        if app.key_id:
            header["kid"] = app.key_id
        signed = private_key_jwt_sign(
            self._key.key,
            app.client_id,
            audience,
            alg=self._key.algorithm,
            header=header,
            issued_at=now,
            expires_at=now + ASSERTION_LIFETIME,
        )
        return str(signed)
