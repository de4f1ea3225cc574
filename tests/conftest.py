"""Rules for the whole suite: a skipped test fails the run.

A test that skips because something is missing (redis-server, a Debian package) hides a
feature nobody tested; CI installs everything the tests need, so there is nothing to skip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    skipped = reporter.stats.get("skipped", [])
    if skipped and exitstatus == 0:
        reporter.write_sep("=", f"{len(skipped)} tests skipped: the run fails", red=True)
        session.exitstatus = 1
