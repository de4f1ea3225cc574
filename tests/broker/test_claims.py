"""broker.claims: unverified decoding of access tokens for diagnosis."""

from __future__ import annotations

import base64
import json

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.claims import NotAJwtError, decode_claims, describe, token_roles

NOW = 1_800_000_000


def make_token(claims: dict[str, object], key: str = "k" * 32) -> str:
    return jwt.encode(claims, key, algorithm="HS256", headers={"kid": "x"})


CLAIMS: dict[str, object] = {
    "aud": "https://outlook.office365.com",
    "tid": "0b0e7c5f-1111-2222-3333-444455556666",
    "appid": "11111111-2222-3333-4444-555555555555",
    "roles": ["IMAP.AccessAsApp", "SMTP.SendAsApp"],
    "exp": NOW + 3725,
}


def test_decode_ignores_signature_and_expiry() -> None:
    expired = dict(CLAIMS, exp=NOW - 10**6)
    token = make_token(expired)
    assert decode_claims(token) == expired
    # A signature made with another key does not matter: this is diagnosis only.
    assert decode_claims(make_token(expired, key="z" * 32)) == expired


def test_roles() -> None:
    assert token_roles(make_token(CLAIMS)) == {"IMAP.AccessAsApp", "SMTP.SendAsApp"}
    assert token_roles(make_token({"aud": "x"})) == frozenset()
    assert token_roles(make_token({"roles": "IMAP.AccessAsApp"})) == frozenset()


@pytest.mark.parametrize(
    "token",
    [
        "",
        "opaque-token-value-EwBwA8l6BAAU",
        "a.b.c",
        "eyJhbGciOiJub25lIn0.bm90IGpzb24.",
        # a JSON array, not an object, as payload
        "eyJhbGciOiJIUzI1NiJ9." + base64.urlsafe_b64encode(b"[1,2]").decode().rstrip("=") + ".x",
    ],
)
def test_not_a_jwt(token: str) -> None:
    with pytest.raises(NotAJwtError) as caught:
        decode_claims(token)
    assert isinstance(caught.value, ValueError)
    if token:
        assert token not in str(caught.value)


@given(st.text(max_size=200))
def test_decode_raises_only_not_a_jwt(text: str) -> None:
    try:
        claims = decode_claims(text)
    except NotAJwtError:
        return
    assert isinstance(claims, dict)


@given(st.dictionaries(st.text(max_size=10), st.integers() | st.text(max_size=10), max_size=5))
def test_roundtrip(claims: dict[str, object]) -> None:
    assert decode_claims(make_token(claims)) == claims


def test_describe() -> None:
    rows = dict(describe(CLAIMS, now=NOW))
    assert list(rows) == ["roles", "aud", "tid", "appid", "exp", "expires in"]
    assert rows["roles"] == "IMAP.AccessAsApp, SMTP.SendAsApp"
    assert rows["aud"] == "https://outlook.office365.com"
    assert rows["tid"] == CLAIMS["tid"]
    assert rows["appid"] == CLAIMS["appid"]
    assert rows["exp"] == f"2027-01-15 09:02:05 UTC ({NOW + 3725})"
    assert rows["expires in"] == "1 h 02 min"


@pytest.mark.parametrize(
    ("offset", "text"),
    [(59, "59 s"), (61, "1 min 01 s"), (0, "expired 0 s ago"), (-125, "expired 2 min 05 s ago")],
)
def test_describe_time_left(offset: int, text: str) -> None:
    assert dict(describe({"exp": NOW + offset}, now=NOW))["expires in"] == text


def test_describe_missing_claims() -> None:
    rows = dict(describe({}, now=NOW))
    assert rows["roles"].startswith("(none")
    assert rows["aud"] == rows["tid"] == rows["appid"] == rows["exp"] == "(missing)"
    assert rows["expires in"] == "unknown"
    assert json.dumps(rows)  # plain strings only
