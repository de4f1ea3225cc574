"""A local sandbox: the proxy in front of a real Dovecot, with an emulated Entra.

``python3 -m tests.sandbox`` starts the same emulated identity provider and Dovecot the
tests use, on loopback, writes a proxy configuration for them, runs
``xoauth2-proxy serve`` on it, and prints how to point a mail client at it. Every login
through the proxy is a plain IMAP LOGIN that becomes an XOAUTH2 login Dovecot verifies.

``--self-test`` logs in once through the sandbox with imaplib and exits (0 on success).

It refuses to start when its port is taken, and exits with a non-zero status when the
proxy stops on its own (anything but Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import imaplib
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO

from proxy.identities import hash_password
from tests.support.certs import TestPki
from tests.support.dovecot import Dovecot
from tests.support.entra import EntraEmulator
from tests.support.installed import proxy_command

CLIENT_ID = "00000000-0000-4000-8000-0000000000aa"
USER = "demo@contoso.com"
PASSWORD = "demo-password"

WELCOME = (
    f"From: xoauth2-proxy sandbox <sandbox@contoso.com>\r\nTo: {USER}\r\n"
    "Subject: Welcome to the xoauth2-proxy sandbox\r\n\r\n"
    "You read this through the proxy: your client sent a password, the proxy sent\r\n"
    "Dovecot an OAuth 2.0 token from the emulated Entra, and Dovecot verified it.\r\n"
).encode()


class SandboxError(Exception):
    """The sandbox cannot start or go on; the message says why, in one line."""


def _check_port_free(port: int) -> None:
    """Refuse early, and clearly, if another program has the port."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise SandboxError(
                f"port {port} on 127.0.0.1 is not free ({exc.strerror}): stop the program "
                "using it, or choose another port with --port"
            ) from None


class _ProxyLog:
    """Copies the proxy's log to our stderr and notices the line that says it listens."""

    def __init__(self, stream: IO[str], port: int) -> None:
        self._stream = stream
        self._marker = f"listening on 127.0.0.1:{port} "
        self.listening = threading.Event()
        self.ended = threading.Event()
        self._thread = threading.Thread(target=self._copy, daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        for line in self._stream:
            sys.stderr.write(line)
            sys.stderr.flush()
            if self._marker in line:
                self.listening.set()
        self.ended.set()

    def wait_until_listening(self, proxy: subprocess.Popen[str], timeout: float) -> None:
        """Return once the proxy listens on the port; raise if it exits or takes too long."""
        for _ in range(int(timeout * 10)):
            if self.listening.wait(0.1):
                return
            if proxy.poll() is not None:
                self.ended.wait(5)  # its last words are on our stderr
                raise SandboxError(f"the proxy exited with status {proxy.returncode} (above)")
        raise SandboxError(f"the proxy did not start listening within {timeout:g} s")


def _write_config(
    directory: Path, pki: TestPki, idp: EntraEmulator, dovecot: Dovecot, port: int
) -> Path:
    secret = directory / "client-secret"
    secret.write_text("sandbox-secret\n")
    secret.chmod(0o600)
    certificate = pki.issue("proxy", "localhost", "127.0.0.1")
    config = directory / "config.toml"
    config.write_text(f"""\
# Written by `python3 -m tests.sandbox`: the proxy in front of a local Dovecot,
# with tokens from an emulated Microsoft Entra. See deploy/config.example.toml for
# a real tenant.

[apps.contoso]
provider = "microsoft"
tenant = "{idp.tenant}"
client_id = "{CLIENT_ID}"
client_secret = {{ file = "client-secret" }}
authority = "{idp.authority}"
ca_file = "{idp.ca_file}"

[[listeners]]
protocol = "imap"
listen = "127.0.0.1:{port}"
tls = "implicit"
certificate = {{ file = "{certificate}" }}
upstream = "127.0.0.1:{dovecot.ports.imaps}"
upstream_tls = "implicit"
upstream_ca_file = "{dovecot.ca_file}"

[users."{USER}"]
password_hash = "{hash_password(PASSWORD)}"
app = "contoso"
""")
    config.chmod(0o600)
    return config


def _self_test(pki: TestPki, port: int) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    with imaplib.IMAP4_SSL("localhost", port, ssl_context=context, timeout=30) as imap:
        imap.login(USER, PASSWORD)
        typ, data = imap.select("INBOX", readonly=True)
        if typ != "OK" or int(data[0] or 0) < 1:
            raise RuntimeError(f"SELECT INBOX answered {typ} {data}")
        imap.logout()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.sandbox", description=__doc__)
    parser.add_argument("--port", type=int, default=1993, help="IMAPS port of the proxy")
    parser.add_argument(
        "--self-test", action="store_true", help="log in once through the sandbox, then stop"
    )
    args = parser.parse_args()
    try:
        return _run(args)
    except SandboxError as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    _check_port_free(args.port)
    with tempfile.TemporaryDirectory(prefix="xoauth2-proxy-sandbox-") as tmp:
        work = Path(tmp)
        pki = TestPki(work / "pki")
        with EntraEmulator(work / "idp") as idp:
            idp.register_app(CLIENT_ID, secret="sandbox-secret")
            with Dovecot(
                work / "dovecot",
                pki=pki,
                jwt_public_key_pem=idp.public_key_pem(),
                kid=idp.kid,
                issuer=idp.issuer,
                mailboxes=(USER,),
            ) as dovecot:
                dovecot.deliver(USER, WELCOME)
                config = _write_config(work, pki, idp, dovecot, args.port)
                command = [sys.executable, "-m", "proxy", "serve", "-c", str(config)]
                proxy = subprocess.Popen(
                    command,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    stderr=subprocess.PIPE,
                    text=True,
                )
                assert proxy.stderr is not None
                log = _ProxyLog(proxy.stderr, args.port)
                stopping = False
                try:
                    log.wait_until_listening(proxy, timeout=60)
                    if args.self_test:
                        _self_test(pki, args.port)
                        print("sandbox self-test: IMAP LOGIN through the proxy worked")
                        return 0
                    print(
                        f"""
xoauth2-proxy sandbox is running (Ctrl-C stops it).

  IMAP over TLS  localhost:{args.port}
  user           {USER}
  password       {PASSWORD}
  trust this CA  {pki.ca_file}

Read the welcome message, for example with curl:
  curl --cacert {pki.ca_file} --user '{USER}:{PASSWORD}' 'imaps://localhost:{args.port}/INBOX;UID=1'

The proxy's log (above and below) shows each login and the token it used; Dovecot's
log, which shows it verifying the token, is {dovecot.log_file}.
The proxy's configuration is {config}
(try: {proxy_command()} check -c {config}).
""",
                        flush=True,
                    )
                    # SIGTERM (a service manager, `kill`) stops the sandbox as Ctrl-C does.
                    signal.signal(signal.SIGTERM, _interrupt)
                    status = proxy.wait()
                    raise SandboxError(f"the proxy stopped on its own with status {status}")
                except KeyboardInterrupt:
                    stopping = True
                finally:
                    if proxy.poll() is None:
                        proxy.send_signal(signal.SIGTERM)
                        try:
                            proxy.wait(10)
                        except subprocess.TimeoutExpired:
                            proxy.kill()
                            proxy.wait()
                    log.ended.wait(5)
                if stopping:
                    print("sandbox stopped", file=sys.stderr)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
