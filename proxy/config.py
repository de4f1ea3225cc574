"""Configuration: a TOML file read into frozen dataclasses, with every problem reported.

Loading never stops at the first mistake: :func:`load_config` collects every problem it can
find as ``FILE: KEY: what is wrong`` and raises :class:`ConfigError` with all of them, so
``xoauth2-proxy check`` can show an operator everything to fix in one pass.

Secrets never sit in the file unless the operator insists: ``{ env = "NAME" }`` and
``{ file = "path" }`` are the normal forms, ``{ value = "..." }`` works with a warning.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
import os
import stat
import tomllib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from broker.cache import CACHE_KINDS, CacheSettings
from broker.cache.sealing import KEY_HELP, parse_key
from broker.model import (
    AUTH_METHODS,
    DEFAULT_AUTHORITY,
    DEFAULT_REDIRECT_URI,
    DEFAULT_SCOPE,
    DELEGATED_SCOPE,
    GOOGLE_AUTHORIZATION_URL,
    GOOGLE_SCOPE,
    GOOGLE_TOKEN_URL,
    PUBLIC_CLIENT,
    App,
    Secret,
)
from proxy.files import UnreadableFile, UnsafeFile, check_directories, read_trusted
from proxy.names import (
    fold_case,
    has_format_characters,
    is_plain_address,
    match_mailbox,
)
from proxy.protocol.framing import has_control_characters
from proxy.protocol.modes import ClientTls, UpstreamTls
from proxy.protocol.smtp import is_hostname
from proxy.throttle import ThrottlePolicy

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from pathlib import Path

__all__ = [
    "ClientCertificates",
    "Config",
    "ConfigError",
    "Limits",
    "ListenerConfig",
    "MetricsSettings",
    "Network",
    "Protocol",
    "UpstreamClientAddress",
    "UserConfig",
    "load_config",
]

#: An IPv4 or IPv6 network (``trusted_proxies``).
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Protocol(enum.Enum):
    IMAP = "imap"
    POP3 = "pop3"
    SMTP = "smtp"


PROVIDERS: Final = ("microsoft", "google", "oauth2")
CLIENT_TLS: Final = {
    "implicit": ClientTls.IMPLICIT,
    "starttls": ClientTls.STARTTLS,
    "none": ClientTls.NONE,
}
UPSTREAM_TLS: Final = {"implicit": UpstreamTls.IMPLICIT, "starttls": UpstreamTls.STARTTLS}


class ClientCertificates(enum.Enum):
    """Does a listener ask TLS clients for a certificate?"""

    NONE = "none"
    OPTIONAL = "optional"
    REQUIRED = "required"


CLIENT_CERTIFICATES: Final = {c.value: c for c in ClientCertificates}


class UpstreamClientAddress(enum.Enum):
    """How the client's address is passed to the upstream, if at all."""

    NONE = "none"
    #: A PROXY protocol header (version 1 or 2) before anything else on the connection.
    PROXY_V1 = "proxy-v1"
    PROXY_V2 = "proxy-v2"


