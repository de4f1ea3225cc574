"""proxy.protocol must stay sans-I/O: importing it pulls in no trio, socket, ssl or logging."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_protocol_package_imports_no_io_modules() -> None:
    modules = sorted(
        f"proxy.protocol.{p.stem}"
        for p in (ROOT / "proxy" / "protocol").glob("*.py")
        if p.stem != "__init__"
    )
    assert "proxy.protocol.framing" in modules
    script = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(','.join(sorted({'trio', 'socket', 'ssl', 'logging'} & set(sys.modules))))\n"
    )
    # Without coverage measurement, which would import modules of its own first.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_PROCESS")}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    assert result.stdout.strip() == ""
