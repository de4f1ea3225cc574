"""Delegated apps in the token source: sign-ins kept in the store, renewal with rotation,
revocation, and what happens to an account nobody has signed in for -- under MockClock."""

from __future__ import annotations

import logging
import random
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

from broker.cache import CachedToken, CacheError, CacheKey, Grant
from broker.cache.memory import MemoryTokenCache
from broker.clock import trio_wall_clock
from broker.delegated import SignInRequired, account_names, matching_account
from broker.errors import TemporaryTokenError
from broker.source import SIGN_IN_WATCH, CachingTokenSource, SignInState
from tests.broker.helpers import FakeDelegatedProvider, fake_app

if TYPE_CHECKING:
    from broker.clock import Clock

EPOCH = 1_800_000_000.0
JANE = "jane@contoso.com"
BOB = "bob@contoso.com"


@pytest.fixture
def wall() -> Clock:
    return trio_wall_clock(EPOCH)


def make(
    wall: Clock, fake: FakeDelegatedProvider, cache: Any, **options: Any
) -> CachingTokenSource:
    app = replace(fake_app("personal"), delegated=True)
    return CachingTokenSource(
        {"personal": app},
        providers={"personal": fake},
        cache=cache,
        clock=wall,
        rng=random.Random(4),
        accounts={"personal": {JANE: ["jane"], BOB: ["bob", "bob-scanner"]}},
        authorize_command="xoauth2-proxy authorize -c /etc/xoauth2-proxy/config.toml",
        **options,
    )


def key(source: CachingTokenSource, account: str) -> CacheKey:
    return source._key("personal", account)


async def signed_in(source: CachingTokenSource, fake: FakeDelegatedProvider, account: str) -> None:
    await source.complete_sign_in("personal", account, fake.sign_in(), signed_in_as=account)


