"""Listeners and the accept loop: one :class:`~proxy.net.session.Session` per connection.

Shutdown follows trio's idiom: stop accepting (cancel the accept nursery), then give the
handler nursery a deadline (``grace``) for sessions in progress to finish.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import itertools
import json
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from proxy.config import ClientCertificates, Protocol, UpstreamClientAddress
from proxy.files import UnsafeFile, read_trusted
from proxy.hashpool import HashPool
from proxy.identities import DEFAULT_PARAMETERS, Authenticator, parameters_of
from proxy.net import notify
from proxy.net.control import ControlError, open_control_socket, serve_control
from proxy.net.ops_http import HttpRequest, HttpResponse, serve_ops_http
from proxy.net.pool import UpstreamPool
from proxy.net.proxy_protocol import is_trusted, read_proxy_header
from proxy.net.session import AuthMachine, EarlyUpstreams, Services, Session
from proxy.net.shared_throttle import RedisFailures
from proxy.net.tls import (
    SessionCache,
    client_side_context,
    describe_tls_error,
    peer_certificate,
    upstream_context,
)
from proxy.net.tlssocket import wrap_tls
from proxy.ops.metrics import Metrics, ServerState, TokenState
from proxy.protocol import replies
from proxy.protocol.imap import ImapAuth
from proxy.protocol.modes import AuthSettings, ClientTls
from proxy.protocol.pop3 import Pop3Auth
from proxy.protocol.proxy_header import ProxyCommand, ProxyHeaderError, encode_v1, encode_v2
from proxy.protocol.smtp import SmtpAuth, is_hostname
from proxy.throttle import LoginThrottle

if TYPE_CHECKING:
    import ssl
    from collections.abc import Iterable

    from broker.source import TokenSource, TokenStatus
    from proxy.config import Config, ListenerConfig

__all__ = ["BoundListener", "ListenError", "ProxyServer", "auth_machine"]

log = logging.getLogger("xoauth2_proxy.server")


class ListenError(Exception):
    """A listener could not be opened; the message says which, where and why, in one line."""


def describe_listen_error(listener: ListenerConfig, exc: OSError) -> str:
    """One line for an operator: which listener, which address, and what to do."""
    host = f"[{listener.host}]" if ":" in listener.host else listener.host
    where = f"listener {listener.name}: cannot listen on {host}:{listener.port}"
    if isinstance(exc, socket.gaierror):
        return f"{where}: cannot resolve {listener.host!r} ({exc.strerror})"
    match exc.errno:
        case errno.EADDRINUSE:
            why = "the port is already in use (by another program, or another instance)"
        case errno.EACCES:
            why = (
                "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)"
                if listener.port < 1024
                else "permission denied"
            )
        case errno.EADDRNOTAVAIL:
            why = "the address does not belong to this host"
        case _:
            why = exc.strerror or str(exc)
    return f"{where}: {why}"


@dataclass(frozen=True, slots=True)
class BoundListener:
    """A configured listener and the address it actually listens on."""

    config: ListenerConfig
    host: str
    port: int


def auth_machine(listener: ListenerConfig, *, app_keys: bool) -> tuple[AuthMachine, bytes]:
    """The protocol machine for a new connection, and the reply for a login timeout.

    SASL EXTERNAL is offered where the listener asks for client certificates, XOAUTH2
    and OAUTHBEARER where any user has an app key (``app_keys``).
    """
    settings = AuthSettings(
        client_tls=listener.tls,
        upstream_tls=listener.upstream_tls,
        sasl_external=listener.client_certificates is not ClientCertificates.NONE,
        sasl_bearer=app_keys,
    )
    match listener.protocol:
        case Protocol.IMAP:
            return ImapAuth(settings), replies.IMAP_BYE_TIMEOUT
        case Protocol.POP3:
            return Pop3Auth(settings), replies.POP3_TIMEOUT
        case Protocol.SMTP:
            return SmtpAuth(settings, hostname=_smtp_hostname(listener)), replies.SMTP_TIMEOUT


def _has_app_keys(config: Config) -> bool:
    return any(user.app_key_hashes for user in config.users.values())


@functools.cache
def _default_hostname() -> str:
    name = socket.getfqdn()
    return name if is_hostname(name) else "localhost"


def _smtp_hostname(listener: ListenerConfig) -> str:
    return listener.hostname or _default_hostname()


def _busy_reply(listener: ListenerConfig) -> bytes:
    """What a client over the connection limits is told before the proxy hangs up."""
    match listener.protocol:
        case Protocol.IMAP:
            return replies.IMAP_BYE_BUSY
        case Protocol.POP3:
            return replies.POP3_BUSY
        case Protocol.SMTP:
            return replies.SMTP_BUSY


@dataclass(eq=False, slots=True)
class _Listening:
    """A listener's sockets, the configuration new connections get (replaced by reloads
    that keep its address) and what it is serving."""

    config: ListenerConfig
    sockets: list[trio.SocketListener]
    #: Connections open now.
    open: int = 0
    #: The accept loop's scope: cancelled when a reload removes the listener.
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def report(self) -> list[BoundListener]:
        return [BoundListener(self.config, *s.socket.getsockname()[:2]) for s in self.sockets]

    async def aclose(self) -> None:
        for s in self.sockets:
            await s.aclose()


async def _bind(listeners: tuple[ListenerConfig, ...] | list[ListenerConfig]) -> list[_Listening]:
    """Open every listener's sockets, or none (:class:`ListenError` says which failed)."""
    bound: list[_Listening] = []
    try:
        for listener in listeners:
            try:
                sockets = await trio.open_tcp_listeners(listener.port, host=listener.host)
            except OSError as exc:
                raise ListenError(describe_listen_error(listener, exc)) from None
            bound.append(_Listening(listener, sockets))
    except BaseException:
        for b in bound:
            await b.aclose()
        raise
    return bound


