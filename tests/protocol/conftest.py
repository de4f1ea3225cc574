"""At the end of a run that fuzzed the login machines: how many examples reached each state."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    fuzz = sys.modules.get("tests.protocol.test_fuzz")
    reached = getattr(fuzz, "REACHED", None)
    if not reached:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fuzzing: examples that reached each state")
    for protocol in sorted({protocol for protocol, _, _ in reached}):
        for side in ("client", "upstream"):
            counts = sorted(
                ((state, n) for (p, s, state), n in reached.items() if (p, s) == (protocol, side)),
                key=lambda item: -item[1],
            )
            write(f"{protocol} {side:8} " + ", ".join(f"{state} {n}" for state, n in counts))
