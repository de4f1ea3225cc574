"""Identity-provider adapters: each turns an :class:`~broker.model.App` into tokens.

Provider modules import their libraries (msal, authlib, httpx) only when an app needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.delegated import DelegatedProvider
    from broker.model import App
    from broker.source import MailboxProvider, Provider

__all__ = ["PROVIDERS", "build_provider"]

#: The ``provider`` values an app may have.
PROVIDERS = ("microsoft", "google", "oauth2")


def build_provider(app: App) -> Provider | MailboxProvider | DelegatedProvider:
    """The provider adapter for ``app.provider`` (``ValueError`` if unknown or misconfigured)."""
    if app.delegated and app.provider == "microsoft":
        from broker.providers.microsoft_delegated import MicrosoftDelegatedProvider

        return MicrosoftDelegatedProvider(app)
    if app.delegated and app.provider in ("google", "oauth2"):
        from broker.providers.delegated_oauth2 import DelegatedOAuth2Provider

        return DelegatedOAuth2Provider(app)
    if app.provider == "microsoft":
        from broker.providers.microsoft import MicrosoftProvider

        return MicrosoftProvider(app)
    if app.provider == "google":
        from broker.providers.google import GoogleProvider

        return GoogleProvider(app)
    if app.provider == "oauth2":
        from broker.providers.oauth2 import OAuth2Provider

        return OAuth2Provider(app)
    raise ValueError(
        f"app {app.name!r}: unknown provider {app.provider!r} (known: {', '.join(PROVIDERS)})"
    )
