"""Reading an access token's claims, for diagnosis only.

.. warning::

   Nothing here verifies a signature, an issuer, an audience or an expiry. The mail server (or
   Exchange Online) is the party that verifies tokens; these helpers only let an operator *see*
   what a token says -- which roles it carries, for which audience and tenant, until when -- to
   explain why a login is refused. Never make an access decision from these claims.

Microsoft documents access tokens as opaque to clients and may change their format; a token that
is not a JWT raises :class:`NotAJwtError`, and callers should say so rather than fail.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

import jwt

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["NotAJwtError", "decode_claims", "describe", "roles_of", "token_roles"]

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


def token_roles(token: str) -> frozenset[str]:
    """The app roles (``roles`` claim) the unverified ``token`` carries; empty if none."""
    return roles_of(decode_claims(token))


def roles_of(claims: Mapping[str, object]) -> frozenset[str]:
    """The app roles in decoded ``claims``; empty if none."""
    roles = claims.get("roles")
    if not isinstance(roles, list):
        return frozenset()
    return frozenset(r for r in roles if isinstance(r, str))


def describe(claims: Mapping[str, object], now: float) -> list[tuple[str, str]]:
    """Label/value pairs an operator needs: roles, aud, tid, appid, exp and time left.

    ``now`` is the current wall-clock time in seconds since the epoch.
    """
    roles = claims.get("roles")
    if isinstance(roles, list) and roles:
        roles_text = ", ".join(str(r) for r in roles)
    elif roles is None:
        roles_text = "(none: the app has no application permissions consented)"
    else:
        roles_text = "(none)"
    rows = [
        ("roles", roles_text),
        ("aud", _text(claims.get("aud"))),
        ("tid", _text(claims.get("tid"))),
        ("appid", _text(claims.get("appid", claims.get("azp")))),
    ]
    exp = claims.get("exp")
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        stamp = datetime.fromtimestamp(exp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        rows.append(("exp", f"{stamp} ({int(exp)})"))
        rows.append(("expires in", _left(exp - now)))
    else:
        rows.append(("exp", _MISSING))
        rows.append(("expires in", "unknown"))
    return rows


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
