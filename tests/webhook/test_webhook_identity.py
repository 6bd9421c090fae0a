"""What one alert occurrence is: fingerprint, startsAt and labels. A forged fingerprint cannot hide the real alert,
a resolved-then-firing occurrence resumes its held plan instead of being planned twice, and a fault time that is
not a time is refused."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest

from remediation_webhook.alertmanager import AlertState
from tests.webhook.webhook_support import alert, await_for, notification

LIVE = {"dry_run": False, "rules": [{"name": "gpu", "match_re": {"alertname": "GPU.*"}, "ladder": ["cordon"]}]}
SAFETY = {"breaker": {"max_nodes": 50, "max_percent": 100, "min_nodes": 50},
          "fleet_cap": {"max_nodes": 10, "max_percent": 100}}


def _real_and_forged(am, forged_node: str = "n2", **forged_labels: str):
    """The real alert on n1 and a forged one that reuses its fingerprint (for `forged_node`, or n1 with other
    labels); Alertmanager has the real one."""
    real = alert("n1", fingerprint="0123456789abcdef")
    forged = alert(forged_node, fingerprint="0123456789abcdef", **forged_labels)
    am.labels[real["fingerprint"]] = real["labels"]
    return real, forged


async def _both_arrive(h, first, second):
    """Both arrive before the engine looks at either; the second is a conflict."""
    await h.admin.post("/v1/pause")
    assert (await (await h.post(notification(first))).json())["accepted"] == 1
    out = await (await h.post(notification(second))).json()
    assert out["conflicts"] == 1 and out["duplicates"] == 0 and out["accepted"] == 0
    assert h.metric("gpu_remediation_webhook_alerts_total", decision="conflict") == 1
    await h.admin.delete("/v1/pause")


async def _real_acts(h, kube):
    await h.drive_until(lambda: h.sql("SELECT 1 FROM remediation WHERE node='n1' AND state='SUCCEEDED'"),
                        what="the real alert to act")
    assert kube.cordoned() == ["n1"]  # the forged alert's node is never touched


@pytest.mark.parametrize("forged_first", [True, False], ids=["forged-first", "real-first"])
async def test_a_forged_alert_for_another_node_cannot_hide_the_real_one(harness, kube, am, forged_first):
    """Forged first: Alertmanager does not have it under its node, so it is held (an Alertmanager that lost an alert
    gets it back from Prometheus) and its twin is planned meanwhile, verified, and acts. Real first: the forged one
    waits as a conflict and never acts."""
    for n in ("n1", "n2"):
        kube.add_node(n)
    h = await harness(policy=LIVE, safety=SAFETY)
    real, forged = _real_and_forged(am)
    await _both_arrive(h, *((forged, real) if forged_first else (real, forged)))
    await _real_acts(h, kube)
    await h.settle()
    assert dict(h.sql("SELECT node, state FROM remediation")) == (
        {"n1": "SUCCEEDED", "n2": "HELD"} if forged_first else {"n1": "SUCCEEDED"})
    if not forged_first:
        assert dict(h.sql("SELECT node, decision FROM occurrence")) == {"n1": "planned", "n2": "conflict"}


async def test_a_forged_alert_for_the_same_node_first_is_found_out_and_the_real_one_acts(harness, kube, am):
    """Alertmanager has the fingerprint under that node with other labels: forged, cancelled, the twin acts."""
    kube.add_node("n1")
    h = await harness(policy=LIVE, safety=SAFETY)
    real, forged = _real_and_forged(am, "n1", gpu="7")
    await _both_arrive(h, forged, real)
    await _real_acts(h, kube)
    rows = h.sql("SELECT o.decision, r.state FROM occurrence o JOIN remediation r ON r.source_fp=o.fingerprint "
                 "AND r.source_labels_hash=o.labels_hash ORDER BY r.created_at")
    assert rows == [("forged", "CANCELLED"), ("planned", "SUCCEEDED")]
    assert "forged or corrupted" in h.sql("SELECT reason FROM remediation WHERE state='CANCELLED'")[0][0]


async def test_a_forged_alert_for_a_node_that_does_not_exist_first_cannot_hide_the_real_one(harness, kube, am):
    kube.add_node("n1")
    h = await harness(policy=LIVE, safety=SAFETY)
    real, forged = _real_and_forged(am, "no-such-node")
    await _both_arrive(h, forged, real)
    await _real_acts(h, kube)
    assert dict(h.sql("SELECT node, state FROM remediation")) == {"n1": "SUCCEEDED", "no-such-node": "REFUSED"}


async def test_a_forged_alert_merged_into_another_remediation_is_no_conflict(harness, kube, am):
    """An alert merged into another node's remediation is never verified, so it cannot hold back its
    fingerprint's real alert: the real one is planned at once."""
    for n in ("n1", "n2"):
        kube.add_node(n)
    h = await harness(policy={**LIVE, "rules": [{"name": "gpu", "match_re": {"alertname": "GPU.*"},
                                                  "ladder": ["cordon"], "requires_approval": ["cordon"]}]},
                      safety=SAFETY)
    first = alert("n2", alertname="GPUOther")
    await h.post(notification(first))
    forged = alert("n2", fingerprint="0123456789abcdef")
    assert (await (await h.post(notification(forged))).json())["merged"] == 1
    real = alert("n1", fingerprint="0123456789abcdef")
    out = await (await h.post(notification(real))).json()
    assert out["accepted"] == 1 and out["conflicts"] == 0


