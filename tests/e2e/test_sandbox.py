"""README's first command ends in ``python3 -m tests.sandbox``: it must really work, say
clearly when it cannot, and end with the status of what happened."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def sandbox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.sandbox", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_sandbox_self_test_logs_in_through_the_proxy() -> None:
    done = sandbox("--self-test", "--port", str(free_port()))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "IMAP LOGIN through the proxy worked" in done.stdout
    # The proxy really obtained a token and Dovecot accepted it.
    assert "logged in to the upstream as 'demo@contoso.com'" in done.stderr


def test_sandbox_refuses_a_port_another_program_has() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()  # it accepts connections, as a real server would
        port = other.getsockname()[1]
        done = sandbox("--self-test", "--port", str(port))
    assert done.returncode == 1
    assert done.stderr == (
        f"sandbox: port {port} on 127.0.0.1 is not free (Address already in use): stop the "
        "program using it, or choose another port with --port\n"
    )
    assert "running" not in done.stdout


class Running:
    """The sandbox as a user runs it, in its own process group as on a terminal."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self._out = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.sandbox", "--port", str(free_port())],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self._out,
            text=True,
            start_new_session=True,
        )

    def wait_for_banner(self) -> str:
        assert self.process.stdout is not None
        seen = ""
        for line in self.process.stdout:  # ends when the sandbox exits
            seen += line
            if "The proxy's configuration is" in line:
                return seen
        pytest.fail(f"no banner; stdout:\n{seen}\nstderr:\n{self.log.read_text()}")

    def proxy_pid(self) -> int:
        """The ``serve`` process the sandbox started."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        for pid in children.read_text().split():
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"serve" in command and b"proxy" in command:
                return int(pid)
        pytest.fail("no serve process among the sandbox's children")

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        assert self.process.stdout is not None
        self.process.stdout.close()
        self._out.close()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    run = Running(tmp_path / "sandbox.log")
    yield run
    run.close()


def test_ctrl_c_stops_the_sandbox_cleanly(running: Running) -> None:
    banner = running.wait_for_banner()
    assert "xoauth2-proxy sandbox is running" in banner
    os.killpg(running.process.pid, signal.SIGINT)  # what Ctrl-C on its terminal sends
    assert running.process.wait(60) == 0, running.log.read_text()
    assert "sandbox stopped" in running.log.read_text()


def test_the_sandbox_fails_when_the_proxy_dies(running: Running) -> None:
    running.wait_for_banner()
    os.kill(running.proxy_pid(), signal.SIGKILL)
    assert running.process.wait(60) == 1
    assert "sandbox: the proxy stopped on its own with status -9" in running.log.read_text()
