"""gpu_health_stack/backfill.py on the real tools: promtool turns a fleet's past series into blocks, and Debian's
Prometheus, started on them, answers the long-window queries the rules make (issue 16: rule cost with history).

The history must be the past of the very series the live scrape writes (the same labels), recorded series read
over long windows included (computed by Prometheus from the backfilled inputs), else the rules read beside it
instead of through it."""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_health_stack.backfill import (
    backfill,
    backfill_rule_history,
    fleet_series,
    openmetrics,
    sample_times,
)
from gpu_health_stack.fleetsim import FleetSim, FleetTimings
from gpu_health_stack.procs import Proc, free_port, http_get, wait_until
from gpu_health_stack.stack import PROMETHEUS, Stack, missing_binaries

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(bool(missing_binaries()), reason=f"needs {missing_binaries()} (.ci/run installs them)")]
ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = (ROOT / "tests" / "golden" / "h100x8-healthy.prom").read_text()


def test_the_fleets_history_is_there_for_the_long_windows(tmp_path: Path) -> None:
    now = time.time()
    nodes = ["node-0", "node-1", "node-2"]
    series = fleet_series(TEMPLATE, nodes, {"gpu_nvlink_links_up"},
                          extra={"job": "gpu-health-exporter", "instance": "sim"})
    assert len(series) == 3 * 8
    start, end, step = now - 2 * 86400, now - 600, 3600.0
    data = backfill(series, start=start, end=end, step=step, out=tmp_path / "data")
    assert list(data.iterdir()), "no block written"

    port = free_port()
    (tmp_path / "prometheus.yml").write_text("global:\n  evaluation_interval: 15s\n")
    prom = Proc("prometheus", [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                               f"--storage.tsdb.path={data}", f"--web.listen-address=127.0.0.1:{port}"], tmp_path)
    try:
        prom.wait_http(f"http://127.0.0.1:{port}/-/ready")

        def query(expr: str) -> list[dict]:
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr, "time": end})
            return list(json.loads(http_get(url, timeout=10))["data"]["result"])

        # What GPUNVLinkDown's recording rule reads: a day of every GPU's link count.
        assert len(query("max by (node, gpu) (max_over_time(gpu_nvlink_links_up[1d]))")) == 24
        (points,) = query('count_over_time(gpu_nvlink_links_up{node="node-1", gpu="0"}[2d])')
        assert int(float(points["value"][1])) == int((end - start) // step) + 1
        assert {r["metric"]["job"] for r in query("last_over_time(gpu_nvlink_links_up[2h])")} == {"gpu-health-exporter"}
    finally:
        prom.stop()


def test_openmetrics_text_is_time_ordered_and_escaped() -> None:
    series = fleet_series(TEMPLATE, ['a"b'], {"gpu_nvlink_links_up"})[:2]
    lines = "".join(openmetrics(series, 0, 120, 60)).splitlines(keepends=True)
    assert lines[-1] == "# EOF\n" and len(lines) == 2 * 3 + 1
    assert [float(x.split()[-1]) for x in lines[:-1]] == [0, 0, 60, 60, 120, 120]
    assert 'node="a\\"b"' in lines[0]
    with pytest.raises(ValueError, match="not in the template"):
        fleet_series(TEMPLATE, ["n"], {"no_such_metric"})


def test_sample_times_share_the_fine_grid_near_the_end() -> None:
    times = sample_times(0, 3600, 900, fine=[(600, 300), (60, 30)])
    assert times == [0, 900, 1800, 2700, 3000, 3300, 3540, 3570, 3600]


class Prom:
    """Debian's Prometheus, alone on a data directory, queried at a fixed time."""

    def __init__(self, data: Path, home: Path) -> None:
        self.port = free_port()
        (home / "prometheus.yml").write_text("global: {}\n")
        self.proc = Proc("prometheus", [PROMETHEUS, f"--config.file={home / 'prometheus.yml'}",
                                        f"--storage.tsdb.path={data}", f"--web.listen-address=127.0.0.1:{self.port}"],
                         home)
        self.proc.wait_http(f"http://127.0.0.1:{self.port}/-/ready")

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr, "time": at})
        return list(json.loads(http_get(url, timeout=10))["data"]["result"])


