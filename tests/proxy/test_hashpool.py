"""The password-check queue: single flight, bounds, deadlines, fairness, gates, shutdown.

Checks run in worker threads; the tests control them with :class:`Gates` (a check blocks
until the test opens its gate), so every ordering is decided by the test, not by timing.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from proxy.config import Protocol, UserConfig
from proxy.hashpool import Busy, HashPool, Refused
from proxy.identities import (
    DEFAULT_PARAMETERS,
    Authenticator,
    BadCredentials,
    _verify,
    hash_password,
)
from proxy.protocol.sasl import Credentials

if TYPE_CHECKING:
    from collections.abc import Callable


class Gates:
    """Computations that wait for the test: ``compute(name)`` blocks its worker thread until
    ``open(name)``; ``started`` lists the names in the order their computations began."""

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.started: list[str] = []

    def _event(self, name: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault(name, threading.Event())

    def compute(self, name: str, result: bool = True) -> Callable[[], bool]:
        def run() -> bool:
            with self._lock:
                self.started.append(name)
            if not self._event(name).wait(30):
                raise AssertionError(f"gate {name!r} never opened")
            return result

        return run

    def open(self, name: str) -> None:
        self._event(name).set()

    def open_all(self) -> None:
        with self._lock:
            names = list(self._events)
        for name in names:
            self.open(name)


async def wait_until(condition: Callable[[], bool]) -> None:
    """Yield until ``condition`` holds (worker threads report back through the loop)."""
    with trio.fail_after(30):
        while not condition():  # noqa: ASYNC110 (thread results arrive without an event)
            await trio.sleep(0.001)


@pytest.fixture
async def pool(nursery: trio.Nursery) -> HashPool:
    hashes = HashPool(2, max_queue=8, max_per_network=4)
    await nursery.start(hashes.run)
    return hashes


async def test_identical_attempts_share_one_computation(
    pool: HashPool, nursery: trio.Nursery
) -> None:
    gates = Gates()
    results: list[bool] = []
    matched: list[str] = []

    async def attempt() -> None:
        results.append(
            await pool.check(
                b"same",
                gates.compute("same"),
                network="192.0.2.1",
                login="a",
                deadline=math.inf,
                on_match=lambda: matched.append("once"),
            )
        )

    for _ in range(60):
        nursery.start_soon(attempt)
    await wait_until(lambda: gates.started == ["same"])
    await trio.testing.wait_all_tasks_blocked()
    assert pool.running == 1
    assert pool.queued == 0
    gates.open("same")
    await wait_until(lambda: len(results) == 60)
    assert results == [True] * 60
    assert gates.started == ["same"]
    assert matched == ["once"]


async def test_different_keys_cost_one_computation_each(pool: HashPool) -> None:
    computed: list[int] = []

    def compute(n: int) -> bool:
        computed.append(n)
        return False

    async with trio.open_nursery() as nursery:
        for n in range(8):
            check = functools.partial(
                pool.check,
                bytes([n]),
                functools.partial(compute, n),
                network=f"198.51.100.{n}",
                login="a",
                deadline=math.inf,
            )
            nursery.start_soon(check)
    assert sorted(computed) == list(range(8))


async def start(
    nursery: trio.Nursery,
    pool: HashPool,
    gates: Gates,
    name: str,
    *,
    network: str = "n",
    login: str = "a",
    result: bool = True,
) -> None:
    """Queue a check called ``name`` for a client that waits as long as it takes."""
    before = pool.running + pool.queued
    nursery.start_soon(
        functools.partial(
            pool.check,
            name.encode(),
            gates.compute(name, result),
            network=network,
            login=login,
            deadline=math.inf,
        )
    )
    await wait_until(lambda: pool.running + pool.queued > before)


async def test_a_full_queue_answers_busy_at_once(pool: HashPool, nursery: trio.Nursery) -> None:
    gates = Gates()
    for n in range(2 + 8):  # two running, eight queued, each from its own network
        await start(nursery, pool, gates, str(n), network=f"net{n}")
    assert (pool.running, pool.queued) == (2, 8)
    with pytest.raises(Busy, match=r"8 password checks queued already \(hash_queue\)"):
        await pool.check(b"x", gates.compute("x"), network="else", login="b", deadline=math.inf)
    gates.open_all()


async def test_one_network_cannot_fill_the_queue(pool: HashPool, nursery: trio.Nursery) -> None:
    gates = Gates()
    for n in range(2 + 4):  # two running, then the network's four queued
        await start(nursery, pool, gates, str(n), network="attacker", login=f"u{n}")
    with pytest.raises(Busy, match="from this network"):
        await pool.check(b"m", gates.compute("m"), network="attacker", login="v", deadline=math.inf)
    await start(nursery, pool, gates, "other", network="office")  # another network still fits
    assert pool.queued == 5
    gates.open_all()


async def test_waiting_past_the_deadline_is_busy_and_nothing_is_computed(
    pool: HashPool, nursery: trio.Nursery
) -> None:
    gates = Gates()
    for n in range(2):  # both slots taken
        await start(nursery, pool, gates, str(n))
    with pytest.raises(Busy, match="within the deadline"):
        await pool.check(
            b"late",
            gates.compute("late"),
            network="m",
            login="b",
            deadline=trio.current_time() + 0.05,
        )
    assert pool.queued == 0  # nobody waits for it: dropped before it started
    gates.open_all()
    await wait_until(lambda: pool.running == 0)
    assert "late" not in gates.started


async def test_a_queue_that_cannot_start_a_check_in_time_says_busy_at_once(
    pool: HashPool, nursery: trio.Nursery
) -> None:
    gates = Gates()
    for n in range(2):
        await start(nursery, pool, gates, str(n))
    pool.seconds_per_check = 10.0  # as measured on a slow machine
    before = trio.current_time()
    with pytest.raises(Busy, match="after its deadline"):
        await pool.check(b"x", gates.compute("x"), network="m", login="b", deadline=before + 5)
    assert pool.queued == 0
    # A deadline the estimate allows is queued.
    nursery.start_soon(
        functools.partial(
            pool.check, b"y", gates.compute("y"), network="m", login="b", deadline=before + 60
        )
    )
    await wait_until(lambda: pool.queued == 1)
    gates.open_all()


async def test_a_result_is_recorded_when_every_client_has_gone(pool: HashPool) -> None:
    gates = Gates()
    recorded: list[str] = []
    with trio.move_on_after(0.05):  # the client gives up while its check runs
        await pool.check(
            b"k",
            gates.compute("k"),
            network="n",
            login="a",
            deadline=math.inf,
            on_match=lambda: recorded.append("verified"),
        )
    assert pool.running == 1
    gates.open("k")
    await wait_until(lambda: recorded == ["verified"])


async def test_slots_are_shared_round_robin_between_networks(
    pool: HashPool, nursery: trio.Nursery
) -> None:
    pool.max_queue = pool.max_per_network = 100
    gates = Gates()
    for n in range(20):  # a guesser, first in line with twenty different passwords
        await start(nursery, pool, gates, f"guess {n}", network="attacker", login="admin")
    await start(nursery, pool, gates, "scanner", network="office", login="scanner")
    # Round-robin: the office takes its turn after the attacker's current one, not after
    # the attacker's eighteen waiting guesses.
    gates.open("guess 0")
    await wait_until(lambda: len(gates.started) == 3)
    gates.open("guess 1")
    await wait_until(lambda: len(gates.started) == 4)
    # (The first two start together, in two threads: in either order.)
    assert sorted(gates.started[:2]) == ["guess 0", "guess 1"]
    assert gates.started[2:] == ["guess 2", "scanner"]
    gates.open_all()


async def test_within_a_network_logins_take_turns(pool: HashPool, nursery: trio.Nursery) -> None:
    pool.max_queue = pool.max_per_network = 100
    gates = Gates()
    for n in range(10):
        await start(nursery, pool, gates, f"guess {n}", network="nat", login="admin")
    await start(nursery, pool, gates, "erp", network="nat", login="erp")
    gates.open("guess 0")
    await wait_until(lambda: len(gates.started) == 3)
    gates.open("guess 1")
    await wait_until(lambda: len(gates.started) == 4)
    assert sorted(gates.started[:2]) == ["guess 0", "guess 1"]
    assert gates.started[2:] == ["guess 2", "erp"]
    gates.open_all()


async def test_the_gate_refuses_when_the_turn_comes(pool: HashPool, nursery: trio.Nursery) -> None:
    gates = Gates()
    for n in range(2):
        await start(nursery, pool, gates, str(n))
    locked = [False]

    async def refused() -> None:
        with pytest.raises(Refused, match="locked out"):
            await pool.check(
                b"g",
                gates.compute("g"),
                network="m",
                login="b",
                deadline=math.inf,
                gate=lambda: "locked out" if locked[0] else None,
            )

    async with trio.open_nursery() as inner:
        inner.start_soon(refused)
        await wait_until(lambda: pool.queued == 1)
        locked[0] = True  # the lockout began while it waited
        gates.open("0")
    await wait_until(lambda: pool.running == 1)
    assert "g" not in gates.started
    gates.open_all()
    # Unlocked, the same attempt is checked: the refused check left nothing behind to join.
    locked[0] = False
    with trio.fail_after(30):
        assert await pool.check(b"g", lambda: True, network="m", login="b", deadline=math.inf)


async def test_checks_need_the_pool_running() -> None:
    with pytest.raises(RuntimeError, match="not running"):
        await HashPool(1).check(b"k", lambda: True, network="n", login="a", deadline=math.inf)


async def test_stopping_the_pool_releases_its_waiters() -> None:
    gates = Gates()
    pool = HashPool(1)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)

        async def waiter() -> None:
            with pytest.raises(Busy, match="stopped"):
                await pool.check(
                    b"k", gates.compute("k"), network="n", login="a", deadline=math.inf
                )

        async with trio.open_nursery() as waiting:
            waiting.start_soon(waiter)
            await wait_until(lambda: pool.running == 1)
            nursery.cancel_scope.cancel()  # shutdown: the thread is abandoned, not awaited
    gates.open_all()


def test_sizes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        HashPool(0)


# -- at production settings ---------------------------------------------------------------


def test_default_cost_hashes_verify_in_parallel_threads() -> None:
    """The hang this queue once met: two threads verifying lanes=4 hashes at once never
    returned with cryptography 50. The implementation in use must not hang."""
    phc = hash_password("s3cret", DEFAULT_PARAMETERS)
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda: results.append(_verify("s3cret", phc)), daemon=True)
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [True] * 4


async def test_sixty_identical_logins_at_default_cost_hash_once(
    pool: HashPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import proxy.identities as identities

    calls: list[str] = []
    real = identities._verify

    def counting(password: str, phc: str) -> bool:
        calls.append(phc)
        return real(password, phc)

    monkeypatch.setattr(identities, "_verify", counting)
    user = UserConfig(
        login="scanner",
        password_hashes=(hash_password("right", DEFAULT_PARAMETERS),),
        app="contoso",
        mailbox="scanner@contoso.com",
        protocols=frozenset(Protocol),
    )
    auth = Authenticator({"scanner": user}, hashes=pool)
    identities_found: list[str] = []

    async def login() -> None:
        found = await auth.authenticate(
            Credentials("scanner", "right"), Protocol.IMAP, network="192.0.2.1"
        )
        identities_found.append(found.mailbox)

    async with trio.open_nursery() as nursery:
        for _ in range(60):
            nursery.start_soon(login)
    assert identities_found == ["scanner@contoso.com"] * 60
    assert len(calls) == 1
    # Later attempts are answered from the verified-credential cache, a wrong one is not.
    await login()
    assert len(calls) == 1
    with pytest.raises(BadCredentials):
        await auth.authenticate(Credentials("scanner", "wrong"), Protocol.IMAP, network="n")
    assert len(calls) == 2


def test_how_many_checks_round_robin_serves_before_a_new_one() -> None:
    """The estimate behind "would start after its deadline": a new check from a network
    waits for that network's own checks, and for at most one more than that per other
    network (they take turns)."""
    from proxy.hashpool import _Check, _FairQueue

    queue = _FairQueue()
    for network, count in (("a", 5), ("b", 1)):
        for n in range(count):
            queue.push(_Check(f"{network}{n}".encode(), network, "login", lambda: True, None))
    assert queue.served_before("c") == 0 + 1 + 1  # a new network: one turn of each other
    assert queue.served_before("b") == 1 + 2  # its own one, then a's two turns
    assert queue.served_before("a") == 5 + 1  # its own five; b has only one


# -- what the earlier tests left to chance ------------------------------------------------


@pytest.mark.parametrize(("concurrency", "queue", "per_network"), [(0, 1, 1), (1, 0, 1), (1, 1, 0)])
def test_every_size_must_be_positive(concurrency: int, queue: int, per_network: int) -> None:
    with pytest.raises(ValueError, match=r"^hash pool sizes must be at least 1$"):
        HashPool(concurrency, max_queue=queue, max_per_network=per_network)


class SteppedClock:
    """A clock that stands still until a computation moves it (from its thread)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def taking(self, seconds: float) -> Callable[[], bool]:
        def compute() -> bool:
            self.now += seconds
            return True

        return compute


