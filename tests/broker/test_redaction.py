"""No secret, client assertion or token ever shows in a repr, an error or a log line."""

from __future__ import annotations

import base64
import logging
import socket
from dataclasses import replace
from typing import TYPE_CHECKING

import pytest
import trustme

from broker.cache import CacheKey, Grant
from broker.delegated import (
    AuthorizationRequest,
    DeviceAuthorization,
    Pending,
    Renewal,
    SignInRequired,
)
from broker.errors import BrokerError
from broker.model import AccessToken, App, Secret
from broker.providers.microsoft import MicrosoftProvider
from broker.source import CachingTokenSource, _State
from tests.broker.helpers import CLIENT_SECRET

if TYPE_CHECKING:
    from tests.support.entra import EntraEmulator

WRONG_SECRET = "Wr0ng~secret.value-that-must-not-leak-either-7f3e"


def leaks(text: str, secrets: list[str]) -> list[str]:
    found = []
    for secret in secrets:
        for form in (secret, base64.b64encode(secret.encode()).decode()):
            if form in text:
                found.append(form[:12] + "...")
    if "eyJ" in text:  # the start of any JWT: a token or a client assertion
        found.append("a JWT")
    return found


def describe_error(error: BrokerError) -> str:
    return " | ".join((str(error), repr(error), error.fix, str(error.code)))


async def test_nothing_leaks(
    idp: EntraEmulator,
    secret_app: App,
    cert_app: App,
    certificate_pem: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    key_lines = [
        line
        for line in certificate_pem.decode().splitlines()
        if line and not line.startswith("-----")
    ][:-1]  # the last line may be short; all others are 64 characters of key or certificate
    private_key_lines = key_lines[:5]
    texts: list[str] = []
    tokens: list[str] = []

    source = CachingTokenSource({"contoso": secret_app, "contoso-cert": cert_app})
    try:
        for name in ("contoso", "contoso-cert"):
            token = await source.token(name)
            tokens.append(token.value)
            texts += [repr(token), str(token)]
        texts.append(repr(source))
    finally:
        source.close()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"https://127.0.0.1:{probe.getsockname()[1]}"
    intruder = trustme.CA().issue_cert("intruder.example", key_type=trustme.KeyType.RSA)
    intruder_pem = intruder.private_key_pem.bytes() + intruder.cert_chain_pems[0].bytes()
    failing = [
        replace(secret_app, client_secret=Secret(WRONG_SECRET)),
        replace(secret_app, tenant="fabrikam.example"),
        replace(secret_app, authority=closed),
        replace(secret_app, ca_file=None),
        replace(cert_app, certificate=Secret(intruder_pem.decode())),
        secret_app,  # with an injected 429 below
        cert_app,  # with an injected 500 below
    ]
    for app in failing:
        if app is secret_app:
            idp.fail_next(429, retry_after=3)
        elif app is cert_app:
            idp.fail_next(500)
        with MicrosoftProvider(app) as provider:
            texts += [repr(provider), repr(app), str(app)]
            with pytest.raises(BrokerError) as caught:
                await provider.fetch()
            texts.append(describe_error(caught.value))
    texts += [repr(secret_app.client_secret), str(secret_app.client_secret)]
    texts += [record.getMessage() for record in caplog.records]

    assert len(texts) > 20
    secrets = [CLIENT_SECRET, WRONG_SECRET, *tokens, *private_key_lines]
    for text in texts:
        assert leaks(text, secrets) == [], text
    # The check itself can fail:
    assert leaks(f"oops {CLIENT_SECRET}", secrets)
    assert leaks(f"oops {tokens[0]}", secrets)


def test_people_s_secrets_redact_themselves() -> None:
    """A person's refresh token, device code, state and PKCE verifier never show in reprs."""
    refresh, device, state, verifier = (
        "refresh-token-of-a-person-0123456789",
        "device-code-never-shown-0123456789",
        "state-value-0123456789",
        "pkce-verifier-0123456789",
    )
    token = AccessToken("eyJ-a-persons-access-token", 1.0)
    texts = [
        repr(Renewal(token, refresh, {"email": "jane@example.com"})),
        repr(Renewal(token, None)),
        repr(DeviceAuthorization("ABCD-EFGH", "https://example.com/device", "", 1.0, 5.0, device)),
        repr(
            AuthorizationRequest("https://example.com/auth", "http://127.0.0.1:1/", state, verifier)
        ),
        repr(Grant(refresh, "jane@example.com", 1.0, 1.0)),
        repr(Pending(slow_down=True)),
        repr(SignInRequired("no sign-in", code="NOT_SIGNED_IN", account="jane@example.com")),
        # A rotated sign-in the store did not take yet keeps the token it replaced.
        repr(
            _State(
                CacheKey.for_app(App(name="p", provider="microsoft", client_id="c"), "j@x"),
                0.0,
                unsaved=(Grant(refresh, "jane@example.com", 1.0, 1.0), refresh),
            )
        ),
    ]
    joined = " ".join(texts)
    assert leaks(joined, [refresh, device, state, verifier]) == []
    assert "ABCD-EFGH" in joined  # the user code is for showing
    assert "a refresh token" in texts[0]
    assert "no refresh token" in texts[1]
