"""Generic OAuth 2.0 client credentials (RFC 6749 section 4.4), for any authorization server.

For mail servers that accept bearer tokens from an IdP of their own (Keycloak, Okta,
Authentik, Dovecot with an OAuth2 passdb...). ``token_url`` and ``scope`` come from the
configuration; the client authenticates with one of:

- ``client_secret_basic`` (the default, RFC 6749 section 2.3.1): HTTP Basic with the client ID
  and secret, each form-urlencoded first as the RFC requires -- which authlib's own encoder
  skips, so secrets with ``+``, ``%`` or ``:`` would fail on strict servers;
- ``client_secret_post``: client ID and secret in the form body;
- ``private_key_jwt`` (RFC 7523 section 2.2, OpenID Connect Core section 9): a short-lived JWT
  signed with the client's private key (RSA or EC), built with authlib's
  :func:`~authlib.oauth2.rfc7523.private_key_jwt_sign`.

The request and the classification of answers are :class:`~broker.providers._http.TokenEndpoint`'s.
"""

from __future__ import annotations

import base64
import time
from typing import TYPE_CHECKING, Final
from urllib.parse import quote_plus

from authlib.oauth2.rfc7523 import private_key_jwt_sign  # type: ignore[import-untyped]

from broker.providers._http import CONNECT_TIMEOUT, IO_TIMEOUT, TokenEndpoint
from broker.providers._keys import SigningKey, load_signing_key

if TYPE_CHECKING:
    from broker.model import AccessToken, App

__all__ = ["AUTH_METHODS", "OAuth2Provider"]

AUTH_METHODS: Final = ("client_secret_basic", "client_secret_post", "private_key_jwt")
ASSERTION_TYPE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: Lifetime of a client assertion (seconds): used once, right away.
ASSERTION_LIFETIME: Final = 300


class OAuth2Provider:
    """Client-credentials tokens for one client of a standards-compliant authorization server.

    Construction checks the configuration and parses the key (``ValueError``); no I/O.
    """

    def __init__(
        self,
        app: App,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        io_timeout: float = IO_TIMEOUT,
    ) -> None:
        if app.provider != "oauth2":
            raise ValueError(f"app {app.name!r}: provider is {app.provider!r}, not 'oauth2'")
        method = app.auth_method or "client_secret_basic"
        if method not in AUTH_METHODS:
            raise ValueError(
                f"app {app.name!r}: auth_method must be one of {', '.join(AUTH_METHODS)}, "
                f"not {method!r}"
            )
        if not app.token_url:
            raise ValueError(f"app {app.name!r}: token_url is required")
        self._app = app
        self._method = method
        self._key: SigningKey | None = None
        secrets: tuple[str, ...] = ()
        if method == "private_key_jwt":
            if app.private_key is None:
                raise ValueError(f"app {app.name!r}: private_key_jwt needs private_key")
            self._key = load_signing_key(app, app.private_key, "private_key")
            secrets = (app.private_key.reveal(),)
        else:
            if app.client_secret is None:
                raise ValueError(f"app {app.name!r}: {method} needs client_secret")
            secrets = (app.client_secret.reveal(),)
        self._endpoint = TokenEndpoint(
            app.token_url,
            where=f"app {app.name!r} (client {app.client_id} at {app.token_url})",
            ca_file=app.ca_file,
            secrets=secrets,
            connect_timeout=connect_timeout,
            io_timeout=io_timeout,
        )

    def __repr__(self) -> str:
        return f"OAuth2Provider(app={self._app.name!r}, auth_method={self._method!r})"

    async def fetch(self) -> AccessToken:
        app = self._app
        form = {"grant_type": "client_credentials"}
        if app.scope:
            form["scope"] = app.scope
        headers: dict[str, str] = {}
        if self._method == "client_secret_basic":
            assert app.client_secret is not None
            pair = f"{quote_plus(app.client_id)}:{quote_plus(app.client_secret.reveal())}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        elif self._method == "client_secret_post":
            assert app.client_secret is not None
            form["client_id"] = app.client_id
            form["client_secret"] = app.client_secret.reveal()
        else:
            form["client_id"] = app.client_id
            form["client_assertion_type"] = ASSERTION_TYPE
            form["client_assertion"] = self._assertion()
        return await self._endpoint.request(form, headers=headers, scope=app.scope)

    def _assertion(self) -> str:
        assert self._key is not None
        now = int(time.time())
        header = {"alg": self._key.algorithm, "typ": "JWT"}
        if self._app.key_id:
            header["kid"] = self._app.key_id
        signed = private_key_jwt_sign(
            self._key.key,
            self._app.client_id,
            self._app.token_url,
            alg=self._key.algorithm,
            header=header,
            issued_at=now,
            expires_at=now + ASSERTION_LIFETIME,
        )
        return str(signed)
