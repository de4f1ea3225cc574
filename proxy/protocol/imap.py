"""The pre-authentication phase of one proxied IMAP connection: :class:`ImapAuth`.

Theory of operation
===================

The proxy stands between a legacy client, to which it is an IMAP server, and the real
(upstream) server, to which it is an IMAP client. ``ImapAuth`` is a sans-I/O machine for
both conversations at once: the driver feeds it events (bytes or closes from either peer,
a token issued or refused, TLS established) and carries out the actions it returns. It
never calls out, reads a clock or logs; asking for a token is an action.

Two sub-machines run interleaved, each a state enum plus a :class:`TransitionTable`
(``CLIENT_TRANSITIONS``, ``UPSTREAM_TRANSITIONS`` below; :func:`state_diagrams` draws
them). They meet in one place, :meth:`ImapAuth._join`: once the client's credentials are
accepted (a token was issued, client state ``AUTHORIZING``) *and* the upstream is ready
(``READY``), the proxy sends ``AUTHENTICATE XOAUTH2`` upstream.

Client side (we are the server; RFC 3501 / RFC 9051)
    ``start()`` sends our greeting with our own pre-authentication capability list
    (``IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN``, followed by ``AUTH=EXTERNAL`` when
    ``AuthSettings.sasl_external`` is set and ``AUTH=XOAUTH2 AUTH=OAUTHBEARER`` when
    ``sasl_bearer`` is; on a STARTTLS listener before TLS ``STARTTLS LOGINDISABLED`` and
    no ``AUTH=``, RFC 2595 / RFC 8314) and, in the same
    breath, asks the driver to connect upstream, so that the upstream greeting, STARTTLS
    and CAPABILITY round trips overlap with the client's login. Command names are
    case-insensitive. CAPABILITY, NOOP, ID (``* ID NIL``) and LOGOUT are answered
    locally; STARTTLS (only on a STARTTLS listener, before TLS) is answered by a
    :class:`StartTls` action carrying our ``OK`` as its preface, and any byte pipelined
    behind the STARTTLS line is a :class:`ClientProtocolError` (the CVE-2011-0411 class).
    LOGIN takes two astrings (RFC 3501 section 9): atoms, quoted strings with ``\\\\``
    and ``\\"`` escapes, and literals, synchronizing (``{n}``, answered by ``+ Ready
    for literal data``) or not (``{n+}``, RFC 7888 LITERAL+). AUTHENTICATE takes the
    mechanisms advertised (names are case-insensitive; others get ``NO Unsupported
    authentication mechanism.``), each with one response: on the command line (RFC 4959
    SASL-IR, ``=`` for an empty one) or after our empty ``+`` continuation; ``*`` cancels;
    base64 is strict (``BAD`` otherwise). PLAIN (RFC 4616) carries a password; the
    mechanisms for app identities carry what :mod:`proxy.protocol.sasl` parses:
    EXTERNAL (RFC 4422 appendix A: the TLS client certificate, and the authorization
    identity or nothing as the response), XOAUTH2 and OAUTHBEARER (RFC 7628: a mailbox
    and an app key as the bearer token). Before TLS on a STARTTLS listener LOGIN and
    AUTHENTICATE are refused with ``NO [PRIVACYREQUIRED]`` (RFC 5530). Other commands get
    ``BAD`` (``NO Please authenticate first`` for commands of the authenticated state),
    each counted against ``max_bad_commands``.

    Once credentials are parsed the machine says :class:`RequestToken` and stops parsing:
    whatever the client sends meanwhile is buffered raw (up to ``max_line +
    max_literal`` bytes). Those are pipelined post-login commands; on success they become
    ``BeginRelay.to_server`` untouched, on failure they are parsed as the next commands.

Upstream side (we are the client)
    Greeting: ``* OK`` (maybe with ``[CAPABILITY ...]``); ``* BYE`` means "not now",
    ``* PREAUTH`` means the server cannot be used. With ``UpstreamTls.STARTTLS`` we ask
    CAPABILITY unless the greeting listed ``STARTTLS``, require it, send it and expect
    our tagged ``OK`` with nothing behind it (bytes behind it are an
    :class:`UpstreamProtocolError`), then :class:`StartTls` towards the server. After TLS
    we always ask CAPABILITY again; with implicit TLS a greeting's list that offers
    ``AUTH=XOAUTH2`` is taken as it is (else we ask CAPABILITY). The list must offer
    ``AUTH=XOAUTH2``. Our tags are ``X1``, ``X2``, ... Then, joined with
    the client's token: ``AUTHENTICATE XOAUTH2 <base64>`` on one line if the server
    offers SASL-IR, else the command alone and the response after its ``+``. Responses
    from the upstream may carry literals, which are read as part of their response.

Outcomes
    * Tagged ``OK``: the untagged responses received since our AUTHENTICATE are
      forwarded, then the upstream's completion line with *the client's* tag in place of
      ours (its code and text, such as the post-login ``[CAPABILITY ...]``, are kept);
      then :class:`BeginRelay` with the client's pipelined bytes and whatever the upstream
      sent behind its ``OK``.
    * An error challenge (``+ <base64 JSON>``, RFC 7628 section 3.2.2, as Google and
      Dovecot use it for XOAUTH2) is answered with an empty line to obtain the final
      ``NO``; its decoded JSON goes into the operator's :class:`Note`.
    * Tagged ``NO``: the client gets ``NO [AUTHENTICATIONFAILED]`` (the token was refused
      for this mailbox; the note names the likely causes: audience, roles, mailbox
      permission), unless the upstream marked it ``[UNAVAILABLE]``, which is passed on
      as ``NO [UNAVAILABLE]``.
    * Tagged ``BAD`` (before or after the token was sent), or ``NO`` before the token was
      sent: the proxy and the upstream disagree about XOAUTH2 itself, which is nobody's
      password problem, so the client gets the temporary ``NO [UNAVAILABLE]`` and the
      note says so at ERROR severity.
    * :class:`TokenRefused`: ``CREDENTIALS`` gives exactly ``NO [AUTHENTICATIONFAILED]
      Authentication failed.`` whatever the reason (wrong password or unknown user);
      ``UNAVAILABLE`` gives ``NO [UNAVAILABLE]``. Credentials that cannot be anyone's
      (not UTF-8, control characters) are refused the same way without asking.
    * A refused XOAUTH2 or OAUTHBEARER login (``CREDENTIALS``, or a message that does not
      parse) is answered as servers do (RFC 7628 section 3.2.2): first an error challenge,
      ``+ <base64 JSON>`` (``{"status":"invalid_token"}`` for OAUTHBEARER, Google's and
      Dovecot's ``{"status":"401","schemes":"bearer"}`` for XOAUTH2), then, whatever
      line the client answers with (``AQ==`` for ^A, or an empty line), ``NO
      [AUTHENTICATIONFAILED]``. ``UNAVAILABLE`` gets ``NO [UNAVAILABLE]`` directly.

    Every failed login, permanent or temporary, counts against ``max_auth_failures``;
    the failure that reaches it is answered and followed by ``* BYE`` and :class:`Close`.
    After any other failure the client is back in ``NOT_AUTHENTICATED`` and may retry.

Upstream trouble and reconnecting
    If the upstream cannot be reached, closes, or says ``* BYE`` before the login has
    been sent to it, the machine notes why and marks it ``DOWN`` (after a ``BYE`` it first
    waits, in ``CLOSING``, for the connection to end). Each login attempt may open one
    fresh upstream connection: when an attempt starts (or while it waits for its token)
    and the upstream is ``DOWN``, the machine asks for :class:`ConnectUpstream` in
    parallel with the token request. So a pre-authentication connection that the
    upstream timed out while a slow client typed is replaced once, not turned into a
    failed login; if the fresh connection fails too, the attempt gets ``NO
    [UNAVAILABLE]`` once its token is in (a refused password is still reported as such).
    Losing the upstream after the token was sent fails that attempt with ``NO
    [UNAVAILABLE]``. An upstream that cannot be used at all (``PREAUTH``, no STARTTLS, no
    ``AUTH=XOAUTH2``) is ``FAILED`` for the rest of the session: a configuration problem
    that reconnecting does not fix. Reconnects are bounded by the login budget.

Limits and errors
    Client lines are bounded by ``max_line`` and literals by ``max_literal``; beyond
    either the machine raises :class:`ClientProtocolError` with ``* BYE Line too long.``
    as its reply hint. Upstream responses are bounded by ``max_server_line``, beyond which
    it raises :class:`UpstreamProtocolError`. Before raising, the machine moves to
    ``ERROR`` and refuses every later event. :attr:`ImapAuth.buffered` reports the bytes
    held, which these limits bound. An event that the driver could only send by breaking
    its contract (a token nobody asked for, TLS on a side that did not start it) raises
    ``RuntimeError``: that is a bug, not a peer's fault.

Secrets
    The password and the app key leave the machine only inside :class:`RequestToken`,
    whose :class:`Credentials` and :class:`BearerCredentials` redact them; the token only
    inside the XOAUTH2 line sent upstream. No note, error message or repr contains any of
    them.
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
    IMAP_PASSWORD_MECHANISMS,
    ImapCapabilities,
    imap_proxy_capabilities,
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
from proxy.protocol.framing import LineBuffer, literal_at_end, printable
from proxy.protocol.modes import ClientTls, UpstreamTls
from proxy.protocol.sasl import (
    Credentials,
    InvalidCredentials,
    Mechanism,
    SaslError,
    b64decode_strict,
    describe_error_challenge,
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
    "ImapAuth",
    "UpstreamInput",
    "UpstreamState",
    "state_diagrams",
]

CRLF: Final = b"\r\n"


# === States, inputs and the transition tables ==============================================


class ClientState(enum.Enum):
    """Where the conversation with the legacy client stands."""

    #: STARTTLS listener before TLS: only CAPABILITY, NOOP, ID, LOGOUT and STARTTLS work.
    PLAINTEXT = "plaintext"
    #: Our ``OK`` to STARTTLS is out; the driver runs the handshake.
    TLS_NEGOTIATION = "tls-negotiation"
    NOT_AUTHENTICATED = "not-authenticated"
    #: AUTHENTICATE without an initial response: our ``+`` is out.
    SASL_RESPONSE = "sasl-response"
    #: Credentials parsed, :class:`RequestToken` out; client bytes are buffered.
    AWAITING_TOKEN = "awaiting-token"
    #: A bearer login failed: our error challenge is out, the client's answer gets the NO.
    ERROR_CHALLENGE = "error-challenge"
    #: Token in hand; waiting for the upstream to be ready and to accept it.
    AUTHORIZING = "authorizing"
    AUTHENTICATED = "authenticated"
    CLOSED = "closed"
    ERROR = "error"


class ClientInput(enum.Enum):
    DATA = "bytes"
    HARMLESS = "capability/noop/id"
    REJECTED = "refused command"
    STARTTLS = "starttls"
    TLS_ESTABLISHED = "tls established"
    AUTHENTICATE = "authenticate (no initial response)"
    CREDENTIALS = "credentials"
    CANCELLED = "sasl cancelled/malformed"
    CHALLENGED = "bearer login refused: error challenge"
    TOKEN_ISSUED = "token issued"
    LOGIN_FAILED = "login failed"
    LOGIN_SUCCEEDED = "login succeeded"
    LOGOUT = "logout"
    BUDGET_EXHAUSTED = "too many errors"
    PEER_CLOSED = "client closed"
    BROKE = "protocol error"


class UpstreamState(enum.Enum):
    """Where the conversation with the upstream server stands."""

    #: No connection (not yet, or lost); a login attempt may reconnect.
    DOWN = "down"
    CONNECTING = "connecting"
    GREETING = "greeting"
    #: STARTTLS mode, before TLS: our CAPABILITY is out.
    PLAIN_CAPABILITY = "plain-capability"
    #: Our STARTTLS is out.
    STARTTLS = "starttls"
    TLS_NEGOTIATION = "tls-negotiation"
    #: Our CAPABILITY is out (after TLS, or with implicit TLS).
    CAPABILITY = "capability"
    READY = "ready"
    #: ``AUTHENTICATE XOAUTH2`` without initial response is out; waiting for ``+``.
    AUTHENTICATE_SENT = "authenticate-sent"
    TOKEN_SENT = "token-sent"
    #: The error challenge was answered with an empty line; waiting for the final NO.
    ERROR_CHALLENGE = "error-challenge"
    #: The upstream said BYE; waiting for it to close.
    CLOSING = "closing"
    #: Unusable for this session (PREAUTH, no STARTTLS, no AUTH=XOAUTH2).
    FAILED = "failed"
    AUTHENTICATED = "authenticated"
    ERROR = "error"


class UpstreamInput(enum.Enum):
    CONNECT = "connect"
    CONNECTED = "connected"
    UNREACHABLE = "unreachable"
    ASK_PLAIN_CAPABILITY = "send CAPABILITY (before TLS)"
    ASK_STARTTLS = "send STARTTLS"
    TLS_GRANTED = "STARTTLS OK"
    TLS_ESTABLISHED = "tls established: send CAPABILITY"
    ASK_CAPABILITY = "send CAPABILITY"
    CAPABLE = "AUTH=XOAUTH2 offered"
    UNSUITABLE = "unusable"
    UNTAGGED = "untagged response"
    IGNORED = "bytes ignored"
    AUTHENTICATE = "send AUTHENTICATE XOAUTH2"
    AUTHENTICATE_IR = "send AUTHENTICATE XOAUTH2 <token>"
    GO_AHEAD = "+: send token"
    CHALLENGED = "error challenge: send empty line"
    ACCEPTED = "tagged OK"
    REFUSED = "tagged NO/BAD"
    BYE = "BYE"
    PEER_CLOSED = "upstream closed"
    BROKE = "protocol error"


_C = ClientState
_CI = ClientInput
_U = UpstreamState
_UI = UpstreamInput

#: Every legal move of the client side. ``BROKE`` (a raised ProxyError) leads from every
#: live state to ``ERROR``; ``DATA`` is absent from ``TLS_NEGOTIATION`` on purpose.
CLIENT_TRANSITIONS: Final = TransitionTable[ClientState, ClientInput](
    "imap-client",
    {
        _C.PLAINTEXT: {
            _CI.DATA: _C.PLAINTEXT,
            _CI.HARMLESS: _C.PLAINTEXT,
            _CI.REJECTED: _C.PLAINTEXT,
            _CI.STARTTLS: _C.TLS_NEGOTIATION,
            _CI.LOGOUT: _C.CLOSED,
            _CI.BUDGET_EXHAUSTED: _C.CLOSED,
            _CI.PEER_CLOSED: _C.CLOSED,
            _CI.BROKE: _C.ERROR,
        },
        _C.TLS_NEGOTIATION: {
            _CI.TLS_ESTABLISHED: _C.NOT_AUTHENTICATED,
            _CI.PEER_CLOSED: _C.CLOSED,
            _CI.BROKE: _C.ERROR,
        },
        _C.NOT_AUTHENTICATED: {
            _CI.DATA: _C.NOT_AUTHENTICATED,
            _CI.HARMLESS: _C.NOT_AUTHENTICATED,
            _CI.REJECTED: _C.NOT_AUTHENTICATED,
            _CI.AUTHENTICATE: _C.SASL_RESPONSE,
            _CI.CREDENTIALS: _C.AWAITING_TOKEN,
            _CI.CHALLENGED: _C.ERROR_CHALLENGE,
            _CI.LOGIN_FAILED: _C.NOT_AUTHENTICATED,
            _CI.LOGOUT: _C.CLOSED,
            _CI.BUDGET_EXHAUSTED: _C.CLOSED,
            _CI.PEER_CLOSED: _C.CLOSED,
            _CI.BROKE: _C.ERROR,
        },
        _C.SASL_RESPONSE: {
            _CI.DATA: _C.SASL_RESPONSE,
            _CI.CREDENTIALS: _C.AWAITING_TOKEN,
            _CI.CANCELLED: _C.NOT_AUTHENTICATED,
            _CI.CHALLENGED: _C.ERROR_CHALLENGE,
            _CI.LOGIN_FAILED: _C.NOT_AUTHENTICATED,
            _CI.PEER_CLOSED: _C.CLOSED,
            _CI.BROKE: _C.ERROR,
        },
        _C.AWAITING_TOKEN: {
            _CI.DATA: _C.AWAITING_TOKEN,
            _CI.TOKEN_ISSUED: _C.AUTHORIZING,
            _CI.CHALLENGED: _C.ERROR_CHALLENGE,
            _CI.LOGIN_FAILED: _C.NOT_AUTHENTICATED,
            _CI.PEER_CLOSED: _C.CLOSED,
            _CI.BROKE: _C.ERROR,
        },
        _C.ERROR_CHALLENGE: {
            _CI.DATA: _C.ERROR_CHALLENGE,
            _CI.LOGIN_FAILED: _C.NOT_AUTHENTICATED,
            _CI.PEER_CLOSED: _C.CLOSED,
            _CI.BROKE: _C.ERROR,
        },
        _C.AUTHORIZING: {
            _CI.DATA: _C.AUTHORIZING,
            _CI.LOGIN_SUCCEEDED: _C.AUTHENTICATED,
            _CI.LOGIN_FAILED: _C.NOT_AUTHENTICATED,
            _CI.PEER_CLOSED: _C.CLOSED,
            _CI.BROKE: _C.ERROR,
        },
    },
)

_CONNECTED_EXITS: Final = {
    _UI.BYE: _U.CLOSING,
    _UI.PEER_CLOSED: _U.DOWN,
    _UI.BROKE: _U.ERROR,
}

#: Every legal move of the upstream side.
UPSTREAM_TRANSITIONS: Final = TransitionTable[UpstreamState, UpstreamInput](
    "imap-upstream",
    {
        _U.DOWN: {_UI.CONNECT: _U.CONNECTING, _UI.BROKE: _U.ERROR},
        _U.CONNECTING: {
            _UI.CONNECTED: _U.GREETING,
            _UI.UNREACHABLE: _U.DOWN,
            _UI.BROKE: _U.ERROR,
        },
        _U.GREETING: {
            _UI.ASK_PLAIN_CAPABILITY: _U.PLAIN_CAPABILITY,
            _UI.ASK_STARTTLS: _U.STARTTLS,
            _UI.ASK_CAPABILITY: _U.CAPABILITY,
            _UI.CAPABLE: _U.READY,
            _UI.UNSUITABLE: _U.FAILED,
            **_CONNECTED_EXITS,
        },
        _U.PLAIN_CAPABILITY: {
            _UI.UNTAGGED: _U.PLAIN_CAPABILITY,
            _UI.ASK_STARTTLS: _U.STARTTLS,
            _UI.UNSUITABLE: _U.FAILED,
            **_CONNECTED_EXITS,
        },
        _U.STARTTLS: {
            _UI.UNTAGGED: _U.STARTTLS,
            _UI.TLS_GRANTED: _U.TLS_NEGOTIATION,
            _UI.UNSUITABLE: _U.FAILED,
            **_CONNECTED_EXITS,
        },
        _U.TLS_NEGOTIATION: {
            _UI.TLS_ESTABLISHED: _U.CAPABILITY,
            _UI.UNREACHABLE: _U.DOWN,
            _UI.BROKE: _U.ERROR,
        },
        _U.CAPABILITY: {
            _UI.UNTAGGED: _U.CAPABILITY,
            _UI.CAPABLE: _U.READY,
            _UI.UNSUITABLE: _U.FAILED,
            **_CONNECTED_EXITS,
        },
        _U.READY: {
            _UI.UNTAGGED: _U.READY,
            _UI.AUTHENTICATE: _U.AUTHENTICATE_SENT,
            _UI.AUTHENTICATE_IR: _U.TOKEN_SENT,
            **_CONNECTED_EXITS,
        },
        _U.AUTHENTICATE_SENT: {
            _UI.UNTAGGED: _U.AUTHENTICATE_SENT,
            _UI.GO_AHEAD: _U.TOKEN_SENT,
            _UI.REFUSED: _U.READY,
            **_CONNECTED_EXITS,
        },
        _U.TOKEN_SENT: {
            _UI.UNTAGGED: _U.TOKEN_SENT,
            _UI.CHALLENGED: _U.ERROR_CHALLENGE,
            _UI.ACCEPTED: _U.AUTHENTICATED,
            _UI.REFUSED: _U.READY,
            **_CONNECTED_EXITS,
        },
        _U.ERROR_CHALLENGE: {
            _UI.UNTAGGED: _U.ERROR_CHALLENGE,
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
    {_C.PLAINTEXT, _C.NOT_AUTHENTICATED, _C.SASL_RESPONSE, _C.ERROR_CHALLENGE}
)
#: Client states of a login under way (bytes are buffered raw).
_CLIENT_LOGGING_IN: Final = frozenset({_C.AWAITING_TOKEN, _C.AUTHORIZING})
_CLIENT_TERMINAL: Final = frozenset({_C.AUTHENTICATED, _C.CLOSED, _C.ERROR})
#: Upstream states whose bytes are parsed as responses.
_UPSTREAM_PARSING: Final = frozenset(
    {
        _U.GREETING,
        _U.PLAIN_CAPABILITY,
        _U.STARTTLS,
        _U.CAPABILITY,
        _U.READY,
        _U.AUTHENTICATE_SENT,
        _U.TOKEN_SENT,
        _U.ERROR_CHALLENGE,
    }
)
#: Upstream states in which our AUTHENTICATE is out (untagged responses are kept).
_UPSTREAM_IN_FLIGHT: Final = frozenset({_U.AUTHENTICATE_SENT, _U.TOKEN_SENT, _U.ERROR_CHALLENGE})


def state_diagrams() -> str:
    """Both transition tables as Graphviz digraphs."""
    return CLIENT_TRANSITIONS.to_dot() + UPSTREAM_TRANSITIONS.to_dot()


# === Syntax ================================================================================

#: Commands of the authenticated and selected states (RFC 3501, 9051 and common
#: extensions): before login they get "NO Please authenticate first" rather than BAD.
_AFTER_LOGIN_COMMANDS: Final = frozenset(
    b"""APPEND CHECK CLOSE COMPRESS COPY CREATE DELETE DELETEACL ENABLE EXAMINE EXPUNGE
    FETCH GETACL GETMETADATA GETQUOTA GETQUOTAROOT IDLE LIST LISTRIGHTS LSUB MOVE MYRIGHTS
    NAMESPACE NOTIFY RENAME SEARCH SELECT SETACL SETMETADATA SETQUOTA SORT STATUS STORE
    SUBSCRIBE THREAD UID UNSELECT UNSUBSCRIBE""".split()
)

#: Commands the proxy runs itself before login.
_LOCAL_COMMANDS: Final = frozenset(
    {b"CAPABILITY", b"NOOP", b"LOGOUT", b"STARTTLS", b"LOGIN", b"AUTHENTICATE", b"ID"}
)

_SP: Final = 0x20
_DQUOTE: Final = 0x22
_BACKSLASH: Final = 0x5C
_LBRACE: Final = 0x7B
#: atom-specials of RFC 3501 other than CTL and SP, without "]" (ASTRING-CHAR allows it).
_ATOM_SPECIALS: Final = frozenset(b'(){%*"\\')
#: Tags additionally exclude "+" (RFC 3501 section 9, ``tag``).
_TAG_SPECIALS: Final = _ATOM_SPECIALS | {ord("+")}


class _SyntaxError(Exception):
    """Internal: the command's arguments do not parse (answered with BAD)."""


