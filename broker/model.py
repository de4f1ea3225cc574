"""Value types of the broker. Anything holding a secret redacts it in ``repr``/``str``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "AUTH_METHODS",
    "DEFAULT_AUTHORITY",
    "DEFAULT_REDIRECT_URI",
    "DEFAULT_SCOPE",
    "DELEGATED_SCOPE",
    "GOOGLE_AUTHORIZATION_URL",
    "GOOGLE_SCOPE",
    "GOOGLE_TOKEN_URL",
    "GOOGLE_USERINFO_URL",
    "PUBLIC_CLIENT",
    "AccessToken",
    "App",
    "Secret",
]

DEFAULT_AUTHORITY: Final = "https://login.microsoftonline.com"
DEFAULT_SCOPE: Final = "https://outlook.office365.com/.default"
#: Full IMAP/POP3/SMTP access to Gmail, the scope XOAUTH2 needs.
GOOGLE_SCOPE: Final = "https://mail.google.com/"
GOOGLE_TOKEN_URL: Final = "https://oauth2.googleapis.com/token"
#: Google's endpoints for a person's sign-in (OAuth clients of type "Desktop app").
GOOGLE_AUTHORIZATION_URL: Final = "https://accounts.google.com/o/oauth2/v2/auth"
GOOGLE_USERINFO_URL: Final = "https://openidconnect.googleapis.com/v1/userinfo"
#: What a Microsoft delegated app asks for by default: IMAP, POP3 and SMTP as the person who
#: signed in (``offline_access``, for a refresh token, is always added).
DELEGATED_SCOPE: Final = (
    "https://outlook.office.com/IMAP.AccessAsUser.All "
    "https://outlook.office.com/POP.AccessAsUser.All "
    "https://outlook.office.com/SMTP.Send"
)
#: Where the browser sign-in sends its answer: this host's loopback, on a port chosen then
#: (RFC 8252 section 7.3).
DEFAULT_REDIRECT_URI: Final = "http://127.0.0.1"
#: How an ``oauth2`` client authenticates (RFC 6749 2.3.1, RFC 7523 2.2, OpenID Connect
#: Core 9, RFC 8705 2).
AUTH_METHODS: Final = (
    "client_secret_basic",
    "client_secret_post",
    "client_secret_jwt",
    "private_key_jwt",
    "tls_client_auth",
    "self_signed_tls_client_auth",
)
#: A public client (RFC 6749 2.1) authenticates with nothing but its ID: only people sign in
#: to it (delegated apps; PKCE protects the browser sign-in).
PUBLIC_CLIENT: Final = "none"


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret string (client secret, private key PEM, password). ``reveal()`` to use it."""

    _value: str = field(repr=False)
    #: Where it came from, for messages: ``env CONTOSO_SECRET``, ``file /run/...``.
    origin: str = "inline"

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret(<redacted>, origin={self.origin!r})"

    def __str__(self) -> str:
        return "<redacted>"


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A bearer token and when it expires (seconds since the epoch, wall clock)."""

    value: str = field(repr=False)
    expires_at: float
    scope: str = ""

    def remaining(self, now: float) -> float:
        return self.expires_at - now

    def __repr__(self) -> str:
        return f"AccessToken(<redacted>, expires_at={self.expires_at!r}, scope={self.scope!r})"

    def __str__(self) -> str:
        return "<redacted>"


@dataclass(frozen=True, slots=True)
class App:
    """One OAuth client: an Entra app registration, a Google service account, or a client of
    any OAuth 2.0 authorization server (``provider`` = ``microsoft``, ``google``, ``oauth2``).

    For a Google service account, ``client_id`` is its e-mail address, ``private_key`` its
    key, ``key_id`` the key's ID and ``token_url`` its ``token_uri``. A ``delegated`` app is
    a client people sign in to (a Google "Desktop app" client, a public or confidential
    Entra app, any OAuth 2.0 client), whose tokens are theirs.
    """

    name: str
    provider: str
    client_id: str
    tenant: str = ""
    client_secret: Secret | None = None
    #: PEM holding the private key and the certificate, for certificate credentials.
    certificate: Secret | None = None
    authority: str = DEFAULT_AUTHORITY
    scope: str = DEFAULT_SCOPE
    #: Extra trust anchors for the identity provider's TLS certificate.
    ca_file: Path | None = None
    #: Token endpoint (``google``, ``oauth2``; Microsoft's comes from ``authority``).
    token_url: str = ""
    #: ``oauth2``: one of :data:`AUTH_METHODS`.
    auth_method: str = ""
    #: PEM private key signing JWT assertions (``google``; ``oauth2`` private_key_jwt).
    private_key: Secret | None = None
    #: ``kid`` header of those assertions, if the server wants one.
    key_id: str = ""
    #: ``oauth2``: the authorization server's issuer identifier. Its metadata (RFC 8414, or
    #: OpenID Connect Discovery) names the token endpoint, and tokens must come from it.
    issuer: str = ""
    #: ``oauth2``: RFC 8707 resource indicators asked for (the tokens' audiences).
    resources: tuple[str, ...] = ()
    #: ``oauth2`` client assertions' ``aud``: ``issuer``, ``token_endpoint`` or a literal
    #: value; empty: the issuer with discovery, else the token endpoint.
    assertion_audience: str = ""
    #: ``oauth2``: audiences every token must have (``None``: the resources asked for).
    expect_audience: tuple[str, ...] | None = None
    #: ``oauth2``: scopes every token must have (``None``: the scopes asked for).
    expect_scope: tuple[str, ...] | None = None
    #: ``oauth2`` tls_client_auth / self_signed_tls_client_auth: PEM key and certificate.
    client_certificate: Secret | None = None
    #: Tokens belong to one person each, who signs in once (``xoauth2-proxy authorize``);
    #: renewed with that sign-in's refresh token. Otherwise: app-only tokens.
    delegated: bool = False
    #: Delegated ``google``/``oauth2``: where the browser sign-in starts (RFC 6749 3.1),
    #: where the device sign-in starts (RFC 8628 3.1), and who the token belongs to (OpenID
    #: Connect UserInfo); from the issuer's metadata when empty.
    authorization_url: str = ""
    device_authorization_url: str = ""
    userinfo_url: str = ""
    #: Delegated apps: the loopback redirect URI registered for the browser sign-in (a port
    #: is added when it names none).
    redirect_uri: str = DEFAULT_REDIRECT_URI

    @property
    def scopes(self) -> tuple[str, ...]:
        """The scope asked for, as a tuple of scope tokens."""
        return tuple(self.scope.split())
