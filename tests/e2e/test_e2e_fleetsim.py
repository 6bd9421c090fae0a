"""The fleet simulator under Debian's Prometheus (rules/ loaded, 1 s scrapes): 20 simulated nodes in one process,
each its own target of the gpu-health-exporter job, beside one real exporter process with the same timeline.

Each node must look to Prometheus exactly like a real exporter: `up` with its `node` label, as many series as the
real exporter has for the same --sim-config, its own Xids and no other node's, counts that start over at a new boot
and survive an exporter restart, and `up` 0 while it is powered off. The steps run in file order on one stack.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from gpu_health_stack.fleetsim import FleetSim, FleetTimings
from gpu_health_stack.procs import http_get, http_json, wait_until
from gpu_health_stack.scenarios import xid13, xid79
from gpu_health_stack.stack import Stack, missing_binaries

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_binaries()), reason=f"needs {missing_binaries()} (.ci/run installs them)"),
]

NODES = 20
# A timeline with counters already moving, so that their series exist from the start on both sides.
SIM = {"gpus": 8, "faults": [{"kind": "ecc_corrected", "gpu": 1, "count": 3},
                             {"kind": "nvlink_errors", "gpu": 2, "link": 4, "rate": 1}]}
JOB = 'job="gpu-health-exporter"'


class Run:
    def __init__(self, stack: Stack, fleet: FleetSim) -> None:
        self.stack, self.fleet = stack, fleet

    def body(self, node: str) -> str:
        return http_get(self.fleet.node_url(node)).decode()

    def api(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return http_json(f"http://127.0.0.1:{self.fleet.port}/api/nodes{path}", body if body is not None else {},
                         "POST")

    def values(self, expr: str) -> dict[str, float]:
        """An instant query's values by node."""
        return {r["metric"].get("node", ""): float(r["value"][1]) for r in self.stack.query_series(expr)}


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    with Stack() as stack:
        fleet = FleetSim(stack.dir / "fleetsim", FleetTimings(collect_interval="1s", slow_interval="2s",
                                                             collect_timeout="500ms", xid_poll=0.1))
        stack.closers.append(fleet)
        fleet.start()
        fleet.add_nodes(NODES, SIM)
        # The real exporter gets fleet-0000's timeline exactly, its seed (its GPUs' UUIDs) included.
        stack.add_exporter("real-0000", fleet.node("fleet-0000").sim)
        fleet.attach(stack)
        stack.start_prometheus()
        yield Run(stack, fleet)


def series(body: str, node: str) -> set[str]:
    """The series of an exposition, values dropped, the node's name made neutral."""
    return {line.rsplit(" ", 1)[0].replace(f'node="{node}"', 'node="N"')
            for line in body.splitlines() if line and not line.startswith("#")}


def test_every_node_is_a_target_with_its_node_label(run: Run) -> None:
    up = run.stack.query_series(f'up{{{JOB}, node=~"fleet-.*"}}')
    assert sorted(r["metric"]["node"] for r in up) == [f"fleet-{i:04d}" for i in range(NODES)]
    assert all(r["value"][1] == "1" and r["metric"]["instance"] == r["metric"]["node"] for r in up)
    # The targets are one listener, one path per node.
    targets = http_json(f"{run.stack.prom_url}/api/v1/targets")["data"]["activeTargets"]
    urls = {t["labels"]["node"]: t["scrapeUrl"] for t in targets if t["labels"]["node"].startswith("fleet-")}
    assert urls["fleet-0007"] == f"http://127.0.0.1:{run.fleet.port}/node/fleet-0007/metrics"


def test_a_node_serves_what_a_real_exporter_serves(run: Run) -> None:
    # Byte-level: the same series (names and labels) as the real exporter with the same timeline.
    fleet_series = series(run.body("fleet-0000"), "fleet-0000")
    real_series = series(http_get(f"{run.stack.exporters['real-0000'].url}/metrics").decode(), "real-0000")
    assert fleet_series == real_series, (sorted(fleet_series - real_series)[:5], sorted(real_series - fleet_series)[:5])
    assert len(fleet_series) > 400
    # In Prometheus (recording rules and scrape series included): every node has the real exporter's count.
    # ALERTS left out: a rule's `for` runs from when each node's data began.
    query = 'count by (node) ({node=~"fleet-.*|real-0000", __name__!~"ALERTS.*"})'
    counts = wait_until(lambda: (c := run.values(query))
                        and len(set(c.values())) == 1 and len(c) == NODES + 1 and c, 15, "equal series counts")
    assert counts["fleet-0013"] == counts["real-0000"]


def test_an_xid_line_counts_on_its_node_only(run: Run) -> None:
    # Through the control API, as a chaos driver in another process would.
    run.api("/fleet-0003/kernel-log", {"lines": [xid79(3)]})
    got = wait_until(lambda: run.values("gpu_xid_errors_total") or None, 15, "gpu_xid_errors_total")
    assert got == {"fleet-0003": 1.0}
    gpu = run.stack.query_series('gpu_xid_errors_total{node="fleet-0003"}')[0]["metric"]
    assert (gpu["gpu"], gpu["xid"]) == ("3", "79")


