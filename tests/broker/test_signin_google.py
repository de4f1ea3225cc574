"""People signing in to a Google "Desktop app" client, against the emulated Google: the
browser sign-in with PKCE, the device sign-in Google refuses for Gmail, renewals (Google does
not rotate refresh tokens), and what a changed password or removed access does."""

from __future__ import annotations

import functools
import ssl
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from broker.cache.memory import MemoryTokenCache
from broker.delegated import SignInFailed, SignInRequired
from broker.model import GOOGLE_SCOPE, App, Secret
from broker.signin import browser_sign_in, device_sign_in, sign_in
from broker.source import CachingTokenSource
from tests.support.browser import Browser
from tests.support.oauth2 import AuthorizationServer

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from broker.delegated import AuthorizationRequest

CLIENT_ID = "1234567890-desktop.apps.googleusercontent.com"
CLIENT_SECRET = "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logged"
JANE = "jane.doe@gmail.com"
BOB = "bob@gmail.com"


@pytest.fixture
def google(tmp_path: Path) -> Iterator[AuthorizationServer]:
    with AuthorizationServer(tmp_path) as server:
        server.register_google_client(CLIENT_ID, CLIENT_SECRET)
        server.add_person(JANE)
        server.add_person(BOB)
        yield server


def gmail_app(google: AuthorizationServer) -> App:
    return App(
        name="gmail",
        provider="google",
        client_id=CLIENT_ID,
        client_secret=Secret(CLIENT_SECRET),
        auth_method="client_secret_post",
        token_url=google.token_url,
        authorization_url=google.authorization_url,
        scope=GOOGLE_SCOPE,
        authority="",
        ca_file=google.ca_file,
        delegated=True,
    )


@pytest.fixture
def cache() -> MemoryTokenCache:
    return MemoryTokenCache()


@pytest.fixture
def source(google: AuthorizationServer, cache: MemoryTokenCache) -> Iterator[CachingTokenSource]:
    tokens = CachingTokenSource({"gmail": gmail_app(google)}, cache=cache)
    yield tokens
    tokens.close()


async def browser_flow(
    source: CachingTokenSource,
    google: AuthorizationServer,
    nursery: trio.Nursery,
    *,
    login: str = JANE,
    consent: bool = True,
) -> tuple[str, list[str]]:
    """Sign in with a browser as ``login``; who it was, and the URL the person opened."""
    opened: list[str] = []

    def show(request: AuthorizationRequest) -> None:
        opened.append(request.url)

        def person() -> None:
            browser = Browser(
                ssl.create_default_context(cafile=str(google.ca_file)),
                login=login,
                consent=consent,
            )
            try:
                browser.open(request.url)
            finally:
                browser.close()

        nursery.start_soon(trio.to_thread.run_sync, person)

    flow = functools.partial(browser_sign_in, redirect_uri="http://localhost", show=show)
    done = await sign_in(source, "gmail", JANE, flow)
    return done.signed_in_as, opened


async def test_browser_sign_in_and_renewals(
    google: AuthorizationServer,
    source: CachingTokenSource,
    cache: MemoryTokenCache,
    nursery: trio.Nursery,
) -> None:
    who, opened = await browser_flow(source, google, nursery)
    assert who == JANE
    params = httpx.URL(opened[0]).params
    assert params["access_type"] == "offline"
    assert params["prompt"] == "consent"
    assert params["code_challenge_method"] == "S256"
    assert params["redirect_uri"].startswith("http://localhost:")
    assert set(params["scope"].split()) == {GOOGLE_SCOPE, "openid", "email"}
    grant = await cache.load_grant(source._key("gmail", JANE))
    assert grant is not None
    token = await source.token("gmail", mailbox=JANE)
    assert token.value.startswith("ya29.")
    assert google.issued[-1]["sub"] == JANE  # tokeninfo names the mailbox: Dovecot checks it
    renewed = await source.provider("gmail").refresh(grant.refresh_token)
    assert renewed.refresh_token is None  # Google keeps its refresh tokens
    assert renewed.token.value != token.value
    assert google.people.renewals == [grant.refresh_token]


async def test_someone_elses_account_is_refused(
    google: AuthorizationServer,
    source: CachingTokenSource,
    cache: MemoryTokenCache,
    nursery: trio.Nursery,
) -> None:
    with pytest.raises(SignInFailed, match=r"signed in as bob@gmail\.com"):
        await browser_flow(source, google, nursery, login=BOB)
    assert await cache.load_grant(source._key("gmail", JANE)) is None


async def test_declined(
    google: AuthorizationServer, source: CachingTokenSource, nursery: trio.Nursery
) -> None:
    with pytest.raises(SignInFailed, match="declined"):
        await browser_flow(source, google, nursery, consent=False)


async def test_device_sign_in_is_refused_for_gmail(
    google: AuthorizationServer, source: CachingTokenSource
) -> None:
    def show(authorization: object) -> None:
        raise AssertionError("no code to show")

    flow = functools.partial(device_sign_in, show=show)
    with pytest.raises(SignInFailed) as caught:
        await sign_in(source, "gmail", JANE, flow)
    assert caught.value.code == "invalid_scope"
    assert "authorize --browser" in caught.value.fix
    assert CLIENT_SECRET not in str(caught.value)


@pytest.mark.parametrize("revoke", ["password", "access removed"])
async def test_revoked_sign_in(
    google: AuthorizationServer,
    source: CachingTokenSource,
    cache: MemoryTokenCache,
    nursery: trio.Nursery,
    revoke: str,
) -> None:
    await browser_flow(source, google, nursery)
    grant = await cache.load_grant(source._key("gmail", JANE))
    assert grant is not None
    if revoke == "password":
        google.change_password(JANE)
    else:
        google.withdraw_consent(JANE, CLIENT_ID)
    with pytest.raises(SignInRequired) as caught:
        await source.provider("gmail").refresh(grant.refresh_token)
    assert caught.value.code == "invalid_grant"
    assert "Third-party apps" in caught.value.fix
    assert "'Testing' status" in caught.value.fix
    assert grant.refresh_token not in str(caught.value)