def _astring_char(byte: int) -> bool:
    # Bytes >= 0x80 are accepted, leniently: some legacy clients send UTF-8 passwords as
    # atoms. Credentials are checked to be UTF-8 without control characters afterwards.
    return byte > _SP and byte != 0x7F and byte not in _ATOM_SPECIALS


def _valid_tag(tag: bytes) -> bool:
    return bool(tag) and all(0x20 < b < 0x7F and b not in _TAG_SPECIALS for b in tag)


def _quoted(line: bytes, pos: int) -> tuple[bytes, int]:
    """Parse the quoted string starting at ``line[pos] == '"'``; return it and the end."""
    value = bytearray()
    i = pos + 1
    while i < len(line):
        byte = line[i]
        if byte == _DQUOTE:
            return bytes(value), i + 1
        if byte == _BACKSLASH:
            i += 1
            if i >= len(line) or line[i] not in (_DQUOTE, _BACKSLASH):
                raise _SyntaxError
            value.append(line[i])
        elif byte in (0x00, 0x0D, 0x0A):
            raise _SyntaxError
        else:
            value.append(byte)
        i += 1
    raise _SyntaxError


def _atom(line: bytes, pos: int) -> tuple[bytes, int]:
    end = line.find(b" ", pos)
    end = len(line) if end < 0 else end
    value = line[pos:end]
    if not value or not all(_astring_char(b) for b in value):
        raise _SyntaxError
    return value, end


