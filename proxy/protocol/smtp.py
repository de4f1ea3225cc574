"""The pre-authentication phase of one proxied SMTP submission connection: :class:`SmtpAuth`.

Theory of operation
===================

The proxy stands between a legacy mail submission client, to which it is an SMTP server
(RFC 5321, RFC 6409), and the real submission server, to which it is an SMTP client.
``SmtpAuth`` is a sans-I/O machine for both conversations at once, in the shape of
:class:`~proxy.protocol.imap.ImapAuth`: the driver feeds it events (bytes or closes from
either peer, a token issued or refused, TLS established) and carries out the actions it
returns. It never calls out, reads a clock or logs; asking for a token is an action.

Two sub-machines run interleaved, each a state enum plus a :class:`TransitionTable`
(``CLIENT_TRANSITIONS``, ``UPSTREAM_TRANSITIONS`` below; :func:`state_diagrams` draws
them). They meet in one place, :meth:`SmtpAuth._join`, for two things:

* the client's EHLO after TLS: our reply repeats some of the upstream's service
  extensions, so an EHLO that comes before the upstream's own EHLO reply (after TLS) is
  held (client state ``EHLO_HELD``) until that list is known, or until the upstream is
  known to be unusable for now;
* the login: once the client's credentials are accepted (a token was issued, client
  state ``AUTHORIZING``) *and* the upstream is ready (``READY``), the proxy sends
  ``AUTH XOAUTH2`` upstream.

When to greet
    ``start()`` sends our greeting, ``220 <hostname> ESMTP xoauth2-proxy ready``, at once
    and in the same breath asks the driver to connect upstream, as ``ImapAuth`` does.
    Holding the greeting until the upstream is ready would also let the EHLO reply list
    the upstream's extensions, but it would put the two connections in a row: the
    upstream's greeting, EHLO, STARTTLS, TLS handshake and second EHLO would all come
    before the client's first byte, and on a STARTTLS listener before the client's own
    EHLO, STARTTLS and handshake, which now overlap with them. Only the EHLO reply after
    TLS needs the upstream's list, so only it waits; commands pipelined behind it wait
    with it and are answered in order afterwards. If the upstream turns out to be
    unreachable or unusable, a held EHLO is answered with the proxy's own extension
    (``AUTH``) alone: a subset of what the upstream offers is always safe to advertise.
    Later EHLOs use the last list learned, even while the upstream is reconnecting.

Client side (we are the server; RFC 5321, 3207, 4954, 2920)
    Command verbs are case-insensitive; lines end in CRLF (a bare LF is accepted).
    On a STARTTLS listener before TLS (``PLAINTEXT``), EHLO is answered at once with the
    proxy's own list, ``PIPELINING``, ``ENHANCEDSTATUSCODES`` and ``STARTTLS`` and no
    ``AUTH`` (RFC 3207 section 4.2 has the client forget it after TLS; RFC 4954 section 4
    and RFC 8314 want no password in the clear); AUTH and the mail commands get ``530
    5.7.0 Must issue a STARTTLS command first`` (RFC 3207 section 4). STARTTLS is answered
    by a :class:`StartTls` action carrying ``220 2.0.0 Ready to start TLS`` as its
    preface, and any byte pipelined behind the STARTTLS line is a
    :class:`ClientProtocolError` (the CVE-2011-0411 class). TLS resets the session (RFC
    3207 section 4.2): the client is back in ``CONNECTED`` and must say EHLO again.

    After TLS, or from the start on an implicit-TLS or plaintext listener, EHLO is
    answered with ``250-<hostname>``, ``AUTH PLAIN LOGIN`` (followed by ``EXTERNAL`` when
    ``AuthSettings.sasl_external`` is set and ``XOAUTH2 OAUTHBEARER`` when
    ``sasl_bearer`` is), and those of the upstream's
    ``PIPELINING``, ``SIZE`` (with its limit), ``ENHANCEDSTATUSCODES``, ``8BITMIME``,
    ``SMTPUTF8`` and ``CHUNKING`` that its EHLO after TLS listed
    (:func:`~proxy.protocol.capabilities.smtp_proxy_extensions`). They describe the mail
    transaction, which the upstream runs after the relay begins; nothing else of the
    upstream's list is repeated. HELO is answered with ``250 <hostname>``.

    AUTH needs a preceding EHLO or HELO (``503 5.5.1`` otherwise). It is accepted after
    HELO: RFC 4954 defines AUTH as a service extension that a client learns from EHLO,
    but does not make the server refuse it after HELO; Postfix and Exchange accept it,
    and legacy devices (scanners, mostly) send HELO then AUTH LOGIN. The upstream session
    is an EHLO session either way. AUTH PLAIN (RFC 4616) and AUTH LOGIN each take an
    initial response (``=`` for an empty one) or answer ``334`` continuations (PLAIN:
    ``334`` with no text; LOGIN: ``334 VXNlcm5hbWU6``, then ``334 UGFzc3dvcmQ6``); ``*``
    cancels (``501 5.0.0``); base64 is strict (``501 5.5.2``). Where offered, the
    mechanisms for app identities work like PLAIN (one response, inline or after ``334``):
    EXTERNAL (RFC 4422 appendix A: the TLS client certificate, with the authorization
    identity or nothing as the response), XOAUTH2 and OAUTHBEARER (RFC 7628: a mailbox
    and an app key as the bearer token). Mechanism names are case-insensitive; others get
    ``504 5.5.4``. A LOGIN user name that cannot be anyone's is remembered and refused only
    after the password, so that the password line is never taken for a command. NOOP and RSET
    get ``250 2.0.0 OK``, HELP a ``214``, QUIT ``221 2.0.0 Bye`` and :class:`Close`.
    MAIL, RCPT, DATA, BDAT and the other mail commands get ``530 5.7.0 Authentication
    required``, unknown commands ``500 5.5.2``, bad arguments ``501 5.5.2``; every refused
    command counts against ``max_bad_commands``, and the one that reaches it is answered,
    followed by ``421`` and :class:`Close`.

    Once credentials are parsed the machine says :class:`RequestToken` and stops parsing:
    whatever the client sends meanwhile is buffered raw. Those are commands pipelined
    behind AUTH (RFC 2920: MAIL FROM, RCPT TO...); on success they become
    ``BeginRelay.to_server`` untouched, on failure they are parsed as the next commands.

Upstream side (we are the client)
    Replies are a three-digit code and text, ``-`` after the code on every line but the
    last, the same code on every line (RFC 5321 section 4.2); a whole reply is bounded
    by ``max_server_line``. The greeting is ``220`` (maybe multiline); ``421`` means "not
    now" and ``554`` "no service here" (RFC 5321 section 3.1, answered with QUIT). Then
    ``EHLO <hostname>``. With ``UpstreamTls.STARTTLS`` that first list must offer
    ``STARTTLS``; we send it and expect ``220`` with nothing behind it (bytes behind it are
    an :class:`UpstreamProtocolError`), then :class:`StartTls` towards the server and EHLO
    again, whose list is the one believed (RFC 3207 section 4.2). It must offer ``AUTH``
    with ``XOAUTH2`` (the older ``AUTH=`` form is read too). Then, joined with the
    client's token: ``AUTH XOAUTH2`` alone, and after the server's ``334`` the base64
    token on a line of its own. Never as an initial response: tokens of 1.5 to 3 KB break
    command line limits (RFC 5321 section 4.5.3.1.4), and Dovecot refuses such AUTH lines
    with ``500 5.5.2 Line too long``.

Outcomes
    * ``235``: the client gets ``235 2.7.0 Authentication successful`` (our words; the
      upstream's text is its own), then :class:`BeginRelay` with the client's pipelined
      bytes and whatever the upstream sent behind its ``235``.
    * An error challenge (``334 <base64 JSON>`` after the token, as Dovecot and Google
      send for XOAUTH2) is answered with an empty line to obtain the final reply; its
      decoded JSON goes into the operator's :class:`Note`.
    * A final ``5xx`` after the token, other than the syntax class ``50x``: the client
      gets ``535 5.7.8`` (the token was refused for this mailbox; the note names the
      likely causes: roles, SMTP AUTH disabled for the mailbox, mailbox permission).
      A ``4xx`` is passed on as the temporary ``454 4.7.0``.
    * ``50x`` after the token, or any refusal of ``AUTH XOAUTH2`` before the token was
      sent: the proxy and the upstream disagree about XOAUTH2 itself, which is nobody's
      password problem, so the client gets the temporary ``454 4.7.0`` and the note says
      so at ERROR severity.
    * :class:`TokenRefused`: ``CREDENTIALS`` gives exactly ``535 5.7.8 Authentication
      credentials invalid`` whatever the reason (wrong password or unknown user);
      ``UNAVAILABLE`` gives ``454 4.7.0``. Credentials that cannot be anyone's (not
      UTF-8, control characters) are refused the same way without asking.
    * A refused XOAUTH2 or OAUTHBEARER login (``CREDENTIALS``, or a message that does not
      parse) is answered as servers do (RFC 7628 section 3.2.2, RFC 4954 section 4):
      first an error challenge, ``334 <base64 JSON>`` (``{"status":"invalid_token"}`` for
      OAUTHBEARER, Google's and Dovecot's ``{"status":"401","schemes":"bearer"}`` for
      XOAUTH2), then, whatever line the client answers with (``AQ==`` for ^A, or an
      empty line), ``535 5.7.8``. ``UNAVAILABLE`` gets ``454 4.7.0`` directly.

    Every failed login, permanent or temporary, counts against ``max_auth_failures``;
    the failure that reaches it is answered and followed by ``421`` and :class:`Close`.
    After any other failure the client may try AUTH again (RFC 4954 section 4).

Upstream trouble and reconnecting
    As in ``ImapAuth``: if the upstream cannot be reached, closes, or says ``421`` (or
    greets with ``554``) before the login has been sent to it, the machine notes why and
    marks it ``DOWN`` (after a ``421`` or ``554`` it first waits, in ``CLOSING``, for the
    connection to end). Each login attempt may open one fresh upstream connection, in
    parallel with its token request; if that fails too, the attempt gets ``454 4.7.0``
    once its token is in. Losing the upstream after the token was sent fails that attempt
    with ``454 4.7.0``. An upstream that cannot be used at all (no STARTTLS when it is
    required, no XOAUTH2, EHLO or STARTTLS refused) is ``FAILED`` for the rest of the
    session. A reconnected upstream whose list lacks an extension the client was already
    told about is noted as a warning.

Limits and errors
    Client lines are bounded by ``max_line``; beyond it the machine raises
    :class:`ClientProtocolError` with ``500 5.5.6 Line too long`` as its reply hint.
    Bytes held while the client waits (behind a held EHLO, or pipelined behind AUTH) are
    bounded by ``max_line + max_literal``: SMTP has no literals, so ``max_literal`` is
    the pipelining allowance here. Upstream replies are bounded by ``max_server_line``,
    beyond which it raises :class:`UpstreamProtocolError`. Before raising, the machine
    moves to ``ERROR`` and refuses every later event. :attr:`SmtpAuth.buffered` reports
    the bytes held, which these limits bound. An event that the driver could only send by
    breaking its contract (a token nobody asked for, TLS on a side that did not start it)
    raises ``RuntimeError``: that is a bug, not a peer's fault.

Secrets
    The password and the app key leave the machine only inside :class:`RequestToken`,
    whose :class:`Credentials` and :class:`BearerCredentials` redact them; the token only
    on the XOAUTH2 line sent upstream. No note, error message or repr contains any of
    them, and nothing the client sends is ever echoed back to it.
"""

