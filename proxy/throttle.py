"""Failed-login throttling: a growing delay, then a temporary lockout.

Theory of operation
-------------------
Failures are counted under three keys: the login name (case-folded, whether or not such a
user exists, so that the answers reveal nothing), the source *network* (the IPv4 address,
or the IPv6 /64: one customer's allocation, which an attacker could otherwise walk
through), and the pair of the two. A key forgets its failures ``window`` seconds after the
last one.

A pair is *trusted* for ``trust_ttl`` seconds after a successful login: that program, on
that network, knew the password. Trusted pairs are judged by their own failures only, so
attacks from elsewhere -- on the same login from other networks, or on other logins from
the same network (a shared NAT) -- cannot lock a real program out of its own account. For
any other pair every key counts:

* **Delay.** With ``n`` failures under the worst key, the attempt waits
  ``base_delay * 2**(n - 1)`` seconds, at most ``max_delay``, before its password is
  checked. A legacy program with a stale password slows down; a guesser slows down more.
* **Lockout.** After ``login_lockout`` failures of one login (or of one trusted pair), or
  ``network_lockout`` failures from one network, attempts are refused outright for
  ``lockout`` seconds, without checking the password, and answered as a wrong password
  would be.

A success clears only its pair's failures and trusts the pair; the login's and the
network's counts run out with their window, so an attacker cannot reset them by logging
in to an account of their own. All state is in memory, per process, bounded: at most
``max_keys`` keys per table, the least recently touched dropped first.

The clock is injected (``trio.current_time`` by default), so tests drive it with a
MockClock. Nothing here sleeps; the caller does.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["LoginThrottle", "ThrottlePolicy", "Verdict", "network_of"]


@dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    """The ``[limits]`` settings that govern failed logins (seconds and counts)."""

    base_delay: float = 1.0
    max_delay: float = 16.0
    window: float = 900.0
    login_lockout: int = 10
    network_lockout: int = 30
    lockout: float = 900.0
    trust_ttl: float = 30 * 86400.0
    max_keys: int = 100_000

    def __post_init__(self) -> None:
        if min(self.base_delay, self.max_delay, self.window, self.lockout, self.trust_ttl) < 0:
            raise ValueError("throttle times must not be negative")
        if min(self.login_lockout, self.network_lockout, self.max_keys) < 1:
            raise ValueError("throttle counts must be at least 1")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with a login attempt before its password is checked."""

    #: Seconds to wait before checking the password (and answering).
    delay: float = 0.0
    #: Why the attempt is refused without checking the password, or ``None``.
    locked: str | None = None


@dataclass(slots=True)
class _Failures:
    count: int
    last: float
    locked_until: float = 0.0


def network_of(address: str) -> str:
    """The key of ``address``'s network: the address itself for IPv4, the /64 for IPv6."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # a Unix socket or something else: count it as it is
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class _Table:
    """Failure records per key, least recently touched first, bounded."""

    def __init__(self, max_keys: int) -> None:
        self._records: OrderedDict[str, _Failures] = OrderedDict()
        self._max_keys = max_keys

    def __len__(self) -> int:
        return len(self._records)

    def current(self, key: str, now: float, window: float) -> _Failures | None:
        record = self._records.get(key)
        if record is None:
            return None
        if now - record.last > window and now >= record.locked_until:
            del self._records[key]
            return None
        return record

    def fail(self, key: str, now: float, window: float) -> _Failures:
        record = self.current(key, now, window)
        if record is None:
            record = self._records[key] = _Failures(0, now)
        record.count += 1
        record.last = now
        self._records.move_to_end(key)
        while len(self._records) > self._max_keys:
            self._records.popitem(last=False)
        return record

    def clear(self, key: str) -> None:
        self._records.pop(key, None)


class LoginThrottle:
    """Counts failed logins per login name, source network and pair; see the module doc."""

    def __init__(
        self,
        policy: ThrottlePolicy | None = None,
        *,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.policy = policy or ThrottlePolicy()
        self._clock = clock
        self._logins = _Table(self.policy.max_keys)
        self._networks = _Table(self.policy.max_keys)
        self._pairs = _Table(self.policy.max_keys)
        #: pair key -> when the trust ends.
        self._trusted: OrderedDict[str, float] = OrderedDict()

    def __repr__(self) -> str:
        return (
            f"<LoginThrottle logins={len(self._logins)} networks={len(self._networks)} "
            f"trusted={len(self._trusted)}>"
        )

    def verdict(self, login: str, address: str) -> Verdict:
        """How to treat an attempt for ``login`` from ``address``, before checking it."""
        policy, now = self.policy, self._clock()
        keys = _Keys(login, address)
        records = []
        if not self._is_trusted(keys.pair, now):
            records += [
                (self._networks.current(keys.network, now, policy.window), "source network"),
                (self._logins.current(keys.login, now, policy.window), "login"),
            ]
        records.append(
            (self._pairs.current(keys.pair, now, policy.window), "login from this network")
        )
        for record, what in records:
            if record is not None and now < record.locked_until:
                return Verdict(locked=f"{what} locked out after {record.count} failures")
        failures = max((record.count for record, _ in records if record is not None), default=0)
        if failures == 0:
            return Verdict()
        return Verdict(delay=min(policy.base_delay * 2 ** min(failures - 1, 62), policy.max_delay))

    def failed(self, login: str, address: str) -> None:
        """Count a failed attempt (wrong password, unknown user, refused mailbox...)."""
        policy, now = self.policy, self._clock()
        keys = _Keys(login, address)
        tables = [(self._pairs, keys.pair, policy.login_lockout)]
        if not self._is_trusted(keys.pair, now):
            tables += [
                (self._logins, keys.login, policy.login_lockout),
                (self._networks, keys.network, policy.network_lockout),
            ]
        for table, key, threshold in tables:
            record = table.fail(key, now, policy.window)
            if record.count >= threshold:
                record.locked_until = now + policy.lockout

    def succeeded(self, login: str, address: str) -> None:
        """Clear the pair's failures and trust it for ``trust_ttl`` seconds."""
        pair = _Keys(login, address).pair
        self._pairs.clear(pair)
        self._trusted[pair] = self._clock() + self.policy.trust_ttl
        self._trusted.move_to_end(pair)
        while len(self._trusted) > self.policy.max_keys:
            self._trusted.popitem(last=False)

    def _is_trusted(self, pair: str, now: float) -> bool:
        until = self._trusted.get(pair)
        return until is not None and now < until


class _Keys:
    __slots__ = ("login", "network", "pair")

    def __init__(self, login: str, address: str) -> None:
        self.login = login.casefold()
        self.network = network_of(address)
        self.pair = f"{self.login}\x00{self.network}"
