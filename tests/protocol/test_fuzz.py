"""Hypothesis fuzzing of ImapAuth, Pop3Auth and SmtpAuth: whatever either peer sends, in
whatever order, the machine raises nothing but ProxyError, keeps its memory bounded, never
talks to an upstream that is not connected, and never lets a secret out (passwords, app
keys, tokens). Each runs with and without the mechanisms for app identities (``app``)."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

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
from proxy.protocol.errors import ProxyError
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
from proxy.protocol.sasl import xoauth2_response
from proxy.protocol.smtp import SmtpAuth
from tests.protocol.playbook import TOKEN

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
APP_KEY = "xo2k_fuzz-Kq7Zr2"
#: What clients of app identities send: XOAUTH2 and OAUTHBEARER with our app key, one
#: without a user (malformed: refused with an error challenge), and EXTERNAL's authzid.
XO = base64.b64encode(f"user={MAILBOX}\x01auth=Bearer {APP_KEY}\x01\x01".encode())
OB = base64.b64encode(f"n,a={MAILBOX},\x01auth=Bearer {APP_KEY}\x01\x01".encode())
XO_NO_USER = base64.b64encode(f"user=\x01auth=Bearer {APP_KEY}\x01\x01".encode())
AUTHZID = base64.b64encode(MAILBOX.encode())

CLIENT_PIECES = [
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
    b"b5 AUTHENTICATE EXTERNAL =\r\n",
    b"b6 AUTHENTICATE XOAUTH2 " + XO + b"\r\n",
    b"b7 AUTHENTICATE OAUTHBEARER\r\n",
    OB + b"\r\n",
    b"AQ==\r\n",
    b"b8 AUTHENTICATE xoauth2 " + XO_NO_USER + b"\r\n",
    b"b9 AUTHENTICATE EXTERNAL\r\n",
]
#: The login commands of app identities (whose answers work with or without ``app``).
APP_PIECES = CLIENT_PIECES[-7:]
CHALLENGE = b"+ " + base64.b64encode(b'{"status":"400","schemes":"Bearer"}') + b"\r\n"
SERVER_PIECES = [
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
    CHALLENGE,
    b"+ " + base64.b64encode(b"[" * 5000) + b"\r\n",
    b"* BYE going away\r\n",
    b"* PREAUTH hi\r\n",
    b"* 1 EXISTS {4}\r\nX1 O\r\n",
    b"* OK [ALERT] hey\r\n",
    b"\r\n",
]


#: Where the chunking tests stop feeding: the client's bytes are no longer parsed.
_STOPPED = frozenset({ClientState.AWAITING_TOKEN, ClientState.CLOSED, ClientState.ERROR})


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


def memory_bound(s: AuthSettings) -> int:
    """What the machine may hold beyond the chunk it was just given."""
    client = 3 * s.max_line + 2 * s.max_literal + (s.max_line + s.max_literal)
    return client + 3 * s.max_server_line


@dataclass
class Driver:
    """Plays the trio driver's part: answers actions only with events it could send."""

    machine: ImapAuth
    settings: AuthSettings
    connecting: bool = False
    connected: bool = False
    token_wanted: bool = False
    tls: set[Side] = field(default_factory=set)
    done: bool = False
    relays: int = 0
    sent_upstream: list[bytes] = field(default_factory=list)

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
                    assert PASSWORD not in repr(credentials)
                    assert APP_KEY not in repr(credentials)
                    self.token_wanted = True
                case StartTls(side=side):
                    self.tls.add(side)
                case BeginRelay():
                    self.relays += 1
                    self.done = True
                case Close():
                    self.done = True
                case SendToClient() | Note():
                    pass
            check_no_secrets(action)

    def choices(self, data: st.DataObject) -> Event:
        """One event the driver could deliver now, weighted towards progress."""
        plausible_client, plausible_server = self.plausible_client(), self.plausible_server()
        client = st.one_of(plausible_client, plausible_client, chunks(CLIENT_PIECES))
        server = st.one_of(
            plausible_server, plausible_server, plausible_server, chunks(SERVER_PIECES)
        )
        options: list[tuple[int, st.SearchStrategy[Event]]] = [
            (4, client.map(ClientDataReceived)),
            (1, st.just(ClientClosed())),
        ]
        if self.connecting:
            options += [(6, st.just(ServerConnected())), (1, st.just(ServerUnavailable("no")))]
        if self.connected and Side.SERVER not in self.tls:
            options += [
                (8, server.map(ServerDataReceived)),
                (1, st.just(ServerClosed())),
            ]
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

    def plausible_client(self) -> st.SearchStrategy[bytes]:
        """What a well-behaved client might send in the machine's current state."""
        match self.machine.client_state:
            case ClientState.PLAINTEXT:
                pieces = [b"c1 STARTTLS\r\n", b"c2 CAPABILITY\r\n", CLIENT_PIECES[0]]
            case ClientState.SASL_RESPONSE:
                pieces = [PLAIN + b"\r\n", b"*\r\n", XO + b"\r\n", OB + b"\r\n", b"\r\n"]
            case ClientState.ERROR_CHALLENGE:
                pieces = [b"\r\n", b"AQ==\r\n", b"*\r\n"]
            case ClientState.AWAITING_TOKEN | ClientState.AUTHORIZING:
                pieces = [b"c3 SELECT INBOX\r\n", b"c4 IDLE\r\n"]
            case _:
                pieces = [*CLIENT_PIECES[:9], *APP_PIECES]
        return st.sampled_from(pieces)

    def plausible_server(self) -> st.SearchStrategy[bytes]:
        """What a real server might answer in the machine's current state."""
        tags = [line.split(b" ")[0] for line in self.sent_upstream if line[:1] == b"X"]
        tag = tags[-1] if tags else b"X1"
        match self.machine.upstream_state:
            case UpstreamState.GREETING:
                pieces = [SERVER_PIECES[0], SERVER_PIECES[1], SERVER_PIECES[2], b"* BYE busy\r\n"]
            case UpstreamState.PLAIN_CAPABILITIES | UpstreamState.CAPABILITIES:
                pieces = [
                    SERVER_PIECES[3] + tag + b" OK done\r\n",
                    SERVER_PIECES[4] + tag + b" OK done\r\n",
                    tag + b" OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] done\r\n",
                    tag + b" NO no\r\n",
                ]
            case UpstreamState.STARTTLS:
                pieces = [tag + b" OK go\r\n", tag + b" BAD no\r\n"]
            case UpstreamState.AUTH_SENT:
                pieces = [b"+ \r\n", tag + b" NO no\r\n"]
            case UpstreamState.TOKEN_SENT | UpstreamState.ERROR_CHALLENGE:
                pieces = [
                    tag + b" OK [CAPABILITY IMAP4rev1 IDLE] in\r\n* 2 EXISTS\r\n",
                    b"* CAPABILITY IMAP4rev1 IDLE\r\n",
                    tag + b" NO [AUTHENTICATIONFAILED] no\r\n",
                    tag + b" NO [UNAVAILABLE] later\r\n",
                    tag + b" BAD what\r\n",
                    CHALLENGE,
                ]
            case _:
                pieces = [b"* OK still here\r\n", b"* BYE idle\r\n"]
        return st.sampled_from(pieces)

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
        before = self.machine.buffered
        try:
            self.apply(self.machine.handle(event))
        except ProxyError as exc:
            check_no_secrets_text(str(exc))
            self.done = True
            return
        size = len(getattr(event, "data", b""))
        assert self.machine.buffered <= memory_bound(self.settings) + size, (
            before,
            self.machine.buffered,
        )
        check_no_secrets_text(repr(self.machine))


