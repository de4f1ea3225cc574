"""SASL helpers: PLAIN parsing, strict base64, XOAUTH2 encoding, error challenges, and the
mechanisms of app identities (EXTERNAL, XOAUTH2, OAUTHBEARER)."""

from __future__ import annotations

import base64
import contextlib
import json

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from proxy.protocol.framing import has_control_characters
from proxy.protocol.sasl import (
    MAX_BEARER,
    MAX_CREDENTIAL,
    BearerCredentials,
    Credentials,
    ExternalCredentials,
    InvalidCredentials,
    Mechanism,
    SaslError,
    b64decode_strict,
    describe_error_challenge,
    parse_external,
    parse_login_field,
    parse_oauthbearer,
    parse_plain,
    parse_response,
    parse_xoauth2,
    text_credential,
    xoauth2_response,
)

FUZZ = settings(
    max_examples=200,
    deadline=None,
    # No "explain" phase: it imports libcst, whose DeprecationWarning our
    # filterwarnings=error turns into an INTERNALERROR that hides the real failure.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)


def test_plain_without_authorization_identity() -> None:
    assert parse_plain(b"\0alice\0secret") == Credentials("alice", "secret")


def test_plain_with_authorization_identity_and_utf8() -> None:
    credentials = parse_plain("shared@x\0jörg\0pässwörd".encode())
    assert credentials == Credentials("jörg", "pässwörd", authzid="shared@x")


def test_plain_empty_password_is_left_for_the_identity_check() -> None:
    assert parse_plain(b"\0alice\0") == Credentials("alice", "")


@pytest.mark.parametrize("message", [b"", b"alice\0secret", b"\0a\0b\0c", b"alice"])
def test_plain_needs_exactly_three_fields(message: bytes) -> None:
    with pytest.raises(SaslError) as caught:
        parse_plain(message)
    assert not isinstance(caught.value, InvalidCredentials)


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (b"\0\0secret", "empty"),
        (b"\0al\xffice\0secret", "not UTF-8"),
        (b"\0alice\0sec\x7fret", "control characters"),
        (b"\0alice\0sec\tret", "control characters"),
        (b"\0" + b"a" * (MAX_CREDENTIAL + 1) + b"\0x", "too long"),
    ],
)
def test_plain_fields_that_cannot_be_credentials(message: bytes, why: str) -> None:
    with pytest.raises(InvalidCredentials, match=why):
        parse_plain(message)


def test_text_credentials_outside_sasl() -> None:
    assert text_credential("pässwörd".encode(), "password") == "pässwörd"
    assert parse_login_field(b"alice", "user name") == "alice"
    with pytest.raises(InvalidCredentials, match="password is not UTF-8"):
        text_credential(b"\xff", "password")


def test_credentials_repr_redacts_the_password() -> None:
    credentials = Credentials("alice", "hunter2", "shared")
    assert "hunter2" not in repr(credentials)
    assert "hunter2" not in str(credentials)
    assert "alice" in repr(credentials)


@pytest.mark.parametrize(
    ("encoded", "decoded"),
    [(b"", b""), (b"YQ==", b"a"), (b"YWI=", b"ab"), (b"YWJj", b"abc"), (b"+/+/", b"\xfb\xff\xbf")],
)
def test_strict_base64_accepts_the_rfc4648_alphabet(encoded: bytes, decoded: bytes) -> None:
    assert b64decode_strict(encoded) == decoded


@pytest.mark.parametrize("bad", [b"YQ", b"YQ=", b"Y Q==", b"YQ==\n", b"-_-_", b"YQ==YQ==", b"*"])
def test_strict_base64_refuses_everything_else(bad: bytes) -> None:
    with pytest.raises(SaslError, match="invalid base64"):
        b64decode_strict(bad)


def test_xoauth2_initial_response() -> None:
    encoded = xoauth2_response("alice@contoso.com", "ya29.token")
    assert base64.b64decode(encoded) == b"user=alice@contoso.com\x01auth=Bearer ya29.token\x01\x01"


def challenge(value: object) -> bytes:
    return base64.b64encode(json.dumps(value).encode())


def test_error_challenge_description() -> None:
    payload = challenge(
        {
            "status": "invalid_token",
            "schemes": "bearer",
            "scope": "mail",
            "nested": {"x": 1},
            "code": 401,
        }
    )
    assert describe_error_challenge(payload) == (
        "code=401, schemes=bearer, scope=mail, status=invalid_token"
    )


@pytest.mark.parametrize(
    ("payload", "described"),
    [
        (b"not base64!", "unreadable error challenge"),
        (base64.b64encode(b"{not json"), "unreadable error challenge"),
        (challenge([1, 2]), "unreadable error challenge"),
        (challenge({}), "empty error challenge"),
        (base64.b64encode(b"[" * 100_000), "unreadable error challenge"),
        (base64.b64encode(b"\xff\xfe"), "unreadable error challenge"),
    ],
)
def test_error_challenge_that_cannot_be_read(payload: bytes, described: str) -> None:
    assert describe_error_challenge(payload) == described


