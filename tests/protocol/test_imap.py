"""Transcript tests for ImapAuth: both peers, every login form, every failure path."""

from __future__ import annotations

import pytest

from proxy.protocol import replies
from proxy.protocol.login import ClientState, UpstreamState
from proxy.protocol.modes import ClientTls, UpstreamTls
from proxy.protocol.sasl import Credentials
from tests.protocol.dialects import IMAP, MAILBOX, app_settings, assert_hidden, b64, collect
from tests.protocol.playbook import Mode, three_ways

machine, play, steps = IMAP.machine, IMAP.play, IMAP.steps

START, UPSTREAM_READY, READY = IMAP.start, IMAP.upstream_ready, IMAP.ready
LOGGED_IN = IMAP.logged_in()


# === LOGIN =================================================================================


@three_ways
def test_login_with_atoms(mode: Mode) -> None:
    auth = play(
        READY
        + """
        C: a1 LOGIN alice secret
        << request-token alice secret
        """
        + LOGGED_IN,
        mode,
    )
    assert auth.client_state is ClientState.AUTHENTICATED
    assert auth.upstream_state is UpstreamState.AUTHENTICATED
    assert auth.buffered == 0


@three_ways
def test_login_with_quoted_strings_and_escapes(mode: Mode) -> None:
    play(
        READY
        + r"""
        C: a1 login "alice" "c0rrect \"horse\" \\ battery"
        << request-token alice 'c0rrect "horse" \ battery'
        """
        + LOGGED_IN,
        mode,
    )


@three_ways
def test_login_with_synchronizing_literals(mode: Mode) -> None:
    play(
        READY
        + """
        C: a1 LOGIN {5}
        S: + Ready for literal data
        C: alice {14}
        S: + Ready for literal data
        C: pass word "x\\y
        << request-token alice 'pass word "x\\y'
        """
        + LOGGED_IN,
        mode,
    )


@three_ways
def test_login_with_non_synchronizing_literals(mode: Mode) -> None:
    play(
        READY
        + """
        C: a1 LOGIN {5+}
        C: alice {6+}
        C: secret
        << request-token alice secret
        """
        + LOGGED_IN,
        mode,
    )


@three_ways
def test_login_mixing_argument_forms(mode: Mode) -> None:
    play(
        READY
        + """
        C: a1 LOGIN "alice" {9}
        S: + Ready for literal data
        C: se cr]et!
        << request-token alice 'se cr]et!'
        """
        + LOGGED_IN,
        mode,
    )


@three_ways
def test_login_accepts_utf8_in_quoted_strings_and_atoms(mode: Mode) -> None:
    play(
        READY
        + """
        C: a1 LOGIN "jörg" pässwörd
        << request-token jörg pässwörd
        """,
        mode,
    )


@pytest.mark.parametrize(
    "line",
    [
        "a1 LOGIN alice",
        "a1 LOGIN",
        "a1 LOGIN alice secret extra",
        "a1 LOGIN  alice secret",
        "a1 LOGIN alice secret$SP",
        'a1 LOGIN "alice secret',
        'a1 LOGIN "ali\\ce" secret',
        "a1 LOGIN al(ice secret",
        'a1 LOGIN alice"x secret',
        "a1 LOGIN alice sec%ret",
        'a1 LOGIN "alice"secret',
    ],
)
@three_ways
def test_login_syntax_errors(line: str, mode: Mode) -> None:
    play(
        READY
        + f"""
        C: {line}
        S: a1 BAD Syntax error.
        """,
        mode,
    )


@three_ways
def test_login_third_literal_is_refused_before_its_data(mode: Mode) -> None:
    play(
        READY
        + """
        C: a1 LOGIN {1+}
        C: a {1+}
        C: b {3}
        S: a1 BAD Literal not accepted here.
        C: a2 NOOP
        S: a2 OK NOOP completed.
        """,
        mode,
    )


@three_ways
def test_login_third_non_synchronizing_literal_is_read_then_refused(mode: Mode) -> None:
    play(
        READY
        + """
        C: a1 LOGIN {1+}
        C: a {1+}
        C: b {3+}
        C: abc
        S: a1 BAD Syntax error.
        """,
        mode,
    )


# === AUTHENTICATE PLAIN ====================================================================
# (PLAIN, and the mechanisms for app identities, as in every protocol: test_login.py)


