"""Delegated access: tokens that belong to one person, who signs in once.

A *delegated* app is an OAuth client that people sign in to -- a personal Outlook.com or
Gmail account, a mailbox in a tenant that allows only user-consented access. Its tokens
belong to the person who signed in (the *account*), and are renewed with the refresh token
that sign-in gave, without asking the person again, until the identity provider revokes it
(password changed, consent withdrawn, months without use).

This module holds what the sign-in flows (:mod:`broker.signin`), the providers
(:mod:`broker.providers.microsoft_delegated`, :mod:`broker.providers.delegated_oauth2`) and
the token source (:mod:`broker.source`) share:

- :class:`DelegatedProvider`, what a provider of delegated tokens does: start a device
  sign-in (RFC 8628) and poll it, build a browser sign-in request (RFC 6749 section 4.1 with
  PKCE, RFC 7636) and redeem its answer, and renew a token with a refresh token;
- :class:`Renewal`, what each of those gives: an access token, the refresh token that
  replaces the one used (when the provider rotates them), and what the sign-in says about
  the account (ID token or UserInfo claims);
- :class:`SignInRequired`, the error for a sign-in that is missing or that the identity
  provider no longer accepts: permanent, until the person signs in again;
- :func:`account_names` and :func:`matching_account`, the check that a person signed in
  with the account the configuration expects, not another one by mistake.

Nothing here holds a secret in its ``repr``: refresh tokens, device codes, PKCE verifiers and
``state`` values are redacted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol, runtime_checkable

from broker.errors import PermanentTokenError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from broker.claims import Expectations
    from broker.model import AccessToken

__all__ = [
    "ACCOUNT_CLAIMS",
    "AuthorizationRequest",
    "DelegatedProvider",
    "DeviceAuthorization",
    "Pending",
    "Renewal",
    "SignInFailed",
    "SignInRequired",
    "account_names",
    "browser_refusal",
    "matching_account",
]

#: Claims that name the account that signed in, in the order they are shown: OpenID Connect's
#: ``email`` (only if not marked unverified) and ``preferred_username``, Entra's ``upn``.
ACCOUNT_CLAIMS: Final = ("email", "preferred_username", "upn", "unique_name")


@dataclass(frozen=True, slots=True)
class Renewal:
    """A token from a sign-in or a renewal.

    ``refresh_token`` is the one to keep from now on (``None``: keep the one used; the
    provider did not rotate it). ``identity`` is what the ID token or the UserInfo endpoint
    says about the account (claim name to value), when the provider said anything.
    """

    token: AccessToken
    refresh_token: str | None = field(default=None, repr=False)
    identity: Mapping[str, object] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        rotated = "a refresh token" if self.refresh_token else "no refresh token"
        return f"Renewal({self.token!r}, {rotated})"


@dataclass(frozen=True, slots=True)
class Pending:
    """A device sign-in the person has not finished yet; ``slow_down``: poll less often."""

    slow_down: bool = False


@dataclass(slots=True)
class DeviceAuthorization:
    """A device sign-in under way (RFC 8628 section 3.2): what to show the person, and how
    often to ask whether they are done. ``handle`` is the provider's own (the device code)."""

    user_code: str
    verification_uri: str
    #: The URI with the code in it, when the provider gives one (a QR code's content).
    verification_uri_complete: str
    #: Wall-clock time when the codes expire.
    expires_at: float
    #: Seconds between polls; grows by 5 at each ``slow_down`` (RFC 8628 section 3.5).
    interval: float
    handle: object = field(repr=False)

    def __repr__(self) -> str:
        return (
            f"DeviceAuthorization(user_code={self.user_code!r}, "
            f"verification_uri={self.verification_uri!r}, <device code redacted>)"
        )


@dataclass(frozen=True, slots=True)
class AuthorizationRequest:
    """A browser sign-in under way: the URL to open, where the answer comes back, and the
    ``state`` that answer must carry. ``handle`` is the provider's own (PKCE verifier...)."""

    url: str
    redirect_uri: str
    state: str = field(repr=False)
    handle: object = field(repr=False)
    #: The answer comes in the redirect's address (a query), so a person whose browser runs
    #: elsewhere can paste that address; not with ``response_mode=form_post``.
    in_address: bool = True

    def __repr__(self) -> str:
        return f"AuthorizationRequest(redirect_uri={self.redirect_uri!r}, <state redacted>)"


