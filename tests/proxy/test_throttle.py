"""Failed-login throttling: delays, lockouts, and what an attacker cannot do with them."""

from __future__ import annotations

import pytest

from proxy.throttle import LoginThrottle, ThrottlePolicy, Verdict, network_of

POLICY = ThrottlePolicy(
    base_delay=1.0, max_delay=16.0, window=900.0, login_lockout=5, network_lockout=8, lockout=600.0
)
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


def test_no_failures_no_delay(throttle: LoginThrottle) -> None:
    assert throttle.verdict("reports@contoso.com", REAL) == Verdict()


def test_delay_doubles_up_to_the_cap(throttle: LoginThrottle) -> None:
    policy = ThrottlePolicy(login_lockout=100, network_lockout=100)
    throttle = LoginThrottle(policy, clock=Clock())
    delays = []
    for _ in range(7):
        throttle.failed("reports@contoso.com", ATTACKER)
        delays.append(throttle.verdict("reports@contoso.com", ATTACKER).delay)
    assert delays == [1, 2, 4, 8, 16, 16, 16]


def test_login_lockout_spares_the_network_the_login_works_from(
    throttle: LoginThrottle, clock: Clock
) -> None:
    login = "reports@contoso.com"
    throttle.succeeded(login, REAL)  # the real program logged in from its network
    for _ in range(POLICY.login_lockout):
        throttle.failed(login.upper(), ATTACKER)  # case does not matter
    assert throttle.verdict(login, ATTACKER).locked == "login locked out after 5 failures"
    assert throttle.verdict(login, "203.0.113.7").locked is not None  # any other network too
    assert throttle.verdict(login, REAL) == Verdict()  # no lockout, no delay
    clock.now += POLICY.lockout
    assert throttle.verdict(login, ATTACKER).locked is None


def test_network_lockout_covers_every_login_but_spares_trusted_pairs(
    throttle: LoginThrottle, clock: Clock
) -> None:
    throttle.succeeded("scanner@contoso.com", ATTACKER)  # a real program behind the same NAT
    for n in range(POLICY.network_lockout):
        throttle.failed(f"guess{n}@contoso.com", ATTACKER)  # password spraying
    assert throttle.verdict("new@contoso.com", ATTACKER).locked == (
        "source network locked out after 8 failures"
    )
    assert throttle.verdict("scanner@contoso.com", ATTACKER) == Verdict()
    assert throttle.verdict("new@contoso.com", REAL) == Verdict()
    clock.now += POLICY.lockout - 1
    assert throttle.verdict("new@contoso.com", ATTACKER).locked is not None
    clock.now += 1
    assert throttle.verdict("new@contoso.com", ATTACKER).locked is None


def test_an_own_account_does_not_reset_the_count(throttle: LoginThrottle) -> None:
    for n in range(POLICY.network_lockout - 1):
        throttle.failed(f"guess{n}@contoso.com", ATTACKER)
    throttle.succeeded("attacker@contoso.com", ATTACKER)
    throttle.failed("guess-last@contoso.com", ATTACKER)
    assert throttle.verdict("another@contoso.com", ATTACKER).locked is not None


def test_a_trusted_program_with_a_stale_password_locks_only_itself(
    throttle: LoginThrottle,
) -> None:
    login = "reports@contoso.com"
    throttle.succeeded(login, REAL)
    for _ in range(POLICY.login_lockout):
        throttle.failed(login, REAL)  # the password was rotated, the program not updated
    assert throttle.verdict(login, REAL).locked == (
        "login from this network locked out after 5 failures"
    )
    assert throttle.verdict("other@contoso.com", REAL) == Verdict()
    assert throttle.verdict(login, "203.0.113.7") == Verdict()


def test_failures_are_forgotten_after_the_window(throttle: LoginThrottle, clock: Clock) -> None:
    throttle.failed("reports@contoso.com", ATTACKER)
    assert throttle.verdict("reports@contoso.com", ATTACKER).delay == 1
    clock.now += POLICY.window + 1
    assert throttle.verdict("reports@contoso.com", ATTACKER) == Verdict()


def test_trust_expires(throttle: LoginThrottle, clock: Clock) -> None:
    login = "reports@contoso.com"
    throttle.succeeded(login, REAL)
    clock.now += POLICY.trust_ttl + 1
    for _ in range(POLICY.login_lockout):
        throttle.failed(login, ATTACKER)
    assert throttle.verdict(login, REAL).locked is not None


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


def test_walking_an_ipv6_prefix_does_not_escape(throttle: LoginThrottle) -> None:
    for n in range(POLICY.network_lockout):
        throttle.failed(f"guess{n}@contoso.com", f"2001:db8:1:2::{n + 1:x}")
    assert throttle.verdict("x@contoso.com", "2001:db8:1:2:dead::beef").locked is not None
    assert throttle.verdict("x@contoso.com", "2001:db8:1:3::1").locked is None


def test_memory_is_bounded(clock: Clock) -> None:
    throttle = LoginThrottle(ThrottlePolicy(max_keys=50), clock=clock)
    for n in range(1000):
        throttle.failed(f"user{n}", f"10.0.{n // 256}.{n % 256}")
        throttle.succeeded(f"user{n}", f"10.1.{n // 256}.{n % 256}")
    counts = repr(throttle)
    assert counts == "<LoginThrottle logins=50 networks=50 trusted=50>"


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="negative"):
        ThrottlePolicy(base_delay=-1)
    with pytest.raises(ValueError, match="at least 1"):
        ThrottlePolicy(login_lockout=0)
