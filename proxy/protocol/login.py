"""The login machine that IMAP, POP3 and SMTP share: :class:`LoginMachine`.

Theory of operation
===================

The proxy stands between a legacy client, to which it is a mail server, and the real
(upstream) server, to which it is a mail client. A login machine is a sans-I/O machine for
both conversations at once: the driver feeds it :mod:`~proxy.protocol.events` (bytes or
closes from either peer, a token issued or refused, TLS established) and carries out the
:mod:`~proxy.protocol.actions` it returns. It never calls out, reads a clock or logs;
asking for a token is an action. :class:`~proxy.protocol.imap.ImapAuth`,
:class:`~proxy.protocol.pop3.Pop3Auth` and :class:`~proxy.protocol.smtp.SmtpAuth` are this
machine with a grammar each; this module is everything they do alike, written once.

Two sub-machines run interleaved, each a state enum (:class:`ClientState`,
:class:`UpstreamState`) plus a :class:`~proxy.protocol.transitions.TransitionTable` that
each protocol builds with :func:`client_table` and :func:`upstream_table` from its own
moves and the shared ones below. They meet in :meth:`LoginMachine._join`: once the
client's credentials are accepted (a token was issued, client state ``AUTHORIZING``)
*and* the upstream is ready (``READY``), the machine sends the XOAUTH2 login upstream.

The client side (we are the server)
    ``start()`` greets the client and asks the driver to connect upstream at once, so that
    the upstream's round trips overlap with the client's login. On a STARTTLS listener the
    client starts in ``PLAINTEXT``, where no login is accepted; STARTTLS is answered by a
    ``StartTls`` action carrying our "go ahead", and any byte pipelined behind the
    STARTTLS line is a ``ClientProtocolError`` (the CVE-2011-0411 class). A login names a
    SASL mechanism (RFC 4422) with an initial response (``=`` for an empty one) or gets a
    continuation request; ``*`` cancels; base64 is strict. PLAIN (RFC 4616) and LOGIN
    carry a password, EXTERNAL (RFC 4422 appendix A), XOAUTH2 and OAUTHBEARER (RFC 7628)
    app identities where the listener offers them; the protocols add their own login
    commands. Credentials that cannot be anyone's (not UTF-8, control characters, an
    empty user name) are refused like a wrong password, without asking for a token. Once
    credentials are parsed the machine says ``RequestToken`` and stops parsing: whatever
    the client sends meanwhile is buffered raw, and becomes ``BeginRelay.to_server`` on
    success, or the next commands on failure.

The upstream side (we are the client)
    The protocol reads the greeting, asks what the server offers (before TLS too, where
    it must see STARTTLS), upgrades to TLS when ``upstream_tls`` is ``starttls`` (bytes
    behind the server's "go ahead" are an ``UpstreamProtocolError``; after TLS it asks
    again), and requires XOAUTH2. Joined with the client's token it sends the XOAUTH2
    login, the token in the command (``AUTHENTICATE_IR``) or after the server's
    continuation request (``GO_AHEAD``).

Outcomes
    * Accepted: the protocol's success answer, then ``BeginRelay`` with the client's
      pipelined bytes and whatever the upstream sent behind its answer.
    * An error challenge (a continuation request after the token, RFC 7628 section 3.2.2,
      as Google and Dovecot send) is answered with an empty line to get the final
      refusal; its decoded JSON goes into the operator's note.
    * Refused: the protocol reads the refusal as a :class:`Verdict`. Only
      ``TOKEN_REJECTED`` (the note names the likely causes) is the permanent
      "authentication failed"; a temporary refusal, the upstream's own system error, or
      a refusal of the XOAUTH2 exchange itself (nobody's password problem, an ERROR note)
      get the temporary answer.
    * ``TokenRefused``: ``CREDENTIALS`` gives exactly the permanent answer whatever the
      reason, ``UNAVAILABLE`` the temporary one. A refused XOAUTH2 or OAUTHBEARER login
      (or one whose message does not parse) first gets an error challenge, as servers do
      (RFC 7628 section 3.2.2: ``{"status":"invalid_token"}`` for OAUTHBEARER, Google's
      and Dovecot's ``{"status":"401","schemes":"bearer"}`` for XOAUTH2), and the
      permanent answer to whatever line the client answers it with.

    Every failed login, permanent or temporary, counts against ``max_auth_failures``, and
    every refused command or SASL response against ``max_bad_commands``; the one that
    spends a budget is answered, followed by the protocol's closing line and ``Close``.

Upstream trouble and reconnecting
    If the upstream cannot be reached, closes, or says it is going away (IMAP's ``BYE``,
    POP3's unasked ``-ERR``, SMTP's ``421``) before the login was sent to it, the machine
    notes why and marks it ``DOWN`` (after a goodbye, once it has closed). Each login
    attempt may open one fresh connection, in parallel with its token request, so that a
    connection the upstream timed out while a slow client typed is replaced, not turned
    into a failed login; if that fails too, the attempt gets the temporary answer once
    its token is in (a refused password is still reported as such). Losing the upstream
    after the login was sent fails that attempt temporarily. An upstream that cannot be
    used at all (no STARTTLS where required, no XOAUTH2, a refused capability query) is
    ``FAILED`` for the session: reconnecting does not fix configuration.

Limits and errors
    Client lines are bounded by ``max_line``, the bytes waiting behind a login (or a held
    command) by :attr:`LoginMachine._pipelining_allowance`, upstream responses by
    ``max_server_line``; beyond them the machine raises a ``ClientProtocolError`` or an
    ``UpstreamProtocolError`` whose reply hint the driver sends. Before raising it moves
    both sides to ``ERROR`` and refuses every later event. :attr:`LoginMachine.buffered`
    reports the bytes held. An event the driver could only send by breaking its contract
    (a token nobody asked for, TLS on a side that did not start it) raises
    ``RuntimeError``: a bug, not a peer's fault.

Secrets
    The password and the app key leave the machine only inside ``RequestToken``, whose
    credentials redact them; the token only inside the XOAUTH2 login sent upstream. No
    note, error message or repr contains any of them, and nothing the client sends is
    echoed back to it (but IMAP's tags).

What a protocol provides
========================

A subclass of :class:`LoginMachine` passes ``__init__`` its password mechanisms, its
client's first state (after TLS) and its :class:`UpstreamReader`; it sets its two tables,
its :class:`~proxy.protocol.replies.LoginReplies` (``words``) and the
``token_rejected_causes`` the operator reads; and it implements

* its grammar and replies: ``_greet``; ``_next_command``, which reassembles a command
  from ``_client_buf``; ``_on_command``, which answers it (``_answer``, which IMAP
  overrides to add tags), refuses it (``_rejected``) or starts a login (``_start_sasl``,
  ``_begin_login``) or TLS (``_start_client_tls``);
* its upstream dialogue: ``_on_reply`` for each reply its reader reassembles, which moves
  the upstream side (``_upstream_move``) and ends in ``_start_upstream_tls``,
  ``_require_xoauth2``, ``_going_away``, ``_on_continuation``, ``_logged_in`` or
  ``_login_refused``; ``_ask_capabilities``; and ``_send_authenticate`` where the login
  is not ``AUTH XOAUTH2`` (IMAP's).

Its module keeps ``state_diagrams()``, which draws its two tables
(:meth:`LoginMachine.state_diagrams`).
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Final, Generic, Protocol, TypeVar, assert_never

from proxy.protocol.actions import (
    Action,
    BeginRelay,
    Close,
    ConnectUpstream,
    Note,
    RequestToken,
    SendToClient,
    SendToServer,
    Severity,
    StartTls,
)
from proxy.protocol.errors import ClientProtocolError, FrameError, ProxyError, UpstreamProtocolError
from proxy.protocol.events import (
    ClientClosed,
    ClientDataReceived,
    Refusal,
    ServerClosed,
    ServerConnected,
    ServerDataReceived,
    ServerUnavailable,
    Side,
    TlsEstablished,
    TokenIssued,
    TokenRefused,
    rejection_causes,
)
from proxy.protocol.framing import LineBuffer, printable
from proxy.protocol.modes import ClientTls
from proxy.protocol.sasl import (
    LOGIN_PASSWORD_PROMPT,
    LOGIN_USERNAME_PROMPT,
    Credentials,
    InvalidCredentials,
    Mechanism,
    SaslError,
    b64decode_strict,
    describe_error_challenge,
    parse_login_field,
    parse_response,
    xoauth2_response,
)
from proxy.protocol.transitions import InputT, StateT, TransitionTable

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from proxy.protocol.events import Event
    from proxy.protocol.modes import AuthSettings
    from proxy.protocol.replies import LoginReplies
    from proxy.protocol.sasl import AnyCredentials

__all__ = [
    "CLIENT_PARSING",
    "CRLF",
    "LOGIN_STARTS",
    "UPSTREAM_IN_FLIGHT",
    "Attempt",
    "ClientInput",
    "ClientState",
    "LoginMachine",
    "UpstreamInput",
    "UpstreamReader",
    "UpstreamState",
    "Verdict",
    "client_table",
    "upstream_table",
]

CRLF: Final = b"\r\n"


# === States, inputs and the tables' shared moves ===========================================


class ClientState(enum.Enum):
    """Where the conversation with the legacy client stands."""

    #: STARTTLS listener before TLS: no login; STARTTLS and harmless commands work.
    PLAINTEXT = "plaintext"
    #: Our "go ahead" to STARTTLS is out; the driver runs the handshake.
    TLS_NEGOTIATION = "tls-negotiation"
    #: SMTP: waiting for EHLO or HELO (after the greeting, or after TLS).
    CONNECTED = "connected"
    #: SMTP: an EHLO whose reply waits for the upstream's extension list.
    HELD = "held"
    #: A login may start: IMAP's not-authenticated state, POP3's AUTHORIZATION state,
    #: SMTP after EHLO or HELO.
    NOT_AUTHENTICATED = "not-authenticated"
    #: POP3: USER was accepted; PASS may follow.
    USER_GIVEN = "user-given"
    #: A mechanism with one response (PLAIN, EXTERNAL, XOAUTH2, OAUTHBEARER) was named
    #: without it: our continuation request is out.
    SASL_RESPONSE = "sasl-response"
    #: LOGIN: our request for the user name is out.
    SASL_USERNAME = "sasl-username"
    #: LOGIN: our request for the password is out.
    SASL_PASSWORD = "sasl-password"
    #: Credentials parsed, :class:`RequestToken` out; client bytes are buffered.
    AWAITING_TOKEN = "awaiting-token"
    #: A bearer login failed: our error challenge is out, the client's answer gets the
    #: failure.
    ERROR_CHALLENGE = "error-challenge"
    #: Token in hand; waiting for the upstream to be ready and to accept it.
    AUTHORIZING = "authorizing"
    AUTHENTICATED = "authenticated"
    CLOSED = "closed"
    ERROR = "error"


class ClientInput(enum.Enum):
    DATA = "bytes"
    HARMLESS = "answered locally"
    REJECTED = "refused command"
    STARTTLS = "starttls"
    TLS_ESTABLISHED = "tls established"
    HELLO = "ehlo/helo answered"
    HOLD = "ehlo held for the upstream's list"
    RELEASED = "held ehlo answered"
    USER = "user"
    AUTH_SASL = "sasl mechanism (no initial response)"
    AUTH_LOGIN = "login mechanism (no initial response)"
    USERNAME = "login user name"
    CREDENTIALS = "credentials"
    CANCELLED = "sasl cancelled/malformed"
    CHALLENGED = "bearer login refused: error challenge"
    TOKEN_ISSUED = "token issued"
    LOGIN_FAILED = "login failed"
    LOGIN_SUCCEEDED = "login succeeded"
    QUIT = "logout/quit"
    BUDGET_EXHAUSTED = "too many errors"
    PEER_CLOSED = "client closed"
    BROKE = "protocol error"


class UpstreamState(enum.Enum):
    """Where the conversation with the upstream server stands."""

    #: No connection (not yet, or lost); a login attempt may reconnect.
    DOWN = "down"
    CONNECTING = "connecting"
    GREETING = "greeting"
    #: STARTTLS mode, before TLS: asking what the server offers (IMAP's CAPABILITY,
    #: SMTP's EHLO).
    PLAIN_CAPABILITIES = "plain-capabilities"
    #: Our STARTTLS (POP3: STLS) is out.
    STARTTLS = "starttls"
    TLS_NEGOTIATION = "tls-negotiation"
    #: Asking what the server offers, after TLS or with implicit TLS (IMAP's CAPABILITY,
    #: POP3's CAPA, SMTP's EHLO).
    CAPABILITIES = "capabilities"
    READY = "ready"
    #: Our XOAUTH2 login is out without the token; waiting for the continuation request.
    AUTH_SENT = "auth-sent"
    TOKEN_SENT = "token-sent"
    #: The error challenge was answered with an empty line; waiting for the final refusal.
    ERROR_CHALLENGE = "error-challenge"
    #: The upstream said it is going away; waiting for it to close.
    CLOSING = "closing"
    #: Unusable for this session (no STARTTLS, no XOAUTH2, a refused capability query...).
    FAILED = "failed"
    AUTHENTICATED = "authenticated"
    ERROR = "error"


class UpstreamInput(enum.Enum):
    CONNECT = "connect"
    CONNECTED = "connected"
    UNREACHABLE = "unreachable"
    ASK_PLAIN_CAPABILITIES = "ask capabilities (before TLS)"
    ASK_STARTTLS = "send STARTTLS"
    TLS_GRANTED = "STARTTLS go-ahead"
    TLS_ESTABLISHED = "tls established: ask capabilities"
    ASK_CAPABILITIES = "ask capabilities"
    CAPABLE = "XOAUTH2 offered"
    UNSUITABLE = "unusable"
    CHATTER = "untagged response"
    IGNORED = "bytes ignored"
    AUTHENTICATE = "send XOAUTH2 login"
    AUTHENTICATE_IR = "send XOAUTH2 login with token"
    GO_AHEAD = "continuation: send token"
    CHALLENGED = "error challenge: send empty line"
    ACCEPTED = "login accepted"
    REFUSED = "login refused"
    GOING_AWAY = "going away"
    PEER_CLOSED = "upstream closed"
    BROKE = "protocol error"


_C = ClientState
_CI = ClientInput
_U = UpstreamState
_UI = UpstreamInput

Moves = dict[_C, dict[_CI, _C]]
UpstreamMoves = dict[_U, dict[_UI, _U]]

#: Where a login may start (IMAP's not-authenticated state, and the states of the other
#: protocols that work like it).
LOGIN_STARTS: Final[dict[_CI, _C]] = {
    _CI.DATA: _C.NOT_AUTHENTICATED,
    _CI.HARMLESS: _C.NOT_AUTHENTICATED,
    _CI.REJECTED: _C.NOT_AUTHENTICATED,
    _CI.AUTH_SASL: _C.SASL_RESPONSE,
    _CI.CREDENTIALS: _C.AWAITING_TOKEN,
    _CI.CHALLENGED: _C.ERROR_CHALLENGE,
    _CI.LOGIN_FAILED: _C.NOT_AUTHENTICATED,
    _CI.QUIT: _C.CLOSED,
    _CI.BUDGET_EXHAUSTED: _C.CLOSED,
}
#: The client's moves that every protocol makes alike (those of states a protocol cannot
#: reach are left out of its table).
_CLIENT_MOVES: Final[Moves] = {
    _C.PLAINTEXT: {
        _CI.DATA: _C.PLAINTEXT,
        _CI.HARMLESS: _C.PLAINTEXT,
        _CI.REJECTED: _C.PLAINTEXT,
        _CI.STARTTLS: _C.TLS_NEGOTIATION,
        _CI.QUIT: _C.CLOSED,
        _CI.BUDGET_EXHAUSTED: _C.CLOSED,
    },
    # No DATA here, on purpose: the client's next bytes are its TLS handshake.
    _C.TLS_NEGOTIATION: {_CI.TLS_ESTABLISHED: _C.NOT_AUTHENTICATED},
    _C.NOT_AUTHENTICATED: LOGIN_STARTS,
    _C.SASL_RESPONSE: {
        _CI.DATA: _C.SASL_RESPONSE,
        _CI.CREDENTIALS: _C.AWAITING_TOKEN,
        _CI.CHALLENGED: _C.ERROR_CHALLENGE,
        _CI.CANCELLED: _C.NOT_AUTHENTICATED,
        _CI.LOGIN_FAILED: _C.NOT_AUTHENTICATED,
    },
    _C.SASL_USERNAME: {
        _CI.DATA: _C.SASL_USERNAME,
        _CI.USERNAME: _C.SASL_PASSWORD,
        _CI.CANCELLED: _C.NOT_AUTHENTICATED,
    },
    _C.SASL_PASSWORD: {
        _CI.DATA: _C.SASL_PASSWORD,
        _CI.CREDENTIALS: _C.AWAITING_TOKEN,
        _CI.CANCELLED: _C.NOT_AUTHENTICATED,
        _CI.LOGIN_FAILED: _C.NOT_AUTHENTICATED,
    },
    _C.AWAITING_TOKEN: {
        _CI.DATA: _C.AWAITING_TOKEN,
        _CI.TOKEN_ISSUED: _C.AUTHORIZING,
        _CI.CHALLENGED: _C.ERROR_CHALLENGE,
        _CI.LOGIN_FAILED: _C.NOT_AUTHENTICATED,
    },
    _C.ERROR_CHALLENGE: {_CI.DATA: _C.ERROR_CHALLENGE, _CI.LOGIN_FAILED: _C.NOT_AUTHENTICATED},
    _C.AUTHORIZING: {
        _CI.DATA: _C.AUTHORIZING,
        _CI.LOGIN_SUCCEEDED: _C.AUTHENTICATED,
        _CI.LOGIN_FAILED: _C.NOT_AUTHENTICATED,
    },
}

#: The upstream's moves that every protocol makes alike (likewise).
_UPSTREAM_MOVES: Final[UpstreamMoves] = {
    _U.DOWN: {_UI.CONNECT: _U.CONNECTING},
    _U.CONNECTING: {_UI.CONNECTED: _U.GREETING, _UI.UNREACHABLE: _U.DOWN},
    _U.PLAIN_CAPABILITIES: {_UI.ASK_STARTTLS: _U.STARTTLS, _UI.UNSUITABLE: _U.FAILED},
    _U.STARTTLS: {_UI.TLS_GRANTED: _U.TLS_NEGOTIATION, _UI.UNSUITABLE: _U.FAILED},
    _U.TLS_NEGOTIATION: {_UI.TLS_ESTABLISHED: _U.CAPABILITIES, _UI.UNREACHABLE: _U.DOWN},
    _U.CAPABILITIES: {_UI.CAPABLE: _U.READY, _UI.UNSUITABLE: _U.FAILED},
    _U.READY: {_UI.AUTHENTICATE: _U.AUTH_SENT},
    _U.AUTH_SENT: {_UI.GO_AHEAD: _U.TOKEN_SENT, _UI.REFUSED: _U.READY},
    _U.TOKEN_SENT: {
        _UI.CHALLENGED: _U.ERROR_CHALLENGE,
        _UI.ACCEPTED: _U.AUTHENTICATED,
        _UI.REFUSED: _U.READY,
    },
    _U.ERROR_CHALLENGE: {_UI.ACCEPTED: _U.AUTHENTICATED, _UI.REFUSED: _U.READY},
    _U.CLOSING: {_UI.IGNORED: _U.CLOSING, _UI.PEER_CLOSED: _U.DOWN},
    _U.FAILED: {_UI.IGNORED: _U.FAILED, _UI.PEER_CLOSED: _U.FAILED},
}

#: Client states of a login under way.
_CLIENT_LOGGING_IN: Final = frozenset({_C.AWAITING_TOKEN, _C.AUTHORIZING})
#: Client states in which bytes are buffered raw, unparsed.
_CLIENT_WAITING: Final = _CLIENT_LOGGING_IN | {_C.HELD}
_CLIENT_TERMINAL: Final = frozenset({_C.AUTHENTICATED, _C.CLOSED, _C.ERROR})
#: Client states in which bytes are parsed as commands or SASL responses: all but those.
CLIENT_PARSING: Final = frozenset(_C) - _CLIENT_WAITING - _CLIENT_TERMINAL - {_C.TLS_NEGOTIATION}
#: Client states in which a line is a SASL response (or the answer to an error challenge).
_CLIENT_SASL: Final = frozenset(
    {_C.SASL_RESPONSE, _C.SASL_USERNAME, _C.SASL_PASSWORD, _C.ERROR_CHALLENGE}
)
#: Upstream states without a connection whose bytes are read, and the final ones.
_UPSTREAM_QUIET: Final = frozenset({_U.DOWN, _U.CONNECTING, _U.TLS_NEGOTIATION, _U.CLOSING})
_UPSTREAM_DONE: Final = frozenset({_U.FAILED, _U.AUTHENTICATED, _U.ERROR})
#: Upstream states of a live connection whose bytes are parsed as replies.
_UPSTREAM_PARSING: Final = frozenset(_U) - _UPSTREAM_QUIET - _UPSTREAM_DONE
#: Upstream states in which our XOAUTH2 login is out.
UPSTREAM_IN_FLIGHT: Final = frozenset({_U.AUTH_SENT, _U.TOKEN_SENT, _U.ERROR_CHALLENGE})
#: Upstream states in which what that connection still had in flight is worthless.
_UPSTREAM_GONE: Final = frozenset({_U.DOWN, _U.CLOSING, _U.FAILED})


def _table(
    name: str,
    start: StateT,
    shared: Mapping[StateT, Mapping[InputT, StateT]],
    own: Mapping[StateT, Mapping[InputT, StateT]],
    exits: Callable[[StateT], Mapping[InputT, StateT]],
) -> TransitionTable[StateT, InputT]:
    """``own`` moves over ``shared`` ones, each state with its ``exits``; only the states
    reachable from ``start``."""
    moves = {
        state: {**shared.get(state, {}), **own.get(state, {}), **exits(state)}
        for state in {**shared, **own}
    }
    reachable, todo = {start}, [start]
    while todo:
        for target in moves.get(todo.pop(), {}).values():
            if target not in reachable:
                reachable.add(target)
                todo.append(target)
    return TransitionTable(name, {s: edges for s, edges in moves.items() if s in reachable})


def client_table(name: str, own: Moves) -> TransitionTable[ClientState, ClientInput]:
    """The client side's table: the protocol's ``own`` moves over the shared ones; from
    every live state ``PEER_CLOSED`` leads to ``CLOSED``, ``BROKE`` to ``ERROR``."""
    exits: dict[_CI, _C] = {_CI.PEER_CLOSED: _C.CLOSED, _CI.BROKE: _C.ERROR}
    return _table(name, _C.PLAINTEXT, _CLIENT_MOVES, own, lambda _state: exits)


def upstream_table(
    name: str, own: UpstreamMoves, *, chatter: bool = False
) -> TransitionTable[UpstreamState, UpstreamInput]:
    """The upstream side's table: the protocol's ``own`` moves (its greeting and capability
    dialogue) over the shared ones. A live connection may close (to ``DOWN``), say it goes
    away (to ``CLOSING``) and, with ``chatter``, say what changes nothing (IMAP's untagged
    data); ``BROKE`` leads from every state to ``ERROR``."""

    def exits(state: UpstreamState) -> dict[_UI, _U]:
        if state not in _UPSTREAM_PARSING:
            return {_UI.BROKE: _U.ERROR}
        talk = {_UI.CHATTER: state} if chatter else {}
        return {**talk, _UI.GOING_AWAY: _U.CLOSING, _UI.PEER_CLOSED: _U.DOWN, _UI.BROKE: _U.ERROR}

    return _table(name, _U.DOWN, _UPSTREAM_MOVES, own, exits)


# === The pieces a protocol works with ======================================================


class Verdict(enum.Enum):
    """What an upstream's refusal of the XOAUTH2 login means, as the protocol reads it."""

    #: The token was refused for this mailbox: the client gets the permanent answer.
    TOKEN_REJECTED = "token rejected"
    #: The upstream said "not now".
    TEMPORARY = "temporary"
    #: The upstream reports a system error of its own (POP3's ``[SYS/PERM]``).
    SYSTEM_ERROR = "system error"
    #: The upstream refused the XOAUTH2 exchange itself (before the token, or as a syntax
    #: error): the proxy and the server disagree about XOAUTH2, nobody's password problem.
    EXCHANGE_REFUSED = "exchange refused"