UPSTREAM_CLIENT_ADDRESS: Final = {c.value: c for c in UpstreamClientAddress}


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    protocol: Protocol
    host: str
    port: int
    tls: ClientTls
    #: PEM file with the private key and certificate chain (``None`` only when tls is none).
    certificate: Path | None
    upstream_host: str
    upstream_port: int
    upstream_tls: UpstreamTls
    upstream_ca_file: Path | None = None
    #: ``tls = "none"`` on an address other than loopback needs this explicit opt-in.
    allow_plaintext: bool = False
    #: Trust anchors for client certificates; without it none are requested.
    client_ca_file: Path | None = None
    #: Whether a client certificate is asked for (optional) or demanded (required).
    client_certificates: ClientCertificates = ClientCertificates.NONE
    #: SMTP: the name in our greeting and EHLO (default: this host's fully qualified name).
    hostname: str | None = None
    #: Connections start with a PROXY protocol header (v1 or v2) from one of
    #: ``trusted_proxies``, which names the real client; anything else is closed.
    proxy_protocol: bool = False
    trusted_proxies: tuple[Network, ...] = ()
    #: Pass the client's address on to the upstream (which must be set up to trust us).
    upstream_client_address: UpstreamClientAddress = UpstreamClientAddress.NONE

    @property
    def name(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.protocol.value}@{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UserConfig:
    """One ``[users."LOGIN"]`` table: an identity and what it may open."""

    login: str
    password_hashes: tuple[str, ...] = field(repr=False)
    app: str
    #: The mailbox opened when the client names none.
    mailbox: str
    protocols: frozenset[Protocol]
    #: SHA-256 of the DER client certificates that are this identity (lowercase hex).
    certificate_fingerprints: frozenset[str] = frozenset()
    #: Client certificate subjects (RFC 4514, as ``openssl x509 -subject -nameopt RFC2253``).
    certificate_subjects: frozenset[str] = frozenset()
    #: SHA-256 of the app keys (lowercase hex) a client may present as its bearer token.
    app_key_hashes: frozenset[str] = field(default=frozenset(), repr=False)
    #: The mailboxes it may open: addresses, or patterns with ``*`` (``*@reports.contoso.com``).
    mailboxes: tuple[str, ...] = ()
    #: Delegated apps: the account whose sign-in the user's tokens come from (default: the
    #: mailbox), e.g. a person who may open a shared mailbox.
    account: str = ""

    @property
    def signs_in_as(self) -> str:
        """The account that signs in for this user (delegated apps)."""
        return self.account or self.mailbox

    @property
    def has_certificate(self) -> bool:
        return bool(self.certificate_fingerprints or self.certificate_subjects)

    def may_open(self, mailbox: str) -> bool:
        """Is ``mailbox`` allowed by this identity's mailbox policy?"""
        return self.mailbox_for(mailbox) is not None

    def mailbox_for(self, wanted: str) -> str | None:
        """The mailbox to open for a client that asked for ``wanted``, or ``None`` if the
        policy does not allow it (see :func:`proxy.names.match_mailbox`)."""
        return match_mailbox(self.mailboxes or (self.mailbox,), wanted)


@dataclass(frozen=True, slots=True)
class Limits:
    #: Seconds from accepting a connection to a completed login.
    login_timeout: float = 120.0
    #: Seconds to connect to the upstream, finish TLS and read its greeting.
    upstream_timeout: float = 30.0
    #: Seconds to obtain a token from the identity provider.
    token_timeout: float = 30.0
    #: Seconds for a TLS handshake with the client.
    tls_handshake_timeout: float = 30.0
    #: Seconds a client may take, before it has logged in, to send its next whole command
    #: after our last reply (a slow-drip client is cut off here, not only at login_timeout).
    line_timeout: float = 60.0
    #: Password hashes computed at once (argon2id uses its memory cost per hash).
    hash_concurrency: int = 2
    #: Password checks that may wait for a slot, in all and from one source network.
    hash_queue: int = 256
    hash_queue_per_network: int = 64
    #: Seconds a password check may wait for a slot before the client is told to retry.
    hash_queue_timeout: float = 15.0
    #: Seconds a successfully verified password is remembered (0 disables the cache).
    credential_cache_ttl: float = 300.0
    #: Seconds the first retry after a failed login waits; doubled with each failure.
    failure_delay: float = 1.0
    #: The longest such wait.
    max_failure_delay: float = 16.0
    #: Seconds a failed login is counted for (a sliding window).
    failure_window: float = 3600.0
    #: Failures of one login in the window before networks it has not logged in from are
    #: locked out of it.
    lockout_after: int = 10
    #: Failures of one login in the window before even networks it has logged in from are.
    trusted_lockout_after: int = 30
    #: Failures from one network (see ipv4_prefix, ipv6_prefix) before it is locked out.
    network_lockout_after: int = 30
    #: Connections at once per listener, and per source network.
    max_connections: int = 1000
    max_connections_per_network: int = 100
    #: Upstream connections opened for clients that have not sent a command yet (the
    #: login is faster for it); beyond this, a client's upstream waits for its first command.
    max_early_upstreams: int = 100
    #: Seconds between new TLS session ticket keys for clients (kept in memory only).
    ticket_key_lifetime: float = 3600.0
    #: Warm upstream connections each listener keeps while logins come (0: none).
    upstream_pool: int = 2
    #: Seconds a warm connection may wait for a login (well under the upstream's own
    #: limit for connections that do not log in).
    upstream_pool_max_age: float = 20.0
    #: What one source network is: the prefix length of IPv4 and of IPv6 addresses.
    ipv4_prefix: int = 32
    ipv6_prefix: int = 64
    #: Seconds a load balancer has to send the whole PROXY protocol header.
    proxy_header_timeout: float = 10.0

    def throttle_policy(self) -> ThrottlePolicy:
        return ThrottlePolicy(
            base_delay=self.failure_delay,
            max_delay=self.max_failure_delay,
            window=self.failure_window,
            login_lockout=self.lockout_after,
            trusted_lockout=self.trusted_lockout_after,
            network_lockout=self.network_lockout_after,
            ipv4_prefix=self.ipv4_prefix,
            ipv6_prefix=self.ipv6_prefix,
        )


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """The ``[metrics]`` table: the HTTP listener for /metrics, /healthz and /readyz."""

    host: str = "127.0.0.1"
    port: int = 9464


#: How log records are written to stderr.
LOG_FORMATS: Final = ("text", "json")


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    apps: Mapping[str, App]
    listeners: tuple[ListenerConfig, ...]
    users: Mapping[str, UserConfig]
    limits: Limits = Limits()
    #: Where tokens are kept: memory (default), an encrypted file, or Redis.
    cache: CacheSettings = field(default_factory=CacheSettings)
    #: Problems that do not stop the proxy, as ``FILE: KEY: text`` lines.
    warnings: tuple[str, ...] = ()
    #: The metrics and health listener, if any.
    metrics: MetricsSettings | None = None
    #: The control socket ``status`` and ``unlock`` talk to, if any.
    control_socket: Path | None = None
    #: ``text`` or ``json`` (one object per line); ``--log-format`` overrides it.
    log_format: str = "text"

    def user(self, login: str) -> UserConfig | None:
        """Find a user by login name, ignoring case."""
        return self.users.get(fold_case(login))

    def delegated_accounts(self) -> dict[str, dict[str, list[str]]]:
        """For each delegated app, each account that signs in and the users it serves."""
        accounts: dict[str, dict[str, list[str]]] = {}
        for user in self.users.values():
            if user.app in self.apps and self.apps[user.app].delegated:
                by_account = accounts.setdefault(user.app, {})
                by_account.setdefault(user.signs_in_as.lower(), []).append(user.login)
        return accounts


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one ``FILE: KEY: text`` per line.

    ``unreadable_only``: every problem is a file it names that cannot be read (missing
    permissions, say): the configuration may be right and the machine wrong.
    """

    def __init__(self, problems: list[str], *, unreadable_only: bool = False) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
        self.unreadable_only = unreadable_only


class _Reader:
    """Collects problems while walking the parsed TOML."""

    def __init__(self, path: Path) -> None:
        self.file = path
        self.base = path.parent
        self.problems: list[str] = []
        self.warnings: list[str] = []
        #: How many problems are files that cannot be read at all.
        self.unreadable = 0

    def fail(self, key: str, text: str) -> None:
        self.problems.append(f"{self.file}: {key}: {text}")

    def warn(self, key: str, text: str) -> None:
        self.warnings.append(f"{self.file}: {key}: {text}")

    def table(self, data: Mapping[str, object], key: str, name: str) -> Mapping[str, object]:
        value = data.get(name, {})
        if not isinstance(value, dict):
            self.fail(key, "must be a table")
            return {}
        return value

    def unknown_keys(self, data: Mapping[str, object], key: str, known: set[str]) -> None:
        for name in sorted(set(data) - known):
            self.fail(f"{key}.{name}" if key else name, "unknown key")

    def string(
        self, data: Mapping[str, object], key: str, name: str, default: str | None = None
    ) -> str | None:
        value = data.get(name, default)
        if value is None:
            self.fail(f"{key}.{name}", "is required")
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(f"{key}.{name}", "must be a non-empty string")
            return None
        return value

    def strings(self, data: Mapping[str, object], key: str, name: str) -> list[str] | None:
        """An optional string or list of non-empty strings (``None`` if absent or wrong)."""
        value = data.get(name)
        if value is None:
            return None
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
            self.fail(f"{key}.{name}", "must be a string or a list of strings")
            return None
        return [str(i) for i in items]

    def choice(
        self,
        data: Mapping[str, object],
        key: str,
        name: str,
        options: Mapping[str, object],
        default: str | None = None,
    ) -> str | None:
        value = self.string(data, key, name, default)
        if value is not None and value not in options:
            self.fail(f"{key}.{name}", f"must be one of {', '.join(options)}, not {value!r}")
            return None
        return value

    def number(self, data: Mapping[str, object], key: str, name: str, default: float) -> float:
        value = data.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            self.fail(f"{key}.{name}", "must be a non-negative number")
            return default
        return float(value)

    def path(self, data: Mapping[str, object], key: str, name: str) -> Path | None:
        """An optional plain path string, relative to the config file's folder, naming a
        file the proxy may trust (see :mod:`proxy.files`)."""
        value = data.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.fail(f"{key}.{name}", "must be a path string")
            return None
        return self.trusted(f"{key}.{name}", self.base / value, private=False)

    def file_ref(self, data: Mapping[str, object], key: str, name: str) -> Path | None:
        """``name = { file = "..." }`` naming a file that holds a private key."""
        value = data.get(name)
        if value is None:
            return None
        if (
            not isinstance(value, dict)
            or set(value) != {"file"}
            or not isinstance(value["file"], str)
        ):
            self.fail(f"{key}.{name}", 'must be { file = "path" }')
            return None
        return self.trusted(f"{key}.{name}", self.base / value["file"], private=True)

    def trusted(self, where: str, path: Path, *, private: bool) -> Path | None:
        """``path`` if it is a file the proxy may trust, else ``None`` and a problem."""
        try:
            read_trusted(path, private=private)
        except UnsafeFile as exc:
            self.fail(where, str(exc))
            self.unreadable += isinstance(exc, UnreadableFile)
            return None
        return path

    def secret(
        self, data: Mapping[str, object], key: str, name: str, *, strip: bool = True
    ) -> Secret | None:
        """``{ env = "NAME" }``, ``{ file = "path" }`` or (warned) ``{ value = "..." }``."""
        value = data.get(name)
        if value is None:
            return None
        where = f"{key}.{name}"
        if isinstance(value, str):
            self.fail(
                where,
                'put the secret in { env = "NAME" } or { file = "path" }, '
                'or write { value = "..." } to keep it in this file',
            )
            return None
        if not isinstance(value, dict) or len(value) != 1:
            self.fail(
                where, 'must be one of { env = "NAME" }, { file = "path" }, { value = "..." }'
            )
            return None
        ((kind, ref),) = value.items()
        if not isinstance(ref, str) or not ref:
            self.fail(where, f"{kind} must be a non-empty string")
            return None
        if kind == "env":
            env = os.environ.get(ref)
            if not env:
                self.fail(where, f"environment variable {ref} is not set")
                return None
            return Secret(env.strip() if strip else env, origin=f"env {ref}")
        if kind == "file":
            file = self.base / ref
            try:
                text = read_trusted(file, private=True).decode()
            except UnsafeFile as exc:
                self.fail(where, str(exc))
                self.unreadable += isinstance(exc, UnreadableFile)
                return None
            except UnicodeDecodeError:
                self.fail(where, f"{file} is not UTF-8 text")
                return None
            if strip:
                text = text.strip()
            if not text:
                self.fail(where, f"{file} is empty")
                return None
            return Secret(text, origin=f"file {file}")
        if kind == "value":
            self.warn(where, "secret written inline in the configuration file")
            return Secret(ref, origin="inline")
        self.fail(where, f"unknown secret source {kind!r}; use env, file or value")
        return None


def _split_address(text: str) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` → (host, port)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        return None
    # Numbers and dots are an IPv4 address or nothing (999.1.1.1 is no host name either);
    # brackets hold an IPv6 address.
    if text.startswith("[") or not host.strip("0123456789."):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return None
    return host, int(port)


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: The keys each provider takes (all take provider, scope, ca_file and delegated).
PROVIDER_KEYS: Final = {
    "microsoft": {
        "tenant",
        "client_id",
        "client_secret",
        "certificate",
        "authority",
        "redirect_uri",
    },
    "google": {
        "service_account",
        "client_id",
        "client_secret",
        "token_url",
        "authorization_url",
        "redirect_uri",
    },
    "oauth2": {
        "authorization_url",
        "device_authorization_url",
        "userinfo_url",
        "redirect_uri",
        "issuer",
        "token_url",
        "client_id",
        "auth_method",
        "client_secret",
        "private_key",
        "key_id",
        "client_certificate",
        "assertion_audience",
        "resource",
        "expect_audience",
        "expect_scope",
    },
}
#: Keys for apps people sign in to (``delegated = true``) only, and for the others only.
DELEGATED_ONLY_KEYS: Final = {
    "microsoft": {"redirect_uri"},
    "google": {"client_id", "client_secret", "token_url", "authorization_url", "redirect_uri"},
    "oauth2": {"redirect_uri", "authorization_url", "device_authorization_url", "userinfo_url"},
}
APP_ONLY_KEYS: Final = {"microsoft": set(), "google": {"service_account"}, "oauth2": set()}
COMMON_APP_KEYS: Final = {"provider", "scope", "ca_file", "delegated"}
APP_KEYS: Final = COMMON_APP_KEYS.union(*PROVIDER_KEYS.values())
LISTENER_KEYS: Final = {
    "protocol",
    "listen",
    "tls",
    "certificate",
    "upstream",
    "upstream_tls",
    "upstream_ca_file",
    "allow_plaintext",
    "client_ca_file",
    "client_certificates",
    "hostname",
    "proxy_protocol",
    "trusted_proxies",
    "upstream_client_address",
}
USER_KEYS: Final = {
    "password_hash",
    "app",
    "mailbox",
    "account",
    "protocols",
    "certificate_fingerprint",
    "certificate_subject",
    "app_key_hash",
    "mailboxes",
}
CACHE_KEYS: Final = {"kind", "path", "key", "url", "password", "prefix", "lock_timeout", "ca_file"}
#: The [cache] keys each kind takes (besides kind).
CACHE_KIND_KEYS: Final = {
    "memory": set(),
    "file": {"path", "key"},
    "redis": {"url", "key", "password", "prefix", "lock_timeout", "ca_file"},
}
LIMIT_KEYS: Final = {
    "login_timeout",
    "upstream_timeout",
    "token_timeout",
    "tls_handshake_timeout",
    "line_timeout",
    "hash_concurrency",
    "hash_queue",
    "hash_queue_per_network",
    "hash_queue_timeout",
    "credential_cache_ttl",
    "failure_delay",
    "max_failure_delay",
    "failure_window",
    "lockout_after",
    "trusted_lockout_after",
    "network_lockout_after",
    "max_connections",
    "max_connections_per_network",
    "max_early_upstreams",
    "upstream_pool",
    "upstream_pool_max_age",
    "ticket_key_lifetime",
    "ipv4_prefix",
    "ipv6_prefix",
    "proxy_header_timeout",
}
#: Keys of earlier versions: accepted with a warning saying what replaced them.
OLD_LIMIT_KEYS: Final = {
    "lockout_time": "no longer used: a lockout lasts until failures age out of failure_window",
    "max_connections_per_address": "renamed max_connections_per_network (an IPv4 address or "
    "IPv6 /64 by default); its value is used for that",
}


def _read_apps(r: _Reader, data: Mapping[str, object]) -> dict[str, App]:
    apps: dict[str, App] = {}
    for name, raw in r.table(data, "apps", "apps").items():
        key = f"apps.{name}"
        if not isinstance(raw, dict):
            r.fail(key, "must be a table")
            continue
        r.unknown_keys(raw, key, APP_KEYS)
        provider = r.choice(raw, key, "provider", dict.fromkeys(PROVIDERS))
        delegated = raw.get("delegated", False)
        if not isinstance(delegated, bool):
            r.fail(f"{key}.delegated", "must be true or false")
            delegated = False
        if provider is not None:
            for other in sorted((set(raw) & APP_KEYS) - COMMON_APP_KEYS):
                if other not in PROVIDER_KEYS[provider]:
                    r.fail(f"{key}.{other}", f"does not apply to provider {provider!r}")
                elif other in DELEGATED_ONLY_KEYS[provider] and not delegated:
                    r.fail(f"{key}.{other}", "only applies with delegated = true")
                elif other in APP_ONLY_KEYS[provider] and delegated:
                    r.fail(f"{key}.{other}", "does not apply with delegated = true")
        ca_file = r.path(raw, key, "ca_file")
        # An unknown provider is still checked as Microsoft's, to report what else is wrong.
        if provider == "google" and delegated:
            app = _read_google_client(r, raw, key, name, ca_file)
        elif provider == "google":
            app = _read_google(r, raw, key, name, ca_file)
        elif provider == "oauth2":
            app = _read_oauth2(r, raw, key, name, ca_file, delegated=delegated)
        else:
            app = _read_microsoft(r, raw, key, name, ca_file, delegated=delegated)
        if app is not None and delegated:
            redirect = r.string(raw, key, "redirect_uri", DEFAULT_REDIRECT_URI)
            if redirect is not None and not is_loopback_redirect(redirect):
                r.fail(
                    f"{key}.redirect_uri",
                    "must be http://127.0.0.1 or http://localhost, with a port and path if "
                    "the app's registration names them (RFC 8252 loopback redirect)",
                )
            app = dataclasses.replace(app, redirect_uri=redirect or DEFAULT_REDIRECT_URI)
        if app is not None and provider is not None:
            apps[name] = app
    return apps


def is_loopback_redirect(uri: str) -> bool:
    """An ``http://`` loopback redirect URI as RFC 8252 section 7.3 allows (a valid port)."""
    parts = urlsplit(uri)
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return False
    return (
        parts.scheme == "http"
        and parts.hostname in ("127.0.0.1", "localhost")
        and not parts.query
        and not parts.fragment
    )


def _read_microsoft(
    r: _Reader,
    raw: Mapping[str, object],
    key: str,
    name: str,
    ca_file: Path | None,
    *,
    delegated: bool = False,
) -> App | None:
    # People sign in with work or personal accounts alike unless the app says otherwise.
    tenant = r.string(raw, key, "tenant", "common" if delegated else None)
    client_id = r.string(raw, key, "client_id")
    secret = r.secret(raw, key, "client_secret")
    certificate = r.secret(raw, key, "certificate", strip=False)
    if certificate is not None and "PRIVATE KEY" not in certificate.reveal():
        r.fail(
            f"{key}.certificate",
            "must be a PEM file holding the private key and the certificate",
        )
    if (
        not delegated
        and secret is None
        and certificate is None
        and not ({"client_secret", "certificate"} & set(raw))
    ):
        r.fail(key, "needs client_secret or certificate")
    if secret is not None and certificate is not None:
        r.fail(key, "set client_secret or certificate, not both")
    if (
        not delegated
        and tenant is not None
        and tenant.lower() in ("common", "organizations", "consumers")
    ):
        r.fail(
            f"{key}.tenant",
            f"{tenant!r} cannot issue app-only tokens: use the tenant's ID or domain (or set "
            "delegated = true for an app people sign in to)",
        )
    authority = r.string(raw, key, "authority", DEFAULT_AUTHORITY)
    if authority is not None and not authority.startswith("https://"):
        r.fail(f"{key}.authority", "must be an https:// URL")
    scope = r.string(raw, key, "scope", DELEGATED_SCOPE if delegated else DEFAULT_SCOPE)
    if delegated and scope is not None:
        resources = [s for s in scope.split() if s.lower() not in OPENID_SCOPES]
        if not resources:
            r.fail(
                f"{key}.scope",
                "names no permission: list the delegated permissions, e.g. "
                "https://outlook.office.com/IMAP.AccessAsUser.All",
            )
        elif any(s.endswith("/.default") for s in resources):
            r.fail(
                f"{key}.scope",
                "a /.default scope is for app-only tokens; a delegated app lists its "
                f"permissions (default: {DELEGATED_SCOPE})",
            )
    if not (tenant and client_id and authority and scope):
        return None
    return App(
        name=name,
        provider="microsoft",
        client_id=client_id,
        tenant=tenant,
        client_secret=secret,
        certificate=certificate,
        authority=authority.rstrip("/"),
        scope=scope,
        ca_file=ca_file,
        delegated=delegated,
    )


#: Scopes of OpenID Connect; msal asks for them itself.
OPENID_SCOPES: Final = frozenset({"openid", "profile", "offline_access", "email"})


def _read_google_client(
    r: _Reader, raw: Mapping[str, object], key: str, name: str, ca_file: Path | None
) -> App | None:
    """A Google OAuth client of type "Desktop app" that people sign in to."""
    client_id = r.string(raw, key, "client_id")
    secret = r.secret(raw, key, "client_secret")
    if secret is None and "client_secret" not in raw:
        r.fail(
            f"{key}.client_secret",
            "is required: the Desktop app client's secret (Google Cloud console > APIs & "
            "Services > Credentials)",
        )
    scope = r.string(raw, key, "scope", GOOGLE_SCOPE)
    urls = {}
    for setting, default in (
        ("token_url", GOOGLE_TOKEN_URL),
        ("authorization_url", GOOGLE_AUTHORIZATION_URL),
    ):
        urls[setting] = r.string(raw, key, setting, default)
        if urls[setting] is not None and not str(urls[setting]).startswith("https://"):
            r.fail(f"{key}.{setting}", "must be an https:// URL")
    if not (client_id and secret and scope and urls["token_url"] and urls["authorization_url"]):
        return None
    return App(
        name=name,
        provider="google",
        client_id=client_id,
        client_secret=secret,
        auth_method="client_secret_post",
        token_url=str(urls["token_url"]),
        authorization_url=str(urls["authorization_url"]),
        authority="",
        scope=scope,
        ca_file=ca_file,
        delegated=True,
    )


def _read_google(
    r: _Reader, raw: Mapping[str, object], key: str, name: str, ca_file: Path | None
) -> App | None:
    where = f"{key}.service_account"
    scope = r.string(raw, key, "scope", GOOGLE_SCOPE)
    account = r.secret(raw, key, "service_account", strip=False)
    if account is None:
        if "service_account" not in raw:
            r.fail(where, 'is required: the service account\'s JSON key, { file = "path" }')
        return None
    try:
        parsed = json.loads(account.reveal())
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict) or parsed.get("type") != "service_account":
        r.fail(where, f"{account.origin} is not a service account JSON key (type service_account)")
        return None
    fields: dict[str, str] = {}
    for field_name in ("client_email", "private_key", "private_key_id"):
        value = parsed.get(field_name)
        if not isinstance(value, str) or not value:
            r.fail(where, f"{account.origin} has no {field_name}")
        else:
            fields[field_name] = value
    token_uri = parsed.get("token_uri", GOOGLE_TOKEN_URL)
    if not isinstance(token_uri, str) or not token_uri.startswith("https://"):
        r.fail(where, f"{account.origin}: token_uri must be an https:// URL")
        return None
    if len(fields) < 3 or scope is None:
        return None
    return App(
        name=name,
        provider="google",
        client_id=fields["client_email"],
        private_key=Secret(fields["private_key"], origin=account.origin),
        key_id=fields["private_key_id"],
        token_url=token_uri,
        authority="",
        scope=scope,
        ca_file=ca_file,
    )


