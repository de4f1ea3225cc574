"""Hypothesis fuzzing of ImapAuth, Pop3Auth and SmtpAuth: whatever either peer sends, in
whatever order, the machine raises nothing but ProxyError, keeps its memory bounded, never
talks to an upstream that is not connected, and never lets a secret out (passwords, app
keys, tokens). Each runs with and without the mechanisms for app identities (``app``).

One :class:`Driver` plays the trio driver's part for every protocol; a :class:`Fuzzed`
holds what differs: the pieces each peer says, what well-behaved peers say in each state,
how much the machine may hold, and the valid prefixes (a login, a SASL exchange, STARTTLS
on either side) after which the arbitrary-bytes fuzzers start, so that they reach the
relay hand-over and every state behind a login. How many examples reached each state is
counted (:data:`REACHED`) and printed at the end of the run (tests/protocol/conftest.py).
"""

from __future__ import annotations

import base64
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import hypothesis
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from proxy.protocol.actions import (
    Action,
    BeginRelay,
    Close,
    ConnectUpstream,
    Note,
    RequestToken,
    SendToClient,
    SendToServer,
    StartTls,
)
from proxy.protocol.errors import ClientProtocolError, ProxyError
from proxy.protocol.events import (
    ClientClosed,
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
from proxy.protocol.imap import ImapAuth
from proxy.protocol.login import ClientState, UpstreamState
from proxy.protocol.modes import AuthSettings, ClientTls, UpstreamTls
from proxy.protocol.pop3 import Pop3Auth
from proxy.protocol.sasl import BearerCredentials, Credentials, xoauth2_response
from proxy.protocol.smtp import SmtpAuth
from tests.protocol.playbook import TOKEN

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.protocol.dialects import AnyAuth

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    # No "explain" phase: it imports libcst, whose DeprecationWarning our
    # filterwarnings=error turns into an INTERNALERROR that hides the real failure.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)

PASSWORD = "pw-Zq8!x"
MAILBOX = "alice@contoso.com"
XOAUTH2 = xoauth2_response(MAILBOX, TOKEN.value)
PLAIN = base64.b64encode(f"\0alice\0{PASSWORD}".encode())
USER_B64 = base64.b64encode(b"alice")
PASSWORD_B64 = base64.b64encode(PASSWORD.encode())
APP_KEY = "xo2k_fuzz-Kq7Zr2"
#: What clients of app identities send: XOAUTH2 and OAUTHBEARER with our app key, one
#: without a user (malformed: refused with an error challenge), and EXTERNAL's authzid.
XO = base64.b64encode(f"user={MAILBOX}\x01auth=Bearer {APP_KEY}\x01\x01".encode())
OB = base64.b64encode(f"n,a={MAILBOX},\x01auth=Bearer {APP_KEY}\x01\x01".encode())
XO_NO_USER = base64.b64encode(f"user=\x01auth=Bearer {APP_KEY}\x01\x01".encode())
AUTHZID = base64.b64encode(MAILBOX.encode())
#: The upstream's error challenge, as Dovecot and Google send it.
CHALLENGE = base64.b64encode(b'{"status":"400","schemes":"Bearer"}')

#: Every secret the fuzzers send: none may show anywhere but where it belongs.
SECRETS = [
    PASSWORD,
    TOKEN.value,
    PLAIN.decode(),
    PASSWORD_B64.decode(),
    APP_KEY,
    XO.decode(),
    OB.decode(),
    XO_NO_USER.decode(),
]


def app_pieces(verb: bytes) -> list[bytes]:
    """The logins of app identities (whose answers work with or without ``app``)."""
    return [
        verb + b" EXTERNAL =\r\n",
        verb + b" XOAUTH2 " + XO + b"\r\n",
        verb + b" OAUTHBEARER\r\n",
        OB + b"\r\n",
        b"AQ==\r\n",
        verb + b" xoauth2 " + XO_NO_USER + b"\r\n",
        verb + b" EXTERNAL " + AUTHZID + b"\r\n",
        verb + b" EXTERNAL\r\n",
    ]


APPS = len(app_pieces(b""))


def chunks(pieces: list[bytes]) -> st.SearchStrategy[bytes]:
    """Realistic fragments and noise, glued together."""
    known = st.sampled_from(pieces)
    part = st.one_of(known, known, known, st.binary(max_size=40))
    return st.lists(part, min_size=1, max_size=4).map(b"".join)


def small_settings(
    client_tls: ClientTls, upstream_tls: UpstreamTls, *, app: bool = False
) -> AuthSettings:
    return AuthSettings(
        client_tls,
        upstream_tls,
        sasl_external=app,
        sasl_bearer=app,
        max_line=160,
        max_literal=64,
        max_bad_commands=6,
        max_auth_failures=3,
        max_server_line=7000,
    )


@dataclass(frozen=True)
class Fuzzed:
    """One protocol, as the fuzzers drive it."""

    name: str
    make: Callable[[AuthSettings], AnyAuth]
    client_pieces: list[bytes]
    server_pieces: list[bytes]
    #: What well-behaved peers say in a state (the server also knows our last tag).
    plausible_client: Callable[[ClientState], list[bytes]]
    plausible_server: Callable[[UpstreamState, bytes], list[bytes]]
    #: What the machine may hold beyond the chunk it was just given.
    memory_bound: Callable[[AuthSettings], int]
    #: Bytes that make an implicit-TLS upstream ready for the login, and a password login.
    upstream_ready: bytes
    login: bytes
    #: The upstream's go-ahead for the token, and its success line (after ``upstream_ready``).
    accept: tuple[bytes, bytes]
    #: An app's XOAUTH2 login (with our app key), ready to be sent.
    bearer_login: bytes
    #: A SASL login that waits for its response; the client's STARTTLS; the upstream's
    #: answers up to its TLS handshake (``upstream_tls`` STARTTLS), chunk by chunk.
    sasl_start: bytes
    starttls: bytes
    upstream_starttls: tuple[bytes, ...]
    #: Client bytes that may wait behind a login.
    allowance: Callable[[AuthSettings], int]
    #: Answers carry the client's tags (IMAP), which may be anything the client sent.
    tags: bool = False

    def __str__(self) -> str:
        return self.name


# === IMAP ==================================================================================

IMAP_CLIENT_PIECES = [
    b"a1 LOGIN alice " + PASSWORD.encode() + b"\r\n",
    b'a2 LOGIN "alice" "' + PASSWORD.encode() + b'"\r\n',
    b"a3 LOGIN {5}\r\n",
    b"a4 LOGIN {5+}\r\nalice {8+}\r\n" + PASSWORD.encode() + b"\r\n",
    b"alice {8}\r\n",
    PASSWORD.encode() + b"\r\n",
    b"a5 AUTHENTICATE PLAIN " + PLAIN + b"\r\n",
    b"a6 AUTHENTICATE PLAIN\r\n",
    PLAIN + b"\r\n",
    b"*\r\n",
    b"a7 STARTTLS\r\n",
    b"a8 CAPABILITY\r\n",
    b"a9 NOOP\r\n",
    b"b1 ID NIL\r\n",
    b"b2 SELECT INBOX\r\n",
    b"b3 LOGOUT\r\n",
    b"b4 APPEND INBOX {20+}\r\n",
    b"{3}\r\n",
    b"\r\n",
    b'"',
    b"\\",
    *app_pieces(b"b5 AUTHENTICATE"),
]
IMAP_SERVER_PIECES = [
    b"* OK [CAPABILITY IMAP4rev1 SASL-IR STARTTLS AUTH=XOAUTH2] hi\r\n",
    b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] hi\r\n",
    b"* OK hello\r\n",
    b"* CAPABILITY IMAP4rev1 STARTTLS SASL-IR AUTH=XOAUTH2\r\n",
    b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n",
    *(b"X%d OK done\r\n" % n for n in range(1, 6)),
    *(b"X%d NO [UNAVAILABLE] no\r\n" % n for n in range(1, 4)),
    *(b"X%d BAD what\r\n" % n for n in range(1, 4)),
    b"X2 OK [CAPABILITY IMAP4rev1 IDLE] in\r\n",
    b"+ \r\n",
    b"+ " + CHALLENGE + b"\r\n",
    b"+ " + base64.b64encode(b"[" * 5000) + b"\r\n",
    b"* BYE going away\r\n",
    b"* PREAUTH hi\r\n",
    b"* 1 EXISTS {4}\r\nX1 O\r\n",
    b"* OK [ALERT] hey\r\n",
    b"\r\n",
]