@three_ways
def test_authenticate_takes_no_login_mechanism_and_needs_one(mode: Mode) -> None:
    # LOGIN is a command here, so its SASL mechanism is not offered.
    play(
        READY
        + """
        C: a1 AUTHENTICATE LOGIN
        S: a1 NO Unsupported authentication mechanism.
        C: a2 AUTHENTICATE
        S: a2 BAD Syntax error.
        C: a3 AUTHENTICATE PLAIN {6+}
        C: abcdef
        S: a3 BAD Syntax error.
        """,
        mode,
    )


# === Commands before login =================================================================


@three_ways
def test_capability_noop_id_logout(mode: Mode) -> None:
    play(
        START
        + """
        C: a1 CAPABILITY
        S: * CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN
        S: a1 OK CAPABILITY completed.
        C: a2 noop
        S: a2 OK NOOP completed.
        C: a3 ID ("name" "fetchmail" "version" "6.4")
        S: * ID NIL
        S: a3 OK ID completed.
        C: a4 Logout
        S: * BYE Logging out.
        S: a4 OK LOGOUT completed.
        << close client logged out
        """,
        mode,
    )


@three_ways
def test_id_with_literal_plus_arguments(mode: Mode) -> None:
    play(
        START
        + """
        C: a1 ID ("name" {9+}
        C: fetchmail)
        S: * ID NIL
        S: a1 OK ID completed.
        """,
        mode,
    )


@three_ways
def test_commands_that_need_a_login_or_do_not_exist(mode: Mode) -> None:
    play(
        START
        + """
        C: a1 SELECT INBOX
        S: a1 NO Please authenticate first.
        C: a2 uid fetch 1:* (FLAGS)
        S: a2 NO Please authenticate first.
        C: a3 FROB
        S: a3 BAD Unknown command.
        C: a4 CAPABILITY now
        S: a4 BAD Syntax error.
        C: a5 STARTTLS
        S: a5 BAD STARTTLS is not available here.
        C: a6
        S: a6 BAD Unknown command.
        C: a7 APPEND INBOX {310}
        S: a7 NO Please authenticate first.
        C: a8 APPEND INBOX {3+}
        C: abc
        S: a8 NO Please authenticate first.
        """,
        mode,
    )


@pytest.mark.parametrize("line", ["", "+ LOGIN a b", "* NOOP", "(a) NOOP", "a{1} NOOP"])
@three_ways
def test_lines_without_a_valid_tag(line: str, mode: Mode) -> None:
    play(
        START
        + f"""
        C: {line}
        S: * BAD Syntax error: no valid tag.
        """,
        mode,
    )


@three_ways
def test_pipelined_commands_before_login_are_all_answered(mode: Mode) -> None:
    play(
        READY
        + """
        C: a1 CAPABILITY
        C: a2 NOOP
        C: a3 LOGIN alice secret
        C: a4 SELECT INBOX
        S: * CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN
        S: a1 OK CAPABILITY completed.
        S: a2 OK NOOP completed.
        << request-token alice secret
        >> token alice@contoso.com
        P: X1 AUTHENTICATE XOAUTH2 $XOAUTH2
        U: X1 OK Logged in
        S: a3 OK Logged in
        << note info logged in
        << relay server=b"a4 SELECT INBOX\\r\\n"
        """,
        mode,
    )


# === STARTTLS towards the client ===========================================================

STARTTLS_START = """
    >> start
    S: * OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID STARTTLS LOGINDISABLED] xoauth2-proxy ready.
    << connect-upstream
"""


@three_ways
def test_starttls_listener_refuses_logins_before_tls(mode: Mode) -> None:
    play(
        STARTTLS_START
        + UPSTREAM_READY
        + f"""
        C: a1 CAPABILITY
        S: * CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID STARTTLS LOGINDISABLED
        S: a1 OK CAPABILITY completed.
        C: a2 LOGIN alice secret
        S: a2 NO [PRIVACYREQUIRED] Use STARTTLS first.
        C: a3 AUTHENTICATE PLAIN $PLAIN
        S: a3 NO [PRIVACYREQUIRED] Use STARTTLS first.
        C: a4 LOGIN alice {{6}}
        S: a4 NO [PRIVACYREQUIRED] Use STARTTLS first.
        C: a5 LOGIN {{5+}}
        C: alice {{6+}}
        C: secret
        S: a5 NO [PRIVACYREQUIRED] Use STARTTLS first.
        C: a6 STARTTLS
        << start-tls client a6 {replies.IMAP_BEGIN_TLS.decode()}
        >> tls client
        C: a7 CAPABILITY
        S: * CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN
        S: a7 OK CAPABILITY completed.
        C: a8 STARTTLS
        S: a8 BAD STARTTLS is not available here.
        C: a1 LOGIN alice secret
        << request-token alice secret
        """
        + LOGGED_IN,
        mode,
        machine(ClientTls.STARTTLS),
    )


