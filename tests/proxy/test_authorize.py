"""``xoauth2-proxy authorize`` refusing what it must not do: unknown users, users of app-only
apps, and (run as root) a cache file that belongs to the proxy's own user; and ``token``
asking which account a delegated app's token is for. The sign-ins themselves are in
tests/broker/test_signin_*.py and tests/e2e/test_delegated.py."""

from __future__ import annotations

import io
import os
import pwd
import socket
import subprocess
import sys
from pathlib import Path

import trio

from broker.cache import CacheKey, Grant
from broker.cache.file import FileTokenCache
from broker.model import Secret
from proxy.config import load_config
from proxy.identities import HashParameters, hash_password
from proxy.ops import authorize

HASH = hash_password("s3cret", HashParameters(memory_cost=64, iterations=1, lanes=1))
ROOT = Path(__file__).resolve().parents[2]


def config_file(directory: Path) -> Path:
    (directory / "cache.key").write_text("A" * 43 + "=\n")
    (directory / "secret").write_text("app-secret\n")
    for name in ("cache.key", "secret"):
        (directory / name).chmod(0o600)
    (directory / "state").mkdir(mode=0o700)
    path = directory / "config.toml"
    path.write_text(
        f"""
[apps.personal]
provider = "microsoft"
delegated = true
client_id = "11111111-2222-3333-4444-555555555555"

[apps.contoso]
provider = "microsoft"
tenant = "contoso.onmicrosoft.com"
client_id = "11111111-2222-3333-4444-555555555555"
client_secret = {{ file = "secret" }}

[cache]
kind = "file"
path = "state/tokens"
key = {{ file = "cache.key" }}

[[listeners]]
protocol = "imap"
listen = "127.0.0.1:1143"
tls = "none"
upstream = "outlook.office365.com:993"
upstream_tls = "implicit"

[users."me"]
password_hash = "{HASH}"
app = "personal"
mailbox = "me@outlook.com"

[users."reports@contoso.com"]
password_hash = "{HASH}"
app = "contoso"
"""
    )
    path.chmod(0o600)
    return path


def sign_in(path: Path, login: str) -> tuple[int, str]:
    err = io.StringIO()
    code = authorize.run(load_config(path), login, out=io.StringIO(), err=err, timeout=5)
    return code, err.getvalue()


def test_refusals(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    assert sign_in(path, "nobody") == (2, f"{path}: users: no user 'nobody'\n")
    code, text = sign_in(path, "reports@contoso.com")
    assert code == 2
    assert "apps.contoso: not a delegated app" in text


def test_root_is_sent_to_the_proxys_user(tmp_path: Path) -> None:
    """As root, authorize would create (or rewrite) a cache file the proxy's own user then
    refuses: it says which user to run as instead, and touches nothing."""
    assert os.geteuid() == 0, "the suite runs as root (the Dovecot rig needs it)"
    path = config_file(tmp_path)
    nobody = pwd.getpwnam("nobody")
    os.chown(tmp_path / "state", nobody.pw_uid, nobody.pw_gid)
    code, text = sign_in(path, "me")
    assert code == 1
    assert "belongs to nobody, the user the proxy runs as" in text
    assert "sudo -u nobody xoauth2-proxy authorize -c" in text
    assert not (tmp_path / "state" / "tokens").exists()


def test_token_of_a_delegated_app_needs_the_account(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "token", "-c", str(path), "personal"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "issues tokens per signed-in account: name one with --mailbox" in done.stderr
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "token",
            "-c",
            str(path),
            "personal",
            "--mailbox",
            "me@outlook.com",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "nobody has signed in yet" in done.stderr
    assert "xoauth2-proxy authorize -c" in done.stderr
    assert " me` as the user the proxy runs as" in done.stderr


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def with_changes(path: Path, old: str, new: str) -> Path:
    path.write_text(path.read_text().replace(old, new))
    return path


def test_what_can_go_wrong_during_a_sign_in(tmp_path: Path) -> None:
    path = with_changes(
        config_file(tmp_path),
        "delegated = true\n",
        f'delegated = true\nauthority = "https://127.0.0.1:{closed_port()}"\n',
    )
    config = load_config(path)
    # Someone signed in before: a new sign-in would replace it.
    cache = FileTokenCache(tmp_path / "state" / "tokens", Secret("A" * 43 + "="))
    key = CacheKey.for_app(config.apps["personal"], "me@outlook.com")
    trio.run(cache.store_grant, key, Grant("old-refresh-token", "me@outlook.com", 1.0, 1.0))
    out, err = io.StringIO(), io.StringIO()
    assert authorize.run(config, "me", out=out, err=err) == 1
    assert "me@outlook.com is signed in already (as me@outlook.com)" in out.getvalue()
    assert "no sign-in: " in err.getvalue()
    assert "unreachable" in err.getvalue()
    assert "old-refresh-token" not in out.getvalue() + err.getvalue()
    # The browser sign-in's port is taken.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        err = io.StringIO()
        code = authorize.run(
            config, "me", method="browser", port=taken.getsockname()[1], out=io.StringIO(), err=err
        )
    assert code == 1
    assert "cannot listen for the browser's answer" in err.getvalue()
    # No time left.
    err = io.StringIO()
    assert authorize.run(config, "me", timeout=0, out=io.StringIO(), err=err) == 1
    assert "no sign-in within 0 s" in err.getvalue()


def test_a_token_cache_that_cannot_be_used(tmp_path: Path) -> None:
    path = with_changes(
        config_file(tmp_path),
        'kind = "file"\npath = "state/tokens"\n',
        f'kind = "redis"\nurl = "redis://127.0.0.1:{closed_port()}/0"\n',
    )
    err = io.StringIO()
    assert authorize.run(load_config(path), "me", out=io.StringIO(), err=err) == 1
    assert "cannot use the token cache: " in err.getvalue()
