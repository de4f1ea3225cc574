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

**Delegated apps** (:class:`~broker.delegated.DelegatedProvider`): tokens belong to a
person, one key per *account* (the ``mailbox`` argument names it), and are renewed with the
refresh token of that person's sign-in (:class:`~broker.cache.Grant`), which lives in the
*grant store* -- the cache, unless another is given (the doctor keeps its tokens in memory
but must use and update the real sign-ins). A renewal runs under the store's
:meth:`~broker.cache.TokenCache.exclusive` lock and reads the sign-in again inside it, so
no two processes ever use one refresh token at once (identity providers that rotate refresh
tokens refuse, and may revoke, one used twice).

- *Rotation*: a new refresh token is stored -- replacing the old one in one atomic write --
  before the new access token is, and before anyone can use it. If the store fails, the new
  refresh token is kept in memory, used for the next renewal, and stored again then: until
  it is stored, the old one remains in the store, so a crash never loses both.
- *No sign-in, or a revoked one* (:class:`~broker.delegated.SignInRequired`): logins get
  the error (the temporary reply), which names the users of the account and the command
  that signs them in; it is logged once. A refresh token the identity provider refused is
  marked revoked in the store (and dropped: it is worth nothing), so that restarts and
  other instances know without asking. From then on nobody asks the identity provider for
  that account: logins re-read the store at most every :data:`SIGN_IN_RECHECK` seconds and
  the background task every :data:`SIGN_IN_WATCH` seconds, and renew as soon as someone
  has signed in again (``xoauth2-proxy authorize``). Other accounts and apps are not
  affected.
- :meth:`CachingTokenSource.sign_in_status` says, for ``status`` and ``doctor``, whether an
  account is signed in, since when, or why not -- reading the store, never asking the
  identity provider.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import logging
import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, NoReturn, Protocol, runtime_checkable

import trio

from broker.cache import CachedToken, CacheError, CacheKey, Grant
from broker.cache.memory import MemoryTokenCache
from broker.claims import expectations_for
from broker.clock import wall_clock
from broker.delegated import DelegatedProvider, SignInRequired
from broker.errors import BrokerError, PermanentTokenError, TemporaryTokenError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from broker.cache import TokenCache
    from broker.claims import Expectations
    from broker.clock import Clock
    from broker.delegated import Renewal
    from broker.model import AccessToken, App

