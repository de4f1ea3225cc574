"""Token caches: sealing, the encrypted file, Redis with its lock, and the factory."""

from __future__ import annotations

import base64
import logging
import os
import secrets
import stat
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from broker.cache import CachedToken, CacheError, CacheKey, CacheSettings, open_cache
from broker.cache.file import FileTokenCache
from broker.cache.memory import MemoryTokenCache
from broker.cache.redis import RedisTokenCache, _redact
from broker.cache.sealing import Sealer, SealError, parse_key
from broker.model import AccessToken, Secret
from tests.broker.helpers import fake_app
from tests.support.redis import RedisServer, redis_available

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

TOKEN_VALUE = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.a-cached-token-value-never-in-clear.sig"


def new_key() -> Secret:
    return Secret(base64.b64encode(secrets.token_bytes(32)).decode(), origin="test")


def entry(value: str = TOKEN_VALUE, lifetime: float = 3600) -> CachedToken:
    now = time.time()
    return CachedToken(AccessToken(value, now + lifetime, "scope/.default"), now - 1)


KEY = CacheKey.for_app(fake_app(), None)
MAILBOX_KEY = CacheKey.for_app(fake_app(), "Reports@Contoso.com")


# -- keys and sealing ----------------------------------------------------------------------


def test_keys() -> None:
    assert MAILBOX_KEY.mailbox == "reports@contoso.com"
    assert KEY != MAILBOX_KEY
    assert "reports@contoso.com" not in MAILBOX_KEY.digest
    assert str(MAILBOX_KEY) == "app 'contoso' for reports@contoso.com"
    other_client = CacheKey.for_app(replace(fake_app(), client_id="another"))
    assert other_client.identity != KEY.identity  # a changed registration gets no old token


def test_sealing_round_trip_and_context() -> None:
    key = new_key()
    sealer = Sealer(key)
    sealed = sealer.seal(b"hello", b"ctx")
    assert sealer.open(sealed, b"ctx") == b"hello"
    assert b"hello" not in sealed
    assert sealer.seal(b"hello", b"ctx") != sealed  # fresh nonce every time
    with pytest.raises(SealError):
        sealer.open(sealed, b"other context")
    with pytest.raises(SealError):
        Sealer(new_key()).open(sealed, b"ctx")
    with pytest.raises(SealError):
        sealer.open(sealed[:-1] + bytes([sealed[-1] ^ 1]), b"ctx")
    assert key.reveal() not in repr(sealer)


@pytest.mark.parametrize(
    "text",
    ["correct horse battery staple", base64.b64encode(b"x" * 16).decode(), "", "!!!!"],
)
def test_weak_or_malformed_keys_refused(text: str) -> None:
    with pytest.raises(ValueError, match="openssl rand -base64 32") as caught:
        parse_key(Secret(text, origin="env KEY"))
    assert "env KEY" in str(caught.value)
    if text:
        assert text not in str(caught.value)


def test_urlsafe_and_wrapped_keys_accepted() -> None:
    raw = secrets.token_bytes(32)
    assert parse_key(Secret(base64.urlsafe_b64encode(raw).decode() + "\n")) == raw


def test_cached_token_json_rejects_garbage() -> None:
    e = entry()
    assert CachedToken.from_json(e.to_json()) == e
    for bad in (b"[]", b"{}", b'{"token": 1, "scope": "", "expires_at": 1, "obtained_at": 1}'):
        with pytest.raises(ValueError, match="cached token"):
            CachedToken.from_json(bad)


# -- memory --------------------------------------------------------------------------------


async def test_memory_cache() -> None:
    cache = MemoryTokenCache()
    assert await cache.load(KEY) is None
    await cache.store(KEY, e := entry())
    assert await cache.load(KEY) is e
    assert await cache.load(MAILBOX_KEY) is None
    async with cache.exclusive(KEY):
        pass
    cache.close()


# -- file ----------------------------------------------------------------------------------