async def test_an_account_nobody_signed_in_for(
    wall: Clock, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Logins get an error that names the users and the command; the identity provider is
    never asked; the error is logged once however long it lasts; a sign-in ends it."""
    caplog.set_level(logging.INFO, "xoauth2_proxy")
    fake = FakeDelegatedProvider(wall)
    cache = MemoryTokenCache()
    source = make(wall, fake, cache)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run)
        await trio.sleep(1)
        with pytest.raises(SignInRequired) as caught:
            await source.token("personal", mailbox=BOB)
        text = f"{caught.value} {caught.value.fix}"
        assert "'bob', 'bob-scanner'" in text
        assert "xoauth2-proxy authorize -c /etc/xoauth2-proxy/config.toml bob`" in text
        assert "sign in as bob@contoso.com" in text
        assert caught.value.code == "NOT_SIGNED_IN"
        for _ in range(100):  # logins every minute for 100 minutes
            with pytest.raises(SignInRequired):
                await source.token("personal", mailbox=JANE)
            await trio.sleep(60)
        assert fake.refreshed == []
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 2, [r.getMessage() for r in errors]  # once per account
        assert (await source.sign_in_status("personal", JANE)).state is SignInState.NOT_SIGNED_IN
        # Someone signs in (another process, through the same store): both the logins and
        # the background task take it up without anything else happening.
        other = make(wall, fake, cache)
        await signed_in(other, fake, JANE)
        await trio.sleep(SIGN_IN_WATCH + 1)
        assert fake.refreshed == []  # the sign-in's own token is used: no renewal yet
        token = await source.token("personal", mailbox=JANE)
        assert token.value.startswith("delegated-token-")
        nursery.cancel_scope.cancel()
    assert any("signed in again" in r.getMessage() for r in caplog.records)


async def test_renewal_rotates_the_refresh_token_in_the_store(
    wall: Clock, autojump_clock: trio.testing.MockClock
) -> None:
    fake = FakeDelegatedProvider(wall, strict=True)
    cache = MemoryTokenCache()
    source = make(wall, fake, cache)
    await signed_in(source, fake, JANE)
    first = await cache.load_grant(key(source, JANE))
    assert first is not None
    assert first.account == JANE
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run)
        await trio.sleep(5 * 3600)  # five token lifetimes
        nursery.cancel_scope.cancel()
    assert len(fake.refreshed) >= 5  # at least once per token lifetime
    # Each renewal used the refresh token the previous one left, never an old one: the
    # strict provider would have revoked everything.
    assert fake.refreshed[0] == first.refresh_token
    assert len(set(fake.refreshed)) == len(fake.refreshed)
    stored = await cache.load_grant(key(source, JANE))
    assert stored is not None
    assert stored.refresh_token in fake.valid
    assert len(fake.valid) == 1
    assert stored.signed_in_at == first.signed_in_at < stored.rotated_at
    status = await source.sign_in_status("personal", JANE)
    assert status.state is SignInState.SIGNED_IN
    assert status.signed_in_as == JANE
    assert stored.refresh_token not in repr(status)


async def test_a_revoked_sign_in_stops_the_requests_for_that_account_only(
    wall: Clock, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeDelegatedProvider(wall)
    cache = MemoryTokenCache()
    source = make(wall, fake, cache)
    await signed_in(source, fake, JANE)
    await signed_in(source, fake, BOB)
    jane_token = (await cache.load_grant(key(source, JANE)) or Grant("", "", 0, 0)).refresh_token
    fake.valid.discard(jane_token)  # Jane changed her password
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run)
        await trio.sleep(3600)  # the renewals are due
        requests = len(fake.refreshed)
        assert fake.refreshed.count(jane_token) == 1
        await trio.sleep(10 * 3600)
        # Jane's sign-in is never tried again (nor anything else for her); Bob's tokens are
        # renewed as ever.
        assert fake.refreshed.count(jane_token) == 1
        assert "" not in fake.refreshed
        assert len(fake.refreshed) > requests
        with pytest.raises(SignInRequired) as caught:
            await source.token("personal", mailbox=JANE)
        assert (await source.token("personal", mailbox=BOB)).remaining(wall()) > 600
        nursery.cancel_scope.cancel()
    assert caught.value.revoked
    assert "authorize -c /etc/xoauth2-proxy/config.toml jane`" in caught.value.fix
    stored = await cache.load_grant(key(source, JANE))
    assert stored is not None
    assert stored.revoked.startswith("invalid_grant")
    assert stored.refresh_token == ""  # worthless: not kept
    status = await source.sign_in_status("personal", JANE)
    assert status.state is SignInState.REVOKED
    assert "invalid_grant" in status.reason
    assert "authorize" in status.fix
    revocations = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(revocations) == 1, [r.getMessage() for r in revocations]
    assert "'jane'" in revocations[0].getMessage()


async def test_the_store_refusing_a_rotated_refresh_token_loses_nothing(
    wall: Clock, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """With a server that refuses reused refresh tokens, a rotation the store did not take
    is kept in memory, used for the next renewal, and stored then."""

    class FailingOnce(MemoryTokenCache):
        failures = 1

        async def store_grant(self, key: CacheKey, grant: Grant) -> None:
            if self.failures:
                self.failures -= 1
                raise CacheError("disk full")
            await super().store_grant(key, grant)

    fake = FakeDelegatedProvider(wall, strict=True)
    cache = FailingOnce()
    source = make(wall, fake, cache)
    cache.failures = 0
    await signed_in(source, fake, JANE)
    original = await cache.load_grant(key(source, JANE))
    assert original is not None
    cache.failures = 1
    await trio.sleep(3000)  # due
    await source.token("personal", mailbox=JANE)
    assert any("kept in memory" in r.getMessage() for r in caplog.records)
    # The store still holds the old refresh token: a crash now would leave that one.
    assert await cache.load_grant(key(source, JANE)) == original
    await trio.sleep(3000)
    await source.token("personal", mailbox=JANE)
    assert fake.refreshed[1] != original.refresh_token  # the new one, from memory
    stored = await cache.load_grant(key(source, JANE))
    assert stored is not None
    assert stored.refresh_token in fake.valid
    assert source._states[key(source, JANE)].unsaved is None


async def test_a_new_sign_in_beats_an_unsaved_rotation(
    wall: Clock, autojump_clock: trio.testing.MockClock
) -> None:
    fake = FakeDelegatedProvider(wall)
    cache = MemoryTokenCache()
    source = make(wall, fake, cache)
    await signed_in(source, fake, JANE)
    state_key = key(source, JANE)
    stale = Grant("rt-stale", JANE, 0.0, 0.0)
    source._states[state_key].unsaved = (stale, "not-what-the-store-holds")
    fresh = await cache.load_grant(state_key)
    assert fresh is not None
    await trio.sleep(3000)
    await source.token("personal", mailbox=JANE)
    assert fake.refreshed == [fresh.refresh_token]


async def test_an_unreadable_store_renews_with_the_sign_in_in_memory(
    wall: Clock, autojump_clock: trio.testing.MockClock
) -> None:
    class Unreadable(MemoryTokenCache):
        broken = False

        async def load(self, key: CacheKey) -> CachedToken | None:
            if self.broken:
                raise CacheError("connection refused")
            return await super().load(key)

        async def load_grant(self, key: CacheKey) -> Grant | None:
            if self.broken:
                raise CacheError("connection refused")
            return await super().load_grant(key)

    fake = FakeDelegatedProvider(wall)
    cache = Unreadable()
    source = make(wall, fake, cache)
    await signed_in(source, fake, JANE)
    cache.broken = True
    await trio.sleep(3000)
    assert (await source.token("personal", mailbox=JANE)).remaining(wall()) > 3000
    # A fresh process knows no sign-in: a temporary error, not "sign in again".
    with pytest.raises(TemporaryTokenError, match="cannot be read"):
        await make(wall, fake, cache).token("personal", mailbox=JANE)
    status = await source.sign_in_status("personal", JANE)
    assert status.state is SignInState.UNKNOWN
    assert "connection refused" in status.reason


async def test_a_crash_before_the_rotation_is_stored_leaves_the_old_sign_in(
    wall: Clock, autojump_clock: trio.testing.MockClock
) -> None:
    """The process dies (here: its task is cancelled) after the provider answered and
    before the store took the new refresh token: the store still holds the old one, and
    with a provider that keeps old refresh tokens valid (Entra), the next process renews
    with it."""

    class Stuck(MemoryTokenCache):
        stuck = False

        async def store_grant(self, key: CacheKey, grant: Grant) -> None:
            if self.stuck:
                await trio.sleep_forever()
            await super().store_grant(key, grant)

    fake = FakeDelegatedProvider(wall)
    cache = Stuck()
    source = make(wall, fake, cache)
    await signed_in(source, fake, JANE)
    before = await cache.load_grant(key(source, JANE))
    await trio.sleep(3000)
    cache.stuck = True
    with trio.move_on_after(5):
        await source.token("personal", mailbox=JANE)
    assert len(fake.refreshed) == 1  # the provider answered, with a new refresh token
    assert await cache.load_grant(key(source, JANE)) == before
    cache.stuck = False
    restarted = make(wall, fake, cache)
    assert (await restarted.token("personal", mailbox=JANE)).remaining(wall()) > 3000
    assert fake.refreshed[-1] == (before.refresh_token if before else None)


async def test_status_and_provider_of_an_app_only_app() -> None:
    source = CachingTokenSource(
        {"contoso": fake_app()}, providers={"contoso": FakeDelegatedProvider(lambda: EPOCH)}
    )
    assert source.is_delegated("contoso")
    app_only = CachingTokenSource({"contoso": fake_app()}, providers={"contoso": _NoProvider()})
    assert not app_only.is_delegated("contoso")
    with pytest.raises(ValueError, match="not delegated"):
        app_only.provider("contoso")
    with pytest.raises(ValueError, match="not delegated"):
        await app_only.sign_in_status("contoso", JANE)
    with pytest.raises(ValueError, match="no refresh token"):
        await source.complete_sign_in(
            "contoso",
            JANE,
            replace(FakeDelegatedProvider(lambda: EPOCH).sign_in(), refresh_token=None),
            signed_in_as=JANE,
        )


class _NoProvider:
    async def fetch(self) -> Any:
        raise AssertionError("not asked")


def test_the_names_an_account_goes_by() -> None:
    claims = {
        "email": "Jane@Example.com",
        "preferred_username": "jane@example.com",
        "upn": "jdoe@corp.example.com",
    }
    assert account_names(claims) == ["jane@example.com", "jdoe@corp.example.com"]
    assert matching_account(claims, "JDOE@corp.example.com") == "jdoe@corp.example.com"
    assert matching_account(claims, "bob@example.com") is None
    # An address the identity provider says it has not verified names nobody.
    unverified = {"email": "jane@example.com", "email_verified": False}
    assert account_names(unverified) == []
    assert matching_account({**unverified, "email_verified": "false"}, "jane@example.com") is None
    assert account_names({"email": " ", "upn": 7}) == []


async def test_a_revocation_never_overwrites_a_newer_sign_in(wall: Clock) -> None:
    """The refresh token that was refused is marked revoked only if it is still the one
    stored: a person who signed in again meanwhile (another process) keeps that sign-in."""
    fake, cache = FakeDelegatedProvider(wall), MemoryTokenCache()
    source = make(wall, fake, cache)
    await signed_in(source, fake, JANE)
    stored = key(source, JANE)
    old = await cache.load_grant(stored)
    assert old is not None
    newer = Grant("a-newer-refresh-token", JANE, wall(), wall())
    await cache.store_grant(stored, newer)
    refused = SignInRequired("refused", code="invalid_grant", revoked=True)
    await source._revoked(source._state("personal", JANE), old, refused)
    assert await cache.load_grant(stored) == newer
    # With the refused one still stored, it is marked revoked (and its token dropped).
    await cache.store_grant(stored, old)
    await source._revoked(source._state("personal", JANE), old, refused)
    marked = await cache.load_grant(stored)
    assert marked is not None
    assert (marked.refresh_token, marked.revoked) == ("", "invalid_grant: refused")
