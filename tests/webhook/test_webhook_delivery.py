"""Deliveries through the aiohttp test client: at-least-once duplicates, mixed groups, silences, storms."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from tests.webhook.webhook_support import alert, notification
from remediation_webhook.alertmanager import AlertState


def _live(ladder=("cordon",), **rule):
    return {"dry_run": False, "rules": [{"name": "gpu", "match_re": {"alertname": "GPU.*"}, "ladder": list(ladder),
                                         **rule}]}


async def test_same_notification_n_times_is_one_remediation(harness, kube):
    kube.add_node("n1")
    h = await harness()
    body = notification(alert("n1"))
    answers = [await (await h.post(body)).json() for _ in range(5)]
    assert answers[0]["accepted"] == 1 and all(a["duplicates"] == 1 and a["accepted"] == 0 for a in answers[1:])
    await h.settle()
    for _ in range(3):  # re-sends after completion are duplicates too, never re-executed
        assert (await (await h.post(body)).json())["duplicates"] == 1
    await h.settle()
    assert h.states() == {"n1": "SUCCEEDED"}
    assert h.sql("SELECT deliveries FROM occurrence") == [(8,)]
    assert len([c for c in kube.calls(mutating=True) if c[0] == "PATCH"]) == 1
    assert h.metric("gpu_remediation_webhook_duplicate_alerts_total") == 7
    assert h.metric("gpu_remediation_actions_total", node="n1", gpu="", uuid="", action="cordon",
                    result="success") == 1


async def test_a_new_occurrence_while_one_is_active_is_merged(harness, kube):
    kube.add_node("n1")
    h = await harness(policy=_live(requires_approval=["cordon"]))
    await h.post(notification(alert("n1", fingerprint="aa")))
    out = await (await h.post(notification(alert("n1", fingerprint="bb", alertname="GPUOther")))).json()
    assert out["merged"] == 1 and out["accepted"] == 0
    assert len(h.sql("SELECT id FROM remediation")) == 1


async def test_mixed_firing_and_resolved_group_only_the_firing_alert_acts(harness, kube):
    kube.add_node("n1")
    kube.add_node("n2")
    h = await harness()
    body = notification(alert("n1"), alert("n2", status="resolved"))
    assert body["status"] == "firing"
    out = await (await h.post(body)).json()
    assert out["accepted"] == 1 and out["ignored"] == 1
    await h.settle()
    assert h.states() == {"n1": "SUCCEEDED"}
    assert kube.cordoned() == ["n1"]


async def test_resolved_only_notification_does_nothing(harness, kube):
    kube.add_node("n1")
    h = await harness()
    out = await (await h.post(notification(alert("n1", status="resolved")))).json()
    assert out["ignored"] == 1 and out["accepted"] == 0
    await h.settle()
    assert kube.calls(mutating=True) == [] and h.states() == {}


async def test_alert_silenced_between_delivery_and_action_is_not_acted_on(harness, kube, am):
    kube.add_node("n1")
    h = await harness(policy=_live(requires_approval=["cordon"]))
    a = alert("n1")
    await h.post(notification(a))
    await h.settle()
    assert h.states() == {"n1": "AWAITING_APPROVAL"}
    am.states[a["fingerprint"]] = AlertState.SILENCED  # a human added a silence: a veto
    rid = h.sql("SELECT id FROM remediation")[0][0]
    await h.admin.post(f"/v1/remediations/{rid}:approve", json={"reason": "looks right"})
    await h.settle()
    assert h.states() == {"n1": "CANCELLED"}
    assert kube.calls(mutating=True) == []
    steps = h.sql("SELECT action, state, detail FROM step")
    assert steps == [("cordon", "CANCELLED", "the alert is silenced in Alertmanager")]
    assert h.metric("gpu_remediation_actions_total", node="n1", gpu="", uuid="", action="cordon",
                    result="blocked") == 1


async def test_alert_gone_from_alertmanager_is_held_then_cancelled(harness, kube, am):
    """Alertmanager no longer has the alert: nothing acts, and the plan waits policy.resolved_hold for the same
    alert to fire again (Alertmanager resolves alerts it has not heard of for a while) before it is cancelled."""
    kube.add_node("n1")
    h = await harness(policy={**_live(), "resolved_hold": "300ms"})
    a = alert("n1")
    am.states[a["fingerprint"]] = AlertState.GONE
    await h.post(notification(a))
    await h.settle()
    assert h.states() == {"n1": "HELD"} and kube.calls(mutating=True) == []
    time.sleep(0.35)
    await h.settle()
    assert h.states() == {"n1": "CANCELLED"} and kube.calls(mutating=True) == []
    assert "did not fire again" in h.sql("SELECT reason FROM remediation")[0][0]


async def test_alert_unknown_to_a_freshly_restarted_alertmanager_waits_instead_of_cancelling(harness, kube, am):
    kube.add_node("n1")
    h = await harness()
    a = alert("n1")
    # Alertmanager restarted a minute ago and Prometheus has not re-sent the alert yet.
    am.states[a["fingerprint"]] = AlertState.RESTARTED
    await h.post(notification(a))
    await h.settle()
    assert h.states() == {"n1": "BLOCKED"} and kube.calls(mutating=True) == []
    assert h.sql("SELECT state FROM step") == []  # nothing cancelled: the step is still to come


async def test_200_alerts_for_200_nodes_trip_the_breaker_and_respect_the_cap(harness, kube):
    for i in range(200):
        kube.add_node(f"gpu-{i:03d}")
    h = await harness()
    assert h.engine.pool == 200
    out = await (await h.post(notification(*(alert(f"gpu-{i:03d}") for i in range(200))))).json()
    assert "nodes alerting" in out["breaker_tripped"]
    await h.settle(timeout=60)  # 200 nodes on a busy 2-core CI machine: a deadline, not a sleep
    cap = h.services.config.safety.fleet_cap(200)
    assert cap == 4
    assert len(kube.cordoned()) <= cap
    states = h.states()
    assert len(states) == 200 and set(states.values()) == {"BLOCKED"}
    assert h.metric("gpu_remediation_breaker_open") == 1
    # the breaker stays open: a later, calm delivery still does not act
    kube.add_node("late")
    await h.post(notification(alert("late")))
    await h.settle()
    assert kube.calls(mutating=True) == []


async def test_storm_across_deliveries_trips_and_caps(harness, kube):
    for i in range(30):
        kube.add_node(f"gpu-{i:03d}")
    h = await harness(safety={"fleet_cap": {"max_nodes": 3, "max_percent": 100}, "breaker": {"max_nodes": 8}})
    for i in range(30):
        await h.post(notification(alert(f"gpu-{i:03d}")))
        await h.settle()
    assert len(kube.cordoned()) == 3
    assert h.metric("gpu_remediation_breaker_open") == 1
    states = list(h.states().values())
    assert states.count("SUCCEEDED") == 3


async def test_truncated_alerts_trip_the_breaker(harness, kube):
    kube.add_node("n1")
    h = await harness()
    out = await (await h.post(notification(alert("n1"), truncated=5))).json()
    assert "truncated" in out["breaker_tripped"]
    await h.settle()
    assert kube.calls(mutating=True) == []


async def test_storm_meta_alert_trips_the_breaker(harness, kube):
    kube.add_node("n1")
    h = await harness()
    out = await (await h.post(notification(alert("cluster", alertname="GPURemediationStorm", remediation="none"),
                                           alert("n1")))).json()
    assert "GPURemediationStorm" in out["breaker_tripped"]
    await h.settle()
    assert kube.calls(mutating=True) == []


async def test_fleet_cap_counts_in_flight_and_blocks_the_rest(harness, kube):
    for i in range(5):
        kube.add_node(f"n{i}")
    h = await harness(policy=_live(requires_approval=["cordon"]),
                      safety={"fleet_cap": {"max_nodes": 2, "max_percent": 100}, "breaker": {"max_nodes": 50, "max_percent": 100}})
    for i in range(5):
        await h.post(notification(alert(f"n{i}")))
    await h.settle()
    for rid, in h.sql("SELECT id FROM remediation"):
        await h.admin.post(f"/v1/remediations/{rid}/approve")
    await h.settle()
    assert len(kube.cordoned()) == 2
    states = sorted(h.states().values())
    assert states.count("SUCCEEDED") == 2 and states.count("BLOCKED") == 3
    assert "fleet cap" in h.sql("SELECT reason FROM remediation WHERE state='BLOCKED'")[0][0]
    assert h.metric("gpu_remediation_budget_remaining", budget="fleet_cap") == 0


async def test_a_gone_or_replaced_node_gives_its_fleet_cap_slot_back(harness, kube):
    """Undo is off: our cordon marks stay, and hold the fleet cap, only while the machine we cordoned exists."""
    for name in ("gone", "swapped", "waiting"):
        kube.add_node(name)
    h = await harness(policy=_live(), safety={"fleet_cap": {"max_nodes": 2, "max_percent": 100},
                                              "breaker": {"max_nodes": 50, "max_percent": 100}})
    for name in ("gone", "swapped"):
        await h.post(notification(alert(name)))
    await h.settle()  # these two take the cap's two slots before the third alert arrives
    await h.post(notification(alert("waiting")))
    await h.settle()
    assert h.states() == {"gone": "SUCCEEDED", "swapped": "SUCCEEDED", "waiting": "BLOCKED"}
    await h.engine._refresh_pool(force=True)  # both machines still there: their marks hold
    assert len(h.sql("SELECT node FROM node_mark")) == 2
    kube.delete_node("gone")  # replaced: the cloud removed the Node...
    kube.delete_node("swapped")
    kube.add_node("swapped")  # ...or a new machine registered under the old name (another uid)
    await h.engine._refresh_pool(force=True)
    assert h.sql("SELECT node FROM node_mark") == []
    reasons = sorted(r[0] for r in h.sql("SELECT detail_json FROM audit WHERE event='mark_cleared'"))
    assert len(reasons) == 2 and "another machine" in reasons[0] and "is gone" in reasons[1]
    await h.until_state("waiting", "SUCCEEDED")
    assert "waiting" in kube.cordoned()


async def test_rate_limit_per_action_class(harness, kube):
    for i in range(3):
        kube.add_node(f"n{i}")
    h = await harness(safety={"rate_limits": {"cordon": {"max": 1, "per": "1h"}}, "breaker": {"max_nodes": 50, "max_percent": 100},
                              "fleet_cap": {"max_nodes": 10, "max_percent": 100}})
    for i in range(3):
        await h.post(notification(alert(f"n{i}")))
    await h.settle()
    assert len(kube.cordoned()) == 1
    assert sorted(h.states().values()) == ["BLOCKED", "BLOCKED", "SUCCEEDED"]
    assert "rate limit for cordon" in h.sql("SELECT reason FROM remediation WHERE state='BLOCKED'")[0][0]


async def test_cooldown_refuses_the_same_rung_and_lets_an_escalation_through(harness, kube):
    kube.add_node("n1")
    kube.add_pod("team-a", "job", "n1")
    h = await harness(policy=_live(("cordon", "drain")))
    await h.post(notification(alert("n1", fingerprint="01")))
    await h.settle()
    await h.post(notification(alert("n1", fingerprint="02", alertname="GPUOther")))
    await h.settle()
    refused = h.sql("SELECT reason FROM remediation WHERE state='REFUSED'")
    assert refused and "cooldown" in refused[0][0]
    await h.post(notification(alert("n1", fingerprint="03", remediation="drain")))
    await h.settle()
    assert sorted(s for _, s in h.sql("SELECT node, state FROM remediation")) == ["REFUSED", "SUCCEEDED", "SUCCEEDED"]
    assert kube.pods("n1") == []
    patches = [c[2] for c in kube.calls(mutating=True) if c[0] == "PATCH"]
    # the second cordon only hands our existing cordon over to the new remediation id; it is never lifted
    assert len(patches) == 2 and "gpu-health.io/prior-unschedulable" not in patches[1]["metadata"]["annotations"]


async def test_attempt_cap_sends_the_node_to_a_human(harness, kube):
    kube.add_node("n1")
    h = await harness(safety={"per_node": {"cooldown": "0s", "max_attempts": 2}})
    for i in range(3):
        await h.post(notification(alert("n1", fingerprint=f"0{i}")))
        await h.settle()
    states = [s for (s,) in h.sql("SELECT state FROM remediation ORDER BY created_at")]
    assert states == ["SUCCEEDED", "SUCCEEDED", "REFUSED"]
    assert "attempt cap" in h.sql("SELECT reason FROM remediation WHERE state='REFUSED'")[0][0]


async def test_default_deny_and_unknown_remediation(harness, kube):
    kube.add_node("n1")
    h = await harness()
    out = await (await h.post(notification(alert("n1", alertname="DiskFull"), alert("n1", remediation="reboot",
                                                                                    fingerprint="ff")))).json()
    assert out["refused"] == 2 and out["accepted"] == 0
    await h.settle()
    assert kube.calls(mutating=True) == []
    # refused before the inventory was asked: a node name never resolved counts in the overflow series
    assert h.metric("gpu_remediation_actions_total", node="_unresolved", gpu="", uuid="", action="reboot",
                    result="blocked") == 1
    assert h.metric("gpu_remediation_actions_total", node="n1", gpu="", uuid="", action="reboot",
                    result="blocked") is None


async def test_stale_and_future_alerts(harness, kube):
    kube.add_node("n1")
    h = await harness()
    old = alert("n1", starts_at=datetime.now(UTC) - timedelta(days=2))
    future = alert("n1", fingerprint="fe", starts_at=datetime.now(UTC) + timedelta(hours=1))
    out = await (await h.post(notification(old, future))).json()
    assert out["refused"] == 1 and out["rejected"] == 1


async def test_pause_blocks_before_the_next_step_and_resume_continues(harness, kube):
    kube.add_node("n1")
    h = await harness()
    assert (await h.admin.post("/v1/pause", json={"reason": "maintenance"})).status == 200
    await h.post(notification(alert("n1")))
    await h.settle()
    assert h.states() == {"n1": "PLANNED"} and kube.calls(mutating=True) == []  # the backlog waits
    assert h.metric("gpu_remediation_paused") == 1
    assert (await h.admin.delete("/v1/pause")).status == 200
    await h.settle()
    assert h.states() == {"n1": "SUCCEEDED"}


async def test_resolved_after_success_never_undoes_by_default(harness, kube):
    kube.add_node("n1")
    h = await harness()
    a = alert("n1")
    await h.post(notification(a))
    await h.settle()
    await h.post(notification({**a, "status": "resolved"}))
    await h.settle()
    assert kube.cordoned() == ["n1"]
    assert h.states() == {"n1": "SUCCEEDED"}


async def test_undo_after_healthy_delay_only_of_our_own_cordon(harness, kube, am):
    kube.add_node("n1")
    kube.add_node("n2", unschedulable=True)  # cordoned by a human before we came
    h = await harness(safety={"undo": {"enabled": True, "healthy_delay": "200ms"}, "per_node": {"cooldown": "0s"},
                              "fleet_cap": {"max_nodes": 4, "max_percent": 100}})
    a1, a2 = alert("n1"), alert("n2")
    await h.post(notification(a1, a2))
    await h.settle()
    assert kube.cordoned() == ["n1", "n2"]
    out = await (await h.post(notification({**a1, "status": "resolved"}, {**a2, "status": "resolved"}))).json()
    assert out["ignored"] == 2
    assert set(h.states().values()) == {"HEALTHY_DELAY"}
    await h.settle()
    assert kube.cordoned() == ["n1", "n2"]  # not before the healthy delay
    time.sleep(0.25)
    await h.settle()
    assert kube.cordoned() == ["n2"]
    assert set(h.states().values()) == {"CLOSED"}
    node = kube.node("n1")
    assert "gpu-health.io/cordoned-by" not in (node["metadata"].get("annotations") or {}) or \
        node["metadata"]["annotations"]["gpu-health.io/cordoned-by"] is None


async def test_undo_is_skipped_when_a_remediation_alert_fires_again(harness, kube, am):
    kube.add_node("n1")
    h = await harness(safety={"undo": {"enabled": True, "healthy_delay": "50ms"}})
    a = alert("n1")
    await h.post(notification(a))
    await h.settle()
    am.firing_for_node["n1"] = [{"labels": {"remediation": "cordon"}, "status": {"state": "active"}}]
    await h.post(notification({**a, "status": "resolved"}))
    time.sleep(0.1)
    await h.settle()
    assert kube.cordoned() == ["n1"]
    assert h.states() == {"n1": "CLOSED"}


async def test_recurrence_after_success_is_told_apart_by_fault_timestamp(harness, kube):
    kube.add_node("n1")
    h = await harness(safety={"per_node": {"cooldown": "0s"}})
    a = alert("n1")
    a["annotations"]["fault_timestamp"] = str(time.time() - 60)
    await h.post(notification(a))
    await h.settle()
    assert (await (await h.post(notification(a))).json())["duplicates"] == 1
    b = {**a, "annotations": {**a["annotations"], "fault_timestamp": str(time.time() + 1)}}
    out = await (await h.post(notification(b))).json()
    assert out["accepted"] == 1
    await h.settle()
    assert [s for (s,) in h.sql("SELECT state FROM remediation")] == ["SUCCEEDED", "SUCCEEDED"]


async def test_metrics_are_restored_from_the_journal_after_a_restart(harness, kube, tmp_path):
    kube.add_node("n1")
    h = await harness()
    await h.post(notification(alert("n1")))
    await h.settle()
    await h.engine.stop()
    h.journal.close()
    h2 = await harness()
    assert h2.metric("gpu_remediation_actions_total", node="n1", gpu="", uuid="", action="cordon",
                     result="success") == 1
    assert h2.metric("gpu_remediation_last_success_timestamp_seconds", node="n1", gpu="", uuid="",
                     action="cordon") > 0
    text = (await (await h2.client.get("/metrics")).text())
    assert 'gpu_remediation_actions_total{action="cordon",gpu="",node="n1",result="success",uuid=""} 1.0' in text


async def test_journal_unavailable_is_503(harness, kube):
    h = await harness()
    h.journal.close()
    r = await h.post(notification(alert("n1")))
    assert r.status == 503
    assert (await h.client.get("/readyz")).status == 503