@three_ways
def test_plaintext_listener_offers_login_without_starttls(mode: Mode) -> None:
    play(
        READY
        + """
        C: a1 CAPABILITY
        S: * CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN
        S: a1 OK CAPABILITY completed.
        C: a2 STARTTLS
        S: a2 BAD STARTTLS is not available here.
        """,
        mode,
        machine(ClientTls.NONE),
    )


# === Limits ================================================================================


@pytest.mark.parametrize("marker", ["{65}", "{65+}", "{99999999999999999999}"])
@three_ways
def test_client_literal_too_large(marker: str, mode: Mode) -> None:
    play(
        START
        + f"""
        C: a1 LOGIN alice {marker}
        !! client-error * BAD Line too long.\\r\\n* BYE Closing the connection.
        """,
        mode,
        machine(max_literal=64),
    )


# === Upstream: greeting, capabilities and STARTTLS =========================================


@three_ways
def test_upstream_greeting_without_capabilities(mode: Mode) -> None:
    play(
        START
        + """
        >> server-connected
        U: * OK The Microsoft Exchange IMAP4 service is ready. [TQBOADIAUABSADAAMQBDAEEAMAAwADgA]
        P: X1 CAPABILITY
        U: * CAPABILITY IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS MOVE ID
        U: X1 OK CAPABILITY completed.
        C: a1 LOGIN alice secret
        << request-token alice secret
        >> token alice@contoso.com
        P: X2 AUTHENTICATE XOAUTH2 $XOAUTH2
        U: X2 OK AUTHENTICATE completed.
        S: a1 OK AUTHENTICATE completed.
        << note info logged in
        << relay
        """,
        mode,
    )


@three_ways
def test_upstream_capabilities_in_the_tagged_ok(mode: Mode) -> None:
    play(
        START
        + """
        >> server-connected
        U: * OK ready
        P: X1 CAPABILITY
        U: X1 OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] done
        C: a1 LOGIN alice secret
        << request-token alice secret
        >> token alice@contoso.com
        P: X2 AUTHENTICATE XOAUTH2
        U: +
        P: $XOAUTH2
        U: X2 OK done
        S: a1 OK done
        << note info logged in
        << relay
        """,
        mode,
    )


UPSTREAM_STARTTLS = """
    >> server-connected
    U: * OK [CAPABILITY IMAP4rev1 SASL-IR STARTTLS LOGINDISABLED] Dovecot ready.
    P: X1 STARTTLS
    U: X1 OK Begin TLS negotiation now.
    << start-tls server
    >> tls server
    P: X2 CAPABILITY
    U: * CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN AUTH=XOAUTH2
    U: X2 OK Pre-login capabilities listed, post-login capabilities have more.
"""


@three_ways
def test_upstream_starttls(mode: Mode) -> None:
    play(
        START
        + UPSTREAM_STARTTLS
        + """
        C: a1 LOGIN alice secret
        << request-token alice secret
        >> token alice@contoso.com
        P: X3 AUTHENTICATE XOAUTH2 $XOAUTH2
        U: X3 OK Logged in
        S: a1 OK Logged in
        << note info logged in
        << relay
        """,
        mode,
        machine(upstream_tls=UpstreamTls.STARTTLS),
    )