__all__ = [
    "MIN_VALIDITY",
    "SIGN_IN_RECHECK",
    "SIGN_IN_WATCH",
    "CachingTokenSource",
    "MailboxProvider",
    "Provider",
    "SignInState",
    "SignInStatus",
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
#: Seconds logins of an account without a usable sign-in get that error before the store
#: is read again (never the identity provider).
SIGN_IN_RECHECK: Final = 5.0
#: Seconds between the background task's looks at the store for such an account.
SIGN_IN_WATCH: Final = 30.0


class SignInState(enum.Enum):
    """Where a delegated account's sign-in stands."""

    SIGNED_IN = "signed in"
    NOT_SIGNED_IN = "not signed in"
    REVOKED = "revoked"
    #: The store cannot be read now.
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class SignInStatus:
    """What is known of one account's sign-in (no secret): for ``status`` and ``doctor``."""

    app: str
    account: str
    state: SignInState
    #: The account that signed in, as the identity provider named it.
    signed_in_as: str = ""
    #: When it signed in, its refresh token was last rotated, it was found revoked.
    signed_in_at: float | None = None
    rotated_at: float | None = None
    revoked_at: float | None = None
    #: Why it is revoked, or why the store cannot be read.
    reason: str = ""
    #: The expiry of the access token this process holds, if any.
    token_expires_at: float | None = None
    #: The command that signs it in again, when it needs one.
    fix: str = ""


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
    #: A delegated app's account without a usable sign-in (``sign_in_status`` says more).
    sign_in_required: bool = False


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
    #: Delegated keys: the sign-in last read or written (used if the store cannot be read).
    grant: Grant | None = None
    #: A rotated sign-in the store did not take yet, and the refresh token it replaces
    #: (a bare string: kept out of the repr).
    unsaved: tuple[Grant, str] | None = field(default=None, repr=False)


class CachingTokenSource:
    """A :class:`TokenSource` with a cache, single-flight fetches and background refresh.

    ``providers`` overrides the provider of some apps (tests inject fakes); the others are
    built from their :class:`~broker.model.App` with :func:`broker.providers.build_provider`
    (``ValueError`` here for a misconfigured app). ``cache`` is where tokens are shared
    (default: a private :class:`~broker.cache.memory.MemoryTokenCache`); a cache passed in is
    closed by :meth:`close` only with ``close_cache=True``, so it can outlive this source
    (configuration reloads). ``grants`` is where delegated apps' sign-ins are kept (default:
    ``cache``; never closed here). ``accounts`` names, per delegated app, each account and
    the users (login names) it serves: their tokens are renewed from the start, and messages
    about a missing sign-in name them with ``authorize_command`` (the command that signs a
    user in, followed by the login name).
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
        providers: Mapping[str, Provider | MailboxProvider | DelegatedProvider] | None = None,
        cache: TokenCache | None = None,
        close_cache: bool = False,
        grants: TokenCache | None = None,
        accounts: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
        authorize_command: str = "xoauth2-proxy authorize",
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
        self._grants: TokenCache = self._cache if grants is None else grants
        self._accounts = {
            app: {account.lower(): tuple(logins) for account, logins in by_account.items()}
            for app, by_account in (accounts or {}).items()
        }
        self._authorize_command = authorize_command
        self._providers: dict[str, Provider | MailboxProvider | DelegatedProvider] = dict(
            providers or {}
        )
        self._owned: list[Provider | MailboxProvider | DelegatedProvider] = []
        missing = [name for name in self._apps if name not in self._providers]
        if missing:
            # Imported here so that importing the interface does not load msal and httpx.
            from broker.providers import build_provider

            for name in missing:
                provider = build_provider(self._apps[name])
                self._providers[name] = provider
                self._owned.append(provider)
        self._delegated = {
            name: isinstance(p, DelegatedProvider) for name, p in self._providers.items()
        }
        self._per_mailbox = {
            name: isinstance(p, MailboxProvider) or self._delegated[name]
            for name, p in self._providers.items()
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
            what = "account" if self._delegated[app] else "mailbox"
            raise PermanentTokenError(
                f"app {app!r} issues tokens per {what}, and no {what} was named",
                fix=f"Name the {what} the token is for.",
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
                    sign_in_required=isinstance(error, SignInRequired),
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

    # -- sign-ins of delegated apps -----------------------------------------------------------

    def is_delegated(self, app: str) -> bool:
        """Do ``app``'s tokens belong to people who sign in (``KeyError`` if unknown)?"""
        return self._delegated[app]

    def provider(self, app: str) -> DelegatedProvider:
        """The provider of the delegated app ``app``, for its sign-in flows."""
        provider = self._providers[app]
        if not isinstance(provider, DelegatedProvider):
            raise ValueError(f"app {app!r} is not delegated: nobody signs in to it")
        return provider

    async def sign_in_status(self, app: str, account: str) -> SignInStatus:
        """Where ``account``'s sign-in for the delegated ``app`` stands, from the store and
        what this process knows; never asks the identity provider. No secret in it."""
        self.provider(app)
        key = self._key(app, account)
        state = self._states.get(key)
        expires = state.entry.token.expires_at if state and state.entry else None
        base = SignInStatus(app, key.mailbox or "", SignInState.UNKNOWN, token_expires_at=expires)
        try:
            grant = await self._grants.load_grant(key)
        except CacheError as exc:
            return dataclasses.replace(base, reason=f"the token cache cannot be read: {exc}")
        if grant is None and state is not None and state.unsaved is not None:
            grant = state.unsaved[0]
        if grant is None:
            return dataclasses.replace(
                base, state=SignInState.NOT_SIGNED_IN, fix=self._authorize_fix(key)
            )
        seen = dataclasses.replace(
            base,
            signed_in_as=grant.account,
            signed_in_at=grant.signed_in_at,
            rotated_at=grant.rotated_at,
        )
        if grant.revoked:
            return dataclasses.replace(
                seen,
                state=SignInState.REVOKED,
                revoked_at=grant.revoked_at,
                reason=grant.revoked,
                fix=self._authorize_fix(key),
            )
        return dataclasses.replace(seen, state=SignInState.SIGNED_IN)

    async def complete_sign_in(
        self, app: str, account: str, renewal: Renewal, *, signed_in_as: str
    ) -> None:
        """Keep the sign-in that just succeeded for ``account`` (checked by the caller to be
        the person ``signed_in_as``): its refresh token replaces any earlier sign-in, and
        its token serves logins at once. :class:`~broker.cache.CacheError` if the store
        cannot keep it; ``ValueError`` if the sign-in gave no refresh token."""
        if not renewal.refresh_token:
            raise ValueError("the sign-in gave no refresh token")
        key = self._key(app, account)
        now = self._clock()
        grant = Grant(renewal.refresh_token, signed_in_as.lower(), now, now)
        async with self._grants.exclusive(key):
            await self._grants.store_grant(key, grant)
        cached = CachedToken(renewal.token, now)
        await self._save(key, cached)
        state = self._state(app, account)
        state.grant, state.unsaved = grant, None
        self._succeeded(state, self._entry(cached))

    def _key(self, app: str, mailbox: str | None) -> CacheKey:
        key = self._app_keys[app]
        if mailbox is not None:
            key = CacheKey(key.app, key.identity, key.scope, mailbox.lower())
        return key

    def _state(self, app: str, mailbox: str | None) -> _State:
        key = self._key(app, mailbox)
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

        Fetches every app-wide token and every configured account's token at once (other
        mailbox tokens are fetched at first use), then
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
                wanted: list[tuple[str, str | None]] = [
                    (name, None) for name in self._apps if not self._per_mailbox[name]
                ]
                wanted += [
                    (name, account)
                    for name, by_account in self._accounts.items()
                    if self._delegated.get(name)
                    for account in by_account
                ]
                for name, account in wanted:
                    state = self._state(name, account)
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
        if self._delegated[state.key.app]:
            return await self._obtain_delegated(state)
        key = state.key
        shared = await self._load(key)
        if (entry := self._shared_entry(shared, state)) is not None:
            return entry
        async with self._cache.exclusive(key):
            shared = await self._load(key)
            if (entry := self._shared_entry(shared, state)) is not None:
                return entry
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

    # -- delegated apps ---------------------------------------------------------------------

    async def _obtain_delegated(self, state: _State) -> _Entry:
        """A fresh token for a person's key: shared, or renewed with their sign-in."""
        key = state.key
        shared = await self._load(key)
        if (entry := self._shared_entry(shared, state)) is not None:
            return entry
        async with self._grants.exclusive(key):
            shared = await self._load(key)
            if (entry := self._shared_entry(shared, state)) is not None:
                return entry
            grant = await self._current_grant(state)
            obtained_at = self._clock()
            provider = self._providers[key.app]
            assert isinstance(provider, DelegatedProvider)
            try:
                renewal = await self._within_deadline(key, provider.refresh(grant.refresh_token))
            except SignInRequired as exc:
                self._told(key.app, exc.kind)
                await self._revoked(state, grant, exc)
                raise self._sign_in_error(key, exc) from None
            except BrokerError as exc:
                self._told(key.app, exc.kind)
                self._keep_as_fallback(state, shared)
                raise
            self._told(key.app, "success")
            if renewal.refresh_token and renewal.refresh_token != grant.refresh_token:
                await self._rotate(state, grant, renewal.refresh_token)
            cached = CachedToken(renewal.token, obtained_at)
            await self._save(key, cached)
        return self._entry(cached)

    async def _current_grant(self, state: _State) -> Grant:
        """The sign-in to renew with: the store's, or one it has not taken yet; else
        :class:`SignInRequired` (without asking the identity provider)."""
        key = state.key
        try:
            stored = await self._grants.load_grant(key)
        except CacheError as exc:
            if state.grant is None:
                raise TemporaryTokenError(
                    f"{key}: the sign-in cannot be read from the token cache: {exc}",
                    code="CACHE",
                    fix="Check the token cache (file permissions, Redis); the broker retries.",
                ) from None
            log.warning(
                "%s: token cache unavailable, renewing with the sign-in in memory: %s", key, exc
            )
            stored = state.grant
        if state.unsaved is not None:
            pending, replaced = state.unsaved
            if stored is None or stored.refresh_token == replaced:
                stored = pending  # the store never took our rotation: it is the live one
                await self._store_rotation(state, pending, replaced)
            else:
                state.unsaved = None  # the store moved on: a new sign-in, or another instance
        state.grant = stored
        if stored is None:
            raise self._sign_in_error(
                key,
                SignInRequired(
                    "nobody has signed in yet",
                    code="NOT_SIGNED_IN",
                    fix="Nobody has signed in for this account yet.",
                ),
            )
        if stored.revoked:
            raise self._sign_in_error(
                key,
                SignInRequired(
                    f"the identity provider refused its sign-in ({stored.revoked})",
                    code="SIGN_IN_REVOKED",
                    fix="The identity provider no longer accepts the sign-in.",
                    revoked=True,
                ),
            )
        return stored

    async def _rotate(self, state: _State, grant: Grant, refresh_token: str) -> None:
        """Keep the new refresh token: stored in place of the old one, or in memory."""
        rotated = dataclasses.replace(grant, refresh_token=refresh_token, rotated_at=self._clock())
        state.grant = rotated
        await self._store_rotation(state, rotated, grant.refresh_token)

    async def _store_rotation(self, state: _State, rotated: Grant, replaced: str) -> None:
        try:
            await self._grants.store_grant(state.key, rotated)
        except CacheError as exc:
            state.unsaved = (rotated, replaced)
            log.error(
                "%s: the identity provider replaced the refresh token, and the new one could "
                "not be stored (%s); it is kept in memory and stored at the next renewal. "
                "Fix the token cache: if this process stops first, the sign-in may be lost.",
                state.key,
                exc,
            )
        else:
            state.unsaved = None

    async def _revoked(self, state: _State, grant: Grant, error: SignInRequired) -> None:
        """Mark the sign-in revoked in the store (dropping its refresh token), unless
        someone replaced it meanwhile (a new sign-in)."""
        state.grant = state.unsaved = None
        try:
            stored = await self._grants.load_grant(state.key)
            if stored is not None and stored.refresh_token != grant.refresh_token:
                return
            reason = f"{error.code}: {error}" if error.code else str(error)
            marked = dataclasses.replace(
                grant, refresh_token="", revoked=reason, revoked_at=self._clock()
            )
            await self._grants.store_grant(state.key, marked)
        except CacheError as exc:
            log.warning(
                "%s: cannot record in the token cache that the sign-in was revoked: %s",
                state.key,
                exc,
            )

    def _sign_in_error(self, key: CacheKey, error: SignInRequired) -> SignInRequired:
        """``error`` for ``key``, saying who must sign in again and how."""
        fix = self._authorize_fix(key)
        text = str(error)
        message = text if text.startswith(str(key)) else f"{key}: {text}"
        users = self._logins(key)
        if users:
            message += f" (user{'s' if len(users) > 1 else ''} {', '.join(map(repr, users))})"
        return SignInRequired(
            message,
            code=error.code,
            fix=f"{error.fix.rstrip()} {fix}".strip(),
            revoked=error.revoked,
            account=key.mailbox or "",
            command=self._authorize_command,
        )

    def _logins(self, key: CacheKey) -> tuple[str, ...]:
        return self._accounts.get(key.app, {}).get(key.mailbox or "", ())

    def _authorize_fix(self, key: CacheKey) -> str:
        users = self._logins(key)
        who = users[0] if users else "USER"
        also = f" (or any of its users: {', '.join(users)})" if len(users) > 1 else ""
        return (
            f"Run `{self._authorize_command} {who}`{also} as the user the proxy runs as, and "
            f"sign in as {key.mailbox}."
        )

    # -- asking the provider ----------------------------------------------------------------

    async def _within_deadline(self, key: CacheKey, request: Awaitable[Renewal]) -> Renewal:
        """``request``'s answer, if it comes within ``fetch_timeout`` seconds."""
        with trio.move_on_after(self._fetch_timeout):
            return await request
        raise self._timed_out(key)

    def _timed_out(self, key: CacheKey) -> TemporaryTokenError:
        return TemporaryTokenError(
            f"{key}: the identity provider did not answer within {self._fetch_timeout:g} s",
            code="FETCH_TIMEOUT",
            fix="Nothing to change: the broker retries. If it persists, check the network "
            "path (and any HTTPS proxy) to the identity provider, and its status.",
        )

    async def _ask(self, key: CacheKey) -> AccessToken:
        """The provider's new token, if it comes within ``fetch_timeout`` seconds."""
        provider = self._providers[key.app]
        with trio.move_on_after(self._fetch_timeout):
            if isinstance(provider, MailboxProvider):
                assert key.mailbox is not None
                return await provider.fetch_for(key.mailbox)
            assert isinstance(provider, Provider)
            return await provider.fetch()
        raise self._timed_out(key)

    def _shared_entry(self, shared: CachedToken | None, state: _State) -> _Entry | None:
        """The cache's token, if it is fresh (:meth:`_fresh`): someone else renewed it."""
        if shared is None or not self._fresh(shared, state):
            return None
        self._told(state.key.app, "shared_cache")
        return self._entry(shared)

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
        if isinstance(state.hold_error, SignInRequired):
            log.info("%s: signed in again; tokens are renewed again", state.key)
        elif state.failures:
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
        if isinstance(error, SignInRequired):
            # Nobody asks the identity provider until someone signs in: only the store is
            # read again, by logins and by the background task.
            hold, retry = min(self._permanent_hold, SIGN_IN_RECHECK), SIGN_IN_WATCH
            # Found revoked, then read as revoked from the store: one event, logged once.
            signature = "sign-in revoked" if error.revoked else "no sign-in"
            if state.reported != signature:
                state.reported = signature
                log.error("%s%s\n  fix: %s", error, code, error.fix)
            else:
                log.debug("%s: still no usable sign-in%s", state.key, code)
        elif isinstance(error, PermanentTokenError):
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
