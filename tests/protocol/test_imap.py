"""Transcript tests for ImapAuth: both peers, every login form, every failure path."""

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
from proxy.protocol.imap import (
    CLIENT_TRANSITIONS,
    UPSTREAM_TRANSITIONS,
    ImapAuth,
    state_diagrams,
)
from proxy.protocol.login import ClientInput, ClientState, UpstreamInput, UpstreamState
from proxy.protocol.modes import AuthSettings, ClientTls, UpstreamTls
from proxy.protocol.sasl import BearerCredentials, Credentials, xoauth2_response
from tests.protocol.playbook import (
    TOKEN,
    Feed,
    Mode,
    Step,
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
    "EXISTS": 'client=b"* 1 EXISTS\\r\\n"',
    "XOAUTH2": xoauth2_response(MAILBOX, TOKEN.value).decode(),
    "PLAIN": b64("\0alice\0secret"),
    "KEY": APP_KEY,
    # What clients that speak OAuth send, with our app key as their token.
    "XO": b64(f"user={MAILBOX}\x01auth=Bearer {APP_KEY}\x01\x01"),
    "OB": b64(f"n,a={MAILBOX},\x01host=proxy.test\x01port=993\x01auth=Bearer {APP_KEY}\x01\x01"),
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
) -> ImapAuth:
    return ImapAuth(
        AuthSettings(client_tls, upstream_tls, sasl_external=external, sasl_bearer=bearer, **limits)
    )


def play(text: str, mode: Mode = Mode.WHOLE, auth: ImapAuth | None = None) -> ImapAuth:
    auth = auth or machine()
    run(auth, transcript(text, **VARS), mode, VARS)
    return auth


def steps(text: str) -> list[Step]:
    return transcript(text, **VARS)


