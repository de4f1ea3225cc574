"""Transcript tests for SmtpAuth: both peers, every login form, every failure path.

The upstream's lines are Dovecot 2.3.19's submission service, byte for byte.
"""

from __future__ import annotations

import base64
import re
from typing import TYPE_CHECKING

import pytest

from proxy.protocol import replies
from proxy.protocol.actions import (
    Action,
    BeginRelay,
    Note,
    RequestToken,
    SendToClient,
    SendToServer,
)
from proxy.protocol.capabilities import SmtpExtensions, smtp_proxy_extensions
from proxy.protocol.errors import ClientProtocolError, ProxyError
from proxy.protocol.events import (
    ClientDataReceived,
    Event,
    Refusal,
    ServerClosed,
    ServerConnected,
    ServerDataReceived,
    ServerUnavailable,
    Side,
    TlsEstablished,
    TokenIssued,
    TokenRefused,
)
from proxy.protocol.login import ClientInput, ClientState, UpstreamInput, UpstreamState
from proxy.protocol.modes import AuthSettings, ClientTls, UpstreamTls
from proxy.protocol.sasl import BearerCredentials, Credentials, xoauth2_response
from proxy.protocol.smtp import (
    CLIENT_TRANSITIONS,
    UPSTREAM_TRANSITIONS,
    SmtpAuth,
    state_diagrams,
)
from tests.protocol.playbook import (
    TOKEN,
    Feed,
    Mode,
    Step,
    Trailers,
    run,
    three_ways,
    transcript,
    two_ways,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from proxy.protocol.transitions import InputT, StateT, TransitionTable

MAILBOX = "alice@contoso.com"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


#: An app key, as ``xoauth2-proxy app-key`` makes them.
APP_KEY = "xo2k_c2VjcmV0LWFwcC1rZXktZm9yLXRyYW5zY3JpcHRz"
VARS = {
    "XOAUTH2": xoauth2_response(MAILBOX, TOKEN.value).decode(),
    "PLAIN": b64("\0alice\0secret"),
    "USER": b64("alice"),
    "PASS": b64("secret"),
    "KEY": APP_KEY,
    # What clients that speak OAuth send, with our app key as their token.
    "XO": b64(f"user={MAILBOX}\x01auth=Bearer {APP_KEY}\x01\x01"),
    "OB": b64(f"n,a={MAILBOX},\x01host=proxy.test\x01port=465\x01auth=Bearer {APP_KEY}\x01\x01"),
    # Our error challenges, exactly: {"status":"401","schemes":"bearer"} for XOAUTH2,
    # {"status":"invalid_token"} for OAUTHBEARER (RFC 7628 section 3.2.2).
    "XO_REFUSED": "eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIn0=",
    "OB_REFUSED": "eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=",
}
#: What Mode.TRAILING appends: pipelined envelope commands (RFC 2920), and upstream bytes
#: behind its 235 (which a real server does not send, but the relay must keep).
SMTP_TRAILERS = Trailers(
    client=b"MAIL FROM:<alice@contoso.com>\r\nRCPT TO:<bo",
    partial=b"RCPT TO:<bo",
    server=b"250 2.0.0 early\r\n250-SIZ",
)
#: Dovecot's error challenge for a token it refuses.
ERROR_CHALLENGE = "eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0="


def machine(
    client_tls: ClientTls = ClientTls.IMPLICIT,
    upstream_tls: UpstreamTls = UpstreamTls.IMPLICIT,
    *,
    external: bool = False,
    bearer: bool = False,
    **limits: int,
) -> SmtpAuth:
    return SmtpAuth(
        AuthSettings(
            client_tls, upstream_tls, sasl_external=external, sasl_bearer=bearer, **limits
        ),
        hostname="proxy.test",
    )


def play(text: str, mode: Mode = Mode.WHOLE, auth: SmtpAuth | None = None) -> SmtpAuth:
    auth = auth or machine()
    run(auth, transcript(text, **VARS), mode, VARS, SMTP_TRAILERS)
    return auth


def steps(text: str) -> list[Step]:
    return transcript(text, **VARS)


START = """
    >> start
    S: 220 proxy.test ESMTP xoauth2-proxy ready
    << connect-upstream
"""
#: Dovecot's EHLO reply after TLS (before TLS it adds STARTTLS).
DOVECOT_EHLO = """
    U: 250-localhost
    U: 250-8BITMIME
    U: 250-AUTH XOAUTH2 OAUTHBEARER
    U: 250-BURL imap
    U: 250-CHUNKING
    U: 250-ENHANCEDSTATUSCODES
    U: 250-SIZE
    U: 250 PIPELINING
"""
UPSTREAM_READY = (
    """
    >> server-connected
    U: 220 localhost Dovecot (Debian) ready.
    P: EHLO proxy.test
    """
    + DOVECOT_EHLO
)
READY = START + UPSTREAM_READY
#: Our EHLO reply with Dovecot's list: AUTH is ours, BURL is withheld.
OUR_EHLO = """
    S: 250-proxy.test
    S: 250-AUTH PLAIN LOGIN
    S: 250-PIPELINING
    S: 250-SIZE
    S: 250-ENHANCEDSTATUSCODES
    S: 250-8BITMIME
    S: 250 CHUNKING
"""
GREETED = READY + "C: EHLO client.test\n" + OUR_EHLO
LOGGED_IN = """
    >> token alice@contoso.com
    P: AUTH XOAUTH2
    U: 334$SP
    P: $XOAUTH2
    U: 235 2.7.0 Logged in.
    S: 235 2.7.0 Authentication successful
    << note info logged in to the upstream as 'alice@contoso.com'
    << relay
"""


# === AUTH PLAIN and AUTH LOGIN =============================================================


@three_ways
def test_auth_plain_with_initial_response(mode: Mode) -> None:
    auth = play(
        GREETED
        + """
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        """
        + LOGGED_IN,
        mode,
    )
    assert auth.client_state is ClientState.AUTHENTICATED
    assert auth.upstream_state is UpstreamState.AUTHENTICATED
    assert auth.buffered == 0


@three_ways
def test_auth_plain_with_continuation(mode: Mode) -> None:
    play(
        GREETED
        + """
        C: auth plain
        S: 334$SP
        C: $PLAIN
        << request-token alice secret
        """
        + LOGGED_IN,
        mode,
    )


@three_ways
def test_auth_plain_with_authorization_identity(mode: Mode) -> None:
    plain = b64("shared@contoso.com\0alice\0secret")
    play(
        GREETED
        + f"""
        C: AUTH PLAIN {plain}
        << request-token alice secret shared@contoso.com
        """,
        mode,
    )


@three_ways
def test_auth_login_with_continuations(mode: Mode) -> None:
    play(
        GREETED
        + """
        C: AUTH LOGIN
        S: 334 VXNlcm5hbWU6
        C: $USER
        S: 334 UGFzc3dvcmQ6
        C: $PASS
        << request-token alice secret
        """
        + LOGGED_IN,
        mode,
    )


@three_ways
def test_auth_login_with_the_user_name_as_initial_response(mode: Mode) -> None:
    play(
        GREETED
        + """
        C: Auth Login $USER
        S: 334 UGFzc3dvcmQ6
        C: $PASS
        << request-token alice secret
        """
        + LOGGED_IN,
        mode,
    )


@three_ways
def test_auth_login_accepts_utf8_and_an_empty_password(mode: Mode) -> None:
    user = b64("jörg")
    play(
        GREETED
        + f"""
        C: AUTH LOGIN {user}
        S: 334 UGFzc3dvcmQ6
        C:
        << request-token jörg ''
        """,
        mode,
    )


@three_ways
def test_empty_login_user_name_is_refused_after_the_password(mode: Mode) -> None:
    play(
        GREETED
        + """
        C: AUTH LOGIN =
        S: 334 UGFzc3dvcmQ6
        C: $PASS
        << note info login refused without asking for a token: user name is empty
        S: 535 5.7.8 Authentication credentials invalid
        """,
        mode,
    )


@pytest.mark.parametrize(
    ("login", "why"),
    [
        (
            "C: AUTH PLAIN " + base64.b64encode(b"\0alice\0\xff\xfe").decode(),
            "password is not UTF-8",
        ),
        ("C: AUTH PLAIN " + b64("\0al\x01ce\0secret"), "user name contains control"),
        (
            "C: AUTH LOGIN " + b64("al\x01ce") + "\nS: 334 UGFzc3dvcmQ6\nC: $PASS",
            "user name contains control",
        ),
        ("C: AUTH LOGIN $USER\nS: 334 UGFzc3dvcmQ6\nC: /w==", "password is not UTF-8"),
    ],
)
@three_ways
def test_impossible_credentials_fail_like_a_wrong_password(
    login: str, why: str, mode: Mode
) -> None:
    play(
        GREETED
        + f"""
        {login}
        << note info login refused without asking for a token: {why}
        S: 535 5.7.8 Authentication credentials invalid
        """,
        mode,
    )


@three_ways
def test_auth_plain_empty_initial_response_is_not_plain(mode: Mode) -> None:
    play(
        GREETED
        + """
        C: AUTH PLAIN =
        S: 501 5.5.2 Invalid SASL PLAIN message
        C: AUTH PLAIN $SP$SP
        S: 334$SP
        """,
        mode,
    )


@pytest.mark.parametrize(
    "start",
    [
        "C: AUTH PLAIN\nS: 334$SP",
        "C: AUTH LOGIN\nS: 334 VXNlcm5hbWU6",
        "C: AUTH LOGIN\nS: 334 VXNlcm5hbWU6\nC: $USER\nS: 334 UGFzc3dvcmQ6",
    ],
)
@three_ways
def test_auth_cancelled_at_every_step(start: str, mode: Mode) -> None:
    auth = play(
        GREETED
        + f"""
        {start}
        C: *
        S: 501 5.0.0 Authentication cancelled
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        """,
        mode,
    )
    assert auth.client_state is ClientState.AWAITING_TOKEN


@pytest.mark.parametrize("bad", ["AGFsaWNlAHNlY3JldA", "AGFsaWNlAHNl Y3JldA==", "!!!!", "="])
@pytest.mark.parametrize(
    "start",
    [
        "C: AUTH PLAIN\nS: 334$SP",
        "C: AUTH LOGIN\nS: 334 VXNlcm5hbWU6",
        "C: AUTH LOGIN $USER\nS: 334 UGFzc3dvcmQ6",
    ],
)
@three_ways
def test_continuations_need_strict_base64(start: str, bad: str, mode: Mode) -> None:
    play(
        GREETED
        + f"""
        {start}
        C: {bad}
        S: 501 5.5.2 Cannot decode base64 response
        C: NOOP
        S: 250 2.0.0 OK
        """,
        mode,
    )


@pytest.mark.parametrize("bad", ["AGFsaWNlAHNlY3JldA", "!!!!", "AGFsaWNl\tAHNlY3JldA=="])
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@three_ways
def test_initial_responses_need_strict_base64(bad: str, mechanism: str, mode: Mode) -> None:
    play(
        GREETED
        + f"""
        C: AUTH {mechanism} {bad}
        S: 501 5.5.2 Cannot decode base64 response
        """,
        mode,
    )


@three_ways
def test_malformed_plain_message(mode: Mode) -> None:
    two_fields = b64("alice\0secret")
    play(
        GREETED
        + f"""
        C: AUTH PLAIN {two_fields}
        S: 501 5.5.2 Invalid SASL PLAIN message
        """,
        mode,
    )


@three_ways
def test_other_mechanisms_and_auth_syntax(mode: Mode) -> None:
    play(
        GREETED
        + """
        C: AUTH XOAUTH2 dG9rZW4=
        S: 504 5.5.4 Unrecognized authentication type
        C: AUTH CRAM-MD5
        S: 504 5.5.4 Unrecognized authentication type
        C: AUTH
        S: 501 5.5.2 Syntax error
        C: AUTH PLAIN a b
        S: 501 5.5.2 Syntax error
        """,
        mode,
    )


# === App identities: AUTH EXTERNAL, XOAUTH2 and OAUTHBEARER ================================

ALL_MECHANISMS = "PLAIN LOGIN EXTERNAL XOAUTH2 OAUTHBEARER"
APP_EHLO = OUR_EHLO.replace("AUTH PLAIN LOGIN", f"AUTH {ALL_MECHANISMS}")
APP_GREETED = READY + "C: EHLO client.test\n" + APP_EHLO


def app_machine(client_tls: ClientTls = ClientTls.IMPLICIT, **limits: int) -> SmtpAuth:
    return machine(client_tls, UpstreamTls.IMPLICIT, external=True, bearer=True, **limits)


@pytest.mark.parametrize(
    ("external", "bearer", "offered"),
    [
        (False, False, "PLAIN LOGIN"),
        (True, False, "PLAIN LOGIN EXTERNAL"),
        (False, True, "PLAIN LOGIN XOAUTH2 OAUTHBEARER"),
        (True, True, ALL_MECHANISMS),
    ],
)
@three_ways
def test_app_mechanisms_are_advertised_when_set(
    external: bool, bearer: bool, offered: str, mode: Mode
) -> None:
    play(
        READY + "C: EHLO client.test\n" + OUR_EHLO.replace("AUTH PLAIN LOGIN", f"AUTH {offered}"),
        mode,
        machine(external=external, bearer=bearer),
    )


@pytest.mark.parametrize(
    ("external", "bearer", "unknown"),
    [
        (False, False, ["EXTERNAL", "XOAUTH2", "oauthbearer"]),
        (True, False, ["XOAUTH2", "OAUTHBEARER"]),
        (False, True, ["external"]),
    ],
)
@three_ways
def test_app_mechanisms_not_set_are_unknown_mechanisms(
    external: bool, bearer: bool, unknown: list[str], mode: Mode
) -> None:
    lines = "".join(
        f"C: AUTH {name} $XO\nS: 504 5.5.4 Unrecognized authentication type\n"
        f"C: AUTH {name}\nS: 504 5.5.4 Unrecognized authentication type\n"
        for name in unknown
    )
    play(
        READY + "C: HELO client.test\nS: 250 proxy.test\n" + lines,
        mode,
        machine(external=external, bearer=bearer),
    )


@three_ways
def test_app_mechanisms_only_after_starttls(mode: Mode) -> None:
    play(
        STARTTLS_START
        + """
        C: EHLO client.test
        S: 250-proxy.test
        S: 250-PIPELINING
        S: 250-ENHANCEDSTATUSCODES
        S: 250 STARTTLS
        C: AUTH EXTERNAL =
        S: 530 5.7.0 Must issue a STARTTLS command first
        C: AUTH XOAUTH2 $XO
        S: 530 5.7.0 Must issue a STARTTLS command first
        C: AUTH OAUTHBEARER
        S: 530 5.7.0 Must issue a STARTTLS command first
        C: STARTTLS
        << start-tls client 220 2.0.0 Ready to start TLS
        >> tls client
        C: EHLO client.test
        """
        + APP_EHLO
        + """
        C: AUTH EXTERNAL =
        << request-external
        """
        + LOGGED_IN,
        mode,
        app_machine(ClientTls.STARTTLS),
    )


@pytest.mark.parametrize(
    ("initial", "authzid"),
    [("=", ""), (b64("shared@contoso.com"), "shared@contoso.com")],
)
@three_ways
def test_auth_external_with_initial_response(initial: str, authzid: str, mode: Mode) -> None:
    auth = play(
        APP_GREETED
        + f"""
        C: AUTH external {initial}
        << request-external {authzid}
        """
        + LOGGED_IN,
        mode,
        app_machine(),
    )
    assert auth.client_state is ClientState.AUTHENTICATED


@pytest.mark.parametrize(
    ("response", "authzid"),
    [("", ""), (b64("shared@contoso.com"), "shared@contoso.com")],
)
@three_ways
def test_auth_external_with_continuation(response: str, authzid: str, mode: Mode) -> None:
    play(
        APP_GREETED
        + f"""
        C: AUTH EXTERNAL
        S: 334$SP
        C: {response}
        << request-external {authzid}
        """
        + LOGGED_IN,
        mode,
        app_machine(),
    )


@three_ways
def test_auth_external_refused_without_a_challenge(mode: Mode) -> None:
    control = b64("bad\x00name")
    auth = play(
        APP_GREETED
        + f"""
        C: AUTH EXTERNAL =
        << request-external
        >> refused credentials
        S: 535 5.7.8 Authentication credentials invalid
        C: AUTH EXTERNAL {control}
        << note info login refused without asking for a token: authorization identity
        S: 535 5.7.8 Authentication credentials invalid
        C: AUTH EXTERNAL
        S: 334$SP
        C: *
        S: 501 5.0.0 Authentication cancelled
        C: AUTH EXTERNAL
        S: 334$SP
        C: =
        S: 501 5.5.2 Cannot decode base64 response
        C: AUTH EXTERNAL =
        << request-external
        >> refused unavailable
        S: 454 4.7.0 Temporary authentication failure
        """,
        mode,
        app_machine(max_auth_failures=4),
    )
    assert auth.client_state is ClientState.NOT_AUTHENTICATED


@pytest.mark.parametrize(
    ("mechanism", "message"), [("XOAUTH2", "$XO"), ("OAUTHBEARER", "$OB"), ("xoauth2", "$XO")]
)
@three_ways
def test_auth_bearer_with_initial_response(mechanism: str, message: str, mode: Mode) -> None:
    auth = play(
        APP_GREETED
        + f"""
        C: AUTH {mechanism} {message}
        << request-bearer alice@contoso.com $KEY
        """
        + LOGGED_IN,
        mode,
        app_machine(),
    )
    assert auth.client_state is ClientState.AUTHENTICATED
    assert auth.upstream_state is UpstreamState.AUTHENTICATED


@pytest.mark.parametrize(("mechanism", "message"), [("XOAUTH2", "$XO"), ("OAuthBearer", "$OB")])
@three_ways
def test_auth_bearer_with_continuation(mechanism: str, message: str, mode: Mode) -> None:
    play(
        APP_GREETED
        + f"""
        C: AUTH {mechanism}
        S: 334$SP
        C: {message}
        << request-bearer alice@contoso.com $KEY
        """
        + LOGGED_IN,
        mode,
        app_machine(),
    )


@pytest.mark.parametrize(
    ("mechanism", "message", "challenge", "answer"),
    [
        ("XOAUTH2", "$XO", "$XO_REFUSED", ""),
        ("OAUTHBEARER", "$OB", "$OB_REFUSED", "AQ=="),
        ("OAUTHBEARER", "$OB", "$OB_REFUSED", "*"),
    ],
)
@three_ways
def test_refused_app_key_gets_the_error_challenge(
    mechanism: str, message: str, challenge: str, answer: str, mode: Mode
) -> None:
    auth = play(
        APP_GREETED
        + f"""
        C: AUTH {mechanism} {message}
        << request-bearer alice@contoso.com $KEY
        >> refused credentials
        S: 334 {challenge}
        C: {answer}
        S: 535 5.7.8 Authentication credentials invalid
        C: AUTH {mechanism}
        S: 334$SP
        C: {message}
        << request-bearer alice@contoso.com $KEY
        """
        + LOGGED_IN,
        mode,
        app_machine(),
    )
    assert auth.client_state is ClientState.AUTHENTICATED


@three_ways
def test_error_challenge_waits_for_the_answer_and_then_parses_commands(mode: Mode) -> None:
    play(
        APP_GREETED
        + """
        C: AUTH XOAUTH2 $XO
        C: NOOP
        << request-bearer alice@contoso.com $KEY
        >> refused credentials
        S: 334 $XO_REFUSED
        S: 535 5.7.8 Authentication credentials invalid
        C: RSET
        S: 250 2.0.0 OK
        """,
        mode,
        app_machine(),
    )


@three_ways
def test_temporary_refusal_of_an_app_key_has_no_challenge(mode: Mode) -> None:
    play(
        APP_GREETED
        + """
        C: AUTH OAUTHBEARER $OB
        << request-bearer alice@contoso.com $KEY
        >> refused unavailable
        S: 454 4.7.0 Temporary authentication failure
        """,
        mode,
        app_machine(),
    )


MALFORMED_BEARER = [
    pytest.param("XOAUTH2", "=", "XOAUTH2: must end with two ^A", id="xoauth2-empty"),
    pytest.param(
        "XOAUTH2",
        b64(f"user=\x01auth=Bearer {APP_KEY}\x01\x01"),
        "XOAUTH2 user is empty",
        id="no-user",
    ),
    pytest.param(
        "XOAUTH2", b64("user=a@b\x01auth=Basic YTpi\x01\x01"), "XOAUTH2: auth must be", id="basic"
    ),
    pytest.param(
        "OAUTHBEARER",
        b64(f"n,a=a@b,\x01auth=Bearer {APP_KEY}\x01"),
        "OAUTHBEARER: must end with two ^A",
        id="one-control-a",
    ),
    pytest.param("OAUTHBEARER", "AQ==", "OAUTHBEARER: must end with two ^A", id="control-a"),
]


@pytest.mark.parametrize(("mechanism", "message", "why"), MALFORMED_BEARER)
@pytest.mark.parametrize("initial", [True, False], ids=["initial", "continuation"])
@three_ways
def test_malformed_bearer_message_gets_the_error_challenge(
    mechanism: str, message: str, why: str, initial: bool, mode: Mode
) -> None:
    challenge = "$XO_REFUSED" if mechanism == "XOAUTH2" else "$OB_REFUSED"
    command = (
        f"C: AUTH {mechanism} {message}"
        if initial
        else f"C: AUTH {mechanism}\nS: 334$SP\nC: {'' if message == '=' else message}"
    )
    auth = play(
        APP_GREETED
        + f"""
        {command}
        << note info login refused without asking for a token: {why}
        S: 334 {challenge}
        C:
        S: 535 5.7.8 Authentication credentials invalid
        """,
        mode,
        app_machine(),
    )
    assert auth.client_state is ClientState.NOT_AUTHENTICATED


@three_ways
def test_bearer_base64_errors_and_cancel_are_like_plain(mode: Mode) -> None:
    play(
        APP_GREETED
        + """
        C: AUTH XOAUTH2 !!!!
        S: 501 5.5.2 Cannot decode base64 response
        C: AUTH OAUTHBEARER
        S: 334$SP
        C: AQ
        S: 501 5.5.2 Cannot decode base64 response
        C: AUTH XOAUTH2
        S: 334$SP
        C: *
        S: 501 5.0.0 Authentication cancelled
        C: AUTH XOAUTH2 $XO extra
        S: 501 5.5.2 Syntax error
        """,
        mode,
        app_machine(),
    )


@three_ways
def test_bearer_failures_count_against_the_login_budget(mode: Mode) -> None:
    play(
        APP_GREETED
        + """
        C: AUTH XOAUTH2 $XO
        << request-bearer alice@contoso.com $KEY
        >> refused credentials
        S: 334 $XO_REFUSED
        C:
        S: 535 5.7.8 Authentication credentials invalid
        C: AUTH OAUTHBEARER =
        << note info login refused without asking for a token
        S: 334 $OB_REFUSED
        C: AQ==
        S: 535 5.7.8 Authentication credentials invalid
        << note info 2 failed logins: closing
        S: 421 4.7.0 Too many failed logins, closing connection
        << close too many failed logins
        """,
        mode,
        app_machine(max_auth_failures=2),
    )


@three_ways
def test_client_closing_during_the_error_challenge(mode: Mode) -> None:
    auth = play(
        APP_GREETED
        + """
        C: AUTH XOAUTH2 $XO
        << request-bearer alice@contoso.com $KEY
        >> refused credentials
        S: 334 $XO_REFUSED
        >> client-closed
        << close client closed
        """,
        mode,
        app_machine(),
    )
    assert auth.client_state is ClientState.CLOSED


@two_ways
def test_error_challenge_answer_is_bounded_like_any_line(mode: Mode) -> None:
    play(
        APP_GREETED
        + f"""
        C: AUTH XOAUTH2 $XO
        << request-bearer alice@contoso.com $KEY
        >> refused credentials
        S: 334 $XO_REFUSED
        C: {"x" * 300}
        !! client-error 500 5.5.6 Line too long
        """,
        mode,
        app_machine(max_line=200),
    )


# === EHLO and the upstream's extensions ====================================================


@three_ways
def test_ehlo_sent_at_once_is_held_until_the_upstream_list_is_known(mode: Mode) -> None:
    auth = play(
        START
        + """
        C: EHLO client.test
        C: AUTH PLAIN $PLAIN
        C: MAIL FROM:<alice@contoso.com>
        """
        + UPSTREAM_READY
        + OUR_EHLO
        + """
        << request-token alice secret
        >> token alice@contoso.com
        P: AUTH XOAUTH2
        U: 334$SP
        P: $XOAUTH2
        U: 235 2.7.0 Logged in.
        S: 235 2.7.0 Authentication successful
        << note info logged in
        << relay server=b"MAIL FROM:<alice@contoso.com>\\r\\n"
        """,
        mode,
    )
    assert auth.buffered == 0


def test_held_ehlo_state() -> None:
    auth = play(START + "C: EHLO client.test\n>> server-connected\nU: 220 hi\nP: EHLO proxy.test")
    assert auth.client_state is ClientState.HELD
    assert auth.upstream_state is UpstreamState.CAPABILITIES


@three_ways
def test_held_ehlo_gets_our_own_list_when_the_upstream_is_unavailable(mode: Mode) -> None:
    play(
        START
        + """
        C: EHLO client.test
        >> server-unavailable no route to host
        << note warning upstream is unavailable: no route to host; the next login will reconnect
        S: 250-proxy.test
        S: 250 AUTH PLAIN LOGIN
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        << note info reconnecting: the upstream is unavailable: no route to host
        << connect-upstream
        """
        + UPSTREAM_READY
        + LOGGED_IN,
        mode,
    )


@three_ways
def test_ehlo_uses_the_last_list_learned_while_the_upstream_is_away(mode: Mode) -> None:
    play(
        READY
        + """
        >> server-closed
        << note info upstream closed the connection; the next login will reconnect
        C: EHLO client.test
        """
        + OUR_EHLO,
        mode,
    )


@three_ways
def test_extensions_passed_on_and_withheld(mode: Mode) -> None:
    play(
        START
        + """
        >> server-connected
        U: 220-smtp.example.com ESMTP
        U: 220 multiline greeting
        P: EHLO proxy.test
        U: 250-smtp.example.com Hello [192.0.2.1]
        U: 250-size 35882577
        U: 250-8BITMIME
        U: 250-AUTH=LOGIN XOAUTH2
        U: 250-DSN
        U: 250-SMTPUTF8
        U: 250-BINARYMIME
        U: 250 CHUNKING
        C: ehlo client.test
        S: 250-proxy.test
        S: 250-AUTH PLAIN LOGIN
        S: 250-SIZE 35882577
        S: 250-8BITMIME
        S: 250-SMTPUTF8
        S: 250 CHUNKING
        """,
        mode,
    )


def test_smtp_extensions_helpers() -> None:
    parsed = SmtpExtensions.parse(
        [b"SIZE 1x", b"AUTH PLAIN xoauth2", b"AUTH=LOGIN", b"", b"pipelining", b"\xff"]
    )
    assert "PIPELINING" in parsed
    assert "pipelining" in parsed
    assert parsed.mechanisms == frozenset({"PLAIN", "XOAUTH2", "LOGIN"})
    assert parsed.passed_on() == (b"PIPELINING",)  # a SIZE that is not a number is dropped
    assert parsed.params("AUTH") == ("PLAIN", "xoauth2")
    assert parsed != SmtpExtensions.parse([b"SIZE 1x", b"AUTH PLAIN xoauth2"])
    assert hash(parsed) == hash(
        SmtpExtensions.parse(
            [b"SIZE 1x", b"AUTH PLAIN xoauth2", b"AUTH=LOGIN", b"pipelining", b"\xff"]
        )
    )
    assert repr(SmtpExtensions.parse([b"SIZE 10", b"8BITMIME"])) == "SmtpExtensions(SIZE 8BITMIME)"
    assert not SmtpExtensions()
    assert SmtpExtensions.parse([b"SIZE " + b"9" * 21]).passed_on() == ()
    assert SmtpExtensions.parse([b"SIZE 1 2"]).passed_on() == ()
    assert smtp_proxy_extensions(before_tls=True, upstream=parsed) == (
        b"PIPELINING",
        b"ENHANCEDSTATUSCODES",
        b"STARTTLS",
    )
    assert smtp_proxy_extensions(before_tls=False, upstream=SmtpExtensions()) == (
        b"AUTH PLAIN LOGIN",
    )


@three_ways
def test_helo_is_answered_and_auth_after_helo_is_accepted(mode: Mode) -> None:
    play(
        READY
        + """
        C: HELO scanner
        S: 250 proxy.test
        C: AUTH LOGIN $USER
        S: 334 UGFzc3dvcmQ6
        C: $PASS
        << request-token alice secret
        """
        + LOGGED_IN,
        mode,
    )


@three_ways
def test_helo_is_never_held(mode: Mode) -> None:
    play(
        START
        + """
        C: HELO scanner
        S: 250 proxy.test
        C: EHLO client.test
        """
        + UPSTREAM_READY
        + OUR_EHLO,
        mode,
    )


@three_ways
def test_auth_before_ehlo(mode: Mode) -> None:
    play(
        READY
        + """
        C: AUTH PLAIN $PLAIN
        S: 503 5.5.1 Send EHLO or HELO first
        C: EHLO
        S: 501 5.5.2 Syntax error
        C: HELO
        S: 501 5.5.2 Syntax error
        C: AUTH LOGIN
        S: 503 5.5.1 Send EHLO or HELO first
        """,
        mode,
    )


# === Other commands before login ===========================================================


@three_ways
def test_noop_rset_help_quit(mode: Mode) -> None:
    play(
        START
        + """
        C: NOOP
        S: 250 2.0.0 OK
        C: noop anything
        S: 250 2.0.0 OK
        C: RSET
        S: 250 2.0.0 OK
        C: HELP
        S: 214 2.0.0 Send EHLO, then AUTH with a mechanism it lists
        C: Quit
        S: 221 2.0.0 Bye
        << close client quit
        """,
        mode,
    )


@three_ways
def test_mail_commands_need_a_login(mode: Mode) -> None:
    play(
        GREETED
        + """
        C: MAIL FROM:<alice@contoso.com>
        S: 530 5.7.0 Authentication required
        C: RCPT TO:<bob@example.com>
        S: 530 5.7.0 Authentication required
        C: DATA
        S: 530 5.7.0 Authentication required
        C: BDAT 100 LAST
        S: 530 5.7.0 Authentication required
        C: VRFY bob
        S: 530 5.7.0 Authentication required
        """,
        mode,
    )


@three_ways
def test_unknown_commands_and_arguments_where_none_belong(mode: Mode) -> None:
    play(
        START
        + """
        C: FROB
        S: 500 5.5.2 Command not recognized
        C:
        S: 500 5.5.2 Command not recognized
        C: RSET now
        S: 501 5.5.2 Syntax error
        C: QUIT now
        S: 501 5.5.2 Syntax error
        C: STARTTLS
        S: 502 5.5.1 STARTTLS not available
        C: NOOP
        S: 250 2.0.0 OK
        """,
        mode,
    )


@three_ways
def test_bad_command_budget(mode: Mode) -> None:
    play(
        READY
        + """
        C: FROB
        S: 500 5.5.2 Command not recognized
        C: MAIL FROM:<a@b>
        S: 530 5.7.0 Authentication required
        C: EHLO x
        C: AUTH PLAIN
        C: *
        """
        + OUR_EHLO
        + """
        S: 334$SP
        S: 501 5.0.0 Authentication cancelled
        << note info client sent 3 invalid commands
        S: 421 4.7.0 Too many invalid commands, closing connection
        << close too many invalid commands
        """,
        mode,
        machine(max_bad_commands=3),
    )


@three_ways
def test_pipelined_commands_before_login_are_answered_in_order(mode: Mode) -> None:
    play(
        READY
        + """
        C: EHLO client.test
        C: NOOP
        C: AUTH PLAIN $PLAIN
        C: MAIL FROM:<a@b.example>
        C: RCPT TO:<c@d.example>
        C: DATA
        """
        + OUR_EHLO
        + """
        S: 250 2.0.0 OK
        << request-token alice secret
        >> token alice@contoso.com
        P: AUTH XOAUTH2
        U: 334$SP
        P: $XOAUTH2
        U: 235 2.7.0 Logged in.
        S: 235 2.7.0 Authentication successful
        << note info logged in
        << relay server=b"MAIL FROM:<a@b.example>\\r\\nRCPT TO:<c@d.example>\\r\\nDATA\\r\\n"
        """,
        mode,
    )


# === STARTTLS towards the client ===========================================================

STARTTLS_START = START + UPSTREAM_READY


@three_ways
def test_starttls_listener(mode: Mode) -> None:
    play(
        STARTTLS_START
        + """
        C: EHLO client.test
        S: 250-proxy.test
        S: 250-PIPELINING
        S: 250-ENHANCEDSTATUSCODES
        S: 250 STARTTLS
        C: AUTH PLAIN $PLAIN
        S: 530 5.7.0 Must issue a STARTTLS command first
        C: AUTH LOGIN
        S: 530 5.7.0 Must issue a STARTTLS command first
        C: MAIL FROM:<alice@contoso.com>
        S: 530 5.7.0 Must issue a STARTTLS command first
        C: HELO client.test
        S: 250 proxy.test
        C: NOOP
        S: 250 2.0.0 OK
        C: STARTTLS
        << start-tls client 220 2.0.0 Ready to start TLS
        >> tls client
        C: AUTH PLAIN $PLAIN
        S: 503 5.5.1 Send EHLO or HELO first
        C: STARTTLS
        S: 502 5.5.1 STARTTLS not available
        C: EHLO client.test
        """
        + OUR_EHLO
        + """
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        """
        + LOGGED_IN,
        mode,
        machine(ClientTls.STARTTLS),
    )


@three_ways
def test_starttls_without_ehlo_and_before_the_upstream_is_ready(mode: Mode) -> None:
    play(
        START
        + """
        C: STARTTLS
        << start-tls client 220 2.0.0 Ready to start TLS
        >> tls client
        C: EHLO client.test
        """
        + UPSTREAM_READY
        + OUR_EHLO,
        mode,
        machine(ClientTls.STARTTLS),
    )


@pytest.mark.parametrize("injected", ["EHLO evil", "x"])
def test_plaintext_pipelined_behind_starttls_is_refused(injected: str) -> None:
    # Whole only: the injected bytes must arrive with the STARTTLS line to be caught here
    # (later ones are caught by the driver or the next test).
    play(
        START
        + f"""
        C: STARTTLS
        C: {injected}
        !! client-error 421 4.5.0 Protocol error, closing connection
        """,
        Mode.WHOLE,
        machine(ClientTls.STARTTLS),
    )


@two_ways
def test_data_during_client_tls_negotiation_is_refused(mode: Mode) -> None:
    play(
        START
        + """
        C: STARTTLS
        << start-tls client 220 2.0.0 Ready to start TLS
        C: EHLO evil
        !! client-error
        """,
        mode,
        machine(ClientTls.STARTTLS),
    )


@three_ways
def test_plaintext_listener_offers_auth_at_once(mode: Mode) -> None:
    play(
        GREETED
        + """
        C: STARTTLS
        S: 502 5.5.1 STARTTLS not available
        """,
        mode,
        machine(ClientTls.NONE),
    )


# === Limits ================================================================================


@three_ways
def test_client_line_too_long(mode: Mode) -> None:
    play(
        START
        + f"""
        C: AUTH PLAIN {"x" * 60}
        !! client-error 500 5.5.6 Line too long
        """,
        mode,
        machine(max_line=64),
    )


@three_ways
def test_client_line_at_the_limit_is_fine(mode: Mode) -> None:
    line = "NOOP " + "x" * (64 - 2 - len("NOOP "))
    play(
        START
        + f"""
        C: {line}
        S: 250 2.0.0 OK
        """,
        mode,
        machine(max_line=64),
    )


@two_ways
def test_too_much_pipelined_behind_the_login(mode: Mode) -> None:
    play(
        GREETED
        + f"""
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        C: RCPT TO:<{"x" * 60}>
        C: RCPT TO:<{"x" * 60}>
        !! client-error 421 4.7.0 Too much data pipelined, closing connection
        """,
        mode,
        machine(max_line=100, max_literal=0),
    )


@two_ways
def test_too_much_pipelined_behind_a_held_ehlo(mode: Mode) -> None:
    play(
        START
        + f"""
        C: EHLO client.test
        C: NOOP {"x" * 60}
        C: NOOP {"x" * 60}
        !! client-error 421 4.7.0 Too much data pipelined, closing connection
        """,
        mode,
        machine(max_line=100, max_literal=0),
    )


def test_error_state_refuses_every_later_event() -> None:
    auth = play(
        START
        + f"""
        C: {"x" * 70}
        !! client-error 500 5.5.6 Line too long
        """,
        Mode.WHOLE,
        machine(max_line=64),
    )
    assert auth.client_state is ClientState.ERROR
    assert auth.upstream_state is UpstreamState.ERROR
    with pytest.raises(ClientProtocolError) as caught:
        auth.handle(ServerConnected())
    assert caught.value.reply_hint == replies.SMTP.line_too_long


@pytest.mark.parametrize(
    "at",
    [
        START,
        START + "C: EHLO client.test\n",
        GREETED,
        GREETED + "C: AUTH PLAIN $PLAIN\n<< request-token alice secret\n",
    ],
)
def test_client_closing_at_any_time_closes(at: str) -> None:
    auth = play(at + ">> client-closed\n<< close client closed the connection\n")
    assert auth.client_state is ClientState.CLOSED


def test_hostname_must_be_a_domain_or_address_literal() -> None:
    settings = AuthSettings(ClientTls.IMPLICIT, UpstreamTls.IMPLICIT)
    for good in ("localhost", "mail-1.example.com", "[192.0.2.1]", "[IPv6:2001:db8::1]"):
        SmtpAuth(settings, hostname=good)
    for bad in ("", "bad host", "x\r\nMAIL FROM:<a>", "-x.example", "a..b", "[]", "é.example"):
        with pytest.raises(ValueError, match="domain or address literal"):
            SmtpAuth(settings, hostname=bad)
    assert SmtpAuth(settings).start()[0] == SendToClient(
        b"220 localhost ESMTP xoauth2-proxy ready\r\n"
    )


# === Upstream: greeting, extensions and STARTTLS ===========================================

UPSTREAM_STARTTLS = (
    """
    >> server-connected
    U: 220 localhost Dovecot (Debian) ready.
    P: EHLO proxy.test
    U: 250-localhost
    U: 250-8BITMIME
    U: 250-AUTH XOAUTH2 OAUTHBEARER
    U: 250-BURL imap
    U: 250-CHUNKING
    U: 250-ENHANCEDSTATUSCODES
    U: 250-SIZE
    U: 250-STARTTLS
    U: 250 PIPELINING
    P: STARTTLS
    U: 220 2.0.0 Begin TLS negotiation now.
    << start-tls server
    >> tls server
    P: EHLO proxy.test
    """
    + DOVECOT_EHLO
)


@three_ways
def test_upstream_starttls(mode: Mode) -> None:
    play(
        START
        + UPSTREAM_STARTTLS
        + """
        C: EHLO client.test
        """
        + OUR_EHLO
        + """
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        """
        + LOGGED_IN,
        mode,
        machine(upstream_tls=UpstreamTls.STARTTLS),
    )


@three_ways
def test_both_sides_starttls_with_the_client_ahead(mode: Mode) -> None:
    play(
        START
        + """
        C: EHLO client.test
        S: 250-proxy.test
        S: 250-PIPELINING
        S: 250-ENHANCEDSTATUSCODES
        S: 250 STARTTLS
        C: STARTTLS
        << start-tls client 220 2.0.0 Ready to start TLS
        >> tls client
        C: EHLO client.test
        C: AUTH LOGIN
        """
        + UPSTREAM_STARTTLS
        + OUR_EHLO
        + """
        S: 334 VXNlcm5hbWU6
        C: $USER
        S: 334 UGFzc3dvcmQ6
        C: $PASS
        << request-token alice secret
        """
        + LOGGED_IN,
        mode,
        machine(ClientTls.STARTTLS, UpstreamTls.STARTTLS),
    )


def test_upstream_data_behind_its_starttls_220_is_refused() -> None:
    play(
        START
        + """
        >> server-connected
        U: 220 hi
        P: EHLO proxy.test
        U: 250-hi
        U: 250 STARTTLS
        P: STARTTLS
        U: 220 go
        U: 250 injected
        !! upstream-error 421 4.3.0 Service not available, closing connection
        """,
        Mode.WHOLE,
        machine(upstream_tls=UpstreamTls.STARTTLS),
    )


@two_ways
def test_upstream_data_during_tls_negotiation_is_refused(mode: Mode) -> None:
    play(
        START
        + """
        >> server-connected
        U: 220 hi
        P: EHLO proxy.test
        U: 250-hi
        U: 250 STARTTLS
        P: STARTTLS
        U: 220 go
        << start-tls server
        U: 250 injected
        !! upstream-error
        """,
        mode,
        machine(upstream_tls=UpstreamTls.STARTTLS),
    )


@three_ways
def test_upstream_without_starttls_is_unusable(mode: Mode) -> None:
    play(
        START
        + """
        >> server-connected
        U: 220 hi
        P: EHLO proxy.test
        U: 250-hi
        U: 250 AUTH XOAUTH2
        << note error upstream cannot be used: upstream_tls is starttls but the server does not
        U: 250 ignored
        C: EHLO client.test
        S: 250-proxy.test
        S: 250 AUTH PLAIN LOGIN
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        >> token alice@contoso.com
        << note warning login as 'alice': the upstream cannot be used
        S: 454 4.7.0 Temporary authentication failure
        >> server-closed
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        >> refused credentials
        S: 535 5.7.8 Authentication credentials invalid
        """,
        mode,
        machine(upstream_tls=UpstreamTls.STARTTLS),
    )


@three_ways
def test_upstream_refusing_starttls_is_unusable(mode: Mode) -> None:
    play(
        START
        + """
        >> server-connected
        U: 220 hi
        P: EHLO proxy.test
        U: 250-hi
        U: 250 STARTTLS
        P: STARTTLS
        U: 454 4.7.0 TLS not available due to temporary reason
        << note error upstream cannot be used: it refused STARTTLS: 454 4.7.0 TLS not available
        """,
        mode,
        machine(upstream_tls=UpstreamTls.STARTTLS),
    )


@three_ways
def test_upstream_without_xoauth2_is_unusable(mode: Mode) -> None:
    play(
        START
        + """
        C: EHLO client.test
        >> server-connected
        U: 220 hi
        P: EHLO proxy.test
        U: 250-hi
        U: 250-PIPELINING
        U: 250 AUTH PLAIN OAUTHBEARER
        << note error it does not offer AUTH XOAUTH2 (SASL mechanisms offered: OAUTHBEARER PLAIN)
        S: 250-proxy.test
        S: 250 AUTH PLAIN LOGIN
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        >> token alice@contoso.com
        << note warning does not offer AUTH XOAUTH2
        S: 454 4.7.0 Temporary authentication failure
        """,
        mode,
    )


@three_ways
def test_upstream_refusing_ehlo_is_unusable(mode: Mode) -> None:
    play(
        START
        + """
        >> server-connected
        U: 220 hi
        P: EHLO proxy.test
        U: 502 5.5.1 I only know HELO
        << note error upstream cannot be used: it refused EHLO: 502 5.5.1 I only know HELO
        """,
        mode,
    )


@three_ways
def test_upstream_554_greeting_is_quit_then_reconnected_at_login(mode: Mode) -> None:
    play(
        START
        + """
        >> server-connected
        U: 554 5.3.2 No SMTP service here
        P: QUIT
        << note warning upstream said 554 5.3.2 No SMTP service here; the next login will
        U: 221 2.0.0 Bye
        >> server-closed
        C: EHLO client.test
        S: 250-proxy.test
        S: 250 AUTH PLAIN LOGIN
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        << note info reconnecting: the upstream said 554 5.3.2 No SMTP service here
        << connect-upstream
        """
        + UPSTREAM_READY
        + LOGGED_IN,
        mode,
    )


@three_ways
def test_upstream_421_greeting(mode: Mode) -> None:
    play(
        START
        + """
        >> server-connected
        U: 421-4.7.0 Too many connections
        U: 421 4.7.0 Try again later
        << note warning upstream said 421 4.7.0 Too many connections / 4.7.0 Try again later
        >> server-closed
        """,
        mode,
    )


@pytest.mark.parametrize(
    "lines",
    [
        "U: 250 not a greeting",
        "U: 500 5.5.2 what",
        "U: * OK [CAPABILITY IMAP4rev1] wrong protocol",
        "U: 22O typo",
        "U: 220+x",
        "U: 120 too early",
        "U: 220-first\nU: 250 second",
    ],
)
@three_ways
def test_upstream_greeting_must_be_a_220_reply(lines: str, mode: Mode) -> None:
    play(
        START
        + f"""
        >> server-connected
        {lines}
        !! upstream-error 421 4.3.0 Service not available, closing connection
        """,
        mode,
    )


@three_ways
def test_upstream_reply_too_long(mode: Mode) -> None:
    play(
        START
        + """
        >> server-connected
        U: 220 hi
        P: EHLO proxy.test
        """
        + "U: 250-"
        + "x" * 60
        + "\n"
        + "U: 250-"
        + "x" * 60
        + "\n"
        + """
        !! upstream-error
        """,
        mode,
        machine(max_server_line=100),
    )


@three_ways
def test_upstream_reply_to_no_command_is_an_error(mode: Mode) -> None:
    play(
        READY
        + """
        U: 250 2.0.0 OK
        !! upstream-error
        """,
        mode,
    )


@three_ways
def test_upstream_421_while_the_client_typed_reconnects_at_login(mode: Mode) -> None:
    play(
        GREETED
        + """
        U: 421 4.4.2 localhost Disconnected for inactivity
        << note warning upstream said 421 4.4.2 localhost Disconnected for inactivity; the next
        >> server-closed
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        << note info reconnecting: the upstream said 421 4.4.2
        << connect-upstream
        """
        + UPSTREAM_READY
        + LOGGED_IN,
        mode,
    )


@three_ways
def test_reconnected_upstream_with_fewer_extensions_is_noted(mode: Mode) -> None:
    play(
        GREETED
        + """
        >> server-closed
        << note info upstream closed the connection
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        << note info reconnecting
        << connect-upstream
        >> server-connected
        U: 220 hi
        P: EHLO proxy.test
        U: 250-hi
        U: 250-SIZE
        U: 250 AUTH XOAUTH2
        << note warning no longer offers 8BITMIME CHUNKING ENHANCEDSTATUSCODES PIPELINING
        """
        + LOGGED_IN,
        mode,
    )


# === Upstream: the XOAUTH2 exchange ========================================================


@three_ways
def test_upstream_error_challenge_then_535(mode: Mode) -> None:
    play(
        GREETED
        + f"""
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        >> token alice@contoso.com
        P: AUTH XOAUTH2
        U: 334$SP
        P: $XOAUTH2
        U: 334 {ERROR_CHALLENGE}
        P:
        U: 535 5.7.8 Authentication failed.
        << note warning (error challenge: schemes=bearer, scope=mail, status=401)
        S: 535 5.7.8 Authentication credentials invalid
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        >> token alice@contoso.com
        P: AUTH XOAUTH2
        """,
        mode,
    )


def test_token_rejection_note_names_the_likely_causes() -> None:
    auth = play(
        GREETED
        + """
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        >> token alice@contoso.com
        P: AUTH XOAUTH2
        U: 334$SP
        P: $XOAUTH2
        """
    )
    actions = auth.handle(ServerDataReceived(b"535 5.7.139 SmtpClientAuthentication is off\r\n"))
    note = actions[0]
    assert isinstance(note, Note)
    for cause in ("SMTP.SendAsApp", "SmtpClientAuthenticationDisabled", "FullAccess", "SendAs"):
        assert cause in note.text
    assert actions[1:] == [SendToClient(replies.SMTP.auth_failed + b"\r\n")]


@pytest.mark.parametrize(
    ("provider", "named", "not_named"),
    [
        ("oauth2", "issuer, audience, scope", "Exchange"),
        ("google", "domain-wide delegation", "Exchange"),
    ],
)
def test_token_rejection_causes_speak_the_providers_language(
    provider: str, named: str, not_named: str
) -> None:
    auth = play(GREETED + "C: AUTH PLAIN $PLAIN\n<< request-token alice secret\n")
    auth.handle(TokenIssued(MAILBOX, TOKEN, provider=provider))
    auth.handle(ServerDataReceived(b"334 \r\n"))
    actions = auth.handle(ServerDataReceived(b"535 5.7.8 Authentication failed\r\n"))
    note = actions[0]
    assert isinstance(note, Note)
    assert named in note.text
    for word in (not_named, "SendAsApp", "service principal", "FullAccess"):
        assert word not in note.text
    assert actions[1:] == [SendToClient(replies.SMTP.auth_failed + b"\r\n")]


@three_ways
def test_upstream_temporary_failure_is_454(mode: Mode) -> None:
    play(
        GREETED
        + """
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        >> token alice@contoso.com
        P: AUTH XOAUTH2
        U: 334$SP
        P: $XOAUTH2
        U: 454 4.7.0 Temporary authentication failure
        << note warning upstream temporarily unavailable: 454 4.7.0
        S: 454 4.7.0 Temporary authentication failure
        """,
        mode,
    )


@three_ways
def test_upstream_syntax_error_after_the_token_is_not_a_password_problem(mode: Mode) -> None:
    play(
        GREETED
        + """
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        >> token alice@contoso.com
        P: AUTH XOAUTH2
        U: 334$SP
        P: $XOAUTH2
        U: 500 5.5.2 Line too long
        << note error refused the XOAUTH2 exchange itself: 500 5.5.2 Line too long
        S: 454 4.7.0 Temporary authentication failure
        """,
        mode,
    )


@pytest.mark.parametrize(
    "refusal", ["504 5.5.4 Unrecognized authentication type", "535 5.7.8 no", "454 4.7.0 later"]
)
@three_ways
def test_upstream_refusing_auth_before_the_token(refusal: str, mode: Mode) -> None:
    severity = "warning" if refusal.startswith("4") else "error"
    play(
        GREETED
        + f"""
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        >> token alice@contoso.com
        P: AUTH XOAUTH2
        U: {refusal}
        << note {severity} {refusal}
        S: 454 4.7.0 Temporary authentication failure
        """,
        mode,
    )


@pytest.mark.parametrize(
    ("before", "reply"),
    [
        ("", "235 2.7.0 welcome without a token"),
        ("", "250 2.0.0 OK"),
        ("U: 334$SP\nP: $XOAUTH2", "354 go ahead"),
        (f"U: 334$SP\nP: $XOAUTH2\nU: 334 {ERROR_CHALLENGE}\nP:", "334 again"),
    ],
)
@three_ways
def test_upstream_nonsense_during_the_exchange(before: str, reply: str, mode: Mode) -> None:
    play(
        GREETED
        + f"""
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        >> token alice@contoso.com
        P: AUTH XOAUTH2
        {before}
        U: {reply}
        !! upstream-error 421 4.3.0 Service not available, closing connection
        """,
        mode,
    )


@three_ways
def test_success_after_the_error_challenge_is_still_success(mode: Mode) -> None:
    play(
        GREETED
        + f"""
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        >> token alice@contoso.com
        P: AUTH XOAUTH2
        U: 334$SP
        P: $XOAUTH2
        U: 334 {ERROR_CHALLENGE}
        P:
        U: 235 2.7.0 Logged in.
        S: 235 2.7.0 Authentication successful
        << note info logged in
        << relay
        """,
        mode,
    )


@three_ways
def test_login_waits_for_the_upstream(mode: Mode) -> None:
    play(
        START
        + """
        C: HELO client.test
        S: 250 proxy.test
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        >> token alice@contoso.com
        """
        + UPSTREAM_READY
        + """
        P: AUTH XOAUTH2
        U: 334$SP
        P: $XOAUTH2
        U: 235 2.7.0 Logged in.
        S: 235 2.7.0 Authentication successful
        << note info logged in
        << relay
        """,
        mode,
    )


# === Upstream unavailable, and reconnecting ================================================


@three_ways
def test_upstream_unavailable_twice_fails_the_login_temporarily(mode: Mode) -> None:
    play(
        START
        + """
        >> server-unavailable no route
        << note warning upstream is unavailable: no route
        C: HELO client.test
        S: 250 proxy.test
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        << note info reconnecting
        << connect-upstream
        >> server-unavailable still no route
        >> token alice@contoso.com
        << note warning 'alice': the upstream is unavailable: still no route; answered 454
        S: 454 4.7.0 Temporary authentication failure
        """,
        mode,
    )


@pytest.mark.parametrize(
    ("loss", "why"),
    [
        (">> server-closed", "the upstream closed the connection during authentication"),
        ("U: 421 4.3.2 Shutting down", "the upstream said 421 4.3.2 Shutting down"),
    ],
)
@three_ways
def test_upstream_lost_during_authentication(loss: str, why: str, mode: Mode) -> None:
    play(
        GREETED
        + f"""
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        >> token alice@contoso.com
        P: AUTH XOAUTH2
        U: 334$SP
        P: $XOAUTH2
        {loss}
        << note warning login as 'alice': {why}
        S: 454 4.7.0 Temporary authentication failure
        """,
        mode,
    )


# === Token refusals and the login budget ===================================================


@three_ways
def test_token_refused(mode: Mode) -> None:
    auth = play(
        GREETED
        + """
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        >> refused credentials
        S: 535 5.7.8 Authentication credentials invalid
        C: AUTH LOGIN $USER
        S: 334 UGFzc3dvcmQ6
        C: $PASS
        << request-token alice secret
        >> refused unavailable
        S: 454 4.7.0 Temporary authentication failure
        """,
        mode,
    )
    assert auth.client_state is ClientState.NOT_AUTHENTICATED


@three_ways
def test_failed_login_then_pipelined_commands_are_parsed(mode: Mode) -> None:
    play(
        GREETED
        + """
        C: AUTH PLAIN $PLAIN
        C: MAIL FROM:<alice@contoso.com>
        C: QUIT
        << request-token alice secret
        >> refused credentials
        S: 535 5.7.8 Authentication credentials invalid
        S: 530 5.7.0 Authentication required
        S: 221 2.0.0 Bye
        << close client quit
        """,
        mode,
    )


@three_ways
def test_failed_login_budget(mode: Mode) -> None:
    play(
        GREETED
        + """
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        >> refused credentials
        S: 535 5.7.8 Authentication credentials invalid
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        >> token alice@contoso.com
        P: AUTH XOAUTH2
        U: 334$SP
        P: $XOAUTH2
        U: 535 5.7.8 Authentication failed.
        << note warning the upstream rejected the token
        S: 535 5.7.8 Authentication credentials invalid
        << note info 2 failed logins: closing
        S: 421 4.7.0 Too many failed logins, closing connection
        << close too many failed logins
        """,
        mode,
        machine(max_auth_failures=2),
    )


def test_refusal_bytes_are_the_same_for_every_credential_problem() -> None:
    answers = []
    for login in (b64("\0alice\0wrong"), b64("\0nobody\0secret")):
        auth = machine()
        auth.start()
        auth.handle(ClientDataReceived(f"HELO x\r\nAUTH PLAIN {login}\r\n".encode()))
        answers.append(auth.handle(TokenRefused(Refusal.CREDENTIALS)))
    assert answers[0] == answers[1] == [SendToClient(replies.SMTP.auth_failed + b"\r\n")]


# === Driver contract, secrets, tables ======================================================


@pytest.mark.parametrize(
    ("setup", "event"),
    [
        ("", TokenIssued(MAILBOX, TOKEN)),
        ("", TokenRefused(Refusal.UNAVAILABLE)),
        ("C: AUTH PLAIN", TokenIssued(MAILBOX, TOKEN)),
        ("", TlsEstablished(Side.CLIENT)),
        ("", TlsEstablished(Side.SERVER)),
        ("", ServerConnected()),
        ("", ServerUnavailable("late")),
        (">> server-closed", ServerDataReceived(b"220 hi\r\n")),
        (">> server-closed", ServerClosed()),
    ],
)
def test_events_the_driver_must_not_send_are_bugs(setup: str, event: Event) -> None:
    auth = machine()
    _all_actions(GREETED + setup, auth)
    with pytest.raises(RuntimeError):
        auth.handle(event)


def test_start_twice_and_handle_before_start_are_bugs() -> None:
    auth = machine()
    with pytest.raises(RuntimeError):
        auth.handle(ServerConnected())
    auth.start()
    with pytest.raises(RuntimeError):
        auth.start()


def test_handle_after_the_relay_began_is_a_bug() -> None:
    auth = play(GREETED + "C: AUTH PLAIN $PLAIN\n<< request-token alice secret\n" + LOGGED_IN)
    with pytest.raises(RuntimeError):
        auth.handle(ClientDataReceived(b"x"))


def _all_actions(text: str, auth: SmtpAuth) -> tuple[list[Action], list[str]]:
    actions: list[Action] = []
    reprs: list[str] = []
    for step in transcript(text, **VARS):
        if isinstance(step, Feed):
            try:
                actions += auth.start() if step.event is None else auth.handle(step.event)
            except ProxyError as exc:
                reprs.append(str(exc))
            reprs.append(repr(auth))
    return actions, reprs


SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    "login",
    [
        "C: AUTH PLAIN " + b64(f"\0alice\0{SECRET}"),
        "C: AUTH PLAIN\nC: " + b64(f"\0alice\0{SECRET}"),
        "C: AUTH LOGIN\nC: $USER\nC: " + b64(SECRET),
        "C: AUTH LOGIN $USER\nC: " + b64(SECRET),
    ],
)
@pytest.mark.parametrize(
    "outcome",
    [
        "U: 235 2.7.0 Logged in.",
        f"U: 334 {ERROR_CHALLENGE}\nU: 535 5.7.8 no\n>> client-closed",
        "U: 535 5.7.8 no\nU: 421 bye\n>> client-closed",
        f"U: 334 {ERROR_CHALLENGE}\nU: x\n",
    ],
)
def test_secrets_only_in_the_token_request_and_the_xoauth2_line(login: str, outcome: str) -> None:
    text = GREETED + f"{login}\n>> token alice@contoso.com\nU: 334$SP\nP: $XOAUTH2\n{outcome}"
    actions, reprs = _all_actions(text, machine())
    token_b64 = VARS["XOAUTH2"]
    secrets = [SECRET, b64(SECRET), TOKEN.value, token_b64, b64(f"\0alice\0{SECRET}")]
    token_lines = 0
    for action in actions:
        if isinstance(action, RequestToken):
            assert isinstance(action.credentials, Credentials)
            assert action.credentials.password == SECRET
            assert SECRET not in repr(action)
            continue
        if isinstance(action, SendToServer) and token_b64.encode() in action.data:
            assert re.fullmatch(token_b64.encode() + rb"\r\n", action.data)
            token_lines += 1
            continue
        shown = repr(action) + (action.text if isinstance(action, Note) else "")
        data = getattr(action, "data", b"") + getattr(action, "to_server", b"")
        for secret in secrets:
            assert secret not in shown
            assert secret.encode() not in data
    assert token_lines == 1
    assert len(reprs) >= 7
    for text_seen in reprs:
        for secret in secrets:
            assert secret not in text_seen


