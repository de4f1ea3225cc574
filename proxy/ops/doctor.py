"""``xoauth2-proxy doctor``: walk the chain a login takes and say, step by step, what
works and what to fix.

For one user:

1. the user, its mailbox and its mailbox policy; for a delegated app, whether the account
   has signed in (and when), or what to run so that it does -- read from the token cache,
   without asking the identity provider;
2. the app's token: the identity provider accepts the secret, key or certificate (or the
   sign-in's refresh token), and the token is what the app asks for (issuer, audience, scope;
   for Microsoft the tenant);
3. for Microsoft apps, the token's roles: each protocol the user may use needs its role (a
   delegated app: its delegated permission, in the scope granted);
4. for each listener the user may use, a real login through the proxy's own session
   code: connection to the upstream, TLS with certificate and host name checks, STARTTLS
   where configured, XOAUTH2 with the token; then one harmless command as the mailbox
   (IMAP ``EXAMINE INBOX``, POP3 ``STAT``, SMTP ``MAIL FROM`` and ``RSET``), because
   Exchange can accept a token and still refuse every command when the app may not open
   the mailbox.

The login in step 4 runs the very :class:`~proxy.net.session.Session` a client gets, over a
socket pair, as a copy of the user whose only credential is a one-time app key the doctor
makes. The credential lookup, mailbox policy, protocol and role checks all run; what is
left out is the client side of a connection: the password or certificate itself, client
TLS, and the failed-login throttle.

Without a user, the doctor checks every app's token and roles (for a delegated app, every
account's sign-in, and the token of each that has one) and that every upstream accepts a
connection (and, with implicit TLS, presents a valid certificate).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio

from broker.claims import NotAJwtError, check_token, decode_claims, roles_of, scopes_of
from broker.errors import BrokerError
from broker.source import CachingTokenSource, SignInState
from proxy.config import ClientCertificates, Protocol
from proxy.hashpool import HashPool
from proxy.identities import Authenticator
from proxy.names import fold_case
from proxy.net.server import auth_machine
from proxy.net.session import (
    REQUIRED_ROLES,
    REQUIRED_SCOPES,
    Services,
    Session,
    UpstreamUnavailable,
    open_upstream,
)
from proxy.net.tls import upstream_context
from proxy.ops.authorize import authorize_command
from proxy.protocol.errors import FrameError
from proxy.protocol.framing import LineBuffer, printable
from proxy.protocol.modes import ClientTls, UpstreamTls
from proxy.protocol.sasl import xoauth2_response
from proxy.throttle import LoginThrottle

if TYPE_CHECKING:
    from collections.abc import Iterator

    from broker.model import AccessToken
    from broker.source import TokenSource
    from proxy.config import Config, ListenerConfig, UserConfig

__all__ = ["Finding", "Status", "diagnose", "render"]

#: Microsoft's audience for Exchange Online's IMAP, POP3 and SMTP.
EXCHANGE_AUDIENCE: Final = "https://outlook.office365.com"
#: Longest line the doctor reads from a session (replies, capability lists).
_MAX_LINE: Final = 65536


class Status(enum.Enum):
    OK = "ok"
    WARNING = "warn"
    FAILED = "FAIL"
    SKIPPED = "skip"


@dataclass(frozen=True, slots=True)
class Finding:
    """One step's verdict: what was checked, what was seen, and how to fix it."""

    status: Status
    subject: str
    text: str
    #: What the proxy logged while it ran the step (its own words on the cause).
    details: tuple[str, ...] = ()
    fix: str = ""


def render(findings: list[Finding]) -> str:
    """The report, one block per finding."""
    lines = []
    for finding in findings:
        lines.append(f"[{finding.status.value:^4}] {finding.subject}: {finding.text}")
        lines += [f"       {detail}" for detail in finding.details]
        if finding.fix:
            lines.append(f"       fix: {finding.fix}")
    return "\n".join(lines)


