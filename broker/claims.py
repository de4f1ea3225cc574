"""Reading an access token's claims: for diagnosis, and to check that a token is the one asked for.

.. warning::

   Nothing here verifies a signature or an expiry. The mail server (or Exchange Online) is the
   party that verifies tokens. What the broker does with these claims is the client's side of
   the bargain: :func:`check_token` compares what a token says -- issuer, audience, scope,
   tenant -- with what the app asked for (:class:`Expectations`), so that a token the mail
   server would refuse is never used, and the operator learns why. A token that passes is not
   thereby trusted for anything else.

A token that is not a JWT raises :class:`NotAJwtError` from :func:`decode_claims`; Google's
tokens are opaque, and Microsoft documents its tokens as opaque to clients. :func:`check_token`
then relies on the token response (its ``scope``), and fails closed for what only the token
itself could show (its audience, tenant or roles).
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

import jwt

from broker.model import GOOGLE_SCOPE

if TYPE_CHECKING:
    from collections.abc import Mapping

    from broker.model import AccessToken, App

__all__ = [
    "Expectations",
    "Mismatch",
    "NotAJwtError",
    "check_token",
    "decode_claims",
    "decode_header",
    "describe",
    "describe_opaque",
    "exchange_audience",
    "expectations_for",
    "is_tenant_id",
    "roles_of",
    "scopes_of",
    "token_roles",
]

_MISSING: Final = "(missing)"


class NotAJwtError(ValueError):
    """The token is not a decodable JWT (its text never appears in the message)."""


def decode_claims(token: str) -> dict[str, object]:
    """Return the payload of the JWT ``token`` **without verifying its signature**.

    For diagnosis only (see the module's warning). Raises :class:`NotAJwtError` when ``token``
    is not a JWT with a JSON object payload.
    """
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.DecodeError as exc:
        # PyJWT's reasons ("Not enough segments", "Invalid header padding") hold no token text.
        raise NotAJwtError(f"the access token is not a JWT: {exc}") from None
    return dict(claims)


@functools.lru_cache(maxsize=256)
def _claims_of(token: str) -> Mapping[str, object] | NotAJwtError:
    """:func:`decode_claims`, read-only and remembered: every login checks the token it
    uses, and a token serves many logins (decoding one costs more than the rest of the
    check). An error is returned, not raised, so that it is remembered too."""
    try:
        return MappingProxyType(decode_claims(token))
    except NotAJwtError as exc:
        return exc.with_traceback(None)


def decode_header(token: str) -> dict[str, object]:
    """The JOSE header of the JWT ``token`` (unverified); :class:`NotAJwtError` if none."""
    try:
        return dict(jwt.get_unverified_header(token))
    except jwt.DecodeError as exc:
        raise NotAJwtError(f"the access token is not a JWT: {exc}") from None


def token_roles(token: str) -> frozenset[str]:
    """The app roles (``roles`` claim) the unverified ``token`` carries; empty if none.

    Raises :class:`NotAJwtError` when ``token`` is not a JWT.
    """
    claims = _claims_of(token)
    if isinstance(claims, NotAJwtError):
        raise NotAJwtError(str(claims))
    return roles_of(claims)


def roles_of(claims: Mapping[str, object]) -> frozenset[str]:
    """The app roles in decoded ``claims``; empty if none."""
    roles = claims.get("roles")
    if not isinstance(roles, list):
        return frozenset()
    return frozenset(r for r in roles if isinstance(r, str))


def scopes_of(claims: Mapping[str, object]) -> frozenset[str] | None:
    """The scopes in decoded ``claims`` (``scope``, RFC 9068 and RFC 8693, a space-separated
    string; or ``scp``, a string or a list, as Okta and Entra write it); ``None`` if neither."""
    found: set[str] = set()
    present = False
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            found.update(value.split())
            present = True
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, str))
            present = True
    return frozenset(found) if present else None


def is_tenant_id(tenant: str) -> bool:
    """Is ``tenant`` a directory (tenant) ID, a GUID, rather than a domain name?"""
    try:
        uuid.UUID(tenant)
    except ValueError:
        return False
    return len(tenant) == 36


def exchange_audience(scope: str) -> str:
    """The ``aud`` Entra gives a token for ``scope``: its resource, without ``/.default``."""
    return scope.split()[0].removesuffix("/.default") if scope.strip() else ""


@dataclass(frozen=True, slots=True)
class Expectations:
    """What every token of one app must say; empty fields are not checked.

    ``provider`` chooses the wording of the fixes (Microsoft speaks of tenants and Exchange,
    Google of domain-wide delegation, others of resources and scopes).
    """

    provider: str
    #: ``iss`` must equal this (JWTs only: an opaque token names no issuer).
    issuer: str = ""
    #: ``aud`` must contain each of these; an opaque token fails (its audience is unknown).
    audiences: tuple[str, ...] = ()
    #: The granted scope must contain each of these: a JWT's ``scope``/``scp`` claim, and the
    #: token response's ``scope``.
    scopes: tuple[str, ...] = ()
    #: ``tid`` must equal this directory ID (Microsoft); an opaque token fails.
    tenant_id: str = ""


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One way a token is not what was asked for (its text is safe to log: claims are not
    secrets, and the token itself never appears)."""

    #: The claim (``aud``, ``scope``, ``iss``, ``tid``), or ``token`` for its format.
    claim: str
    #: What the token says.
    value: str
    #: What was expected.
    expected: str
    #: What the operator should do.
    fix: str

    def __str__(self) -> str:
        return f"{self.claim} is {self.value}, expected {self.expected}"


def expectations_for(app: App, *, tenant_id: str = "") -> Expectations:
    """What ``app``'s tokens must say, from its configuration alone.

    Microsoft: ``tid`` is the tenant (``tenant_id``, or the configured tenant when it is a
    GUID) and ``aud`` the resource of the scope. Google: the scope asked for. Other
    providers: ``iss`` the issuer (with discovery), ``aud`` the ``expect_audience`` (default:
    the resources asked for), scope the ``expect_scope`` (default: the scope asked for).
    """
    if app.provider == "microsoft" and app.delegated:
        # Personal accounts' tokens are not JWTs: what each protocol needs is checked in the
        # scope granted (proxy.net.session), who signed in at sign-in (broker.signin).
        return Expectations("microsoft")
    if app.provider == "microsoft":
        tenant = tenant_id or (app.tenant.lower() if is_tenant_id(app.tenant) else "")
        audience = exchange_audience(app.scope)
        return Expectations(
            "microsoft", audiences=(audience,) if audience else (), tenant_id=tenant
        )
    if app.provider == "google":
        provider = "google-delegated" if app.delegated else "google"
        return Expectations(provider, scopes=app.scopes or (GOOGLE_SCOPE,))
    audiences = app.expect_audience if app.expect_audience is not None else app.resources
    scopes = app.expect_scope if app.expect_scope is not None else app.scopes
    return Expectations(app.provider, issuer=app.issuer, audiences=audiences, scopes=scopes)


def check_token(
    expected: Expectations, token: AccessToken, *, scope_stated: bool = True
) -> list[Mismatch]:
    """How ``token`` differs from ``expected`` (empty: it is what was asked for).

    ``scope_stated``: the token response said which scope it granted (``token.scope``).
    When it did not, RFC 6749 lets a client assume the scope asked for -- but servers that
    silently drop unknown scopes say nothing either, so an opaque token whose scope is
    expected then fails (a JWT's own ``scope`` claim still decides).
    """
    decoded = _claims_of(token.value)
    claims = None if isinstance(decoded, NotAJwtError) else decoded
    fixes = _FIXES.get(expected.provider, _FIXES["oauth2"])
    found: list[Mismatch] = []
    if claims is None:
        needs = [
            name
            for name, wanted in (("aud", expected.audiences), ("tid", expected.tenant_id))
            if wanted
        ]
        if needs:
            found.append(
                Mismatch(
                    "token",
                    "opaque (not a JWT)",
                    f"a JWT whose {' and '.join(needs)} can be checked",
                    fixes["opaque"],
                )
            )
    else:
        issuer = claims.get("iss")
        if expected.issuer and issuer != expected.issuer:
            found.append(Mismatch("iss", _shown(issuer), expected.issuer, fixes["iss"]))
        tenant = claims.get("tid")
        if expected.tenant_id and (
            not isinstance(tenant, str) or tenant.lower() != expected.tenant_id.lower()
        ):
            found.append(Mismatch("tid", _shown(tenant), expected.tenant_id, fixes["tid"]))
        audience = claims.get("aud")
        have = {audience} if isinstance(audience, str) else set()
        if isinstance(audience, list):
            have = {a for a in audience if isinstance(a, str)}
        missing = [a for a in expected.audiences if _normal(a) not in {_normal(h) for h in have}]
        if missing:
            found.append(Mismatch("aud", _shown(audience), ", ".join(missing), fixes["aud"]))
    if expected.scopes:
        in_claims = scopes_of(claims) if claims is not None else None
        if claims is not None and in_claims is None:
            found.append(Mismatch("scope", "(missing)", " ".join(expected.scopes), fixes["scope"]))
        elif in_claims is not None and not set(expected.scopes) <= in_claims:
            found.append(
                Mismatch(
                    "scope",
                    " ".join(sorted(in_claims)) or "(empty)",
                    " ".join(expected.scopes),
                    fixes["scope"],
                )
            )
        elif not set(expected.scopes) <= set(token.scope.split()):
            found.append(
                Mismatch(
                    "scope", token.scope or "(empty)", " ".join(expected.scopes), fixes["scope"]
                )
            )
        elif claims is None and not scope_stated and not expected.provider.startswith("google"):
            found.append(
                Mismatch(
                    "scope",
                    "(not stated in the token response)",
                    " ".join(expected.scopes),
                    fixes["unstated"],
                )
            )
    return found


def _normal(audience: str) -> str:
    """Audiences compare without a trailing slash: Entra writes resources either way."""
    return audience.rstrip("/")


def _shown(value: object) -> str:
    return "(missing)" if value is None else _text(value)


_ENTRA_APP = "Microsoft Entra admin center > App registrations > the app"
_FIXES: Final[dict[str, dict[str, str]]] = {
    "microsoft": {
        "tid": "The token was issued by another tenant: check tenant (the directory ID or a "
        "verified domain of the tenant that holds the mailboxes) and authority.",
        "aud": "The token is for another resource: set scope to the mail server's resource "
        "with /.default, https://outlook.office365.com/.default for Exchange Online.",
        "opaque": "Entra issued a token that is not a JWT, so its tenant, audience and roles "
        "cannot be checked: set scope to an Exchange Online resource "
        "(https://outlook.office365.com/.default).",
        "iss": "Check authority and tenant.",
        "scope": f"Check the app's API permissions under {_ENTRA_APP}.",
        "unstated": "Check scope.",
    },
    "google": {
        "scope": "The token lacks the scope: in the Google Admin console, Security > Access "
        "and data control > API controls > Manage Domain Wide Delegation, authorise the "
        "service account's client ID for https://mail.google.com/, and keep scope at "
        "https://mail.google.com/.",
        "opaque": "Google's tokens are opaque; nothing but the scope can be checked.",
        "aud": "Check scope.",
        "iss": "Check the service account's token_uri.",
        "tid": "Not applicable to Google.",
        "unstated": "Check scope.",
    },
    "google-delegated": {
        "scope": "The person did not let the app use Gmail at sign-in: run authorize again "
        "and tick 'Read, compose, send and permanently delete all your email from Gmail'; "
        "keep scope at https://mail.google.com/.",
        "opaque": "Google's tokens are opaque; nothing but the scope can be checked.",
        "aud": "Check scope.",
        "iss": "Check the app's token_url.",
        "tid": "Not applicable to Google.",
        "unstated": "Check scope.",
    },
    "oauth2": {
        "iss": "The token comes from another issuer than the one configured: set issuer to "
        "the authorization server's issuer identifier exactly as its metadata and tokens "
        "write it (scheme, host, port and path; behind a reverse proxy the server must know "
        "its public host name).",
        "aud": 'The token is not for the mail server: ask for it with resource = "..." '
        "(RFC 8707), or make the mail server the client's default audience on the "
        "authorization server (Keycloak: an audience mapper; Okta, Auth0: the API's "
        "audience); expect_audience names what the mail server accepts.",
        "opaque": "The authorization server issued an opaque token, so its audience cannot "
        "be read: have it issue JWT access tokens for the mail server's resource (usually by "
        'asking with resource = "..."), or, if the mail server introspects tokens, set '
        "expect_audience = [].",
        "scope": "The token lacks a scope the mail server needs: check scope, that the "
        "authorization server knows that scope and grants it to this client (with resource "
        "indicators: that the scope belongs to that resource); expect_scope names what the "
        "mail server needs.",
        "unstated": "The token response does not say which scope was granted, and the token "
        "is opaque: servers answer so when they drop scopes they do not know. Have the "
        'server issue JWT access tokens (usually by asking with resource = "..."), or, if '
        "the mail server checks the scope itself, set expect_scope = [].",
        "tid": "Check the configuration.",
    },
}


def describe(
    claims: Mapping[str, object],
    now: float,
    *,
    header: Mapping[str, object] | None = None,
    provider: str = "",
) -> list[tuple[str, str]]:
    """Label/value pairs an operator needs: what the token says, for its kind.

    Issuer, subject, audience, scope, roles, the client (``client_id``, ``azp`` or
    ``appid``, whichever it has), tenant, header ``typ``, expiry and time left. Claims the
    token lacks are left out, except that Microsoft tokens (``provider``) always show roles
    and tenant, whose absence explains a refused login. ``now`` is the wall-clock time in
    seconds since the epoch.
    """
    rows: list[tuple[str, str]] = []
    microsoft = provider == "microsoft"

    def row(label: str, value: object, *, always: bool = False) -> None:
        if value is not None or always:
            rows.append((label, _shown(value)))

    row("iss", claims.get("iss"))
    row("sub", claims.get("sub"))
    row("aud", claims.get("aud"), always=True)
    scopes = scopes_of(claims)
    if scopes is not None or not microsoft:
        label = "scp" if "scp" in claims and "scope" not in claims else "scope"
        rows.append((label, " ".join(sorted(scopes)) if scopes else "(none)"))
    roles = claims.get("roles")
    if isinstance(roles, list) and roles:
        rows.append(("roles", ", ".join(str(r) for r in roles)))
    elif microsoft:
        rows.append(
            (
                "roles",
                "(none: the app has no application permissions consented)"
                if roles is None
                else "(none)",
            )
        )
    elif roles is not None:
        rows.append(("roles", "(none)"))
    for name in ("client_id", "azp", "appid"):
        if name in claims:
            row(name, claims.get(name))
    row("tid", claims.get("tid"), always=microsoft)
    if header is not None:
        row("typ", header.get("typ"), always=True)
    exp = claims.get("exp")
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        stamp = datetime.fromtimestamp(exp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        rows.append(("exp", f"{stamp} ({int(exp)})"))
        rows.append(("expires in", _left(exp - now)))
    else:
        rows.append(("exp", _MISSING))
        rows.append(("expires in", "unknown"))
    return rows


def describe_opaque(token: AccessToken, now: float) -> list[tuple[str, str]]:
    """What is known of an opaque token: the token response's scope and expiry."""
    stamp = datetime.fromtimestamp(token.expires_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return [
        ("format", "opaque (not a JWT): only the token response's scope and expiry are known"),
        ("scope", token.scope or "(none)"),
        ("exp", f"{stamp} ({int(token.expires_at)})"),
        ("expires in", _left(token.expires_at - now)),
    ]


def _text(value: object) -> str:
    if value is None:
        return _MISSING
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def _left(seconds: float) -> str:
    if seconds <= 0:
        return f"expired {_duration(-seconds)} ago"
    return _duration(seconds)


def _duration(seconds: float) -> str:
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"