def imap_client(state: ClientState) -> list[bytes]:
    match state:
        case ClientState.PLAINTEXT:
            return [b"c1 STARTTLS\r\n", b"c2 CAPABILITY\r\n", IMAP_CLIENT_PIECES[0]]
        case ClientState.SASL_RESPONSE:
            return [PLAIN + b"\r\n", b"*\r\n", XO + b"\r\n", OB + b"\r\n", b"\r\n"]
        case ClientState.ERROR_CHALLENGE:
            return [b"\r\n", b"AQ==\r\n", b"*\r\n"]
        case ClientState.AWAITING_TOKEN | ClientState.AUTHORIZING:
            return [b"c3 SELECT INBOX\r\n", b"c4 IDLE\r\n"]
        case _:
            return [*IMAP_CLIENT_PIECES[:9], *IMAP_CLIENT_PIECES[-APPS:]]


def imap_server(state: UpstreamState, tag: bytes) -> list[bytes]:
    match state:
        case UpstreamState.GREETING:
            return [*IMAP_SERVER_PIECES[:3], b"* BYE busy\r\n"]
        case UpstreamState.PLAIN_CAPABILITIES | UpstreamState.CAPABILITIES:
            return [
                IMAP_SERVER_PIECES[3] + tag + b" OK done\r\n",
                IMAP_SERVER_PIECES[4] + tag + b" OK done\r\n",
                tag + b" OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] done\r\n",
                tag + b" NO no\r\n",
            ]
        case UpstreamState.STARTTLS:
            return [tag + b" OK go\r\n", tag + b" BAD no\r\n"]
        case UpstreamState.AUTH_SENT:
            return [b"+ \r\n", tag + b" NO no\r\n"]
        case UpstreamState.TOKEN_SENT | UpstreamState.ERROR_CHALLENGE:
            return [
                tag + b" OK [CAPABILITY IMAP4rev1 IDLE] in\r\n* 2 EXISTS\r\n",
                b"* CAPABILITY IMAP4rev1 IDLE\r\n",
                tag + b" NO [AUTHENTICATIONFAILED] no\r\n",
                tag + b" NO [UNAVAILABLE] later\r\n",
                tag + b" BAD what\r\n",
                b"+ " + CHALLENGE + b"\r\n",
            ]
        case _:
            return [b"* OK still here\r\n", b"* BYE idle\r\n"]