def _log_listening(bound: _Listening) -> None:
    for b in bound.report():
        log.info(
            "listening on %s:%s for %s (tls %s%s) -> %s:%s (upstream tls %s)",
            b.host,
            b.port,
            b.config.protocol.value,
            b.config.tls.name.lower(),
            ", PROXY protocol" if b.config.proxy_protocol else "",
            b.config.upstream_host,
            b.config.upstream_port,
            b.config.upstream_tls.name.lower(),
        )


def _contexts(
    config: Config,
) -> tuple[dict[ListenerConfig, ssl.SSLContext | None], dict[ListenerConfig, SessionCache]]:
    """The TLS contexts of every listener: towards its clients, and towards its upstream
    (with the sessions it resumes there, which a new context starts without)."""
    clients = _client_contexts(config.listeners)
    upstreams = {
        listener: SessionCache(upstream_context(listener.upstream_ca_file))
        for listener in config.listeners
    }
    return clients, upstreams


def _client_contexts(
    listeners: Iterable[ListenerConfig],
) -> dict[ListenerConfig, ssl.SSLContext | None]:
    """The listeners' TLS contexts towards clients. Each new context has new session
    ticket keys: OpenSSL makes them at random, in memory only.

    Raises :exc:`UnsafeFile` if a certificate or CA file breaks the configuration's file
    rules now (:mod:`proxy.files`): they are read again at every ticket-key rotation, long
    after the configuration was checked, and one made accessible to others since is not
    loaded.
    """
    listeners = list(listeners)
    for listener in listeners:
        if listener.certificate is not None:
            read_trusted(listener.certificate, private=True)
        if listener.client_ca_file is not None:
            read_trusted(listener.client_ca_file, private=False)
    return {
        listener: (
            client_side_context(
                listener.certificate,
                client_ca_file=listener.client_ca_file,
                client_certificates=listener.client_certificates,
            )
            if listener.certificate
            else None
        )
        for listener in listeners
    }


