"""People signing in to a generic OAuth 2.0 delegated app, against a real third-party server
(the npm package oidc-provider): both sign-ins found through its metadata, refresh tokens
that it rotates and whose reuse revokes the grant, declined sign-ins, the account read
from the ID token or the UserInfo endpoint, and what a server without a sign-in endpoint
or without the device grant for the client says."""

from __future__ import annotations

import functools
import ssl
from dataclasses import replace
from typing import TYPE_CHECKING

import jwt
import pytest
import trio

from broker.cache.memory import MemoryTokenCache
from broker.claims import decode_claims
from broker.delegated import Renewal, SignInFailed, SignInRequired
from broker.errors import PermanentTokenError
from broker.model import AccessToken, App, Secret
from broker.providers._http import TokenResponse
from broker.providers.delegated_oauth2 import DelegatedOAuth2Provider
from broker.signin import browser_sign_in, device_sign_in, sign_in
from broker.source import CachingTokenSource
from tests.support.browser import Browser
from tests.support.oidc_provider import OidcProvider

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from broker.delegated import AuthorizationRequest, DeviceAuthorization

MAIL_RESOURCE = "imap://mail.contoso.test"
JANE = "jane@contoso.test"
BOB = "bob@contoso.test"


def people_client(client_id: str, *grants: str) -> dict[str, object]:
    return {
        "client_id": client_id,
        "token_endpoint_auth_method": "none",
        "application_type": "native",
        "grant_types": list(grants),
        "response_types": ["code"],
        "redirect_uris": ["http://127.0.0.1/"],
    }


@pytest.fixture(scope="module")
def oidc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    server = OidcProvider(
        tmp_path_factory.mktemp("oidc-signin"),
        clients=[
            people_client(
                "mail-proxy",
                "authorization_code",
                "refresh_token",
                "urn:ietf:params:oauth:grant-type:device_code",
            ),
            people_client("browser-only", "authorization_code", "refresh_token"),
        ],
        resources={
            MAIL_RESOURCE: {
                "scope": "mail",
                "audience": MAIL_RESOURCE,
                "format": "jwt",
                "typ": "JWT",
            }
        },
        scopes=["openid", "email", "offline_access", "mail"],
        people=[JANE, BOB],
    )
    with server:
        yield server


