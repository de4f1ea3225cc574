"""Failed-login throttling: delays, lockouts, the bound per login, and what an attacker
cannot do with them."""

from __future__ import annotations

import pytest

from proxy.throttle import LoginThrottle, ThrottlePolicy, Verdict, network_of

POLICY = ThrottlePolicy(
    base_delay=1.0,
    max_delay=16.0,
    window=3600.0,
    login_lockout=5,
    trusted_lockout=12,
    network_lockout=8,
)
LOGIN = "password:reports@contoso.com"
REAL = "192.0.2.10"
ATTACKER = "198.51.100.66"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def throttle(clock: Clock) -> LoginThrottle:
    return LoginThrottle(POLICY, clock=clock)


async def test_no_failures_no_delay(throttle: LoginThrottle) -> None:
    assert throttle.local_verdict(LOGIN, REAL) == Verdict()


async def test_delay_doubles_up_to_the_cap() -> None:
    policy = ThrottlePolicy(login_lockout=100, trusted_lockout=100, network_lockout=100)
    throttle = LoginThrottle(policy, clock=Clock())
    delays = []
    for _ in range(7):
        await throttle.failed(LOGIN, ATTACKER)
        delays.append(throttle.local_verdict(LOGIN, ATTACKER).delay)
    assert delays == [1, 2, 4, 8, 16, 16, 16]


async def test_login_lockout_spares_the_network_the_login_works_from(
    throttle: LoginThrottle, clock: Clock
) -> None:
    await throttle.succeeded(LOGIN, REAL)  # the real program logged in from its network
    for _ in range(POLICY.login_lockout):
        await throttle.failed(LOGIN.upper(), ATTACKER)  # case does not matter
    assert (
        throttle.local_verdict(LOGIN, ATTACKER).locked
        == "login locked out after 5 failures in 3600s"
    )
    assert throttle.local_verdict(LOGIN, "203.0.113.7").locked is not None  # any other network too
    assert throttle.local_verdict(LOGIN, REAL) == Verdict()  # no lockout, no delay
    clock.now += POLICY.window - 1
    assert throttle.local_verdict(LOGIN, ATTACKER).locked is not None
    clock.now += 1  # the failures have aged out of the window
    assert throttle.local_verdict(LOGIN, ATTACKER) == Verdict()


async def test_the_window_slides(throttle: LoginThrottle, clock: Clock) -> None:
    for _ in range(POLICY.login_lockout):
        await throttle.failed(LOGIN, ATTACKER)
        clock.now += 600
    # The first failure is 3000 s old, the last 600 s: locked until the first ages out.
    clock.now += 599
    assert throttle.local_verdict(LOGIN, ATTACKER).locked is not None
    clock.now += 1
    assert throttle.local_verdict(LOGIN, ATTACKER).locked is None
    await throttle.failed(LOGIN, ATTACKER)  # four left in the window, plus this one
    assert throttle.local_verdict(LOGIN, ATTACKER).locked is not None


async def test_a_guesser_beside_the_real_program_gets_the_trusted_ceiling_and_no_more(
    throttle: LoginThrottle,
) -> None:
    """Issue: the real program's successes erased the pair's failures, and trusted pairs
    skipped every other count, so a guesser behind the same NAT was never locked out."""
    checked = 0
    for n in range(100):
        if n % 4 == 0:
            await throttle.succeeded(LOGIN, REAL)  # the program logs in every 15 s
        if throttle.local_verdict(LOGIN, REAL).locked is None:
            checked += 1
            await throttle.failed(LOGIN, REAL)  # the guesser, from the same address
    assert checked == POLICY.trusted_lockout
    assert (
        throttle.local_verdict(LOGIN, REAL).locked == "login locked out after 12 failures in 3600s"
    )


async def test_guesses_elsewhere_cannot_lock_out_the_trusted_network(
    throttle: LoginThrottle,
) -> None:
    await throttle.succeeded(LOGIN, REAL)
    for n in range(50):
        where = f"203.0.113.{n}"  # a botnet: a new network for each guess
        if throttle.local_verdict(LOGIN, where).locked is None:
            await throttle.failed(LOGIN, where)
    assert throttle.local_verdict(LOGIN, ATTACKER).locked is not None
    assert throttle.local_verdict(LOGIN, REAL) == Verdict()


