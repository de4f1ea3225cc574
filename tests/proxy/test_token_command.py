"""``xoauth2-proxy token``: a token for XOAUTH2-capable clients, from the proxy's cache."""

from __future__ import annotations

import base64
import secrets
from typing import TYPE_CHECKING

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.cli import main
from proxy.identities import HashParameters, hash_password
from tests.broker.helpers import CLIENT_SECRET, SECRET_CLIENT_ID
from tests.support.entra import EntraEmulator

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

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
