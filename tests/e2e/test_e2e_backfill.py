"""gpu_health_stack/backfill.py on the real tools: promtool turns a fleet's past series into blocks, and Debian's
Prometheus, started on them, answers the long-window queries the rules make (issue 16: rule cost with history)."""

from __future__ import annotations

import json
import time
import urllib.parse
from pathlib import Path

import pytest

from gpu_health_stack.backfill import backfill, fleet_series, openmetrics
from gpu_health_stack.procs import Proc, free_port, http_get
from gpu_health_stack.stack import PROMETHEUS, missing_binaries

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
    lines = list(openmetrics(series, 0, 120, 60))
    assert lines[-1] == "# EOF\n" and len(lines) == 2 * 3 + 1
    assert [float(x.split()[-1]) for x in lines[:-1]] == [0, 0, 60, 60, 120, 120]
    assert 'node="a\\"b"' in lines[0]
    with pytest.raises(ValueError, match="not in the template"):
        fleet_series(TEMPLATE, ["n"], {"no_such_metric"})
