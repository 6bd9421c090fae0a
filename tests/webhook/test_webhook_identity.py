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


def _real_and_forged(am):
    """The real alert on n1 and a forged one for n2 that reuses its fingerprint; Alertmanager has the real one."""
    real = alert("n1", fingerprint="0123456789abcdef")
    forged = alert("n2", fingerprint="0123456789abcdef")
    am.labels[real["fingerprint"]] = real["labels"]
    return real, forged


@pytest.mark.parametrize("forged_first", [True, False], ids=["forged-first", "real-first"])
async def test_a_forged_fingerprint_cannot_hide_the_real_alert(harness, kube, am, forged_first):
    for n in ("n1", "n2"):
        kube.add_node(n)
    h = await harness(policy=LIVE, safety=SAFETY)
    real, forged = _real_and_forged(am)
    await h.admin.post("/v1/pause")  # both arrive before the engine looks at either
    first, second = (forged, real) if forged_first else (real, forged)
    assert (await (await h.post(notification(first))).json())["accepted"] == 1
    out = await (await h.post(notification(second))).json()
    assert out["conflicts"] == 1 and out["duplicates"] == 0 and out["accepted"] == 0
    assert h.metric("gpu_remediation_webhook_alerts_total", decision="conflict") == 1
    await h.admin.delete("/v1/pause")
    await h.drive_until(lambda: h.sql("SELECT 1 FROM remediation WHERE node='n1' AND state='SUCCEEDED'"),
                        what="the real alert to act")
    assert kube.cordoned() == ["n1"]  # the forged alert's node is never touched
    decisions = dict(h.sql("SELECT node, decision FROM occurrence"))
    if forged_first:
        # The forged one planned first; Alertmanager's word at verification cancelled it and let the real one act.
        assert decisions == {"n1": "planned", "n2": "forged"}
        assert dict(h.sql("SELECT node, state FROM remediation")) == {"n1": "SUCCEEDED", "n2": "CANCELLED"}
        assert "forged or corrupted" in h.sql("SELECT reason FROM remediation WHERE node='n2'")[0][0]
    else:
        assert decisions == {"n1": "planned", "n2": "conflict"}
        assert dict(h.sql("SELECT node, state FROM remediation")) == {"n1": "SUCCEEDED"}


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
