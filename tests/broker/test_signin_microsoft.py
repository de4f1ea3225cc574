"""People signing in to Microsoft delegated apps, through the real msal client, against the
emulated Entra: the device sign-in (polling, slow_down, expired codes, declined consent),
the browser sign-in with PKCE and a loopback redirect (state checked), the account check,
and renewals that rotate, or end because the password changed or consent was withdrawn."""

from __future__ import annotations

import functools
import re
import socket
import ssl
from dataclasses import replace
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from broker.cache.memory import MemoryTokenCache
from broker.claims import decode_claims
from broker.delegated import SignInFailed, SignInRequired
from broker.errors import BrokerError, PermanentTokenError, TemporaryTokenError
from broker.model import DELEGATED_SCOPE, App, Secret
from broker.providers.microsoft_delegated import MicrosoftDelegatedProvider
from broker.signin import SLOW_DOWN_STEP, browser_sign_in, device_sign_in, sign_in
from broker.source import CachingTokenSource, SignInState
from tests.support.browser import Browser
from tests.support.entra import DELEGATED_PERMISSIONS, EntraEmulator

if TYPE_CHECKING:
    from collections.abc import Iterator

    from broker.delegated import AuthorizationRequest, DeviceAuthorization

# The tests poll device sign-ins faster than the interval Entra asks for (they record the
# intervals instead of waiting them out), which msal notes with a warning.
pytestmark = pytest.mark.filterwarnings("ignore:Attempted too soon:UserWarning")

PUBLIC_ID = "aaaaaaaa-1111-2222-3333-444444444444"
CONFIDENTIAL_ID = "bbbbbbbb-1111-2222-3333-444444444444"
NO_PUBLIC_FLOWS_ID = "cccccccc-1111-2222-3333-444444444444"
SECRET = "confidential-client-secret-never-log-it"
JANE = "jane@contoso.com"
BOB = "bob@contoso.com"


@pytest.fixture
def entra(idp: EntraEmulator) -> EntraEmulator:
    idp.register_app(PUBLIC_ID, public_client=True, delegated=DELEGATED_PERMISSIONS)
    idp.register_app(CONFIDENTIAL_ID, secret=SECRET, delegated=DELEGATED_PERMISSIONS)
    idp.register_app(NO_PUBLIC_FLOWS_ID, delegated=DELEGATED_PERMISSIONS)
    idp.add_person(JANE)
    idp.add_person(BOB)
    return idp


def delegated_app(entra: EntraEmulator, client_id: str = PUBLIC_ID, **changes: object) -> App:
    app = App(
        name="personal",
        provider="microsoft",
        client_id=client_id,
        tenant="organizations",
        authority=entra.authority,
        scope=DELEGATED_SCOPE,
        ca_file=entra.ca_file,
        delegated=True,
        client_secret=Secret(SECRET) if client_id == CONFIDENTIAL_ID else None,
    )
    return replace(app, **changes)  # type: ignore[arg-type]


@pytest.fixture
def cache() -> MemoryTokenCache:
    return MemoryTokenCache()


@pytest.fixture
def source(entra: EntraEmulator, cache: MemoryTokenCache) -> Iterator[CachingTokenSource]:
    tokens = CachingTokenSource(
        {"personal": delegated_app(entra)},
        cache=cache,
        accounts={"personal": {JANE: ["jane"]}},
        permanent_hold=0,
    )
    yield tokens
    tokens.close()


def trust(entra: EntraEmulator) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(entra.ca_file))


class Person:
    """Acts in a browser, in a thread, when the sign-in shows what to do."""

    def __init__(self, entra: EntraEmulator, nursery: trio.Nursery, login: str = JANE) -> None:
        self.entra = entra
        self.nursery = nursery
        self.login = login
        self.consent = True
        self.visits: list[str] = []
        self.before: list[object] = []

    def _go(self, url: str, user_code: str = "") -> None:
        async def run() -> None:
            browser = Browser(
                trust(self.entra), login=self.login, consent=self.consent, user_code=user_code
            )
            try:
                visit = await trio.to_thread.run_sync(browser.open, url)
            finally:
                browser.close()
            self.visits.append(visit.response.text)

        self.nursery.start_soon(run)

    def device(self, authorization: DeviceAuthorization) -> None:
        assert authorization.verification_uri == self.entra.device_login_url
        self._go(authorization.verification_uri, authorization.user_code)

    def browser(self, request: AuthorizationRequest) -> None:
        self._go(request.url)


