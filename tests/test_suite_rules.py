"""The suite's own rules hold: a skipped test fails the run."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py").read_text()


@pytest.mark.parametrize(("body", "status"), [("pytest.skip('missing')", 1), ("pass", 0)])
def test_a_skip_fails_the_run(pytester: pytest.Pytester, body: str, status: int) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(f"import pytest\n\ndef test_it() -> None:\n    {body}\n")
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    assert result.ret == status
    if status:
        result.stdout.fnmatch_lines(["*1 tests skipped: the run fails*"])
