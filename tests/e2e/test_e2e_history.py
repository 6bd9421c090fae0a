"""Rules propose, the journal decides, on the real servers: Debian's Prometheus with rules/, Debian's Alertmanager
with the shipped route, the webhook live against kmock and moto (three nodes, node-a the one that fails).

A GPU reset fixes an Xid 48; then the webhook is stopped for two minutes and comes back on the same receiver URL with
its series under a new `instance` (Prometheus relabelling, as a recreated pod's new IP would give them). The fixed
fault must not fire again (the rules keep the last success through the gap), the same fault delivered again as a new
occurrence must be refused by the journal (already_remediated), nothing may escalate, and then new faults on that GPU
must climb to a replace exactly when the journal holds three resets in 7 days.

Alertmanager re-sends a still-firing alert every 10 s here (repeat_interval; 30m as shipped) and Prometheus re-sends
its alerts every 5 s (--rules.alert.resend-delay; 1m by default), so that a new fault on a GPU whose alert still
fires (keep_firing_for after the reset) reaches the webhook in seconds: the steps run in file order on one stack.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from gpu_health_stack.fleet import merge
from gpu_health_stack.procs import wait_until
from gpu_health_stack.scenarios import EXECUTOR_NAMESPACE, policy_config, remediations, wait_step, xid48
from gpu_health_stack.stack import Timings, missing_binaries

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_binaries()), reason=f"needs {missing_binaries()} (.ci/run installs them)"),
    pytest.mark.skipif(importlib.util.find_spec("moto") is None, reason="needs moto[server] (the test extras)"),
]

NODES = ("node-a", "node-b", "node-c")
GPU = 2
OUTAGE = 120.0  # the webhook is down this long
NEW_INSTANCE = "gpu-health-webhook-1:9096"


def history_policy(stack: Any, kube: Any, aws: Any) -> dict[str, Any]:
    """The e2e policy (replace, don't repair; GPU resets), with room for repeated resets on one node: no cooldown,
    no attempt cap to speak of, budgets that do not run out in this run."""
    return merge(policy_config(stack, kube, aws), {"safety": {
        "per_node": {"cooldown": "0s", "max_attempts": 20, "attempts_window": "24h"},
        "rate_limits": {"cordon": {"max": 20, "per": "1h"}, "drain": {"max": 20, "per": "1h"},
                        "reset_gpu": {"max": 20, "per": "1h"}, "replace": {"max": 2, "per": "1h"}}}})


class Run:
    def __init__(self, fleet: Any) -> None:
        self.fleet, self.stack, self.kube, self.webhook, self.aws = (fleet, fleet.stack, fleet.kube, fleet.webhook,
                                                                     fleet.aws)
        self.uuid = ""
        self.fault = 0.0  # when the fixed Xid 48 happened (the exporter's time)
        self.fixed_by = ""  # the remediation that reset the GPU
        self.active_at = ""  # activeAt of GPUXidResetRequired when it fixed it
        self.done: set[str] = set()

    def xid_alerts(self, state: str) -> list[dict[str, Any]]:
        return [a for a in self.stack.prometheus_alerts(state) if a["labels"]["alertname"] == "GPUXidResetRequired"
                and a["labels"].get("node") == "node-a"]

    def uncleared(self) -> list[float]:
        return self.stack.query('node_gpu_xid:gpu_xid_last_timestamp_seconds:uncleared{node="node-a"}')

    def reset_once(self, since: float) -> dict[str, Any]:
        """Play the kubelet and the device plugin for the reset Job of node-a's remediation created after `since`."""
        def job() -> dict[str, Any] | None:
            return next((j for j in self.kube.jobs(EXECUTOR_NAMESPACE)
                         if j["metadata"].get("annotations", {}).get("gpu-health.io/node") == "node-a"
                         and not (j.get("status") or {}).get("succeeded")), None)

        created = wait_until(job, 90, "a reset_gpu Job for node-a")
        self.kube.set_allocatable_gpus("node-a", 7)
        self.kube.finish_job(EXECUTOR_NAMESPACE, created["metadata"]["name"])
        self.kube.set_allocatable_gpus("node-a", 8)
        step = wait_step(self.webhook, "node-a", "reset_gpu", 60, since=since)
        self.uuid = created["metadata"]["annotations"]["gpu-health.io/gpu-uuid"]
        return step

    def mutations(self) -> list[tuple[str, str, Any]]:
        return self.kube.mutations_on(["node-a"])


@pytest.fixture(scope="module")
def run(report: Callable[[str], None]) -> Iterator[Run]:
    from gpu_health_stack.fleet import Fleet

    fleet = Fleet.start({n: None for n in NODES}, webhook_config=history_policy, cloud="moto",
                        timings=Timings(repeat_interval="10s", resend_delay="5s"))
    try:
        yield Run(fleet)
    finally:
        fleet.close()


def test_a_gpu_reset_fixes_an_xid_48(run: Run, report: Callable[[str], None]) -> None:
    injected = time.time()
    run.stack.inject_xid("node-a", xid48(GPU))
    step = run.reset_once(injected)
    run.fixed_by = step["remediation"]["id"]
    run.fault = wait_until(lambda: run.stack.query('max(gpu_xid_last_timestamp_seconds{node="node-a",xid="48"})'),
                           30, "the fault's time in Prometheus")[0]
    # Prometheus has the reset from the webhook, and the rules count the fault as fixed.
    wait_until(lambda: run.stack.query(f'node_uuid:gpu_remediation_last_success_timestamp_seconds:max'
                                       f'{{node="node-a",uuid="{run.uuid}"}}'), 30, "the reset in Prometheus")
    wait_until(lambda: run.uncleared() == [], 30, "the fault to count as fixed")
    firing = run.xid_alerts("firing")
    assert len(firing) == 1  # still firing: keep_firing_for 10m after the fault no longer stands
    run.active_at = firing[0]["activeAt"]
    report(f"history: Xid 48 node-a GPU {GPU} -> reset {step['finished_at'] - injected:.2f}s")
    run.done.add("fixed")


def test_a_webhook_restart_under_a_new_instance_neither_refires_the_fault_nor_escalates(
        run: Run, report: Callable[[str], None]) -> None:
    if "fixed" not in run.done:
        pytest.skip("needs the reset of the previous step")
    calls, rems = len(run.mutations()), len(remediations(run.webhook, "node-a"))
    run.webhook.stop()
    stopped = time.time()
    run.stack.reload_prometheus([run.webhook.scrape_config(instance=NEW_INSTANCE)])
    gap_seen = False
    while time.time() - stopped < OUTAGE:
        # Without the webhook's series the fixed fault would stand again at once: the rules keep the last reset.
        assert run.uncleared() == [], f"the fixed fault stands again {time.time() - stopped:.0f}s into the outage"
        assert run.xid_alerts("pending") == []
        assert [a["activeAt"] for a in run.xid_alerts("firing")] in ([], [run.active_at])
        gap_seen = gap_seen or run.stack.query('up{job="gpu-health-webhook"} == 0') != []
        time.sleep(2)
    assert gap_seen, "Prometheus never saw the webhook down"
    run.webhook.start()
    wait_until(lambda: run.stack.query(f'up{{job="gpu-health-webhook",instance="{NEW_INSTANCE}"}}') == [1.0], 60,
               "Prometheus to scrape the webhook under its new instance")
    run.stack.wait_rule_evaluations(since=time.time(), rounds=3)
    assert run.uncleared() == []
    assert [a["activeAt"] for a in run.xid_alerts("firing")] in ([], [run.active_at])
    history = run.stack.query_series(f'gpu_remediation_successful_actions{{node="node-a",action="reset_gpu",'
                                     f'window="7d",instance="{NEW_INSTANCE}"}}')
    assert [float(s["value"][1]) for s in history] == [1.0]  # the journal's count, not a lifetime total
    assert not [a for a in run.stack.prometheus_alerts("firing") + run.stack.prometheus_alerts("pending")
                if a["labels"]["alertname"] in ("GPURepeatedResets", "GPUNodeRepeatedReboots")]
    assert len(run.mutations()) == calls and len(remediations(run.webhook, "node-a")) == rems
    report(f"history: webhook down {OUTAGE:.0f}s and back as {NEW_INSTANCE}: the fixed fault stayed fixed, "
           f"no escalation")
    run.done.add("restarted")


def test_the_fixed_fault_delivered_again_is_already_remediated(run: Run, report: Callable[[str], None]) -> None:
    """What the rules did before the latch: the fixed fault's alert resolves and fires again, a new occurrence with
    the old fault time. Prometheus cannot reach Alertmanager for a while, Alertmanager resolves the alert, and it
    fires anew (sent by the test, through Alertmanager and the shipped route, as Prometheus would send it)."""
    if "restarted" not in run.done:
        pytest.skip("needs the restart of the previous step")
    calls = len(run.mutations())
    scrape = [run.webhook.scrape_config(instance=NEW_INSTANCE)]
    run.stack.reload_prometheus(scrape, send_alerts=False)
    try:
        mine = next(a for a in run.stack.am_alerts() if a["labels"]["alertname"] == "GPUXidResetRequired"
                    and a["labels"]["node"] == "node-a")
        # Prometheus' last send was valid for 4 resend delays: then Alertmanager resolves it and tells the webhook.
        wait_until(lambda: [o for o in run.webhook.remediation(run.fixed_by)["occurrences"]
                            if o["status"] == "resolved"], 60, "Alertmanager to resolve the alert", interval=0.5)
        annotations = {**mine["annotations"], "fault_timestamp": f"{run.fault:.0f}"}
        run.stack.post_am_alerts([{"labels": mine["labels"], "annotations": annotations,
                                   "startsAt": datetime.now(UTC).isoformat()}])

        def refused() -> list[dict[str, Any]]:
            return [o for o in run.webhook.remediation(run.fixed_by)["occurrences"]
                    if o["decision"] == "already_remediated"]

        occ = wait_until(refused, 60, "the webhook to journal the old fault as already remediated", interval=0.5)
    finally:
        run.stack.reload_prometheus(scrape)
    assert occ[0]["fault_timestamp"] == float(f"{run.fault:.0f}") and "already remediated" in occ[0]["reason"]
    assert occ[0]["startsAt"] != run.webhook.remediation(run.fixed_by)["source"]["startsAt"]  # a new occurrence
    assert len(run.mutations()) == calls and len(remediations(run.webhook, "node-a")) == 1
    assert run.webhook.metric("gpu_remediation_webhook_alerts_total", decision="already_remediated") >= 1
    report("history: the fixed fault delivered again as a new occurrence -> already_remediated, no call")
    run.done.add("refused")


def test_three_new_faults_climb_to_replace_at_the_third_reset(run: Run, report: Callable[[str], None]) -> None:
    """Two new faults: two more resets, the third within 7 days (one before the webhook restart), and
    GPURepeatedResets asks for a replace, which the journal confirms. A third new fault finds the node being
    replaced: Alertmanager inhibits its alert (remediation=replace inhibits the lower rungs) and nothing more
    happens."""
    if "restarted" not in run.done:
        pytest.skip("needs the restart of the previous steps")
    instances = run.aws.instance_ids()
    for n in (2, 3):  # the resets of the GPU in the journal, with this one
        injected = time.time()
        run.stack.inject_xid("node-a", xid48(GPU))
        run.reset_once(injected)
        if n == 3:
            run.stack.inject_xid("node-a", xid48(GPU))  # the third new fault, right behind the third reset
            third = time.time()
        wait_until(lambda n=n: run.stack.query(f'max(gpu_remediation_successful_actions{{node="node-a",'
                                               f'action="reset_gpu",window="7d"}})') == [float(n)], 30,
                   f"Prometheus to see {n} resets")
        run.stack.wait_rule_evaluations(since=time.time(), rounds=2)
        escalations = [a for a in run.stack.prometheus_alerts("firing")
                       if a["labels"]["alertname"] == "GPURepeatedResets"]
        assert bool(escalations) == (n >= 3), (n, escalations)
    replace = wait_step(run.webhook, "node-a", "replace", 120, since=injected)
    assert replace["remediation"]["alertname"] == "GPURepeatedResets"
    assert replace["remediation"]["ladder"] == ["cordon", "drain", "replace"]
    fault = wait_until(lambda: [t for t in run.stack.query(
        'max(gpu_xid_last_timestamp_seconds{node="node-a",xid="48"})') if t >= third - 2], 30, "the third fault")[0]

    def inhibited() -> list[dict[str, Any]]:
        """The third fault's alert in Alertmanager, inhibited by the replace alert (the shipped inhibit_rules)."""
        return [a for a in run.stack.am_alerts() if a["labels"]["alertname"] == "GPUXidResetRequired"
                and a["labels"]["node"] == "node-a" and a["annotations"].get("fault_timestamp") == f"{fault:.0f}"
                and a["status"]["inhibitedBy"]]

    wait_until(inhibited, 60, "the third fault's alert, inhibited by the replace", interval=0.5)
    run.stack.wait_rule_evaluations(since=time.time() + 10, rounds=2, timeout=60)  # a repeat_interval on
    rems = remediations(run.webhook, "node-a")
    assert [r["alertname"] for r in rems].count("GPURepeatedResets") == 1
    assert [r["ladder"][-1] for r in rems].count("reset_gpu") == 3
    assert len(run.aws.instance_ids()) == len(instances) and run.aws.instance_ids() != instances
    report(f"history: 3 resets in 7 days (one before the webhook restart) -> GPURepeatedResets -> replace "
           f"{replace['finished_at'] - injected:.2f}s after the fault of the third reset; a third new fault is "
           f"inhibited by the replace and acted on no more")