class RecordedSleep:
    """Records the polling intervals asked for, and waits only a moment."""

    def __init__(self) -> None:
        self.intervals: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.intervals.append(seconds)
        await trio.sleep(0.02)


async def device(
    source: CachingTokenSource, person: Person, sleep: RecordedSleep | None = None
) -> str:
    flow = functools.partial(device_sign_in, show=person.device, sleep=sleep or RecordedSleep())
    done = await sign_in(source, "personal", JANE, flow)
    return done.signed_in_as


async def test_device_sign_in_then_renewal(
    entra: EntraEmulator,
    source: CachingTokenSource,
    cache: MemoryTokenCache,
    nursery: trio.Nursery,
) -> None:
    sleep = RecordedSleep()
    assert await device(source, Person(entra, nursery), sleep) == JANE
    assert sleep.intervals[0] == entra.people.device_interval
    claims = decode_claims((await source.token("personal", mailbox=JANE)).value)
    assert claims["upn"] == JANE
    assert claims["scp"] == " ".join(DELEGATED_PERMISSIONS)
    assert claims["aud"] == "https://outlook.office.com"
    key = source._key("personal", JANE)
    first = await cache.load_grant(key)
    assert first is not None
    assert first.account == JANE
    status = await source.sign_in_status("personal", JANE)
    assert status.state is SignInState.SIGNED_IN
    # Renewal: a new access token, and a new refresh token in place of the old one.
    renewed = await source.provider("personal").refresh(first.refresh_token)
    assert renewed.refresh_token not in (None, first.refresh_token)
    assert decode_claims(renewed.token.value)["upn"] == JANE


async def test_device_sign_in_honours_slow_down(
    entra: EntraEmulator, source: CachingTokenSource, nursery: trio.Nursery
) -> None:
    entra.people.slow_downs = 2
    person = Person(entra, nursery)
    started: list[DeviceAuthorization] = []
    intervals: list[float] = []

    async def sleep(seconds: float) -> None:
        intervals.append(seconds)
        if len(intervals) == 3:  # two polls were told to slow down: now the person comes
            person.device(started[0])
        await trio.sleep(0.02)

    flow = functools.partial(device_sign_in, show=started.append, sleep=sleep)
    await sign_in(source, "personal", JANE, flow)
    assert [p for _, p in entra.people.polls][:2] == ["slow_down", "slow_down"]
    base = entra.people.device_interval
    assert intervals[:3] == [base, base + SLOW_DOWN_STEP, base + 2 * SLOW_DOWN_STEP]
    assert (await source.sign_in_status("personal", JANE)).state is SignInState.SIGNED_IN


async def test_device_code_expired_or_declined(
    entra: EntraEmulator, source: CachingTokenSource, cache: MemoryTokenCache, nursery: trio.Nursery
) -> None:
    def expire(authorization: DeviceAuthorization) -> None:
        for device in entra.people._devices.values():
            device.expires_at = 0

    flow = functools.partial(device_sign_in, show=expire, sleep=RecordedSleep())
    with pytest.raises(SignInFailed, match="expired") as caught:
        await sign_in(source, "personal", JANE, flow)
    assert caught.value.code == "expired_token"
    person = Person(entra, nursery)
    person.consent = False
    with pytest.raises(SignInFailed, match="declined"):
        await device(source, person)
    assert await cache.load_grant(source._key("personal", JANE)) is None


async def test_signing_in_as_someone_else_is_refused(
    entra: EntraEmulator, source: CachingTokenSource, cache: MemoryTokenCache, nursery: trio.Nursery
) -> None:
    with pytest.raises(
        SignInFailed, match=re.escape("signed in as bob@contoso.com, not as jane")
    ) as caught:
        await device(source, Person(entra, nursery, login=BOB))
    assert caught.value.code == "WRONG_ACCOUNT"
    assert await cache.load_grant(source._key("personal", JANE)) is None
    with pytest.raises(SignInRequired):
        await source.token("personal", mailbox=JANE)


async def test_device_sign_in_needs_a_public_client(
    entra: EntraEmulator, cache: MemoryTokenCache, nursery: trio.Nursery
) -> None:
    for client_id, fix in (
        (CONFIDENTIAL_ID, "Sign in with a browser"),
        (NO_PUBLIC_FLOWS_ID, "Allow public client flows"),
    ):
        requests = entra.token_requests
        source = CachingTokenSource({"personal": delegated_app(entra, client_id)}, cache=cache)
        with pytest.raises(SignInFailed) as caught:
            await device(source, Person(entra, nursery))
        assert fix in caught.value.fix
        assert SECRET not in str(caught.value)
        assert entra.token_requests == requests
        source.close()