def test_recorded_series_read_over_long_windows_are_computed_level_by_level(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "t.rules.yaml").write_text("""
groups:
  - name: t.rules
    interval: 1h
    rules:
      - record: node:gpu_nvlink_links_up:sum
        expr: sum by (node) (gpu_nvlink_links_up)
      - record: node:gpu_nvlink_links_up:max
        expr: max by (node) (node:gpu_nvlink_links_up:sum) + 0 * max by (node) (up)
""")
    (rules / "t.alerts.yaml").write_text("""
groups:
  - name: t.alerts
    rules:
      - alert: T
        expr: max_over_time(node:gpu_nvlink_links_up:max[7d]) < 100 or gpu_remediation_webhook_alerts_total[2h]
""")
    end = time.time() - 600
    done = backfill_rule_history(tmp_path / "data", TEMPLATE, ["node-0", "node-1"], files=sorted(rules.iterdir()),
                                 days=7, step=3600, end=end)
    assert done["recorded"] == ["node:gpu_nvlink_links_up:max", "node:gpu_nvlink_links_up:sum"]
    assert done["names"] == ["gpu_nvlink_links_up", "up"] and list(done["skipped"]) == [
        "gpu_remediation_webhook_alerts_total"]
    assert done["blocks"] == 1  # one set of blocks: nothing overlapping for Prometheus to compact at its start
    # The second level was read over [7d] in a group evaluated hourly: hourly, over the whole week.
    assert done["fine"] == {}
    prom = Prom(tmp_path / "data", tmp_path)
    try:
        # 8 GPUs of 18 links, computed by Prometheus from the backfilled inputs, through both levels.
        got = prom.query("max_over_time(node:gpu_nvlink_links_up:max[7d])", end)
        assert sorted((r["metric"]["node"], r["value"][1]) for r in got) == [("node-0", "144"), ("node-1", "144")]
        (count,) = prom.query('count_over_time(node:gpu_nvlink_links_up:max{node="node-1"}[7d])', end)
        assert count["value"][1] == str(7 * 24 + 1)
        assert {r["metric"]["job"] for r in prom.query("up[1h]", end)} == {"gpu-health-exporter"}
    finally:
        prom.proc.stop()


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[Stack, FleetSim, float]]:
    """Two simulated nodes under rules/ at 1 s, started on a week of their own history: fleet-0001 has had all
    NVLink links of GPU 3 up until 20 minutes ago, and one down since (the simulator's fault)."""
    with Stack() as stack:
        fleet = FleetSim(stack.dir / "fleetsim", FleetTimings(collect_interval="1s", slow_interval="2s",
                                                             collect_timeout="500ms"))
        stack.closers.append(fleet)
        fleet.start()
        fleet.add_node("fleet-0000")
        fleet.add_node("fleet-0001", {"gpus": 8, "faults": [{"kind": "nvlink_down", "gpu": 3, "link": 5}]})
        fleet.attach(stack)

        def past(node: str) -> str:  # what the node served until 20 minutes ago: every link up
            body = http_get(fleet.node_url(node)).decode()
            return re.sub(r"^(gpu_nvlink_links_up\{[^}]*\}) \S+$", r"\1 18.0", body, flags=re.M)

        # Ending 20 minutes ago: the rule's look at the last 10 minutes of raw samples cannot see the week.
        end = time.time() - 1200
        done = backfill_rule_history(stack.dir / "prom-data", past, sorted(fleet.nodes), days=7, end=end)
        assert done["names"] == ["gpu_nvlink_links_up", "up"]
        assert "node_gpu:gpu_nvlink_links_up:max_over_time10m" in done["recorded"]
        stack.start_prometheus()
        yield stack, fleet, end


def _labels(results: list[dict[str, Any]]) -> list[dict[str, str]]:
    return sorted(({k: v for k, v in r["metric"].items() if k != "__name__"} for r in results), key=str)


def test_the_history_is_the_past_of_the_scraped_series(live: tuple[Stack, FleetSim, float]) -> None:
    stack, _, end = live
    now = stack.query_series('gpu_nvlink_links_up{job="gpu-health-exporter"}')
    assert len(now) == 16
    # Ending before Prometheus started, under exactly the labels the scrape gives them: `up`, which a rule reads
    # 6 hours back, over the whole week; the NVLink counts, which only their 5-minute record reads, every 5
    # minutes over the day and 100 minutes the records are read over (the day through the hourly record).
    up_now = stack.query_series('up{job="gpu-health-exporter"}')
    assert _labels(stack.query_series("max_over_time(up[7d] offset 15m)")) == _labels(up_now)
    (points,) = stack.query_series(f'count_over_time(up{{node="fleet-0000"}}[7d] @ {end:.3f})')
    # Every 15 minutes for 7 days (673 times), every 15 s over the last 6 hours (1,441, 25 of them the same).
    assert int(points["value"][1]) == 673 + 1441 - 25
    week = stack.query_series("max_over_time(gpu_nvlink_links_up[7d] offset 15m)")
    assert _labels(week) == _labels(now)
    assert {r["value"][1] for r in week} == {"18"}
    (points,) = stack.query_series(f'count_over_time(gpu_nvlink_links_up{{node="fleet-0000", gpu="0"}}[7d] '
                                   f'@ {end:.3f})')
    assert int(points["value"][1]) == 25 * 12 + 8 + 1


def test_a_link_up_in_the_backfilled_day_and_down_now_is_counted(live: tuple[Stack, FleetSim, float]) -> None:
    stack, _, _ = live
    # Read through the records' history: the raw series of the last 10 minutes only know 17 links.
    down = wait_until(lambda: stack.query_series("node_gpu:gpu_nvlink_down_links:count"), 30,
                      "the down-links record")
    assert [(r["metric"]["node"], r["metric"]["gpu"], r["value"][1]) for r in down] == [("fleet-0001", "3", "1")]
    assert stack.query("max_over_time(gpu_nvlink_links_up{node=\"fleet-0001\", gpu=\"3\"}[10m])") == [17.0]
