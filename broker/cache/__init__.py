"""Token caches: where a :class:`~broker.source.CachingTokenSource` keeps tokens beyond itself.

The source always keeps the tokens it serves in its own memory; a *cache* is the store behind
it, shared with whoever else should see the same tokens:

- :class:`~broker.cache.memory.MemoryTokenCache` (the default) lives in this process. Share
  one between the old and the new source when the configuration is reloaded, and tokens
  survive the reload.
- :class:`~broker.cache.file.FileTokenCache` is an encrypted file: tokens survive a restart,
  and ``xoauth2-proxy token`` on the same host uses the proxy's tokens.
- :class:`~broker.cache.redis.RedisTokenCache` is shared by several proxy instances, values
  encrypted, with a distributed lock so that one identity-provider request serves them all.

All three implement :class:`TokenCache`. Keys (:class:`CacheKey`) name the app, *who* the
token is for (a fingerprint of provider, authority, tenant and client, so that a changed app
registration never gets an old token; for other servers also the issuer and the resources
asked for), the scope and, for per-mailbox providers, the mailbox.
Values (:class:`CachedToken`) carry when the token was obtained, so a reader can tell its
lifetime. Encrypted caches seal every value with AES-256-GCM (:mod:`broker.cache.sealing`).

Beside the tokens, a cache keeps the *sign-ins* of delegated apps (:class:`Grant`: a person's
refresh token, who signed in, and whether the identity provider has revoked it), under the
same keys, in a separate place (a ``grants`` section of the file, ``PREFIX:grant:`` keys in
Redis). A sign-in never expires from the cache by itself, and each write replaces the
previous one atomically: a reader sees the old refresh token or the new one, never neither.
The memory cache keeps them too, for tests and tools; the configuration refuses it for
delegated apps, since a restart would lose every sign-in.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal, Protocol

from broker.model import AccessToken

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager
    from pathlib import Path

    from broker.model import App, Secret

__all__ = [
    "CacheError",
    "CacheKey",
    "CacheSettings",
    "CachedToken",
    "Grant",
    "TokenCache",
    "open_cache",
]

CacheKind = Literal["memory", "file", "redis"]
CACHE_KINDS: Final[tuple[CacheKind, ...]] = ("memory", "file", "redis")


class CacheError(Exception):
    """The cache cannot be read or written right now. The source carries on without it."""


@dataclass(frozen=True, slots=True)
class CacheKey:
    """Which token: app, issuer/client fingerprint, scope and (per-mailbox tokens) mailbox."""

    app: str
    identity: str
    scope: str
    mailbox: str | None = None

    @classmethod
    def for_app(cls, app: App, mailbox: str | None = None) -> CacheKey:
        parts = [app.provider, app.authority, app.tenant, app.client_id, app.token_url]
        if app.issuer or app.resources:  # only then: older keys stay valid
            parts += [app.issuer, " ".join(app.resources)]
        if app.delegated:  # a person's tokens are never an app's, nor the other way round
            parts.append("delegated")
        identity = hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:16]
        return cls(app.name, identity, app.scope, mailbox.lower() if mailbox else None)

    @property
    def name(self) -> str:
        """A stable, unambiguous text form (holds the mailbox: do not put it in Redis)."""
        return json.dumps([self.app, self.identity, self.scope, self.mailbox])

    @property
    def digest(self) -> str:
        """SHA-256 of :attr:`name`: names the key without revealing the mailbox."""
        return hashlib.sha256(self.name.encode("utf-8")).hexdigest()

    def __str__(self) -> str:
        who = f" for {self.mailbox}" if self.mailbox else ""
        return f"app {self.app!r}{who}"


@dataclass(frozen=True, slots=True)
class CachedToken:
    """A token and when it was obtained (wall clock), so its lifetime is known."""

    token: AccessToken
    obtained_at: float

    @property
    def lifetime(self) -> float:
        return self.token.expires_at - self.obtained_at

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "token": self.token.value,
                "expires_at": self.token.expires_at,
                "scope": self.token.scope,
                "obtained_at": self.obtained_at,
            }
        ).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | object) -> CachedToken:
        """From :meth:`to_json` output, or its already parsed dict (``ValueError`` if bad)."""
        raw = json.loads(data) if isinstance(data, bytes) else data
        if not isinstance(raw, dict):
            raise ValueError("a cached token must be a JSON object")
        try:
            value, scope = raw["token"], raw["scope"]
            expires_at, obtained_at = float(raw["expires_at"]), float(raw["obtained_at"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("a cached token lacks a field") from None
        if not isinstance(value, str) or not isinstance(scope, str):
            raise ValueError("a cached token has a field of the wrong type")
        return cls(AccessToken(value, expires_at, scope), obtained_at)


@dataclass(frozen=True, slots=True)
class Grant:
    """A person's sign-in for a delegated app: the refresh token (never shown), the account
    that signed in, and when; ``revoked`` says why the identity provider refused it (empty
    while it works)."""

    refresh_token: str = field(repr=False)
    #: The account that signed in (as the identity provider names it, lower case).
    account: str
    #: When the person signed in (wall clock).
    signed_in_at: float
    #: When the refresh token was last replaced (rotation), or the sign-in if never.
    rotated_at: float
    #: Why the identity provider refused the refresh token; empty: usable.
    revoked: str = ""
    revoked_at: float = 0.0

    def __repr__(self) -> str:
        state = f"revoked {self.revoked!r}" if self.revoked else "active"
        return f"Grant(<refresh token redacted>, account={self.account!r}, {state})"

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "refresh_token": self.refresh_token,
                "account": self.account,
                "signed_in_at": self.signed_in_at,
                "rotated_at": self.rotated_at,
                "revoked": self.revoked,
                "revoked_at": self.revoked_at,
            }
        ).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | object) -> Grant:
        """From :meth:`to_json` output, or its parsed dict (``ValueError`` if bad)."""
        raw = json.loads(data) if isinstance(data, bytes) else data
        if not isinstance(raw, dict):
            raise ValueError("a sign-in must be a JSON object")
        try:
            token, account, revoked = raw["refresh_token"], raw["account"], raw["revoked"]
            signed_in_at, rotated_at = float(raw["signed_in_at"]), float(raw["rotated_at"])
            revoked_at = float(raw["revoked_at"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("a sign-in lacks a field") from None
        if not all(isinstance(v, str) for v in (token, account, revoked)):
            raise ValueError("a sign-in has a field of the wrong type")
        return cls(token, account, signed_in_at, rotated_at, revoked, revoked_at)


class TokenCache(Protocol):
    """Where tokens are kept beyond one source. Methods raise :class:`CacheError`."""

    async def load(self, key: CacheKey) -> CachedToken | None:
        """The token stored under ``key`` (possibly expired), or ``None``."""
        ...

    async def store(self, key: CacheKey, entry: CachedToken) -> None:
        """Keep ``entry`` under ``key``, replacing what was there."""
        ...

    async def load_grant(self, key: CacheKey) -> Grant | None:
        """The sign-in stored under ``key``, or ``None``."""
        ...

    async def store_grant(self, key: CacheKey, grant: Grant) -> None:
        """Keep ``grant`` under ``key``, replacing what was there in one atomic step."""
        ...

    def exclusive(self, key: CacheKey) -> AbstractAsyncContextManager[None]:
        """Hold the right to ask the identity provider for ``key``, among all sharers.

        Caches shared between processes (a file, Redis) lock; the memory cache returns at
        once. If the lock cannot be taken because the cache is unreachable or a stopped
        process holds it too long, it is skipped (and logged) rather than failing the token
        request: availability first.
        """
        ...

    def close(self) -> None:
        """Release connections. Idempotent."""
        ...


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The ``[cache]`` configuration table. ``key`` is required for file and redis."""

    kind: CacheKind = "memory"
    #: File cache: the file's path.
    path: Path | None = None
    #: File and Redis caches: 32 random bytes, base64 (``openssl rand -base64 32``).
    key: Secret | None = None
    #: Redis: ``redis://host:port/db`` or ``rediss://`` for TLS (no password in it).
    url: str = ""
    #: Redis: the AUTH password, if the server wants one.
    password: Secret | None = None
    #: Redis: prefix of every key this proxy writes.
    prefix: str = "xoauth2-proxy"
    #: Redis: seconds a lock outlives a holder that stopped renewing it (a crashed instance).
    lock_timeout: float = 15.0
    #: Redis over TLS: extra trust anchors.
    ca_file: Path | None = None


def open_cache(settings: CacheSettings) -> TokenCache:
    """Build the configured cache (``ValueError`` with a clear message if it cannot be used)."""
    if settings.kind == "memory":
        from broker.cache.memory import MemoryTokenCache

        return MemoryTokenCache()
    if settings.key is None:
        raise ValueError(f"a {settings.kind} cache needs key (32 random bytes, base64)")
    if settings.kind == "file":
        from broker.cache.file import FileTokenCache

        if settings.path is None:
            raise ValueError("a file cache needs path")
        return FileTokenCache(settings.path, settings.key)
    if settings.kind == "redis":
        from broker.cache.redis import RedisTokenCache

        if not settings.url:
            raise ValueError("a redis cache needs url")
        return RedisTokenCache(
            settings.url,
            settings.key,
            password=settings.password,
            prefix=settings.prefix,
            lock_timeout=settings.lock_timeout,
            ca_file=settings.ca_file,
        )
    raise ValueError(f"unknown cache kind {settings.kind!r} (known: {', '.join(CACHE_KINDS)})")
