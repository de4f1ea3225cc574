"""What an operator sees when ``serve`` cannot start, or ``check`` finds an address wrong.

Each failure is one line on stderr and exit status 1 (2 for a configuration that is
invalid in itself), never a traceback. The proxy runs as a process, as operators run it.
"""

from __future__ import annotations

import importlib.metadata
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.cli import _parser
from proxy.identities import hash_password
from tests.support.certs import TestPki

ROOT = Path(__file__).resolve().parents[2]
HASH = hash_password("pw")  # at the default cost: check warns about cheaper ones


def write_config(directory: Path, listen: str, *, listener_extra: str = "") -> Path:
    path = directory / "config.toml"
    path.write_text(f"""
[apps.contoso]
provider = "microsoft"
tenant = "contoso.onmicrosoft.com"
client_id = "11111111-2222-3333-4444-555555555555"
client_secret = {{ env = "XO_SECRET" }}
# Nothing answers here: a token request would fail at once.
authority = "https://127.0.0.1:9/contoso"

[[listeners]]
protocol = "imap"
listen = "{listen}"
upstream = "127.0.0.1:993"
upstream_tls = "implicit"
{listener_extra or 'tls = "none"'}
allow_plaintext = true

[users."a@contoso.com"]
password_hash = "{HASH}"
app = "contoso"
""")
    path.chmod(0o600)
    return path


def proxy(*args: str, drop_capabilities: str = "") -> subprocess.CompletedProcess[str]:
    """``xoauth2-proxy ARGS`` as root, without the capabilities named (setpriv's syntax)."""
    prefix = ["setpriv", f"--bounding-set={drop_capabilities}"] if drop_capabilities else []
    return subprocess.run(
        [*prefix, sys.executable, "-m", "proxy", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "XO_SECRET": "not used before the listeners are open"},
    )


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The only line on stderr (nothing on stdout)."""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert done.stdout == ""
    return lines[0]


def test_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = proxy("serve", "-c", str(write_config(tmp_path, f"127.0.0.1:{port}")))
    assert done.returncode == 1
    assert one_line(done) == (
        f"cannot start: listener imap@127.0.0.1:{port}: cannot listen on 127.0.0.1:{port}: "
        "the port is already in use (by another program, or another instance)"
    )


def test_a_low_port_without_the_capability(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "the test drops root's CAP_NET_BIND_SERVICE"
    config = write_config(tmp_path, "127.0.0.1:993")
    done = proxy("serve", "-c", str(config), drop_capabilities="-net_bind_service")
    assert done.returncode == 1
    assert one_line(done) == (
        "cannot start: listener imap@127.0.0.1:993: cannot listen on 127.0.0.1:993: "
        "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)"
    )


def test_an_address_of_another_host(tmp_path: Path) -> None:
    assert Path("/proc/sys/net/ipv4/ip_nonlocal_bind").read_text().strip() == "0"
    # 192.0.2.0/24 is for documentation (RFC 5737): no host has it.
    config = write_config(tmp_path, "192.0.2.7:1993")
    assert proxy("check", "-c", str(config)).returncode == 0  # only binding can tell
    done = proxy("serve", "-c", str(config))
    assert done.returncode == 1
    assert one_line(done) == (
        "cannot start: listener imap@192.0.2.7:1993: cannot listen on 192.0.2.7:1993: "
        "the address does not belong to this host"
    )


@pytest.mark.parametrize("command", ["check", "serve"])
def test_an_address_that_cannot_be_parsed(tmp_path: Path, command: str) -> None:
    config = write_config(tmp_path, "999.1.1.1:1993")
    done = proxy(command, "-c", str(config))
    assert done.returncode == 2
    assert one_line(done) == (
        f"{config}: listeners[0].listen: must be host:port or [IPv6]:port, not '999.1.1.1:1993'"
    )


@pytest.mark.parametrize(("command", "status"), [("check", 2), ("serve", 1)])
def test_an_address_that_does_not_resolve(tmp_path: Path, command: str, status: int) -> None:
    # .invalid never resolves (RFC 2606); check finds it without binding.
    config = write_config(tmp_path, "mail.example.invalid:1993")
    done = proxy(command, "-c", str(config))
    assert done.returncode == status
    line = one_line(done)
    assert line.startswith(
        f"{config}: listeners[0].listen: cannot resolve 'mail.example.invalid': "
    )


def test_a_certificate_that_cannot_be_read(tmp_path: Path) -> None:
    pki = TestPki(tmp_path / "pki")
    certificate = pki.issue("proxy", "localhost")
    os.chown(certificate, 65534, 65534)  # nobody's, and only nobody may read it
    certificate.chmod(0o400)
    config = write_config(
        tmp_path,
        "127.0.0.1:0",
        listener_extra=f'tls = "implicit"\ncertificate = {{ file = "{certificate}" }}',
    )
    # Root that cannot override file permissions, as a service user would be.
    done = proxy("serve", "-c", str(config), drop_capabilities="-dac_override,-dac_read_search")
    assert done.returncode == 1
    assert one_line(done) == (
        f"{config}: listeners[0].certificate: cannot read {certificate}: Permission denied"
    )


def test_a_certificate_file_that_holds_no_key(tmp_path: Path) -> None:
    certificate = tmp_path / "server.pem"
    certificate.write_text("not PEM at all\n")
    certificate.chmod(0o600)
    config = write_config(
        tmp_path,
        "127.0.0.1:0",
        listener_extra=f'tls = "implicit"\ncertificate = {{ file = "{certificate}" }}',
    )
    done = proxy("serve", "-c", str(config))
    assert done.returncode == 1
    assert one_line(done) == (
        f"{config}: listeners[0].certificate: cannot load key and certificate from "
        f"{certificate}: no PEM private key and certificate chain in it"
    )


def test_version() -> None:
    done = proxy("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"xoauth2-proxy {importlib.metadata.version('xoauth2-proxy')}\n"


@pytest.mark.parametrize(
    "command",
    [
        ["serve"],
        ["check"],
        ["token", "contoso"],
        ["doctor"],
        ["doctor", "a@contoso.com"],
        ["exchange-setup"],
        ["hash-password"],
        ["app-key"],
    ],
)
def test_log_level_before_and_after_every_command(command: list[str]) -> None:
    assert _parser().parse_args([*command, "--log-level", "debug"]).log_level == "debug"
    assert _parser().parse_args(["--log-level", "error", *command]).log_level == "error"
    # Given on both sides, the one after the command wins.
    args = ["--log-level", "error", *command, "--log-level", "debug"]
    assert _parser().parse_args(args).log_level == "debug"
    assert not hasattr(_parser().parse_args(command), "log_level")  # each command's default


def test_check_connect_tells_whether_the_listeners_accept(tmp_path: Path) -> None:
    """The container's health check: the configuration, and a running serve behind it."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        port = listening.getsockname()[1]
        config = write_config(tmp_path, f"0.0.0.0:{port}")  # tried on loopback
        closed = proxy("check", "--connect", "-c", str(config))
        assert closed.returncode == 1
        assert closed.stderr == (
            f"listener imap@0.0.0.0:{port}: nothing accepts on 127.0.0.1:{port}: "
            "Connection refused\n"
        )
        listening.listen()
        done = proxy("check", "--connect", "-c", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(
        "OK (1 apps, 1 listeners, 1 users)\n1 listeners accept connections\n"
    )
