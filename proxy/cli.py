"""The ``xoauth2-proxy`` command line.

Exit codes: 0 success, 1 runtime failure (no token could be obtained; ``serve`` could not
start: a file it names cannot be used, a listener cannot be opened), 2 invalid
configuration or usage.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import hashlib
import importlib.metadata
import json
import logging
import os
import secrets
import signal
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from broker import build_source
from broker.cache import open_cache
from broker.cache.memory import MemoryTokenCache
from broker.claims import NotAJwtError, decode_claims, decode_header, describe, describe_opaque
from broker.errors import BrokerError
from proxy.config import LOG_FORMATS, Config, ConfigError, load_config
from proxy.files import UnsafeFile
from proxy.identities import hash_password
from proxy.net import control, notify
from proxy.net.server import ListenError, ProxyServer
from proxy.net.tls import client_side_context, upstream_context
from proxy.ops import authorize, doctor, emailproxy, exchange, logs
from proxy.ops.metrics import Metrics

if TYPE_CHECKING:
    from collections.abc import Sequence

    from broker.cache import TokenCache
    from broker.model import AccessToken
    from broker.source import CachingTokenSource

__all__ = ["main"]

DEFAULT_CONFIG = Path(os.environ.get("XOAUTH2_PROXY_CONFIG", "/etc/xoauth2-proxy/config.toml"))
EXIT_FAILURE = 1
EXIT_CONFIG = 2
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
#: ``token`` prints its one error itself; msmtp, mutt and mbsync show whatever it writes.
DEFAULT_LOG_LEVELS = {"serve": "info", "doctor": "info", "token": "critical"}

log = logging.getLogger("xoauth2_proxy")


def _load(path: Path, *, unusable: int = EXIT_CONFIG, print_warnings: bool = True) -> Config | int:
    """Load and fully check a configuration; print problems and warnings to stderr.

    Returns the configuration, or the exit status: 2 if the file is invalid, ``unusable``
    if its only problems are what it names that cannot be used here (files that cannot be
    read, listen addresses that do not resolve, certificates that do not load).
    """
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return unusable if exc.unreadable_only else EXIT_CONFIG
    problems = _runtime_problems(config)
    # Not for token by default (clients show stderr), nor where the caller logs them.
    if print_warnings and log.isEnabledFor(logging.WARNING):
        for warning in config.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    for problem in problems:
        print(problem, file=sys.stderr)
    return unusable if problems else config


def _runtime_problems(config: Config) -> list[str]:
    """What only trying can tell: certificates, keys and CA files that do not load."""
    problems: list[str] = []
    for index, listener in enumerate(config.listeners):
        key = f"{config.path}: listeners[{index}]"
        try:
            socket.getaddrinfo(
                listener.host, listener.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except (OSError, UnicodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            problems.append(f"{key}.listen: cannot resolve {listener.host!r}: {reason}")
        if listener.certificate is not None:
            try:
                client_side_context(
                    listener.certificate,
                    client_ca_file=listener.client_ca_file,
                    client_certificates=listener.client_certificates,
                )
            except (OSError, ValueError) as exc:
                problems.append(
                    f"{key}.certificate: cannot load key and certificate from "
                    f"{listener.certificate}: {_file_error(exc)}"
                )
        try:
            upstream_context(listener.upstream_ca_file)
        except (OSError, ValueError) as exc:
            problems.append(
                f"{key}.upstream_ca_file: cannot load {listener.upstream_ca_file}: "
                f"{_file_error(exc)}"
            )
    # The cache and every provider (keys, certificates) are built, without network I/O.
    try:
        open_cache(config.cache).close()
    except ValueError as exc:
        problems.append(f"{config.path}: cache: {exc}")
    for name, app in config.apps.items():
        try:
            build_source({name: app}, cache=MemoryTokenCache()).close()
        except ValueError as exc:
            problems.append(f"{config.path}: apps.{name}: {exc}")
    return problems


#: Seconds ``check`` waits for authorization servers' metadata, all apps together.
DISCOVERY_DEADLINE = 10.0


async def _discovery_problems(config: Config) -> tuple[list[str], list[str]]:
    """Ask the metadata of every app configured with ``issuer`` (at once, within
    :data:`DISCOVERY_DEADLINE`): problems (a wrong issuer, an auth_method the server does not
    offer) and warnings (a server that cannot be reached now: a check that fails then would
    keep the service from starting while the identity provider is down)."""
    from broker.errors import PermanentTokenError
    from broker.providers.oauth2 import OAuth2Provider

    problems: list[str] = []
    warnings: list[str] = []
    answered: set[str] = set()

    async def one(name: str, provider: OAuth2Provider) -> None:
        key = f"{config.path}: apps.{name}"
        try:
            metadata = await provider.metadata()
        except PermanentTokenError as exc:
            problems.append(f"{key}.issuer: {exc} (fix: {exc.fix})")
        except BrokerError as exc:
            warnings.append(f"{key}.issuer: cannot check the server's metadata now: {exc}")
        else:
            problem = provider.method_problem(metadata) if metadata is not None else None
            if problem is not None:
                problems.append(f"{key}.auth_method: {problem}")
        answered.add(name)

    providers = {
        name: OAuth2Provider(app)
        for name, app in config.apps.items()
        if app.provider == "oauth2" and app.issuer
    }
    with trio.move_on_after(DISCOVERY_DEADLINE):
        async with trio.open_nursery() as nursery:
            for name, provider in providers.items():
                nursery.start_soon(one, name, provider)
    for name in sorted(set(providers) - answered):
        warnings.append(
            f"{config.path}: apps.{name}.issuer: no metadata within {DISCOVERY_DEADLINE:g}s; "
            "not checked"
        )
    return problems, warnings


def _file_error(exc: OSError | ValueError) -> str:
    """Why a key, certificate or CA file could not be loaded, for one line."""
    if isinstance(exc, ssl.SSLError):
        text = exc.reason or str(exc)  # OpenSSL's "PEM lib" comes without a reason
        if "PEM lib" in text or "NO_START_LINE" in text:
            return "no PEM private key and certificate chain in it"
        if "KEY_VALUES_MISMATCH" in text:
            return "the private key does not belong to the certificate"
        if "NO_CERTIFICATE_OR_CRL_FOUND" in text:
            return "no PEM certificate in it"
        return f"TLS error: {text}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if isinstance(config, int):
        return config
    problems, warnings = trio.run(_discovery_problems, config)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return EXIT_CONFIG
    print(
        f"{config.path}: OK ({len(config.apps)} apps, {len(config.listeners)} listeners, "
        f"{len(config.users)} users)"
    )
    if args.connect:
        closed = _closed_listeners(config, timeout=args.connect_timeout)
        for problem in closed:
            print(problem, file=sys.stderr)
        if closed:
            return EXIT_FAILURE
        print(f"{len(config.listeners)} listeners accept connections")
    return 0


def _closed_listeners(config: Config, *, timeout: float) -> list[str]:
    """The listeners nothing accepts on (a health check: is serve up and listening?).

    A wildcard address is tried on loopback. Only TCP: nothing is sent, so a TLS listener
    sees a client that leaves before its handshake.
    """
    problems = []
    for listener in config.listeners:
        wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
        host = wildcard.get(listener.host, listener.host)
        try:
            socket.create_connection((host, listener.port), timeout=timeout).close()
        except OSError as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
            where = f"[{host}]:{listener.port}" if ":" in host else f"{host}:{listener.port}"
            problems.append(f"listener {listener.name}: nothing accepts on {where}: {reason}")
    return problems


def _cmd_hash_password(args: argparse.Namespace) -> int:
    if sys.stdin.isatty():
        try:
            password = getpass.getpass("Password: ")
            again = getpass.getpass("Again: ")
        except (EOFError, KeyboardInterrupt):
            print("\nno password given", file=sys.stderr)
            return EXIT_FAILURE
        if again != password:
            print("the passwords differ", file=sys.stderr)
            return EXIT_FAILURE
    else:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if not password:
        print("refusing to hash an empty password", file=sys.stderr)
        return EXIT_FAILURE
    print(hash_password(password))
    return 0


def _cmd_app_key(args: argparse.Namespace) -> int:
    """Make a new app key: the program keeps the key, the configuration its hash."""
    key = "xo2k_" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(key.encode()).hexdigest()
    print(f"app key (give it to the program as its OAuth token; shown only now): {key}")
    print(f'for its [users."..."] table:  app_key_hash = "sha256:{digest}"')
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    """Print a token for ``args.app`` (from the configured cache, shared with ``serve``), or
    with ``--decode`` its claims for diagnosis (never the token or its signature)."""
    config = _load(args.config)
    if isinstance(config, int):
        return config
    if args.app not in config.apps:
        print(
            f"{config.path}: apps.{args.app}: no such app (configured: "
            f"{', '.join(sorted(config.apps)) or 'none'})",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    app = config.apps[args.app]
    if (app.provider == "google" or app.delegated) and not args.mailbox:
        what = "signed-in account" if app.delegated else "mailbox"
        print(
            f"apps.{args.app} issues tokens per {what}: name one with --mailbox",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        source = build_source(
            {args.app: config.apps[args.app]},
            config.cache,
            accounts={
                name: by_account
                for name, by_account in config.delegated_accounts().items()
                if name == args.app
            },
            authorize_command=authorize.authorize_command(config),
        )
    except ValueError as exc:
        print(f"{config.path}: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    async def fetch() -> AccessToken:
        return await source.token(args.app, mailbox=args.mailbox)

    # The broker logs a failure for the service's log; here it is printed once, below.
    broker_log = logging.getLogger("xoauth2_proxy.broker")
    level = broker_log.level
    if args.log_level != "debug":
        broker_log.setLevel(logging.CRITICAL)
    try:
        token = trio.run(fetch)
    except BrokerError as exc:
        code = f" [{exc.code}]" if exc.code else ""
        fix = f"\nfix: {exc.fix}" if exc.fix else ""
        print(f"no token for app {args.app}: {exc}{code}{fix}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        broker_log.setLevel(level)
        source.close()
    if not args.decode:
        print(token.value)
        return 0
    try:
        rows = describe(
            decode_claims(token.value),
            time.time(),
            header=decode_header(token.value),
            provider=config.apps[args.app].provider,
        )
    except NotAJwtError:
        rows = describe_opaque(token, time.time())
    for label, value in rows:
        print(f"{label + ':':12}{value}")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    """Walk the chain for a user (or every app and upstream) and print what to fix."""
    if args.mailbox and not args.user:
        print("doctor: --mailbox needs a USER", file=sys.stderr)
        return EXIT_CONFIG
    config = _load(args.config)
    if isinstance(config, int):
        return config
    grants = None
    try:
        # Its own cache in memory: the doctor asks the identity provider itself, and never
        # writes the service's tokens (as root, a new cache file would be root's). People's
        # sign-ins are the service's, though: they are read -- and, renewed, rotated -- in
        # the configured cache.
        if any(app.delegated for app in config.apps.values()):
            grants = open_cache(config.cache)
        source = build_source(
            config.apps,
            cache=MemoryTokenCache(),
            grants=grants,
            accounts=config.delegated_accounts(),
            authorize_command=authorize.authorize_command(config),
        )
    except ValueError as exc:
        if grants is not None:
            grants.close()
        print(f"{config.path}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # The report carries what the proxy logs about each step; the log itself is for
    # --log-level debug. The proxy's loggers still produce the records the report uses.
    logging.getLogger("xoauth2_proxy").setLevel(min(logging.INFO, logging.root.level))
    if args.log_level != "debug":
        for handler in logging.root.handlers:
            handler.setLevel(logging.CRITICAL)
    try:
        findings = trio.run(
            functools.partial(doctor.diagnose, config, source, args.user, mailbox=args.mailbox)
        )
    finally:
        source.close()
        if grants is not None:
            grants.close()
    print(doctor.render(findings))
    failed = sum(f.status is doctor.Status.FAILED for f in findings)
    print(f"\n{len(findings)} checks, {failed} failed")
    return EXIT_FAILURE if failed else 0


def _cmd_authorize(args: argparse.Namespace) -> int:
    """A person signs in once for a user of a delegated app (see proxy.ops.authorize)."""
    config = _load(args.config)
    if isinstance(config, int):
        return config
    method = "browser" if args.browser else "device" if args.device else ""
    return authorize.run(
        config,
        args.user,
        method=method,
        port=args.port,
        timeout=args.timeout,
        stdin=sys.stdin,
    )


def _cmd_import_emailproxy(args: argparse.Namespace) -> int:
    """Print (or write) a configuration equivalent to an emailproxy.config."""
    try:
        text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"{args.file}: cannot read: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        result = emailproxy.convert(text, source=str(args.file))
    except emailproxy.NotEmailproxyConfig as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    if args.output is None:
        print(result.toml, end="")
    else:
        try:
            descriptor = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            print(f"{args.output}: cannot create: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_FAILURE
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            out.write(result.toml)
    print(
        f"{args.file}: {result.listeners} listeners, {result.apps} apps, {result.users} users; "
        f"{len(result.left_behind)} settings not carried over (listed at the top, with what "
        "to do before use)",
        file=sys.stderr,
    )
    return 0


def _cmd_exchange_setup(args: argparse.Namespace) -> int:
    """Print the Exchange Online PowerShell for the configured apps and mailboxes."""
    config = _load(args.config)
    if isinstance(config, int):
        return config
    print(exchange.powershell(config, icalendar=args.icalendar), end="")
    return 0


async def _refreshing(
    source: CachingTokenSource, *, task_status: trio.TaskStatus[trio.CancelScope]
) -> None:
    """Run ``source``'s background refresh until the returned scope is cancelled."""
    with trio.CancelScope() as scope:
        task_status.started(scope)
        await source.run()


