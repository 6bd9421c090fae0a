"""gpu_health_stack/rule_windows.py: which series each rule reads, and how far into the past.

The backfill writes history for what this finds, so a selector it misreads is history missing from the rule cost
measurement (or a label name backfilled as a metric). Checked against hand-worked expressions and, for every rule
in rules/, against the metric names the contract test's tokenizer finds (tools/dashboard_queries.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tools.dashboard_queries import metric_names

from gpu_health_stack.rule_windows import (
    Need,
    duration,
    long_window_reads,
    matchers,
    plan_history,
    reads,
    rule_files,
    rules,
    selectors,
    selects,
)

H, D = 3600.0, 86400.0


@pytest.mark.parametrize(("expr", "want"), [
    ("max_over_time(x[1d])", [("x", D)]),
    ('rate(x{a="[1d]", b=~"}{"}[5m] offset 1h)', [("x", 300 + H)]),
    ("x offset 1h30m", [("x", 1.5 * H)]),
    ("x offset -5m", [("x", -300)]),
    ("max_over_time(rate(x[5m])[1d:1h])", [("x", D + 300)]),
    ("max_over_time((x + y offset 1h)[2h:5m] offset 1h)", [("x", 3 * H), ("y", 4 * H)]),
    ("sum by (node, gpu) (x) / on(node) group_left(uuid) y", [("x", 0), ("y", 0)]),
    ("sum(x) without (job) > bool 3 unless ignoring (pod) z @ start()", [("x", 0), ("z", 0)]),
    ('label_replace(x, "policy", "none", "", "") or vector(1) and time() - x:y:z > 30 * 86400',
     [("x", 0), ("x:y:z", 0)]),
    ('{__name__="x", job="j"}[2h]', [("x", 2 * H)]),
    ("count(x > 0.5e3 and inf > y)", [("x", 0), ("y", 0)]),
])
def test_selectors_and_how_far_they_reach(expr: str, want: list[tuple[str, float]]) -> None:
    assert [(s.name, s.reach) for s in selectors(expr)] == want


def test_durations() -> None:
    assert duration("1h30m") == 5400 and duration("100ms") == 0.1 and duration("7d") == 7 * D
    with pytest.raises(ValueError):
        duration("5 m")


@pytest.mark.parametrize("rule", [r for _, r in rules(rule_files())], ids=lambda r: r.get("record") or r["alert"])
def test_the_same_names_as_the_contract_tokenizer(rule: dict) -> None:
    assert {s.name for s in selectors(rule["expr"])} == metric_names(rule["expr"])


def test_the_long_windows_of_rules() -> None:
    found = {(r.name, r.reach, r.rule) for r in long_window_reads(rule_files())}
    # A few that must be there (a new long-window rule adds to these, it must not take them away).
    assert ("up", 6 * H, "GPUExporterMissing") in found
    assert ("node_gpu:gpu_nvlink_links_up:max_over_time1h", D, "node_gpu:gpu_nvlink_links_up:max_over_time1d") in found
    assert all(reach >= H for _, reach, _ in found)
    # Short windows are not in it: GPUClockSlowdown's 15m, a 5m rate.
    assert not {rule for _, _, rule in found} & {"GPUClockSlowdown", "GPUPCIeReplayRateHigh"}
    assert len(reads(rule_files())) > len(found)


def test_the_nvlink_day_is_read_from_hourly_records() -> None:
    plan = plan_history(rule_files())
    # The down-links rule reads the day record over its last 30 minutes: a record of the past made every 5
    # minutes, so planned although the read is short (else a Prometheus started on the backfill forgets the day
    # until the group first runs) ...
    assert plan.recorded["node_gpu:gpu_nvlink_links_up:max_over_time1d"] == Need(1800, 300)
    # ... the day record reads the hourly record over the day, every hour (its group's interval) ...
    assert plan.recorded["node_gpu:gpu_nvlink_links_up:max_over_time1h"] == Need(D + 1800, 3600, whole=True)
    # ... and the 5-minute record over the last 70 minutes every 5 minutes, and over the day twice an hour,
    # enough for the hourly record's [1h] windows to be computed from it.
    five = plan.recorded["node_gpu:gpu_nvlink_links_up:max_over_time10m"]
    assert five == Need(D + H + 1800, 300, whole=True)
    assert sorted(five.grids) == [(H + 600, 300), (D + H + 1800, 1800)]
    # Its input, dense enough for the record's 10-minute windows (and not a 15 s scrape's 5,760 a day), and only
    # over that span: no rule reads it further back itself.
    assert plan.raw["gpu_nvlink_links_up"] == Need(D + H + 2400, 300, whole=False)
    assert plan.raw["up"] == Need(6 * H, 15, whole=True)
    # A slow record of the recent past builds up again by itself: the thermal minutes are not planned.
    assert "node_gpu_reason:gpu_clock_event_reason_active:avg_over_time1m" not in plan.recorded


def test_recorded_series_read_over_long_windows_are_planned_in_order(tmp_path: Path) -> None:
    (tmp_path / "a.rules.yaml").write_text("""
