"""The audit log: one JSON line per authentication attempt, whatever its outcome."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

from tests.e2e.conftest import (
    CLIENT_SECRET,
    MAILBOX,
    OTHER_MAILBOX,
    PASSWORD,
    Listener,
    ProxyRig,
    start_proxy,
)
from tests.e2e.helpers import in_thread
from tests.e2e.test_abuse import login

if TYPE_CHECKING:
    import trio

    from tests.support.certs import TestPki
    from tests.support.dovecot import Dovecot

pytestmark = [pytest.mark.e2e]

ROLE = "IMAP.AccessAsApp"


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        json.loads(record.getMessage())
        for record in caplog.records
        if record.name == "xoauth2_proxy.audit"
    ]


async def test_every_attempt_is_audited_once_without_secrets(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig.limits.update(failure_delay=0)
    rig.add_user(OTHER_MAILBOX, PASSWORD, app="roleless")
    rig.add_user("ghost-user@contoso.com", PASSWORD, mailbox="ghost@contoso.com")
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)]))

    def attempts() -> list[bytes]:
        return [
            login(pki, proxy.port, PASSWORD),
            login(pki, proxy.port, "wrong-" + PASSWORD),
            login(pki, proxy.port, PASSWORD, user="nobody@contoso.com"),
            login(pki, proxy.port, PASSWORD, user=OTHER_MAILBOX),
            login(pki, proxy.port, PASSWORD, user="ghost-user@contoso.com"),
        ]

    replies = await in_thread(attempts)
    assert replies[0].startswith(b"a1 OK")
    lines = audit_lines(caplog)
    summary = [(line["login"], line["mailbox"], line["result"], line["reason"]) for line in lines]
    assert summary[:4] == [
        (MAILBOX, MAILBOX, "success", "logged in upstream"),
        (MAILBOX, "", "failure", "wrong password"),
        ("nobody@contoso.com", "", "failure", "unknown user"),
        (
            OTHER_MAILBOX,
            OTHER_MAILBOX,
            "temporary-failure",
            "token lacks the IMAP.AccessAsApp role",
        ),
    ]
    ghost = lines[4]
    assert (ghost["login"], ghost["mailbox"], ghost["result"]) == (
        "ghost-user@contoso.com",
        "ghost@contoso.com",
        "failure",
    )
    assert "the upstream rejected the token" in ghost["reason"]
    assert len(lines) == 5
    for line in lines:
        assert line["protocol"] == "imap"
        assert line["source"] == "127.0.0.1"
        assert line["kind"] == "password"
        assert line["listener"] == proxy.listeners[0].config.name
        assert line["time"].endswith("+00:00")
    text = "\n".join(record.getMessage() for record in caplog.records)
    for secret in (PASSWORD, "wrong-" + PASSWORD, CLIENT_SECRET):
        assert secret not in text


async def test_audit_lines_are_ascii_and_spoofed_names_are_refused(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue: a login of U+202E and reversed text was written raw and showed as another
    user's name in a log viewer."""
    rig.limits.update(failure_delay=0)
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)]))
    spoof = "\u202e" + MAILBOX[::-1]
    reply = await in_thread(lambda: login(pki, proxy.port, PASSWORD, user=spoof))
    assert reply.startswith(b"a1 NO [AUTHENTICATIONFAILED]")
    (record,) = [r for r in caplog.records if r.name == "xoauth2_proxy.audit"]
    raw = record.getMessage()
    assert raw.isascii()
    assert "\\u202e" in raw
    line = json.loads(raw)
    assert line["login"] == spoof
    assert line["reason"] == "the login name contains invisible formatting characters (Unicode Cf)"
