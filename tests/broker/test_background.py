"""Background refresh (CachingTokenSource.run) under trio's MockClock, and once in real time."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

from broker.claims import decode_claims
from broker.clock import trio_wall_clock
from broker.errors import PermanentTokenError, TemporaryTokenError
from broker.model import Secret
from broker.source import MAX_PERMANENT_BACKOFF, CachingTokenSource
from tests.broker.helpers import FakeMailboxProvider, FakeProvider, fake_app

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from broker.clock import Clock
    from broker.model import App
    from tests.support.entra import EntraEmulator

EPOCH = 1_800_000_000.0


@pytest.fixture
def wall() -> Clock:
    """The broker's wall clock, moving with trio's clock.

    Tests using it also take pytest-trio's ``autojump_clock`` (as a direct argument, or
    pytest-trio does not see it): time then jumps whenever every task sleeps.
    """
    return trio_wall_clock(EPOCH)


def make(wall: Clock, providers: dict[str, Any], **options: Any) -> CachingTokenSource:
    return CachingTokenSource(
        {name: fake_app(name) for name in providers},
        providers=providers,
        clock=wall,
        rng=random.Random(4),
        **options,
    )


async def running(nursery: trio.Nursery, source: CachingTokenSource) -> None:
    await nursery.start(source.run)


async def test_renewed_before_expiry_and_no_login_waits(
    wall: Clock, autojump_clock: trio.testing.MockClock
) -> None:
    fake = FakeProvider(wall, delay=5.0)  # every IdP request takes 5 s
    source = make(wall, {"contoso": fake})
    waited: list[float] = []
    left: list[float] = []
    async with trio.open_nursery() as nursery:
        await running(nursery, source)
        await trio.sleep(10)  # the warm-up fetch
        assert fake.calls == 1
        for _ in range(int(3 * 3600 / 15)):  # a login every 15 s for three hours
            started = trio.current_time()
            token = await source.token("contoso")
            waited.append(trio.current_time() - started)
            left.append(token.remaining(wall()))
            await trio.sleep(15)
        nursery.cancel_scope.cancel()
    assert max(waited) == 0  # nobody ever waited for the 5 s requests
    assert min(left) > 600 - 15  # always a token with about ten minutes or more left
    # Renewed between 12 and 10 minutes before expiry: three renewals in three hours.
    gaps = [b - a for a, b in zip(fake.times, fake.times[1:], strict=False)]
    assert fake.calls == 4, gaps
    assert all(3600 - 720 - 5 <= gap <= 3600 - 600 for gap in gaps), gaps


async def test_jitter_spreads_renewals(wall: Clock, autojump_clock: trio.testing.MockClock) -> None:
    fakes = {f"app{i}": FakeProvider(wall) for i in range(20)}
    source = make(wall, dict(fakes))
    async with trio.open_nursery() as nursery:
        await running(nursery, source)
        await trio.sleep(3600)
        for name in fakes:
            await source.token(name)
        nursery.cancel_scope.cancel()
    renewals = [fake.times[1] - fake.times[0] for fake in fakes.values()]
    assert all(3600 - 720 <= r <= 3600 - 600 for r in renewals)
    assert len({round(r) for r in renewals}) > 10  # not all in the same second


async def test_without_run_the_login_renews_and_waits(
    wall: Clock, autojump_clock: trio.testing.MockClock
) -> None:
    fake = FakeProvider(wall, delay=5.0)
    source = make(wall, {"contoso": fake}, refresh_jitter=0)
    await source.token("contoso")
    await trio.sleep(3600 - 600 + 1)
    started = trio.current_time()
    token = await source.token("contoso")
    assert trio.current_time() - started == 5
    assert token.value == "token-2"


async def test_storm_backs_off_and_honours_retry_after(
    wall: Clock, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fake = FakeProvider(wall)
    fake.outcomes = [
        TemporaryTokenError("HTTP 503"),
        TemporaryTokenError("HTTP 500"),
        TemporaryTokenError("throttled", code="HTTP 429", retry_after=30),
        TemporaryTokenError("HTTP 502"),
        TemporaryTokenError("throttled", code="HTTP 429", retry_after=45),
        TemporaryTokenError("HTTP 504"),
    ]
    source = make(wall, {"contoso": fake})
    refused = 0
    async with trio.open_nursery() as nursery:
        await running(nursery, source)
        while fake.calls < 7:
            try:
                await source.token("contoso")  # logins meanwhile do not reach the IdP
            except TemporaryTokenError:
                refused += 1
            await trio.sleep(0.25)
        token = await source.token("contoso")
        nursery.cancel_scope.cancel()
    assert token.value == "token-7"
    gaps = [b - a for a, b in zip(fake.times, fake.times[1:], strict=False)]
    assert 0.5 <= gaps[0] <= 1  # 1 s, jittered down by up to half
    assert 1 <= gaps[1] <= 2
    assert gaps[2] == 30  # Retry-After beats the 2-4 s backoff
    assert 4 <= gaps[3] <= 8
    assert gaps[4] == 45
    assert 16 <= gaps[5] <= 32
    assert refused > 300  # about 4 logins a second for about 100 s, none let through
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 6
    assert "HTTP 429" in warnings[2].getMessage()
    assert any("obtained again after 6 failed attempts" in r.getMessage() for r in caplog.records)


async def test_idp_down_logins_use_the_cached_token_then_get_temporary(
    wall: Clock, autojump_clock: trio.testing.MockClock
) -> None:
    fake = FakeProvider(wall)
    source = make(wall, {"contoso": fake}, refresh_jitter=0)
    async with trio.open_nursery() as nursery:
        await running(nursery, source)
        first = await source.token("contoso")
        fake.outcomes = [TemporaryTokenError("IdP down")] * 1000
        await trio.sleep(3600 - 61)  # the IdP has been failing for 9 minutes
        assert await source.token("contoso") is first
        await trio.sleep(2)  # less than a minute left: no longer handed out
        with pytest.raises(TemporaryTokenError, match="IdP down"):
            await source.token("contoso")
        calls = fake.calls
        nursery.cancel_scope.cancel()
    assert 9 <= calls < 20  # 1, 2, 4... up to 120 s apart: not hammered


async def test_a_fetch_that_never_finishes_is_a_temporary_failure(
    wall: Clock, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """An IdP that accepts the request and never finishes answering (HTTP read timeouts do
    not catch one that trickles bytes) holds nobody up beyond fetch_timeout."""
    fake = FakeProvider(wall)
    fake.gate = trio.Event()  # the IdP's answer never completes
    source = make(wall, {"contoso": fake}, base_backoff=10, max_backoff=10)
    async with trio.open_nursery() as nursery:
        await running(nursery, source)  # the warm-up fetch hangs
        with trio.fail_after(3600):
            with pytest.raises(TemporaryTokenError, match="did not answer within 60 s"):
                await source.token("contoso")  # waits for the warm-up fetch
            with pytest.raises(TemporaryTokenError, match="did not answer"):
                await source.token("contoso")  # held back: the IdP is not asked again
            assert fake.calls == 1
            fake.gate = None  # the IdP recovers; the background retries after the backoff
            await trio.sleep(10)
            assert (await source.token("contoso")).value == "token-2"
        nursery.cancel_scope.cancel()
    assert fake.calls == 2
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "did not answer within 60 s [FETCH_TIMEOUT] (attempt 1; trying again in" in (
        warning.getMessage()
    )


def test_fetch_timeout_must_be_positive(wall: Clock) -> None:
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="fetch_timeout must be positive"):
            make(wall, {"contoso": FakeProvider(wall)}, fetch_timeout=bad)


async def test_permanent_error_reported_once_with_fix_and_not_hammered(
    wall: Clock, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeProvider(wall)
    error = PermanentTokenError(
        "app 'contoso': Entra refused the token request: invalid_client",
        code="AADSTS7000215",
        fix="The client secret is wrong. Copy the secret's Value.",
    )
    fake.outcomes = [error] * 10_000
    source = make(wall, {"contoso": fake})
    async with trio.open_nursery() as nursery:
        await running(nursery, source)
        for _ in range(3 * 360):  # a login every 10 s for three hours
            with pytest.raises(PermanentTokenError) as caught:
                await source.token("contoso")
            assert caught.value.code == "AADSTS7000215"
            await trio.sleep(10)
        nursery.cancel_scope.cancel()
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert "AADSTS7000215" in message
    assert "Copy the secret's Value" in message
    assert fake.calls <= 3 * 60 + 10  # at most one a minute, whatever the login rate


async def test_permanent_background_backoff_grows_to_an_hour(
    wall: Clock, autojump_clock: trio.testing.MockClock
) -> None:
    fake = FakeProvider(wall)
    fake.outcomes = [PermanentTokenError("unknown client", code="AADSTS700016")] * 100
    source = make(wall, {"contoso": fake})
    async with trio.open_nursery() as nursery:
        await running(nursery, source)
        await trio.sleep(12 * 3600)  # nobody logs in
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in zip(fake.times, fake.times[1:], strict=False)]
    assert gaps[:6] == [60, 120, 240, 480, 960, 1920]
    assert set(gaps[6:]) == {MAX_PERMANENT_BACKOFF}


async def test_recovery_after_a_permanent_error_is_reported_again(
    wall: Clock, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fake = FakeProvider(wall)
    fake.outcomes = [PermanentTokenError("bad", code="AADSTS7000215")]
    source = make(wall, {"contoso": fake})
    async with trio.open_nursery() as nursery:
        await running(nursery, source)
        await trio.sleep(61)
        assert (await source.token("contoso")).value == "token-2"
        nursery.cancel_scope.cancel()
    assert [r.levelname for r in caplog.records] == ["ERROR", "INFO"]


async def test_run_warms_app_tokens_but_not_mailbox_tokens(
    wall: Clock, autojump_clock: trio.testing.MockClock
) -> None:
    app_wide = FakeProvider(wall)
    per_mailbox = FakeMailboxProvider(wall)
    source = make(wall, {"ms": app_wide, "google": per_mailbox})
    async with trio.open_nursery() as nursery:
        await running(nursery, source)
        await trio.sleep(1)
        assert app_wide.calls == 1
        assert per_mailbox.mailboxes == []
        await source.token("google", mailbox="a@example.com")
        await trio.sleep(3600)
        assert per_mailbox.mailboxes == ["a@example.com"] * 2  # used: kept warm
        nursery.cancel_scope.cancel()


async def test_unused_tokens_are_let_go(
    wall: Clock, autojump_clock: trio.testing.MockClock
) -> None:
    per_mailbox = FakeMailboxProvider(wall)
    source = make(wall, {"google": per_mailbox}, keep_warm=3600)
    async with trio.open_nursery() as nursery:
        await running(nursery, source)
        await source.token("google", mailbox="a@example.com")
        await trio.sleep(4 * 3600)
        nursery.cancel_scope.cancel()
    # Renewed once (used 50 minutes before), then not: unused for over an hour.
    assert per_mailbox.mailboxes == ["a@example.com"] * 2
    assert "cached=0" in repr(source)


async def test_cancelled_run_leaves_the_source_usable(
    wall: Clock, autojump_clock: trio.testing.MockClock
) -> None:
    fake = FakeProvider(wall, delay=5)
    source = make(wall, {"contoso": fake})
    async with trio.open_nursery() as nursery:
        await running(nursery, source)
        await trio.sleep(1)  # the warm-up fetch is in flight
        nursery.cancel_scope.cancel()
    assert (await source.token("contoso")).value == "token-2"
    async with trio.open_nursery() as nursery:
        await running(nursery, source)  # can run again
        with pytest.raises(RuntimeError, match="already running"):
            await source.run()
        nursery.cancel_scope.cancel()


# -- real time, real msal, emulated Entra -------------------------------------------------


@pytest.fixture
async def short_lived(idp: EntraEmulator, secret_app: App) -> AsyncIterator[CachingTokenSource]:
    idp.lifetime = 4
    idp.latency = 0.4
    source = CachingTokenSource(
        {"contoso": secret_app},
        refresh_margin=1.5,
        refresh_jitter=0.3,
        min_validity=0.5,
    )
    try:
        yield source
    finally:
        source.close()


async def test_short_token_renewed_in_background_with_real_idp(
    idp: EntraEmulator, short_lived: CachingTokenSource
) -> None:
    waited = 0  # calls during which the IdP issued a token: calls that waited for it
    tokens: list[str] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(short_lived.run)
            for _ in range(500):  # the IdP runs in another thread: poll
                if idp.issued:
                    break
                await trio.sleep(0.01)
            await trio.sleep(0.5)
            deadline = trio.current_time() + 2.5
            while trio.current_time() < deadline:
                issued_before = len(idp.issued)
                token = await short_lived.token("contoso")
                waited += len(idp.issued) != issued_before
                tokens.append(token.value)
                assert token.remaining(time.time()) > 0.5
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    assert idp.token_requests == 2
    assert len(set(tokens)) == 2
    assert waited == 0  # the IdP takes 0.4 s per token, and no login waited for one
    first, second = (decode_claims(t) for t in dict.fromkeys(tokens))
    assert isinstance(first["exp"], int)
    assert isinstance(second["iat"], int)
    assert second["iat"] < first["exp"]  # renewed before the first expired


async def test_bad_secret_reported_once_with_real_idp(
    idp: EntraEmulator, secret_app: App, caplog: pytest.LogCaptureFixture
) -> None:
    bad = replace(secret_app, client_secret=Secret("the-secret-ID-not-its-value"))
    source = CachingTokenSource({"contoso": bad})
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(source.run)
                for _ in range(20):
                    with pytest.raises(PermanentTokenError) as caught:
                        await source.token("contoso")
                    assert caught.value.code == "AADSTS7000215"
                    await trio.sleep(0.02)
                nursery.cancel_scope.cancel()
    finally:
        source.close()
    assert idp.token_requests == 1  # the start-up attempt; logins were held back
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert "AADSTS7000215" in message
    assert "Copy the secret's *Value*" in message
    assert "the-secret-ID-not-its-value" not in message


async def test_trickling_idp_times_out_with_real_idp(idp: EntraEmulator, secret_app: App) -> None:
    """Entra sends the headers, then the token a byte at a time: every read succeeds in
    time, so only the overall fetch_timeout ends the request."""
    idp.trickle = 0.05  # a couple of minutes for the whole answer
    source = CachingTokenSource({"contoso": secret_app}, fetch_timeout=1.0)
    try:
        with trio.fail_after(20), pytest.raises(TemporaryTokenError) as caught:
            await source.token("contoso")
    finally:
        source.close()
    assert caught.value.code == "FETCH_TIMEOUT"
    assert "did not answer within 1 s" in str(caught.value)
    assert idp.token_requests == 1