SECRETS = [
    PASSWORD,
    TOKEN.value,
    PLAIN.decode(),
    base64.b64encode(PASSWORD.encode()).decode(),
    APP_KEY,
    XO.decode(),
    OB.decode(),
    XO_NO_USER.decode(),
]


def check_no_secrets_text(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


def check_no_secrets(action: Action) -> None:
    if isinstance(action, RequestToken):
        return
    if isinstance(action, BeginRelay):
        # to_server is what the client pipelined, relayed unchanged: even a second LOGIN.
        assert TOKEN.value.encode() not in action.to_server + action.to_client
        return
    if isinstance(action, SendToServer) and XOAUTH2 in action.data:
        assert action.data.endswith(XOAUTH2 + b"\r\n")
        return
    if not isinstance(action, SendToClient):
        check_no_secrets_text(repr(action))
    if isinstance(action, Note):
        check_no_secrets_text(action.text)
    if isinstance(action, SendToClient):
        # A client that sends a secret where a command belongs gets it back as the tag of
        # a BAD (RFC 3501 requires the tag); it may appear nowhere else.
        for line in action.data.split(b"\r\n"):
            _tag, _, rest = line.partition(b" ")
            for secret in SECRETS:
                assert secret.encode() not in rest


@FUZZ
@given(
    client_tls=st.sampled_from(ClientTls),
    upstream_tls=st.sampled_from(UpstreamTls),
    app=st.booleans(),
    data=st.data(),
)
def test_arbitrary_event_sequences(
    client_tls: ClientTls, upstream_tls: UpstreamTls, app: bool, data: st.DataObject
) -> None:
    config = small_settings(client_tls, upstream_tls, app=app)
    driver = Driver(ImapAuth(config), config)
    driver.apply(driver.machine.start())
    for _ in range(60):
        if driver.done:
            break
        driver.feed(driver.choices(data))
    assert driver.relays <= 1


@FUZZ
@given(
    client_tls=st.sampled_from(ClientTls),
    app=st.booleans(),
    pieces=st.lists(st.binary(), max_size=30),
)
def test_arbitrary_client_bytes(client_tls: ClientTls, app: bool, pieces: list[bytes]) -> None:
    config = small_settings(client_tls, UpstreamTls.IMPLICIT, app=app)
    driver = Driver(ImapAuth(config), config)
    driver.apply(driver.machine.start())
    for piece in pieces:
        if driver.done:
            break
        driver.feed(ClientDataReceived(piece))


@FUZZ
@given(upstream_tls=st.sampled_from(UpstreamTls), pieces=st.lists(st.binary(), max_size=30))
def test_arbitrary_upstream_bytes(upstream_tls: UpstreamTls, pieces: list[bytes]) -> None:
    config = small_settings(ClientTls.IMPLICIT, upstream_tls)
    driver = Driver(ImapAuth(config), config)
    driver.apply(driver.machine.start())
    driver.feed(ServerConnected())
    driver.feed(ClientDataReceived(b"a1 LOGIN alice secret\r\n"))
    driver.feed(TokenIssued(MAILBOX, TOKEN))
    for piece in pieces:
        if driver.done or not driver.connected or driver.tls:
            break
        driver.feed(ServerDataReceived(piece))


@FUZZ
@given(
    script=st.lists(st.sampled_from(CLIENT_PIECES), min_size=1, max_size=12),
    cut=st.integers(min_value=1, max_value=64),
    app=st.booleans(),
)
def test_chunking_never_changes_what_the_client_sees(
    script: list[bytes], cut: int, app: bool
) -> None:
    """Client bytes cut anywhere give the same answers as the same bytes whole."""
    stream = b"".join(script)
    config = AuthSettings(
        ClientTls.IMPLICIT, UpstreamTls.IMPLICIT, sasl_external=app, sasl_bearer=app
    )

    def replies(pieces: list[bytes]) -> tuple[bytes, list[Action], str]:
        machine = ImapAuth(config)
        machine.start()
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


# === POP3 ==================================================================================
# The same properties for Pop3Auth; its driver is a sibling of Driver above, not a subclass,
# so that each machine keeps its precise type.

POP3_USER_B64 = base64.b64encode(b"alice")
POP3_PASSWORD_B64 = base64.b64encode(PASSWORD.encode())
POP3_PASS = b"PASS " + PASSWORD.encode() + b"\r\n"
# The LOGIN password travels only right behind its user name, or when the machine asks for
# it (Pop3Driver.plausible_client): sent where a user name belongs, it would be logged as
# one, as by any server, and this harness could not tell that from a leak.
POP3_LOGIN = b"AUTH LOGIN " + POP3_USER_B64 + b"\r\n" + POP3_PASSWORD_B64 + b"\r\n"
POP3_CLIENT_PIECES = [
    b"USER alice\r\n",
    POP3_PASS,
    b"AUTH PLAIN " + PLAIN + b"\r\n",
    b"AUTH PLAIN\r\n",
    PLAIN + b"\r\n",
    b"AUTH LOGIN\r\n",
    b"AUTH LOGIN " + POP3_USER_B64 + b"\r\n",
    POP3_USER_B64 + b"\r\n",
    POP3_LOGIN,
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
    b"AUTH EXTERNAL =\r\n",
    b"AUTH XOAUTH2 " + XO + b"\r\n",
    b"AUTH OAUTHBEARER\r\n",
    OB + b"\r\n",
    b"AQ==\r\n",
    b"AUTH xoauth2 " + XO_NO_USER + b"\r\n",
    b"AUTH EXTERNAL " + AUTHZID + b"\r\n",
]
POP3_APP_PIECES = POP3_CLIENT_PIECES[-7:]
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
    CHALLENGE,
    b"+ " + base64.b64encode(b"[" * 5000) + b"\r\n",
    b"+OK Logged in.\r\n",
    b"-ERR [AUTH] Authentication failed.\r\n",
    b"-ERR [IN-USE] Mailbox locked\r\n",
    b"-ERR [SYS/PERM] Disabled\r\n",
    b"-ERR Disconnected for inactivity.\r\n",
    b"\r\n",
]


