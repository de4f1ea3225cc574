"""Failed-login throttling: a growing delay, then a lockout, with a bound per login.

Theory of operation
-------------------
Failures are counted over a sliding window (``window`` seconds, an hour by default) under
three keys: the *login* (the caller's key, which names the kind of credential and whom it
claims to be: ``password:reports@contoso.com``, ``certificate:<sha256>``,
``app-key:erp``, so that one kind cannot lock out another), the source *network* (an IPv4
address, or an IPv6 /64: one customer's allocation, which an attacker could otherwise walk
through; both prefix lengths are settings), and the *pair* of the two.

A pair is *trusted* for ``trust_ttl`` seconds after a successful login: that program, on
that network, knew the password. Trust changes only which ceiling applies; a success never
erases failures, they age out of the window.

* **Lockout.** An attempt from an untrusted pair is refused, without checking the
  password and with the answer a wrong password gets, while the login has
  ``login_lockout`` failures in the window (counted from anywhere) or the network has
  ``network_lockout``. An attempt from a trusted pair is refused while the login has
  ``trusted_lockout`` failures in the window: a higher ceiling, so that guessing from
  elsewhere (which stops at ``login_lockout``) cannot lock a real program out of its
  account. Failures from trusted pairs count for the login, not for the network, so a
  program with a stale password does not lock its office out.
* **The bound.** Since every failure counts for the login and nothing erases it, no one
  gets more than ``trusted_lockout`` guesses at a login per window, whatever their
  position, and no more than ``login_lockout`` from networks the login has not succeeded
  from (parallel attempts may pass one or two more: the hash pool re-checks before each
  computation, ``hash_concurrency`` at a time).
* **Delay.** With ``n`` failures under the worst key that applies (for a trusted pair,
  the pair's own), the attempt waits ``base_delay * 2**(n - 1)`` seconds, at most
  ``max_delay``, before its password is checked.

State is kept in memory, per process, bounded: at most ``max_keys`` keys per table, the
least recently touched dropped first, each holding only the newest timestamps it needs.
With a :class:`SharedFailures` store (Redis, when the token cache is in Redis), failures
and trust are also recorded there and counted across every instance behind a load
balancer, so N instances do not give an attacker N times the guesses; while the store
cannot be reached, each instance judges by its own counts, and says so in the log.
The clocks are injected (``trio.current_time`` for the local tables, the wall clock for the
shared store), so tests drive them. Nothing here sleeps; the caller does.
"""

from __future__ import annotations

import array
import functools
import ipaddress
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio

from proxy.names import fold_case

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = [
    "Lockout",
    "LoginThrottle",
    "SharedFailures",
    "SharedUnavailable",
    "ThrottlePolicy",
    "Verdict",
    "network_of",
]

log = logging.getLogger("xoauth2_proxy.throttle")


class SharedUnavailable(Exception):
    """The shared store did not answer; ``str()`` says why (safe to log)."""


class SharedFailures(Protocol):
    """Failure times and trust shared by every instance (wall-clock seconds)."""

    async def counts(self, keys: Sequence[str], since: float) -> list[int]:
        """Failures under each of ``keys`` after ``since``."""
        ...

    async def is_trusted(self, pair: str) -> bool: ...

    async def record(self, keys: Sequence[tuple[str, int]], now: float, window: float) -> None:
        """A failure at ``now`` under each key, keeping its newest ``keep`` times."""
        ...

    async def trust(self, pair: str, ttl: float) -> None: ...

    async def forget(self, keys: Sequence[str]) -> None:
        """Drop every failure under ``keys`` (an operator's unlock)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    """The ``[limits]`` settings that govern failed logins (seconds and counts)."""

    base_delay: float = 1.0
    max_delay: float = 16.0
    window: float = 3600.0
    login_lockout: int = 10
    trusted_lockout: int = 30
    network_lockout: int = 30
    trust_ttl: float = 30 * 86400.0
    max_keys: int = 100_000
    #: What a "network" is: the prefix length of an IPv4 and of an IPv6 source address.
    ipv4_prefix: int = 32
    ipv6_prefix: int = 64

    def __post_init__(self) -> None:
        if min(self.base_delay, self.max_delay, self.window, self.trust_ttl) < 0:
            raise ValueError("throttle times must not be negative")
        counts = (self.login_lockout, self.trusted_lockout, self.network_lockout, self.max_keys)
        if min(counts) < 1:
            raise ValueError("throttle counts must be at least 1")
        if not (0 <= self.ipv4_prefix <= 32 and 0 <= self.ipv6_prefix <= 128):
            raise ValueError("network prefix lengths must fit their address family")

    def network_of(self, address: str) -> str:
        return network_of(address, ipv4_prefix=self.ipv4_prefix, ipv6_prefix=self.ipv6_prefix)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with a login attempt before its password is checked."""

    #: Seconds to wait before checking the password (and answering).
    delay: float = 0.0
    #: Why the attempt is refused without checking the password, or ``None``.
    locked: str | None = None


