"""The end-to-end rig: an emulated Entra, a real Dovecot, and the proxy between them.

Session-scoped: the PKI, the identity provider emulation and Dovecot (started once).
Per test: a configuration file and an in-process proxy serving it on free loopback ports.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest

from broker import build_source
from proxy.config import load_config
from proxy.identities import HashParameters, hash_password
from proxy.net.server import BoundListener, ProxyServer
from tests.support.certs import TestPki
from tests.support.dovecot import Dovecot
from tests.support.entra import EntraEmulator
from tests.support.smtpsink import SmtpSink

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import trio

    from broker.source import CachingTokenSource

CLIENT_ID = "11111111-2222-3333-4444-555555555555"
CLIENT_SECRET = "emulated-client-secret-Xy7~Qp"
ROLELESS_CLIENT_ID = "99999999-2222-3333-4444-555555555555"
#: An app consented for IMAP only: IMAP.AccessAsApp, not POP.AccessAsApp nor SMTP.SendAsApp.
IMAP_ONLY_CLIENT_ID = "77777777-2222-3333-4444-555555555555"
MAILBOX = "reports@contoso.com"
OTHER_MAILBOX = "scanner@contoso.com"
PASSWORD = 'c0rrect "horse" battery'
#: Cheap argon2id for tests; production uses the RFC 9106 default.
TEST_HASH = HashParameters(memory_cost=256, iterations=1, lanes=1)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EntraEmulator]:
    with EntraEmulator(tmp_path_factory.mktemp("idp")) as emulator:
        emulator.register_app(CLIENT_ID, secret=CLIENT_SECRET)
        emulator.register_app(ROLELESS_CLIENT_ID, secret=CLIENT_SECRET, roles=())
        emulator.register_app(
            IMAP_ONLY_CLIENT_ID, secret=CLIENT_SECRET, roles=("IMAP.AccessAsApp",)
        )
        yield emulator


@pytest.fixture(scope="session")
def sink() -> Iterator[SmtpSink]:
    """Where Dovecot's submission service relays what the proxy's SMTP clients send."""
    with SmtpSink() as server:
        yield server


@pytest.fixture(scope="session")
def dovecot(
    tmp_path_factory: pytest.TempPathFactory, pki: TestPki, idp: EntraEmulator, sink: SmtpSink
) -> Iterator[Dovecot]:
    with Dovecot(
        tmp_path_factory.mktemp("dovecot"),
        pki=pki,
        jwt_public_key_pem=idp.public_key_pem(),
        kid=idp.kid,
        issuer=idp.issuer,
        mailboxes=(MAILBOX, OTHER_MAILBOX),
        smtp_relay=sink.address,
    ) as server:
        yield server


@dataclass
class Listener:
    """One ``[[listeners]]`` table of a test configuration."""

    protocol: str = "imap"
    tls: str = "implicit"
    upstream_port: int = 0
    upstream_tls: str = "implicit"
    upstream_host: str = "127.0.0.1"
    trust_upstream: bool = True
    #: Further keys of the table, values as TOML text: ``{"client_certificates": '"optional"'}``.
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class User:
    """One ``[users."LOGIN"]`` table of a test configuration."""

    password: str | None
    mailbox: str
    app: str = "contoso"
    protocols: tuple[str, ...] = ()
    #: Further keys of the table, values as TOML text.
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class ProxyRig:
    """Writes a configuration for the proxy under test and knows the secrets in it."""

    directory: Path
    pki: TestPki
    idp: EntraEmulator
    dovecot: Dovecot
    users: dict[str, User] = field(default_factory=dict)
    #: Extra ``[limits]`` settings.
    limits: dict[str, float] = field(default_factory=dict)
    #: A ``[cache]`` table, values as TOML text (none: the default, in memory).
    cache: dict[str, str] = field(default_factory=dict)
    #: Further apps of the emulated tenant, by name: their client ids.
    apps: dict[str, str] = field(default_factory=dict)
    #: Further top-level tables (``metrics``, ``control``, ``logging``), values as TOML text.
    tables: dict[str, dict[str, str]] = field(default_factory=dict)
    #: The cost of the users' password hashes: cheap, unless a test needs what users run.
    hash_parameters: HashParameters = TEST_HASH
    _hashes: dict[str, str] = field(default_factory=dict)

    def add_user(
        self,
        login: str,
        password: str | None,
        *,
        mailbox: str | None = None,
        app: str = "contoso",
        protocols: tuple[str, ...] = (),
        extra: dict[str, str] | None = None,
    ) -> None:
        self.users[login] = User(password, mailbox or login, app, protocols, extra or {})

    def _hash(self, password: str) -> str:
        """The password's hash at :attr:`hash_parameters`, computed once per rig."""
        key = f"{self.hash_parameters}\x00{password}"
        if key not in self._hashes:
            self._hashes[key] = hash_password(password, self.hash_parameters)
        return self._hashes[key]

    def write(self, listeners: list[Listener]) -> Path:
        cert = self.pki.issue("proxy", "localhost", "127.0.0.1")
        secret_file = self.directory / "client-secret"
        secret_file.write_text(CLIENT_SECRET + "\n")
        secret_file.chmod(0o600)
        lines = []
        apps = {"contoso": CLIENT_ID, "roleless": ROLELESS_CLIENT_ID, **self.apps}
        for name, client_id in apps.items():
            lines += [
                f"[apps.{name}]",
                'provider = "microsoft"',
                f'tenant = "{self.idp.tenant}"',
                f'client_id = "{client_id}"',
                'client_secret = { file = "client-secret" }',
                f'authority = "{self.idp.authority}"',
                f'ca_file = "{self.idp.ca_file}"',
                "",
            ]
        for listener in listeners:
            lines += [
                "[[listeners]]",
                f'protocol = "{listener.protocol}"',
                'listen = "127.0.0.1:0"',
                f'tls = "{listener.tls}"',
            ]
            if listener.tls != "none":
                lines.append(f'certificate = {{ file = "{cert}" }}')
            lines += [
                f'upstream = "{listener.upstream_host}:{listener.upstream_port}"',
                f'upstream_tls = "{listener.upstream_tls}"',
            ]
            if listener.trust_upstream:
                lines.append(f'upstream_ca_file = "{self.dovecot.ca_file}"')
            lines += [f"{key} = {value}" for key, value in listener.extra.items()]
            lines.append("")
        limits = {"login_timeout": 20, "upstream_timeout": 5, "token_timeout": 5, **self.limits}
        lines += ["[limits]", *(f"{key} = {value}" for key, value in limits.items()), ""]
        if self.cache:
            lines += ["[cache]", *(f"{key} = {value}" for key, value in self.cache.items()), ""]
        for table, values in self.tables.items():
            lines += [f"[{table}]", *(f"{key} = {value}" for key, value in values.items()), ""]
        for login, user in self.users.items():
            lines += [f'[users."{login}"]', f'app = "{user.app}"', f'mailbox = "{user.mailbox}"']
            if user.password is not None:
                lines.append(f'password_hash = "{self._hash(user.password)}"')
            if user.protocols:
                lines.append("protocols = [" + ", ".join(f'"{p}"' for p in user.protocols) + "]")
            lines += [f"{key} = {value}" for key, value in user.extra.items()]
            lines.append("")
        path = self.directory / "config.toml"
        path.write_text("\n".join(lines))
        path.chmod(0o600)
        return path


