"""A clean copy of the sources, as a fresh clone has them (for builds that must not see
.venv, caches or build output)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

__all__ = ["ROOT", "copy_sources"]

ROOT = Path(__file__).resolve().parents[2]


def copy_sources(destination: Path) -> Path:
    """Copy the files git knows (committed or not, none that it ignores) to ``destination``."""
    listed = subprocess.run(
        # safe.directory: root reading a clone that another user owns (git refuses otherwise).
        [
            *("git", "-c", f"safe.directory={ROOT}", "ls-files", "-z"),
            *("--cached", "--others", "--exclude-standard"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for name in listed.split("\0"):
        if name and (ROOT / name).is_file():  # a file deleted but not yet committed is not
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    return destination