async def diagnose(
    config: Config, tokens: TokenSource, login: str | None = None, *, mailbox: str | None = None
) -> list[Finding]:
    """Check the configuration's chain for ``login`` (or, without one, every app and
    upstream); findings in the order the steps ran. Nothing here raises for what it finds."""
    if login is None:
        return await _everything(config, tokens)
    user = config.user(login)
    if user is None:
        return [Finding(Status.FAILED, f"user {login!r}", "not in the configuration")]
    subject = f"user {user.login!r}"
    wanted = mailbox or user.mailbox
    if not user.may_open(wanted):
        allowed = ", ".join(user.mailboxes or (user.mailbox,))
        return [
            Finding(
                Status.FAILED,
                subject,
                f"mailbox {wanted!r} is not in its mailboxes ({allowed})",
                fix=(
                    f'add it to mailboxes in [users."{user.login}"]'
                    if mailbox
                    else "name one of its mailboxes with --mailbox (it sets no mailbox of its own)"
                ),
            )
        ]
    usable = [listener for listener in config.listeners if listener.protocol in user.protocols]
    findings = [
        Finding(
            Status.OK,
            subject,
            f"app {user.app!r}, mailbox {wanted!r}, protocols "
            + ", ".join(sorted(p.value for p in user.protocols)),
        )
    ]
    if not usable:
        findings.append(
            Finding(
                Status.FAILED,
                subject,
                "no listener serves any of its protocols",
                fix=f'add a listener, or a protocol to [users."{user.login}"].protocols',
            )
        )
        return findings
    owner = wanted
    if config.apps[user.app].delegated:
        owner = user.signs_in_as
        signed_in = await _sign_in(config, tokens, user.app, owner, user.login)
        findings.append(signed_in)
        if signed_in.status is not Status.OK:
            return findings
    token_findings, have_token = await _token(config, tokens, user.app, owner, usable)
    findings += token_findings
    if not have_token:
        return findings
    for listener in usable:
        findings.append(await _login(config, tokens, listener, user, wanted))
    return findings


# -- the app's token --------------------------------------------------------------------------


async def _token(
    config: Config,
    tokens: TokenSource,
    app_name: str,
    mailbox: str | None,
    listeners: list[ListenerConfig],
) -> tuple[list[Finding], bool]:
    """What the app's token and its claims say, and whether there is a token (the logins
    that follow take it from the same source, cached; it is never shown)."""
    app = config.apps[app_name]
    subject = f"app {app_name!r}"
    try:
        with trio.fail_after(config.limits.token_timeout):
            token = await tokens.token(app_name, mailbox=mailbox)
    except trio.TooSlowError:
        return [
            Finding(
                Status.FAILED,
                subject,
                f"no token from the identity provider within {config.limits.token_timeout:g}s",
                fix="check the network path to the identity provider (proxy, firewall, DNS)",
            )
        ], False
    except BrokerError as exc:
        code = f" [{exc.code}]" if exc.code else ""
        return [
            Finding(
                Status.FAILED, subject, f"no token ({exc.kind} error{code}): {exc}", fix=exc.fix
            )
        ], False
    findings = [
        Finding(
            Status.OK,
            subject,
            f"the identity provider issued a token ({app.provider}; expires in "
            f"{_minutes(token.remaining(time.time()))})",
        )
    ]
    findings += await _expected_claims(tokens, app_name, subject, token)
    protocols = {lis.protocol for lis in listeners}
    if app.provider == "microsoft" and app.delegated:
        findings += _delegated_claims(subject, token, protocols)
    elif app.provider == "microsoft":
        findings += _microsoft_claims(subject, token.value, protocols)
    return findings, True