APP_LOGINS = [
    pytest.param("C: AUTH XOAUTH2 $XO", id="xoauth2"),
    pytest.param("C: AUTH XOAUTH2\nC: $XO", id="xoauth2-continued"),
    pytest.param("C: AUTH OAUTHBEARER $OB", id="oauthbearer"),
    pytest.param("C: AUTH OAUTHBEARER\nC: $OB", id="oauthbearer-continued"),
]
APP_OUTCOMES = [
    pytest.param(">> token alice@contoso.com\nU: 334$SP\nU: 235 2.7.0 Logged in.", id="ok"),
    pytest.param(
        ">> token alice@contoso.com\nU: 334$SP\n"
        f"U: 334 {ERROR_CHALLENGE}\nU: 535 5.7.8 no\n>> client-closed",
        id="upstream-challenge",
    ),
    pytest.param(">> refused credentials\nC: AQ==\nC: NOOP", id="refused"),
    pytest.param(">> refused unavailable\nC: NOOP", id="unavailable"),
]


@pytest.mark.parametrize("login", APP_LOGINS)
@pytest.mark.parametrize("outcome", APP_OUTCOMES)
def test_app_key_only_in_the_token_request(login: str, outcome: str) -> None:
    actions, reprs = _all_actions(APP_GREETED + f"{login}\n{outcome}\n", app_machine())
    check_app_key_hidden(actions, reprs, upstream_login=outcome.startswith(">> token"))


