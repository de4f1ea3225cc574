"""``xoauth2-proxy import-emailproxy``: a configuration from an ``emailproxy.config``.

The best-known existing XOAUTH2 proxy (Email OAuth 2.0 Proxy) keeps its settings in one INI
file. :func:`convert` reads it and writes the equivalent TOML for this proxy:

- **server sections** (``[IMAP-1993]``, ``[POP-1995]``, ``[SMTP-1587]``: protocol and local
  port) become ``[[listeners]]``: ``server_address``/``server_port`` the upstream,
  ``server_starttls`` its STARTTLS, ``local_address`` the address listened on;
  ``local_certificate_path``/``local_key_path`` (with ``local_starttls``) TLS towards the
  clients, which emailproxy otherwise leaves in plaintext (then so does this, on loopback,
  or with ``allow_plaintext`` and a warning elsewhere);
- **account sections** (``[user@example.com]``) become users, and their OAuth settings --
  ``token_url``, ``permission_url``, ``oauth2_scope``, ``oauth2_flow``, ``client_id``,
  ``client_secret``, ``redirect_uri`` -- apps: Microsoft's (``login.microsoftonline.com`` and
  the sovereign clouds, tenant and authority from the token URL), Google's, or any OAuth 2.0
  server's; accounts that share all of them share one app. ``client_credentials`` makes an
  app-only app, every other flow a delegated one (``delegated = true``) that each person
  signs in to once with ``xoauth2-proxy authorize``;
- a file token cache, which delegated apps need.

Nothing secret is carried over or printed: client secrets go to files the notes name (to be
filled in by hand), and emailproxy's cached tokens (``access_token``, ``refresh_token``,
``token_salt``...) are encrypted with each account's password and cannot be used here, so
each person signs in again. emailproxy sets an account's local password at its first
login; here each user needs one from ``xoauth2-proxy hash-password`` (the output holds a
placeholder that ``check`` refuses until it is replaced). Every option that has no
equivalent -- known or unknown -- is listed in the notes at the top of the output, never
dropped silently.
"""

from __future__ import annotations

import configparser
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from proxy.config import OPENID_SCOPES, is_loopback, is_loopback_redirect

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["Conversion", "NotEmailproxyConfig", "convert"]

SERVER_SECTION: Final = re.compile(r"(IMAP|POP|SMTP)-(\d{1,5})", re.IGNORECASE)
PROTOCOLS: Final = {"imap": "imap", "pop": "pop3", "smtp": "smtp"}
#: Sections of emailproxy's sample file that hold only its own documentation.
DOCUMENTATION_SECTIONS: Final = frozenset(
    {"server setup", "account setup", "advanced proxy configuration", "advanced configuration"}
)
SERVER_OPTIONS: Final = frozenset(
    {
        "server_address",
        "server_port",
        "server_starttls",
        "local_address",
        "local_starttls",
        "local_certificate_path",
        "local_key_path",
    }
)
ACCOUNT_OPTIONS: Final = frozenset(
    {
        "permission_url",
        "token_url",
        "oauth2_scope",
        "oauth2_flow",
        "redirect_uri",
        "client_id",
        "client_secret",
        "client_secret_encrypted",
    }
)
#: emailproxy's cached state per account: encrypted with the account's password.
CACHED_OPTIONS: Final = frozenset(
    {
        "token_salt",
        "token_iterations",
        "access_token",
        "access_token_expiry",
        "refresh_token",
        "last_activity",
    }
)
#: Known options without an equivalent, and why.
NOT_APPLICABLE: Final[Mapping[str, str]] = {
    "delete_account_token_on_password_error": "a wrong password never touches a sign-in here",
    "encrypt_client_secret_on_first_use": "client secrets are files or environment variables",
    "use_login_password_as_client_credentials_secret": "local passwords are only checked here",
    "allow_catch_all_accounts": "each mailbox is a user of its own",
    "redirect_listen_address": "the browser sign-in listens on the loopback (authorize --port)",
    "client_secret_expiry": "the identity provider says when a secret expires",
    "jwt_certificate_path": "use certificate = { file = ... } (key and certificate in one PEM)",
    "jwt_key_path": "use certificate = { file = ... } (key and certificate in one PEM)",
    "oauth2_resource": "scopes name the resource here",
}
MICROSOFT_HOSTS: Final = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoftonline.us",
        "login.partner.microsoftonline.cn",
        "login.chinacloudapi.cn",
    }
)
GOOGLE_HOSTS: Final = frozenset({"oauth2.googleapis.com", "accounts.google.com"})
PLACEHOLDER_HASH: Final = "REPLACE: the output of `xoauth2-proxy hash-password`"


