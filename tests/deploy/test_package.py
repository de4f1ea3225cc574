"""The package as users get it: a wheel and an sdist built from a clean copy of the
sources, the wheel installed into a fresh virtual environment (no test tools, not the
source tree), and its ``xoauth2-proxy`` run there."""

from __future__ import annotations

import email.parser
import json
import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from typing import TYPE_CHECKING

import pytest

from proxy.identities import hash_password
from tests.support.sources import ROOT, copy_sources

if TYPE_CHECKING:
    from pathlib import Path

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
NAME = PYPROJECT["project"]["name"]
VERSION = PYPROJECT["project"]["version"]
TEST_TOOLS = {"pytest", "pytest-trio", "hypothesis", "trustme", "mypy", "ruff", "build"}


def run(command: list[str | Path], cwd: Path, timeout: float = 600) -> str:
    done = subprocess.run(
        command,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
    )
    assert done.returncode == 0, f"{command}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist, and the wheel built from it (python -m build's default), of a copy."""
    work = tmp_path_factory.mktemp("package")
    source = copy_sources(work / "source")
    out = work / "dist"
    run([sys.executable, "-m", "build", "--outdir", out, source], work)
    return out


def test_wheel_holds_the_packages_license_and_no_tests(dist: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    assert wheel.name == f"{NAME.replace('-', '_')}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = f"{NAME.replace('-', '_')}-{VERSION}.dist-info"
        metadata = email.parser.Parser().parsestr(archive.read(f"{info}/METADATA").decode())
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    assert {name.split("/")[0] for name in names} == {"broker", "proxy", info}
    assert "proxy/py.typed" in names
    assert "broker/py.typed" in names
    assert any(name.startswith(info) and name.endswith("/LICENSE") for name in names), names
    assert metadata["License"] == "Apache-2.0"
    assert metadata["Requires-Python"] == ">=3.11"
    runtime = [r for r in metadata.get_all("Requires-Dist", []) if "extra ==" not in r]
    assert {r.split(">")[0].split("=")[0].strip() for r in runtime} == {
        dependency.split(">")[0] for dependency in PYPROJECT["project"]["dependencies"]
    }
    assert "xoauth2-proxy = proxy.cli:main" in entry_points


def test_sdist_builds_everything(dist: Path) -> None:
    (sdist,) = dist.glob("*.tar.gz")
    top = f"{NAME.replace('-', '_')}-{VERSION}"
    with tarfile.open(sdist) as archive:
        names = set(archive.getnames())
    for needed in ("LICENSE", "README.md", "pyproject.toml", "proxy/cli.py", "broker/source.py"):
        assert f"{top}/{needed}" in names
    # The wheel above was built from this sdist, so nothing the package needs is missing.


def test_wheel_in_a_fresh_venv_runs_without_test_tools(dist: Path, tmp_path: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], tmp_path)
    run([venv / "bin" / "python", "-m", "pip", "install", "-q", wheel], tmp_path)

    installed = json.loads(run([venv / "bin" / "pip", "list", "--format=json"], tmp_path))
    names = {package["name"].lower() for package in installed}
    assert NAME in names
    assert not names & TEST_TOOLS, names & TEST_TOOLS
    # The code run is the installed one, not this checkout's.
    where = run([venv / "bin" / "python", "-c", "import proxy; print(proxy.__file__)"], tmp_path)
    assert where.startswith(str(venv)), where

    command = venv / "bin" / "xoauth2-proxy"
    assert run([command, "--version"], tmp_path) == f"xoauth2-proxy {VERSION}\n"
    config = tmp_path / "config.toml"
    config.write_text(f"""
[apps.contoso]
provider = "microsoft"
tenant = "contoso.onmicrosoft.com"
client_id = "11111111-2222-3333-4444-555555555555"
client_secret = {{ file = "secret" }}

[[listeners]]
protocol = "imap"
listen = "127.0.0.1:1993"
tls = "none"
upstream = "outlook.office365.com:993"
upstream_tls = "implicit"

[users."reports@contoso.com"]
password_hash = "{hash_password("pw")}"
app = "contoso"
""")
    config.chmod(0o600)
    (tmp_path / "secret").write_text("s3cret\n")
    (tmp_path / "secret").chmod(0o600)
    assert run([command, "check", "-c", config], tmp_path) == (
        f"{config}: OK (1 apps, 1 listeners, 1 users)\n"
    )
