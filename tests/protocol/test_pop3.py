"""Transcript tests for Pop3Auth: both peers, every login form, every failure path.

The upstream lines are Dovecot 2.3.19's, recorded from the test rig (tests/support/dovecot.py):
greeting, CAPA before and after TLS, ``+ `` for AUTH XOAUTH2, its error challenge and the
final ``-ERR [AUTH] Authentication failed.`` or ``+OK Logged in.``.
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
from proxy.protocol.capabilities import Pop3Capabilities, pop3_proxy_capabilities
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
from proxy.protocol.pop3 import (
    CLIENT_TRANSITIONS,
    UPSTREAM_TRANSITIONS,
    Pop3Auth,
    state_diagrams,
)
from proxy.protocol.sasl import BearerCredentials, Credentials, xoauth2_response
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

#: What Mode.TRAILING appends: pipelined POP3 commands, and bytes behind the upstream's +OK.
POP3_TRAILERS = Trailers(client=b"STAT\r\nRETR 1", partial=b"RETR 1", server=b"+OK 1 120\r\n+OK")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


#: An app key, as ``xoauth2-proxy app-key`` makes them.
APP_KEY = "xo2k_c2VjcmV0LWFwcC1rZXktZm9yLXRyYW5zY3JpcHRz"
VARS = {
    "XOAUTH2": xoauth2_response(MAILBOX, TOKEN.value).decode(),
    "PLAIN": b64("\0alice\0secret"),
    "ALICE": b64("alice"),
    "SECRET": b64("secret"),
    "KEY": APP_KEY,
    # What clients that speak OAuth send, with our app key as their token.
    "XO": b64(f"user={MAILBOX}\x01auth=Bearer {APP_KEY}\x01\x01"),
    "OB": b64(f"n,a={MAILBOX},\x01host=proxy.test\x01port=995\x01auth=Bearer {APP_KEY}\x01\x01"),
    # Our error challenges, exactly: {"status":"401","schemes":"bearer"} for XOAUTH2,
    # {"status":"invalid_token"} for OAUTHBEARER (RFC 7628 section 3.2.2).
    "XO_REFUSED": "eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIn0=",
    "OB_REFUSED": "eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=",
}


def machine(
    client_tls: ClientTls = ClientTls.IMPLICIT,
    upstream_tls: UpstreamTls = UpstreamTls.IMPLICIT,
    *,
    external: bool = False,
    bearer: bool = False,
    **limits: int,
) -> Pop3Auth:
    return Pop3Auth(
        AuthSettings(client_tls, upstream_tls, sasl_external=external, sasl_bearer=bearer, **limits)
    )


def play(text: str, mode: Mode = Mode.WHOLE, auth: Pop3Auth | None = None) -> Pop3Auth:
    auth = auth or machine()
    run(auth, transcript(text, **VARS), mode, VARS, POP3_TRAILERS)
    return auth


def steps(text: str) -> list[Step]:
    return transcript(text, **VARS)


START = """
    >> start
    S: +OK xoauth2-proxy ready.
    << connect-upstream
"""
#: Dovecot's answers on an implicit-TLS (pop3s) port.
UPSTREAM_READY = """
    >> server-connected
    U: +OK Dovecot (Debian) ready.
    P: CAPA
    U: +OK
    U: CAPA
    U: TOP
    U: UIDL
    U: RESP-CODES
    U: PIPELINING
    U: AUTH-RESP-CODE
    U: USER
    U: SASL XOAUTH2 OAUTHBEARER
    U: .
"""
READY = START + UPSTREAM_READY
LOGGED_IN = """
    >> token alice@contoso.com
    P: AUTH XOAUTH2
    U: +$SP
    P: $XOAUTH2
    U: +OK Logged in.
    S: +OK Logged in.
    << note info logged in to the upstream as 'alice@contoso.com'
    << relay
"""
USER_PASS = """
    C: USER alice
    S: +OK Send PASS.
    C: PASS secret
    << request-token alice secret
"""
OUR_CAPA = """
    S: +OK Capability list follows.
    S: USER
    S: SASL PLAIN LOGIN
    S: RESP-CODES
    S: AUTH-RESP-CODE
"""
#: Dovecot's error challenge for a token it refuses.
ERROR_CHALLENGE = "eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0="


# === USER and PASS =========================================================================


@three_ways
def test_user_pass(mode: Mode) -> None:
    auth = play(READY + USER_PASS + LOGGED_IN, mode)
    assert auth.client_state is ClientState.AUTHENTICATED
    assert auth.upstream_state is UpstreamState.AUTHENTICATED
    assert auth.buffered == 0


@three_ways
def test_pass_takes_the_rest_of_the_line(mode: Mode) -> None:
    play(
        READY
        + """
        C: user alice
        S: +OK Send PASS.
        C: pass  c0rrect "horse" battery$SP
        << request-token alice ' c0rrect "horse" battery '
        """
        + LOGGED_IN,
        mode,
    )


@three_ways
def test_user_and_pass_accept_utf8(mode: Mode) -> None:
    play(
        READY
        + """
        C: USER jörg@contoso.com
        S: +OK Send PASS.
        C: PASS pässwörd
        << request-token jörg@contoso.com pässwörd
        """,
        mode,
    )


@three_ways
def test_a_second_user_replaces_the_first(mode: Mode) -> None:
    play(
        READY
        + """
        C: USER bob
        S: +OK Send PASS.
        C: USER alice
        S: +OK Send PASS.
        C: PASS secret
        << request-token alice secret
        """,
        mode,
    )


@three_ways
def test_capa_between_user_and_pass_keeps_the_name(mode: Mode) -> None:
    play(
        START
        + """
        C: USER alice
        S: +OK Send PASS.
        C: CAPA
        """
        + OUR_CAPA
        + """
        S: .
        C: PASS secret
        << request-token alice secret
        """,
        mode,
    )


@three_ways
def test_pass_needs_user_right_before_it(mode: Mode) -> None:
    auth = play(
        START
        + """
        C: PASS secret
        S: -ERR No user name given; send USER first.
        C: USER alice
        S: +OK Send PASS.
        C: STAT
        S: -ERR Please log in first.
        C: PASS secret
        S: -ERR No user name given; send USER first.
        C: USER alice
        S: +OK Send PASS.
        C: PASS
        S: -ERR Syntax error.
        C: PASS secret
        S: -ERR No user name given; send USER first.
        """,
        mode,
    )
    assert auth.client_state is ClientState.NOT_AUTHENTICATED


@three_ways
def test_user_needs_an_argument(mode: Mode) -> None:
    play(
        START
        + """
        C: USER
        S: -ERR Syntax error.
        """,
        mode,
    )


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"USER alice\r\nPASS \xff\xfe\r\n", "password is not UTF-8"),
        (b"USER al\x01ice\r\nPASS secret\r\n", "user name contains control characters"),
        (b"USER \r\nPASS secret\r\n", "user name is empty"),
    ],
)
@three_ways
def test_impossible_credentials_fail_like_a_wrong_password(
    raw: bytes, why: str, mode: Mode
) -> None:
    run(
        machine(),
        [
            *steps(READY),
            Feed(ClientDataReceived(raw)),
            *steps(f"""
                S: +OK Send PASS.
                << note info login refused without asking for a token: {why}
                S: -ERR [AUTH] Authentication failed.
            """),
        ],
        mode,
        trailers=POP3_TRAILERS,
    )


# === AUTH PLAIN and AUTH LOGIN =============================================================


@three_ways
def test_auth_plain_with_initial_response(mode: Mode) -> None:
    play(
        READY
        + """
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        """
        + LOGGED_IN,
        mode,
    )


@three_ways
def test_auth_plain_with_continuation(mode: Mode) -> None:
    play(
        READY
        + """
        C: auth plain
        S: +$SP
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
        READY
        + f"""
        C: AUTH PLAIN {plain}
        << request-token alice secret shared@contoso.com
        """,
        mode,
    )