def pop3_memory_bound(s: AuthSettings) -> int:
    """What Pop3Auth may hold beyond the chunk it was just given: a partial command line or
    the pipelined bytes behind a login, a partial upstream line and a CAPA list."""
    return s.max_line + 2 * s.max_server_line


def check_no_pop3_secrets(action: Action) -> None:
    """Like :func:`check_no_secrets`, but stricter: POP3 has no tags, so nothing the client
    sends ever comes back to it."""
    if isinstance(action, RequestToken):
        return
    if isinstance(action, BeginRelay):
        assert TOKEN.value.encode() not in action.to_server + action.to_client
        return
    if isinstance(action, SendToServer) and XOAUTH2 in action.data:
        assert action.data == XOAUTH2 + b"\r\n"
        return
    check_no_secrets_text(repr(action))
    if isinstance(action, Note):
        check_no_secrets_text(action.text)
    if isinstance(action, SendToClient | SendToServer):
        for secret in SECRETS:
            assert secret.encode() not in action.data


@dataclass
class Pop3Driver:
    """Plays the trio driver's part for Pop3Auth (see :class:`Driver`)."""

    machine: Pop3Auth
    settings: AuthSettings
    connecting: bool = False
    connected: bool = False
    token_wanted: bool = False
    tls: set[Side] = field(default_factory=set)
    done: bool = False
    relays: int = 0
    #: False: both peers only say what fits the machine's state (in any order), and the
    #: client never hangs up; so runs get to the relay often.
    noisy: bool = True

    def apply(self, actions: list[Action]) -> None:
        for action in actions:
            assert not self.done, "actions after BeginRelay or Close"
            match action:
                case SendToServer():
                    assert self.connected, "sent to an upstream that is not connected"
                    assert Side.SERVER not in self.tls, "sent to the upstream during TLS"
                case ConnectUpstream():
                    assert not self.connected, "reconnect while connected"
                    assert not self.connecting, "reconnect while connecting"
                    self.connecting = True
                case RequestToken(credentials=credentials):
                    assert not self.token_wanted
                    assert PASSWORD not in repr(credentials)
                    assert APP_KEY not in repr(credentials)
                    self.token_wanted = True
                case StartTls(side=side):
                    self.tls.add(side)
                case BeginRelay():
                    self.relays += 1
                    self.done = True
                case Close():
                    self.done = True
                case SendToClient() | Note():
                    pass
            check_no_pop3_secrets(action)

    def choices(self, data: st.DataObject) -> Event:
        """One event the driver could deliver now, weighted towards progress."""
        client, server = self.plausible_client(), self.plausible_server()
        if self.noisy:
            client = st.one_of(client, client, chunks(POP3_CLIENT_PIECES))
            server = st.one_of(server, server, server, chunks(POP3_SERVER_PIECES))
        # A well-behaved client waits for the TLS handshake and never hangs up.
        handshaking = self.machine.client_state is ClientState.TLS_NEGOTIATION
        options: list[tuple[int, st.SearchStrategy[Event]]] = [
            (4 if self.noisy or not handshaking else 0, client.map(ClientDataReceived)),
            (1 if self.noisy else 0, st.just(ClientClosed())),
        ]
        if self.connecting:
            options += [(6, st.just(ServerConnected())), (1, st.just(ServerUnavailable("no")))]
        if self.connected and Side.SERVER not in self.tls:
            # A ready upstream says nothing until asked; anything it says then ends it.
            idle = self.machine.upstream_state is UpstreamState.READY
            options += [
                (1 if idle else 8, server.map(ServerDataReceived)),
                (1, st.just(ServerClosed())),
            ]
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

    def plausible_client(self) -> st.SearchStrategy[bytes]:
        """What a well-behaved client might send in the machine's current state."""
        match self.machine.client_state:
            case ClientState.PLAINTEXT:
                pieces = [b"STLS\r\n", b"CAPA\r\n", b"USER alice\r\n"]
            case ClientState.USER_GIVEN:
                pieces = [POP3_PASS, b"CAPA\r\n", b"USER bob\r\n"]
            case ClientState.SASL_RESPONSE:
                pieces = [PLAIN + b"\r\n", b"*\r\n", XO + b"\r\n", OB + b"\r\n", b"\r\n"]
            case ClientState.ERROR_CHALLENGE:
                pieces = [b"\r\n", b"AQ==\r\n", b"*\r\n"]
            case ClientState.SASL_USERNAME:
                pieces = [POP3_USER_B64 + b"\r\n", b"*\r\n"]
            case ClientState.SASL_PASSWORD:
                pieces = [POP3_PASSWORD_B64 + b"\r\n", b"*\r\n"]
            case ClientState.AWAITING_TOKEN | ClientState.AUTHORIZING:
                pieces = [b"STAT\r\n", b"RETR 1\r\n"]
            case _:
                pieces = [*POP3_CLIENT_PIECES[:12], *POP3_APP_PIECES]
        return st.sampled_from(pieces)

    def plausible_server(self) -> st.SearchStrategy[bytes]:
        """What a real server might answer in the machine's current state."""
        match self.machine.upstream_state:
            # Success is listed more often than failure, so that runs get far.
            case UpstreamState.GREETING:
                pieces = [POP3_SERVER_PIECES[0]] * 3 + [POP3_SERVER_PIECES[1]]
            case UpstreamState.STARTTLS:
                pieces = [b"+OK Begin TLS negotiation now.\r\n"] * 3 + [b"-ERR Unknown.\r\n"]
            case UpstreamState.CAPABILITIES:
                # A whole answer, its status line alone, or what may follow that line.
                pieces = [POP3_SERVER_PIECES[2]] * 4 + [*POP3_SERVER_PIECES[3:5], b"-ERR no\r\n"]
                pieces += [b"TOP\r\n", b"SASL XOAUTH2\r\n.\r\n", b".\r\n"]
            case UpstreamState.AUTH_SENT:
                pieces = [b"+ \r\n", b"-ERR Unsupported mechanism\r\n"]
            case UpstreamState.TOKEN_SENT | UpstreamState.ERROR_CHALLENGE:
                pieces = [*POP3_SERVER_PIECES[11:15], CHALLENGE, b"+OK Logged in.\r\n+OK 1 2\r\n"]
            case _:
                pieces = [b"-ERR Disconnected for inactivity.\r\n"]
        return st.sampled_from(pieces)

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
        assert self.machine.buffered <= pop3_memory_bound(self.settings) + size
        check_no_secrets_text(repr(self.machine))


