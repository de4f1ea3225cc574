"""The pre-authentication phase of one proxied POP3 connection: :class:`Pop3Auth`.

Theory of operation
===================

The proxy stands between a legacy client, to which it is a POP3 server, and the real
(upstream) server, to which it is a POP3 client. ``Pop3Auth`` is a sans-I/O machine for
both conversations at once, built like :mod:`proxy.protocol.imap`: the driver feeds it
events (bytes or closes from either peer, a token issued or refused, TLS established) and
carries out the actions it returns. It never calls out, reads a clock or logs; asking for
a token is an action.

Two sub-machines run interleaved, each a state enum plus a :class:`TransitionTable`
(``CLIENT_TRANSITIONS``, ``UPSTREAM_TRANSITIONS`` below; :func:`state_diagrams` draws
them). They meet in :meth:`Pop3Auth._join`: once the client's credentials are accepted (a
token was issued, client state ``AUTHORIZING``) *and* the upstream is ready (``READY``),
the proxy sends ``AUTH XOAUTH2`` upstream.

Client side (we are the server; RFC 1939, RFC 2449, RFC 5034)
    ``start()`` sends our greeting (``+OK``, without an APOP timestamp, so that no client
    tries APOP, whose shared secret we do not have) and, in the same breath, asks the
    driver to connect upstream, so that the upstream greeting, STLS and CAPA round trips
    overlap with the client's login. Commands are a keyword, case-insensitive, and
    arguments separated by single spaces (RFC 1939 section 3).

    * ``CAPA`` (RFC 2449 section 5) is answered locally with our own list: ``USER``,
      ``SASL PLAIN LOGIN`` (followed by ``EXTERNAL`` when ``AuthSettings.sasl_external``
      is set and ``XOAUTH2 OAUTHBEARER`` when ``sasl_bearer`` is), ``RESP-CODES``,
      ``AUTH-RESP-CODE`` (RFC 3206: every refusal of credentials carries ``[AUTH]``);
      on a STARTTLS listener before TLS ``STLS``
      instead of ``USER`` and ``SASL`` (RFC 2595 section 4, RFC 8314). Once the
      upstream's own CAPA is known, its lines for ``TOP``, ``UIDL``, ``PIPELINING``,
      ``EXPIRE`` and ``LOGIN-DELAY`` follow ours unchanged: they describe the
      TRANSACTION state the client will reach, which is the upstream's. A client that
      asks before the upstream has answered sees our lines only: we do not hold the
      answer back for an upstream that may be slow or down, and clients learn the
      upstream's full list by asking CAPA again after login (relayed), as RFC 2449
      section 5 allows the list to change at login. ``PIPELINING`` in particular is
      offered only if the upstream offers it, because commands pipelined behind the
      login reach the upstream as they came. Pre-authentication pipelining works
      regardless: every complete line is answered in order.
    * ``AUTH`` without arguments lists our mechanisms as a multi-line ``+OK`` response
      (not in RFC 5034, but Outlook and others send it; Dovecot answers it likewise);
      before TLS on a STARTTLS listener the list is empty.
    * ``STLS`` (only on a STARTTLS listener, before TLS) is answered by a
      :class:`StartTls` action carrying our ``+OK`` as its preface; any byte pipelined
      behind the STLS line is a :class:`ClientProtocolError` (the CVE-2011-0411 class).
    * ``USER name`` then ``PASS password``. Both take the rest of the line verbatim after
      one space, so passwords may contain spaces (RFC 1939 section 7 allows a server to
      treat them so). ``USER`` is always answered ``+OK``, whatever the name, so unknown
      users cannot be told from wrong passwords; ``PASS`` must follow ``USER`` (RFC 1939
      section 7): a refused command in between forgets the name, ``CAPA`` does not.
    * ``AUTH PLAIN`` (RFC 4616) and ``AUTH LOGIN`` (draft-murchison-sasl-login), each with
      an initial response (RFC 5034 section 4; ``=`` for an empty one; for LOGIN it is
      the user name) or after our continuations: ``+ `` for PLAIN, ``+ VXNlcm5hbWU6``
      and ``+ UGFzc3dvcmQ6`` ("Username:", "Password:") for LOGIN, as clients expect.
      ``*`` cancels (``-ERR``, RFC 5034 section 4); base64 is strict. Where offered, the
      mechanisms for app identities work like PLAIN (one response, inline or after
      ``+ ``): ``AUTH EXTERNAL`` (RFC 4422 appendix A: the TLS client certificate, with
      the authorization identity or nothing as the response), ``AUTH XOAUTH2`` and ``AUTH
      OAUTHBEARER`` (RFC 7628: a mailbox and an app key as the bearer token). Mechanism
      names are case-insensitive; others get ``-ERR Unsupported authentication
      mechanism.``
    * ``QUIT`` is answered locally and closes.
    * Before TLS on a STARTTLS listener, ``USER``, ``PASS`` and ``AUTH <mechanism>`` get
      ``-ERR Plaintext login disallowed; use STLS first.`` without a response code: the
      credentials were not judged, so ``[AUTH]`` (RFC 3206 sections 5 and 6: what
      AUTH-RESP-CODE promises for problems *with the credentials*) would make clients
      discard a good password, and ``[SYS/PERM]`` (RFC 3206 section 4) would misreport
      a policy as a system fault. CAPA offers neither USER nor SASL then, so compliant
      clients never get there.
    * Commands of the TRANSACTION state (``STAT``, ``RETR``, ``NOOP``...) get ``-ERR
      Please log in first.``, unknown ones ``-ERR Unknown command.``; every refused
      command counts against ``max_bad_commands``; the refusal that reaches it is
      followed by ``-ERR Too many invalid commands.`` and :class:`Close` (Dovecot, too,
      adds such a line before it hangs up).

    Lines are bounded by ``max_line`` for commands and SASL responses alike (RFC 2449
    section 4 limits commands to 255 octets, but refusing a longer line helps nobody).
    Once credentials are parsed the machine says :class:`RequestToken` and stops
    parsing: whatever the client sends meanwhile is buffered raw (up to ``max_line``
    bytes). Those are pipelined post-login commands; on success they become
    ``BeginRelay.to_server`` untouched, on failure they are parsed as the next commands.

Upstream side (we are the client)
    Greeting: ``+OK`` (Debian's Dovecot: ``+OK Dovecot (Debian) ready.``); ``-ERR``
    means "not now" (the connection is expected to close). With ``UpstreamTls.STARTTLS``
    we send ``STLS`` straight away (an upstream that refuses it is unusable) and expect
    ``+OK`` with nothing behind it (bytes behind it are an :class:`UpstreamProtocolError`),
    then :class:`StartTls` towards the server. With implicit TLS, or after STLS, we send
    ``CAPA`` and read its list (dot-unstuffed, bounded by ``max_server_line``), which
    must offer ``SASL ... XOAUTH2``; a server without CAPA cannot say that it does, and
    is unusable. Then, joined with the client's token, ``AUTH XOAUTH2`` alone, and the
    base64 token on its own line after the server's ``+`` (DESIGN.md section 3: tokens
    are far over RFC 2449's 255-octet command line). An unsolicited ``-ERR`` while idle
    (Dovecot's "Disconnected for inactivity.") means the connection is closing.

Outcomes
    * ``+OK``: the upstream's line goes to the client as the answer to its PASS or AUTH
      (Dovecot: ``+OK Logged in.``), then :class:`BeginRelay` with the client's
      pipelined bytes and whatever the upstream sent behind its ``+OK``.
    * An error challenge (``+ <base64 JSON>``, RFC 7628 section 3.2.2, as Dovecot and
      Google use it for XOAUTH2) is answered with an empty line to obtain the final
      ``-ERR``; its decoded JSON goes into the operator's :class:`Note`.
    * ``-ERR [AUTH] ...``, or ``-ERR`` without a code: the client gets exactly ``-ERR
      [AUTH] Authentication failed.`` (the token was refused for this mailbox; the note
      names the likely causes: roles, mailbox permission, POP disabled).
      ``[SYS/TEMP]``, ``[IN-USE]`` and ``[LOGIN-DELAY]`` (RFC 2449 section 8, RFC 3206)
      are temporary: the client gets ``-ERR [SYS/TEMP] ...``. So does ``[SYS/PERM]``,
      noted at ERROR severity: it is the operator's problem, not the user's password.
    * ``-ERR`` to ``AUTH XOAUTH2`` itself, before the token was sent: the proxy and the
      upstream disagree about XOAUTH2, which is nobody's password problem, so the client
      gets ``-ERR [SYS/TEMP]`` and the note says so at ERROR severity.
    * :class:`TokenRefused`: ``CREDENTIALS`` gives exactly ``-ERR [AUTH] Authentication
      failed.`` whatever the reason (wrong password or unknown user); ``UNAVAILABLE``
      gives ``-ERR [SYS/TEMP] ...``. Credentials that cannot be anyone's (not UTF-8,
      control characters, an empty user name) are refused the same way without asking.
    * A refused XOAUTH2 or OAUTHBEARER login (``CREDENTIALS``, or a message that does not
      parse) is answered as servers do (RFC 7628 section 3.2.2): first an error challenge,
      ``+ <base64 JSON>`` (``{"status":"invalid_token"}`` for OAUTHBEARER, Google's and
      Dovecot's ``{"status":"401","schemes":"bearer"}`` for XOAUTH2), then, whatever
      line the client answers with (``AQ==`` for ^A, or an empty line), ``-ERR [AUTH]
      Authentication failed.`` ``UNAVAILABLE`` gets ``-ERR [SYS/TEMP]`` directly.

    Every failed login, permanent or temporary, counts against ``max_auth_failures``;
    the failure that reaches it is answered, followed by ``-ERR Too many failed
    logins.`` and :class:`Close`.
    After any other failure the client is back in ``AUTHORIZATION`` and may retry.

Upstream trouble and reconnecting
    As in :mod:`proxy.protocol.imap`: if the upstream cannot be reached, closes, or says
    ``-ERR`` while idle or in its greeting before the login has been sent to it, the
    machine notes why and marks it ``DOWN`` (after an ``-ERR`` it first waits, in
    ``CLOSING``, for the connection to end). Each login attempt may open one fresh
    upstream connection, in parallel with its token request; if that fails too, the
    attempt gets ``-ERR [SYS/TEMP]`` once its token is in (a refused password is still
    reported as such). Losing the upstream after the token was sent fails that attempt
    with ``-ERR [SYS/TEMP]``. An upstream that cannot be used at all (no STLS, no CAPA,
    no XOAUTH2) is ``FAILED`` for the rest of the session: a configuration problem that
    reconnecting does not fix.

Limits and errors
    Client lines over ``max_line`` raise :class:`ClientProtocolError` with ``-ERR Line
    too long.`` as its reply hint; upstream lines over ``max_server_line`` (or a longer
    CAPA list) raise :class:`UpstreamProtocolError` with ``-ERR [SYS/TEMP] ...``. Before
    raising, the machine moves to ``ERROR`` and refuses every later event.
    :attr:`Pop3Auth.buffered` reports the bytes held, which these limits bound. An event
    that the driver could only send by breaking its contract (a token nobody asked for,
    TLS on a side that did not start it) raises ``RuntimeError``: that is a bug, not a
    peer's fault. The driver sends :data:`~proxy.protocol.replies.POP3_TIMEOUT` when the
    login phase outlasts its deadline.

Secrets
    The password and the app key leave the machine only inside :class:`RequestToken`,
    whose :class:`Credentials` and :class:`BearerCredentials` redact them; the token only
    as the XOAUTH2 line sent upstream. No note, error message or repr contains any of
    them, and nothing the client sends is ever echoed back to it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, assert_never

from proxy.protocol import replies
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
from proxy.protocol.capabilities import (
    POP3_SMTP_PASSWORD_MECHANISMS,
    Pop3Capabilities,
    pop3_proxy_capabilities,
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
from proxy.protocol.modes import ClientTls, UpstreamTls
from proxy.protocol.sasl import (
    Credentials,
    InvalidCredentials,
    Mechanism,
    SaslError,
    b64decode_strict,
    describe_error_challenge,
    parse_login_field,
    parse_response,
    text_credential,
    xoauth2_response,
)
from proxy.protocol.transitions import TransitionTable

if TYPE_CHECKING:
    from proxy.protocol.events import Event
    from proxy.protocol.modes import AuthSettings
    from proxy.protocol.sasl import AnyCredentials

__all__ = [
    "CLIENT_TRANSITIONS",
    "UPSTREAM_TRANSITIONS",
    "ClientInput",
    "ClientState",
    "Pop3Auth",
    "UpstreamInput",
    "UpstreamState",
    "state_diagrams",
]

CRLF: Final = b"\r\n"


# === States, inputs and the transition tables ==============================================


class ClientState(enum.Enum):
    """Where the conversation with the legacy client stands."""

    #: STARTTLS listener before TLS: only CAPA, AUTH (the empty list), QUIT and STLS work.
    PLAINTEXT = "plaintext"
    #: Our ``+OK`` to STLS is out; the driver runs the handshake.
    TLS_NEGOTIATION = "tls-negotiation"
    #: RFC 1939's AUTHORIZATION state: waiting for USER or AUTH.
    AUTHORIZATION = "authorization"
    #: USER was accepted; PASS may follow.
    USER_GIVEN = "user-given"
    #: AUTH PLAIN, EXTERNAL, XOAUTH2 or OAUTHBEARER without an initial response: our
    #: ``+ `` is out.
    SASL_RESPONSE = "sasl-response"
    #: AUTH LOGIN without an initial response: our ``+ VXNlcm5hbWU6`` is out.
    LOGIN_USERNAME = "login-username"
    #: AUTH LOGIN has its user name: our ``+ UGFzc3dvcmQ6`` is out.
    LOGIN_PASSWORD = "login-password"
    #: Credentials parsed, :class:`RequestToken` out; client bytes are buffered.
    AWAITING_TOKEN = "awaiting-token"
    #: A bearer login failed: our error challenge is out, the client's answer gets -ERR.
    ERROR_CHALLENGE = "error-challenge"
    #: Token in hand; waiting for the upstream to be ready and to accept it.
    AUTHORIZING = "authorizing"
    AUTHENTICATED = "authenticated"
    CLOSED = "closed"
    ERROR = "error"


class ClientInput(enum.Enum):
    DATA = "bytes"
    HARMLESS = "capa/auth list"
    REJECTED = "refused command"
    STLS = "stls"
    TLS_ESTABLISHED = "tls established"
    USER = "user"
    AUTH_SASL = "auth plain/external/xoauth2/oauthbearer (no initial response)"
    AUTH_LOGIN = "auth login (no initial response)"
    LOGIN_USERNAME = "auth login user name"
    CREDENTIALS = "credentials"
    CANCELLED = "sasl cancelled/malformed"
    CHALLENGED = "bearer login refused: error challenge"
    TOKEN_ISSUED = "token issued"
    LOGIN_FAILED = "login failed"
    LOGIN_SUCCEEDED = "login succeeded"
    QUIT = "quit"
    BUDGET_EXHAUSTED = "too many errors"
    PEER_CLOSED = "client closed"
    BROKE = "protocol error"


class UpstreamState(enum.Enum):
    """Where the conversation with the upstream server stands."""

    #: No connection (not yet, or lost); a login attempt may reconnect.
    DOWN = "down"
    CONNECTING = "connecting"
    GREETING = "greeting"
    #: Our STLS is out.
    STLS = "stls"
    TLS_NEGOTIATION = "tls-negotiation"
    #: Our CAPA is out (after TLS, or with implicit TLS).
    CAPA = "capa"
    #: CAPA was answered ``+OK``; reading its lines up to ``.``.
    CAPA_LIST = "capa-list"
    READY = "ready"
    #: ``AUTH XOAUTH2`` is out; waiting for ``+``.
    AUTH_SENT = "auth-sent"
    TOKEN_SENT = "token-sent"
    #: The error challenge was answered with an empty line; waiting for the final -ERR.
    ERROR_CHALLENGE = "error-challenge"
    #: The upstream said -ERR unasked; waiting for it to close.
    CLOSING = "closing"
    #: Unusable for this session (no STLS, no CAPA, no SASL XOAUTH2).
    FAILED = "failed"
    AUTHENTICATED = "authenticated"
    ERROR = "error"


class UpstreamInput(enum.Enum):
    CONNECT = "connect"
    CONNECTED = "connected"
    UNREACHABLE = "unreachable"
    ASK_STLS = "send STLS"
    TLS_GRANTED = "STLS +OK"
    TLS_ESTABLISHED = "tls established: send CAPA"
    ASK_CAPA = "send CAPA"
    LISTING = "CAPA +OK"
    CAPABILITY = "capability line"
    CAPABLE = "SASL XOAUTH2 offered"
    UNSUITABLE = "unusable"
    IGNORED = "bytes ignored"
    AUTHENTICATE = "send AUTH XOAUTH2"
    GO_AHEAD = "+: send token"
    CHALLENGED = "error challenge: send empty line"
    ACCEPTED = "+OK"
    REFUSED = "-ERR"
    GOODBYE = "-ERR unasked"
    PEER_CLOSED = "upstream closed"
    BROKE = "protocol error"


_C = ClientState
_CI = ClientInput
_U = UpstreamState
_UI = UpstreamInput

#: What a client may do wherever it may start a login (AUTHORIZATION and USER_GIVEN).
_LOGIN_STARTS: Final = {
    _CI.USER: _C.USER_GIVEN,
    _CI.AUTH_SASL: _C.SASL_RESPONSE,
    _CI.AUTH_LOGIN: _C.LOGIN_USERNAME,
    _CI.LOGIN_USERNAME: _C.LOGIN_PASSWORD,
    _CI.CREDENTIALS: _C.AWAITING_TOKEN,
    _CI.CHALLENGED: _C.ERROR_CHALLENGE,
    _CI.LOGIN_FAILED: _C.AUTHORIZATION,
    _CI.QUIT: _C.CLOSED,
    _CI.BUDGET_EXHAUSTED: _C.CLOSED,
    _CI.PEER_CLOSED: _C.CLOSED,
    _CI.BROKE: _C.ERROR,
}
#: The ways out of every SASL continuation state.
_SASL_EXITS: Final = {
    _CI.CANCELLED: _C.AUTHORIZATION,
    _CI.LOGIN_FAILED: _C.AUTHORIZATION,
    _CI.PEER_CLOSED: _C.CLOSED,
    _CI.BROKE: _C.ERROR,
}

#: Every legal move of the client side. ``BROKE`` (a raised ProxyError) leads from every
#: live state to ``ERROR``; ``DATA`` is absent from ``TLS_NEGOTIATION`` on purpose.
CLIENT_TRANSITIONS: Final = TransitionTable[ClientState, ClientInput](
    "pop3-client",
    {
        _C.PLAINTEXT: {
            _CI.DATA: _C.PLAINTEXT,
            _CI.HARMLESS: _C.PLAINTEXT,
            _CI.REJECTED: _C.PLAINTEXT,
            _CI.STLS: _C.TLS_NEGOTIATION,
            _CI.QUIT: _C.CLOSED,
            _CI.BUDGET_EXHAUSTED: _C.CLOSED,
            _CI.PEER_CLOSED: _C.CLOSED,
            _CI.BROKE: _C.ERROR,
        },
        _C.TLS_NEGOTIATION: {
            _CI.TLS_ESTABLISHED: _C.AUTHORIZATION,
            _CI.PEER_CLOSED: _C.CLOSED,
            _CI.BROKE: _C.ERROR,
        },
        _C.AUTHORIZATION: {
            _CI.DATA: _C.AUTHORIZATION,
            _CI.HARMLESS: _C.AUTHORIZATION,
            _CI.REJECTED: _C.AUTHORIZATION,
            **_LOGIN_STARTS,
        },
        _C.USER_GIVEN: {
            _CI.DATA: _C.USER_GIVEN,
            _CI.HARMLESS: _C.USER_GIVEN,
            # PASS must follow USER (RFC 1939 section 7): a refused command forgets the name.
            _CI.REJECTED: _C.AUTHORIZATION,
            **_LOGIN_STARTS,
        },
        _C.SASL_RESPONSE: {
            _CI.DATA: _C.SASL_RESPONSE,
            _CI.CREDENTIALS: _C.AWAITING_TOKEN,
            _CI.CHALLENGED: _C.ERROR_CHALLENGE,
            **_SASL_EXITS,
        },
        _C.LOGIN_USERNAME: {
            _CI.DATA: _C.LOGIN_USERNAME,
            _CI.LOGIN_USERNAME: _C.LOGIN_PASSWORD,
            **_SASL_EXITS,
        },
        _C.LOGIN_PASSWORD: {
            _CI.DATA: _C.LOGIN_PASSWORD,
            _CI.CREDENTIALS: _C.AWAITING_TOKEN,
            **_SASL_EXITS,
        },
        _C.AWAITING_TOKEN: {
            _CI.DATA: _C.AWAITING_TOKEN,
            _CI.TOKEN_ISSUED: _C.AUTHORIZING,
            _CI.CHALLENGED: _C.ERROR_CHALLENGE,
            _CI.LOGIN_FAILED: _C.AUTHORIZATION,
            _CI.PEER_CLOSED: _C.CLOSED,
            _CI.BROKE: _C.ERROR,
        },
        _C.ERROR_CHALLENGE: {
            _CI.DATA: _C.ERROR_CHALLENGE,
            _CI.LOGIN_FAILED: _C.AUTHORIZATION,
            _CI.PEER_CLOSED: _C.CLOSED,
            _CI.BROKE: _C.ERROR,
        },
        _C.AUTHORIZING: {
            _CI.DATA: _C.AUTHORIZING,
            _CI.LOGIN_SUCCEEDED: _C.AUTHENTICATED,
            _CI.LOGIN_FAILED: _C.AUTHORIZATION,
            _CI.PEER_CLOSED: _C.CLOSED,
            _CI.BROKE: _C.ERROR,
        },
    },
)

_CONNECTED_EXITS: Final = {_UI.PEER_CLOSED: _U.DOWN, _UI.BROKE: _U.ERROR}

#: Every legal move of the upstream side.
UPSTREAM_TRANSITIONS: Final = TransitionTable[UpstreamState, UpstreamInput](
    "pop3-upstream",
    {
        _U.DOWN: {_UI.CONNECT: _U.CONNECTING, _UI.BROKE: _U.ERROR},
        _U.CONNECTING: {
            _UI.CONNECTED: _U.GREETING,
            _UI.UNREACHABLE: _U.DOWN,
            _UI.BROKE: _U.ERROR,
        },
        _U.GREETING: {
            _UI.ASK_STLS: _U.STLS,
            _UI.ASK_CAPA: _U.CAPA,
            _UI.GOODBYE: _U.CLOSING,
            **_CONNECTED_EXITS,
        },
        _U.STLS: {
            _UI.TLS_GRANTED: _U.TLS_NEGOTIATION,
            _UI.UNSUITABLE: _U.FAILED,
            **_CONNECTED_EXITS,
        },
        _U.TLS_NEGOTIATION: {
            _UI.TLS_ESTABLISHED: _U.CAPA,
            _UI.UNREACHABLE: _U.DOWN,
            _UI.BROKE: _U.ERROR,
        },
        _U.CAPA: {
            _UI.LISTING: _U.CAPA_LIST,
            _UI.UNSUITABLE: _U.FAILED,
            **_CONNECTED_EXITS,
        },
        _U.CAPA_LIST: {
            _UI.CAPABILITY: _U.CAPA_LIST,
            _UI.CAPABLE: _U.READY,
            _UI.UNSUITABLE: _U.FAILED,
            **_CONNECTED_EXITS,
        },
        _U.READY: {
            _UI.AUTHENTICATE: _U.AUTH_SENT,
            _UI.GOODBYE: _U.CLOSING,
            **_CONNECTED_EXITS,
        },
        _U.AUTH_SENT: {
            _UI.GO_AHEAD: _U.TOKEN_SENT,
            _UI.REFUSED: _U.READY,
            **_CONNECTED_EXITS,
        },
        _U.TOKEN_SENT: {
            _UI.CHALLENGED: _U.ERROR_CHALLENGE,
            _UI.ACCEPTED: _U.AUTHENTICATED,
            _UI.REFUSED: _U.READY,
            **_CONNECTED_EXITS,
        },
        _U.ERROR_CHALLENGE: {
            _UI.ACCEPTED: _U.AUTHENTICATED,
            _UI.REFUSED: _U.READY,
            **_CONNECTED_EXITS,
        },
        _U.CLOSING: {_UI.IGNORED: _U.CLOSING, _UI.PEER_CLOSED: _U.DOWN, _UI.BROKE: _U.ERROR},
        _U.FAILED: {_UI.IGNORED: _U.FAILED, _UI.PEER_CLOSED: _U.FAILED, _UI.BROKE: _U.ERROR},
    },
)

#: Client states in which bytes are parsed as commands or SASL responses.
_CLIENT_PARSING: Final = frozenset(
    {
        _C.PLAINTEXT,
        _C.AUTHORIZATION,
        _C.USER_GIVEN,
        _C.SASL_RESPONSE,
        _C.LOGIN_USERNAME,
        _C.LOGIN_PASSWORD,
        _C.ERROR_CHALLENGE,
    }
)
#: Client states in which a line is a SASL response, not a command.
_CLIENT_SASL: Final = frozenset(
    {_C.SASL_RESPONSE, _C.LOGIN_USERNAME, _C.LOGIN_PASSWORD, _C.ERROR_CHALLENGE}
)
#: Client states of a login under way (bytes are buffered raw).
_CLIENT_LOGGING_IN: Final = frozenset({_C.AWAITING_TOKEN, _C.AUTHORIZING})
_CLIENT_TERMINAL: Final = frozenset({_C.AUTHENTICATED, _C.CLOSED, _C.ERROR})
#: Upstream states whose bytes are parsed as replies.
_UPSTREAM_PARSING: Final = frozenset(
    {
        _U.GREETING,
        _U.STLS,
        _U.CAPA,
        _U.CAPA_LIST,
        _U.READY,
        _U.AUTH_SENT,
        _U.TOKEN_SENT,
        _U.ERROR_CHALLENGE,
    }
)
#: Upstream states in which our AUTH XOAUTH2 is out.
_UPSTREAM_IN_FLIGHT: Final = frozenset({_U.AUTH_SENT, _U.TOKEN_SENT, _U.ERROR_CHALLENGE})


def state_diagrams() -> str:
    """Both transition tables as Graphviz digraphs."""
    return CLIENT_TRANSITIONS.to_dot() + UPSTREAM_TRANSITIONS.to_dot()


# === Syntax ================================================================================

#: Commands of the TRANSACTION state (RFC 1939 section 5 and 7, RFC 2449): before login
#: they get "Please log in first." rather than "Unknown command.".
_AFTER_LOGIN_COMMANDS: Final = frozenset(b"STAT LIST RETR DELE NOOP RSET TOP UIDL LAST".split())
#: Commands the proxy runs itself before login (refused with a syntax error when their
#: arguments are wrong).
_LOCAL_COMMANDS: Final = frozenset({b"CAPA", b"QUIT", b"STLS", b"USER", b"PASS", b"AUTH"})
#: Upstream response codes (RFC 2449 section 8, RFC 3206) that mean "try again later".
_TEMPORARY_CODES: Final = frozenset({b"SYS/TEMP", b"IN-USE", b"LOGIN-DELAY"})


class _Status(enum.Enum):
    OK = "+OK"
    ERR = "-ERR"
    #: A SASL continuation request, ``+`` and maybe a base64 payload.
    CONTINUE = "+"


@dataclass(frozen=True, slots=True)
class _Reply:
    """One reply line from the upstream, split the way RFC 1939 and RFC 2449 describe it."""

    status: _Status
    #: The extended response code, upper-cased (``AUTH``, ``SYS/TEMP``...), or empty.
    code: bytes
    #: The text after the status indicator and code; for ``+``, the base64 payload.
    text: bytes
    #: The line as received, without its line ending.
    raw: bytes

    @classmethod
    def parse(cls, line: bytes) -> _Reply | None:
        """The reply, or ``None`` if the line is not one."""
        head, _, rest = line.partition(b" ")
        word = head.upper()
        if head == b"+":
            return cls(_Status.CONTINUE, b"", rest, line)
        if word not in (b"+OK", b"-ERR"):
            return None
        code = b""
        if rest.startswith(b"["):
            end = rest.find(b"]")
            if end > 0:
                code, rest = rest[1:end].upper(), rest[end + 1 :].lstrip(b" ")
        return cls(_Status.OK if word == b"+OK" else _Status.ERR, code, rest, line)


@dataclass(slots=True)
class _Attempt:
    """One login attempt, from the credentials to the upstream's verdict."""

    login: str
    #: How the client logs in (USER and PASS carry what PLAIN does).
    mechanism: Mechanism = Mechanism.PLAIN
    #: Upstream connections this attempt may still open.
    fresh_connections: int = 1
    mailbox: str = ""
    #: The XOAUTH2 initial response (base64 of the token), until it is sent.
    response: bytes = field(default=b"", repr=False)
    #: The upstream's error challenge, decoded for the operator.
    challenge: str = ""
    #: Who issued the token (its refusal's likely causes depend on it).
    provider: str = "microsoft"


