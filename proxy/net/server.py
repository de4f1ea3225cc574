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
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from proxy.config import ClientCertificates, Protocol
from proxy.hashpool import HashPool
from proxy.identities import DEFAULT_PARAMETERS, Authenticator, parameters_of
from proxy.net.session import AuthMachine, EarlyUpstreams, Services, Session
from proxy.net.shared_throttle import RedisFailures
from proxy.net.tls import (
    client_side_context,
    describe_tls_error,
    peer_certificate,
    upstream_context,
)
from proxy.net.tlssocket import wrap_tls
from proxy.protocol import replies
from proxy.protocol.imap import ImapAuth
from proxy.protocol.modes import AuthSettings, ClientTls
from proxy.protocol.pop3 import Pop3Auth
from proxy.protocol.smtp import SmtpAuth, is_hostname
from proxy.throttle import LoginThrottle

if TYPE_CHECKING:
    import ssl

    from broker.source import TokenSource
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


def _contexts(
    config: Config,
) -> tuple[dict[ListenerConfig, ssl.SSLContext | None], dict[ListenerConfig, ssl.SSLContext]]:
    """The TLS contexts of every listener, towards its clients and its upstream."""
    clients: dict[ListenerConfig, ssl.SSLContext | None] = {}
    upstreams: dict[ListenerConfig, ssl.SSLContext] = {}
    for listener in config.listeners:
        clients[listener] = (
            client_side_context(
                listener.certificate,
                client_ca_file=listener.client_ca_file,
                client_certificates=listener.client_certificates,
            )
            if listener.certificate
            else None
        )
        upstreams[listener] = upstream_context(listener.upstream_ca_file)
    return clients, upstreams


