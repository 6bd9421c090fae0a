"""The admin API: list and show with steps and audit trail, approve, cancel, pause and resume, breaker status
and reset (resume or skip the backlog), the effective policy, and /v1/evaluate which acts on nothing."""

from __future__ import annotations

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
    # the skipped backlog does not count towards the next storm, and new alerts act again
    kube.add_node("fresh")
    await h.post(notification(alert("fresh")))
    await h.settle()
    assert h.states()["fresh"] == "SUCCEEDED"


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