async def test_an_alertmanager_gap_holds_the_real_alert_rather_than_losing_it_to_its_twin(harness, kube, am):
    """The real alert first, a forged twin second; Alertmanager has lost the real one for a while (GONE): the real
    plan is held, not cancelled; the twin is planned, finds nothing and is held; the real one fires again and acts."""
    for n in ("n1", "n2"):
        kube.add_node(n)
    h = await harness(policy=LIVE, safety=SAFETY)
    real, forged = _real_and_forged(am)
    am.states[real["fingerprint"]] = AlertState.GONE
    await _both_arrive(h, real, forged)
    await h.drive_until(lambda: set(h.states().values()) == {"HELD"} and len(h.states()) == 2,
                        what="both held")
    am.states.pop(real["fingerprint"])
    assert (await (await h.post(notification(real))).json())["resumed"] == 1
    await _real_acts(h, kube)


async def test_a_person_cancelling_while_the_engine_verifies_wins(harness, kube, am):
    kube.add_node("n1")
    h = await harness(policy=LIVE, safety=SAFETY)
    a = alert("n1")
    am.states[a["fingerprint"]] = AlertState.GONE

    async def cancel_meanwhile(fingerprint: str) -> None:
        rid = h.sql("SELECT id FROM remediation")[0][0]
        am.before_state = None
        assert (await h.admin.post(f"/v1/remediations/{rid}:cancel", json={"reason": "hands off"})).status == 200

    am.before_state = cancel_meanwhile
    await h.post(notification(a))
    await h.drive_until(lambda: am.before_state is None, what="the cancel")
    await h.settle()
    am.states.pop(a["fingerprint"])
    await h.post(notification(a))  # a re-send: it must not bring the cancelled plan back
    await h.settle()
    assert h.states() == {"n1": "CANCELLED"} and kube.cordoned() == []


