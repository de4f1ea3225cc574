"""Transcript tests for SmtpAuth: both peers, every login form, every failure path.

The upstream's lines are Dovecot 2.3.19's submission service, byte for byte.
"""

from __future__ import annotations

import base64

import pytest

from proxy.protocol.actions import SendToClient, SendToServer
from proxy.protocol.capabilities import SmtpExtensions, smtp_proxy_extensions
from proxy.protocol.login import ClientState, UpstreamState
from proxy.protocol.modes import AuthSettings, ClientTls, UpstreamTls
from proxy.protocol.smtp import SmtpAuth
from tests.protocol.dialects import DOVECOT_EHLO, SMTP, VARS, app_settings, b64, collect
from tests.protocol.playbook import Mode, three_ways, two_ways

machine, play, steps = SMTP.machine, SMTP.play, SMTP.steps

START, UPSTREAM_READY, READY = SMTP.start, SMTP.upstream_ready, SMTP.start + SMTP.upstream_ready
ERROR_CHALLENGE = VARS["CHALLENGE"]
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
LOGGED_IN = SMTP.logged_in()


# === AUTH PLAIN and AUTH LOGIN =============================================================
# (as in every protocol: test_login.py; SMTP's own are its spaces and its LOGIN refusals)


@three_ways
def test_auth_arguments_are_separated_by_any_spaces(mode: Mode) -> None:
    play(
        GREETED
        + """
        C: AUTH
        S: 501 5.5.2 Syntax error
        C: AUTH PLAIN $SP$SP
        S: 334$SP
        C: *
        S: 501 5.0.0 Authentication cancelled
        C: AUTH  PLAIN  $PLAIN
        << request-token alice secret
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
        C: $SECRET
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
            "C: AUTH LOGIN " + b64("al\x01ce") + "\nS: 334 UGFzc3dvcmQ6\nC: $SECRET",
            "user name contains control",
        ),
        ("C: AUTH LOGIN $ALICE\nS: 334 UGFzc3dvcmQ6\nC: /w==", "password is not UTF-8"),
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


# === App identities: AUTH EXTERNAL, XOAUTH2 and OAUTHBEARER ================================

ALL_MECHANISMS = "PLAIN LOGIN EXTERNAL XOAUTH2 OAUTHBEARER"
APP_EHLO = OUR_EHLO.replace("AUTH PLAIN LOGIN", f"AUTH {ALL_MECHANISMS}")
APP_GREETED = READY + "C: EHLO client.test\n" + APP_EHLO


@app_settings
@three_ways
def test_app_mechanisms_are_advertised_when_set(
    external: bool, bearer: bool, apps: str, mode: Mode
) -> None:
    offered = f"PLAIN LOGIN{apps}"
    play(
        READY + "C: EHLO client.test\n" + OUR_EHLO.replace("AUTH PLAIN LOGIN", f"AUTH {offered}"),
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
        machine(ClientTls.STARTTLS, app=True),
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
        C: AUTH LOGIN $ALICE
        S: 334 UGFzc3dvcmQ6
        C: $SECRET
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
        C: $ALICE
        S: 334 UGFzc3dvcmQ6
        C: $SECRET
        << request-token alice secret
        """
        + LOGGED_IN,
        mode,
        machine(ClientTls.STARTTLS, UpstreamTls.STARTTLS),
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


@pytest.mark.parametrize(
    ("before", "reply"),
    [("", "250 2.0.0 OK"), ("U: 334$SP\nP: $XOAUTH2", "354 go ahead")],
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


def test_the_token_never_goes_on_the_auth_line() -> None:
    actions, _ = collect(GREETED + "C: AUTH PLAIN $PLAIN\n>> token alice@contoso.com\n", machine())
    assert actions[-1] == SendToServer(b"AUTH XOAUTH2\r\n")