@three_ways
def test_auth_plain_empty_initial_response_is_not_plain(mode: Mode) -> None:
    play(
        READY
        + """
        C: AUTH PLAIN =
        S: -ERR Invalid SASL PLAIN message.
        C: AUTH PLAIN
        S: +$SP
        C:
        S: -ERR Invalid SASL PLAIN message.
        """,
        mode,
    )


@three_ways
def test_auth_plain_malformed_message(mode: Mode) -> None:
    two_fields = b64("alice\0secret")
    play(
        READY
        + f"""
        C: AUTH PLAIN {two_fields}
        S: -ERR Invalid SASL PLAIN message.
        """,
        mode,
    )


@three_ways
def test_auth_login_with_continuations(mode: Mode) -> None:
    play(
        READY
        + """
        C: AUTH LOGIN
        S: + VXNlcm5hbWU6
        C: $ALICE
        S: + UGFzc3dvcmQ6
        C: $SECRET
        << request-token alice secret
        """
        + LOGGED_IN,
        mode,
    )


@three_ways
def test_auth_login_with_the_user_name_as_initial_response(mode: Mode) -> None:
    play(
        READY
        + """
        C: AUTH LOGIN $ALICE
        S: + UGFzc3dvcmQ6
        C: $SECRET
        << request-token alice secret
        """
        + LOGGED_IN,
        mode,
    )


@three_ways
def test_auth_login_password_with_spaces_and_utf8(mode: Mode) -> None:
    password = b64("pä ss wörd")
    play(
        READY
        + f"""
        C: AUTH LOGIN $ALICE
        S: + UGFzc3dvcmQ6
        C: {password}
        << request-token alice 'pä ss wörd'
        """,
        mode,
    )


@three_ways
def test_auth_cancelled_at_every_step(mode: Mode) -> None:
    auth = play(
        READY
        + """
        C: AUTH PLAIN
        S: +$SP
        C: *
        S: -ERR Authentication cancelled.
        C: AUTH LOGIN
        S: + VXNlcm5hbWU6
        C: *
        S: -ERR Authentication cancelled.
        C: AUTH LOGIN $ALICE
        S: + UGFzc3dvcmQ6
        C: *
        S: -ERR Authentication cancelled.
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        """,
        mode,
    )
    assert auth.client_state is ClientState.AWAITING_TOKEN


@pytest.mark.parametrize("bad", ["AGFsaWNlAHNlY3JldA", "AGFsaWNlAHNl Y3JldA==", "!!!!", "="])
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@three_ways
def test_continuations_need_strict_base64(bad: str, mechanism: str, mode: Mode) -> None:
    prompt = "+$SP" if mechanism == "PLAIN" else "+ VXNlcm5hbWU6"
    play(
        READY
        + f"""
        C: AUTH {mechanism}
        S: {prompt}
        C: {bad}
        S: -ERR Invalid base64 in SASL response.
        """,
        mode,
    )


@three_ways
def test_login_password_needs_strict_base64(mode: Mode) -> None:
    auth = play(
        READY
        + """
        C: AUTH LOGIN $ALICE
        S: + UGFzc3dvcmQ6
        C: c2VjcmV
        S: -ERR Invalid base64 in SASL response.
        """,
        mode,
    )
    assert auth.client_state is ClientState.NOT_AUTHENTICATED


@pytest.mark.parametrize("bad", ["AGFsaWNlAHNlY3JldA", "!!!!", "AGFsaWNl\tAHNlY3JldA=="])
@three_ways
def test_initial_responses_need_strict_base64(bad: str, mode: Mode) -> None:
    play(
        READY
        + f"""
        C: AUTH PLAIN {bad}
        S: -ERR Invalid base64 in SASL response.
        C: AUTH LOGIN {bad}
        S: -ERR Invalid base64 in SASL response.
        """,
        mode,
    )


@pytest.mark.parametrize(
    ("lines", "why"),
    [
        ("C: AUTH LOGIN =", "user name is empty"),
        ("C: AUTH LOGIN\nS: + VXNlcm5hbWU6\nC:", "user name is empty"),
        ("C: AUTH LOGIN " + b64("al\x7fice"), "user name contains control characters"),
        (
            "C: AUTH LOGIN $ALICE\nS: + UGFzc3dvcmQ6\nC: " + b64("se\ncret"),
            "password contains control characters",
        ),
        ("C: AUTH PLAIN " + b64("\0\0secret"), "PLAIN authentication identity is empty"),
    ],
)
@three_ways
def test_impossible_sasl_credentials_fail_like_a_wrong_password(
    lines: str, why: str, mode: Mode
) -> None:
    play(
        READY
        + f"""
        {lines}
        << note info login refused without asking for a token: {why}
        S: -ERR [AUTH] Authentication failed.
        """,
        mode,
    )


@three_ways
def test_auth_other_mechanisms_and_syntax(mode: Mode) -> None:
    play(
        READY
        + """
        C: AUTH XOAUTH2 dG9rZW4=
        S: -ERR Unsupported authentication mechanism.
        C: AUTH CRAM-MD5
        S: -ERR Unsupported authentication mechanism.
        C: AUTH PLAIN a b
        S: -ERR Syntax error.
        C: AUTH PLAIN$SP
        S: -ERR Syntax error.
        C: AUTH$SP
        S: -ERR Syntax error.
        """,
        mode,
    )


@three_ways
def test_auth_without_arguments_lists_the_mechanisms(mode: Mode) -> None:
    play(
        START
        + """
        C: AUTH
        S: +OK Mechanisms follow.
        S: PLAIN
        S: LOGIN
        S: .
        """,
        mode,
    )


# === Other commands before login ===========================================================


@three_ways
def test_capa_before_the_upstream_is_known(mode: Mode) -> None:
    play(
        START
        + """
        C: CAPA
        """
        + OUR_CAPA
        + """
        S: .
        """,
        mode,
    )


