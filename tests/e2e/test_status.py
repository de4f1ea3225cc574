"""``xoauth2-proxy status`` and ``unlock`` against ``serve`` as a process, through its
control socket; and ``serve`` logging JSON, one object per line, audit included."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from tests.e2e.conftest import CLIENT_SECRET, MAILBOX, PASSWORD, Listener, ProxyRig
from tests.e2e.helpers import ROOT, ServeProcess
from tests.e2e.test_abuse import login

if TYPE_CHECKING:
    from pathlib import Path

    from tests.support.dovecot import Dovecot

pytestmark = pytest.mark.e2e


def command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_status_shows_tokens_sessions_and_lockouts_and_unlock_clears_one(
    tmp_path: Path, rig: ProxyRig, dovecot: Dovecot
) -> None:
    socket_path = tmp_path / "control.sock"
    rig.tables["control"] = {"socket": f'"{socket_path}"'}
    rig.tables["logging"] = {"format": '"json"'}
    rig.limits.update(lockout_after=2, failure_delay=0, max_failure_delay=0)
    config = rig.write([Listener(upstream_port=dovecot.ports.imaps)])
    serve = ServeProcess(config, tmp_path / "serve.log")
    try:
        port = serve.port()
        serve.wait_for(lambda: "control socket at" in serve.text(), "the control socket")
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
        # Both apps' tokens fetched in the background: ready.
        serve.wait_for(lambda: command("status", "-c", str(config)).returncode == 0, "readiness")
        for _ in range(2):
            assert login(rig.pki, port, "wrong").startswith(b"a1 NO")
        assert login(rig.pki, port, PASSWORD).startswith(b"a1 NO")  # locked out

        shown = command("status", "-c", str(config))
        assert shown.returncode == 0, shown.stderr
        text = shown.stdout
        assert text.startswith("ready")
        assert f"login password:{MAILBOX}: 2 failures, lifted in" in text
        assert "contoso" in text
        assert "valid, expires in" in text
        assert "imap@127.0.0.1:0" in text

        as_json = json.loads(command("status", "-c", str(config), "--json").stdout)
        tokens = {t["app"]: t for t in as_json["tokens"]}
        assert tokens["contoso"]["valid"] is True
        assert 3000 < tokens["contoso"]["expires_in"] <= 3600
        assert [lock["key"] for lock in as_json["lockouts"]] == [f"password:{MAILBOX}"]
        for output in (text, json.dumps(as_json)):
            assert CLIENT_SECRET not in output
            assert PASSWORD not in output
            assert "eyJ" not in output  # no JWT

        unlocked = command("unlock", "-c", str(config), MAILBOX)
        assert unlocked.returncode == 0, unlocked.stderr
        assert unlocked.stdout == f"unlocked password:{MAILBOX}\n"
        assert login(rig.pki, port, PASSWORD).startswith(b"a1 OK")
        again = command("unlock", "--socket", str(socket_path), MAILBOX)
        assert again.returncode == 1
        assert "nothing to unlock" in again.stderr

        # Every line serve wrote is one JSON object; the audit's fields are its own.
        lines = [json.loads(line) for line in serve.text().splitlines() if line]
        assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
        audit = [line for line in lines if line["logger"] == "xoauth2_proxy.audit"]
        assert [a["result"] for a in audit] == ["failure", "failure", "failure", "success"]
        assert audit[0]["reason"] == "wrong password"
        assert audit[0]["source"] == "127.0.0.1"
        assert any(line.get("conn") == audit[0]["conn"] for line in lines if line not in audit)
        assert PASSWORD not in serve.text()
        assert "unlocked by the control socket" in serve.text()
        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(30) == 0
        assert not socket_path.exists()  # removed on the way out
    finally:
        serve.close()


def test_status_without_a_control_socket_says_how_to_configure_one(
    rig: ProxyRig, dovecot: Dovecot, tmp_path: Path
) -> None:
    config = rig.write([Listener(upstream_port=dovecot.ports.imaps)])
    shown = command("status", "-c", str(config))
    assert shown.returncode == 2
    assert "no [control] socket is configured" in shown.stderr
    gone = command("status", "--socket", str(tmp_path / "none.sock"))
    assert gone.returncode == 1
    assert "is serve running?" in gone.stderr
