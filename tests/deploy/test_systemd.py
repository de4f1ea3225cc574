"""deploy/systemd's unit, read by systemd's own tools: ``systemd-analyze verify`` accepts it
without a warning (every key known, every value valid, the executables present), and the
stop timeout leaves room for ``serve``'s drain time. The unit is started for real by
systemd (PID 1 in a container) in tests/e2e/test_container.py. ``Type=notify``: serve
says READY=1 once its listeners are open, so systemd knows it listens.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from proxy.cli import _parser
from tests.support.installed import proxy_command

UNIT = Path(__file__).parents[2] / "deploy" / "systemd" / "xoauth2-proxy.service"


def test_systemd_unit_verifies_without_warnings(tmp_path: Path) -> None:
    """systemd-analyze reports unknown keys and bad values only as warnings: any output is
    a mistake in the unit. The executable is pointed at where pip put it here."""
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/xoauth2-proxy", str(proxy_command())))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ""


def test_stop_timeout_covers_the_drain() -> None:
    """systemd kills what is left after TimeoutStopSec: sessions need serve's --grace first."""
    found = re.search(r"^TimeoutStopSec=(\d+)$", UNIT.read_text(), re.MULTILINE)
    assert found is not None
    grace = _parser().parse_args(["serve"]).grace
    assert int(found.group(1)) >= grace + 10