START = """
    >> start
    S: * OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN] xoauth2-proxy ready.
    << connect-upstream
"""
UPSTREAM_READY = """
    >> server-connected
    U: * OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ AUTH=PLAIN AUTH=XOAUTH2] Dovecot ready.
"""
READY = START + UPSTREAM_READY
LOGGED_IN = """
    >> token alice@contoso.com
    P: X1 AUTHENTICATE XOAUTH2 $XOAUTH2
    U: X1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in
    S: a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in
    << note info logged in to the upstream as 'alice@contoso.com'
    << relay
"""


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


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b'a1 LOGIN alice "\xff\xfe"\r\n', "password is not UTF-8"),
        (b"a1 LOGIN {5+}\r\nal\x01ce secret\r\n", "user name contains control characters"),
        (b'a1 LOGIN "" secret\r\n', "user name is empty"),
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
                << note info login refused without asking for a token: {why}
                S: a1 NO [AUTHENTICATIONFAILED] Authentication failed.
            """),
        ],
        mode,
    )


# === AUTHENTICATE PLAIN ====================================================================


@three_ways
def test_authenticate_plain_with_initial_response(mode: Mode) -> None:
    play(
        READY
        + """
        C: a1 AUTHENTICATE PLAIN $PLAIN
        << request-token alice secret
        """
        + LOGGED_IN,
        mode,
    )


@three_ways
def test_authenticate_plain_with_continuation(mode: Mode) -> None:
    play(
        READY
        + """
        C: a1 authenticate plain
        S: +$SP
        C: $PLAIN
        << request-token alice secret
        """
        + LOGGED_IN,
        mode,
    )


@three_ways
def test_authenticate_plain_with_authorization_identity(mode: Mode) -> None:
    plain = b64("shared@contoso.com\0alice\0secret")
    play(
        READY
        + f"""
        C: a1 AUTHENTICATE PLAIN {plain}
        << request-token alice secret shared@contoso.com
        """,
        mode,
    )


@three_ways
def test_authenticate_empty_initial_response_is_not_plain(mode: Mode) -> None:
    play(
        READY
        + """
        C: a1 AUTHENTICATE PLAIN =
        S: a1 BAD Invalid SASL PLAIN message.
        """,
        mode,
    )


@three_ways
def test_authenticate_cancelled(mode: Mode) -> None:
    auth = play(
        READY
        + """
        C: a1 AUTHENTICATE PLAIN
        S: +$SP
        C: *
        S: a1 BAD Authentication cancelled.
        C: a2 AUTHENTICATE PLAIN $PLAIN
        << request-token alice secret
        """,
        mode,
    )
    assert auth.client_state is ClientState.AWAITING_TOKEN


@pytest.mark.parametrize("bad", ["AGFsaWNlAHNlY3JldA", "AGFsaWNlAHNl Y3JldA==", "!!!!", "="])
@three_ways
def test_authenticate_continuation_needs_strict_base64(bad: str, mode: Mode) -> None:
    play(
        READY
        + f"""
        C: a1 AUTHENTICATE PLAIN
        S: +$SP
        C: {bad}
        S: a1 BAD Invalid base64 in SASL response.
        """,
        mode,
    )


@pytest.mark.parametrize("bad", ["AGFsaWNlAHNlY3JldA", "!!!!", "AGFsaWNl\tAHNlY3JldA=="])
@three_ways
def test_authenticate_initial_response_needs_strict_base64(bad: str, mode: Mode) -> None:
    play(
        READY
        + f"""
        C: a1 AUTHENTICATE PLAIN {bad}
        S: a1 BAD Invalid base64 in SASL response.
        """,
        mode,
    )


@three_ways
def test_authenticate_malformed_plain_message(mode: Mode) -> None:
    two_fields = b64("alice\0secret")
    play(
        READY
        + f"""
        C: a1 AUTHENTICATE PLAIN {two_fields}
        S: a1 BAD Invalid SASL PLAIN message.
        """,
        mode,
    )


@three_ways
def test_authenticate_other_mechanisms_and_syntax(mode: Mode) -> None:
    play(
        READY
        + """
        C: a1 AUTHENTICATE LOGIN
        S: a1 NO Unsupported authentication mechanism.
        C: a2 AUTHENTICATE XOAUTH2 dG9rZW4=
        S: a2 NO Unsupported authentication mechanism.
        C: a3 AUTHENTICATE
        S: a3 BAD Syntax error.
        C: a4 AUTHENTICATE PLAIN a b
        S: a4 BAD Syntax error.
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
def test_bad_command_budget(mode: Mode) -> None:
    play(
        START
        + """
        C: a1 FROB
        S: a1 BAD Unknown command.
        C: a2 SELECT INBOX
        S: a2 NO Please authenticate first.
        C: a3 AUTHENTICATE PLAIN
        S: +$SP
        C: *
        S: a3 BAD Authentication cancelled.
        << note info client sent 3 invalid commands
        S: * BYE Too many invalid commands.
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


@pytest.mark.parametrize("injected", ["a2 LOGIN alice secret", "x"])
def test_plaintext_pipelined_behind_starttls_is_refused(injected: str) -> None:
    # Whole only: the injected bytes must arrive with the STARTTLS line to be caught here
    # (later ones are caught by the driver or the next test).
    play(
        STARTTLS_START
        + f"""
        C: a1 STARTTLS
        C: {injected}
        !! client-error * BYE Protocol error.
        """,
        Mode.WHOLE,
        machine(ClientTls.STARTTLS),
    )


@two_ways
def test_data_during_client_tls_negotiation_is_refused(mode: Mode) -> None:
    play(
        STARTTLS_START
        + """
        C: a1 STARTTLS
        << start-tls client a1 OK Begin TLS negotiation now.
        C: a2 LOGIN alice secret
        !! client-error * BYE Protocol error.
        """,
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


@three_ways
def test_client_line_too_long(mode: Mode) -> None:
    play(
        START
        + f"""
        C: a1 LOGIN alice {"x" * 60}
        !! client-error * BAD Line too long.\\r\\n* BYE Closing the connection.
        """,
        mode,
        machine(max_line=64),
    )


@three_ways
def test_client_line_at_the_limit_is_fine(mode: Mode) -> None:
    line = "a1 LOGIN alice " + "x" * (64 - 2 - len("a1 LOGIN alice "))
    play(
        START
        + f"""
        C: {line}
        << request-token alice {"x" * (64 - 2 - 15)}
        """,
        mode,
        machine(max_line=64),
    )


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


@two_ways
def test_too_much_pipelined_behind_the_login(mode: Mode) -> None:
    play(
        READY
        + f"""
        C: a1 LOGIN alice secret
        << request-token alice secret
        C: a2 APPEND INBOX {{150+}}
        C: {"x" * 150}
        !! client-error * BYE Too much data pipelined behind the login.
        """,
        mode,
        machine(max_line=64, max_literal=64),
    )


@pytest.mark.parametrize(
    "limits",
    [{"max_line": 10}, {"max_server_line": 63}, {"max_literal": -1}, {"max_bad_commands": 0}],
)
def test_settings_refuse_unusable_limits(limits: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="limit"):
        AuthSettings(
            ClientTls.IMPLICIT,
            UpstreamTls.IMPLICIT,
            sasl_external=False,
            sasl_bearer=False,
            **limits,
        )


def test_error_state_refuses_every_later_event() -> None:
    auth = play(
        START
        + f"""
        C: {"x" * 70}
        !! client-error * BAD Line too long.\\r\\n* BYE Closing the connection.
        """,
        Mode.WHOLE,
        machine(max_line=64),
    )
    assert auth.client_state is ClientState.ERROR
    assert auth.upstream_state is UpstreamState.ERROR
    with pytest.raises(ClientProtocolError) as caught:
        auth.handle(ServerConnected())
    assert caught.value.reply_hint == replies.IMAP.line_too_long


@pytest.mark.parametrize(
    "at",
    [START, READY, READY + "C: a1 LOGIN alice secret\n<< request-token alice secret\n"],
)
def test_client_closing_at_any_time_closes(at: str) -> None:
    auth = play(at + ">> client-closed\n<< close client closed the connection\n")
    assert auth.client_state is ClientState.CLOSED


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


def test_upstream_data_behind_its_starttls_ok_is_refused() -> None:
    play(
        START
        + """
        >> server-connected
        U: * OK [CAPABILITY IMAP4rev1 STARTTLS] hi
        P: X1 STARTTLS
        U: X1 OK go
        U: * CAPABILITY IMAP4rev1 AUTH=XOAUTH2
        !! upstream-error * BYE [UNAVAILABLE] Temporary failure, try again later.
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
        U: * OK [CAPABILITY IMAP4rev1 STARTTLS] hi
        P: X1 STARTTLS
        U: X1 OK go
        << start-tls server
        U: * BYE
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
def test_upstream_without_xoauth2_is_unusable(mode: Mode) -> None:
    play(
        START
        + """
        >> server-connected
        U: * OK [CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=OAUTHBEARER] hi
        P: X1 CAPABILITY
        U: * CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=OAUTHBEARER
        U: X1 OK done
        << note error it does not offer AUTH=XOAUTH2 (SASL mechanisms offered: OAUTHBEARER PLAIN)
        C: a1 AUTHENTICATE PLAIN $PLAIN
        << request-token alice secret
        >> token alice@contoso.com
        << note warning does not offer AUTH=XOAUTH2
        S: a1 NO [UNAVAILABLE] Temporary failure, try again later.
        """,
        mode,
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


@pytest.mark.parametrize(
    "line",
    ["garbage", "X7 OK what", "X1 OK", "+ go on", "X1 FROB x"],
)
@three_ways
def test_upstream_unexpected_responses(line: str, mode: Mode) -> None:
    play(
        READY
        + f"""
        U: {line}
        !! upstream-error
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


@three_ways
def test_token_issued_before_the_upstream_is_ready(mode: Mode) -> None:
    play(
        START
        + """
        C: a1 LOGIN alice secret
        << request-token alice secret
        >> token alice@contoso.com
        >> server-connected
        U: * OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready
        P: X1 AUTHENTICATE XOAUTH2 $XOAUTH2
        U: X1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in
        S: a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in
        << note info logged in
        << relay
        """,
        mode,
    )


ERROR_CHALLENGE = b64('{"status":"invalid_token","schemes":"bearer","scope":"mail"}')


@three_ways
def test_error_challenge_then_retry(mode: Mode) -> None:
    play(
        READY
        + f"""
        C: a1 LOGIN alice secret
        << request-token alice secret
        >> token alice@contoso.com
        P: X1 AUTHENTICATE XOAUTH2 $XOAUTH2
        U: + {ERROR_CHALLENGE}
        P:
        U: X1 NO [AUTHENTICATIONFAILED] Authentication failed.
        << note warning (error challenge: schemes=bearer, scope=mail, status=invalid_token)
        S: a1 NO [AUTHENTICATIONFAILED] Authentication failed.
        C: a2 LOGIN alice secret
        << request-token alice secret
        >> token alice@contoso.com
        P: X2 AUTHENTICATE XOAUTH2 $XOAUTH2
        U: X2 OK Logged in
        S: a2 OK Logged in
        << note info logged in
        << relay
        """,
        mode,
    )


@three_ways
def test_error_challenge_without_sasl_ir(mode: Mode) -> None:
    play(
        START
        + f"""
        >> server-connected
        U: * OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] ready
        C: a1 LOGIN alice secret
        << request-token alice secret
        >> token alice@contoso.com
        P: X1 AUTHENTICATE XOAUTH2
        U: +$SP
        P: $XOAUTH2
        U: + {ERROR_CHALLENGE}
        P:
        U: X1 NO AUTHENTICATE failed.
        << note warning the upstream rejected the token: NO AUTHENTICATE failed. (error challenge
        S: a1 NO [AUTHENTICATIONFAILED] Authentication failed.
        """,
        mode,
    )


@three_ways
def test_upstream_no_without_challenge(mode: Mode) -> None:
    play(
        READY
        + """
        C: a1 LOGIN alice secret
        << request-token alice secret
        >> token alice@contoso.com
        P: X1 AUTHENTICATE XOAUTH2 $XOAUTH2
        U: X1 NO AUTHENTICATE failed.
        << note warning login as 'alice' (mailbox 'alice@contoso.com'): the upstream rejected
        S: a1 NO [AUTHENTICATIONFAILED] Authentication failed.
        """,
        mode,
    )


@three_ways
def test_upstream_temporary_failure_stays_temporary(mode: Mode) -> None:
    play(
        READY
        + """
        C: a1 LOGIN alice secret
        << request-token alice secret
        >> token alice@contoso.com
        P: X1 AUTHENTICATE XOAUTH2 $XOAUTH2
        U: X1 NO [UNAVAILABLE] Temporary authentication failure.
        << note warning upstream temporarily unavailable: NO [UNAVAILABLE]
        S: a1 NO [UNAVAILABLE] Temporary failure, try again later.
        """,
        mode,
    )


@three_ways
def test_upstream_bad_is_not_a_password_problem(mode: Mode) -> None:
    play(
        READY
        + """
        C: a1 LOGIN alice secret
        << request-token alice secret
        >> token alice@contoso.com
        P: X1 AUTHENTICATE XOAUTH2 $XOAUTH2
        U: X1 BAD Unknown authentication mechanism
        << note error refused the XOAUTH2 exchange itself: BAD Unknown authentication
        S: a1 NO [UNAVAILABLE] Temporary failure, try again later.
        """,
        mode,
    )


@three_ways
def test_upstream_refusing_before_the_token_is_not_a_password_problem(mode: Mode) -> None:
    play(
        START
        + """
        >> server-connected
        U: * OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] ready
        C: a1 LOGIN alice secret
        << request-token alice secret
        >> token alice@contoso.com
        P: X1 AUTHENTICATE XOAUTH2
        U: X1 NO mechanism disabled
        << note error refused the XOAUTH2 exchange itself: NO mechanism disabled
        S: a1 NO [UNAVAILABLE] Temporary failure, try again later.
        """,
        mode,
    )


@three_ways
def test_upstream_accepting_without_a_token_is_an_error(mode: Mode) -> None:
    play(
        START
        + """
        >> server-connected
        U: * OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] ready
        C: a1 LOGIN alice secret
        << request-token alice secret
        >> token alice@contoso.com
        P: X1 AUTHENTICATE XOAUTH2
        U: X1 OK welcome
        !! upstream-error
        """,
        mode,
    )


@three_ways
def test_unexpected_continuation_after_the_error_challenge(mode: Mode) -> None:
    play(
        READY
        + f"""
        C: a1 LOGIN alice secret
        << request-token alice secret
        >> token alice@contoso.com
        P: X1 AUTHENTICATE XOAUTH2 $XOAUTH2
        U: + {ERROR_CHALLENGE}
        P:
        U: + again
        !! upstream-error
        """,
        mode,
    )


# === Upstream unavailable, and reconnecting ================================================


@three_ways
def test_upstream_unavailable_at_start_reconnects_at_login(mode: Mode) -> None:
    play(
        START
        + """
        >> server-unavailable upstream imap.example:993: connection refused
        << note warning upstream is unavailable: upstream imap.example:993: connection refused
        C: a1 LOGIN alice secret
        << request-token alice secret
        << note info reconnecting: the upstream is unavailable: upstream imap.example:993
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
        C: a1 LOGIN alice secret
        << request-token alice secret
        << note info reconnecting
        << connect-upstream
        >> server-unavailable still no route
        >> token alice@contoso.com
        << note warning 'alice': the upstream is unavailable: still no route; answered UNAVAILABLE
        S: a1 NO [UNAVAILABLE] Temporary failure, try again later.
        C: a2 LOGIN alice wrong
        << request-token alice wrong
        << note info reconnecting
        << connect-upstream
        >> server-unavailable still no route
        >> refused credentials
        S: a2 NO [AUTHENTICATIONFAILED] Authentication failed.
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
        C: a1 LOGIN alice secret
        << request-token alice secret
        << note info reconnecting: the upstream closed the connection
        << connect-upstream
        >> token alice@contoso.com
        """
        + UPSTREAM_READY
        + """
        P: X1 AUTHENTICATE XOAUTH2 $XOAUTH2
        U: X1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in
        S: a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in
        << note info logged in
        << relay
        """,
        mode,
    )


@three_ways
def test_upstream_lost_while_the_token_is_fetched_reconnects(mode: Mode) -> None:
    play(
        READY
        + """
        C: a1 LOGIN alice secret
        << request-token alice secret
        U: * BYE Autologout; idle for too long
        >> server-closed
        << note info reconnecting: the upstream said BYE: Autologout; idle for too long
        << connect-upstream
        """
        + UPSTREAM_READY
        + LOGGED_IN,
        mode,
    )


@three_ways
def test_upstream_closed_during_authentication(mode: Mode) -> None:
    play(
        READY
        + """
        C: a1 LOGIN alice secret
        << request-token alice secret
        >> token alice@contoso.com
        P: X1 AUTHENTICATE XOAUTH2 $XOAUTH2
        >> server-closed
        << note warning login as 'alice': the upstream closed the connection during authentication
        S: a1 NO [UNAVAILABLE] Temporary failure, try again later.
        C: a2 LOGIN alice secret
        << request-token alice secret
        << note info reconnecting
        << connect-upstream
        """,
        mode,
    )


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


@three_ways
def test_waiting_login_fails_when_the_upstream_turns_out_unusable(mode: Mode) -> None:
    play(
        START
        + """
        C: a1 LOGIN alice secret
        << request-token alice secret
        >> token alice@contoso.com
        >> server-connected
        U: * OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready
        P: X1 CAPABILITY
        U: X1 OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] done
        << note error upstream cannot be used
        << note warning login as 'alice': the upstream cannot be used
        S: a1 NO [UNAVAILABLE] Temporary failure, try again later.
        """,
        mode,
    )


# === Token refusals and the login budget ===================================================


@three_ways
def test_token_refused_for_bad_credentials(mode: Mode) -> None:
    auth = play(
        READY
        + """
        C: a1 LOGIN alice wrong
        << request-token alice wrong
        >> refused credentials
        S: a1 NO [AUTHENTICATIONFAILED] Authentication failed.
        C: a2 LOGIN nobody secret
        << request-token nobody secret
        >> refused credentials
        S: a2 NO [AUTHENTICATIONFAILED] Authentication failed.
        """,
        mode,
    )
    assert auth.client_state is ClientState.NOT_AUTHENTICATED


@three_ways
def test_token_refused_temporarily(mode: Mode) -> None:
    play(
        READY
        + """
        C: a1 AUTHENTICATE PLAIN $PLAIN
        << request-token alice secret
        >> refused unavailable
        S: a1 NO [UNAVAILABLE] Temporary failure, try again later.
        """,
        mode,
    )


@three_ways
def test_failed_login_then_pipelined_commands_are_parsed(mode: Mode) -> None:
    play(
        READY
        + """
        C: a1 LOGIN alice wrong
        C: a2 NOOP
        << request-token alice wrong
        >> refused credentials
        S: a1 NO [AUTHENTICATIONFAILED] Authentication failed.
        S: a2 OK NOOP completed.
        """,
        mode,
    )


@three_ways
def test_failed_login_budget(mode: Mode) -> None:
    play(
        READY
        + """
        C: a1 LOGIN alice wrong
        << request-token alice wrong
        >> refused credentials
        S: a1 NO [AUTHENTICATIONFAILED] Authentication failed.
        C: a2 LOGIN alice "\\xff"
        S: a2 BAD Syntax error.
        C: a3 LOGIN alice secret
        << request-token alice secret
        >> token alice@contoso.com
        P: X1 AUTHENTICATE XOAUTH2 $XOAUTH2
        U: X1 NO AUTHENTICATE failed.
        << note warning the upstream rejected the token
        S: a3 NO [AUTHENTICATIONFAILED] Authentication failed.
        << note info 2 failed logins: closing
        S: * BYE Too many failed logins.
        << close too many failed logins
        """,
        mode,
        machine(max_auth_failures=2),
    )


def test_refusal_bytes_are_the_same_for_every_credential_problem() -> None:
    answers = []
    for refused in ("alice wrong", "nobody secret"):
        auth = machine()
        auth.start()
        auth.handle(ClientDataReceived(f"t LOGIN {refused}\r\n".encode()))
        answers.append(auth.handle(TokenRefused(Refusal.CREDENTIALS)))
    assert answers[0] == answers[1] == [SendToClient(b"t " + replies.IMAP.auth_failed + b"\r\n")]


# === App identities: AUTHENTICATE EXTERNAL, XOAUTH2 and OAUTHBEARER ========================

ALL_MECHANISMS = "AUTH=PLAIN AUTH=EXTERNAL AUTH=XOAUTH2 AUTH=OAUTHBEARER"
APP_START = f"""
    >> start
    S: * OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID {ALL_MECHANISMS}] xoauth2-proxy ready.
    << connect-upstream
