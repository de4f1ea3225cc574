"""``import-emailproxy`` on sample emailproxy.config files written for these tests (in the
shape of that project's documented sample: documentation sections, server sections, account
sections, the [emailproxy] section): the result is TOML that ``check`` accepts once its
placeholders are filled in, nothing secret is carried over, and every setting without an
equivalent is listed."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from proxy.config import load_config
from proxy.identities import HashParameters, hash_password
from proxy.ops.emailproxy import PLACEHOLDER_HASH, NotEmailproxyConfig, convert
from tests.support.certs import TestPki

SAMPLES = Path(__file__).resolve().parent / "emailproxy"
ROOT = Path(__file__).resolve().parents[2]
HASH = hash_password("s3cret", HashParameters(memory_cost=64, iterations=1, lanes=1))
#: Values in the samples that must never reach the output.
SAMPLE_SECRETS = (
    "Yx7Q~emailproxy-client-secret-value-that-must-not-leak",
    "gAAAAABkEMAILPROXYENCRYPTEDACCESSTOKENVALUEthatmustnotleak",
    "gAAAAABkEMAILPROXYENCRYPTEDREFRESHTOKENVALUEthatmustnotleak",
    "c2FsdC12YWx1ZS1ub3QtYS1zZWNyZXQtYnV0LWNhY2hlZA==",
    "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er-shown",
    "gAAAAABkENCRYPTEDCLIENTSECRETnotforus",
)


def sample(name: str) -> str:
    return (SAMPLES / name).read_text()


def usable(toml: str, directory: Path) -> Path:
    """The converted configuration with its placeholders filled in, as README says."""
    pki = TestPki(directory / "pki")
    etc = directory / "etc"
    etc.mkdir()
    (directory / "var").mkdir()
    (directory / "var").chmod(0o700)
    for name in ("cache.key",):
        (etc / name).write_text("A" * 43 + "=\n")
    for name in ("microsoft.secret", "microsoft-2.secret", "google.secret"):
        (etc / name).write_text("a-secret-from-the-app-registration\n")
    (etc / "server.pem").write_bytes(pki.issue("proxy", "localhost").read_bytes())
    for path in etc.iterdir():
        path.chmod(0o600)
    text = (
        toml.replace(PLACEHOLDER_HASH, HASH)
        .replace("/etc/xoauth2-proxy/", f"{etc}/")
        .replace("/var/lib/xoauth2-proxy/", f"{directory / 'var'}/")
    )
    config = directory / "config.toml"
    config.write_text(text)
    config.chmod(0o600)
    return config


def test_office365_sample(tmp_path: Path) -> None:
    result = convert(sample("office365.config"), source="emailproxy.config")
    parsed = tomllib.loads(result.toml)
    assert (result.listeners, result.apps, result.users) == (3, 1, 2)
    app = parsed["apps"]["microsoft"]
    assert app["delegated"] is True
    assert app["tenant"] == "common"
    assert app["client_secret"] == {"file": "/etc/xoauth2-proxy/microsoft.secret"}
    assert "offline_access" not in app["scope"]
    assert "https://outlook.office365.com/SMTP.Send" in app["scope"]
    listeners = parsed["listeners"]
    assert [(x["protocol"], x["listen"], x["upstream"], x["upstream_tls"]) for x in listeners] == [
        ("imap", "127.0.0.1:1993", "outlook.office365.com:993", "implicit"),
        ("pop3", "127.0.0.1:1995", "outlook.office365.com:995", "implicit"),
        ("smtp", "127.0.0.1:1587", "smtp.office365.com:587", "starttls"),
    ]
    assert all(x["tls"] == "none" for x in listeners)
    assert parsed["cache"]["kind"] == "file"
    assert sorted(parsed["users"]) == ["reports@contoso.com", "scanner@contoso.com"]
    for text in (
        "xoauth2-proxy hash-password",
        "xoauth2-proxy authorize -c CONFIG USER",
        "openssl rand -base64 32",
        "put the client_secret of [reports@contoso.com] in /etc/xoauth2-proxy/microsoft.secret",
        "a confidential client signs in with a browser: authorize --browser",
    ):
        assert text in result.toml
    # emailproxy's cached sign-in and its own settings are listed, not dropped.
    for option in ("token_salt", "access_token", "refresh_token", "last_activity"):
        assert f"[reports@contoso.com] {option}: emailproxy's cached sign-in" in result.toml
    for option in ("delete_account_token_on_password_error", "encrypt_client_secret_on_first_use"):
        assert f"[emailproxy] {option}: " in result.toml
    assert "documentation" not in result.toml.lower()
    for secret in SAMPLE_SECRETS:
        assert secret not in result.toml
    # Filled in as the notes say, it is a configuration the proxy takes.
    config = load_config(usable(result.toml, tmp_path))
    assert config.apps["microsoft"].delegated
    assert config.delegated_accounts() == {
        "microsoft": {
            "reports@contoso.com": ["reports@contoso.com"],
            "scanner@contoso.com": ["scanner@contoso.com"],
        }
    }


def test_mixed_sample(tmp_path: Path) -> None:
    result = convert(sample("mixed.config"))
    parsed = tomllib.loads(result.toml)
    apps = parsed["apps"]
    users = parsed["users"]
    gmail = apps[users["jane.doe@gmail.com"]["app"]]
    assert (gmail["provider"], gmail["delegated"]) == ("google", True)
    assert gmail["redirect_uri"] == "http://localhost:8080"
    outlook = apps[users["john.smith@outlook.com"]["app"]]
    assert (outlook["provider"], outlook["tenant"]) == ("microsoft", "consumers")
    assert "client_secret" not in outlook  # a public client: the device sign-in
    service = apps[users["alerts@fabrikam.com"]["app"]]
    assert "delegated" not in service  # client credentials: app-only
    assert service["tenant"] == "2f3e4d5c-6b7a-8998-a1b2-c3d4e5f6a7b8"
    assert service["scope"] == "https://outlook.office365.com/.default"
    government = apps[users["ops@agency.gov"]["app"]]
    assert government["authority"] == "https://login.microsoftonline.us"
    assert government["tenant"] == "agency.onmicrosoft.us"
    generic = apps[users["bob@example.org"]["app"]]
    assert generic["provider"] == "oauth2"
    assert generic["auth_method"] == "none"
    assert generic["scope"] == "openid email offline_access mail"
    assert generic["expect_scope"] == ["mail"]
    assert generic["authorization_url"].endswith("/protocol/openid-connect/auth")
    listeners = {x["listen"]: x for x in parsed["listeners"]}
    assert listeners["0.0.0.0:2993"]["tls"] == "implicit"
    assert "cat /etc/emailproxy/proxy.key /etc/emailproxy/proxy.crt" in result.toml
    assert listeners["192.168.10.5:3587"]["allow_plaintext"] is True
    assert listeners["127.0.0.1:4993"]["upstream"] == "mail.example.org:993"
    for left in (
        "[SMTP-3587] local_server_auth: unknown option",
        "[emailproxy] smtp_require_tls: unknown option",
        "[@example.net]: a catch-all account",
        "[ops@agency.gov] redirect_listen_address: ",
        "[alerts@fabrikam.com] client_secret_expiry: ",
    ):
        assert any(item.startswith(left) for item in result.left_behind), left
        assert left in result.toml
    assert "emailproxy used the password grant" in result.toml
    assert "copy it from the app registration into /etc/xoauth2-proxy/" in result.toml
    for secret in SAMPLE_SECRETS:
        assert secret not in result.toml
    config = load_config(usable(result.toml, tmp_path))
    assert len(config.users) == 5


@pytest.mark.parametrize(
    "text",
    ["not an ini file at all\n", "[just-a-section]\nx = 1\n", "[IMAP-1993\nbroken"],
)
def test_what_is_not_an_emailproxy_configuration(text: str) -> None:
    with pytest.raises(NotEmailproxyConfig, match="emailproxy"):
        convert(text)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "import-emailproxy", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_the_command(tmp_path: Path) -> None:
    done = run(str(SAMPLES / "office365.config"))
    assert done.returncode == 0, done.stderr
    assert tomllib.loads(done.stdout)["apps"]["microsoft"]["tenant"] == "common"
    assert "3 listeners, 1 apps, 2 users" in done.stderr
    output = tmp_path / "config.toml"
    done = run(str(SAMPLES / "mixed.config"), "-o", str(output))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert os.stat(output).st_mode & 0o777 == 0o600
    assert tomllib.loads(output.read_text())["users"]
    again = run(str(SAMPLES / "mixed.config"), "-o", str(output))  # never overwrites
    assert again.returncode == 1
    assert "cannot create" in again.stderr
    (tmp_path / "junk").write_text("junk\n")
    for bad in (tmp_path / "junk", tmp_path / "missing"):
        done = run(str(bad))
        assert done.returncode == 2
        assert str(bad) in done.stderr


def test_a_file_that_cannot_be_parsed_is_refused_without_quoting_it() -> None:
    """configparser quotes the lines it cannot parse; a wrapped secret must not be shown."""
    text = "[IMAP-1993]\nserver_address = outlook.office365.com\nYx7Q~wrapped-secret-part\n"
    with pytest.raises(NotEmailproxyConfig) as info:
        convert(text, source="e.config")
    assert str(info.value) == "e.config: not an emailproxy configuration: cannot parse line 3"
    with pytest.raises(NotEmailproxyConfig) as info:
        convert("Yx7Q~secret-without-a-section\n", source="e.config")
    assert str(info.value) == (
        "e.config: not an emailproxy configuration: cannot parse line 1 (no [section] above it)"
    )


def test_a_redirect_uri_check_would_refuse_is_not_carried_over() -> None:
    """The same rule as the configuration's: what is written, `check` accepts."""
    text = sample("mixed.config").replace(
        "redirect_uri = http://localhost:8080", "redirect_uri = http://localhost:99999/cb"
    )
    result = convert(text)
    apps = tomllib.loads(result.toml)["apps"]
    assert all(app.get("redirect_uri") != "http://localhost:99999/cb" for app in apps.values())
    assert "redirect_uri http://localhost:99999/cb is not a loopback address" in result.toml