@pytest.mark.parametrize(
    "message",
    [
        b64(f"user=\x01auth=Bearer {APP_KEY}\x01\x01"),  # no user
        b64(f"user=a@b\x01auth=Bearer {APP_KEY}\x01"),  # one ^A at the end
        b64(f"user=a@b\x01auth=Bearer {APP_KEY}\x1b\x01\x01"),  # a control character
        b64(f"user=a@b\x01auth=Token {APP_KEY}\x01\x01"),  # not Bearer
    ],
)
def test_app_key_in_a_malformed_message_is_not_shown(message: str) -> None:
    actions, reprs = _all_actions(APP_GREETED + f"C: AUTH XOAUTH2 {message}\nC:\n", app_machine())
    sent = b"".join(action.data for action in actions if isinstance(action, SendToClient))
    assert sent.endswith(b"\r\n" + replies.SMTP.auth_failed + b"\r\n")
    check_app_key_hidden(actions, reprs, upstream_login=False, sent=(message,))


def check_app_key_hidden(
    actions: list[Action], reprs: list[str], *, upstream_login: bool, sent: Sequence[str] = ()
) -> None:
    """The app key (raw, and in what the client sent) is only in the token request; the
    real token only in the one XOAUTH2 line upstream."""
    token_b64 = VARS["XOAUTH2"]
    secrets = [APP_KEY, b64(APP_KEY), VARS["XO"], VARS["OB"], TOKEN.value, token_b64, *sent]
    token_lines = 0
    for action in actions:
        if isinstance(action, RequestToken):
            assert isinstance(action.credentials, BearerCredentials)
            assert action.credentials.key == APP_KEY
            assert APP_KEY not in repr(action)
            continue
        if isinstance(action, SendToServer) and token_b64.encode() in action.data:
            assert action.data == token_b64.encode() + b"\r\n"
            token_lines += 1
            continue
        shown = repr(action) + (action.text if isinstance(action, Note) else "")
        data = getattr(action, "data", b"") + getattr(action, "to_server", b"")
        for secret in secrets:
            assert secret not in shown
            assert secret.encode() not in data
    assert token_lines == int(upstream_login)
    for text_seen in reprs:
        for secret in secrets:
            assert secret not in text_seen


