"""Rules propose, the journal decides: a fault older than the journal's last fix is already remediated, an
escalation whose history the journal does not hold is refused, the history the rules read is the journal's (gauges,
the same in every process), and a condition that persists after its rung climbs the ladder. Against kmock, with the
test playing the kubelet and the Job controller for the reset Jobs."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from remediation_webhook.cli import TEST_ONLY_NO_ALREADY_REMEDIATED, apply_test_only_switches
from remediation_webhook.config import build_config
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


async def test_the_test_only_switch_turns_the_already_remediated_check_off(harness, tmp_path, kube, caplog):
    """What the fleet soak's oracle-can-fail run relies on: with the switch, the same fixed fault acts again."""
    gpu_node(kube, "gpu-1")
    assert apply_test_only_switches(build_config(reset_config(tmp_path, kube), base=tmp_path),
                               {TEST_ONLY_NO_ALREADY_REMEDIATED: "0"}).safety.already_remediated_check
    h = await harness(reset_config(tmp_path, kube), env={TEST_ONLY_NO_ALREADY_REMEDIATED: "1"})
    assert "already-remediated check is off" in caplog.text
    fault = time.time() - 3600
    await h.post(notification(occurrence(RESET_GPU, minutes_ago=60, fault_ts=fault)))
    await reset_done(h, kube)
    out = await (await h.post(notification(occurrence(RESET_GPU, minutes_ago=2, fault_ts=fault)))).json()
    assert out["accepted"] == 1 and out["already_remediated"] == 0
    await reset_done(h, kube)
    assert [s for (s,) in h.sql("SELECT state FROM remediation")] == ["SUCCEEDED", "SUCCEEDED"]


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


REMAP = {"alertname": "GPURowRemapPending", "remediation": "reset_gpu", "gpu": "3", "uuid": UUID}


async def reset_for_a_condition(harness: Any, tmp_path: Any, kube: Any, ladder: list[str]) -> Any:
    """gpu-1's GPU 3 reset for a pending row remap (a condition: no fault_timestamp) under one rule whose ladder is
    `ladder` (replace: a person's record); the settle check is due only when the test says (due_now)."""
    gpu_node(kube, "gpu-1")
    raw = reset_config(tmp_path, kube, settle_time="1h")
    raw["policy"]["rules"] = [{"name": "gpu", "match_re": {"alertname": "GPU.*"}, "ladder": ladder,
                               "requires_approval": []}]
    h = await harness(raw)
    await h.post(notification(occurrence(REMAP, minutes_ago=5)))
    await reset_done(h, kube)
    assert h.sql("SELECT settle_at > 0 FROM remediation") == [(1,)]
    return h


def due_now(h: Any) -> None:
    h.journal.run_sync(lambda c: c.execute("UPDATE remediation SET settle_at=1 WHERE settle_at>0"))


def settled_reasons(h: Any) -> list[str]:
    return [json.loads(d)["reason"] for (d,) in h.sql("SELECT detail_json FROM audit WHERE event='settled'")]


async def test_a_condition_still_firing_after_its_reset_climbs_to_the_rules_next_rung(harness, tmp_path, kube):
    h = await reset_for_a_condition(harness, tmp_path, kube, ["cordon", "drain", "reset_gpu", "replace"])
    due_now(h)
    # Still active in Alertmanager: the remediation reopens at replace (a person's record on bare metal).
    await h.until_state("gpu-1", "NEEDS_HUMAN")
    rid, ladder = h.sql("SELECT id, ladder_json FROM remediation")[0]
    assert json.loads(ladder) == ["cordon", "drain", "reset_gpu", "replace"]
    events = [e for (e,) in h.sql("SELECT event FROM audit WHERE remediation_id=? ORDER BY id", rid)]
    assert "escalated_by_persistence" in events
    assert [a for (a,) in h.sql("SELECT action FROM step WHERE state='SUCCEEDED' ORDER BY seq")][-1] == "replace"
    assert len(h.sql("SELECT id FROM remediation")) == 1


async def test_a_condition_still_firing_after_the_last_rung_goes_to_a_person(harness, tmp_path, kube):
    h = await reset_for_a_condition(harness, tmp_path, kube, ["cordon", "drain", "reset_gpu"])
    due_now(h)
    await h.until_state("gpu-1", "NEEDS_HUMAN")
    assert "the last rung of rule gpu" in h.sql("SELECT reason FROM remediation")[0][0]


async def test_a_condition_that_resolved_or_whose_node_a_person_uncordoned_does_not_climb(harness, tmp_path, kube):
    h = await reset_for_a_condition(harness, tmp_path, kube, ["cordon", "drain", "reset_gpu", "replace"])
    kube.uncordon("gpu-1")  # a person put the node back in service after the reset
    due_now(h)
    await h.drive_until(lambda: settled_reasons(h), what="the settle check")
    assert "people win" in settled_reasons(h)[0]
    assert h.states() == {"gpu-1": "SUCCEEDED"} and kube.cordoned() == []
    # Another reset, whose alert then resolves: fixed, nothing climbs.
    kube.add_pod("team-a", "train", "gpu-1")
    again = occurrence(REMAP, minutes_ago=1)
    await h.post(notification(again))
    await reset_done(h, kube)
    await h.post(notification({**again, "status": "resolved"}))
    due_now(h)
    await h.drive_until(lambda: len(settled_reasons(h)) == 2, what="the second settle check")
    assert settled_reasons(h)[1] == "its alert resolved: fixed"
    assert [s for (s,) in h.sql("SELECT state FROM remediation")] == ["SUCCEEDED", "SUCCEEDED"]


