"""Microsoft Entra ID and personal Microsoft accounts: a person's tokens, through msal.

For ``microsoft`` apps with ``delegated = true``: an app registration people sign in to --
a public client (no secret: "Allow public client flows", needed for the device sign-in) or
a confidential one (``client_secret`` or ``certificate``: browser sign-in only) -- with the
delegated permissions ``IMAP.AccessAsUser.All``, ``POP.AccessAsUser.All`` and ``SMTP.Send``
of Office 365 Exchange Online. ``tenant`` is the tenant's ID or domain for its own
accounts, ``organizations`` for any work account, ``consumers`` for personal accounts
(Outlook.com, Hotmail, Live), ``common`` for both.

msal does the protocol work, in worker threads as for app-only tokens
(:mod:`broker.providers.microsoft`, whose msal configuration -- no msal caches, our HTTP
client, no instance discovery -- applies here too):

- the device sign-in: ``initiate_device_flow``, then one ``acquire_token_by_device_flow``
  per poll (``exit_condition`` ends msal's own loop at once), at the interval Entra says,
  five seconds more after each ``slow_down`` (RFC 8628 section 3.5);
- the browser sign-in: ``initiate_auth_code_flow`` (``state``, PKCE S256 and a nonce; the
  answer comes back as a form POST to the loopback redirect, ``response_mode=form_post``) and
  ``acquire_token_by_auth_code_flow``, which checks ``state`` again;
- renewal: ``acquire_token_by_refresh_token`` with the sign-in's refresh token; Entra returns
  a new one each time, and keeps the old one valid until it expires, so a new one that is
  lost in a crash costs nothing.

msal always asks for ``openid``, ``profile`` and ``offline_access`` besides the configured
scope (the last is what brings a refresh token), so they are left out of what is passed to
it. The account that signed in is named by the ID token (``preferred_username``, ``email``,
``upn``). Refusals of a refresh token (``invalid_grant``, ``interaction_required``: password
changed, sessions revoked, consent withdrawn, 90 days unused, multi-factor authentication
now required) are :class:`~broker.delegated.SignInRequired`, with the AADSTS code and what it
means.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Final

import httpx
import trio

from broker.claims import Expectations
from broker.delegated import (
    AuthorizationRequest,
    DeviceAuthorization,
    Pending,
    Renewal,
    SignInFailed,
    SignInRequired,
    browser_refusal,
)
from broker.errors import BrokerError, PermanentTokenError, TemporaryTokenError
from broker.model import AccessToken
from broker.providers.microsoft import (
    _REGISTRATION,
    MicrosoftProvider,
    _first_code_in,
    _HttpStatusError,
    classify_entra_error,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from broker.model import App

__all__ = ["RESERVED_SCOPES", "MicrosoftDelegatedProvider"]

#: Scopes msal adds itself and refuses to be given.
RESERVED_SCOPES: Final = frozenset({"openid", "profile", "offline_access"})
#: Used when a token response has no ``expires_in`` (Entra always sends one).
_FALLBACK_LIFETIME: Final = 300
_SIGN_IN_AGAIN = "The person must sign in again."

#: What Entra's refusals of a refresh token mean (AADSTS code).
_REVOCATIONS: Final[dict[int, str]] = {
    50173: "The sign-in was revoked: the password changed, or an administrator revoked "
    "the person's sessions.",
    700082: "The refresh token expired: it was not used for 90 days.",
    70008: "The refresh token expired through inactivity.",
    65001: "Consent is missing or was withdrawn: the person (or an administrator) removed "
    "the app's permissions, or the app asks for a permission nobody consented to.",
    50076: "Multi-factor authentication is now required for this sign-in.",
    50079: "The person must register for multi-factor authentication.",
    50158: "A Conditional Access policy now requires another check.",
    70043: "The Conditional Access sign-in frequency expired the sign-in.",
    50057: "The account is disabled.",
    50034: "The account does not exist in this directory any more.",
    50126: "The account's credentials changed.",
    70000: "Entra refuses the refresh token (revoked, or for another client).",
}


class MicrosoftDelegatedProvider(MicrosoftProvider):
    """People's tokens for one Entra app registration.

    Construction parses the credential, if any (no I/O; ``ValueError`` for a bad PEM).
    """

    def __init__(self, app: App, **timeouts: float) -> None:
        if not app.delegated:
            raise ValueError(f"app {app.name!r} is not delegated")
        super().__init__(app, **timeouts)
        self._scopes = [s for s in app.scope.split() if s.lower() not in RESERVED_SCOPES]
        if not self._scopes:
            raise ValueError(
                f"app {app.name!r}: scope names no permission besides "
                f"{', '.join(sorted(RESERVED_SCOPES))}"
            )

    def __repr__(self) -> str:
        kind = "public" if self._credential is None else "confidential"
        return f"MicrosoftDelegatedProvider(app={self._app.name!r}, {kind} client)"

    async def expectations(self) -> Expectations:
        """Nothing is checked in the token itself: personal accounts get tokens that are
        not JWTs; what each protocol needs is checked in the granted scope at login."""
        await trio.lowlevel.checkpoint()
        return Expectations("microsoft")

    async def fetch(self) -> AccessToken:
        raise PermanentTokenError(
            f"{self._where()}: a delegated app has no app-only token",
            fix="Ask for a person's token (their account).",
        )

    async def refresh(self, refresh_token: str) -> Renewal:
        def work() -> Renewal:
            result = self._msal_call(
                lambda client: client.acquire_token_by_refresh_token(refresh_token, self._scopes)
            )
            return self._renewal(result, self._refresh_error, refresh_token)

        return await trio.to_thread.run_sync(work, abandon_on_cancel=True)

    async def start_device_sign_in(self) -> DeviceAuthorization:
        if self._credential is not None:
            raise SignInFailed(
                f"{self._where()}: the device sign-in needs a public client, and this app "
                "has a client secret or certificate",
                code="NOT_PUBLIC_CLIENT",
                fix="Sign in with a browser (authorize --browser), or remove the credential "
                f"and set {_REGISTRATION} > Authentication > 'Allow public client flows' "
                "to Yes.",
            )

        def work() -> DeviceAuthorization:
            flow = self._msal_call(lambda client: client.initiate_device_flow(scopes=self._scopes))
            if "user_code" not in flow:
                raise self._device_start_error(flow)
            return DeviceAuthorization(
                user_code=str(flow["user_code"]),
                verification_uri=str(flow.get("verification_uri") or ""),
                verification_uri_complete=str(flow.get("verification_uri_complete") or ""),
                expires_at=float(flow.get("expires_at") or 0),
                interval=float(flow.get("interval") or 5),
                handle=flow,
            )

        return await trio.to_thread.run_sync(work, abandon_on_cancel=True)

    async def poll_device_sign_in(self, authorization: DeviceAuthorization) -> Renewal | Pending:
        flow = authorization.handle
        device_code = str(flow.get("device_code", "")) if isinstance(flow, dict) else ""

        def work() -> Renewal | Pending:
            result = self._msal_call(
                lambda client: client.acquire_token_by_device_flow(
                    flow, exit_condition=lambda _: True
                )
            )
            error = result.get("error")
            if error in ("authorization_pending", "slow_down"):
                return Pending(error == "slow_down")
            return self._renewal(result, self._device_error, device_code)

        return await trio.to_thread.run_sync(work, abandon_on_cancel=True)

    async def authorization_request(self, redirect_uri: str) -> AuthorizationRequest:
        def work() -> AuthorizationRequest:
            flow = self._msal_call(
                lambda client: client.initiate_auth_code_flow(
                    self._scopes,
                    redirect_uri=redirect_uri,
                    response_mode="form_post",
                    prompt="select_account",
                )
            )
            return AuthorizationRequest(
                str(flow["auth_uri"]),
                redirect_uri,
                str(flow["state"]),
                handle=flow,
                in_address=False,  # form_post: the code stays out of addresses and histories
            )

        return await trio.to_thread.run_sync(work, abandon_on_cancel=True)

    async def redeem(self, request: AuthorizationRequest, response: Mapping[str, str]) -> Renewal:
        if "error" in response or not response.get("code"):
            raise browser_refusal(
                self._where(),
                response,
                declined_fix="Run authorize again and accept the permissions the app asks "
                "for; if the tenant lets only administrators consent, ask one to grant them.",
                no_code_fix=f"Check the redirect URIs under {_REGISTRATION} > Authentication "
                "(a 'Mobile and desktop applications' platform with the app's redirect URI).",
            )
        flow = request.handle
        code = response["code"]

        def work() -> Renewal:
            try:
                result = self._msal_call(
                    lambda client: client.acquire_token_by_auth_code_flow(flow, dict(response))
                )
            except ValueError as exc:  # msal's own state check
                raise SignInFailed(
                    f"{self._where()}: the sign-in's answer does not match its request "
                    f"({type(exc).__name__})",
                    code="STATE_MISMATCH",
                    fix="Run authorize again.",
                ) from None
            return self._renewal(result, None, code)

        return await trio.to_thread.run_sync(work, abandon_on_cancel=True)

    async def identity(self, renewal: Renewal) -> Mapping[str, object]:
        await trio.lowlevel.checkpoint()
        return renewal.identity

    # -- worker threads ---------------------------------------------------------------------

    def _msal_call(self, call: Callable[[Any], Any]) -> dict[str, Any]:
        """Run ``call`` on the msal client; HTTP trouble becomes broker errors."""
        try:
            result = call(self._client())
        except BrokerError:
            raise
        except _HttpStatusError as exc:
            raise self._status_error(exc) from None
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        if not isinstance(result, dict):
            raise TemporaryTokenError(
                f"{self._where()}: msal returned no answer", fix="Nothing to change."
            )
        return result

    def _renewal(
        self,
        result: dict[str, Any],
        classify: Callable[[dict[str, Any], Callable[[str], str]], BrokerError | None] | None,
        secret: str,
    ) -> Renewal:
        """The token in msal's ``result``, or the error it says; ``secret`` (the refresh
        token or device code sent) is scrubbed from every message, as the app's own are."""

        def scrub(text: str) -> str:
            text = self._scrub(text)
            return text.replace(secret, "<redacted>") if secret else text

        if "access_token" not in result:
            special = classify(result, scrub) if classify is not None else None
            raise special or classify_entra_error(result, where=self._where(), scrub=scrub)
        expires_in = result.get("expires_in")
        if not isinstance(expires_in, int | float) or expires_in <= 0:
            expires_in = _FALLBACK_LIFETIME
        granted = result.get("scope")
        token = AccessToken(
            value=str(result["access_token"]),
            expires_at=_now() + float(expires_in),
            scope=granted if isinstance(granted, str) else " ".join(self._scopes),
        )
        refresh = result.get("refresh_token")
        claims = result.get("id_token_claims")
        return Renewal(
            token,
            refresh if isinstance(refresh, str) and refresh else None,
            claims if isinstance(claims, dict) else {},
        )

    def _refresh_error(
        self, result: dict[str, Any], scrub: Callable[[str], str]
    ) -> BrokerError | None:
        error = str(result.get("error") or "")
        if error not in ("invalid_grant", "interaction_required", "consent_required"):
            return None
        code = _first_code_in(result)
        refused = classify_entra_error(result, where=self._where(), scrub=scrub)
        return SignInRequired(
            str(refused).replace("refused the token request", "refused the refresh token"),
            code=refused.code or error,
            fix=(_REVOCATIONS.get(code or 0) or f"Entra refused the refresh token ({error}).")
            + " "
            + _SIGN_IN_AGAIN,
            revoked=True,
        )

    def _device_error(
        self, result: dict[str, Any], scrub: Callable[[str], str]
    ) -> BrokerError | None:
        del scrub  # its messages hold no text of Entra's
        error = str(result.get("error") or "")
        if error in ("authorization_declined", "access_denied"):
            return SignInFailed(
                f"{self._where()}: the sign-in was declined ({error})",
                code=error,
                fix="Run authorize again and accept the permissions the app asks for.",
            )
        if error in ("expired_token", "code_expired"):
            return SignInFailed(
                f"{self._where()}: the code expired before the sign-in was finished",
                code="expired_token",
                fix="Run authorize again and enter the new code sooner.",
            )
        if error == "bad_verification_code":
            return SignInFailed(
                f"{self._where()}: Entra does not know the device code",
                code=error,
                fix="Run authorize again.",
            )
        return None

    def _device_start_error(self, flow: dict[str, Any]) -> BrokerError:
        refused = classify_entra_error(flow, where=self._where(), scrub=self._scrub)
        if _first_code_in(flow) in (7000218, 700025) or flow.get("error") == "invalid_client":
            return SignInFailed(
                str(refused),
                code=refused.code,
                fix=f"Allow the device sign-in: {_REGISTRATION} > Authentication > "
                "'Allow public client flows' = Yes.",
            )
        return refused


def _now() -> float:
    return time.time()
