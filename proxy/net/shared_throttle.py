"""Failed-login counts in Redis, shared by every instance (see :mod:`proxy.throttle`).

Each key of the throttle (a login, a source network, a pair) is a sorted set of failure
times (wall-clock seconds) under ``PREFIX:throttle:<HMAC>``, and each trusted pair a plain
key ``PREFIX:trust:<HMAC>`` with an expiry. The HMAC is keyed with the cache key every
instance shares, so Redis holds neither login names nor addresses. A failure is one atomic
transaction per key: add the time, drop times older than the window and beyond the newest
``keep``, and let the key expire with the window, so nothing is left behind.

Redis is reached with the same client settings as the token cache (TLS, password), through
worker threads (redis-py's asyncio client does not run under trio). After a failure the
store is not asked again for ``retry_after`` seconds, so an unreachable Redis costs logins
one socket timeout, not one each.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from typing import TYPE_CHECKING, Final, TypeVar

import redis
import redis.exceptions
import trio

from broker.cache.redis import connect, redact
from broker.cache.sealing import parse_key
from proxy.throttle import SharedUnavailable

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from broker.cache import CacheSettings

__all__ = ["RedisFailures"]

T = TypeVar("T")

#: Seconds the store is left alone after it failed to answer.
RETRY_AFTER: Final = 10.0


class RedisFailures:
    """A :class:`~proxy.throttle.SharedFailures` store in Redis."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        secret: bytes,
        prefix: str = "xoauth2-proxy",
        where: str = "redis",
        retry_after: float = RETRY_AFTER,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._client = client
        self._secret = secret
        self._prefix = prefix
        self._where = where
        self._retry_after = retry_after
        self._clock = clock
        self._down_until = -math.inf

    @classmethod
    def from_settings(cls, settings: CacheSettings) -> RedisFailures:
        """The store of a ``[cache] kind = "redis"`` configuration."""
        if settings.key is None:
            raise ValueError("a redis cache needs key")
        client = connect(settings.url, password=settings.password, ca_file=settings.ca_file)
        return cls(
            client,
            secret=parse_key(settings.key),
            prefix=settings.prefix,
            where=redact(settings.url),
        )

    def __repr__(self) -> str:
        return f"RedisFailures({self._where!r}, prefix={self._prefix!r})"

    def close(self) -> None:
        self._client.close()

    def _name(self, kind: str, key: str) -> str:
        digest = hmac.new(self._secret, key.encode(), hashlib.sha256).hexdigest()
        return f"{self._prefix}:{kind}:{digest}"

    async def counts(self, keys: Sequence[str], since: float) -> list[int]:
        """Failures under each of ``keys`` after ``since``."""
        names = [self._name("throttle", key) for key in keys]

        def read() -> list[int]:
            pipe = self._client.pipeline(transaction=False)
            for name in names:
                pipe.zcount(name, f"({since!r}", "+inf")  # as in memory: older is out
            return [int(n) for n in pipe.execute()]

        result: list[int] = await self._call(read)
        return result

    async def is_trusted(self, pair: str) -> bool:
        name = self._name("trust", pair)
        found: int = await self._call(lambda: int(self._client.exists(name)))
        return found > 0

    async def record(self, keys: Sequence[tuple[str, int]], now: float, window: float) -> None:
        entries = [(self._name("throttle", key), keep) for key, keep in keys]
        member = f"{now!r}:{secrets.token_hex(4)}"

        def write() -> None:
            pipe = self._client.pipeline(transaction=True)
            for name, keep in entries:
                pipe.zadd(name, {member: now})
                pipe.zremrangebyscore(name, "-inf", f"({now - window!r}")
                pipe.zremrangebyrank(name, 0, -keep - 1)
                pipe.expire(name, math.ceil(window) + 1)
            pipe.execute()

        await self._call(write)

    async def trust(self, pair: str, ttl: float) -> None:
        name = self._name("trust", pair)
        await self._call(lambda: self._client.set(name, b"1", ex=max(1, math.ceil(ttl))))

    async def forget(self, keys: Sequence[str]) -> None:
        names = [self._name("throttle", key) for key in keys]
        await self._call(lambda: self._client.delete(*names))

    async def _call(self, command: Callable[[], T]) -> T:
        if self._clock() < self._down_until:
            await trio.lowlevel.checkpoint()
            raise SharedUnavailable(f"redis {self._where} failed recently; not asked again yet")
        try:
            return await trio.to_thread.run_sync(command, abandon_on_cancel=True)
        except redis.exceptions.RedisError as exc:
            self._down_until = self._clock() + self._retry_after
            raise SharedUnavailable(f"redis {self._where}: {type(exc).__name__}: {exc}") from None