@FUZZ
@given(
    client_tls=st.sampled_from(ClientTls),
    upstream_tls=st.sampled_from(UpstreamTls),
    app=st.booleans(),
    data=st.data(),
)
def test_pop3_arbitrary_event_sequences(
    client_tls: ClientTls, upstream_tls: UpstreamTls, app: bool, data: st.DataObject
) -> None:
    config = small_settings(client_tls, upstream_tls, app=app)
    driver = Pop3Driver(Pop3Auth(config), config)
    driver.apply(driver.machine.start())
    for _ in range(60):
        if driver.done:
            break
        driver.feed(driver.choices(data))
    assert driver.relays <= 1


@FUZZ
@given(
    client_tls=st.sampled_from(ClientTls),
    upstream_tls=st.sampled_from(UpstreamTls),
    app=st.booleans(),
    data=st.data(),
)
def test_pop3_well_behaved_peers_in_any_order(
    client_tls: ClientTls, upstream_tls: UpstreamTls, app: bool, data: st.DataObject
) -> None:
    config = small_settings(client_tls, upstream_tls, app=app)
    driver = Pop3Driver(Pop3Auth(config), config, noisy=False)
    driver.apply(driver.machine.start())
    for _ in range(60):
        if driver.done:
            break
        driver.feed(driver.choices(data))
    assert driver.relays <= 1


