"""The password-check queue: bounded, fair between networks, one computation per attempt.

Theory of operation
-------------------
A password check costs one argon2id computation per stored hash (64 MiB and a few hundred
milliseconds of CPU each with the default cost). After a restart every legacy program logs
in at once, and an attacker can send wrong passwords as fast as it can connect, so checks
are not run by the sessions that need them but queued here and run by ``concurrency``
worker tasks, each computing in a worker thread:

* **One computation per attempt.** A check is identified by a key the caller derives from
  the login name, the password and the stored hashes. Attempts with the same key join the
  check already queued or running and share its result; a flood of *different* passwords
  still costs one computation each.
* **Bounded.** At most ``max_queue`` checks wait, at most ``max_per_network`` of them from
  one source network. An attempt that does not fit, or that the queue is not expected to
  start before its deadline (from the measured time per check), is refused at once with
  :exc:`Busy`, and so is one whose deadline passes while it waits: the client gets the
  protocol's temporary reply and tries again later, so a storm drains instead of piling up.
* **Fair.** Waiting checks are served round-robin between source networks, and within a
  network round-robin between login names, so guessing from one network (or against one
  login) cannot take every slot from programs elsewhere.
* **Nothing computed in vain.** A check that nobody waits for any more is dropped before it
  starts. Once started it runs to the end and its result is recorded (``on_match``) even if
  every client that asked has gone: the next attempt finds it in the caller's cache.
* **Gates.** Before a check starts, each attempt's ``gate`` is asked again (the caller's
  lockout rules); an attempt refused there gets :exc:`Refused` without waiting, and a check
  no attempt still wants is dropped. A worker takes its next check only after every waiter
  of the last one has resumed, so a failure its caller counts (before its next checkpoint)
  is seen by the gates of the checks that follow.

The workers are explicit: :meth:`HashPool.run` must be running (``nursery.start``) for
checks to be served; :meth:`HashPool.check` refuses to queue otherwise rather than hang.
Cancelling :meth:`run` abandons the threads of checks in progress (they finish on their
own), so shutdown never waits for a computation.
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Busy", "HashPool", "Refused"]

#: Weight of the newest measurement in the running estimate of a check's duration.
_SMOOTHING = 0.3


class Busy(Exception):
    """No slot for this check in time; ``str()`` says why (for the log, never the client)."""


class Refused(Exception):
    """The attempt's gate refused it before its check started; ``str()`` is the reason."""


class _State(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    REFUSED = "refused"
    #: The pool stopped (shutdown) while computing it.
    ABANDONED = "abandoned"


@dataclass(eq=False, slots=True)
class _Ticket:
    """One attempt waiting for a check."""

    gate: Callable[[], str | None] | None
    state: _State = _State.QUEUED
    refusal: str = ""


@dataclass(eq=False, slots=True)
class _Check:
    key: bytes
    network: str
    login: str
    compute: Callable[[], bool]
    on_match: Callable[[], None] | None
    tickets: list[_Ticket] = field(default_factory=list)
    state: _State = _State.QUEUED
    result: bool = False
    changed: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)


class _FairQueue:
    """Checks waiting to start: round-robin over networks, then over logins, then FIFO."""

    def __init__(self) -> None:
        self._networks: OrderedDict[str, OrderedDict[str, deque[_Check]]] = OrderedDict()
        self._per_network: dict[str, int] = {}
        self.depth = 0

    def waiting_from(self, network: str) -> int:
        return self._per_network.get(network, 0)

    def served_before(self, network: str) -> int:
        """How many waiting checks round-robin would start before a new one from ``network``
        (an estimate: it ignores the order of logins within networks)."""
        mine = self.waiting_from(network)
        return mine + sum(
            min(n, mine + 1) for other, n in self._per_network.items() if other != network
        )

    def push(self, check: _Check) -> None:
        logins = self._networks.setdefault(check.network, OrderedDict())
        logins.setdefault(check.login, deque()).append(check)
        self._per_network[check.network] = self.waiting_from(check.network) + 1
        self.depth += 1

    def pop(self) -> _Check | None:
        if not self._networks:
            return None
        network, logins = next(iter(self._networks.items()))
        login, checks = next(iter(logins.items()))
        check = checks.popleft()
        # Whoever was served goes to the back of its round.
        if checks:
            logins.move_to_end(login)
        else:
            del logins[login]
        if logins:
            self._networks.move_to_end(network)
        else:
            del self._networks[network]
        self._forget(check)
        return check

    def remove(self, check: _Check) -> None:
        logins = self._networks[check.network]
        checks = logins[check.login]
        checks.remove(check)
        if not checks:
            del logins[check.login]
            if not logins:
                del self._networks[check.network]
        self._forget(check)

    def _forget(self, check: _Check) -> None:
        self.depth -= 1
        left = self._per_network[check.network] - 1
        if left:
            self._per_network[check.network] = left
        else:
            del self._per_network[check.network]


