"""README's first command ends in ``python3 -m tests.sandbox``: it must really work."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_sandbox_self_test_logs_in_through_the_proxy() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.sandbox", "--self-test", "--port", str(free_port())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "IMAP LOGIN through the proxy worked" in done.stdout
    # The proxy really obtained a token and Dovecot accepted it.
    assert "logged in to the upstream as 'demo@contoso.com'" in done.stderr
