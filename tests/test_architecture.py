"""ARCHITECTURE.md stays a true map: the paths it names exist, and the code cites it (or
itself), not a design document that is not in the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_path_the_map_names_exists() -> None:
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    paths = set(re.findall(r"`((?:proxy|broker|tests|deploy)/[\w./]*)`", text))
    assert len(paths) > 20
    assert sorted(p for p in paths if not (ROOT / p).exists()) == []


def test_nothing_cites_a_document_outside_the_repository() -> None:
    cited = [
        str(path.relative_to(ROOT))
        for pattern in ("**/*.py", "**/*.md", "**/*.toml", "**/*.sh")
        for path in ROOT.glob(pattern)
        if ".git" not in path.parts and "DESIGN" + ".md" in path.read_text(encoding="utf-8")
    ]
    assert cited == []