from __future__ import annotations

import enum
import re
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
    SmtpExtensions,
    smtp_proxy_extensions,
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
    "SmtpAuth",
    "UpstreamInput",
    "UpstreamState",
    "state_diagrams",
]

CRLF: Final = b"\r\n"


# === States, inputs and the transition tables ==============================================


class ClientState(enum.Enum):
    """Where the conversation with the legacy client stands."""

    #: STARTTLS listener before TLS: only EHLO, HELO, NOOP, RSET, HELP, QUIT and STARTTLS.
    PLAINTEXT = "plaintext"
    #: Our ``220`` to STARTTLS is out; the driver runs the handshake.
    TLS_NEGOTIATION = "tls-negotiation"
    #: Waiting for EHLO or HELO (after the greeting, or after TLS).
    CONNECTED = "connected"
    #: EHLO received; our reply waits for the upstream's extension list.
    EHLO_HELD = "ehlo-held"
    #: EHLO or HELO answered: AUTH may come.
    GREETED = "greeted"
    #: ``AUTH PLAIN``, ``EXTERNAL``, ``XOAUTH2`` or ``OAUTHBEARER`` without an initial
    #: response: our ``334`` is out.
    SASL_RESPONSE = "sasl-response"
    #: ``AUTH LOGIN``: our ``334 VXNlcm5hbWU6`` is out.
    SASL_USERNAME = "sasl-username"
    #: ``AUTH LOGIN``: our ``334 UGFzc3dvcmQ6`` is out.
    SASL_PASSWORD = "sasl-password"
    #: Credentials parsed, :class:`RequestToken` out; client bytes are buffered.
    AWAITING_TOKEN = "awaiting-token"
    #: A bearer login failed: our error challenge is out, the client's answer gets 535.
    ERROR_CHALLENGE = "error-challenge"
    #: Token in hand; waiting for the upstream to be ready and to accept it.
    AUTHORIZING = "authorizing"
    AUTHENTICATED = "authenticated"
    CLOSED = "closed"
    ERROR = "error"


