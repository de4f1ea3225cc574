"""Token caches: sealing, the encrypted file, Redis with its lock, and the factory."""

from __future__ import annotations

import base64
import errno
import fcntl
import json
import logging
import os
import secrets
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from broker.cache import CachedToken, CacheError, CacheKey, CacheSettings, Grant, open_cache
from broker.cache.file import CONTEXT, FileTokenCache
from broker.cache.memory import MemoryTokenCache
from broker.cache.redis import RedisTokenCache, redact
from broker.cache.sealing import Sealer, SealError, parse_key
from broker.clock import wall_clock
from broker.model import AccessToken, Secret
from broker.source import CachingTokenSource
from tests.broker.helpers import FakeProvider, fake_app
from tests.support.certs import TestPki
from tests.support.redis import RedisServer, RedisTls, redis_available

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
REFRESH_TOKEN = "0.AAAA-a-refresh-token-that-must-never-be-readable-in-the-cache"


def grant(value: str = REFRESH_TOKEN, *, revoked: str = "") -> Grant:
    now = time.time()
    return Grant(value, "reports@contoso.com", now - 10, now, revoked, now if revoked else 0.0)


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
    for damaged in (b"", sealed[:20], b"\x02" + sealed[1:]):  # too short, a future version
        with pytest.raises(SealError, match="not a sealed value of a known version"):
            sealer.open(damaged, b"ctx")
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
    raw = (b"\xfb\xff\xbf" * 11)[:32]  # "+/+/..." in base64, "-_-_..." in its urlsafe form
    urlsafe = base64.urlsafe_b64encode(raw).decode()
    assert "-" in urlsafe
    assert "_" in urlsafe
    assert parse_key(Secret(urlsafe + "\n")) == raw
    wrapped = base64.b64encode(raw).decode()
    assert parse_key(Secret(f"{wrapped[:20]}\n  {wrapped[20:]}\n")) == raw  # as a PEM body


def test_a_key_with_a_stray_character_is_refused() -> None:
    """Not silently skipped: a key pasted with a typo is a different key."""
    good = base64.b64encode(secrets.token_bytes(32)).decode()
    with pytest.raises(ValueError, match="openssl rand -base64 32"):
        parse_key(Secret(good[:10] + "!" + good[10:], origin="test"))


def test_sealed_messages_are_exact() -> None:
    sealer = Sealer(new_key())
    assert sealer.open(sealer.seal(b"", b"ctx"), b"ctx") == b""  # the shortest sealed value
    with pytest.raises(SealError) as short:
        sealer.open(sealer.seal(b"", b"ctx")[:-1], b"ctx")
    assert str(short.value) == "not a sealed value of a known version"
    with pytest.raises(SealError) as foreign:
        Sealer(new_key()).open(sealer.seal(b"x", b"ctx"), b"ctx")
    assert str(foreign.value) == "does not decrypt with this key"
    assert repr(sealer) == "Sealer(<key redacted>)"


def test_cached_token_json_rejects_garbage() -> None:
    e = entry()
    assert CachedToken.from_json(e.to_json()) == e
    for bad in (b"[]", b"{}", b'{"token": 1, "scope": "", "expires_at": 1, "obtained_at": 1}'):
        with pytest.raises(ValueError, match="cached token"):
            CachedToken.from_json(bad)


def test_grant_json_and_repr() -> None:
    g = grant()
    assert Grant.from_json(g.to_json()) == g
    assert REFRESH_TOKEN not in repr(g)
    assert "active" in repr(g)
    assert "revoked 'invalid_grant'" in repr(grant(revoked="invalid_grant"))
    for bad in (
        b"[]",
        b"{}",
        b'{"refresh_token": 1, "account": "", "revoked": "", '
        b'"signed_in_at": 1, "rotated_at": 1, "revoked_at": 0}',
    ):
        with pytest.raises(ValueError, match="sign-in"):
            Grant.from_json(bad)