@pytest.mark.parametrize("dry_run", [False, True], ids=["live", "dry-run"])
async def test_resolved_then_firing_resumes_the_held_plan(harness, kube, dry_run):
    """Alertmanager resolves an alert it has not heard of for a few minutes (Prometheus could not reach it) and
    fires it again with the same startsAt: one occurrence, one remediation, in live mode and dry-run alike."""
    kube.add_node("n1")
    h = await harness(policy={**LIVE, "dry_run": dry_run}, safety=SAFETY)
    a = alert("n1")
    await h.admin.post("/v1/pause")
    await h.post(notification(a))
    await h.settle()
    assert h.states() == {"n1": "PLANNED"}
    out = await (await h.post(notification({**a, "status": "resolved"}))).json()
    assert out["ignored"] == 1 and h.states() == {"n1": "HELD"}
    out = await (await h.post(notification(a))).json()
    assert out["resumed"] == 1 and out["accepted"] == 0 and h.states() == {"n1": "PLANNED"}
    await h.admin.delete("/v1/pause")
    final = "DRY_RUN_RECORDED" if dry_run else "SUCCEEDED"
    await h.until_state("n1", final)
    assert len(h.sql("SELECT id FROM remediation")) == 1 and len(h.sql("SELECT 1 FROM occurrence")) == 1
    events = [e for (e,) in h.sql("SELECT event FROM audit ORDER BY id")]
    assert events.index("held") < events.index("resumed")
    assert h.metric("gpu_remediation_webhook_alerts_total", decision="resumed") == 1
    # ... and firing again after the plan ran is a duplicate, never a second plan.
    await h.post(notification({**a, "status": "resolved"}))
    assert (await (await h.post(notification(a))).json())["duplicates"] == 1
    assert len(h.sql("SELECT id FROM remediation")) == 1


async def test_the_same_alert_firing_again_with_a_new_starts_at_resumes_the_held_plan(harness, kube):
    """Found by the fleet soak: Prometheus restarted (or Alertmanager resolved the alert during an outage) and the
    alert fired again with a new startsAt. It was merged into its own HELD plan, which then waited out
    resolved_hold while the fault went unremediated. It resumes the plan, now verified against the new
    occurrence."""
    kube.add_node("n1")
    h = await harness(policy={**LIVE, "resolved_hold": "1h"}, safety=SAFETY)
    a = alert("n1", starts_at=datetime.now(UTC) - timedelta(minutes=2))
    await h.admin.post("/v1/pause")
    await h.post(notification(a))
    await h.post(notification({**a, "status": "resolved"}))
    assert h.states() == {"n1": "HELD"}
    again = {**a, "startsAt": datetime.now(UTC).isoformat().replace("+00:00", "Z")}
    out = await (await h.post(notification(again))).json()
    assert out["resumed"] == 1 and out["merged"] == 0 and out["accepted"] == 0, out
    assert h.states() == {"n1": "PLANNED"}
    (source,) = h.sql("SELECT source_starts_at FROM remediation")
    assert source[0] != a["startsAt"]
    await h.admin.delete("/v1/pause")
    await h.until_state("n1", "SUCCEEDED")
    assert kube.cordoned() == ["n1"] and len(h.sql("SELECT id FROM remediation")) == 1
    # Another alert of the node is still merged into the held plan: only its own alert resumes it.
    kube.add_node("n2")
    await h.admin.post("/v1/pause")
    first, other = alert("n2", fingerprint="cc"), alert("n2", fingerprint="dd", alertname="GPUOther")
    await h.post(notification(first))
    await h.post(notification({**first, "status": "resolved"}))
    out = await (await h.post(notification(other))).json()
    assert out["merged"] == 1 and out["resumed"] == 0 and h.states()["n2"] == "HELD"


async def test_a_remediation_whose_alert_resolves_is_held_at_once_or_before_its_next_rung(harness, kube, am):
    """Waiting for approval: held when the resolved delivery arrives. In the middle of a step (a slow drain): the
    step finishes, and the remediation is held before the next rung."""
    for n in ("n1", "n2"):
        kube.add_node(n)
        kube.add_pod("team-a", f"train-{n}", n)
    kube.eviction_delay[("team-a", "train-n2")] = 0.5
    h = await harness(policy={"dry_run": False, "resolved_hold": "1h", "rules": [
        {"name": "approve", "match": {"node": "n1"}, "ladder": ["cordon", "drain"], "requires_approval": ["drain"]},
        {"name": "gpu", "match_re": {"alertname": "GPU.*"}, "ladder": ["cordon", "drain", "taint"]}]}, safety=SAFETY)
    waiting, draining = alert("n1", remediation="drain"), alert("n2", remediation="taint")
    await h.post(notification(waiting))
    await h.until_state("n1", "AWAITING_APPROVAL")
    await h.post(notification({**waiting, "status": "resolved"}))
    assert h.states()["n1"] == "HELD"
    await h.post(notification(draining))
    await await_for(lambda: h.sql("SELECT 1 FROM step WHERE action='drain' AND state='INTENT'"), what="the drain")
    await h.post(notification({**draining, "status": "resolved"}))
    assert h.states()["n2"] == "RUNNING"
    await h.until_state("n2", "HELD")
    assert kube.pods("n2") == [] and h.sql("SELECT action FROM step WHERE remediation_id=(SELECT id FROM "
                                           "remediation WHERE node='n2')") == [("cordon",), ("drain",)]
    assert kube.cordoned() == ["n1", "n2"]  # what was done stays; nothing more happens while held


