"""Authorization server metadata: RFC 8414, and OpenID Connect Discovery 1.0.

An app configured with ``issuer`` learns its token endpoint, the client authentication
methods the server offers and (RFC 8705) its mutual-TLS endpoint aliases from the server's
metadata document. :class:`Discovery` looks for it where the two specifications put it:

1. ``https://HOST/.well-known/oauth-authorization-server/PATH`` (RFC 8414 section 3.1: the
   well-known segment goes between the host and the issuer's path);
2. ``https://HOST/PATH/.well-known/openid-configuration`` (OpenID Connect Discovery section 4,
   which RFC 8414 section 5 keeps for compatibility).

The first document that answers is used, and only if its ``issuer`` is exactly the configured
one (RFC 8414 section 3.3; a mismatch would let another server speak for the issuer). The
result is kept, and asked again after :data:`MAX_AGE` or once :meth:`Discovery.forget` is
called -- the provider does that whenever a token request fails, so a server that moved its
endpoint is followed at the next attempt.

Failures are broker errors: network trouble and HTTP 5xx/429 are temporary; no document, one
for another issuer, or one without a usable token endpoint are permanent, with a fix.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit, urlunsplit

import httpx
import trio

from broker.errors import PermanentTokenError, TemporaryTokenError
from broker.providers._http import (
    CONNECT_TIMEOUT,
    IO_TIMEOUT,
    ResponseTooLarge,
    read_limited,
    retry_after,
    transport_error,
)

if TYPE_CHECKING:
    import ssl

__all__ = ["MAX_AGE", "Discovery", "ServerMetadata", "metadata_urls"]

#: Seconds a metadata document is used before it is asked for again.
MAX_AGE: Final = 24 * 3600.0
#: RFC 8414 section 2: the default when the server lists no methods.
DEFAULT_AUTH_METHODS: Final[tuple[str, ...]] = ("client_secret_basic",)


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    """What the broker uses of an authorization server's metadata."""

    issuer: str
    token_endpoint: str
    #: ``token_endpoint_auth_methods_supported``, or RFC 8414's default.
    auth_methods: tuple[str, ...]
    #: Whether the document listed the methods (else they are the default).
    auth_methods_listed: bool
    #: RFC 8705 ``mtls_endpoint_aliases.token_endpoint``, if any.
    mtls_token_endpoint: str
    #: Where the document came from.
    url: str
    #: For a person's sign-in: the authorization endpoint (RFC 6749 3.1), the device
    #: authorization endpoint (RFC 8628 4), OpenID Connect's UserInfo endpoint, and the
    #: scopes the server lists (empty: not said). Empty where the document names none.
    authorization_endpoint: str = ""
    device_authorization_endpoint: str = ""
    userinfo_endpoint: str = ""
    scopes_supported: tuple[str, ...] = ()

    def token_endpoint_for(self, auth_method: str) -> str:
        """The endpoint to use: the mutual-TLS alias for certificate authentication."""
        if auth_method.endswith("tls_client_auth") and self.mtls_token_endpoint:
            return self.mtls_token_endpoint
        return self.token_endpoint