@FUZZ
@given(
    client_tls=st.sampled_from(ClientTls),
    app=st.booleans(),
    pieces=st.lists(st.binary(), max_size=30),
)
def test_pop3_arbitrary_client_bytes(client_tls: ClientTls, app: bool, pieces: list[bytes]) -> None:
    config = small_settings(client_tls, UpstreamTls.IMPLICIT, app=app)
    driver = Pop3Driver(Pop3Auth(config), config)
    driver.apply(driver.machine.start())
    for piece in pieces:
        if driver.done:
            break
        driver.feed(ClientDataReceived(piece))


@FUZZ
@given(upstream_tls=st.sampled_from(UpstreamTls), pieces=st.lists(st.binary(), max_size=30))
def test_pop3_arbitrary_upstream_bytes(upstream_tls: UpstreamTls, pieces: list[bytes]) -> None:
    config = small_settings(ClientTls.IMPLICIT, upstream_tls)
    driver = Pop3Driver(Pop3Auth(config), config)
    driver.apply(driver.machine.start())
    driver.feed(ServerConnected())
    driver.feed(ClientDataReceived(b"USER alice\r\nPASS secret\r\n"))
    driver.feed(TokenIssued(MAILBOX, TOKEN))
    for piece in pieces:
        if driver.done or not driver.connected or driver.tls:
            break
        driver.feed(ServerDataReceived(piece))