class NotEmailproxyConfig(ValueError):
    """The file is not an emailproxy configuration that can be read."""


@dataclass
class _App:
    name: str
    kind: str
    lines: list[str]
    accounts: list[str] = field(default_factory=list)
    secret_file: str = ""
    delegated: bool = True


@dataclass(frozen=True, slots=True)
class Conversion:
    """The TOML text (notes first, as comments), and what was not carried over."""

    toml: str
    listeners: int
    apps: int
    users: int
    #: ``[section] option: why`` for every option left behind.
    left_behind: tuple[str, ...]


def convert(text: str, *, source: str = "emailproxy.config") -> Conversion:
    """Convert the emailproxy configuration ``text`` (from ``source``, for the notes)."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str.lower  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text, source=source)
    except configparser.ParsingError as exc:
        # Its own message quotes the lines, which may be a wrapped secret: only their numbers.
        if isinstance(exc, configparser.MissingSectionHeaderError):
            where = f"{exc.lineno} (no [section] above it)"
        else:
            where = ", ".join(str(number) for number, _ in exc.errors)
        raise NotEmailproxyConfig(
            f"{source}: not an emailproxy configuration: cannot parse line {where}"
        ) from None
    except configparser.Error as exc:
        raise NotEmailproxyConfig(
            f"{source}: not an emailproxy configuration: {type(exc).__name__}"
        ) from None
    left: list[str] = []
    notes: list[str] = []
    listeners: list[list[str]] = []
    apps: dict[tuple[str, ...], _App] = {}
    users: list[list[str]] = []
    for section in parser.sections():
        options = dict(parser.items(section))
        if section.lower() in DOCUMENTATION_SECTIONS:
            continue
        if section.lower() == "emailproxy":
            for option in options:
                left.append(_why(section, option))
            continue
        server = SERVER_SECTION.fullmatch(section)
        if server is not None:
            listeners.append(_listener(section, server, options, left, notes))
            continue
        if section.startswith("@") or "@" not in section:
            left.append(
                f"[{section}]: "
                + (
                    "a catch-all account: here each mailbox is a user of its own; add one "
                    "[users] table per mailbox"
                    if section.startswith("@")
                    else "neither a server section (IMAP-, POP-, SMTP-port) nor an account "
                    "(an e-mail address)"
                )
            )
            continue
        users.append(_user(section, options, apps, left, notes))
    if not listeners and not users:
        raise NotEmailproxyConfig(
            f"{source}: no server or account sections: not an emailproxy file"
        )
    header = [
        f"# Converted by `xoauth2-proxy import-emailproxy` from {source}.",
        "#",
        "# Before use:",
        "# - give each user a local password: run `xoauth2-proxy hash-password` and put the",
        "#   hash in its password_hash (emailproxy set it at the first login; here the",
        "#   proxy checks the password itself, and the placeholder is refused until then);",
    ]
    if any(app.delegated for app in apps.values()):
        header += [
            "# - have each person sign in once, as the user the proxy runs as:",
            "#   `xoauth2-proxy authorize -c CONFIG USER` (emailproxy's cached tokens are",
            "#   encrypted with the account's password, and cannot be carried over);",
            "# - make the token cache's key: `openssl rand -base64 32 >",
            "#   /etc/xoauth2-proxy/cache.key; chmod 600 /etc/xoauth2-proxy/cache.key`;",
        ]
    header += [f"# - {note}" for note in dict.fromkeys(notes)]
    header += ["# - then `xoauth2-proxy check -c CONFIG`."]
    if left:
        header += ["#", "# Not carried over (no equivalent here):"]
        header += [f"# - {item}" for item in left]
    body: list[str] = []
    for app in apps.values():
        body += ["", f"[apps.{app.name}]", *app.lines]
    if any(app.delegated for app in apps.values()):
        body += [
            "",
            "[cache]  # where sign-ins are kept, sealed with the key",
            'kind = "file"',
            'path = "/var/lib/xoauth2-proxy/tokens"',
            'key = { file = "/etc/xoauth2-proxy/cache.key" }',
        ]
    for lines in listeners:
        body += ["", "[[listeners]]", *lines]
    for lines in users:
        body += ["", *lines]
    return Conversion(
        "\n".join([*header, *body]) + "\n",
        listeners=len(listeners),
        apps=len(apps),
        users=len(users),
        left_behind=tuple(left),
    )


def _listener(
    section: str,
    match: re.Match[str],
    options: dict[str, str],
    left: list[str],
    notes: list[str],
) -> list[str]:
    protocol = PROTOCOLS[match.group(1).lower()]
    port = int(match.group(2))
    local = options.get("local_address", "127.0.0.1") or "127.0.0.1"
    address = options.get("server_address", "")
    server_port = options.get("server_port", "")
    for option in sorted(set(options) - SERVER_OPTIONS):
        left.append(_why(section, option))
    listen = f"[{local}]:{port}" if ":" in local else f"{local}:{port}"
    lines = [f"protocol = {_q(protocol)}", f"listen = {_q(listen)}"]
    certificate, key = options.get("local_certificate_path"), options.get("local_key_path")
    if certificate and key:
        tls = "starttls" if _true(options.get("local_starttls")) else "implicit"
        lines += [
            f"tls = {_q(tls)}",
            'certificate = { file = "/etc/xoauth2-proxy/server.pem" }',
        ]
        notes.append(
            f"[{section}]: put the key and the certificate in one file: `cat {key} "
            f"{certificate} > /etc/xoauth2-proxy/server.pem; chmod 600 "
            "/etc/xoauth2-proxy/server.pem`"
        )
    else:
        lines.append('tls = "none"  # as emailproxy: plaintext towards the clients')
        if not is_loopback(local):
            lines.append("allow_plaintext = true  # passwords cross the network in the clear")
            notes.append(
                f"[{section}]: clients reach this listener over the network in plaintext, as "
                "they did emailproxy: give it a certificate (tls, certificate)"
            )
    if not address or not server_port.isdigit():
        notes.append(f"[{section}]: set upstream: server_address or server_port is missing")
    starttls = _true(options.get("server_starttls"))
    upstream = f"{address or 'MAIL-SERVER'}:{server_port or 0}"
    lines += [
        f"upstream = {_q(upstream)}",
        f"upstream_tls = {_q('starttls' if starttls else 'implicit')}",
    ]
    return lines


def _user(
    account: str,
    options: dict[str, str],
    apps: dict[tuple[str, ...], _App],
    left: list[str],
    notes: list[str],
) -> list[str]:
    for option in sorted(set(options) - ACCOUNT_OPTIONS):
        left.append(_why(account, option))
    app = _app_for(account, options, apps, notes)
    app.accounts.append(account)
    return [
        f"[users.{_q(account)}]",
        f"password_hash = {_q(PLACEHOLDER_HASH)}",
        f"app = {_q(app.name)}",
    ]


def _app_for(
    account: str, options: dict[str, str], apps: dict[tuple[str, ...], _App], notes: list[str]
) -> _App:
    token_url = options.get("token_url", "")
    flow = (options.get("oauth2_flow") or "authorization_code").lower()
    client_id = options.get("client_id", "")
    scope = options.get("oauth2_scope", "")
    has_secret = bool(options.get("client_secret") or options.get("client_secret_encrypted"))
    host = (urlsplit(token_url).hostname or "").lower()
    kind = (
        "microsoft" if host in MICROSOFT_HOSTS else "google" if host in GOOGLE_HOSTS else "oauth2"
    )
    identity = (
        kind,
        token_url,
        client_id,
        scope,
        flow,
        str(has_secret),
        options.get("redirect_uri", ""),
        options.get("permission_url", ""),
    )
    if identity in apps:
        return apps[identity]
    count = sum(1 for a in apps.values() if a.kind == kind)
    name = kind if count == 0 else f"{kind}-{count + 1}"
    app = _App(name, kind, [f"provider = {_q(kind)}"], delegated=flow != "client_credentials")
    if flow == "service_account":
        app.delegated = False
    apps[identity] = app
    secret_file = f"/etc/xoauth2-proxy/{name}.secret"
    if flow == "password":
        notes.append(
            f"[{account}]: emailproxy used the password grant; here the person signs in once "
            "instead (authorize)"
        )
    if kind == "google" and flow == "service_account":
        app.lines += [
            'service_account = { file = "/etc/xoauth2-proxy/service-account.json" }',
        ]
        notes.append(
            f"apps.{name}: put the service account's JSON key (emailproxy: client_id / "
            "client_secret of its accounts) in /etc/xoauth2-proxy/service-account.json"
        )
        return app
    if app.delegated:
        app.lines.append("delegated = true")
    if kind == "microsoft":
        parts = urlsplit(token_url)
        tenant = parts.path.strip("/").split("/")[0] if parts.path.strip("/") else "common"
        app.lines.append(f"tenant = {_q(tenant)}")
        if host != "login.microsoftonline.com":
            authority = f"{parts.scheme}://{parts.netloc}"
            app.lines.append(f"authority = {_q(authority)}")
        if not app.delegated and tenant.lower() in ("common", "organizations", "consumers"):
            notes.append(
                f"apps.{name}: app-only tokens need the tenant's ID or domain, not {tenant!r}"
            )
    elif kind == "oauth2":
        app.lines.append(f"token_url = {_q(token_url)}")
        if app.delegated and options.get("permission_url"):
            app.lines.append(f"authorization_url = {_q(options['permission_url'])}")
    app.lines.append(f"client_id = {_q(client_id or 'CLIENT-ID')}")
    if has_secret:
        app.lines.append(f"client_secret = {{ file = {_q(secret_file)} }}")
        app.secret_file = secret_file
        if options.get("client_secret_encrypted"):
            notes.append(
                f"apps.{name}: emailproxy keeps the client secret encrypted with the account's "
                f"password: copy it from the app registration into {secret_file} (chmod 600)"
            )
        else:
            notes.append(
                f"apps.{name}: put the client_secret of [{account}] in {secret_file} (chmod 600)"
            )
        if kind == "oauth2":
            app.lines.append('auth_method = "client_secret_post"')
    elif kind == "oauth2" and app.delegated:
        app.lines.append('auth_method = "none"  # a public client')
    # Microsoft's and Google's sign-ins add OpenID Connect's scopes themselves; another
    # server is asked for exactly the scope configured, and its tokens must carry the rest.
    wanted = [s for s in scope.split() if kind == "oauth2" or s.lower() not in OPENID_SCOPES]
    expected = [s for s in wanted if s.lower() not in OPENID_SCOPES]
    if kind == "oauth2" and len(wanted) > len(expected):
        app.lines.append(f"expect_scope = [{', '.join(_q(s) for s in expected)}]")
    if kind == "microsoft" and not app.delegated:
        wanted = wanted or ["https://outlook.office365.com/.default"]
    if wanted and not (kind == "google" and wanted == ["https://mail.google.com/"]):
        app.lines.append(f"scope = {_q(' '.join(wanted))}")
    redirect = options.get("redirect_uri", "")
    if app.delegated and redirect:
        if is_loopback_redirect(redirect):
            app.lines.append(f"redirect_uri = {_q(redirect)}")
        else:
            notes.append(
                f"apps.{name}: emailproxy's redirect_uri {redirect} is not a loopback address; "
                "register http://127.0.0.1 for the app (or sign in with a device code)"
            )
    if app.delegated and kind == "microsoft" and has_secret:
        notes.append(
            f"apps.{name}: a confidential client signs in with a browser: authorize --browser"
        )
    if not app.delegated and kind == "microsoft":
        notes.append(
            f"apps.{name}: app-only: run `xoauth2-proxy exchange-setup -c CONFIG` for the "
            "Exchange Online permissions"
        )
    return app


def _why(section: str, option: str) -> str:
    if option in CACHED_OPTIONS:
        return (
            f"[{section}] {option}: emailproxy's cached sign-in, encrypted with the account's "
            "password (sign in again: authorize)"
        )
    if option in NOT_APPLICABLE:
        return f"[{section}] {option}: {NOT_APPLICABLE[option]}"
    return f"[{section}] {option}: unknown option"


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "yes", "on", "1")


def _q(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(text)
