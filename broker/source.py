"""The ``TokenSource`` interface the proxy depends on."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from broker.model import AccessToken

__all__ = ["TokenSource"]


class TokenSource(Protocol):
    async def token(self, app: str, *, mailbox: str | None = None) -> AccessToken:
        """Return a valid token for ``app`` (and ``mailbox`` where tokens are per mailbox).

        Raises :class:`~broker.errors.PermanentTokenError` or
        :class:`~broker.errors.TemporaryTokenError`; ``KeyError`` for an unknown app.
        """
        ...