@three_ways
def test_upstream_starttls_asks_capabilities_first_when_the_greeting_has_none(
    mode: Mode,
) -> None:
    play(
        START
        + """
        >> server-connected
        U: * OK hello
        P: X1 CAPABILITY
        U: * CAPABILITY IMAP4rev1 STARTTLS AUTH=XOAUTH2 SASL-IR
        U: X1 OK done
        P: X2 STARTTLS
        U: X2 OK go
        << start-tls server
        >> tls server
        P: X3 CAPABILITY
        U: * CAPABILITY IMAP4rev1 AUTH=XOAUTH2
        U: X3 OK done
        C: a1 LOGIN alice secret
        << request-token alice secret
        >> token alice@contoso.com
        P: X4 AUTHENTICATE XOAUTH2
        U: +$SP
        P: $XOAUTH2
        U: X4 OK welcome
        S: a1 OK welcome
        << note info logged in
        << relay
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
        U: * OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] hi
        P: X1 CAPABILITY
        U: * CAPABILITY IMAP4rev1 AUTH=XOAUTH2
        U: X1 OK done
        << note error upstream cannot be used: upstream_tls is starttls but the server does not
        U: * ignored
        C: a1 LOGIN alice secret
        << request-token alice secret
        >> token alice@contoso.com
        << note warning login as 'alice': the upstream cannot be used
        S: a1 NO [UNAVAILABLE] Temporary failure, try again later.
        >> server-closed
        C: a2 LOGIN alice secret
        << request-token alice secret
        >> refused credentials
        S: a2 NO [AUTHENTICATIONFAILED] Authentication failed.
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
        U: * OK [CAPABILITY IMAP4rev1 STARTTLS] hi
        P: X1 STARTTLS
        U: X1 BAD not now
        << note error upstream cannot be used: it refused STARTTLS: BAD not now
        """,
        mode,
        machine(upstream_tls=UpstreamTls.STARTTLS),
    )


@three_ways
def test_upstream_capability_refused(mode: Mode) -> None:
    play(
        START
        + """
        >> server-connected
        U: * OK hi
        P: X1 CAPABILITY
        U: X1 NO go away
        << note error it refused CAPABILITY: NO go away
        """,
        mode,
    )


@three_ways
def test_upstream_preauth_is_unusable(mode: Mode) -> None:
    play(
        START
        + """
        >> server-connected
        U: * PREAUTH [CAPABILITY IMAP4rev1] logged in as nobody
        << note error it greeted with PREAUTH
        """,
        mode,
    )


@three_ways
def test_upstream_bye_greeting_then_reconnect_at_login(mode: Mode) -> None:
    play(
        START
        + """
        >> server-connected
        U: * BYE Too many connections from your IP
        << note warning upstream said BYE: Too many connections from your IP
        >> server-closed
        C: a1 LOGIN alice secret
        << request-token alice secret
        << note info reconnecting: the upstream said BYE: Too many connections
        << connect-upstream
        """
        + UPSTREAM_READY
        + LOGGED_IN,
        mode,
    )


@three_ways
def test_upstream_greeting_must_be_untagged_ok(mode: Mode) -> None:
    play(
        START
        + """
        >> server-connected
        U: X1 OK hello
        !! upstream-error * BYE [UNAVAILABLE] Temporary failure, try again later.
        """,
        mode,
    )


@three_ways
def test_upstream_untagged_chatter_before_login_is_ignored(mode: Mode) -> None:
    play(
        READY
        + """
        U: * OK [ALERT] maintenance tonight
        U: * CAPABILITY IMAP4rev1
        C: a1 LOGIN alice secret
        << request-token alice secret
        """
        + LOGGED_IN,
        mode,
    )


@three_ways
def test_upstream_line_too_long(mode: Mode) -> None:
    play(
        READY
        + f"""
        U: * OK {"x" * 300}
        !! upstream-error
        """,
        mode,
        machine(max_server_line=256),
    )


# === Upstream: the XOAUTH2 exchange ========================================================


@three_ways
def test_success_forwards_untagged_responses_and_rewrites_the_tag(mode: Mode) -> None:
    play(
        READY
        + """
        C: Tag.7 LOGIN alice secret
        << request-token alice secret
        >> token alice@contoso.com
        P: X1 AUTHENTICATE XOAUTH2 $XOAUTH2
        U: * CAPABILITY IMAP4rev1 IDLE MOVE
        U: * OK [ALERT] Your password expires soon {5}
        U: X1 OK
        U: X1 OK [CAPABILITY IMAP4rev1 IDLE MOVE] User logged in SESSIONID=<x>
        S: * CAPABILITY IMAP4rev1 IDLE MOVE
        S: * OK [ALERT] Your password expires soon {5}
        S: X1 OK
        S: Tag.7 OK [CAPABILITY IMAP4rev1 IDLE MOVE] User logged in SESSIONID=<x>
        << note info logged in
        << relay
        """,
        mode,
    )


