"""What the end-to-end run measured (fault -> cordon, ...): printed as the steps run (with -s) and again in the
terminal summary, so that `make test` and CI show it without -s. Under pytest-xdist (`make test` runs two workers)
each worker hands its lines to the controller, which prints them all."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

_KEY = "gpu_health_e2e_report"
_REPORT: list[str] = []


@pytest.fixture(scope="session")
def report() -> Callable[[str], None]:
    def add(line: str) -> None:
        _REPORT.append(line)
        print(f"\n{line}")

    return add


def pytest_sessionfinish(session: pytest.Session) -> None:
    output = getattr(session.config, "workeroutput", None)  # set on an xdist worker only
    if output is not None:
        output[_KEY] = list(_REPORT)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    _REPORT.extend(getattr(node, "workeroutput", {}).get(_KEY, []))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _REPORT:
        terminalreporter.write_sep("-", "gpu-health end to end (tests/e2e)")
        for line in _REPORT:
            terminalreporter.write_line(line)