def test_the_token_never_goes_on_the_auth_line() -> None:
    actions, _ = _all_actions(
        GREETED + "C: AUTH PLAIN $PLAIN\n>> token alice@contoso.com\n", machine()
    )
    assert actions[-1] == SendToServer(b"AUTH XOAUTH2\r\n")


def test_relay_tail_keeps_everything_pipelined_behind_auth() -> None:
    auth = machine()
    _all_actions(READY, auth)
    auth.handle(ClientDataReceived(b"EHLO c\r\nAUTH PLAIN " + VARS["PLAIN"].encode() + b"\r\nAUTH"))
    auth.handle(ClientDataReceived(b" PLAIN again\r\nDATA\r\n"))
    auth.handle(TokenIssued(MAILBOX, TOKEN))
    auth.handle(ServerDataReceived(b"334 \r\n"))
    actions = auth.handle(ServerDataReceived(b"235 ok\r\n250 early\r\n"))
    relay = actions[-1]
    assert relay == BeginRelay(
        to_server=b"AUTH PLAIN again\r\nDATA\r\n", to_client=b"250 early\r\n"
    )


def _check_table(
    table: TransitionTable[StateT, InputT],
    states: set[StateT],
    initial: set[StateT],
    terminal: set[StateT],
) -> None:
    reachable = set(initial)
    frontier = list(initial)
    while frontier:
        state = frontier.pop()
        for source, _, target in table.edges():
            if source is state and target not in reachable:
                reachable.add(target)
                frontier.append(target)
    assert reachable == states
    for state in states:
        assert bool(table.allowed(state)) is (state not in terminal), state


