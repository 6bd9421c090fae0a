"""promtool checks every rule file and runs every unit test in rules/tests/ (the policy's executable spec)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
RULES = ROOT / "rules"
RULE_FILES = sorted(RULES.glob("*.rules.yaml")) + sorted(RULES.glob("*.alerts.yaml"))
TEST_FILES = sorted((RULES / "tests").glob("*.test.yaml"))
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found: install Debian's `prometheus` package (.ci/run does) to check and test the rules",
)


def _promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_there_are_rules_and_tests() -> None:
    assert len(RULE_FILES) >= 8 and len(TEST_FILES) >= 8


@pytest.mark.parametrize("path", RULE_FILES, ids=[p.name for p in RULE_FILES])
def test_check_rules(path: Path) -> None:
    result = _promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", TEST_FILES, ids=[p.name for p in TEST_FILES])
def test_unit_tests(path: Path) -> None:
    result = _promtool("test", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_wrong_expectation_fails() -> None:
    """The harness really compares: a unit test expecting the wrong remediation must fail."""
    broken = (RULES / "tests" / "availability.test.yaml").read_text(encoding="utf-8")
    broken = broken.replace("remediation: reboot, component: availability, node: n1}",
                            "remediation: reset_gpu, component: availability, node: n1}", 1)
    tmp = RULES / "tests" / ".broken-availability.test.yaml"
    try:
        tmp.write_text(broken, encoding="utf-8")
        result = _promtool("test", "rules", tmp)
    finally:
        tmp.unlink(missing_ok=True)
    assert result.returncode != 0
    assert "GPUDevicesMissing" in result.stdout + result.stderr
