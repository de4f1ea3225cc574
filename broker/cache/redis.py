"""A token cache in Redis, shared by several proxy instances, with a distributed lock.

Theory of operation
-------------------
**Values.** Each token is stored under ``PREFIX:token:<sha256 of the key>`` -- so Redis shows
neither app nor mailbox names -- sealed with AES-256-GCM (:mod:`broker.cache.sealing`) with the
Redis key name as associated data, so a value moved to another key does not decrypt. Values
expire in Redis when the token does. Anyone who can read Redis but lacks the key learns
nothing but how many tokens there are.

**Sign-ins** of delegated apps (:class:`~broker.cache.Grant`) live under
``PREFIX:grant:<sha256 of the key>``, sealed the same way, without expiry. Each is one Redis
value that ``SET`` replaces at once, and they are renewed under the same lock as tokens, so
only one instance at a time uses a refresh token that the identity provider may rotate.

**One identity-provider request across all instances.** Each instance already runs at most
one fetch per key (:class:`~broker.source.CachingTokenSource`). That fetch runs inside
:meth:`RedisTokenCache.exclusive`, a lock on ``PREFIX:lock:<sha256>`` taken with ``SET NX PX``
(redis-py's :class:`redis.lock.Lock`, whose release and renewal are atomic Lua scripts that
only act while the lock still holds our random token). Whoever gets the lock reads the value
again, asks the IdP only if it is still stale, and stores the new token before releasing; the
others poll for the lock and then find that token. The lock expires ``lock_timeout`` seconds
after its holder last renewed it; a holder renews it every third of that while it works, so a
slow IdP does not let a second instance in, while a crashed instance blocks the others for at
most ``lock_timeout``. A lock that was written without expiry (by another program, or in a
crash at a bad moment) would stop every token for ever: a waiter gives up on such a lock
after ``lock_timeout``, logs it and asks the IdP without the lock.

**Availability first.** If Redis is unreachable, :meth:`load` and :meth:`store` raise
:class:`~broker.cache.CacheError` (the source logs it and carries on with its own memory) and
:meth:`exclusive` proceeds without the lock: every instance then asks the IdP itself, which
is what they would do without Redis.

**Why the synchronous client in threads.** redis-py's asyncio client needs an asyncio event
loop and does not run under trio. The cache is touched only when a token is missing or due
for renewal -- a few times per token lifetime per key, never on the hot login path, which the
source serves from memory -- so a worker-thread hop per command costs nothing that matters,
and we keep redis-py's URL parsing, AUTH, TLS and reconnection instead of a RESP client of
our own. redis-py's connection pool is thread-safe; socket timeouts bound every command, so
a cancelled caller may abandon its thread safely -- except a lock attempt, whose ``SET NX``
may succeed after its caller has gone: the attempt and its caller agree, under a mutex, which
of them releases that lock, so it never lingers until ``lock_timeout``.

**TLS.** ``rediss://`` checks the server's certificate against the system store (plus
``ca_file``) and that it names the host in the URL, whatever redis-py's defaults.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final

import redis
import redis.exceptions
import trio
from redis.lock import Lock

from broker.cache import CachedToken, CacheError, Grant
from broker.cache.sealing import Sealer, SealError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from broker.cache import CacheKey
    from broker.model import Secret

__all__ = ["RedisTokenCache", "connect", "redact"]

log = logging.getLogger("xoauth2_proxy.broker.cache")

#: Seconds to connect to Redis and to wait for any answer.
SOCKET_TIMEOUT: Final = 5.0
#: How often a waiting instance tries the lock: first, and at most.
POLL_FIRST: Final = 0.02
POLL_MAX: Final = 0.25


class RedisTokenCache:
    """Tokens in Redis at ``url``, sealed with ``key``. Connects lazily."""

    def __init__(
        self,
        url: str,
        key: Secret,
        *,
        password: Secret | None = None,
        prefix: str = "xoauth2-proxy",
        lock_timeout: float = 15.0,
        ca_file: Path | None = None,
    ) -> None:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis url must start with redis://, rediss:// or unix://: {url!r}")
        if lock_timeout <= 0:
            raise ValueError("lock_timeout must be positive")
        self._sealer = Sealer(key)
        self._prefix = prefix
        self._lock_timeout = lock_timeout
        self._where = redact(url)
        self._client = connect(url, password=password, ca_file=ca_file)

    def __repr__(self) -> str:
        return f"RedisTokenCache({self._where!r}, prefix={self._prefix!r})"

    def close(self) -> None:
        self._client.close()

    def _name(self, kind: str, key: CacheKey) -> str:
        return f"{self._prefix}:{kind}:{key.digest}"

    async def load(self, key: CacheKey) -> CachedToken | None:
        name = self._name("token", key)
        data = await self._opened(name)
        try:
            return None if data is None else CachedToken.from_json(data)
        except ValueError:
            raise CacheError(f"redis {self._where}: the value of {name} is damaged") from None

    async def store(self, key: CacheKey, entry: CachedToken) -> None:
        name = self._name("token", key)
        sealed = self._sealer.seal(entry.to_json(), name.encode("utf-8"))
        expires_ms = math.ceil(entry.token.expires_at * 1000)
        await self._call(lambda: self._client.set(name, sealed, pxat=expires_ms))

    async def load_grant(self, key: CacheKey) -> Grant | None:
        name = self._name("grant", key)
        data = await self._opened(name)
        try:
            return None if data is None else Grant.from_json(data)
        except ValueError:
            raise CacheError(f"redis {self._where}: the value of {name} is damaged") from None

    async def _opened(self, name: str) -> bytes | None:
        """The plaintext of the value at ``name``, or ``None`` if there is none."""
        raw = await self._call(lambda: self._client.get(name))
        if raw is None:
            return None
        if not isinstance(raw, bytes):
            raise CacheError(f"redis {self._where}: {name} is not a string value")
        try:
            return self._sealer.open(raw, name.encode("utf-8"))
        except SealError as exc:
            raise CacheError(
                f"redis {self._where}: the value of {name} {exc}; do all instances "
                "share the same cache key?"
            ) from None

    async def store_grant(self, key: CacheKey, grant: Grant) -> None:
        name = self._name("grant", key)
        sealed = self._sealer.seal(grant.to_json(), name.encode("utf-8"))
        await self._call(lambda: self._client.set(name, sealed))

    @asynccontextmanager
    async def exclusive(self, key: CacheKey) -> AsyncIterator[None]:
        lock = Lock(
            self._client,
            self._name("lock", key),
            timeout=self._lock_timeout,
            blocking=False,
            thread_local=False,  # acquire, renew and release run in different threads
        )
        try:
            acquired = await self._acquire(lock)
        except CacheError as exc:
            log.warning("%s; asking the identity provider without the shared lock", exc)
            yield
            return
        if not acquired:
            log.warning(
                "redis %s: the token lock %s has no expiry and was not released within "
                "lock_timeout (%gs): nobody will release it; asking the identity provider "
                "without it (delete the key to let the instances share requests again)",
                self._where,
                lock.name,
                self._lock_timeout,
            )
            yield
            return
        # The body's exception is caught and re-raised outside the nursery, so that it
        # reaches the caller as itself and not wrapped in an ExceptionGroup.
        failure: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep, lock)
                try:
                    yield
                except BaseException as exc:
                    failure = exc
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(SOCKET_TIMEOUT),
                contextlib.suppress(redis.exceptions.RedisError),  # it expires on its own
            ):
                await trio.to_thread.run_sync(lock.release)
        if failure is not None:
            raise failure

    async def _acquire(self, lock: Lock) -> bool:
        """Wait for the lock; ``False`` if it is stuck.

        A holder renews the lock while it works (its fetch has a deadline of its own), and
        a crashed holder's lock expires: either way the lock frees up. A lock without
        expiry, written by another program or in a crash at a bad moment, never does: after
        ``lock_timeout`` of waiting for one, give up on it.
        """
        pause = POLL_FIRST
        started = trio.current_time()
        name = str(lock.name)
        while not await self._try_acquire(lock):
            waited = trio.current_time() - started
            if (
                waited >= self._lock_timeout
                and await self._call(lambda: self._client.pttl(name)) == -1
            ):
                return False
            await trio.sleep(pause)
            pause = min(pause * 2, POLL_MAX)
        return True

    async def _try_acquire(self, lock: Lock) -> bool:
        """One ``SET NX`` attempt in a worker thread that a cancelled caller abandons.

        The abandoned ``SET NX`` may still succeed after the caller has gone: then nobody
        would renew or release the lock, and the other instances would wait ``lock_timeout``
        for it. So the caller and the thread agree, under a mutex, on who releases it: the
        thread if it finishes after the caller gave up, the caller (shielded, time-limited)
        if the thread had already taken the lock when the cancellation came.
        """
        mutex = threading.Lock()
        abandoned = False
        acquired = False

        def attempt() -> bool:
            nonlocal acquired
            taken = bool(lock.acquire(blocking=False))
            with mutex:
                if not abandoned:
                    acquired = taken
                    return taken
            if taken:
                with contextlib.suppress(redis.exceptions.RedisError):  # it expires anyway
                    lock.release()
            return False

        try:
            return bool(await self._call(attempt))
        except trio.Cancelled:
            with mutex:
                abandoned = True
                taken = acquired
            if taken:
                with (
                    trio.CancelScope(shield=True),
                    trio.move_on_after(SOCKET_TIMEOUT),
                    contextlib.suppress(redis.exceptions.RedisError),  # LockNotOwnedError too
                ):
                    await trio.to_thread.run_sync(lock.release, abandon_on_cancel=True)
            raise

    async def _keep(self, lock: Lock) -> None:
        """Renew the lock every third of its timeout while the holder works."""
        while True:
            await trio.sleep(self._lock_timeout / 3)
            try:
                await trio.to_thread.run_sync(lock.reacquire, abandon_on_cancel=True)
            except redis.exceptions.RedisError as exc:
                log.warning(
                    "redis %s: cannot renew the token lock (%s); another instance may also "
                    "ask the identity provider",
                    self._where,
                    type(exc).__name__,
                )
                return

    async def _call(self, command: Callable[[], object]) -> object:
        try:
            return await trio.to_thread.run_sync(command, abandon_on_cancel=True)
        except redis.exceptions.RedisError as exc:
            raise CacheError(f"redis {self._where}: {type(exc).__name__}: {exc}") from None


def connect(
    url: str, *, password: Secret | None = None, ca_file: Path | None = None
) -> redis.Redis:
    """A redis-py client for ``url`` (lazy: it connects on first use), with bounded socket
    waits, and for ``rediss://`` a certificate that must chain to the system store (plus
    ``ca_file``) and name the host. ``ValueError`` for a URL it cannot use."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"redis url must start with redis://, rediss:// or unix://: {url!r}")
    options: dict[str, object] = {
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": SOCKET_TIMEOUT,
        "health_check_interval": 30,
    }
    if password is not None:
        options["password"] = password.reveal()
    if url.startswith("rediss://"):
        # Explicit: redis-py before 6 verifies the certificate but not that it names the
        # host (redis/redis-py#3626), so any certificate from a trusted CA would do.
        options["ssl_cert_reqs"] = "required"
        options["ssl_check_hostname"] = True
        if ca_file is not None:
            options["ssl_ca_certs"] = str(ca_file)
    try:
        return redis.Redis.from_url(url, **options)
    except ValueError as exc:
        raise ValueError(f"redis url {redact(url)}: {exc}") from None


def redact(url: str) -> str:
    """The URL without a password in its user part."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}{sep}{user}:<redacted>@{host}" if ":" in userinfo else url