"""
APP_READY = APP_START + UPSTREAM_READY


def app_machine(client_tls: ClientTls = ClientTls.IMPLICIT, **limits: int) -> ImapAuth:
    return machine(client_tls, UpstreamTls.IMPLICIT, external=True, bearer=True, **limits)


@pytest.mark.parametrize(
    ("external", "bearer", "offered"),
    [
        (False, False, "AUTH=PLAIN"),
        (True, False, "AUTH=PLAIN AUTH=EXTERNAL"),
        (False, True, "AUTH=PLAIN AUTH=XOAUTH2 AUTH=OAUTHBEARER"),
        (True, True, ALL_MECHANISMS),
    ],
)
@three_ways
def test_app_mechanisms_are_advertised_when_set(
    external: bool, bearer: bool, offered: str, mode: Mode
) -> None:
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


@pytest.mark.parametrize(
    ("external", "bearer", "offered", "unknown"),
    [
        (False, False, "AUTH=PLAIN", ["EXTERNAL", "XOAUTH2", "oauthbearer"]),
        (True, False, "AUTH=PLAIN AUTH=EXTERNAL", ["XOAUTH2", "OAUTHBEARER"]),
        (False, True, "AUTH=PLAIN AUTH=XOAUTH2 AUTH=OAUTHBEARER", ["external"]),
    ],
)
@three_ways
def test_app_mechanisms_not_set_are_unknown_mechanisms(
    external: bool, bearer: bool, offered: str, unknown: list[str], mode: Mode
) -> None:
    lines = "".join(
        f"C: a{n} AUTHENTICATE {name} $XO\nS: a{n} NO Unsupported authentication mechanism.\n"
        f"C: b{n} AUTHENTICATE {name}\nS: b{n} NO Unsupported authentication mechanism.\n"
        for n, name in enumerate(unknown)
    )
    play(
        f"""
        >> start
        S: * OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID {offered}] xoauth2-proxy ready.
        << connect-upstream
        """
        + UPSTREAM_READY
        + lines,
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
        app_machine(ClientTls.STARTTLS),
    )


@pytest.mark.parametrize(
    ("initial", "authzid"),
    [("=", ""), (b64("shared@contoso.com"), "shared@contoso.com")],
)
@three_ways
def test_authenticate_external_with_initial_response(
    initial: str, authzid: str, mode: Mode
) -> None:
    auth = play(
        APP_READY
        + f"""
        C: a1 AUTHENTICATE external {initial}
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
def test_authenticate_external_with_continuation(response: str, authzid: str, mode: Mode) -> None:
    play(
        APP_READY
        + f"""
        C: a1 AUTHENTICATE EXTERNAL
        S: +$SP
        C: {response}
        << request-external {authzid}
        """
        + LOGGED_IN,
        mode,
        app_machine(),
    )