def test_error_challenge_text_is_safe_for_a_log_line() -> None:
    described = describe_error_challenge(challenge({"status": "bad\r\nFAKE LOG LINE" + "x" * 500}))
    assert "\r" not in described
    assert "\n" not in described
    assert len(described) < 320


@FUZZ
@given(st.binary(max_size=200))
def test_sasl_parsers_raise_only_sasl_errors(data: bytes) -> None:
    for parse in (b64decode_strict, parse_plain):
        with contextlib.suppress(SaslError):
            parse(data)
    describe_error_challenge(data)
    describe_error_challenge(base64.b64encode(data))


@FUZZ
@given(
    login=st.text(min_size=1, max_size=20).filter(lambda t: "\0" not in t),
    password=st.text(max_size=20).filter(lambda t: "\0" not in t),
)
def test_plain_round_trip(login: str, password: str) -> None:
    message = f"\0{login}\0{password}".encode()
    try:
        credentials = parse_plain(b64decode_strict(base64.b64encode(message)))
    except InvalidCredentials:
        assert has_control_characters(login + password)
        return
    assert (credentials.login, credentials.password) == (login, password)


# -- credentials of app identities -------------------------------------------------------


def test_external_with_and_without_authorization_identity() -> None:
    assert parse_external(b"") == ExternalCredentials()
    assert parse_external(b"").login == "(client certificate)"
    assert parse_external(b"reports@contoso.com") == ExternalCredentials("reports@contoso.com")
    with pytest.raises(InvalidCredentials):
        parse_external(b"bad\x00name")


