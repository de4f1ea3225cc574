"""HTTP plumbing shared by the providers: trust, Retry-After, and one OAuth 2.0 token request.

:class:`TokenEndpoint` posts a form to a token endpoint with ``httpx.AsyncClient`` (which runs
under trio) and turns the answer into an :class:`~broker.model.AccessToken` or a classified
:class:`~broker.errors.BrokerError` (RFC 6749 section 5): HTTP 429 and 5xx, timeouts and
network failures are temporary (with Retry-After when given); an untrusted certificate, a URL
that is not an OAuth endpoint, and the RFC's error codes are permanent, each with a fix. Every
message names the app and never holds a secret, an assertion or a token.

We use authlib only to sign JWTs (client assertions and JWT bearer grants) and send the one
POST ourselves: authlib's own httpx integration moved to the ``httpx2`` package in authlib
1.8 and warns when used with httpx, and a token request needs nothing more than this.
"""

from __future__ import annotations

import email.utils
import json
import os
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, TypeVar

import httpx

from broker.errors import BrokerError, PermanentTokenError, TemporaryTokenError
from broker.model import AccessToken

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping
    from pathlib import Path

    from broker.model import Secret

__all__ = [
    "CONNECT_TIMEOUT",
    "IO_TIMEOUT",
    "MAX_RESPONSE",
    "MAX_RETRY_AFTER",
    "OAuthError",
    "ResponseTooLarge",
    "TokenEndpoint",
    "TokenResponse",
    "exception_chain",
    "find_cause",
    "json_object",
    "oauth_fix",
    "read_limited",
    "retry_after",
    "root_message",
    "tls_context",
    "transport_error",
]

_E = TypeVar("_E", bound=BaseException)

#: Seconds to connect, and to wait for each read/write, on the IdP connection.
CONNECT_TIMEOUT: Final = 5.0
IO_TIMEOUT: Final = 15.0
#: Never wait longer than this for a Retry-After, whatever the IdP asks.
MAX_RETRY_AFTER: Final = 3600.0
#: Used when a token response has no ``expires_in`` (RFC 6749 only recommends it).
FALLBACK_LIFETIME: Final = 300
#: Largest answer read from an identity provider (token responses, metadata): bytes.
MAX_RESPONSE: Final = 1 << 20

#: RFC 6749 section 5.2 and RFC 8707 error codes, with what the operator should check.
RFC6749_FIXES: Final[dict[str, str]] = {
    "invalid_client": (
        "The authorization server did not accept the client: check client_id, the secret, "
        "private key or client certificate, and auth_method (use the one the client is "
        "registered with; for JWT assertions also assertion_audience)."
    ),
    "unauthorized_client": (
        "The client may not use the client-credentials grant: enable it (service account / "
        "machine-to-machine) for this client on the authorization server."
    ),
    "invalid_scope": (
        "The scope is unknown or not granted to this client: check scope, and that the "
        "authorization server lets this client ask for it."
    ),
    "invalid_target": (
        "The authorization server does not know the resource, or this client may not ask "
        "for it (RFC 8707): check resource, and that the mail server is registered as a "
        "resource (API) this client may use."
    ),
    "invalid_grant": "The authorization server rejected the grant: check the client's setup.",
    "unsupported_grant_type": (
        "The authorization server does not offer the client-credentials grant to this "
        "client: enable it for the client (service account / machine-to-machine)."
    ),
    "invalid_request": (
        "The authorization server found the request malformed or lacking something (its "
        "description above says what): check the settings this app sends -- scope, "
        "resource (servers without RFC 8707 may refuse it) and auth_method."
    ),
}
#: What an HTTP status says when the answer carries no (known) OAuth error code.
STATUS_FIXES: Final[dict[int, str]] = {
    400: "The authorization server refused the request: see its description above; check "
    "scope, resource and auth_method.",
    401: "The authorization server did not accept the client's credentials: check "
    "client_id, the credential and auth_method.",
    403: "The authorization server (or a firewall in front of it) forbids this client or "
    "this host: check that the client is enabled and whether the server restricts source "
    "addresses.",
    404: "Nothing answers at that URL: check {endpoint}.",
    405: "That URL is not a token endpoint (it does not take POST): check {endpoint}.",
}
_TEMPORARY_ERRORS: Final = frozenset({"temporarily_unavailable", "server_error", "slow_down"})


