"""Token sources: the ``TokenSource`` interface the proxy depends on, and its cached implementation.

Theory of operation (:class:`CachingTokenSource`)
-------------------------------------------------
Tokens are cached in memory per *key*: ``(app, scope, mailbox)``, where the mailbox is part of
the key only for providers whose tokens name a mailbox (:class:`MailboxProvider`); Microsoft's
app-only tokens serve every mailbox, so all logins of one app share one token.

A cached token is served until its *refresh point*: ``refresh_margin`` seconds before expiry (10
minutes by default; Microsoft's high-volume SMTP rejects tokens close to expiry), or half-way
through its lifetime if that comes later, so a provider issuing short-lived tokens is not asked
on every login. After the refresh point the next caller refreshes it. If that refresh fails
temporarily while the old token still has at least :data:`MIN_VALIDITY` seconds left, the old
token is served and the error is swallowed.

**Single flight.** At most one provider fetch per key is in flight. The first caller to miss
(the *leader*) runs ``provider.fetch()`` in its own task; later callers wait on the flight's
event and all receive its token or (a copy of) its error. No background task is needed, so
nothing outlives its caller. Cancellation, thought through:

- a cancelled *waiter* simply stops waiting; the flight is unaffected;
- a cancelled *leader* cancels its fetch (a provider running msal in a worker thread abandons
  it), marks the flight *abandoned* and wakes the waiters; the first of them to run becomes the
  new leader and fetches again, the others wait on it. Nobody is stranded, at the cost of a
  second IdP request in that rare case. Trio only switches tasks at checkpoints, and the code
  between "no flight for this key" and "register my flight" has none, so two new leaders can
  never race.

**Throttling.** A temporary failure with a ``retry_after`` (HTTP 429/503 Retry-After) is
remembered per key: until then callers get that error again (or the still-valid old token)
without asking the provider.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol, runtime_checkable

import trio

from broker.clock import wall_clock
from broker.errors import BrokerError, PermanentTokenError, TemporaryTokenError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from broker.clock import Clock
    from broker.model import AccessToken, App

__all__ = [
    "MIN_VALIDITY",
    "CachingTokenSource",
    "MailboxProvider",
    "Provider",
    "TokenSource",
]

#: A token with less time left than this (seconds) is not handed out even as a fallback.
MIN_VALIDITY: Final = 60.0


class TokenSource(Protocol):
    async def token(self, app: str, *, mailbox: str | None = None) -> AccessToken:
        """Return a valid token for ``app`` (and ``mailbox`` where tokens are per mailbox).

        Raises :class:`~broker.errors.PermanentTokenError` or
        :class:`~broker.errors.TemporaryTokenError`; ``KeyError`` for an unknown app.
        """
        ...


@runtime_checkable
class Provider(Protocol):
    """Obtains a new token for one app from its identity provider (always asks; no cache)."""

    async def fetch(self) -> AccessToken:
        """Raise :class:`~broker.errors.BrokerError` subclasses on failure."""
        ...


@runtime_checkable
class MailboxProvider(Protocol):
    """A provider whose tokens are issued for one mailbox (e.g. domain-wide delegation)."""

    async def fetch_for(self, mailbox: str) -> AccessToken:
        """Raise :class:`~broker.errors.BrokerError` subclasses on failure."""
        ...


_Key = tuple[str, str, str | None]


@dataclass(slots=True)
class _Entry:
    token: AccessToken
    refresh_at: float


@dataclass(slots=True, eq=False)
class _Flight:
    """One fetch in progress, shared by everyone waiting for the same key."""

    done: trio.Event = field(default_factory=trio.Event)
    token: AccessToken | None = None
    error: Exception | None = None
    #: The leader was cancelled before the fetch finished; waiters must start over.
    abandoned: bool = False


@dataclass(slots=True)
class _HoldDown:
    until: float
    error: TemporaryTokenError


class CachingTokenSource:
    """A :class:`TokenSource` with an in-memory cache and single-flight refresh per key.

    ``providers`` overrides the provider of some apps (tests inject fakes); the others are
    built from their :class:`~broker.model.App` with :func:`broker.providers.build_provider`
    (``ValueError`` here for a misconfigured app). ``clock`` returns wall-clock seconds since
    the epoch, the time base of :attr:`AccessToken.expires_at`. Not thread-safe: use it from one
    trio run.
    """

    def __init__(
        self,
        apps: Mapping[str, App],
        *,
        providers: Mapping[str, Provider | MailboxProvider] | None = None,
        clock: Clock = wall_clock,
        refresh_margin: float = 600.0,
    ) -> None:
        if refresh_margin < 0:
            raise ValueError("refresh_margin must not be negative")
        self._apps = dict(apps)
        self._clock = clock
        self._refresh_margin = refresh_margin
        self._providers: dict[str, Provider | MailboxProvider] = dict(providers or {})
        self._owned: list[Provider | MailboxProvider] = []
        missing = [name for name in self._apps if name not in self._providers]
        if missing:
            # Imported here so that importing the interface does not load msal and httpx.
            from broker.providers import build_provider

            for name in missing:
                provider = build_provider(self._apps[name])
                self._providers[name] = provider
                self._owned.append(provider)
        self._per_mailbox = {
            name: isinstance(p, MailboxProvider) for name, p in self._providers.items()
        }
        self._cache: dict[_Key, _Entry] = {}
        self._flights: dict[_Key, _Flight] = {}
        self._holds: dict[_Key, _HoldDown] = {}

    def __repr__(self) -> str:
        return f"CachingTokenSource(apps={sorted(self._apps)!r}, cached={len(self._cache)})"

    def close(self) -> None:
        """Release the resources (HTTP connection pools) of the providers built here."""
        for provider in self._owned:
            close = getattr(provider, "close", None)
            if callable(close):
                close()

    async def token(self, app: str, *, mailbox: str | None = None) -> AccessToken:
        config = self._apps[app]  # KeyError for an unknown app, as TokenSource promises
        provider = self._providers[app]
        per_mailbox = self._per_mailbox[app]
        if per_mailbox and mailbox is None:
            raise PermanentTokenError(
                f"app {app!r} issues tokens per mailbox, and no mailbox was named",
                fix="Name the mailbox the token is for.",
            )
        key: _Key = (app, config.scope, mailbox if per_mailbox else None)
        now = self._clock()
        entry = self._cache.get(key)
        if entry is not None and now <= entry.refresh_at:
            await trio.lowlevel.checkpoint()
            return entry.token
        hold = self._holds.get(key)
        if hold is not None and now < hold.until:
            await trio.lowlevel.checkpoint()
            if entry is not None and entry.token.remaining(now) >= MIN_VALIDITY:
                return entry.token
            raise _copy_error(hold.error) from hold.error
        try:
            return await self._shared_fetch(key, provider)
        except TemporaryTokenError:
            now = self._clock()
            if entry is not None and entry.token.remaining(now) >= MIN_VALIDITY:
                return entry.token
            raise

    async def _shared_fetch(self, key: _Key, provider: Provider | MailboxProvider) -> AccessToken:
        while True:
            flight = self._flights.get(key)
            if flight is None:
                flight = self._flights[key] = _Flight()
                return await self._lead(key, flight, provider)
            await flight.done.wait()
            if flight.abandoned:
                continue
            if flight.error is not None:
                raise _copy_error(flight.error) from flight.error
            assert flight.token is not None
            return flight.token

    async def _lead(
        self, key: _Key, flight: _Flight, provider: Provider | MailboxProvider
    ) -> AccessToken:
        try:
            if isinstance(provider, MailboxProvider):
                assert key[2] is not None
                token = await provider.fetch_for(key[2])
            else:
                token = await provider.fetch()
        except Exception as exc:
            flight.error = exc
            if isinstance(exc, TemporaryTokenError) and exc.retry_after:
                self._holds[key] = _HoldDown(self._clock() + exc.retry_after, exc)
            raise
        else:
            flight.token = token
            self._store(key, token)
            return token
        finally:
            # Runs for success, errors and cancellation alike: the waiters always wake.
            if flight.token is None and flight.error is None:
                flight.abandoned = True
            del self._flights[key]
            flight.done.set()

    def _store(self, key: _Key, token: AccessToken) -> None:
        now = self._clock()
        lifetime = token.remaining(now)
        refresh_at = token.expires_at - min(self._refresh_margin, lifetime / 2)
        self._cache[key] = _Entry(token, refresh_at)
        self._holds.pop(key, None)


def _copy_error(error: Exception) -> Exception:
    """A fresh instance for each waiter, so tracebacks do not pile up on one object."""
    if isinstance(error, BrokerError):
        try:
            return copy.copy(error)
        except Exception:  # pragma: no cover - a subclass with an unusual constructor
            return error
    return error
