"""Shared test helpers for the broker tests: fake clock, fake provider, test credentials."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
import trustme

from broker.claims import Expectations
from broker.delegated import Renewal, SignInRequired
from broker.model import DEFAULT_SCOPE, AccessToken, App

if TYPE_CHECKING:
    from collections.abc import Mapping

    from broker.clock import Clock
    from broker.delegated import AuthorizationRequest, DeviceAuthorization, Pending

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


class FakeDelegatedProvider:
    """A scripted provider of people's tokens, which rotates refresh tokens.

    ``valid`` holds the refresh tokens it accepts. With ``strict`` it behaves like servers
    that detect reuse (oidc-provider): a rotated-away refresh token revokes the whole
    sign-in; otherwise, like Entra, old refresh tokens stay valid until revoked.
    """

    def __init__(self, clock: Clock, *, rotate: bool = True, strict: bool = False) -> None:
        self.clock = clock
        self.rotate = rotate
        self.strict = strict
        self.valid: set[str] = set()
        self.rotated_away: set[str] = set()
        #: The refresh token of every renewal asked for, in order.
        self.refreshed: list[str] = []
        #: While set to an unset Event, renewals wait on it (after the request is counted).
        self.gate: trio.Event | None = None
        self._serial = 0

    def sign_in(self) -> Renewal:
        """What a finished sign-in gives (as the flows would return it)."""
        refresh = self._new_refresh_token()
        return Renewal(self._token(), refresh, {"preferred_username": "jane@contoso.com"})

    def revoke_all(self) -> None:
        self.valid.clear()

    def _new_refresh_token(self) -> str:
        self._serial += 1
        refresh = f"rt-{self._serial}-never-log-this-refresh-token"
        self.valid.add(refresh)
        return refresh

    def _token(self) -> AccessToken:
        self._serial += 1
        return AccessToken(f"delegated-token-{self._serial}", self.clock() + 3600, DEFAULT_SCOPE)

    async def refresh(self, refresh_token: str) -> Renewal:
        self.refreshed.append(refresh_token)
        if self.gate is not None:
            await self.gate.wait()
        else:
            await trio.lowlevel.checkpoint()
        if refresh_token in self.rotated_away and self.strict:
            self.valid.clear()  # reuse detected: the whole sign-in is revoked
        if refresh_token not in self.valid:
            raise SignInRequired(
                "the refresh token was refused: invalid_grant", code="invalid_grant", revoked=True
            )
        if not self.rotate:
            return Renewal(self._token(), None)
        if self.strict:
            self.valid.discard(refresh_token)
        self.rotated_away.add(refresh_token)
        return Renewal(self._token(), self._new_refresh_token())

    async def start_device_sign_in(self) -> DeviceAuthorization:
        raise NotImplementedError

    async def poll_device_sign_in(self, authorization: DeviceAuthorization) -> Renewal | Pending:
        raise NotImplementedError

    async def authorization_request(self, redirect_uri: str) -> AuthorizationRequest:
        raise NotImplementedError

    async def redeem(self, request: AuthorizationRequest, response: Mapping[str, str]) -> Renewal:
        raise NotImplementedError

    async def identity(self, renewal: Renewal) -> Mapping[str, object]:
        await trio.lowlevel.checkpoint()
        return renewal.identity

    async def expectations(self) -> Expectations:
        await trio.lowlevel.checkpoint()
        return Expectations("fake")
