"""Configuration loading: every mistake reported as ``FILE: KEY: text``, secrets resolved."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from proxy.config import ConfigError, Protocol, load_config
from proxy.identities import HashParameters, hash_password
from proxy.protocol.modes import ClientTls, UpstreamTls

if TYPE_CHECKING:
    from pathlib import Path

CHEAP = HashParameters(memory_cost=64, iterations=1, lanes=1)
HASH = hash_password("s3cret", CHEAP)


def write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def good_config(tmp_path: Path) -> str:
    (tmp_path / "server.pem").write_text("placeholder")
    return f"""
[apps.contoso]
provider = "microsoft"
tenant = "contoso.onmicrosoft.com"
client_id = "11111111-2222-3333-4444-555555555555"
client_secret = {{ env = "XO_TEST_SECRET" }}

[[listeners]]
protocol = "imap"
listen = "127.0.0.1:1993"
tls = "implicit"
certificate = {{ file = "server.pem" }}
upstream = "outlook.office365.com:993"
upstream_tls = "implicit"

[users."Reports@contoso.com"]
password_hash = "{HASH}"
app = "contoso"
protocols = ["imap"]
"""


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def test_good_config_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "the-client-secret")
    config = load_config(write(tmp_path, good_config(tmp_path)))
    app = config.apps["contoso"]
    assert app.client_secret is not None
    assert app.client_secret.reveal() == "the-client-secret"
    assert app.scope == "https://outlook.office365.com/.default"
    assert app.authority == "https://login.microsoftonline.com"
    (listener,) = config.listeners
    assert (listener.host, listener.port) == ("127.0.0.1", 1993)
    assert listener.tls is ClientTls.IMPLICIT
    assert listener.upstream_tls is UpstreamTls.IMPLICIT
    assert (listener.upstream_host, listener.upstream_port) == ("outlook.office365.com", 993)
    user = config.user("reports@CONTOSO.com")
    assert user is not None
    assert user.mailbox == "Reports@contoso.com"
    assert user.protocols == frozenset({Protocol.IMAP})
    assert "the-client-secret" not in repr(config)


def test_every_problem_is_reported_with_file_and_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[apps.contoso]
provider = "yahoo"
client_id = "x"
client_secret = "inline-secret"
colour = "blue"

[[listeners]]
protocol = "nntp"
listen = "0.0.0.0:143"
tls = "none"
upstream = "no-port"
upstream_tls = "implicit"

[users."a@b.c"]
password_hash = "plaintext"
app = "missing"
protocols = ["imap", "gopher"]
""",
    )
    found = problems(path)
    expected_keys = [
        "apps.contoso.provider",
        "apps.contoso.tenant",
        "apps.contoso.client_secret",
        "apps.contoso.colour",
        "listeners[0].protocol",
        "listeners[0].upstream",
        "listeners[0].tls",
        'users."a@b.c".password_hash',
        'users."a@b.c".app',
        'users."a@b.c".protocols',
    ]
    for key in expected_keys:
        assert any(p.startswith(f"{path}: {key}: ") for p in found), (key, found)
    assert "inline-secret" not in "\n".join(found)


def test_secret_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-a-file\n")
    secret_file.chmod(0o600)
    text = good_config(tmp_path).replace('{ env = "XO_TEST_SECRET" }', '{ file = "secret" }')
    config = load_config(write(tmp_path, text))
    secret = config.apps["contoso"].client_secret
    assert secret is not None
    assert secret.reveal() == "from-a-file"
    assert "from-a-file" not in repr(secret)

    secret_file.chmod(0o644)
    assert any("accessible to other users" in p for p in problems(write(tmp_path, text)))

    monkeypatch.delenv("XO_TEST_SECRET", raising=False)
    assert any(
        "XO_TEST_SECRET is not set" in p for p in problems(write(tmp_path, good_config(tmp_path)))
    )


def test_inline_secret_warns_and_needs_a_private_file(tmp_path: Path) -> None:
    text = good_config(tmp_path).replace('{ env = "XO_TEST_SECRET" }', '{ value = "abc" }')
    config = load_config(write(tmp_path, text))
    assert any("inline" in w for w in config.warnings)
    assert any("readable by every user" in p for p in problems(write(tmp_path, text, 0o644)))


def test_world_writable_config_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "x")
    found = problems(write(tmp_path, good_config(tmp_path), 0o666))
    assert any("writable by every user" in p for p in found)


def test_plaintext_listener_needs_loopback_or_opt_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "x")
    base = good_config(tmp_path).replace(
        'tls = "implicit"\ncertificate = { file = "server.pem" }', 'tls = "none"'
    )
    config = load_config(write(tmp_path, base))
    assert config.listeners[0].tls is ClientTls.NONE
    public = base.replace("127.0.0.1:1993", "0.0.0.0:1993")
    assert any("allow_plaintext" in p for p in problems(write(tmp_path, public)))
    opted = public.replace('tls = "none"', 'tls = "none"\nallow_plaintext = true')
    assert load_config(write(tmp_path, opted)).listeners[0].allow_plaintext


def test_tls_listener_needs_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "x")
    text = good_config(tmp_path).replace('certificate = { file = "server.pem" }\n', "")
    assert any(
        "listeners[0].certificate: is required" in p for p in problems(write(tmp_path, text))
    )


def test_ipv6_addresses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "x")
    text = good_config(tmp_path).replace("127.0.0.1:1993", "[::1]:1993")
    (listener,) = load_config(write(tmp_path, text)).listeners
    assert (listener.host, listener.port) == ("::1", 1993)
    assert listener.name == "imap@[::1]:1993"


def test_not_toml(tmp_path: Path) -> None:
    found = problems(write(tmp_path, "[apps\n"))
    assert found[0].startswith(f"{tmp_path / 'config.toml'}: not valid TOML")


def test_password_hash_list_for_rotation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XO_TEST_SECRET", "x")
    second = hash_password("new", CHEAP)
    text = good_config(tmp_path).replace(
        f'password_hash = "{HASH}"', f'password_hash = ["{HASH}", "{second}"]'
    )
    user = load_config(write(tmp_path, text)).user("reports@contoso.com")
    assert user is not None
    assert user.password_hashes == (HASH, second)