def test_transition_tables_are_complete_and_drawable() -> None:
    _check_table(
        CLIENT_TRANSITIONS,
        set(CLIENT_TRANSITIONS.states()),
        {ClientState.PLAINTEXT, ClientState.CONNECTED},
        {ClientState.AUTHENTICATED, ClientState.CLOSED, ClientState.ERROR},
    )
    _check_table(
        UPSTREAM_TRANSITIONS,
        set(UPSTREAM_TRANSITIONS.states()),
        {UpstreamState.DOWN},
        {UpstreamState.AUTHENTICATED, UpstreamState.ERROR},
    )
    assert CLIENT_TRANSITIONS.next_state(ClientState.TLS_NEGOTIATION, ClientInput.DATA) is None
    assert CLIENT_TRANSITIONS.next_state(ClientState.CONNECTED, ClientInput.AUTH_SASL) is None
    assert UPSTREAM_TRANSITIONS.next_state(UpstreamState.AUTH_SENT, UpstreamInput.ACCEPTED) is None
    dot = state_diagrams()
    assert dot.count("digraph") == 2
    for state in (*CLIENT_TRANSITIONS.states(), *UPSTREAM_TRANSITIONS.states()):
        assert f'"{state.name}"' in dot
    assert '"PLAINTEXT" -> "TLS_NEGOTIATION" [label="starttls"];' in dot