def test_xoauth2_from_a_client_is_parsed_and_the_key_redacted() -> None:
    parsed = parse_xoauth2(b"user=reports@contoso.com\x01auth=Bearer key-123\x01\x01")
    assert parsed == BearerCredentials(user="reports@contoso.com", key="key-123")
    assert "key-123" not in repr(parsed)
    assert parsed.login == "reports@contoso.com"
    # What our own upstream encoder writes is what this parser reads.
    encoded = base64.b64decode(xoauth2_response("m@contoso.com", "k"))
    assert parse_xoauth2(encoded) == BearerCredentials("m@contoso.com", "k")


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (b"user=a\x01auth=Bearer k\x01", SaslError),  # one ^A at the end
        (b"auth=Bearer k\x01\x01", InvalidCredentials),  # no user
        (b"user=a\x01auth=Basic k\x01\x01", SaslError),
        (b"user=a\x01auth=Bearer \x01\x01", SaslError),
        (b"user=a\x01\x01", SaslError),  # no auth
        (b"user=a\x01garbage\x01auth=Bearer k\x01\x01", SaslError),
        (b"user=a\x01auth=Bearer " + b"k" * (MAX_BEARER + 1) + b"\x01\x01", InvalidCredentials),
    ],
)
def test_malformed_xoauth2(message: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_xoauth2(message)


def test_oauthbearer_as_rfc_7628_shows_it() -> None:
    # RFC 7628 section 4.1, with our app key as the token.
    message = (
        b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01"
        b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
    )
    assert parse_oauthbearer(message) == BearerCredentials(
        "user@example.com", "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="
    )
    escaped = b"n,a=odd=2Cname=3D@example.com,\x01auth=Bearer k\x01\x01"
    assert parse_oauthbearer(escaped).user == "odd,name=@example.com"


@pytest.mark.parametrize(
    "message",
    [
        b"p=tls-unique,a=u,\x01auth=Bearer k\x01\x01",  # channel binding
        b"n,,\x01auth=Bearer k\x01\x01",  # no user anywhere
        b"n,a=u,auth=Bearer k\x01\x01",  # no ^A after the header
        b"n,a=u,\x01\x01\x01",  # no auth
    ],
)
def test_malformed_oauthbearer(message: bytes) -> None:
    with pytest.raises(SaslError):
        parse_oauthbearer(message)


@FUZZ
@given(st.binary(max_size=600))
def test_bearer_parsers_only_raise_sasl_errors(message: bytes) -> None:
    for parse in (parse_xoauth2, parse_oauthbearer, parse_external):
        with contextlib.suppress(SaslError):
            parse(message)


@pytest.mark.parametrize(
    "data", [b"c2VjcmV0=", b"c2VjcmV0==", b"AA=", b"AA", b"A===", b"c2Vj\ncmV0"]
)
def test_base64_padding_must_be_exact(data: bytes) -> None:
    with pytest.raises(SaslError):
        b64decode_strict(data)


def test_bearer_keys_up_to_max_bearer_are_accepted() -> None:
    # The key has its own limit: the 1 KiB one for user names and passwords refused
    # keys between the two.
    key = "k" * MAX_BEARER
    assert MAX_BEARER > MAX_CREDENTIAL
    message = f"user=a@b\x01auth=Bearer {key}\x01\x01".encode()
    assert parse_xoauth2(message).key == key
    assert parse_oauthbearer(b"n,a=a@b,\x01auth=Bearer " + key.encode() + b"\x01\x01").key == key


@pytest.mark.parametrize(
    "value",
    [b"Bearer", b"Bearer ", b"Bearer    ", b"bearer\tk", b"Bearerk", b""],
)
def test_bearer_needs_a_token(value: bytes) -> None:
    # "Bearer" and spaces used to give an empty key.
    with pytest.raises(SaslError):
        parse_xoauth2(b"user=a@b\x01auth=" + value + b"\x01\x01")


def test_bearer_scheme_is_case_insensitive_and_spaces_are_tolerated() -> None:
    parsed = parse_xoauth2(b"user=a@b\x01auth=BEARER  key-1 \x01\x01")
    assert parsed == BearerCredentials("a@b", "key-1")
    with pytest.raises(InvalidCredentials):
        parse_xoauth2(b"user=a@b\x01auth=Bearer key-1\t\x01\x01")


@pytest.mark.parametrize(
    ("header", "user"),
    [
        (b"n,,", "from-field"),
        (b"y,,", "from-field"),
        (b"n,a=u@b,", "u@b"),
        (b"n,a=,", "from-field"),
        (b"n,a==3D=2C=3D2C,", "=,=2C"),
    ],
)
def test_oauthbearer_gs2_header(header: bytes, user: str) -> None:
    message = header + b"\x01user=from-field\x01auth=Bearer k\x01\x01"
    assert parse_oauthbearer(message).user == user


@pytest.mark.parametrize(
    "header",
    [
        b"n,a=u@b",  # no closing comma
        b"n",
        b"x,,",  # unknown channel binding flag
        b"n,a=u@b,x=1,",  # an attribute RFC 5801 does not have here
        b"n,a=u=b,",  # "=" that is not =2C or =3D (RFC 5801 section 4)
        b"n,a=u=2,",
        b"n,a=u=,",
        b"p=tls-unique,,",
    ],
)
def test_malformed_oauthbearer_gs2_header(header: bytes) -> None:
    with pytest.raises(SaslError):
        parse_oauthbearer(header + b"\x01auth=Bearer k\x01\x01")


def test_mechanisms_by_name() -> None:
    offered = (Mechanism.PLAIN, Mechanism.XOAUTH2)
    assert Mechanism.named(b"xoauth2", offered) is Mechanism.XOAUTH2
    assert Mechanism.named(b"PlAiN", offered) is Mechanism.PLAIN
    assert Mechanism.named(b"OAUTHBEARER", offered) is None  # not offered
    assert Mechanism.named(b"X-UNKNOWN", offered) is None
    assert Mechanism.named(b"", offered) is None
    assert [m for m in Mechanism if m.bearer] == [Mechanism.XOAUTH2, Mechanism.OAUTHBEARER]


def test_error_challenges_are_what_servers_send() -> None:
    assert json.loads(base64.b64decode(Mechanism.OAUTHBEARER.error_challenge)) == {
        "status": "invalid_token"
    }
    assert Mechanism.OAUTHBEARER.error_challenge == b"eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0="
    assert json.loads(base64.b64decode(Mechanism.XOAUTH2.error_challenge)) == {
        "status": "401",
        "schemes": "bearer",
    }
    assert Mechanism.XOAUTH2.error_challenge == b"eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIn0="
    # What we send is what we can read when an upstream sends it.
    described = describe_error_challenge(Mechanism.XOAUTH2.error_challenge)
    assert described == "schemes=bearer, status=401"


def test_parse_response_dispatches_by_mechanism() -> None:
    assert parse_response(Mechanism.PLAIN, b"\0alice\0pw") == Credentials("alice", "pw")
    assert parse_response(Mechanism.EXTERNAL, b"") == ExternalCredentials()
    assert parse_response(
        Mechanism.XOAUTH2, b"user=a@b\x01auth=Bearer k\x01\x01"
    ) == BearerCredentials("a@b", "k")
    assert parse_response(
        Mechanism.OAUTHBEARER, b"n,a=a@b,\x01auth=Bearer k\x01\x01"
    ) == BearerCredentials("a@b", "k")
    with pytest.raises(ValueError, match="single response"):
        parse_response(Mechanism.LOGIN, b"alice")


@FUZZ
@given(user=st.text(max_size=30), key=st.text(min_size=1, max_size=60))
def test_oauthbearer_round_trip(user: str, key: str) -> None:
    """What a client encodes (RFC 5801 saslname escapes) is what we read, or refused as
    credentials that cannot be anyone's; never anything else."""
    escaped = user.replace("=", "=3D").replace(",", "=2C")
    message = f"n,a={escaped},\x01host=h\x01port=1\x01auth=Bearer {key}\x01\x01".encode()
    try:
        parsed = parse_oauthbearer(message)
    except InvalidCredentials:
        # Only what cannot be anyone's: control characters, or no user at all.
        assert has_control_characters(user + key) or not user
        return
    except SaslError:
        # Only keys the grammar cannot carry (spaces at the ends, ^A, empty after spaces).
        assert key.strip(" ") == "" or "\x01" in key or "\x01" in user
        return
    assert parsed == BearerCredentials(user, key.strip(" "))
