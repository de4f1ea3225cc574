"""``xoauth2-proxy app-key``: a fresh key, and the hash line that matches it."""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING

from proxy.cli import main

if TYPE_CHECKING:
    import pytest


def test_app_key_prints_a_new_key_and_its_hash(capsys: pytest.CaptureFixture[str]) -> None:
    keys = []
    for _ in range(2):
        assert main(["app-key"]) == 0
        out = capsys.readouterr().out
        found = re.fullmatch(
            r'app key \(.*\): (xo2k_[A-Za-z0-9_-]{43})\n.*app_key_hash = "sha256:([0-9a-f]{64})"\n',
            out,
        )
        assert found is not None, out
        key, digest = found.groups()
        assert hashlib.sha256(key.encode()).hexdigest() == digest
        keys.append(key)
    assert keys[0] != keys[1]