async def test_only_a_rung_that_can_fix_waits_to_settle(harness, tmp_path, kube):
    """A cordon or a drain fixes nothing (a person's turn): such a condition rightly fires on and never climbs;
    an event fault (fault_timestamp) is judged by its time, not by persistence."""
    gpu_node(kube, "gpu-1")
    kube.add_node("n2")
    raw = reset_config(tmp_path, kube, settle_time="1h")
    raw["safety"]["fleet_cap"] = {"max_nodes": 4, "max_percent": 100}
    h = await harness(raw)
    await h.post(notification(alert("n2", alertname="GPUPCIeLinkWidthDegraded", remediation="cordon")))
    await h.until_state("n2", "SUCCEEDED")
    await h.post(notification(occurrence(RESET_GPU, minutes_ago=2, fault_ts=time.time() - 120)))
    await reset_done(h, kube)
    assert h.sql("SELECT node, settle_at FROM remediation ORDER BY node") == [("gpu-1", 0.0), ("n2", 0.0)]


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


async def test_a_recurrence_refused_in_the_cooldown_does_not_swallow_the_next_one(harness, tmp_path, kube):
    gpu_node(kube, "gpu-1")
    raw = reset_config(tmp_path, kube)
    raw["safety"]["per_node"] = {"cooldown": "1h", "max_attempts": 50}
    h = await harness(raw)
    a = occurrence(RESET_GPU, minutes_ago=10, fault_ts=time.time() - 600)
    await h.post(notification(a))
    await reset_done(h, kube)
    # The same alert keeps firing with a new fault in the cooldown: refused (the cooldown is the policy's).
    again = {**a, "annotations": {**a["annotations"], "fault_timestamp": f"{time.time() + 1:.0f}"}}
    assert (await (await h.post(notification(again))).json())["refused"] == 1
    # The cooldown ends (here: is lifted), and the next fault on that alert is decided again, not a duplicate.
    h.journal.run_sync(lambda c: c.execute("UPDATE remediation SET finished_at=finished_at-7200"))
    later = {**a, "annotations": {**a["annotations"], "fault_timestamp": f"{time.time() + 2:.0f}"}}
    assert (await (await h.post(notification(later))).json())["accepted"] == 1
    await reset_done(h, kube)


async def test_the_escalation_history_must_be_the_machines_now_under_the_name(harness, tmp_path, kube):
    """Three resets in the journal by node name, two of them on a machine that someone else recreated under the
    name since (an instance group's auto-heal): the journal's count by name says yes, the machine's says no."""
    from datetime import UTC, datetime, timedelta

    joined = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    gpu_node(kube, "gpu-1")
    h = await harness(reset_config(tmp_path, kube))
    earlier_resets(h, kube, 3, 2)  # before the machine now under the name joined
    kube.delete_node("gpu-1")
    kube.add_node("gpu-1", created=joined)
    patch_status(kube, "gpu-1", {"capacity": {"nvidia.com/gpu": "8"}, "allocatable": {"nvidia.com/gpu": "7"}})
    await h.post(notification(occurrence(RESET_GPU, minutes_ago=5, fault_ts=time.time() - 300)))
    await reset_done(h, kube)
    assert (await (await h.post(notification(repeated(minutes_ago=1)))).json())["accepted"] == 1
    await h.until_state("gpu-1", "REFUSED")
    reason = h.sql("SELECT reason FROM remediation WHERE alertname='GPURepeatedResets'")[0][0]
    assert "1 successful reset_gpu" in reason and "since this machine joined" in reason
    assert not [c for c in kube.calls(mutating=True) if "gpu-1" in c[1] and c[0] == "PATCH"][1:]


async def test_a_dry_run_escalation_counts_the_live_resets(harness, tmp_path, kube):
    """Live resets, and a replace rule left in dry-run: the dry-run record shows what live would do (replace), not
    an escalation refused for want of dry-run history."""
    gpu_node(kube, "gpu-1")
    raw = reset_config(tmp_path, kube)
    raw["policy"]["rules"][0]["dry_run"] = True
    h = await harness(raw)
    earlier_resets(h, kube, 2, 1)
    await h.post(notification(occurrence(RESET_GPU, minutes_ago=5, fault_ts=time.time() - 300)))
    await reset_done(h, kube)
    assert (await (await h.post(notification(repeated(minutes_ago=1)))).json())["accepted"] == 1
    await h.until_state("gpu-1", "DRY_RUN_RECORDED")


async def test_a_fault_fixed_live_is_already_remediated_in_dry_run_too(harness, tmp_path, kube):
    gpu_node(kube, "gpu-1")
    h = await harness(reset_config(tmp_path, kube, dry_run=True))
    earlier_resets(h, kube, 0.5)  # a live reset 12 hours ago (before the webhook went to dry-run)
    out = await h.post(notification(occurrence(RESET_GPU, minutes_ago=5, fault_ts=time.time() - 86400)))
    assert (await out.json())["already_remediated"] == 1