def _read_oauth2(
    r: _Reader,
    raw: Mapping[str, object],
    key: str,
    name: str,
    ca_file: Path | None,
    *,
    delegated: bool = False,
) -> App | None:
    issuer = r.string(raw, key, "issuer") if "issuer" in raw else None
    token_url = r.string(raw, key, "token_url") if "token_url" in raw else None
    if "issuer" in raw and "token_url" in raw:
        r.fail(key, "set issuer (the server's metadata names its token endpoint) or token_url")
    elif "issuer" not in raw and "token_url" not in raw:
        r.fail(
            f"{key}.issuer",
            "is required (or token_url, for a server without RFC 8414 / OpenID discovery)",
        )
    if issuer is not None and (
        not issuer.startswith("https://") or urlsplit(issuer).query or urlsplit(issuer).fragment
    ):
        r.fail(f"{key}.issuer", "must be an https:// URL without query or fragment")
        issuer = None
    if token_url is not None and not token_url.startswith("https://"):
        r.fail(f"{key}.token_url", "must be an https:// URL")
        token_url = None
    client_id = r.string(raw, key, "client_id")
    scope = r.string(raw, key, "scope") if "scope" in raw else ""
    resources = r.strings(raw, key, "resource")
    if resources is not None:
        if not resources:
            r.fail(f"{key}.resource", "must name at least one resource")
        for resource in resources:
            parts = urlsplit(resource)
            if not parts.scheme or parts.fragment:
                r.fail(
                    f"{key}.resource",
                    f"{resource!r} is not an absolute URI without a fragment (RFC 8707)",
                )
    if "scope" not in raw and not resources:
        r.fail(
            f"{key}.scope",
            "is required: what the mail server's tokens must carry "
            "(or resource, the audience they are for)",
        )
    methods = (*AUTH_METHODS, PUBLIC_CLIENT) if delegated else AUTH_METHODS
    method = r.choice(raw, key, "auth_method", dict.fromkeys(methods), AUTH_METHODS[0])
    secret = r.secret(raw, key, "client_secret")
    private_key = r.secret(raw, key, "private_key", strip=False)
    certificate = r.secret(raw, key, "client_certificate", strip=False)
    key_id = raw.get("key_id", "")
    if not isinstance(key_id, str):
        r.fail(f"{key}.key_id", "must be a string")
        key_id = ""
    needs = {
        "client_secret": method
        in ("client_secret_basic", "client_secret_post", "client_secret_jwt"),
        "private_key": method == "private_key_jwt",
        "client_certificate": method in ("tls_client_auth", "self_signed_tls_client_auth"),
    }
    for setting, needed in needs.items():
        if needed and setting not in raw:
            r.fail(f"{key}.{setting}", f'is required with auth_method = "{method}"')
        elif not needed and setting in raw and method is not None:
            r.fail(f"{key}.{setting}", f'does not apply with auth_method = "{method}"')
    if "key_id" in raw and method != "private_key_jwt":
        r.fail(f"{key}.key_id", 'only applies with auth_method = "private_key_jwt"')
    if private_key is not None and "PRIVATE KEY" not in private_key.reveal():
        r.fail(f"{key}.private_key", "must be a PEM file holding a private key")
    if certificate is not None and not (
        "PRIVATE KEY" in certificate.reveal() and "CERTIFICATE" in certificate.reveal()
    ):
        r.fail(
            f"{key}.client_certificate",
            "must be a PEM file holding the private key and the certificate",
        )
    if method == "client_secret_jwt" and secret is not None and len(secret.reveal()) < 32:
        r.fail(
            f"{key}.client_secret",
            "is too short for client_secret_jwt: HS256 needs at least 32 bytes (RFC 7518)",
        )
    audience = r.string(raw, key, "assertion_audience") if "assertion_audience" in raw else ""
    if audience and method not in ("client_secret_jwt", "private_key_jwt"):
        r.fail(
            f"{key}.assertion_audience",
            'only applies with auth_method = "private_key_jwt" or "client_secret_jwt"',
        )
    if audience == "issuer" and "issuer" not in raw:
        r.fail(f"{key}.assertion_audience", '"issuer" needs issuer')
    expect_audience = r.strings(raw, key, "expect_audience")
    expect_scope = r.strings(raw, key, "expect_scope")
    endpoints = {}
    for setting in ("authorization_url", "device_authorization_url", "userinfo_url"):
        endpoints[setting] = r.string(raw, key, setting) if setting in raw else ""
        if endpoints[setting] and not str(endpoints[setting]).startswith("https://"):
            r.fail(f"{key}.{setting}", "must be an https:// URL")
    if (
        delegated
        and token_url
        and not (endpoints["authorization_url"] or endpoints["device_authorization_url"])
    ):
        r.fail(
            key,
            "a delegated app without issuer needs authorization_url (browser sign-in) or "
            "device_authorization_url (device sign-in) besides token_url",
        )
    if not ((token_url or issuer) and client_id and scope is not None and method):
        return None
    return App(
        name=name,
        provider="oauth2",
        client_id=client_id,
        client_secret=secret,
        private_key=private_key,
        key_id=key_id,
        auth_method=method,
        token_url=token_url or "",
        issuer=issuer or "",
        resources=tuple(resources or ()),
        assertion_audience=audience or "",
        expect_audience=tuple(expect_audience) if expect_audience is not None else None,
        expect_scope=tuple(expect_scope) if expect_scope is not None else None,
        client_certificate=certificate,
        authority="",
        scope=scope,
        ca_file=ca_file,
        delegated=delegated,
        authorization_url=str(endpoints["authorization_url"] or ""),
        device_authorization_url=str(endpoints["device_authorization_url"] or ""),
        userinfo_url=str(endpoints["userinfo_url"] or ""),
    )


