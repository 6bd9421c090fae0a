"""Azure against a local HTTPS fake of ARM's Microsoft.Compute API, with the real ComputeManagementClient."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("azure.mgmt.compute")

from tests.providers.fakes.azure_compute import FORBIDDEN, THROTTLED, UNAVAILABLE
from tests.providers.fakes.support import AZURE_SUB as SUB
from tests.providers.fakes.support import azure_provider

from remediation_webhook.actions.base import Observation
from remediation_webhook.errors import ConfigError
from remediation_webhook.inventory.base import NodeIdentity
from remediation_webhook.providers import ProviderError
from remediation_webhook.providers.azure import AzureProvider

PID = f"azure:///subscriptions/{SUB}/resourceGroups/gpu-rg/providers/Microsoft.Compute/virtualMachineScaleSets/{{}}/" \
      f"virtualMachines/{{}}"


@pytest.fixture(name="az")
def _az(az):
    """The shared fake (conftest) plus a scale set that AKS manages."""
    az.add_scale_set("gpu-rg", "aks-gpu-vmss", instances=2, tags={"aks-managed-poolName": "gpu"})
    return az


async def ref_of(p, vmss="gpu-vmss", instance="1"):
    return await p.resolve(NodeIdentity("n", "u", provider_id=PID.format(vmss, instance)))


async def test_reboot_is_a_per_instance_restart(az, tls):
    p = azure_provider(az, tls)
    result = await p.reboot(await ref_of(p), "rem-1", "t")
    assert not result.new_host and "/operations/" in result.operation
    paths = [path for verb, path in az.seen if verb == "restart"]
    assert paths == [(f"/subscriptions/{SUB}/resourceGroups/gpu-rg/providers/Microsoft.Compute/"
                      f"virtualMachineScaleSets/gpu-vmss/virtualMachines/1/restart")]
    assert az.verbs().count("operation") >= 2  # InProgress, then Succeeded
    assert az.scale_set_actions == []


async def test_replace_redeploys_to_a_new_host(az, tls):
    p = azure_provider(az, tls)
    result = await p.replace(await ref_of(p, instance="2"), "rem-2", "xid 79")
    assert result.new_host and "redeploy" in result.detail
    assert "redeploy" in az.verbs() and az.scale_set_actions == []


async def test_replace_by_delete_scales_back_out(az, tls):
    p = azure_provider(az, tls, replace_mode="delete")
    ref = await ref_of(p, instance="0")
    result = await p.replace(ref, "rem-3", "t")
    assert result.new_host
    assert ("gpu-rg", "gpu-vmss", "0") not in az.vms
    assert az.scale_sets[("gpu-rg", "gpu-vmss")]["sku"]["capacity"] == 3  # put back after the delete
    verbs = az.verbs()
    assert "update" in verbs[verbs.index("delete"):]  # the capacity comes back after the delete
    assert "gpu-health-replace" not in az.scale_sets[("gpu-rg", "gpu-vmss")]["tags"]  # the marker is cleared
    assert await p.replaced(ref, "rem-3") == Observation.DONE
    assert az.scale_set_actions == []


async def test_reimage_is_per_instance(az, tls):
    p = azure_provider(az, tls, replace_mode="reimage")
    result = await p.replace(await ref_of(p), "rem-4", "t")
    assert not result.new_host and "reimage" in az.verbs()
    assert az.scale_set_actions == []  # never .../virtualMachineScaleSets/{vmss}/reimage


async def test_aks_managed_scale_sets_are_refused(az, tls):
    p = azure_provider(az, tls)
    with pytest.raises(ProviderError) as err:
        await p.replace(await ref_of(p, vmss="aks-gpu-vmss", instance="0"), "rem-5", "t")
    assert err.value.kind == "unsupported" and "agentPools" in err.value.detail and "AKS" in err.value.detail
    mc = await p.resolve(NodeIdentity("n", "u", provider_id=PID.replace("gpu-rg", "MC_rg_cluster_eastus")
                                      .format("gpu-vmss", "0")))
    with pytest.raises(ProviderError) as err:
        await p.reboot(mc, "rem-6", "t")
    assert err.value.kind == "unsupported" and "MC_" in err.value.detail
    assert not {"restart", "redeploy", "reimage", "delete"} & set(az.verbs())


async def test_throttled_then_success(az, tls):
    p = azure_provider(az, tls)
    az.script["redeploy"] = [THROTTLED, THROTTLED]
    result = await p.move(await ref_of(p), "rem-7", "t")
    assert result.new_host and az.verbs().count("redeploy") == 3


async def test_throttled_for_good(az, tls):
    p = azure_provider(az, tls, max_attempts=2)
    az.script["restart"] = [THROTTLED, THROTTLED]
    with pytest.raises(ProviderError) as err:
        await p.reboot(await ref_of(p), "rem-8", "t")
    assert err.value.kind == "throttled"


async def test_unavailable_then_success_and_for_good(az, tls):
    p = azure_provider(az, tls, max_attempts=3)
    az.script["redeploy"] = [UNAVAILABLE, UNAVAILABLE]
    result = await p.replace(await ref_of(p), "rem-15", "t")  # azure-core retries 5xx
    assert result.new_host and az.verbs().count("redeploy") == 3
    az.script["restart"] = [UNAVAILABLE] * 3
    with pytest.raises(ProviderError) as err:
        await p.reboot(await ref_of(p), "rem-16", "t")
    assert err.value.kind == "unavailable" and "503" in err.value.detail and "outcome is unknown" in err.value.detail
    assert az.verbs().count("restart") == 3


async def test_auth_errors(az, tls):
    p = azure_provider(az, tls)
    az.script["redeploy"] = [FORBIDDEN]
    with pytest.raises(ProviderError) as err:
        await p.replace(await ref_of(p), "rem-9", "t")
    assert err.value.kind == "auth" and "deploy/iam/azure-role-definition.json" in err.value.detail
    assert "AuthorizationFailed" in err.value.detail
    bad = azure_provider(az, tls, token="stale")
    with pytest.raises(ProviderError) as err:
        await bad.reboot(await ref_of(bad), "rem-10", "t")
    assert err.value.kind == "auth"


async def test_not_found(az, tls):
    p = azure_provider(az, tls, replace_mode="delete")
    with pytest.raises(ProviderError) as err:
        await p.replace(await ref_of(p, instance="42"), "rem-11", "t")
    assert err.value.kind == "not_found"
    with pytest.raises(ProviderError) as err:
        await p.reboot(await ref_of(p, vmss="nope"), "rem-12", "t")
    assert err.value.kind == "not_found"
    assert az.scale_sets[("gpu-rg", "gpu-vmss")]["sku"]["capacity"] == 3


async def test_operation_failed(az, tls):
    p = azure_provider(az, tls)
    az.op_errors["redeploy"] = {"code": "AllocationFailed",
                                "message": ("Allocation failed. We do not have sufficient capacity for the "
                                            "requested VM size")}
    with pytest.raises(ProviderError) as err:
        await p.replace(await ref_of(p), "rem-13", "t")
    assert err.value.kind == "capacity" and "AllocationFailed" in err.value.detail
    az.op_errors["restart"] = {"code": "InternalExecutionError", "message": "An internal execution error occurred."}
    with pytest.raises(ProviderError) as err:
        await p.reboot(await ref_of(p), "rem-14", "t")
    assert err.value.kind == "failed" and "InternalExecutionError" in err.value.detail


async def test_hostile_ids_make_no_call(az, tls):
    p = azure_provider(az, tls)
    for bad in (PID.format("gpu-vmss", "1;rm"), PID.format("gpu/../x", "1"),
                PID.replace(SUB, "not-a-guid").format("gpu-vmss", "1"), "gce://gpu-proj/us-central1-a/x"):
        with pytest.raises(ProviderError) as err:
            await p.resolve(NodeIdentity("n", "u", provider_id=bad))
        assert err.value.kind == "invalid"
    assert az.seen == []


def test_config_errors_name_keys():
    with pytest.raises(ConfigError, match=r"providers.azure.base_url"):
        AzureProvider.from_config({"base_url": "http://127.0.0.1:1"}, "providers.azure")
    with pytest.raises(ConfigError, match=r"providers.azure.replace_mode"):
        AzureProvider.from_config({"replace_mode": "reimage_all"}, "providers.azure")


# ---------------------------------------------------------------------------------------------- crash safety


async def test_redeploy_and_reimage_are_ambiguous_after_a_crash(az, tls):
    for mode in ("redeploy", "reimage"):
        p = azure_provider(az, tls, replace_mode=mode)
        assert await p.replaced(await ref_of(p), "rem-20") == Observation.AMBIGUOUS
    assert not {"restart", "redeploy", "reimage", "delete", "update"} & set(az.verbs())


async def test_delete_interrupted_before_scale_out_is_finished_on_rerun(az, tls):
    p = azure_provider(az, tls, replace_mode="delete")
    ref = await ref_of(p, instance="1")
    vmss = az.scale_sets[("gpu-rg", "gpu-vmss")]
    assert await p.replaced(ref, "rem-21") == Observation.NOT_DONE  # nothing sent yet
    # The webhook died after the delete and before the scale-out: marker written, VM gone, capacity down by one.
    vmss["tags"] = {"team": "ml", "gpu-health-replace-rem-21": "3", "gpu-health-replace-rem-99": "3"}
    del az.vms[("gpu-rg", "gpu-vmss", "1")]
    vmss["sku"]["capacity"] = 2
    assert await p.replaced(ref, "rem-21") == Observation.NOT_DONE  # the scale-out is still owed
    assert await p.replaced(ref, "someone-else") == Observation.DONE
    result = await p.replace(ref, "rem-21", "t")
    assert "interrupted by a restart" in result.detail
    # ours cleared, another remediation's marker left alone
    assert vmss["sku"]["capacity"] == 3 and vmss["tags"] == {"team": "ml", "gpu-health-replace-rem-99": "3"}
    assert "delete" not in az.verbs()  # nothing deleted twice
    assert await p.replaced(ref, "rem-21") == Observation.DONE


async def test_delete_writes_its_marker_before_deleting(az, tls):
    p = azure_provider(az, tls, replace_mode="delete")
    az.op_errors["delete"] = {"code": "InternalExecutionError", "message": "boom"}
    with pytest.raises(ProviderError):
        await p.replace(await ref_of(p, instance="2"), "rem-22", "t")
    assert az.scale_sets[("gpu-rg", "gpu-vmss")]["tags"]["gpu-health-replace-rem-22"] == "3"
    assert az.verbs().index("update") < az.verbs().index("delete")


# ---------------------------------------------------------------------------------------------- AKS

CLUSTER = f"/subscriptions/{SUB}/resourceGroups/aks-rg/providers/Microsoft.ContainerService/managedClusters/aks1"
NODE_RG = "MC_aks-rg_aks1_eastus"


@pytest.fixture(name="aks")
def _aks(az):
    az.add_scale_set(NODE_RG, "aks-gpu-12345678-vmss", instances=2, tags={"aks-managed-poolName": "gpu"})
    az.machines_names = az.add_cluster("aks-rg", "aks1", node_rg=NODE_RG, pool="gpu",
                                       scale_set="aks-gpu-12345678-vmss", node_prefix="aks-gpu-12345678-vmss")
    return az


def aks_node(instance: str = "1", pool: str = "gpu") -> NodeIdentity:
    pid = PID.replace("gpu-rg", NODE_RG).format("aks-gpu-12345678-vmss", instance)
    return NodeIdentity(f"aks-gpu-12345678-vmss{int(instance):06d}", "u", provider_id=pid,
                        labels={"kubernetes.azure.com/agentpool": pool})


VMSS_WRITES = {"restart", "redeploy", "reimage", "delete", "update"}


async def test_aks_replace_deletes_the_machine_and_restores_the_count(aks, tls):
    p = azure_provider(aks, tls, aks_cluster=CLUSTER)
    ref = await p.resolve(aks_node("1"))
    result = await p.replace(ref, "rem-30", "xid 79")
    assert result.new_host and "/operations/" in result.operation
    deletes = [path for verb, path in aks.seen if verb == "delete_machines"]
    assert deletes == ["/subscriptions/" + SUB + "/resourceGroups/aks-rg/providers/Microsoft.ContainerService/"
                       "managedClusters/aks1/agentPools/gpu/deleteMachines"]
    assert (NODE_RG.lower(), "aks-gpu-12345678-vmss", "1") not in aks.vms
    assert aks.pools[("aks-rg", "aks1", "gpu")]["properties"]["count"] == 2  # put back after deleteMachines
    assert aks.verbs().index("delete_machines") < aks.verbs().index("put_pool")
    assert not VMSS_WRITES & set(aks.verbs()) and aks.scale_set_actions == []
    assert await p.replaced(ref, "rem-30") == Observation.AMBIGUOUS  # fixed pool: the owed count is unknowable


async def test_aks_autoscaling_pool_is_left_to_the_autoscaler(aks, tls):
    aks.pools[("aks-rg", "aks1", "gpu")]["properties"]["enableAutoScaling"] = True
    p = azure_provider(aks, tls, aks_cluster=CLUSTER)
    ref = await p.resolve(aks_node("0"))
    assert await p.replaced(ref, "rem-31") == Observation.NOT_DONE
    result = await p.replace(ref, "rem-31", "t")
    assert "autoscaler" in result.detail and "put_pool" not in aks.verbs()
    assert aks.pools[("aks-rg", "aks1", "gpu")]["properties"]["count"] == 1
    assert await p.replaced(ref, "rem-31") == Observation.DONE


async def test_aks_reboot_is_refused_without_any_vmss_call(aks, tls):
    p = azure_provider(aks, tls, aks_cluster=CLUSTER)
    for verb in (p.reboot, p.move):
        with pytest.raises(ProviderError) as err:
            await verb(await p.resolve(aks_node("0")), "rem-32", "t")
        assert err.value.kind == "unsupported" and "using: executor" in err.value.detail
    assert aks.seen == []


async def test_aks_cluster_of_another_node_group_is_not_touched(aks, tls):
    aks.clusters[("aks-rg", "aks1")]["properties"]["nodeResourceGroup"] = "MC_other"
    p = azure_provider(aks, tls, aks_cluster=CLUSTER)
    with pytest.raises(ProviderError) as err:
        await p.replace(await p.resolve(aks_node("0")), "rem-33", "t")
    assert err.value.kind == "unsupported" and "MC_other" in err.value.detail
    assert "delete_machines" not in aks.verbs()


async def test_aks_errors(aks, tls):
    p = azure_provider(aks, tls, aks_cluster=CLUSTER)
    with pytest.raises(ProviderError) as err:  # a hostile pool label: no call at all
        await p.replace(await p.resolve(aks_node("0", pool="gpu;rm -rf")), "rem-34", "t")
    assert err.value.kind == "invalid" and aks.seen == []
    gone = NodeIdentity("aks-gpu-12345678-vmss000009", "u", provider_id=aks_node("0").provider_id,
                        labels={"kubernetes.azure.com/agentpool": "gpu"})
    with pytest.raises(ProviderError) as err:
        await p.replace(await p.resolve(gone), "rem-35", "t")
    assert err.value.kind == "not_found" and "delete_machines" not in aks.verbs()
    aks.script["delete_machines"] = [FORBIDDEN]
    with pytest.raises(ProviderError) as err:
        await p.replace(await p.resolve(aks_node("0")), "rem-36", "t")
    assert err.value.kind == "auth" and "deploy/iam/azure-aks-role-definition.json" in err.value.detail
    aks.script["delete_machines"] = [THROTTLED]
    result = await p.replace(await p.resolve(aks_node("0")), "rem-37", "t")
    assert result.new_host and aks.verbs().count("delete_machines") == 3
    aks.op_errors["delete_machines"] = {"code": "OperationNotAllowed", "message": "Another operation is in progress"}
    with pytest.raises(ProviderError) as err:
        await p.replace(await p.resolve(aks_node("1")), "rem-38", "t")
    assert err.value.kind == "failed" and "OperationNotAllowed" in err.value.detail  # busy, not short of capacity


def test_aks_cluster_config_is_validated():
    with pytest.raises(ConfigError, match=r"providers.azure.aks_cluster"):
        AzureProvider.from_config({"aks_cluster": "aks1"}, "providers.azure")
    with pytest.raises(ConfigError, match=r"providers.azure.aks_cluster"):
        AzureProvider.from_config({"aks_cluster": CLUSTER.replace(SUB, "x")}, "providers.azure")
    assert AzureProvider.from_config({"aks_cluster": CLUSTER}, "providers.azure").aks_cluster == CLUSTER


def test_role_definitions_grant_what_the_provider_calls_and_deny_scale_set_wide_actions():
    import json

    root = Path(__file__).resolve().parents[2]
    vmss = json.loads((root / "deploy/iam/azure-role-definition.json").read_text())
    assert {"Microsoft.Compute/virtualMachineScaleSets/virtualMachines/redeploy/action",
            "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/delete",
            "Microsoft.Compute/virtualMachineScaleSets/write"} <= set(vmss["Actions"])
    assert "Microsoft.Compute/virtualMachineScaleSets/reimageall/action" in vmss["NotActions"]
    aks = json.loads((root / "deploy/iam/azure-aks-role-definition.json").read_text())
    assert {"Microsoft.ContainerService/managedClusters/agentPools/deleteMachines/action",
            "Microsoft.ContainerService/managedClusters/agentPools/write"} <= set(aks["Actions"])
    assert not any(a.startswith("Microsoft.Compute/") for a in aks["Actions"])  # never VMSS calls on AKS nodes
    assert all("managedClusters/" in scope for scope in aks["AssignableScopes"])


async def test_concurrent_deletes_in_one_scale_set_lose_no_capacity(az, tls):
    import asyncio

    p = azure_provider(az, tls, replace_mode="delete")
    refs = [await ref_of(p, instance=i) for i in ("0", "1")]
    results = await asyncio.gather(*(p.replace(ref, f"rem-4{n}", "t") for n, ref in enumerate(refs)))
    assert all(r.new_host for r in results)
    vmss = az.scale_sets[("gpu-rg", "gpu-vmss")]
    assert vmss["sku"]["capacity"] == 3 and not any(k.startswith("gpu-health-replace") for k in vmss["tags"])


async def test_aks_count_put_back_sends_only_writable_fields_under_the_etag(aks, tls):
    p = azure_provider(aks, tls, aks_cluster=CLUSTER)
    aks.changed_behind_our_back = 1  # the pool changes between our read and our PUT: read again, once
    await p.replace(await p.resolve(aks_node("1")), "rem-50", "t")
    assert aks.pools[("aks-rg", "aks1", "gpu")]["properties"]["count"] == 2
    assert len(aks.pool_puts) == 2 and aks.verbs().count("put_pool") == 2
    body = aks.pool_puts[-1]
    assert body["properties"]["count"] == 2
    assert not {"id", "name", "type"} & set(body)  # read-only fields stay out of the PUT
    assert not {"provisioningState", "eTag"} & set(body["properties"])


async def test_aks_concurrent_replaces_in_one_pool_lose_no_node(tls, az):
    import asyncio

    az.add_scale_set(NODE_RG, "aks-gpu-12345678-vmss", instances=3, tags={"aks-managed-poolName": "gpu"})
    az.add_cluster("aks-rg", "aks1", node_rg=NODE_RG, pool="gpu", scale_set="aks-gpu-12345678-vmss",
                   node_prefix="aks-gpu-12345678-vmss")
    p = azure_provider(az, tls, aks_cluster=CLUSTER)
    refs = [await p.resolve(aks_node(i)) for i in ("0", "2")]
    await asyncio.gather(*(p.replace(ref, f"rem-6{n}", "t") for n, ref in enumerate(refs)))
    assert az.pools[("aks-rg", "aks1", "gpu")]["properties"]["count"] == 3


async def test_aks_machine_of_another_vm_is_not_touched(aks, tls):
    p = azure_provider(aks, tls, aks_cluster=CLUSTER)
    liar = NodeIdentity("aks-gpu-12345678-vmss000000", "u", provider_id=aks_node("1").provider_id,
                        labels={"kubernetes.azure.com/agentpool": "gpu"})  # name says VM 0, providerID VM 1
    with pytest.raises(ProviderError) as err:
        await p.replace(await p.resolve(liar), "rem-70", "t")
    assert err.value.kind == "unsupported" and "disagree" in err.value.detail
    assert "delete_machines" not in aks.verbs()
