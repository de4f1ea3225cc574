"""Google Workspace: service-account tokens with domain-wide delegation, one per mailbox.

Gmail's IMAP, POP and SMTP accept XOAUTH2 tokens with the scope ``https://mail.google.com/``.
A service account gets one *for a mailbox* with the JWT bearer grant (RFC 7523 section 2.1):
it signs a JWT with its key -- ``iss`` its e-mail address, ``sub`` the mailbox, ``scope``,
``aud`` the token URI, valid for at most an hour -- built with authlib's
:meth:`~authlib.oauth2.rfc7523.JWTBearerGrant.sign`, and posts it to the token URI. A Workspace
super administrator must have authorised the service account's client ID for that scope
(domain-wide delegation). Because each token names one mailbox, this is a
:class:`~broker.source.MailboxProvider`: the cache keeps one token per mailbox.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

from authlib.oauth2.rfc7523 import JWTBearerGrant  # type: ignore[import-untyped]

from broker.claims import check_token, expectations_for
from broker.errors import BrokerError, PermanentTokenError, TemporaryTokenError, token_mismatch
from broker.providers._http import CONNECT_TIMEOUT, IO_TIMEOUT, OAuthError, TokenEndpoint
from broker.providers._keys import load_signing_key

if TYPE_CHECKING:
    from broker.model import AccessToken, App

__all__ = ["GoogleProvider"]

GRANT_TYPE: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: Google accepts assertions valid for at most an hour.
ASSERTION_LIFETIME: Final = 3600

_DELEGATION_FIX: Final = (
    "In the Google Admin console, Security > Access and data control > API controls > "
    "Manage Domain Wide Delegation, add the service account's numeric client ID (not its "
    "e-mail address) with the scope https://mail.google.com/ (changes can take minutes "
    "to apply)."
)


class GoogleProvider:
    """Per-mailbox tokens for one service account (``App.client_id`` is its e-mail address).

    Construction parses the key (``ValueError``); no I/O.
    """

    def __init__(
        self,
        app: App,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        io_timeout: float = IO_TIMEOUT,
    ) -> None:
        if app.provider != "google":
            raise ValueError(f"app {app.name!r}: provider is {app.provider!r}, not 'google'")
        if app.private_key is None:
            raise ValueError(f"app {app.name!r}: a service account key is required")
        if not app.token_url or not app.client_id:
            raise ValueError(f"app {app.name!r}: the service account needs token_uri and e-mail")
        self._app = app
        self._key = load_signing_key(app, app.private_key, "the service account key")
        self._expected = expectations_for(app)
        self._endpoint = TokenEndpoint(
            app.token_url,
            where=f"app {app.name!r} (service account {app.client_id})",
            ca_file=app.ca_file,
            secrets=(app.private_key.reveal(),),
            classify=self._classify,
            connect_timeout=connect_timeout,
            io_timeout=io_timeout,
        )

    def __repr__(self) -> str:
        return f"GoogleProvider(app={self._app.name!r}, service_account={self._app.client_id!r})"

    async def fetch_for(self, mailbox: str) -> AccessToken:
        app = self._app
        now = int(time.time())
        header = {"alg": self._key.algorithm, "typ": "JWT"}
        if app.key_id:
            header["kid"] = app.key_id
        assertion = JWTBearerGrant.sign(
            self._key.key,
            issuer=app.client_id,
            audience=app.token_url,
            subject=mailbox,
            issued_at=now,
            expires_at=now + ASSERTION_LIFETIME,
            claims={"scope": app.scope},
            header=header,
        )
        try:
            response = await self._endpoint.request(
                {"grant_type": GRANT_TYPE, "assertion": str(assertion)}, scope=app.scope
            )
        except BrokerError as exc:
            if exc.code == "MAILBOX":
                # The same refusal for every mailbox would be a setup problem; name this one.
                raise type(exc)(f"{exc} (mailbox {mailbox})", code=exc.code, fix=exc.fix) from None
            raise
        token = response.token
        problems = check_token(self._expected, token, scope_stated=response.scope_stated)
        if problems:
            raise token_mismatch(f"app {app.name!r} (service account {app.client_id})", problems)
        return token

    def _classify(self, error: OAuthError) -> BrokerError | None:
        where = f"app {self._app.name!r} (service account {self._app.client_id})"
        text = error.description.splitlines()[0] if error.description else error.error
        message = f"{where}: Google refused the token request: {error.error}: {text}"
        lowered = error.description.lower()
        if error.error in ("temporarily_unavailable", "internal_failure"):
            return TemporaryTokenError(message, code=error.error, fix="Nothing to change.")
        if error.error == "unauthorized_client":
            return PermanentTokenError(message, code=error.error, fix=_DELEGATION_FIX)
        if error.error == "invalid_grant" and ("invalid email" in lowered or "user id" in lowered):
            return PermanentTokenError(
                message,
                code="MAILBOX",
                fix="The mailbox is not a user of the Workspace domain (or is suspended): "
                "check the user's mailbox setting.",
            )
        if error.error == "invalid_grant" and "signature" in lowered:
            return PermanentTokenError(
                message,
                code=error.error,
                fix="The service account key was deleted or disabled: create a new key under "
                "IAM & Admin > Service accounts > Keys and replace the JSON file.",
            )
        if error.error == "invalid_grant" and ("timeframe" in lowered or "iat" in lowered):
            return PermanentTokenError(
                message,
                code=error.error,
                fix="This machine's clock is wrong: synchronise it (NTP).",
            )
        if error.error in ("invalid_client", "disabled_client"):
            return PermanentTokenError(
                message,
                code=error.error,
                fix="The service account does not exist or is disabled: check the JSON file "
                "and the account in the Google Cloud console.",
            )
        if error.error == "invalid_scope":
            return PermanentTokenError(message, code=error.error, fix=_DELEGATION_FIX)
        return None