class _Fault(enum.Enum):
    CLIENT = "client"
    UPSTREAM = "upstream"
    #: The driver broke its contract, or this module has a bug.
    BUG = "bug"


# === The machine ===========================================================================


class Pop3Auth:
    """The pre-authentication phase of one proxied POP3 connection (see the module
    docstring). Call :meth:`start` once, then :meth:`handle` for every event until an
    action says :class:`BeginRelay` or :class:`Close`, or a :class:`ProxyError` is raised.
    """

    __slots__ = (
        "_attempt",
        "_auth_failures",
        "_bad_commands",
        "_capa_lines",
        "_capa_size",
        "_caps",
        "_client",
        "_client_buf",
        "_error",
        "_login_name",
        "_mechanism",
        "_mechanisms",
        "_out",
        "_server",
        "_settings",
        "_started",
        "_trouble",
        "_upstream",
        "_user",
    )

    def __init__(self, settings: AuthSettings) -> None:
        self._settings = settings
        #: What AUTH accepts and lists, and CAPA offers.
        self._mechanisms = (*POP3_SMTP_PASSWORD_MECHANISMS, *settings.app_mechanisms)
        self._started = False
        self._client = (
            _C.PLAINTEXT if settings.client_tls is ClientTls.STARTTLS else _C.AUTHORIZATION
        )
        self._upstream = _U.DOWN
        self._client_buf = LineBuffer(settings.max_line)
        self._server = LineBuffer(settings.max_server_line)
        #: The USER argument, raw, until PASS (validated there, so USER always says +OK).
        self._user = b""
        #: The AUTH LOGIN user name, until its password arrives.
        self._login_name = ""
        #: The mechanism whose response is awaited in ``SASL_RESPONSE``.
        self._mechanism = Mechanism.PLAIN
        self._attempt: _Attempt | None = None
        self._bad_commands = 0
        self._auth_failures = 0
        #: The upstream's last complete CAPA list, and the one being read.
        self._caps = Pop3Capabilities()
        self._capa_lines: list[bytes] = []
        self._capa_size = 0
        self._trouble = "not connected yet"
        self._error: ProxyError | None = None
        self._out: list[Action] = []

    def __repr__(self) -> str:
        return (
            f"<Pop3Auth client={self._client.name} upstream={self._upstream.name} "
            f"buffered={self.buffered}>"
        )

    @property
    def client_state(self) -> ClientState:
        return self._client

    @property
    def upstream_state(self) -> UpstreamState:
        return self._upstream

    @property
    def buffered(self) -> int:
        """Bytes held for either peer (bounded by the limits in :class:`AuthSettings`)."""
        return len(self._client_buf) + len(self._server) + self._capa_size

    # -- entry points ----------------------------------------------------------------------

    def start(self) -> list[Action]:
        """Greet the client and open the upstream connection."""
        if self._started:
            raise RuntimeError("Pop3Auth.start() called twice")
        self._started = True
        self._out = []
        self._reply(replies.POP3_GREETING)
        self._connect()
        return self._out

    def handle(self, event: Event) -> list[Action]:
        """Feed one event; return what to do. Raises :class:`ProxyError` subclasses."""
        if not self._started:
            raise RuntimeError("Pop3Auth.handle() before start()")
        if self._error is not None:
            raise type(self._error)(
                f"session already failed: {self._error}", reply_hint=self._error.reply_hint
            )
        if self._client in _CLIENT_TERMINAL:
            raise RuntimeError(f"Pop3Auth.handle() after the auth phase ended ({self._client})")
        self._out = []
        try:
            self._dispatch(event)
            self._settle()
        except ProxyError as exc:
            self._error = exc
            self._client = CLIENT_TRANSITIONS.next_state(self._client, _CI.BROKE) or _C.ERROR
            self._upstream = UPSTREAM_TRANSITIONS.next_state(self._upstream, _UI.BROKE) or _U.ERROR
            raise
        return self._out

    def _dispatch(self, event: Event) -> None:
        match event:
            case ClientDataReceived(data=data):
                self._client_move(_CI.DATA, _Fault.CLIENT)
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
                    self._login_failed(replies.POP3_UNAVAILABLE)
                elif attempt.mechanism.bearer:
                    self._challenge(attempt)
                else:
                    self._login_failed(replies.POP3_AUTH_FAILED)
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
        if self._client in _CLIENT_LOGGING_IN:
            limit = self._settings.max_line
            if len(self._client_buf) > limit:
                raise self._fault(
                    _Fault.CLIENT,
                    f"more than {limit} bytes pipelined behind the login",
                    replies.POP3_PIPELINED,
                )

    # -- moves -----------------------------------------------------------------------------

    def _client_move(self, what: ClientInput, fault: _Fault = _Fault.BUG) -> None:
        target = CLIENT_TRANSITIONS.next_state(self._client, what)
        if target is None:
            raise self._fault(
                fault, f"{what.value!r} not allowed in client state {self._client.name}"
            )
        self._client = target
        # Half-given credentials live only as long as the state that expects the rest.
        if target is not _C.USER_GIVEN:
            self._user = b""
        if target is not _C.LOGIN_PASSWORD:
            self._login_name = ""

    def _upstream_move(self, what: UpstreamInput, fault: _Fault = _Fault.BUG) -> None:
        target = UPSTREAM_TRANSITIONS.next_state(self._upstream, what)
        if target is None:
            raise self._fault(
                fault, f"{what.value!r} not allowed in upstream state {self._upstream.name}"
            )
        self._upstream = target
        if target in (_U.DOWN, _U.CLOSING, _U.FAILED):
            # Whatever that connection still had in flight is worthless now.
            self._server.take_all()
            self._capa_lines, self._capa_size = [], 0

    def _fault(self, fault: _Fault, message: str, hint: bytes = b"") -> Exception:
        match fault:
            case _Fault.CLIENT:
                return ClientProtocolError(message, reply_hint=hint or replies.POP3_PROTOCOL_ERROR)
            case _Fault.UPSTREAM:
                return UpstreamProtocolError(
                    message, reply_hint=hint or replies.POP3_UNAVAILABLE_CLOSING
                )
            case _Fault.BUG:
                return RuntimeError(message)
            case _:
                assert_never(fault)

    # -- output helpers --------------------------------------------------------------------

    def _to_client(self, data: bytes) -> None:
        last = self._out[-1] if self._out else None
        if isinstance(last, SendToClient):
            self._out[-1] = SendToClient(last.data + data)
        else:
            self._out.append(SendToClient(data))

    def _reply(self, status_line: bytes) -> None:
        self._to_client(status_line + CRLF)

    def _to_server(self, data: bytes) -> None:
        self._out.append(SendToServer(data))

    def _note(self, severity: Severity, text: str) -> None:
        self._out.append(Note(severity, text))

    def _close(self, last_line: bytes, reason: str) -> None:
        self._to_client(last_line)
        self._out.append(Close(reason))

    # === client side =====================================================================

    def _parse_client(self) -> None:
        while self._client in _CLIENT_PARSING:
            try:
                line = self._client_buf.next_line()
            except FrameError as exc:
                raise self._fault(_Fault.CLIENT, str(exc), replies.POP3_LINE_TOO_LONG) from None
            if line is None:
                return
            if self._client in _CLIENT_SASL:
                self._on_sasl_response(line)
            else:
                self._on_command(line)

    def _on_command(self, line: bytes) -> None:
        keyword, space, args = line.partition(b" ")
        name = keyword.upper()
        bare = not space
        plaintext = self._client is _C.PLAINTEXT
        if name == b"CAPA" and bare:
            self._client_move(_CI.HARMLESS)
            caps = pop3_proxy_capabilities(
                before_tls=plaintext, upstream=self._caps, mechanisms=self._mechanisms
            )
            self._to_client(replies.POP3_CAPA_FOLLOWS + CRLF + caps + b"." + CRLF)
        elif name == b"AUTH" and bare:
            self._client_move(_CI.HARMLESS)
            mechanisms = b"".join(m.value.encode("ascii") + CRLF for m in self._mechanisms)
            mechanisms = b"" if plaintext else mechanisms
            self._to_client(replies.POP3_MECHANISMS_FOLLOW + CRLF + mechanisms + b"." + CRLF)
        elif name == b"QUIT" and bare:
            self._client_move(_CI.QUIT)
            self._reply(replies.POP3_LOGOUT)
            self._out.append(Close("client logged out"))
        elif name == b"STLS" and bare and plaintext:
            self._on_stls()
        elif name in (b"USER", b"PASS", b"AUTH") and plaintext:
            self._rejected(replies.POP3_TLS_REQUIRED)
        elif name == b"USER" and not bare:
            self._client_move(_CI.USER)
            self._user = args
            self._reply(replies.POP3_USER_ACCEPTED)
        elif name == b"PASS" and self._client is not _C.USER_GIVEN:
            self._rejected(replies.POP3_NO_USER)
        elif name == b"PASS" and not bare:
            self._on_pass(args)
        elif name == b"AUTH":
            self._on_auth(args)
        elif name == b"STLS" and not plaintext:
            self._rejected(replies.POP3_NO_STLS)
        elif name in _AFTER_LOGIN_COMMANDS:
            self._rejected(replies.POP3_LOG_IN_FIRST)
        elif name in _LOCAL_COMMANDS:
            self._rejected(replies.POP3_SYNTAX_ERROR)
        else:
            self._rejected(replies.POP3_UNKNOWN_COMMAND)

    def _rejected(self, reply: bytes, what: ClientInput = _CI.REJECTED) -> None:
        """Send a refusal and count it; close once the budget is spent."""
        self._reply(reply)
        self._client_move(what)
        self._bad_commands += 1
        if self._bad_commands >= self._settings.max_bad_commands:
            self._client_move(_CI.BUDGET_EXHAUSTED)
            self._note(Severity.INFO, f"client sent {self._bad_commands} invalid commands")
            self._close(replies.POP3_TOO_MANY_ERRORS, "too many invalid commands")

    def _on_stls(self) -> None:
        if len(self._client_buf):
            # Plaintext behind STLS would be taken as said inside TLS (CVE-2011-0411).
            raise self._fault(_Fault.CLIENT, "client pipelined data behind STLS")
        self._client_move(_CI.STLS)
        self._out.append(StartTls(Side.CLIENT, preface=replies.POP3_BEGIN_TLS + CRLF))

    def _on_pass(self, password: bytes) -> None:
        try:
            login = text_credential(self._user, "user name")
            if not login:
                raise InvalidCredentials("user name is empty")
            credentials = Credentials(login=login, password=text_credential(password, "password"))
        except InvalidCredentials as exc:
            self._invalid_credentials(exc)
            return
        self._begin_login(credentials)

    def _on_auth(self, args: bytes) -> None:
        name, space, initial = args.partition(b" ")
        if not name or (space and not initial) or b" " in initial:
            self._rejected(replies.POP3_SYNTAX_ERROR)
            return
        # RFC 5034 section 4: "=" is an empty initial response.
        encoded = b"" if initial == b"=" else initial
        mechanism = Mechanism.named(name, self._mechanisms)
        if mechanism is None:
            self._rejected(replies.POP3_UNSUPPORTED_MECHANISM)
        elif mechanism is Mechanism.LOGIN and space:
            self._login_username(encoded, _CI.REJECTED)
        elif mechanism is Mechanism.LOGIN:
            self._client_move(_CI.AUTH_LOGIN)
            self._to_client(replies.POP3_CONTINUE_USERNAME)
        elif space:
            self._sasl(mechanism, encoded, _CI.REJECTED)
        else:
            self._client_move(_CI.AUTH_SASL)
            self._mechanism = mechanism
            self._to_client(replies.POP3_CONTINUE_SASL)

    def _on_sasl_response(self, line: bytes) -> None:
        state = self._client
        if state is _C.ERROR_CHALLENGE:
            # Whatever the line says (RFC 7628 wants ^A, XOAUTH2 clients send an empty
            # line, "*" cancels), the login has failed; the answer is not echoed or logged.
            self._login_failed(replies.POP3_AUTH_FAILED)
        elif line == b"*":
            self._rejected(replies.POP3_CANCELLED, _CI.CANCELLED)
        elif state is _C.SASL_RESPONSE:
            self._sasl(self._mechanism, line, _CI.CANCELLED)
        elif state is _C.LOGIN_USERNAME:
            self._login_username(line, _CI.CANCELLED)
        else:
            login = self._login_name
            raw = self._decode(line, _CI.CANCELLED)
            if raw is None:
                return
            try:
                password = parse_login_field(raw, "password")
            except InvalidCredentials as exc:
                self._invalid_credentials(exc)
                return
            self._begin_login(Credentials(login=login, password=password))

    def _decode(self, encoded: bytes, refusal: ClientInput) -> bytes | None:
        """Strict base64, or ``None`` after refusing it (``refusal`` is the move)."""
        try:
            return b64decode_strict(encoded)
        except SaslError:
            self._rejected(replies.POP3_INVALID_BASE64, refusal)
            return None

    def _sasl(self, mechanism: Mechanism, encoded: bytes, refusal: ClientInput) -> None:
        """Decode the one response of ``mechanism``; ``refusal`` is the move when it is
        malformed."""
        message = self._decode(encoded, refusal)
        if message is None:
            return
        try:
            credentials = parse_response(mechanism, message)
        except SaslError as exc:
            if mechanism.bearer:
                # RFC 7628 section 3.2.2: a refusal like any other (and counted as one).
                self._note(Severity.INFO, f"login refused without asking for a token: {exc}")
                self._challenge(_Attempt("", mechanism=mechanism))
            elif isinstance(exc, InvalidCredentials):
                self._invalid_credentials(exc)
            else:
                self._rejected(replies.POP3_INVALID_SASL, refusal)
            return
        self._begin_login(credentials, mechanism)

    def _login_username(self, encoded: bytes, refusal: ClientInput) -> None:
        """Take the AUTH LOGIN user name and ask for the password."""
        raw = self._decode(encoded, refusal)
        if raw is None:
            return
        try:
            login = parse_login_field(raw, "user name")
            if not login:
                raise InvalidCredentials("user name is empty")
        except InvalidCredentials as exc:
            self._invalid_credentials(exc)
            return
        self._client_move(_CI.LOGIN_USERNAME)
        self._login_name = login
        self._to_client(replies.POP3_CONTINUE_PASSWORD)

    def _invalid_credentials(self, exc: InvalidCredentials) -> None:
        self._note(Severity.INFO, f"login refused without asking for a token: {exc}")
        self._login_failed(replies.POP3_AUTH_FAILED)

    def _begin_login(
        self, credentials: AnyCredentials, mechanism: Mechanism = Mechanism.PLAIN
    ) -> None:
        self._client_move(_CI.CREDENTIALS)
        self._attempt = _Attempt(credentials.login, mechanism=mechanism)
        self._out.append(RequestToken(credentials))

    def _challenge(self, attempt: _Attempt) -> None:
        """Refuse a bearer login with an error challenge (RFC 7628 section 3.2.2); the
        client's answer to it gets the failure (see :meth:`_on_sasl_response`)."""
        self._client_move(_CI.CHALLENGED)
        self._attempt = attempt
        self._to_client(b"+ " + attempt.mechanism.error_challenge + CRLF)

    def _login_failed(self, reply: bytes) -> None:
        """Answer a failed login, count it, and close when the budget is spent."""
        self._attempt = None
        self._client_move(_CI.LOGIN_FAILED)
        self._reply(reply)
        self._auth_failures += 1
        if self._auth_failures >= self._settings.max_auth_failures:
            self._client_move(_CI.BUDGET_EXHAUSTED)
            self._note(Severity.INFO, f"{self._auth_failures} failed logins: closing")
            self._close(replies.POP3_TOO_MANY_FAILURES, "too many failed logins")

    def _current_attempt(self) -> _Attempt:
        if self._attempt is None:
            raise RuntimeError(f"no login attempt in client state {self._client.name}")
        return self._attempt

    def _on_tls(self, side: Side) -> None:
        if side is Side.CLIENT:
            self._client_move(_CI.TLS_ESTABLISHED)
            return
        self._upstream_move(_UI.TLS_ESTABLISHED)
        self._send_capa()

    # === upstream side ===================================================================

    def _connect(self) -> None:
        self._upstream_move(_UI.CONNECT)
        self._out.append(ConnectUpstream())

    def _send_capa(self) -> None:
        self._capa_lines, self._capa_size = [], 0
        self._to_server(b"CAPA" + CRLF)

    def _on_server_data(self, data: bytes) -> None:
        state = self._upstream
        if state in (_U.DOWN, _U.CONNECTING):
            raise RuntimeError(f"upstream data without a connection (state {state.name})")
        if state is _U.TLS_NEGOTIATION:
            raise self._fault(_Fault.UPSTREAM, "upstream sent plaintext during STLS")
        if state in (_U.CLOSING, _U.FAILED):
            self._upstream_move(_UI.IGNORED)
            return
        self._server.receive_data(data)
        while self._upstream in _UPSTREAM_PARSING:
            try:
                line = self._server.next_line()
            except FrameError as exc:
                raise self._fault(_Fault.UPSTREAM, f"upstream: {exc}") from None
            if line is None:
                return
            if self._upstream is _U.CAPA_LIST:
                self._on_capability(line)
                continue
            reply = _Reply.parse(line)
            if reply is None:
                raise self._fault(
                    _Fault.UPSTREAM,
                    f"upstream sent something that is not a POP3 reply in state "
                    f"{self._upstream.name}: {printable(line, 80)!r}",
                )
            self._on_reply(reply)

    def _upstream_lost(self, what: UpstreamInput, why: str) -> None:
        state = self._upstream
        in_flight = state in _UPSTREAM_IN_FLIGHT
        self._upstream_move(what)
        if state in (_U.FAILED, _U.CLOSING):
            return  # the reason is known already
        self._trouble = why
        if in_flight:
            self._upstream_failed_login(f"the upstream {why} during authentication")
        elif self._client not in _CLIENT_LOGGING_IN:
            severity = Severity.WARNING if what is _UI.UNREACHABLE else Severity.INFO
            self._note(severity, f"upstream {why}; the next login will reconnect")

    def _upstream_failed_login(self, why: str) -> None:
        attempt = self._current_attempt()
        self._note(Severity.WARNING, f"login as {attempt.login!r}: {why}; answered SYS/TEMP")
        self._login_failed(replies.POP3_UNAVAILABLE)

    def _unsuitable(self, why: str) -> None:
        self._trouble = f"cannot be used: {why}"
        self._upstream_move(_UI.UNSUITABLE)
        self._note(Severity.ERROR, f"upstream cannot be used: {why}")

    def _on_reply(self, reply: _Reply) -> None:
        state = self._upstream
        said = printable(reply.raw)
        if state is _U.GREETING:
            self._on_greeting(reply)
        elif state in _UPSTREAM_IN_FLIGHT:
            if reply.status is _Status.CONTINUE:
                self._on_continuation(reply)
            else:
                self._on_login_result(reply)
        elif reply.status is _Status.CONTINUE:
            raise self._fault(
                _Fault.UPSTREAM, f"unexpected continuation request in state {state.name}"
            )
        elif state is _U.READY:
            if reply.status is not _Status.ERR:
                raise self._fault(_Fault.UPSTREAM, f"upstream sent an unasked reply: {said!r}")
            self._goodbye(reply)
        elif reply.status is _Status.ERR and state is _U.STLS:
            self._unsuitable(
                f"upstream_tls is starttls but it refused STLS: {said}; use implicit TLS (port 995)"
            )
        elif reply.status is _Status.ERR:
            self._unsuitable(
                f"it refused CAPA: {said}; without CAPA (RFC 2449) it cannot say that it "
                "offers SASL XOAUTH2"
            )
        elif state is _U.STLS:
            if len(self._server):
                raise self._fault(_Fault.UPSTREAM, "upstream sent data behind its STLS +OK")
            self._upstream_move(_UI.TLS_GRANTED)
            self._out.append(StartTls(Side.SERVER))
        else:
            self._upstream_move(_UI.LISTING)

    def _on_greeting(self, reply: _Reply) -> None:
        if reply.status is _Status.ERR:
            self._goodbye(reply)
        elif reply.status is not _Status.OK:
            raise self._fault(
                _Fault.UPSTREAM, f"upstream greeting is not +OK: {printable(reply.raw, 80)!r}"
            )
        elif self._settings.upstream_tls is UpstreamTls.STARTTLS:
            self._upstream_move(_UI.ASK_STLS)
            self._to_server(b"STLS" + CRLF)
        else:
            self._upstream_move(_UI.ASK_CAPA)
            self._send_capa()

    def _goodbye(self, reply: _Reply) -> None:
        """An ``-ERR`` nobody asked for: the upstream is about to close."""
        why = f"said {printable(reply.raw)}"
        self._trouble = why
        self._upstream_move(_UI.GOODBYE)
        if self._client not in _CLIENT_LOGGING_IN:
            self._note(Severity.WARNING, f"upstream {why}; the next login will reconnect")

    def _on_capability(self, line: bytes) -> None:
        if line == b".":
            self._caps = Pop3Capabilities.parse(self._capa_lines)
            self._capa_lines, self._capa_size = [], 0
            self._check_capabilities()
            return
        if line.startswith(b"."):
            line = line[1:]  # dot-stuffing (RFC 1939 section 3)
        self._capa_size += len(line) + len(CRLF)
        if self._capa_size > self._settings.max_server_line:
            raise self._fault(
                _Fault.UPSTREAM, f"CAPA list longer than {self._settings.max_server_line} bytes"
            )
        self._capa_lines.append(line)
        self._upstream_move(_UI.CAPABILITY)

    def _check_capabilities(self) -> None:
        if "XOAUTH2" in self._caps.mechanisms:
            self._upstream_move(_UI.CAPABLE)
            return
        offered = " ".join(sorted(self._caps.mechanisms)) or "none"
        self._unsuitable(f"it does not offer SASL XOAUTH2 (SASL mechanisms offered: {offered})")

    def _on_continuation(self, reply: _Reply) -> None:
        state = self._upstream
        attempt = self._current_attempt()
        if state is _U.AUTH_SENT:
            self._upstream_move(_UI.GO_AHEAD)
            self._to_server(attempt.response + CRLF)
            attempt.response = b""
        elif state is _U.TOKEN_SENT:
            self._upstream_move(_UI.CHALLENGED)
            attempt.challenge = describe_error_challenge(reply.text)
            self._to_server(CRLF)
        else:
            raise self._fault(
                _Fault.UPSTREAM, f"unexpected continuation request in state {state.name}"
            )

    def _send_authenticate(self) -> None:
        self._upstream_move(_UI.AUTHENTICATE)
        self._to_server(b"AUTH XOAUTH2" + CRLF)

    def _on_login_result(self, reply: _Reply) -> None:
        attempt = self._current_attempt()
        state = self._upstream
        if reply.status is _Status.OK:
            if state is _U.AUTH_SENT:
                raise self._fault(_Fault.UPSTREAM, "upstream accepted XOAUTH2 without a token")
            self._upstream_move(_UI.ACCEPTED)
            self._client_move(_CI.LOGIN_SUCCEEDED)
            self._reply(reply.raw)
            self._note(Severity.INFO, f"logged in to the upstream as {attempt.mailbox!r}")
            self._out.append(
                BeginRelay(to_server=self._client_buf.take_all(), to_client=self._server.take_all())
            )
            self._attempt = None
            return
        self._upstream_move(_UI.REFUSED)
        said = printable(reply.raw)
        challenge = f" (error challenge: {attempt.challenge})" if attempt.challenge else ""
        who = f"login as {attempt.login!r} (mailbox {attempt.mailbox!r})"
        if state is _U.AUTH_SENT:
            self._note(
                Severity.ERROR,
                f"{who}: the upstream refused the XOAUTH2 exchange itself: {said}. This is "
                "not a password problem; check that the server supports XOAUTH2 as "
                "advertised. Answered SYS/TEMP.",
            )
            answer = replies.POP3_UNAVAILABLE
        elif reply.code in _TEMPORARY_CODES:
            self._note(Severity.WARNING, f"{who}: upstream temporarily unavailable: {said}")
            answer = replies.POP3_UNAVAILABLE
        elif reply.code.startswith(b"SYS"):
            self._note(
                Severity.ERROR,
                f"{who}: the upstream reports a system error: {said}{challenge}. "
                "Answered SYS/TEMP: the user's password is not the problem.",
            )
            answer = replies.POP3_UNAVAILABLE
        else:
            causes = (
                "Likely causes: the token's audience or roles do not fit this server "
                "(Microsoft 365 needs the POP.AccessAsApp application permission with admin "
                "consent), the app may not open this mailbox (Exchange: the service "
                "principal is not registered or lacks Add-MailboxPermission FullAccess), or "
                "POP3 is disabled for the mailbox (Set-CASMailbox -PopEnabled $true)."
                if attempt.provider == "microsoft"
                else rejection_causes(attempt.provider)
            )
            self._note(
                Severity.WARNING,
                f"{who}: the upstream rejected the token: {said}{challenge}. {causes}",
            )
            answer = replies.POP3_AUTH_FAILED
        self._login_failed(answer)

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
