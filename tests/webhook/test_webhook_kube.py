"""Kubernetes actions against kmock (a real HTTP API) with the official client: end states, PDB 429s,
idempotency, dry-run and recreated nodes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.webhook.webhook_support import alert, notification
from remediation_webhook.actions.base import ActionContext, Outcome
from remediation_webhook.actions.cordon import Cordon
from remediation_webhook.actions.drain import Drain
from remediation_webhook.actions.taint import Taint
from remediation_webhook.config import build_config
from remediation_webhook.errors import ConfigError
from remediation_webhook.inventory.kubernetes import KubernetesInventory
from remediation_webhook.kube import KubernetesApi, KubernetesSettings, RecordingKube
from remediation_webhook.models import Target

RID = "a" * 32


@pytest.fixture(name="api")
def _api(kube):
    api = KubernetesApi(KubernetesSettings(host=kube.url, request_timeout=5))
    yield api
    api.close()


async def _ctx(api, name, *, dry_run=False):
    node = await KubernetesInventory(api).resolve(name)

    async def no_sleep(_):
        return None

    import time
    return ActionContext(remediation_id=RID, node=node, target=Target(name), reason="GPUXidFatal on n: test",
                         kube=RecordingKube(api, dry_run=dry_run), dry_run=dry_run, should_stop=lambda: None,
                         sleep=no_sleep, clock=time.time)


def _patches(kube, node):
    return [c for c in kube.calls(mutating=True) if c[0] == "PATCH" and c[1] == f"/api/v1/nodes/{node}"]


async def test_cordon_end_state_and_second_run_is_a_noop(kube, api):
    kube.add_node("n1")
    ctx = await _ctx(api, "n1")
    result = await Cordon().run(ctx)
    assert result.outcome == Outcome.SUCCESS
    node = kube.node("n1")
    assert node["spec"]["unschedulable"] is True
    assert node["metadata"]["labels"]["gpu-health.io/remediation-id"] == RID
    ann = node["metadata"]["annotations"]
    assert ann["gpu-health.io/cordoned-by"] == "gpu-health-webhook"
    assert ann["gpu-health.io/prior-unschedulable"] == "false"
    assert "GPUXidFatal" in ann["gpu-health.io/remediation-reason"]
    assert len(_patches(kube, "n1")) == 1
    again = await Cordon().run(await _ctx(api, "n1"))
    assert again.outcome == Outcome.SUCCESS and "nothing to do" in again.detail
    assert len(_patches(kube, "n1")) == 1


async def test_cordon_leaves_someone_elses_cordon_alone(kube, api):
    kube.add_node("n1", unschedulable=True, annotations={"owner": "human"})
    result = await Cordon().run(await _ctx(api, "n1"))
    assert result.outcome == Outcome.SUCCESS and "someone else" in result.detail
    assert kube.calls(mutating=True) == []


async def test_taint_keeps_other_taints_and_retries_a_conflict(kube, api):
    other = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    kube.add_node("n1", taints=[other])
    kube.conflict_once()
    result = await Taint().run(await _ctx(api, "n1"))
    assert result.outcome == Outcome.SUCCESS
    taints = kube.node("n1")["spec"]["taints"]
    assert other in taints
    assert {"key": "gpu-health.io/quarantine", "value": RID, "effect": "NoSchedule"} in taints
    patches = _patches(kube, "n1")
    assert patches[0][2]["spec"]["taints"][0] == other  # the full list is written
    again = await Taint().run(await _ctx(api, "n1"))
    assert again.outcome == Outcome.SUCCESS and "nothing to do" in again.detail


async def test_taint_sends_the_resource_version_it_read(kube, api):
    kube.add_node("n1")
    kube.km.objects[__import__("kmock").resource("", "v1", "nodes"), None, "n1"].patch(
        {"metadata": {"resourceVersion": "4711"}})
    await Taint().run(await _ctx(api, "n1"))
    assert _patches(kube, "n1")[0][2]["metadata"]["resourceVersion"] == "4711"


def test_no_execute_taint_needs_an_explicit_opt_in():
    with pytest.raises(ConfigError, match="actions.taint.effect: NoExecute"):
        Taint.from_config({"effect": "NoExecute"}, "actions.taint")
    assert Taint.from_config({"effect": "NoExecute", "allow_no_execute": True}, "actions.taint").effect == "NoExecute"


async def test_drain_evicts_through_the_eviction_api_skipping_daemonset_and_mirror_pods(kube, api):
    kube.add_node("n1")
    kube.add_node("n2")
    kube.add_pod("team-a", "train-0", "n1")
    kube.add_pod("team-a", "train-1", "n1")
    kube.add_pod("kube-system", "dcgm-exporter", "n1", daemonset=True)
    kube.add_pod("kube-system", "static-n1", "n1", mirror=True)
    kube.add_pod("team-a", "elsewhere", "n2")
    kube.evictions[("team-a", "train-1")] = [429, 429]  # a PodDisruptionBudget says "not now" twice
    result = await Drain(retry_interval=0.01, poll_interval=0.01, timeout=10).run(await _ctx(api, "n1"))
    assert result.outcome == Outcome.SUCCESS, result.detail
    assert "2 evictions blocked" in result.detail
    assert kube.pods("n1") == ["kube-system/dcgm-exporter", "kube-system/static-n1"]
    assert kube.pods("n2") == ["team-a/elsewhere"]
    evictions = [c for c in kube.calls(mutating=True) if c[1].endswith("/eviction")]
    assert [c[1] for c in evictions].count("/api/v1/namespaces/team-a/pods/train-1/eviction") == 3
    assert all(c[0] == "POST" and c[2]["kind"] == "Eviction" for c in evictions)
    assert not any("dcgm" in c[1] or "static" in c[1] or "elsewhere" in c[1] for c in evictions)
    lists = [c for c in kube.calls() if c[1] == "/api/v1/pods"]
    assert lists  # the field selector is sent; kmock ignores it and the client filters too
    again = await Drain(poll_interval=0.01).run(await _ctx(api, "n1"))
    assert again.outcome == Outcome.SUCCESS
    assert len([c for c in kube.calls(mutating=True) if c[1].endswith("/eviction")]) == len(evictions)


async def test_drain_deadline_fails_without_force_deleting(kube, api):
    kube.add_node("n1")
    kube.add_pod("team-a", "stuck", "n1")
    kube.evictions[("team-a", "stuck")] = [429] * 1000
    result = await Drain(retry_interval=0.01, poll_interval=0.01, timeout=0.2).run(await _ctx(api, "n1"))
    assert result.outcome == Outcome.FAILURE and "deadline" in result.detail and "team-a/stuck" in result.detail
    assert not [c for c in kube.calls(mutating=True) if c[0] == "DELETE"]
    assert kube.pods("n1") == ["team-a/stuck"]


async def test_dry_run_makes_no_mutating_call_and_records_the_exact_calls(harness, kube):
    kube.add_node("n1", taints=[{"key": "x", "value": "y", "effect": "NoSchedule"}])
    kube.add_pod("team-a", "train-0", "n1")
    h = await harness(policy={"dry_run": True, "rules": [
        {"name": "gpu", "match_re": {"alertname": "GPU.*"}, "ladder": ["taint", "cordon", "drain"]}]})
    await h.post(notification(alert("n1", remediation="drain")))
    await h.settle()
    assert h.states() == {"n1": "DRY_RUN_RECORDED"}
    assert kube.calls(mutating=True) == []
    assert kube.pods("n1") == ["team-a/train-0"] and not kube.node("n1")["spec"].get("unschedulable")
    rid = h.sql("SELECT id FROM remediation")[0][0]
    detail = await (await h.admin.get(f"/v1/remediations/{rid}")).json()
    calls = [c for s in detail["steps"] for c in s["calls"] if c["method"] != "GET"]
    assert [(c["method"], c["path"], c["performed"]) for c in calls] == [
        ("PATCH", "/api/v1/nodes/n1", False), ("POST", "/api/v1/namespaces/default/events", False),
        ("PATCH", "/api/v1/nodes/n1", False), ("POST", "/api/v1/namespaces/default/events", False),
        ("POST", "/api/v1/namespaces/team-a/pods/train-0/eviction", False),
        ("POST", "/api/v1/namespaces/default/events", False)]
    assert calls[0]["body"]["spec"]["taints"][-1]["key"] == "gpu-health.io/quarantine"
    assert calls[2]["body"]["spec"] == {"unschedulable": True}
    for action in ("taint", "cordon", "drain"):
        assert h.metric("gpu_remediation_actions_total", node="n1", gpu="", uuid="", action=action,
                        result="dry_run") == 1


async def test_live_remediation_writes_events_labels_and_metrics(harness, kube):
    kube.add_node("n1")
    h = await harness()
    await h.post(notification(alert("n1", remediation="cordon", gpu="3", uuid="GPU-1234abcd")))
    await h.settle()
    assert h.states() == {"n1": "SUCCEEDED"}
    events = [c for c in kube.calls(mutating=True) if c[1] == "/api/v1/namespaces/default/events"]
    assert len(events) == 1
    ev = events[0][2]
    assert ev["involvedObject"]["kind"] == "Node" and ev["involvedObject"]["name"] == "n1"
    assert ev["reason"] == "GPURemediationCordon"
    assert h.metric("gpu_remediation_actions_total", node="n1", gpu="", uuid="", action="cordon",
                    result="success") == 1
    assert h.metric("gpu_remediation_last_success_timestamp_seconds", node="n1", gpu="", uuid="",
                    action="cordon") > 0


async def test_node_recreated_after_the_alert_started_is_not_touched(harness, kube):
    started = datetime.now(UTC) - timedelta(minutes=10)
    kube.add_node("n1", created=(started + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ"))
    h = await harness()
    await h.post(notification(alert("n1", starts_at=started)))
    await h.settle()
    assert h.states() == {"n1": "CANCELLED"}
    assert kube.calls(mutating=True) == []
    assert h.metric("gpu_remediation_actions_total", node="n1", gpu="", uuid="", action="cordon",
                    result="blocked") == 1


async def test_node_replaced_between_plan_and_step_is_not_touched(harness, kube):
    kube.add_node("n1", uid="old-uid")
    h = await harness(policy={"dry_run": False, "rules": [
        {"name": "gpu", "match_re": {"alertname": "GPU.*"}, "ladder": ["cordon"], "requires_approval": ["cordon"]}]})
    await h.post(notification(alert("n1")))
    await h.settle()
    assert h.states() == {"n1": "AWAITING_APPROVAL"}
    kube.delete_node("n1")
    kube.add_node("n1", uid="new-uid")  # same name, another machine (created long ago in this fake)
    rid = h.sql("SELECT id FROM remediation")[0][0]
    assert (await h.admin.post(f"/v1/remediations/{rid}:approve")).status == 200
    await h.settle()
    assert h.states() == {"n1": "CANCELLED"}
    assert kube.calls(mutating=True) == []
    reason = h.sql("SELECT reason FROM remediation")[0][0]
    assert "UID or providerID changed" in reason


@pytest.mark.parametrize(("labels", "why"), [
    ({"node-role.kubernetes.io/control-plane": ""}, "control-plane"),
    ({"gpu-health.io/remediation-opt-out": "true"}, "opted out"),
])
async def test_protected_nodes_are_never_touched(harness, kube, labels, why):
    kube.add_node("n1", labels=labels)
    h = await harness()
    await h.post(notification(alert("n1")))
    await h.settle()
    assert h.states() == {"n1": "REFUSED"}
    assert why in h.sql("SELECT reason FROM remediation")[0][0]
    assert kube.calls(mutating=True) == []


async def test_node_selector_limits_targets(harness, kube):
    kube.add_node("n1", labels={"pool": "cpu"})
    h = await harness(policy={"dry_run": False, "targets": {"node_selector": {"pool": "gpu"}}, "rules": [
        {"name": "gpu", "match_re": {"alertname": "GPU.*"}, "ladder": ["cordon"]}]})
    await h.post(notification(alert("n1")))
    await h.settle()
    assert h.states() == {"n1": "REFUSED"}
    assert kube.calls(mutating=True) == []


async def test_pdb_429_then_success_through_the_engine(harness, kube):
    kube.add_node("n1")
    kube.add_pod("team-a", "train-0", "n1")
    kube.evictions[("team-a", "train-0")] = [429, 429, 429]
    h = await harness()
    await h.post(notification(alert("n1", remediation="drain")))
    await h.settle()
    assert h.states() == {"n1": "SUCCEEDED"}
    assert kube.pods("n1") == []
    assert h.metric("gpu_remediation_actions_total", node="n1", gpu="", uuid="", action="drain",
                    result="success") == 1


def test_build_config_rejects_nothing_unusual(tmp_path, kube):
    from tests.webhook.webhook_support import base_config
    assert build_config(base_config(tmp_path, kube.url), base=tmp_path).policy.rules[0].ladder == ("cordon", "drain")