async def _sign_in(
    config: Config, tokens: TokenSource, app: str, account: str, login: str
) -> Finding:
    """Has ``account`` signed in for the delegated ``app``? (The store is read; the
    identity provider is not asked.)"""
    subject = f"sign-in of {account}"
    if not isinstance(tokens, CachingTokenSource):
        return Finding(Status.SKIPPED, subject, "this token source keeps no sign-ins")
    status = await tokens.sign_in_status(app, account)
    command = f"run `{authorize_command(config)} {login}` as the user the proxy runs as"
    if status.state is SignInState.SIGNED_IN:
        rotated = (
            f"; refresh token last replaced {_when(status.rotated_at)}"
            if status.rotated_at and status.rotated_at != status.signed_in_at
            else ""
        )
        return Finding(
            Status.OK,
            subject,
            f"signed in as {status.signed_in_as} {_when(status.signed_in_at)}{rotated}",
        )
    if status.state is SignInState.NOT_SIGNED_IN:
        return Finding(
            Status.FAILED,
            subject,
            "nobody has signed in yet: logins get the temporary reply",
            fix=f"{command}, and sign in as {account}",
        )
    if status.state is SignInState.REVOKED:
        return Finding(
            Status.FAILED,
            subject,
            f"the identity provider refused the sign-in {_when(status.revoked_at)}: "
            f"{status.reason}; logins get the temporary reply",
            fix=f"{command}, and sign in as {account} again",
        )
    return Finding(
        Status.FAILED,
        subject,
        f"cannot tell: {status.reason}",
        fix="run doctor as the user the proxy runs as (it owns the token cache)",
    )


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "at an unknown time"
    return time.strftime("on %Y-%m-%d %H:%M UTC", time.gmtime(stamp))


def _delegated_claims(
    subject: str, token: AccessToken, protocols: set[Protocol]
) -> Iterator[Finding]:
    """Each protocol's delegated permission, in the scope the sign-in granted."""
    granted = {s.rsplit("/", 1)[-1] for s in token.scope.split()}
    with contextlib.suppress(NotAJwtError):
        granted |= scopes_of(decode_claims(token.value)) or frozenset()
    for protocol in sorted(protocols, key=lambda p: p.value):
        wanted = REQUIRED_SCOPES[protocol]
        if wanted in granted:
            yield Finding(Status.OK, subject, f"the sign-in granted {wanted}")
        else:
            yield Finding(
                Status.FAILED,
                subject,
                f"the sign-in did not grant {wanted}: {protocol.value.upper()} logins are refused",
                fix="add the delegated permission to the app registration (API permissions "
                f"> Office 365 Exchange Online > Delegated > {wanted}) and to the app's scope, "
                "then run authorize again and consent",
            )


async def _expected_claims(
    tokens: TokenSource, app_name: str, subject: str, token: AccessToken
) -> list[Finding]:
    """Is the token what the app asks for: issuer, audience, scope, tenant?"""
    try:
        expected = await tokens.expectations(app_name)
    except BrokerError as exc:
        return [
            Finding(
                Status.FAILED,
                subject,
                f"cannot learn what its tokens must say ({exc.kind} error): {exc}",
                fix=exc.fix,
            )
        ]
    problems = check_token(expected, token)
    if not problems:
        checked = [
            name
            for name, wanted in (
                ("iss", expected.issuer),
                ("aud", expected.audiences),
                ("scope", expected.scopes),
                ("tid", expected.tenant_id),
            )
            if wanted
        ]
        if not checked:
            return []
        return [Finding(Status.OK, subject, f"the token's {', '.join(checked)} are as expected")]
    return [
        Finding(
            Status.FAILED,
            subject,
            f"the token's {p.claim} is {p.value}, expected {p.expected}: logins are refused",
            fix=p.fix,
        )
        for p in problems
    ]


def _microsoft_claims(subject: str, token: str, protocols: set[Protocol]) -> Iterator[Finding]:
    try:
        claims = decode_claims(token)
    except NotAJwtError:
        yield Finding(Status.WARNING, subject, "the token is not a JWT: its roles are unknown")
        return
    roles = roles_of(claims)
    for protocol in sorted(protocols, key=lambda p: p.value):
        role = REQUIRED_ROLES[protocol]
        if role in roles:
            yield Finding(Status.OK, subject, f"the token has the {role} role")
        else:
            yield Finding(
                Status.FAILED,
                subject,
                f"the token lacks the {role} role: {protocol.value.upper()} logins are refused",
                fix=(
                    "in Entra ID, App registrations > the app > API permissions > Add > APIs "
                    f"my organization uses > Office 365 Exchange Online > Application "
                    f"permissions > {role}; then Grant admin consent"
                ),
            )
    audience = claims.get("aud")
    if audience != EXCHANGE_AUDIENCE:
        yield Finding(
            Status.WARNING,
            subject,
            f"the token's audience is {audience!r}, not {EXCHANGE_AUDIENCE!r}: Exchange "
            "Online refuses it (fine for other servers)",
            fix=f'scope = "{EXCHANGE_AUDIENCE}/.default" in the app, for Exchange Online',
        )