@three_ways
def test_capa_passes_on_the_upstreams_transaction_capabilities(mode: Mode) -> None:
    play(
        START
        + """
        >> server-connected
        U: +OK ready
        P: CAPA
        U: +OK List follows
        U: TOP
        U: USER
        U: SASL PLAIN XOAUTH2
        U: RESP-CODES
        U: EXPIRE 30 USER
        U: LOGIN-DELAY 900
        U: IMPLEMENTATION Shlemazle-Plotz-v302
        U: UIDL
        U: X-SECRET-FEATURE
        U: STLS
        U: UTF8 USER
        U: .
        C: capa
        """
        + OUR_CAPA
        + """
        S: TOP
        S: EXPIRE 30 USER
        S: LOGIN-DELAY 900
        S: UIDL
        S: .
        """,
        mode,
    )


@three_ways
def test_capa_with_pipelining_upstream(mode: Mode) -> None:
    play(
        READY
        + """
        C: CAPA
        """
        + OUR_CAPA
        + """
        S: TOP
        S: UIDL
        S: PIPELINING
        S: .
        """,
        mode,
    )


@three_ways
def test_quit(mode: Mode) -> None:
    auth = play(
        START
        + """
        C: QUIT
        S: +OK Logging out.
        << close client logged out
        """,
        mode,
    )
    assert auth.client_state is ClientState.CLOSED


@three_ways
def test_commands_that_need_a_login_or_do_not_exist(mode: Mode) -> None:
    play(
        START
        + """
        C: STAT
        S: -ERR Please log in first.
        C: retr 1
        S: -ERR Please log in first.
        C: NOOP
        S: -ERR Please log in first.
        C: APOP alice c4c9334bac560ecc979e58001b3e22fb
        S: -ERR Unknown command.
        C: FROB
        S: -ERR Unknown command.
        C:
        S: -ERR Unknown command.
        C: CAPA now
        S: -ERR Syntax error.
        C: QUIT now
        S: -ERR Syntax error.
        C: STLS
        S: -ERR STLS is not available here.
        """,
        mode,
        machine(max_bad_commands=20),
    )


@three_ways
def test_bad_command_budget(mode: Mode) -> None:
    play(
        START
        + """
        C: FROB
        S: -ERR Unknown command.
        C: STAT
        S: -ERR Please log in first.
        C: AUTH PLAIN
        S: +$SP
        C: *
        S: -ERR Authentication cancelled.
        << note info client sent 3 invalid commands
        S: -ERR Too many invalid commands.
        << close too many invalid commands
        """,
        mode,
        machine(max_bad_commands=3),
    )


@three_ways
def test_pipelined_commands_before_login_are_all_answered(mode: Mode) -> None:
    play(
        READY
        + """
        C: CAPA
        C: USER alice
        C: PASS secret
        C: STAT
        """
        + OUR_CAPA
        + """
        S: TOP
        S: UIDL
        S: PIPELINING
        S: .
        S: +OK Send PASS.
        << request-token alice secret
        >> token alice@contoso.com
        P: AUTH XOAUTH2
        U: +$SP
        P: $XOAUTH2
        U: +OK Logged in.
        S: +OK Logged in.
        << note info logged in
        << relay server=b"STAT\\r\\n"
        """,
        mode,
    )


@three_ways
def test_pipelined_tails_go_to_the_relay_unparsed(mode: Mode) -> None:
    play(
        READY
        + """
        C: USER alice
        C: PASS secret
        C: STAT
        S: +OK Send PASS.
        << request-token alice secret
        C: RETR 1
        C: QUIT
        >> token alice@contoso.com
        P: AUTH XOAUTH2
        U: +$SP
        P: $XOAUTH2
        U: +OK [SOME-CODE] Logged in, 2 messages.
        U: +OK 2 320
        S: +OK [SOME-CODE] Logged in, 2 messages.
        << note info logged in
        << relay server=b"STAT\\r\\nRETR 1\\r\\nQUIT\\r\\n" client=b"+OK 2 320\\r\\n"
        """,
        mode,
    )


# === STLS towards the client ===============================================================

STARTTLS_START = """
    >> start
    S: +OK xoauth2-proxy ready.
    << connect-upstream
"""


@three_ways
def test_starttls_listener_refuses_logins_before_tls(mode: Mode) -> None:
    play(
        STARTTLS_START
        + UPSTREAM_READY
        + f"""
        C: CAPA
        S: +OK Capability list follows.
        S: STLS
        S: RESP-CODES
        S: AUTH-RESP-CODE
        S: TOP
        S: UIDL
        S: PIPELINING
        S: .
        C: AUTH
        S: +OK Mechanisms follow.
        S: .
        C: USER alice
        S: -ERR Plaintext login disallowed; use STLS first.
        C: PASS secret
        S: -ERR Plaintext login disallowed; use STLS first.
        C: AUTH PLAIN $PLAIN
        S: -ERR Plaintext login disallowed; use STLS first.
        C: AUTH LOGIN
        S: -ERR Plaintext login disallowed; use STLS first.
        C: STAT
        S: -ERR Please log in first.
        C: STLS
        << start-tls client {replies.POP3_BEGIN_TLS.decode()}
        >> tls client
        C: CAPA
        """
        + OUR_CAPA
        + """
        S: TOP
        S: UIDL
        S: PIPELINING
        S: .
        C: STLS
        S: -ERR STLS is not available here.
        """
        + USER_PASS
        + LOGGED_IN,
        mode,
        machine(ClientTls.STARTTLS),
    )


@pytest.mark.parametrize("injected", ["USER alice", "x"])
def test_plaintext_pipelined_behind_stls_is_refused(injected: str) -> None:
    # Whole only: the injected bytes must arrive with the STLS line to be caught here
    # (later ones are caught by the driver or the next test).
    play(
        STARTTLS_START
        + f"""
        C: STLS
        C: {injected}
        !! client-error -ERR Protocol error.
        """,
        Mode.WHOLE,
        machine(ClientTls.STARTTLS),
    )


@two_ways
def test_data_during_client_tls_negotiation_is_refused(mode: Mode) -> None:
    play(
        STARTTLS_START
        + """
        C: STLS
        << start-tls client +OK Begin TLS negotiation now.
        C: USER alice
        !! client-error -ERR Protocol error.
        """,
        mode,
        machine(ClientTls.STARTTLS),
    )


@three_ways
def test_stls_takes_no_arguments(mode: Mode) -> None:
    play(
        STARTTLS_START
        + """
        C: STLS now
        S: -ERR Syntax error.
        """,
        mode,
        machine(ClientTls.STARTTLS),
    )


@three_ways
def test_plaintext_listener_offers_logins_without_stls(mode: Mode) -> None:
    play(
        START
        + """
        C: CAPA
        """
        + OUR_CAPA
        + """
        S: .
        C: STLS
        S: -ERR STLS is not available here.
        """
        + USER_PASS,
        mode,
        machine(ClientTls.NONE),
    )