def test_delegated_apps_have_keys_of_their_own() -> None:
    delegated = CacheKey.for_app(replace(fake_app(), delegated=True), "reports@contoso.com")
    assert delegated.identity != MAILBOX_KEY.identity


# -- memory --------------------------------------------------------------------------------


async def test_memory_cache() -> None:
    cache = MemoryTokenCache()
    assert await cache.load(KEY) is None
    await cache.store(KEY, e := entry())
    assert await cache.load(KEY) is e
    assert await cache.load(MAILBOX_KEY) is None
    async with cache.exclusive(KEY):
        pass
    assert await cache.load_grant(MAILBOX_KEY) is None
    await cache.store_grant(MAILBOX_KEY, g := grant())
    assert await cache.load_grant(MAILBOX_KEY) is g
    assert await cache.load(MAILBOX_KEY) is None  # sign-ins and tokens apart
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


async def test_file_cache_keeps_sign_ins_sealed_and_apart_from_tokens(tmp_path: Path) -> None:
    key = new_key()
    path = tmp_path / "tokens"
    cache = FileTokenCache(path, key)
    await cache.store_grant(MAILBOX_KEY, first := grant())
    await cache.store(MAILBOX_KEY, e := entry(lifetime=1))
    data = path.read_bytes()
    for text in (REFRESH_TOKEN, "reports@contoso.com", "refresh_token"):
        assert text.encode() not in data
        assert base64.b64encode(text.encode()) not in data
    again = FileTokenCache(path, key)  # a restart
    assert await again.load_grant(MAILBOX_KEY) == first
    assert await again.load(MAILBOX_KEY) == e
    assert await again.load_grant(KEY) is None
    # Tokens that expired are swept at the next write; sign-ins never are.
    await trio.sleep(1.1)
    await again.store(KEY, entry("other"))
    assert await again.load(MAILBOX_KEY) is None
    assert await again.load_grant(MAILBOX_KEY) == first
    # A rotated refresh token replaces the old one in one write, beside the tokens.
    await again.store_grant(MAILBOX_KEY, rotated := grant("rotated-refresh-token"))
    assert await FileTokenCache(path, key).load_grant(MAILBOX_KEY) == rotated
    assert (await FileTokenCache(path, key).load(KEY) or entry()).token.value == "other"


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


async def test_file_cache_refuses_a_file_of_another_user(tmp_path: Path) -> None:
    key = new_key()
    path = tmp_path / "tokens"
    cache = FileTokenCache(path, key)
    await cache.store(KEY, entry())
    os.chown(path, 65534, 65534)  # the tests run as root; 65534 is "nobody"
    with pytest.raises(ValueError, match=r"belongs to another user \(uid 65534\)"):
        FileTokenCache(path, key)
    with pytest.raises(CacheError, match="belongs to another user"):
        await cache.load(KEY)


async def test_file_cache_never_blocks_on_a_fifo(tmp_path: Path) -> None:
    """A FIFO in the cache's place would block a plain open() for ever."""
    path = tmp_path / "tokens"
    os.mkfifo(path, 0o600)
    with trio.fail_after(10), pytest.raises(ValueError, match="not a regular file"):
        await trio.to_thread.run_sync(FileTokenCache, path, new_key(), abandon_on_cancel=True)


async def test_file_cache_never_follows_a_symbolic_link(tmp_path: Path) -> None:
    """A link in the cache's place could point the proxy's writes at another file."""
    target = tmp_path / "elsewhere"
    key = new_key()
    await FileTokenCache(target, key).store(KEY, entry())
    (tmp_path / "tokens").symlink_to(target)
    with pytest.raises(ValueError, match=r"cannot open: .*symbolic link"):
        FileTokenCache(tmp_path / "tokens", key)


