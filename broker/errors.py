"""Broker errors: permanent (fix the configuration) or temporary (try again later)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from collections.abc import Sequence

    from broker.claims import Mismatch

__all__ = ["BrokerError", "PermanentTokenError", "TemporaryTokenError", "token_mismatch"]


class BrokerError(Exception):
    """No token could be obtained. ``str()`` is safe to log: it never holds a secret."""

    #: ``permanent`` or ``temporary``, as the subclasses say, for logs and reports.
    kind: ClassVar[str] = "unclassified"

    def __init__(self, message: str, *, code: str | None = None, fix: str = "") -> None:
        super().__init__(message)
        #: The provider's error code, e.g. ``AADSTS7000215``.
        self.code = code
        #: What an operator should do about it.
        self.fix = fix


class PermanentTokenError(BrokerError):
    """Retrying will not help until someone changes the configuration or the tenant."""

    kind = "permanent"


class TemporaryTokenError(BrokerError):
    """The provider is unreachable, slow, failing or throttling; retry later."""

    kind = "temporary"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        fix: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, code=code, fix=fix)
        #: Seconds the provider asked us to wait (HTTP Retry-After), if it said.
        self.retry_after = retry_after


def token_mismatch(where: str, problems: Sequence[Mismatch]) -> PermanentTokenError:
    """The error for a token that is not what was asked for: each claim, its value, what was
    expected, and the fixes (the token is never used)."""
    what = "; ".join(str(p) for p in problems)
    fixes = " ".join(dict.fromkeys(p.fix for p in problems))
    return PermanentTokenError(
        f"{where}: the identity provider issued a token the mail server would refuse: {what}",
        code="TOKEN_" + "_".join(p.claim.upper() for p in problems),
        fix=fixes,
    )
