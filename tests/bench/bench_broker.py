"""Broker benchmarks (not tests): ``python3 -m tests.bench.bench_broker``. Prints a table.

- a login served from the source's memory (the hot path of every login);
- a token miss with each cache (memory, encrypted file, Redis): load, then store;
- 500 simultaneous logins on a cold source against the emulated Entra (one request).
"""

from __future__ import annotations

import base64
import secrets
import tempfile
import time
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.cache import CachedToken, CacheKey, TokenCache
from broker.cache.file import FileTokenCache
from broker.cache.memory import MemoryTokenCache
from broker.cache.redis import RedisTokenCache
from broker.model import AccessToken, App, Secret
from broker.source import CachingTokenSource
from tests.broker.helpers import CLIENT_SECRET, SECRET_CLIENT_ID, FakeProvider, fake_app
from tests.support.entra import EntraEmulator
from tests.support.redis import RedisServer, redis_available

ROUNDS = 2000


def row(name: str, seconds: float, count: int) -> None:
    print(f"| {name:<44} | {seconds / count * 1e6:>10.1f} µs | {count:>6} |")


async def hot_path() -> None:
    fake = FakeProvider(time.time)
    source = CachingTokenSource({"contoso": fake_app()}, providers={"contoso": fake})
    await source.token("contoso")
    started = time.perf_counter()
    for _ in range(ROUNDS * 10):
        await source.token("contoso")
    row("login, token in memory", time.perf_counter() - started, ROUNDS * 10)


async def cache_round_trip(name: str, cache: TokenCache) -> None:
    key = CacheKey.for_app(fake_app(), "reports@contoso.com")
    entry = CachedToken(fake_token(), time.time())
    rounds = ROUNDS // 10
    started = time.perf_counter()
    for _ in range(rounds):
        await cache.store(key, entry)
        await cache.load(key)
    row(f"cache miss + store, {name}", time.perf_counter() - started, rounds)
    cache.close()


def fake_token() -> AccessToken:
    return AccessToken("x" * 1800, time.time() + 3600, "scope")


async def cold_logins(directory: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with EntraEmulator(directory, signing_key=key) as idp:
        idp.register_app(SECRET_CLIENT_ID, secret=CLIENT_SECRET)
        app = App(
            name="contoso",
            provider="microsoft",
            client_id=SECRET_CLIENT_ID,
            tenant=idp.tenant,
            client_secret=Secret(CLIENT_SECRET),
            authority=idp.authority,
            ca_file=idp.ca_file,
        )
        source = CachingTokenSource({"contoso": app})
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(500):
                nursery.start_soon(source.token, "contoso")
        elapsed = time.perf_counter() - started
        source.close()
        name = "500 cold logins, emulated Entra (total)"
        print(f"| {name:<44} | {elapsed * 1e3:>10.1f} ms | {idp.token_requests:>6} |")


async def main() -> None:
    print(f"| {'what':<44} | {'per call':>13} | {'calls':>6} |")
    print(f"|{'-' * 46}|{'-' * 15}|{'-' * 8}|")
    await hot_path()
    cache_key = Secret(base64.b64encode(secrets.token_bytes(32)).decode())
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary)
        await cache_round_trip("memory", MemoryTokenCache())
        await cache_round_trip("encrypted file", FileTokenCache(directory / "t", cache_key))
        if redis_available():
            with RedisServer(directory / "redis") as server:
                await cache_round_trip("redis", RedisTokenCache(server.url, cache_key))
        await cold_logins(directory)


if __name__ == "__main__":
    trio.run(main)
