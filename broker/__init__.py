"""The token broker: obtains, caches and refreshes OAuth 2.0 access tokens.

Building the configured source (the server and the CLI do this)::

    source = build_source(config.apps, config.cache)   # owns its cache
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run)                  # background refresh
        ...                                              # serve; source.token(app, mailbox=...)
    source.close()

To keep tokens across a configuration reload, open the cache once with
:func:`broker.cache.open_cache` and pass it to each new source (``cache=``); the caller then
closes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from broker.cache import CacheSettings, TokenCache
    from broker.model import App
    from broker.source import CachingTokenSource

__all__ = ["build_source"]


def build_source(
    apps: Mapping[str, App],
    settings: CacheSettings | None = None,
    *,
    cache: TokenCache | None = None,
    on_fetch: Callable[[str, str], None] | None = None,
    grants: TokenCache | None = None,
    accounts: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    authorize_command: str = "xoauth2-proxy authorize",
) -> CachingTokenSource:
    """A :class:`~broker.source.CachingTokenSource` for ``apps`` with the configured cache.

    ``cache``, if given, is used instead of opening one from ``settings``, and is not closed
    by the source; so is ``grants``, where delegated apps' sign-ins are kept (default: the
    cache). ``accounts`` and ``authorize_command``: see the source. ``on_fetch`` is told
    ``(app, outcome)`` after every fetch (metrics). ``ValueError`` (with a message for the
    operator) if an app or the cache cannot be set up. No I/O happens here, and nothing
    runs until :meth:`~broker.source.CachingTokenSource.run` is started.
    """
    # Imported here: importing ``broker`` (e.g. for broker.model) stays light.
    from broker.cache import CacheSettings, open_cache
    from broker.source import CachingTokenSource

    opened = cache if cache is not None else open_cache(settings or CacheSettings())
    try:
        return CachingTokenSource(
            apps,
            cache=opened,
            close_cache=cache is None,
            grants=grants,
            accounts=accounts,
            authorize_command=authorize_command,
            on_fetch=on_fetch,
        )
    except BaseException:
        if cache is None:
            opened.close()
        raise
