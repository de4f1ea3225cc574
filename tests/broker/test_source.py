"""CachingTokenSource: cache, refresh, single flight, cancellation, throttling."""

from __future__ import annotations

import contextlib
import gc
import itertools
import warnings
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from broker.errors import PermanentTokenError, TemporaryTokenError
from broker.model import DEFAULT_SCOPE, AccessToken
from broker.source import MIN_VALIDITY, CachingTokenSource, TokenSource
from tests.broker.helpers import FakeClock, FakeMailboxProvider, FakeProvider, fake_app

if TYPE_CHECKING:
    from broker.model import App
    from tests.support.entra import EntraEmulator


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake(clock: FakeClock) -> FakeProvider:
    return FakeProvider(clock)


@pytest.fixture
def source(clock: FakeClock, fake: FakeProvider) -> CachingTokenSource:
    return CachingTokenSource(
        {"contoso": fake_app()}, providers={"contoso": fake}, clock=clock, refresh_jitter=0
    )


async def gather(source: TokenSource, count: int, **kwargs: str) -> list[AccessToken | Exception]:
    """Start ``count`` concurrent token() calls; return their results in completion order."""
    results: list[AccessToken | Exception] = []

    async def one() -> None:
        try:
            results.append(await source.token("contoso", **kwargs))
        except (PermanentTokenError, TemporaryTokenError) as exc:
            results.append(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
    return results


def test_is_a_token_source(source: CachingTokenSource) -> None:
    assert isinstance(source, CachingTokenSource)
    typed: TokenSource = source  # mypy checks the structural match
    assert typed is source


async def test_unknown_app_is_key_error(source: CachingTokenSource) -> None:
    with pytest.raises(KeyError):
        await source.token("fabrikam")


async def test_caches_until_refresh_margin(
    source: CachingTokenSource, fake: FakeProvider, clock: FakeClock
) -> None:
    first = await source.token("contoso")
    clock.now += 3000  # 600 s left: still outside the margin
    assert await source.token("contoso") is first
    assert fake.calls == 1
    clock.now += 1  # 599 s left: refresh
    second = await source.token("contoso")
    assert second.value == "token-2"
    assert fake.calls == 2
    assert await source.token("contoso") is second


async def test_refresh_margin_is_configurable(clock: FakeClock, fake: FakeProvider) -> None:
    source = CachingTokenSource(
        {"contoso": fake_app()},
        providers={"contoso": fake},
        clock=clock,
        refresh_margin=60,
        refresh_jitter=0,
    )
    await source.token("contoso")
    clock.now += 3500
    await source.token("contoso")
    assert fake.calls == 1
    clock.now += 41
    await source.token("contoso")
    assert fake.calls == 2


async def test_short_lived_tokens_refresh_at_half_life(clock: FakeClock) -> None:
    """A 400 s token is inside the 600 s margin at once; refresh at half-life, not every call."""
    fake = FakeProvider(clock, lifetime=400)
    source = CachingTokenSource(
        {"contoso": fake_app()}, providers={"contoso": fake}, clock=clock, refresh_jitter=0
    )
    await source.token("contoso")
    clock.now += 200
    await source.token("contoso")
    assert fake.calls == 1
    clock.now += 1
    await source.token("contoso")
    assert fake.calls == 2


async def test_temporary_refresh_failure_serves_cached_token(
    source: CachingTokenSource, fake: FakeProvider, clock: FakeClock
) -> None:
    first = await source.token("contoso")
    clock.now += 3300  # 300 s left
    fake.outcomes.append(TemporaryTokenError("IdP down"))
    assert await source.token("contoso") is first
    clock.now += 300 - MIN_VALIDITY + 1  # too close to expiry to hand out
    fake.outcomes.append(TemporaryTokenError("IdP still down"))
    with pytest.raises(TemporaryTokenError, match="still down"):
        await source.token("contoso")
    with pytest.raises(TemporaryTokenError, match="still down"):
        await source.token("contoso")  # held back: the second failure's backoff is 1-2 s
    assert fake.calls == 3
    clock.now += 2
    assert (await source.token("contoso")).value == "token-4"
    assert fake.calls == 4


async def test_permanent_refresh_failure_serves_cached_token(
    source: CachingTokenSource, fake: FakeProvider, clock: FakeClock
) -> None:
    """A revoked secret does not invalidate the token already issued: keep serving it."""
    first = await source.token("contoso")
    clock.now += 3300
    fake.outcomes.append(PermanentTokenError("secret revoked", code="AADSTS7000215"))
    assert await source.token("contoso") is first
    clock.now += 300 - MIN_VALIDITY + 1
    fake.outcomes.append(PermanentTokenError("secret revoked", code="AADSTS7000215"))
    with pytest.raises(PermanentTokenError, match="revoked"):
        await source.token("contoso")


async def test_permanent_errors_hold_logins_back_briefly(
    source: CachingTokenSource, fake: FakeProvider, clock: FakeClock
) -> None:
    fake.outcomes.append(PermanentTokenError("bad secret", code="AADSTS7000215", fix="fix it"))
    for _ in range(3):
        with pytest.raises(PermanentTokenError) as caught:
            await source.token("contoso")
        assert (caught.value.code, caught.value.fix) == ("AADSTS7000215", "fix it")
        clock.now += 29
    assert fake.calls == 1  # 87 s of logins, one request: the hold is 60 s
    assert (await source.token("contoso")).value == "token-2"


async def test_temporary_errors_back_off_exponentially(
    source: CachingTokenSource, fake: FakeProvider, clock: FakeClock
) -> None:
    """Without Retry-After, a failing key is held back 1, 2, 4... s (jittered by half)."""
    fake.outcomes += [TemporaryTokenError("IdP down") for _ in range(6)]
    while fake.calls < 7:
        with contextlib.suppress(TemporaryTokenError):
            await source.token("contoso")
        clock.now += 0.125
    gaps = [b - a for a, b in itertools.pairwise(fake.times)]
    for attempt, gap in enumerate(gaps):
        assert 2**attempt / 2 <= gap <= 2**attempt + 0.125, gaps


async def test_retry_after_holds_requests_back(
    source: CachingTokenSource, fake: FakeProvider, clock: FakeClock
) -> None:
    fake.outcomes.append(TemporaryTokenError("throttled", code="HTTP 429", retry_after=30))
    with pytest.raises(TemporaryTokenError):
        await source.token("contoso")
    clock.now += 29
    with pytest.raises(TemporaryTokenError) as caught:
        await source.token("contoso")
    assert caught.value.retry_after == 30
    assert fake.calls == 1  # the IdP was not asked again
    clock.now += 1
    assert (await source.token("contoso")).value == "token-2"


async def test_retry_after_serves_cached_token(
    source: CachingTokenSource, fake: FakeProvider, clock: FakeClock
) -> None:
    first = await source.token("contoso")
    clock.now += 3300
    fake.outcomes.append(TemporaryTokenError("throttled", retry_after=120))
    assert await source.token("contoso") is first
    assert await source.token("contoso") is first
    assert fake.calls == 2


async def test_single_flight(source: CachingTokenSource, fake: FakeProvider) -> None:
    fake.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        results: list[AccessToken] = []

        async def one() -> None:
            results.append(await source.token("contoso"))

        for _ in range(50):
            nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        assert fake.calls == 1
        fake.gate.set()
    assert len(results) == 50
    assert {t.value for t in results} == {"token-1"}


async def test_single_flight_error_fan_out(source: CachingTokenSource, fake: FakeProvider) -> None:
    fake.gate = trio.Event()
    fake.outcomes.append(PermanentTokenError("bad secret", code="AADSTS7000215", fix="fix it"))
    errors: list[PermanentTokenError] = []

    async def one() -> None:
        with pytest.raises(PermanentTokenError) as caught:
            await source.token("contoso")
        errors.append(caught.value)

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        fake.gate.set()
    assert fake.calls == 1
    assert len(errors) == 20
    assert len({id(e) for e in errors}) == 20  # one instance each: no shared traceback
    assert {(str(e), e.code, e.fix) for e in errors} == {("bad secret", "AADSTS7000215", "fix it")}


async def test_cancelled_waiter_does_not_disturb_others(
    source: CachingTokenSource, fake: FakeProvider
) -> None:
    fake.gate = trio.Event()
    results: list[AccessToken] = []
    scopes = [trio.CancelScope() for _ in range(10)]

    async def one(scope: trio.CancelScope) -> None:
        with scope:
            results.append(await source.token("contoso"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, scopes[0])
        await trio.testing.wait_all_tasks_blocked()  # scopes[0] leads: trio shuffles start order
        for scope in scopes[1:]:
            nursery.start_soon(one, scope)
        await trio.testing.wait_all_tasks_blocked()
        scopes[5].cancel()  # a waiter, not the leader
        await trio.testing.wait_all_tasks_blocked()
        fake.gate.set()
    assert fake.calls == 1
    assert len(results) == 9


async def test_cancelled_leader_hands_over(source: CachingTokenSource, fake: FakeProvider) -> None:
    fake.gate = trio.Event()
    results: list[AccessToken] = []
    leader_scope = trio.CancelScope()

    async def leader() -> None:
        with leader_scope:
            await source.token("contoso")

    async def waiter() -> None:
        results.append(await source.token("contoso"))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(leader)
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(10):
                nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert fake.calls == 1
            leader_scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert fake.calls == 2  # exactly one waiter took over
            fake.gate.set()
    assert leader_scope.cancelled_caught
    assert len(results) == 10
    assert {t.value for t in results} == {"token-2"}


async def test_everyone_cancelled_leaves_no_flight_behind(
    source: CachingTokenSource, fake: FakeProvider
) -> None:
    fake.gate = trio.Event()
    with trio.move_on_after(0.05):
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(source.token, "contoso")
    fake.gate = None
    with trio.fail_after(1):
        assert (await source.token("contoso")).value == "token-2"


async def test_mailbox_does_not_split_app_tokens(
    source: CachingTokenSource, fake: FakeProvider
) -> None:
    """Microsoft app-only tokens serve every mailbox: one fetch for all of them."""
    a = await source.token("contoso", mailbox="a@contoso.com")
    b = await source.token("contoso", mailbox="b@contoso.com")
    c = await source.token("contoso")
    assert a is b is c
    assert fake.calls == 1


async def test_per_mailbox_provider(clock: FakeClock) -> None:
    provider = FakeMailboxProvider(clock)
    source = CachingTokenSource(
        {"contoso": fake_app()}, providers={"contoso": provider}, clock=clock, refresh_jitter=0
    )
    a = await source.token("contoso", mailbox="a@contoso.com")
    assert await source.token("contoso", mailbox="a@contoso.com") is a
    b = await source.token("contoso", mailbox="b@contoso.com")
    assert (a.value, b.value) == ("token-for-a@contoso.com", "token-for-b@contoso.com")
    assert provider.mailboxes == ["a@contoso.com", "b@contoso.com"]
    with pytest.raises(PermanentTokenError, match="per mailbox"):
        await source.token("contoso")


async def test_apps_are_cached_separately(clock: FakeClock) -> None:
    one, two = FakeProvider(clock), FakeProvider(clock)
    source = CachingTokenSource(
        {"one": fake_app("one"), "two": fake_app("two")},
        providers={"one": one, "two": two},
        clock=clock,
        refresh_jitter=0,
    )
    await source.token("one")
    await source.token("two")
    await source.token("one")
    assert (one.calls, two.calls) == (1, 1)


def test_negative_margin_rejected(fake: FakeProvider) -> None:
    with pytest.raises(ValueError, match="refresh_margin"):
        CachingTokenSource({"contoso": fake_app()}, providers={"contoso": fake}, refresh_margin=-1)


# -- with the real provider and the emulated IdP -------------------------------------------


async def test_200_concurrent_logins_one_idp_request(idp: EntraEmulator, secret_app: App) -> None:
    idp.latency = 0.2  # everybody arrives while the request is in flight
    source = CachingTokenSource({"contoso": secret_app})
    try:
        results = await gather(source, 200, mailbox="reports@contoso.com")
    finally:
        source.close()
    assert idp.token_requests == 1
    assert len(results) == 200
    assert all(isinstance(r, AccessToken) for r in results)
    assert len({r.value for r in results if isinstance(r, AccessToken)}) == 1


async def test_concurrent_failure_reaches_everyone(idp: EntraEmulator, secret_app: App) -> None:
    idp.latency = 0.1
    idp.fail_next(503, retry_after=5)
    source = CachingTokenSource({"contoso": secret_app})
    try:
        results = await gather(source, 30)
        assert idp.token_requests == 1
        assert all(isinstance(r, TemporaryTokenError) and r.retry_after == 5 for r in results)
        # Held back by Retry-After: no second request yet.
        with pytest.raises(TemporaryTokenError):
            await source.token("contoso")
        assert idp.token_requests == 1
    finally:
        source.close()


async def test_cancelled_leader_with_real_provider(idp: EntraEmulator, secret_app: App) -> None:
    idp.latency = 0.3
    source = CachingTokenSource({"contoso": secret_app})
    results: list[AccessToken] = []
    leader_scope = trio.CancelScope()

    async def leader() -> None:
        with leader_scope:
            await source.token("contoso")

    async def waiter() -> None:
        results.append(await source.token("contoso"))

    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(leader)
                for _ in range(200):  # the IdP runs in another thread: poll
                    if idp.token_requests:
                        break
                    await trio.sleep(0.01)
                for _ in range(20):
                    nursery.start_soon(waiter)
                await trio.sleep(0.02)
                leader_scope.cancel()
            await trio.sleep(0.1)  # let the abandoned worker thread wind down before closing
    finally:
        source.close()
    assert len(results) == 20
    assert len({t.value for t in results}) == 1
    assert idp.token_requests == 2
    assert len(idp.issued) == 2


async def test_source_builds_microsoft_providers(
    idp: EntraEmulator, secret_app: App, cert_app: App
) -> None:
    source = CachingTokenSource({"contoso": secret_app, "contoso-cert": cert_app})
    try:
        a = await source.token("contoso")
        b = await source.token("contoso-cert")
        assert await source.token("contoso") is a
    finally:
        source.close()
    assert a.value != b.value
    assert a.scope == b.scope == DEFAULT_SCOPE
    assert idp.token_requests == 2


async def test_unclosed_source_leaves_no_socket_behind(idp: EntraEmulator, secret_app: App) -> None:
    """Callers that never close() must not get ResourceWarnings (errors under pytest)."""
    source = CachingTokenSource({"contoso": secret_app})
    await source.token("contoso")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del source
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
