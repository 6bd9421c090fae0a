"""GCP against a local Compute Engine v1 REST fake, with the real google-cloud-compute client (REST transport)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("google.cloud.compute_v1")

from tests.providers.fakes.gcp_compute import FORBIDDEN, RATE_LIMITED, UNAVAILABLE, GcpFake
from tests.providers.fakes.support import (
    FakeAlertmanager,
    alert,
    await_for,
    base_config,
    close_harness,
    make_harness,
    notification,
    replace_config,
)

from remediation_webhook.errors import ConfigError
from remediation_webhook.inventory.base import NodeIdentity
from remediation_webhook.providers import ProviderError
from remediation_webhook.providers.gcp import GcpProvider, request_id

PID = "gce://gpu-proj/us-central1-a/{}"


@pytest.fixture(name="gcp")
def _gcp():
    fake = GcpFake()
    for name in ("gpu-1", "gpu-2"):
        fake.add_instance(name)
    fake.add_instance("lone", in_mig=False)
    fake.add_instance("ultra-1", machine_type="a3-ultragpu-8g")
    for name in ("rgpu-1", "rgpu-2"):  # members of the regional MIG gpu-rmig (us-central1), in us-central1-a
        fake.add_instance(name, regional=True)
    yield fake
    fake.close()


def cfg(gcp, **extra):
    return {"endpoint": gcp.url, "anonymous": True, "poll_interval": "10ms", "retry_base": "10ms",
            "retry_cap": "20ms", "max_attempts": 4, "replacement_timeout": "5s", "operation_timeout": "5s", **extra}


def provider(gcp, **extra) -> GcpProvider:
    return GcpProvider.from_config(cfg(gcp, **extra), "providers.gcp")


async def ref_of(p, name):
    return await p.resolve(NodeIdentity(name, "u", provider_id=PID.format(name)))


async def test_replace_recreates_in_the_mig_and_waits_for_running(gcp):
    p = provider(gcp)
    old_id = gcp.instances["gpu-1"]["id"]
    result = await p.replace(await ref_of(p, "gpu-1"), "rem-1", "xid 79")
    assert result.new_host and result.operation.endswith("recreateInstances")
    assert result.replacement and result.replacement != old_id
    recreate = [s for s in gcp.seen if s[0] == "recreateInstances"]
    assert len(recreate) == 1
    _, mig, query, body = recreate[0]
    assert mig == "gpu-mig" and body == {"instances": ["zones/us-central1-a/instances/gpu-1"]}
    assert query["requestId"] == request_id("rem-1", "recreate")
    # DONE is not enough: we listed until currentAction NONE / RUNNING (the fake shows RECREATING twice)
    assert gcp.seen_verbs().count("listManagedInstances") == 3
    labels = next(s[3]["labels"] for s in gcp.seen if s[0] == "setLabels")
    assert labels["remediation-id"] == "rem-1" and labels["remediation-action"] == "replace"
    assert labels["team"] == "ml"  # existing labels kept


async def test_retry_with_the_same_request_id_is_idempotent(gcp):
    p = provider(gcp)
    ref = await ref_of(p, "gpu-2")
    await p.replace(ref, "rem-2", "t")
    await p.replace(ref, "rem-2", "t")  # a re-run after a crash: same requestId, same operation
    ops = {s[2]["requestId"] for s in gcp.seen if s[0] == "recreateInstances"}
    assert ops == {request_id("rem-2", "recreate")}
    assert len([o for o in gcp.operations if o.endswith("recreateInstances")]) == 1


REGIONAL_MIG = "/compute/v1/projects/gpu-proj/regions/us-central1/instanceGroupManagers/gpu-rmig"


def mig_paths(gcp) -> list[str]:
    """The paths of every MIG call and every operation poll, in order."""
    return [path for _, path in gcp.paths if "/instanceGroupManagers/" in path or "/operations/" in path]


async def test_regional_replace_recreates_in_the_regional_mig_and_waits_for_running(gcp):
    p = provider(gcp)
    old_id = gcp.instances["rgpu-1"]["id"]
    result = await p.replace(await ref_of(p, "rgpu-1"), "rem-r1", "xid 79")
    assert result.new_host and result.operation.endswith("recreateInstances")
    assert result.replacement and result.replacement != old_id
    assert "regional MIG gpu-rmig (us-central1)" in result.detail
    recreate = [s for s in gcp.seen if s[0] == "recreateInstances"]
    assert len(recreate) == 1
    _, mig, query, body = recreate[0]
    assert mig == "gpu-rmig" and body == {"instances": ["zones/us-central1-a/instances/rgpu-1"]}
    assert query["requestId"] == request_id("rem-r1", "recreate")
    # the regional API end to end: recreate, the regional operation polled through regionOperations.wait (the
    # zonal one would be a 404), then the regional listManagedInstances until NONE / RUNNING (RECREATING twice)
    op = result.operation
    assert [(m, path) for m, path in gcp.paths if path.startswith(REGIONAL_MIG) or "/regions/" in path] == [
        ("POST", f"{REGIONAL_MIG}/recreateInstances"),
        ("POST", f"/compute/v1/projects/gpu-proj/regions/us-central1/operations/{op}/wait"),
        ("POST", f"{REGIONAL_MIG}/listManagedInstances"),
        ("POST", f"{REGIONAL_MIG}/listManagedInstances"),
        ("POST", f"{REGIONAL_MIG}/listManagedInstances")]
    assert not [path for path in mig_paths(gcp) if "/zones/us-central1-a/instanceGroupManagers/" in path]
    labels = next(s[3]["labels"] for s in gcp.seen if s[0] == "setLabels")
    assert labels["remediation-id"] == "rem-r1" and labels["remediation-action"] == "replace"


async def test_regional_replace_second_delivery_sends_the_same_request_id(gcp):
    p = provider(gcp)
    ref = await ref_of(p, "rgpu-2")
    first = await p.replace(ref, "rem-r2", "t")
    second = await p.replace(ref, "rem-r2", "t")  # a re-delivery / a re-run after a crash
    assert [s[2]["requestId"] for s in gcp.seen if s[0] == "recreateInstances"] == [
        request_id("rem-r2", "recreate")] * 2
    assert second.operation == first.operation
    ops = [o for o in gcp.operations.values() if o["operationType"] == "recreateInstances"]
    assert len(ops) == 1 and ops[0]["_scope"] == ("regions", "us-central1")


async def test_regional_mig_outside_allowed_groups_is_not_touched(gcp):
    p = provider(gcp, allowed_groups=["gpu-mig"])  # the zonal MIG only
    labels = dict(gcp.instances["rgpu-1"]["labels"])
    with pytest.raises(ProviderError) as err:
        await p.replace(await ref_of(p, "rgpu-1"), "rem-r3", "t")
    assert err.value.kind == "unsupported" and "allowed_groups" in err.value.detail
    assert "regional MIG gpu-rmig" in err.value.detail
    assert gcp.seen_verbs() == ["get"] and gcp.instances["rgpu-1"]["labels"] == labels
    # listed by name, the regional MIG is replaced
    p = provider(gcp, allowed_groups=["gpu-rmig"])
    assert (await p.replace(await ref_of(p, "rgpu-1"), "rem-r4", "t")).new_host
    assert [s[1] for s in gcp.seen if s[0] == "recreateInstances"] == ["gpu-rmig"]


@pytest.mark.parametrize("created_by", [
    "projects/123456/regions/europe-west4/instanceGroupManagers/gpu-rmig",   # another region
    "projects/123456/regions/us-central/instanceGroupManagers/gpu-rmig",     # a prefix of the zone, no region
    "projects/123456/regions/us/instanceGroupManagers/gpu-rmig",             # the zone starts with "us-": no region
    "projects/123456/regions/us-central1-a/instanceGroupManagers/gpu-rmig",  # a zone where a region belongs
    "projects/123456/regions/US-central1/instanceGroupManagers/gpu-rmig",
    "projects/123456/regions/us-central1;rm/instanceGroupManagers/gpu-rmig",
    "projects/123456/regions/us-central1/instanceGroupManagers/GPU_rmig",
    "projects/123456/regions/us-central1/instanceGroupManagers/gpu-rmig/x",
    "projects/123456/zones/us-east1-b/instanceGroupManagers/gpu-mig",        # a zonal MIG in another zone
])
async def test_created_by_that_does_not_hold_the_instance_is_refused_before_any_call(gcp, created_by):
    gcp.add_instance("stray-1", created_by=created_by)
    p = provider(gcp)
    with pytest.raises(ProviderError) as err:
        await p.replace(await ref_of(p, "stray-1"), "rem-r5", "t")
    assert err.value.kind == "invalid" and "not touched" in err.value.detail
    assert gcp.seen_verbs() == ["get"]  # reading created-by is the only call: no label, no MIG call


async def test_regional_throttled_then_success(gcp):
    p = provider(gcp)
    gcp.script["regions:recreateInstances"] = [RATE_LIMITED, UNAVAILABLE]
    gcp.script["regions:wait"] = [RATE_LIMITED]
    gcp.script["regions:listManagedInstances"] = [RATE_LIMITED]
    result = await p.replace(await ref_of(p, "rgpu-2"), "rem-r6", "t")
    assert result.new_host and result.replacement
    assert p.retries_seen == 4
    recreate = [path for path in mig_paths(gcp) if path.endswith("/recreateInstances")]
    assert recreate == [f"{REGIONAL_MIG}/recreateInstances"] * 3
    assert {s[2]["requestId"] for s in gcp.seen if s[0] == "recreateInstances"} == {request_id("rem-r6", "recreate")}
    assert len([path for path in mig_paths(gcp) if "/regions/us-central1/operations/" in path]) == 2


async def test_regional_errors_are_classified_as_the_zonal_ones(gcp):
    p = provider(gcp, max_attempts=2)
    gcp.script["regions:recreateInstances"] = [RATE_LIMITED, RATE_LIMITED]
    with pytest.raises(ProviderError) as err:
        await p.replace(await ref_of(p, "rgpu-1"), "rem-r7", "t")
    assert err.value.kind == "throttled" and "regionInstanceGroupManagers.recreateInstances(gpu-rmig)" in \
        err.value.detail
    gcp.script["regions:recreateInstances"] = [FORBIDDEN]
    with pytest.raises(ProviderError) as err:
        await p.replace(await ref_of(p, "rgpu-2"), "rem-r8", "t")
    assert err.value.kind == "auth" and "deploy/iam/gcp-custom-role.yaml" in err.value.detail
    gcp.op_errors["recreateInstances"] = [{"code": "ZONE_RESOURCE_POOL_EXHAUSTED",
                                           "message": "The zone does not have enough resources"}]
    with pytest.raises(ProviderError) as err:
        await p.replace(await ref_of(p, "rgpu-2"), "rem-r9", "t")
    assert err.value.kind == "capacity" and "regional MIG gpu-rmig" in err.value.detail


def test_iam_role_covers_the_zonal_and_regional_calls():
    """Every Compute API the provider calls, and the permission GCP checks for it (REST reference)."""
    import yaml

    role = yaml.safe_load((Path(__file__).parents[2] / "deploy/iam/gcp-custom-role.yaml").read_text())
    needed = {
        "instances.get": "compute.instances.get",
        "instances.setLabels": "compute.instances.setLabels",
        "instances.reset": "compute.instances.reset",
        "instances.reportHostAsFaulty": "compute.instances.reportHostAsFaulty",
        "instanceGroupManagers.recreateInstances": "compute.instanceGroupManagers.update",
        "instanceGroupManagers.listManagedInstances": "compute.instanceGroupManagers.get",
        "regionInstanceGroupManagers.recreateInstances": "compute.instanceGroupManagers.update",
        "regionInstanceGroupManagers.listManagedInstances": "compute.instanceGroupManagers.get",
        "zoneOperations.wait": "compute.zoneOperations.get",
        "regionOperations.wait": "compute.regionOperations.get",
    }
    missing = {api: perm for api, perm in needed.items() if perm not in role["includedPermissions"]}
    assert not missing
    assert set(role["includedPermissions"]) == set(needed.values())  # and nothing more


async def test_reboot_is_a_reset_on_the_same_host(gcp):
    p = provider(gcp)
    result = await p.reboot(await ref_of(p, "gpu-1"), "rem-3", "t")
    assert not result.new_host and result.operation.endswith("reset")
    reset = [s for s in gcp.seen if s[0] == "reset"]
    assert reset[0][2]["requestId"] == request_id("rem-3", "reset")
    assert "wait" in gcp.seen_verbs()


async def test_throttled_and_unavailable_then_success(gcp):
    p = provider(gcp)
    gcp.script["recreateInstances"] = [RATE_LIMITED, UNAVAILABLE]
    gcp.script["get"] = [RATE_LIMITED]
    result = await p.replace(await ref_of(p, "gpu-2"), "rem-4", "t")
    assert result.new_host
    assert gcp.seen_verbs().count("recreateInstances") == 3 and p.retries_seen == 3
    # every retry carried the same requestId
    assert {s[2]["requestId"] for s in gcp.seen if s[0] == "recreateInstances"} == {request_id("rem-4", "recreate")}


async def test_throttled_for_good(gcp):
    p = provider(gcp, max_attempts=2)
    gcp.script["reset"] = [RATE_LIMITED, RATE_LIMITED]
    with pytest.raises(ProviderError) as err:
        await p.reboot(await ref_of(p, "gpu-1"), "rem-5", "t")
    assert err.value.kind == "throttled" and "rate limit" in err.value.detail


async def test_auth_error_names_the_role(gcp):
    p = provider(gcp)
    gcp.script["recreateInstances"] = [FORBIDDEN]
    with pytest.raises(ProviderError) as err:
        await p.replace(await ref_of(p, "gpu-1"), "rem-6", "t")
    assert err.value.kind == "auth" and "deploy/iam/gcp-custom-role.yaml" in err.value.detail
    assert "compute.instanceGroupManagers.update" in err.value.detail
    assert gcp.seen_verbs().count("recreateInstances") == 1  # not retried


async def test_not_found_and_no_mig(gcp):
    p = provider(gcp)
    with pytest.raises(ProviderError) as err:
        await p.replace(await ref_of(p, "gone-1"), "rem-7", "t")
    assert err.value.kind == "not_found" and "gone-1" in err.value.detail
    with pytest.raises(ProviderError) as err:
        await p.replace(await ref_of(p, "lone"), "rem-8", "t")
    assert err.value.kind == "unsupported" and "no managed instance group" in err.value.detail
    assert "recreateInstances" not in gcp.seen_verbs()


async def test_operation_error_is_failed_or_capacity(gcp):
    p = provider(gcp)
    gcp.op_errors["reset"] = [{"code": "INTERNAL_ERROR", "message": "Internal error. Please try again."}]
    with pytest.raises(ProviderError) as err:
        await p.reboot(await ref_of(p, "gpu-1"), "rem-9", "t")
    assert err.value.kind == "failed" and "INTERNAL_ERROR" in err.value.detail and "operation-" in err.value.detail
    gcp.op_errors["recreateInstances"] = [{"code": "ZONE_RESOURCE_POOL_EXHAUSTED",
                                           "message": "The zone does not have enough resources"}]
    with pytest.raises(ProviderError) as err:
        await p.replace(await ref_of(p, "gpu-2"), "rem-10", "t")
    assert err.value.kind == "capacity"


async def test_report_faulty_host_for_a3_ultra(gcp):
    p = provider(gcp, report_faulty_host=True, fault_behavior="UNRECOVERABLE_GPU_ERROR")
    result = await p.replace(await ref_of(p, "ultra-1"), "rem-11", "xid 79")
    assert result.new_host and result.operation.endswith("reportHostAsFaulty")
    call = next(s for s in gcp.seen if s[0] == "reportHostAsFaulty")
    assert call[2]["requestId"] == request_id("rem-11", "report-faulty-host")
    assert call[3]["disruptionSchedule"] == "IMMEDIATE"
    assert call[3]["faultReasons"][0]["behavior"] == "UNRECOVERABLE_GPU_ERROR"
    assert "recreateInstances" not in gcp.seen_verbs()
    # an A3 High cannot be reported: move refuses before any call
    with pytest.raises(ProviderError) as err:
        await p.move(await ref_of(p, "gpu-1"), "rem-12", "t")
    assert err.value.kind == "unsupported" and "A3 Ultra" in err.value.detail


async def test_label_fingerprint_conflict_is_reread(gcp):
    p = provider(gcp)
    gcp.script["setLabels"] = [(412, {"error": {"code": 412, "message": "Labels fingerprint either invalid or "
                                                                        "resource labels have changed"}})]
    await p.tag(await ref_of(p, "gpu-1"), {"id": "rem-13"})
    assert gcp.instances["gpu-1"]["labels"]["remediation-id"] == "rem-13"
    assert gcp.seen_verbs().count("get") == 2


async def test_hostile_ids_make_no_call(gcp):
    p = provider(gcp)
    for bad in ("gce://gpu-proj/us-central1-a/GPU;rm", "gce://x/us-central1-a/gpu-1", "gce://gpu-proj/zone/gpu-1",
                "gce://gpu-proj/us-central1-a/gpu-1/extra", "aws:///us-east-1a/i-0123456789abcdef0"):
        with pytest.raises(ProviderError) as err:
            await p.resolve(NodeIdentity("n", "u", provider_id=bad))
        assert err.value.kind == "invalid"
    assert gcp.seen == []


def test_config_errors_name_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"providers.gcp.fault_behavior"):
        GcpProvider.from_config({"fault_behavior": "BAD"}, "providers.gcp")
    with pytest.raises(ConfigError, match=r"providers.gcp.anonymous"):
        GcpProvider.from_config({"anonymous": True}, "providers.gcp")
    with pytest.raises(ConfigError, match=r"providers.gcp.bogus"):
        GcpProvider.from_config({"bogus": 1}, "providers.gcp")
    from remediation_webhook.config import build_config

    raw = base_config(tmp_path, "http://127.0.0.1:1", policy={"dry_run": True, "rules": []},
                      actions={"replace": {"using": "gcp"}})
    with pytest.raises(ConfigError, match=r"actions.replace.using: gcp needs providers.gcp"):
        build_config(raw, base=tmp_path)


async def test_replace_through_the_webhook(tmp_path, kube, gcp):
    kube.add_node("gpu-a", provider_id=PID.format("gpu-1"))
    kube.add_pod("kube-system", "dcgm-a", "gpu-a", daemonset=True)
    raw = replace_config(tmp_path, kube.url, "gcp", cfg(gcp))
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    try:
        assert (await h.post(notification(alert("gpu-a", remediation="reboot")))).status == 200
        await await_for(lambda: h.states().get("gpu-a") == "SUCCEEDED", timeout=20, what="replace")
        rid = h.sql("SELECT id FROM remediation WHERE node='gpu-a'")[0][0]
        recreate = [s for s in gcp.seen if s[0] == "recreateInstances"]
        assert len(recreate) == 1 and recreate[0][2]["requestId"] == request_id(rid, "recreate")
    finally:
        await close_harness(h)


async def test_auth_failure_through_the_webhook_is_journaled(tmp_path, kube, gcp):
    kube.add_node("gpu-b", provider_id=PID.format("gpu-2"))
    kube.add_pod("kube-system", "dcgm-b", "gpu-b", daemonset=True)
    gcp.script["recreateInstances"] = [FORBIDDEN]
    raw = replace_config(tmp_path, kube.url, "gcp", cfg(gcp))
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    try:
        assert (await h.post(notification(alert("gpu-b", remediation="reboot")))).status == 200
        await await_for(lambda: h.states().get("gpu-b") in ("FAILED", "ESCALATED"), timeout=20, what="failure")
        rid = h.sql("SELECT id FROM remediation WHERE node='gpu-b'")[0][0]
        detail = h.sql("SELECT detail FROM step WHERE remediation_id=? AND action='replace'", rid)[0][0]
        assert detail.startswith("gcp auth:") and "gcp-custom-role.yaml" in detail
        assert h.metric("gpu_remediation_provider_events_total", provider="gcp", action="replace",
                        kind="auth") == 1
    finally:
        await close_harness(h)


async def test_replaced_after_a_restart_reads_labels_and_creation_time(gcp):
    import time

    from remediation_webhook.actions.base import Observation

    p = provider(gcp)
    ref = await ref_of(p, "gpu-2")
    since = time.time() - 1
    assert await p.replaced(ref, "rem-80", since=since) == Observation.NOT_DONE  # nothing labelled, nothing sent
    await p.tag(ref, {"id": "rem-80", "action": "replace", "state": "replacing"})
    # labelled, not yet recreated: sending (again) is right, even long after (the old VM is still there)
    assert await p.replaced(ref, "rem-80", since=since) == Observation.NOT_DONE
    assert await p.replaced(ref, "rem-80", since=since - 7200) == Observation.NOT_DONE
    await p.replace(ref, "rem-80", "t")  # recreated from the template: our labels gone, a new creation time
    assert await p.replaced(ref, "rem-80", since=since) == Observation.DONE
    # a later restart of another remediation, begun after this VM was created, sees nothing of its own
    assert await p.replaced(ref, "rem-81", since=time.time() + 1) == Observation.NOT_DONE


async def test_replaced_report_faulty_host_past_the_request_id_window_is_ambiguous(gcp):
    import time

    from remediation_webhook.actions.base import Observation

    p = provider(gcp, report_faulty_host=True)
    ref = await ref_of(p, "ultra-1")
    await p.tag(ref, {"id": "rem-82", "action": "report-faulty-host"})
    assert await p.replaced(ref, "rem-82", since=time.time() - 60) == Observation.NOT_DONE  # the requestId dedupes
    assert await p.replaced(ref, "rem-82", since=time.time() - 4000) == Observation.AMBIGUOUS
    del gcp.instances["gpu-1"]  # deleted mid-recreate
    assert await p.replaced(await ref_of(p, "gpu-1"), "rem-83", since=time.time()) == Observation.AMBIGUOUS
