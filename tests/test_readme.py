"""The README's tables are the reference operators read; they must match what the exporter really does."""

from __future__ import annotations

import re
from pathlib import Path

from exporter.config import build_parser
from exporter.registry import discover

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def _first_column(prefix: str) -> set[str]:
    return set(re.findall(rf"^\| `({prefix}[^`]*)` \|", README, re.M))


# Documented families no golden run can show, each with the test that does show it.
NOT_IN_GOLDEN = {
    # Needs NVML's event stream and the 10 s de-duplication window: tests/xid/test_xid_nvml_events.py.
    "gpu_xid_nvml_events_total",
}


def test_every_emitted_family_is_documented_and_nothing_else() -> None:
    emitted: set[str] = set(NOT_IN_GOLDEN)
    for golden in [*(ROOT / "tests" / "golden").glob("*.prom"), ROOT / "tests" / "dcgm" / "golden-dcgm.prom"]:
        emitted |= set(re.findall(r"^# TYPE (\S+)", golden.read_text(), re.M))
    documented = _first_column("gpu_")
    assert emitted, "no golden files found"
    assert emitted - documented == set(), "emitted but not in README"
    assert documented - emitted == set(), "in README but never emitted by the golden runs"


def test_every_flag_is_documented() -> None:
    parser = build_parser(discover())
    flags = {
        s for action in parser._actions for s in action.option_strings
        if s.startswith("--") and s != "--help" and not s.startswith(("--collector.", "--no-collector."))
    }
    flags.add("--collector.disable-defaults")
    missing = {f for f in flags if f"`{f}`" not in README}
    assert missing == set()


def test_collector_table_lists_exactly_the_registered_collectors() -> None:
    names = set(re.findall(r"^\| `([a-z_]+)` \| (?:fast|slow|node) \|", README, re.M))
    assert names == set(discover())