async def test_the_estimate_follows_each_check_s_duration(nursery: trio.Nursery) -> None:
    clock = SteppedClock()
    pool = HashPool(1, clock=clock)
    await nursery.start(pool.run)
    assert pool.seconds_per_check is None
    for n, seconds in enumerate((2.0, 4.0, 1.0)):
        await pool.check(
            b"%d" % n, clock.taking(seconds), network="n", login="a", deadline=math.inf
        )
    # 2, then 2 + 0.3 * (4 - 2), then 2.6 + 0.3 * (1 - 2.6)
    assert pool.seconds_per_check == pytest.approx(2.12)


async def test_the_queue_estimate_counts_rounds_of_the_pool(nursery: trio.Nursery) -> None:
    """Two slots busy and three checks from network a queued, one second per check: a first
    check from b starts in the first round; a fourth from a in the third (a's three, and b's
    one before it)."""
    clock = SteppedClock()
    clock.now = trio.current_time()
    pool = HashPool(2, max_queue=16, max_per_network=8, clock=clock)
    await nursery.start(pool.run)
    gates = Gates()
    await start(nursery, pool, gates, "x", network="x")
    await start(nursery, pool, gates, "y", network="y")
    for n in range(3):
        await start(nursery, pool, gates, f"a{n}", network="a")
    pool.seconds_per_check = 1.0
    outcomes: list[str] = []

    async def attempt(name: str, network: str, wait: float) -> None:
        try:
            await pool.check(
                name.encode(),
                lambda: True,
                network=network,
                login=name,
                deadline=clock.now + wait,
            )
        except Busy as exc:
            outcomes.append(f"{name}: {exc}")
        else:
            outcomes.append(f"{name}: checked")

    nursery.start_soon(attempt, "b", "b", 1.0)  # a first round ends exactly at its deadline
    await wait_until(lambda: pool.queued == 4)
    await attempt("a3", "a", 2.5)  # its third round ends after
    assert outcomes == [
        "a3: the password-check queue would start this one in about 3.0s, after its deadline"
    ]
    gates.open_all()
    await wait_until(lambda: len(outcomes) == 2)
    # b was admitted (checked, or on a slow machine not started within its second).
    assert outcomes[1].startswith("b: ")
    assert "after its deadline" not in outcomes[1]


