"""Prometheus metrics: what the proxy counts, and what it reports when scraped.

Counters and histograms are updated where things happen (sessions, logins, the relay);
values that are state rather than events (sessions open, the password-check queue,
lockouts, token expiry) are read from the running server at scrape time through a
:class:`StateSource`, so they can never drift from the truth.

Labels are bounded by the configuration and by fixed vocabularies: listener names, app
names, protocols, and the enums below. Never a login name, a mailbox or an address.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

if TYPE_CHECKING:
    from collections.abc import Iterator

    from prometheus_client.metrics_core import Metric

__all__ = [
    "LoginResult",
    "Metrics",
    "Phase",
    "ServerState",
    "StateSource",
    "TokenState",
    "UpstreamFailure",
]

PREFIX: Final = "xoauth2_proxy"


class LoginResult(enum.Enum):
    """How a login attempt ended, as the ``result`` label of ``logins_total``."""

    SUCCESS = "success"
    #: Wrong password, unknown user, protocol or mailbox not allowed, bad certificate or key.
    BAD_CREDENTIALS = "bad_credentials"
    LOCKED_OUT = "locked_out"
    #: The password-check queue had no room in time.
    BUSY = "busy"
    #: The identity provider failed for now (unreachable, 5xx, 429, timeout).
    IDP_TEMPORARY = "idp_temporary"
    #: The identity provider refused the app (bad secret, unknown client or tenant).
    IDP_PERMANENT = "idp_permanent"
    #: The token lacks the protocol's role (Microsoft), or a delegated token its permission.
    MISSING_ROLE = "missing_role"
    #: A delegated app's account has no usable sign-in (never signed in, or revoked).
    SIGN_IN_REQUIRED = "sign_in_required"
    #: The token is not what the app asks for (issuer, audience, scope, tenant).
    TOKEN_INVALID = "token_invalid"
    #: The upstream refused the token.
    UPSTREAM_REFUSED = "upstream_refused"
    #: The client left before the answer.
    ABANDONED = "abandoned"


class Phase(enum.Enum):
    """The phases of a login, as the ``phase`` label of ``login_phase_seconds``."""

    PASSWORD_CHECK = "password_check"
    TOKEN = "token"
    UPSTREAM_LOGIN = "upstream_login"


class UpstreamFailure(enum.Enum):
    CONNECT = "connect"
    TLS = "tls"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class TokenState:
    """One app's token as the broker knows it (no token, no secret)."""

    app: str
    #: Seconds until the soonest of the app's tokens expires (``None``: no token yet).
    expires_in: float | None


@dataclass(frozen=True, slots=True)
class ServerState:
    """What the running server reports at each scrape."""

    sessions_open: dict[str, int] = field(default_factory=dict)
    hash_queued: int = 0
    hash_running: int = 0
    #: Keys locked out now, by scope (``login``, ``network``).
    lockouts: dict[str, int] = field(default_factory=dict)
    tokens: tuple[TokenState, ...] = ()
    #: Warm upstream connections ready now, per listener.
    upstream_pool_ready: dict[str, int] = field(default_factory=dict)


class StateSource(Protocol):
    def state(self) -> ServerState: ...