@dataclass(slots=True)
class Attempt:
    """One login attempt, from the credentials to the upstream's verdict."""

    login: str = ""
    #: How the client logs in (IMAP's LOGIN, POP3's USER and PASS carry what PLAIN does).
    mechanism: Mechanism = Mechanism.PLAIN
    #: Why a LOGIN user name cannot be anyone's, where the protocol refuses it only after
    #: the password (:attr:`LoginMachine.refuses_user_names_late`).
    invalid: str = ""
    #: Upstream connections this attempt may still open.
    fresh_connections: int = 1
    mailbox: str = ""
    #: The XOAUTH2 initial response (base64 of the token), until it is sent.
    response: bytes = field(default=b"", repr=False)
    #: The upstream's error challenge, decoded for the operator.
    challenge: str = ""
    #: Who issued the token (its refusal's likely causes depend on it).
    provider: str = "microsoft"


ReplyT = TypeVar("ReplyT")
ReplyT_co = TypeVar("ReplyT_co", covariant=True)
CommandT = TypeVar("CommandT")
T = TypeVar("T")


class UpstreamReader(Protocol[ReplyT_co]):
    """Reassembles the upstream's replies (its grammar), bounded in size: ``next_reply``
    gives the next complete one or ``None`` (:class:`FrameError` when it is malformed or
    over the limit), ``take_all`` what is not parsed yet (for the relay, or to drop)."""

    def __len__(self) -> int: ...

    def receive_data(self, data: bytes) -> None: ...

    def next_reply(self) -> ReplyT_co | None: ...

    def take_all(self) -> bytes: ...


