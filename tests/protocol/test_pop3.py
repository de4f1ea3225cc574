"""Transcript tests for Pop3Auth: both peers, every login form, every failure path.

The upstream lines are Dovecot 2.3.19's, recorded from the test rig (tests/support/dovecot.py):
greeting, CAPA before and after TLS, ``+ `` for AUTH XOAUTH2, its error challenge and the
final ``-ERR [AUTH] Authentication failed.`` or ``+OK Logged in.``.
"""

from __future__ import annotations

import pytest

from proxy.protocol import replies
from proxy.protocol.capabilities import Pop3Capabilities, pop3_proxy_capabilities
from proxy.protocol.login import ClientState, UpstreamState
from proxy.protocol.modes import ClientTls, UpstreamTls
from tests.protocol.dialects import POP3, POP3_READY, VARS, app_settings, b64
from tests.protocol.playbook import Mode, three_ways

machine, play, steps = POP3.machine, POP3.play, POP3.steps

START, UPSTREAM_READY, READY = POP3.start, POP3.upstream_ready, POP3.ready
LOGGED_IN = POP3.logged_in()
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
ERROR_CHALLENGE = VARS["CHALLENGE"]


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


# === AUTH PLAIN and AUTH LOGIN =============================================================
# (as in every protocol: test_login.py; POP3's own are its spaces and its LOGIN refusals)


@three_ways
def test_auth_arguments_are_separated_by_single_spaces(mode: Mode) -> None:
    play(
        READY
        + """
        C: AUTH PLAIN$SP
        S: -ERR Syntax error.
        C: AUTH$SP
        S: -ERR Syntax error.
        C: AUTH PLAIN  $PLAIN
        S: -ERR Syntax error.
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


def test_the_timeout_reply_is_temporary() -> None:
    assert replies.POP3_TIMEOUT.startswith(b"-ERR [SYS/TEMP] ")
    assert replies.POP3_TIMEOUT.endswith(b"\r\n")
    assert replies.POP3_TIMEOUT.count(b"\r\n") == 1


# === Upstream: greeting, STLS and CAPA =====================================================

#: Dovecot's plaintext port (pop3), as seen from a client it does not consider secured.
UPSTREAM_STLS = (
    ">> server-connected\nU: +OK Dovecot (Debian) ready.\nP: STLS\n"
    "U: +OK Begin TLS negotiation now.\n<< start-tls server\n>> tls server\n"
    + POP3_READY[POP3_READY.index("P: CAPA") :]
)


@three_ways
def test_upstream_stls(mode: Mode) -> None:
    play(
        START + UPSTREAM_STLS + USER_PASS + LOGGED_IN,
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


# === App identities: AUTH EXTERNAL, XOAUTH2 and OAUTHBEARER ================================

APP_CAPA = """
    S: +OK Capability list follows.
    S: USER
    S: SASL PLAIN LOGIN EXTERNAL XOAUTH2 OAUTHBEARER
    S: RESP-CODES
    S: AUTH-RESP-CODE
"""


@app_settings
@three_ways
def test_app_mechanisms_are_advertised_when_set(
    external: bool, bearer: bool, apps: str, mode: Mode
) -> None:
    offered = f"PLAIN LOGIN{apps}"
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
        machine(ClientTls.STARTTLS, app=True),
    )


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
