"""One identity-provider request, whatever the number of logins, restarts and instances."""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from broker import build_source
from broker.cache import CacheKey, CacheSettings
from broker.cache.file import FileTokenCache
from broker.cache.redis import RedisTokenCache
from broker.clock import wall_clock
from broker.errors import TemporaryTokenError
from broker.model import Secret
from broker.source import CachingTokenSource
from tests.broker.helpers import CLIENT_SECRET, FakeClock, FakeProvider, fake_app
from tests.support.redis import RedisServer, redis_available

if TYPE_CHECKING:
    from collections.abc import Iterator

    from broker.model import AccessToken, App
    from tests.support.entra import EntraEmulator

ROOT = Path(__file__).resolve().parents[2]


def new_key() -> Secret:
    return Secret(base64.b64encode(secrets.token_bytes(32)).decode(), origin="test")


async def logins(source: CachingTokenSource, count: int) -> set[str]:
    tokens: set[str] = set()

    async def one() -> None:
        tokens.add((await source.token("contoso", mailbox="reports@contoso.com")).value)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
    return tokens


async def test_500_simultaneous_logins_one_idp_request(idp: EntraEmulator, secret_app: App) -> None:
    idp.latency = 0.3  # everybody arrives while the request is in flight
    source = build_source({"contoso": secret_app})
    try:
        tokens = await logins(source, 500)
    finally:
        source.close()
    assert idp.token_requests == 1
    assert len(tokens) == 1