async def test_file_cache_may_wait_for_no_lock_at_all(tmp_path: Path) -> None:
    cache = FileTokenCache(tmp_path / "tokens", new_key(), lock_wait=0)
    await cache.store(KEY, entry())
    assert await cache.load(KEY) is not None
    with pytest.raises(ValueError, match="lock_wait must not be negative"):
        FileTokenCache(tmp_path / "tokens", new_key(), lock_wait=-1)


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


#: Takes the flock a writer needs, then stops itself (SIGSTOP) while holding it.
LOCK_HOLDER = """
import fcntl, os, signal, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""


@contextmanager
def stopped_lock_holder(
    lock_path: Path, script: str = LOCK_HOLDER, *args: str
) -> Iterator[subprocess.Popen[str]]:
    """Another process, stopped while it holds the cache's lock; killed on exit."""
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(lock_path), *args], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        yield holder
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


async def test_file_cache_write_gives_up_on_a_stopped_lock_holder(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    cache = FileTokenCache(path, new_key(), lock_wait=0.2)
    await cache.store(KEY, entry("before"))
    with stopped_lock_holder(tmp_path / "tokens.lock"):
        with trio.fail_after(20), pytest.raises(CacheError, match="still locked"):
            await cache.store(KEY, entry("blocked"))
        assert (await cache.load(KEY) or entry()).token.value == "before"  # reads need no lock
    await cache.store(KEY, entry("after"))
    assert (await cache.load(KEY) or entry()).token.value == "after"


async def test_file_cache_write_waiting_for_the_lock_can_be_cancelled(tmp_path: Path) -> None:
    """A login's deadline is not held up by a writer waiting for a stopped lock holder."""
    path = tmp_path / "tokens"
    cache = FileTokenCache(path, new_key())  # the default lock_wait, longer than the deadline
    with stopped_lock_holder(tmp_path / "tokens.lock") as holder:

        async def watchdog() -> None:
            # Only so that a writer that cannot be cancelled fails this test, not hangs it.
            await trio.sleep(15)
            holder.kill()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watchdog)
            with trio.move_on_after(0.1) as deadline:
                await cache.store(KEY, entry("abandoned"))
            nursery.cancel_scope.cancel()
        assert deadline.cancelled_caught
    # The abandoned write finished or gave up by itself; the next one waits for it.
    await cache.store(KEY, entry("after"))
    assert (await cache.load(KEY) or entry()).token.value == "after"


#: Takes the renewal lock of one key (a POSIX record lock on its byte), then stops itself.
RENEWAL_HOLDER = """
import fcntl, os, signal, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.lockf(fd, fcntl.LOCK_EX, 1, int(sys.argv[2]))
print("locked", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""


def renewal_byte(key: CacheKey) -> int:
    """The byte of the renewal lock file that stands for ``key`` (as the cache picks it)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(key.name.encode()).digest()[:4]) % (1 << 20)


