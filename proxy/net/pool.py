"""Warm upstream connections: connected, TLS done, greeting in, each waiting for one login.

Theory of operation
-------------------

A login needs an upstream connection, and opening one costs a TCP handshake, a TLS
handshake and the server's greeting: a few milliseconds on a LAN, several round trips to
a server across the internet. :class:`~proxy.net.session.Session` opens it early, while
the client's own TLS handshake and login run (see ``EarlyUpstreams``); a pool goes
further and keeps a few such connections ready, so that a login starts its upstream
dialogue at once.

Rules:

* *Each connection serves one login.* It is handed to a session with the bytes that
  arrived (the start of the greeting, which the session feeds to its login machine as
  the first thing the upstream said) and is never returned.
* *Bounded in number and in age.* At most ``size`` wait, and none longer than
  ``max_age``: servers drop connections that do not log in (Dovecot after a few minutes,
  Exchange Online after about one), so a connection is closed well before that. A
  connection the server closed anyway is found by the session like any lost upstream,
  and the login machine reconnects once.
* *Only while logins come.* Replacing what expired unused would keep the upstream busy
  with connections nobody uses (and look like a scan to it): a connection is opened only
  when a login has just asked for one, and the pool keeps itself filled only while logins
  come faster than ``max_age`` apart.
* *Quietly.* Failures to connect are counted and logged once per outage; until the
  upstream answers again, the pool waits (``retry``, doubling up to ``max_retry``) before
  trying again, and logins connect on their own as before.
* *The same checks.* Connections are made by the same code as a login's own
  (:func:`~proxy.net.session.open_upstream`): certificate and host name verified, TLS
  sessions resumed from the listener's cache.

Only implicit-TLS upstreams without a PROXY header are pooled: with STARTTLS the login
machine drives the greeting, capabilities and the upgrade itself, and a PROXY header names
one client's address, which no connection opened ahead of that client can know.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from proxy.config import UpstreamClientAddress
from proxy.net.session import UpstreamUnavailable, open_upstream
from proxy.net.tlssocket import TlsSocketStream
from proxy.protocol.modes import UpstreamTls

if TYPE_CHECKING:
    import ssl

    from proxy.config import ListenerConfig
    from proxy.net.tls import SessionCache
    from proxy.ops.metrics import Metrics

__all__ = ["UpstreamPool", "WarmConnection"]

log = logging.getLogger("xoauth2_proxy.pool")


@dataclass(slots=True)
class WarmConnection:
    """An upstream connection ready for a login, and what it has said so far."""

    stream: trio.abc.Stream
    greeting: bytes
    born: float


class UpstreamPool:
    """Up to ``size`` warm connections to one listener's upstream (see the module notes).

    Run :meth:`run` in a nursery; sessions call :meth:`take`. ``metrics`` counts each
    connection's fate (``taken``, ``missed`` when a login found none, ``expired``,
    ``failed``) and its TLS handshake.
    """

    def __init__(
        self,
        listener: ListenerConfig,
        context: ssl.SSLContext,
        sessions: SessionCache | None,
        *,
        size: int,
        max_age: float,
        timeout: float,
        retry: float = 1.0,
        max_retry: float = 60.0,
        metrics: Metrics | None = None,
    ) -> None:
        if size < 0 or max_age <= 0 or timeout <= 0 or retry <= 0:
            raise ValueError("pool size must not be negative, ages and timeouts positive")
        self.listener = listener
        self.context = context
        self.sessions = sessions
        poolable = (
            listener.upstream_tls is UpstreamTls.IMPLICIT
            and listener.upstream_client_address is UpstreamClientAddress.NONE
        )
        self.size = size if poolable else 0
        self.max_age = max_age
        self.timeout = timeout
        self.retry = retry
        self.max_retry = max_retry
        self._metrics = metrics
        self._ready: deque[WarmConnection] = deque()
        self._stale: list[WarmConnection] = []
        self._opening = 0
        self._changed = trio.Event()
        #: When the last two logins asked: the pool fills only while they come often.
        self._last_ask = -math.inf
        self._interval = math.inf
        #: After a failure, no new attempt before this time; the wait doubles each time.
        self._retry_at = -math.inf
        self._delay = retry
        #: Failures since the pool last worked (logged once per outage).
        self.failures = 0

    def __repr__(self) -> str:
        return f"<UpstreamPool {self.listener.name}: {len(self._ready)}/{self.size} ready>"

    def __len__(self) -> int:
        """Connections ready now."""
        return len(self._ready)

    def _event(self, what: str) -> None:
        if self._metrics is not None:
            self._metrics.pool_event(self.listener.name, what)

    def take(self) -> WarmConnection | None:
        """A warm connection for a login, or ``None`` (the login connects itself)."""
        if not self.size:
            return None
        now = trio.current_time()
        self._interval, self._last_ask = now - self._last_ask, now
        self._changed.set()
        while self._ready:
            warm = self._ready.popleft()
            if now - warm.born < self.max_age:
                self._event("taken")
                return warm
            self._stale.append(warm)  # run() closes it
        self._event("missed")
        return None

    def _wanted(self, now: float) -> bool:
        """Should one more connection be opened now?"""
        return (
            len(self._ready) + self._opening < self.size
            and now >= self._retry_at
            # Logins come often enough that a new one will serve one before it expires.
            and self._interval < self.max_age
            and now - self._last_ask < self.max_age
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the pool filled while logins come; close what waits when cancelled."""
        task_status.started()
        if not self.size:
            await trio.sleep_forever()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    await self._expire()
                    now = trio.current_time()
                    while self._wanted(now):
                        self._opening += 1
                        nursery.start_soon(self._open)
                    self._changed = trio.Event()
                    wake = self._ready[0].born + self.max_age if self._ready else math.inf
                    if self._retry_at > now:
                        wake = min(wake, self._retry_at)
                    with trio.move_on_at(wake):
                        await self._changed.wait()
        finally:
            with trio.CancelScope(shield=True):
                for warm in (*self._ready, *self._stale):
                    await trio.aclose_forcefully(warm.stream)
                self._ready.clear()
                self._stale.clear()

    async def _expire(self) -> None:
        """Close what has waited ``max_age`` (and what :meth:`take` found too old)."""
        now = trio.current_time()
        while self._ready and now - self._ready[0].born >= self.max_age:
            self._stale.append(self._ready.popleft())
        while self._stale:
            self._event("expired")
            await trio.aclose_forcefully(self._stale.pop().stream)

    async def _open(self) -> None:
        """Open one connection and wait for its first bytes."""
        stream: trio.abc.Stream | None = None
        try:
            with trio.fail_after(self.timeout):
                stream = await open_upstream(self.listener, self.context, self.sessions)
                greeting = bytes(await stream.receive_some())
            if not greeting:
                raise trio.BrokenResourceError("closed before its greeting")
        except (trio.TooSlowError, UpstreamUnavailable, trio.BrokenResourceError) as exc:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            self._failed(exc)
            return
        except BaseException:  # cancelled (the pool stops) while waiting for the greeting
            if stream is not None:
                await trio.aclose_forcefully(stream)
            raise
        finally:
            self._opening -= 1
            self._changed.set()
        if self._metrics is not None and isinstance(stream, TlsSocketStream):
            self._metrics.upstream_handshake(self.listener.name, resumed=stream.session_reused)
        if self.failures:
            log.info("%s: warm upstream connections work again", self.listener.name)
            self.failures = 0
        self._delay = self.retry
        self._ready.append(WarmConnection(stream, greeting, trio.current_time()))

    def _failed(self, exc: Exception) -> None:
        self._event("failed")
        self.failures += 1
        if self.failures == 1:
            why = "no connection in time" if isinstance(exc, trio.TooSlowError) else str(exc)
            log.warning(
                "%s: a warm upstream connection failed (logins connect on their own meanwhile): %s",
                self.listener.name,
                why,
            )
        self._retry_at = trio.current_time() + self._delay
        self._delay = min(self._delay * 2, self.max_retry)