class OAuthError(Exception):
    """An RFC 6749 error response, before classification (``body`` is the parsed JSON)."""

    def __init__(self, status: int, body: Mapping[str, object]) -> None:
        self.status = status
        self.error = str(body.get("error") or "")
        self.description = str(body.get("error_description") or "")
        super().__init__(f"{self.error}: {self.description}" if self.description else self.error)


def tls_context(ca_file: Path | None, client_certificate: Secret | None = None) -> ssl.SSLContext:
    """The system trust store plus ``ca_file``; with ``client_certificate`` (a PEM holding
    a private key and its certificate chain), presented to servers that ask (RFC 8705).
    ``ValueError`` naming only the secret's origin if that PEM cannot be used."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    if client_certificate is not None:
        # ssl loads certificates from files only: a private directory, removed at once.
        with tempfile.TemporaryDirectory(prefix="xoauth2-proxy-") as directory:
            path = os.path.join(directory, "client.pem")
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as out:
                out.write(client_certificate.reveal())
            try:
                context.load_cert_chain(path)
            except (ssl.SSLError, OSError):
                raise ValueError(
                    f"client_certificate ({client_certificate.origin}) must be a PEM holding "
                    "an unencrypted private key and its certificate"
                ) from None
    return context


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), capped."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


@dataclass(frozen=True, slots=True)
class TokenResponse:
    """A successful token response: the token, and whether the response said which scope
    it granted (RFC 6749 lets it omit ``scope`` when it is the one asked for); for a
    person's sign-in also its refresh token and ID token, if any (never shown)."""

    token: AccessToken
    scope_stated: bool
    refresh_token: str | None = field(default=None, repr=False)
    id_token: str | None = field(default=None, repr=False)