def _read_cache(r: _Reader, data: Mapping[str, object]) -> CacheSettings:
    raw = r.table(data, "cache", "cache")
    r.unknown_keys(raw, "cache", CACHE_KEYS)
    kind = r.choice(raw, "cache", "kind", dict.fromkeys(CACHE_KINDS), "memory")
    if kind is None:
        return CacheSettings()
    for name in sorted((set(raw) & CACHE_KEYS) - {"kind"} - CACHE_KIND_KEYS[kind]):
        r.fail(f"cache.{name}", f'does not apply to kind = "{kind}"')
    if kind == "memory":
        return CacheSettings()
    key = r.secret(raw, "cache", "key")
    if key is None and "key" not in raw:
        r.fail("cache.key", f'is required with kind = "{kind}"; it {KEY_HELP}')
    elif key is not None:
        try:
            parse_key(key)
        except ValueError:
            r.fail("cache.key", f"{key.origin}: {KEY_HELP}")
            key = None
    if kind == "file":
        path_text = r.string(raw, "cache", "path")
        path = r.base / path_text if path_text else None
        if path is not None:
            if not path.parent.is_dir():
                r.fail("cache.path", f"directory {path.parent} does not exist")
            else:
                _check_cache_path(r, path)
        return CacheSettings(kind="file", path=path, key=key)
    url = r.string(raw, "cache", "url")
    if url is not None:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            r.fail("cache.url", "must start with redis://, rediss:// (TLS) or unix://")
        elif "@" in url.partition("://")[2].split("/", 1)[0]:
            r.fail(
                "cache.url",
                'must not hold credentials; put the password in password = { env = "NAME" }',
            )
    password = r.secret(raw, "cache", "password")
    prefix = r.string(raw, "cache", "prefix", "xoauth2-proxy") or "xoauth2-proxy"
    lock_timeout = r.number(raw, "cache", "lock_timeout", 15.0)
    if lock_timeout <= 0:
        r.fail("cache.lock_timeout", "must be a positive number of seconds")
    return CacheSettings(
        kind="redis",
        key=key,
        url=url or "",
        password=password,
        prefix=prefix,
        lock_timeout=lock_timeout or 15.0,
        ca_file=r.path(raw, "cache", "ca_file"),
    )