@pytest.mark.parametrize("trusted_guesser", [False, True])
async def test_at_most_the_trusted_ceiling_per_window_whatever_the_position(
    clock: Clock, trusted_guesser: bool
) -> None:
    """A guess each second for a day, from everywhere at once; the bound is per window."""
    throttle = LoginThrottle(POLICY, clock=clock)
    await throttle.succeeded(LOGIN, REAL)
    positions = [REAL, ATTACKER, "2001:db8::1"] if trusted_guesser else [ATTACKER, "2001:db8::1"]
    checked: list[float] = []
    for second in range(24 * 3600):
        clock.now = 1000.0 + second
        where = positions[second % len(positions)]
        if throttle.local_verdict(LOGIN, where).locked is None:
            checked.append(clock.now)
            await throttle.failed(LOGIN, where)
    ceiling = POLICY.trusted_lockout if trusted_guesser else POLICY.login_lockout
    for start in checked:
        in_window = [t for t in checked if start <= t < start + POLICY.window]
        assert len(in_window) <= ceiling
    assert len(checked) == 24 * ceiling  # and the ceiling is reached in each window


async def test_network_lockout_covers_every_login_but_spares_trusted_pairs(
    throttle: LoginThrottle, clock: Clock
) -> None:
    await throttle.succeeded("password:scanner@contoso.com", ATTACKER)  # a real program behind NAT
    for n in range(POLICY.network_lockout):
        await throttle.failed(f"password:guess{n}@contoso.com", ATTACKER)  # password spraying
    assert throttle.local_verdict("password:new@contoso.com", ATTACKER).locked == (
        "source network locked out after 8 failures in 3600s"
    )
    assert throttle.local_verdict("password:scanner@contoso.com", ATTACKER) == Verdict()
    assert throttle.local_verdict("password:new@contoso.com", REAL) == Verdict()
    clock.now += POLICY.window
    assert throttle.local_verdict("password:new@contoso.com", ATTACKER).locked is None


async def test_a_success_erases_nothing(throttle: LoginThrottle) -> None:
    """Logging in to an account of one's own does not reset the network's count, nor does
    the real program's success reset the login's."""
    for n in range(POLICY.network_lockout - 1):
        await throttle.failed(f"password:guess{n}@contoso.com", ATTACKER)
    await throttle.succeeded("password:attacker@contoso.com", ATTACKER)
    await throttle.failed("password:guess-last@contoso.com", ATTACKER)
    assert throttle.local_verdict("password:another@contoso.com", ATTACKER).locked is not None
    for _ in range(POLICY.login_lockout):
        await throttle.failed(LOGIN, "203.0.113.9")
    await throttle.succeeded(LOGIN, "203.0.113.9")  # it knew the password after all
    assert throttle.local_verdict(LOGIN, ATTACKER).locked is not None


async def test_a_trusted_program_with_a_stale_password_does_not_lock_its_network(
    throttle: LoginThrottle,
) -> None:
    await throttle.succeeded(LOGIN, REAL)
    for _ in range(POLICY.trusted_lockout):
        await throttle.failed(LOGIN, REAL)  # the password was rotated, the program not updated
    assert throttle.local_verdict(LOGIN, REAL).locked is not None
    assert throttle.local_verdict("password:other@contoso.com", REAL) == Verdict()


async def test_kinds_of_credential_never_share_a_count(throttle: LoginThrottle) -> None:
    """Issue: ten LOGINs named "certificate <fingerprint>" locked out that certificate."""
    fingerprint = "ab" * 32
    for _ in range(POLICY.login_lockout):
        await throttle.failed(f"password:certificate {fingerprint[:32]}", ATTACKER)
        await throttle.failed(f"password:certificate:{fingerprint}", ATTACKER)
    assert throttle.local_verdict(f"certificate:{fingerprint}", REAL) == Verdict()