class _Tokens:
    """The token source in use and its background refresh; the sources a reload retired.

    Retired sources are closed only at exit: sessions that started before the reload may
    still be waiting on them.
    """

    def __init__(self, source: CachingTokenSource, cache: TokenCache) -> None:
        self.source = source
        self.cache = cache
        self.retired: list[CachingTokenSource] = []
        self.refresh: trio.CancelScope | None = None

    def close(self) -> None:
        for source in (*self.retired, self.source):
            source.close()
        self.cache.close()


async def _reload(server: ProxyServer, tokens: _Tokens, path: Path, nursery: trio.Nursery) -> None:
    log.info("SIGHUP received: reloading %s", path)
    notify.notify(*notify.reloading())
    try:
        await _reload_now(server, tokens, path, nursery)
    finally:
        notify.notify("READY=1", f"STATUS={len(server.config.listeners)} listeners")


async def _reload_now(
    server: ProxyServer, tokens: _Tokens, path: Path, nursery: trio.Nursery
) -> None:
    # In a thread: reading files, resolving listener host names and loading certificates
    # must not stop the sessions being served meanwhile.
    config = await trio.to_thread.run_sync(functools.partial(_load, path, print_warnings=False))
    if isinstance(config, int):
        log.error("reload refused: the configuration has errors (above); keeping the previous one")
        server.metrics.reloads.labels("failure").inc()
        return
    for warning in config.warnings:
        log.warning("%s", warning)
    if config.cache != server.config.cache:
        log.warning("[cache] changed: the new cache settings take effect only after a restart")
    if config.log_format != server.config.log_format:
        log.warning("[logging] changed: the new format takes effect only after a restart")
    if config.apps == server.config.apps:
        await server.reload(config, tokens.source)  # same apps: keep their tokens warm
        return
    try:
        source = build_source(
            config.apps,
            cache=tokens.cache,
            accounts=config.delegated_accounts(),
            authorize_command=authorize.authorize_command(config),
            on_fetch=server.metrics.token_fetch,
        )
    except ValueError as exc:
        log.error("reload refused: %s; keeping the previous configuration", exc)
        server.metrics.reloads.labels("failure").inc()
        return
    if not await server.reload(config, source):
        source.close()
        return
    if tokens.refresh is not None:
        tokens.refresh.cancel()
    tokens.retired.append(tokens.source)
    tokens.source = source
    tokens.refresh = await nursery.start(_refreshing, source)