@dataclass(frozen=True, slots=True)
class Lockout:
    """A login or a network locked out now (for status reports; no secret in it)."""

    #: ``login`` or ``network``.
    scope: str
    #: The throttle key (``password:LOGIN``, ``certificate:SHA256``, ``app-key:USER``) or
    #: the network.
    key: str
    failures: int
    #: Seconds until enough failures age out of the window to lift it.
    remaining: float
    #: For a login: locked for every network (``trusted_lockout`` reached), or only for
    #: networks it has not succeeded from.
    everywhere: bool = True


@functools.lru_cache(maxsize=4096)
def network_of(address: str, *, ipv4_prefix: int = 32, ipv6_prefix: int = 64) -> str:
    """The key of ``address``'s network: by default the IPv4 address itself or the IPv6
    /64 (an IPv4-mapped IPv6 address counts as IPv4). Remembered: every connection and
    login asks, and parsing an address costs more than the rest of a throttle check."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # a Unix socket or something else: count it as it is
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = ipv6_prefix if isinstance(ip, ipaddress.IPv6Address) else ipv4_prefix
    if prefix == ip.max_prefixlen:
        return str(ip)
    return str(ipaddress.ip_network((ip, prefix), strict=False))


class _Table:
    """Failure times per key (oldest first), least recently touched key first, bounded."""

    def __init__(self, max_keys: int) -> None:
        self._records: OrderedDict[str, array.array[float]] = OrderedDict()
        self._max_keys = max_keys

    def __len__(self) -> int:
        return len(self._records)

    def count(self, key: str, now: float, window: float) -> int:
        """Failures of ``key`` in the last ``window`` seconds (forgetting older ones)."""
        times = self._records.get(key)
        if times is None:
            return 0
        aged = 0
        while aged < len(times) and now - times[aged] >= window:
            aged += 1
        if aged:
            del times[:aged]
            if not times:
                del self._records[key]
        return len(times)

    def snapshot(self) -> list[str]:
        return list(self._records)

    def holding_at_least(self, n: int) -> list[str]:
        """Keys with at least ``n`` failure times kept: the only ones ``n`` failures in a
        window can lock out (cheap to find, whatever the number of keys)."""
        return [key for key, times in self._records.items() if len(times) >= n]

    def nth_newest(self, key: str, n: int) -> float:
        """The time of ``key``'s ``n``-th newest failure (1: the newest)."""
        return self._records[key][-n]

    def forget(self, key: str) -> bool:
        return self._records.pop(key, None) is not None

    def add(self, key: str, now: float, keep: int) -> None:
        """Record a failure of ``key``; only the newest ``keep`` times are kept."""
        times = self._records.get(key)
        if times is None:
            times = self._records[key] = array.array("d")
        times.append(now)
        if len(times) > keep:
            del times[: len(times) - keep]
        self._records.move_to_end(key)
        while len(self._records) > self._max_keys:
            self._records.popitem(last=False)