async def test_file_cache_survives_a_restart(tmp_path: Path) -> None:
    key = new_key()
    path = tmp_path / "tokens"
    first = FileTokenCache(path, key)
    await first.store(KEY, e1 := entry("one"))
    await first.store(MAILBOX_KEY, e2 := entry("two"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = FileTokenCache(path, key)  # a new process, the same file and key
    assert await again.load(KEY) == e1
    assert await again.load(MAILBOX_KEY) == e2
    assert sorted(os.listdir(tmp_path)) == ["tokens", "tokens.lock"]


async def test_file_cache_is_useless_without_its_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens"
    await FileTokenCache(path, new_key()).store(MAILBOX_KEY, entry())
    data = path.read_bytes()
    for text in (TOKEN_VALUE, "reports@contoso.com", "contoso", "expires_at"):
        assert text.encode() not in data
        assert base64.b64encode(text.encode()) not in data
    thief = FileTokenCache(path, new_key())
    assert await thief.load(MAILBOX_KEY) is None
    assert await thief.load(MAILBOX_KEY) is None
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]  # logged once
    assert "does not decrypt with this key" in warning.getMessage()
    # Writing with the new key replaces the old content.
    await thief.store(KEY, entry("new"))
    assert (await thief.load(KEY) or entry()).token.value == "new"
    assert await thief.load(MAILBOX_KEY) is None


async def test_file_cache_refuses_a_file_others_can_read(tmp_path: Path) -> None:
    key = new_key()
    path = tmp_path / "tokens"
    cache = FileTokenCache(path, key)
    await cache.store(KEY, entry())
    path.chmod(0o644)
    with pytest.raises(ValueError, match=r"accessible to other users.*chmod 600"):
        FileTokenCache(path, key)
    with pytest.raises(CacheError, match="accessible to other users"):
        await cache.load(KEY)
    path.chmod(0o640)
    with pytest.raises(CacheError):
        await cache.load(KEY)
    path.chmod(0o600)
    assert await cache.load(KEY) is not None


def test_file_cache_needs_an_existing_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        FileTokenCache(tmp_path / "missing" / "tokens", new_key())


async def test_file_cache_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        await FileTokenCache(tmp_path / "tokens", new_key()).store(KEY, entry())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "tokens").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tokens.lock").stat().st_mode) == 0o600


async def test_file_cache_writers_merge_and_drop_expired(tmp_path: Path) -> None:
    key = new_key()
    a, b = FileTokenCache(tmp_path / "t", key), FileTokenCache(tmp_path / "t", key)
    await a.store(KEY, entry("a"))
    await b.store(MAILBOX_KEY, entry("b"))  # b had not read a's entry: merged, not lost
    assert (await a.load(MAILBOX_KEY) or entry()).token.value == "b"
    assert (await b.load(KEY) or entry()).token.value == "a"
    await a.store(KEY, entry("old", lifetime=-10))
    await a.store(MAILBOX_KEY, entry("c"))
    assert await b.load(KEY) is None


async def test_file_cache_concurrent_writes_lose_nothing(tmp_path: Path) -> None:
    key = new_key()
    caches = [FileTokenCache(tmp_path / "t", key) for _ in range(4)]
    keys = [CacheKey.for_app(fake_app(), f"user{i}@example.com") for i in range(40)]
    async with trio.open_nursery() as nursery:
        for i, k in enumerate(keys):
            nursery.start_soon(caches[i % 4].store, k, entry(f"t{i}"))
    reader = FileTokenCache(tmp_path / "t", key)
    assert [(await reader.load(k) or entry()).token.value for k in keys] == [
        f"t{i}" for i in range(40)
    ]
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []


async def test_damaged_file_is_treated_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_bytes(b"\x01" + os.urandom(64))
    path.chmod(0o600)
    cache = FileTokenCache(path, new_key())
    assert await cache.load(KEY) is None


# -- redis ---------------------------------------------------------------------------------

needs_redis = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if not redis_available():
        pytest.skip("redis-server is not installed")
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_cache(redis_server: RedisServer) -> Iterator[RedisTokenCache]:
    cache = RedisTokenCache(
        redis_server.url, new_key(), prefix=f"t{secrets.token_hex(4)}", lock_timeout=1.0
    )
    yield cache
    cache.close()


@pytest.fixture
def shared(redis_server: RedisServer) -> Iterator[tuple[RedisTokenCache, RedisTokenCache]]:
    key, prefix = new_key(), f"t{secrets.token_hex(4)}"
    a = RedisTokenCache(redis_server.url, key, prefix=prefix, lock_timeout=1.0)
    b = RedisTokenCache(redis_server.url, key, prefix=prefix, lock_timeout=1.0)
    yield a, b
    a.close()
    b.close()


@needs_redis
async def test_redis_values_are_shared_sealed_and_expire(
    shared: tuple[RedisTokenCache, RedisTokenCache], redis_server: RedisServer
) -> None:
    a, b = shared
    assert await a.load(MAILBOX_KEY) is None
    await a.store(MAILBOX_KEY, e := entry(lifetime=100))
    assert await b.load(MAILBOX_KEY) == e
    keys = redis_server.command("KEYS", f"{a._prefix}:*")
    assert f"{a._prefix}:token:{MAILBOX_KEY.digest}".encode() in keys
    assert b"contoso" not in keys
    dump = redis_server.command("GET", f"{a._prefix}:token:{MAILBOX_KEY.digest}")
    assert TOKEN_VALUE.encode() not in dump
    ttl = int(redis_server.command("PTTL", f"{a._prefix}:token:{MAILBOX_KEY.digest}")[1:-2])
    assert 90_000 < ttl <= 100_000