def _check_cache_path(r: _Reader, path: Path) -> None:
    """The token cache file: in a directory only we (or root) may write, and, if it exists
    already, a private regular file of the user the proxy runs as (who rewrites it)."""
    try:
        check_directories(path)
        info = path.parent.stat()
        writable = stat.S_IMODE(info.st_mode) & 0o022
        if writable:
            raise UnsafeFile(
                f"directory {path.parent} is writable by other users (mode "
                f"{stat.S_IMODE(info.st_mode):o}), so the cache could be swapped; chmod go-w "
                f"{path.parent}"
            )
        if path.exists() or path.is_symlink():
            if path.is_symlink():
                raise UnsafeFile(f"{path} is a symbolic link; the cache must be a plain file")
            read_trusted(path, private=True)
            owner = path.stat().st_uid
            if owner != os.geteuid():
                raise UnsafeFile(
                    f"{path} belongs to uid {owner}, not to the user the proxy runs as "
                    f"(uid {os.geteuid()}), who rewrites it; delete it or chown it"
                )
    except UnsafeFile as exc:
        r.fail("cache.path", str(exc))


def _read_listeners(r: _Reader, data: Mapping[str, object]) -> list[ListenerConfig]:
    raw_list = data.get("listeners", [])
    if not isinstance(raw_list, list):
        r.fail("listeners", "must be an array of tables ([[listeners]])")
        return []
    if not raw_list:
        r.fail("listeners", "at least one [[listeners]] is needed")
    listeners: list[ListenerConfig] = []
    seen: set[tuple[str, int]] = set()
    for index, raw in enumerate(raw_list):
        key = f"listeners[{index}]"
        if not isinstance(raw, dict):
            r.fail(key, "must be a table")
            continue
        r.unknown_keys(raw, key, LISTENER_KEYS)
        protocol = r.choice(raw, key, "protocol", {p.value: p for p in Protocol})
        tls = r.choice(raw, key, "tls", CLIENT_TLS)
        upstream_tls = r.choice(raw, key, "upstream_tls", UPSTREAM_TLS)
        listen_text = r.string(raw, key, "listen")
        upstream_text = r.string(raw, key, "upstream")
        listen = _split_address(listen_text) if listen_text else None
        if listen_text and listen is None:
            r.fail(f"{key}.listen", f"must be host:port or [IPv6]:port, not {listen_text!r}")
        upstream = _split_address(upstream_text) if upstream_text else None
        if upstream is not None and upstream[1] == 0:
            upstream = None
        if upstream_text and upstream is None:
            r.fail(f"{key}.upstream", f"must be host:port or [IPv6]:port, not {upstream_text!r}")
        certificate = r.file_ref(raw, key, "certificate")
        allow_plaintext = raw.get("allow_plaintext", False)
        if not isinstance(allow_plaintext, bool):
            r.fail(f"{key}.allow_plaintext", "must be true or false")
            allow_plaintext = False
        if tls in ("implicit", "starttls") and certificate is None and "certificate" not in raw:
            r.fail(f"{key}.certificate", f'is required with tls = "{tls}"')
        if tls == "none" and listen and not is_loopback(listen[0]) and not allow_plaintext:
            r.fail(
                f"{key}.tls",
                "plaintext on a non-loopback address sends passwords in the "
                "clear; use TLS, or set allow_plaintext = true",
            )
        if listen and listen[1] != 0:  # port 0: each listener gets a port of its own
            if listen in seen:
                r.fail(f"{key}.listen", "address used by another listener")
            seen.add(listen)
        hostname = r.string(raw, key, "hostname") if "hostname" in raw else None
        if hostname is not None and not is_hostname(hostname):
            r.fail(f"{key}.hostname", f"not a domain name or [address] literal: {hostname!r}")
        upstream_ca = r.path(raw, key, "upstream_ca_file")
        client_ca = r.path(raw, key, "client_ca_file")
        wanted = (
            r.choice(raw, key, "client_certificates", CLIENT_CERTIFICATES)
            if "client_certificates" in raw
            else None
        )
        client_certificates = CLIENT_CERTIFICATES.get(
            wanted or "", ClientCertificates.OPTIONAL if client_ca else ClientCertificates.NONE
        )
        if client_certificates is not ClientCertificates.NONE and "client_ca_file" not in raw:
            r.fail(f"{key}.client_ca_file", "is required to ask clients for certificates")
        if client_ca and client_certificates is ClientCertificates.NONE:
            r.fail(f"{key}.client_certificates", 'cannot be "none" with a client_ca_file')
        if client_ca and tls == "none":
            r.fail(f"{key}.client_ca_file", "client certificates need TLS")
        proxy_protocol, trusted_proxies = _read_proxy_protocol(r, raw, key)
        forward = r.choice(raw, key, "upstream_client_address", UPSTREAM_CLIENT_ADDRESS, "none")
        if protocol and tls and upstream_tls and listen and upstream:
            listeners.append(
                ListenerConfig(
                    protocol=Protocol(protocol),
                    host=listen[0],
                    port=listen[1],
                    tls=CLIENT_TLS[tls],
                    certificate=certificate,
                    upstream_host=upstream[0],
                    upstream_port=upstream[1],
                    upstream_tls=UPSTREAM_TLS[upstream_tls],
                    upstream_ca_file=upstream_ca,
                    allow_plaintext=allow_plaintext,
                    client_ca_file=client_ca,
                    client_certificates=client_certificates,
                    hostname=hostname,
                    proxy_protocol=proxy_protocol,
                    trusted_proxies=trusted_proxies,
                    upstream_client_address=UPSTREAM_CLIENT_ADDRESS[forward or "none"],
                )
            )
    return listeners