@FUZZ
@given(
    script=st.lists(st.sampled_from(POP3_CLIENT_PIECES), min_size=1, max_size=12),
    cut=st.integers(min_value=1, max_value=64),
    app=st.booleans(),
)
def test_pop3_chunking_never_changes_what_the_client_sees(
    script: list[bytes], cut: int, app: bool
) -> None:
    """Client bytes cut anywhere give the same answers as the same bytes whole."""
    stream = b"".join(script)
    config = AuthSettings(
        ClientTls.IMPLICIT, UpstreamTls.IMPLICIT, sasl_external=app, sasl_bearer=app
    )

    def replies(pieces: list[bytes]) -> tuple[bytes, list[Action], str]:
        machine = Pop3Auth(config)
        machine.start()
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
        assert cut_up[2] == whole[2]
        assert cut_up[0].startswith(whole[0])
    else:
        assert cut_up == whole


# === SMTP ==================================================================================
# The same properties for SmtpAuth, with its own sibling driver (see the POP3 section).

SMTP_USER_B64 = base64.b64encode(b"alice")
SMTP_PASSWORD_B64 = base64.b64encode(PASSWORD.encode())
# As for POP3, the LOGIN password travels only right behind its user name, or when the
# machine asks for it: sent where a user name belongs, it would be logged as one.
SMTP_LOGIN = b"AUTH LOGIN " + SMTP_USER_B64 + b"\r\n" + SMTP_PASSWORD_B64 + b"\r\n"
SMTP_CLIENT_PIECES = [
    b"EHLO client.test\r\n",
    b"HELO client.test\r\n",
    b"AUTH PLAIN " + PLAIN + b"\r\n",
    b"AUTH PLAIN\r\n",
    PLAIN + b"\r\n",
    b"AUTH LOGIN\r\n",
    b"AUTH LOGIN " + SMTP_USER_B64 + b"\r\n",
    SMTP_USER_B64 + b"\r\n",
    SMTP_LOGIN,
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
    b"AUTH EXTERNAL =\r\n",
    b"AUTH XOAUTH2 " + XO + b"\r\n",
    b"AUTH OAUTHBEARER\r\n",
    OB + b"\r\n",
    b"AQ==\r\n",
    b"AUTH xoauth2 " + XO_NO_USER + b"\r\n",
    b"AUTH EXTERNAL " + AUTHZID + b"\r\n",
]
SMTP_APP_PIECES = SMTP_CLIENT_PIECES[-7:]
SMTP_CHALLENGE = b"334 " + base64.b64encode(b'{"status":"401","schemes":"bearer"}') + b"\r\n"
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
    SMTP_CHALLENGE,
    b"334 " + base64.b64encode(b"[" * 5000) + b"\r\n",
    b"235 2.7.0 Logged in.\r\n",
    b"535 5.7.8 Authentication failed.\r\n",
    b"454 4.7.0 Temporary authentication failure\r\n",
    b"500 5.5.2 Line too long\r\n",
    b"250-partial\r\n",
    b"\r\n",
]


def smtp_memory_bound(s: AuthSettings) -> int:
    """What SmtpAuth may hold beyond the chunk it was just given: the client bytes held
    behind a held EHLO or a login, a partial reply and a partial line from the upstream."""
    return s.max_line + s.max_literal + 2 * s.max_server_line


