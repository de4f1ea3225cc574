"""Broker errors: permanent (fix the configuration) or temporary (try again later)."""

from __future__ import annotations

from typing import ClassVar

__all__ = ["BrokerError", "PermanentTokenError", "TemporaryTokenError"]


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
