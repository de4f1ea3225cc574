"""The deployment files in deploy/ are valid for the tools that read them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

UNIT = Path(__file__).parents[2] / "deploy" / "systemd" / "xoauth2-proxy.service"


def test_systemd_unit_verifies_without_warnings(tmp_path: Path) -> None:
    """systemd-analyze reports unknown keys and bad values only as warnings: any output is
    a mistake in the unit. The executable is pointed at where pip put it here."""
    executable = shutil.which("xoauth2-proxy")
    assert executable is not None, "the package is not installed"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/xoauth2-proxy", executable))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ""