def _astrings(lines: list[bytes], literals: list[bytes], pos: int) -> list[bytes]:
    """The astring arguments of a command starting at ``lines[0][pos]`` (a space).

    ``lines[i]`` ends with the announcement of ``literals[i]``; ``lines[i + 1]`` is
    what follows that literal's data.
    """
    values: list[bytes] = []
    index = 0
    while True:
        line = lines[index]
        if pos == len(line):
            if index != len(lines) - 1:
                raise _SyntaxError
            return values
        if line[pos] != _SP or pos + 1 == len(line):
            raise _SyntaxError
        pos += 1
        if line[pos] == _DQUOTE:
            value, pos = _quoted(line, pos)
        elif line[pos] == _LBRACE:
            marker = line[pos:]
            if index >= len(literals) or marker.rfind(b"{") != 0:
                raise _SyntaxError
            if literal_at_end(marker, len(literals[index])) is None:
                raise _SyntaxError
            values.append(literals[index])
            index += 1
            pos = 0
            continue
        else:
            value, pos = _atom(line, pos)
        values.append(value)


@dataclass(frozen=True, slots=True)
class _Response:
    """One response from the upstream, split the way RFC 3501 section 7 describes it."""

    #: ``b"*"`` (untagged), ``b"+"`` (continuation request) or a command tag.
    tag: bytes
    #: First word after the tag, upper-cased (``OK``, ``NO``, ``CAPABILITY``...).
    status: bytes
    #: The line after ``tag SP``, kept for rewriting the tag.
    after_tag: bytes
    #: Response code name (``CAPABILITY``, ``UNAVAILABLE``...) and its arguments.
    code: bytes
    code_data: bytes
    #: Human-readable text; for a continuation request, everything after ``+ ``.
    text: bytes
    #: The response as received, line endings and literals included.
    raw: bytes

    @classmethod
    def parse(cls, first: bytes, raw: bytes) -> _Response:
        if first.startswith(b"+"):
            text = first[2:] if first[1:2] == b" " else first[1:]
            return cls(b"+", b"", first[2:], b"", b"", text, raw)
        tag, sp, after = first.partition(b" ")
        if not sp or not tag or not after:
            raise UpstreamProtocolError(
                f"malformed response from the upstream: {printable(first, 80)!r}",
                reply_hint=replies.IMAP_BYE_UNAVAILABLE,
            )
        word, _, rest = after.partition(b" ")
        status = word.upper()
        code = code_data = b""
        if status in (b"OK", b"NO", b"BAD", b"BYE", b"PREAUTH") and rest.startswith(b"["):
            end = rest.find(b"]")
            if end > 0:
                code, _, code_data = rest[1:end].partition(b" ")
                code = code.upper()
                rest = rest[end + 1 :].lstrip(b" ")
        return cls(tag, status, after, code, code_data, rest, raw)