# === The machine ===========================================================================


class LoginMachine(abc.ABC, Generic[CommandT, ReplyT]):
    """The pre-authentication phase of one proxied connection (see the module docstring).
    Call :meth:`start` once, then :meth:`handle` for every event until an action says
    :class:`BeginRelay` or :class:`Close`, or a :class:`ProxyError` is raised.
    """

    __slots__ = (
        "_attempt",
        "_auth_failures",
        "_bad_commands",
        "_client",
        "_client_buf",
        "_error",
        "_mechanisms",
        "_out",
        "_server",
        "_settings",
        "_started",
        "_trouble",
        "_upstream",
    )

    #: The protocol's two tables (:func:`client_table`, :func:`upstream_table`).
    client_transitions: ClassVar[TransitionTable[ClientState, ClientInput]]
    upstream_transitions: ClassVar[TransitionTable[UpstreamState, UpstreamInput]]
    #: What this protocol says where every protocol says something.
    words: ClassVar[LoginReplies]
    #: What the protocol calls its STARTTLS command (for the operator's messages).
    starttls: ClassVar[str] = "STARTTLS"
    #: What the operator reads when the upstream rejects a Microsoft token: its likely
    #: causes (other providers' are :func:`~proxy.protocol.events.rejection_causes`).
    token_rejected_causes: ClassVar[str]
    #: Refuse a LOGIN user name that cannot be anyone's only after the password, so that
    #: the password line is never taken for a command (SMTP); else at once (POP3).
    refuses_user_names_late: ClassVar[bool] = False

    def __init__(
        self,
        settings: AuthSettings,
        *,
        password_mechanisms: tuple[Mechanism, ...],
        first_state: ClientState,
        reader: UpstreamReader[ReplyT],
    ) -> None:
        self._settings = settings
        #: What the login commands accept and the capability list offers.
        self._mechanisms = (*password_mechanisms, *settings.app_mechanisms)
        self._started = False
        self._client = _C.PLAINTEXT if settings.client_tls is ClientTls.STARTTLS else first_state
        self._upstream = _U.DOWN
        self._client_buf = LineBuffer(settings.max_line)
        self._server = reader
        self._attempt: Attempt | None = None
        self._bad_commands = 0
        self._auth_failures = 0
        self._trouble = "not connected yet"
        self._error: ProxyError | None = None
        self._out: list[Action] = []

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} client={self._client.name} "
            f"upstream={self._upstream.name} buffered={self.buffered}>"
        )

    @classmethod
    def state_diagrams(cls) -> str:
        """Both transition tables as Graphviz digraphs."""
        return cls.client_transitions.to_dot() + cls.upstream_transitions.to_dot()

    @property
    def client_state(self) -> ClientState:
        return self._client

    @property
    def upstream_state(self) -> UpstreamState:
        return self._upstream

    @property
    def buffered(self) -> int:
        """Bytes held for either peer (bounded by the limits in :class:`AuthSettings`)."""
        return len(self._client_buf) + len(self._server) + self._held()

    # -- entry points ----------------------------------------------------------------------

    def start(self) -> list[Action]:
        """Greet the client and open the upstream connection."""
        if self._started:
            raise RuntimeError(f"{type(self).__name__}.start() called twice")
        self._started = True
        self._out = []
        self._greet()
        self._connect()
        return self._out

    def handle(self, event: Event) -> list[Action]:
        """Feed one event; return what to do. Raises :class:`ProxyError` subclasses."""
        name = type(self).__name__
        if not self._started:
            raise RuntimeError(f"{name}.handle() before start()")
        if self._error is not None:
            raise type(self._error)(
                f"session already failed: {self._error}", reply_hint=self._error.reply_hint
            )
        if self._client in _CLIENT_TERMINAL:
            raise RuntimeError(f"{name}.handle() after the auth phase ended ({self._client})")
        self._out = []
        try:
            self._dispatch(event)
            self._settle()
        except ProxyError as exc:
            self._error = exc
            self._client = _C.ERROR
            self._upstream = _U.ERROR
            raise
        return self._out

    def _dispatch(self, event: Event) -> None:
        match event:
            case ClientDataReceived(data=data):
                self._client_move(_CI.DATA)
                self._client_buf.receive_data(data)
            case ClientClosed():
                self._client_move(_CI.PEER_CLOSED)
                self._out.append(Close("client closed the connection"))
            case ServerConnected():
                self._upstream_move(_UI.CONNECTED)
            case ServerUnavailable(reason=reason):
                self._upstream_lost(_UI.UNREACHABLE, f"is unavailable: {printable(reason, 300)}")
            case ServerDataReceived(data=data):
                self._on_server_data(data)
            case ServerClosed():
                self._upstream_lost(_UI.PEER_CLOSED, "closed the connection")
            case TlsEstablished(side=side):
                self._on_tls(side)
            case TokenIssued(mailbox=mailbox, token=token, provider=provider):
                self._client_move(_CI.TOKEN_ISSUED)
                attempt = self._current_attempt()
                attempt.mailbox = mailbox
                attempt.provider = provider
                attempt.response = xoauth2_response(mailbox, token.value)
            case TokenRefused(refusal=refusal):
                if self._client is not _C.AWAITING_TOKEN:
                    raise RuntimeError(f"token refused in client state {self._client.name}")
                attempt = self._current_attempt()
                if refusal is Refusal.UNAVAILABLE:
                    self._login_failed(self.words.unavailable)
                elif attempt.mechanism.bearer:
                    self._challenge(attempt)
                else:
                    self._login_failed(self.words.auth_failed)
            case _:
                assert_never(event)

    def _settle(self) -> None:
        """Parse what can be parsed and join the two sides, until nothing changes."""
        while True:
            before = (self._client, self._upstream)
            self._parse_client()
            self._join()
            if (self._client, self._upstream) == before:
                break
        if self._client in _CLIENT_WAITING:
            limit = self._pipelining_allowance
            if len(self._client_buf) > limit:
                raise self._client_error(
                    f"more than {limit} bytes pipelined in client state {self._client.name}",
                    self.words.pipelined,
                )

    @property
    def _pipelining_allowance(self) -> int:
        """How many client bytes may wait unparsed (behind a login, or a held command)."""
        return self._settings.max_line + self._settings.max_literal

    def _held(self) -> int:
        """Bytes the protocol holds beyond the two buffers (see :attr:`buffered`)."""
        return 0

    # -- moves -----------------------------------------------------------------------------

    def _client_move(self, what: ClientInput) -> None:
        target = self.client_transitions.next_state(self._client, what)
        if target is None:
            message = f"{what.value!r} not allowed in client state {self._client.name}"
            # Bytes while the handshake runs are the client's fault; other moves are ours.
            raise self._client_error(message) if what is _CI.DATA else RuntimeError(message)
        self._client = target

    def _upstream_move(self, what: UpstreamInput) -> None:
        target = self.upstream_transitions.next_state(self._upstream, what)
        if target is None:
            raise RuntimeError(
                f"{what.value!r} not allowed in upstream state {self._upstream.name}"
            )
        self._upstream = target
        if target in _UPSTREAM_GONE:
            # Whatever that connection still had in flight is worthless now.
            self._server.take_all()
            self._forget_connection()

    def _forget_connection(self) -> None:
        """Drop what the protocol kept of an upstream connection that is gone."""

    def _client_error(self, message: str, hint: bytes = b"") -> ClientProtocolError:
        return ClientProtocolError(message, reply_hint=hint or self.words.protocol_error)

    def _upstream_error(self, message: str) -> UpstreamProtocolError:
        return UpstreamProtocolError(message, reply_hint=self.words.upstream_error)

    # -- output ----------------------------------------------------------------------------

    def _to_client(self, data: bytes) -> None:
        last = self._out[-1] if self._out else None
        if isinstance(last, SendToClient):
            self._out[-1] = SendToClient(last.data + data)
        else:
            self._out.append(SendToClient(data))

    def _answer(self, reply: bytes) -> None:
        """Answer the client's current command with ``reply`` (one line, no line ending)."""
        self._to_client(reply + CRLF)

    def _prompt(self, payload: bytes) -> None:
        """Send a SASL continuation request carrying ``payload`` (base64)."""
        self._to_client(self.words.continuation + payload + CRLF)

    def _to_server(self, data: bytes) -> None:
        self._out.append(SendToServer(data))

    def _note(self, severity: Severity, text: str) -> None:
        self._out.append(Note(severity, text))

    def _close(self, last_words: bytes, reason: str) -> None:
        self._to_client(last_words)
        self._out.append(Close(reason))

    # === client side =====================================================================

    def _parse_client(self) -> None:
        while self._client in CLIENT_PARSING:
            if self._client in _CLIENT_SASL:
                line = self._framed(self._client_buf.next_line)
                if line is None:
                    return
                self._on_sasl_line(line)
            else:
                command = self._framed(self._next_command)
                if command is None:
                    return
                self._on_command(command)

    def _framed(self, read: Callable[[], T | None]) -> T | None:
        """What ``read`` reassembles from the client's bytes; a line or literal over its
        limit is the client's fault."""
        try:
            return read()
        except FrameError as exc:
            raise self._client_error(f"client: {exc}", self.words.line_too_long) from None

    def _rejected(self, reply: bytes, what: ClientInput = _CI.REJECTED) -> None:
        """Refuse the client's command or SASL response with ``reply``, and count it;
        close once the budget is spent. A login under way is over."""
        self._attempt = None
        self._answer(reply)
        self._client_move(what)
        self._bad_commands += 1
        if self._bad_commands >= self._settings.max_bad_commands:
            self._client_move(_CI.BUDGET_EXHAUSTED)
            self._note(Severity.INFO, f"client sent {self._bad_commands} invalid commands")
            self._close(self.words.too_many_errors, "too many invalid commands")

    def _start_client_tls(self, preface: bytes) -> None:
        """Answer STARTTLS with ``preface`` (the complete "go ahead") and hand the
        connection to the TLS handshake."""
        if len(self._client_buf):
            # Plaintext behind STARTTLS would be taken as said inside TLS (CVE-2011-0411).
            raise self._client_error(f"client pipelined data behind {self.starttls}")
        self._client_move(_CI.STARTTLS)
        self._out.append(StartTls(Side.CLIENT, preface=preface))

    def _start_sasl(self, name: bytes, initial: bytes | None) -> None:
        """A login with the SASL mechanism ``name``, and its initial response if any."""
        mechanism = Mechanism.named(name, self._mechanisms)
        if mechanism is None:
            self._rejected(self.words.unsupported_mechanism)
        elif initial is not None:
            # "=" is an empty initial response (RFC 4959, RFC 5034 section 4, RFC 4954).
            encoded = b"" if initial == b"=" else initial
            if mechanism is Mechanism.LOGIN:
                self._login_username(encoded, _CI.REJECTED)
            else:
                self._sasl(mechanism, encoded, _CI.REJECTED)
        elif mechanism is Mechanism.LOGIN:
            self._client_move(_CI.AUTH_LOGIN)
            self._prompt(LOGIN_USERNAME_PROMPT)
        else:
            self._client_move(_CI.AUTH_SASL)
            self._attempt = Attempt(mechanism=mechanism)
            self._prompt(b"")

    def _on_sasl_line(self, line: bytes) -> None:
        state = self._client
        if state is _C.ERROR_CHALLENGE:
            # Whatever the line says (RFC 7628 wants ^A, XOAUTH2 clients send an empty
            # line, "*" cancels), the login has failed; the answer is not echoed or logged.
            self._login_failed(self.words.auth_failed)
        elif line == b"*":
            self._rejected(self.words.cancelled, _CI.CANCELLED)
        elif state is _C.SASL_RESPONSE:
            self._sasl(self._current_attempt().mechanism, line, _CI.CANCELLED)
        elif state is _C.SASL_USERNAME:
            self._login_username(line, _CI.CANCELLED)
        else:
            self._login_password(line)

    def _decoded(self, encoded: bytes, refusal: ClientInput) -> bytes | None:
        """Strict base64, or ``None`` after refusing it (``refusal`` is the move)."""
        try:
            return b64decode_strict(encoded)
        except SaslError:
            self._rejected(self.words.invalid_base64, refusal)
            return None

    def _sasl(self, mechanism: Mechanism, encoded: bytes, refusal: ClientInput) -> None:
        """Decode the one response of ``mechanism``; ``refusal`` is the move when it is
        malformed."""
        message = self._decoded(encoded, refusal)
        if message is None:
            return
        try:
            credentials = parse_response(mechanism, message)
        except SaslError as exc:
            if mechanism.bearer:
                # RFC 7628 section 3.2.2: a refusal like any other (and counted as one).
                self._note(Severity.INFO, f"login refused without asking for a token: {exc}")
                self._challenge(Attempt(mechanism=mechanism))
            elif isinstance(exc, InvalidCredentials):
                self._invalid_credentials(str(exc))
            else:
                self._rejected(self.words.invalid_sasl, refusal)
            return
        self._begin_login(credentials, mechanism)

    def _login_username(self, encoded: bytes, refusal: ClientInput) -> None:
        """Take the LOGIN user name and ask for the password."""
        decoded = self._decoded(encoded, refusal)
        if decoded is None:
            return
        attempt = Attempt(mechanism=Mechanism.LOGIN)
        try:
            attempt.login = parse_login_field(decoded, "user name")
            if not attempt.login:
                raise InvalidCredentials("user name is empty")
        except InvalidCredentials as exc:
            if not self.refuses_user_names_late:
                self._invalid_credentials(str(exc))
                return
            attempt.invalid = str(exc)
        self._client_move(_CI.USERNAME)
        self._attempt = attempt
        self._prompt(LOGIN_PASSWORD_PROMPT)

    def _login_password(self, encoded: bytes) -> None:
        attempt = self._current_attempt()
        decoded = self._decoded(encoded, _CI.CANCELLED)
        if decoded is None:
            return
        try:
            if attempt.invalid:
                raise InvalidCredentials(attempt.invalid)
            password = parse_login_field(decoded, "password")
        except InvalidCredentials as exc:
            self._invalid_credentials(str(exc))
            return
        self._begin_login(Credentials(login=attempt.login, password=password))

    def _invalid_credentials(self, why: str) -> None:
        self._note(Severity.INFO, f"login refused without asking for a token: {why}")
        self._login_failed(self.words.auth_failed)

    def _begin_login(
        self, credentials: AnyCredentials, mechanism: Mechanism = Mechanism.PLAIN
    ) -> None:
        self._client_move(_CI.CREDENTIALS)
        self._attempt = Attempt(login=credentials.login, mechanism=mechanism)
        self._out.append(RequestToken(credentials))

    def _challenge(self, attempt: Attempt) -> None:
        """Refuse a bearer login with an error challenge (RFC 7628 section 3.2.2); the
        client's answer to it gets the failure (see :meth:`_on_sasl_line`)."""
        self._client_move(_CI.CHALLENGED)
        self._attempt = attempt
        self._prompt(attempt.mechanism.error_challenge)

    def _login_failed(self, reply: bytes) -> None:
        """Answer a failed login, count it, and close when the budget is spent."""
        self._attempt = None
        self._client_move(_CI.LOGIN_FAILED)
        self._answer(reply)
        self._auth_failures += 1
        if self._auth_failures >= self._settings.max_auth_failures:
            self._client_move(_CI.BUDGET_EXHAUSTED)
            self._note(Severity.INFO, f"{self._auth_failures} failed logins: closing")
            self._close(self.words.too_many_failures, "too many failed logins")

    def _current_attempt(self) -> Attempt:
        if self._attempt is None:
            raise RuntimeError(f"no login attempt in client state {self._client.name}")
        return self._attempt

    def _on_tls(self, side: Side) -> None:
        if side is Side.CLIENT:
            self._client_move(_CI.TLS_ESTABLISHED)
            return
        self._upstream_move(_UI.TLS_ESTABLISHED)
        self._ask_capabilities()

    # === upstream side ===================================================================

    def _connect(self) -> None:
        self._upstream_move(_UI.CONNECT)
        self._out.append(ConnectUpstream())

    def _on_server_data(self, data: bytes) -> None:
        state = self._upstream
        if state in (_U.DOWN, _U.CONNECTING):
            raise RuntimeError(f"upstream data without a connection (state {state.name})")
        if state is _U.TLS_NEGOTIATION:
            raise self._upstream_error(f"upstream sent plaintext during {self.starttls}")
        if state in (_U.CLOSING, _U.FAILED):
            self._upstream_move(_UI.IGNORED)
            return
        self._server.receive_data(data)
        while self._upstream in _UPSTREAM_PARSING:
            try:
                reply = self._server.next_reply()
            except FrameError as exc:
                raise self._upstream_error(f"upstream: {exc}") from None
            if reply is None:
                return
            self._on_reply(reply)

    def _upstream_lost(self, what: UpstreamInput, why: str) -> None:
        state = self._upstream
        self._upstream_move(what)
        if state in (_U.FAILED, _U.CLOSING):
            return  # the reason is known already
        self._trouble = why
        if state in UPSTREAM_IN_FLIGHT:
            self._upstream_failed_login(f"the upstream {why} during authentication")
        elif self._client not in _CLIENT_LOGGING_IN:
            severity = Severity.WARNING if what is _UI.UNREACHABLE else Severity.INFO
            self._note(severity, f"upstream {why}; the next login will reconnect")

    def _going_away(self, why: str, farewell: bytes = b"") -> None:
        """The upstream says it is closing (``why`` begins "said ..."); ``farewell`` is
        sent to it first."""
        state = self._upstream
        self._trouble = why
        if farewell:
            self._to_server(farewell)
        self._upstream_move(_UI.GOING_AWAY)
        if state in UPSTREAM_IN_FLIGHT:
            self._upstream_failed_login(f"the upstream {why}")
        elif self._client not in _CLIENT_LOGGING_IN:
            self._note(Severity.WARNING, f"upstream {why}; the next login will reconnect")

    def _upstream_failed_login(self, why: str) -> None:
        attempt = self._current_attempt()
        self._note(
            Severity.WARNING,
            f"login as {attempt.login!r}: {why}; answered {self.words.unavailable_name}",
        )
        self._login_failed(self.words.unavailable)

    def _unsuitable(self, why: str) -> None:
        self._trouble = f"cannot be used: {why}"
        self._upstream_move(_UI.UNSUITABLE)
        self._note(Severity.ERROR, f"upstream cannot be used: {why}")

    def _start_upstream_tls(self, said: str) -> None:
        """The upstream ``said`` "go ahead" to our STARTTLS: nothing may follow it."""
        if len(self._server):
            raise self._upstream_error(f"upstream sent data behind its {said}")
        self._upstream_move(_UI.TLS_GRANTED)
        self._out.append(StartTls(Side.SERVER))

    def _require_xoauth2(self, offered: frozenset[str], listing: str) -> bool:
        """Is XOAUTH2 among the ``offered`` mechanisms? If not, the upstream is unsuitable
        (``listing`` says how the protocol lists it: ``AUTH=XOAUTH2``...)."""
        if "XOAUTH2" in offered:
            return True
        names = printable(" ".join(sorted(offered))) or "none"
        self._unsuitable(f"it does not offer {listing} (SASL mechanisms offered: {names})")
        return False

    def _on_continuation(self, payload: bytes) -> None:
        """A continuation request: the go-ahead for the token, or an error challenge."""
        state = self._upstream
        if state is _U.AUTH_SENT:
            attempt = self._current_attempt()
            self._upstream_move(_UI.GO_AHEAD)
            self._to_server(attempt.response + CRLF)
            attempt.response = b""
        elif state is _U.TOKEN_SENT:
            self._upstream_move(_UI.CHALLENGED)
            self._current_attempt().challenge = describe_error_challenge(payload)
            self._to_server(CRLF)
        else:
            raise self._upstream_error(f"unexpected continuation request in state {state.name}")

    def _logged_in(self, answer: bytes) -> None:
        """The upstream accepted the token: ``answer`` (complete) tells the client."""
        attempt = self._current_attempt()
        if self._upstream is _U.AUTH_SENT:
            raise self._upstream_error("upstream accepted XOAUTH2 without a token")
        self._upstream_move(_UI.ACCEPTED)
        self._client_move(_CI.LOGIN_SUCCEEDED)
        self._to_client(answer)
        self._note(Severity.INFO, f"logged in to the upstream as {attempt.mailbox!r}")
        self._out.append(
            BeginRelay(to_server=self._client_buf.take_all(), to_client=self._server.take_all())
        )
        self._attempt = None

    def _login_refused(self, verdict: Verdict, said: str) -> None:
        """The upstream refused the login; ``said`` is its refusal, made printable."""
        attempt = self._current_attempt()
        self._upstream_move(_UI.REFUSED)
        challenge = f" (error challenge: {attempt.challenge})" if attempt.challenge else ""
        who = f"login as {attempt.login!r} (mailbox {attempt.mailbox!r})"
        answered = self.words.unavailable_name
        match verdict:
            case Verdict.TOKEN_REJECTED:
                causes = (
                    f"Likely causes: {self.token_rejected_causes}"
                    if attempt.provider == "microsoft"
                    else rejection_causes(attempt.provider)
                )
                self._note(
                    Severity.WARNING,
                    f"{who}: the upstream rejected the token: {said}{challenge}. {causes}",
                )
            case Verdict.TEMPORARY:
                self._note(Severity.WARNING, f"{who}: upstream temporarily unavailable: {said}")
            case Verdict.SYSTEM_ERROR:
                self._note(
                    Severity.ERROR,
                    f"{who}: the upstream reports a system error: {said}{challenge}. "
                    f"Answered {answered}: the user's password is not the problem.",
                )
            case Verdict.EXCHANGE_REFUSED:
                self._note(
                    Severity.ERROR,
                    f"{who}: the upstream refused the XOAUTH2 exchange itself: "
                    f"{said}{challenge}. This is not a password problem; check that the "
                    f"server supports XOAUTH2 as advertised. Answered {answered}.",
                )
            case _:
                assert_never(verdict)
        permanent = verdict is Verdict.TOKEN_REJECTED
        self._login_failed(self.words.auth_failed if permanent else self.words.unavailable)

    # === joining the two sides ===========================================================

    def _join(self) -> None:
        """Move a login attempt on once both sides allow it (see the module docstring)."""
        attempt = self._attempt
        if attempt is None or self._client not in _CLIENT_LOGGING_IN:
            return
        upstream = self._upstream
        if upstream is _U.DOWN and attempt.fresh_connections > 0:
            # start() opened the first connection, so this is always a reconnection.
            attempt.fresh_connections -= 1
            self._note(Severity.INFO, f"reconnecting: the upstream {self._trouble}")
            self._connect()
        elif self._client is not _C.AUTHORIZING:
            return
        elif upstream in (_U.DOWN, _U.FAILED):
            self._upstream_failed_login(f"the upstream {self._trouble}")
        elif upstream is _U.READY:
            self._send_authenticate()

    # === what each protocol provides =====================================================

    @abc.abstractmethod
    def _greet(self) -> None:
        """Send the greeting."""

    @abc.abstractmethod
    def _next_command(self) -> CommandT | None:
        """The next complete command from ``_client_buf``, or ``None``; may raise
        :class:`FrameError`."""

    @abc.abstractmethod
    def _on_command(self, command: CommandT) -> None:
        """Answer one command, moving the client side."""

    @abc.abstractmethod
    def _on_reply(self, reply: ReplyT) -> None:
        """Take one upstream reply, moving the upstream side."""

    @abc.abstractmethod
    def _ask_capabilities(self) -> None:
        """Ask the upstream what it offers (after TLS)."""

    def _send_authenticate(self) -> None:
        """Send the XOAUTH2 login (moving ``AUTHENTICATE`` or ``AUTHENTICATE_IR``): by
        default the command alone, the token after the continuation request."""
        self._upstream_move(_UI.AUTHENTICATE)
        self._to_server(b"AUTH XOAUTH2" + CRLF)