async def test_delays_for_a_trusted_pair_count_only_its_own_failures(
    throttle: LoginThrottle,
) -> None:
    await throttle.succeeded(LOGIN, REAL)
    for _ in range(3):
        await throttle.failed(LOGIN, ATTACKER)
    assert throttle.local_verdict(LOGIN, REAL) == Verdict()
    await throttle.failed(LOGIN, REAL)
    assert throttle.local_verdict(LOGIN, REAL).delay == 1


async def test_trust_expires(throttle: LoginThrottle, clock: Clock) -> None:
    await throttle.succeeded(LOGIN, REAL)
    clock.now += POLICY.trust_ttl
    for _ in range(POLICY.login_lockout):
        await throttle.failed(LOGIN, ATTACKER)
    assert throttle.local_verdict(LOGIN, REAL).locked is not None


@pytest.mark.parametrize(
    ("address", "network"),
    [
        ("192.0.2.10", "192.0.2.10"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.10", "192.0.2.10"),
        ("/run/xoauth2-proxy.sock", "/run/xoauth2-proxy.sock"),
    ],
)
def test_networks(address: str, network: str) -> None:
    assert network_of(address) == network


def test_network_prefixes_are_settings() -> None:
    policy = ThrottlePolicy(ipv4_prefix=24, ipv6_prefix=48)
    assert policy.network_of("192.0.2.10") == "192.0.2.0/24"
    assert policy.network_of("::ffff:192.0.2.10") == "192.0.2.0/24"
    assert policy.network_of("2001:db8:1:2::1") == "2001:db8:1::/48"
    assert ThrottlePolicy(ipv6_prefix=128).network_of("2001:db8::1") == "2001:db8::1"


async def test_walking_an_ipv6_prefix_does_not_escape(throttle: LoginThrottle) -> None:
    for n in range(POLICY.network_lockout):
        await throttle.failed(f"password:guess{n}@contoso.com", f"2001:db8:1:2::{n + 1:x}")
    assert throttle.local_verdict("password:x", "2001:db8:1:2:dead::beef").locked is not None
    assert throttle.local_verdict("password:x", "2001:db8:1:3::1").locked is None


async def test_memory_is_bounded(clock: Clock) -> None:
    throttle = LoginThrottle(ThrottlePolicy(max_keys=50), clock=clock)
    for n in range(1000):
        await throttle.failed(f"password:user{n}", f"10.0.{n // 256}.{n % 256}")
        await throttle.succeeded(f"password:user{n}", f"10.1.{n // 256}.{n % 256}")
    assert repr(throttle) == "<LoginThrottle logins=50 networks=50 trusted=50>"
    for _ in range(1000):  # one key never holds more times than its ceiling needs
        await throttle.failed(LOGIN, ATTACKER)
    assert len(throttle._logins._records[LOGIN]) == throttle.policy.trusted_lockout


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"base_delay": -1}, "negative"),
        ({"login_lockout": 0}, "at least 1"),
        ({"trusted_lockout": 0}, "at least 1"),
        ({"ipv4_prefix": 33}, "prefix"),
        ({"ipv6_prefix": -1}, "prefix"),
    ],
)
def test_policy_validation(settings: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ThrottlePolicy(**settings)


async def test_lockouts_lists_logins_and_networks_with_when_they_lift(
    throttle: LoginThrottle, clock: Clock
) -> None:
    assert throttle.lockouts() == []
    for n in range(POLICY.login_lockout):
        clock.now = 1000.0 + n
        await throttle.failed("password:Reports@contoso.com", f"192.0.2.{n}")
    (lock,) = throttle.lockouts()
    assert (lock.scope, lock.key, lock.failures) == (
        "login",
        "password:reports@contoso.com",
        POLICY.login_lockout,
    )
    assert not lock.everywhere  # a network it worked from gets the higher ceiling
    # Lifted when the first failure ages out of the window.
    assert lock.remaining == 1000.0 + POLICY.window - clock.now
    clock.now = 1000.0 + POLICY.window
    assert throttle.lockouts() == []


async def test_unlock_forgets_a_login_and_its_pairs_but_nothing_else(
    throttle: LoginThrottle, clock: Clock
) -> None:
    for _ in range(POLICY.login_lockout):
        await throttle.failed("password:reports@contoso.com", "192.0.2.1")
        await throttle.failed("password:other@contoso.com", "198.51.100.1")
    assert (await throttle.verdict("password:reports@contoso.com", "203.0.113.9")).locked
    assert await throttle.unlock("password:REPORTS@contoso.com")  # any case, as logins are
    assert await throttle.verdict("password:reports@contoso.com", "203.0.113.9") == Verdict()
    # The network the failures came from keeps its own count (a delay, no lockout yet).
    assert (await throttle.verdict("password:reports@contoso.com", "192.0.2.1")).locked is None
    assert (await throttle.verdict("password:other@contoso.com", "203.0.113.9")).locked
    assert not await throttle.unlock("password:reports@contoso.com")  # nothing left
    # A network's failures.
    for _ in range(POLICY.network_lockout):
        await throttle.failed(f"password:guess{clock.now}", "198.51.100.7")
        clock.now += 1
    assert (await throttle.verdict("password:new@contoso.com", "198.51.100.7")).locked
    assert await throttle.unlock("198.51.100.7")
    assert (await throttle.verdict("password:new@contoso.com", "198.51.100.7")).locked is None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_delay": -1}, "throttle times must not be negative"),
        ({"window": -1}, "throttle times must not be negative"),
        ({"trust_ttl": -1}, "throttle times must not be negative"),
        ({"network_lockout": 0}, "throttle counts must be at least 1"),
        ({"max_keys": 0}, "throttle counts must be at least 1"),
        ({"ipv4_prefix": -1}, "network prefix lengths must fit their address family"),
        ({"ipv6_prefix": 129}, "network prefix lengths must fit their address family"),
    ],
)
def test_every_setting_is_validated(settings: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        ThrottlePolicy(**settings)


def test_the_least_settings_are_valid() -> None:
    least = ThrottlePolicy(
        base_delay=0,
        max_delay=0,
        window=0,
        trust_ttl=0,
        login_lockout=1,
        trusted_lockout=1,
        network_lockout=1,
        max_keys=1,
        ipv4_prefix=0,
        ipv6_prefix=0,
    )
    assert least.network_of("192.0.2.1") == "0.0.0.0/0"
    assert least.network_of("2001:db8::1") == "::/0"
    most = ThrottlePolicy(ipv4_prefix=32, ipv6_prefix=128)
    assert most.network_of("2001:db8::1") == "2001:db8::1"


async def test_lockouts_lists_every_key_over_its_ceiling(
    throttle: LoginThrottle, clock: Clock
) -> None:
    await throttle.failed("password:first@contoso.com", "192.0.2.1")  # below: not listed
    for n in range(POLICY.trusted_lockout):
        await throttle.failed(LOGIN, f"192.0.2.{100 + n}")
    for n in range(POLICY.network_lockout):
        await throttle.failed(f"password:guess{n}@contoso.com", ATTACKER)
    found = {(lock.scope, lock.key): lock for lock in throttle.lockouts(now=clock.now + 10)}
    assert set(found) == {("login", LOGIN), ("network", ATTACKER)}
    # At the trusted ceiling a login is locked out even where it works; a network always.
    assert found["login", LOGIN].everywhere
    assert found["network", ATTACKER].everywhere
    assert found["login", LOGIN].remaining == POLICY.window - 10  # at the given time
    # Half a second before it lifts, half a second is left.
    (late, _) = throttle.lockouts(now=clock.now + POLICY.window - 0.5)
    assert late.remaining == 0.5


async def test_unlock_ends_the_delay_of_a_pair_the_login_works_from(
    throttle: LoginThrottle,
) -> None:
    await throttle.succeeded(LOGIN, REAL)
    for _ in range(3):
        await throttle.failed(LOGIN, REAL)  # a stale password in the real program
    assert throttle.local_verdict(LOGIN, REAL).delay == 4
    assert await throttle.unlock(LOGIN)
    assert throttle.local_verdict(LOGIN, REAL) == Verdict()