@dataclass
class SmtpDriver:
    """Plays the trio driver's part for SmtpAuth (see :class:`Driver`)."""

    machine: SmtpAuth
    settings: AuthSettings
    connecting: bool = False
    connected: bool = False
    token_wanted: bool = False
    tls: set[Side] = field(default_factory=set)
    done: bool = False
    relays: int = 0
    #: False: both peers only say what fits the machine's state (in any order), and the
    #: client never hangs up; so runs get to the relay often.
    noisy: bool = True

    def apply(self, actions: list[Action]) -> None:
        for action in actions:
            assert not self.done, "actions after BeginRelay or Close"
            match action:
                case SendToServer():
                    assert self.connected, "sent to an upstream that is not connected"
                    assert Side.SERVER not in self.tls, "sent to the upstream during TLS"
                case ConnectUpstream():
                    assert not self.connected, "reconnect while connected"
                    assert not self.connecting, "reconnect while connecting"
                    self.connecting = True
                case RequestToken(credentials=credentials):
                    assert not self.token_wanted
                    assert PASSWORD not in repr(credentials)
                    assert APP_KEY not in repr(credentials)
                    self.token_wanted = True
                case StartTls(side=side):
                    self.tls.add(side)
                case BeginRelay():
                    self.relays += 1
                    self.done = True
                case Close():
                    self.done = True
                case SendToClient() | Note():
                    pass
            # SMTP has no tags either: nothing the client sends ever comes back to it.
            check_no_pop3_secrets(action)

    def choices(self, data: st.DataObject) -> Event:
        """One event the driver could deliver now, weighted towards progress."""
        client, server = self.plausible_client(), self.plausible_server()
        if self.noisy:
            client = st.one_of(client, client, chunks(SMTP_CLIENT_PIECES))
            server = st.one_of(server, server, server, chunks(SMTP_SERVER_PIECES))
        state = self.machine.client_state
        if self.noisy:
            weight = 4
        elif state is ClientState.TLS_NEGOTIATION:
            weight = 0  # a well-behaved client waits for the handshake,
        elif state in (ClientState.HELD, ClientState.AWAITING_TOKEN, ClientState.AUTHORIZING):
            weight = 1  # and pipelines a little (not a whole budget) while it waits
        else:
            weight = 4
        options: list[tuple[int, st.SearchStrategy[Event]]] = [
            (weight, client.map(ClientDataReceived)),
            (1 if self.noisy else 0, st.just(ClientClosed())),
        ]
        if self.connecting:
            options += [(6, st.just(ServerConnected())), (1, st.just(ServerUnavailable("no")))]
        if self.connected and Side.SERVER not in self.tls:
            options += [(8, server.map(ServerDataReceived)), (1, st.just(ServerClosed()))]
        if self.token_wanted:
            options += [
                (6, st.just(TokenIssued(MAILBOX, TOKEN))),
                (1, st.sampled_from(Refusal).map(TokenRefused)),
            ]
        for side in self.tls:
            options.append((6, st.just(TlsEstablished(side))))
        if Side.SERVER in self.tls:
            options.append((1, st.just(ServerUnavailable("handshake failed"))))
        weighted = [strategy for weight, strategy in options if weight for _ in range(weight)]
        return data.draw(st.sampled_from(weighted).flatmap(lambda strategy: strategy))

    def plausible_client(self) -> st.SearchStrategy[bytes]:
        """What a well-behaved client might send in the machine's current state."""
        match self.machine.client_state:
            case ClientState.PLAINTEXT:
                pieces = [b"EHLO client.test\r\n", b"STARTTLS\r\n", b"NOOP\r\n"]
            case ClientState.CONNECTED:
                pieces = [b"EHLO client.test\r\n", b"HELO client.test\r\n", b"NOOP\r\n"]
            case ClientState.NOT_AUTHENTICATED:
                pieces = [
                    *SMTP_CLIENT_PIECES[2:4],
                    SMTP_CLIENT_PIECES[5],
                    SMTP_LOGIN,
                    *SMTP_APP_PIECES[:3],
                    SMTP_APP_PIECES[5],
                ]
            case ClientState.SASL_RESPONSE:
                pieces = [PLAIN + b"\r\n", b"*\r\n", XO + b"\r\n", OB + b"\r\n", b"\r\n"]
            case ClientState.ERROR_CHALLENGE:
                pieces = [b"\r\n", b"AQ==\r\n", b"*\r\n"]
            case ClientState.SASL_USERNAME:
                pieces = [SMTP_USER_B64 + b"\r\n", b"*\r\n"]
            case ClientState.SASL_PASSWORD:
                pieces = [SMTP_PASSWORD_B64 + b"\r\n", b"*\r\n"]
            case ClientState.HELD | ClientState.AWAITING_TOKEN | ClientState.AUTHORIZING:
                pieces = [b"NOOP\r\n", b"MAIL FROM:<alice@contoso.com>\r\n"]
            case _:
                pieces = [*SMTP_CLIENT_PIECES[:12], *SMTP_APP_PIECES]
        return st.sampled_from(pieces)

    def plausible_server(self) -> st.SearchStrategy[bytes]:
        """What a real server might answer in the machine's current state."""
        match self.machine.upstream_state:
            # Success is listed more often than failure, so that runs get far.
            case UpstreamState.GREETING:
                pieces = [SMTP_SERVER_PIECES[0]] * 3 + SMTP_SERVER_PIECES[1:4]
            case UpstreamState.PLAIN_CAPABILITIES:
                pieces = [SMTP_EHLO_STARTTLS] * 3 + [SMTP_EHLO_XOAUTH2, b"502 5.5.1 no\r\n"]
            case UpstreamState.STARTTLS:
                pieces = [SMTP_SERVER_PIECES[8]] * 3 + [b"454 4.7.0 not now\r\n"]
            case UpstreamState.CAPABILITIES:
                pieces = [SMTP_EHLO_XOAUTH2] * 3 + [SMTP_SERVER_PIECES[6], b"421 4.4.2 bye\r\n"]
            case UpstreamState.AUTH_SENT:
                pieces = [b"334 \r\n"] * 3 + [b"504 5.5.4 Unrecognized\r\n"]
            case UpstreamState.TOKEN_SENT | UpstreamState.ERROR_CHALLENGE:
                pieces = [
                    b"235 2.7.0 Logged in.\r\n",
                    b"235 2.7.0 Logged in.\r\n250 early\r\n",
                    *SMTP_SERVER_PIECES[13:16],
                    SMTP_CHALLENGE,
                ]
            case _:
                pieces = [b"421 4.4.2 Disconnected for inactivity\r\n"]
        return st.sampled_from(pieces)

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
        assert self.machine.buffered <= smtp_memory_bound(self.settings) + size
        check_no_secrets_text(repr(self.machine))