class _ResponseReader:
    """Reassembles upstream responses, literals included, bounded by ``limit`` bytes."""

    __slots__ = ("_buf", "_first", "_limit", "_literal", "_parts", "_size")

    def __init__(self, limit: int) -> None:
        self._buf = LineBuffer(limit)
        self._limit = limit
        self._first: bytes | None = None
        self._parts: list[bytes] = []
        self._literal: int | None = None
        self._size = 0

    def __len__(self) -> int:
        return len(self._buf) + self._size

    def receive_data(self, data: bytes) -> None:
        self._buf.receive_data(data)

    def next_response(self) -> _Response | None:
        """The next complete response, or ``None``; :class:`FrameError` if oversized."""
        while True:
            if self._literal is not None:
                data = self._buf.next_bytes(self._literal)
                if data is None:
                    return None
                self._add(data)
                self._literal = None
            line = self._buf.next_line()
            if line is None:
                return None
            self._add(line + CRLF)
            if self._first is None:
                self._first = line
            if not line.startswith(b"+"):
                literal = literal_at_end(line, self._limit)
                if literal is not None:
                    self._literal = literal.size
                    continue
            first, raw = self._first, b"".join(self._parts)
            self._first, self._parts, self._size = None, [], 0
            return _Response.parse(first, raw)

    def take_all(self) -> bytes:
        """Everything held, in order (for the relay, or to be dropped)."""
        rest = b"".join(self._parts) + self._buf.take_all()
        self._first, self._parts, self._size, self._literal = None, [], 0, None
        return rest

    def _add(self, piece: bytes) -> None:
        self._size += len(piece)
        if self._size > self._limit:
            raise FrameError(f"response longer than {self._limit} bytes")
        self._parts.append(piece)