@pytest.mark.parametrize("client_id", [PUBLIC_ID, CONFIDENTIAL_ID])
async def test_browser_sign_in(
    entra: EntraEmulator, cache: MemoryTokenCache, nursery: trio.Nursery, client_id: str
) -> None:
    source = CachingTokenSource({"personal": delegated_app(entra, client_id)}, cache=cache)
    person = Person(entra, nursery)
    shown: list[AuthorizationRequest] = []

    def show(request: AuthorizationRequest) -> None:
        shown.append(request)
        person.browser(request)

    flow = functools.partial(browser_sign_in, redirect_uri="http://127.0.0.1", show=show)
    done = await sign_in(source, "personal", JANE, flow)
    assert done.signed_in_as == JANE
    url = httpx.URL(shown[0].url)
    assert url.params["code_challenge_method"] == "S256"
    assert url.params["response_mode"] == "form_post"
    assert url.params["redirect_uri"].startswith("http://127.0.0.1:")
    assert "xoauth2-proxy has the answer" in person.visits[0]
    assert (await source.sign_in_status("personal", JANE)).state is SignInState.SIGNED_IN
    source.close()


async def test_browser_sign_in_refuses_an_answer_with_another_state(
    entra: EntraEmulator, source: CachingTokenSource, nursery: trio.Nursery
) -> None:
    """A forged redirect (another state) is refused and the real one still counts."""
    person = Person(entra, nursery)
    forged: list[httpx.Response] = []

    def show(request: AuthorizationRequest) -> None:
        async def forge_then_sign_in() -> None:
            def post() -> httpx.Response:
                return httpx.post(
                    request.redirect_uri, data={"code": "forged-code", "state": "not-the-state"}
                )

            forged.append(await trio.to_thread.run_sync(post))
            person.browser(request)

        nursery.start_soon(forge_then_sign_in)

    flow = functools.partial(browser_sign_in, redirect_uri="http://127.0.0.1", show=show)
    requests = entra.token_requests
    await sign_in(source, "personal", JANE, flow)
    assert forged[0].status_code == 400
    assert "state does not match" in forged[0].text
    assert entra.token_requests == requests + 1  # the forged code was never redeemed


async def test_browser_sign_in_declined(
    entra: EntraEmulator, source: CachingTokenSource, nursery: trio.Nursery
) -> None:
    person = Person(entra, nursery)
    person.consent = False
    flow = functools.partial(browser_sign_in, redirect_uri="http://127.0.0.1", show=person.browser)
    with pytest.raises(SignInFailed, match="declined") as caught:
        await sign_in(source, "personal", JANE, flow)
    assert caught.value.code == "access_denied"


async def test_loopback_listener_survives_junk(
    entra: EntraEmulator, source: CachingTokenSource, nursery: trio.Nursery
) -> None:
    """Connections that send nothing, garbage, or other paths do not stop the sign-in."""
    person = Person(entra, nursery)

    def show(request: AuthorizationRequest) -> None:
        port = httpx.URL(request.redirect_uri).port
        assert port is not None

        def junk() -> list[int]:
            idle = socket.create_connection(("127.0.0.1", port))  # sends nothing
            with socket.create_connection(("127.0.0.1", port)) as raw:
                raw.sendall(b"\x16\x03\x01 not http\r\n\r\n")
                raw.recv(1024)
            statuses = [
                httpx.get(f"http://127.0.0.1:{port}/favicon.ico").status_code,
                httpx.get(f"{request.redirect_uri}?unrelated=1").status_code,
                httpx.get(f"{request.redirect_uri}?code=a&code=b&state=x").status_code,
            ]
            idle.close()
            return statuses

        async def then_sign_in() -> None:
            assert await trio.to_thread.run_sync(junk) == [404, 400, 400]
            person.browser(request)

        nursery.start_soon(then_sign_in)

    flow = functools.partial(browser_sign_in, redirect_uri="http://127.0.0.1", show=show)
    assert (await sign_in(source, "personal", JANE, flow)).signed_in_as == JANE