# === Limits ================================================================================


@three_ways
def test_client_line_too_long(mode: Mode) -> None:
    play(
        START
        + f"""
        C: PASS {"x" * 60}
        !! client-error -ERR Line too long.
        """,
        mode,
        machine(max_line=64),
    )


@three_ways
def test_client_line_at_the_limit_is_fine(mode: Mode) -> None:
    password = "x" * (64 - 2 - len("PASS "))
    play(
        START
        + f"""
        C: USER alice
        S: +OK Send PASS.
        C: PASS {password}
        << request-token alice {password}
        """,
        mode,
        machine(max_line=64),
    )


@three_ways
def test_long_sasl_responses_fit_the_line_limit(mode: Mode) -> None:
    password = "p" * 1000  # sasl.MAX_CREDENTIAL is 1024
    plain = b64(f"\0alice\0{password}")
    play(
        READY
        + f"""
        C: AUTH PLAIN
        S: +$SP
        C: {plain}
        << request-token alice {password}
        """,
        mode,
    )


@two_ways
def test_too_much_pipelined_behind_the_login(mode: Mode) -> None:
    play(
        READY
        + f"""
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        C: RETR 1
        C: {"x" * 60}
        !! client-error -ERR Too much data pipelined behind the login.
        """,
        mode,
        machine(max_line=64),
    )


def test_error_state_refuses_every_later_event() -> None:
    auth = play(
        START
        + f"""
        C: {"x" * 70}
        !! client-error -ERR Line too long.
        """,
        Mode.WHOLE,
        machine(max_line=64),
    )
    assert auth.client_state is ClientState.ERROR
    assert auth.upstream_state is UpstreamState.ERROR
    with pytest.raises(ClientProtocolError) as caught:
        auth.handle(ServerConnected())
    assert caught.value.reply_hint == replies.POP3.line_too_long


@pytest.mark.parametrize(
    "at",
    [
        START,
        READY,
        READY + "C: USER alice\nS: +OK Send PASS.\n",
        READY + "C: AUTH LOGIN\nS: + VXNlcm5hbWU6\n",
        READY + USER_PASS,
    ],
)
def test_client_closing_at_any_time_closes(at: str) -> None:
    auth = play(at + ">> client-closed\n<< close client closed the connection\n")
    assert auth.client_state is ClientState.CLOSED


def test_the_timeout_reply_is_temporary() -> None:
    assert replies.POP3_TIMEOUT.startswith(b"-ERR [SYS/TEMP] ")
    assert replies.POP3_TIMEOUT.endswith(b"\r\n")
    assert replies.POP3_TIMEOUT.count(b"\r\n") == 1


# === Upstream: greeting, STLS and CAPA =====================================================

#: Dovecot's plaintext port (pop3), as seen from a client it does not consider secured.
UPSTREAM_STLS = """
    >> server-connected
    U: +OK Dovecot (Debian) ready.
    P: STLS
    U: +OK Begin TLS negotiation now.
    << start-tls server
    >> tls server
    P: CAPA
    U: +OK
    U: CAPA
    U: TOP
    U: UIDL
    U: RESP-CODES
    U: PIPELINING
    U: AUTH-RESP-CODE
    U: USER
    U: SASL XOAUTH2 OAUTHBEARER
    U: .
"""


@three_ways
def test_upstream_stls(mode: Mode) -> None:
    play(
        START + UPSTREAM_STLS + USER_PASS + LOGGED_IN,
        mode,
        machine(upstream_tls=UpstreamTls.STARTTLS),
    )


def test_upstream_data_behind_its_stls_ok_is_refused() -> None:
    play(
        START
        + """
        >> server-connected
        U: +OK hi
        P: STLS
        U: +OK go
        U: +OK injected
        !! upstream-error -ERR [SYS/TEMP] Temporary failure, try again later.
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
        U: +OK hi
        P: STLS
        U: +OK go
        << start-tls server
        U: -ERR bye
        !! upstream-error
        """,
        mode,
        machine(upstream_tls=UpstreamTls.STARTTLS),
    )


@three_ways
def test_upstream_refusing_stls_is_unusable(mode: Mode) -> None:
    play(
        START
        + """
        >> server-connected
        U: +OK hi
        P: STLS
        U: -ERR Unknown command.
        << note error upstream cannot be used: upstream_tls is starttls but it refused STLS
        U: ignored
        C: USER alice
        S: +OK Send PASS.
        C: PASS secret
        << request-token alice secret
        >> token alice@contoso.com
        << note warning login as 'alice': the upstream cannot be used
        S: -ERR [SYS/TEMP] Temporary failure, try again later.
        >> server-closed
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        >> refused credentials
        S: -ERR [AUTH] Authentication failed.
        """,
        mode,
        machine(upstream_tls=UpstreamTls.STARTTLS),
    )


@three_ways
def test_upstream_without_xoauth2_is_unusable(mode: Mode) -> None:
    play(
        START
        + """
        >> server-connected
        U: +OK hi
        P: CAPA
        U: +OK
        U: USER
        U: SASL PLAIN OAUTHBEARER
        U: .
        << note error it does not offer SASL XOAUTH2 (SASL mechanisms offered: OAUTHBEARER PLAIN)
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        >> token alice@contoso.com
        << note warning does not offer SASL XOAUTH2
        S: -ERR [SYS/TEMP] Temporary failure, try again later.
        """,
        mode,
    )


@three_ways
def test_upstream_without_capa_is_unusable(mode: Mode) -> None:
    play(
        START
        + """
        >> server-connected
        U: +OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>
        P: CAPA
        U: -ERR unknown command
        << note error it refused CAPA: -ERR unknown command; without CAPA (RFC 2449)
        """,
        mode,
    )


@three_ways
def test_upstream_capa_lines_are_dot_unstuffed_and_matched_case_insensitively(
    mode: Mode,
) -> None:
    play(
        START
        + """
        >> server-connected
        U: +OK hi
        P: CAPA
        U: +OK
        U: ..FUNNY
        U: sasl plain xoauth2
        U: top
        U: .
        C: CAPA
        """
        + OUR_CAPA
        + """
        S: top
        S: .
        """
        + USER_PASS
        + LOGGED_IN,
        mode,
    )


@three_ways
def test_upstream_capa_list_too_long(mode: Mode) -> None:
    lines = "\n".join(f"U: X-CAPABILITY-{n:03}" for n in range(20))
    play(
        START
        + f"""
        >> server-connected
        U: +OK hi
        P: CAPA
        U: +OK
        {lines}
        !! upstream-error
        """,
        mode,
        machine(max_server_line=256),
    )