@three_ways
def test_pipelined_tails_go_to_the_relay_unparsed(mode: Mode) -> None:
    play(
        READY
        + """
        C: a1 LOGIN alice secret
        C: a2 SELECT INBOX
        << request-token alice secret
        C: a3 FETCH 1 BODY[]
        C: a4 LOGOUT
        >> token alice@contoso.com
        P: X1 AUTHENTICATE XOAUTH2 $XOAUTH2
        U: X1 OK done
        U: * 1 EXISTS
        S: a1 OK done
        << note info logged in
        << relay server=b"a2 SELECT INBOX\\r\\na3 FETCH 1 BODY[]\\r\\na4 LOGOUT\\r\\n" $EXISTS
        """,
        mode,
    )


# === Upstream unavailable, and reconnecting ================================================


@three_ways
def test_upstream_bye_during_authentication(mode: Mode) -> None:
    play(
        READY
        + """
        C: a1 LOGIN alice secret
        << request-token alice secret
        >> token alice@contoso.com
        P: X1 AUTHENTICATE XOAUTH2 $XOAUTH2
        U: * BYE Server shutting down
        << note warning login as 'alice': the upstream said BYE: Server shutting down
        S: a1 NO [UNAVAILABLE] Temporary failure, try again later.
        U: X1 NO late answers are ignored
        >> server-closed
        """,
        mode,
    )


# === Token refusals and the login budget ===================================================


# === App identities: AUTHENTICATE EXTERNAL, XOAUTH2 and OAUTHBEARER ========================

ALL_MECHANISMS = "AUTH=PLAIN AUTH=EXTERNAL AUTH=XOAUTH2 AUTH=OAUTHBEARER"


@app_settings
@three_ways
def test_app_mechanisms_are_advertised_when_set(
    external: bool, bearer: bool, apps: str, mode: Mode
) -> None:
    offered = " ".join(f"AUTH={name}" for name in f"PLAIN{apps}".split())
    play(
        f"""
        >> start
        S: * OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID {offered}] xoauth2-proxy ready.
        << connect-upstream
        C: a1 CAPABILITY
        S: * CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID {offered}
        S: a1 OK CAPABILITY completed.
        """,
        mode,
        machine(external=external, bearer=bearer),
    )


@three_ways
def test_app_mechanisms_only_after_starttls(mode: Mode) -> None:
    play(
        STARTTLS_START
        + UPSTREAM_READY
        + f"""
        C: a1 AUTHENTICATE EXTERNAL =
        S: a1 NO [PRIVACYREQUIRED] Use STARTTLS first.
        C: a2 AUTHENTICATE XOAUTH2 $XO
        S: a2 NO [PRIVACYREQUIRED] Use STARTTLS first.
        C: a3 AUTHENTICATE OAUTHBEARER
        S: a3 NO [PRIVACYREQUIRED] Use STARTTLS first.
        C: a4 STARTTLS
        << start-tls client a4 OK Begin TLS negotiation now.
        >> tls client
        C: a5 CAPABILITY
        S: * CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID {ALL_MECHANISMS}
        S: a5 OK CAPABILITY completed.
        C: a1 AUTHENTICATE EXTERNAL =
        << request-external
        """
        + LOGGED_IN,
        mode,
        machine(ClientTls.STARTTLS, app=True),
    )


# === Secrets ===============================================================================

PASSWORD = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    "login",
    [
        f"C: a1 LOGIN alice {PASSWORD}",
        f'C: a1 LOGIN alice "{PASSWORD}"',
        "C: a1 LOGIN alice {11+}\nC: " + PASSWORD,
    ],
)
@pytest.mark.parametrize("sasl_ir", [True, False])
@pytest.mark.parametrize(
    "outcome", ["U: X1 OK yes", "U: + $CHALLENGE\nU: X1 NO no\n>> client-closed"]
)
def test_password_of_login_only_in_the_token_request(
    login: str, sasl_ir: bool, outcome: str
) -> None:
    caps = "IMAP4rev1 SASL-IR AUTH=XOAUTH2" if sasl_ir else "IMAP4rev1 AUTH=XOAUTH2"
    greeting = f">> server-connected\nU: * OK [CAPABILITY {caps}] hi\n"
    upstream = f">> token {MAILBOX}\n" + ("" if sasl_ir else "U: +\n") + outcome
    actions, shown = collect(START + greeting + f"{login}\n" + upstream, machine())
    requests = assert_hidden(
        actions,
        shown,
        [PASSWORD, b64(PASSWORD)],
        token_line=rb"(X1 AUTHENTICATE XOAUTH2 )?",
        token_lines=1,
    )
    assert [r.credentials for r in requests] == [Credentials("alice", PASSWORD)]