@pytest.mark.parametrize(
    ("revoke", "code", "meaning"),
    [
        ("password", "AADSTS50173", "the password changed"),
        ("consent", "AADSTS65001", "Consent is missing or was withdrawn"),
    ],
)
async def test_renewal_after_revocation(
    entra: EntraEmulator,
    source: CachingTokenSource,
    cache: MemoryTokenCache,
    nursery: trio.Nursery,
    revoke: str,
    code: str,
    meaning: str,
) -> None:
    await device(source, Person(entra, nursery))
    grant = await cache.load_grant(source._key("personal", JANE))
    assert grant is not None
    if revoke == "password":
        entra.change_password(JANE)
    else:
        entra.withdraw_consent(JANE, PUBLIC_ID)
    with pytest.raises(SignInRequired) as caught:
        await source.provider("personal").refresh(grant.refresh_token)
    assert caught.value.code == code
    assert meaning in caught.value.fix
    assert grant.refresh_token not in str(caught.value)


async def test_consumers_tenant(
    entra: EntraEmulator, cache: MemoryTokenCache, nursery: trio.Nursery
) -> None:
    """Personal accounts sign in through the consumers authority."""
    source = CachingTokenSource({"personal": delegated_app(entra, tenant="consumers")}, cache=cache)
    assert await device(source, Person(entra, nursery)) == JANE
    source.close()


async def test_scope_without_a_permission_is_refused(entra: EntraEmulator) -> None:
    with pytest.raises(ValueError, match="names no permission"):
        MicrosoftDelegatedProvider(delegated_app(entra, scope="openid offline_access"))


async def test_refresh_token_text_never_in_errors(source: CachingTokenSource) -> None:
    with pytest.raises(SignInRequired) as caught:
        await source.provider("personal").refresh("made-up-refresh-token-value-1234567890")
    assert "made-up-refresh-token-value" not in f"{caught.value} {caught.value.fix}"


async def test_provider_errors(entra: EntraEmulator, source: CachingTokenSource) -> None:
    provider = source.provider("personal")
    entra.fail_next(503, count=1)
    with pytest.raises(TemporaryTokenError, match="HTTP 503"):
        await provider.refresh("any-refresh-token")
    # Entra's answer for a client it does not know is not about the sign-in.
    unknown = MicrosoftDelegatedProvider(
        delegated_app(entra, "eeeeeeee-1111-2222-3333-444444444444")
    )
    with pytest.raises(PermanentTokenError) as caught:
        await unknown.refresh("any-refresh-token")
    assert not isinstance(caught.value, SignInRequired)
    assert caught.value.code == "AADSTS700016"
    with pytest.raises(PermanentTokenError, match="no app-only token"):
        await unknown.fetch()
    unknown.close()
    with pytest.raises(ValueError, match="not delegated"):
        MicrosoftDelegatedProvider(delegated_app(entra, delegated=False))
    # A device code Entra never issued, and an answer whose state is not the request's.
    started = await provider.start_device_sign_in()
    assert isinstance(started.handle, dict)
    started.handle["device_code"] = "not-a-device-code"
    with pytest.raises(SignInFailed) as failed:
        await provider.poll_device_sign_in(started)
    assert failed.value.code == "bad_verification_code"
    request = await provider.authorization_request("http://127.0.0.1:1/")
    with pytest.raises(SignInFailed) as failed:
        await provider.redeem(request, {"code": "some-code", "state": "another-state"})
    assert failed.value.code == "STATE_MISMATCH"
    with pytest.raises(SignInFailed) as failed:
        await provider.redeem(request, {"error": "server_error", "state": request.state})
    assert "without a code" in str(failed.value)


async def test_an_identity_provider_that_cannot_be_reached(entra: EntraEmulator) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    provider = MicrosoftDelegatedProvider(
        delegated_app(entra, authority=f"https://127.0.0.1:{port}")
    )
    with pytest.raises(TemporaryTokenError, match="unreachable"):
        await provider.refresh("any-refresh-token")
    provider.close()


@pytest.mark.parametrize(
    ("error", "refused"), [("invalid_grant", SignInRequired), ("server_error", BrokerError)]
)
def test_a_refresh_token_entra_echoes_is_scrubbed(
    entra: EntraEmulator, error: str, refused: type[BrokerError]
) -> None:
    """Should Entra quote the refresh token (or device code) sent in its error text, neither
    the error, its fix, the log nor a revoked sign-in's record may show it."""
    provider = MicrosoftDelegatedProvider(delegated_app(entra))
    secret = "echoed-refresh-token-value-0987654321"
    answer = {"error": error, "error_description": f"AADSTS70000: the grant {secret} is bad"}
    with pytest.raises(refused) as caught:
        provider._renewal(answer, provider._refresh_error, secret)
    assert secret not in f"{caught.value} {caught.value.fix}"
    assert "<redacted>" in str(caught.value)