class ClientInput(enum.Enum):
    DATA = "bytes"
    HARMLESS = "noop/rset/help (ehlo before tls)"
    HELLO = "ehlo/helo answered"
    HOLD_EHLO = "ehlo (upstream list unknown)"
    EHLO_ANSWERED = "held ehlo answered"
    REJECTED = "refused command"
    STARTTLS = "starttls"
    TLS_ESTABLISHED = "tls established"
    AUTH_SASL = "auth plain/external/xoauth2/oauthbearer (no initial response)"
    AUTH_LOGIN = "auth login (no initial response)"
    USERNAME = "login user name"
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
    #: STARTTLS mode, before TLS: our EHLO is out.
    PLAIN_EHLO = "plain-ehlo"
    #: Our STARTTLS is out.
    STARTTLS = "starttls"
    TLS_NEGOTIATION = "tls-negotiation"
    #: Our EHLO is out (after TLS, or with implicit TLS).
    EHLO = "ehlo"
    READY = "ready"
    #: ``AUTH XOAUTH2`` is out; waiting for ``334``.
    AUTH_SENT = "auth-sent"
    TOKEN_SENT = "token-sent"
    #: The error challenge was answered with an empty line; waiting for the final reply.
    ERROR_CHALLENGE = "error-challenge"
    #: The upstream said 421 (or greeted with 554); waiting for it to close.
    CLOSING = "closing"
    #: Unusable for this session (no STARTTLS, no XOAUTH2, EHLO or STARTTLS refused).
    FAILED = "failed"
    AUTHENTICATED = "authenticated"
    ERROR = "error"


class UpstreamInput(enum.Enum):
    CONNECT = "connect"
    CONNECTED = "connected"
    UNREACHABLE = "unreachable"
    ASK_PLAIN_EHLO = "220: send EHLO (before TLS)"
    ASK_EHLO = "220: send EHLO"
    ASK_STARTTLS = "send STARTTLS"
    TLS_GRANTED = "STARTTLS 220"
    TLS_ESTABLISHED = "tls established: send EHLO"
    CAPABLE = "AUTH XOAUTH2 offered"
    UNSUITABLE = "unusable"
    IGNORED = "bytes ignored"
    AUTHENTICATE = "send AUTH XOAUTH2"
    GO_AHEAD = "334: send token"
    CHALLENGED = "error challenge: send empty line"
    ACCEPTED = "235"
    REFUSED = "4xx/5xx"
    GOING_AWAY = "421 (or 554 greeting)"
    PEER_CLOSED = "upstream closed"
    BROKE = "protocol error"


_C = ClientState
_CI = ClientInput
_U = UpstreamState
_UI = UpstreamInput

_CLIENT_EXITS: Final = {_CI.PEER_CLOSED: _C.CLOSED, _CI.BROKE: _C.ERROR}

#: Every legal move of the client side. ``BROKE`` (a raised ProxyError) leads from every
#: live state to ``ERROR``; ``DATA`` is absent from ``TLS_NEGOTIATION`` on purpose.
CLIENT_TRANSITIONS: Final = TransitionTable[ClientState, ClientInput](
    "smtp-client",
    {
        _C.PLAINTEXT: {
            _CI.DATA: _C.PLAINTEXT,
            _CI.HARMLESS: _C.PLAINTEXT,
            _CI.REJECTED: _C.PLAINTEXT,
            _CI.STARTTLS: _C.TLS_NEGOTIATION,
            _CI.QUIT: _C.CLOSED,
            _CI.BUDGET_EXHAUSTED: _C.CLOSED,
            **_CLIENT_EXITS,
        },
        _C.TLS_NEGOTIATION: {_CI.TLS_ESTABLISHED: _C.CONNECTED, **_CLIENT_EXITS},
        _C.CONNECTED: {
            _CI.DATA: _C.CONNECTED,
            _CI.HARMLESS: _C.CONNECTED,
            _CI.HELLO: _C.GREETED,
            _CI.HOLD_EHLO: _C.EHLO_HELD,
            _CI.REJECTED: _C.CONNECTED,
            _CI.QUIT: _C.CLOSED,
            _CI.BUDGET_EXHAUSTED: _C.CLOSED,
            **_CLIENT_EXITS,
        },
        _C.EHLO_HELD: {
            _CI.DATA: _C.EHLO_HELD,
            _CI.EHLO_ANSWERED: _C.GREETED,
            **_CLIENT_EXITS,
        },
        _C.GREETED: {
            _CI.DATA: _C.GREETED,
            _CI.HARMLESS: _C.GREETED,
            _CI.HELLO: _C.GREETED,
            _CI.HOLD_EHLO: _C.EHLO_HELD,
            _CI.REJECTED: _C.GREETED,
            _CI.AUTH_SASL: _C.SASL_RESPONSE,
            _CI.AUTH_LOGIN: _C.SASL_USERNAME,
            _CI.USERNAME: _C.SASL_PASSWORD,
            _CI.CREDENTIALS: _C.AWAITING_TOKEN,
            _CI.CHALLENGED: _C.ERROR_CHALLENGE,
            _CI.LOGIN_FAILED: _C.GREETED,
            _CI.QUIT: _C.CLOSED,
            _CI.BUDGET_EXHAUSTED: _C.CLOSED,
            **_CLIENT_EXITS,
        },
        _C.SASL_RESPONSE: {
            _CI.DATA: _C.SASL_RESPONSE,
            _CI.CREDENTIALS: _C.AWAITING_TOKEN,
            _CI.CHALLENGED: _C.ERROR_CHALLENGE,
            _CI.CANCELLED: _C.GREETED,
            _CI.LOGIN_FAILED: _C.GREETED,
            **_CLIENT_EXITS,
        },
        _C.SASL_USERNAME: {
            _CI.DATA: _C.SASL_USERNAME,
            _CI.USERNAME: _C.SASL_PASSWORD,
            _CI.CANCELLED: _C.GREETED,
            **_CLIENT_EXITS,
        },
        _C.SASL_PASSWORD: {
            _CI.DATA: _C.SASL_PASSWORD,
            _CI.CREDENTIALS: _C.AWAITING_TOKEN,
            _CI.CANCELLED: _C.GREETED,
            _CI.LOGIN_FAILED: _C.GREETED,
            **_CLIENT_EXITS,
        },
        _C.AWAITING_TOKEN: {
            _CI.DATA: _C.AWAITING_TOKEN,
            _CI.TOKEN_ISSUED: _C.AUTHORIZING,
            _CI.CHALLENGED: _C.ERROR_CHALLENGE,
            _CI.LOGIN_FAILED: _C.GREETED,
            **_CLIENT_EXITS,
        },
        _C.ERROR_CHALLENGE: {
            _CI.DATA: _C.ERROR_CHALLENGE,
            _CI.LOGIN_FAILED: _C.GREETED,
            **_CLIENT_EXITS,
        },
        _C.AUTHORIZING: {
            _CI.DATA: _C.AUTHORIZING,
            _CI.LOGIN_SUCCEEDED: _C.AUTHENTICATED,
            _CI.LOGIN_FAILED: _C.GREETED,
            **_CLIENT_EXITS,
        },
    },
)

