"""The whole policy path on real servers, as one run over one stack: four simulated-GPU exporters (node-a..node-d,
one per node), Debian's Prometheus with rules/ (1 s scrape and evaluation), Debian's Alertmanager with the shipped
route (group_wait 0s, group_interval 1s), the webhook live against kmock (Node and Pod objects, scripted
evictions; the test plays the kubelet and the Job controller, gpu_health_stack/gpu_operator.py the GPU Operator's
DaemonSets and the device plugin on node-b) and moto in server mode (an auto scaling group whose
four instances back the nodes).

The tests are the steps of that run, in file order: each one leaves the fleet as the next expects it (the breaker
step counts the nodes remediated before it). They synchronise by polling with deadlines, never by fixed sleeps.
node-b's row remap is pending from its exporter's start: GPURowRemapPending has `for: 2m`, the one long wait of
the run, and the steps before it run inside those two minutes.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_health_stack.procs import wait_until
from gpu_health_stack.scenarios import (
    EXECUTOR_NAMESPACE,
    SXID_FATAL,
    SXID_NONFATAL,
    occurrences,
    policy_config,
    remediations,
    wait_state,
    wait_step,
    xid13,
    xid45,
    xid79,
)
from gpu_health_stack.stack import _unix, missing_binaries

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_binaries()), reason=f"needs {missing_binaries()} (.ci/run installs them)"),
    pytest.mark.skipif(importlib.util.find_spec("moto") is None, reason="needs moto[server] (the test extras)"),
]

NODES = ("node-a", "node-b", "node-c", "node-d")
# node-c carries faults that ask for no remediation (or only after 10 minutes and more), so that the dashboards
# have something to show.
NODE_C_SIM = {"gpus": 8, "faults": [
    {"kind": "nvlink_errors", "gpu": 2, "link": 3, "counter": "crc_flit", "rate": 50},
    {"kind": "ecc_corrected", "gpu": 4, "rate": 2},
    {"kind": "ecc_uncorrectable", "gpu": 4, "count": 1},
    {"kind": "throttle", "gpu": 6, "reasons": ["hw_thermal_slowdown"]},
    {"kind": "utilization", "gpu": 6, "percent": 100, "memory_percent": 80},
    {"kind": "not_supported", "gpu": 0, "call": "nvmlDeviceGetRemappedRows"},
    {"kind": "nvml_error", "gpu": 7, "call": "nvmlDeviceGetPcieReplayCounter", "code": 999},
    {"kind": "hang", "gpu": 5, "call": "nvmlDeviceGetPowerUsage", "at": "60s", "until": "70s"},
]}
# node-b: the row remap pending from the start (GPURowRemapPending, for: 2m, is the step of the run that waits),
# and an NVLink link going down once Prometheus has seen it up (GPUNVLinkDown has for: 5m: it stays pending for
# the length of this run and only feeds the dashboards).
NODE_B_SIM = {"gpus": 8, "faults": [{"kind": "row_remap_pending", "gpu": 1, "at": "0s"},
                                    {"kind": "nvlink_down", "gpu": 4, "link": 7, "at": "60s"},
                                    {"kind": "nvlink_errors", "gpu": 3, "link": 11, "counter": "replay", "rate": 5}]}


PER_LINK = ("--collector.nvlink.per-link",)


class Run:
    """The fleet plus what the steps learn about it."""

    def __init__(self, fleet: Any) -> None:
        self.fleet = fleet
        self.stack = fleet.stack
        self.kube = fleet.kube
        self.webhook = fleet.webhook
        self.aws = fleet.aws
        self.started: dict[str, float] = {}  # node -> when its exporter (and its sim fault timeline) started
        self.operator: Any = None
        self.done: set[str] = set()

    def mutations(self, *nodes: str) -> list[tuple[str, str, Any]]:
        return self.kube.mutations_on(nodes)

    def acting_alerts(self, node: str) -> list[dict[str, Any]]:
        """Prometheus alerts (pending or firing) of the node that ask for a remediation."""
        return [a for a in self.stack.prometheus_alerts("pending") + self.stack.prometheus_alerts("firing")
                if a["labels"].get("node") == node and a["labels"].get("remediation", "none") != "none"]


@pytest.fixture(scope="module")
def run(report: Callable[[str], None]) -> Iterator[Run]:
    from gpu_health_stack.fleet import Fleet

    before = time.time()
    # node-b also publishes per-link NVLink series, the others the default per-GPU totals only; both node-b and
    # node-c have NVLink errors, so the rules and dashboards run on both modes.
    # node-b has a simulated driver (its NVML holds the device files; nvidia-smi -r refuses while anyone does) and
    # its exporter's NVML Xid event thread on: the reset Job's script runs there as it would on the node.
    fleet = Fleet.start({"node-a": None, "node-b": NODE_B_SIM, "node-c": NODE_C_SIM, "node-d": None},
                        exporter_args={"node-b": (*PER_LINK, "--xid.nvml-events", "on")}, drivers=("node-b",),
                        webhook_config=policy_config, cloud="moto")
    operator = None
    try:
        from gpu_health_stack.gpu_operator import GpuOperatorFake

        operator = GpuOperatorFake(fleet.kube, ["node-b"], interval=0.2)
        operator.xid("node-b", 1)  # the device plugin dropped GPU 1 at its uncorrectable ECC error
        r = Run(fleet)
        r.operator = operator
        # The row remap is pending from node-b's simulated GPUs' start on: the fault's time.
        r.started["node-b"] = fleet.stack.exporters["node-b"].proc.started_at
        report(f"stack up in {time.time() - before:.1f}s: Prometheus {fleet.stack.prom_url}, "
               f"Alertmanager {fleet.stack.am_url}, webhook {fleet.webhook.url}, kmock {fleet.kube.url}, "
               f"moto {fleet.aws.url}")
        yield r
    finally:
        if operator is not None:
            operator.close()
        fleet.close()


# ---- 1. A fatal Xid: cordon, drain, replace the instance in its auto scaling group ---------------------------


def test_xid79_cordons_drains_and_replaces_the_instance(run: Run, report: Callable[[str], None]) -> None:
    group = run.aws.group()
    old = run.fleet.instances["node-a"]
    injected = time.time()
    run.stack.inject_xid("node-a", xid79(3))
    cordon = wait_step(run.webhook, "node-a", "cordon", 30, since=injected)
    drain = wait_step(run.webhook, "node-a", "drain", 30, since=injected)
    replace = wait_step(run.webhook, "node-a", "replace", 90, since=injected)
    report(f"XID 79 node-a GPU 3: fault -> cordon {cordon['finished_at'] - injected:.2f}s, "
           f"-> drained {drain['finished_at'] - injected:.2f}s, -> replace call {replace['started_at'] - injected:.2f}s, "
           f"-> replaced {replace['finished_at'] - injected:.2f}s (acted on {cordon['remediation']['alertname']})")

    node = run.kube.node("node-a")
    assert node["spec"].get("unschedulable") is True
    assert run.kube.pods("node-a", include_daemonsets=False) == []  # the DaemonSet's exporter pod stays
    assert run.kube.pods("node-a") == ["gpu-health/gpu-health-exporter-node-a"]
    # The instance behind node-a left the group and a replacement took its place; the group kept its size.
    assert run.aws.state(old) in ("terminated", "shutting-down")
    after = run.aws.group()
    assert old not in run.aws.instance_ids()
    assert len(after["Instances"]) == group["DesiredCapacity"] == after["DesiredCapacity"]
    # One remediation acted, with the ladder of this policy; a twin alert of the same fault (the Xid and the
    # fallen-off-the-bus record) merged into it or was refused by the cooldown, never acted.
    acting = remediations(run.webhook, "node-a")
    assert len(acting) == 1 and acting[0]["ladder"] == ["cordon", "drain", "replace"], acting
    patches = [c for c in run.mutations("node-a") if c[0] == "PATCH"]
    assert len(patches) == 1, patches
    # The history the rules read says so.
    assert run.webhook.metric("gpu_remediation_actions_total", node="node-a", action="replace", result="success") == 1
    # Both alerts of the fault (GPUFallenOffBus, and GPUXidRebootRequired one rule evaluation later) reached the
    # webhook: the first acted, the second merged into it or, arriving after it finished, met the cooldown.
    wait_until(lambda: len(occurrences(run.webhook, "node-a")) >= 2, 30, "node-a's second alert to reach the webhook")
    run.done.add("node-a")


def test_node_a_exporter_restart_fires_nothing_again(run: Run) -> None:
    """The exporter restarts within the same boot: it serves the Xid 79 again (counts are per boot), but the replace
    is newer than the fault, so no alert asks for a remediation anew and the webhook does nothing."""
    if "node-a" not in run.done:
        pytest.skip("needs the replace of the previous step")
    calls_before = len(run.mutations("node-a"))
    instances = run.aws.instance_ids()
    seen = occurrences(run.webhook, "node-a")
    restarted = time.time()
    run.stack.restart_exporter("node-a")
    wait_until(lambda: run.stack.query('gpu_xid_errors_total{node="node-a",xid="79"}') == [1.0], 30,
               "node-a's restarted exporter to serve its Xid 79 again")
    wait_until(lambda: run.stack.query('up{job="gpu-health-exporter",node="node-a"}') == [1.0], 30, "node-a up")
    run.stack.wait_rule_evaluations(since=time.time(), rounds=3)
    # The fault is still exported, and the rules count it as fixed by the replace.
    assert run.stack.query('node_gpu_xid:gpu_xid_last_timestamp_seconds:uncleared{node="node-a"}') == []
    fresh = [a for a in run.acting_alerts("node-a") if _unix(a["activeAt"]) >= restarted]
    assert fresh == [], fresh
    assert not [a for a in run.stack.prometheus_alerts("pending") if a["labels"].get("node") == "node-a"
                and a["labels"].get("remediation", "none") != "none"]
    # No new alert occurrence reached the webhook; re-sends of the old ones are duplicates.
    assert occurrences(run.webhook, "node-a") == seen
    assert len(remediations(run.webhook, "node-a")) == 1
    assert run.aws.instance_ids() == instances
    assert len(run.mutations("node-a")) == calls_before


# ---- 2. Application Xid storms: nothing -----------------------------------------------------------------------


def test_xid13_and_xid45_storms_ask_for_nothing(run: Run) -> None:
    for burst in (1, 2):  # two bursts, one scrape apart at least
        for _ in range(100):
            run.stack.inject_xid("node-c", xid13(1))
            run.stack.inject_xid("node-c", xid45(1))
        wait_until(lambda n=100.0 * burst: run.stack.query('sum(gpu_xid_errors_total{node="node-c",xid="45"})')
                   == [n], 30, "node-c's Xid 45 count to reach Prometheus")
    run.stack.wait_rule_evaluations(since=time.time(), rounds=3)
    assert run.acting_alerts("node-c") == []
    assert remediations(run.webhook, "node-c", live_only=False) == []
    assert run.mutations("node-c") == []


def test_faults_for_humans_ask_the_webhook_for_nothing(run: Run) -> None:
    """An Xid 154 announcing an IMEX-domain recovery, an Xid the catalog does not know and a non-fatal SXid: alerts
    for people (remediation none), which the shipped route never sends to the webhook."""
    run.stack.inject_xid("node-c", "NVRM: Xid (PCI:0000:3a:00): 154, GPU recovery action changed from 0x0 (None) "
                                   "to 0x5 (Recover IMEX Domain)")
    run.stack.inject_xid("node-c", "NVRM: Xid (PCI:0000:3a:00): 250, pid=1, name=test, an Xid newer than the catalog")
    run.stack.inject_xid("node-c", SXID_NONFATAL)
    wanted = {"GPURecoveryActionNeedsHuman", "GPUXidNeedsHuman"}

    def firing() -> bool:
        names = {a["labels"]["alertname"] for a in run.stack.am_alerts() if a["labels"].get("node") == "node-c"}
        return wanted <= names

    wait_until(firing, 30, f"{wanted} of node-c to reach Alertmanager")
    run.stack.wait_rule_evaluations(since=time.time(), rounds=3)
    assert run.acting_alerts("node-c") == []
    assert remediations(run.webhook, "node-c", live_only=False) == []
    assert run.mutations("node-c") == []


# ---- 3. An exporter dies: its own alert, no action -------------------------------------------------------------


def test_dead_exporter_raises_its_own_alert_and_no_action(run: Run, report: Callable[[str], None]) -> None:
    killed = time.time()
    run.stack.kill_exporter("node-d")
    wait_until(lambda: run.stack.query('up{job="gpu-health-exporter",node="node-d"}') == [0.0], 30,
               "Prometheus to see node-d's exporter down")

    def pending() -> dict[str, Any] | None:
        return next((a for a in run.stack.prometheus_alerts("pending")
                     if a["labels"]["alertname"] == "GPUExporterDown" and a["labels"].get("node") == "node-d"), None)

    alert = wait_until(pending, 30, "GPUExporterDown for node-d to be pending")
    # `for: 5m` in rules/exporter.alerts.yaml: it fires five minutes on (promtool-tested in rules/tests/
    # exporter.test.yaml); here it is pending from the kill on, and asks for nothing.
    assert _unix(alert["activeAt"]) >= killed - 2
    assert alert["labels"]["remediation"] == "none" and alert["labels"]["component"] == "exporter"
    report(f"node-d exporter killed -> GPUExporterDown pending {_unix(alert['activeAt']) - killed:.2f}s "
           f"(fires after its for: 5m)")
    run.stack.wait_rule_evaluations(since=time.time(), rounds=3)
    assert run.acting_alerts("node-d") == []
    assert remediations(run.webhook, "node-d", live_only=False) == []
    assert run.mutations("node-d") == []


# ---- 4. Alertmanager crashes and comes back: the re-sent alerts change nothing -------------------------------


def test_alertmanager_restart_causes_no_duplicate_action(run: Run, report: Callable[[str], None]) -> None:
    if "node-a" not in run.done:
        pytest.skip("needs node-a's remediation of the first step")
    dupes = run.webhook.metric("gpu_remediation_webhook_duplicate_alerts_total")
    calls = len(run.kube.calls(mutating=True))
    instances = run.aws.instance_ids()
    rems = len(run.webhook.remediations())
    # SIGKILL: Alertmanager keeps no notification log, so it sends node-a's alerts again as new.
    run.stack.restart_alertmanager(crash=True)
    # Prometheus re-sends firing alerts to Alertmanager every minute (its --rules.alert.resend-delay).
    wait_until(lambda: [a for a in run.stack.am_alerts() if a["labels"].get("node") == "node-a"], 75,
               "Prometheus to re-send node-a's alerts to the restarted Alertmanager", interval=0.5)
    wait_until(lambda: run.webhook.metric("gpu_remediation_webhook_duplicate_alerts_total") > dupes, 30,
               "the restarted Alertmanager to deliver node-a's alerts again", interval=0.2)
    again = run.webhook.metric("gpu_remediation_webhook_duplicate_alerts_total") - dupes
    report(f"Alertmanager killed and restarted: {again:.0f} alert(s) delivered again, recognised as duplicates")
    assert len(run.webhook.remediations()) == rems
    assert len(run.kube.calls(mutating=True)) == calls
    assert run.aws.instance_ids() == instances


# ---- 5. A pending row remap: cordon, drain, a reset Job on the node --------------------------------------------


def test_row_remap_pending_cordons_drains_and_resets_the_gpu(run: Run, report: Callable[[str], None]) -> None:
    since = run.started["node-b"]
    # GPURowRemapPending has for: 2m; the fault has been standing since node-b's exporter started.
    cordon = wait_step(run.webhook, "node-b", "cordon", 180, since=since)
    drain = wait_step(run.webhook, "node-b", "drain", 30, since=since)

    def job() -> dict[str, Any] | None:
        return next((j for j in run.kube.jobs(EXECUTOR_NAMESPACE)
                     if j["metadata"].get("annotations", {}).get("gpu-health.io/node") == "node-b"), None)

    created = wait_until(job, 30, "the reset_gpu Job for node-b")
    spec = created["spec"]["template"]["spec"]
    assert spec["nodeName"] == "node-b" and spec["restartPolicy"] == "Never"
    uuid = created["metadata"]["annotations"].get("gpu-health.io/gpu-uuid", "")
    assert uuid.startswith("GPU-") and uuid in spec["containers"][0]["command"]
    # The Job was created only once the GPU Operator's operands had left the node; the driver's label is untouched.
    labels = run.kube.node("node-b")["metadata"]["labels"]
    assert labels["nvidia.com/gpu.deploy.device-plugin"] == "false" and labels["nvidia.com/gpu.deploy.driver"] == "true"
    assert not [p for p in run.kube.pods("node-b") if p.startswith("gpu-operator/")]
    assert run.kube.node("node-b")["status"]["allocatable"]["nvidia.com/gpu"] == "0"  # no device plugin runs
    # Play the kubelet: run the Job's container command on node-b, against its exporter and simulated driver.
    began = time.time()
    code, log = run.stack.run_executor_job("node-b", created)
    ran = time.time() - began
    run.kube.finish_job(EXECUTOR_NAMESPACE, created["metadata"]["name"], succeeded=code == 0, report=log,
                        exit_code=code)
    assert code == 0, log
    assert "released: collection xid" in log and f"reset {uuid} at 00000000:2A:00.0; same UUID back" in log
    reset = wait_step(run.webhook, "node-b", "reset_gpu", 60, since=since)
    alert = next(a for a in run.stack.prometheus_alerts("firing") if a["labels"]["alertname"] == "GPURowRemapPending"
                 and a["labels"].get("node") == "node-b")
    fired = _unix(alert["activeAt"]) + 120  # for: 2m
    report(f"row remap pending node-b GPU 1: fault (exporter start) -> cordon {cordon['finished_at'] - since:.2f}s "
           f"= first scrape and pending {_unix(alert['activeAt']) - since:.2f}s + for: 2m + firing -> cordon "
           f"{cordon['finished_at'] - fired:.2f}s; -> drained {drain['finished_at'] - since:.2f}s, "
           f"-> reset {reset['finished_at'] - since:.2f}s (the Job's script {ran:.1f}s)")
    assert run.kube.node("node-b")["spec"].get("unschedulable") is True
    # Drained: only DaemonSet pods and the reset Job's own (finished) pod are left on the node.
    assert [p for p in run.kube.pods("node-b", include_daemonsets=False)
            if not p.startswith(EXECUTOR_NAMESPACE + "/")] == []
    rem = wait_state(run.webhook, "node-b", ("SUCCEEDED",), 30, since=since)
    # The operands are back, the device plugin started again and advertises all eight GPUs, GPU 1 included.
    labels = run.kube.node("node-b")["metadata"]["labels"]
    assert all(labels[f"nvidia.com/gpu.deploy.{o}"] == "true"
               for o in ("device-plugin", "gpu-feature-discovery", "dcgm", "dcgm-exporter"))
    assert "gpu-health.io/operands-paused" not in labels
    assert run.kube.node("node-b")["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert "holders of" in reset["detail"], reset["detail"]
    assert "restored nvidia.com/gpu.deploy.dcgm=true, nvidia.com/gpu.deploy.dcgm-exporter=true, " \
           "nvidia.com/gpu.deploy.device-plugin=true" in reset["detail"], reset["detail"]
    # The reset applied the pending remap: the exporter reads it so, and the alert resolves.
    wait_until(lambda: run.stack.query('gpu_row_remap_pending{node="node-b",gpu="1"}') == [0.0], 30,
               "the exporter to read the remap applied")
    assert rem["ladder"] == ["cordon", "drain", "reset_gpu"] and rem["gpu"] == "1"
    assert run.webhook.metric("gpu_remediation_last_success_timestamp_seconds", node="node-b",
                              action="reset_gpu", uuid=uuid) > 0
    run.done.add("node-b")


# ---- 6. Half the fleet at once: the breaker trips -------------------------------------------------------------


def test_half_the_fleet_failing_at_once_trips_the_breaker(run: Run, report: Callable[[str], None]) -> None:
    """node-c (a fatal Xid) and node-d (a fatal NVSwitch error) fail at once, after node-a and node-b were
    remediated in the breaker's window: more than 2 of the 4 nodes (50 %) now ask for remediation, the breaker
    trips in the same journal transaction that plans the first of the two, and neither is touched."""
    if not {"node-a", "node-b"} <= run.done:
        pytest.skip("needs the remediations of node-a and node-b within the breaker's window")
    run.stack.start_exporter("node-d")
    wait_until(lambda: run.stack.query('up{job="gpu-health-exporter",node="node-d"}') == [1.0], 30, "node-d up")
    before = run.mutations("node-c", "node-d")
    injected = time.time()
    run.stack.inject_xid("node-c", xid79(5))
    run.stack.inject_xid("node-d", SXID_FATAL)
    breaker = wait_until(lambda: (b := run.webhook.breaker()).get("open") and b, 30, "the breaker to trip")
    report(f"half the fleet failing -> breaker open {breaker['since'] - injected:.2f}s: {breaker['reason']}")
    blocked = {node: wait_state(run.webhook, node, ("BLOCKED",), 30, since=injected) for node in ("node-c", "node-d")}
    # Every alert of the two incidents reaches the webhook while the breaker is open, and merges into the blocked
    # remediations: node-c's Xid and fallen-off-the-bus alerts, node-d's NVSwitch alert.
    wait_until(lambda: len(run.webhook.remediation(blocked["node-c"]["id"])["occurrences"]) >= 2, 30,
               "node-c's second alert to reach the webhook")
    wait_until(lambda: run.stack.query("gpu_remediation_breaker_open") == [1.0], 30,
               "Prometheus to scrape the open breaker from the webhook")
    # The storm alert of the rules fires too (it would trip the breaker on its own), and so does the remediator's own
    # alert: the webhook has stopped acting, for how long it says.
    wait_until(lambda: [a for a in run.stack.prometheus_alerts("firing")
                        if a["labels"]["alertname"] == "GPURemediationStorm"], 30, "GPURemediationStorm")
    opened = wait_until(lambda: [a for a in run.stack.prometheus_alerts("firing")
                                 if a["labels"]["alertname"] == "GPURemediationBreakerOpen"], 30,
                        "GPURemediationBreakerOpen")
    assert opened[0]["labels"]["severity"] == "critical" and "open for" in opened[0]["annotations"]["summary"]
    run.stack.wait_rule_evaluations(since=time.time(), rounds=2)
    assert run.webhook.breaker()["open"] is True
    assert [r["state"] for n in ("node-c", "node-d") for r in remediations(run.webhook, n)] == ["BLOCKED"] * 2
    assert run.mutations("node-c", "node-d") == before
    assert run.kube.node("node-c")["spec"].get("unschedulable") is not True
    assert run.kube.node("node-d")["spec"].get("unschedulable") is not True
    # A human looks and drops the backlog: the blocked remediations are cancelled, and the alerts, re-sent while
    # they keep firing, are duplicates of cancelled occurrences: nothing runs afterwards either.
    run.webhook.admin("/v1/breaker:reset", {"mode": "skip-backlog", "reason": "e2e: a common cause"})
    for node in ("node-c", "node-d"):
        wait_state(run.webhook, node, ("CANCELLED",), 30, since=injected)
    run.stack.wait_rule_evaluations(since=time.time(), rounds=3)
    assert run.mutations("node-c", "node-d") == before
    assert [r["state"] for n in ("node-c", "node-d") for r in remediations(run.webhook, n)] == ["CANCELLED"] * 2


# ---- 7. Every dashboard panel has data from this Prometheus ---------------------------------------------------

# Panels that are legitimately empty in this run, each with its reason. Everything else must return data for at
# least one of the four nodes (the panel's node variable) after the steps above.
EMPTY_HERE = {
    # The simulated GPUs speak NVML (pynvml), not DCGM: no gpu_dcgm_* series exist with --backend sim.
    ("gpu-health-node", "DCGM health watches"): "no DCGM on the sim backend",
    ("gpu-health-node", "DCGM incidents"): "no DCGM on the sim backend",
    ("gpu-health-node", "DCGM connection"): "no DCGM on the sim backend",
    ("gpu-health-node", "DCGM data age"): "no DCGM on the sim backend",
    # Counted only when a provider call fails, falls back or hands off to a human: none does in this run (moto
    # answers, and the policy names no human provider).
    ("gpu-health-remediation", "Provider errors, fallbacks and hand-offs"): "no provider error in this run",
}
# Panels that are empty here because of a defect, reported and to be fixed in dashboards/ (this test then fails
# until the entry is dropped). increase(...) > 0 never counts the first increment of a series: the webhook creates
# each gpu_remediation_actions_total series at 1 (docs/webhook-metrics-contract.md), so a node's first cordon,
# drain or replace is invisible to the panel; the rules count new series with `or` for that reason.
KNOWN_DEFECTS: dict[tuple[str, str], str] = {}


def _panel_queries() -> dict[int, list[tuple[str, str, str, str]]]:
    """Every panel query (by position) for each node: [(dashboard, panel, node, expr)]."""
    spec = importlib.util.spec_from_file_location("dashboard_queries", ROOT / "tools" / "dashboard_queries.py")
    assert spec is not None and spec.loader is not None
    dq = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = dq  # its dataclasses look their module up there
    spec.loader.exec_module(dq)
    out: dict[int, list[tuple[str, str, str, str]]] = {}
    for node in NODES:
        # Rates over 10 minutes, longer than this run (Grafana's 1m suits 15 s scrapes, not a 3-minute run).
        for i, (dashboard, title, expr) in enumerate(dq.panel_queries(node=node, rate_interval="10m",
                                                                      interval="1s", range_="1h")):
            out.setdefault(i, []).append((dashboard, title, node, expr))
    return out


def test_every_dashboard_panel_returns_data(run: Run, report: Callable[[str], None]) -> None:
    """After the steps above, every panel query returns data from this Prometheus for at least one node (the
    panels' node variable), except the allow-listed ones."""
    queries = _panel_queries()
    missing: dict[tuple[str, str], list[str]] = {}
    for variants in queries.values():
        if not any(run.stack.query_series(expr) for _, _, _, expr in variants):
            dashboard, title, _, expr = variants[0]
            missing.setdefault((dashboard, title), []).append(expr)
    allowed = {**EMPTY_HERE, **KNOWN_DEFECTS}
    unexpected = {k: v for k, v in missing.items() if k not in allowed}
    assert unexpected == {}, "panels without data:\n" + "\n".join(f"{k}: {v}" for k, v in unexpected.items())
    stale = [k for k in allowed if k not in missing]
    assert stale == [], f"allow-listed panels that have data now (drop them from EMPTY_HERE): {stale}"
    report(f"dashboards: {len(queries) - sum(map(len, missing.values()))} of {len(queries)} panel queries return "
           f"data; empty as allowed: {sorted(missing)}")
