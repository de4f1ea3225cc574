"""Token sources: the ``TokenSource`` interface the proxy depends on, and its cached implementation.

Theory of operation (:class:`CachingTokenSource`)
-------------------------------------------------
Tokens are kept in memory per *key* (:class:`~broker.cache.CacheKey`): app, a fingerprint of
who issues the token to whom, scope, and the mailbox -- the mailbox only for providers whose
tokens name one (:class:`MailboxProvider`, e.g. Google domain-wide delegation); Microsoft's
app-only tokens serve every mailbox, so all logins of one app share one token. Behind that
memory sits a :class:`~broker.cache.TokenCache` (in memory, an encrypted file, or Redis shared
by several instances), read when a token is missing or due, written after every fetch.

**Refresh point.** A token is due ``refresh_margin`` seconds before expiry (10 minutes by
default: Microsoft's high-volume SMTP rejects tokens close to expiry), or half-way through its
lifetime if that comes later, so short-lived tokens are not fetched on every login; minus a
random *jitter* of up to ``refresh_jitter`` seconds (at most a tenth of the lifetime), so that
many apps and instances do not renew in the same second.

**Background refresh** (:meth:`CachingTokenSource.run`, started by the server in its nursery;
nothing starts by itself). It fetches every app-wide token at start, then renews each token
that was used in the last ``keep_warm`` seconds at its refresh point, so no login waits for the
identity provider while a valid token exists: while ``run()`` is running, a login finding a
due but still valid token gets it at once. Without ``run()`` (``xoauth2-proxy token``, tests),
the first login after the refresh point renews the token and waits for it.

**Single flight.** At most one fetch per key is in flight in this process. The first caller to
need it (a login or the background task: the *leader*) fetches; later callers wait on the
flight's event and all receive its token or (a copy of) its error. The leader first reads the
shared cache, then takes the cache's :meth:`~broker.cache.TokenCache.exclusive` lock (a
distributed lock for Redis), reads again, and only then asks the identity provider -- so
among all instances sharing a Redis, one request is made per key and token lifetime.
Cancellation, thought through:

- a cancelled *waiter* simply stops waiting; the flight is unaffected;
- a cancelled *leader* cancels its fetch (a provider running msal in a worker thread abandons
  it), marks the flight *abandoned* and wakes the waiters; the first of them to run becomes the
  new leader and fetches again, the others wait on it. Nobody is stranded, at the cost of a
  second IdP request in that rare case. Trio only switches tasks at checkpoints, and the code
  between "no flight for this key" and "register my flight" has none, so two new leaders can
  never race.

**Failures.** Every failed fetch holds the key back for a while: logins during the hold get
the cached token if it is still valid for ``min_validity`` seconds, otherwise a copy of the
error, without asking the provider.

- *Temporary* (network, timeouts, HTTP 5xx and 429, the provider's transient codes): the hold
  and the background retry come after an exponential backoff with jitter (``base_backoff``
  doubling up to ``max_backoff``), or after the provider's Retry-After if that is longer.
  Logged as a warning at each attempt. A provider's HTTP timeouts bound each read, not a
  server that trickles its answer byte by byte, so every request to the provider also has
  an overall deadline, ``fetch_timeout``: a fetch still running then is cancelled and
  counts as a temporary failure -- and no longer holds the shared lock of the other
  instances.
- *Permanent* (bad secret, unknown client or tenant, expired certificate...): logged once as
  an error with the provider's code and the fix, not again until the error changes or a
  fetch succeeds. Logins are held back for ``permanent_hold`` seconds (short: the operator
  may be fixing it); the background retries after a backoff that starts there and grows to an
  hour, so a broken app is never hammered.

While a still-valid token is cached, logins keep getting it whatever the provider says.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, NoReturn, Protocol, runtime_checkable

import trio

from broker.cache import CachedToken, CacheError, CacheKey
from broker.cache.memory import MemoryTokenCache
from broker.claims import expectations_for
from broker.clock import wall_clock
from broker.errors import BrokerError, PermanentTokenError, TemporaryTokenError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from broker.cache import TokenCache
    from broker.claims import Expectations
    from broker.clock import Clock
    from broker.model import AccessToken, App

__all__ = [
    "MIN_VALIDITY",
    "CachingTokenSource",
    "MailboxProvider",
    "Provider",
    "TokenSource",
    "TokenStatus",
]

log = logging.getLogger("xoauth2_proxy.broker")

#: A token with less time left than this (seconds) is not handed out even as a fallback.
MIN_VALIDITY: Final = 60.0
#: The background task looks at the wall clock at least this often (seconds), so a clock
#: step (NTP, a suspended VM) delays nothing for long.
MAX_NAP: Final = 60.0
#: Longest pause between background retries of a permanently failing key (seconds).
MAX_PERMANENT_BACKOFF: Final = 3600.0


class TokenSource(Protocol):
    async def token(self, app: str, *, mailbox: str | None = None) -> AccessToken:
        """Return a valid token for ``app`` (and ``mailbox`` where tokens are per mailbox).

        Raises :class:`~broker.errors.PermanentTokenError` or
        :class:`~broker.errors.TemporaryTokenError`; ``KeyError`` for an unknown app.
        """
        ...

    async def expectations(self, app: str) -> Expectations:
        """What every token of ``app`` must say (:func:`broker.claims.check_token`).

        What the configuration leaves open -- a Microsoft tenant named by its domain, whose
        ID tokens carry -- is learned from the identity provider once; until that succeeds,
        broker errors. ``KeyError`` for an unknown app.
        """
        ...


@runtime_checkable
class Provider(Protocol):
    """Obtains a new token for one app from its identity provider (always asks; no cache)."""

    async def fetch(self) -> AccessToken:
        """Raise :class:`~broker.errors.BrokerError` subclasses on failure.

        A provider checks each token against what it asked for before returning it; one
        that can say more than the configuration about what tokens must carry (a tenant's
        ID) offers ``async def expectations() -> Expectations``.
        """
        ...


@runtime_checkable
class MailboxProvider(Protocol):
    """A provider whose tokens are issued for one mailbox (e.g. domain-wide delegation)."""

    async def fetch_for(self, mailbox: str) -> AccessToken:
        """Raise :class:`~broker.errors.BrokerError` subclasses on failure."""
        ...


@dataclass(frozen=True, slots=True)
class TokenStatus:
    """What is known about one token (an app's, or one mailbox's): never the token itself."""

    app: str
    #: The mailbox, for providers whose tokens are per mailbox.
    mailbox: str | None
    #: When the cached token expires (wall clock), if there is one.
    expires_at: float | None
    #: The cached token is valid for at least ``min_validity`` seconds.
    valid: bool
    #: Consecutive failed fetches, and the last one's error (safe to show) and kind.
    failures: int = 0
    last_error: str | None = None
    error_kind: str | None = None
    #: A fetch is in progress.
    fetching: bool = False


@dataclass(slots=True)
class _Entry:
    token: AccessToken
    obtained_at: float
    refresh_at: float


@dataclass(slots=True, eq=False)
class _Flight:
    """One fetch in progress, shared by everyone waiting for the same key."""

    done: trio.Event = field(default_factory=trio.Event)
    token: AccessToken | None = None
    error: Exception | None = None
    #: The leader was cancelled before the fetch finished; waiters must start over.
    abandoned: bool = False


@dataclass(slots=True, eq=False)
class _State:
    """Everything known about one key."""

    key: CacheKey
    last_used: float
    entry: _Entry | None = None
    flight: _Flight | None = None
    #: Until then, logins get ``hold_error`` (or a still-valid token) without a fetch.
    hold_until: float = -math.inf
    hold_error: BrokerError | None = None
    #: When the background task should next fetch this key (``None``: not scheduled).
    next_attempt: float | None = None
    #: Consecutive failed fetches.
    failures: int = 0
    #: The permanent error last logged (its code), so it is logged once.
    reported: str | None = None
    #: The background task is refreshing this key.
    refreshing: bool = False
    #: The last failed fetch's error (kept for status reports until a fetch succeeds).
    last_error: BrokerError | None = None


class CachingTokenSource:
    """A :class:`TokenSource` with a cache, single-flight fetches and background refresh.

    ``providers`` overrides the provider of some apps (tests inject fakes); the others are
    built from their :class:`~broker.model.App` with :func:`broker.providers.build_provider`
    (``ValueError`` here for a misconfigured app). ``cache`` is where tokens are shared
    (default: a private :class:`~broker.cache.memory.MemoryTokenCache`); a cache passed in is
    closed by :meth:`close` only with ``close_cache=True``, so it can outlive this source
    (configuration reloads).
    ``on_fetch`` is told ``(app, outcome)`` after each fetch (metrics).
    ``clock`` returns wall-clock seconds since the epoch, the time base of
    :attr:`AccessToken.expires_at` (:func:`broker.clock.trio_wall_clock` under a MockClock);
    ``rng`` draws the jitter. The other parameters are seconds; see the module's theory of
    operation. Not thread-safe: use it from one trio run.
    """

    def __init__(
        self,
        apps: Mapping[str, App],
        *,
        providers: Mapping[str, Provider | MailboxProvider] | None = None,
        cache: TokenCache | None = None,
        close_cache: bool = False,
        clock: Clock = wall_clock,
        rng: random.Random | None = None,
        refresh_margin: float = 600.0,
        refresh_jitter: float = 120.0,
        min_validity: float = MIN_VALIDITY,
        base_backoff: float = 1.0,
        max_backoff: float = 120.0,
        permanent_hold: float = 60.0,
        keep_warm: float = 86400.0,
        fetch_timeout: float = 60.0,
        on_fetch: Callable[[str, str], None] | None = None,
    ) -> None:
        if not fetch_timeout > 0:
            raise ValueError("fetch_timeout must be positive")
        for name, value in (
            ("refresh_margin", refresh_margin),
            ("refresh_jitter", refresh_jitter),
            ("min_validity", min_validity),
            ("base_backoff", base_backoff),
            ("max_backoff", max_backoff),
            ("permanent_hold", permanent_hold),
            ("keep_warm", keep_warm),
        ):
            if not value >= 0:
                raise ValueError(f"{name} must not be negative")
        self._apps = dict(apps)
        self._clock = clock
        self._rng = rng or random.Random()
        self._refresh_margin = refresh_margin
        self._refresh_jitter = refresh_jitter
        self._min_validity = min_validity
        self._base_backoff = base_backoff
        self._max_backoff = max(max_backoff, base_backoff)
        self._permanent_hold = permanent_hold
        self._keep_warm = keep_warm
        self._fetch_timeout = fetch_timeout
        #: Told (app, outcome) after each fetch: ``success`` (asked), ``shared_cache``
        #: (another instance had renewed it), ``temporary`` or ``permanent`` (failed).
        self._on_fetch = on_fetch
        self._own_cache = cache is None or close_cache
        self._cache: TokenCache = MemoryTokenCache() if cache is None else cache
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
        # Keyed by the name the caller uses (the mapping's key), whatever App.name says.
        self._app_keys = {
            name: dataclasses.replace(CacheKey.for_app(app), app=name)
            for name, app in self._apps.items()
        }
        self._states: dict[CacheKey, _State] = {}
        self._running = False
        self._wake = trio.Event()

    def __repr__(self) -> str:
        cached = sum(1 for s in self._states.values() if s.entry is not None)
        return f"CachingTokenSource(apps={sorted(self._apps)!r}, cached={cached})"

    def close(self) -> None:
        """Release the providers built here (HTTP connection pools) and a cache made here."""
        for provider in self._owned:
            close = getattr(provider, "close", None)
            if callable(close):
                close()
        if self._own_cache:
            self._cache.close()

    # -- logins -----------------------------------------------------------------------------

    async def token(self, app: str, *, mailbox: str | None = None) -> AccessToken:
        self._apps[app]  # KeyError for an unknown app, as TokenSource promises
        if self._per_mailbox[app] and not mailbox:
            raise PermanentTokenError(
                f"app {app!r} issues tokens per mailbox, and no mailbox was named",
                fix="Name the mailbox the token is for.",
            )
        state = self._state(app, mailbox if self._per_mailbox[app] else None)
        now = self._clock()
        state.last_used = now
        entry = state.entry
        if entry is not None:
            if now <= entry.refresh_at:
                await trio.lowlevel.checkpoint()
                return entry.token
            if self._running and self._valid(entry, now):
                # Due, but the background task renews it: nobody waits.
                if state.flight is None and not state.refreshing:
                    self._wake.set()
                await trio.lowlevel.checkpoint()
                return entry.token
        if now < state.hold_until and state.hold_error is not None:
            await trio.lowlevel.checkpoint()
            if entry is not None and self._valid(entry, now):
                return entry.token
            raise _copy_error(state.hold_error) from state.hold_error
        try:
            return await self._shared_fetch(state)
        except BrokerError:
            # The failed fetch may have found a still-valid token in the shared cache.
            current = state.entry
            if current is not None and self._valid(current, self._clock()):
                return current.token
            raise

    async def expectations(self, app: str) -> Expectations:
        self._apps[app]  # KeyError for an unknown app
        resolve = getattr(self._providers[app], "expectations", None)
        if callable(resolve):
            expected: Expectations = await resolve()
            return expected
        await trio.lowlevel.checkpoint()
        return expectations_for(self._apps[app])

    def status(self) -> list[TokenStatus]:
        """Every token this source knows of, and every app-wide token it should have."""
        now = self._clock()
        found: list[TokenStatus] = []
        seen: set[str] = set()
        for state in self._states.values():
            entry, error = state.entry, state.last_error
            seen.add(state.key.app)
            found.append(
                TokenStatus(
                    app=state.key.app,
                    mailbox=state.key.mailbox,
                    expires_at=entry.token.expires_at if entry is not None else None,
                    valid=entry is not None and self._valid(entry, now),
                    failures=state.failures,
                    last_error=_describe(error) if error is not None else None,
                    error_kind=error.kind if error is not None else None,
                    fetching=state.flight is not None,
                )
            )
        for name in self._apps:
            if name not in seen and not self._per_mailbox[name]:
                found.append(TokenStatus(app=name, mailbox=None, expires_at=None, valid=False))
        return found

    def per_mailbox(self, app: str) -> bool:
        """Are ``app``'s tokens issued per mailbox?"""
        return self._per_mailbox[app]

    def _state(self, app: str, mailbox: str | None) -> _State:
        key = self._app_keys[app]
        if mailbox is not None:
            key = CacheKey(key.app, key.identity, key.scope, mailbox.lower())
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = _State(key, last_used=self._clock())
        return state

    def _valid(self, entry: _Entry, now: float) -> bool:
        return entry.token.remaining(now) >= self._min_validity

    # -- background refresh -----------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Keep tokens fresh until cancelled. Start it with ``await nursery.start(source.run)``.

        Fetches every app-wide token at once (mailbox tokens are fetched at first use), then
        renews each token used in the last ``keep_warm`` seconds at its refresh point, and
        retries failures after their backoff. Errors are logged (see the module's theory of
        operation); only bugs escape. One ``run()`` per source at a time.
        """
        if self._running:
            raise RuntimeError("CachingTokenSource.run() is already running")
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                now = self._clock()
                for name in self._apps:
                    if not self._per_mailbox[name]:
                        state = self._state(name, None)
                        state.last_used = now
                        if state.entry is None and state.next_attempt is None:
                            state.next_attempt = now
                task_status.started()
                while True:
                    self._wake = trio.Event()
                    nap = self._start_due(nursery)
                    with trio.move_on_after(nap):
                        await self._wake.wait()
        finally:
            self._running = False

    def _start_due(self, nursery: trio.Nursery) -> float:
        """Start refreshing the keys that are due; return seconds until the next one is."""
        now = self._clock()
        nap = MAX_NAP
        for key, state in list(self._states.items()):
            if state.refreshing or state.flight is not None or state.next_attempt is None:
                continue
            if now - state.last_used > self._keep_warm:
                if state.entry is None or state.entry.token.remaining(now) <= 0:
                    del self._states[key]  # unused and expired: forget it
                continue
            wait = state.next_attempt - now
            if wait <= 0:
                state.refreshing = True
                nursery.start_soon(self._refresh, state)
            else:
                nap = min(nap, wait)
        return nap

    async def _refresh(self, state: _State) -> None:
        try:
            await self._shared_fetch(state)
        except BrokerError:
            pass  # logged by _failed; the next attempt is scheduled
        finally:
            state.refreshing = False
            self._wake.set()

    # -- fetching ---------------------------------------------------------------------------

    async def _shared_fetch(self, state: _State) -> AccessToken:
        while True:
            flight = state.flight
            if flight is None:
                flight = state.flight = _Flight()
                return await self._lead(state, flight)
            await flight.done.wait()
            if flight.abandoned:
                continue
            if flight.error is not None:
                raise _copy_error(flight.error) from flight.error
            assert flight.token is not None
            return flight.token

    async def _lead(self, state: _State, flight: _Flight) -> AccessToken:
        try:
            entry = await self._obtain(state)
        except Exception as exc:
            flight.error = exc
            if isinstance(exc, BrokerError):
                self._failed(state, exc)
            raise
        else:
            flight.token = entry.token
            self._succeeded(state, entry)
            return entry.token
        finally:
            # Runs for success, errors and cancellation alike: the waiters always wake.
            if flight.token is None and flight.error is None:
                flight.abandoned = True
            state.flight = None
            flight.done.set()

    async def _obtain(self, state: _State) -> _Entry:
        """A fresh token for the key: from the shared cache if someone renewed it, else asked."""
        key = state.key
        shared = await self._load(key)
        if self._fresh(shared, state):
            assert shared is not None
            self._told(key.app, "shared_cache")
            return self._entry(shared)
        async with self._cache.exclusive(key):
            shared = await self._load(key)
            if self._fresh(shared, state):
                assert shared is not None
                self._told(key.app, "shared_cache")
                return self._entry(shared)
            obtained_at = self._clock()
            try:
                token = await self._ask(key)
            except BrokerError as exc:
                self._told(key.app, exc.kind)
                self._keep_as_fallback(state, shared)
                raise
            self._told(key.app, "success")
            cached = CachedToken(token, obtained_at)
            await self._save(key, cached)
        return self._entry(cached)

    def _told(self, app: str, outcome: str) -> None:
        if self._on_fetch is not None:
            self._on_fetch(app, outcome)

    async def _ask(self, key: CacheKey) -> AccessToken:
        """The provider's new token, if it comes within ``fetch_timeout`` seconds."""
        provider = self._providers[key.app]
        with trio.move_on_after(self._fetch_timeout):
            if isinstance(provider, MailboxProvider):
                assert key.mailbox is not None
                return await provider.fetch_for(key.mailbox)
            return await provider.fetch()
        raise TemporaryTokenError(
            f"{key}: the identity provider did not answer within {self._fetch_timeout:g} s",
            code="FETCH_TIMEOUT",
            fix="Nothing to change: the broker retries. If it persists, check the network "
            "path (and any HTTPS proxy) to the identity provider, and its status.",
        )

    def _fresh(self, shared: CachedToken | None, state: _State) -> bool:
        """Is the cache's token one we should use instead of asking the provider?"""
        if shared is None:
            return False
        if state.entry is not None and shared.token.value == state.entry.token.value:
            return False  # the very token that is due
        now = self._clock()
        due = shared.token.expires_at - min(self._refresh_margin, shared.lifetime / 2)
        return now < due and shared.token.remaining(now) >= self._min_validity

    def _keep_as_fallback(self, state: _State, shared: CachedToken | None) -> None:
        """Remember a due but still valid shared token (another instance's, or one from
        before a restart) when the provider fails, so logins can be served with it."""
        if shared is None or shared.token.remaining(self._clock()) < self._min_validity:
            return
        if state.entry is None or shared.token.expires_at > state.entry.token.expires_at:
            entry = self._entry(shared)
            state.entry = _Entry(entry.token, entry.obtained_at, min(entry.refresh_at, 0.0))

    def _entry(self, cached: CachedToken) -> _Entry:
        lifetime = max(cached.lifetime, 0.0)
        jitter = self._rng.uniform(0.0, min(self._refresh_jitter, lifetime / 10))
        lead = min(self._refresh_margin, lifetime / 2) + jitter
        return _Entry(cached.token, cached.obtained_at, cached.token.expires_at - lead)

    async def _load(self, key: CacheKey) -> CachedToken | None:
        try:
            return await self._cache.load(key)
        except CacheError as exc:
            log.warning("%s: token cache unavailable, asking the identity provider: %s", key, exc)
            return None

    async def _save(self, key: CacheKey, cached: CachedToken) -> None:
        try:
            await self._cache.store(key, cached)
        except CacheError as exc:
            log.warning("%s: token not shared: %s", key, exc)

    def _succeeded(self, state: _State, entry: _Entry) -> None:
        if state.failures:
            log.info(
                "%s: token obtained again after %d failed attempt%s",
                state.key,
                state.failures,
                "" if state.failures == 1 else "s",
            )
        state.entry = entry
        state.failures = 0
        state.last_error = None
        state.reported = None
        state.hold_until, state.hold_error = -math.inf, None
        state.next_attempt = entry.refresh_at
        self._wake.set()

    def _failed(self, state: _State, error: BrokerError) -> None:
        now = self._clock()
        state.failures += 1
        state.last_error = error
        code = f" [{error.code}]" if error.code else ""
        if isinstance(error, PermanentTokenError):
            hold = self._permanent_hold
            retry = min(
                max(self._permanent_hold, 1.0) * 2 ** min(state.failures - 1, 16),
                MAX_PERMANENT_BACKOFF,
            )
            signature = error.code or str(error)
            if state.reported != signature:
                state.reported = signature
                if self._running:
                    log.error(
                        "%s%s\n  fix: %s\n  (logins get this error without asking again for "
                        "%g s; the next attempt in the background is in %g s)",
                        error,
                        code,
                        error.fix or "see the message",
                        hold,
                        retry,
                    )
                else:  # no background refresh (the token command): no promise of one
                    log.error("%s%s\n  fix: %s", error, code, error.fix or "see the message")
            else:
                log.debug("%s: still failing%s", state.key, code)
        else:
            backoff = self._base_backoff * 2 ** min(state.failures - 1, 32)
            hold = min(backoff, self._max_backoff) * self._rng.uniform(0.5, 1.0)
            if isinstance(error, TemporaryTokenError) and error.retry_after:
                hold = max(hold, error.retry_after)
            retry = hold
            log.warning(
                "%s%s (attempt %d; trying again in %.1f s)",
                error,
                code,
                state.failures,
                hold,
            )
        state.hold_until, state.hold_error = now + hold, error
        state.next_attempt = now + retry
        self._wake.set()


def _describe(error: BrokerError) -> str:
    return f"{error} [{error.code}]" if error.code else str(error)


def _copy_error(error: Exception) -> Exception:
    """A fresh instance for each waiter, so tracebacks do not pile up on one object."""
    if isinstance(error, BrokerError):
        try:
            return copy.copy(error)
        except Exception:  # pragma: no cover - a subclass with an unusual constructor
            return error
    return error