async def test_file_cache_renewals_exclude_other_processes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process renewing a key holds this one off (then, stopped, is passed by);
    other keys are not held up, and tasks of one process do not lock each other out."""
    path = tmp_path / "tokens"
    cache = FileTokenCache(path, new_key(), renew_wait=0.3)
    with stopped_lock_holder(
        tmp_path / "tokens.renew.lock", RENEWAL_HOLDER, str(renewal_byte(MAILBOX_KEY))
    ):
        with trio.fail_after(20):
            async with cache.exclusive(KEY), cache.exclusive(KEY):
                pass  # another key: free; the same process: no conflict
            assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
            async with cache.exclusive(MAILBOX_KEY):
                pass
        (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert "another process has been renewing" in warning.getMessage()
    caplog.clear()
    async with cache.exclusive(MAILBOX_KEY):  # the holder is gone: its lock with it
        pass
    assert not caplog.records
    cache.close()


async def test_file_cache_renewal_lock_is_held_until_released(tmp_path: Path) -> None:
    """While this process renews a key, another process waits for it."""
    path = tmp_path / "tokens"
    cache = FileTokenCache(path, new_key())
    probe = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "try:\n"
        "    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, int(sys.argv[2]))\n"
        "    print('free')\n"
        "except OSError:\n"
        "    print('held')\n"
    )

    def other_process() -> str:
        done = subprocess.run(
            [sys.executable, "-c", probe, str(path) + ".renew.lock", str(renewal_byte(KEY))],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()

    async with cache.exclusive(KEY):
        assert await trio.to_thread.run_sync(other_process) == "held"
    assert await trio.to_thread.run_sync(other_process) == "free"
    cache.close()


@pytest.fixture
def unreadable(tmp_path: Path) -> FileTokenCache:
    """A file cache whose file became something that opens but cannot be read (EISDIR)."""
    cache = FileTokenCache(tmp_path / "tokens", new_key())
    (tmp_path / "tokens").mkdir(mode=0o700)
    return cache


async def test_file_cache_os_errors_are_cache_errors(
    unreadable: FileTokenCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = unreadable
    with pytest.raises(CacheError, match="cannot read"):
        await cache.load(KEY)
    with pytest.raises(CacheError, match="cannot read"):
        await cache.store(KEY, entry())
    (tmp_path / "tokens").rmdir()

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))  # as NFS without lockd says

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(CacheError, match="cannot lock"):
        await cache.store(KEY, entry())


async def test_source_carries_on_when_the_file_cache_fails(
    unreadable: FileTokenCache, caplog: pytest.LogCaptureFixture
) -> None:
    """A cache that meets OSErrors inside must not end the background refresh."""
    fake = FakeProvider(wall_clock)
    source = CachingTokenSource(
        {"contoso": fake_app()}, providers={"contoso": fake}, cache=unreadable
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run)
            token = await source.token("contoso")
            nursery.cancel_scope.cancel()
    assert token.value == "token-1"
    assert fake.calls == 1
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("token cache unavailable" in m and "cannot read" in m for m in logged)
    assert any("token not shared" in m for m in logged)


async def test_damaged_file_is_treated_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_bytes(b"\x01" + os.urandom(64))
    path.chmod(0o600)
    cache = FileTokenCache(path, new_key())
    assert await cache.load(KEY) is None


# -- redis ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if not redis_available():
        pytest.fail("redis-server is not installed: run tests/install-deps.sh")
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


async def test_redis_sign_ins_are_shared_sealed_and_never_expire(
    shared: tuple[RedisTokenCache, RedisTokenCache], redis_server: RedisServer
) -> None:
    a, b = shared
    assert await a.load_grant(MAILBOX_KEY) is None
    await a.store_grant(MAILBOX_KEY, g := grant())
    assert await b.load_grant(MAILBOX_KEY) == g
    assert await b.load(MAILBOX_KEY) is None
    name = f"{a._prefix}:grant:{MAILBOX_KEY.digest}"
    dump = redis_server.command("GET", name)
    assert REFRESH_TOKEN.encode() not in dump
    assert b"reports@contoso.com" not in dump
    assert redis_server.command("PTTL", name) == b":-1\r\n"
    await b.store_grant(MAILBOX_KEY, rotated := grant("rotated"))
    assert await a.load_grant(MAILBOX_KEY) == rotated
    # Moved under another key, a sign-in does not decrypt.
    assert redis_server.command("COPY", name, f"{a._prefix}:grant:{KEY.digest}") == b":1\r\n"
    with pytest.raises(CacheError):
        await a.load_grant(KEY)


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


def redis_commands(cache: RedisTokenCache) -> int:
    """How many commands the Redis server behind ``cache`` has processed so far."""
    info = cache._client.info("stats")
    assert isinstance(info, dict)
    return int(info["total_commands_processed"])


async def test_redis_lock_is_exclusive_across_instances(
    shared: tuple[RedisTokenCache, RedisTokenCache],
) -> None:
    a, b = shared
    order: list[str] = []
    a_holds, b_tries, a_may_leave = trio.Event(), trio.Event(), trio.Event()

    async def first() -> None:
        async with a.exclusive(KEY):
            order.append("a in")
            a_holds.set()
            await a_may_leave.wait()
            order.append("a out")

    async def second() -> None:
        await a_holds.wait()
        b_tries.set()
        async with b.exclusive(KEY):
            order.append("b in")
        order.append("b out")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        nursery.start_soon(second)
        await b_tries.wait()
        # b polls Redis for the lock; let it try a few times while a holds it.
        polls = redis_commands(a)
        with trio.fail_after(10):
            while redis_commands(a) < polls + 3:  # noqa: ASYNC110 (Redis has no event)
                await trio.sleep(0.01)
        assert order == ["a in"]
        a_may_leave.set()
    assert order == ["a in", "a out", "b in", "b out"]


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


async def test_redis_lock_of_a_crashed_holder_expires(
    shared: tuple[RedisTokenCache, RedisTokenCache], redis_server: RedisServer
) -> None:
    a, _ = shared
    # A crashed instance's lock: nobody renews or releases it.
    lock_name = f"{a._prefix}:lock:{KEY.digest}"
    redis_server.command("SET", lock_name, "crashed-holder", "PX", "1000")
    with trio.fail_after(10):
        async with a.exclusive(KEY):
            # Ours now: the crashed holder's expired (not given up on: it had an expiry).
            assert redis_server.command("GET", lock_name) != b"$14\r\ncrashed-holder\r\n"
            assert int(redis_server.command("PTTL", lock_name)[1:]) > 0


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


async def test_redis_lock_taken_by_an_abandoned_attempt_is_released(
    redis_server: RedisServer,
) -> None:
    """A cancelled waiter whose ``SET NX`` lands after it gave up leaves no lock behind."""
    key, prefix = new_key(), f"t{secrets.token_hex(4)}"
    # A long lock_timeout: a leaked lock would stall the other instance for a minute.
    a = RedisTokenCache(redis_server.url, key, prefix=prefix, lock_timeout=60.0)
    b = RedisTokenCache(redis_server.url, key, prefix=prefix, lock_timeout=60.0)
    try:
        # Redis holds every write for a second: a's SET NX is still pending when a is
        # cancelled, and succeeds afterwards in the thread a abandoned.
        assert redis_server.command("CLIENT", "PAUSE", "1000", "WRITE") == b"+OK\r\n"
        with trio.move_on_after(0.2) as gave_up:
            async with a.exclusive(KEY):
                pytest.fail("the lock cannot be taken while Redis holds writes")
        assert gave_up.cancelled_caught
        with trio.fail_after(20):  # far less than lock_timeout
            async with b.exclusive(KEY):
                pass
        assert redis_server.command("EXISTS", f"{prefix}:lock:{KEY.digest}") == b":0\r\n"
    finally:
        a.close()
        b.close()


async def test_rediss_checks_the_server_name(tmp_path: Path) -> None:
    """Over TLS the certificate must name the host in the URL, not just come from a trusted
    CA: redis-py before 6 did not check the name unless told (redis/redis-py#3626)."""
    pki = TestPki(tmp_path / "pki")
    for name, identity, accepted in (
        ("right", "127.0.0.1", True),
        ("wrong", "redis.elsewhere.example", False),
    ):
        key_file, cert_file = pki.issue_split(name, identity)
        tls = RedisTls(key_file, cert_file, pki.ca_file)
        with RedisServer(tmp_path / f"redis-{name}", tls=tls) as server:
            cache = RedisTokenCache(server.url, new_key(), ca_file=pki.ca_file)
            try:
                # Asked for explicitly, whatever redis-py's default is.
                options = cache._client.connection_pool.connection_kwargs
                assert options["ssl_check_hostname"] is True
                if accepted:
                    await cache.store(KEY, e := entry())
                    assert await cache.load(KEY) == e
                else:
                    with pytest.raises(CacheError, match=r"not valid for '127\.0\.0\.1'"):
                        await cache.load(KEY)
            finally:
                cache.close()


def test_redis_url_checks_and_redaction() -> None:
    with pytest.raises(ValueError, match="must start with"):
        RedisTokenCache("http://localhost", new_key())
    assert redact("redis://:hunter2@db:6379/0") == "redis://:<redacted>@db:6379/0"
    assert redact("redis://user:hunter2@db/0") == "redis://user:<redacted>@db/0"
    assert redact("redis://db:6379/0") == "redis://db:6379/0"
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


async def test_redis_with_a_password(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """AUTH with the configured password; without it, or with a wrong one, the cache says
    so (the source then carries on without it), and the password never shows."""
    password = "redis-pass-7f3a"
    with RedisServer(tmp_path / "redis", password=password) as server:
        key = new_key()
        good = RedisTokenCache(server.url, key, password=Secret(password, origin="test"))
        missing = RedisTokenCache(server.url, key)
        wrong = RedisTokenCache(server.url, key, password=Secret("guess", origin="test"))
        try:
            await good.store(KEY, entry())
            assert await good.load(KEY) is not None
            with pytest.raises(CacheError, match="AuthenticationError"):
                await missing.load(KEY)
            with pytest.raises(CacheError, match="AuthenticationError") as refused:
                await wrong.load(KEY)
        finally:
            for cache in (good, missing, wrong):
                cache.close()
    assert password not in repr(good) + str(refused.value) + caplog.text


def test_file_cache_renewals_may_not_wait_a_negative_time(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="renew_wait must not be negative"):
        FileTokenCache(tmp_path / "tokens", new_key(), renew_wait=-1)


async def test_file_cache_renews_without_a_lock_it_cannot_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "tokens.renew.lock").mkdir()  # something in its place that is not a file
    cache = FileTokenCache(tmp_path / "tokens", new_key())
    async with cache.exclusive(KEY):
        pass
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "renewing without the lock" in warning.getMessage()
    lock = tmp_path / "tokens.renew.lock"
    assert f"token cache {lock}: cannot open: Is a directory" in warning.getMessage()
    cache.close()


async def test_file_cache_from_before_sign_ins_keeps_its_tokens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A cache file written before delegated apps (no "grants") is read, not discarded."""
    key = new_key()
    path = tmp_path / "tokens"
    await FileTokenCache(path, key).store(KEY, e1 := entry("one"))
    sealer = Sealer(key)
    document = json.loads(sealer.open(path.read_bytes(), CONTEXT))
    del document["grants"]
    path.write_bytes(sealer.seal(json.dumps(document).encode(), CONTEXT))
    caplog.set_level(logging.WARNING)
    assert await FileTokenCache(path, key).load(KEY) == e1
    assert [r.getMessage() for r in caplog.records] == []


async def test_file_cache_renewal_lock_private_whatever_the_umask(tmp_path: Path) -> None:
    cache = FileTokenCache(tmp_path / "tokens", new_key(), renew_wait=0)  # 0: do not wait
    old = os.umask(0)
    try:
        async with cache.exclusive(KEY):
            pass
    finally:
        os.umask(old)
        cache.close()
    assert stat.S_IMODE((tmp_path / "tokens.renew.lock").stat().st_mode) == 0o600


async def test_file_cache_write_failure_says_why_and_leaves_the_old_file_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tokens"
    cache = FileTokenCache(path, new_key())
    await cache.store(KEY, first := entry("one"))

    def broken_disk(src: object, dst: object) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "replace", broken_disk)
    refusal = rf"^token cache {path}: cannot write: Input/output error$"
    with pytest.raises(CacheError, match=refusal):
        await cache.store(KEY, entry("two"))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["tokens", "tokens.lock"]  # no temporary left
    assert await cache.load(KEY) == first