class TokenEndpoint:
    """One OAuth 2.0 token endpoint, as seen by one app.

    ``url`` is the endpoint (or ``""``, when each :meth:`request` names it); ``endpoint``
    is the setting that leads there, for fixes (``token_url``, ``issuer``); ``where`` names
    the app in messages; ``secrets`` are scrubbed from them; ``classify`` may turn an
    :class:`OAuthError` into a more specific broker error (``None``: the RFC 6749 defaults);
    ``client_certificate`` is presented in the TLS handshake (RFC 8705).
    """

    def __init__(
        self,
        url: str,
        *,
        where: str,
        endpoint: str = "token_url",
        ca_file: Path | None = None,
        client_certificate: Secret | None = None,
        secrets: tuple[str, ...] = (),
        classify: Callable[[OAuthError], BrokerError | None] | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        io_timeout: float = IO_TIMEOUT,
    ) -> None:
        if url and not url.startswith("https://"):
            raise ValueError(f"{where}: token_url must be an https:// URL, not {url!r}")
        self.url = url
        self._where = where
        self._endpoint = endpoint
        self._secrets = tuple(s for s in secrets if s)
        self._classify = classify
        self._context = tls_context(ca_file, client_certificate)
        self._timeout = httpx.Timeout(io_timeout, connect=connect_timeout)

    @property
    def context(self) -> ssl.SSLContext:
        """The TLS settings towards the identity provider (trust, client certificate)."""
        return self._context

    @property
    def timeout(self) -> httpx.Timeout:
        return self._timeout

    async def request(
        self,
        form: Mapping[str, str | list[str]],
        *,
        headers: Mapping[str, str] | None = None,
        scope: str = "",
        url: str = "",
        classify: Callable[[OAuthError], BrokerError | None] | None = None,
    ) -> TokenResponse:
        """POST ``form`` (a list value repeats its field) to ``url`` (default: the
        endpoint's); the token, or a classified error (``classify`` first, if given, then
        the endpoint's own). Cancellation is safe."""
        target = url or self.url
        started = time.time()
        response, content = await self.post(form, headers=headers, url=target)
        return self._parse(response, content, started, scope, target, classify)

    async def post(
        self,
        form: Mapping[str, str | list[str]],
        *,
        headers: Mapping[str, str] | None = None,
        url: str = "",
    ) -> tuple[httpx.Response, bytes]:
        """POST ``form`` to ``url`` (default: the endpoint's); the response and its body
        (at most :data:`MAX_RESPONSE` bytes), or a broker error if there is none."""
        target = url or self.url
        try:
            # A client per request: one request an hour gains nothing from a pool, and
            # nothing is left open for the garbage collector to warn about.
            async with (
                httpx.AsyncClient(
                    verify=self._context, timeout=self._timeout, follow_redirects=False
                ) as client,
                client.stream("POST", target, data=dict(form), headers=headers) as response,
            ):
                content = await read_limited(response)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, target) from None
        except ResponseTooLarge:
            raise PermanentTokenError(
                f"{self._where}: {target} answered with more than {MAX_RESPONSE} bytes",
                fix=f"Check {self._endpoint}: it must lead to the token endpoint.",
            ) from None
        return response, content

    def temporary_status(self, response: httpx.Response, content: bytes) -> None:
        """Raise the temporary error for HTTP 429 and 5xx answers (with Retry-After)."""
        status = response.status_code
        if status == 429 or status >= 500:
            wait = retry_after(response.headers.get("Retry-After"))
            detail = _json(content)
            what = f", {detail.get('error')}" if detail and detail.get("error") else ""
            kind = "throttled the request" if status == 429 else "failed"
            raise TemporaryTokenError(
                self._scrub(
                    f"{self._where}: the authorization server {kind} (HTTP {status}{what})"
                    + (f"; retry after {wait:g} s" if wait is not None else "")
                ),
                code=f"HTTP {status}",
                fix="Nothing to change: the broker retries. If it persists, check the "
                "authorization server's status.",
                retry_after=wait,
            )

    def _parse(
        self,
        response: httpx.Response,
        content: bytes,
        started: float,
        scope: str,
        url: str,
        classify: Callable[[OAuthError], BrokerError | None] | None = None,
    ) -> TokenResponse:
        status = response.status_code
        self.temporary_status(response, content)
        body = _json(content)
        if body is None:
            raise PermanentTokenError(
                f"{self._where}: {url} answered HTTP {status} with something that is not "
                "an OAuth 2.0 JSON response",
                code=f"HTTP {status}",
                fix=STATUS_FIXES.get(status, "").format(endpoint=self._endpoint)
                if status in (401, 403, 404, 405)
                else f"Check {self._endpoint}: it must lead to the authorization server's "
                "token endpoint.",
            )
        if status != 200 or "access_token" not in body:
            error = OAuthError(status, body)
            special = classify(error) if classify is not None else None
            raise special if special is not None else self._oauth_error(error)
        value = body.get("access_token")
        token_type = str(body.get("token_type") or "bearer")
        if not isinstance(value, str) or not value or token_type.lower() != "bearer":
            raise PermanentTokenError(
                f"{self._where}: the token response holds no bearer access token "
                f"(token_type {token_type!r})",
                fix="The mail server needs bearer tokens: check the client's token settings.",
            )
        expires_in = body.get("expires_in")
        if isinstance(expires_in, str) and expires_in.isdigit():
            expires_in = int(expires_in)
        if not isinstance(expires_in, int | float) or isinstance(expires_in, bool):
            expires_in = FALLBACK_LIFETIME
        if expires_in <= 0:
            expires_in = FALLBACK_LIFETIME
        refresh, id_token = body.get("refresh_token"), body.get("id_token")
        extra = {
            "refresh_token": refresh if isinstance(refresh, str) and refresh else None,
            "id_token": id_token if isinstance(id_token, str) and id_token else None,
        }
        granted = body.get("scope")
        expires_at = started + float(expires_in)
        if not isinstance(granted, str):
            return TokenResponse(AccessToken(value, expires_at, scope), False, **extra)
        return TokenResponse(AccessToken(value, expires_at, granted), True, **extra)

    def _oauth_error(self, error: OAuthError) -> BrokerError:
        if self._classify is not None:
            special = self._classify(error)
            if special is not None:
                return special
        text = error.description.splitlines()[0] if error.description else ""
        message = self._scrub(
            f"{self._where}: the authorization server refused the token request "
            f"(HTTP {error.status}): {error.error or 'no error code'}"
            + (f": {text}" if text else "")
        )
        if error.error in _TEMPORARY_ERRORS:
            return TemporaryTokenError(
                message, code=error.error, fix="Nothing to change: the broker retries."
            )
        wrong_url = error.status in (404, 405)  # whatever the body's error says
        return PermanentTokenError(
            message,
            code=f"HTTP {error.status}" if wrong_url or not error.error else error.error,
            fix=oauth_fix(error.error, error.status, endpoint=self._endpoint),
        )

    def _transport_error(self, exc: httpx.HTTPError, url: str) -> BrokerError:
        return transport_error(
            exc,
            where=self._where,
            peer="the authorization server",
            trust_fix="Trust its CA: install it in the system store or set ca_file to a PEM "
            "file holding it. If an HTTPS proxy intercepts traffic, trust its CA.",
            network_fix=f"Check DNS, routing, firewalls and proxies (HTTPS_PROXY) to {url}.",
            scrub=self._scrub,
        )

    def scrub(self, text: str) -> str:
        """``text`` without the app's secrets."""
        for secret in self._secrets:
            text = text.replace(secret, "<redacted>")
        return text

    _scrub = scrub


