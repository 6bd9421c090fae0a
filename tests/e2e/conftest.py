from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# gpu_health_stack is repository tooling, not part of the installed distribution.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# What the end-to-end run measured (fault -> cordon, ...): printed as the steps run (with -s) and again in the
# terminal summary, so that `make test` and CI show it without -s.
_REPORT: list[str] = []


@pytest.fixture(scope="session")
def report() -> Callable[[str], None]:
    def add(line: str) -> None:
        _REPORT.append(line)
        print(f"\n{line}")

    return add


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _REPORT:
        terminalreporter.write_sep("-", "gpu-health end to end (tests/e2e)")
        for line in _REPORT:
            terminalreporter.write_line(line)
