"""Rules propose, the journal decides: a fault older than the journal's last fix is already remediated, an
escalation whose history the journal does not hold is refused, the history the rules read is the journal's (gauges,
the same in every process), and a condition that persists after its rung climbs the ladder. Against kmock, with the
test playing the kubelet and the Job controller for the reset Jobs."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from remediation_webhook.executor import job_name
from tests.providers.fakes.support import UUID, finish_job, gpu_node, job, patch_status
from tests.webhook.webhook_support import alert, await_for, base_config, notification

RESET_GPU = {"alertname": "GPUXidResetRequired", "remediation": "reset_gpu", "gpu": "3", "uuid": UUID}
REPEATED = {"alertname": "GPURepeatedResets", "remediation": "replace", "gpu": "3", "uuid": UUID}


def reset_config(tmp_path: Any, kube: Any, **policy: Any) -> dict[str, Any]:
    """cordon -> drain -> reset_gpu, and cordon -> drain -> replace (a person, on bare metal) for the escalation
    alert; no cooldown, nothing waits for approval."""
    rules = [{"name": "escalation", "match": {"alertname": "GPURepeatedResets"},
              "ladder": ["cordon", "drain", "replace"], "requires_approval": []},
             {"name": "gpu", "match_re": {"alertname": "GPU.*"}, "ladder": ["cordon", "drain", "reset_gpu"]}]
    return base_config(tmp_path, kube.url,
                       executor={"namespace": "gpu-health", "image": "nvcr.io/nvidia/cuda:12.4.1-base-ubuntu22.04",
                                 "poll_interval": "20ms", "job_timeout": "5s"},
                       providers={"human": {}},
                       policy={"dry_run": False, "rules": rules, **policy},
                       safety={"per_node": {"cooldown": "0s", "max_attempts": 50},
                               "rate_limits": {"drain": {"max": 50, "per": "1h"}}},
                       actions={"drain": {"poll_interval": "20ms", "timeout": "5s"}, "replace": {"using": "human"},
                                "reset_gpu": {"verify_timeout": "5s", "verify_interval": "20ms"}})


def occurrence(labels: dict[str, str], *, minutes_ago: float, fault_ts: float | None = None,
               **annotations: str) -> dict[str, Any]:
    """One occurrence of an alert on gpu-1 (its startsAt `minutes_ago`), with a fault time and annotations."""
    a = alert("gpu-1", starts_at=datetime.now(UTC) - timedelta(minutes=minutes_ago), **labels)
    if fault_ts is not None:
        a["annotations"]["fault_timestamp"] = f"{fault_ts:.0f}"
    a["annotations"].update(annotations)
    return a


def repeated(minutes_ago: float) -> dict[str, Any]:
    return occurrence(REPEATED, minutes_ago=minutes_ago, history_action="reset_gpu", history_window="7d",
                      history_min="3")


async def reset_done(h: Any, kube: Any) -> str:
    """Play the kubelet and the device plugin for the remediation in flight on gpu-1: its reset Job succeeds."""
    rows = await await_for(lambda: h.sql("SELECT id FROM remediation WHERE node='gpu-1' AND state IN "
                                         "('PLANNED','RUNNING','BLOCKED')"), what="a remediation in flight")
    rid = str(rows[0][0])
    name = job_name("reset_gpu", rid)
    await await_for(lambda: job(kube, name), what=f"job {name}")
    finish_job(kube, name)
    patch_status(kube, "gpu-1", {"allocatable": {"nvidia.com/gpu": "8"}})
    await h.until_state("gpu-1", "SUCCEEDED")
    return rid


def earlier_resets(h: Any, kube: Any, *days_ago: float) -> None:
    """Successful resets of GPU 3 of gpu-1 that days ago, as a journal that has run that long holds them."""
    node_uid = kube.node("gpu-1")["metadata"]["uid"]
    for days in days_ago:
        at = time.time() - days * 86400
        h.journal.run_sync(lambda c, at=at: c.execute(
            "INSERT INTO history(remediation_id, node, node_uid, gpu, uuid, action, dry_run, started_at, finished_at) "
            "VALUES ('earlier', 'gpu-1', ?, '3', ?, 'reset_gpu', 0, ?, ?)", (node_uid, UUID, at, at)))


async def reset_harness(harness: Any, tmp_path: Any, kube: Any, **policy: Any) -> Any:
    gpu_node(kube, "gpu-1")
    return await harness(reset_config(tmp_path, kube, **policy))


async def test_a_fault_older_than_the_last_fix_is_already_remediated_and_a_newer_one_acts(harness, tmp_path, kube):
    h = await reset_harness(harness, tmp_path, kube)
    fault = time.time() - 3600
    assert (await (await h.post(notification(occurrence(RESET_GPU, minutes_ago=60, fault_ts=fault)))).json())[
        "accepted"] == 1
    fixed_by = await reset_done(h, kube)
    fixed_at = h.sql("SELECT finished_at FROM history WHERE action='reset_gpu'")[0][0]
    calls = len(kube.calls(mutating=True))
    # A scrape gap made the fixed fault's alert fire again: a new occurrence (a new startsAt), the same old fault.
    out = await (await h.post(notification(occurrence(RESET_GPU, minutes_ago=2, fault_ts=fault)))).json()
    assert out["already_remediated"] == 1 and out["accepted"] == 0 and out["remediation_ids"] == []
    await h.settle()
    assert len(kube.calls(mutating=True)) == calls
    assert [s for (s,) in h.sql("SELECT state FROM remediation")] == ["SUCCEEDED"]
    decision, reason, linked = h.sql("SELECT decision, reason, remediation_id FROM occurrence ORDER BY first_seen")[1]
    assert decision == "already_remediated" and linked == fixed_by and "already remediated" in reason
    record = json.loads(h.sql("SELECT detail_json FROM audit WHERE event='already_remediated'")[0][0])
    assert record == {"fingerprint": record["fingerprint"], "startsAt": record["startsAt"],
                      "fault_timestamp": float(f"{fault:.0f}"), "fixed_by": fixed_by, "action": "reset_gpu",
                      "finished_at": fixed_at, "node_uid": h.sql("SELECT node_uid FROM remediation")[0][0]}
    assert h.metric("gpu_remediation_webhook_alerts_total", decision="already_remediated") == 1
    # A fault after the fix, on the same GPU: acted on.
    out = await (await h.post(notification(occurrence(RESET_GPU, minutes_ago=1, fault_ts=time.time() + 1)))).json()
    assert out["accepted"] == 1
    await reset_done(h, kube)
    assert [s for (s,) in h.sql("SELECT state FROM remediation ORDER BY created_at")] == ["SUCCEEDED", "SUCCEEDED"]


async def test_a_fix_of_another_gpu_or_a_lower_rung_does_not_count(harness, tmp_path, kube):
    h = await reset_harness(harness, tmp_path, kube)
    fault = time.time() - 600
    # A reset of GPU 5 and a drain of the node, both after the fault: neither fixes GPU 3's reset-class fault.
    other = "GPU-99999999-2222-3333-4444-555555555555"
    await h.post(notification(occurrence({**RESET_GPU, "gpu": "5", "uuid": other}, minutes_ago=5)))
    await reset_done(h, kube)
    out = await (await h.post(notification(occurrence(RESET_GPU, minutes_ago=1, fault_ts=fault)))).json()
    assert out["accepted"] == 1 and out["already_remediated"] == 0
    await reset_done(h, kube)


async def test_an_escalation_the_journal_does_not_confirm_is_refused(harness, tmp_path, kube):
    h = await reset_harness(harness, tmp_path, kube)
    # Two resets 12 days ago (outside the 7 days the alert claims) and one today.
    earlier_resets(h, kube, 12.5, 12)
    await h.post(notification(occurrence(RESET_GPU, minutes_ago=30, fault_ts=time.time() - 1800)))
    await reset_done(h, kube)
    calls = len(kube.calls(mutating=True))
    # A recreated webhook pod made Prometheus count lifetime totals: it asks for a replace the journal cannot back.
    out = await (await h.post(notification(repeated(minutes_ago=1)))).json()
    assert out["unconfirmed"] == 1 and out["accepted"] == 0
    reason = h.sql("SELECT reason FROM occurrence WHERE decision='unconfirmed'")[0][0]
    assert reason == ("escalation not confirmed by the journal: 1 successful reset_gpu of GPU " + UUID + " of gpu-1 "
                      "within 7d (since its last replace), the alert claims at least 3")
    await h.settle()
    assert len(kube.calls(mutating=True)) == calls
    assert h.metric("gpu_remediation_actions_total", node="gpu-1", gpu="", uuid="", action="replace",
                    result="blocked") == 1
    assert h.metric("gpu_remediation_successful_actions", node="gpu-1", gpu="3", uuid=UUID, action="reset_gpu",
                    window="7d") == 1
    assert h.metric("gpu_remediation_successful_actions", node="gpu-1", gpu="3", uuid=UUID, action="reset_gpu",
                    window="30d") == 3
    # Two more resets this week: now the journal holds the three the alert claims, and the replace goes ahead.
    for minutes in (20, 10):
        await h.post(notification(occurrence(RESET_GPU, minutes_ago=minutes, fault_ts=time.time() + 1)))
        await reset_done(h, kube)
    out = await (await h.post(notification(repeated(minutes_ago=0.5)))).json()
    assert out["accepted"] == 1
    await h.until_state("gpu-1", "NEEDS_HUMAN")  # the bare-metal replace: a person's record
    # After the replace, the node's history starts again.
    await h.engine.refresh_gauges()
    assert h.metric("gpu_remediation_successful_actions", node="gpu-1", gpu="3", uuid=UUID, action="reset_gpu",
                    window="7d") is None


async def test_history_gauges_are_the_journals_in_every_process(harness, tmp_path, kube):
    """A restarted or recreated webhook publishes the same history: gauges from the journal, not counters that a
    young series would show as lifetime totals in a 7-day window."""
    h = await reset_harness(harness, tmp_path, kube)
    await h.post(notification(occurrence(RESET_GPU, minutes_ago=5, fault_ts=time.time() - 300)))
    await reset_done(h, kube)
    await h.engine.refresh_gauges()
    before = (await (await h.client.get("/metrics")).text())
    await h.engine.stop()
    h.journal.close()
    h2 = await harness(reset_config(tmp_path, kube))
    after = (await (await h2.client.get("/metrics")).text())

    def history(text: str) -> list[str]:
        return sorted(line for line in text.splitlines() if line.startswith(
            ("gpu_remediation_successful_actions{", "gpu_remediation_last_success_timestamp_seconds{")))

    # cordon, drain and reset_gpu: the count in two windows and the last success
    assert history(before) == history(after) and len(history(after)) == 9
    assert 'action="reset_gpu",gpu="3",node="gpu-1",uuid="' + UUID + '",window="7d"} 1.0' in after


async def cordoned_for_a_condition(harness: Any, kube: Any) -> Any:
    """n1 (with a pod) cordoned for GPUNVLinkDown, a condition (no fault_timestamp); cordon -> drain; settle 100ms."""
    kube.add_node("n1")
    kube.add_pod("team-a", "train", "n1")
    h = await harness(policy={"dry_run": False, "settle_time": "100ms", "rules": [
        {"name": "gpu", "match_re": {"alertname": "GPU.*"}, "ladder": ["cordon", "drain"]}]})
    await h.post(notification(alert("n1", alertname="GPUNVLinkDown", remediation="cordon")))
    await h.until_state("n1", "SUCCEEDED")
    return h


async def test_a_condition_still_firing_after_its_rung_climbs_the_ladder(harness, tmp_path, kube):
    """GPU.* alerts here have no fault_timestamp: conditions. Still firing a settle time after cordon succeeded, the
    remediation climbs to drain; still firing after drain, the last rung, a person is called."""
    h = await cordoned_for_a_condition(harness, kube)
    assert kube.pods("n1") == ["team-a/train"]
    # reopened at drain, drained, succeeded again
    await h.drive_until(lambda: kube.pods("n1") == [] and h.states() == {"n1": "SUCCEEDED"}, what="the climb")
    rid, ladder = h.sql("SELECT id, ladder_json FROM remediation")[0]
    assert json.loads(ladder) == ["cordon", "drain"]
    events = [e for (e,) in h.sql("SELECT event FROM audit WHERE remediation_id=? ORDER BY id", rid)]
    assert "escalated_by_persistence" in events
    time.sleep(0.15)
    await h.until_state("n1", "NEEDS_HUMAN")
    assert "the last rung of rule gpu" in h.sql("SELECT reason FROM remediation")[0][0]
    assert len(h.sql("SELECT id FROM remediation")) == 1


async def test_a_condition_that_resolves_or_an_event_fault_does_not_climb(harness, tmp_path, kube, am):
    for n in ("n1", "n2"):
        kube.add_node(n)
        kube.add_pod("team-a", f"train-{n}", n)
    h = await harness(policy={"dry_run": False, "settle_time": "100ms", "rules": [
        {"name": "gpu", "match_re": {"alertname": "GPU.*"}, "ladder": ["cordon", "drain"]}]},
        safety={"fleet_cap": {"max_nodes": 4, "max_percent": 100}})
    condition = alert("n1", alertname="GPUNVLinkDown", remediation="cordon")
    event = alert("n2", alertname="GPUXidFatal", remediation="cordon")
    event["annotations"]["fault_timestamp"] = f"{time.time() - 60:.0f}"
    await h.post(notification(condition, event))
    await h.settle()
    await h.post(notification({**condition, "status": "resolved"}))
    time.sleep(0.15)
    await h.settle()
    assert h.states() == {"n1": "SUCCEEDED", "n2": "SUCCEEDED"}
    assert sorted(kube.pods(n) for n in ("n1", "n2")) == [["team-a/train-n1"], ["team-a/train-n2"]]
    assert h.sql("SELECT settle_at FROM remediation") == [(0.0,), (0.0,)]
    settled = [json.loads(d)["reason"] for (d,) in h.sql("SELECT detail_json FROM audit WHERE event='settled'")]
    assert settled == ["its alert resolved: fixed"]


async def test_a_person_who_uncordons_after_the_rung_stops_the_climb(harness, tmp_path, kube):
    h = await cordoned_for_a_condition(harness, kube)
    kube.uncordon("n1")
    time.sleep(0.15)
    await h.settle()
    assert h.states() == {"n1": "SUCCEEDED"} and kube.pods("n1") == ["team-a/train"] and kube.cordoned() == []
    reason = json.loads(h.sql("SELECT detail_json FROM audit WHERE event='settled'")[0][0])["reason"]
    assert "people win" in reason



async def test_a_confirmed_escalation_passes_the_cooldown_of_the_rung_below(harness, tmp_path, kube):
    """GPURepeatedResets fires right after the third reset, under another rule than the resets: the node's cooldown
    would refuse it for good. Its history is confirmed by the journal, so it escalates; a plain alert does not."""
    gpu_node(kube, "gpu-1")
    raw = reset_config(tmp_path, kube)
    raw["safety"]["per_node"] = {"cooldown": "1h", "max_attempts": 50}
    h = await harness(raw)
    earlier_resets(h, kube, 3, 2)
    await h.post(notification(occurrence(RESET_GPU, minutes_ago=5, fault_ts=time.time() - 300)))
    await reset_done(h, kube)
    plain = occurrence({**REPEATED, "gpu": "4"}, minutes_ago=1)  # a replace that claims no history
    out = await (await h.post(notification(plain, repeated(minutes_ago=1)))).json()
    assert (out["refused"], out["accepted"]) == (1, 1)
    assert "cooldown" in h.sql("SELECT reason FROM remediation WHERE state='REFUSED'")[0][0]
    await h.until_state("gpu-1", "NEEDS_HUMAN")  # the replace ran: a person's record on bare metal