@dataclass(slots=True)
class _Command:
    """A client command being reassembled across literals."""

    tag: bytes
    name: bytes
    #: Where the arguments start in ``lines[0]`` (at the space before them).
    args_at: int
    lines: list[bytes]
    #: Literal data, kept only for LOGIN (whose arguments we need).
    literals: list[bytes] = field(default_factory=list)
    keep: bool = False
    has_literal: bool = False
    literal_due: int | None = None

    @property
    def args(self) -> bytes:
        return self.lines[0][self.args_at + 1 :]

    @property
    def size(self) -> int:
        return sum(map(len, self.lines)) + sum(map(len, self.literals))


@dataclass(slots=True)
class _Attempt:
    """One login attempt, from the credentials to the upstream's verdict."""

    tag: bytes
    login: str = ""
    #: How the client logs in (the LOGIN command carries what PLAIN does).
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


class ImapAuth:
    """The pre-authentication phase of one proxied IMAP connection (see the module
    docstring). Call :meth:`start` once, then :meth:`handle` for every event until an
    action says :class:`BeginRelay` or :class:`Close`, or a :class:`ProxyError` is raised.
    """

    __slots__ = (
        "_attempt",
        "_auth_failures",
        "_bad_commands",
        "_caps",
        "_client",
        "_client_buf",
        "_command",
        "_error",
        "_forward",
        "_forward_size",
        "_mechanisms",
        "_out",
        "_server",
        "_settings",
        "_started",
        "_tag",
        "_tags",
        "_trouble",
        "_upstream",
    )

    def __init__(self, settings: AuthSettings) -> None:
        self._settings = settings
        #: What AUTHENTICATE accepts and the capability list offers.
        self._mechanisms = (*IMAP_PASSWORD_MECHANISMS, *settings.app_mechanisms)
        self._started = False
        self._client = (
            _C.PLAINTEXT if settings.client_tls is ClientTls.STARTTLS else _C.NOT_AUTHENTICATED
        )
        self._upstream = _U.DOWN
        self._client_buf = LineBuffer(settings.max_line)
        self._command: _Command | None = None
        self._server = _ResponseReader(settings.max_server_line)
        self._attempt: _Attempt | None = None
        self._bad_commands = 0
        self._auth_failures = 0
        self._tags = 0
        self._tag = b""
        self._caps = ImapCapabilities()
        self._forward: list[bytes] = []
        self._forward_size = 0
        self._trouble = "not connected yet"
        self._error: ProxyError | None = None
        self._out: list[Action] = []

    def __repr__(self) -> str:
        return (
            f"<ImapAuth client={self._client.name} upstream={self._upstream.name} "
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
        command = self._command.size if self._command is not None else 0
        return len(self._client_buf) + command + len(self._server) + self._forward_size

    # -- entry points ----------------------------------------------------------------------

    def start(self) -> list[Action]:
        """Greet the client and open the upstream connection."""
        if self._started:
            raise RuntimeError("ImapAuth.start() called twice")
        self._started = True
        self._out = []
        caps = imap_proxy_capabilities(
            before_tls=self._client is _C.PLAINTEXT, mechanisms=self._mechanisms
        )
        self._to_client(b"* OK [CAPABILITY " + caps + b"] " + replies.IMAP_GREETING_TEXT + CRLF)
        self._connect()
        return self._out

    def handle(self, event: Event) -> list[Action]:
        """Feed one event; return what to do. Raises :class:`ProxyError` subclasses."""
        if not self._started:
            raise RuntimeError("ImapAuth.handle() before start()")
        if self._error is not None:
            raise type(self._error)(
                f"session already failed: {self._error}", reply_hint=self._error.reply_hint
            )
        if self._client in _CLIENT_TERMINAL:
            raise RuntimeError(f"ImapAuth.handle() after the auth phase ended ({self._client})")
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
                    self._login_failed(attempt.tag, replies.IMAP_UNAVAILABLE)
                elif attempt.mechanism.bearer:
                    self._challenge(attempt)
                else:
                    self._login_failed(attempt.tag, replies.IMAP_AUTH_FAILED)
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
            limit = self._settings.max_line + self._settings.max_literal
            if len(self._client_buf) > limit:
                raise self._fault(
                    _Fault.CLIENT,
                    f"more than {limit} bytes pipelined behind the login",
                    replies.IMAP_BYE_PIPELINED,
                )

    # -- moves -----------------------------------------------------------------------------

    def _client_move(self, what: ClientInput, fault: _Fault = _Fault.BUG) -> None:
        target = CLIENT_TRANSITIONS.next_state(self._client, what)
        if target is None:
            raise self._fault(
                fault, f"{what.value!r} not allowed in client state {self._client.name}"
            )
        self._client = target

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
            self._forward, self._forward_size = [], 0

    def _fault(self, fault: _Fault, message: str, hint: bytes = b"") -> Exception:
        match fault:
            case _Fault.CLIENT:
                return ClientProtocolError(message, reply_hint=hint or replies.IMAP_BYE_PROTOCOL)
            case _Fault.UPSTREAM:
                return UpstreamProtocolError(
                    message, reply_hint=hint or replies.IMAP_BYE_UNAVAILABLE
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

    def _tagged(self, tag: bytes, reply: bytes) -> None:
        self._to_client(tag + b" " + reply + CRLF)

    def _to_server(self, data: bytes) -> None:
        self._out.append(SendToServer(data))

    def _note(self, severity: Severity, text: str) -> None:
        self._out.append(Note(severity, text))

    def _close(self, bye: bytes, reason: str) -> None:
        self._to_client(bye)
        self._out.append(Close(reason))

    # === client side =====================================================================

    def _parse_client(self) -> None:
        while self._client in _CLIENT_PARSING:
            try:
                if self._client in (_C.SASL_RESPONSE, _C.ERROR_CHALLENGE):
                    line = self._client_buf.next_line()
                    if line is None:
                        return
                    if self._client is _C.SASL_RESPONSE:
                        self._on_sasl_response(line)
                    else:
                        self._on_challenge_answered()
                    continue
                command = self._next_command()
            except FrameError as exc:
                raise self._fault(_Fault.CLIENT, str(exc), replies.IMAP_LINE_TOO_LONG) from None
            if command is None:
                return
            self._on_command(command)

    def _next_command(self) -> _Command | None:
        """Reassemble the next complete command; answer literal announcements."""
        buf = self._client_buf
        while self._client in _CLIENT_PARSING:
            command = self._command
            if command is not None and command.literal_due is not None:
                data = buf.next_bytes(command.literal_due)
                if data is None:
                    return None
                command.literal_due = None
                if command.keep:
                    command.literals.append(data)
            line = buf.next_line()
            if line is None:
                return None
            if command is None:
                command = self._begin_command(line)
                if command is None:
                    continue
            elif command.keep:
                command.lines.append(line)
            literal = literal_at_end(line, self._settings.max_literal)
            if literal is None:
                self._command = None
                return command
            command.has_literal = True
            if command.keep and len(command.literals) == 2:
                command.keep = False  # LOGIN takes two arguments: this one is too many
            if literal.synchronizing and not command.keep:
                # Refuse before the data is sent (RFC 3501 section 7.5).
                self._command = None
                self._refuse(command)
                continue
            if literal.synchronizing:
                self._to_client(replies.IMAP_CONTINUE_LITERAL)
            command.literal_due = literal.size
            self._command = command
        return None

    def _begin_command(self, line: bytes) -> _Command | None:
        tag, _, rest = line.partition(b" ")
        if not _valid_tag(tag):
            self._rejected(None, replies.IMAP_BAD_UNTAGGED)
            return None
        name = rest.partition(b" ")[0].upper()
        keep = name == b"LOGIN" and self._client is _C.NOT_AUTHENTICATED
        return _Command(tag, name, len(tag) + 1 + len(name), [line], keep=keep)

    def _on_command(self, command: _Command) -> None:
        tag, name = command.tag, command.name
        plain = command.args == b"" and not command.has_literal
        if name == b"CAPABILITY" and plain:
            caps = imap_proxy_capabilities(
                before_tls=self._client is _C.PLAINTEXT, mechanisms=self._mechanisms
            )
            self._client_move(_CI.HARMLESS)
            self._to_client(b"* CAPABILITY " + caps + CRLF)
            self._tagged(tag, replies.IMAP_CAPABILITY_DONE)
        elif name == b"NOOP" and plain:
            self._client_move(_CI.HARMLESS)
            self._tagged(tag, replies.IMAP_NOOP_DONE)
        elif name == b"ID":
            self._client_move(_CI.HARMLESS)
            self._to_client(replies.IMAP_ID_NIL)
            self._tagged(tag, replies.IMAP_ID_DONE)
        elif name == b"LOGOUT" and plain:
            self._client_move(_CI.LOGOUT)
            self._to_client(replies.IMAP_BYE_LOGOUT)
            self._tagged(tag, replies.IMAP_LOGOUT_DONE)
            self._out.append(Close("client logged out"))
        elif name == b"STARTTLS" and plain and self._client is _C.PLAINTEXT:
            self._on_starttls(tag)
        elif name == b"LOGIN" and self._client is _C.NOT_AUTHENTICATED:
            self._on_login(command)
        elif name == b"AUTHENTICATE" and self._client is _C.NOT_AUTHENTICATED:
            self._on_authenticate(command)
        else:
            self._refuse(command)

    def _refuse(self, command: _Command) -> None:
        """Answer a command we will not run (the answer a literal refusal gets too)."""
        name = command.name
        if name in (b"LOGIN", b"AUTHENTICATE") and self._client is _C.PLAINTEXT:
            reply = replies.IMAP_PRIVACY_REQUIRED
        elif name in _AFTER_LOGIN_COMMANDS:
            reply = replies.IMAP_AUTHENTICATE_FIRST
        elif name == b"STARTTLS" and self._client is not _C.PLAINTEXT:
            reply = replies.IMAP_NO_STARTTLS
        elif name in _LOCAL_COMMANDS and command.has_literal:
            reply = replies.IMAP_LITERAL_REFUSED
        elif name in _LOCAL_COMMANDS:
            reply = replies.IMAP_SYNTAX_ERROR
        else:
            reply = replies.IMAP_UNKNOWN_COMMAND
        self._rejected(command.tag, reply)

    def _rejected(self, tag: bytes | None, reply: bytes, what: ClientInput = _CI.REJECTED) -> None:
        """Send a refusal (tagged, or a complete untagged line) and count it."""
        if tag is None:
            self._to_client(reply)
        else:
            self._tagged(tag, reply)
        self._client_move(what)
        self._bad_commands += 1
        if self._bad_commands >= self._settings.max_bad_commands:
            self._client_move(_CI.BUDGET_EXHAUSTED)
            self._note(Severity.INFO, f"client sent {self._bad_commands} invalid commands")
            self._close(replies.IMAP_BYE_TOO_MANY_ERRORS, "too many invalid commands")

    def _on_starttls(self, tag: bytes) -> None:
        if len(self._client_buf):
            # Plaintext behind STARTTLS would be taken as said inside TLS (CVE-2011-0411).
            raise self._fault(_Fault.CLIENT, "client pipelined data behind STARTTLS")
        self._client_move(_CI.STARTTLS)
        self._out.append(StartTls(Side.CLIENT, preface=tag + b" " + replies.IMAP_BEGIN_TLS + CRLF))

    def _on_login(self, command: _Command) -> None:
        try:
            if not command.keep:
                raise _SyntaxError
            values = _astrings(command.lines, command.literals, command.args_at)
            if len(values) != 2:
                raise _SyntaxError
        except _SyntaxError:
            self._rejected(command.tag, replies.IMAP_SYNTAX_ERROR)
            return
        try:
            login = text_credential(values[0], "user name")
            password = text_credential(values[1], "password")
            if not login:
                raise InvalidCredentials("user name is empty")
        except InvalidCredentials as exc:
            self._invalid_credentials(command.tag, exc)
            return
        self._begin_login(command.tag, Credentials(login=login, password=password))

    def _on_authenticate(self, command: _Command) -> None:
        parts = command.args.split(b" ")
        if command.has_literal or not command.args or len(parts) > 2:
            self._rejected(command.tag, replies.IMAP_SYNTAX_ERROR)
            return
        mechanism = Mechanism.named(parts[0], self._mechanisms)
        if mechanism is None:
            self._rejected(command.tag, replies.IMAP_UNSUPPORTED_MECHANISM)
        elif len(parts) == 1:
            self._client_move(_CI.AUTHENTICATE)
            self._attempt = _Attempt(command.tag, mechanism=mechanism)
            self._to_client(replies.IMAP_CONTINUE_SASL)
        else:
            # RFC 4959: "=" is an empty initial response.
            initial = b"" if parts[1] == b"=" else parts[1]
            self._sasl(command.tag, mechanism, initial, _CI.REJECTED)

    def _on_sasl_response(self, line: bytes) -> None:
        attempt = self._current_attempt()
        if line == b"*":
            self._attempt = None
            self._rejected(attempt.tag, replies.IMAP_CANCELLED, _CI.CANCELLED)
        else:
            self._sasl(attempt.tag, attempt.mechanism, line, _CI.CANCELLED)

    def _sasl(self, tag: bytes, mechanism: Mechanism, encoded: bytes, refusal: ClientInput) -> None:
        """Decode a SASL response; ``refusal`` is the move when it is malformed."""
        try:
            message = b64decode_strict(encoded)
        except SaslError:
            self._attempt = None
            self._rejected(tag, replies.IMAP_INVALID_BASE64, refusal)
            return
        try:
            credentials = parse_response(mechanism, message)
        except SaslError as exc:
            if mechanism.bearer:
                # RFC 7628 section 3.2.2: a refusal like any other (and counted as one).
                self._note(Severity.INFO, f"login refused without asking for a token: {exc}")
                self._challenge(_Attempt(tag, mechanism=mechanism))
            elif isinstance(exc, InvalidCredentials):
                self._invalid_credentials(tag, exc)
            else:
                self._attempt = None
                self._rejected(tag, replies.IMAP_INVALID_SASL, refusal)
            return
        self._begin_login(tag, credentials, mechanism)

    def _invalid_credentials(self, tag: bytes, exc: InvalidCredentials) -> None:
        self._note(Severity.INFO, f"login refused without asking for a token: {exc}")
        self._login_failed(tag, replies.IMAP_AUTH_FAILED)

    def _begin_login(
        self, tag: bytes, credentials: AnyCredentials, mechanism: Mechanism = Mechanism.PLAIN
    ) -> None:
        self._client_move(_CI.CREDENTIALS)
        self._attempt = _Attempt(tag, login=credentials.login, mechanism=mechanism)
        self._out.append(RequestToken(credentials))

    def _challenge(self, attempt: _Attempt) -> None:
        """Refuse a bearer login with an error challenge (RFC 7628 section 3.2.2); the
        client's answer to it gets the failure (:meth:`_on_challenge_answered`)."""
        self._client_move(_CI.CHALLENGED)
        self._attempt = attempt
        self._to_client(b"+ " + attempt.mechanism.error_challenge + CRLF)

    def _on_challenge_answered(self) -> None:
        # Whatever the line says (RFC 7628 wants ^A, XOAUTH2 clients send an empty line,
        # "*" cancels), the login has failed; the answer is not echoed or logged.
        self._login_failed(self._current_attempt().tag, replies.IMAP_AUTH_FAILED)

    def _login_failed(self, tag: bytes, reply: bytes) -> None:
        """Answer a failed login, count it, and close when the budget is spent."""
        self._attempt = None
        self._client_move(_CI.LOGIN_FAILED)
        self._tagged(tag, reply)
        self._auth_failures += 1
        if self._auth_failures >= self._settings.max_auth_failures:
            self._client_move(_CI.BUDGET_EXHAUSTED)
            self._note(Severity.INFO, f"{self._auth_failures} failed logins: closing")
            self._close(replies.IMAP_BYE_TOO_MANY_FAILURES, "too many failed logins")

    def _current_attempt(self) -> _Attempt:
        if self._attempt is None:
            raise RuntimeError(f"no login attempt in client state {self._client.name}")
        return self._attempt

    def _on_tls(self, side: Side) -> None:
        if side is Side.CLIENT:
            self._client_move(_CI.TLS_ESTABLISHED)
            return
        self._upstream_move(_UI.TLS_ESTABLISHED)
        self._send_command(b"CAPABILITY")

    # === upstream side ===================================================================

    def _connect(self) -> None:
        self._upstream_move(_UI.CONNECT)
        self._out.append(ConnectUpstream())

    def _send_command(self, command: bytes) -> None:
        self._tags += 1
        self._tag = b"X%d" % self._tags
        if command == b"CAPABILITY":
            self._caps = ImapCapabilities()
        self._to_server(self._tag + b" " + command + CRLF)

    def _on_server_data(self, data: bytes) -> None:
        state = self._upstream
        if state in (_U.DOWN, _U.CONNECTING):
            raise RuntimeError(f"upstream data without a connection (state {state.name})")
        if state is _U.TLS_NEGOTIATION:
            raise self._fault(_Fault.UPSTREAM, "upstream sent plaintext during STARTTLS")
        if state in (_U.CLOSING, _U.FAILED):
            self._upstream_move(_UI.IGNORED)
            return
        self._server.receive_data(data)
        while self._upstream in _UPSTREAM_PARSING:
            try:
                response = self._server.next_response()
            except FrameError as exc:
                raise self._fault(_Fault.UPSTREAM, f"upstream: {exc}") from None
            if response is None:
                return
            self._on_response(response)

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
        self._note(Severity.WARNING, f"login as {attempt.login!r}: {why}; answered UNAVAILABLE")
        self._login_failed(attempt.tag, replies.IMAP_UNAVAILABLE)

    def _unsuitable(self, why: str) -> None:
        self._trouble = f"cannot be used: {why}"
        self._upstream_move(_UI.UNSUITABLE)
        self._note(Severity.ERROR, f"upstream cannot be used: {why}")

    def _on_response(self, response: _Response) -> None:
        state = self._upstream
        if response.tag == b"*" and response.status == b"BYE":
            self._on_bye(response)
            return
        if state is _U.GREETING:
            self._on_greeting(response)
            return
        if response.tag == b"*":
            if response.status == b"CAPABILITY" and state in (_U.PLAIN_CAPABILITY, _U.CAPABILITY):
                self._caps = ImapCapabilities.parse(response.after_tag[len(b"CAPABILITY ") :])
            if state in _UPSTREAM_IN_FLIGHT:
                self._forward_size += len(response.raw)
                if self._forward_size > self._settings.max_server_line:
                    raise self._fault(_Fault.UPSTREAM, "too many untagged responses at login")
                self._forward.append(response.raw)
            self._upstream_move(_UI.UNTAGGED)
            return
        if response.tag == b"+":
            self._on_continuation(response)
            return
        if not self._tag or response.tag != self._tag:
            raise self._fault(
                _Fault.UPSTREAM,
                f"upstream answered an unknown tag in state {state.name}: "
                f"{printable(response.raw, 80)!r}",
            )
        if response.status not in (b"OK", b"NO", b"BAD"):
            raise self._fault(
                _Fault.UPSTREAM, f"upstream sent a tagged {printable(response.status, 20)!r}"
            )
        self._tag = b""
        if state in _UPSTREAM_IN_FLIGHT:
            self._on_login_result(response)
        elif response.status != b"OK":
            what = "STARTTLS" if state is _U.STARTTLS else "CAPABILITY"
            self._unsuitable(f"it refused {what}: {printable(response.after_tag)}")
        elif state is _U.STARTTLS:
            if len(self._server):
                raise self._fault(_Fault.UPSTREAM, "upstream sent data behind its STARTTLS OK")
            self._upstream_move(_UI.TLS_GRANTED)
            self._out.append(StartTls(Side.SERVER))
        else:
            if response.code == b"CAPABILITY":
                self._caps = ImapCapabilities.parse(response.code_data)
            if state is _U.PLAIN_CAPABILITY:
                self._ask_starttls()
            else:
                self._check_capabilities()

    def _on_bye(self, response: _Response) -> None:
        state = self._upstream
        why = f"said BYE: {printable(response.text)}"
        self._trouble = why
        self._upstream_move(_UI.BYE)
        if state in _UPSTREAM_IN_FLIGHT:
            self._upstream_failed_login(f"the upstream {why}")
        elif self._client not in _CLIENT_LOGGING_IN:
            self._note(Severity.WARNING, f"upstream {why}; the next login will reconnect")

    def _on_greeting(self, response: _Response) -> None:
        if response.tag != b"*" or response.status not in (b"OK", b"PREAUTH"):
            raise self._fault(
                _Fault.UPSTREAM,
                f"upstream greeting is not * OK: {printable(response.raw, 80)!r}",
            )
        if response.status == b"PREAUTH":
            self._unsuitable(
                "it greeted with PREAUTH (the connection is already logged in to some "
                "mailbox), so there is no way to log in to the right one with XOAUTH2"
            )
            return
        # A list in the greeting saves a round trip when it has what we need; when it
        # does not, we ask CAPABILITY rather than trust a possibly abridged list.
        listed = ImapCapabilities()
        if response.code == b"CAPABILITY":
            listed = ImapCapabilities.parse(response.code_data)
        if self._settings.upstream_tls is UpstreamTls.IMPLICIT:
            if "XOAUTH2" in listed.mechanisms:
                self._caps = listed
                self._upstream_move(_UI.CAPABLE)
            else:
                self._upstream_move(_UI.ASK_CAPABILITY)
                self._send_command(b"CAPABILITY")
        elif "STARTTLS" in listed:
            self._caps = listed
            self._ask_starttls()
        else:
            self._upstream_move(_UI.ASK_PLAIN_CAPABILITY)
            self._send_command(b"CAPABILITY")

    def _ask_starttls(self) -> None:
        if "STARTTLS" not in self._caps:
            self._unsuitable(
                "upstream_tls is starttls but the server does not offer STARTTLS "
                f"({self._caps!r}); use implicit TLS (port 993)"
            )
            return
        self._upstream_move(_UI.ASK_STARTTLS)
        self._send_command(b"STARTTLS")

    def _check_capabilities(self) -> None:
        if "XOAUTH2" in self._caps.mechanisms:
            self._upstream_move(_UI.CAPABLE)
            return
        offered = " ".join(sorted(self._caps.mechanisms)) or "none"
        self._unsuitable(f"it does not offer AUTH=XOAUTH2 (SASL mechanisms offered: {offered})")

    def _on_continuation(self, response: _Response) -> None:
        state = self._upstream
        attempt = self._current_attempt() if state in _UPSTREAM_IN_FLIGHT else None
        if attempt is not None and state is _U.AUTHENTICATE_SENT:
            self._upstream_move(_UI.GO_AHEAD)
            self._to_server(attempt.response + CRLF)
            attempt.response = b""
        elif attempt is not None and state is _U.TOKEN_SENT:
            self._upstream_move(_UI.CHALLENGED)
            attempt.challenge = describe_error_challenge(response.text)
            self._to_server(CRLF)
        else:
            raise self._fault(
                _Fault.UPSTREAM, f"unexpected continuation request in state {state.name}"
            )

    def _send_authenticate(self) -> None:
        attempt = self._current_attempt()
        self._forward, self._forward_size = [], 0
        if "SASL-IR" in self._caps:
            self._upstream_move(_UI.AUTHENTICATE_IR)
            self._send_command(b"AUTHENTICATE XOAUTH2 " + attempt.response)
            attempt.response = b""
        else:
            self._upstream_move(_UI.AUTHENTICATE)
            self._send_command(b"AUTHENTICATE XOAUTH2")

    def _on_login_result(self, response: _Response) -> None:
        attempt = self._current_attempt()
        state = self._upstream
        if response.status == b"OK":
            if state is _U.AUTHENTICATE_SENT:
                raise self._fault(_Fault.UPSTREAM, "upstream accepted XOAUTH2 without a token")
            self._upstream_move(_UI.ACCEPTED)
            self._client_move(_CI.LOGIN_SUCCEEDED)
            forward = b"".join(self._forward)
            self._forward, self._forward_size = [], 0
            self._to_client(forward + attempt.tag + b" " + response.after_tag + CRLF)
            self._note(Severity.INFO, f"logged in to the upstream as {attempt.mailbox!r}")
            self._out.append(
                BeginRelay(to_server=self._client_buf.take_all(), to_client=self._server.take_all())
            )
            self._attempt = None
            return
        self._upstream_move(_UI.REFUSED)
        said = printable(response.after_tag)
        challenge = f" (error challenge: {attempt.challenge})" if attempt.challenge else ""
        who = f"login as {attempt.login!r} (mailbox {attempt.mailbox!r})"
        if response.status == b"BAD" or state is _U.AUTHENTICATE_SENT:
            self._note(
                Severity.ERROR,
                f"{who}: the upstream refused the XOAUTH2 exchange itself: {said}{challenge}. "
                "This is not a password problem; check that the server supports XOAUTH2 "
                "as advertised. Answered UNAVAILABLE.",
            )
            reply = replies.IMAP_UNAVAILABLE
        elif response.code == b"UNAVAILABLE":
            self._note(Severity.WARNING, f"{who}: upstream temporarily unavailable: {said}")
            reply = replies.IMAP_UNAVAILABLE
        else:
            causes = (
                "Likely causes: the token's audience or roles do not fit this server "
                "(Microsoft 365 needs the IMAP.AccessAsApp application permission with admin "
                "consent), or the app may not open this mailbox (Exchange: the service "
                "principal is not registered or lacks Add-MailboxPermission FullAccess)."
                if attempt.provider == "microsoft"
                else rejection_causes(attempt.provider)
            )
            self._note(
                Severity.WARNING,
                f"{who}: the upstream rejected the token: {said}{challenge}. {causes}",
            )
            reply = replies.IMAP_AUTH_FAILED
        self._login_failed(attempt.tag, reply)

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