def _read_proxy_protocol(
    r: _Reader, raw: Mapping[str, object], key: str
) -> tuple[bool, tuple[Network, ...]]:
    """``proxy_protocol`` and the ``trusted_proxies`` it needs."""
    enabled = raw.get("proxy_protocol", False)
    if not isinstance(enabled, bool):
        r.fail(f"{key}.proxy_protocol", "must be true or false")
        enabled = False
    networks: list[Network] = []
    for text in r.strings(raw, key, "trusted_proxies") or []:
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            r.fail(f"{key}.trusted_proxies", f"not an address or network: {text!r}")
    if enabled and not networks and "trusted_proxies" not in raw:
        r.fail(
            f"{key}.trusted_proxies",
            "is required with proxy_protocol = true: the load balancers' addresses or "
            'networks (["10.0.0.0/8"]), whose headers are believed',
        )
    if "trusted_proxies" in raw and not enabled:
        r.fail(f"{key}.trusted_proxies", "only applies with proxy_protocol = true")
    return enabled, tuple(networks)


def _read_metrics(r: _Reader, data: Mapping[str, object]) -> MetricsSettings | None:
    if "metrics" not in data:
        return None
    raw = r.table(data, "metrics", "metrics")
    r.unknown_keys(raw, "metrics", {"listen"})
    default = MetricsSettings()
    text = r.string(raw, "metrics", "listen", f"{default.host}:{default.port}")
    address = _split_address(text) if text else None
    if text and address is None:
        r.fail("metrics.listen", f"must be host:port, not {text!r}")
    if address is None:
        return default
    return MetricsSettings(host=address[0], port=address[1])