def test_an_exporter_restart_keeps_the_counts(run: Run) -> None:
    run.fleet.append_kernel_log("fleet-0004", xid13(0), xid13(0))
    wait_until(lambda: 'xid="13"' in run.body("fleet-0004"), 10, "the Xid on fleet-0004")
    boot = run.fleet.node("fleet-0004").boot_id
    run.fleet.restart_node("fleet-0004")
    assert run.fleet.node("fleet-0004").boot_id == boot
    line = next(x for x in run.body("fleet-0004").splitlines() if x.startswith("gpu_xid_errors_total{"))
    assert line.endswith(" 2.0"), line


def test_a_reboot_starts_the_counts_over(run: Run) -> None:
    run.fleet.append_kernel_log("fleet-0003", xid79(3))
    count = 'gpu_xid_errors_total{node="fleet-0003"}'
    wait_until(lambda: run.values(count) == {"fleet-0003": 2.0}, 10, "fleet-0003's second Xid 79")
    before = run.fleet.node("fleet-0003").boot_id
    described = run.api("/fleet-0003/restart", {"new_boot": True})
    node = next(n for n in described if n["name"] == "fleet-0003")
    assert node["boot_id"] != before and node["running"]
    assert "gpu_xid_errors_total{" not in run.body("fleet-0003")  # a new boot, an empty kernel log
    run.fleet.append_kernel_log("fleet-0003", xid79(3))
    # Prometheus sees the counter start again at 1: a reset, as after a real reboot.
    wait_until(lambda: run.values(count) == {"fleet-0003": 1.0}, 10, "the new boot's Xid 79")
    assert run.values(f"resets({count}[1m])") == {"fleet-0003": 1.0}


def test_a_stopped_node_is_down(run: Run) -> None:
    run.api("/fleet-0007/stop")
    with pytest.raises(RuntimeError, match="HTTP 503"):
        run.body("fleet-0007")
    wait_until(lambda: run.values(f'up{{{JOB}, node="fleet-0007"}}') == {"fleet-0007": 0.0}, 10, "fleet-0007 down")
    others = run.values(f'up{{{JOB}, node=~"fleet-.*"}} == 1')
    assert len(others) == NODES - 1 and "fleet-0007" not in others
    run.api("/fleet-0007/start", {"new_boot": True})
    wait_until(lambda: run.values(f'up{{{JOB}, node="fleet-0007"}}') == {"fleet-0007": 1.0}, 10, "fleet-0007 up")


def test_a_scrape_gap_is_down_while_the_node_collects_on(run: Run) -> None:
    cycles = run.fleet.node("fleet-0008").poller.cycles
    run.api("/fleet-0008/gap", {"seconds": 4})
    with pytest.raises(RuntimeError, match="HTTP 503"):
        run.body("fleet-0008")
    wait_until(lambda: run.values(f'up{{{JOB}, node="fleet-0008"}}') == {"fleet-0008": 0.0}, 10, "fleet-0008 gap")
    # Nothing happened to the node itself: it collects on through the gap.
    wait_until(lambda: run.fleet.node("fleet-0008").poller.cycles > cycles, 3, "a cycle during the gap")
    wait_until(lambda: run.values(f'up{{{JOB}, node="fleet-0008"}}') == {"fleet-0008": 1.0}, 10, "gap over")
    with pytest.raises(RuntimeError, match="HTTP 400"):
        run.api("/fleet-0008/gap", {"seconds": "long"})


def test_nodes_come_and_go_through_service_discovery(run: Run) -> None:
    run.api("", {"name": "late-0001", "sim": {"gpus": 2}})
    sd = http_json(f"http://127.0.0.1:{run.fleet.port}/sd")
    assert {"node": "late-0001", "__fleetsim_node": "late-0001"} in [g["labels"] for g in sd]
    # file_sd: Prometheus picks the new target up from targets.json (after its 5 s update hold-back).
    wait_until(lambda: run.values(f'up{{{JOB}, node="late-0001"}}') == {"late-0001": 1.0}, 20, "late-0001 up")
    assert run.values('count by (node) (gpu_temperature_celsius{node="late-0001"})') == {"late-0001": 2.0}
    own = http_get(f"http://127.0.0.1:{run.fleet.port}/metrics").decode()
    assert re.search(r'^fleetsim_nodes\{state="running"\} 21$', own, re.M), own


def test_a_hung_node_holds_only_its_own_gpu(run: Run) -> None:
    # A hang gets the exporter's threaded workers: the stuck call costs its GPU, not the node or the fleet.
    hang = {"kind": "hang", "gpu": 0, "call": "nvmlDeviceGetPowerUsage", "until": "20s"}
    run.fleet.add_node("hung-0001", {"gpus": 2, "faults": [hang]})
    cycles = run.fleet.node("fleet-0001").poller.cycles  # type: ignore[union-attr]

    def stale() -> dict[str, str]:
        lines = [x for x in run.body("hung-0001").splitlines() if x.startswith("gpu_collection_stale{")]
        return {re.search(r'gpu="(\d)"', x).group(1): x.rsplit(" ", 1)[1] for x in lines}  # type: ignore[union-attr]

    assert wait_until(lambda: stale() == {"0": "1.0", "1": "0.0"} and stale(), 10, "GPU 0 of hung-0001 stale")
    wait_until(lambda: run.fleet.node("fleet-0001").poller.cycles >= cycles + 2, 10,  # type: ignore[union-attr]
               "fleet-0001 collected meanwhile")