async def test_file_cache_survives_a_restart(
    idp: EntraEmulator, secret_app: App, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cache_key = new_key()
    settings = CacheSettings(kind="file", path=tmp_path / "tokens", key=cache_key)
    first = build_source({"contoso": secret_app}, settings)
    try:
        (token,) = await logins(first, 10)
    finally:
        first.close()
    restarted = build_source({"contoso": secret_app}, settings)
    try:
        assert await logins(restarted, 10) == {token}
    finally:
        restarted.close()
    assert idp.token_requests == 1
    # With another key the file is worth nothing: a new token is requested.
    rekeyed = build_source(
        {"contoso": secret_app}, CacheSettings(kind="file", path=tmp_path / "tokens", key=new_key())
    )
    try:
        assert await logins(rekeyed, 10) != {token}
    finally:
        rekeyed.close()
    assert idp.token_requests == 2
    assert token.encode() not in (tmp_path / "tokens").read_bytes()
    # The rekeyed cache logged that it could not read the file, and nothing secret.
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "does not decrypt with this key" in logged
    for secret in (token, cache_key.reveal(), CLIENT_SECRET):
        assert secret not in logged
        assert base64.b64encode(secret.encode()).decode() not in logged


async def test_shared_memory_cache_keeps_tokens_across_a_reload(
    idp: EntraEmulator, secret_app: App
) -> None:
    from broker.cache.memory import MemoryTokenCache

    cache = MemoryTokenCache()
    before = build_source({"contoso": secret_app}, cache=cache)
    (token,) = await logins(before, 3)
    before.close()
    after = build_source({"contoso": secret_app}, cache=cache)
    assert await logins(after, 3) == {token}
    after.close()
    assert idp.token_requests == 1


# -- several instances on one Redis ------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if not redis_available():
        pytest.fail("redis-server is not installed: run tests/install-deps.sh")
    with RedisServer(tmp_path / "redis") as server:
        yield server


async def test_instances_in_one_process_share_one_request(
    idp: EntraEmulator, secret_app: App, redis_server: RedisServer
) -> None:
    idp.latency = 0.3
    key = new_key()
    caches = [RedisTokenCache(redis_server.url, key) for _ in range(3)]
    sources = [CachingTokenSource({"contoso": secret_app}, cache=c) for c in caches]
    results: list[set[str]] = []
    try:
        async with trio.open_nursery() as nursery:
            for source in sources:

                async def run(source: CachingTokenSource = source) -> None:
                    results.append(await logins(source, 100))

                nursery.start_soon(run)
    finally:
        for source, cache in zip(sources, caches, strict=True):
            source.close()
            cache.close()
    assert idp.token_requests == 1
    assert len(set.union(*results)) == 1


def test_two_processes_share_one_request(
    idp: EntraEmulator, secret_app: App, redis_server: RedisServer
) -> None:
    idp.latency = 0.3
    spec = {
        "app": {
            "name": secret_app.name,
            "provider": secret_app.provider,
            "client_id": secret_app.client_id,
            "tenant": secret_app.tenant,
            "authority": secret_app.authority,
            "ca_file": str(secret_app.ca_file),
            "client_secret": CLIENT_SECRET,
        },
        "redis_url": redis_server.url,
        "cache_key": new_key().reveal(),
        "prefix": "two-processes",
        "logins": 200,
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.support.token_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env=env,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write(json.dumps(spec) + "\n")
            worker.stdin.flush()
        for worker in workers:  # both are up and have built their source
            assert worker.stdout is not None
            assert worker.stdout.readline().strip() == "ready"
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        outputs = [worker.communicate(timeout=30)[0] for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert [w.returncode for w in workers] == [0, 0]
    hashes = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    assert len(hashes[0]) == 1
    assert hashes[0] == hashes[1]  # the same token in both processes...
    assert idp.token_requests == 1  # ...from one request


async def test_background_refresh_of_instances_sharing_redis(
    idp: EntraEmulator, secret_app: App, redis_server: RedisServer
) -> None:
    """Several instances renewing the same token at about the same time: one request."""
    idp.lifetime = 4
    idp.latency = 0.2
    key = new_key()
    caches = [RedisTokenCache(redis_server.url, key) for _ in range(3)]
    sources = [
        CachingTokenSource(
            {"contoso": secret_app},
            cache=c,
            refresh_margin=1.5,
            refresh_jitter=0.3,
            min_validity=0.5,
        )
        for c in caches
    ]
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for source in sources:
                    await nursery.start(source.run)
                await trio.sleep(3.2)  # start-up fetch, then one renewal at 2.2-2.5 s
                tokens = {(await s.token("contoso")).value for s in sources}
                nursery.cancel_scope.cancel()
    finally:
        for source, cache in zip(sources, caches, strict=True):
            source.close()
            cache.close()
    assert idp.token_requests == 2
    assert len(tokens) == 1


class HangingProvider:
    """An IdP that accepts the request and never finishes answering."""

    def __init__(self) -> None:
        self.started = trio.Event()

    async def fetch(self) -> AccessToken:
        self.started.set()
        await trio.sleep_forever()


async def test_hanging_fetch_gives_the_shared_lock_up(redis_server: RedisServer) -> None:
    """An instance whose IdP request never finishes holds the Redis lock only for
    fetch_timeout, not for ever: the other instances then get their turn."""
    key = new_key()
    # lock_timeout is long: only giving the lock up lets the second instance in soon.
    caches = [RedisTokenCache(redis_server.url, key, lock_timeout=60.0) for _ in range(2)]
    hanging = HangingProvider()
    stuck = CachingTokenSource(
        {"contoso": fake_app()}, providers={"contoso": hanging}, cache=caches[0], fetch_timeout=1
    )
    healthy = CachingTokenSource(
        {"contoso": fake_app()},
        providers={"contoso": FakeProvider(wall_clock)},
        cache=caches[1],
        fetch_timeout=1,
    )
    errors: list[TemporaryTokenError] = []

    async def stuck_login() -> None:
        try:
            await stuck.token("contoso")
        except TemporaryTokenError as exc:
            errors.append(exc)

    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stuck_login)
                await hanging.started.wait()  # it holds the lock and waits for its IdP
                token = await healthy.token("contoso")
    finally:
        for cache in caches:
            cache.close()
    assert token.value == "token-1"
    (error,) = errors
    assert error.code == "FETCH_TIMEOUT"


async def test_due_shared_token_serves_logins_while_the_idp_fails(tmp_path: Path) -> None:
    """After a restart with the IdP down, a token from the file cache that is due for
    renewal but still valid keeps logins working."""
    clock = FakeClock()
    cache = FileTokenCache(tmp_path / "tokens", new_key())
    fake = FakeProvider(clock)
    before = CachingTokenSource(
        {"contoso": fake_app()}, providers={"contoso": fake}, cache=cache, clock=clock
    )
    token = await before.token("contoso")
    clock.now += 3300  # five minutes left: due
    fake.outcomes = [TemporaryTokenError("IdP down")] * 10
    restarted = CachingTokenSource(
        {"contoso": fake_app()}, providers={"contoso": fake}, cache=cache, clock=clock
    )
    assert await restarted.token("contoso") == token
    assert await restarted.token("contoso") == token  # held back, still served
    assert fake.calls == 2
    clock.now += 300 - 59
    with pytest.raises(TemporaryTokenError):
        await restarted.token("contoso")


async def test_a_lock_without_expiry_delays_a_token_only_lock_timeout(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue: a lock key without expiry (any Redis writer, or a crash at a bad moment) made
    every login wait token_timeout and fail, for ever."""
    import redis

    key = new_key()
    cache = RedisTokenCache(redis_server.url, key, lock_timeout=0.5)
    source = CachingTokenSource(
        {"contoso": fake_app()}, providers={"contoso": FakeProvider(wall_clock)}, cache=cache
    )
    client = redis.Redis.from_url(redis_server.url)
    lock = f"xoauth2-proxy:lock:{CacheKey.for_app(fake_app()).digest}"
    try:
        client.set(lock, b"someone else's token")  # no expiry: nobody will ever release it
        assert client.pttl(lock) == -1
        with trio.fail_after(10):
            token = await source.token("contoso")
    finally:
        client.close()
        source.close()
        cache.close()
    assert token.value == "token-1"
    assert f"the token lock {lock} has no expiry and was not released within lock_timeout" in (
        caplog.text
    )