@three_ways
def test_authenticate_external_refused_without_a_challenge(mode: Mode) -> None:
    control = b64("bad\x00name")
    auth = play(
        APP_READY
        + f"""
        C: a1 AUTHENTICATE EXTERNAL =
        << request-external
        >> refused credentials
        S: a1 NO [AUTHENTICATIONFAILED] Authentication failed.
        C: a2 AUTHENTICATE EXTERNAL {control}
        << note info login refused without asking for a token: authorization identity
        S: a2 NO [AUTHENTICATIONFAILED] Authentication failed.
        C: a3 AUTHENTICATE EXTERNAL
        S: +$SP
        C: *
        S: a3 BAD Authentication cancelled.
        C: a4 AUTHENTICATE EXTERNAL
        S: +$SP
        C: =
        S: a4 BAD Invalid base64 in SASL response.
        C: a5 AUTHENTICATE EXTERNAL =
        << request-external
        >> refused unavailable
        S: a5 NO [UNAVAILABLE] Temporary failure, try again later.
        """,
        mode,
        app_machine(max_auth_failures=4),
    )
    assert auth.client_state is ClientState.NOT_AUTHENTICATED


@pytest.mark.parametrize(
    ("mechanism", "message"), [("XOAUTH2", "$XO"), ("OAUTHBEARER", "$OB"), ("xoauth2", "$XO")]
)
@three_ways
def test_authenticate_bearer_with_initial_response(
    mechanism: str, message: str, mode: Mode
) -> None:
    auth = play(
        APP_READY
        + f"""
        C: a1 AUTHENTICATE {mechanism} {message}
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
def test_authenticate_bearer_with_continuation(mechanism: str, message: str, mode: Mode) -> None:
    play(
        APP_READY
        + f"""
        C: a1 AUTHENTICATE {mechanism}
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
        APP_READY
        + f"""
        C: a1 AUTHENTICATE {mechanism} {message}
        << request-bearer alice@contoso.com $KEY
        >> refused credentials
        S: + {challenge}
        C: {answer}
        S: a1 NO [AUTHENTICATIONFAILED] Authentication failed.
        C: a2 AUTHENTICATE {mechanism}
        S: +$SP
        C: {message}
        << request-bearer alice@contoso.com $KEY
        """
        + LOGGED_IN.replace("a1 OK", "a2 OK"),
        mode,
        app_machine(),
    )
    assert auth.client_state is ClientState.AUTHENTICATED