def _minutes(seconds: float) -> str:
    return f"{max(0, int(seconds // 60))} min"


# -- a login through the session ------------------------------------------------------------


class _Capture(logging.Handler):
    """What the proxy logs about one doctor session: its warnings and errors, and the
    reason its audit line gives for a refused login."""

    def __init__(self, conn_id: str) -> None:
        super().__init__(logging.INFO)
        self.conn_id = conn_id
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.name == "xoauth2_proxy.audit":
            with contextlib.suppress(ValueError):
                line = json.loads(message)
                reason = str(line.get("reason"))
                if (
                    line.get("conn") == self.conn_id
                    and line.get("result") != "success"
                    and not any(reason in m for m in self.messages)
                ):
                    self.messages.append(f"the proxy's verdict: {reason}")
        elif message.startswith(f"{self.conn_id}: ") and record.levelno >= logging.WARNING:
            self.messages.append(message.removeprefix(f"{self.conn_id}: "))


async def _login(
    config: Config, tokens: TokenSource, listener: ListenerConfig, user: UserConfig, mailbox: str
) -> Finding:
    subject = f"{listener.name} -> {listener.upstream_host}:{listener.upstream_port}"
    key = secrets.token_urlsafe(32)
    stand_in = dataclasses.replace(
        user,
        password_hashes=(),
        certificate_fingerprints=frozenset(),
        certificate_subjects=frozenset(),
        app_key_hashes=frozenset({hashlib.sha256(key.encode()).hexdigest()}),
    )
    # The doctor is the client, over a socket pair: no TLS on that side.
    plain = dataclasses.replace(
        listener, tls=ClientTls.NONE, client_certificates=ClientCertificates.NONE
    )
    services = Services(
        # An app key needs no password hash: the pool is never started.
        authenticator=Authenticator(
            {fold_case(user.login): stand_in}, hashes=HashPool(1), cache_ttl=0
        ),
        tokens=tokens,
        limits=config.limits,
        app_providers={name: app.provider for name, app in config.apps.items()},
        delegated=frozenset(name for name, app in config.apps.items() if app.delegated),
        throttle=LoginThrottle(config.limits.throttle_policy()),
    )
    machine, timeout_reply = auth_machine(plain, app_keys=True)
    conn_id = f"doctor-{listener.protocol.value}"
    ours, theirs = trio.socket.socketpair()
    session = Session(
        conn_id=conn_id,
        peer="127.0.0.1",
        listener=plain,
        machine=machine,
        services=services,
        client=trio.SocketStream(theirs),
        client_context=None,
        upstream_context=upstream_context(listener.upstream_ca_file),
        timeout_reply=timeout_reply,
    )
    capture = _Capture(conn_id)
    logger = logging.getLogger("xoauth2_proxy")
    logger.addHandler(capture)
    client = _Client(trio.SocketStream(ours))
    bearer = xoauth2_response(mailbox, key)  # the doctor's client speaks XOAUTH2
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            try:
                with trio.fail_after(config.limits.login_timeout + 5):
                    outcome = await _SCRIPTS[listener.protocol](client, bearer, mailbox)
            except trio.TooSlowError:
                outcome = _Outcome(False, "no answer in time")
            except (trio.BrokenResourceError, FrameError) as exc:
                outcome = _Outcome(False, f"the session broke off: {exc}")
            finally:
                await client.aclose()
                # The session ends on the client's close; it gets a moment to log why.
                nursery.cancel_scope.deadline = trio.current_time() + 5
    finally:
        logger.removeHandler(capture)
    details = tuple(dict.fromkeys(capture.messages))  # the verdict often repeats a warning
    if outcome.logged_in and outcome.probe_ok:
        return Finding(Status.OK, subject, outcome.text, details)
    app = config.apps[user.app]
    fix = (
        _delegated_fix(user.signs_in_as, mailbox, outcome)
        if app.delegated
        else _fix(app.provider, listener, mailbox, outcome)
    )
    return Finding(Status.FAILED, subject, outcome.text, details, fix)


