"""Shared test helpers for the broker tests: fake clock, fake provider, test credentials."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
import trustme

from broker.model import DEFAULT_SCOPE, AccessToken, App

if TYPE_CHECKING:
    from broker.clock import Clock

SECRET_CLIENT_ID = "11111111-2222-3333-4444-555555555555"
CERT_CLIENT_ID = "66666666-7777-8888-9999-000000000000"
#: Long and distinctive, so that a leak is easy to find in any text.
CLIENT_SECRET = "Xq7~secret.VALUE-4a9f2c61e0b84d7f9c3a_never-log-me"


def rsa_certificate_pem(name: str = "app") -> bytes:
    """A fresh RSA key and certificate as one PEM (Entra requires RSA for assertions)."""
    leaf = trustme.CA().issue_cert(f"{name}.example", key_type=trustme.KeyType.RSA)
    return leaf.private_key_pem.bytes() + b"".join(b.bytes() for b in leaf.cert_chain_pems)


class FakeClock:
    """A wall clock that tests move by hand: ``clock.now += 3000``."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fake_app(name: str = "contoso") -> App:
    """An App served by a fake provider (its own provider is never built)."""
    return App(name=name, provider="fake", client_id=f"{name}-client")


class FakeProvider:
    """A scripted provider: counts fetches, can hold them at a gate, can fail on demand.

    ``clock`` is any wall clock (a :class:`FakeClock`, or ``trio_wall_clock`` under a
    MockClock); ``delay`` seconds pass (trio.sleep) in every fetch.
    """

    def __init__(self, clock: Clock, *, lifetime: float = 3600.0, delay: float = 0.0) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.delay = delay
        self.calls = 0
        #: When each fetch started (wall clock).
        self.times: list[float] = []
        #: While set to an unset Event, fetches wait on it.
        self.gate: trio.Event | None = None
        #: Queued outcomes, used before falling back to a fresh token.
        self.outcomes: list[AccessToken | Exception] = []

    async def fetch(self) -> AccessToken:
        self.calls += 1
        self.times.append(self.clock())
        number = self.calls
        if self.gate is not None:
            await self.gate.wait()
        elif self.delay:
            await trio.sleep(self.delay)
        else:
            await trio.lowlevel.checkpoint()
        if self.outcomes:
            outcome = self.outcomes.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome
        return AccessToken(f"token-{number}", self.clock() + self.lifetime, DEFAULT_SCOPE)


class FakeMailboxProvider:
    """A provider whose tokens are per mailbox (like Google domain-wide delegation)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.mailboxes: list[str] = []

    async def fetch_for(self, mailbox: str) -> AccessToken:
        await trio.lowlevel.checkpoint()
        self.mailboxes.append(mailbox)
        return AccessToken(f"token-for-{mailbox}", self.clock() + 3600, DEFAULT_SCOPE)