class SignInRequired(PermanentTokenError):
    """No usable sign-in for the account: nobody signed in yet, or the identity provider
    refused the refresh token (``revoked``). Logins get the temporary reply; the broker
    asks the identity provider again only once the person has signed in anew."""

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        fix: str = "",
        revoked: bool = False,
        account: str = "",
        command: str = "",
    ) -> None:
        super().__init__(message, code=code, fix=fix)
        self.revoked = revoked
        #: The account that must sign in, and the command that signs in a user (followed
        #: by the user's login name), when the token source knows them.
        self.account = account
        self.command = command

    def __copy__(self) -> SignInRequired:
        copied = SignInRequired(
            str(self),
            code=self.code,
            fix=self.fix,
            revoked=self.revoked,
            account=self.account,
            command=self.command,
        )
        copied.__cause__ = self.__cause__
        return copied


class SignInFailed(PermanentTokenError):
    """An interactive sign-in did not succeed: declined, expired, or another account."""


@runtime_checkable
class DelegatedProvider(Protocol):
    """What a provider of delegated tokens does. Errors are
    :class:`~broker.errors.BrokerError`\\ s; a refresh token the provider no longer accepts
    is :class:`SignInRequired` (``revoked``)."""

    async def refresh(self, refresh_token: str) -> Renewal:
        """A new token with ``refresh_token`` (each call asks the identity provider)."""
        ...

    async def start_device_sign_in(self) -> DeviceAuthorization:
        """Ask for a device code and a user code (RFC 8628 section 3.1)."""
        ...

    async def poll_device_sign_in(self, authorization: DeviceAuthorization) -> Renewal | Pending:
        """Ask once whether the person finished (RFC 8628 section 3.4); :class:`SignInFailed`
        if they declined or the codes expired."""
        ...

    async def authorization_request(self, redirect_uri: str) -> AuthorizationRequest:
        """A browser sign-in request with a fresh ``state`` and PKCE (RFC 7636, S256)."""
        ...

    async def redeem(self, request: AuthorizationRequest, response: Mapping[str, str]) -> Renewal:
        """Exchange the code in the redirect's parameters ``response`` (whose ``state`` the
        caller has checked) for tokens; :class:`SignInFailed` for an error answer."""
        ...

    async def identity(self, renewal: Renewal) -> Mapping[str, object]:
        """What the identity provider says about the account ``renewal`` belongs to: its
        ID token's claims, else its UserInfo (empty if it says nothing)."""
        ...

    async def expectations(self) -> Expectations:
        """What every token of the app must say (:func:`broker.claims.check_token`)."""
        ...


def account_names(claims: Mapping[str, object]) -> list[str]:
    """The names the account goes by in ``claims`` (lower case, each once): ``email``
    unless ``email_verified`` is false, ``preferred_username``, ``upn``, ``unique_name``."""
    names: list[str] = []
    for claim in ACCOUNT_CLAIMS:
        value = claims.get(claim)
        if claim == "email" and claims.get("email_verified") in (False, "false"):
            continue
        if isinstance(value, str) and value.strip():
            name = value.strip().lower()
            if name not in names:
                names.append(name)
    return names


def matching_account(claims: Mapping[str, object], expected: str) -> str | None:
    """The name in ``claims`` that is ``expected`` (ignoring case), or ``None``."""
    wanted = expected.strip().lower()
    return next((name for name in account_names(claims) if name == wanted), None)


def browser_refusal(
    where: str, response: Mapping[str, str], *, declined_fix: str, no_code_fix: str
) -> SignInFailed:
    """The error for a browser sign-in whose redirect carries no code (RFC 6749 4.1.2.1)."""
    error = response.get("error", "")
    description = response.get("error_description", "").splitlines()
    text = f": {description[0]}" if description else ""
    if error in ("access_denied", "consent_required", "interaction_required"):
        return SignInFailed(
            f"{where}: the sign-in was declined ({error}{text})", code=error, fix=declined_fix
        )
    return SignInFailed(
        f"{where}: the sign-in came back without a code ({error or 'no error code'}{text})",
        code=error or "NO_CODE",
        fix=no_code_fix,
    )