@dataclass(frozen=True, slots=True)
class _Outcome:
    logged_in: bool
    text: str
    probe_ok: bool = False


def _fix(provider: str, listener: ListenerConfig, mailbox: str, outcome: _Outcome) -> str:
    if not outcome.logged_in:
        return ""  # the proxy's own log lines above name the cause
    if provider != "microsoft":
        return f"the server took the token but will not serve {mailbox}: check the app's rights"
    right = (
        "Add-RecipientPermission ... -AccessRights SendAs"
        if listener.protocol is Protocol.SMTP
        else "Add-MailboxPermission ... -AccessRights FullAccess"
    )
    return (
        f"Exchange does not let the app use {mailbox}: run the lines for it that "
        f"`xoauth2-proxy exchange-setup` prints (New-ServicePrincipal once per app, {right}, "
        "Set-CASMailbox to enable the protocol)"
    )


def _delegated_fix(account: str, mailbox: str, outcome: _Outcome) -> str:
    if not outcome.logged_in:
        return ""
    return (
        f"the server took the token of {account} but will not serve {mailbox}: check that "
        f"{account} may open it (a shared mailbox needs FullAccess, or SendAs, for it) and "
        "that the protocol is turned on for the mailbox"
    )


class _Client:
    """The doctor's side of the socket pair: lines in, lines out, bounded."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._lines = LineBuffer(_MAX_LINE)

    async def send(self, line: bytes) -> None:
        await self._stream.send_all(line + b"\r\n")

    async def line(self) -> bytes:
        while (line := self._lines.next_line()) is None:
            data = await self._stream.receive_some(65536)
            if not data:
                raise trio.BrokenResourceError("the session closed the connection")
            self._lines.receive_data(data)
        return line

    async def aclose(self) -> None:
        await self._stream.aclose()


def _text(line: bytes) -> str:
    """A line from the upstream, safe to print (no terminal control sequences)."""
    return printable(line)


async def _imap(client: _Client, bearer: bytes, mailbox: str) -> _Outcome:
    await client.line()  # the greeting
    await client.send(b"a1 AUTHENTICATE XOAUTH2 " + bearer)
    while not (reply := await client.line()).startswith(b"a1 "):
        if reply.startswith(b"+"):  # an error challenge: answer it to get the NO
            await client.send(b"")
    if not reply.startswith(b"a1 OK"):
        return _Outcome(False, f"login refused: {_text(reply[3:])}")
    await client.send(b"a2 EXAMINE INBOX")
    while not (probe := await client.line()).startswith(b"a2 "):
        pass
    await client.send(b"a3 LOGOUT")
    if probe.startswith(b"a2 OK"):
        return _Outcome(True, f"logged in as {mailbox}; EXAMINE INBOX: {_text(probe[3:])}", True)
    return _Outcome(
        True,
        f"logged in as {mailbox}, but EXAMINE INBOX failed: {_text(probe[3:])} (Exchange "
        "says 'User is authenticated but not connected' when the app may not open it)",
    )


async def _pop3(client: _Client, bearer: bytes, mailbox: str) -> _Outcome:
    await client.line()
    await client.send(b"AUTH XOAUTH2 " + bearer)
    reply = await client.line()
    if reply.startswith(b"+ ") or reply == b"+":
        await client.send(b"")
        reply = await client.line()
    if not reply.startswith(b"+OK"):
        return _Outcome(False, f"login refused: {_text(reply)}")
    await client.send(b"STAT")
    probe = await client.line()
    await client.send(b"QUIT")
    if probe.startswith(b"+OK"):
        return _Outcome(True, f"logged in as {mailbox}; STAT: {_text(probe)}", True)
    return _Outcome(True, f"logged in as {mailbox}, but STAT failed: {_text(probe)}")


async def _smtp_reply(client: _Client) -> bytes:
    """The last line of a (multi-line) SMTP reply."""
    while (line := await client.line())[3:4] == b"-":
        pass
    return line


async def _smtp(client: _Client, bearer: bytes, mailbox: str) -> _Outcome:
    await _smtp_reply(client)
    await client.send(b"EHLO doctor.invalid")
    await _smtp_reply(client)
    await client.send(b"AUTH XOAUTH2 " + bearer)
    reply = await _smtp_reply(client)
    if reply.startswith(b"334"):
        await client.send(b"")
        reply = await _smtp_reply(client)
    if not reply.startswith(b"235"):
        return _Outcome(False, f"login refused: {_text(reply)}")
    await client.send(f"MAIL FROM:<{mailbox}>".encode())
    probe = await _smtp_reply(client)
    await client.send(b"RSET")
    await _smtp_reply(client)
    await client.send(b"QUIT")
    if probe.startswith(b"250"):
        return _Outcome(True, f"logged in as {mailbox}; MAIL FROM: {_text(probe)}", True)
    return _Outcome(True, f"logged in as {mailbox}, but MAIL FROM failed: {_text(probe)}")


_SCRIPTS: Final = {Protocol.IMAP: _imap, Protocol.POP3: _pop3, Protocol.SMTP: _smtp}


# -- without a user ---------------------------------------------------------------------------


async def _everything(config: Config, tokens: TokenSource) -> list[Finding]:
    findings: list[Finding] = []
    for name, app in config.apps.items():
        users = [u for u in config.users.values() if u.app == name]
        listeners = [
            lis for lis in config.listeners if any(lis.protocol in u.protocols for u in users)
        ]
        mailbox = None
        if app.delegated:  # tokens are per account: each account's sign-in, then its token
            for account, logins in config.delegated_accounts().get(name, {}).items():
                signed_in = await _sign_in(config, tokens, name, account, logins[0])
                findings.append(signed_in)
                if signed_in.status is Status.OK:
                    findings += (await _token(config, tokens, name, account, listeners))[0]
            if name not in config.delegated_accounts():
                findings.append(
                    Finding(Status.SKIPPED, f"app {name!r}", "no user: nobody signs in to it")
                )
            continue
        if app.provider == "google":  # tokens are per mailbox: try the first user's
            if not users:
                findings.append(
                    Finding(Status.SKIPPED, f"app {name!r}", "no user: no mailbox to ask for")
                )
                continue
            mailbox = users[0].mailbox
        findings += (await _token(config, tokens, name, mailbox, listeners))[0]
    for listener in config.listeners:
        findings.append(await _reach(config, listener))
    return findings


async def _reach(config: Config, listener: ListenerConfig) -> Finding:
    subject = f"{listener.name} -> {listener.upstream_host}:{listener.upstream_port}"
    context = upstream_context(listener.upstream_ca_file)
    timeout = config.limits.upstream_timeout
    try:
        with trio.fail_after(timeout):
            stream = await open_upstream(listener, context)
    except trio.TooSlowError:
        return Finding(Status.FAILED, subject, f"no connection within {timeout:g}s")
    except UpstreamUnavailable as exc:
        fix = "upstream_ca_file, if the server's CA is private; else the server's certificate"
        return Finding(Status.FAILED, subject, str(exc), fix=fix if exc.tls else "")
    await trio.aclose_forcefully(stream)
    if listener.upstream_tls is UpstreamTls.IMPLICIT:
        return Finding(Status.OK, subject, "connected; TLS certificate and host name verified")
    return Finding(
        Status.OK,
        subject,
        "connected (STARTTLS and the login are checked with a user: doctor USER)",
    )