@three_ways
def test_upstream_err_greeting_then_reconnect_at_login(mode: Mode) -> None:
    play(
        START
        + """
        >> server-connected
        U: -ERR [SYS/TEMP] Too many connections
        << note warning upstream said -ERR [SYS/TEMP] Too many connections
        >> server-closed
        """
        + USER_PASS
        + """
        << note info reconnecting: the upstream said -ERR [SYS/TEMP] Too many connections
        << connect-upstream
        """
        + UPSTREAM_READY
        + LOGGED_IN,
        mode,
    )


@pytest.mark.parametrize("greeting", ["* OK IMAP4rev1 ready", "+ hello", "+OKAY", "220 smtp"])
@three_ways
def test_upstream_greeting_must_be_ok(greeting: str, mode: Mode) -> None:
    play(
        START
        + f"""
        >> server-connected
        U: {greeting}
        !! upstream-error -ERR [SYS/TEMP] Temporary failure, try again later.
        """,
        mode,
    )


@pytest.mark.parametrize("line", ["garbage", "+OK what", "+ go on", ""])
@three_ways
def test_upstream_unexpected_lines(line: str, mode: Mode) -> None:
    play(
        READY
        + f"""
        U: {line}
        !! upstream-error
        """,
        mode,
    )


@three_ways
def test_upstream_idle_err_means_it_is_closing(mode: Mode) -> None:
    play(
        READY
        + """
        U: -ERR Disconnected for inactivity.
        << note warning upstream said -ERR Disconnected for inactivity.; the next login will
        U: anything
        >> server-closed
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        << note info reconnecting: the upstream said -ERR Disconnected for inactivity.
        << connect-upstream
        """
        + UPSTREAM_READY
        + LOGGED_IN,
        mode,
    )


@three_ways
def test_upstream_line_too_long(mode: Mode) -> None:
    play(
        START
        + f"""
        >> server-connected
        U: +OK {"x" * 300}
        !! upstream-error
        """,
        mode,
        machine(max_server_line=256),
    )


# === Upstream: the XOAUTH2 exchange ========================================================


@three_ways
def test_token_issued_before_the_upstream_is_ready(mode: Mode) -> None:
    play(
        START
        + USER_PASS
        + """
        >> token alice@contoso.com
        """
        + UPSTREAM_READY
        + """
        P: AUTH XOAUTH2
        U: +
        P: $XOAUTH2
        U: +OK Logged in.
        S: +OK Logged in.
        << note info logged in
        << relay
        """,
        mode,
    )


@three_ways
def test_error_challenge_then_retry_on_the_same_connection(mode: Mode) -> None:
    play(
        READY
        + USER_PASS
        + f"""
        >> token alice@contoso.com
        P: AUTH XOAUTH2
        U: +$SP
        P: $XOAUTH2
        U: + {ERROR_CHALLENGE}
        P:
        U: -ERR [AUTH] Authentication failed.
        << note warning (error challenge: schemes=bearer, scope=mail, status=401)
        S: -ERR [AUTH] Authentication failed.
        """
        + USER_PASS
        + LOGGED_IN,
        mode,
    )


@three_ways
def test_upstream_err_without_challenge_or_code(mode: Mode) -> None:
    play(
        READY
        + USER_PASS
        + """
        >> token alice@contoso.com
        P: AUTH XOAUTH2
        U: +$SP
        P: $XOAUTH2
        U: -ERR Authentication failure: unknown user name or bad password.
        << note warning login as 'alice' (mailbox 'alice@contoso.com'): the upstream rejected
        S: -ERR [AUTH] Authentication failed.
        """,
        mode,
    )


@pytest.mark.parametrize(
    "line",
    [
        "-ERR [SYS/TEMP] Internal error occurred.",
        "-ERR [IN-USE] Mailbox is locked by another POP3 session.",
        "-ERR [LOGIN-DELAY] Wait 900 seconds between logins.",
        "-ERR [sys/temp] lower case",
    ],
)
@three_ways
def test_upstream_temporary_failures_stay_temporary(line: str, mode: Mode) -> None:
    play(
        READY
        + USER_PASS
        + f"""
        >> token alice@contoso.com
        P: AUTH XOAUTH2
        U: +$SP
        P: $XOAUTH2
        U: {line}
        << note warning upstream temporarily unavailable: {line}
        S: -ERR [SYS/TEMP] Temporary failure, try again later.
        """,
        mode,
    )


@three_ways
def test_upstream_permanent_system_error_is_not_a_password_problem(mode: Mode) -> None:
    play(
        READY
        + USER_PASS
        + """
        >> token alice@contoso.com
        P: AUTH XOAUTH2
        U: +$SP
        P: $XOAUTH2
        U: -ERR [SYS/PERM] Mailbox disabled.
        << note error the upstream reports a system error: -ERR [SYS/PERM] Mailbox disabled.
        S: -ERR [SYS/TEMP] Temporary failure, try again later.
        """,
        mode,
    )


@three_ways
def test_upstream_refusing_auth_xoauth2_itself_is_not_a_password_problem(mode: Mode) -> None:
    play(
        READY
        + USER_PASS
        + """
        >> token alice@contoso.com
        P: AUTH XOAUTH2
        U: -ERR [AUTH] Unsupported authentication mechanism.
        << note error refused the XOAUTH2 exchange itself: -ERR [AUTH] Unsupported
        S: -ERR [SYS/TEMP] Temporary failure, try again later.
        """,
        mode,
    )


@three_ways
def test_upstream_accepting_without_a_token_is_an_error(mode: Mode) -> None:
    play(
        READY
        + USER_PASS
        + """
        >> token alice@contoso.com
        P: AUTH XOAUTH2
        U: +OK Logged in.
        !! upstream-error
        """,
        mode,
    )


@three_ways
def test_unexpected_continuation_after_the_error_challenge(mode: Mode) -> None:
    play(
        READY
        + USER_PASS
        + f"""
        >> token alice@contoso.com
        P: AUTH XOAUTH2
        U: +$SP
        P: $XOAUTH2
        U: + {ERROR_CHALLENGE}
        P:
        U: + again
        !! upstream-error
        """,
        mode,
    )


@three_ways
def test_unreadable_error_challenge_is_still_answered(mode: Mode) -> None:
    play(
        READY
        + USER_PASS
        + """
        >> token alice@contoso.com
        P: AUTH XOAUTH2
        U: +$SP
        P: $XOAUTH2
        U: + !!not base64!!
        P:
        U: -ERR [AUTH] Authentication failed.
        << note warning (error challenge: unreadable error challenge)
        S: -ERR [AUTH] Authentication failed.
        """,
        mode,
    )


# === Upstream unavailable, and reconnecting ================================================


@three_ways
def test_upstream_unavailable_at_start_reconnects_at_login(mode: Mode) -> None:
    play(
        START
        + """
        >> server-unavailable upstream pop.example:995: connection refused
        << note warning upstream is unavailable: upstream pop.example:995: connection refused
        """
        + USER_PASS
        + """
        << note info reconnecting: the upstream is unavailable: upstream pop.example:995
        << connect-upstream
        """
        + UPSTREAM_READY
        + LOGGED_IN,
        mode,
    )


