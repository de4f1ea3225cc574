"""Failed-login counts shared in Redis: several instances, one bound; Redis down, each
instance counts for itself and says so. Against a real ``redis-server``."""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING

import pytest
import redis

from proxy.net.shared_throttle import RedisFailures
from proxy.throttle import LoginThrottle, ThrottlePolicy, Verdict
from tests.support.redis import RedisServer

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

POLICY = ThrottlePolicy(base_delay=0, login_lockout=4, trusted_lockout=6, network_lockout=10)
LOGIN = "password:reports@contoso.com"
ATTACKER = "198.51.100.66"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


def store(server: RedisServer, secret: bytes, clock: Clock | None = None) -> RedisFailures:
    client = redis.Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=2)
    if clock is None:
        return RedisFailures(client, secret=secret, where=server.url)
    return RedisFailures(client, secret=secret, where=server.url, clock=clock)


async def test_instances_share_one_bound(redis_server: RedisServer) -> None:
    secret = secrets.token_bytes(32)
    wall = Clock()
    instances = [
        LoginThrottle(POLICY, shared=store(redis_server, secret), wall_clock=wall) for _ in range(3)
    ]
    try:
        checked = 0
        for n in range(12):  # a load balancer spreads the guesses over the instances
            throttle = instances[n % 3]
            if (await throttle.verdict(LOGIN, ATTACKER)).locked is None:
                checked += 1
                await throttle.failed(LOGIN, ATTACKER)
        assert checked == POLICY.login_lockout  # not three times as many
        for throttle in instances:
            verdict = await throttle.verdict(LOGIN, ATTACKER)
            assert verdict.locked == "login locked out after 4 failures in 3600s"
        # Trust is shared too: a login that worked through one instance is trusted by all.
        await instances[0].succeeded(LOGIN, "192.0.2.10")
        assert (await instances[2].verdict(LOGIN, "192.0.2.10")).locked is None
        # And the window slides in Redis as it does in memory.
        wall.now += POLICY.window
        assert (await instances[1].verdict(LOGIN, ATTACKER)).locked is None
    finally:
        for throttle in instances:
            assert throttle.shared is not None
            throttle.shared.close()


async def test_redis_holds_no_names_and_forgets_with_the_window(
    redis_server: RedisServer,
) -> None:
    throttle = LoginThrottle(POLICY, shared=store(redis_server, secrets.token_bytes(32)))
    try:
        for _ in range(20):
            await throttle.failed(LOGIN, ATTACKER)
        await throttle.succeeded(LOGIN, "192.0.2.10")
    finally:
        assert throttle.shared is not None
        throttle.shared.close()
    client = redis.Redis.from_url(redis_server.url)
    try:
        keys = sorted(k.decode() for k in client.keys("*") if isinstance(k, bytes))
        assert len(keys) == 4  # login, network, pair, trust
        assert not any("reports" in k or "198.51" in k for k in keys)
        for key in keys:
            assert 0 < client.ttl(key) <= POLICY.trust_ttl
            if ":throttle:" in key:
                assert client.zcard(key) <= POLICY.network_lockout  # only what is needed
                assert client.ttl(key) <= POLICY.window + 1
    finally:
        client.close()


async def test_without_redis_each_instance_counts_for_itself(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    clock = Clock()
    shared = store(redis_server, secrets.token_bytes(32), clock=clock)
    throttle = LoginThrottle(POLICY, shared=shared)
    try:
        await throttle.failed(LOGIN, ATTACKER)
        redis_server.close()  # Redis goes away
        for _ in range(POLICY.login_lockout):
            await throttle.failed(LOGIN, ATTACKER)
        verdict = await throttle.verdict(LOGIN, ATTACKER)
        assert verdict.locked is not None  # its own counts still lock out
        warnings = [r.getMessage() for r in caplog.records]
        assert len([w for w in warnings if "shared store is unavailable" in w]) == 1
        # While it is down, Redis is left alone for a while: no timeout per login.
        assert "failed recently; not asked again yet" in str(throttle._outage)
        # An operator's unlock still clears this instance's own counts.
        assert await throttle.unlock(LOGIN)
        assert (await throttle.verdict(LOGIN, ATTACKER)).locked is None
    finally:
        shared.close()


async def test_when_redis_is_back_the_instances_count_together_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    clock = Clock()
    secret = secrets.token_bytes(32)
    with RedisServer(tmp_path / "redis") as first:
        port, url = first.port, first.url
        shared = RedisFailures(
            redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2),
            secret=secret,
            where=url,
            clock=clock,
        )
    throttle = LoginThrottle(POLICY, shared=shared)
    outages: list[str | None] = []
    try:
        await throttle.succeeded(LOGIN, "192.0.2.10")  # Redis is down: trusted here only
        outages.append(throttle._outage)
        with RedisServer(tmp_path / "redis-again", port=port):
            clock.now += 5  # within RETRY_AFTER: not asked yet
            await throttle.failed(LOGIN, ATTACKER)
            outages.append(throttle._outage)
            clock.now += 10
            await throttle.failed(LOGIN, ATTACKER)
            outages.append(throttle._outage)
            verdict = await throttle.verdict(LOGIN, "192.0.2.10")
    finally:
        shared.close()
    assert outages[0] is not None
    assert "not asked again yet" in str(outages[1])
    assert outages[2] is None
    messages = [r.getMessage() for r in caplog.records]
    assert sum("shared store is unavailable" in m for m in messages) == 1
    assert sum("shared store is back" in m for m in messages) == 1
    # Trust given while Redis was down is still this instance's own.
    assert verdict.locked is None