IMAP = Fuzzed(
    name="imap",
    make=ImapAuth,
    client_pieces=IMAP_CLIENT_PIECES,
    server_pieces=IMAP_SERVER_PIECES,
    plausible_client=imap_client,
    plausible_server=imap_server,
    memory_bound=lambda s: (
        3 * s.max_line + 2 * s.max_literal + (s.max_line + s.max_literal) + 3 * s.max_server_line
    ),
    upstream_ready=IMAP_SERVER_PIECES[1],
    login=b"a1 LOGIN alice " + PASSWORD.encode() + b"\r\n",
    accept=(b"+ \r\n", b"X1 OK [CAPABILITY IMAP4rev1 IDLE] in\r\n"),
    bearer_login=b"a4 AUTHENTICATE XOAUTH2 " + XO + b"\r\n",
    sasl_start=b"a2 AUTHENTICATE PLAIN\r\n",
    starttls=b"a3 STARTTLS\r\n",
    upstream_starttls=(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n", b"X1 OK go\r\n"),
    allowance=lambda s: s.max_line + s.max_literal,
    tags=True,
)

# === POP3 ==================================================================================

# The LOGIN password travels only right behind its user name, or when the machine asks for
# it (pop3_client, smtp_client): sent where a user name belongs, it would be logged as one,
# as by any server, and this harness could not tell that from a leak.
LOGIN_MECHANISM = b"AUTH LOGIN " + USER_B64 + b"\r\n" + PASSWORD_B64 + b"\r\n"
POP3_PASS = b"PASS " + PASSWORD.encode() + b"\r\n"
POP3_CLIENT_PIECES = [
    b"USER alice\r\n",
    POP3_PASS,
    b"AUTH PLAIN " + PLAIN + b"\r\n",
    b"AUTH PLAIN\r\n",
    PLAIN + b"\r\n",
    b"AUTH LOGIN\r\n",
    b"AUTH LOGIN " + USER_B64 + b"\r\n",
    USER_B64 + b"\r\n",
    LOGIN_MECHANISM,
    b"*\r\n",
    b"CAPA\r\n",
    b"AUTH\r\n",
    b"STLS\r\n",
    b"STAT\r\n",
    b"QUIT\r\n",
    b"AUTH PLAIN =\r\n",
    b"PASS\r\n",
    b"\r\n",
    b"=",
    *app_pieces(b"AUTH"),
]
POP3_SERVER_PIECES = [
    b"+OK Dovecot ready.\r\n",
    b"-ERR [SYS/TEMP] Too many connections\r\n",
    b"+OK\r\nSASL PLAIN XOAUTH2\r\nTOP\r\n.\r\n",
    b"+OK\r\nSASL PLAIN\r\n.\r\n",
    b"+OK\r\n",
    b"TOP\r\n",
    b"..X\r\n",
    b".\r\n",
    b"+ \r\n",
    b"+ " + CHALLENGE + b"\r\n",
    b"+ " + base64.b64encode(b"[" * 5000) + b"\r\n",
    b"+OK Logged in.\r\n",
    b"-ERR [AUTH] Authentication failed.\r\n",
    b"-ERR [IN-USE] Mailbox locked\r\n",
    b"-ERR [SYS/PERM] Disabled\r\n",
    b"-ERR Disconnected for inactivity.\r\n",
    b"\r\n",
]


def pop3_client(state: ClientState) -> list[bytes]:
    match state:
        case ClientState.PLAINTEXT:
            return [b"STLS\r\n", b"CAPA\r\n", b"USER alice\r\n"]
        case ClientState.USER_GIVEN:
            return [POP3_PASS, b"CAPA\r\n", b"USER bob\r\n"]
        case ClientState.SASL_RESPONSE:
            return [PLAIN + b"\r\n", b"*\r\n", XO + b"\r\n", OB + b"\r\n", b"\r\n"]
        case ClientState.ERROR_CHALLENGE:
            return [b"\r\n", b"AQ==\r\n", b"*\r\n"]
        case ClientState.SASL_USERNAME:
            return [USER_B64 + b"\r\n", b"*\r\n"]
        case ClientState.SASL_PASSWORD:
            return [PASSWORD_B64 + b"\r\n", b"*\r\n"]
        case ClientState.AWAITING_TOKEN | ClientState.AUTHORIZING:
            return [b"STAT\r\n", b"RETR 1\r\n"]
        case _:
            return [*POP3_CLIENT_PIECES[:12], *POP3_CLIENT_PIECES[-APPS:]]


def pop3_server(state: UpstreamState, _tag: bytes) -> list[bytes]:
    # Success is listed more often than failure, so that runs get far.
    match state:
        case UpstreamState.GREETING:
            return [POP3_SERVER_PIECES[0]] * 3 + [POP3_SERVER_PIECES[1]]
        case UpstreamState.STARTTLS:
            return [b"+OK Begin TLS negotiation now.\r\n"] * 3 + [b"-ERR Unknown.\r\n"]
        case UpstreamState.CAPABILITIES:
            # A whole answer, its status line alone, or what may follow that line.
            return (
                [POP3_SERVER_PIECES[2]] * 4
                + [*POP3_SERVER_PIECES[3:5], b"-ERR no\r\n"]
                + [
                    b"TOP\r\n",
                    b"SASL XOAUTH2\r\n.\r\n",
                    b".\r\n",
                ]
            )
        case UpstreamState.AUTH_SENT:
            return [b"+ \r\n", b"-ERR Unsupported mechanism\r\n"]
        case UpstreamState.TOKEN_SENT | UpstreamState.ERROR_CHALLENGE:
            return [*POP3_SERVER_PIECES[11:15], POP3_SERVER_PIECES[9], b"+OK in.\r\n+OK 1 2\r\n"]
        case _:
            return [b"-ERR Disconnected for inactivity.\r\n"]


POP3 = Fuzzed(
    name="pop3",
    make=Pop3Auth,
    client_pieces=POP3_CLIENT_PIECES,
    server_pieces=POP3_SERVER_PIECES,
    plausible_client=pop3_client,
    plausible_server=pop3_server,
    # A partial command line or the bytes pipelined behind a login, a partial upstream
    # line and a CAPA list.
    memory_bound=lambda s: s.max_line + 2 * s.max_server_line,
    upstream_ready=POP3_SERVER_PIECES[0] + POP3_SERVER_PIECES[2],
    login=b"USER alice\r\n" + POP3_PASS,
    accept=(b"+ \r\n", b"+OK Logged in.\r\n"),
    bearer_login=b"AUTH XOAUTH2 " + XO + b"\r\n",
    sasl_start=b"AUTH LOGIN\r\n",
    starttls=b"STLS\r\n",
    upstream_starttls=(b"+OK hi\r\n", b"+OK go\r\n"),
    allowance=lambda s: s.max_line,
)

# === SMTP ==================================================================================

SMTP_CLIENT_PIECES = [
    b"EHLO client.test\r\n",
    b"HELO client.test\r\n",
    b"AUTH PLAIN " + PLAIN + b"\r\n",
    b"AUTH PLAIN\r\n",
    PLAIN + b"\r\n",
    b"AUTH LOGIN\r\n",
    b"AUTH LOGIN " + USER_B64 + b"\r\n",
    USER_B64 + b"\r\n",
    LOGIN_MECHANISM,
    b"*\r\n",
    b"STARTTLS\r\n",
    b"NOOP\r\n",
    b"MAIL FROM:<alice@contoso.com>\r\n",
    b"RCPT TO:<bob@example.com>\r\n",
    b"DATA\r\n",
    b"QUIT\r\n",
    b"AUTH PLAIN =\r\n",
    b"AUTH\r\n",
    b"\r\n",
    b"=",
    *app_pieces(b"AUTH"),
]
SMTP_EHLO_STARTTLS = b"250-localhost\r\n250-AUTH XOAUTH2\r\n250-STARTTLS\r\n250 PIPELINING\r\n"
SMTP_EHLO_XOAUTH2 = (
    b"250-localhost\r\n250-AUTH XOAUTH2 OAUTHBEARER\r\n250-SIZE 1000\r\n250 8BITMIME\r\n"
)
SMTP_SERVER_PIECES = [
    b"220 localhost Dovecot (Debian) ready.\r\n",
    b"220-multi\r\n220 line\r\n",
    b"421 4.7.0 Too many connections\r\n",
    b"554 5.3.2 No service here\r\n",
    SMTP_EHLO_STARTTLS,
    SMTP_EHLO_XOAUTH2,
    b"250-localhost\r\n250 AUTH PLAIN\r\n",
    b"250 localhost\r\n",
    b"220 2.0.0 Begin TLS negotiation now.\r\n",
    b"334 \r\n",
    b"334 " + CHALLENGE + b"\r\n",
    b"334 " + base64.b64encode(b"[" * 5000) + b"\r\n",
    b"235 2.7.0 Logged in.\r\n",
    b"535 5.7.8 Authentication failed.\r\n",
    b"454 4.7.0 Temporary authentication failure\r\n",
    b"500 5.5.2 Line too long\r\n",
    b"250-partial\r\n",
    b"\r\n",
]


def smtp_client(state: ClientState) -> list[bytes]:
    match state:
        case ClientState.PLAINTEXT:
            return [b"EHLO client.test\r\n", b"STARTTLS\r\n", b"NOOP\r\n"]
        case ClientState.CONNECTED:
            return [b"EHLO client.test\r\n", b"HELO client.test\r\n", b"NOOP\r\n"]
        case ClientState.NOT_AUTHENTICATED:
            app = SMTP_CLIENT_PIECES[-APPS:]
            return [
                *SMTP_CLIENT_PIECES[2:4],
                SMTP_CLIENT_PIECES[5],
                LOGIN_MECHANISM,
                *app[:3],
                app[5],
            ]
        case ClientState.SASL_RESPONSE:
            return [PLAIN + b"\r\n", b"*\r\n", XO + b"\r\n", OB + b"\r\n", b"\r\n"]
        case ClientState.ERROR_CHALLENGE:
            return [b"\r\n", b"AQ==\r\n", b"*\r\n"]
        case ClientState.SASL_USERNAME:
            return [USER_B64 + b"\r\n", b"*\r\n"]
        case ClientState.SASL_PASSWORD:
            return [PASSWORD_B64 + b"\r\n", b"*\r\n"]
        case ClientState.HELD | ClientState.AWAITING_TOKEN | ClientState.AUTHORIZING:
            return [b"NOOP\r\n", b"MAIL FROM:<alice@contoso.com>\r\n"]
        case _:
            return [*SMTP_CLIENT_PIECES[:12], *SMTP_CLIENT_PIECES[-APPS:]]


def smtp_server(state: UpstreamState, _tag: bytes) -> list[bytes]:
    # Success is listed more often than failure, so that runs get far.
    match state:
        case UpstreamState.GREETING:
            return [SMTP_SERVER_PIECES[0]] * 3 + SMTP_SERVER_PIECES[1:4]
        case UpstreamState.PLAIN_CAPABILITIES:
            return [SMTP_EHLO_STARTTLS] * 3 + [SMTP_EHLO_XOAUTH2, b"502 5.5.1 no\r\n"]
        case UpstreamState.STARTTLS:
            return [SMTP_SERVER_PIECES[8]] * 3 + [b"454 4.7.0 not now\r\n"]
        case UpstreamState.CAPABILITIES:
            return [SMTP_EHLO_XOAUTH2] * 3 + [SMTP_SERVER_PIECES[6], b"421 4.4.2 bye\r\n"]
        case UpstreamState.AUTH_SENT:
            return [b"334 \r\n"] * 3 + [b"504 5.5.4 Unrecognized\r\n"]
        case UpstreamState.TOKEN_SENT | UpstreamState.ERROR_CHALLENGE:
            return [
                b"235 2.7.0 Logged in.\r\n",
                b"235 2.7.0 Logged in.\r\n250 early\r\n",
                *SMTP_SERVER_PIECES[13:16],
                SMTP_SERVER_PIECES[10],
            ]
        case _:
            return [b"421 4.4.2 Disconnected for inactivity\r\n"]


SMTP = Fuzzed(
    name="smtp",
    make=lambda settings: SmtpAuth(settings, hostname="proxy.test"),
    client_pieces=SMTP_CLIENT_PIECES,
    server_pieces=SMTP_SERVER_PIECES,
    plausible_client=smtp_client,
    plausible_server=smtp_server,
    # The client bytes held behind a held EHLO or a login, a partial reply and a partial
    # line from the upstream.
    memory_bound=lambda s: s.max_line + s.max_literal + 2 * s.max_server_line,
    upstream_ready=SMTP_SERVER_PIECES[0] + SMTP_EHLO_XOAUTH2,
    login=b"HELO client.test\r\nAUTH PLAIN " + PLAIN + b"\r\n",
    accept=(b"334 \r\n", b"235 2.7.0 Logged in.\r\n"),
    bearer_login=b"HELO client.test\r\nAUTH XOAUTH2 " + XO + b"\r\n",
    sasl_start=b"HELO client.test\r\nAUTH PLAIN\r\n",
    starttls=b"STARTTLS\r\n",
    upstream_starttls=(b"220 hi\r\n", SMTP_EHLO_STARTTLS, b"220 go\r\n"),
    allowance=lambda s: s.max_line + s.max_literal,
)

PROTOCOLS = (IMAP, POP3, SMTP)
each_protocol = pytest.mark.parametrize("p", PROTOCOLS, ids=str)


# === The driver ============================================================================


#: How many examples reached each state, per protocol and side (and the relay), this run.
REACHED: Counter[tuple[str, str, str]] = Counter()


def check_no_secrets_text(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


def check_no_secrets(action: Action, *, tags: bool) -> None:
    if isinstance(action, RequestToken):
        assert PASSWORD not in repr(action.credentials)
        assert APP_KEY not in repr(action.credentials)
        return
    if isinstance(action, BeginRelay):
        # to_server is what the client pipelined, relayed unchanged: even a second LOGIN.
        assert TOKEN.value.encode() not in action.to_server + action.to_client
        return
    if isinstance(action, SendToServer) and XOAUTH2 in action.data:
        assert action.data.endswith(XOAUTH2 + b"\r\n")
        assert tags or action.data == XOAUTH2 + b"\r\n"
        return
    if not (tags and isinstance(action, SendToClient)):
        check_no_secrets_text(repr(action))
    if isinstance(action, Note):
        check_no_secrets_text(action.text)
    if isinstance(action, SendToClient | SendToServer):
        for line in action.data.split(b"\r\n"):
            if tags and isinstance(action, SendToClient):
                # A client that sends a secret where a command belongs gets it back as the
                # tag of a BAD (RFC 3501 requires the tag); it may appear nowhere else.
                line = line.partition(b" ")[2]
            for secret in SECRETS:
                assert secret.encode() not in line


@dataclass
class Driver:
    """Plays the trio driver's part: answers actions only with events it could send."""

    p: Fuzzed
    machine: AnyAuth
    settings: AuthSettings
    #: False: both peers only say what fits the machine's state (in any order), and the
    #: client never hangs up; so runs get to the relay often.
    noisy: bool = True
    connecting: bool = False
    connected: bool = False
    token_wanted: bool = False
    tls: set[Side] = field(default_factory=set)
    done: bool = False
    relays: int = 0
    sent_upstream: list[bytes] = field(default_factory=list)
    #: Every credential the client sends comes from the pieces: its secret must be listed.
    strict: bool = False
    reached: set[tuple[str, str]] = field(default_factory=set)

    @classmethod
    def start(
        cls,
        p: Fuzzed,
        client_tls: ClientTls = ClientTls.IMPLICIT,
        upstream_tls: UpstreamTls = UpstreamTls.IMPLICIT,
        *,
        app: bool = False,
        noisy: bool = True,
    ) -> Driver:
        config = small_settings(client_tls, upstream_tls, app=app)
        driver = cls(p, p.make(config), config, noisy, strict=not noisy)
        driver.apply(driver.machine.start())
        driver.note_states()
        return driver

    def note_states(self) -> None:
        self.reached |= {
            ("client", self.machine.client_state.name),
            ("upstream", self.machine.upstream_state.name),
        }

    def report(self) -> None:
        """Count the states this example reached (printed at the end of the run)."""
        if self.relays:
            self.reached.add(("client", "relay"))
        for side, state in sorted(self.reached):
            REACHED[self.p.name, side, state] += 1
            hypothesis.event(f"{side} {state}")

    def apply(self, actions: list[Action]) -> None:
        for action in actions:
            assert not self.done, "actions after BeginRelay or Close"
            match action:
                case SendToServer(data=data):
                    assert self.connected, "sent to an upstream that is not connected"
                    assert Side.SERVER not in self.tls, "sent to the upstream during TLS"
                    self.sent_upstream.append(data)
                case ConnectUpstream():
                    assert not self.connected, "reconnect while connected"
                    assert not self.connecting, "reconnect while connecting"
                    self.connecting = True
                case RequestToken(credentials=credentials):
                    assert not self.token_wanted
                    self.token_wanted = True
                    if self.strict and isinstance(credentials, Credentials):
                        assert credentials.password in SECRETS, "a password not in SECRETS"
                    if self.strict and isinstance(credentials, BearerCredentials):
                        assert credentials.key in SECRETS, "an app key not in SECRETS"
                case StartTls(side=side):
                    self.tls.add(side)
                case BeginRelay():
                    self.relays += 1
                    self.done = True
                case Close():
                    self.done = True
                case SendToClient() | Note():
                    pass
            check_no_secrets(action, tags=self.p.tags)

    def choices(self, data: st.DataObject) -> Event:
        """One event the driver could deliver now, weighted towards progress."""
        tags = [line.split(b" ")[0] for line in self.sent_upstream if line[:1] == b"X"]
        client = st.sampled_from(self.p.plausible_client(self.machine.client_state))
        server = st.sampled_from(
            self.p.plausible_server(self.machine.upstream_state, tags[-1] if tags else b"X1")
        )
        state = self.machine.client_state
        if self.noisy:
            client = st.one_of(client, client, chunks(self.p.client_pieces))
            server = st.one_of(server, server, server, chunks(self.p.server_pieces))
            weight = 4
        elif state is ClientState.TLS_NEGOTIATION:
            weight = 0  # a well-behaved client waits for the handshake,
        elif state in (ClientState.HELD, ClientState.AWAITING_TOKEN, ClientState.AUTHORIZING):
            weight = 1  # and pipelines a little (not a whole budget) while it waits
        else:
            weight = 4
        # A ready upstream says nothing until asked; anything it says then ends it.
        idle = not self.noisy and self.machine.upstream_state is UpstreamState.READY
        options: list[tuple[int, st.SearchStrategy[Event]]] = [
            (weight, client.map(ClientDataReceived)),
            (1 if self.noisy else 0, st.just(ClientClosed())),
        ]
        if self.connecting:
            options += [(6, st.just(ServerConnected())), (1, st.just(ServerUnavailable("no")))]
        if self.connected and Side.SERVER not in self.tls:
            options += [(1 if idle else 8, server.map(ServerDataReceived))]
            options += [(1, st.just(ServerClosed()))]
        if self.token_wanted:
            options += [
                (6, st.just(TokenIssued(MAILBOX, TOKEN))),
                (1, st.sampled_from(Refusal).map(TokenRefused)),
            ]
        for side in self.tls:
            options.append((6, st.just(TlsEstablished(side))))
        if Side.SERVER in self.tls:
            options.append((1, st.just(ServerUnavailable("handshake failed"))))
        weighted = [strategy for weight, strategy in options for _ in range(weight)]
        return data.draw(st.sampled_from(weighted).flatmap(lambda strategy: strategy))

    def feed(self, event: Event) -> None:
        match event:
            case ServerConnected():
                self.connecting, self.connected = False, True
            case ServerUnavailable():
                self.connecting = self.connected = False
                self.tls.discard(Side.SERVER)
            case ServerClosed():
                self.connected = False
            case TokenIssued() | TokenRefused():
                self.token_wanted = False
            case TlsEstablished(side=side):
                self.tls.discard(side)
            case _:
                pass
        try:
            self.apply(self.machine.handle(event))
        except ProxyError as exc:
            check_no_secrets_text(str(exc))
            self.done = True
            return
        size = len(getattr(event, "data", b""))
        assert self.machine.buffered <= self.p.memory_bound(self.settings) + size
        check_no_secrets_text(repr(self.machine))
        self.note_states()

    def run(self, data: st.DataObject, steps: int = 60) -> None:
        for _ in range(steps):
            if self.done:
                break
            self.feed(self.choices(data))
        assert self.relays <= 1
        self.report()


# === The properties ========================================================================


@each_protocol
@FUZZ
@given(
    client_tls=st.sampled_from(ClientTls),
    upstream_tls=st.sampled_from(UpstreamTls),
    app=st.booleans(),
    data=st.data(),
)
def test_arbitrary_event_sequences(
    p: Fuzzed, client_tls: ClientTls, upstream_tls: UpstreamTls, app: bool, data: st.DataObject
) -> None:
    Driver.start(p, client_tls, upstream_tls, app=app).run(data)


@each_protocol
@FUZZ
@given(
    client_tls=st.sampled_from(ClientTls),
    upstream_tls=st.sampled_from(UpstreamTls),
    app=st.booleans(),
    data=st.data(),
)
def test_well_behaved_peers_in_any_order(
    p: Fuzzed, client_tls: ClientTls, upstream_tls: UpstreamTls, app: bool, data: st.DataObject
) -> None:
    Driver.start(p, client_tls, upstream_tls, app=app, noisy=False).run(data)


@each_protocol
@FUZZ
@given(
    client_tls=st.sampled_from(ClientTls),
    upstream_ready=st.booleans(),
    app=st.booleans(),
    pieces=st.lists(st.binary(), max_size=30),
)
def test_arbitrary_client_bytes(
    p: Fuzzed, client_tls: ClientTls, upstream_ready: bool, app: bool, pieces: list[bytes]
) -> None:
    driver = Driver.start(p, client_tls, app=app)
    if upstream_ready:  # else logins wait for it (and SMTP holds an EHLO)
        driver.feed(ServerConnected())
        driver.feed(ServerDataReceived(p.upstream_ready))
    for piece in pieces:
        if driver.done:
            break
        driver.feed(ClientDataReceived(piece))
    driver.report()


@each_protocol
@FUZZ
@given(upstream_tls=st.sampled_from(UpstreamTls), pieces=st.lists(st.binary(), max_size=30))
def test_arbitrary_upstream_bytes(
    p: Fuzzed, upstream_tls: UpstreamTls, pieces: list[bytes]
) -> None:
    driver = Driver.start(p, upstream_tls=upstream_tls)
    driver.feed(ServerConnected())
    driver.feed(ClientDataReceived(p.login))
    driver.feed(TokenIssued(MAILBOX, TOKEN))
    for piece in pieces:
        if driver.done or not driver.connected or driver.tls:
            break
        driver.feed(ServerDataReceived(piece))
    driver.report()


# === Arbitrary bytes behind valid prefixes =================================================


def after_login(p: Fuzzed, driver: Driver) -> UpstreamState:
    """The upstream ready, the client's password login asking for its token."""
    driver.feed(ServerConnected())
    driver.feed(ServerDataReceived(p.upstream_ready))
    driver.feed(ClientDataReceived(p.login))
    assert driver.machine.client_state is ClientState.AWAITING_TOKEN
    return UpstreamState.READY


def token_sent(p: Fuzzed, driver: Driver) -> UpstreamState:
    """After the login, the token issued and sent upstream, its verdict due."""
    after_login(p, driver)
    driver.feed(TokenIssued(MAILBOX, TOKEN))
    driver.feed(ServerDataReceived(p.accept[0]))
    assert driver.machine.client_state is ClientState.AUTHORIZING
    return UpstreamState.TOKEN_SENT


def upstream_challenged(p: Fuzzed, driver: Driver) -> UpstreamState:
    """After the token went, the upstream's error challenge answered: its verdict due."""
    token_sent(p, driver)
    driver.feed(ServerDataReceived(p.accept[0].rstrip(b"\r\n") + CHALLENGE + b"\r\n"))
    return UpstreamState.ERROR_CHALLENGE


def client_challenged(p: Fuzzed, driver: Driver) -> UpstreamState:
    """An app key refused: the client has our error challenge to answer."""
    driver.feed(ClientDataReceived(p.bearer_login))
    driver.feed(TokenRefused(Refusal.CREDENTIALS))
    assert driver.machine.client_state is ClientState.ERROR_CHALLENGE
    return UpstreamState.CONNECTING


def mid_sasl(p: Fuzzed, driver: Driver) -> UpstreamState:
    """A SASL login that waits for the client's response."""
    driver.feed(ClientDataReceived(p.sasl_start))
    assert driver.machine.client_state in (ClientState.SASL_RESPONSE, ClientState.SASL_USERNAME)
    return UpstreamState.CONNECTING


def after_client_starttls(p: Fuzzed, driver: Driver) -> UpstreamState:
    """STARTTLS from the client, and its handshake done."""
    driver.feed(ClientDataReceived(p.starttls))
    driver.feed(TlsEstablished(Side.CLIENT))
    assert driver.machine.client_state in (ClientState.NOT_AUTHENTICATED, ClientState.CONNECTED)
    return UpstreamState.CONNECTING


def after_upstream_starttls(p: Fuzzed, driver: Driver) -> UpstreamState:
    """STARTTLS towards the upstream, its handshake done: it is asked what it offers."""
    driver.feed(ServerConnected())
    for chunk in p.upstream_starttls:
        driver.feed(ServerDataReceived(chunk))
    driver.feed(TlsEstablished(Side.SERVER))
    return UpstreamState.CAPABILITIES


class Prefix(NamedTuple):
    """Where an arbitrary-bytes fuzzer starts, which side it feeds, and the listener."""

    reach: Callable[[Fuzzed, Driver], UpstreamState]
    side: Side
    client_tls: ClientTls = ClientTls.IMPLICIT
    upstream_tls: UpstreamTls = UpstreamTls.IMPLICIT
    #: The prefix needs the mechanisms for app identities.
    app: bool = False


PREFIXES = {
    "after-login": Prefix(after_login, Side.CLIENT),
    "mid-sasl": Prefix(mid_sasl, Side.CLIENT),
    "error-challenge": Prefix(client_challenged, Side.CLIENT, app=True),
    "after-starttls": Prefix(after_client_starttls, Side.CLIENT, ClientTls.STARTTLS),
    "token-sent": Prefix(token_sent, Side.SERVER),
    "upstream-challenged": Prefix(upstream_challenged, Side.SERVER),
    "upstream-starttls": Prefix(
        after_upstream_starttls, Side.SERVER, upstream_tls=UpstreamTls.STARTTLS
    ),
}


@pytest.mark.parametrize("prefix", PREFIXES)
@each_protocol
@FUZZ
@given(pieces=st.lists(st.binary(), max_size=30), app=st.booleans())
def test_arbitrary_bytes_after_a_valid_prefix(
    p: Fuzzed, prefix: str, pieces: list[bytes], app: bool
) -> None:
    start = PREFIXES[prefix]
    driver = Driver.start(
        p, start.client_tls, start.upstream_tls, app=app or start.app, noisy=False
    )
    expected = start.reach(p, driver)
    assert driver.machine.upstream_state is expected
    driver.strict = False  # from here on, the bytes are anything
    for piece in pieces:
        if driver.done or (start.side is Side.SERVER and not driver.connected):
            break
        client = start.side is Side.CLIENT
        driver.feed(ClientDataReceived(piece) if client else ServerDataReceived(piece))
    driver.report()


@each_protocol
@FUZZ
@given(
    pipelined=st.lists(st.binary(min_size=1, max_size=120), max_size=6),
    cut=st.integers(min_value=0, max_value=6),
    tail=st.binary(max_size=200),
)
def test_relay_hand_over_keeps_every_byte_behind_the_login(
    p: Fuzzed, pipelined: list[bytes], cut: int, tail: bytes
) -> None:
    """Whatever the client pipelines behind its login (while the token is fetched, and
    while the upstream decides) reaches the relay unread and whole, and so does whatever
    the upstream sends behind its success, or the client gets the pipelining hint."""
    driver = Driver.start(p, noisy=False)
    after_login(p, driver)
    allowance, held = p.allowance(driver.settings), 0
    steps: list[ClientDataReceived | TokenIssued] = [ClientDataReceived(b) for b in pipelined]
    steps.insert(min(cut, len(steps)), TokenIssued(MAILBOX, TOKEN))
    if not any(isinstance(step, TokenIssued) for step in steps):
        steps.append(TokenIssued(MAILBOX, TOKEN))
    for step in steps:
        if isinstance(step, TokenIssued):
            driver.feed(step)
            driver.feed(ServerDataReceived(p.accept[0]))
            continue
        held += len(step.data)
        if held > allowance:
            with pytest.raises(ClientProtocolError) as caught:
                driver.machine.handle(step)
            assert caught.value.reply_hint.endswith(b"\r\n")
            assert b"pipelined" in caught.value.reply_hint.lower()
            driver.report()
            return
        driver.feed(step)
    actions = driver.machine.handle(ServerDataReceived(p.accept[1] + tail))
    driver.apply(actions)
    driver.note_states()
    assert actions[-1] == BeginRelay(to_server=b"".join(pipelined), to_client=tail)
    driver.report()


#: Where the chunking test stops feeding: the client's bytes are no longer parsed.
_STOPPED = frozenset({ClientState.AWAITING_TOKEN, ClientState.CLOSED, ClientState.ERROR})


@each_protocol
@FUZZ
@given(
    data=st.data(),
    cut=st.integers(min_value=1, max_value=64),
    upstream_ready=st.booleans(),
    app=st.booleans(),
)
def test_chunking_never_changes_what_the_client_sees(
    p: Fuzzed, data: st.DataObject, cut: int, upstream_ready: bool, app: bool
) -> None:
    """Client bytes cut anywhere give the same answers as the same bytes whole."""
    script = data.draw(st.lists(st.sampled_from(p.client_pieces), min_size=1, max_size=12))
    stream = b"".join(script)
    config = AuthSettings(
        ClientTls.IMPLICIT, UpstreamTls.IMPLICIT, sasl_external=app, sasl_bearer=app
    )

    def replies(pieces: list[bytes]) -> tuple[bytes, list[Action], str]:
        machine = p.make(config)
        machine.start()
        if upstream_ready:
            machine.handle(ServerConnected())
            machine.handle(ServerDataReceived(p.upstream_ready))
        sent = b""
        others: list[Action] = []
        try:
            for piece in pieces:
                for action in machine.handle(ClientDataReceived(piece)):
                    if isinstance(action, SendToClient):
                        sent += action.data
                    else:
                        others.append(action)
                if machine.client_state in _STOPPED:
                    break
        except ProxyError as exc:
            return sent, others, type(exc).__name__
        return sent, others, ""

    whole = replies([stream])
    cut_up = replies([stream[i : i + cut] for i in range(0, len(stream), cut)])
    if whole[2]:
        # A chunk is refused as a whole, so its earlier answers are never sent.
        assert cut_up[2] == whole[2]
        assert cut_up[0].startswith(whole[0])
    else:
        assert cut_up == whole
