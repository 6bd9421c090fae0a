"""The admin API: list and show with steps and audit trail, approve, cancel, pause and resume, breaker status
and reset (resume or skip the backlog), the effective policy, and /v1/evaluate which acts on nothing."""

from __future__ import annotations

from datetime import UTC, datetime

from tests.webhook.webhook_support import alert, notification


def _approval(**extra):
    return {"policy": {"dry_run": False, "rules": [{"name": "gpu", "match_re": {"alertname": "GPU.*"},
                                                    "ladder": ["cordon", "drain"], "requires_approval": ["drain"]}]},
            **extra}


async def test_list_show_approve_with_audit_trail(harness, kube):
    kube.add_node("n1")
    kube.add_pod("team-a", "job", "n1")
    h = await harness(**_approval())
    await h.post(notification(alert("n1", remediation="drain")))
    await h.settle()
    items = (await (await h.admin.get("/v1/remediations?state=AWAITING_APPROVAL")).json())["remediations"]
    assert [(i["node"], i["ladder"], i["next_rung"]) for i in items] == [("n1", ["cordon", "drain"], 1)]
    rid = items[0]["id"]
    assert kube.cordoned() == ["n1"] and kube.pods("n1") == ["team-a/job"]  # cordon ran, drain waits
    r = await h.admin.post(f"/v1/remediations/{rid}:approve", json={"reason": "checked the node"})
    assert r.status == 200
    await h.settle()
    detail = await (await h.admin.get(f"/v1/remediations/{rid}")).json()
    assert detail["state"] == "SUCCEEDED"
    assert [(s["action"], s["state"]) for s in detail["steps"]] == [("cordon", "SUCCEEDED"), ("drain", "SUCCEEDED")]
    events = [e["event"] for e in detail["audit"]]
    assert events[0] == "planned" and "approved" in events and events[-1] == "succeeded"
    approved = next(e for e in detail["audit"] if e["event"] == "approved")
    assert approved["actor"] == "anonymous" and approved["detail"]["reason"] == "checked the node"
    assert detail["occurrences"][0]["deliveries"] == 1
    assert kube.pods("n1") == []
    assert (await h.admin.post(f"/v1/remediations/{rid}:approve")).status == 409
    assert (await h.admin.get("/v1/remediations/" + "0" * 32)).status == 404
    assert (await h.admin.get("/v1/remediations/not-an-id")).status == 404


async def test_cancel_stops_an_awaiting_remediation(harness, kube):
    kube.add_node("n1")
    h = await harness(**_approval())
    await h.post(notification(alert("n1", remediation="drain")))
    await h.settle()
    rid = h.sql("SELECT id FROM remediation")[0][0]
    r = await h.admin.post(f"/v1/remediations/{rid}/cancel", json={"reason": "wrong node"})
    assert r.status == 200 and (await r.json())["state"] == "CANCELLED"
    await h.settle()
    assert h.states() == {"n1": "CANCELLED"}
    assert h.metric("gpu_remediation_actions_total", node="n1", gpu="", uuid="", action="drain",
                    result="blocked") == 1
    assert (await h.admin.post(f"/v1/remediations/{rid}:cancel")).status == 409


async def test_breaker_reset_resume_runs_the_backlog(harness, kube):
    for i in range(3):
        kube.add_node(f"n{i}")
    h = await harness(safety={"fleet_cap": {"max_nodes": 10, "max_percent": 100}})
    await h.post(notification(*(alert(f"n{i}") for i in range(3)), truncated=1))
    await h.settle()
    status = await (await h.admin.get("/v1/breaker")).json()
    assert status["open"] and "truncated" in status["reason"] and status["backlog"] == 3
    assert kube.calls(mutating=True) == []
    assert (await h.admin.post("/v1/breaker:reset", json={"mode": "sideways"})).status == 400
    r = await h.admin.post("/v1/breaker:reset", json={"mode": "resume", "reason": "false alarm"})
    assert r.status == 200
    await h.settle()
    assert set(h.states().values()) == {"SUCCEEDED"}, h.sql("SELECT node, state, reason, not_before FROM remediation")
    assert kube.cordoned() == ["n0", "n1", "n2"]
    assert not (await (await h.admin.get("/v1/breaker")).json())["open"]