@pytest.fixture
def rig(tmp_path: Path, pki: TestPki, idp: EntraEmulator, dovecot: Dovecot) -> ProxyRig:
    rig = ProxyRig(tmp_path, pki, idp, dovecot)
    rig.add_user(MAILBOX, PASSWORD)
    return rig


@dataclass
class RunningProxy:
    server: ProxyServer
    listeners: list[BoundListener]
    tokens: CachingTokenSource

    @property
    def port(self) -> int:
        return self.listeners[0].port

    def port_of(self, index: int) -> int:
        return self.listeners[index].port


async def start_proxy(nursery: trio.Nursery, config_path: Path) -> RunningProxy:
    """Serve ``config_path`` in ``nursery``, with the configured token cache as ``serve``
    has (its background refresh is not started: tests that need it run ``serve``)."""
    config = load_config(config_path)
    tokens = build_source(config.apps, config.cache)
    server = ProxyServer(config, tokens, grace=1.0)
    bound: list[BoundListener] = await nursery.start(server.serve)
    return RunningProxy(server, bound, tokens)


@pytest.fixture
async def imap_proxy(nursery: trio.Nursery, rig: ProxyRig, dovecot: Dovecot) -> RunningProxy:
    """An implicit-TLS IMAP listener in front of Dovecot's implicit-TLS port."""
    return await start_proxy(nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)]))


@pytest.fixture(autouse=True)
def _debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