class ProxyServer:
    """Serve every configured listener until :meth:`shutdown`."""

    def __init__(
        self,
        config: Config,
        tokens: TokenSource,
        *,
        authenticator: Authenticator | None = None,
        grace: float = 30.0,
    ) -> None:
        self.config = config
        self.grace = grace
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
        self._ids = itertools.count(1)
        self._connections: collections.Counter[ListenerConfig] = collections.Counter()
        self._connections_from: collections.Counter[str] = collections.Counter()
        self._stop = trio.Event()

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
            authenticator = Authenticator(
                config.users,
                hashes=self.hashes,
                cache_ttl=config.limits.credential_cache_ttl,
                dummy_parameters=typical or DEFAULT_PARAMETERS,
            )
        return Services(
            authenticator=authenticator,
            tokens=tokens,
            limits=config.limits,
            app_providers={name: app.provider for name, app in config.apps.items()},
            throttle=self.throttle,
            early_upstreams=self.early_upstreams,
        )

    def reload(self, config: Config, tokens: TokenSource) -> bool:
        """Use ``config`` for new logins; sessions in progress keep what they started with.

        Listeners cannot change without a restart: if they differ, nothing changes and
        ``False`` is returned.
        """
        if config.listeners != self.config.listeners:
            log.error(
                "reload refused: listeners changed, which needs a restart; "
                "keeping the previous configuration"
            )
            return False
        try:
            client_contexts, upstream_contexts = _contexts(config)
        except (OSError, ValueError) as exc:
            log.error("reload refused: %s; keeping the previous configuration", exc)
            return False
        # New connections use the new certificates (renewed at the same path, say).
        self._client_contexts, self._upstream_contexts = client_contexts, upstream_contexts
        self.config = config
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
        log.info("configuration reloaded: %d apps, %d users", len(config.apps), len(config.users))
        return True

    def shutdown(self) -> None:
        """Stop accepting connections; sessions in progress get ``grace`` seconds."""
        self._stop.set()

    async def serve(
        self, *, task_status: trio.TaskStatus[list[BoundListener]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind every listener, report them through ``task_status``, serve until shutdown.

        Raises :class:`ListenError` if a listener cannot be opened (none is left open).
        """
        bound: list[tuple[ListenerConfig, list[trio.SocketListener]]] = []
        try:
            for listener in self.config.listeners:
                try:
                    sockets = await trio.open_tcp_listeners(listener.port, host=listener.host)
                except OSError as exc:
                    raise ListenError(describe_listen_error(listener, exc)) from None
                bound.append((listener, sockets))
        except BaseException:
            for _, sockets in bound:
                for s in sockets:
                    await s.aclose()
            raise
        report = [
            BoundListener(listener, *s.socket.getsockname()[:2])
            for listener, sockets in bound
            for s in sockets
        ]
        try:
            async with trio.open_nursery() as workers:
                await workers.start(self.hashes.run)
                await self._serve_bound(bound, report, task_status)
                workers.cancel_scope.cancel()  # every session has ended
        finally:
            if self.throttle.shared is not None:
                self.throttle.shared.close()

    async def _serve_bound(
        self,
        bound: list[tuple[ListenerConfig, list[trio.SocketListener]]],
        report: list[BoundListener],
        task_status: trio.TaskStatus[list[BoundListener]],
    ) -> None:
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as accepting:
                for listener, sockets in bound:
                    handler = functools.partial(self._handle, listener)
                    accepting.start_soon(
                        functools.partial(
                            trio.serve_listeners, handler, sockets, handler_nursery=handlers
                        )
                    )
                for b in report:
                    log.info(
                        "listening on %s:%s for %s (tls %s) -> %s:%s (upstream tls %s)",
                        b.host,
                        b.port,
                        b.config.protocol.value,
                        b.config.tls.name.lower(),
                        b.config.upstream_host,
                        b.config.upstream_port,
                        b.config.upstream_tls.name.lower(),
                    )
                task_status.started(report)
                await self._stop.wait()
                accepting.cancel_scope.cancel()
            log.info("no longer accepting; %g s for sessions in progress", self.grace)
            handlers.cancel_scope.deadline = trio.current_time() + self.grace

    async def _handle(self, listener: ListenerConfig, stream: trio.SocketStream) -> None:
        conn_id = f"{listener.protocol.value}#{next(self._ids)}"
        try:
            peer = stream.socket.getpeername()
        except OSError:  # already gone
            await trio.aclose_forcefully(stream)
            return
        address = str(peer[0])
        limits = self.config.limits
        network = self.throttle.policy.network_of(address)
        if (
            self._connections[listener] >= limits.max_connections
            or self._connections_from[network] >= limits.max_connections_per_network
        ):
            log.warning(
                "%s: connection from %s:%s on %s refused: too many connections (%d on the "
                "listener, %d from network %s)",
                conn_id,
                address,
                peer[1],
                listener.name,
                self._connections[listener],
                self._connections_from[network],
                network,
            )
            if listener.tls is not ClientTls.IMPLICIT:  # a TLS client could not read it
                with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(_busy_reply(listener))
            await trio.aclose_forcefully(stream)
            return
        self._connections[listener] += 1
        self._connections_from[network] += 1
        try:
            await self._serve_connection(listener, stream, conn_id, peer)
        finally:
            self._connections[listener] -= 1
            self._connections_from[network] -= 1
            if not self._connections_from[network]:
                del self._connections_from[network]

    async def _serve_connection(
        self,
        listener: ListenerConfig,
        stream: trio.SocketStream,
        conn_id: str,
        peer: tuple[str, int],
    ) -> None:
        client: trio.abc.Stream = stream
        try:
            log.info("%s: connection from %s:%s on %s", conn_id, peer[0], peer[1], listener.name)
            context = self._client_contexts[listener]
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
                peer=str(peer[0]),
                listener=listener,
                machine=machine,
                services=self.services,
                client=client,
                client_context=context,
                upstream_context=self._upstream_contexts[listener],
                timeout_reply=timeout_reply,
                client_certificate=certificate,
            )
            del machine  # the session's alone: it lets go of it once logged in
            await session.run()
        except Exception:
            # A bug in one session must not take every other session down with it.
            log.exception("%s: internal error; connection closed", conn_id)
        finally:
            # Whatever happened, cancellation at shutdown included. The session has closed
            # its streams already when it ran; closing again does nothing.
            await trio.aclose_forcefully(client)