@three_ways
def test_error_challenge_waits_for_the_answer_and_then_parses_commands(mode: Mode) -> None:
    play(
        APP_READY
        + """
        C: a1 AUTHENTICATE XOAUTH2 $XO
        C: a2 NOOP
        << request-bearer alice@contoso.com $KEY
        >> refused credentials
        S: + $XO_REFUSED
        S: a1 NO [AUTHENTICATIONFAILED] Authentication failed.
        C: a3 NOOP
        S: a3 OK NOOP completed.
        """,
        mode,
        app_machine(),
    )


@three_ways
def test_temporary_refusal_of_an_app_key_has_no_challenge(mode: Mode) -> None:
    play(
        APP_READY
        + """
        C: a1 AUTHENTICATE OAUTHBEARER $OB
        << request-bearer alice@contoso.com $KEY
        >> refused unavailable
        S: a1 NO [UNAVAILABLE] Temporary failure, try again later.
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
        "XOAUTH2",
        b64("user=a@b\x01auth=Basic YTpi\x01\x01"),
        "XOAUTH2: auth must be 'Bearer <token>'",
        id="basic",
    ),
    pytest.param(
        "XOAUTH2", b64("user=a@b\x01auth=Bearer  \x01\x01"), "XOAUTH2: auth must be", id="no-key"
    ),
    pytest.param(
        "OAUTHBEARER",
        b64(f"p=tls-unique,,\x01auth=Bearer {APP_KEY}\x01\x01"),
        "OAUTHBEARER: channel binding",
        id="cb",
    ),
    pytest.param(
        "OAUTHBEARER",
        b64(f"n,a=a=b,\x01auth=Bearer {APP_KEY}\x01\x01"),
        "OAUTHBEARER: '=' in a user name",
        id="saslname",
    ),
    pytest.param("OAUTHBEARER", "AQ==", "OAUTHBEARER: must end with two ^A", id="just-a-control-a"),
]


@pytest.mark.parametrize(("mechanism", "message", "why"), MALFORMED_BEARER)
@pytest.mark.parametrize("initial", [True, False], ids=["initial", "continuation"])
@three_ways
def test_malformed_bearer_message_gets_the_error_challenge(
    mechanism: str, message: str, why: str, initial: bool, mode: Mode
) -> None:
    challenge = "$XO_REFUSED" if mechanism == "XOAUTH2" else "$OB_REFUSED"
    command = (
        f"C: a1 AUTHENTICATE {mechanism} {message}"
        if initial
        else f"C: a1 AUTHENTICATE {mechanism}\nS: +$SP\nC: {'' if message == '=' else message}"
    )
    auth = play(
        APP_READY
        + f"""
        {command}
        << note info login refused without asking for a token: {why}
        S: + {challenge}
        C:
        S: a1 NO [AUTHENTICATIONFAILED] Authentication failed.
        """,
        mode,
        app_machine(),
    )
    assert auth.client_state is ClientState.NOT_AUTHENTICATED


@three_ways
def test_bearer_base64_errors_and_cancel_are_like_plain(mode: Mode) -> None:
    play(
        APP_READY
        + """
        C: a1 AUTHENTICATE XOAUTH2 !!!!
        S: a1 BAD Invalid base64 in SASL response.
        C: a2 AUTHENTICATE OAUTHBEARER
        S: +$SP
        C: AQ
        S: a2 BAD Invalid base64 in SASL response.
        C: a3 AUTHENTICATE XOAUTH2
        S: +$SP
        C: *
        S: a3 BAD Authentication cancelled.
        C: a4 AUTHENTICATE XOAUTH2 $XO extra
        S: a4 BAD Syntax error.
        """,
        mode,
        app_machine(),
    )


@three_ways
def test_bearer_failures_count_against_the_login_budget(mode: Mode) -> None:
    play(
        APP_READY
        + """
        C: a1 AUTHENTICATE XOAUTH2 $XO
        << request-bearer alice@contoso.com $KEY
        >> refused credentials
        S: + $XO_REFUSED
        C:
        S: a1 NO [AUTHENTICATIONFAILED] Authentication failed.
        C: a2 AUTHENTICATE OAUTHBEARER =
        << note info login refused without asking for a token
        S: + $OB_REFUSED
        C: AQ==
        S: a2 NO [AUTHENTICATIONFAILED] Authentication failed.
        << note info 2 failed logins: closing
        S: * BYE Too many failed logins.
        << close too many failed logins
        """,
        mode,
        app_machine(max_auth_failures=2),
    )


@three_ways
def test_client_closing_during_the_error_challenge(mode: Mode) -> None:
    auth = play(
        APP_READY
        + """
        C: a1 AUTHENTICATE XOAUTH2 $XO
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
        APP_READY
        + f"""
        C: a1 AUTHENTICATE XOAUTH2 $XO
        << request-bearer alice@contoso.com $KEY
        >> refused credentials
        S: + $XO_REFUSED
        C: {"x" * 300}
        !! client-error * BAD Line too long.\\r\\n* BYE Closing the connection.
        """,
        mode,
        app_machine(max_line=200),
    )