class LoginThrottle:
    """Counts failed logins per login, source network and pair; see the module doc."""

    def __init__(
        self,
        policy: ThrottlePolicy | None = None,
        *,
        clock: Callable[[], float] = trio.current_time,
        shared: SharedFailures | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy or ThrottlePolicy()
        self._clock = clock
        self._logins = _Table(self.policy.max_keys)
        self._networks = _Table(self.policy.max_keys)
        self._pairs = _Table(self.policy.max_keys)
        #: pair key -> when the trust ends.
        self._trusted: OrderedDict[str, float] = OrderedDict()
        self.shared = shared
        self._wall = wall_clock
        #: Why the shared store failed last, while it is failing (logged once per outage).
        self._outage: str | None = None

    def __repr__(self) -> str:
        return (
            f"<LoginThrottle logins={len(self._logins)} networks={len(self._networks)} "
            f"trusted={len(self._trusted)}{' shared' if self.shared else ''}>"
        )

    def local_verdict(self, login: str, address: str) -> Verdict:
        """How to treat an attempt for ``login`` (a key naming the credential's kind and
        whom it claims to be) from ``address``, by this instance's own counts."""
        now, window = self._clock(), self.policy.window
        keys = _Keys(login, address, self.policy)
        return self._judge(
            logins=self._logins.count(keys.login, now, window),
            networks=self._networks.count(keys.network, now, window),
            pairs=self._pairs.count(keys.pair, now, window),
            trusted=self._is_trusted(keys.pair, now),
        )

    async def verdict(self, login: str, address: str) -> Verdict:
        """As :meth:`local_verdict`, by the counts of every instance when they are shared."""
        if self.shared is None:
            await trio.lowlevel.checkpoint()
            return self.local_verdict(login, address)
        keys = _Keys(login, address, self.policy)
        try:
            logins, networks, pairs = await self.shared.counts(
                [keys.login, keys.network, keys.pair], self._wall() - self.policy.window
            )
            trusted = await self.shared.is_trusted(keys.pair)
        except SharedUnavailable as exc:
            self._shared_failed(exc)
            return self.local_verdict(login, address)
        self._shared_works()
        now, window = self._clock(), self.policy.window
        # This instance's own failures count even if the store lost them (a restart).
        return self._judge(
            logins=max(logins, self._logins.count(keys.login, now, window)),
            networks=max(networks, self._networks.count(keys.network, now, window)),
            pairs=max(pairs, self._pairs.count(keys.pair, now, window)),
            trusted=trusted or self._is_trusted(keys.pair, now),
        )

    async def failed(self, login: str, address: str) -> None:
        """Count a failed attempt (wrong password, unknown user, refused mailbox...)."""
        policy, now = self.policy, self._clock()
        keys = _Keys(login, address, policy)
        counted = [(keys.login, max(policy.trusted_lockout, policy.login_lockout))]
        counted.append((keys.pair, policy.login_lockout))
        if not self._is_trusted(keys.pair, now):
            counted.append((keys.network, policy.network_lockout))
        tables = {keys.login: self._logins, keys.pair: self._pairs, keys.network: self._networks}
        for key, keep in counted:
            tables[key].add(key, now, keep)
        if self.shared is not None:
            try:
                await self.shared.record(counted, self._wall(), policy.window)
            except SharedUnavailable as exc:
                self._shared_failed(exc)
            else:
                self._shared_works()
        else:
            await trio.lowlevel.checkpoint()

    async def succeeded(self, login: str, address: str) -> None:
        """Trust the pair for ``trust_ttl`` seconds (its failures stay until they age out)."""
        pair = _Keys(login, address, self.policy).pair
        self._trusted[pair] = self._clock() + self.policy.trust_ttl
        self._trusted.move_to_end(pair)
        while len(self._trusted) > self.policy.max_keys:
            self._trusted.popitem(last=False)
        if self.shared is not None:
            try:
                await self.shared.trust(pair, self.policy.trust_ttl)
            except SharedUnavailable as exc:
                self._shared_failed(exc)
            else:
                self._shared_works()
        else:
            await trio.lowlevel.checkpoint()

    def lockouts(self, now: float | None = None) -> list[Lockout]:
        """The logins and networks this instance sees locked out at ``now`` (default: its
        clock's now), by its own counts (a shared store holds no names to list)."""
        policy = self.policy
        now = self._clock() if now is None else now
        found: list[Lockout] = []
        tables = (
            ("login", self._logins, policy.login_lockout),
            ("network", self._networks, policy.network_lockout),
        )
        for scope, table, ceiling in tables:
            for key in table.holding_at_least(ceiling):
                failures = table.count(key, now, policy.window)
                if failures < ceiling:
                    continue
                # Lifted when the failure that reached the ceiling ages out.
                lifted = table.nth_newest(key, ceiling) + policy.window
                everywhere = scope == "network" or failures >= policy.trusted_lockout
                found.append(Lockout(scope, key, failures, max(lifted - now, 0.0), everywhere))
        return found

    async def unlock(self, key: str) -> bool:
        """Forget every failure of a login (its throttle key, as :meth:`lockouts` names
        it) or of a network, here and in the shared store; return whether this instance
        had any. (The store's per-pair counts, which only set delays, age out.)"""
        key = fold_case(key)  # networks are written in lower case already
        forgot = self._logins.forget(key) | self._networks.forget(key)
        prefix = f"{key}\x00"
        for pair in self._pairs.snapshot():
            if pair.startswith(prefix):
                forgot |= self._pairs.forget(pair)
        if self.shared is not None:
            try:
                await self.shared.forget([key])
            except SharedUnavailable as exc:
                self._shared_failed(exc)
            else:
                self._shared_works()
        else:
            await trio.lowlevel.checkpoint()
        return forgot

    def _judge(self, *, logins: int, networks: int, pairs: int, trusted: bool) -> Verdict:
        policy = self.policy
        if trusted:
            if logins >= policy.trusted_lockout:
                return Verdict(locked=self._locked("login", logins))
            failures = pairs
        else:
            if networks >= policy.network_lockout:
                return Verdict(locked=self._locked("source network", networks))
            if logins >= policy.login_lockout:
                return Verdict(locked=self._locked("login", logins))
            failures = max(logins, networks)
        if failures == 0:
            return Verdict()
        return Verdict(delay=min(policy.base_delay * 2 ** min(failures - 1, 62), policy.max_delay))

    def _shared_failed(self, exc: SharedUnavailable) -> None:
        if self._outage is None:
            log.warning(
                "failed-login counts: the shared store is unavailable (%s); this instance "
                "counts its own until it is back",
                exc,
            )
        self._outage = str(exc)

    def _shared_works(self) -> None:
        if self._outage is not None:
            log.warning("failed-login counts: the shared store is back; counting together again")
            self._outage = None

    def _is_trusted(self, pair: str, now: float) -> bool:
        until = self._trusted.get(pair)
        return until is not None and now < until

    def _locked(self, what: str, failures: int) -> str:
        return f"{what} locked out after {failures} failures in {self.policy.window:g}s"


class _Keys:
    __slots__ = ("login", "network", "pair")

    def __init__(self, login: str, address: str, policy: ThrottlePolicy) -> None:
        self.login = fold_case(login)
        self.network = policy.network_of(address)
        self.pair = f"{self.login}\x00{self.network}"