def metadata_urls(issuer: str) -> list[str]:
    """Where ``issuer``'s metadata may be, in the order they are tried."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    rfc8414 = urlunsplit(
        (parts.scheme, parts.netloc, "/.well-known/oauth-authorization-server" + path, "", "")
    )
    oidc = urlunsplit(
        (parts.scheme, parts.netloc, path + "/.well-known/openid-configuration", "", "")
    )
    return [rfc8414, oidc]


class Discovery:
    """The metadata of the authorization server ``issuer``, fetched when needed and kept.

    ``where`` names the app in messages; ``context`` is the TLS configuration (trust, and
    the client certificate, which a metadata request never needs but does no harm).
    """

    def __init__(
        self,
        issuer: str,
        *,
        where: str,
        context: ssl.SSLContext,
        connect_timeout: float = CONNECT_TIMEOUT,
        io_timeout: float = IO_TIMEOUT,
    ) -> None:
        if not issuer.startswith("https://"):
            raise ValueError(f"{where}: issuer must be an https:// URL, not {issuer!r}")
        parts = urlsplit(issuer)
        if parts.query or parts.fragment:
            raise ValueError(f"{where}: issuer must have no query or fragment (RFC 8414)")
        self.issuer = issuer
        self._where = where
        self._context = context
        self._timeout = httpx.Timeout(io_timeout, connect=connect_timeout)
        self._metadata: ServerMetadata | None = None
        self._fetched_at = 0.0
        self._lock = trio.Lock()

    @property
    def known(self) -> ServerMetadata | None:
        """The metadata in hand, if any (no I/O)."""
        return self._metadata

    def forget(self) -> None:
        """Ask for the metadata again next time (a token request failed)."""
        self._metadata = None

    async def metadata(self) -> ServerMetadata:
        """The server's metadata: kept, or fetched now (one fetch at a time)."""
        async with self._lock:
            if self._metadata is not None and time.monotonic() - self._fetched_at < MAX_AGE:
                return self._metadata
            metadata = await self._fetch()
            self._metadata, self._fetched_at = metadata, time.monotonic()
            return metadata

    async def _fetch(self) -> ServerMetadata:
        mismatch: tuple[str, object] | None = None
        tried: list[str] = []
        async with httpx.AsyncClient(
            verify=self._context, timeout=self._timeout, follow_redirects=False
        ) as client:
            for url in metadata_urls(self.issuer):
                document = await self._get(client, url)
                tried.append(url)
                if document is None:
                    continue
                if document.get("issuer") != self.issuer:
                    mismatch = (url, document.get("issuer"))
                    continue
                return self._parse(url, document)
        if mismatch is not None:
            url, found = mismatch
            raise PermanentTokenError(
                f"{self._where}: the metadata at {url} is for issuer {found!r}, "
                f"not {self.issuer!r}",
                code="ISSUER_MISMATCH",
                fix="Set issuer to the server's issuer identifier exactly as its metadata "
                "writes it (scheme, host, port, path and trailing slash).",
            )
        raise PermanentTokenError(
            f"{self._where}: no authorization server metadata at {' or '.join(tried)}",
            code="NO_METADATA",
            fix="Check issuer (the server's issuer identifier, e.g. "
            "https://sso.example.com/realms/mail); for a server without discovery, set "
            "token_url instead.",
        )

    async def _get(self, client: httpx.AsyncClient, url: str) -> dict[str, object] | None:
        """The JSON object at ``url``; ``None`` if there is none (4xx, not JSON)."""
        try:
            async with client.stream("GET", url, headers={"Accept": "application/json"}) as r:
                content = await read_limited(r)
        except httpx.HTTPError as exc:
            raise transport_error(
                exc,
                where=self._where,
                peer="the authorization server",
                trust_fix="Trust its CA: install it in the system store or set ca_file to a "
                "PEM file holding it. If an HTTPS proxy intercepts traffic, trust its CA.",
                network_fix=f"Check DNS, routing, firewalls and proxies (HTTPS_PROXY) to {url}.",
                scrub=str,
            ) from None
        except ResponseTooLarge:
            return None
        if r.status_code == 429 or r.status_code >= 500:
            wait = retry_after(r.headers.get("Retry-After"))
            raise TemporaryTokenError(
                f"{self._where}: the authorization server failed to serve its metadata "
                f"(HTTP {r.status_code} on {url})",
                code=f"HTTP {r.status_code}",
                fix="Nothing to change: the broker retries.",
                retry_after=wait,
            )
        if r.status_code != 200:
            return None
        try:
            document = json.loads(content)
        except ValueError:
            return None
        return document if isinstance(document, dict) else None

    def _parse(self, url: str, document: dict[str, object]) -> ServerMetadata:
        endpoint = document.get("token_endpoint")
        if not isinstance(endpoint, str) or not endpoint.startswith("https://"):
            raise PermanentTokenError(
                f"{self._where}: the metadata at {url} names no https:// token_endpoint "
                f"({endpoint!r})",
                code="NO_TOKEN_ENDPOINT",
                fix="The server does not offer a token endpoint over HTTPS: check issuer, or "
                "set token_url.",
            )
        listed = document.get("token_endpoint_auth_methods_supported")
        methods = DEFAULT_AUTH_METHODS
        if isinstance(listed, list) and all(isinstance(m, str) for m in listed):
            methods = tuple(str(m) for m in listed)
        aliases = document.get("mtls_endpoint_aliases")
        alias = aliases.get("token_endpoint") if isinstance(aliases, dict) else None

        def https(name: str) -> str:
            value = document.get(name)
            return value if isinstance(value, str) and value.startswith("https://") else ""

        scopes = document.get("scopes_supported")
        return ServerMetadata(
            issuer=self.issuer,
            token_endpoint=endpoint,
            auth_methods=methods,
            auth_methods_listed=isinstance(listed, list),
            mtls_token_endpoint=alias
            if isinstance(alias, str) and alias.startswith("https://")
            else "",
            url=url,
            authorization_endpoint=https("authorization_endpoint"),
            device_authorization_endpoint=https("device_authorization_endpoint"),
            userinfo_endpoint=https("userinfo_endpoint"),
            scopes_supported=tuple(s for s in scopes if isinstance(s, str))
            if isinstance(scopes, list)
            else (),
        )
