"""The session driver: carries out a protocol machine's actions with real I/O.

One :class:`Session` per accepted connection. During authentication it runs, inside its
own nursery:

* a *reader* task per side that turns bytes into ``*DataReceived`` events. Readers hand
  events over an unbuffered channel, so at most one chunk per side is ever in flight; a
  reader that is stopped while holding an undelivered chunk leaves it in ``_held`` for
  the driver to account for (pipelined bytes for the relay, or injected plaintext after
  STARTTLS, which closes the connection);
* short tasks that open the upstream connection and obtain a token, reporting back as
  events.

The driver loop feeds each event to the machine and executes the returned actions in
order. Once the machine says ``BeginRelay``, the readers are stopped and
:func:`proxy.net.relay.relay` takes over both streams.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import functools
import ipaddress
import json
import logging
import math
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, assert_never

import trio

from broker.claims import NotAJwtError, check_token, decode_claims, scopes_of, token_roles
from broker.delegated import SignInRequired
from broker.errors import BrokerError
from proxy.config import Protocol as MailProtocol
from proxy.hashpool import Busy
from proxy.identities import BadCredentials, LockedOut
from proxy.net.postlogin import TAIL, FirstLines, token_expired
from proxy.net.relay import relay, send_eagerly
from proxy.net.tls import describe_tls_error, peer_certificate
from proxy.net.tlssocket import TlsSocketStream, wrap_tls
from proxy.ops.metrics import LoginResult, Metrics, Phase, UpstreamFailure
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
from proxy.protocol.modes import UpstreamTls
from proxy.protocol.sasl import (
    AnyCredentials,
    BearerCredentials,
    Credentials,
    ExternalCredentials,
)
from proxy.throttle import LoginThrottle

if TYPE_CHECKING:
    import ssl

    from broker.model import AccessToken
    from broker.source import TokenSource
    from proxy.config import Limits, ListenerConfig
    from proxy.identities import Authenticator, Identity
    from proxy.net.pool import UpstreamPool
    from proxy.net.tls import SessionCache

__all__ = ["AuthMachine", "Services", "Session", "UpstreamUnavailable", "open_upstream"]

log = logging.getLogger("xoauth2_proxy.session")
#: One JSON object per authentication attempt; route it to its own file with logging config.
audit_log = logging.getLogger("xoauth2_proxy.audit")

#: Largest read during authentication.
READ_SIZE = 16384

#: Microsoft's application permission each protocol needs (checked in the token's roles).
REQUIRED_ROLES: dict[MailProtocol, str] = {
    MailProtocol.IMAP: "IMAP.AccessAsApp",
    MailProtocol.POP3: "POP.AccessAsApp",
    MailProtocol.SMTP: "SMTP.SendAsApp",
}
#: Microsoft's delegated permission each protocol needs (checked in the granted scope).
REQUIRED_SCOPES: dict[MailProtocol, str] = {
    MailProtocol.IMAP: "IMAP.AccessAsUser.All",
    MailProtocol.POP3: "POP.AccessAsUser.All",
    MailProtocol.SMTP: "SMTP.Send",
}


class AuthMachine(Protocol):
    """What :class:`Session` needs of ``ImapAuth``, ``Pop3Auth`` and ``SmtpAuth``."""

    def start(self) -> list[Action]: ...

    def handle(self, event: Event) -> list[Action]: ...


@dataclass(slots=True)
class Services:
    """What every session shares: configuration-derived objects, passed in explicitly."""

    authenticator: Authenticator
    tokens: TokenSource
    limits: Limits
    #: Provider name per app, for the checks that only apply to Microsoft tokens.
    app_providers: dict[str, str] = field(default_factory=dict)
    #: The apps people sign in to: tokens per account, permissions in the scope.
    delegated: frozenset[str] = frozenset()
    #: Failed-login delays and lockouts, shared by every listener.
    throttle: LoginThrottle = field(default_factory=LoginThrottle)
    #: Upstream connections opened for clients that have not sent a command yet.
    early_upstreams: EarlyUpstreams = field(default_factory=lambda: EarlyUpstreams())
    metrics: Metrics = field(default_factory=Metrics)


@dataclass(slots=True)
class EarlyUpstreams:
    """Counts upstream connections opened before their client sent anything.

    Opening the upstream at once makes logins faster (its connection and TLS handshake
    overlap with the client's), but a silent client would hold an upstream session for
    nothing: beyond ``limits.max_early_upstreams`` such sessions, a client's upstream waits
    for the client's first command.
    """

    count: int = 0


#: How each kind of credential is named in the audit log.
CREDENTIAL_KINDS: dict[type[AnyCredentials], str] = {
    Credentials: "password",
    ExternalCredentials: "certificate",
    BearerCredentials: "app-key",
}


class AuditResult(enum.Enum):
    SUCCESS = "success"
    #: Refused: bad credentials, lockout, or the upstream refused the token.
    FAILURE = "failure"
    #: Not decided: the identity provider or the app's permissions failed; try again later.
    TEMPORARY_FAILURE = "temporary-failure"
    #: Not decided: the client left (or the proxy stopped) while its credentials were checked.
    ABANDONED = "abandoned"


@dataclass(frozen=True, slots=True)
class _Refused:
    refusal: Refusal
    result: AuditResult
    reason: str
    mailbox: str = ""
    counted_as: LoginResult = LoginResult.BAD_CREDENTIALS


@dataclass(frozen=True, slots=True)
class _Accepted:
    issued: TokenIssued
    #: The identity's name in the configuration (for SASL EXTERNAL, the client sent none).
    login: str


@dataclass(slots=True)
class _Attempt:
    login: str
    mailbox: str
    kind: str
    last_note: str = ""
    #: When the token went to the machine (the upstream login's start), trio time.
    started: float = 0.0


class _Stop(Exception):
    """Leave the authentication phase and close the connection."""


class UpstreamUnavailable(Exception):
    """The upstream could not be reached; ``str()`` says where and why (safe to log)."""

    def __init__(self, text: str, *, tls: bool = False) -> None:
        super().__init__(text)
        #: The connection was made, but TLS failed (certificate, host name, protocol).
        self.tls = tls


def _idp_result(error: BrokerError) -> LoginResult:
    return LoginResult.IDP_PERMANENT if error.kind == "permanent" else LoginResult.IDP_TEMPORARY


async def open_upstream(
    listener: ListenerConfig,
    context: ssl.SSLContext,
    sessions: SessionCache | None = None,
    *,
    preface: bytes = b"",
) -> trio.abc.Stream:
    """Connect to the listener's upstream; send ``preface`` (a PROXY protocol header) before
    anything else; with implicit TLS, finish the handshake (certificate and host name
    always verified, or a verified session resumed from ``sessions``). The caller sets
    the deadline.

    Raises :exc:`UpstreamUnavailable`, saying where and why, on any other failure.
    """
    where = f"upstream {listener.upstream_host}:{listener.upstream_port}"
    try:
        stream: trio.abc.Stream = await connect_tcp(listener.upstream_host, listener.upstream_port)
        if preface:
            try:
                await stream.send_all(preface)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        if listener.upstream_tls is UpstreamTls.STARTTLS:
            return stream
        return await upstream_handshake(listener, stream, context, sessions)
    except trio.BrokenResourceError as exc:
        raise UpstreamUnavailable(f"{where}: {describe_tls_error(exc)}", tls=True) from exc
    except OSError as exc:
        raise UpstreamUnavailable(f"{where}: cannot connect: {exc.strerror or exc}") from exc


@functools.lru_cache(maxsize=64)
def _address_family(host: str) -> socket.AddressFamily | None:
    """The family of ``host`` if it is an IP address literal, else ``None``."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


async def connect_tcp(host: str, port: int) -> trio.SocketStream:
    """:func:`trio.open_tcp_stream`, without its resolver and its happy-eyeballs nursery
    when ``host`` is an address: one connection attempt needs neither (they cost a third
    of the work of opening the connection)."""
    family = _address_family(host)
    if family is None:
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def upstream_handshake(
    listener: ListenerConfig,
    stream: trio.abc.Stream,
    context: ssl.SSLContext,
    sessions: SessionCache | None,
) -> trio.abc.Stream:
    """TLS on ``stream`` towards the listener's upstream, resuming a session from
    ``sessions`` when it has one (and remembering the new one). Closes ``stream`` and
    raises :exc:`trio.BrokenResourceError` if the handshake fails."""
    host, port = listener.upstream_host, listener.upstream_port
    tls = wrap_tls(
        stream,
        context,
        server_hostname=host,
        session=sessions.get(host, port) if sessions is not None else None,
        on_session=sessions.recorder(host, port) if sessions is not None else None,
    )
    try:
        await tls.do_handshake()
    except BaseException:
        if sessions is not None:
            sessions.forget(host, port)
        await trio.aclose_forcefully(tls)
        raise
    return tls


class Session:
    """Drive one connection from accept to close."""

    def __init__(
        self,
        *,
        conn_id: str,
        peer: str,
        listener: ListenerConfig,
        machine: AuthMachine,
        services: Services,
        client: trio.abc.Stream,
        client_context: ssl.SSLContext | None,
        upstream_context: ssl.SSLContext,
        timeout_reply: bytes,
        client_certificate: bytes | None = None,
        upstream_preface: bytes = b"",
        upstream_sessions: SessionCache | None = None,
        upstream_pool: UpstreamPool | None = None,
    ) -> None:
        self.conn_id = conn_id
        self.peer = peer
        self.listener = listener
        self.machine = machine
        self.services = services
        self.client = client
        self.server: trio.abc.Stream | None = None
        self._client_context = client_context
        self._upstream_context = upstream_context
        self._upstream_sessions = upstream_sessions
        self._upstream_pool = upstream_pool
        self._timeout_reply = timeout_reply
        self._tx, self._rx = trio.open_memory_channel[Event](0)
        self._readers: dict[Side, tuple[trio.CancelScope, trio.Event]] = {}
        self._held: dict[Side, bytes | None] = {Side.CLIENT: None, Side.SERVER: None}
        self._pending: deque[Event] = deque()
        self._log = logging.LoggerAdapter(log, {"conn": conn_id, "listener": listener.name})
        self._nursery: trio.Nursery | None = None
        #: A login whose token went upstream and whose outcome is not known yet.
        self._attempt: _Attempt | None = None
        self._token_pending = False
        self._line_deadline = trio.current_time() + services.limits.line_timeout
        #: The client has sent something; until then the upstream may wait (see
        #: :class:`EarlyUpstreams`): whether this session holds an early slot, or waits.
        self._client_spoke = False
        self._early_slot = False
        self._connect_deferred = False
        #: The client's TLS certificate (DER), read once right after its handshake (the
        #: listener's for implicit TLS, ours after STARTTLS): a connection broken later
        #: must not turn the login's certificate check into an internal error.
        self.client_certificate = client_certificate
        #: An attempt whose credentials are being checked: (login, kind), audited as
        #: abandoned if the client goes away before it is decided.
        self._deciding: tuple[str, str] | None = None
        #: Sent to the upstream before anything else (a PROXY header naming the client).
        self._upstream_preface = upstream_preface
        #: A login the upstream accepted, judged once its first lines are seen.
        self._accepted: _Attempt | None = None
        self._first_lines: FirstLines | None = None
        self._last_from_upstream: bytes | bytearray = b""

    def __repr__(self) -> str:
        return f"<Session {self.conn_id} on {self.listener.name}>"

    async def run(self) -> None:
        """Authenticate, then relay; always closes both streams before returning."""
        # Whether the streams end with TLS close_notify: not after a peer broke off, whose
        # truncation the other side must see as one, not as a clean end.
        graceful = True
        try:
            relay_plan: BeginRelay | None = None
            with trio.move_on_after(self.services.limits.login_timeout) as login_deadline:
                relay_plan = await self._authenticate()
            if login_deadline.cancelled_caught:
                self._log.info(
                    "%s: login not completed within %gs, closing",
                    self.conn_id,
                    self.services.limits.login_timeout,
                )
                await self._send_quietly(self.client, self._timeout_reply)
                return
            if relay_plan is None or self.server is None:
                return
            self._end_authentication()
            metrics, protocol = self.services.metrics, self.listener.protocol.value
            sent = metrics.relayed.labels(protocol, "client_to_upstream").inc
            received = metrics.relayed.labels(protocol, "upstream_to_client").inc
            if relay_plan.to_server:
                await self.server.send_all(relay_plan.to_server)
                sent(len(relay_plan.to_server))
            if relay_plan.to_client:
                self._from_upstream(relay_plan.to_client)
                await self.client.send_all(relay_plan.to_client)
                received(len(relay_plan.to_client))

            def upstream_said(data: bytes | bytearray) -> None:
                self._from_upstream(data)
                received(len(data))

            graceful = await relay(
                self.client,
                self.server,
                to_server=lambda data: sent(len(data)),
                to_client=upstream_said,
            )
            self._log.info("%s: session ended%s", self.conn_id, "" if graceful else " (broken off)")
            if token_expired(self._last_from_upstream):
                metrics.token_expired.labels(protocol).inc()
                self._log.info(
                    "%s: the upstream ended the session because its token expired "
                    "(AccessTokenExpired); the client reconnects with a fresh one",
                    self.conn_id,
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            graceful = False
            self._log.info("%s: connection broken: %s", self.conn_id, exc)
        finally:
            self._conclude_login()
            # Shielded and bounded. After a clean end (LOGOUT, QUIT) the streams get TLS
            # close_notify, so that clients do not take the end for a truncation.
            with trio.CancelScope(shield=True):
                streams = [s for s in (self.client, self.server) if s is not None]
                if graceful:
                    with trio.move_on_after(1) as closing:
                        for stream in streams:
                            await stream.aclose()
                    if closing.cancelled_caught:
                        for stream in streams:  # closing again: no close_notify now
                            await trio.aclose_forcefully(stream)
                else:
                    for stream in streams:
                        await trio.aclose_forcefully(stream)

    # -- after the login ------------------------------------------------------------------

    def _from_upstream(self, data: bytes | bytearray) -> None:
        # Only the last TAIL bytes are kept (an idle session must not hold its last 64 KiB
        # read); a small chunk is joined to what came before it.
        if len(data) >= TAIL:
            self._last_from_upstream = bytes(data[-TAIL:])
        else:
            self._last_from_upstream = bytes(self._last_from_upstream[len(data) - TAIL :]) + data
        watch = self._first_lines
        if watch is None:
            return
        watch.feed(data)
        if watch.done:
            self._conclude_login()

    def _conclude_login(self) -> None:
        """Stop watching the upstream's first lines after the login; if they refused the
        mailbox, say so (log, audit, metrics)."""
        attempt, watch = self._accepted, self._first_lines
        self._accepted = self._first_lines = None
        if attempt is None or watch is None:
            return
        refusal = watch.refusal
        watch.finish()
        if not refusal:
            return
        protocol = self.listener.protocol.value
        self._log.error(
            "%s: login %r: the upstream accepted the token but refused mailbox %r: %r. "
            "The app may not open this mailbox. Fix: in Exchange Online, register the app's "
            "service principal (New-ServicePrincipal) and give it the mailbox "
            "(Add-MailboxPermission -AccessRights FullAccess; for SMTP also "
            "Add-RecipientPermission -AccessRights SendAs); `xoauth2-proxy exchange-setup` "
            "prints the commands, `xoauth2-proxy doctor` checks the result.",
            self.conn_id,
            attempt.login,
            attempt.mailbox,
            refusal,
        )
        # A second line for the attempt: the success line said the upstream took the token.
        self._audit(
            attempt.login,
            AuditResult.FAILURE,
            f"the upstream accepted the token, then refused the mailbox: {refusal}",
            attempt.mailbox,
            attempt.kind,
        )
        self.services.metrics.not_connected.labels(protocol).inc()

    def _end_authentication(self) -> None:
        """Let go of what only the authentication phase uses: the machine, the event
        channel, the readers' bookkeeping and the closed nursery (about 8 KiB), which
        would otherwise live as long as the relay, hours for an idle IMAP session."""
        del self.machine, self._tx, self._rx, self._readers, self._held, self._pending
        self._nursery = None

    # -- the authentication phase ---------------------------------------------------------

    async def _authenticate(self) -> BeginRelay | None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await nursery.start(self._reader, Side.CLIENT, self.client)
                outcome = await self._execute(nursery, self.machine.start())
                while outcome is None:
                    if self._pending:
                        event = self._pending.popleft()
                    else:
                        # Each command must arrive whole within line_timeout of our last
                        # reply, unless we are the ones waiting (for a token).
                        deadline = math.inf if self._token_pending else self._line_deadline
                        with trio.move_on_at(deadline) as waiting:
                            event = await self._rx.receive()
                        if waiting.cancelled_caught:
                            self._log.info(
                                "%s: no complete command within %gs, closing",
                                self.conn_id,
                                self.services.limits.line_timeout,
                            )
                            await self._send_quietly(self.client, self._timeout_reply)
                            return None
                    if isinstance(event, TokenIssued | TokenRefused):
                        self._token_pending = False
                        self._progress()
                    elif isinstance(event, ClientDataReceived | ClientClosed):
                        self._client_has_spoken(nursery)
                    try:
                        actions = self.machine.handle(event)
                    except ProxyError as exc:
                        self._log.info("%s: %s: %s", self.conn_id, type(exc).__name__, exc)
                        if exc.reply_hint:
                            await self._send_quietly(self.client, exc.reply_hint)
                        return None
                    outcome = await self._execute(nursery, actions)
            except _Stop:
                return None
            finally:
                nursery.cancel_scope.cancel()
                self._release_early_slot()
                self._finish_attempt(AuditResult.FAILURE)
                if self._deciding is not None:
                    login, kind = self._deciding
                    self._deciding = None
                    self._audit(
                        login,
                        AuditResult.ABANDONED,
                        "the connection ended before the answer",
                        kind=kind,
                    )
                    self.services.metrics.login(self.listener.protocol.value, LoginResult.ABANDONED)
        return outcome if isinstance(outcome, BeginRelay) else None

    async def _execute(
        self, nursery: trio.Nursery, actions: list[Action]
    ) -> BeginRelay | Close | None:
        for action in actions:
            match action:
                case SendToClient(data=data):
                    self._progress()
                    try:
                        await send_eagerly(self.client, data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        self._log.info("%s: the client went away: %s", self.conn_id, exc)
                        raise _Stop from exc
                case SendToServer(data=data):
                    if self.server is None:
                        raise RuntimeError("machine sent to the upstream before it connected")
                    try:
                        await send_eagerly(self.server, data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        # Its reader sees the same and reports ServerClosed, which the
                        # machine answers with the temporary reply.
                        self._log.info("%s: the upstream went away: %s", self.conn_id, exc)
                case ConnectUpstream():
                    self._connect_when_allowed(nursery)
                case StartTls(side=side, preface=preface):
                    await self._start_tls(nursery, side, preface)
                case RequestToken(credentials=credentials):
                    self._token_pending = True
                    # Known as under way from now: audited even if the client leaves before
                    # the task has started.
                    self._deciding = (credentials.login, CREDENTIAL_KINDS[type(credentials)])
                    nursery.start_soon(self._obtain_token, credentials)
                case BeginRelay(to_server=to_server, to_client=to_client):
                    # The upstream's first lines may still refuse the mailbox: watched.
                    self._accepted = self._attempt
                    if self._accepted is not None:
                        self._first_lines = FirstLines()
                        self.services.metrics.phase(
                            self.listener.protocol.value,
                            Phase.UPSTREAM_LOGIN,
                            trio.current_time() - self._accepted.started,
                        )
                    self._finish_attempt(AuditResult.SUCCESS, "logged in upstream")
                    held_client = await self._stop_reader(Side.CLIENT)
                    held_server = await self._stop_reader(Side.SERVER)
                    return BeginRelay(
                        to_server=to_server + held_client, to_client=to_client + held_server
                    )
                case Note(severity=severity, text=text):
                    level = {
                        Severity.INFO: logging.INFO,
                        Severity.WARNING: logging.WARNING,
                        Severity.ERROR: logging.ERROR,
                    }[severity]
                    self._log.log(level, "%s: %s", self.conn_id, text)
                    if self._attempt is not None:
                        # After a token went upstream, a warning or an error is the
                        # upstream's verdict (sent before the client's reply, so the audit
                        # line is written before the client knows).
                        self._attempt.last_note = text
                        if severity is not Severity.INFO:
                            self._finish_attempt(AuditResult.FAILURE)
                case Close(reason=reason):
                    if reason:
                        self._log.info("%s: closing: %s", self.conn_id, reason)
                    return action
                case _:
                    assert_never(action)
        return None

    async def _reader(
        self,
        side: Side,
        stream: trio.abc.ReceiveStream,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        done = trio.Event()
        try:
            with trio.CancelScope() as scope:
                self._readers[side] = (scope, done)
                task_status.started()
                while True:
                    try:
                        data = bytes(await stream.receive_some(READ_SIZE))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    self._held[side] = data
                    if side is Side.CLIENT:
                        event: Event = ClientDataReceived(data) if data else ClientClosed()
                    else:
                        event = ServerDataReceived(data) if data else ServerClosed()
                    await self._tx.send(event)
                    self._held[side] = None
                    if not data:
                        return
        finally:
            done.set()

    async def _stop_reader(self, side: Side) -> bytes:
        """Stop reading ``side``; return bytes it had read but not delivered."""
        entry = self._readers.pop(side, None)
        if entry is not None:
            scope, done = entry
            scope.cancel()
            await done.wait()
        held = self._held[side] or b""
        self._held[side] = None
        return held

    async def _connect_upstream(self) -> None:
        timeout = self.services.limits.upstream_timeout
        metrics, name = self.services.metrics, self.listener.name
        try:
            with trio.fail_after(timeout):
                stream = await open_upstream(
                    self.listener,
                    self._upstream_context,
                    self._upstream_sessions,
                    preface=self._upstream_preface,
                )
        except trio.TooSlowError:
            metrics.upstream_failure(name, UpstreamFailure.TIMEOUT)
            where = f"{self.listener.upstream_host}:{self.listener.upstream_port}"
            await self._tx.send(
                ServerUnavailable(f"upstream {where}: no connection within {timeout:g}s")
            )
            return
        except UpstreamUnavailable as exc:
            kind = UpstreamFailure.TLS if exc.tls else UpstreamFailure.CONNECT
            metrics.upstream_failure(name, kind)
            await self._tx.send(ServerUnavailable(str(exc)))
            return
        if isinstance(stream, TlsSocketStream):
            resumed = stream.session_reused
            metrics.upstream_handshake(name, resumed=resumed)
            if resumed:
                self._log.debug("%s: upstream TLS session resumed", self.conn_id)
        if self.server is not None:
            await trio.aclose_forcefully(self.server)
        self.server = stream
        await self._tx.send(ServerConnected())
        self._start_reader_soon(Side.SERVER, stream)

    def _connect_when_allowed(self, nursery: trio.Nursery) -> None:
        """Open the upstream now, unless the client is silent and too many silent clients
        hold upstream connections already: then once it speaks."""
        early = self.services.early_upstreams
        if not self._client_spoke:
            if early.count >= self.services.limits.max_early_upstreams:
                self._connect_deferred = True
                return
            early.count += 1
            self._early_slot = True
        self._open_upstream_soon(nursery)

    def _open_upstream_soon(self, nursery: trio.Nursery) -> None:
        """Take a warm connection from the pool, or start connecting."""
        warm = self._upstream_pool.take() if self._upstream_pool is not None else None
        if warm is None:
            nursery.start_soon(self._connect_upstream)
            return
        self._log.debug("%s: warm upstream connection", self.conn_id)
        if self.server is not None:  # a reconnection: the old one is gone
            nursery.start_soon(trio.aclose_forcefully, self.server)
        self.server = warm.stream
        self._pending.append(ServerConnected())
        self._pending.append(ServerDataReceived(warm.greeting))
        self._start_reader_soon(Side.SERVER, warm.stream)

    def _client_has_spoken(self, nursery: trio.Nursery) -> None:
        if self._client_spoke:
            return
        self._client_spoke = True
        self._release_early_slot()
        if self._connect_deferred:
            self._connect_deferred = False
            self._open_upstream_soon(nursery)

    def _release_early_slot(self) -> None:
        if self._early_slot:
            self._early_slot = False
            self.services.early_upstreams.count -= 1

    def _start_reader_soon(self, side: Side, stream: trio.abc.ReceiveStream) -> None:
        # Readers live in the authentication nursery, which is open whenever a connect
        # task runs (the connect task is one of its children).
        if self._nursery is None:
            raise RuntimeError("reader started outside the authentication phase")
        self._nursery.start_soon(self._reader, side, stream)

    async def _start_tls(self, nursery: trio.Nursery, side: Side, preface: bytes) -> None:
        held = await self._stop_reader(side)
        if held:
            # Plaintext that arrived after the STARTTLS exchange must never be executed
            # inside TLS (the CVE-2011-0411 class of command injection).
            self._log.warning(
                "%s: %s sent data right after STARTTLS; closing", self.conn_id, side.value
            )
            raise _Stop
        if side is Side.CLIENT:
            if self._client_context is None:
                raise RuntimeError("STARTTLS on a listener without a certificate")
            try:
                await self.client.send_all(preface)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _Stop from exc
            try:
                # The TLS stream owns the connection from here on, whatever the handshake does.
                tls = self.client = wrap_tls(self.client, self._client_context, server_side=True)
            except trio.BrokenResourceError as exc:
                self._log.info("%s: client left before TLS: %s", self.conn_id, exc)
                raise _Stop from exc
            timeout = self.services.limits.tls_handshake_timeout
        else:
            if self.server is None:
                raise RuntimeError("STARTTLS towards an upstream that is not connected")
            if preface:
                try:
                    await self.server.send_all(preface)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._pending.appendleft(ServerUnavailable(f"upstream went away: {exc}"))
                    return
            host, port = self.listener.upstream_host, self.listener.upstream_port
            sessions = self._upstream_sessions
            try:
                tls = self.server = wrap_tls(
                    self.server,
                    self._upstream_context,
                    server_hostname=host,
                    session=sessions.get(host, port) if sessions is not None else None,
                    on_session=sessions.recorder(host, port) if sessions is not None else None,
                )
            except trio.BrokenResourceError as exc:
                self._pending.appendleft(ServerUnavailable(f"upstream went away: {exc}"))
                return
            timeout = self.services.limits.upstream_timeout
        try:
            with trio.fail_after(timeout):
                await tls.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError) as exc:
            what = (
                "client"
                if side is Side.CLIENT
                else (f"upstream {self.listener.upstream_host}:{self.listener.upstream_port}")
            )
            text = "timed out" if isinstance(exc, trio.TooSlowError) else describe_tls_error(exc)
            if side is Side.SERVER:
                self.services.metrics.upstream_failure(
                    self.listener.name,
                    UpstreamFailure.TIMEOUT
                    if isinstance(exc, trio.TooSlowError)
                    else UpstreamFailure.TLS,
                )
                if self._upstream_sessions is not None:
                    self._upstream_sessions.forget(
                        self.listener.upstream_host, self.listener.upstream_port
                    )
                self._pending.appendleft(ServerUnavailable(f"{what}: STARTTLS {text}"))
                return
            self._log.info("%s: %s: TLS handshake %s", self.conn_id, what, text)
            raise _Stop from exc
        if side is Side.CLIENT:
            self.client_certificate = peer_certificate(tls)
        await nursery.start(self._reader, side, tls)
        self._pending.appendleft(TlsEstablished(side))

    async def _obtain_token(self, credentials: AnyCredentials) -> None:
        if self._attempt is not None:  # the client tries again after an upstream refusal
            self._finish_attempt(AuditResult.FAILURE)
        kind = CREDENTIAL_KINDS[type(credentials)]
        decision = await self._decide(credentials)
        self._deciding = None
        if isinstance(decision, _Refused):
            self._audit(credentials.login, decision.result, decision.reason, decision.mailbox, kind)
            self.services.metrics.login(self.listener.protocol.value, decision.counted_as)
            await self._tx.send(TokenRefused(decision.refusal))
            return
        # Audited once the upstream has answered (see _execute).
        self._attempt = _Attempt(
            decision.login, decision.issued.mailbox, kind, started=trio.current_time()
        )
        await self._tx.send(decision.issued)

    async def _decide(self, credentials: AnyCredentials) -> _Accepted | _Refused:
        """The login's steps: the throttle, the credentials, the token, its claims."""
        certificate = self.client_certificate
        key = self.services.authenticator.throttle_key(credentials, certificate)
        refused = await self._throttle(credentials.login, key)
        if refused is not None:
            return refused
        identity = await self._check_credentials(credentials, key, certificate)
        if isinstance(identity, _Refused):
            return identity
        token = await self._fetch_token(credentials.login, identity)
        if isinstance(token, _Refused):
            return token
        refused = await self._check_claims(credentials.login, identity, token)
        if refused is not None:
            return refused
        self._log.info(
            "%s: login %r accepted for mailbox %r (app %r)",
            self.conn_id,
            identity.login,
            identity.mailbox,
            identity.app,
        )
        provider = self.services.app_providers.get(identity.app, "")
        if identity.app in self.services.delegated:
            provider = "delegated"
        issued = TokenIssued(mailbox=identity.mailbox, token=token, provider=provider)
        return _Accepted(issued, identity.login)

    async def _throttle(self, login: str, key: str) -> _Refused | None:
        """Refuse a locked-out login without checking it; wait out a failure delay."""
        verdict = await self.services.throttle.verdict(key, self.peer)
        if verdict.locked:
            self._log.warning(
                "%s: login %r from %s refused without checking: %s",
                self.conn_id,
                login,
                self.peer,
                verdict.locked,
            )
            return _Refused(
                Refusal.CREDENTIALS,
                AuditResult.FAILURE,
                verdict.locked,
                counted_as=LoginResult.LOCKED_OUT,
            )
        if verdict.delay:
            self._log.info(
                "%s: login %r from %s delayed %gs after recent failures",
                self.conn_id,
                login,
                self.peer,
                verdict.delay,
            )
            await trio.sleep(verdict.delay)
        return None

    async def _check_credentials(
        self, credentials: AnyCredentials, key: str, certificate: bytes | None
    ) -> Identity | _Refused:
        """Who the credentials name; failures are counted, a full hash queue is "busy"."""
        throttle, limits = self.services.throttle, self.services.limits

        def gate() -> str | None:
            # Asked again when the password check's turn comes: attempts made in parallel
            # all passed the first check before any of them failed.
            return throttle.local_verdict(key, self.peer).locked

        started = trio.current_time()
        try:
            identity = await self.services.authenticator.authenticate(
                credentials,
                self.listener.protocol,
                certificate=certificate,
                network=throttle.policy.network_of(self.peer),
                deadline=trio.current_time() + limits.hash_queue_timeout,
                gate=gate,
            )
        except Busy as exc:
            self._log.warning(
                "%s: login %r from %s: busy, try again later: %s",
                self.conn_id,
                credentials.login,
                self.peer,
                exc,
            )
            return _Refused(
                Refusal.UNAVAILABLE,
                AuditResult.TEMPORARY_FAILURE,
                f"busy: {exc}",
                counted_as=LoginResult.BUSY,
            )
        except BadCredentials as exc:
            self._phase(Phase.PASSWORD_CHECK, started)
            if not isinstance(exc, LockedOut):
                await throttle.failed(key, self.peer)
            self._log.info("%s: login %r refused: %s", self.conn_id, credentials.login, exc.reason)
            return _Refused(
                Refusal.CREDENTIALS,
                AuditResult.FAILURE,
                exc.reason,
                counted_as=(
                    LoginResult.LOCKED_OUT
                    if isinstance(exc, LockedOut)
                    else LoginResult.BAD_CREDENTIALS
                ),
            )
        self._phase(Phase.PASSWORD_CHECK, started)
        await throttle.succeeded(key, self.peer)
        return identity

    def _phase(self, phase: Phase, started: float) -> None:
        self.services.metrics.phase(
            self.listener.protocol.value, phase, trio.current_time() - started
        )

    async def _fetch_token(self, login: str, identity: Identity) -> AccessToken | _Refused:
        timeout = self.services.limits.token_timeout
        # A delegated app's tokens are the signed-in account's, whatever mailbox it opens.
        delegated = identity.app in self.services.delegated
        owner = (identity.account or identity.mailbox) if delegated else identity.mailbox
        started = trio.current_time()
        try:
            with trio.fail_after(timeout):
                token = await self.services.tokens.token(identity.app, mailbox=owner)
            self._phase(Phase.TOKEN, started)
            return token
        except trio.TooSlowError:
            self._log.warning(
                "%s: login %r: no token for app %r within %gs",
                self.conn_id,
                login,
                identity.app,
                timeout,
            )
            return _Refused(
                Refusal.UNAVAILABLE,
                AuditResult.TEMPORARY_FAILURE,
                "no token in time",
                identity.mailbox,
                LoginResult.IDP_TEMPORARY,
            )
        except SignInRequired as exc:
            command = f"{exc.command or 'xoauth2-proxy authorize'} {identity.login}"
            self._log.error(
                "%s: login %r: no token: %s [%s]. Fix: run `%s` as the user the proxy runs "
                "as, and sign in as %s.",
                self.conn_id,
                login,
                exc,
                exc.code,
                command,
                exc.account or owner,
            )
            return _Refused(
                Refusal.UNAVAILABLE,
                AuditResult.TEMPORARY_FAILURE,
                f"sign-in required ({exc.code}): run `{command}`",
                identity.mailbox,
                LoginResult.SIGN_IN_REQUIRED,
            )
        except BrokerError as exc:
            code = f" {exc.code}" if exc.code else ""
            fix = f" Fix: {exc.fix}" if exc.fix else ""
            self._log.error(
                "%s: login %r: no token (%s error%s): %s.%s",
                self.conn_id,
                login,
                exc.kind,
                code,
                exc,
                fix,
            )
            return _Refused(
                Refusal.UNAVAILABLE,
                AuditResult.TEMPORARY_FAILURE,
                f"no token ({exc.kind} error{code})",
                identity.mailbox,
                _idp_result(exc),
            )

    async def _check_claims(
        self, login: str, identity: Identity, token: AccessToken
    ) -> _Refused | None:
        """The token must be what the app asks for, or the upstream would refuse it: its
        issuer, audience, scope and tenant (:func:`broker.claims.check_token`), and for a
        Microsoft app the protocol's role. A token that is not is never sent."""
        app = identity.app
        timeout = self.services.limits.token_timeout
        try:
            with trio.fail_after(timeout):
                expected = await self.services.tokens.expectations(app)
        except (BrokerError, trio.TooSlowError) as exc:
            why = str(exc) if isinstance(exc, BrokerError) else f"no answer within {timeout:g}s"
            fix = f" Fix: {exc.fix}" if isinstance(exc, BrokerError) and exc.fix else ""
            self._log.error(
                "%s: login %r: cannot learn what the tokens of app %r must say, so the token "
                "is not used: %s.%s",
                self.conn_id,
                login,
                app,
                why,
                fix,
            )
            return _Refused(
                Refusal.UNAVAILABLE,
                AuditResult.TEMPORARY_FAILURE,
                "token not checked",
                identity.mailbox,
                _idp_result(exc) if isinstance(exc, BrokerError) else LoginResult.IDP_TEMPORARY,
            )
        problems = check_token(expected, token)
        for problem in problems:
            self._log.error(
                "%s: login %r: the token of app %r is refused before use: its %s is %s, "
                "expected %s. Fix: %s",
                self.conn_id,
                login,
                app,
                problem.claim,
                problem.value,
                problem.expected,
                problem.fix,
            )
        if problems:
            return _Refused(
                Refusal.UNAVAILABLE,
                AuditResult.TEMPORARY_FAILURE,
                f"token {problems[0].claim} is {problems[0].value}, "
                f"expected {problems[0].expected}",
                identity.mailbox,
                LoginResult.TOKEN_INVALID,
            )
        if self.services.app_providers.get(app) != "microsoft":
            return None
        if app in self.services.delegated:
            return self._check_permission(login, identity, token)
        protocol = self.listener.protocol
        role = REQUIRED_ROLES[protocol]
        try:
            roles = token_roles(token.value)
        except ValueError:
            roles = frozenset()
        if role in roles:
            return None
        self._log.error(
            "%s: login %r: the token of app %r lacks the %s role (its roles: %s), so %s "
            "would refuse it. An administrator must add the application permission %s to the "
            "app registration and grant admin consent.",
            self.conn_id,
            login,
            app,
            role,
            ", ".join(sorted(roles)) or "none",
            protocol.value.upper(),
            role,
        )
        return _Refused(
            Refusal.UNAVAILABLE,
            AuditResult.TEMPORARY_FAILURE,
            f"token lacks the {role} role",
            identity.mailbox,
            LoginResult.MISSING_ROLE,
        )

    def _check_permission(
        self, login: str, identity: Identity, token: AccessToken
    ) -> _Refused | None:
        """A Microsoft delegated token must grant the protocol's permission (in the token
        response's scope, or a JWT's ``scp``), or Exchange would refuse it."""
        protocol = self.listener.protocol
        wanted = REQUIRED_SCOPES[protocol]
        granted = {s.rsplit("/", 1)[-1] for s in token.scope.split()}
        # Personal accounts' tokens are opaque: then the scope granted decides alone.
        with contextlib.suppress(NotAJwtError):
            granted |= scopes_of(decode_claims(token.value)) or frozenset()
        if wanted in granted:
            return None
        self._log.error(
            "%s: login %r: the token of %s (app %r) lacks the %s permission (granted: %s), "
            "so %s would refuse it. Add the delegated permission %s of Office 365 Exchange "
            "Online to the app registration (and to the app's scope), then sign in again "
            "and consent to it.",
            self.conn_id,
            login,
            identity.account or identity.mailbox,
            identity.app,
            wanted,
            ", ".join(sorted(granted)) or "nothing",
            protocol.value.upper(),
            wanted,
        )
        return _Refused(
            Refusal.UNAVAILABLE,
            AuditResult.TEMPORARY_FAILURE,
            f"token lacks the {wanted} permission",
            identity.mailbox,
            LoginResult.MISSING_ROLE,
        )

    def _progress(self) -> None:
        """The client has our attention again: its next command has line_timeout."""
        self._line_deadline = trio.current_time() + self.services.limits.line_timeout

    def _finish_attempt(self, result: AuditResult, reason: str = "") -> None:
        attempt, self._attempt = self._attempt, None
        if attempt is not None:
            reason = reason or attempt.last_note or "the upstream refused the login"
            self._audit(attempt.login, result, reason, attempt.mailbox, attempt.kind)
            self.services.metrics.login(
                self.listener.protocol.value,
                LoginResult.SUCCESS
                if result is AuditResult.SUCCESS
                else LoginResult.UPSTREAM_REFUSED,
            )

    def _audit(
        self, login: str, result: AuditResult, reason: str, mailbox: str = "", kind: str = ""
    ) -> None:
        """One structured line per authentication attempt (never a secret)."""
        fields = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            "conn": self.conn_id,
            "listener": self.listener.name,
            "protocol": self.listener.protocol.value,
            "source": self.peer,
            "login": login,
            "kind": kind,
            "mailbox": mailbox,
            "result": result.value,
            "reason": reason,
        }
        # Escaped: a name of bidi overrides or zero-width characters must not display as
        # another in a log viewer. The JSON log format writes the fields themselves.
        audit_log.info("%s", json.dumps(fields, ensure_ascii=True), extra={"audit": fields})

    async def _send_quietly(self, stream: trio.abc.SendStream, data: bytes) -> None:
        """Best effort, bounded: the connection is about to close anyway."""
        with (
            trio.move_on_after(2),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await stream.send_all(data)