@three_ways
def test_upstream_refusing_the_token_of_a_bearer_login_is_answered_directly(mode: Mode) -> None:
    play(
        APP_READY
        + """
        C: a1 AUTHENTICATE XOAUTH2 $XO
        << request-bearer alice@contoso.com $KEY
        >> token alice@contoso.com
        P: X1 AUTHENTICATE XOAUTH2 $XOAUTH2
        U: X1 NO [AUTHENTICATIONFAILED] no
        << note warning the upstream rejected the token
        S: a1 NO [AUTHENTICATIONFAILED] Authentication failed.
        """,
        mode,
        app_machine(),
    )


# === Driver contract, secrets, tables ======================================================


@pytest.mark.parametrize(
    ("setup", "event"),
    [
        ("", TokenIssued(MAILBOX, TOKEN)),
        ("", TokenRefused(Refusal.UNAVAILABLE)),
        ("C: a1 AUTHENTICATE PLAIN", TokenIssued(MAILBOX, TOKEN)),
        ("", TlsEstablished(Side.CLIENT)),
        ("", TlsEstablished(Side.SERVER)),
        ("", ServerConnected()),
        ("", ServerUnavailable("late")),
        (">> server-closed", ServerDataReceived(b"* OK\r\n")),
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
    auth = play(READY + "C: a1 LOGIN alice secret\n<< request-token alice secret\n" + LOGGED_IN)
    with pytest.raises(RuntimeError):
        auth.handle(ClientDataReceived(b"x"))


def _all_actions(text: str, auth: ImapAuth) -> tuple[list[Action], list[str]]:
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
        f"C: a1 LOGIN alice {SECRET}",
        f'C: a1 LOGIN alice "{SECRET}"',
        "C: a1 LOGIN alice {11+}\nC: " + SECRET,
        "C: a1 AUTHENTICATE PLAIN " + b64(f"\0alice\0{SECRET}"),
        "C: a1 AUTHENTICATE PLAIN\nC: " + b64(f"\0alice\0{SECRET}"),
    ],
)
@pytest.mark.parametrize("sasl_ir", [True, False])
@pytest.mark.parametrize(
    "outcome", ["U: X1 OK yes", f"U: + {ERROR_CHALLENGE}\nU: X1 NO no\n>> client-closed"]
)
def test_secrets_only_in_the_token_request_and_the_xoauth2_line(
    login: str, sasl_ir: bool, outcome: str
) -> None:
    caps = "IMAP4rev1 SASL-IR AUTH=XOAUTH2" if sasl_ir else "IMAP4rev1 AUTH=XOAUTH2"
    text = (
        START
        + f">> server-connected\nU: * OK [CAPABILITY {caps}] hi\n{login}\n"
        + ">> token alice@contoso.com\n"
        + ("" if sasl_ir else "U: +\n")
        + outcome
    )
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
            assert re.fullmatch(
                rb"(X1 AUTHENTICATE XOAUTH2 )?" + token_b64.encode() + rb"\r\n", action.data
            )
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
    pytest.param("C: a1 AUTHENTICATE XOAUTH2 $XO", id="xoauth2"),
    pytest.param("C: a1 AUTHENTICATE XOAUTH2\nC: $XO", id="xoauth2-continued"),
    pytest.param("C: a1 AUTHENTICATE OAUTHBEARER $OB", id="oauthbearer"),
    pytest.param("C: a1 AUTHENTICATE OAUTHBEARER\nC: $OB", id="oauthbearer-continued"),
]
APP_OUTCOMES = [
    pytest.param(">> token alice@contoso.com\nU: X1 OK yes", id="ok"),
    pytest.param(
        f">> token alice@contoso.com\nU: + {ERROR_CHALLENGE}\nU: X1 NO no\n>> client-closed",
        id="upstream-challenge",
    ),
    pytest.param(">> refused credentials\nC: AQ==\nC: a2 NOOP", id="refused"),
    pytest.param(">> refused unavailable\nC: a2 NOOP", id="unavailable"),
]


