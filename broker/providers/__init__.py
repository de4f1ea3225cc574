"""Identity-provider adapters: each turns an :class:`~broker.model.App` into tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.providers.microsoft import MicrosoftProvider

if TYPE_CHECKING:
    from broker.model import App
    from broker.source import Provider

__all__ = ["MicrosoftProvider", "build_provider"]


def build_provider(app: App) -> Provider:
    """The provider adapter for ``app.provider`` (``ValueError`` if unknown or misconfigured)."""
    if app.provider == "microsoft":
        return MicrosoftProvider(app)
    raise ValueError(f"app {app.name!r}: unknown provider {app.provider!r} (known: microsoft)")