def oauth_fix(error: str, status: int, *, endpoint: str = "token_url") -> str:
    """The fix for an RFC 6749 error answer, from its code and its HTTP status.

    A known code decides, except where the status says more: an ``invalid_request`` with
    401 is about the client's credentials, and a 404 or 405 means the URL is wrong whatever
    the body says. ``endpoint`` is the setting that led to the URL.
    """
    if status in (404, 405):
        return STATUS_FIXES[status].format(endpoint=endpoint)
    if status == 401 and error in ("", "invalid_request"):
        return STATUS_FIXES[401]
    fix = RFC6749_FIXES.get(error) or STATUS_FIXES.get(status)
    return fix or f"Check the client's registration on the authorization server and {endpoint}."


class ResponseTooLarge(Exception):
    """An answer longer than :data:`MAX_RESPONSE`."""


async def read_limited(response: httpx.Response, limit: int = MAX_RESPONSE) -> bytes:
    """The body of a streamed ``response``: at most ``limit`` bytes, else
    :class:`ResponseTooLarge`."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise ResponseTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def json_object(content: bytes) -> dict[str, object] | None:
    """``content`` as a JSON object, or ``None`` if it is not one."""
    return _json(content)


def _json(content: bytes) -> dict[str, object] | None:
    try:
        parsed = json.loads(content)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def transport_error(
    exc: httpx.HTTPError,
    *,
    where: str,
    peer: str,
    trust_fix: str,
    network_fix: str,
    scrub: Callable[[str], str],
) -> BrokerError:
    """Classify a failed HTTP exchange with ``peer`` ("the identity provider"...).

    An untrusted certificate is permanent (``trust_fix``); timeouts, unreachable hosts and
    broken connections are temporary (``network_fix``). ``where`` names the app; ``scrub``
    removes secrets from the message.
    """
    verify = find_cause(exc, ssl.SSLCertVerificationError)
    if verify is not None:
        reason = verify.verify_message or str(verify.reason) or "verification failed"
        return PermanentTokenError(
            f"{where}: {peer}'s TLS certificate is not trusted ({reason})",
            code="CERTIFICATE_VERIFY_FAILED",
            fix=trust_fix,
        )
    if isinstance(exc, httpx.TimeoutException):
        what = f"timed out ({type(exc).__name__})"
    elif isinstance(exc, httpx.ConnectError):
        what = f"is unreachable ({root_message(exc)})"
    else:
        what = f"connection failed ({type(exc).__name__}: {root_message(exc)})"
    return TemporaryTokenError(scrub(f"{where}: {peer} {what}"), fix=network_fix)


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then its cause or context, and so on (each once)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def find_cause(exc: BaseException, kind: type[_E]) -> _E | None:
    """The first exception of type ``kind`` in ``exc``'s chain."""
    for link in exception_chain(exc):
        if isinstance(link, kind):
            return link
    return None


def root_message(exc: BaseException) -> str:
    """What the innermost exception of the chain says (its type if nothing)."""
    *_, root = exception_chain(exc)
    return str(root) or type(root).__name__