async def test_unlock_clears_the_login_in_redis_for_every_instance(
    redis_server: RedisServer,
) -> None:
    secret = secrets.token_bytes(32)
    wall = Clock()
    one, other = (
        LoginThrottle(POLICY, shared=store(redis_server, secret), wall_clock=wall) for _ in range(2)
    )
    try:
        for _ in range(POLICY.login_lockout):
            await one.failed(LOGIN, ATTACKER)
        assert (await other.verdict(LOGIN, "203.0.113.1")).locked is not None
        # The operator unlocks through the other instance, which never saw the failures.
        assert not await other.unlock(LOGIN)
        assert (await other.verdict(LOGIN, "203.0.113.1")).locked is None
        # The instance that counted them still has its own, until it is told too.
        assert await one.unlock(LOGIN)
        assert (await one.verdict(LOGIN, "203.0.113.1")).locked is None
    finally:
        for throttle in (one, other):
            assert throttle.shared is not None
            throttle.shared.close()


async def test_counts_kept_while_redis_was_down_still_count_when_it_is_back(
    tmp_path: Path,
) -> None:
    """A Redis that restarted empty lost every failure; this instance's own still judge:
    the login's, the network's, the pair's delay, and the trust it gave meanwhile."""
    policy = ThrottlePolicy(base_delay=1, login_lockout=4, trusted_lockout=6, network_lockout=5)
    trusted, scanning = "192.0.2.10", "203.0.113.7"
    clock = Clock()
    with RedisServer(tmp_path / "redis") as first:
        port, url = first.port, first.url
    shared = RedisFailures(
        redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2),
        secret=secrets.token_bytes(32),
        where=url,
        clock=clock,
    )
    throttle = LoginThrottle(policy, shared=shared)
    try:
        await throttle.succeeded(LOGIN, trusted)
        for _ in range(policy.login_lockout):
            await throttle.failed(LOGIN, ATTACKER)
        await throttle.failed(LOGIN, trusted)
        for n in range(policy.network_lockout):
            await throttle.failed(f"password:user{n}@contoso.com", scanning)
        with RedisServer(tmp_path / "redis-again", port=port):
            clock.now += 60  # past the pause after an outage: Redis is asked again
            by_login = await throttle.verdict(LOGIN, ATTACKER)
            by_network = await throttle.verdict("password:new@contoso.com", scanning)
            by_pair = await throttle.verdict(LOGIN, trusted)
            assert throttle._outage is None  # these verdicts were Redis's and ours
    finally:
        shared.close()
    assert by_login.locked == "login locked out after 5 failures in 3600s"
    assert by_network.locked == "source network locked out after 5 failures in 3600s"
    # Trusted here: the higher ceiling, and a delay for the pair's own one failure.
    assert by_pair == Verdict(delay=1.0)


async def test_while_redis_is_down_a_network_is_judged_by_its_own_counts(
    redis_server: RedisServer,
) -> None:
    shared = store(redis_server, secrets.token_bytes(32), clock=Clock())
    throttle = LoginThrottle(POLICY, shared=shared)
    try:
        redis_server.close()
        for n in range(POLICY.network_lockout):
            await throttle.failed(f"password:user{n}@contoso.com", ATTACKER)
        verdict = await throttle.verdict("password:new@contoso.com", ATTACKER)
        assert throttle._outage is not None
    finally:
        shared.close()
    assert verdict.locked == "source network locked out after 10 failures in 3600s"