@three_ways
def test_upstream_unavailable_twice_fails_the_login_temporarily(mode: Mode) -> None:
    play(
        START
        + """
        >> server-unavailable no route
        << note warning upstream is unavailable: no route
        """
        + USER_PASS
        + """
        << note info reconnecting
        << connect-upstream
        >> server-unavailable still no route
        >> token alice@contoso.com
        << note warning 'alice': the upstream is unavailable: still no route; answered SYS/TEMP
        S: -ERR [SYS/TEMP] Temporary failure, try again later.
        C: USER alice
        S: +OK Send PASS.
        C: PASS wrong
        << request-token alice wrong
        << note info reconnecting
        << connect-upstream
        >> server-unavailable still no route
        >> refused credentials
        S: -ERR [AUTH] Authentication failed.
        """,
        mode,
    )


@three_ways
def test_upstream_closed_while_the_client_typed(mode: Mode) -> None:
    play(
        READY
        + """
        >> server-closed
        << note info upstream closed the connection; the next login will reconnect
        """
        + USER_PASS
        + """
        << note info reconnecting: the upstream closed the connection
        << connect-upstream
        >> token alice@contoso.com
        """
        + UPSTREAM_READY
        + """
        P: AUTH XOAUTH2
        U: +$SP
        P: $XOAUTH2
        U: +OK Logged in.
        S: +OK Logged in.
        << note info logged in
        << relay
        """,
        mode,
    )


@three_ways
def test_upstream_lost_while_the_token_is_fetched_reconnects(mode: Mode) -> None:
    play(
        READY
        + USER_PASS
        + """
        U: -ERR Disconnected for inactivity.
        >> server-closed
        << note info reconnecting: the upstream said -ERR Disconnected for inactivity.
        << connect-upstream
        """
        + UPSTREAM_READY
        + LOGGED_IN,
        mode,
    )


@three_ways
def test_upstream_lost_during_stls_reconnects_at_login(mode: Mode) -> None:
    play(
        START
        + """
        >> server-connected
        U: +OK hi
        P: STLS
        U: +OK go
        << start-tls server
        >> server-unavailable upstream: STARTTLS certificate verify failed
        << note warning upstream is unavailable: upstream: STARTTLS certificate verify failed
        """
        + USER_PASS
        + """
        << note info reconnecting
        << connect-upstream
        """
        + UPSTREAM_STLS
        + LOGGED_IN,
        mode,
        machine(upstream_tls=UpstreamTls.STARTTLS),
    )


@pytest.mark.parametrize("after", ["", "U: +$SP\nP: $XOAUTH2\n"])
@three_ways
def test_upstream_closed_during_authentication(after: str, mode: Mode) -> None:
    play(
        READY
        + USER_PASS
        + f"""
        >> token alice@contoso.com
        P: AUTH XOAUTH2
        {after}
        >> server-closed
        << note warning login as 'alice': the upstream closed the connection during authentication
        S: -ERR [SYS/TEMP] Temporary failure, try again later.
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        << note info reconnecting
        << connect-upstream
        """,
        mode,
    )


# === App identities: AUTH EXTERNAL, XOAUTH2 and OAUTHBEARER ================================

APP_CAPA = """
    S: +OK Capability list follows.
    S: USER
    S: SASL PLAIN LOGIN EXTERNAL XOAUTH2 OAUTHBEARER
    S: RESP-CODES
    S: AUTH-RESP-CODE
"""


def app_machine(client_tls: ClientTls = ClientTls.IMPLICIT, **limits: int) -> Pop3Auth:
    return machine(client_tls, UpstreamTls.IMPLICIT, external=True, bearer=True, **limits)


@pytest.mark.parametrize(
    ("external", "bearer", "offered"),
    [
        (False, False, "PLAIN LOGIN"),
        (True, False, "PLAIN LOGIN EXTERNAL"),
        (False, True, "PLAIN LOGIN XOAUTH2 OAUTHBEARER"),
        (True, True, "PLAIN LOGIN EXTERNAL XOAUTH2 OAUTHBEARER"),
    ],
)
@three_ways
def test_app_mechanisms_are_advertised_when_set(
    external: bool, bearer: bool, offered: str, mode: Mode
) -> None:
    listed = "".join(f"S: {name}\n" for name in offered.split())
    play(
        START
        + f"""
        C: CAPA
        S: +OK Capability list follows.
        S: USER
        S: SASL {offered}
        S: RESP-CODES
        S: AUTH-RESP-CODE
        S: .
        C: AUTH
        S: +OK Mechanisms follow.
        {listed}
        S: .
        """,
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
        f"C: AUTH {name} $XO\nS: -ERR Unsupported authentication mechanism.\n"
        f"C: AUTH {name}\nS: -ERR Unsupported authentication mechanism.\n"
        for name in unknown
    )
    play(READY + lines, mode, machine(external=external, bearer=bearer))


@three_ways
def test_app_mechanisms_only_after_stls(mode: Mode) -> None:
    play(
        STARTTLS_START
        + """
        C: CAPA
        S: +OK Capability list follows.
        S: STLS
        S: RESP-CODES
        S: AUTH-RESP-CODE
        S: .
        C: AUTH
        S: +OK Mechanisms follow.
        S: .
        C: AUTH EXTERNAL =
        S: -ERR Plaintext login disallowed; use STLS first.
        C: AUTH XOAUTH2 $XO
        S: -ERR Plaintext login disallowed; use STLS first.
        C: AUTH OAUTHBEARER
        S: -ERR Plaintext login disallowed; use STLS first.
        C: STLS
        << start-tls client +OK Begin TLS negotiation now.
        >> tls client
        C: CAPA
        """
        + APP_CAPA
        + """
        S: .
        """
        + UPSTREAM_READY
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
        READY
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
        READY
        + f"""
        C: AUTH EXTERNAL
        S: +$SP
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
        READY
        + f"""
        C: AUTH EXTERNAL =
        << request-external
        >> refused credentials
        S: -ERR [AUTH] Authentication failed.
        C: AUTH EXTERNAL {control}
        << note info login refused without asking for a token: authorization identity
        S: -ERR [AUTH] Authentication failed.
        C: AUTH EXTERNAL
        S: +$SP
        C: *
        S: -ERR Authentication cancelled.
        C: AUTH EXTERNAL
        S: +$SP
        C: =
        S: -ERR Invalid base64 in SASL response.
        C: AUTH EXTERNAL =
        << request-external
        >> refused unavailable
        S: -ERR [SYS/TEMP] Temporary failure, try again later.
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
        READY
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
        READY
        + f"""
        C: USER someone
        S: +OK Send PASS.
        C: AUTH {mechanism}
        S: +$SP
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
        READY
        + f"""
        C: AUTH {mechanism} {message}
        << request-bearer alice@contoso.com $KEY
        >> refused credentials
        S: + {challenge}
        C: {answer}
        S: -ERR [AUTH] Authentication failed.
        C: AUTH {mechanism}
        S: +$SP
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
        READY
        + """
        C: AUTH XOAUTH2 $XO
        C: CAPA
        << request-bearer alice@contoso.com $KEY
        >> refused credentials
        S: + $XO_REFUSED
        S: -ERR [AUTH] Authentication failed.
        C: QUIT
        S: +OK Logging out.
        << close logged out
        """,
        mode,
        app_machine(),
    )