async def test_breaker_reset_skip_backlog_cancels_it(harness, kube):
    for i in range(3):
        kube.add_node(f"n{i}")
    h = await harness()
    await h.post(notification(*(alert(f"n{i}") for i in range(3)), truncated=1))
    await h.settle()
    r = await h.admin.post("/v1/breaker/reset", json={"mode": "skip-backlog", "reason": "driver rollout"})
    assert len((await r.json())["skipped"]) == 3
    await h.settle()
    assert set(h.states().values()) == {"CANCELLED"} and kube.calls(mutating=True) == []
    # the skipped backlog does not count towards the next storm, and new alerts (begun after the reset) act again
    kube.add_node("fresh")
    await h.post(notification(alert("fresh", starts_at=datetime.now(UTC))))
    await h.settle()
    assert h.states()["fresh"] == "SUCCEEDED"


async def _storm(h, kube, mode: str, *, nodes: int = 3) -> float:
    """Trip the breaker with a storm of `nodes` alerts, reset it with `mode`; returns the reset time."""
    for i in range(nodes):
        kube.add_node(f"n{i}")
    await h.post(notification(*(alert(f"n{i}") for i in range(nodes)), truncated=1))
    await h.settle()
    assert (await (await h.admin.get("/v1/breaker")).json())["open"]
    before = datetime.now(UTC).timestamp()
    r = await h.admin.post("/v1/breaker:reset", json={"mode": mode, "reason": "driver rollout"})
    assert r.status == 200
    await h.settle()
    return before


def _late(node: str, starts: float) -> dict:
    return alert(node, starts_at=datetime.fromtimestamp(starts, UTC))