def smtp_driver(
    client_tls: ClientTls, upstream_tls: UpstreamTls, *, noisy: bool = True, app: bool = False
) -> SmtpDriver:
    config = small_settings(client_tls, upstream_tls, app=app)
    driver = SmtpDriver(SmtpAuth(config), config, noisy=noisy)
    driver.apply(driver.machine.start())
    return driver


@FUZZ
@given(
    client_tls=st.sampled_from(ClientTls),
    upstream_tls=st.sampled_from(UpstreamTls),
    noisy=st.booleans(),
    app=st.booleans(),
    data=st.data(),
)
def test_smtp_arbitrary_event_sequences(
    client_tls: ClientTls, upstream_tls: UpstreamTls, noisy: bool, app: bool, data: st.DataObject
) -> None:
    driver = smtp_driver(client_tls, upstream_tls, noisy=noisy, app=app)
    for _ in range(60):
        if driver.done:
            break
        driver.feed(driver.choices(data))
    assert driver.relays <= 1


@FUZZ
@given(
    client_tls=st.sampled_from(ClientTls),
    upstream_ready=st.booleans(),
    app=st.booleans(),
    pieces=st.lists(st.binary(), max_size=30),
)
def test_smtp_arbitrary_client_bytes(
    client_tls: ClientTls, upstream_ready: bool, app: bool, pieces: list[bytes]
) -> None:
    driver = smtp_driver(client_tls, UpstreamTls.IMPLICIT, app=app)
    if upstream_ready:  # else an EHLO is held, and everything behind it
        driver.feed(ServerConnected())
        driver.feed(ServerDataReceived(SMTP_SERVER_PIECES[0] + SMTP_EHLO_XOAUTH2))
    for piece in pieces:
        if driver.done:
            break
        driver.feed(ClientDataReceived(piece))


@FUZZ
@given(upstream_tls=st.sampled_from(UpstreamTls), pieces=st.lists(st.binary(), max_size=30))
def test_smtp_arbitrary_upstream_bytes(upstream_tls: UpstreamTls, pieces: list[bytes]) -> None:
    driver = smtp_driver(ClientTls.IMPLICIT, upstream_tls)
    driver.feed(ServerConnected())
    driver.feed(ClientDataReceived(b"HELO client.test\r\nAUTH PLAIN " + PLAIN + b"\r\n"))
    driver.feed(TokenIssued(MAILBOX, TOKEN))
    for piece in pieces:
        if driver.done or not driver.connected or driver.tls:
            break
        driver.feed(ServerDataReceived(piece))


@FUZZ
@given(
    script=st.lists(st.sampled_from(SMTP_CLIENT_PIECES), min_size=1, max_size=12),
    cut=st.integers(min_value=1, max_value=64),
    app=st.booleans(),
)
def test_smtp_chunking_never_changes_what_the_client_sees(
    script: list[bytes], cut: int, app: bool
) -> None:
    """Client bytes cut anywhere give the same answers as the same bytes whole."""
    stream = b"".join(script)
    config = AuthSettings(
        ClientTls.IMPLICIT, UpstreamTls.IMPLICIT, sasl_external=app, sasl_bearer=app
    )

    def replies(pieces: list[bytes]) -> tuple[bytes, list[Action], str]:
        machine = SmtpAuth(config)
        machine.start()
        machine.handle(ServerConnected())
        machine.handle(ServerDataReceived(SMTP_SERVER_PIECES[0] + SMTP_EHLO_XOAUTH2))
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
        assert cut_up[2] == whole[2]
        assert cut_up[0].startswith(whole[0])
    else:
        assert cut_up == whole