class ProxyServer:
    """Serve every configured listener until :meth:`shutdown`.

    Besides the mail listeners: the operations HTTP listener (``[metrics]``: /metrics,
    /healthz, /readyz) and the control socket (``[control]``: status and unlock), both
    opened with the listeners and served until every session has ended.
    """

    def __init__(
        self,
        config: Config,
        tokens: TokenSource,
        *,
        authenticator: Authenticator | None = None,
        grace: float = 30.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        #: The configuration the operations listener and control socket were opened with.
        self.config_at_start = config
        self.grace = grace
        self.tokens = tokens
        self.metrics = metrics or Metrics()
        self.metrics.watch(self)
        # With the token cache in Redis, failed logins are counted there too: instances
        # behind one load balancer share the bound on guesses.
        shared = RedisFailures.from_settings(config.cache) if config.cache.kind == "redis" else None
        self.throttle = LoginThrottle(config.limits.throttle_policy(), shared=shared)
        #: One pool of password-hash workers for the life of the process, across reloads.
        self.hashes = HashPool(
            config.limits.hash_concurrency,
            max_queue=config.limits.hash_queue,
            max_per_network=config.limits.hash_queue_per_network,
        )
        self.early_upstreams = EarlyUpstreams()
        self.services = self._services(config, tokens, authenticator)
        self._app_keys = _has_app_keys(config)
        for listener in config.listeners:
            auth_machine(listener, app_keys=False)  # refuse unsupported protocols before binding
        self._client_contexts, self._upstream_contexts = _contexts(config)
        self._pools = self._make_pools(config)
        #: Where the pools run (the workers' nursery while serving), and their scope.
        self._workers: trio.Nursery | None = None
        self._pools_scope = trio.CancelScope()
        self._ids = itertools.count(1)
        self._listening: list[_Listening] = []
        #: Connections open per listener name (removed listeners' sessions included).
        self._open_by_name: collections.Counter[str] = collections.Counter()
        self._connections_from: collections.Counter[str] = collections.Counter()
        self._stop = trio.Event()
        self._accepting: trio.Nursery | None = None
        self._handlers: trio.Nursery | None = None
        #: Listeners bound and accepting; not stopping.
        self.ready = False
        self.stopping = False

    def _services(
        self, config: Config, tokens: TokenSource, authenticator: Authenticator | None
    ) -> Services:
        """What sessions share; the throttle, hash pool and early-upstream count live as
        long as the process, across reloads."""
        if authenticator is None:
            # Unknown users are checked against a dummy hash as costly as the real ones.
            costs = [
                p
                for u in config.users.values()
                for h in u.password_hashes
                if (p := parameters_of(h))
            ]
            # The costliest hash in use: an unknown login must not answer faster than any.
            typical = max(
                costs, key=lambda p: (p.memory_cost * p.iterations, p.lanes), default=None
            )
            metrics = self.metrics
            authenticator = Authenticator(
                config.users,
                hashes=self.hashes,
                cache_ttl=config.limits.credential_cache_ttl,
                dummy_parameters=typical or DEFAULT_PARAMETERS,
                on_lookup=lambda hit: metrics.credential_lookup(hit=hit),
            )
        return Services(
            authenticator=authenticator,
            tokens=tokens,
            limits=config.limits,
            app_providers={name: app.provider for name, app in config.apps.items()},
            delegated=frozenset(name for name, app in config.apps.items() if app.delegated),
            throttle=self.throttle,
            early_upstreams=self.early_upstreams,
            metrics=self.metrics,
        )

    async def reload(self, config: Config, tokens: TokenSource) -> bool:
        """Use ``config`` for new connections and logins; sessions in progress keep what
        they started with, whatever their listener becomes.

        Listeners whose address stays keep their sockets (new connections get the new
        settings); new ones are opened, removed ones closed. If anything cannot be used
        (a certificate, an address), nothing changes and ``False`` is returned.
        """
        try:
            client_contexts, upstream_contexts = _contexts(config)
            for listener in config.listeners:
                auth_machine(listener, app_keys=False)
        except (UnsafeFile, OSError, ValueError) as exc:
            log.error("reload refused: %s; keeping the previous configuration", exc)
            self.metrics.reloads.labels("failure").inc()
            return False
        kept, added, removed = self._plan(config.listeners)
        try:
            opened = await _bind(added)
        except ListenError as exc:
            log.error("reload refused: %s; keeping the previous configuration", exc)
            self.metrics.reloads.labels("failure").inc()
            return False
        # New connections use the new certificates (renewed at the same path, say).
        self._client_contexts, self._upstream_contexts = client_contexts, upstream_contexts
        # Warm connections were checked against the old upstream contexts: new pools.
        self._pools = self._make_pools(config)
        self._start_pools()
        for bound, listener in kept:
            bound.config = listener
        for bound in removed:
            bound.scope.cancel()
            await bound.aclose()
            self._listening.remove(bound)
            log.info(
                "no longer listening on %s (%d sessions in progress go on)",
                bound.config.name,
                bound.open,
            )
        for bound in opened:
            await self._start_accepting(bound)
            _log_listening(bound)
        self.config = config
        self.tokens = tokens
        # Failure counts survive a reload; the new limits apply to them.
        self.throttle.policy = config.limits.throttle_policy()
        limits = config.limits
        if limits.hash_concurrency != self.hashes.concurrency:
            log.warning(
                "limits.hash_concurrency changed: takes effect only after a restart (still %d)",
                self.hashes.concurrency,
            )
        self.hashes.max_queue = limits.hash_queue
        self.hashes.max_per_network = limits.hash_queue_per_network
        self.services = self._services(config, tokens, None)
        self._app_keys = _has_app_keys(config)
        if config.metrics != self.config_at_start.metrics:
            log.warning("[metrics] changed: the new listener takes effect only after a restart")
        if config.control_socket != self.config_at_start.control_socket:
            log.warning("[control] changed: the new socket takes effect only after a restart")
        self.metrics.reloads.labels("success").inc()
        log.info(
            "configuration reloaded: %d apps, %d users, %d listeners",
            len(config.apps),
            len(config.users),
            len(config.listeners),
        )
        return True

    def _plan(
        self, listeners: tuple[ListenerConfig, ...]
    ) -> tuple[list[tuple[_Listening, ListenerConfig]], list[ListenerConfig], list[_Listening]]:
        """Which bound listeners stay (and their new settings), which to open, which to
        close. A listener stays if its settings are the same, or its address is (a fixed
        port: port 0 means a new port each time)."""
        unmatched = list(self._listening)
        kept: list[tuple[_Listening, ListenerConfig]] = []
        rest: list[ListenerConfig] = []
        for listener in listeners:
            same = next((b for b in unmatched if b.config == listener), None)
            if same is None:
                rest.append(listener)
                continue
            unmatched.remove(same)
            kept.append((same, listener))
        added: list[ListenerConfig] = []
        for listener in rest:
            moved = next(
                (
                    b
                    for b in unmatched
                    if listener.port != 0
                    and (b.config.host, b.config.port) == (listener.host, listener.port)
                ),
                None,
            )
            if moved is None:
                added.append(listener)
            else:
                unmatched.remove(moved)
                kept.append((moved, listener))
        return kept, added, unmatched

    def _make_pools(self, config: Config) -> dict[ListenerConfig, UpstreamPool]:
        limits = config.limits
        return {
            listener: UpstreamPool(
                listener,
                self._upstream_contexts[listener].context,
                self._upstream_contexts[listener],
                size=limits.upstream_pool,
                max_age=limits.upstream_pool_max_age,
                timeout=limits.upstream_timeout,
                metrics=self.metrics,
            )
            for listener in config.listeners
        }

    def _start_pools(self) -> None:
        """Run the current pools (in place of the previous ones, which close)."""
        self._pools_scope.cancel()
        if self._workers is None:
            return
        self._pools_scope = trio.CancelScope()
        self._workers.start_soon(self._run_pools, list(self._pools.values()), self._pools_scope)

    @staticmethod
    async def _run_pools(pools: list[UpstreamPool], scope: trio.CancelScope) -> None:
        with scope:
            async with trio.open_nursery() as nursery:
                for pool in pools:
                    nursery.start_soon(pool.run)

    def rotate_ticket_keys(self) -> bool:
        """New TLS session ticket keys for every listener, by way of new client-side
        contexts (with the certificates as they are now on disk).

        Tickets issued before no longer resume: a client holding one does a full handshake
        and gets a new ticket. If a certificate cannot be read now, the previous keys stay
        in use and ``False`` is returned.
        """
        try:
            contexts = _client_contexts(self._client_contexts)
        except (UnsafeFile, OSError, ValueError) as exc:
            log.warning("TLS session ticket keys not rotated, the previous ones stay: %s", exc)
            return False
        self._client_contexts = contexts
        log.debug("TLS session ticket keys rotated")
        return True

    async def _rotate_ticket_keys(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Rotate ticket keys every ``ticket_key_lifetime`` seconds (of the configuration
        in use at the time)."""
        task_status.started()
        while True:
            await trio.sleep(self.config.limits.ticket_key_lifetime)
            self.rotate_ticket_keys()

    def shutdown(self) -> None:
        """Stop accepting connections; sessions in progress get ``grace`` seconds."""
        self.stopping = True
        self._stop.set()

    async def serve(
        self, *, task_status: trio.TaskStatus[list[BoundListener]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind every listener, report them through ``task_status``, serve until shutdown.

        Raises :class:`ListenError` if a listener cannot be opened (none is left open).
        """
        self.config_at_start = self.config
        bound = await _bind(self.config.listeners)
        try:
            ops = await self._open_operations()
        except BaseException:
            for b in bound:
                await b.aclose()
            raise
        try:
            async with trio.open_nursery() as workers:
                await workers.start(self.hashes.run)
                await workers.start(self._rotate_ticket_keys)
                for start in ops:
                    await workers.start(start)
                self._workers = workers
                self._start_pools()
                await self._serve_bound(bound, task_status)
                self._workers = None
                workers.cancel_scope.cancel()  # every session has ended
        finally:
            self._close_control_socket()
            if self.throttle.shared is not None:
                self.throttle.shared.close()

    async def _open_operations(self) -> list[Any]:
        """Bind the operations listener and the control socket (what to start, in order)."""
        starts: list[Any] = []
        settings = self.config.metrics
        if settings is not None:
            try:
                sockets = await trio.open_tcp_listeners(settings.port, host=settings.host)
            except OSError as exc:
                where = _http_host(settings.host, settings.port)
                raise ListenError(
                    f"[metrics] listen: cannot listen on {where}: {exc.strerror or exc}"
                ) from None
            for s in sockets:
                host, port = s.socket.getsockname()[:2]
                log.info("metrics and health on http://%s/metrics", _http_host(host, port))
            self.operations_address = sockets[0].socket.getsockname()[:2]
            starts.append(functools.partial(serve_ops_http, sockets, self.answer_http))
        path = self.config.control_socket
        if path is not None:
            try:
                sock = open_control_socket(path)
            except BaseException as exc:
                for start in starts:
                    for s in start.args[0]:
                        await s.aclose()
                if isinstance(exc, ControlError):
                    raise ListenError(f"[control] socket: {exc}") from None
                raise
            log.info("control socket at %s (xoauth2-proxy status, unlock)", path)
            starts.append(functools.partial(serve_control, sock, self.answer_control))
        return starts

    def _close_control_socket(self) -> None:
        path = self.config_at_start.control_socket
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()

    async def _start_accepting(self, bound: _Listening) -> None:
        assert self._accepting is not None
        assert self._handlers is not None
        handlers = self._handlers

        async def accept(*, task_status: trio.TaskStatus[None]) -> None:
            with bound.scope:
                task_status.started()
                await trio.serve_listeners(
                    functools.partial(self._handle, bound), bound.sockets, handler_nursery=handlers
                )

        await self._accepting.start(accept)
        self._listening.append(bound)

    async def _serve_bound(
        self, bound: list[_Listening], task_status: trio.TaskStatus[list[BoundListener]]
    ) -> None:
        async with trio.open_nursery() as handlers:
            self._handlers = handlers
            async with trio.open_nursery() as accepting:
                self._accepting = accepting
                for b in bound:
                    await self._start_accepting(b)
                    _log_listening(b)
                self.ready = True
                notify.notify("READY=1", f"STATUS={self._status_line()}")
                task_status.started([r for b in bound for r in b.report()])
                await self._stop.wait()
                self.stopping = True
                accepting.cancel_scope.cancel()
            # Closed, so that new connections are refused at once rather than left waiting
            # in the backlog.
            for b in self._listening:
                await b.aclose()
            self._accepting = None
            log.info(
                "no longer accepting; %g s for %d sessions in progress",
                self.grace,
                sum(self._open_by_name.values()),
            )
            notify.notify(
                "STOPPING=1",
                f"STATUS=stopping: {sum(self._open_by_name.values())} sessions in progress",
            )
            handlers.cancel_scope.deadline = trio.current_time() + self.grace

    @property
    def sessions_open(self) -> int:
        """Client connections open now, on every listener."""
        return sum(self._open_by_name.values())

    def _status_line(self) -> str:
        return f"{len(self._listening)} listeners, {sum(self._open_by_name.values())} sessions"

    # -- connections ------------------------------------------------------------------------

    async def _handle(self, bound: _Listening, stream: trio.SocketStream) -> None:
        listener = bound.config  # the settings at accept time, whatever reloads do
        conn_id = f"{listener.protocol.value}#{next(self._ids)}"
        contexts = self._client_contexts.get(listener), self._upstream_contexts.get(listener)
        try:
            peer = stream.socket.getpeername()
            local = stream.socket.getsockname()
        except OSError:  # already gone
            await trio.aclose_forcefully(stream)
            return
        client = (str(peer[0]), int(peer[1]))
        via = ""
        if listener.proxy_protocol:
            header_client = await self._proxy_header(listener, stream, conn_id, client)
            if header_client is None:
                await trio.aclose_forcefully(stream)
                return
            if header_client != client:
                via = f" via {client[0]}:{client[1]}"
                client = header_client
        self.metrics.sessions.labels(listener.name).inc()
        address = client[0]
        limits = self.config.limits
        network = self.throttle.policy.network_of(address)
        if (
            bound.open >= limits.max_connections
            or self._connections_from[network] >= limits.max_connections_per_network
        ):
            log.warning(
                "%s: connection from %s:%s%s on %s refused: too many connections (%d on the "
                "listener, %d from network %s)",
                conn_id,
                address,
                client[1],
                via,
                listener.name,
                bound.open,
                self._connections_from[network],
                network,
            )
            self.metrics.refused.labels(listener.name, "too_many").inc()
            if listener.tls is not ClientTls.IMPLICIT:  # a TLS client could not read it
                with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(_busy_reply(listener))
            await trio.aclose_forcefully(stream)
            return
        bound.open += 1
        self._open_by_name[listener.name] += 1
        self._connections_from[network] += 1
        try:
            await self._serve_connection(
                listener,
                stream,
                conn_id,
                client,
                via,
                contexts,
                _upstream_preface(listener, client, (str(local[0]), int(local[1]))),
            )
        finally:
            bound.open -= 1
            self._open_by_name[listener.name] -= 1
            if not self._open_by_name[listener.name]:
                del self._open_by_name[listener.name]
            self._connections_from[network] -= 1
            if not self._connections_from[network]:
                del self._connections_from[network]

    async def _proxy_header(
        self,
        listener: ListenerConfig,
        stream: trio.SocketStream,
        conn_id: str,
        peer: tuple[str, int],
    ) -> tuple[str, int] | None:
        """The client a trusted balancer's PROXY header names (the balancer itself for a
        LOCAL header), or ``None`` to close the connection."""
        if not is_trusted(peer[0], listener.trusted_proxies):
            log.warning(
                "%s: connection from %s:%s on %s closed: not in trusted_proxies, and this "
                "listener expects a PROXY protocol header",
                conn_id,
                peer[0],
                peer[1],
                listener.name,
            )
            self.metrics.refused.labels(listener.name, "untrusted_proxy").inc()
            return None
        timeout = self.config.limits.proxy_header_timeout
        try:
            with trio.fail_after(timeout):
                header = await read_proxy_header(stream)
        except (ProxyHeaderError, trio.TooSlowError, OSError) as exc:
            why = (
                f"no PROXY header within {timeout:g}s"
                if isinstance(exc, trio.TooSlowError)
                else str(exc)
                if isinstance(exc, ProxyHeaderError)
                else f"connection broken: {exc.strerror or exc}"
            )
            log.warning(
                "%s: connection from proxy %s:%s on %s closed: %s",
                conn_id,
                peer[0],
                peer[1],
                listener.name,
                why,
            )
            self.metrics.refused.labels(listener.name, "bad_proxy_header").inc()
            return None
        if header.command is ProxyCommand.LOCAL or header.source is None:
            return peer  # the balancer's own connection (a health check)
        return header.source

    async def _serve_connection(
        self,
        listener: ListenerConfig,
        stream: trio.SocketStream,
        conn_id: str,
        peer: tuple[str, int],
        via: str,
        contexts: tuple[ssl.SSLContext | None, SessionCache | None],
        upstream_preface: bytes,
    ) -> None:
        client: trio.abc.Stream = stream
        context, upstream = contexts
        closed_by_session = False
        try:
            log.info(
                "%s: connection from %s:%s%s on %s",
                conn_id,
                peer[0],
                peer[1],
                via,
                listener.name,
                extra={"conn": conn_id, "listener": listener.name},
            )
            if upstream is None:  # a listener a reload has just replaced
                return
            if listener.tls is ClientTls.IMPLICIT:
                assert context is not None  # config guarantees a certificate
                try:
                    # The TLS stream owns the connection from here on.
                    tls = wrap_tls(stream, context, server_side=True)
                    client = tls
                    with trio.fail_after(self.config.limits.tls_handshake_timeout):
                        await tls.do_handshake()
                except (trio.BrokenResourceError, trio.TooSlowError) as exc:
                    text = (
                        "timed out"
                        if isinstance(exc, trio.TooSlowError)
                        else describe_tls_error(exc)
                    )
                    log.info("%s: client TLS handshake %s", conn_id, text)
                    return
            certificate = peer_certificate(client)  # once, while the handshake is fresh
            machine, timeout_reply = auth_machine(listener, app_keys=self._app_keys)
            session = Session(
                conn_id=conn_id,
                peer=peer[0],
                listener=listener,
                machine=machine,
                services=self.services,
                client=client,
                client_context=context,
                upstream_context=upstream.context,
                upstream_sessions=upstream,
                upstream_pool=self._pools.get(listener),
                timeout_reply=timeout_reply,
                client_certificate=certificate,
                upstream_preface=upstream_preface,
            )
            del machine  # the session's alone: it lets go of it once logged in
            # From here the session closes the streams, whatever happens (Session.run).
            closed_by_session = True
            await session.run()
        except Exception:
            # A bug in one session must not take every other session down with it.
            log.exception("%s: internal error; connection closed", conn_id)
        finally:
            # Whatever happened before the session ran, cancellation at shutdown included.
            if not closed_by_session:
                await trio.aclose_forcefully(client)

    # -- operations -------------------------------------------------------------------------

    def state(self) -> ServerState:
        """What the metrics report at each scrape."""
        lockouts: collections.Counter[str] = collections.Counter(
            lockout.scope for lockout in self.throttle.lockouts()
        )
        now = time.time()
        soonest: dict[str, float | None] = {}
        for token in self._token_statuses():
            expires = token.expires_at - now if token.expires_at is not None else None
            current = soonest.get(token.app)
            if expires is not None and (current is None or expires < current):
                soonest[token.app] = expires
            else:
                soonest.setdefault(token.app, current)
        return ServerState(
            sessions_open=dict(self._open_by_name),
            hash_queued=self.hashes.queued,
            hash_running=self.hashes.running,
            lockouts=dict(lockouts),
            tokens=tuple(TokenState(app, expires) for app, expires in soonest.items()),
            upstream_pool_ready={
                listener.name: len(pool) for listener, pool in self._pools.items() if pool.size
            },
        )

    def _token_statuses(self) -> list[TokenStatus]:
        status = getattr(self.tokens, "status", None)
        return list(status()) if callable(status) else []

    def readiness(self) -> list[str]:
        """What keeps the proxy from being ready to serve (empty: ready)."""
        if self.stopping:
            return ["shutting down: no longer accepting connections"]
        if not self.ready:
            return ["listeners not open yet"]
        problems: list[str] = []
        by_app: dict[str, list[TokenStatus]] = collections.defaultdict(list)
        for token in self._token_statuses():
            # One person's missing sign-in concerns that person's logins, not the proxy's
            # readiness (status and doctor show it).
            if not token.sign_in_required:
                by_app[token.app].append(token)
        for app in self.config.apps:
            tokens = by_app.get(app, [])
            # Ready with a valid token, or when the last fetch succeeded (a token being
            # renewed); an app whose tokens are per mailbox and that has none yet is not
            # known to be failing.
            if any(t.valid or (t.failures == 0 and t.expires_at is not None) for t in tokens):
                continue
            if not tokens and app not in self._app_wide():
                continue
            failing = [t for t in tokens if t.failures]
            if failing:
                error = failing[0].last_error or "unknown error"
                problems.append(f"app {app}: no valid token; the last request failed: {error}")
            else:
                problems.append(f"app {app}: no token yet")
        return problems

    def _app_wide(self) -> set[str]:
        per_mailbox = getattr(self.tokens, "per_mailbox", None)
        if not callable(per_mailbox):
            return set(self.config.apps)
        return {app for app in self.config.apps if not per_mailbox(app)}

    def answer_http(self, request: HttpRequest) -> HttpResponse:
        """/metrics, /healthz and /readyz."""
        if request.path == "/metrics":
            body, content_type = self.metrics.exposition(request.accept)
            return HttpResponse(200, body, content_type)
        if request.path == "/healthz":
            return _json(200, {"status": "ok"})
        if request.path == "/readyz":
            problems = self.readiness()
            if problems:
                return _json(503, {"status": "not ready", "problems": problems})
            return _json(200, {"status": "ready"})
        return HttpResponse(404, b"not found: try /metrics, /healthz or /readyz\n")

    async def answer_control(self, message: dict[str, Any]) -> dict[str, Any]:
        """The control socket's commands: ``status`` and ``unlock``."""
        command = message.get("command")
        if command == "status":
            answer = self.status()
            answer["sign_ins"] = await self.sign_ins()
            return answer
        if command == "unlock":
            name = message.get("login")
            if not isinstance(name, str) or not name:
                return {"error": "unlock needs a login (or a network, or a throttle key)"}
            return {"unlocked": await self.unlock(name)}
        await trio.lowlevel.checkpoint()
        return {"error": f"unknown command {command!r}"}

    def status(self) -> dict[str, Any]:
        """Everything ``xoauth2-proxy status`` shows (no secret: names, times, counts)."""
        now = time.time()
        listeners = [
            {
                "name": b.config.name,
                "address": [f"{r.host}:{r.port}" for r in b.report()],
                "protocol": b.config.protocol.value,
                "sessions": b.open,
                "proxy_protocol": b.config.proxy_protocol,
            }
            for b in self._listening
        ]
        tokens = [
            {
                "app": t.app,
                "mailbox": t.mailbox,
                "valid": t.valid,
                "expires_in": round(t.expires_at - now) if t.expires_at is not None else None,
                "failures": t.failures,
                "last_error": t.last_error,
                "error_kind": t.error_kind,
                "fetching": t.fetching,
            }
            for t in sorted(self._token_statuses(), key=lambda t: (t.app, t.mailbox or ""))
        ]
        lockouts = [
            {
                "scope": lock.scope,
                "key": lock.key,
                "failures": lock.failures,
                "remaining": round(lock.remaining),
                "everywhere": lock.everywhere,
            }
            for lock in self.throttle.lockouts()
        ]
        return {
            "ready": not self.readiness(),
            "problems": self.readiness(),
            "listeners": listeners,
            "sessions": sum(self._open_by_name.values()),
            "tokens": tokens,
            "lockouts": lockouts,
            "hash_queue": {"queued": self.hashes.queued, "running": self.hashes.running},
        }

    async def sign_ins(self) -> list[dict[str, Any]]:
        """Each delegated app's accounts: signed in (when, as whom), or why not (read from
        the token cache; the identity provider is not asked). No secret."""
        await trio.lowlevel.checkpoint()
        describe = getattr(self.tokens, "sign_in_status", None)
        if not callable(describe):
            return []
        found: list[dict[str, Any]] = []
        for app, accounts in sorted(self.config.delegated_accounts().items()):
            for account, logins in sorted(accounts.items()):
                status = await describe(app, account)
                found.append(
                    {
                        "app": app,
                        "account": account,
                        "users": logins,
                        "state": status.state.value,
                        "signed_in_as": status.signed_in_as or None,
                        "signed_in_at": status.signed_in_at,
                        "revoked_at": status.revoked_at,
                        "reason": status.reason or None,
                        "fix": status.fix or None,
                    }
                )
        return found

    async def unlock(self, name: str) -> list[str]:
        """Clear the failures of a login (every kind of credential it has), a network, or
        one throttle key; return the keys that had failures."""
        if ":" in name and name.split(":", 1)[0] in ("password", "certificate", "app-key"):
            keys = [name]
        else:
            keys = [name, f"password:{name}", f"app-key:{name}"]
            user = self.config.user(name)
            if user is not None:
                keys += [f"certificate:{f}" for f in sorted(user.certificate_fingerprints)]
            with contextlib.suppress(ValueError):
                keys.append(self.throttle.policy.network_of(name))
        unlocked = [key for key in dict.fromkeys(keys) if await self.throttle.unlock(key)]
        if unlocked:
            log.warning("unlocked by the control socket: %s", ", ".join(unlocked))
        return unlocked


def _json(status: int, body: dict[str, Any]) -> HttpResponse:
    return HttpResponse(status, json.dumps(body).encode() + b"\n", "application/json")


def _http_host(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _upstream_preface(
    listener: ListenerConfig, client: tuple[str, int], local: tuple[str, int]
) -> bytes:
    """The PROXY header naming the client to the upstream, if the listener says so."""
    match listener.upstream_client_address:
        case UpstreamClientAddress.NONE:
            return b""
        case UpstreamClientAddress.PROXY_V1:
            return encode_v1(client, local)
        case UpstreamClientAddress.PROXY_V2:
            return encode_v2(client, local)
