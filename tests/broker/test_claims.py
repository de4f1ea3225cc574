"""broker.claims: unverified decoding of access tokens for diagnosis."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import replace

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import claims as claims_module
from broker.claims import (
    NotAJwtError,
    check_token,
    decode_claims,
    describe,
    describe_opaque,
    expectations_for,
    is_tenant_id,
    token_roles,
)
from broker.model import GOOGLE_SCOPE, AccessToken, App

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


def test_a_token_is_decoded_once_for_its_many_logins() -> None:
    """Each login checks its token's claims and roles; a token serves many logins, and
    decoding it costs more than the rest of the check, so it is decoded once."""
    decoded = claims_module._claims_of
    decoded.cache_clear()
    value = make_token(CLAIMS)
    for _ in range(3):
        assert token_roles(value) == {"IMAP.AccessAsApp", "SMTP.SendAsApp"}
        assert check_token(expectations_for(microsoft()), token(CLAIMS)) == []
    assert decoded.cache_info().misses == 1
    # The claims handed out are the caller's to change: the remembered ones stay as they were.
    first = decode_claims(value)
    first["roles"] = ["Mail.ReadWrite"]
    assert token_roles(value) == {"IMAP.AccessAsApp", "SMTP.SendAsApp"}
    # What is not a JWT is remembered as such, and says so every time.
    for _ in range(2):
        with pytest.raises(NotAJwtError, match="not a JWT"):
            token_roles("opaque-token-value-EwBwA8l6BAAU")
    assert check_token(expectations_for(microsoft()), token(None))[0].claim == "token"


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
    # Written by hand: PyJWT refuses to encode registered claims of the wrong type
    # ({"iss": 0}), which a server may still send and we must still show.
    def part(value: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    text = f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2ln"
    assert decode_claims(text) == claims


def test_describe_microsoft() -> None:
    rows = dict(describe(CLAIMS, now=NOW, header={"typ": "JWT"}, provider="microsoft"))
    assert list(rows) == ["aud", "roles", "appid", "tid", "typ", "exp", "expires in"]
    assert rows["roles"] == "IMAP.AccessAsApp, SMTP.SendAsApp"
    assert rows["aud"] == "https://outlook.office365.com"
    assert rows["tid"] == CLAIMS["tid"]
    assert rows["appid"] == CLAIMS["appid"]
    assert rows["typ"] == "JWT"
    assert rows["exp"] == f"2027-01-15 09:02:05 UTC ({NOW + 3725})"
    assert rows["expires in"] == "1 h 02 min"


def test_describe_generic_speaks_no_microsoft() -> None:
    claims = {
        "iss": "https://sso.example.com/realms/mail",
        "sub": "service-account-mail-proxy",
        "aud": ["imap://mail.example.com", "account"],
        "scope": "mail profile",
        "azp": "mail-proxy",
        "client_id": "mail-proxy",
        "exp": NOW + 60,
    }
    rows = describe(claims, now=NOW, header={"typ": "at+jwt"}, provider="oauth2")
    assert dict(rows) == {
        "iss": "https://sso.example.com/realms/mail",
        "sub": "service-account-mail-proxy",
        "aud": "imap://mail.example.com, account",
        "scope": "mail profile",
        "client_id": "mail-proxy",
        "azp": "mail-proxy",
        "typ": "at+jwt",
        "exp": f"2027-01-15 08:01:00 UTC ({NOW + 60})",
        "expires in": "1 min 00 s",
    }
    text = repr(rows)
    for word in ("roles", "tid", "application permissions"):
        assert word not in text
    okta = dict(describe({"scp": ["mail.read", "mail.send"], "exp": NOW}, now=NOW))
    assert okta["scp"] == "mail.read mail.send"


def test_describe_opaque() -> None:
    rows = dict(describe_opaque(AccessToken("ya29.opaque", NOW + 120.5, GOOGLE_SCOPE), NOW))
    assert rows["scope"] == GOOGLE_SCOPE
    assert rows["expires in"] == "2 min 00 s"
    assert "opaque" in rows["format"]
    assert "ya29" not in repr(rows)


@pytest.mark.parametrize(
    ("offset", "text"),
    [(59, "59 s"), (61, "1 min 01 s"), (0, "expired 0 s ago"), (-125, "expired 2 min 05 s ago")],
)
def test_describe_time_left(offset: int, text: str) -> None:
    assert dict(describe({"exp": NOW + offset}, now=NOW))["expires in"] == text


def test_describe_missing_claims() -> None:
    rows = dict(describe({}, now=NOW, provider="microsoft"))
    assert rows["roles"] == "(none: the app has no application permissions consented)"
    assert rows["aud"] == rows["tid"] == rows["exp"] == "(missing)"
    assert rows["expires in"] == "unknown"
    assert json.dumps(rows)  # plain strings only
    generic = dict(describe({}, now=NOW))
    assert "tid" not in generic
    assert "roles" not in generic


# -- checking tokens against what was asked for ----------------------------------------------

ISSUER = "https://sso.example.com/realms/mail"
TENANT_ID = "0b0e7c5f-1111-2222-3333-444455556666"


def token(claims: dict[str, object] | None, scope: str = "mail") -> AccessToken:
    value = "opaque-Zx81" if claims is None else make_token(claims)
    return AccessToken(value, NOW + 3600, scope)


def generic(**changes: object) -> App:
    app = App(
        name="kc",
        provider="oauth2",
        client_id="mail-proxy",
        issuer=ISSUER,
        scope="mail",
        resources=("imap://mail.example.com",),
    )
    return replace(app, **changes)  # type: ignore[arg-type]


GOOD = {"iss": ISSUER, "aud": ["imap://mail.example.com"], "scope": "mail", "exp": NOW}


def test_a_good_generic_token_passes() -> None:
    assert check_token(expectations_for(generic()), token(GOOD)) == []


@pytest.mark.parametrize(
    ("claims", "claim", "value"),
    [
        ({**GOOD, "iss": "https://evil.example.com"}, "iss", "https://evil.example.com"),
        ({**GOOD, "iss": None}, "iss", "(missing)"),
        ({**GOOD, "aud": "account"}, "aud", "account"),
        ({**GOOD, "aud": None}, "aud", "(missing)"),
        ({**GOOD, "scope": "profile"}, "scope", "profile"),
        ({k: v for k, v in GOOD.items() if k != "scope"}, "scope", "(missing)"),
        ({**GOOD, "scope": ""}, "scope", "(empty)"),
    ],
)
def test_generic_mismatches(claims: dict[str, object], claim: str, value: str) -> None:
    claims = {k: v for k, v in claims.items() if v is not None}
    (found,) = check_token(expectations_for(generic()), token(claims))
    assert (found.claim, found.value) == (claim, value)
    assert found.fix
    assert "Entra" not in found.fix
    assert "eyJ" not in str(found)


def test_response_scope_must_hold_the_scope() -> None:
    (found,) = check_token(expectations_for(generic()), token(GOOD, scope="other"))
    assert (found.claim, found.value) == ("scope", "other")


def test_opaque_tokens() -> None:
    app = generic()
    (found,) = check_token(expectations_for(app), token(None))
    assert found.claim == "token"
    assert "aud" in found.expected
    without_audience = expectations_for(replace(app, expect_audience=()))
    assert check_token(without_audience, token(None)) == []
    # A server that says nothing about the scope of an opaque token may have dropped it.
    (unstated,) = check_token(without_audience, token(None), scope_stated=False)
    assert unstated.claim == "scope"
    assert "expect_scope = []" in unstated.fix
    no_checks = expectations_for(replace(app, expect_audience=(), expect_scope=()))
    assert check_token(no_checks, token(None), scope_stated=False) == []


def test_expectations_default_to_what_was_asked() -> None:
    expected = expectations_for(generic(scope="mail send"))
    assert expected.audiences == ("imap://mail.example.com",)
    assert expected.scopes == ("mail", "send")
    assert expected.issuer == ISSUER
    chosen = expectations_for(generic(expect_audience=("dovecot",), expect_scope=("imap",)))
    assert (chosen.audiences, chosen.scopes) == (("dovecot",), ("imap",))


def microsoft(tenant: str = TENANT_ID) -> App:
    return App(name="contoso", provider="microsoft", client_id="c", tenant=tenant)


MS: dict[str, object] = {
    "aud": "https://outlook.office365.com",
    "tid": TENANT_ID,
    "roles": ["IMAP.AccessAsApp"],
}


def test_microsoft_tokens() -> None:
    expected = expectations_for(microsoft())
    assert expected.tenant_id == TENANT_ID
    assert check_token(expected, token(MS, scope="")) == []
    assert check_token(expected, token({**MS, "tid": TENANT_ID.upper()}, scope="")) == []
    assert check_token(expected, token({**MS, "aud": "https://outlook.office365.com/"})) == []
    other = "99990000-1111-2222-3333-444455556666"
    (found,) = check_token(expected, token({**MS, "tid": other}))
    assert (found.claim, found.value, found.expected) == ("tid", other, TENANT_ID)
    assert "tenant" in found.fix
    (found,) = check_token(expected, token({**MS, "aud": "https://graph.microsoft.com"}))
    assert found.claim == "aud"
    assert "outlook.office365.com/.default" in found.fix
    (found,) = check_token(expected, token(None))
    assert found.claim == "token"


def test_microsoft_tenant_domain_needs_resolving() -> None:
    assert expectations_for(microsoft("contoso.onmicrosoft.com")).tenant_id == ""
    resolved = expectations_for(microsoft("contoso.onmicrosoft.com"), tenant_id=TENANT_ID)
    assert resolved.tenant_id == TENANT_ID
    assert is_tenant_id(TENANT_ID)
    assert not is_tenant_id("contoso.onmicrosoft.com")
    assert not is_tenant_id(TENANT_ID.replace("-", ""))


def test_google_checks_the_response_scope() -> None:
    app = App(name="g", provider="google", client_id="sa@x", scope=GOOGLE_SCOPE)
    expected = expectations_for(app)
    assert check_token(expected, token(None, scope=GOOGLE_SCOPE)) == []
    assert check_token(expected, token(None, scope=GOOGLE_SCOPE), scope_stated=False) == []
    (found,) = check_token(expected, token(None, scope="https://www.googleapis.com/auth/gmail"))
    assert found.claim == "scope"
    assert "Domain Wide Delegation" in found.fix


# -- what the earlier tests left to chance ------------------------------------------------


def test_describe_says_none_for_empty_lists_and_missing_for_absent_claims() -> None:
    empty = dict(describe({"roles": [], "exp": NOW + 1}, now=NOW, provider="microsoft"))
    assert empty["roles"] == "(none)"  # a list, empty: not "no permissions consented"
    assert empty["expires in"] == "1 s"
    generic_rows = dict(describe({"roles": [], "exp": NOW}, now=NOW, header={}))
    assert generic_rows["roles"] == "(none)"
    assert generic_rows["scope"] == "(none)"  # generic tokens always show their scope
    assert generic_rows["typ"] == "(missing)"  # asked for, absent
    assert generic_rows["expires in"] == "expired 0 s ago"
    both = dict(describe({"scp": "a", "scope": "b"}, now=NOW))
    assert both["scope"] == "a b"
    assert "scp" not in both
    hour = dict(describe({"exp": NOW + 3600}, now=NOW))
    assert hour["expires in"] == "1 h 00 min"


def test_describe_opaque_rows() -> None:
    rows = describe_opaque(AccessToken("opaque", NOW + 60, ""), NOW)
    assert rows == [
        ("format", "opaque (not a JWT): only the token response's scope and expiry are known"),
        ("scope", "(none)"),
        ("exp", f"2027-01-15 08:01:00 UTC ({NOW + 60})"),
        ("expires in", "1 min 00 s"),
    ]


FULL = {**GOOD, "scope": "mail send"}


@pytest.mark.parametrize(
    ("claims", "claim", "value", "wanted"),
    [
        ({**FULL, "iss": "https://evil.example.com"}, "iss", "https://evil.example.com", ISSUER),
        ({**FULL, "aud": "account"}, "aud", "account", "imap://mail.example.com, dovecot"),
        ({k: v for k, v in FULL.items() if k != "scope"}, "scope", "(missing)", "mail send"),
        ({**FULL, "scope": "profile mail"}, "scope", "mail profile", "mail send"),
    ],
)
def test_a_mismatch_says_what_was_expected(
    claims: dict[str, object], claim: str, value: str, wanted: str
) -> None:
    app = generic(scope="mail send", resources=("imap://mail.example.com", "dovecot"))
    if claim != "aud":
        claims = {**claims, "aud": ["imap://mail.example.com", "dovecot"]}
    (found,) = check_token(expectations_for(app), token(claims, scope="mail send"))
    assert (found.claim, found.value, found.expected) == (claim, value, wanted)


def test_a_response_scope_mismatch_says_what_was_expected() -> None:
    expected = expectations_for(generic(scope="mail send"))
    (found,) = check_token(expected, token(FULL, scope=""))
    assert (found.claim, found.value, found.expected) == ("scope", "(empty)", "mail send")
    (unstated,) = check_token(
        expectations_for(replace(generic(), expect_audience=(), scope="mail send")),
        token(None, scope="mail send"),  # the scope asked for, as RFC 6749 lets one assume
        scope_stated=False,
    )
    assert (unstated.claim, unstated.value, unstated.expected) == (
        "scope",
        "(not stated in the token response)",
        "mail send",
    )


def test_an_opaque_token_says_what_could_not_be_checked() -> None:
    (found,) = check_token(expectations_for(generic()), token(None))
    assert (found.claim, found.value, found.expected) == (
        "token",
        "opaque (not a JWT)",
        "a JWT whose aud can be checked",
    )
    assert "expect_audience" in found.fix
    (entra,) = check_token(expectations_for(microsoft()), token(None))
    assert entra.expected == "a JWT whose aud and tid can be checked"
    assert entra.fix != found.fix  # each provider's own advice


def test_google_expects_the_mail_scope_unless_told_otherwise() -> None:
    app = App(name="g", provider="google", client_id="sa@x", scope="")
    assert expectations_for(app).scopes == (GOOGLE_SCOPE,)
    assert expectations_for(replace(app, scope="https://example/other")).scopes == (
        "https://example/other",
    )
    assert expectations_for(app).provider == "google"


def test_microsoft_without_a_scope_expects_no_audience() -> None:
    assert expectations_for(replace(microsoft(), scope="")).audiences == ()


def test_times_are_shown_in_utc_whatever_the_machine_s_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert dict(describe({"exp": NOW}, now=NOW))["exp"] == f"2027-01-15 08:00:00 UTC ({NOW})"
        opaque = dict(describe_opaque(AccessToken("opaque", NOW, ""), NOW))
        assert opaque["exp"] == f"2027-01-15 08:00:00 UTC ({NOW})"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_audiences_differ_by_more_than_a_trailing_slash() -> None:
    expected = expectations_for(generic(resources=("api://mailX",)))
    (found,) = check_token(expected, token({**GOOD, "aud": "api://mail"}))
    assert (found.claim, found.value) == ("aud", "api://mail")
    assert check_token(expected, token({**GOOD, "aud": "api://mailX/"})) == []


def test_delegated_apps_expect_what_their_tokens_can_show() -> None:
    """Personal Microsoft tokens are opaque: nothing to expect of them here (the scope is
    checked per protocol, the account at sign-in); a delegated Google app still needs the
    mail scope."""
    personal = replace(microsoft("consumers"), delegated=True)
    assert expectations_for(personal) == expectations_for(replace(personal, scope=""))
    expected = expectations_for(personal)
    assert (expected.provider, expected.audiences, expected.tenant_id, expected.scopes) == (
        "microsoft",
        (),
        "",
        (),
    )
    google = App(name="g", provider="google", client_id="x", scope="", delegated=True)
    expected = expectations_for(google)
    assert (expected.provider, expected.scopes) == ("google-delegated", (GOOGLE_SCOPE,))
    assert check_token(expected, token(None, scope="openid")) != []
