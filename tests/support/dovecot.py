"""A private Dovecot instance that really verifies Entra-style JWT access tokens.

Theory of operation
-------------------
:class:`Dovecot` writes its own ``dovecot.conf`` under a work directory and runs
``dovecot -F -c <that file>`` as a child process in its own process group, on free loopback
ports. It never reads ``/etc/dovecot`` and never touches the system service: ``base_dir``,
``state_dir``, logs, keys, the mailbox list and the mail store are all its own.

Authentication is this chain, and the only way in:

1. ``passdb oauth2`` with ``introspection_mode = local`` checks the token's RS256 signature
   against ``<workdir>/keys/default/RS256/<kid>``, its ``exp``/``nbf``/``iat`` (no leeway), its
   ``aud`` (``client_id``) and, when given, its ``iss`` (``issuers``). App-only tokens name no
   user, so ``username_attribute = sub`` with a literal ``username_format`` makes the
   user/claim comparison always match. ``result_success = continue-ok``.
2. ``passdb passwd-file`` with ``skip = unauthenticated`` then decides which mailboxes exist:
   an unknown mailbox gets a clean ``NO [AUTHENTICATIONFAILED]`` (``result_failure =
   return-fail``) instead of "Internal login failure" from the userdb.

Only XOAUTH2 and OAUTHBEARER are offered; there are no passwords at all.

Instead of local validation, the oauth2 passdb can ask the authorization server about each
token (``introspection_url``): ``introspection_mode = get`` appends the token to the URL
(Google's tokeninfo), ``post`` sends it as ``token=`` (RFC 7662; the client credentials go in
the URL's user information, which works with the oidc-provider package for a secret that
needs no %-escapes; one with escapes failed), ``auth`` as a bearer header; the server's CA
is ``tls_ca_cert_file``. With ``username_attribute`` the answer's field (``email`` for Google's
per-mailbox tokens) must equal the login name -- or, with a literal ``username_format``, a fixed
value such as the client ID.

Facts about Debian 12's Dovecot 2.3.19.1+dfsg1-2.1+deb12u7, verified by hand or by
tests/e2e/test_dovecot_rig.py, that shaped this module:

- Key files are looked up at ``<prefix>/<azp>/<alg>/<kid>``; ``azp`` is ``default`` when the
  token has no ``azp`` claim (``appid`` is ignored) and ``kid`` is ``default`` without a
  ``kid`` header. In both segments ``%`` becomes ``%25`` and ``/`` becomes ``%2f``; nothing
  else is escaped (:func:`key_file_name`).
- The header's ``typ`` must be exactly ``JWT`` (absent, ``jwt`` or RFC 9068's ``at+jwt``:
  "Cannot find 'typ' field"); ``sub`` and ``exp`` are required, ``iat`` is not; ``nbf`` even
  5 s ahead is refused; ``aud`` may be a list that contains the ``client_id``.
- Token failures are answered up to 0.5 s late even with ``auth_failure_delay = 0``: the
  auth process flushes delayed failures on a 500 ms timer. Only a passdb field ``nodelay``
  skips it, and a failing passdb's fields are rolled back, so it works here for unknown
  mailboxes only (set on the oauth2 passdb, kept when the passwd-file fails). A passdb that
  succeeds *before* the oauth2 one (say ``static`` with ``nodelay`` and ``result_success =
  continue``) lets any token in; a ``skip = authenticated`` one after it removes the error
  challenge. Neither is worth 0.5 s.
- The anvil auth penalty applies to 127.0.0.1: after failures the next attempts, successful
  ones included, wait 4, 8, then 15 s. ``anvil-auth-penalty`` with ``mode = 0`` disables it
  (even with the auth process running as root).
- Mail processes refuse UID 0 ("userdb returned 0 as uid"; passwd-file: "invalid UID '0'"),
  so mail is owned by ``mail`` (``first_valid_uid = 8``). The auth process normally runs as
  ``dovecot``. pytest's tmp directories are 0700 root: here auth runs as root, and the mail
  store moves to a private directory under /tmp when ``mail`` cannot reach the work dir.
- A connection counts as secured when its remote and local addresses are equal, so 127.0.0.1
  to 127.0.0.1 may authenticate without TLS even with ``disable_plaintext_auth = yes``. To
  127.0.0.2 (which Linux connects from 127.0.0.1) it may not: no AUTH capability before TLS,
  and ``NO [PRIVACYREQUIRED] Plaintext authentication disabled.`` (POP3: ``-ERR [AUTH]
  Plaintext authentication disabled.``). The login log line says ``TLS`` or ``secured``.
- Signalling only the master takes it about 1.1 s to exit (it waits for its log process);
  signalling the whole process group takes about 10 ms, but processes forked at that moment
  can miss the signal, so stopping repeats it.
- The master binds every listener before starting services, so a port that accepts means the
  instance is up; if one is taken it exits with "Fatal: Failed to start listeners".
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Self

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

    from tests.support.certs import TestPki

__all__ = [
    "HOST",
    "ONE_LOGIN_PROCESS",
    "REMOTE_HOST",
    "Dovecot",
    "DovecotError",
    "DovecotPorts",
    "key_file_name",
]

HOST: Final = "127.0.0.1"
# Dovecot also listens here. Linux connects to it from 127.0.0.1, and Dovecot counts a
# connection as secured only when remote and local addresses are equal: through this address
# it behaves as for a remote client (no AUTH before TLS) and its certificate does not match.
REMOTE_HOST: Final = "127.0.0.2"
DEFAULT_AUDIENCE: Final = "https://outlook.office365.com"

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0
_START_ATTEMPTS = 3  # free ports are picked before Dovecot binds them: retry if one was taken
# Unix socket paths are limited to 108 bytes; the longest one under base_dir is
# "token-login/imap-urlauth". Longer base_dirs move to a short private directory.
_MAX_BASE_DIR = 70
# Characters we put into dovecot.conf and passwd-file unquoted. Dovecot expands %-variables
# in many settings and passwd-file splits on ':'; pytest's tmp paths never need more.
_SAFE_PATH = re.compile(r"[A-Za-z0-9_./+@-]+")
_SAFE_MAILBOX = re.compile(r"[a-z0-9_+@-][a-z0-9._+@-]*")
_SAFE_VALUE = re.compile(r"[!-~]+")  # printable ASCII, no spaces, for audience and issuer
# A literal username_format: the oauth2 passdb formats both the login name and the token's
# `sub` with it, so every app-only token "matches" and the passwd-file decides.
_USERNAME_FORMAT = "xoauth2-proxy-app"
_STARTED = ") starting up for "  # "master: Info: Dovecot v2.3.19.1 (9b53102964) starting up for"
_PORT_TAKEN = "Address already in use"


#: ``extra_config`` for Dovecot's "high-performance mode" with one login process per
#: service: each login process serves many connections, and keeps its own TLS session
#: cache and ticket keys, so with one per service every client can resume its TLS
#: session (with the default, a process per connection, none can).
ONE_LOGIN_PROCESS: Final = """
service imap-login {
  service_count = 0
  process_min_avail = 1
  process_limit = 1
  client_limit = 20000
}
service pop3-login {
  service_count = 0
  process_min_avail = 1
  process_limit = 1
  client_limit = 1000
}
service submission-login {
  service_count = 0
  process_min_avail = 1
  process_limit = 1
  client_limit = 1000
}
"""


class DovecotError(RuntimeError):
    """Dovecot failed to start, or a doveadm command failed; the message has the log."""


@dataclass(frozen=True, slots=True)
class DovecotPorts:
    """The loopback ports of one instance. Submission ports are None without a relay."""

    imap: int  # plaintext, STARTTLS offered
    imaps: int  # implicit TLS
    pop3: int  # plaintext, STLS offered
    pop3s: int  # implicit TLS
    submission: int | None  # port-587 style: plaintext, STARTTLS offered
    submissions: int | None  # port-465 style: implicit TLS


def key_file_name(segment: str) -> str:
    """Escape an ``azp`` or ``kid`` value the way Dovecot 2.3.19 builds its key path.

    Verified: ``/`` becomes ``%2f`` and ``%`` becomes ``%25``; everything else (``.``, ``+``,
    ``=``, ``:``, UTF-8) is used as is.
    """
    if segment in ("", ".", ".."):
        raise ValueError(f"unusable key path segment {segment!r}")
    return segment.replace("%", "%25").replace("/", "%2f")


class Dovecot:
    """A private Dovecot (IMAP, POP3 and optionally submission) for end-to-end tests.

    Use it as a context manager; everything lives under ``workdir``, except that the mail
    store and ``base_dir`` move to a private directory under /tmp (removed by :meth:`stop`)
    when the work directory is unreachable for the ``mail`` user or too deep for socket
    paths::

        with Dovecot(tmp / "dovecot", pki=pki, jwt_public_key_pem=pem, kid="k1") as dc:
            imaplib.IMAP4_SSL(dc.host, dc.ports.imaps, ssl_context=ctx)

    Mailbox names are lower-cased (Dovecot's default ``auth_username_format = %Lu`` lower-cases
    login names). ``smtp_relay`` is the ``(host, port)`` submission relays to, without TLS or
    AUTH (an :class:`~tests.support.smtpsink.SmtpSink`); without it there is no submission.
    ``extra_config`` is appended to ``dovecot.conf`` (e.g. ``"auth_debug = yes"``, or service
    limits for benchmarks).

    It listens on :attr:`host` (127.0.0.1) and on :attr:`remote_host` (127.0.0.2), where it
    treats clients as remote: AUTH only after STARTTLS, and a certificate that does not name
    the address.

    Must run as root (Dovecot drops privileges to the ``dovecot``, ``dovenull`` and ``mail``
    users the Debian packages create).
    """

    host: Final = HOST
    remote_host: Final = REMOTE_HOST

    def __init__(
        self,
        workdir: Path,
        *,
        pki: TestPki,
        jwt_public_key_pem: bytes | None = None,
        kid: str = "default",
        issuer: str | None = None,
        audience: str | None = DEFAULT_AUDIENCE,
        mailboxes: Sequence[str] = ("reports@contoso.com",),
        smtp_relay: tuple[str, int] | None = None,
        extra_config: str = "",
        introspection_url: str | None = None,
        introspection_mode: str = "get",
        introspection_ca_file: Path | None = None,
        username_attribute: str | None = None,
        username_format: str | None = None,
        oauth2_settings: Sequence[str] = (),
    ) -> None:
        self.workdir = Path(workdir).absolute()
        _check_path(self.workdir)
        for name, value in (("audience", audience), ("issuer", issuer)):
            if value is not None and not _SAFE_VALUE.fullmatch(value):
                raise ValueError(f"{name} must be printable ASCII without spaces: {value!r}")
        self.pki = pki
        self.ca_file: Path = pki.ca_file
        self.kid = kid
        self.key_file_name = key_file_name(kid)
        self.issuer = issuer
        self.audience = audience
        if (jwt_public_key_pem is None) == (introspection_url is None):
            raise ValueError("give jwt_public_key_pem (local validation) or introspection_url")
        if introspection_mode not in ("get", "post", "auth"):
            raise ValueError(f"unknown introspection_mode {introspection_mode!r}")
        for value in (introspection_url, username_attribute, username_format):
            if value is not None and not _SAFE_VALUE.fullmatch(value):
                raise ValueError(f"must be printable ASCII without spaces: {value!r}")
        self.introspection_url = introspection_url
        self.introspection_mode = introspection_mode
        self.introspection_ca_file = introspection_ca_file
        self.username_attribute = username_attribute
        self.username_format = username_format
        self.oauth2_settings = tuple(oauth2_settings)
        self.mailboxes: tuple[str, ...] = tuple(_mailbox_name(m) for m in mailboxes)
        if not self.mailboxes:
            raise ValueError("at least one mailbox is needed")
        self.smtp_relay = smtp_relay
        self.extra_config = extra_config
        self._public_key_pem = (
            _spki_pem(jwt_public_key_pem) if jwt_public_key_pem is not None else None
        )

        self.config_file = self.workdir / "dovecot.conf"
        self.log_file = self.workdir / "dovecot.log"
        self.stderr_file = self.workdir / "dovecot.stderr"
        self.keys_dir = self.workdir / "keys"
        self.users_file = self.workdir / "mailboxes.passwd"
        # Decided in start(): they move to a private directory when the work directory is too
        # deep for Unix socket paths or not reachable by the unprivileged mail user.
        self.base_dir = self.workdir / "run"
        self.mail_root = self.workdir / "mail"
        self._private_dir: Path | None = None
        self._ports: DovecotPorts | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes]], Dovecot] | None = None
        self.instance_name = "xoauth2-test"
        self.startup_seconds: float | None = None
        mail_user = pwd.getpwnam("mail")  # from base-passwd: present on every Debian
        self._mail_user = mail_user
        self._mail_uid, self._mail_gid = mail_user.pw_uid, mail_user.pw_gid

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Dovecot {state} {self.workdir} ports={self._ports}>"

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int:
        """The master's process id; it also leads the process group of all of Dovecot."""
        if self._process is None:
            raise RuntimeError("Dovecot not started")
        return self._process.pid

    @property
    def ports(self) -> DovecotPorts:
        if self._ports is None:
            raise RuntimeError("Dovecot not started")
        return self._ports

    def start(self) -> None:
        """Write the configuration, start Dovecot, and return once every port accepts."""
        if self._process is not None:
            raise RuntimeError("Dovecot already started")
        if os.geteuid() != 0:
            raise DovecotError("the Dovecot rig must run as root (tests/install-deps.sh)")
        began = time.monotonic()
        try:
            self._prepare_files()
            for _ in range(_START_ATTEMPTS):
                self._ports = _pick_ports(submission=self.smtp_relay is not None)
                self._write_config()
                if self._launch():
                    break
            else:
                raise DovecotError(f"ports taken by others {_START_ATTEMPTS} times in a row")
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began

    def stop(self) -> None:
        """Stop Dovecot and every process it started; remove private directories. Idempotent."""
        if self._finalizer is not None:
            self._finalizer()  # terminates the process group once; later calls do nothing
            self._finalizer = None
        self._process = None
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what tests use --------------------------------------------------------------------

    def deliver(self, mailbox: str, message: bytes) -> None:
        """Store ``message`` in ``mailbox``'s INBOX (``doveadm save``).

        IMAP ``FETCH BODY[]`` and POP3 ``RETR`` return it byte for byte, provided it uses CRLF
        line endings (Dovecot stores LF and converts back, so a bare LF would come back as
        CRLF) and, for POP3, ends with CRLF.
        """
        name = _mailbox_name(mailbox)
        if name not in self.mailboxes:
            raise ValueError(f"unknown mailbox {mailbox!r}; known: {self.mailboxes}")
        if re.search(rb"\r(?!\n)|(?<!\r)\n", message):
            raise ValueError("message must use CRLF line endings only")
        self._doveadm("save", "-u", name, "-m", "INBOX", stdin=message)

    def log_text(self) -> str:
        """Dovecot's log so far (and anything the master wrote to stderr), for diagnostics."""
        parts = []
        for path in (self.stderr_file, self.log_file):
            with contextlib.suppress(FileNotFoundError):
                text = path.read_text(errors="replace")
                if text:
                    parts.append(text)
        return "".join(parts)

    def wait_for_log(
        self, needle: str, *, since: int = 0, count: int = 1, timeout: float = 5.0
    ) -> str:
        """Wait until ``needle`` occurs ``count`` times in the log after position ``since``.

        Returns the log text from ``since`` on. Take ``since = len(dc.log_text())`` before
        acting. Dovecot's log process writes asynchronously: the line about a login or a
        failure may land a little after the client has seen the reply.
        """
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()[since:]
            if text.count(needle) >= count:
                return text
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{needle!r} not {count} time(s) in Dovecot's log after {timeout} s:\n{text}"
                )
            time.sleep(0.01)

    # -- internals -------------------------------------------------------------------------

    def _prepare_files(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for path in (self.log_file, self.stderr_file):
            path.unlink(missing_ok=True)

        # The mail processes run as `mail` and must reach the mail store; pytest's tmp dirs
        # are 0700 root. Sockets need a short base_dir.
        mail_reachable = _traversable_by(self.workdir, self._mail_user)
        short_enough = len(str(self.workdir / "run")) <= _MAX_BASE_DIR
        if not (mail_reachable and short_enough):
            private = Path(tempfile.mkdtemp(prefix="xoauth2-dovecot-"))
            private.chmod(0o711)
            self._private_dir = private
            if not mail_reachable:
                self.mail_root = private / "mail"
            if not short_enough:
                self.base_dir = private / "run"
        _check_path(self.base_dir)
        _check_path(self.mail_root)
        self.base_dir.mkdir(exist_ok=True)
        (self.workdir / "state").mkdir(exist_ok=True)

        self.mail_root.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.mail_root, self._mail_uid, self._mail_gid)
        for name in self.mailboxes:
            home = self.mail_root / name
            home.mkdir(mode=0o700, exist_ok=True)
            os.chown(home, self._mail_uid, self._mail_gid)

        # Key file: <prefix>/<azp or "default">/<alg>/<kid>. Entra app tokens carry no azp.
        if self._public_key_pem is not None:
            key_dir = self.keys_dir / "default" / "RS256"
            key_dir.mkdir(parents=True, exist_ok=True)
            (key_dir / self.key_file_name).write_bytes(self._public_key_pem)

        # passwd-file: user:password:uid:gid:gecos:home:shell:extra. No password: the oauth2
        # passdb already authenticated, and an empty password can never match on its own.
        self.users_file.write_text(
            "".join(
                f"{name}::{self._mail_uid}:{self._mail_gid}::{self.mail_root / name}::\n"
                for name in self.mailboxes
            )
        )

        key, chain = self.pki.issue_split(f"dovecot-{secrets.token_hex(4)}", "localhost", HOST)
        self._ssl_key, self._ssl_cert = key, chain

    def _write_config(self) -> None:
        ports = self.ports
        oauth2_conf = self.workdir / "dovecot-oauth2.conf.ext"
        if self.introspection_url is not None:
            oauth2_lines = [
                f"introspection_mode = {self.introspection_mode}",
                f"introspection_url = {self.introspection_url}",
                "force_introspection = yes",
            ]
            if self.introspection_ca_file is not None:
                _check_path(self.introspection_ca_file)
                oauth2_lines.append(f"tls_ca_cert_file = {self.introspection_ca_file}")
        else:
            oauth2_lines = [
                "introspection_mode = local",
                f"local_validation_key_dict = fs:posix:prefix={self.keys_dir}/",
            ]
        if self.username_attribute is not None:
            # The token names the mailbox (or, with a literal format, the client).
            oauth2_lines += [f"username_attribute = {self.username_attribute}"]
            if self.username_format is not None:
                oauth2_lines += [f"username_format = {self.username_format}"]
        else:
            oauth2_lines += ["username_attribute = sub", f"username_format = {_USERNAME_FORMAT}"]
        if self.audience is not None:
            # `client_id` checks `aud`; `scope` would demand a scope claim app tokens lack.
            oauth2_lines.append(f"client_id = {self.audience}")
        if self.issuer is not None:
            oauth2_lines.append(f"issuers = {self.issuer}")
        oauth2_lines += self.oauth2_settings
        oauth2_conf.write_text("\n".join(oauth2_lines) + "\n")

        protocols = "imap pop3" + (" submission" if self.smtp_relay is not None else "")
        submission = ""
        if self.smtp_relay is not None:
            relay_host, relay_port = self.smtp_relay
            submission = f"""
submission_relay_host = {relay_host}
submission_relay_port = {relay_port}
submission_relay_trusted = yes
submission_relay_ssl = no
service submission-login {{
  inet_listener submission {{
    port = {ports.submission}
  }}
  inet_listener submissions {{
    port = {ports.submissions}
    ssl = yes
  }}
}}
"""
        self.instance_name = f"xoauth2-test-{ports.imap}"
        self.config_file.write_text(f"""\
# Written by tests/support/dovecot.py for one test run; regenerated at every start.
instance_name = {self.instance_name}
base_dir = {self.base_dir}
state_dir = {self.workdir / "state"}
log_path = {self.log_file}
protocols = {protocols}
listen = {HOST}, {REMOTE_HOST}
hostname = localhost

ssl = yes
ssl_cert = <{self._ssl_cert}
ssl_key = <{self._ssl_key}
ssl_min_protocol = TLSv1.2

auth_mechanisms = xoauth2 oauthbearer
auth_failure_delay = 0
auth_verbose = yes
disable_plaintext_auth = yes

first_valid_uid = {self._mail_uid}
mail_location = maildir:~/Maildir
mail_max_userip_connections = 10000
# IDLE learns of new mail through inotify; where the system's inotify instances run out
# (many Dovecot processes on the machine) it polls, every 30 s by default.
mailbox_idle_check_interval = 1 secs

passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {oauth2_conf}
  result_success = continue-ok
  # Kept when the next passdb fails, so unknown mailboxes fail without the 0.5 s delay.
  default_fields = nodelay=yes
}}
passdb {{
  driver = passwd-file
  args = {self.users_file}
  skip = unauthenticated
  result_failure = return-fail
}}
userdb {{
  driver = passwd-file
  args = {self.users_file}
}}

# The auth processes read keys and the mailbox list from the (0700 root) work directory.
service auth {{
  user = root
}}
service auth-worker {{
  user = root
}}
# No growing delay for repeated failures from 127.0.0.1.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}

service imap-login {{
  inet_listener imap {{
    port = {ports.imap}
  }}
  inet_listener imaps {{
    port = {ports.imaps}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {ports.pop3}
  }}
  inet_listener pop3s {{
    port = {ports.pop3s}
    ssl = yes
  }}
}}
{submission}
{self.extra_config}
""")

    def _launch(self) -> bool:
        """Start the master and wait until it serves; False if a port was taken meanwhile.

        A port that accepts proves nothing alone (someone else may hold it), so first wait for
        the master's "starting up" line, which it logs only after binding every listener.
        """
        log_before = self.log_text()
        started_before = log_before.count(_STARTED)
        in_use_before = log_before.count(_PORT_TAKEN)
        with self.stderr_file.open("ab") as stderr:  # keeps earlier attempts' errors
            process = subprocess.Popen(
                [_binary("dovecot"), "-F", "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,  # its own process group, so stop() can reap it all
            )
        self._process = process
        self._finalizer = weakref.finalize(self, _terminate_group, process)
        deadline = time.monotonic() + _START_TIMEOUT
        pending = [p for p in _ports_tuple(self.ports) if p is not None]
        started = False
        while pending:
            if process.poll() is not None:
                self._finalizer()
                self._finalizer = None
                self._process = None
                log = self.log_text()
                if log.count(_PORT_TAKEN) > in_use_before:
                    return False
                raise DovecotError(f"dovecot exited with status {process.returncode}:\n{log}")
            if time.monotonic() > deadline:
                raise DovecotError(
                    f"dovecot not serving after {_START_TIMEOUT} s:\n{self.log_text()}"
                )
            if not started:
                started = self.log_text().count(_STARTED) > started_before
                if not started:
                    time.sleep(0.005)
                    continue
            try:
                socket.create_connection((HOST, pending[0]), timeout=1).close()
            except OSError:
                time.sleep(0.005)
            else:
                pending.pop(0)
        return True

    def _doveadm(self, *args: str, stdin: bytes = b"") -> bytes:
        result = subprocess.run(
            [_binary("doveadm"), "-c", str(self.config_file), *args],
            input=stdin,
            capture_output=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise DovecotError(
                f"doveadm {' '.join(args)} failed with status {result.returncode}: "
                f"{result.stderr.decode(errors='replace')}\n{self.log_text()}"
            )
        return result.stdout


def _terminate_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the whole process group until it is gone; SIGKILL it after a deadline.

    Signalling only the master makes it wait about a second for its log process; signalling
    the group lets every process (log included) shut down at once, in about 10 ms. SIGTERM is
    repeated every 50 ms because children the master forks just then (login processes for
    connections still queued, or processes it starts lazily) can miss the first one, and the
    master would then wait seconds for them.
    """
    pgid = process.pid  # start_new_session: the master leads its own group
    # The master is reaped only at the end: until then its zombie keeps the group id from
    # being reused, so every signal below reaches only processes Dovecot started.
    deadline = time.monotonic() + _STOP_TIMEOUT
    next_signal = 0.0
    while members := _live_group_members(pgid):
        now = time.monotonic()
        if now > deadline:
            for pid in members:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        elif now >= next_signal:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            next_signal = now + 0.05
        if now > deadline + _STOP_TIMEOUT:
            break  # unkillable (uninterruptible sleep): nothing more we can do
        time.sleep(0.005)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=_STOP_TIMEOUT)  # reap the master


def _live_group_members(pgid: int) -> list[int]:
    """Processes in group ``pgid`` that are not zombies (Linux /proc).

    Orphaned children become zombies of PID 1 once they exit; a container's PID 1 may never
    reap them, so zombies count as gone.
    """
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                line = f.read()
        except OSError:
            continue  # exited meanwhile
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = line[line.rindex(b")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry.name))
    return members


def _pick_ports(*, submission: bool) -> DovecotPorts:
    """Distinct ports free on both loopback addresses, released for Dovecot to bind."""
    count = 6 if submission else 4
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            first = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(first)
            first.bind((HOST, 0))
            port = int(first.getsockname()[1])
            second = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(second)
            try:
                second.bind((REMOTE_HOST, port))
            except OSError:
                continue  # taken on the other address; keep it bound so it is not offered again
            ports.append(port)
    finally:
        for s in sockets:
            s.close()
    extra: list[int | None] = [*ports[4:]] if submission else [None, None]
    return DovecotPorts(ports[0], ports[1], ports[2], ports[3], extra[0], extra[1])


def _ports_tuple(ports: DovecotPorts) -> tuple[int | None, ...]:
    return (ports.imap, ports.imaps, ports.pop3, ports.pop3s, ports.submission, ports.submissions)


def _binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        raise DovecotError(f"{name} not found: run tests/install-deps.sh")
    return found


def _check_path(path: Path) -> None:
    if not _SAFE_PATH.fullmatch(str(path)):
        raise ValueError(f"path unsafe for dovecot.conf (use [A-Za-z0-9_./+@-]): {path}")


def _mailbox_name(mailbox: str) -> str:
    name = mailbox.lower()
    if not _SAFE_MAILBOX.fullmatch(name):
        raise ValueError(f"unusable mailbox name {mailbox!r}")
    return name


def _spki_pem(pem: bytes) -> bytes:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("jwt_public_key_pem must be an RSA public key (tokens are RS256)")
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _traversable_by(path: Path, user: pwd.struct_passwd) -> bool:
    """Whether ``user`` may search every directory from / down to ``path``."""
    groups = {user.pw_gid} | {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem}
    for directory in (path, *path.parents):
        try:
            st = directory.stat()
        except FileNotFoundError:
            continue  # created later by us, with suitable permissions
        if st.st_uid == user.pw_uid:
            allowed = st.st_mode & stat.S_IXUSR
        elif st.st_gid in groups:
            allowed = st.st_mode & stat.S_IXGRP
        else:
            allowed = st.st_mode & stat.S_IXOTH
        if not allowed:
            return False
    return True