@three_ways
def test_temporary_refusal_of_an_app_key_has_no_challenge(mode: Mode) -> None:
    play(
        READY
        + """
        C: AUTH OAUTHBEARER $OB
        << request-bearer alice@contoso.com $KEY
        >> refused unavailable
        S: -ERR [SYS/TEMP] Temporary failure, try again later.
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
        b64(f"n,a=a@b\x01auth=Bearer {APP_KEY}\x01\x01"),
        "OAUTHBEARER: malformed GS2 header",
        id="gs2",
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
        else f"C: AUTH {mechanism}\nS: +$SP\nC: {'' if message == '=' else message}"
    )
    auth = play(
        READY
        + f"""
        {command}
        << note info login refused without asking for a token: {why}
        S: + {challenge}
        C:
        S: -ERR [AUTH] Authentication failed.
        """,
        mode,
        app_machine(),
    )
    assert auth.client_state is ClientState.NOT_AUTHENTICATED


@three_ways
def test_bearer_base64_errors_and_cancel_are_like_plain(mode: Mode) -> None:
    play(
        READY
        + """
        C: AUTH XOAUTH2 !!!!
        S: -ERR Invalid base64 in SASL response.
        C: AUTH OAUTHBEARER
        S: +$SP
        C: AQ
        S: -ERR Invalid base64 in SASL response.
        C: AUTH XOAUTH2
        S: +$SP
        C: *
        S: -ERR Authentication cancelled.
        C: AUTH XOAUTH2 $XO extra
        S: -ERR Syntax error.
        """,
        mode,
        app_machine(),
    )


@three_ways
def test_bearer_failures_count_against_the_login_budget(mode: Mode) -> None:
    play(
        READY
        + """
        C: AUTH XOAUTH2 $XO
        << request-bearer alice@contoso.com $KEY
        >> refused credentials
        S: + $XO_REFUSED
        C:
        S: -ERR [AUTH] Authentication failed.
        C: AUTH OAUTHBEARER =
        << note info login refused without asking for a token
        S: + $OB_REFUSED
        C: AQ==
        S: -ERR [AUTH] Authentication failed.
        << note info 2 failed logins: closing
        S: -ERR Too many failed logins.
        << close too many failed logins
        """,
        mode,
        app_machine(max_auth_failures=2),
    )


@three_ways
def test_client_closing_during_the_error_challenge(mode: Mode) -> None:
    auth = play(
        READY
        + """
        C: AUTH XOAUTH2 $XO
        << request-bearer alice@contoso.com $KEY
        >> refused credentials
        S: + $XO_REFUSED
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
        READY
        + f"""
        C: AUTH XOAUTH2 $XO
        << request-bearer alice@contoso.com $KEY
        >> refused credentials
        S: + $XO_REFUSED
        C: {"x" * 300}
        !! client-error -ERR Line too long.
        """,
        mode,
        app_machine(max_line=200),
    )


# === Token refusals and the login budget ===================================================


@three_ways
def test_token_refused_for_bad_credentials(mode: Mode) -> None:
    auth = play(
        READY
        + """
        C: USER alice
        S: +OK Send PASS.
        C: PASS wrong
        << request-token alice wrong
        >> refused credentials
        S: -ERR [AUTH] Authentication failed.
        C: USER nobody
        S: +OK Send PASS.
        C: PASS secret
        << request-token nobody secret
        >> refused credentials
        S: -ERR [AUTH] Authentication failed.
        """,
        mode,
    )
    assert auth.client_state is ClientState.NOT_AUTHENTICATED


@three_ways
def test_token_refused_temporarily(mode: Mode) -> None:
    play(
        READY
        + """
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        >> refused unavailable
        S: -ERR [SYS/TEMP] Temporary failure, try again later.
        """,
        mode,
    )


@three_ways
def test_failed_login_then_pipelined_commands_are_parsed(mode: Mode) -> None:
    play(
        READY
        + """
        C: USER alice
        C: PASS wrong
        C: CAPA
        S: +OK Send PASS.
        << request-token alice wrong
        >> refused credentials
        S: -ERR [AUTH] Authentication failed.
        """
        + OUR_CAPA
        + """
        S: TOP
        S: UIDL
        S: PIPELINING
        S: .
        """,
        mode,
    )


@three_ways
def test_failed_login_budget(mode: Mode) -> None:
    play(
        READY
        + """
        C: USER alice
        S: +OK Send PASS.
        C: PASS wrong
        << request-token alice wrong
        >> refused credentials
        S: -ERR [AUTH] Authentication failed.
        C: AUTH PLAIN $PLAIN
        << request-token alice secret
        >> token alice@contoso.com
        P: AUTH XOAUTH2
        U: +$SP
        P: $XOAUTH2
        U: -ERR [AUTH] Authentication failed.
        << note warning the upstream rejected the token
        S: -ERR [AUTH] Authentication failed.
        << note info 2 failed logins: closing
        S: -ERR Too many failed logins.
        << close too many failed logins
        """,
        mode,
        machine(max_auth_failures=2),
    )


def test_refusal_bytes_are_the_same_for_every_credential_problem() -> None:
    answers = []
    for login in ("USER alice\r\nPASS wrong\r\n", "USER nobody\r\nPASS secret\r\n"):
        auth = machine()
        auth.start()
        auth.handle(ClientDataReceived(login.encode()))
        answers.append(auth.handle(TokenRefused(Refusal.CREDENTIALS)))
    assert answers[0] == answers[1] == [SendToClient(b"-ERR [AUTH] Authentication failed.\r\n")]
    assert replies.POP3.auth_failed == b"-ERR [AUTH] Authentication failed."


# === Driver contract, secrets, tables ======================================================


@pytest.mark.parametrize(
    ("setup", "event"),
    [
        ("", TokenIssued(MAILBOX, TOKEN)),
        ("", TokenRefused(Refusal.UNAVAILABLE)),
        ("C: AUTH PLAIN", TokenIssued(MAILBOX, TOKEN)),
        ("C: USER alice", TokenRefused(Refusal.CREDENTIALS)),
        ("", TlsEstablished(Side.CLIENT)),
        ("", TlsEstablished(Side.SERVER)),
        ("", ServerConnected()),
        ("", ServerUnavailable("late")),
        (">> server-closed", ServerDataReceived(b"+OK\r\n")),
        (">> server-closed", ServerClosed()),
    ],
)
def test_events_the_driver_must_not_send_are_bugs(setup: str, event: Event) -> None:
    auth = machine()
    _all_actions(READY + setup, auth)
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
    auth = play(READY + USER_PASS + LOGGED_IN)
    with pytest.raises(RuntimeError):
        auth.handle(ClientDataReceived(b"x"))


