"""The command line as an operator meets it: check, serve's refusal, hash-password."""

from __future__ import annotations

import base64
import os
import pty
import re
import shutil
import subprocess
import time
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from proxy.cli import EXIT_CONFIG, main
from proxy.identities import HashParameters, hash_password
from tests.support.certs import TestPki
from tests.support.installed import proxy_command

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

HASH = hash_password("s3cret", HashParameters(memory_cost=64, iterations=1, lanes=1))
PHC = re.compile(r"^\$argon2id\$v=19\$m=(\d+),t=(\d+),p=(\d+)\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+$")


def config_file(tmp_path: Path, *, cache: str = "", certificate: str = "") -> Path:
    (tmp_path / "secret").write_text("s3cret")
    (tmp_path / "secret").chmod(0o600)
    credential = (
        f'certificate = {{ file = "{certificate}" }}'
        if certificate
        else ('client_secret = { file = "secret" }')
    )
    path = tmp_path / "config.toml"
    path.write_text(f"""
[apps.contoso]
provider = "microsoft"
tenant = "contoso.onmicrosoft.com"
client_id = "11111111-2222-3333-4444-555555555555"
{credential}

[[listeners]]
protocol = "imap"
listen = "127.0.0.1:1993"
tls = "none"
upstream = "outlook.office365.com:993"
upstream_tls = "implicit"

[users."reports@contoso.com"]
password_hash = "{HASH}"
app = "contoso"
{cache}
""")
    path.chmod(0o600)
    return path


def test_check_accepts_a_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = config_file(tmp_path)
    assert main(["check", "-c", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{path}: OK (1 apps, 1 listeners, 1 users)"
    assert "error" not in err


def test_check_names_file_and_key_for_what_only_building_finds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A problem found only when the providers are built, not when the file is parsed (an
    EC certificate, which Entra refuses), is reported in the same FILE: KEY: text form."""
    certificate = TestPki(tmp_path / "pki").issue("app", "app.contoso.com")  # an EC key
    shutil.copy(certificate, tmp_path / "app.pem")
    path = config_file(tmp_path, certificate="app.pem")
    assert main(["check", "-c", str(path)]) == EXIT_CONFIG
    problems = [line for line in capsys.readouterr().err.splitlines() if "warning" not in line]
    assert problems == [
        f"{path}: apps.contoso: app 'contoso': certificate (file {tmp_path / 'app.pem'}) "
        "holds a key that is not RSA (ECPrivateKey); Entra accepts only RSA "
        "certificates for client assertions"
    ]


def test_serve_refuses_an_invalid_file_with_the_same_messages(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config_file(tmp_path)
    path.write_text(path.read_text().replace('app = "contoso"', 'app = "fabrikam"'))
    assert main(["check", "-c", str(path)]) == EXIT_CONFIG
    checked = capsys.readouterr().err
    assert main(["serve", "-c", str(path)]) == EXIT_CONFIG
    assert capsys.readouterr().err == checked
    assert f'{path}: users."reports@contoso.com".app: ' in checked


def b64decode(text: str) -> bytes:
    """PHC strings leave out base64 padding."""
    return base64.b64decode(text + "=" * (-len(text) % 4))


def verifies(phc: str, password: str) -> bool:
    """Check a PHC string from hash-password independently of the proxy's own code."""
    match = PHC.match(phc)
    assert match, phc
    memory, iterations, lanes = map(int, match.groups())
    salt, digest = (b64decode(part) for part in phc.split("$")[4:])
    kdf = Argon2id(
        salt=salt, length=len(digest), iterations=iterations, lanes=lanes, memory_cost=memory
    )
    try:
        kdf.verify(password.encode(), digest)
    except InvalidKey:
        return False
    return True


def hash_password_command(stdin: str) -> subprocess.CompletedProcess[str]:
    executable = str(proxy_command())
    return subprocess.run(
        [executable, "hash-password"], input=stdin, capture_output=True, text=True, timeout=60
    )


def test_hash_password_from_a_pipe() -> None:
    done = hash_password_command("pipe pass\n")
    assert done.returncode == 0, done.stderr
    phc = done.stdout.strip()
    assert verifies(phc, "pipe pass")
    assert not verifies(phc, "pipe pass\n")
    assert PHC.match(phc).groups() == ("65536", "3", "4")  # type: ignore[union-attr]
    assert hash_password_command("\n").returncode == 1  # empty: refused


def test_hash_password_prompts_without_echo_on_a_terminal() -> None:
    executable = str(proxy_command())
    pid, fd = pty.fork()
    if pid == 0:  # the child, on the terminal
        os.execv(executable, [executable, "hash-password"])
    output = b""

    def read_until(marker: bytes | None) -> None:
        """Read what the child writes until ``marker``, or with ``None`` until it exits."""
        nonlocal output
        deadline = time.monotonic() + 30
        while (marker is None or marker not in output) and time.monotonic() < deadline:
            try:
                chunk = os.read(fd, 1024)
            except OSError:  # EIO: the child has exited
                return
            if not chunk:
                return
            output += chunk

    try:
        read_until(b"Password: ")
        os.write(fd, b"typed secret\n")
        read_until(b"Again: ")
        os.write(fd, b"typed secret\n")
        read_until(None)
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert b"typed secret" not in output  # never echoed
    phc = output[output.index(b"$argon2id$") :].split()[0].decode()
    assert verifies(phc, "typed secret")
