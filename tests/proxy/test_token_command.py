"""``xoauth2-proxy token``: a token for XOAUTH2-capable clients, from the proxy's cache."""

from __future__ import annotations

import base64
import json
import logging
import secrets
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.cli import main
from proxy.identities import HashParameters, hash_password
from tests.broker.helpers import CLIENT_SECRET, SECRET_CLIENT_ID
from tests.support.entra import EntraEmulator
from tests.support.oauth2 import AuthorizationServer

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parents[2]
HASH = hash_password("pw", HashParameters(memory_cost=64, iterations=1, lanes=1))


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def idp(tmp_path: Path, signing_key: rsa.RSAPrivateKey) -> Iterator[EntraEmulator]:
    with EntraEmulator(tmp_path, signing_key=signing_key) as emulator:
        emulator.register_app(SECRET_CLIENT_ID, secret=CLIENT_SECRET)
        yield emulator


@pytest.fixture
def config(tmp_path: Path, idp: EntraEmulator, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XO_SECRET", CLIENT_SECRET)
    monkeypatch.setenv("XO_CACHE_KEY", base64.b64encode(secrets.token_bytes(32)).decode())
    (tmp_path / "server.pem").write_text("unused by the token command")
    path = tmp_path / "config.toml"
    path.write_text(f"""
[apps.contoso]
provider = "microsoft"
tenant = "{idp.tenant}"
client_id = "{SECRET_CLIENT_ID}"
client_secret = {{ env = "XO_SECRET" }}
authority = "{idp.authority}"
ca_file = "{idp.ca_file}"

[[listeners]]
protocol = "imap"
listen = "127.0.0.1:1993"
tls = "none"
upstream = "127.0.0.1:993"
upstream_tls = "implicit"

[users."reports@contoso.com"]
password_hash = "{HASH}"
app = "contoso"

[cache]
kind = "file"
path = "tokens"
key = {{ env = "XO_CACHE_KEY" }}
""")
    path.chmod(0o600)
    return path


def test_prints_a_token_from_the_shared_cache(
    config: Path, idp: EntraEmulator, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "-c", str(config), "contoso"]) == 0
    first = capsys.readouterr().out.strip()
    assert first.count(".") == 2  # a JWT, alone on its line
    assert main(["token", "-c", str(config), "contoso", "--mailbox", "a@contoso.com"]) == 0
    assert capsys.readouterr().out.strip() == first  # from the file cache
    assert idp.token_requests == 1


def test_decode_shows_claims_but_never_the_token(
    config: Path, idp: EntraEmulator, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "-c", str(config), "contoso"]) == 0
    token = capsys.readouterr().out.strip()
    assert main(["token", "-c", str(config), "contoso", "--decode"]) == 0
    out = capsys.readouterr().out
    assert "roles:      IMAP.AccessAsApp, POP.AccessAsApp, SMTP.SendAsApp" in out
    assert "aud:        https://outlook.office365.com" in out
    assert f"tid:        {idp.tenant_id}" in out
    assert f"appid:      {SECRET_CLIENT_ID}" in out
    assert "expires in: 59 min" in out or "expires in: 1 h 00 min" in out
    for part in token.split("."):
        assert part not in out
    assert "eyJ" not in out


def test_unknown_app_and_bad_secret(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "-c", str(config), "fabrikam"]) == 2
    assert "apps.fabrikam: no such app (configured: contoso)" in capsys.readouterr().err
    monkeypatch.setenv("XO_SECRET", "the-secret-ID-not-its-value")
    assert main(["token", "-c", str(config), "contoso"]) == 1
    err = capsys.readouterr().err
    assert "[AADSTS7000215]" in err
    assert "fix: The client secret is wrong" in err
    assert "the-secret-ID-not-its-value" not in err