def _read_control(r: _Reader, data: Mapping[str, object]) -> Path | None:
    raw = r.table(data, "control", "control")
    r.unknown_keys(raw, "control", {"socket"})
    text = r.string(raw, "control", "socket") if "socket" in raw else None
    if text is None:
        return None
    path = r.base / text
    if not path.parent.is_dir():
        r.fail("control.socket", f"directory {path.parent} does not exist")
        return None
    try:
        # Its directory and every one above: anyone who may replace one could put their
        # own socket in the proxy's place.
        check_directories(path)
    except UnsafeFile as exc:
        r.fail("control.socket", f"{exc} (use a directory only the service may write)")
    return path


def _read_logging(r: _Reader, data: Mapping[str, object]) -> str:
    raw = r.table(data, "logging", "logging")
    r.unknown_keys(raw, "logging", {"format"})
    return r.choice(raw, "logging", "format", dict.fromkeys(LOG_FORMATS), "text") or "text"


def _read_users(
    r: _Reader, data: Mapping[str, object], apps: Mapping[str, App], app_names: set[str]
) -> dict[str, UserConfig]:
    from proxy.identities import check_hash_format, outdated_parameters  # no import cycle

    users: dict[str, UserConfig] = {}
    for login, raw in r.table(data, "users", "users").items():
        shown = login.encode("unicode_escape").decode("ascii")  # one line, whatever it holds
        key = f'users."{shown if has_control_characters(login) else login}"'
        if not isinstance(raw, dict):
            r.fail(key, "must be a table")
            continue
        r.unknown_keys(raw, key, USER_KEYS)
        # No client can send them, and they would break log lines and generated scripts,
        # or (format characters) make a name display as another.
        if has_control_characters(login):
            r.fail(key, "the login name contains control characters")
        elif has_format_characters(login):
            r.fail(key, "the login name contains invisible formatting characters (Unicode Cf)")
        for field_name in ("mailbox", "mailboxes"):
            values = raw.get(field_name)
            for value in values if isinstance(values, list) else [values]:
                if not isinstance(value, str):
                    continue
                if has_control_characters(value):
                    r.fail(f"{key}.{field_name}", f"{value!r} contains control characters")
                elif not is_plain_address(value.replace("*", "x")) or has_format_characters(value):
                    r.fail(
                        f"{key}.{field_name}",
                        f"{value!r} is not a plain address (local@domain; * in patterns)",
                    )
        hashes_raw = raw.get("password_hash", [])
        hashes = [hashes_raw] if isinstance(hashes_raw, str) else hashes_raw
        if not isinstance(hashes, list) or not all(isinstance(h, str) and h for h in hashes):
            r.fail(
                f"{key}.password_hash",
                "must be a hash from `xoauth2-proxy hash-password` (or a list of them)",
            )
            hashes = None
        fingerprints: set[str] = set()
        for text in r.strings(raw, key, "certificate_fingerprint") or []:
            digest = text.removeprefix("sha256:").replace(":", "").lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                r.fail(f"{key}.certificate_fingerprint", f"not a SHA-256 fingerprint: {text!r}")
            else:
                fingerprints.add(digest)
        subjects = set(r.strings(raw, key, "certificate_subject") or [])
        key_hashes: set[str] = set()
        for text in r.strings(raw, key, "app_key_hash") or []:
            digest = text.removeprefix("sha256:").lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                r.fail(f"{key}.app_key_hash", "must be the sha256:... line `app-key` printed")
            else:
                key_hashes.add(digest)
        if hashes is not None and not (hashes or fingerprints or subjects or key_hashes):
            r.fail(
                key,
                "needs a credential: password_hash, certificate_fingerprint, "
                "certificate_subject or app_key_hash",
            )
        patterns = r.strings(raw, key, "mailboxes")
        if patterns is not None and not patterns:
            r.fail(f"{key}.mailboxes", "must list at least one mailbox or pattern")
        for index, h in enumerate(hashes or ()):
            which = f"{key}.password_hash" + (f"[{index}]" if len(hashes or ()) > 1 else "")
            problem = check_hash_format(h)
            if problem:
                r.fail(which, problem)
            elif outdated := outdated_parameters(h):
                r.warn(which, outdated)
        app = r.string(raw, key, "app")
        if app is not None and app not in app_names:
            r.fail(f"{key}.app", f"no [apps.{app}] is configured")
        mailbox = r.string(raw, key, "mailbox", login)
        protocols_raw = raw.get("protocols", [p.value for p in Protocol])
        protocols: set[Protocol] = set()
        if not isinstance(protocols_raw, list) or not protocols_raw:
            r.fail(f"{key}.protocols", "must be a non-empty list of imap, pop3, smtp")
        else:
            for p in protocols_raw:
                if p in {q.value for q in Protocol}:
                    protocols.add(Protocol(p))
                else:
                    r.fail(f"{key}.protocols", f"unknown protocol {p!r}")
        if "mailbox" in raw and mailbox and patterns and match_mailbox(patterns, mailbox) is None:
            r.fail(f"{key}.mailbox", f"{mailbox!r} is not in the user's mailboxes")
        account = r.string(raw, key, "account") if "account" in raw else ""
        if account and has_control_characters(account):
            r.fail(f"{key}.account", "contains control characters")
            account = ""
        if "account" in raw and app is not None and app in apps and not apps[app].delegated:
            r.fail(f"{key}.account", "only applies to users of delegated apps")
        folded = fold_case(login)
        if folded in users:
            r.fail(key, "the same login name, ignoring case, appears twice")
        if app and mailbox and protocols:
            users[folded] = UserConfig(
                login=login,
                password_hashes=tuple(hashes or ()),
                app=app,
                mailbox=mailbox,
                protocols=frozenset(protocols),
                certificate_fingerprints=frozenset(fingerprints),
                certificate_subjects=frozenset(subjects),
                app_key_hashes=frozenset(key_hashes),
                mailboxes=tuple(patterns or ()),
                account=account or "",
            )
    _check_unique_credentials(r, users)
    return users