class HashPool:
    """Runs password checks ``concurrency`` at a time; see the module documentation.

    ``max_queue`` and ``max_per_network`` may be changed while it runs (a configuration
    reload); ``concurrency`` is fixed for the pool's life.
    """

    def __init__(
        self,
        concurrency: int = 2,
        *,
        max_queue: int = 256,
        max_per_network: int = 64,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        if min(concurrency, max_queue, max_per_network) < 1:
            raise ValueError("hash pool sizes must be at least 1")
        self.concurrency = concurrency
        self.max_queue = max_queue
        self.max_per_network = max_per_network
        self._clock = clock
        self._queue = _FairQueue()
        self._flights: dict[bytes, _Check] = {}
        self._wakeup = trio.lowlevel.ParkingLot()
        self._running = 0
        self._workers = 0
        #: Running estimate of one check's duration with the pool busy (seconds), once known.
        self.seconds_per_check: float | None = None
        self._threads = trio.CapacityLimiter(concurrency)

    def __repr__(self) -> str:
        return (
            f"<HashPool concurrency={self.concurrency} running={self._running} "
            f"queued={self._queue.depth}>"
        )

    @property
    def queued(self) -> int:
        """Checks waiting for a slot."""
        return self._queue.depth

    @property
    def running(self) -> int:
        """Checks being computed."""
        return self._running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve checks until cancelled."""
        async with trio.open_nursery() as nursery:
            for _ in range(self.concurrency):
                nursery.start_soon(self._worker)
            self._workers = self.concurrency
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._workers = 0

    async def check(
        self,
        key: bytes,
        compute: Callable[[], bool],
        *,
        network: str,
        login: str,
        deadline: float,
        gate: Callable[[], str | None] | None = None,
        on_match: Callable[[], None] | None = None,
    ) -> bool:
        """The result of ``compute()`` (run in a worker thread), shared by every attempt with
        the same ``key``.

        Raises :exc:`Busy` if the check cannot start before ``deadline`` (trio time), and
        :exc:`Refused` if ``gate`` returns a reason when its turn comes. ``on_match`` runs
        (in the pool, whoever still waits) when ``compute()`` returns true.
        """
        if not self._workers:
            raise RuntimeError("HashPool.run is not running: start it in a nursery first")
        check = self._flights.get(key)
        if check is None:
            self._admit(network, deadline)
            check = _Check(key, network, login, compute, on_match)
            self._flights[key] = check
            self._queue.push(check)
            self._wakeup.unpark()
        ticket = _Ticket(gate)
        check.tickets.append(ticket)
        try:
            with trio.move_on_at(deadline):
                while ticket.state is _State.QUEUED:
                    await check.changed.park()
            if ticket.state is _State.QUEUED:
                raise Busy(
                    f"no password-check slot within the deadline ({self._queue.depth} checks "
                    f"queued, {self._running} running)"
                )
            # Started: it ends within one computation, and is worth the wait.
            while ticket.state is _State.RUNNING:
                await check.changed.park()
        finally:
            self._withdraw(check, ticket)
        if ticket.state is _State.REFUSED:
            raise Refused(ticket.refusal)
        if ticket.state is _State.ABANDONED:
            raise Busy("the password-check pool stopped")
        return check.result

    def _admit(self, network: str, deadline: float) -> None:
        """Raise :exc:`Busy` unless a new check from ``network`` may queue."""
        queue = self._queue
        if queue.depth >= self.max_queue:
            raise Busy(f"{queue.depth} password checks queued already (hash_queue)")
        if queue.waiting_from(network) >= self.max_per_network:
            raise Busy(
                f"{queue.waiting_from(network)} password checks from this network queued "
                "already (hash_queue_per_network)"
            )
        if self.seconds_per_check is not None and queue.depth + self._running >= self.concurrency:
            rounds = math.floor(queue.served_before(network) / self.concurrency) + 1
            wait = rounds * self.seconds_per_check
            if self._clock() + wait > deadline:
                raise Busy(
                    f"the password-check queue would start this one in about {wait:.1f}s, "
                    "after its deadline"
                )

    def _withdraw(self, check: _Check, ticket: _Ticket) -> None:
        """``ticket`` no longer waits; drop a check nobody waits for before it starts."""
        if ticket in check.tickets:
            check.tickets.remove(ticket)
            if check.state is _State.DONE and not check.tickets:
                check.changed.unpark_all()  # the worker waits for the last one
        if check.state is _State.QUEUED and not check.tickets:
            self._queue.remove(check)
            self._flights.pop(check.key, None)

    async def _worker(self) -> None:
        while True:
            check = self._queue.pop()
            if check is None:
                await self._wakeup.park()
                continue
            for ticket in list(check.tickets):
                if ticket.gate is not None and (reason := ticket.gate()) is not None:
                    ticket.refusal = reason
                    ticket.state = _State.REFUSED
                    check.tickets.remove(ticket)
            if check.tickets:
                await self._compute(check)  # wakes the refused along with the rest
            else:
                check.state = _State.REFUSED
                self._flights.pop(check.key, None)
                check.changed.unpark_all()

    async def _compute(self, check: _Check) -> None:
        self._set_state(check, _State.RUNNING)
        self._running += 1
        started = self._clock()
        try:
            # Abandoned if the pool is cancelled (shutdown): the thread ends on its own.
            check.result = await trio.to_thread.run_sync(
                check.compute, abandon_on_cancel=True, limiter=self._threads
            )
        except BaseException:
            # Cancelled, or compute() raised: nobody may wait for a result for ever.
            self._set_state(check, _State.ABANDONED)
            raise
        finally:
            self._running -= 1
            self._flights.pop(check.key, None)
        elapsed = self._clock() - started
        previous = self.seconds_per_check
        self.seconds_per_check = (
            elapsed if previous is None else previous + _SMOOTHING * (elapsed - previous)
        )
        if check.result and check.on_match is not None:
            check.on_match()
        self._set_state(check, _State.DONE)
        # Take the next check only once every waiter has its result: callers count a
        # failure before their next checkpoint, so the next check's gates see it.
        while check.tickets:
            await check.changed.park()

    @staticmethod
    def _set_state(check: _Check, state: _State) -> None:
        check.state = state
        for ticket in check.tickets:
            ticket.state = state
        check.changed.unpark_all()