@pytest.mark.parametrize("login", APP_LOGINS)
@pytest.mark.parametrize("outcome", APP_OUTCOMES)
def test_app_key_only_in_the_token_request(login: str, outcome: str) -> None:
    actions, reprs = _all_actions(APP_READY + f"{login}\n{outcome}\n", app_machine())
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
    text = APP_READY + f"C: a1 AUTHENTICATE XOAUTH2 {message}\nC:\n"
    actions, reprs = _all_actions(text, app_machine())
    sent = b"".join(action.data for action in actions if isinstance(action, SendToClient))
    assert sent.endswith(b"\r\na1 " + replies.IMAP.auth_failed + b"\r\n")
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
            assert action.data == b"X1 AUTHENTICATE XOAUTH2 " + token_b64.encode() + b"\r\n"
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
    auth.handle(ServerDataReceived(b"* OK [CAPABILITY SASL-IR AUTH=XOAUTH2] hi\r\n"))
    auth.handle(ClientDataReceived(b"a LOGIN u p\r\nb NOOP\r\n"))
    auth.handle(TokenIssued(MAILBOX, TOKEN))
    actions = auth.handle(ServerDataReceived(b"X1 OK\r\n"))
    relay = actions[-1]
    assert isinstance(relay, BeginRelay)
    assert relay.to_server == b"b NOOP\r\n"


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
        set(ClientState)
        - {ClientState.CONNECTED, ClientState.HELD, ClientState.USER_GIVEN}
        - {ClientState.SASL_USERNAME, ClientState.SASL_PASSWORD},
        {ClientState.PLAINTEXT, ClientState.NOT_AUTHENTICATED},
        {ClientState.AUTHENTICATED, ClientState.CLOSED, ClientState.ERROR},
    )
    _check_table(
        UPSTREAM_TRANSITIONS,
        set(UpstreamState),
        {UpstreamState.DOWN},
        {UpstreamState.AUTHENTICATED, UpstreamState.ERROR},
    )
    assert CLIENT_TRANSITIONS.next_state(ClientState.TLS_NEGOTIATION, ClientInput.DATA) is None
    assert (
        UPSTREAM_TRANSITIONS.next_state(UpstreamState.READY, UpstreamInput.AUTHENTICATE_IR)
        is UpstreamState.TOKEN_SENT
    )
    dot = state_diagrams()
    assert dot.count("digraph") == 2
    for state in (*CLIENT_TRANSITIONS.states(), *UPSTREAM_TRANSITIONS.states()):
        assert f'"{state.name}"' in dot
    assert '"PLAINTEXT" -> "TLS_NEGOTIATION" [label="starttls"];' in dot