async def test_a_held_plan_whose_alert_never_returns_is_cancelled_and_its_merged_alerts_planned_again(
        harness, kube, am):
    kube.add_node("n1")
    h = await harness(policy={**LIVE, "resolved_hold": "200ms"}, safety=SAFETY)
    first, other = alert("n1", fingerprint="aa"), alert("n1", fingerprint="bb", alertname="GPUOther")
    await h.admin.post("/v1/pause")
    await h.post(notification(first, other))
    assert dict(h.sql("SELECT fingerprint, decision FROM occurrence")) == {"aa": "planned", "bb": "merged"}
    await h.post(notification({**first, "status": "resolved"}))
    await h.admin.delete("/v1/pause")
    time.sleep(0.25)
    await h.until_state("n1", "SUCCEEDED")
    rows = h.sql("SELECT source_fp, state FROM remediation ORDER BY created_at")
    assert rows == [("aa", "CANCELLED"), ("bb", "SUCCEEDED")]
    assert kube.cordoned() == ["n1"]


async def test_a_plan_waiting_on_the_fleet_cap_whose_alert_resolves_waits_out_its_hold(harness, kube):
    """Found by the fleet soak: a plan BLOCKED on the fleet cap was held when its alert resolved, and the engine's
    task already on its way cancelled it at once instead of after resolved_hold."""
    for n in ("n1", "n2"):
        kube.add_node(n)
    h = await harness(policy={**LIVE, "resolved_hold": "1h"},
                      safety={**SAFETY, "fleet_cap": {"max_nodes": 1, "max_percent": 100}})
    await h.post(notification(alert("n1")))
    await h.until_state("n1", "SUCCEEDED")  # n1 keeps our cordon: the one slot is taken
    a = alert("n2")
    await h.post(notification(a))
    await h.until_state("n2", "BLOCKED")
    await h.post(notification({**a, "status": "resolved"}))
    assert h.states()["n2"] == "HELD"
    # The race, made certain: the task that was on its way when the hold came drives the remediation now.
    (rid,) = h.sql("SELECT id FROM remediation WHERE node='n2'")[0]
    await h.engine._drive(rid)
    await h.settle()
    assert h.states()["n2"] == "HELD", h.sql("SELECT state, reason FROM remediation WHERE node='n2'")


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "253402300799", "-5", "soon"])
async def test_a_fault_timestamp_that_is_not_a_time_is_refused(harness, kube, value):
    kube.add_node("n1")
    h = await harness(policy=LIVE, safety=SAFETY)
    bad = alert("n1")
    bad["annotations"]["fault_timestamp"] = value
    good = alert("n1", alertname="GPUOther")
    r = await h.post(notification(bad, good))
    assert r.status == 200  # the group is accepted; only that alert is refused
    out = await r.json()
    assert out["refused"] == 1 and out["accepted"] == 1
    reason = h.sql("SELECT reason FROM occurrence WHERE decision='refused'")[0][0]
    assert reason.startswith("fault_timestamp annotation")
    await h.until_state("n1", "SUCCEEDED")
    assert [s for (s,) in h.sql("SELECT alertname FROM remediation")] == ["GPUOther"]


