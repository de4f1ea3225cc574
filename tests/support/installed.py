"""Where the package under test put its command."""

from __future__ import annotations

import sysconfig
from pathlib import Path

__all__ = ["proxy_command"]


def proxy_command() -> Path:
    """The ``xoauth2-proxy`` script beside the interpreter running the tests (``.venv/bin``
    for README's commands, whether or not that directory is on PATH)."""
    path = Path(sysconfig.get_path("scripts")) / "xoauth2-proxy"
    assert path.is_file(), f"{path}: the package is not installed in this environment"
    return path