async def _serve(server: ProxyServer, tokens: _Tokens, path: Path) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as serving:
                # Listeners first: a port that cannot be opened ends it before any token
                # request or log line.
                await serving.start(server.serve)
                tokens.refresh = await nursery.start(_refreshing, tokens.source)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        await _reload(server, tokens, path, nursery)
                        continue
                    log.info("%s received: shutting down", signal.Signals(signum).name)
                    notify.notify("STOPPING=1")
                    server.shutdown()
                    break
            # Every session has ended (or its grace ran out): no more tokens are needed.
            nursery.cancel_scope.cancel()


def _cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config, unusable=EXIT_FAILURE, print_warnings=False)
    if isinstance(config, int):
        return config
    logs.configure(logging.root.level, args.log_format or config.log_format)
    for warning in config.warnings:  # in the log's own format
        log.warning("%s", warning)
    metrics = Metrics(_version())
    try:
        cache = open_cache(config.cache)
    except ValueError as exc:
        print(f"{config.path}: cache: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        source = build_source(
            config.apps,
            cache=cache,
            accounts=config.delegated_accounts(),
            authorize_command=authorize.authorize_command(config),
            on_fetch=metrics.token_fetch,
        )
    except ValueError as exc:
        cache.close()
        print(f"{config.path}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    tokens = _Tokens(source, cache)
    try:
        try:
            server = ProxyServer(config, source, grace=args.grace, metrics=metrics)
        except (UnsafeFile, OSError, ValueError) as exc:  # a file changed since it was checked
            print(f"cannot start: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        try:
            trio.run(_serve, server, tokens, args.config)
        except BaseExceptionGroup as group:
            failed, _ = group.split(ListenError)
            if failed is None:
                raise
            print(f"cannot start: {_first(failed)}", file=sys.stderr)
            return EXIT_FAILURE
    finally:
        tokens.close()
    return 0


def _first(group: BaseExceptionGroup[ListenError]) -> ListenError:
    """The first exception of a (possibly nested) group."""
    first = group.exceptions[0]
    return first if isinstance(first, ListenError) else _first(first)


def _control_socket(args: argparse.Namespace) -> Path | None:
    """The control socket ``status`` and ``unlock`` use: ``--socket``, else the
    configuration's (printing why there is none)."""
    if args.socket is not None:
        return Path(args.socket)
    config = _load(args.config)
    if isinstance(config, int):
        return None
    if config.control_socket is None:
        print(
            f"{config.path}: no [control] socket is configured; add\n"
            '  [control]\n  socket = "/run/xoauth2-proxy/control.sock"\n'
            "and restart serve",
            file=sys.stderr,
        )
        return None
    return config.control_socket


def _ask(path: Path, message: dict[str, object]) -> dict[str, object] | None:
    try:
        answer = control.request(path, message)
    except control.ControlError as exc:
        print(f"cannot reach serve: {exc}", file=sys.stderr)
        return None
    if "error" in answer:
        print(f"serve refused: {answer['error']}", file=sys.stderr)
        return None
    return answer


def _cmd_status(args: argparse.Namespace) -> int:
    """Print what ``serve`` says about itself: tokens, sessions, lockouts."""
    path = _control_socket(args)
    if path is None:
        return EXIT_CONFIG
    answer = _ask(path, {"command": "status"})
    if answer is None:
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(render_status(answer))
    return 0 if answer.get("ready") else EXIT_FAILURE


def render_status(status: dict[str, Any]) -> str:
    """``status`` for people."""
    lines = ["ready" if status.get("ready") else "NOT READY"]
    lines += [f"  {problem}" for problem in status.get("problems", [])]
    lines.append(f"\nsessions: {status.get('sessions', 0)}")
    for listener in status.get("listeners", []):
        lines.append(
            f"  {listener['name']:<28} {listener['sessions']:>6} open  "
            f"({', '.join(listener['address'])})"
        )
    lines.append("\ntokens:")
    for token in status.get("tokens", []):
        who = token["app"] + (f" ({token['mailbox']})" if token.get("mailbox") else "")
        expires = token.get("expires_in")
        state = "valid" if token["valid"] else "NOT VALID"
        when = f", expires in {_duration(expires)}" if expires is not None else ", none yet"
        lines.append(f"  {who:<28} {state}{when}")
        if token.get("last_error"):
            lines.append(
                f"    last error ({token['error_kind']}, {token['failures']} failed): "
                f"{token['last_error']}"
            )
    sign_ins = status.get("sign_ins", [])
    if sign_ins:
        lines.append("\nsign-ins (delegated apps):")
    for sign_in in sign_ins:
        who = f"{sign_in['app']} ({sign_in['account']})"
        if sign_in["state"] == "signed in":
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(sign_in["signed_in_at"]))
            lines.append(f"  {who:<28} signed in as {sign_in['signed_in_as']} on {when}")
        else:
            lines.append(f"  {who:<28} {sign_in['state'].upper()}")
            if sign_in.get("reason"):
                lines.append(f"    {sign_in['reason']}")
            if sign_in.get("fix"):
                lines.append(f"    fix: {sign_in['fix']}")
    queue = status.get("hash_queue", {})
    lines.append(
        f"\npassword checks: {queue.get('running', 0)} running, {queue.get('queued', 0)} queued"
    )
    lockouts = status.get("lockouts", [])
    lines.append(f"\nlockouts: {len(lockouts) or 'none'}")
    for lock in lockouts:
        where = "" if lock["everywhere"] else " (from networks it has not logged in from)"
        lines.append(
            f"  {lock['scope']} {lock['key']}: {lock['failures']} failures, lifted in "
            f"{_duration(lock['remaining'])}{where}"
        )
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 0:
        return f"-{_duration(-seconds)}"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _cmd_unlock(args: argparse.Namespace) -> int:
    """Clear a login's (or a network's) failed-login count in ``serve``."""
    path = _control_socket(args)
    if path is None:
        return EXIT_CONFIG
    answer = _ask(path, {"command": "unlock", "login": args.login})
    if answer is None:
        return EXIT_FAILURE
    unlocked = answer.get("unlocked")
    if not isinstance(unlocked, list) or not unlocked:
        print(f"{args.login}: no failed logins recorded; nothing to unlock", file=sys.stderr)
        return EXIT_FAILURE
    for key in unlocked:
        print(f"unlocked {key}")
    return 0


def _parser() -> argparse.ArgumentParser:
    # --log-level is taken before the command and after it; given after, it wins.
    log_level = argparse.ArgumentParser(add_help=False)
    log_level.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=argparse.SUPPRESS,
        help="what to log to stderr (default: info for serve and doctor; for token nothing, "
        "as it prints its own error; warning for the others)",
    )
    parser = argparse.ArgumentParser(
        prog="xoauth2-proxy",
        description="OAuth 2.0 token broker and SASL XOAUTH2 proxy for IMAP, POP3 and SMTP.",
        parents=[log_level],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, parents=[log_level])

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-c",
            "--config",
            type=Path,
            default=DEFAULT_CONFIG,
            help=f"configuration file (default: {DEFAULT_CONFIG}, or $XOAUTH2_PROXY_CONFIG)",
        )

    serve = add_command("serve", help="run the proxy in the foreground")
    with_config(serve)
    serve.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds sessions in progress get after SIGTERM (default 30)",
    )
    serve.add_argument(
        "--log-format",
        choices=list(LOG_FORMATS),
        default=None,
        help="text (default) or json: one JSON object per line (overrides [logging] format)",
    )
    serve.set_defaults(func=_cmd_serve)

    def with_socket(p: argparse.ArgumentParser) -> None:
        with_config(p)
        p.add_argument(
            "--socket", help="the control socket (default: the configuration's [control] socket)"
        )

    status = add_command(
        "status",
        help="show what serve is doing: each app's token, sessions per listener, lockouts "
        "(through the control socket); exits 1 when serve is not ready",
    )
    with_socket(status)
    status.add_argument("--json", action="store_true", help="print the answer as JSON")
    status.set_defaults(func=_cmd_status)

    unlock = add_command(
        "unlock",
        help="clear the failed logins of a login name (every kind of credential it has), a "
        "source network, or one key as status names it",
    )
    with_socket(unlock)
    unlock.add_argument("login", help="a login name, an address or network, or a status key")
    unlock.set_defaults(func=_cmd_unlock)

    check = add_command("check", help="validate the configuration")
    with_config(check)
    check.add_argument(
        "--connect",
        action="store_true",
        help="also connect to every listener, as a health check of a running serve "
        "(exit status 1 if one does not accept)",
    )
    check.add_argument(
        "--connect-timeout", type=float, default=5.0, help="seconds per listener (default 5)"
    )
    check.set_defaults(func=_cmd_check)

    hashp = add_command(
        "hash-password", help="print an argon2id hash of a password read from the terminal or stdin"
    )
    hashp.set_defaults(func=_cmd_hash_password)

    app_key = add_command(
        "app-key",
        help="make a key for a program that speaks XOAUTH2 or OAUTHBEARER itself, and the "
        "app_key_hash line for the configuration",
    )
    app_key.set_defaults(func=_cmd_app_key)

    token = add_command(
        "token",
        help="print a current access token for an app (for msmtp passwordeval, mbsync "
        "PassCmd, mutt), from the cache the proxy uses",
    )
    with_config(token)
    token.add_argument("app", help="the app's name, as in [apps.NAME]")
    token.add_argument(
        "--mailbox",
        help="the mailbox the token is for (required for per-mailbox providers), or for a "
        "delegated app the account that signed in",
    )
    token.add_argument(
        "--decode",
        action="store_true",
        help="print what the token says instead of it (a JWT's issuer, subject, audience, "
        "scope, roles, client, tenant, typ, expiry; an opaque token's scope and expiry)",
    )
    token.set_defaults(func=_cmd_token)

    doc = add_command(
        "doctor",
        help="check the chain for a user, step by step: token, roles, upstream, TLS, "
        "XOAUTH2 login and a command after it; or, without a user, every app and upstream",
    )
    with_config(doc)
    doc.add_argument("user", nargs="?", help="a login name from [users]")
    doc.add_argument("--mailbox", help="a mailbox other than the user's default (with USER)")
    doc.set_defaults(func=_cmd_doctor)

    signin = add_command(
        "authorize",
        help="sign in once, as the person behind a user of a delegated app, so that the "
        "proxy can renew that user's tokens (device code; --browser for a browser sign-in)",
    )
    with_config(signin)
    signin.add_argument("user", help="a login name from [users] whose app is delegated")
    flows = signin.add_mutually_exclusive_group()
    flows.add_argument(
        "--browser",
        action="store_true",
        help="sign in with a browser: authorization code with PKCE, the answer coming back "
        "to a listener on 127.0.0.1 (the default for Google, which allows Gmail only so)",
    )
    flows.add_argument(
        "--device",
        action="store_true",
        help="sign in with a code entered in any browser, on any device (the default)",
    )
    signin.add_argument(
        "--port",
        type=int,
        default=0,
        help="with --browser: the loopback port to listen on (default: any free port), "
        "e.g. to forward it with ssh -L",
    )
    signin.add_argument(
        "--timeout",
        type=float,
        default=authorize.DEFAULT_TIMEOUT,
        help=f"seconds to wait for the sign-in (default {authorize.DEFAULT_TIMEOUT:g})",
    )
    signin.set_defaults(func=_cmd_authorize)

    importer = add_command(
        "import-emailproxy",
        help="print a configuration equivalent to an emailproxy.config (Email OAuth 2.0 "
        "Proxy): listeners, apps and users, with what to do before use and every setting "
        "that has no equivalent",
    )
    importer.add_argument("file", type=Path, help="the emailproxy.config to read")
    importer.add_argument(
        "-o",
        "--output",
        type=Path,
        help="write the configuration to this new file (mode 600) instead of printing it",
    )
    importer.set_defaults(func=_cmd_import_emailproxy)

    setup = add_command(
        "exchange-setup",
        help="print the Exchange Online PowerShell that lets the apps open the users' "
        "mailboxes (service principals, mailbox permissions, protocols)",
    )
    with_config(setup)
    setup.add_argument(
        "--icalendar",
        action="store_true",
        help="also have IMAP and POP3 serve meeting requests as iCalendar attachments",
    )
    setup.set_defaults(func=_cmd_exchange_setup)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("xoauth2-proxy")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "(not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not hasattr(args, "log_level"):
        args.log_level = DEFAULT_LOG_LEVELS.get(args.command, "warning")
    logs.configure(getattr(logging, args.log_level.upper()), "text")
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