#: Login phases take from a millisecond (a cached password) to tens of seconds (a slow
#: identity provider, a queue after a restart).
PHASE_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Every metric of one proxy process, in a registry of its own."""

    def __init__(self, version: str = "") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # process_* (CPU, memory, open files) and python_info, as every exporter has.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        info = Gauge(f"{PREFIX}_build_info", "The proxy's version.", ["version"], registry=r)
        info.labels(version or "unknown").set(1)
        self.sessions = Counter(
            f"{PREFIX}_sessions",
            "Client connections accepted, per listener.",
            ["listener"],
            registry=r,
        )
        self.refused = Counter(
            f"{PREFIX}_connections_refused",
            "Client connections closed before a session started: too_many (connection "
            "limits), untrusted_proxy (a PROXY-protocol listener reached from outside "
            "trusted_proxies), bad_proxy_header (missing, malformed or late header).",
            ["listener", "reason"],
            registry=r,
        )
        self.logins = Counter(
            f"{PREFIX}_logins",
            "Login attempts by protocol and outcome.",
            ["protocol", "result"],
            registry=r,
        )
        self.phases = Histogram(
            f"{PREFIX}_login_phase_seconds",
            "Time spent in each phase of a login: password_check (queue and hash, or the "
            "cache), token (from the broker), upstream_login (XOAUTH2 until the upstream's "
            "answer).",
            ["protocol", "phase"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.token_fetches = Counter(
            f"{PREFIX}_token_fetches",
            "Token requests to the identity provider per app: success, temporary or "
            "permanent failure; shared_cache when another instance had renewed it.",
            ["app", "outcome"],
            registry=r,
        )
        self.credential_cache = Counter(
            f"{PREFIX}_credential_cache_lookups",
            "Password checks answered from the verified-credential cache (hit) or needing "
            "a hash (miss).",
            ["result"],
            registry=r,
        )
        self.upstream_failures = Counter(
            f"{PREFIX}_upstream_failures",
            "Upstream connections that failed: connect, tls (certificate, host name, "
            "handshake), timeout.",
            ["listener", "kind"],
            registry=r,
        )
        self.relayed = Counter(
            f"{PREFIX}_relayed_bytes",
            "Bytes relayed after login, per protocol and direction.",
            ["protocol", "direction"],
            registry=r,
        )
        self.not_connected = Counter(
            f"{PREFIX}_not_connected",
            "Logins the upstream accepted and then refused the mailbox in its first replies "
            "(Exchange: 'User is authenticated but not connected', SendAsDenied).",
            ["protocol"],
            registry=r,
        )
        self.token_expired = Counter(
            f"{PREFIX}_token_expired_disconnects",
            "Sessions the upstream ended because their token expired (AccessTokenExpired).",
            ["protocol"],
            registry=r,
        )
        self.upstream_tls = Counter(
            f"{PREFIX}_upstream_tls_handshakes",
            "TLS handshakes with the upstream, per listener: resumed (yes) or full (no).",
            ["listener", "resumed"],
            registry=r,
        )
        self.upstream_pool = Counter(
            f"{PREFIX}_upstream_pool_connections",
            "Warm upstream connections, per listener: taken by a login, missed (a login "
            "found none ready), expired unused, failed to open.",
            ["listener", "outcome"],
            registry=r,
        )
        self.reloads = Counter(
            f"{PREFIX}_reloads",
            "Configuration reloads (SIGHUP): success or failure.",
            ["result"],
            registry=r,
        )
        self._state: StateSource | None = None
        r.register(_StateCollector(self))

    def watch(self, source: StateSource) -> None:
        """Report ``source``'s state at each scrape."""
        self._state = source

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The metrics in the format ``accept`` asks for (text or OpenMetrics), and its
        content type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def login(self, protocol: str, result: LoginResult) -> None:
        self.logins.labels(protocol, result.value).inc()

    def phase(self, protocol: str, phase: Phase, seconds: float) -> None:
        self.phases.labels(protocol, phase.value).observe(max(seconds, 0.0))

    def token_fetch(self, app: str, outcome: str) -> None:
        self.token_fetches.labels(app, outcome).inc()

    def credential_lookup(self, *, hit: bool) -> None:
        self.credential_cache.labels("hit" if hit else "miss").inc()

    def upstream_failure(self, listener: str, kind: UpstreamFailure) -> None:
        self.upstream_failures.labels(listener, kind.value).inc()

    def upstream_handshake(self, listener: str, *, resumed: bool) -> None:
        self.upstream_tls.labels(listener, "yes" if resumed else "no").inc()

    def pool_event(self, listener: str, outcome: str) -> None:
        self.upstream_pool.labels(listener, outcome).inc()


class _StateCollector:
    """Gauges read from the server at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())  # the families depend on the configuration; described at collect

    def collect(self) -> Iterator[Metric]:
        source = self._metrics._state
        state = source.state() if source is not None else ServerState()
        open_ = GaugeMetricFamily(
            f"{PREFIX}_sessions_open",
            "Client connections open now, per listener.",
            labels=["listener"],
        )
        for listener, count in sorted(state.sessions_open.items()):
            open_.add_metric([listener], count)
        yield open_
        yield GaugeMetricFamily(
            f"{PREFIX}_hash_queue_depth",
            "Password checks waiting for a hash slot.",
            value=state.hash_queued,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_hash_running", "Password hashes being computed.", value=state.hash_running
        )
        lockouts = GaugeMetricFamily(
            f"{PREFIX}_lockouts_active",
            "Logins and source networks locked out now (failures in the window at the "
            "lockout ceiling).",
            labels=["scope"],
        )
        for scope in ("login", "network"):
            lockouts.add_metric([scope], state.lockouts.get(scope, 0))
        yield lockouts
        expiry = GaugeMetricFamily(
            f"{PREFIX}_token_expiry_seconds",
            "Seconds until each app's token expires (the soonest, for per-mailbox tokens); "
            "absent while an app has none.",
            labels=["app"],
        )
        for token in sorted(state.tokens, key=lambda t: t.app):
            if token.expires_in is not None:
                expiry.add_metric([token.app], token.expires_in)
        yield expiry
        pool = GaugeMetricFamily(
            f"{PREFIX}_upstream_pool_ready",
            "Warm upstream connections ready for a login now, per listener.",
            labels=["listener"],
        )
        for listener, count in sorted(state.upstream_pool_ready.items()):
            pool.add_metric([listener], count)
        yield pool
