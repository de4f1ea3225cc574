"""A person's tokens from any OAuth 2.0 authorization server, and from Google.

For ``oauth2`` and ``google`` apps with ``delegated = true``: people sign in once, with the
device authorization grant (RFC 8628) or the authorization-code grant with PKCE (RFC 6749
section 4.1, RFC 7636, S256) in a browser, and their tokens are renewed with the refresh
token that sign-in gave (RFC 6749 section 6). The client authenticates as
:class:`~broker.providers.oauth2.OAuth2Provider` does, or, as a public client
(``auth_method = "none"``), with its ID alone.

Endpoints come from the configuration or from the issuer's metadata
(:mod:`broker.providers.discovery`): ``authorization_endpoint``,
``device_authorization_endpoint``, ``token_endpoint`` and ``userinfo_endpoint``. Google's are
fixed (:data:`~broker.model.GOOGLE_AUTHORIZATION_URL`, the token endpoint and the device
endpoint beside it), and so is what Google needs: the
scope ``https://mail.google.com/`` with ``openid email`` (to learn the account),
``access_type=offline`` and ``prompt=consent`` (for a refresh token at every sign-in). Other
servers are asked, at sign-in, for ``openid``, ``email`` and ``offline_access`` besides the
configured scope when their metadata lists them, and for consent when ``offline_access`` is
asked (OpenID Connect Core section 11).

Who signed in is read from the ID token of the token response -- which comes straight from
the token endpoint over TLS, so its signature need not be checked (OpenID Connect Core
section 3.1.3.7), but its ``aud`` must name this client and its ``iss`` the issuer -- or else
from the UserInfo endpoint.

A refresh token the server refuses (``invalid_grant``: revoked, expired, the password
changed) is :class:`~broker.delegated.SignInRequired`. Refresh tokens, device codes,
authorization codes and PKCE verifiers never appear in messages.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from urllib.parse import urlencode, urljoin

import httpx
from authlib.oauth2.rfc7636 import create_s256_code_challenge  # type: ignore[import-untyped]

from broker.claims import NotAJwtError, check_token, decode_claims
from broker.delegated import (
    AuthorizationRequest,
    DeviceAuthorization,
    Pending,
    Renewal,
    SignInFailed,
    SignInRequired,
    account_names,
    browser_refusal,
)
from broker.errors import BrokerError, PermanentTokenError, TemporaryTokenError, token_mismatch
from broker.model import GOOGLE_AUTHORIZATION_URL, GOOGLE_USERINFO_URL
from broker.providers._http import (
    OAuthError,
    ResponseTooLarge,
    json_object,
    read_limited,
    transport_error,
)
from broker.providers.oauth2 import OAuth2Provider

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from broker.claims import Expectations
    from broker.model import App
    from broker.providers._http import TokenResponse
    from broker.providers.discovery import ServerMetadata

__all__ = ["DEVICE_GRANT", "DelegatedOAuth2Provider"]

DEVICE_GRANT: Final = "urn:ietf:params:oauth:grant-type:device_code"
#: RFC 8628 section 3.2: the interval when the server names none.
DEFAULT_INTERVAL: Final = 5.0
#: Used when a device authorization response names no lifetime (RFC 8628 requires one).
DEFAULT_DEVICE_LIFETIME: Final = 600.0
#: Scopes asked for at sign-in when the server lists them, to learn the account and get a
#: refresh token.
SIGN_IN_SCOPES: Final = ("openid", "email", "offline_access")
_GOOGLE_SCOPES: Final = ("openid", "email")

_GOOGLE_REVOKED: Final = (
    "Google no longer accepts this sign-in: the person removed the app's access "
    "(myaccount.google.com > Security > Third-party apps), changed the password of a Gmail "
    "account, or did not use it for six months -- or the OAuth consent screen is in "
    "'Testing' status, whose refresh tokens expire after 7 days: publish it 'In production' "
    "(Google Cloud console > APIs & Services > OAuth consent screen)."
)
_REVOKED: Final = (
    "The authorization server no longer accepts this sign-in: it was revoked, it expired, "
    "or the person's password or consent changed."
)


class _PollAgain(TemporaryTokenError):
    """``authorization_pending`` or ``slow_down``: the person has not finished."""

    def __init__(self, slow_down: bool) -> None:
        super().__init__("the sign-in is not finished yet", code="authorization_pending")
        self.slow_down = slow_down


@dataclass(frozen=True, slots=True)
class _Endpoints:
    token: str
    authorization: str
    device: str
    userinfo: str
    metadata: ServerMetadata | None


class DelegatedOAuth2Provider(OAuth2Provider):
    """People's tokens for one client of an authorization server (or of Google).

    Construction checks the configuration (``ValueError``); no I/O.
    """

    def __init__(self, app: App, **timeouts: float) -> None:
        if not app.delegated:
            raise ValueError(f"app {app.name!r} is not delegated")
        super().__init__(app, **timeouts)
        self._google = app.provider == "google"
        self._where = (
            f"app {app.name!r} (Google client {app.client_id})" if self._google else self._where
        )
        self._endpoint_timeout = self._endpoint.timeout

    def __repr__(self) -> str:
        return f"DelegatedOAuth2Provider(app={self._app.name!r}, auth_method={self._method!r})"

    async def expectations(self) -> Expectations:
        return self.expected

    # -- the device sign-in (RFC 8628) ------------------------------------------------------

    async def start_device_sign_in(self) -> DeviceAuthorization:
        endpoints = await self._endpoints()
        if not endpoints.device:
            raise SignInFailed(
                f"{self._where}: the authorization server offers no device sign-in",
                code="NO_DEVICE_FLOW",
                fix="Sign in with a browser instead (authorize --browser), or set "
                "device_authorization_url if the server has one that its metadata omits.",
            )
        form: dict[str, str | list[str]] = {"scope": self._sign_in_scope(endpoints.metadata)}
        if self._app.resources:
            form["resource"] = list(self._app.resources)
        headers = self.authenticate(form, endpoints.device, endpoints.metadata)
        response, content = await self._endpoint.post(form, headers=headers, url=endpoints.device)
        self._endpoint.temporary_status(response, content)
        body = json_object(content) or {}
        device_code, user_code = body.get("device_code"), body.get("user_code")
        # Google names it verification_url, as RFC 8628's drafts did.
        uri = body.get("verification_uri") or body.get("verification_url")
        if response.status_code != 200 or not (
            isinstance(device_code, str)
            and isinstance(user_code, str)
            and isinstance(uri, str)
            and device_code
            and user_code
        ):
            raise self._device_refusal(OAuthError(response.status_code, body))
        complete = body.get("verification_uri_complete")
        return DeviceAuthorization(
            user_code=user_code,
            verification_uri=uri,
            verification_uri_complete=complete if isinstance(complete, str) else "",
            expires_at=self._now() + _seconds(body.get("expires_in"), DEFAULT_DEVICE_LIFETIME),
            interval=_seconds(body.get("interval"), DEFAULT_INTERVAL),
            handle=device_code,
        )

    async def poll_device_sign_in(self, authorization: DeviceAuthorization) -> Renewal | Pending:
        endpoints = await self._endpoints()
        device_code = str(authorization.handle)
        form: dict[str, str | list[str]] = {"grant_type": DEVICE_GRANT, "device_code": device_code}
        try:
            response = await self._grant(form, endpoints, self._device_error, device_code)
        except _PollAgain as again:
            return Pending(again.slow_down)
        return self._renewal(response)

    def _device_error(self, error: OAuthError) -> BrokerError | None:
        if error.error in ("authorization_pending", "slow_down"):
            return _PollAgain(error.error == "slow_down")
        if error.error in ("access_denied", "authorization_declined"):
            return SignInFailed(
                f"{self._where}: the sign-in was declined ({error.error})",
                code=error.error,
                fix="Sign in again and accept what the app asks for.",
            )
        if error.error in ("expired_token", "code_expired"):
            return SignInFailed(
                f"{self._where}: the code expired before the sign-in was finished",
                code="expired_token",
                fix="Run authorize again and enter the new code sooner.",
            )
        return None

    def _device_refusal(self, error: OAuthError) -> BrokerError:
        text = f": {error.description.splitlines()[0]}" if error.description else ""
        message = self._endpoint.scrub(
            f"{self._where}: the device sign-in was refused (HTTP {error.status}): "
            f"{error.error or 'no error code'}{text}"
        )
        if self._google and error.error == "invalid_scope":
            return SignInFailed(
                message,
                code=error.error,
                fix="Google does not allow Gmail's scope in the device sign-in: sign in with "
                "a browser (authorize --browser).",
            )
        if error.error in ("invalid_client", "unauthorized_client"):
            return SignInFailed(
                message,
                code=error.error,
                fix="The client may not use the device sign-in: allow the device "
                "authorization grant for it on the authorization server, or sign in with a "
                "browser (authorize --browser).",
            )
        return SignInFailed(
            message,
            code=error.error or f"HTTP {error.status}",
            fix="Check scope and the client's settings, or sign in with a browser "
            "(authorize --browser).",
        )

    # -- the browser sign-in (RFC 6749 4.1 with RFC 7636) -----------------------------------

    async def authorization_request(self, redirect_uri: str) -> AuthorizationRequest:
        endpoints = await self._endpoints()
        if not endpoints.authorization:
            raise SignInFailed(
                f"{self._where}: the authorization server's metadata names no "
                "authorization_endpoint",
                code="NO_AUTHORIZATION_ENDPOINT",
                fix="Set authorization_url, or use the device sign-in (authorize without "
                "--browser).",
            )
        verifier = secrets.token_urlsafe(48)  # 64 characters, RFC 7636 4.1
        state = secrets.token_urlsafe(24)
        scope = self._sign_in_scope(endpoints.metadata)
        params: list[tuple[str, str]] = [
            ("response_type", "code"),
            ("client_id", self._app.client_id),
            ("redirect_uri", redirect_uri),
            ("scope", scope),
            ("state", state),
            ("code_challenge", create_s256_code_challenge(verifier)),
            ("code_challenge_method", "S256"),
        ]
        if self._google:
            params += [("access_type", "offline"), ("prompt", "consent")]
        elif "offline_access" in scope.split():
            params.append(("prompt", "consent"))
        params += [("resource", r) for r in self._app.resources]
        separator = "&" if "?" in endpoints.authorization else "?"
        url = endpoints.authorization + separator + urlencode(params)
        return AuthorizationRequest(url, redirect_uri, state, handle=verifier)

    async def redeem(self, request: AuthorizationRequest, response: Mapping[str, str]) -> Renewal:
        if "error" in response or not response.get("code"):
            raise browser_refusal(
                self._where,
                response,
                declined_fix="Sign in again and accept what the app asks for; if an "
                "administrator must consent first, ask them.",
                no_code_fix="Check the client's redirect URI registration and scope.",
            )
        endpoints = await self._endpoints()
        code = response["code"]
        form: dict[str, str | list[str]] = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": request.redirect_uri,
            "code_verifier": str(request.handle),
        }
        return self._renewal(await self._grant(form, endpoints, None, code))

    # -- renewal ----------------------------------------------------------------------------

    async def refresh(self, refresh_token: str) -> Renewal:
        endpoints = await self._endpoints()
        form: dict[str, str | list[str]] = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
        }
        if self._app.resources:
            form["resource"] = list(self._app.resources)
        response = await self._grant(form, endpoints, self._refresh_error, refresh_token)
        return self._renewal(response)

    def _refresh_error(self, error: OAuthError) -> BrokerError | None:
        if error.error != "invalid_grant":
            return None
        text = f": {error.description.splitlines()[0]}" if error.description else ""
        return SignInRequired(
            self._endpoint.scrub(f"{self._where}: the refresh token was refused{text}"),
            code="invalid_grant",
            fix=_GOOGLE_REVOKED if self._google else _REVOKED,
            revoked=True,
        )

    # -- who signed in ----------------------------------------------------------------------

    async def identity(self, renewal: Renewal) -> Mapping[str, object]:
        if account_names(renewal.identity):
            return renewal.identity
        endpoints = await self._endpoints()
        if not endpoints.userinfo:
            return renewal.identity
        url = endpoints.userinfo
        try:
            async with (
                httpx.AsyncClient(
                    verify=self._endpoint.context,
                    timeout=self._endpoint_timeout,
                    follow_redirects=False,
                ) as client,
                client.stream(
                    "GET",
                    url,
                    headers={
                        "Authorization": f"Bearer {renewal.token.value}",
                        "Accept": "application/json",
                    },
                ) as answer,
            ):
                content = await read_limited(answer)
        except httpx.HTTPError as exc:
            raise transport_error(
                exc,
                where=self._where,
                peer="the UserInfo endpoint",
                trust_fix="Trust its CA (ca_file).",
                network_fix=f"Check the network path to {url}.",
                scrub=lambda text: text.replace(renewal.token.value, "<redacted>"),
            ) from None
        except ResponseTooLarge:
            return renewal.identity
        body = json_object(content)
        if answer.status_code != 200 or body is None:
            raise PermanentTokenError(
                f"{self._where}: the UserInfo endpoint {url} answered HTTP "
                f"{answer.status_code}, so the account that signed in is unknown",
                code=f"HTTP {answer.status_code}",
                fix="Allow the client the openid and email scopes, or set userinfo_url.",
            )
        return {**renewal.identity, **body}

    # -- plumbing ---------------------------------------------------------------------------

    async def _endpoints(self) -> _Endpoints:
        app = self._app
        metadata = await self.metadata()
        token = metadata.token_endpoint_for(self._method) if metadata else app.token_url
        if self._google:
            # Google's device endpoint is beside its token endpoint (/device/code).
            return _Endpoints(
                token,
                app.authorization_url or GOOGLE_AUTHORIZATION_URL,
                app.device_authorization_url or urljoin(token, "device/code"),
                app.userinfo_url or GOOGLE_USERINFO_URL,
                None,
            )
        return _Endpoints(
            token,
            app.authorization_url or (metadata.authorization_endpoint if metadata else ""),
            app.device_authorization_url
            or (metadata.device_authorization_endpoint if metadata else ""),
            app.userinfo_url or (metadata.userinfo_endpoint if metadata else ""),
            metadata,
        )

    def _sign_in_scope(self, metadata: ServerMetadata | None) -> str:
        scopes = self._app.scope.split()
        if self._google:
            extra: tuple[str, ...] = _GOOGLE_SCOPES
        elif metadata is not None:
            extra = tuple(s for s in SIGN_IN_SCOPES if s in metadata.scopes_supported)
        else:
            extra = ()
        return " ".join([*scopes, *(s for s in extra if s not in scopes)])

    async def _grant(
        self,
        form: dict[str, str | list[str]],
        endpoints: _Endpoints,
        classify: Callable[[OAuthError], BrokerError | None] | None,
        secret: str,
    ) -> TokenResponse:
        """A token request whose errors never show ``secret`` (a code or refresh token)."""
        try:
            return await self.token_request(
                form, endpoints.token, endpoints.metadata, classify=classify
            )
        except BrokerError as exc:
            if secret and secret in str(exc):
                exc.args = (str(exc).replace(secret, "<redacted>"),)
            raise

    def _renewal(self, response: TokenResponse) -> Renewal:
        token = response.token
        problems = check_token(self.expected, token, scope_stated=response.scope_stated)
        if problems:
            raise token_mismatch(self._where, problems)
        identity: Mapping[str, object] = {}
        if response.id_token is not None:
            identity = self._id_token_claims(response.id_token)
        return Renewal(token, response.refresh_token, identity)

    def _id_token_claims(self, id_token: str) -> Mapping[str, object]:
        """The ID token's claims, if it is for this client from this issuer."""
        try:
            claims = decode_claims(id_token)
        except NotAJwtError:
            raise PermanentTokenError(
                f"{self._where}: the ID token of the sign-in is not a JWT",
                code="ID_TOKEN",
                fix="Check the authorization server's OpenID Connect settings.",
            ) from None
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        issuer = self._app.issuer or ("https://accounts.google.com" if self._google else "")
        if self._app.client_id not in audiences or (
            issuer and claims.get("iss") not in (issuer, issuer.removeprefix("https://"))
        ):
            raise PermanentTokenError(
                f"{self._where}: the ID token of the sign-in is for {audience!r} from "
                f"{claims.get('iss')!r}, not for this client from {issuer or 'its issuer'}",
                code="ID_TOKEN",
                fix="Check client_id and issuer.",
            )
        return claims

    @staticmethod
    def _now() -> float:
        return time.time()


def _seconds(value: object, default: float) -> float:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return default