def _check_unique_credentials(r: _Reader, users: Mapping[str, UserConfig]) -> None:
    """A certificate or an app key must name exactly one identity."""
    owners: dict[tuple[str, str], str] = {}
    for user in users.values():
        credentials = [
            *(("certificate_fingerprint", f) for f in user.certificate_fingerprints),
            *(("certificate_subject", s) for s in user.certificate_subjects),
            *(("app_key_hash", k) for k in user.app_key_hashes),
        ]
        for kind, value in credentials:
            other = owners.setdefault((kind, value), user.login)
            if other != user.login:
                r.fail(
                    f'users."{user.login}".{kind}',
                    f'the same {kind.replace("_", " ")} is given to users."{other}"',
                )


def _read_limits(r: _Reader, data: Mapping[str, object]) -> Limits:
    raw = dict(r.table(data, "limits", "limits"))
    for old, what in OLD_LIMIT_KEYS.items():
        if old in raw:
            r.warn(f"limits.{old}", what)
    if "max_connections_per_address" in raw:
        raw.setdefault("max_connections_per_network", raw["max_connections_per_address"])
    r.unknown_keys(raw, "limits", LIMIT_KEYS | set(OLD_LIMIT_KEYS))
    d = Limits()

    def count(name: str, default: int, *, most: int | None = None, least: int = 1) -> int:
        value = r.number(raw, "limits", name, default)
        if value < least or value != int(value) or (most is not None and value > most):
            span = f"from {least} to {most}" if most is not None else f"of at least {least}"
            r.fail(f"limits.{name}", f"must be a whole number {span}")
            return default
        return int(value)

    def seconds(name: str, default: float) -> float:
        """A deadline: zero would fail every login at once."""
        value = r.number(raw, "limits", name, default)
        if value <= 0:
            r.fail(f"limits.{name}", "must be a positive number of seconds")
            return default
        return value

    limits = Limits(
        login_timeout=seconds("login_timeout", d.login_timeout),
        upstream_timeout=seconds("upstream_timeout", d.upstream_timeout),
        token_timeout=seconds("token_timeout", d.token_timeout),
        tls_handshake_timeout=seconds("tls_handshake_timeout", d.tls_handshake_timeout),
        line_timeout=seconds("line_timeout", d.line_timeout),
        hash_concurrency=count("hash_concurrency", d.hash_concurrency),
        hash_queue=count("hash_queue", d.hash_queue),
        hash_queue_per_network=count("hash_queue_per_network", d.hash_queue_per_network),
        hash_queue_timeout=seconds("hash_queue_timeout", d.hash_queue_timeout),
        credential_cache_ttl=r.number(
            raw, "limits", "credential_cache_ttl", d.credential_cache_ttl
        ),
        failure_delay=r.number(raw, "limits", "failure_delay", d.failure_delay),
        max_failure_delay=r.number(raw, "limits", "max_failure_delay", d.max_failure_delay),
        failure_window=seconds("failure_window", d.failure_window),
        lockout_after=count("lockout_after", d.lockout_after),
        trusted_lockout_after=count("trusted_lockout_after", d.trusted_lockout_after),
        network_lockout_after=count("network_lockout_after", d.network_lockout_after),
        max_connections=count("max_connections", d.max_connections),
        max_connections_per_network=count(
            "max_connections_per_network", d.max_connections_per_network
        ),
        max_early_upstreams=count("max_early_upstreams", d.max_early_upstreams, least=0),
        upstream_pool=count("upstream_pool", d.upstream_pool, least=0, most=100),
        upstream_pool_max_age=seconds("upstream_pool_max_age", d.upstream_pool_max_age),
        ticket_key_lifetime=seconds("ticket_key_lifetime", d.ticket_key_lifetime),
        ipv4_prefix=count("ipv4_prefix", d.ipv4_prefix, most=32, least=8),
        ipv6_prefix=count("ipv6_prefix", d.ipv6_prefix, most=128, least=16),
        proxy_header_timeout=seconds("proxy_header_timeout", d.proxy_header_timeout),
    )
    if limits.trusted_lockout_after < limits.lockout_after:
        r.fail(
            "limits.trusted_lockout_after",
            f"must be at least lockout_after ({limits.lockout_after}): networks a login works "
            "from get the higher ceiling",
        )
    return limits


def _walk_inline_secrets(data: object) -> Iterator[None]:
    if isinstance(data, dict):
        if set(data) == {"value"}:
            yield None
        for v in data.values():
            yield from _walk_inline_secrets(v)
    elif isinstance(data, list):
        for v in data:
            yield from _walk_inline_secrets(v)


def load_config(path: Path) -> Config:
    """Read and validate ``path``; raise :class:`ConfigError` listing every problem."""
    r = _Reader(path)
    try:
        data = tomllib.loads(read_trusted(path, private=False).decode())
    except UnsafeFile as exc:
        raise ConfigError([f"{path}: {exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    if any(True for _ in _walk_inline_secrets(data)):
        try:
            read_trusted(path, private=True)
        except UnsafeFile as exc:
            r.fail("(file)", f"holds inline secrets: {exc}")
    r.unknown_keys(
        data, "", {"apps", "listeners", "users", "limits", "cache", "metrics", "control", "logging"}
    )
    apps = _read_apps(r, data)
    app_names = set(r.table(data, "apps", "apps"))
    listeners = _read_listeners(r, data)
    users = _read_users(r, data, apps, app_names)
    limits = _read_limits(r, data)
    cache = _read_cache(r, data)
    raw_apps = data.get("apps")
    delegated = sorted(
        name
        for name, raw in (raw_apps.items() if isinstance(raw_apps, dict) else ())
        if isinstance(raw, dict) and raw.get("delegated") is True
    )
    if delegated and cache.kind == "memory":
        r.fail(
            "cache.kind",
            f"delegated apps ({', '.join(f'apps.{n}' for n in delegated)}) keep people's "
            'sign-ins in the token cache, which "memory" would lose at every restart: set '
            '[cache] kind = "file" (with path and key) or "redis"',
        )
    metrics = _read_metrics(r, data)
    control_socket = _read_control(r, data)
    log_format = _read_logging(r, data)
    if r.problems:
        raise ConfigError(r.problems, unreadable_only=r.unreadable == len(r.problems))
    return Config(
        path=path,
        apps=apps,
        listeners=tuple(listeners),
        users=users,
        limits=limits,
        cache=cache,
        warnings=tuple(r.warnings),
        metrics=metrics,
        control_socket=control_socket,
        log_format=log_format,
    )