groups:
  - name: a
    rules:
      - record: node:b:max
        expr: max by (node) (node:c:sum) or node:b:max
      - record: node:c:sum
        expr: sum by (node) (c) + 0 * max by (node) (up[5m])
      - record: node:unread:sum
        expr: sum by (node) (unread)
""")
    (tmp_path / "a.alerts.yaml").write_text("""
groups:
  - name: a.alerts
    rules:
      - alert: A
        expr: max_over_time(node:b:max[7d]) > 1 or max_over_time(d[2h]) or e[30m]
""")
    plan = plan_history(rule_files(tmp_path), scrape_interval=15, evaluation_interval=60)
    # node:b:max reads node:c:sum, so node:c:sum is computed first; node:b:max latching itself is no cycle.
    assert [[r["record"] for r in level] for level in plan.levels] == [["node:c:sum"], ["node:b:max"]]
    assert set(plan.raw) == {"c", "up", "d"}
    # As densely as Prometheus holds them, within what reads them: node:b:max for 7 days at the evaluation
    # interval, d for 2 hours at the scrape interval. node:c:sum over the same 7 days, to compute node:b:max from,
    # and so what it reads; an instant read needs no density (the lookback finds the last sample).
    assert plan.recorded["node:b:max"] == Need(7 * D, 60, whole=True)
    assert plan.raw["d"] == Need(2 * H, 15, whole=True)
    assert plan.recorded["node:c:sum"] == Need(7 * D) and plan.raw["c"] == Need(7 * D)
    assert plan.raw["up"] == Need(7 * D + 300, 150)  # read over [5m]: a sample at least every 150 s
    (tmp_path / "b.rules.yaml").write_text("""
groups:
  - name: b
    rules:
      - record: node:c:sum
        expr: node:b:max
""")
    with pytest.raises(ValueError, match="cycle"):
        plan_history(rule_files(tmp_path))


def test_matchers_select_as_promql_does() -> None:
    wanted = matchers('{__name__="x", job=~".*gpu-health-exporter.*", counter!="replay", kind!~"a|b", d="q\\"x"}')
    assert wanted == (("job", "=~", ".*gpu-health-exporter.*"), ("counter", "!=", "replay"), ("kind", "!~", "a|b"),
                      ("d", "=", 'q"x'))
    base = {"job": "monitoring/gpu-health-exporter", "counter": "crc", "d": 'q"x'}
    assert selects(wanted, base)
    assert not selects(wanted, {**base, "kind": "a"})  # anchored: "a" is matched whole
    assert selects(wanted, {**base, "kind": "ab"})
    assert not selects(wanted, {**base, "job": "node"}) and not selects(wanted, {**base, "counter": "replay"})
    assert not selects((("x", "=", "1"),), {})  # a missing label is ""
    assert selects((("x", "!=", "1"),), {})


def test_shorter_windows_when_asked_and_only_the_series_the_selectors_read() -> None:
    assert "gpu_clock_event_reason_active" not in plan_history(rule_files()).raw
    plan = plan_history(rule_files(), min_reach=300)
    # GPUClockSlowdown reads 15 minutes of the per-minute thermal record; that record reads [1m] of the raw
    # reasons: over those 16 minutes, every 30 s, only over themselves.
    assert plan.recorded["node_gpu_reason:gpu_clock_event_reason_active:avg_over_time1m"] == Need(15 * 60, 60)
    clocks = plan.raw["gpu_clock_event_reason_active"]
    assert clocks == Need(16 * 60, 30, whole=False)
    assert clocks.selects({"reason": "hw_slowdown"}) and not clocks.selects({"reason": "gpu_idle"})
    assert plan.raw["up"].selects({"job": "gpu-health-exporter"}) and not plan.raw["up"].selects({"job": "node"})
    assert plan.raw["gpu_nvlink_links_up"].only is None  # read without matchers: every series
    # Each reader's density over its own span: the records' day (and 100 minutes) every 5 minutes, the rule's own
    # 10 minutes every scrape; not a day every scrape (46 million samples at 1,000 nodes).
    assert sorted(plan.raw["gpu_nvlink_links_up"].grids) == [(600, 15), (D + H + 2400, 300)]