async def test_the_watchdog_is_a_heartbeat_not_a_rejected_alert(harness, kube):
    h = await harness(policy=LIVE, safety=SAFETY)
    watchdog = alert("x", alertname="GPURemediationWatchdog", remediation="none", severity="info")
    del watchdog["labels"]["node"]
    before = time.time()
    out = await (await h.post(notification(watchdog))).json()
    assert out["ignored"] == 1 and out["rejected"] == 0
    assert h.metric("gpu_remediation_webhook_last_notification_timestamp_seconds") >= before
    await h.engine.stop()
    h.journal.close()
    h2 = await harness(policy=LIVE, safety=SAFETY)  # a restart keeps the time of the last notification
    assert h2.metric("gpu_remediation_webhook_last_notification_timestamp_seconds") >= before
    assert json.loads(h2.sql("SELECT value FROM meta WHERE key='last_notification'")[0][0])["at"] >= before


async def test_silenced_on_alertmanager_is_a_veto_whatever_the_labels(harness, kube, am):
    kube.add_node("n1")
    h = await harness(policy=LIVE, safety=SAFETY)
    a = alert("n1", starts_at=datetime.now(UTC) - timedelta(minutes=3))
    am.labels[a["fingerprint"]] = a["labels"]
    am.states[a["fingerprint"]] = AlertState.SILENCED
    await h.post(notification(a))
    await h.until_state("n1", "CANCELLED")
    assert kube.cordoned() == []


@pytest.mark.parametrize("confirmed", [True, False], ids=["escalation-active", "escalation-unknown"])
async def test_a_rung_another_alert_asked_for_runs_only_while_alertmanager_has_that_alert(harness, kube, am,
                                                                                         confirmed):
    """An alert that merges into a node's remediation and asks for a higher rung of its rule raises the target; that
    alert is verified before those rungs run. Unknown to Alertmanager (a forged or stale one), the remediation
    goes back to what its own alert asked for."""
    kube.add_node("n1")
    kube.add_pod("team-a", "train", "n1")
    h = await harness(policy={"dry_run": False, "rules": [
        {"name": "gpu", "match_re": {"alertname": "GPU.*"}, "ladder": ["cordon", "drain"],
         "requires_approval": ["cordon"]}]}, safety=SAFETY)
    own, higher = alert("n1"), alert("n1", alertname="GPUOther", remediation="drain")
    if not confirmed:
        am.states[higher["fingerprint"]] = AlertState.GONE
    await h.post(notification(own))
    await h.until_state("n1", "AWAITING_APPROVAL")
    assert (await (await h.post(notification(higher))).json())["merged"] == 1
    rid = h.sql("SELECT id FROM remediation")[0][0]
    await h.admin.post(f"/v1/remediations/{rid}:approve")
    await h.until_state("n1", "SUCCEEDED")
    assert kube.pods("n1") == ([] if confirmed else ["team-a/train"])
    dropped = h.sql("SELECT detail_json FROM audit WHERE event='escalation_dropped'")
    assert bool(dropped) != confirmed
    if dropped:
        assert "GPUOther) is gone in Alertmanager" in json.loads(dropped[0][0])["reason"]


async def test_a_second_hold_gets_the_whole_hold_time(harness, kube):
    kube.add_node("n1")
    h = await harness(policy={**LIVE, "resolved_hold": "1h"}, safety=SAFETY)
    a = alert("n1")
    await h.admin.post("/v1/pause")
    await h.post(notification(a))
    await h.post(notification({**a, "status": "resolved"}))
    first = h.sql("SELECT held_at FROM remediation")[0][0]
    await h.post(notification(a))  # resumed
    assert h.sql("SELECT held_at FROM remediation") == [(0.0,)]
    time.sleep(0.05)
    await h.post(notification({**a, "status": "resolved"}))  # held again, later
    held_at, not_before = h.sql("SELECT held_at, not_before FROM remediation")[0]
    assert held_at > first and not_before == held_at + 3600 and h.states() == {"n1": "HELD"}
