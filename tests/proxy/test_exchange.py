"""``exchange-setup``: the PowerShell for the configured apps, users and protocols."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from proxy.cli import main
from proxy.config import Protocol, load_config
from proxy.identities import HashParameters, hash_password
from proxy.ops.exchange import powershell

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

HASH = hash_password("s3cret", HashParameters(memory_cost=64, iterations=1, lanes=1))
CLIENT_ID = "11111111-2222-3333-4444-555555555555"


def config_file(tmp_path: Path) -> Path:
    (tmp_path / "secret").write_text("s3cret")
    (tmp_path / "secret").chmod(0o600)
    path = tmp_path / "config.toml"
    path.write_text(f"""
[apps.contoso]
provider = "microsoft"
tenant = "contoso.onmicrosoft.com"
client_id = "{CLIENT_ID}"
client_secret = {{ file = "secret" }}

[apps.other]
provider = "oauth2"
client_id = "mail-client"
client_secret = {{ file = "secret" }}
token_url = "https://idp.example.net/token"
scope = "mail"

[[listeners]]
protocol = "imap"
listen = "127.0.0.1:1993"
tls = "none"
upstream = "outlook.office365.com:993"
upstream_tls = "implicit"

[users."scanner"]
password_hash = "{HASH}"
app = "contoso"
mailbox = "Scans@contoso.com"
protocols = ["imap", "pop3"]

[users."erp"]
password_hash = "{HASH}"
app = "contoso"
mailbox = "scans@contoso.com"
mailboxes = ["scans@contoso.com", "o'brien@contoso.com", "*@reports.contoso.com"]
protocols = ["smtp"]

[users."elsewhere"]
password_hash = "{HASH}"
app = "other"
mailbox = "someone@example.net"
""")
    path.chmod(0o600)
    return path


def test_one_block_per_mailbox_with_the_rights_its_protocols_need(tmp_path: Path) -> None:
    script = powershell(load_config(config_file(tmp_path)))
    lines = script.splitlines()
    assert "$sp1_contoso = '<object id of the enterprise application>'" in lines
    assert (
        f"New-ServicePrincipal -AppId '{CLIENT_ID}' -ObjectId $sp1_contoso "
        "-DisplayName 'xoauth2-proxy contoso'"
    ) in lines
    # One mailbox for two users (case differs): reading and sending rights, all protocols.
    assert "# Scans@contoso.com: users erp, scanner" in lines
    assert (
        "Add-MailboxPermission -Identity 'Scans@contoso.com' -User $sp1_contoso "
        "-AccessRights FullAccess"
    ) in lines
    assert (
        "Add-RecipientPermission -Identity 'Scans@contoso.com' -Trustee $sp1_contoso "
        "-AccessRights SendAs -Confirm:$false"
    ) in lines
    assert (
        "Set-CASMailbox -Identity 'Scans@contoso.com' -ImapEnabled $true -PopEnabled $true "
        "-SmtpClientAuthenticationDisabled $false"
    ) in lines
    # A quote in an address cannot end the PowerShell string; sending only: no FullAccess.
    assert "Add-MailboxPermission -Identity 'o''brien@contoso.com'" not in script
    assert (
        "Set-CASMailbox -Identity 'o''brien@contoso.com' -SmtpClientAuthenticationDisabled $false"
    ) in lines
    # Patterns cannot be granted; they are named for the administrator.
    assert (
        "# User 'erp' may open '*@reports.contoso.com': grant each mailbox it should reach as"
        in lines
    )
    assert "*@reports.contoso.com'" not in "\n".join(line for line in lines if line[:1] != "#")
    # Only Microsoft apps.
    assert "someone@example.net" not in script
    assert "'other'" not in script
    assert "mail-client" not in script


def test_icalendar_option(tmp_path: Path) -> None:
    script = powershell(load_config(config_file(tmp_path)), icalendar=True)
    assert (
        "Set-CASMailbox -Identity 'Scans@contoso.com' -ImapEnabled $true "
        "-ImapUseProtocolDefaults $false -ImapForceICalForCalendarRetrievalOption $true "
        "-PopEnabled $true -PopUseProtocolDefaults $false "
        "-PopForceICalForCalendarRetrievalOption $true -SmtpClientAuthenticationDisabled $false"
    ) in script.splitlines()


def test_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["exchange-setup", "-c", str(config_file(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert out == powershell(load_config(tmp_path / "config.toml"))
    assert "s3cret" not in out


def test_configuration_values_cannot_become_powershell(tmp_path: Path) -> None:
    """Addresses and names come from the configuration: a typographic quote cannot end a
    string, a line break cannot end a comment (the configuration refuses both, and the
    script does not rely on that), and a default mailbox outside the user's policy is
    granted nothing."""
    path = config_file(tmp_path)
    path.write_text(
        path.read_text()
        + f"""
[users."narrow"]
password_hash = "{HASH}"
app = "contoso"
mailboxes = ["narrow-*@contoso.com"]
"""
    )
    config = load_config(path)
    evil = dataclasses.replace(config.users["erp"], login="evil\nGet-Mailbox | Remove-Mailbox")
    quoted = dataclasses.replace(
        config.users["erp"],
        login="quoted",
        mailbox="x\u2019; Remove-Mailbox ceo; \u2019@contoso.com",
        mailboxes=(),
        protocols=frozenset(Protocol),
    )
    users = {**config.users, "evil": evil, "quoted": quoted}
    script = powershell(dataclasses.replace(config, users=users))
    commands = [line for line in script.splitlines() if line and not line.startswith("#")]
    assert (
        "Set-CASMailbox -Identity 'x\u2019\u2019; Remove-Mailbox ceo; \u2019\u2019@contoso.com' "
        "-ImapEnabled $true -PopEnabled $true -SmtpClientAuthenticationDisabled $false"
    ) in commands
    assert not any(line.startswith(("Get-Mailbox", "Remove-Mailbox")) for line in commands)
    assert "evil\\nGet-Mailbox" in script  # escaped, in its comment
    assert "-Identity 'narrow'" not in script  # its default mailbox is not in its policy