def _all_actions(text: str, auth: Pop3Auth) -> tuple[list[Action], list[str]]:
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
        f"C: USER alice\nC: PASS {SECRET}",
        "C: AUTH PLAIN " + b64(f"\0alice\0{SECRET}"),
        "C: AUTH PLAIN\nC: " + b64(f"\0alice\0{SECRET}"),
        "C: AUTH LOGIN\nC: $ALICE\nC: " + b64(SECRET),
        "C: AUTH LOGIN $ALICE\nC: " + b64(SECRET),
    ],
)
@pytest.mark.parametrize(
    "outcome",
    [
        pytest.param("U: +OK Logged in.", id="ok"),
        pytest.param(
            f"U: + {ERROR_CHALLENGE}\nU: -ERR [AUTH] Authentication failed.\n>> client-closed",
            id="challenge",
        ),
        pytest.param("U: -ERR [SYS/TEMP] later\nC: STAT\nC: QUIT", id="temporary"),
        pytest.param("C: STAT\nU: " + "x" * 70_000, id="too-long"),
    ],
)
def test_secrets_only_in_the_token_request_and_the_xoauth2_line(login: str, outcome: str) -> None:
    text = READY + f"{login}\n>> token alice@contoso.com\nU: +\n{outcome}\n"
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
    pytest.param(">> token alice@contoso.com\nU: +\nU: +OK Logged in.", id="ok"),
    pytest.param(
        ">> token alice@contoso.com\nU: +\n"
        f"U: + {ERROR_CHALLENGE}\nU: -ERR [AUTH] Authentication failed.\n>> client-closed",
        id="upstream-challenge",
    ),
    pytest.param(">> refused credentials\nC: AQ==\nC: STAT", id="refused"),
    pytest.param(">> refused unavailable\nC: STAT", id="unavailable"),
]


@pytest.mark.parametrize("login", APP_LOGINS)
@pytest.mark.parametrize("outcome", APP_OUTCOMES)
def test_app_key_only_in_the_token_request(login: str, outcome: str) -> None:
    actions, reprs = _all_actions(READY + f"{login}\n{outcome}\n", app_machine())
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
    actions, reprs = _all_actions(READY + f"C: AUTH XOAUTH2 {message}\nC:\n", app_machine())
    sent = b"".join(action.data for action in actions if isinstance(action, SendToClient))
    assert sent.endswith(b"\r\n" + replies.POP3.auth_failed + b"\r\n")
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


def test_relay_tail_keeps_even_secret_looking_pipelined_bytes() -> None:
    auth = machine()
    auth.start()
    auth.handle(ServerConnected())
    auth.handle(ServerDataReceived(b"+OK hi\r\n+OK\r\nSASL XOAUTH2\r\n.\r\n"))
    auth.handle(ClientDataReceived(b"USER u\r\nPASS p\r\nPASS q\r\n"))
    auth.handle(TokenIssued(MAILBOX, TOKEN))
    auth.handle(ServerDataReceived(b"+ \r\n"))
    actions = auth.handle(ServerDataReceived(b"+OK\r\n"))
    relay = actions[-1]
    assert isinstance(relay, BeginRelay)
    assert relay.to_server == b"PASS q\r\n"


# === Capability lists ======================================================================


def test_pop3_capabilities_parse_and_filter() -> None:
    caps = Pop3Capabilities.parse(
        [b"top", b"SASL plain XOAUTH2", b"EXPIRE NEVER", b"uidl", b"LOGIN-DELAY \x1b[2J", b""]
    )
    assert "TOP" in caps
    assert "UIDL" in caps
    assert "STLS" not in caps
    assert caps.mechanisms == {"PLAIN", "XOAUTH2"}
    # Whole lines, in the upstream's order; a line with control characters is dropped.
    assert caps.passed_on() == (b"top", b"EXPIRE NEVER", b"uidl")
    assert repr(caps) == "Pop3Capabilities(TOP SASL EXPIRE UIDL LOGIN-DELAY)"
    assert Pop3Capabilities.parse([b"TOP"]) == Pop3Capabilities.parse([b"TOP"])
    assert hash(Pop3Capabilities.parse([b"TOP"])) == hash(Pop3Capabilities.parse([b"TOP"]))
    assert Pop3Capabilities.parse([b"TOP"]) != Pop3Capabilities.parse([b"UIDL"])
    assert not Pop3Capabilities()
    assert Pop3Capabilities.parse([b"SASL A", b"SASL B"]).mechanisms == {"A", "B"}
    assert Pop3Capabilities.parse([b"\xff\xfeTOP"]).passed_on() == ()


def test_pop3_proxy_capabilities() -> None:
    upstream = Pop3Capabilities.parse([b"TOP", b"STLS", b"USER", b"PIPELINING"])
    assert pop3_proxy_capabilities(before_tls=True, upstream=upstream) == (
        b"STLS\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nTOP\r\nPIPELINING\r\n"
    )
    assert pop3_proxy_capabilities(before_tls=False, upstream=Pop3Capabilities()) == (
        b"USER\r\nSASL PLAIN LOGIN\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
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
        {ClientState.PLAINTEXT, ClientState.NOT_AUTHENTICATED},
        {ClientState.AUTHENTICATED, ClientState.CLOSED, ClientState.ERROR},
    )
    _check_table(
        UPSTREAM_TRANSITIONS,
        set(UPSTREAM_TRANSITIONS.states()),
        {UpstreamState.DOWN},
        {UpstreamState.AUTHENTICATED, UpstreamState.ERROR},
    )
    assert CLIENT_TRANSITIONS.next_state(ClientState.TLS_NEGOTIATION, ClientInput.DATA) is None
    assert (
        CLIENT_TRANSITIONS.next_state(ClientState.USER_GIVEN, ClientInput.REJECTED)
        is ClientState.NOT_AUTHENTICATED
    )
    assert (
        UPSTREAM_TRANSITIONS.next_state(UpstreamState.AUTH_SENT, UpstreamInput.GO_AHEAD)
        is UpstreamState.TOKEN_SENT
    )
    dot = state_diagrams()
    assert dot.count("digraph") == 2
    for state in (*CLIENT_TRANSITIONS.states(), *UPSTREAM_TRANSITIONS.states()):
        assert f'"{state.name}"' in dot
    assert '"PLAINTEXT" -> "TLS_NEGOTIATION" [label="starttls"];' in dot