def app(oidc: OidcProvider, client_id: str = "mail-proxy", **changes: object) -> App:
    base = App(
        name="people",
        provider="oauth2",
        client_id=client_id,
        issuer=oidc.issuer,
        auth_method="none",
        scope="mail",
        resources=(MAIL_RESOURCE,),
        authority="",
        ca_file=oidc.ca_file,
        delegated=True,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def source(oidc: OidcProvider) -> Iterator[CachingTokenSource]:
    tokens = CachingTokenSource({"people": app(oidc)}, cache=MemoryTokenCache())
    yield tokens
    tokens.close()


class Person:
    def __init__(
        self, oidc: OidcProvider, nursery: trio.Nursery, login: str = JANE, consent: bool = True
    ) -> None:
        self.oidc, self.nursery, self.login, self.consent = oidc, nursery, login, consent

    def _go(self, url: str, user_code: str = "") -> None:
        def act() -> None:
            browser = Browser(
                ssl.create_default_context(cafile=str(self.oidc.ca_file)),
                login=self.login,
                consent=self.consent,
                user_code=user_code,
            )
            try:
                browser.open(url)
            finally:
                browser.close()

        self.nursery.start_soon(trio.to_thread.run_sync, act)

    def device(self, authorization: DeviceAuthorization) -> None:
        self._go(authorization.verification_uri, authorization.user_code)

    def browser(self, request: AuthorizationRequest) -> None:
        self._go(request.url)


async def quick(seconds: float) -> None:
    """Poll without waiting out the server's interval (it does not mind)."""
    await trio.sleep(min(seconds, 0.05))


async def test_device_sign_in_rotation_and_reuse(
    oidc: OidcProvider, source: CachingTokenSource, nursery: trio.Nursery
) -> None:
    flow = functools.partial(device_sign_in, show=Person(oidc, nursery).device, sleep=quick)
    assert (await sign_in(source, "people", JANE, flow)).signed_in_as == JANE
    grant = await source._grants.load_grant(source._key("people", JANE))
    assert grant is not None
    token = await source.token("people", mailbox=JANE)
    claims = decode_claims(token.value)
    assert (claims["sub"], claims["aud"]) == (JANE, MAIL_RESOURCE)
    provider = source.provider("people")
    renewed = await provider.refresh(grant.refresh_token)
    assert renewed.refresh_token not in (None, grant.refresh_token)  # a public client: rotated
    # Using the old one again is reuse: the package revokes the whole grant.
    with pytest.raises(SignInRequired) as caught:
        await provider.refresh(grant.refresh_token)
    assert caught.value.code == "invalid_grant"
    assert grant.refresh_token not in str(caught.value)
    assert renewed.refresh_token is not None
    with pytest.raises(SignInRequired):
        await provider.refresh(renewed.refresh_token)


async def test_browser_sign_in_and_the_account_check(
    oidc: OidcProvider, source: CachingTokenSource, nursery: trio.Nursery
) -> None:
    flow = functools.partial(
        browser_sign_in, redirect_uri="http://127.0.0.1", show=Person(oidc, nursery, BOB).browser
    )
    with pytest.raises(SignInFailed, match="not as jane"):
        await sign_in(source, "people", JANE, flow)
    flow = functools.partial(
        browser_sign_in, redirect_uri="http://127.0.0.1", show=Person(oidc, nursery).browser
    )
    assert (await sign_in(source, "people", JANE, flow)).signed_in_as == JANE


async def test_declined_sign_ins(
    oidc: OidcProvider, source: CachingTokenSource, nursery: trio.Nursery
) -> None:
    person = Person(oidc, nursery, consent=False)
    flow = functools.partial(device_sign_in, show=person.device, sleep=quick)
    with pytest.raises(SignInFailed, match="declined") as caught:
        await sign_in(source, "people", JANE, flow)
    assert caught.value.code == "access_denied"
    flow = functools.partial(browser_sign_in, redirect_uri="http://127.0.0.1", show=person.browser)
    with pytest.raises(SignInFailed, match="declined"):
        await sign_in(source, "people", JANE, flow)


async def test_the_account_from_userinfo(oidc: OidcProvider, nursery: trio.Nursery) -> None:
    """Without a resource, the access token is good for the UserInfo endpoint, which names
    the account when the ID token does not."""
    plain = CachingTokenSource(
        {"people": app(oidc, resources=(), scope="openid email offline_access")},
        cache=MemoryTokenCache(),
    )
    try:
        provider = plain.provider("people")
        flow = functools.partial(device_sign_in, show=Person(oidc, nursery).device, sleep=quick)
        renewal = await flow(provider)
        identity = await provider.identity(Renewal(renewal.token, None, {}))
        assert identity["email"] == JANE
        assert (await provider.identity(renewal))["email"] == JANE  # the ID token's
    finally:
        plain.close()


async def test_a_client_without_the_device_grant(oidc: OidcProvider, nursery: trio.Nursery) -> None:
    source = CachingTokenSource({"people": app(oidc, "browser-only")}, cache=MemoryTokenCache())
    try:
        flow = functools.partial(device_sign_in, show=Person(oidc, nursery).device, sleep=quick)
        with pytest.raises(SignInFailed) as caught:
            await sign_in(source, "people", JANE, flow)
        assert "sign in with a browser" in caught.value.fix
    finally:
        source.close()


async def test_endpoints_the_configuration_lacks(tmp_path: Path) -> None:
    """Without metadata, a sign-in needs its endpoint configured: said without asking."""
    bare = App(
        name="people",
        provider="oauth2",
        client_id="c",
        token_url="https://127.0.0.1:1/token",
        auth_method="none",
        scope="mail",
        authority="",
        delegated=True,
    )
    provider = DelegatedOAuth2Provider(bare)
    with pytest.raises(SignInFailed) as caught:
        await provider.start_device_sign_in()
    assert caught.value.code == "NO_DEVICE_FLOW"
    with pytest.raises(SignInFailed) as caught:
        await provider.authorization_request("http://127.0.0.1:1/")
    assert caught.value.code == "NO_AUTHORIZATION_ENDPOINT"
    token = AccessToken("opaque", 0.0)
    assert await provider.identity(Renewal(token, None, {"email": JANE})) == {"email": JANE}
    with pytest.raises(ValueError, match="not delegated"):
        DelegatedOAuth2Provider(replace(bare, delegated=False))


def test_an_id_token_for_another_client_or_issuer_names_nobody() -> None:
    """Who signed in is read only from an ID token for this client, from the issuer."""

    def id_token(**claims: object) -> str:
        return jwt.encode({"email": JANE, **claims}, "k" * 32, algorithm="HS256")

    google = DelegatedOAuth2Provider(
        App(
            name="gmail",
            provider="google",
            client_id="desktop-client",
            client_secret=Secret("s"),
            auth_method="client_secret_post",
            token_url="https://127.0.0.1:1/token",
            scope="https://mail.google.com/",
            authority="",
            delegated=True,
        )
    )
    token = AccessToken("ya29.opaque", 0.0, "https://mail.google.com/")
    good = id_token(aud="desktop-client", iss="https://accounts.google.com")
    renewal = google._renewal(TokenResponse(token, True, "refresh", good))
    assert renewal.identity["email"] == JANE
    for bad in (
        id_token(aud="another-client", iss="https://accounts.google.com"),
        id_token(aud="desktop-client", iss="https://evil.example"),
        id_token(iss="https://accounts.google.com"),
        "not-a-jwt",
    ):
        with pytest.raises(PermanentTokenError) as caught:
            google._renewal(TokenResponse(token, True, "refresh", bad))
        assert caught.value.code == "ID_TOKEN"
