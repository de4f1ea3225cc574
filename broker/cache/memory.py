"""The in-process token cache: the default, and a way to keep tokens across a reload."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from broker.cache import CachedToken, CacheKey, Grant

__all__ = ["MemoryTokenCache"]


class MemoryTokenCache:
    """A dict. Share one between sources in one trio run (e.g. before and after a reload)."""

    def __init__(self) -> None:
        self._entries: dict[CacheKey, CachedToken] = {}
        self._grants: dict[CacheKey, Grant] = {}

    def __repr__(self) -> str:
        return f"MemoryTokenCache(entries={len(self._entries)})"

    async def load(self, key: CacheKey) -> CachedToken | None:
        await trio.lowlevel.checkpoint()
        return self._entries.get(key)

    async def store(self, key: CacheKey, entry: CachedToken) -> None:
        await trio.lowlevel.checkpoint()
        self._entries[key] = entry

    async def load_grant(self, key: CacheKey) -> Grant | None:
        await trio.lowlevel.checkpoint()
        return self._grants.get(key)

    async def store_grant(self, key: CacheKey, grant: Grant) -> None:
        await trio.lowlevel.checkpoint()
        self._grants[key] = grant

    @asynccontextmanager
    async def exclusive(self, key: CacheKey) -> AsyncIterator[None]:
        """Nothing to do: the source already runs one fetch per key in this process."""
        yield

    def close(self) -> None:
        """Nothing to release (entries stay, for sources still sharing this cache)."""
