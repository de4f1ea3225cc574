"""Transcript tests of what every protocol's login machine does alike (proxy.protocol.login):
limits and deadlines of the login phase, STARTTLS on both sides, pipelining, the login
budgets, token refusals, upstream failures and reconnecting, app identities, the driver's
contract, secrets and the transition tables. Each runs once per protocol, in its words
(:mod:`tests.protocol.dialects`); what only one protocol's grammar says is in its own file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from proxy.protocol import imap, pop3, smtp
from proxy.protocol.actions import Note, SendToClient
from proxy.protocol.errors import ClientProtocolError
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
from proxy.protocol.sasl import BearerCredentials, Credentials
from tests.protocol.dialects import (
    APP_KEY,
    DIALECTS,
    IMAP,
    MAILBOX,
    PASSWORD,
    SMTP,
    VARS,
    Dialect,
    assert_hidden,
    b64,
    collect,
    each_dialect,
    each_login_dialect,
)
from tests.protocol.playbook import TOKEN, Feed, Mode, run, three_ways, two_ways

if TYPE_CHECKING:
    from collections.abc import Callable

    from proxy.protocol.transitions import InputT, StateT, TransitionTable

REFUSED = ">> refused credentials\n"


# === SASL: PLAIN for all, LOGIN where it is offered =======================================


@each_dialect
@three_ways
def test_plain_with_initial_response(d: Dialect, mode: Mode) -> None:
    auth = d.play(d.ready + d.login() + d.logged_in(), mode)
    assert auth.client_state is ClientState.AUTHENTICATED
    assert auth.upstream_state is UpstreamState.AUTHENTICATED
    assert auth.buffered == 0


@each_dialect
@three_ways
def test_plain_with_continuation(d: Dialect, mode: Mode) -> None:
    login = d.auth("plain") + d.prompt() + "C: $PLAIN\n<< request-token alice secret\n"
    d.play(d.ready + login + d.logged_in(), mode)


@each_dialect
@three_ways
def test_plain_with_authorization_identity(d: Dialect, mode: Mode) -> None:
    plain = b64("shared@contoso.com\0alice\0secret")
    d.play(
        d.ready + d.auth(f"PLAIN {plain}") + "<< request-token alice secret shared@contoso.com\n",
        mode,
    )


@each_dialect
@three_ways
def test_plain_message_must_have_three_fields(d: Dialect, mode: Mode) -> None:
    # "=" is an empty initial response; an empty line an empty continuation response.
    d.play(
        d.ready
        + d.auth("PLAIN =")
        + d.s(d.invalid_sasl)
        + d.auth("PLAIN", "a2")
        + d.prompt()
        + "C:\n"
        + d.s(d.invalid_sasl, "a2")
        + d.auth(f"PLAIN {b64('alice' + chr(0) + 'secret')}", "a3")
        + d.s(d.invalid_sasl, "a3"),
        mode,
    )


@each_dialect
@three_ways
def test_other_mechanisms_and_arguments(d: Dialect, mode: Mode) -> None:
    d.play(
        d.ready
        + d.auth("XOAUTH2 dG9rZW4=")
        + d.s(d.unsupported)
        + d.auth("CRAM-MD5", "a2")
        + d.s(d.unsupported, "a2")
        + d.auth("PLAIN a b", "a3")
        + d.s(d.syntax_error, "a3"),
        mode,
    )


def _sasl_steps(d: Dialect) -> dict[str, str]:
    """Each SASL continuation request a client may answer, with what led to it."""
    steps = {"plain": d.auth("PLAIN") + d.prompt()}
    if d.login_mechanism:
        steps["login-user"] = d.auth("LOGIN") + d.prompt("VXNlcm5hbWU6")
        steps["login-password"] = d.auth("LOGIN $ALICE") + d.prompt("UGFzc3dvcmQ6")
    return steps


SASL_STEPS = [pytest.param(d, step, id=f"{d}-{step}") for d in DIALECTS for step in _sasl_steps(d)]


@pytest.mark.parametrize(("d", "step"), SASL_STEPS)
@three_ways
def test_sasl_cancelled_at_every_step(d: Dialect, step: str, mode: Mode) -> None:
    auth = d.play(
        d.ready + _sasl_steps(d)[step] + "C: *\n" + d.s(d.cancelled) + d.login(tag="a2"), mode
    )
    assert auth.client_state is ClientState.AWAITING_TOKEN


@pytest.mark.parametrize("bad", ["AGFsaWNlAHNlY3JldA", "AGFsaWNlAHNl Y3JldA==", "!!!!", "="])
@pytest.mark.parametrize(("d", "step"), SASL_STEPS)
@three_ways
def test_continuations_need_strict_base64(d: Dialect, step: str, bad: str, mode: Mode) -> None:
    auth = d.play(
        d.ready
        + _sasl_steps(d)[step]
        + f"C: {bad}\n"
        + d.s(d.invalid_base64)
        + d.exchange(d.harmless, "a2"),
        mode,
    )
    assert auth.client_state is not ClientState.CLOSED


@pytest.mark.parametrize("bad", ["AGFsaWNlAHNlY3JldA", "!!!!", "AGFsaWNl\tAHNlY3JldA=="])
@pytest.mark.parametrize(
    ("d", "mechanism"),
    [
        pytest.param(d, m, id=f"{d}-{m}")
        for d in DIALECTS
        for m in ("PLAIN", "LOGIN")
        if m == "PLAIN" or d.login_mechanism
    ],
)
@three_ways
def test_initial_responses_need_strict_base64(
    d: Dialect, mechanism: str, bad: str, mode: Mode
) -> None:
    d.play(d.ready + d.auth(f"{mechanism} {bad}") + d.s(d.invalid_base64), mode)


@each_login_dialect
@three_ways
def test_login_with_continuations(d: Dialect, mode: Mode) -> None:
    login = _sasl_steps(d)["login-user"] + "C: $ALICE\n" + d.prompt("UGFzc3dvcmQ6") + "C: $SECRET\n"
    d.play(d.ready + login + "<< request-token alice secret\n" + d.logged_in(), mode)


@each_login_dialect
@three_ways
def test_login_with_the_user_name_as_initial_response(d: Dialect, mode: Mode) -> None:
    login = d.auth("Login $ALICE") + d.prompt("UGFzc3dvcmQ6") + "C: $SECRET\n"
    d.play(d.ready + login + "<< request-token alice secret\n" + d.logged_in(), mode)


@pytest.mark.parametrize(
    ("user", "password"), [("alice", "pä ss wörd"), ("jörg", "")], ids=["spaces", "empty"]
)
@each_login_dialect
@three_ways
def test_login_takes_utf8_and_any_password(
    d: Dialect, user: str, password: str, mode: Mode
) -> None:
    login = d.auth(f"LOGIN {b64(user)}") + d.prompt("UGFzc3dvcmQ6") + f"C: {b64(password)}\n"
    d.play(
        d.ready + login + f"<< request-token {user} '{password}'\n",
        mode,
    )


# === Budgets: refused commands and failed logins ===========================================


@each_dialect
@three_ways
def test_bad_command_budget(d: Dialect, mode: Mode) -> None:
    # Pipelined: each refusal is answered in order, a command answered locally does not
    # count, a cancelled SASL exchange does, and the one that spends the budget closes.
    play = d.start + d.hello
    play += d.c(d.unknown[0], "a1") + d.c(d.after_login[0], "a2") + d.c(d.harmless[0], "a3")
    play += d.auth("PLAIN", "a4") + "C: *\n"
    play += d.s(d.unknown[1], "a1") + d.s(d.after_login[1], "a2") + d.s(d.harmless[1], "a3")
    play += d.prompt() + d.s(d.cancelled, "a4")
    play += "<< note info client sent 3 invalid commands\n" + d.too_many_errors
    d.play(play + "<< close too many invalid commands\n", mode, d.machine(max_bad_commands=3))


@each_dialect
@three_ways
def test_failed_login_budget(d: Dialect, mode: Mode) -> None:
    # A refused password and a rejected token count; a refused command between them does not.
    d.play(
        d.ready
        + d.login("PLAIN_WRONG", "alice wrong")
        + REFUSED
        + d.s(d.failed)
        + d.exchange(d.unknown, "a2")
        + d.login(tag="a3")
        + f">> token {MAILBOX}\n{d.token_out}{d.rejected}"
        + "<< note warning the upstream rejected the token\n"
        + d.s(d.failed, "a3")
        + "<< note info 2 failed logins: closing\n"
        + d.too_many_failures
        + "<< close too many failed logins\n",
        mode,
        d.machine(max_auth_failures=2),
    )


@each_dialect
@three_ways
def test_failed_login_then_pipelined_commands_are_parsed(d: Dialect, mode: Mode) -> None:
    command, answer = d.after_login
    d.play(
        d.ready
        + d.auth("PLAIN $PLAIN_WRONG")
        + d.c(command, "a2")
        + d.c(d.harmless[0], "a3")
        + "<< request-token alice wrong\n"
        + REFUSED
        + d.s(d.failed)
        + d.s(answer, "a2")
        + d.s(d.harmless[1], "a3"),
        mode,
    )


@each_dialect
@three_ways
def test_token_refused_permanently_then_temporarily(d: Dialect, mode: Mode) -> None:
    auth = d.play(
        d.ready
        + d.login("PLAIN_WRONG", "alice wrong")
        + REFUSED
        + d.s(d.failed)
        + d.auth(f"PLAIN {b64(chr(0) + 'nobody' + chr(0) + 'secret')}", "a2")
        + "<< request-token nobody secret\n"
        + REFUSED
        + d.s(d.failed, "a2")
        + d.login(tag="a3")
        + ">> refused unavailable\n"
        + d.s(d.unavailable, "a3"),
        mode,
        d.machine(max_auth_failures=4),
    )
    assert auth.client_state is ClientState.NOT_AUTHENTICATED


@each_dialect
def test_refusal_bytes_are_the_same_for_every_credential_problem(d: Dialect) -> None:
    answers = []
    hello = b"HELO x\r\n" if d is SMTP else b""
    tag = b"t " if d is IMAP else b""
    for who in ("\0alice\0wrong", "\0nobody\0secret"):
        auth = d.machine()
        auth.start()
        login = tag + f"{d.auth_verb} PLAIN {b64(who)}\r\n".encode()
        auth.handle(ClientDataReceived(hello + login))
        answers.append(auth.handle(TokenRefused(Refusal.CREDENTIALS)))
    assert answers[0] == answers[1] == [SendToClient(tag + d.failed.encode() + b"\r\n")]


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (b64("\0\0secret"), "PLAIN authentication identity is empty"),
        (b64("\0al\x7fice\0secret"), "user name contains control characters"),
        (b64("\0alice\0se\ncret"), "password contains control characters"),
        ("AGFsaWNlAP8=", "password is not UTF-8"),
    ],
)
@each_dialect
@three_ways
def test_impossible_credentials_fail_like_a_wrong_password(
    d: Dialect, message: str, why: str, mode: Mode
) -> None:
    d.play(
        d.ready
        + d.auth(f"PLAIN {message}")
        + f"<< note info login refused without asking for a token: {why}\n"
        + d.s(d.failed),
        mode,
    )


IMPOSSIBLE = [
    pytest.param(d, raw, answered, why, id=f"{d}-{why}")
    for d in DIALECTS
    for raw, answered, why in d.impossible
]


@pytest.mark.parametrize(("d", "raw", "answered", "why"), IMPOSSIBLE)
@three_ways
def test_impossible_credentials_in_the_protocols_own_logins(
    d: Dialect, raw: bytes, answered: str, why: str, mode: Mode
) -> None:
    refused = f"<< note info login refused without asking for a token: {why}\n" + d.s(d.failed)
    steps = [*d.steps(d.ready), Feed(ClientDataReceived(raw)), *d.steps(answered + refused)]
    run(d.machine(), steps, mode, trailers=d.trailers)


# === Limits ================================================================================


@pytest.mark.parametrize("over", [0, 1], ids=["at-the-limit", "over-it"])
@each_dialect
@three_ways
def test_client_lines_are_bounded(d: Dialect, over: int, mode: Mode) -> None:
    password = "x" * 40
    line = d.auth(f"PLAIN {b64(f'{chr(0)}alice{chr(0)}{password}')}")
    limit = len(line) - len("C: \n") + len("\r\n") - over
    outcome = d.hint("client", d.line_too_long) if over else f"<< request-token alice {password}\n"
    d.play(d.start + d.hello + line + outcome, mode, d.machine(max_line=limit))


@each_dialect
@two_ways
def test_too_much_pipelined_behind_the_login(d: Dialect, mode: Mode) -> None:
    # Exactly the allowance waits; one byte more is refused.
    allowance = d.allowance(64, 64)
    auth = d.play(
        d.ready + d.login() + f"C: {'x' * (allowance - 2)}\n",
        mode,
        d.machine(max_line=64, max_literal=64),
    )
    with pytest.raises(ClientProtocolError) as caught:
        auth.handle(ClientDataReceived(b"y"))
    assert caught.value.reply_hint == d.pipelined.encode() + b"\r\n"


@each_dialect
def test_error_state_refuses_every_later_event(d: Dialect) -> None:
    auth = d.play(
        d.start + f"C: {'x' * 70}\n" + d.hint("client", d.line_too_long),
        Mode.WHOLE,
        d.machine(max_line=64),
    )
    assert auth.client_state is ClientState.ERROR
    assert auth.upstream_state is UpstreamState.ERROR
    with pytest.raises(ClientProtocolError) as caught:
        auth.handle(ServerConnected())
    assert caught.value.reply_hint == d.line_too_long.replace("\\r\\n", "\r\n").encode() + b"\r\n"


@pytest.mark.parametrize(
    "at", ["start", "ready", "sasl", "awaiting-token", "authorizing", "error-challenge"]
)
@each_dialect
def test_client_closing_at_any_time_closes(d: Dialect, at: str) -> None:
    text = {
        "start": d.start,
        "ready": d.ready,
        "sasl": d.ready + d.auth("PLAIN") + d.prompt(),
        "awaiting-token": d.ready + d.login(),
        "authorizing": d.start + d.hello + d.login() + f">> token {MAILBOX}\n",
        "error-challenge": d.app_ready
        + d.auth("XOAUTH2 $XO")
        + f"<< request-bearer {MAILBOX} $KEY\n"
        + REFUSED
        + d.prompt("$XO_REFUSED"),
    }[at]
    closed = ">> client-closed\n<< close client closed the connection\n"
    auth = d.play(text + closed, auth=d.machine(app=at == "error-challenge"))
    assert auth.client_state is ClientState.CLOSED


@pytest.mark.parametrize(
    "limits",
    [{"max_line": 10}, {"max_server_line": 63}, {"max_literal": -1}, {"max_bad_commands": 0}],
)
def test_settings_refuse_unusable_limits(limits: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="limit"):
        AuthSettings(ClientTls.IMPLICIT, UpstreamTls.IMPLICIT, False, False, **limits)


# === STARTTLS towards the client and towards the upstream ==================================


@pytest.mark.parametrize("injected", ["login", "x"])
@each_dialect
def test_plaintext_pipelined_behind_starttls_is_refused(d: Dialect, injected: str) -> None:
    # Whole only: the injected bytes must arrive with the STARTTLS line to be caught here
    # (later ones are caught by the driver, or by the next test).
    command = d.auth("PLAIN $PLAIN", "a2") if injected == "login" else "C: x\n"
    d.play(
        d.starttls_start + d.c(d.starttls[0]) + command + d.hint("client", d.protocol_error),
        Mode.WHOLE,
        d.machine(ClientTls.STARTTLS),
    )


@each_dialect
@two_ways
def test_data_during_client_tls_negotiation_is_refused(d: Dialect, mode: Mode) -> None:
    command, preface = d.starttls
    d.play(
        d.starttls_start
        + d.c(command)
        + f"<< start-tls client {d.s(preface)[3:]}"
        + d.auth("PLAIN $PLAIN", "a2")
        + d.hint("client", d.protocol_error),
        mode,
        d.machine(ClientTls.STARTTLS),
    )


@each_dialect
def test_upstream_data_behind_its_starttls_go_ahead_is_refused(d: Dialect) -> None:
    d.play(
        d.start + d.upstream_starttls + "U: injected\n" + d.hint("upstream", d.upstream_error),
        Mode.WHOLE,
        d.machine(upstream_tls=UpstreamTls.STARTTLS),
    )


@each_dialect
@two_ways
def test_upstream_data_during_tls_negotiation_is_refused(d: Dialect, mode: Mode) -> None:
    d.play(
        d.start + d.upstream_starttls + "<< start-tls server\n" + d.goodbye + "!! upstream-error\n",
        mode,
        d.machine(upstream_tls=UpstreamTls.STARTTLS),
    )


@each_dialect
@three_ways
def test_upstream_lost_during_its_tls_handshake_reconnects_at_login(d: Dialect, mode: Mode) -> None:
    d.play(
        d.start
        + d.upstream_starttls
        + "<< start-tls server\n"
        + ">> server-unavailable upstream: certificate verify failed\n"
        + "<< note warning upstream is unavailable: upstream: certificate verify failed\n"
        + d.hello
        + d.login()
        + "<< note info reconnecting: the upstream is unavailable\n<< connect-upstream\n",
        mode,
        d.machine(upstream_tls=UpstreamTls.STARTTLS),
    )


# === The upstream: when it is ready, lost, or unusable =====================================


@each_dialect
@three_ways
def test_token_issued_before_the_upstream_is_ready(d: Dialect, mode: Mode) -> None:
    auth = d.play(
        d.start
        + d.hello
        + d.login()
        + f">> token {MAILBOX}\n"
        + d.upstream_ready
        + d.logged_in().partition("\n")[2],
        mode,
    )
    assert auth.client_state is ClientState.AUTHENTICATED
    assert auth.upstream_state is UpstreamState.AUTHENTICATED
    assert auth.buffered == 0


@each_dialect
@three_ways
def test_upstream_unavailable_at_start_reconnects_at_login(d: Dialect, mode: Mode) -> None:
    d.play(
        d.start
        + ">> server-unavailable upstream mail.example: connection refused\n"
        + "<< note warning upstream is unavailable: upstream mail.example: connection refused\n"
        + d.hello
        + d.login()
        + "<< note info reconnecting: the upstream is unavailable: upstream mail.example\n"
        + "<< connect-upstream\n"
        + d.upstream_ready
        + d.logged_in(),
        mode,
    )


@each_dialect
@three_ways
def test_upstream_unavailable_twice_fails_the_login_temporarily(d: Dialect, mode: Mode) -> None:
    reconnect = "<< note info reconnecting\n<< connect-upstream\n>> server-unavailable no\n"
    d.play(
        d.start
        + ">> server-unavailable no route\n"
        + "<< note warning upstream is unavailable: no route\n"
        + d.hello
        + d.login()
        + reconnect
        + f">> token {MAILBOX}\n"
        + f"<< note warning login as 'alice': the upstream is unavailable: no; "
        f"answered {d.unavailable_name}\n"
        + d.s(d.unavailable)
        + d.login("PLAIN_WRONG", "alice wrong", "a2")
        + reconnect
        # A refused password is still reported as such.
        + REFUSED
        + d.s(d.failed, "a2"),
        mode,
    )


@each_dialect
@three_ways
def test_upstream_closed_while_the_client_typed(d: Dialect, mode: Mode) -> None:
    d.play(
        d.ready
        + ">> server-closed\n"
        + "<< note info upstream closed the connection; the next login will reconnect\n"
        + d.login()
        + "<< note info reconnecting: the upstream closed the connection\n<< connect-upstream\n"
        + f">> token {MAILBOX}\n"
        + d.upstream_ready
        + d.logged_in().partition("\n")[2],
        mode,
    )


@each_dialect
@three_ways
def test_upstream_goodbye_while_the_token_is_fetched_reconnects(d: Dialect, mode: Mode) -> None:
    d.play(
        d.ready
        + d.login()
        + d.goodbye
        + ">> server-closed\n"
        + f"<< note info reconnecting: the upstream {d.goodbye_said}\n<< connect-upstream\n"
        + d.upstream_ready
        + d.logged_in(),
        mode,
    )


@each_dialect
@three_ways
def test_upstream_goodbye_while_idle_is_noted(d: Dialect, mode: Mode) -> None:
    d.play(
        d.ready
        + d.goodbye
        + f"<< note warning upstream {d.goodbye_said}; the next login will reconnect\n"
        + "U: anything\n"
        + ">> server-closed\n"
        + d.login()
        + f"<< note info reconnecting: the upstream {d.goodbye_said}\n<< connect-upstream\n",
        mode,
    )


@pytest.mark.parametrize("sent", ["login", "token"])
@each_dialect
@three_ways
def test_upstream_closed_during_authentication(d: Dialect, sent: str, mode: Mode) -> None:
    token_out = d.token_out if sent == "token" else d.token_out.splitlines(keepends=True)[0]
    d.play(
        d.ready
        + d.login()
        + f">> token {MAILBOX}\n"
        + token_out
        + ">> server-closed\n"
        + "<< note warning login as 'alice': the upstream closed the connection during "
        f"authentication; answered {d.unavailable_name}\n"
        + d.s(d.unavailable)
        + d.login(tag="a2")
        + "<< note info reconnecting\n<< connect-upstream\n",
        mode,
    )


@each_dialect
@three_ways
def test_waiting_login_fails_when_the_upstream_turns_out_unusable(d: Dialect, mode: Mode) -> None:
    d.play(
        d.start
        + d.hello
        + d.login()
        + f">> token {MAILBOX}\n"
        + d.no_xoauth2
        + f"<< note error upstream cannot be used: {d.no_xoauth2_said}\n"
        + "<< note warning login as 'alice': the upstream cannot be used\n"
        + d.s(d.unavailable)
        # Unusable for the rest of the session: no reconnecting.
        + d.login(tag="a2")
        + f">> token {MAILBOX}\n"
        + "<< note warning login as 'alice': the upstream cannot be used\n"
        + d.s(d.unavailable, "a2"),
        mode,
    )


@each_dialect
@three_ways
def test_pipelined_bytes_and_the_upstream_tail_go_to_the_relay_unread(
    d: Dialect, mode: Mode
) -> None:
    # Even what looks like another login, with a password, goes to the upstream unread.
    again = f"{'a2 ' if d.tags else ''}{d.auth_verb} PLAIN $PLAIN"
    more = f"{'a3 ' if d.tags else ''}{d.after_login[0]}"
    accepted, answered = d.accepted.splitlines(keepends=True)
    d.play(
        d.ready
        + d.auth("PLAIN $PLAIN")
        + f"C: {again}\n<< request-token alice secret\nC: {more}\n"
        + f">> token {MAILBOX}\n{d.token_out}{accepted}U: tail\n{answered}"
        + "<< note info logged in\n"
        + f'<< relay server=b"{again}\\r\\n{more}\\r\\n" client=b"tail\\r\\n"\n',
        mode,
    )


UNEXPECTED = [pytest.param(d, line, id=f"{d}-{line}") for d in DIALECTS for line in d.unexpected]


@pytest.mark.parametrize(("d", "line"), UNEXPECTED)
@three_ways
def test_upstream_saying_what_nobody_asked_is_an_error(d: Dialect, line: str, mode: Mode) -> None:
    d.play(d.ready + f"U: {line}\n" + d.hint("upstream", d.upstream_error), mode)


@pytest.mark.parametrize("at", ["greeting", "ready"])
@each_dialect
@three_ways
def test_upstream_lines_are_bounded(d: Dialect, at: str, mode: Mode) -> None:
    before = d.ready if at == "ready" else d.start + ">> server-connected\n"
    d.play(
        before + f"U: {'x' * 300}\n" + d.hint("upstream", d.upstream_error),
        mode,
        d.machine(max_server_line=256),
    )


# === The upstream's answers to the XOAUTH2 login ===========================================

REFUSALS = [
    pytest.param(d, line, note, id=f"{d}-{n}")
    for d in DIALECTS
    for n, (line, note) in enumerate(d.refusals)
]


@pytest.mark.parametrize(("d", "line", "note"), REFUSALS)
@three_ways
def test_upstream_refusals(d: Dialect, line: str, note: str, mode: Mode) -> None:
    # Only a rejected token is the password's fault; anything else is temporary.
    answer = d.failed if "rejected the token" in note else d.unavailable
    auth = d.play(
        d.ready + d.login() + f">> token {MAILBOX}\n{d.token_out}U: {line}\n"
        f"<< note {note}\n" + d.s(answer),
        mode,
    )
    assert auth.client_state is ClientState.NOT_AUTHENTICATED
    assert auth.upstream_state is UpstreamState.READY


EARLY_REFUSALS = [
    pytest.param(d, line, note, id=f"{d}-{n}")
    for d in DIALECTS
    for n, (line, note) in enumerate(d.early_refusals)
]


@pytest.mark.parametrize(("d", "line", "note"), EARLY_REFUSALS)
@three_ways
def test_upstream_refusing_the_login_before_the_token(
    d: Dialect, line: str, note: str, mode: Mode
) -> None:
    # The proxy and the upstream disagree about XOAUTH2 itself: nobody's password problem.
    first = d.two_step_out.splitlines(keepends=True)[0]
    d.play(
        d.start
        + d.two_step_ready
        + d.hello
        + d.login()
        + f">> token {MAILBOX}\n{first}U: {line}\n<< note {note}\n"
        + d.s(d.unavailable),
        mode,
    )


@each_dialect
def test_token_rejection_note_names_the_likely_causes(d: Dialect) -> None:
    rejected = f">> token {MAILBOX}\n{d.token_out}{d.rejected}"
    actions, _ = collect(d.ready + d.login() + rejected, d.machine())
    note = next(action for action in actions if isinstance(action, Note))
    assert note.text.startswith("login as 'alice' (mailbox 'alice@contoso.com'): the upstream")
    for cause in d.causes:
        assert cause in note.text


@pytest.mark.parametrize(
    ("provider", "named"),
    [("oauth2", "issuer, audience, scope"), ("google", "domain-wide delegation")],
)
@each_dialect
def test_token_rejection_causes_speak_the_providers_language(
    d: Dialect, provider: str, named: str
) -> None:
    auth = d.machine()
    collect(d.ready + d.login(), auth)
    actions = auth.handle(TokenIssued(MAILBOX, TOKEN, provider=provider))
    for step in d.steps(d.token_out + d.rejected):
        if isinstance(step, Feed) and step.event is not None:
            actions += auth.handle(step.event)
    note = next(a for a in actions if isinstance(a, Note) and "rejected the token" in a.text)
    assert named in note.text
    for word in ("Exchange", "AccessAsApp", "SendAsApp", "service principal", "FullAccess"):
        assert word not in note.text
    assert actions[-1] == SendToClient(d.s(d.failed)[3:].replace("\n", "\r\n").encode())


@pytest.mark.parametrize("two_step", [False, True], ids=["one-step", "two-step"])
@pytest.mark.parametrize("then", ["rejected", "accepted"])
@each_dialect
@three_ways
def test_error_challenge_is_answered_for_the_final_reply(
    d: Dialect, two_step: bool, then: str, mode: Mode
) -> None:
    ready, out = (d.two_step_ready, d.two_step_out) if two_step else (d.upstream_ready, d.token_out)
    challenge = f"U: {d.prompt_marker} $CHALLENGE\nP:\n"
    if then == "accepted":
        final = d.logged_in().partition("\n")[2].replace(d.token_out, "")
    else:
        why = "(error challenge: schemes=bearer, scope=mail, status=401)"
        # The connection stays usable: the next login goes to it.
        retry = d.login(tag="a2") + f">> token {MAILBOX}\n" + out.replace("X1", "X2")
        final = d.rejected + f"<< note warning {why}\n" + d.s(d.failed) + retry
    d.play(
        d.start + ready + d.hello + d.login() + f">> token {MAILBOX}\n{out}{challenge}{final}", mode
    )


@pytest.mark.parametrize(
    "line", ["accepted", "challenge"], ids=["accepted-without-a-token", "second-challenge"]
)
@each_dialect
@three_ways
def test_upstream_breaking_the_exchange(d: Dialect, line: str, mode: Mode) -> None:
    first = d.two_step_out.splitlines(keepends=True)[0]
    if line == "accepted":
        exchange = first + d.accepted.splitlines(keepends=True)[0]
    else:
        marker = d.prompt_marker
        exchange = d.two_step_out + f"U: {marker} $CHALLENGE\nP:\nU: {marker} again\n"
    d.play(
        d.start
        + d.two_step_ready
        + d.hello
        + d.login()
        + f">> token {MAILBOX}\n{exchange}"
        + d.hint("upstream", d.upstream_error),
        mode,
    )


# === App identities: EXTERNAL, XOAUTH2 and OAUTHBEARER =====================================


@pytest.mark.parametrize(
    ("external", "bearer", "unknown"),
    [
        (False, False, ["EXTERNAL", "XOAUTH2", "oauthbearer"]),
        (True, False, ["XOAUTH2", "OAUTHBEARER"]),
        (False, True, ["external"]),
    ],
)
@each_dialect
@three_ways
def test_app_mechanisms_not_set_are_unknown_mechanisms(
    d: Dialect, external: bool, bearer: bool, unknown: list[str], mode: Mode
) -> None:
    lines = "".join(
        d.auth(f"{name} $XO", f"a{n}")
        + d.s(d.unsupported, f"a{n}")
        + d.auth(name, f"b{n}")
        + d.s(d.unsupported, f"b{n}")
        for n, name in enumerate(unknown)
    )
    greeting = d.started(external=external, bearer=bearer)
    d.play(
        greeting + d.upstream_ready + d.hello + lines,
        mode,
        d.machine(external=external, bearer=bearer),
    )


@pytest.mark.parametrize(
    ("initial", "authzid"), [("=", ""), (b64("shared@contoso.com"), "shared@contoso.com")]
)
@each_dialect
@three_ways
def test_external_with_initial_response(d: Dialect, initial: str, authzid: str, mode: Mode) -> None:
    auth = d.play(
        d.app_ready
        + d.auth(f"external {initial}")
        + f"<< request-external {authzid}\n".replace(" \n", "\n")
        + d.logged_in(),
        mode,
        d.machine(app=True),
    )
    assert auth.client_state is ClientState.AUTHENTICATED


@pytest.mark.parametrize(
    ("response", "authzid"), [("", ""), (b64("shared@contoso.com"), "shared@contoso.com")]
)
@each_dialect
@three_ways
def test_external_with_continuation(d: Dialect, response: str, authzid: str, mode: Mode) -> None:
    d.play(
        d.app_ready
        + d.auth("EXTERNAL")
        + d.prompt()
        + f"C: {response}\n"
        + f"<< request-external {authzid}\n".replace(" \n", "\n")
        + d.logged_in(),
        mode,
        d.machine(app=True),
    )


@each_dialect
@three_ways
def test_external_refused_without_a_challenge(d: Dialect, mode: Mode) -> None:
    auth = d.play(
        d.app_ready
        + d.auth("EXTERNAL =")
        + "<< request-external\n"
        + REFUSED
        + d.s(d.failed)
        + d.auth(f"EXTERNAL {b64('bad' + chr(0) + 'name')}", "a2")
        + "<< note info login refused without asking for a token: authorization identity\n"
        + d.s(d.failed, "a2")
        + d.auth("EXTERNAL", "a3")
        + d.prompt()
        + "C: *\n"
        + d.s(d.cancelled, "a3")
        + d.auth("EXTERNAL", "a4")
        + d.prompt()
        + "C: =\n"
        + d.s(d.invalid_base64, "a4")
        + d.auth("EXTERNAL =", "a5")
        + "<< request-external\n"
        + ">> refused unavailable\n"
        + d.s(d.unavailable, "a5"),
        mode,
        d.machine(app=True, max_auth_failures=4),
    )
    assert auth.client_state is ClientState.NOT_AUTHENTICATED


@pytest.mark.parametrize(
    ("mechanism", "message"), [("XOAUTH2", "$XO"), ("OAUTHBEARER", "$OB"), ("xoauth2", "$XO")]
)
@each_dialect
@three_ways
def test_bearer_with_initial_response(d: Dialect, mechanism: str, message: str, mode: Mode) -> None:
    auth = d.play(
        d.app_ready
        + d.auth(f"{mechanism} {message}")
        + f"<< request-bearer {MAILBOX} $KEY\n"
        + d.logged_in(),
        mode,
        d.machine(app=True),
    )
    assert auth.client_state is ClientState.AUTHENTICATED
    assert auth.upstream_state is UpstreamState.AUTHENTICATED


@pytest.mark.parametrize(("mechanism", "message"), [("XOAUTH2", "$XO"), ("OAuthBearer", "$OB")])
@each_dialect
@three_ways
def test_bearer_with_continuation(d: Dialect, mechanism: str, message: str, mode: Mode) -> None:
    d.play(
        d.app_ready
        + d.auth(mechanism)
        + d.prompt()
        + f"C: {message}\n"
        + f"<< request-bearer {MAILBOX} $KEY\n"
        + d.logged_in(),
        mode,
        d.machine(app=True),
    )


@pytest.mark.parametrize(
    ("mechanism", "message", "challenge", "answer"),
    [
        ("XOAUTH2", "$XO", "$XO_REFUSED", ""),
        ("OAUTHBEARER", "$OB", "$OB_REFUSED", "AQ=="),
        ("OAUTHBEARER", "$OB", "$OB_REFUSED", "*"),
    ],
)
@each_dialect
@three_ways
def test_refused_app_key_gets_the_error_challenge(
    d: Dialect, mechanism: str, message: str, challenge: str, answer: str, mode: Mode
) -> None:
    auth = d.play(
        d.app_ready
        + d.auth(f"{mechanism} {message}")
        + f"<< request-bearer {MAILBOX} $KEY\n"
        + REFUSED
        + d.prompt(challenge)
        + f"C: {answer}\n"
        + d.s(d.failed)
        + d.auth(mechanism, "a2")
        + d.prompt()
        + f"C: {message}\n"
        + f"<< request-bearer {MAILBOX} $KEY\n"
        + d.logged_in("a2"),
        mode,
        d.machine(app=True),
    )
    assert auth.client_state is ClientState.AUTHENTICATED


@each_dialect
@three_ways
def test_error_challenge_waits_for_the_answer_and_then_parses_commands(
    d: Dialect, mode: Mode
) -> None:
    # The line pipelined behind the login answers the error challenge, whatever it says.
    d.play(
        d.app_ready
        + d.auth("XOAUTH2 $XO")
        + d.c(d.harmless[0], "a2")
        + f"<< request-bearer {MAILBOX} $KEY\n"
        + REFUSED
        + d.prompt("$XO_REFUSED")
        + d.s(d.failed)
        + d.exchange(d.harmless, "a3"),
        mode,
        d.machine(app=True),
    )


@each_dialect
@three_ways
def test_temporary_refusal_of_an_app_key_has_no_challenge(d: Dialect, mode: Mode) -> None:
    d.play(
        d.app_ready
        + d.auth("OAUTHBEARER $OB")
        + f"<< request-bearer {MAILBOX} $KEY\n"
        + ">> refused unavailable\n"
        + d.s(d.unavailable),
        mode,
        d.machine(app=True),
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
@each_dialect
@three_ways
def test_malformed_bearer_message_gets_the_error_challenge(
    d: Dialect, mechanism: str, message: str, why: str, initial: bool, mode: Mode
) -> None:
    challenge = "$XO_REFUSED" if mechanism == "XOAUTH2" else "$OB_REFUSED"
    if initial:
        login = d.auth(f"{mechanism} {message}")
    else:
        login = d.auth(mechanism) + d.prompt() + f"C: {'' if message == '=' else message}\n"
    auth = d.play(
        d.app_ready
        + login
        + f"<< note info login refused without asking for a token: {why}\n"
        + d.prompt(challenge)
        + "C:\n"
        + d.s(d.failed),
        mode,
        d.machine(app=True),
    )
    assert auth.client_state is ClientState.NOT_AUTHENTICATED


@each_dialect
@three_ways
def test_bearer_base64_errors_and_cancel_are_like_plain(d: Dialect, mode: Mode) -> None:
    d.play(
        d.app_ready
        + d.auth("XOAUTH2 !!!!")
        + d.s(d.invalid_base64)
        + d.auth("OAUTHBEARER", "a2")
        + d.prompt()
        + "C: AQ\n"
        + d.s(d.invalid_base64, "a2")
        + d.auth("XOAUTH2", "a3")
        + d.prompt()
        + "C: *\n"
        + d.s(d.cancelled, "a3")
        + d.auth("XOAUTH2 $XO extra", "a4")
        + d.s(d.syntax_error, "a4"),
        mode,
        d.machine(app=True),
    )


@each_dialect
@three_ways
def test_bearer_failures_count_against_the_login_budget(d: Dialect, mode: Mode) -> None:
    d.play(
        d.app_ready
        + d.auth("XOAUTH2 $XO")
        + f"<< request-bearer {MAILBOX} $KEY\n"
        + REFUSED
        + d.prompt("$XO_REFUSED")
        + "C:\n"
        + d.s(d.failed)
        + d.auth("OAUTHBEARER =", "a2")
        + "<< note info login refused without asking for a token\n"
        + d.prompt("$OB_REFUSED")
        + "C: AQ==\n"
        + d.s(d.failed, "a2")
        + "<< note info 2 failed logins: closing\n"
        + d.too_many_failures
        + "<< close too many failed logins\n",
        mode,
        d.machine(app=True, max_auth_failures=2),
    )


@each_dialect
@two_ways
def test_error_challenge_answer_is_bounded_like_any_line(d: Dialect, mode: Mode) -> None:
    d.play(
        d.app_ready
        + d.auth("XOAUTH2 $XO")
        + f"<< request-bearer {MAILBOX} $KEY\n"
        + REFUSED
        + d.prompt("$XO_REFUSED")
        + f"C: {'x' * 300}\n"
        + d.hint("client", d.line_too_long),
        mode,
        d.machine(app=True, max_line=200),
    )


@each_dialect
@three_ways
def test_upstream_rejecting_the_token_of_a_bearer_login_is_answered_directly(
    d: Dialect, mode: Mode
) -> None:
    d.play(
        d.app_ready
        + d.auth("XOAUTH2 $XO")
        + f"<< request-bearer {MAILBOX} $KEY\n"
        + f">> token {MAILBOX}\n"
        + d.token_out
        + d.rejected
        + "<< note warning the upstream rejected the token\n"
        + d.s(d.failed),
        mode,
        d.machine(app=True),
    )


# === The driver's contract =================================================================


@pytest.mark.parametrize(
    ("setup", "event"),
    [
        ("", TokenIssued(MAILBOX, TOKEN)),
        ("", TokenRefused(Refusal.UNAVAILABLE)),
        ("sasl", TokenIssued(MAILBOX, TOKEN)),
        ("sasl", TokenRefused(Refusal.CREDENTIALS)),
        ("", TlsEstablished(Side.CLIENT)),
        ("", TlsEstablished(Side.SERVER)),
        ("", ServerConnected()),
        ("", ServerUnavailable("late")),
        ("closed", ServerDataReceived(b"+OK\r\n")),
        ("closed", ServerClosed()),
    ],
)
@each_dialect
def test_events_the_driver_must_not_send_are_bugs(d: Dialect, setup: str, event: Event) -> None:
    auth = d.machine()
    before = {"": "", "sasl": d.auth("PLAIN"), "closed": ">> server-closed\n"}[setup]
    collect(d.ready + before, auth)
    with pytest.raises(RuntimeError):
        auth.handle(event)


@each_dialect
def test_start_twice_and_handle_before_start_are_bugs(d: Dialect) -> None:
    auth = d.machine()
    with pytest.raises(RuntimeError):
        auth.handle(ServerConnected())
    auth.start()
    with pytest.raises(RuntimeError):
        auth.start()


@each_dialect
def test_handle_after_the_relay_began_is_a_bug(d: Dialect) -> None:
    auth = d.play(d.ready + d.login() + d.logged_in())
    with pytest.raises(RuntimeError):
        auth.handle(ClientDataReceived(b"x"))


# === Secrets ===============================================================================


PASSWORD_LOGINS = [
    pytest.param(d, n, id=f"{d}-{n}") for d in DIALECTS for n in range(len(d.password_logins))
]


@pytest.mark.parametrize(("d", "login"), PASSWORD_LOGINS)
@pytest.mark.parametrize("outcome", ["accepted", "challenged", "later", "refused", "too-long"])
def test_password_only_in_the_token_request_and_the_token_only_in_the_xoauth2_line(
    d: Dialect, login: int, outcome: str
) -> None:
    then = {
        "accepted": f">> token {MAILBOX}\n{d.token_out}{d.accepted}",
        "challenged": f">> token {MAILBOX}\n{d.token_out}"
        f"U: {d.prompt_marker} $CHALLENGE\n{d.rejected}>> client-closed\n",
        "later": f">> token {MAILBOX}\n{d.token_out}{d.refused_later}" + d.c(d.harmless[0], "a2"),
        "refused": REFUSED + d.c(d.harmless[0], "a2"),
        "too-long": f">> token {MAILBOX}\n{d.token_out}U: {'x' * 70_000}\n",
    }[outcome]
    actions, shown = collect(d.ready + d.password_logins[login] + then, d.machine())
    requests = assert_hidden(
        actions,
        shown,
        [PASSWORD, b64(PASSWORD), VARS["PASSWORD_PLAIN"]],
        token_line=rb"X1 AUTHENTICATE XOAUTH2 " if d is IMAP else b"",
        token_lines=int(outcome != "refused"),
    )
    assert [r.credentials for r in requests] == [Credentials("alice", PASSWORD)]


APP_LOGINS = [
    pytest.param("XOAUTH2 $XO", "", id="xoauth2"),
    pytest.param("XOAUTH2", "$XO", id="xoauth2-continued"),
    pytest.param("OAUTHBEARER $OB", "", id="oauthbearer"),
    pytest.param("OAUTHBEARER", "$OB", id="oauthbearer-continued"),
]


@pytest.mark.parametrize(("login", "response"), APP_LOGINS)
@pytest.mark.parametrize("outcome", ["accepted", "challenged", "refused", "unavailable"])
@each_dialect
def test_app_key_only_in_the_token_request(
    d: Dialect, login: str, response: str, outcome: str
) -> None:
    then = {
        "accepted": f">> token {MAILBOX}\n{d.token_out}{d.accepted}",
        "challenged": f">> token {MAILBOX}\n{d.token_out}"
        f"U: {d.prompt_marker} $CHALLENGE\n{d.rejected}>> client-closed\n",
        "refused": REFUSED + "C: AQ==\n" + d.c(d.harmless[0], "a2"),
        "unavailable": ">> refused unavailable\n" + d.c(d.harmless[0], "a2"),
    }[outcome]
    text = d.app_ready + d.auth(login) + (f"C: {response}\n" if response else "") + then
    actions, shown = collect(text, d.machine(app=True))
    requests = assert_hidden(
        actions,
        shown,
        [APP_KEY, b64(APP_KEY), VARS["XO"], VARS["OB"]],
        token_line=rb"X1 AUTHENTICATE XOAUTH2 " if d is IMAP else b"",
        token_lines=int(outcome in ("accepted", "challenged")),
    )
    assert [r.credentials for r in requests] == [BearerCredentials(MAILBOX, APP_KEY)]


@pytest.mark.parametrize(
    "message",
    [
        b64(f"user=\x01auth=Bearer {APP_KEY}\x01\x01"),  # no user
        b64(f"user=a@b\x01auth=Bearer {APP_KEY}\x01"),  # one ^A at the end
        b64(f"user=a@b\x01auth=Bearer {APP_KEY}\x1b\x01\x01"),  # a control character
        b64(f"user=a@b\x01auth=Token {APP_KEY}\x01\x01"),  # not Bearer
    ],
)
@each_dialect
def test_app_key_in_a_malformed_message_is_not_shown(d: Dialect, message: str) -> None:
    actions, shown = collect(
        d.app_ready + d.auth(f"XOAUTH2 {message}") + "C:\n", d.machine(app=True)
    )
    sent = b"".join(action.data for action in actions if isinstance(action, SendToClient))
    assert sent.endswith(d.s(d.failed)[3:].encode().replace(b"\n", b"\r\n"))
    requests = assert_hidden(
        actions, shown, [APP_KEY, b64(APP_KEY), message], token_line=b"", token_lines=0
    )
    assert requests == []


# === The transition tables =================================================================

#: Each protocol's tables, its diagrams, and the client's first state after TLS.
TABLES = [
    pytest.param(
        imap.CLIENT_TRANSITIONS,
        imap.UPSTREAM_TRANSITIONS,
        imap.state_diagrams,
        ClientState.NOT_AUTHENTICATED,
        id="imap",
    ),
    pytest.param(
        pop3.CLIENT_TRANSITIONS,
        pop3.UPSTREAM_TRANSITIONS,
        pop3.state_diagrams,
        ClientState.NOT_AUTHENTICATED,
        id="pop3",
    ),
    pytest.param(
        smtp.CLIENT_TRANSITIONS,
        smtp.UPSTREAM_TRANSITIONS,
        smtp.state_diagrams,
        ClientState.CONNECTED,
        id="smtp",
    ),
]


def _reachable(table: TransitionTable[StateT, InputT], start: set[StateT]) -> set[StateT]:
    reachable, frontier = set(start), list(start)
    while frontier:
        state = frontier.pop()
        for source, _, target in table.edges():
            if source is state and target not in reachable:
                reachable.add(target)
                frontier.append(target)
    return reachable


@pytest.mark.parametrize(("client", "upstream", "diagrams", "first"), TABLES)
def test_transition_tables_are_complete_and_drawable(
    client: TransitionTable[ClientState, ClientInput],
    upstream: TransitionTable[UpstreamState, UpstreamInput],
    diagrams: Callable[[], str],
    first: ClientState,
) -> None:
    # Every state named is reachable, and only the final ones have no way out.
    assert _reachable(client, {ClientState.PLAINTEXT, first}) == client.states()
    assert _reachable(upstream, {UpstreamState.DOWN}) == upstream.states()
    final = {ClientState.AUTHENTICATED, ClientState.CLOSED, ClientState.ERROR}
    for state in client.states():
        assert bool(client.allowed(state)) is (state not in final), state
        assert state in final or client.next_state(state, ClientInput.BROKE) is ClientState.ERROR
    upstream_final = {UpstreamState.AUTHENTICATED, UpstreamState.ERROR}
    for upstream_state in upstream.states():
        assert bool(upstream.allowed(upstream_state)) is (upstream_state not in upstream_final)
    # The client's next bytes after STARTTLS are its handshake, not a command.
    assert client.next_state(ClientState.TLS_NEGOTIATION, ClientInput.DATA) is None
    dot = diagrams()
    assert dot.count("digraph") == 2
    for name in (state.name for table in (client, upstream) for state in table.states()):
        assert f'"{name}"' in dot
    assert '"PLAINTEXT" -> "TLS_NEGOTIATION" [label="starttls"];' in dot