def test_an_error_is_printed_once(
    config: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("XO_SECRET", "wrong")
    assert main(["token", "-c", str(config), "contoso"]) == 1
    err = capsys.readouterr().err
    assert err.count("Entra refused the token request") == 1
    assert "background" not in err
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # The service's log still gets it (the level is back).
    assert logging.getLogger("xoauth2_proxy.broker").level == logging.NOTSET


# -- other providers ----------------------------------------------------------------------------


@pytest.fixture
def authz(tmp_path: Path, signing_key: rsa.RSAPrivateKey) -> Iterator[AuthorizationServer]:
    with AuthorizationServer(tmp_path, users=["reports@contoso.com"], path="/realms/mail") as s:
        s.register_client("mail-proxy", secret="k" * 40)
        s.register_resource("imap://mail.example.com")
        s.register_service_account("sa@example.iam", "key-1", signing_key.public_key())
        yield s


def other_config(tmp_path: Path, app: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XO_SECRET", "k" * 40)
    path = tmp_path / "other.toml"
    path.write_text(f"""
{app}
[[listeners]]
protocol = "imap"
listen = "127.0.0.1:1993"
tls = "none"
upstream = "127.0.0.1:993"
upstream_tls = "implicit"

[users."reports@contoso.com"]
password_hash = "{HASH}"
app = "mail"
""")
    path.chmod(0o600)
    return path


def generic_app(authz: AuthorizationServer, **extra: str) -> str:
    settings = {
        "provider": '"oauth2"',
        "issuer": f'"{authz.issuer}"',
        "client_id": '"mail-proxy"',
        "client_secret": '{ env = "XO_SECRET" }',
        "resource": '"imap://mail.example.com"',
        "scope": '"mail"',
        "ca_file": f'"{authz.ca_file}"',
        **extra,
    }
    return "[apps.mail]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())


def test_decode_speaks_the_providers_language(
    tmp_path: Path,
    authz: AuthorizationServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = other_config(tmp_path, generic_app(authz), monkeypatch)
    assert main(["token", "-c", str(config), "mail", "--decode"]) == 0
    out = capsys.readouterr().out
    rows = dict(line.split(":", 1) for line in out.splitlines())
    assert rows["iss"].strip() == authz.issuer
    assert rows["sub"].strip() == "mail-proxy"
    assert rows["aud"].strip() == "imap://mail.example.com"
    assert rows["scope"].strip() == "mail"
    assert rows["client_id"].strip() == "mail-proxy"
    assert rows["typ"].strip() == "JWT"
    assert "expires in" in rows
    for microsoft in ("roles", "tid", "consented", "AccessAsApp"):
        assert microsoft not in out


def test_decode_an_opaque_token(
    tmp_path: Path,
    authz: AuthorizationServer,
    signing_key: rsa.RSAPrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pem = signing_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    account = {
        "type": "service_account",
        "client_email": "sa@example.iam",
        "private_key": pem,
        "private_key_id": "key-1",
        "token_uri": authz.token_url,
    }
    (tmp_path / "sa.json").write_text(json.dumps(account))
    (tmp_path / "sa.json").chmod(0o600)
    app = '[apps.mail]\nprovider = "google"\nservice_account = { file = "sa.json" }\n'
    app += f'ca_file = "{authz.ca_file}"\n'
    config = other_config(tmp_path, app, monkeypatch)
    args = ["token", "-c", str(config), "mail", "--mailbox", "reports@contoso.com", "--decode"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "format:     opaque" in out
    assert "scope:      https://mail.google.com/" in out
    assert "ya29" not in out


def test_check_asks_the_servers_metadata(
    tmp_path: Path,
    authz: AuthorizationServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = other_config(tmp_path, generic_app(authz), monkeypatch)
    assert main(["check", "-c", str(config)]) == 0
    assert "OK" in capsys.readouterr().out
    authz.auth_methods = ("private_key_jwt", "tls_client_auth")
    assert main(["check", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert "apps.mail.auth_method: auth_method 'client_secret_basic' is not among" in err
    authz.metadata_issuer = "https://sso.example.com/realms/mail"
    assert main(["check", "-c", str(config)]) == 2
    assert "apps.mail.issuer:" in capsys.readouterr().err
    with socket.socket() as probe:  # nothing listens there
        probe.bind(("127.0.0.1", 0))
        closed = f"https://127.0.0.1:{probe.getsockname()[1]}/realms/mail"
    config = other_config(tmp_path, generic_app(authz, issuer=f'"{closed}"'), monkeypatch)
    assert main(["check", "-c", str(config)]) == 0  # a server down must not stop the service
    assert "warning: " in capsys.readouterr().err


def run_token(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The command as msmtp's passwordeval runs it: a process, default settings."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", "token", "-c", str(config), "contoso", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_prints_only_the_token_or_its_error_once(
    config: Path, idp: EntraEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = run_token(config)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1
    assert done.stdout.count(".") == 2  # the JWT and nothing else
    assert done.stderr == ""  # no request lines from the HTTP client, no log
    assert idp.token_requests == 1

    # Warnings (this configuration's cheap test hash) are there when asked for.
    verbose = run_token(config, "--log-level", "warning")
    assert verbose.returncode == 0
    assert "costs less than the current default" in verbose.stderr

    monkeypatch.setenv("XO_SECRET", "the-secret-ID-not-its-value")
    (config.parent / "tokens").unlink()  # the token cached above would be served
    failed = run_token(config)
    assert failed.returncode == 1
    assert failed.stdout == ""
    assert failed.stderr.startswith("no token for app contoso: ")
    assert failed.stderr.count("Entra refused the token request") == 1, failed.stderr
    assert len(failed.stderr.splitlines()) == 2, failed.stderr  # the error and its fix
    assert "\nfix: The client secret is wrong" in failed.stderr