async def test_skip_backlog_refuses_late_alerts_of_the_storm_and_acts_on_new_ones(harness, kube):
    """Alerts of the skipped storm that reach the webhook after the reset (other groups, sent per group_interval;
    alerts still pending in Prometheus) are refused with the reason, journaled and audited; they neither act nor
    count towards the next storm. An alert that begins after the reset acts."""
    h = await harness()
    before = await _storm(h, kube, "skip-backlog")
    status = await (await h.admin.get("/v1/breaker")).json()
    cut = status["skip_before"]
    assert cut is not None and before <= cut <= datetime.now(UTC).timestamp()
    assert status["last_reset"]["mode"] == "skip-backlog" and status["last_reset"]["skip_before"] == cut
    late = ["late0", "late1", "late2"]  # more nodes than the breaker's threshold (2): they must not trip it again
    for node in late:
        kube.add_node(node)
    overflow = dict(node="_unresolved", gpu="", uuid="", action="cordon", result="blocked")
    unresolved = h.metric("gpu_remediation_actions_total", **overflow) or 0
    out = await (await h.post(notification(_late("late0", cut - 300), _late("late1", cut - 5),
                                           _late("late2", cut)))).json()
    assert out["refused"] == 3 and out["accepted"] == 0 and "breaker_tripped" not in out, out
    await h.settle()
    assert kube.calls(mutating=True) == [] and not kube.cordoned()
    assert not any(n in h.states() for n in late)
    rows = h.sql("SELECT node, decision, reason, remediation_id, wants FROM occurrence WHERE node LIKE 'late%' "
                 "ORDER BY node")
    at = datetime.fromtimestamp(cut, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    reason = f"began before the breaker reset with skip-backlog at {at} by anonymous"
    assert rows == [(n, "refused", reason, None, "") for n in late]
    audited = h.sql("SELECT node, event, detail_json FROM audit WHERE node LIKE 'late%' ORDER BY node")
    assert [(n, e) for n, e, _ in audited] == [(n, "refused") for n in late] and reason in audited[0][2]
    # never resolved by the inventory (refused before the engine looked them up): counted in the overflow series
    assert h.metric("gpu_remediation_actions_total", **overflow) == unresolved + 3
    assert h.metric("gpu_remediation_actions_total", node="late1", gpu="", uuid="", action="cordon",
                    result="blocked") is None
    assert h.metric("gpu_remediation_webhook_alerts_total", decision="refused") == 3
    assert not (await (await h.admin.get("/v1/breaker")).json())["open"]
    # /v1/evaluate says the same
    plan = (await (await h.admin.post("/v1/evaluate", json=notification(_late("late0", cut - 300)))).json())
    assert plan["alerts"][0]["refused"] == reason
    # an alert that begins after the reset is another incident: it acts
    kube.add_node("after")
    out = await (await h.post(notification(_late("after", cut + 1)))).json()
    assert out["accepted"] == 1, out
    await h.settle()
    assert h.states()["after"] == "SUCCEEDED" and kube.cordoned() == ["after"]


async def test_skip_backlog_holds_for_the_same_fault_firing_again_with_a_new_starts_at(harness, kube):
    """Found by the fleet soak: a Prometheus restart (or an outage longer than Alertmanager keeps an alert) makes
    the storm's alerts fire again with a new startsAt; their fault_timestamp still says the fault came before the
    reset, so they are still the skipped storm's, and nothing acts."""
    h = await harness()
    await _storm(h, kube, "skip-backlog")
    cut = (await (await h.admin.get("/v1/breaker")).json())["skip_before"]
    for node in ("refire0", "refire1", "refire2"):
        kube.add_node(node)
    refired = [_late(n, cut + 60) for n in ("refire0", "refire1", "refire2")]
    for a in refired:
        a["annotations"]["fault_timestamp"] = str(int(cut - 30))
    out = await (await h.post(notification(*refired))).json()
    assert out["refused"] == 3 and out["accepted"] == 0 and "breaker_tripped" not in out, out
    await h.settle()
    assert not kube.cordoned()
    at = datetime.fromtimestamp(cut, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert {r for (r,) in h.sql("SELECT reason FROM occurrence WHERE node LIKE 'refire%'")} == {
        f"its fault came before the breaker reset with skip-backlog at {at} by anonymous"}


async def test_skip_backlog_acts_on_a_new_fault_of_an_alert_still_firing(harness, kube):
    """An alert that began before the skip-backlog reset but whose fault_timestamp says the fault came after it
    (a recurrence of a still-firing alert) is a new incident: it acts."""
    h = await harness()
    await _storm(h, kube, "skip-backlog")
    cut = (await (await h.admin.get("/v1/breaker")).json())["skip_before"]
    kube.add_node("again")
    began = datetime.fromtimestamp(cut - 300, UTC)
    old, new = alert("again", starts_at=began, gpu="0"), alert("again", starts_at=began, gpu="1")
    old["annotations"]["fault_timestamp"] = str(cut - 301)
    new["annotations"]["fault_timestamp"] = str(cut + 1)  # firing since before the reset; a new fault after it
    out = await (await h.post(notification(old))).json()
    assert out["refused"] == 1 and out["accepted"] == 0, out
    plan = (await (await h.admin.post("/v1/evaluate", json=notification(new))).json())["alerts"][0]
    assert "refused" not in plan
    out = await (await h.post(notification(new))).json()
    assert out["accepted"] == 1 and out["refused"] == 0, out
    await h.settle()
    assert h.states()["again"] == "SUCCEEDED" and kube.cordoned() == ["again"]


async def test_resume_reset_does_not_refuse_late_alerts(harness, kube):
    h = await harness(safety={"fleet_cap": {"max_nodes": 10, "max_percent": 100}})
    await _storm(h, kube, "resume")
    assert (await (await h.admin.get("/v1/breaker")).json())["skip_before"] is None
    kube.add_node("late")
    out = await (await h.post(notification(_late("late", datetime.now(UTC).timestamp() - 300)))).json()
    assert out["accepted"] == 1 and out["refused"] == 0, out
    await h.settle()
    assert h.states()["late"] == "SUCCEEDED" and "late" in kube.cordoned()


async def test_later_resets_move_or_keep_the_skip_cut_off(harness, kube):
    h = await harness(safety={"fleet_cap": {"max_nodes": 10, "max_percent": 100}})
    first = await _storm(h, kube, "skip-backlog")
    cut1 = (await (await h.admin.get("/v1/breaker")).json())["skip_before"]
    assert cut1 >= first
    # A second skip-backlog reset (another storm) moves the cut-off: an alert begun between the two is refused.
    r = await h.admin.post("/v1/breaker:reset", json={"mode": "skip-backlog", "reason": "second storm"})
    cut2 = (await r.json())["skip_before"]
    assert cut2 > cut1 and (await (await h.admin.get("/v1/breaker")).json())["skip_before"] == cut2
    kube.add_node("between")
    out = await (await h.post(notification(_late("between", (cut1 + cut2) / 2)))).json()
    assert out["refused"] == 1 and "between" not in h.states(), out
    # A resume reset keeps it: an alert whose fault came before the cut-off is still refused (found by the fleet
    # soak: after a later resume, a skipped storm's alert firing again after a restart rebooted its node) ...
    assert (await h.admin.post("/v1/breaker:reset", json={"mode": "resume"})).status == 200
    assert (await (await h.admin.get("/v1/breaker")).json())["skip_before"] == cut2
    kube.add_node("old")
    refired = _late("old", cut2 + 60)
    refired["annotations"]["fault_timestamp"] = str(int(cut1 - 60))
    out = await (await h.post(notification(refired))).json()
    assert out["refused"] == 1 and out["accepted"] == 0, out
    # ... and one that began after it acts.
    out = await (await h.post(notification(_late("old", cut2 + 1)))).json()
    assert out["accepted"] == 1, out
    await h.settle()
    assert h.states()["old"] == "SUCCEEDED" and "between" not in kube.cordoned()


async def test_skip_cut_off_survives_a_restart(harness, kube):
    h = await harness()
    await _storm(h, kube, "skip-backlog")
    cut = (await (await h.admin.get("/v1/breaker")).json())["skip_before"]
    await h.engine.stop()
    h.journal.close()
    h2 = await harness()  # the same journal file
    assert (await (await h2.admin.get("/v1/breaker")).json())["skip_before"] == cut
    kube.add_node("late")
    out = await (await h2.post(notification(_late("late", cut - 30)))).json()
    assert out["refused"] == 1 and out["accepted"] == 0, out
    await h2.settle()
    assert "late" not in h2.states() and kube.calls(mutating=True) == []
    assert h2.sql("SELECT decision FROM occurrence WHERE node='late'") == [("refused",)]
    kube.add_node("after")
    out = await (await h2.post(notification(_late("after", cut + 1)))).json()
    assert out["accepted"] == 1, out
    await h2.settle()
    assert kube.cordoned() == ["after"]


async def test_policy_shows_the_effective_policy(harness, kube):
    h = await harness()
    body = await (await h.admin.get("/v1/policy")).json()
    assert body["policy_hash"] == h.services.config.policy_hash
    assert body["default"] == "deny" and body["rules"][0]["ladder"] == ["cordon", "drain"]
    assert body["safety"]["fleet_cap"] == {"max_nodes": 4, "max_percent": 5.0}
    assert body["actions"] == ["cordon", "drain", "taint"]


async def test_evaluate_plans_without_acting_or_journaling(harness, kube):
    kube.add_node("n1")
    kube.add_pod("team-a", "job", "n1")
    kube.add_node("cp", labels={"node-role.kubernetes.io/control-plane": ""})
    h = await harness()
    payload = notification(alert("n1", remediation="drain"), alert("cp"), alert("../x"), alert("n1", status="resolved"))
    r = await h.admin.post("/v1/evaluate", json=payload)
    assert r.status == 200
    plans = (await r.json())["alerts"]
    assert [p["decision"] for p in plans] == ["plan", "plan", "reject", "ignore"]
    steps = plans[0]["steps"]
    assert [s["action"] for s in steps] == ["cordon", "drain"]
    assert steps[0]["calls"][1] == {"method": "PATCH", "path": "/api/v1/nodes/n1", "performed": False,
                                    "result": "dry-run", "body": steps[0]["calls"][1]["body"]}
    assert any(c["path"] == "/api/v1/namespaces/team-a/pods/job/eviction" for c in steps[1]["calls"])
    assert "control-plane" in plans[1]["refused"]
    assert kube.calls(mutating=True) == []
    assert h.sql("SELECT COUNT(*) FROM occurrence") == [(0,)] and h.sql("SELECT COUNT(*) FROM remediation") == [(0,)]
    assert (await h.admin.post("/v1/evaluate", data=b"{")).status == 400


async def test_metrics_and_readyz(harness, kube):
    kube.add_node("n1")
    h = await harness()
    assert (await h.client.get("/readyz")).status == 200
    text = await (await h.client.get("/metrics")).text()
    for name in ("gpu_remediation_remediations", "gpu_remediation_breaker_open", "gpu_remediation_paused",
                 "gpu_remediation_webhook_accept_duration_seconds", "gpu_remediation_step_duration_seconds",
                 "gpu_remediation_budget_remaining"):
        assert name in text


async def test_readyz_fails_when_the_inventory_is_unreachable(harness, tmp_path, kube):
    from tests.webhook.webhook_support import base_config
    from remediation_webhook.inventory.kubernetes import KubernetesInventory
    from remediation_webhook.kube import KubernetesApi, KubernetesSettings

    h = await harness(base_config(tmp_path, "http://127.0.0.1:9"), start=False)
    dead = KubernetesApi(KubernetesSettings(host="http://127.0.0.1:9", request_timeout=1))
    h.engine.inventory = KubernetesInventory(dead)
    try:
        r = await h.client.get("/readyz")
        assert r.status == 503 and "inventory kubernetes" in await r.text()
    finally:
        dead.close()