async def test_a_check_given_up_before_it_started_can_be_asked_again(
    pool: HashPool, nursery: trio.Nursery
) -> None:
    gates = Gates()
    for n in range(2):
        await start(nursery, pool, gates, str(n))
    with pytest.raises(Busy, match="within the deadline"):
        await pool.check(
            b"k", gates.compute("k"), network="m", login="b", deadline=trio.current_time() + 0.05
        )
    gates.open_all()
    with trio.fail_after(30):
        assert await pool.check(b"k", lambda: True, network="m", login="b", deadline=math.inf)


async def test_a_stopped_pool_tells_its_waiters_and_takes_no_more_checks() -> None:
    """Waiters outside the pool's own scope (sessions are) get Busy, not a result."""
    gates = Gates()
    pool = HashPool(1)
    outcome: list[str] = []

    async def waiter() -> None:
        try:
            await pool.check(b"k", gates.compute("k"), network="n", login="a", deadline=math.inf)
        except Busy as exc:
            outcome.append(str(exc))

    async with trio.open_nursery() as sessions:
        with trio.CancelScope() as pool_scope:
            async with trio.open_nursery() as pool_nursery:
                await pool_nursery.start(pool.run)
                sessions.start_soon(waiter)
                await wait_until(lambda: pool.running == 1)
                pool_scope.cancel()
    gates.open_all()
    assert outcome == ["the password-check pool stopped"]
    with trio.fail_after(30), pytest.raises(RuntimeError, match="not running"):
        await pool.check(b"j", lambda: True, network="n", login="a", deadline=math.inf)