@needs_redis
async def test_redis_wrong_key_or_moved_value_is_a_cache_error(
    shared: tuple[RedisTokenCache, RedisTokenCache], redis_server: RedisServer
) -> None:
    a, _ = shared
    await a.store(KEY, entry())
    stranger = RedisTokenCache(redis_server.url, new_key(), prefix=a._prefix)
    try:
        with pytest.raises(CacheError, match="share the same cache key"):
            await stranger.load(KEY)
    finally:
        stranger.close()
    # A value copied under another key does not decrypt either.
    source = f"{a._prefix}:token:{KEY.digest}"
    target = f"{a._prefix}:token:{MAILBOX_KEY.digest}"
    assert redis_server.command("COPY", source, target) == b":1\r\n"
    with pytest.raises(CacheError):
        await a.load(MAILBOX_KEY)


@needs_redis
async def test_redis_lock_is_exclusive_across_instances(
    shared: tuple[RedisTokenCache, RedisTokenCache],
) -> None:
    a, b = shared
    order: list[str] = []

    async def hold(cache: RedisTokenCache, name: str) -> None:
        async with cache.exclusive(KEY):
            order.append(f"{name} in")
            await trio.sleep(0.1)
            order.append(f"{name} out")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, a, "a")
        await trio.sleep(0.02)
        nursery.start_soon(hold, b, "b")
    assert order == ["a in", "a out", "b in", "b out"]


@needs_redis
async def test_redis_lock_is_renewed_while_held(
    shared: tuple[RedisTokenCache, RedisTokenCache],
) -> None:
    """A holder working longer than lock_timeout (1 s) keeps the lock."""
    a, b = shared
    entered = trio.Event()

    async def second() -> None:
        async with b.exclusive(KEY):
            entered.set()

    async with trio.open_nursery() as nursery, a.exclusive(KEY):
        nursery.start_soon(second)
        await trio.sleep(2.0)
        assert not entered.is_set()
    assert entered.is_set()


@needs_redis
async def test_redis_lock_of_a_crashed_holder_expires(
    shared: tuple[RedisTokenCache, RedisTokenCache], redis_server: RedisServer
) -> None:
    a, _ = shared
    # A crashed instance's lock: nobody renews or releases it.
    lock_name = f"{a._prefix}:lock:{KEY.digest}"
    redis_server.command("SET", lock_name, "crashed-holder", "PX", "1000")
    started = trio.current_time()
    with trio.fail_after(3):
        async with a.exclusive(KEY):
            waited = trio.current_time() - started
    assert 0.5 < waited < 2


@needs_redis
async def test_redis_exclusive_passes_errors_through_unwrapped(
    redis_cache: RedisTokenCache,
) -> None:
    with pytest.raises(KeyError):
        async with redis_cache.exclusive(KEY):
            raise KeyError("from the body")


async def test_redis_unreachable(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cache = RedisTokenCache(f"redis://127.0.0.1:{port}/0", new_key())
    try:
        with pytest.raises(CacheError, match="ConnectionError"):
            await cache.load(KEY)
        with pytest.raises(CacheError):
            await cache.store(KEY, entry())
        async with cache.exclusive(KEY):  # availability first: proceeds without the lock
            pass
    finally:
        cache.close()
    assert any("without the shared lock" in r.getMessage() for r in caplog.records)


def test_redis_url_checks_and_redaction() -> None:
    with pytest.raises(ValueError, match="must start with"):
        RedisTokenCache("http://localhost", new_key())
    assert _redact("redis://:hunter2@db:6379/0") == "redis://:<redacted>@db:6379/0"
    assert _redact("redis://user:hunter2@db/0") == "redis://user:<redacted>@db/0"
    assert _redact("redis://db:6379/0") == "redis://db:6379/0"
    cache = RedisTokenCache("redis://:hunter2@db:6379/0", new_key())
    assert "hunter2" not in repr(cache)
    cache.close()


# -- factory -------------------------------------------------------------------------------


def test_open_cache(tmp_path: Path) -> None:
    assert isinstance(open_cache(CacheSettings()), MemoryTokenCache)
    key = new_key()
    cache = open_cache(CacheSettings(kind="file", path=tmp_path / "t", key=key))
    assert isinstance(cache, FileTokenCache)
    redis_cache = open_cache(CacheSettings(kind="redis", url="redis://127.0.0.1:1/0", key=key))
    assert isinstance(redis_cache, RedisTokenCache)
    redis_cache.close()
    with pytest.raises(ValueError, match="needs key"):
        open_cache(CacheSettings(kind="file", path=tmp_path / "t"))
    with pytest.raises(ValueError, match="needs path"):
        open_cache(CacheSettings(kind="file", key=key))
    with pytest.raises(ValueError, match="needs url"):
        open_cache(CacheSettings(kind="redis", key=key))