_CONNECTED_EXITS: Final = {
    _UI.GOING_AWAY: _U.CLOSING,
    _UI.PEER_CLOSED: _U.DOWN,
    _UI.BROKE: _U.ERROR,
}

#: Every legal move of the upstream side.
UPSTREAM_TRANSITIONS: Final = TransitionTable[UpstreamState, UpstreamInput](
    "smtp-upstream",
    {
        _U.DOWN: {_UI.CONNECT: _U.CONNECTING, _UI.BROKE: _U.ERROR},
        _U.CONNECTING: {
            _UI.CONNECTED: _U.GREETING,
            _UI.UNREACHABLE: _U.DOWN,
            _UI.BROKE: _U.ERROR,
        },
        _U.GREETING: {
            _UI.ASK_PLAIN_EHLO: _U.PLAIN_EHLO,
            _UI.ASK_EHLO: _U.EHLO,
            **_CONNECTED_EXITS,
        },
        _U.PLAIN_EHLO: {
            _UI.ASK_STARTTLS: _U.STARTTLS,
            _UI.UNSUITABLE: _U.FAILED,
            **_CONNECTED_EXITS,
        },
        _U.STARTTLS: {
            _UI.TLS_GRANTED: _U.TLS_NEGOTIATION,
            _UI.UNSUITABLE: _U.FAILED,
            **_CONNECTED_EXITS,
        },
        _U.TLS_NEGOTIATION: {
            _UI.TLS_ESTABLISHED: _U.EHLO,
            _UI.UNREACHABLE: _U.DOWN,
            _UI.BROKE: _U.ERROR,
        },
        _U.EHLO: {
            _UI.CAPABLE: _U.READY,
            _UI.UNSUITABLE: _U.FAILED,
            **_CONNECTED_EXITS,
        },
        _U.READY: {_UI.AUTHENTICATE: _U.AUTH_SENT, **_CONNECTED_EXITS},
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

#: Client states in which a line is a SASL response (or the answer to an error challenge).
_CLIENT_SASL: Final = frozenset(
    {_C.SASL_RESPONSE, _C.SASL_USERNAME, _C.SASL_PASSWORD, _C.ERROR_CHALLENGE}
)
#: Client states in which bytes are parsed as commands or SASL responses.
_CLIENT_PARSING: Final = _CLIENT_SASL | {_C.PLAINTEXT, _C.CONNECTED, _C.GREETED}
#: Client states of a login under way.
_CLIENT_LOGGING_IN: Final = frozenset({_C.AWAITING_TOKEN, _C.AUTHORIZING})
#: Client states in which bytes are buffered raw, unparsed.
_CLIENT_WAITING: Final = _CLIENT_LOGGING_IN | {_C.EHLO_HELD}
_CLIENT_TERMINAL: Final = frozenset({_C.AUTHENTICATED, _C.CLOSED, _C.ERROR})
#: Upstream states whose bytes are parsed as replies.
_UPSTREAM_PARSING: Final = frozenset(
    {
        _U.GREETING,
        _U.PLAIN_EHLO,
        _U.STARTTLS,
        _U.EHLO,
        _U.READY,
        _U.AUTH_SENT,
        _U.TOKEN_SENT,
        _U.ERROR_CHALLENGE,
    }
)
#: Upstream states in which its extension list after TLS is on its way.
_UPSTREAM_LEARNING: Final = frozenset(
    {_U.CONNECTING, _U.GREETING, _U.PLAIN_EHLO, _U.STARTTLS, _U.TLS_NEGOTIATION, _U.EHLO}
)
#: Upstream states in which our AUTH is out.
_UPSTREAM_IN_FLIGHT: Final = frozenset({_U.AUTH_SENT, _U.TOKEN_SENT, _U.ERROR_CHALLENGE})


def state_diagrams() -> str:
    """Both transition tables as Graphviz digraphs."""
    return CLIENT_TRANSITIONS.to_dot() + UPSTREAM_TRANSITIONS.to_dot()


# === Syntax ================================================================================

#: Mail commands (RFC 5321, 3030, 4468): before login they get 530 (RFC 4954 section 6).
_MAIL_COMMANDS: Final = frozenset(
    {b"MAIL", b"RCPT", b"DATA", b"BDAT", b"BURL", b"VRFY", b"EXPN", b"ETRN"}
)
#: Commands that take no arguments (RFC 5321 section 4.1.1, RFC 3207 section 4).
_NO_ARGUMENTS: Final = frozenset({b"RSET", b"QUIT", b"STARTTLS"})

#: A domain (RFC 5321 section 4.1.2) or an address literal, for our own name.
_HOSTNAME: Final = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"|\[[\x21-\x5a\x5e-\x7e]+\]"
)
_MAX_HOSTNAME: Final = 255


def is_hostname(text: str) -> bool:
    """Can ``text`` name us in a greeting and an EHLO (a domain or an address literal)?"""
    return len(text) <= _MAX_HOSTNAME and _HOSTNAME.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class _Reply:
    """One reply from the upstream (RFC 5321 section 4.2): its code and each line's text."""

    code: int
    lines: tuple[bytes, ...]

    def describe(self) -> str:
        """The reply on one log line: ``535 5.7.8 Authentication failed.``"""
        return printable(b"%d %s" % (self.code, b" / ".join(self.lines)), 300)

    @property
    def syntax_class(self) -> bool:
        """``50x`` and ``40x``: the command itself was not understood (RFC 5321 4.2.1)."""
        return self.code // 10 % 10 == 0


def _reply_line(line: bytes) -> tuple[int, bool, bytes]:
    """Split one reply line into its code, whether it is the last, and its text."""
    code, separator = line[:3], line[3:4]
    if (
        len(code) != 3
        or not code.isdigit()
        or code[0] not in b"2345"
        or separator not in (b"", b" ", b"-")
    ):
        raise FrameError(f"malformed reply line {printable(line, 80)!r}")
    return int(code), separator != b"-", line[4:]


class _ReplyReader:
    """Reassembles upstream replies, multiline ones included, bounded by ``limit`` bytes."""

    __slots__ = ("_buf", "_code", "_limit", "_lines", "_size")

    def __init__(self, limit: int) -> None:
        self._buf = LineBuffer(limit)
        self._limit = limit
        self._code: int | None = None
        self._lines: list[bytes] = []
        self._size = 0

    def __len__(self) -> int:
        return len(self._buf) + self._size

    def receive_data(self, data: bytes) -> None:
        self._buf.receive_data(data)

    def next_reply(self) -> _Reply | None:
        """The next complete reply, or ``None``; :class:`FrameError` if malformed or too big."""
        while True:
            line = self._buf.next_line()
            if line is None:
                return None
            self._size += len(line) + len(CRLF)
            if self._size > self._limit:
                raise FrameError(f"reply longer than {self._limit} bytes")
            code, last, text = _reply_line(line)
            if self._code is not None and code != self._code:
                raise FrameError(f"multiline reply changes its code from {self._code} to {code}")
            self._code = code
            self._lines.append(text)
            if last:
                reply = _Reply(code, tuple(self._lines))
                self._code, self._lines, self._size = None, [], 0
                return reply

    def take_all(self) -> bytes:
        """The bytes not parsed yet (for the relay, or to be dropped). The lines of an
        unfinished reply are dropped: the relay begins right after a complete reply."""
        self._code, self._lines, self._size = None, [], 0
        return self._buf.take_all()


@dataclass(slots=True)
class _Attempt:
    """One login attempt, from the credentials to the upstream's verdict."""

    login: str = ""
    #: How the client logs in.
    mechanism: Mechanism = Mechanism.PLAIN
    #: Why a LOGIN user name cannot be anyone's (refused once the password is in).
    invalid: str = ""
    #: Upstream connections this attempt may still open.
    fresh_connections: int = 1
    mailbox: str = ""
    #: The XOAUTH2 response (base64 of the token), until it is sent.
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


class SmtpAuth:
    """The pre-authentication phase of one proxied SMTP submission connection (see the
    module docstring). Call :meth:`start` once, then :meth:`handle` for every event until an
    action says :class:`BeginRelay` or :class:`Close`, or a :class:`ProxyError` is raised.

    ``hostname`` is the proxy's name in its greeting, in its EHLO reply and in the EHLO it
    sends upstream: a domain or an address literal (RFC 5321 section 4.1.2).
    """

    __slots__ = (
        "_advertised",
        "_attempt",
        "_auth_failures",
        "_bad_commands",
        "_client",
        "_client_buf",
        "_error",
        "_extensions",
        "_hostname",
        "_mechanisms",
        "_out",
        "_server",
        "_settings",
        "_started",
        "_trouble",
        "_upstream",
    )

    def __init__(self, settings: AuthSettings, *, hostname: str = "localhost") -> None:
        if not is_hostname(hostname):
            raise ValueError(f"not a domain or address literal: {hostname!r}")
        self._settings = settings
        #: What AUTH accepts and the EHLO reply offers.
        self._mechanisms = (*POP3_SMTP_PASSWORD_MECHANISMS, *settings.app_mechanisms)
        self._hostname = hostname.encode("ascii")
        self._started = False
        self._client = _C.PLAINTEXT if settings.client_tls is ClientTls.STARTTLS else _C.CONNECTED
        self._upstream = _U.DOWN
        self._client_buf = LineBuffer(settings.max_line)
        self._server = _ReplyReader(settings.max_server_line)
        self._attempt: _Attempt | None = None
        self._bad_commands = 0
        self._auth_failures = 0
        #: The upstream's list after TLS, from the last connection that offered XOAUTH2.
        self._extensions: SmtpExtensions | None = None
        #: The upstream's extension keywords that our EHLO replies have listed so far.
        self._advertised: frozenset[bytes] = frozenset()
        self._trouble = "not connected yet"
        self._error: ProxyError | None = None
        self._out: list[Action] = []

    def __repr__(self) -> str:
        return (
            f"<SmtpAuth client={self._client.name} upstream={self._upstream.name} "
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
        return len(self._client_buf) + len(self._server)

    # -- entry points ----------------------------------------------------------------------

    def start(self) -> list[Action]:
        """Greet the client and open the upstream connection."""
        if self._started:
            raise RuntimeError("SmtpAuth.start() called twice")
        self._started = True
        self._out = []
        self._reply(b"220 " + self._hostname + b" " + replies.SMTP_GREETING_TEXT)
        self._connect()
        return self._out

    def handle(self, event: Event) -> list[Action]:
        """Feed one event; return what to do. Raises :class:`ProxyError` subclasses."""
        if not self._started:
            raise RuntimeError("SmtpAuth.handle() before start()")
        if self._error is not None:
            raise type(self._error)(
                f"session already failed: {self._error}", reply_hint=self._error.reply_hint
            )
        if self._client in _CLIENT_TERMINAL:
            raise RuntimeError(f"SmtpAuth.handle() after the auth phase ended ({self._client})")
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
                    self._login_failed(replies.SMTP_UNAVAILABLE)
                elif attempt.mechanism.bearer:
                    self._challenge(attempt)
                else:
                    self._login_failed(replies.SMTP_AUTH_FAILED)
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
            limit = self._settings.max_line + self._settings.max_literal
            if len(self._client_buf) > limit:
                raise self._fault(
                    _Fault.CLIENT,
                    f"more than {limit} bytes pipelined in client state {self._client.name}",
                    replies.SMTP_PIPELINED + CRLF,
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

    def _fault(self, fault: _Fault, message: str, hint: bytes = b"") -> Exception:
        match fault:
            case _Fault.CLIENT:
                return ClientProtocolError(
                    message, reply_hint=hint or replies.SMTP_PROTOCOL_ERROR + CRLF
                )
            case _Fault.UPSTREAM:
                return UpstreamProtocolError(
                    message, reply_hint=hint or replies.SMTP_SERVICE_UNAVAILABLE + CRLF
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

    def _reply(self, line: bytes) -> None:
        self._to_client(line + CRLF)

    def _to_server(self, data: bytes) -> None:
        self._out.append(SendToServer(data))

    def _note(self, severity: Severity, text: str) -> None:
        self._out.append(Note(severity, text))

    def _close(self, reply: bytes, reason: str) -> None:
        self._reply(reply)
        self._out.append(Close(reason))

    # === client side =====================================================================

    def _parse_client(self) -> None:
        while self._client in _CLIENT_PARSING:
            try:
                line = self._client_buf.next_line()
            except FrameError as exc:
                raise self._fault(
                    _Fault.CLIENT, f"client: {exc}", replies.SMTP_LINE_TOO_LONG + CRLF
                ) from None
            if line is None:
                return
            if self._client in _CLIENT_SASL:
                self._on_sasl_response(line)
            else:
                self._on_command(line)

    def _on_command(self, line: bytes) -> None:
        verb, _, rest = line.partition(b" ")
        verb = verb.upper()
        args = [word for word in rest.split(b" ") if word]  # SP separates (RFC 5321 4.1.1)
        if verb in (b"EHLO", b"HELO"):
            self._on_hello(verb == b"EHLO", args)
        elif verb == b"NOOP":  # a parameter is allowed and ignored (RFC 5321 4.1.1.9)
            self._harmless(replies.SMTP_OK)
        elif verb == b"HELP":
            self._harmless(replies.SMTP_HELP)
        elif verb in _NO_ARGUMENTS and args:
            self._rejected(replies.SMTP_SYNTAX)
        elif verb == b"RSET":
            self._harmless(replies.SMTP_OK)
        elif verb == b"QUIT":
            self._client_move(_CI.QUIT)
            self._close(replies.SMTP_BYE, "client quit")
        elif verb == b"STARTTLS" and self._client is _C.PLAINTEXT:
            self._on_starttls()
        elif verb == b"STARTTLS":
            self._rejected(replies.SMTP_NO_STARTTLS)
        elif verb == b"AUTH":
            self._on_auth(args)
        elif verb in _MAIL_COMMANDS:
            self._rejected(
                replies.SMTP_TLS_REQUIRED
                if self._client is _C.PLAINTEXT
                else replies.SMTP_AUTH_REQUIRED
            )
        else:
            self._rejected(replies.SMTP_UNKNOWN_COMMAND)

    def _harmless(self, reply: bytes) -> None:
        self._client_move(_CI.HARMLESS)
        self._reply(reply)

    def _rejected(self, reply: bytes, what: ClientInput = _CI.REJECTED) -> None:
        """Send a refusal and count it; close when the budget is spent."""
        self._reply(reply)
        self._client_move(what)
        self._bad_commands += 1
        if self._bad_commands >= self._settings.max_bad_commands:
            self._client_move(_CI.BUDGET_EXHAUSTED)
            self._note(Severity.INFO, f"client sent {self._bad_commands} invalid commands")
            self._close(replies.SMTP_TOO_MANY_ERRORS, "too many invalid commands")

    def _on_hello(self, extended: bool, args: list[bytes]) -> None:
        if not args:
            self._rejected(replies.SMTP_SYNTAX)
        elif self._client is _C.PLAINTEXT:
            self._client_move(_CI.HARMLESS)
            self._hello_reply(extended, before_tls=True)
        elif extended and self._extensions is None and self._upstream in _UPSTREAM_LEARNING:
            self._client_move(_CI.HOLD_EHLO)  # answered by _join
        else:
            self._client_move(_CI.HELLO)
            self._hello_reply(extended, before_tls=False)

    def _hello_reply(self, extended: bool, *, before_tls: bool) -> None:
        if not extended:
            self._reply(b"250 " + self._hostname)
            return
        upstream = self._extensions or SmtpExtensions()
        keywords = smtp_proxy_extensions(
            before_tls=before_tls, upstream=upstream, mechanisms=self._mechanisms
        )
        if not before_tls:
            self._advertised |= {line.split(b" ")[0] for line in upstream.passed_on()}
        lines = [self._hostname, *keywords]
        self._to_client(
            b"".join(b"250-" + line + CRLF for line in lines[:-1]) + b"250 " + lines[-1] + CRLF
        )

    def _on_starttls(self) -> None:
        if len(self._client_buf):
            # Plaintext behind STARTTLS would be taken as said inside TLS (CVE-2011-0411).
            raise self._fault(_Fault.CLIENT, "client pipelined data behind STARTTLS")
        self._client_move(_CI.STARTTLS)
        self._out.append(StartTls(Side.CLIENT, preface=replies.SMTP_READY_FOR_TLS + CRLF))

    def _on_auth(self, args: list[bytes]) -> None:
        if self._client is _C.PLAINTEXT:
            self._rejected(replies.SMTP_TLS_REQUIRED)
            return
        if self._client is _C.CONNECTED:
            self._rejected(replies.SMTP_HELLO_FIRST)
            return
        if not args or len(args) > 2:
            self._rejected(replies.SMTP_SYNTAX)
            return
        mechanism = Mechanism.named(args[0], self._mechanisms)
        if mechanism is None:
            self._rejected(replies.SMTP_UNSUPPORTED_MECHANISM)
        elif len(args) == 1 and mechanism is Mechanism.LOGIN:
            self._client_move(_CI.AUTH_LOGIN)
            self._reply(replies.SMTP_ASK_USERNAME)
        elif len(args) == 1:
            self._client_move(_CI.AUTH_SASL)
            self._attempt = _Attempt(mechanism=mechanism)
            self._reply(replies.SMTP_CONTINUE)
        else:
            # RFC 4954 section 4: "=" is an empty initial response.
            initial = b"" if args[1] == b"=" else args[1]
            if mechanism is Mechanism.LOGIN:
                self._login_username(initial, _CI.REJECTED)
            else:
                self._sasl(mechanism, initial, _CI.REJECTED)

    def _on_sasl_response(self, line: bytes) -> None:
        if self._client is _C.ERROR_CHALLENGE:
            # Whatever the line says (RFC 7628 wants ^A, XOAUTH2 clients send an empty
            # line, "*" cancels), the login has failed; the answer is not echoed or logged.
            self._login_failed(replies.SMTP_AUTH_FAILED)
        elif line == b"*":
            self._attempt = None
            self._rejected(replies.SMTP_CANCELLED, _CI.CANCELLED)
        elif self._client is _C.SASL_RESPONSE:
            self._sasl(self._current_attempt().mechanism, line, _CI.CANCELLED)
        elif self._client is _C.SASL_USERNAME:
            self._login_username(line, _CI.CANCELLED)
        else:
            self._login_password(line)

    def _sasl(self, mechanism: Mechanism, encoded: bytes, refusal: ClientInput) -> None:
        """Decode the one response of ``mechanism``; ``refusal`` is the move when it is
        malformed."""
        try:
            message = b64decode_strict(encoded)
        except SaslError:
            self._attempt = None
            self._rejected(replies.SMTP_INVALID_BASE64, refusal)
            return
        try:
            credentials = parse_response(mechanism, message)
        except SaslError as exc:
            if mechanism.bearer:
                # RFC 7628 section 3.2.2: a refusal like any other (and counted as one).
                self._note(Severity.INFO, f"login refused without asking for a token: {exc}")
                self._challenge(_Attempt(mechanism=mechanism))
            elif isinstance(exc, InvalidCredentials):
                self._invalid_credentials(str(exc))
            else:
                self._attempt = None
                self._rejected(replies.SMTP_INVALID_SASL, refusal)
            return
        self._begin_login(credentials, mechanism)

    def _login_username(self, encoded: bytes, refusal: ClientInput) -> None:
        try:
            decoded = b64decode_strict(encoded)
        except SaslError:
            self._rejected(replies.SMTP_INVALID_BASE64, refusal)
            return
        attempt = _Attempt()
        try:
            attempt.login = parse_login_field(decoded, "user name")
            if not attempt.login:
                raise InvalidCredentials("user name is empty")
        except InvalidCredentials as exc:
            attempt.invalid = str(exc)
        self._attempt = attempt
        self._client_move(_CI.USERNAME)
        self._reply(replies.SMTP_ASK_PASSWORD)

    def _login_password(self, encoded: bytes) -> None:
        attempt = self._current_attempt()
        try:
            decoded = b64decode_strict(encoded)
        except SaslError:
            self._attempt = None
            self._rejected(replies.SMTP_INVALID_BASE64, _CI.CANCELLED)
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
        self._login_failed(replies.SMTP_AUTH_FAILED)

    def _begin_login(
        self, credentials: AnyCredentials, mechanism: Mechanism = Mechanism.PLAIN
    ) -> None:
        self._client_move(_CI.CREDENTIALS)
        self._attempt = _Attempt(login=credentials.login, mechanism=mechanism)
        self._out.append(RequestToken(credentials))

    def _challenge(self, attempt: _Attempt) -> None:
        """Refuse a bearer login with an error challenge (RFC 7628 section 3.2.2); the
        client's answer to it gets the failure (see :meth:`_on_sasl_response`)."""
        self._client_move(_CI.CHALLENGED)
        self._attempt = attempt
        self._reply(b"334 " + attempt.mechanism.error_challenge)

    def _login_failed(self, reply: bytes) -> None:
        """Answer a failed login, count it, and close when the budget is spent."""
        self._attempt = None
        self._client_move(_CI.LOGIN_FAILED)
        self._reply(reply)
        self._auth_failures += 1
        if self._auth_failures >= self._settings.max_auth_failures:
            self._client_move(_CI.BUDGET_EXHAUSTED)
            self._note(Severity.INFO, f"{self._auth_failures} failed logins: closing")
            self._close(replies.SMTP_TOO_MANY_FAILURES, "too many failed logins")

    def _current_attempt(self) -> _Attempt:
        if self._attempt is None:
            raise RuntimeError(f"no login attempt in client state {self._client.name}")
        return self._attempt

    def _on_tls(self, side: Side) -> None:
        if side is Side.CLIENT:
            self._client_move(_CI.TLS_ESTABLISHED)
            return
        self._upstream_move(_UI.TLS_ESTABLISHED)
        self._send_ehlo()

    # === upstream side ===================================================================

    def _connect(self) -> None:
        self._upstream_move(_UI.CONNECT)
        self._out.append(ConnectUpstream())

    def _send_ehlo(self) -> None:
        self._to_server(b"EHLO " + self._hostname + CRLF)

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
                reply = self._server.next_reply()
            except FrameError as exc:
                raise self._fault(_Fault.UPSTREAM, f"upstream: {exc}") from None
            if reply is None:
                return
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
        self._note(Severity.WARNING, f"login as {attempt.login!r}: {why}; answered 454")
        self._login_failed(replies.SMTP_UNAVAILABLE)

    def _unsuitable(self, why: str) -> None:
        self._trouble = f"cannot be used: {why}"
        self._upstream_move(_UI.UNSUITABLE)
        self._note(Severity.ERROR, f"upstream cannot be used: {why}")

    def _on_reply(self, reply: _Reply) -> None:
        state = self._upstream
        if reply.code == 421:  # RFC 5321 section 3.8: the server is closing the connection
            self._going_away(reply)
        elif state is _U.GREETING:
            self._on_greeting(reply)
        elif state in (_U.PLAIN_EHLO, _U.EHLO):
            self._on_ehlo(reply)
        elif state is _U.STARTTLS:
            self._on_starttls_reply(reply)
        elif state in _UPSTREAM_IN_FLIGHT:
            self._on_auth_reply(reply)
        else:
            raise self._fault(
                _Fault.UPSTREAM,
                f"upstream sent a reply to no command in state {state.name}: {reply.describe()!r}",
            )

    def _going_away(self, reply: _Reply, *, send_quit: bool = False) -> None:
        state = self._upstream
        why = f"said {reply.describe()}"
        self._trouble = why
        if send_quit:
            self._to_server(b"QUIT" + CRLF)
        self._upstream_move(_UI.GOING_AWAY)
        if state in _UPSTREAM_IN_FLIGHT:
            self._upstream_failed_login(f"the upstream {why}")
        elif self._client not in _CLIENT_LOGGING_IN:
            self._note(Severity.WARNING, f"upstream {why}; the next login will reconnect")

    def _on_greeting(self, reply: _Reply) -> None:
        if reply.code == 220:
            starttls = self._settings.upstream_tls is UpstreamTls.STARTTLS
            self._upstream_move(_UI.ASK_PLAIN_EHLO if starttls else _UI.ASK_EHLO)
            self._send_ehlo()
        elif reply.code == 554:  # RFC 5321 section 3.1: no service here; QUIT, then it closes
            self._going_away(reply, send_quit=True)
        else:
            raise self._fault(
                _Fault.UPSTREAM, f"upstream greeting is not 220: {reply.describe()!r}"
            )

    def _on_ehlo(self, reply: _Reply) -> None:
        if reply.code != 250:
            self._unsuitable(f"it refused EHLO: {reply.describe()}")
            return
        extensions = SmtpExtensions.parse(reply.lines[1:])
        if self._upstream is _U.PLAIN_EHLO:
            if "STARTTLS" not in extensions:
                self._unsuitable(
                    "upstream_tls is starttls but the server does not offer STARTTLS "
                    f"({printable(repr(extensions))}); use implicit TLS (port 465)"
                )
                return
            self._upstream_move(_UI.ASK_STARTTLS)
            self._to_server(b"STARTTLS" + CRLF)
            return
        if "XOAUTH2" not in extensions.mechanisms:
            offered = " ".join(sorted(extensions.mechanisms)) or "none"
            self._unsuitable(
                f"it does not offer AUTH XOAUTH2 (SASL mechanisms offered: {printable(offered)})"
            )
            return
        missing = self._advertised - {line.split(b" ")[0] for line in extensions.passed_on()}
        if missing:
            names = b" ".join(sorted(missing)).decode("ascii")
            self._note(
                Severity.WARNING,
                f"the reconnected upstream no longer offers {names}, which the client "
                "was told about; it may refuse commands that use them",
            )
        self._extensions = extensions
        self._upstream_move(_UI.CAPABLE)

    def _on_starttls_reply(self, reply: _Reply) -> None:
        if reply.code != 220:
            self._unsuitable(f"it refused STARTTLS: {reply.describe()}")
            return
        if len(self._server):
            raise self._fault(_Fault.UPSTREAM, "upstream sent data behind its STARTTLS 220")
        self._upstream_move(_UI.TLS_GRANTED)
        self._out.append(StartTls(Side.SERVER))

    def _send_authenticate(self) -> None:
        self._upstream_move(_UI.AUTHENTICATE)
        self._to_server(b"AUTH XOAUTH2" + CRLF)

    def _on_auth_reply(self, reply: _Reply) -> None:
        attempt = self._current_attempt()
        state = self._upstream
        if reply.code == 334 and state is _U.AUTH_SENT:
            self._upstream_move(_UI.GO_AHEAD)
            self._to_server(attempt.response + CRLF)
            attempt.response = b""
        elif reply.code == 334 and state is _U.TOKEN_SENT:
            self._upstream_move(_UI.CHALLENGED)
            attempt.challenge = describe_error_challenge(reply.lines[0])
            self._to_server(CRLF)
        elif reply.code == 235 and state is not _U.AUTH_SENT:
            self._logged_in(attempt)
        elif reply.code >= 400:
            self._auth_refused(attempt, reply)
        else:
            raise self._fault(
                _Fault.UPSTREAM,
                f"upstream answered {reply.describe()!r} in state {state.name}",
            )

    def _logged_in(self, attempt: _Attempt) -> None:
        self._upstream_move(_UI.ACCEPTED)
        self._client_move(_CI.LOGIN_SUCCEEDED)
        self._reply(replies.SMTP_AUTH_SUCCEEDED)
        self._note(Severity.INFO, f"logged in to the upstream as {attempt.mailbox!r}")
        self._out.append(
            BeginRelay(to_server=self._client_buf.take_all(), to_client=self._server.take_all())
        )
        self._attempt = None

    def _auth_refused(self, attempt: _Attempt, reply: _Reply) -> None:
        state = self._upstream
        self._upstream_move(_UI.REFUSED)
        said = reply.describe()
        challenge = f" (error challenge: {attempt.challenge})" if attempt.challenge else ""
        who = f"login as {attempt.login!r} (mailbox {attempt.mailbox!r})"
        if reply.code < 500:
            self._note(Severity.WARNING, f"{who}: upstream temporarily unavailable: {said}")
            answer = replies.SMTP_UNAVAILABLE
        elif state is _U.AUTH_SENT or reply.syntax_class:
            self._note(
                Severity.ERROR,
                f"{who}: the upstream refused the XOAUTH2 exchange itself: {said}{challenge}. "
                "This is not a password problem; check that the server supports XOAUTH2 "
                "as advertised. Answered 454.",
            )
            answer = replies.SMTP_UNAVAILABLE
        else:
            causes = (
                "Likely causes: the token's audience or roles do not fit this server "
                "(Microsoft 365 needs the SMTP.SendAsApp application permission with admin "
                "consent); SMTP AUTH is disabled for the mailbox or the tenant (Exchange: "
                "Set-CASMailbox -SmtpClientAuthenticationDisabled $false); or the app may "
                "not use this mailbox (Exchange: the service principal is not registered, "
                "or lacks Add-MailboxPermission FullAccess or SendAs)."
                if attempt.provider == "microsoft"
                else rejection_causes(attempt.provider)
            )
            self._note(
                Severity.WARNING,
                f"{who}: the upstream rejected the token: {said}{challenge}. {causes}",
            )
            answer = replies.SMTP_AUTH_FAILED
        self._login_failed(answer)

    # === joining the two sides ===========================================================

    def _join(self) -> None:
        """Move a held EHLO or a login attempt on once both sides allow it (see the
        module docstring)."""
        if self._client is _C.EHLO_HELD:
            if self._extensions is not None or self._upstream not in _UPSTREAM_LEARNING:
                self._client_move(_CI.EHLO_ANSWERED)
                self._hello_reply(True, before_tls=False)
            return
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
