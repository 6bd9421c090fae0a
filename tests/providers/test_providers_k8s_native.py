"""Karpenter and Cluster API replace against kmock (it stores custom resources; failures are kmock reactions)."""

from __future__ import annotations

import kmock
import pytest

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

from remediation_webhook.actions.base import Observation
from remediation_webhook.errors import ConfigError
from remediation_webhook.inventory.base import NodeIdentity
from remediation_webhook.kube import KubernetesSettings
from remediation_webhook.providers import ProviderError
from remediation_webhook.providers.k8s_native import (
    ClusterApiProvider,
    KarpenterProvider,
)

NODECLAIMS = kmock.resource("karpenter.sh", "v1", "nodeclaims")
MACHINES = kmock.resource("cluster.x-k8s.io", "v1beta1", "machines")


def post(kube, path, body):
    r = kube.http.post(f"{kube.url}{path}", json=body, timeout=5)
    assert r.status_code < 300, r.text


def exists(kube, path) -> bool:
    return kube.http.get(f"{kube.url}{path}", timeout=5).status_code == 200


def karpenter_node(kube, node="gpu-k", claim="gpu-pool-abcde"):
    post(kube, "/apis/karpenter.sh/v1/nodeclaims", {"apiVersion": "karpenter.sh/v1", "kind": "NodeClaim",
                                                    "metadata": {"name": claim}})
    post(kube, "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": node, "uid": f"uid-{node}", "labels": {"karpenter.sh/nodepool": "gpu-pool",
                                                       "kubernetes.io/hostname": node},
        "ownerReferences": [{"apiVersion": "karpenter.sh/v1", "kind": "NodeClaim", "name": claim, "uid": "c1",
                             "blockOwnerDeletion": True}]},
        "spec": {"providerID": "aws:///us-east-1a/i-0123456789abcdef0"}})


def capi_node(kube, node="gpu-c", machine="md-gpu-7f9c-xk2lp", owned=True):
    owners = [{"apiVersion": "cluster.x-k8s.io/v1beta1", "kind": "MachineSet", "name": "md-gpu-7f9c",
               "uid": "ms1", "controller": True}] if owned else []
    post(kube, "/apis/cluster.x-k8s.io/v1beta1/namespaces/capi-system/machines", {
        "apiVersion": "cluster.x-k8s.io/v1beta1", "kind": "Machine",
        "metadata": {"name": machine, "namespace": "capi-system", "ownerReferences": owners}})
    kube.add_node(node, annotations={"cluster.x-k8s.io/machine": machine,
                                     "cluster.x-k8s.io/cluster-namespace": "capi-system"})


def settings(kube):
    return KubernetesSettings(host=kube.url, request_timeout=5)


@pytest.fixture(name="providers")
def _providers(kube):
    made = []

    def make(cls, **raw):
        p = cls.from_config({"poll_interval": "10ms", "timeout": "500ms", **raw}, f"providers.{cls.name}")
        p.bind_kubernetes(settings(kube), f"providers.{cls.name}")
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


async def test_karpenter_deletes_the_nodeclaim(kube, providers):
    karpenter_node(kube)
    p = providers(KarpenterProvider)
    ref = await p.resolve(NodeIdentity("gpu-k", "uid-gpu-k"))
    assert ref.instance_id == "gpu-pool-abcde" and ref.group == "gpu-pool"
    result = await p.replace(ref, "rem-1", "t")
    assert result.new_host and "deleted" in result.detail
    assert not exists(kube, "/apis/karpenter.sh/v1/nodeclaims/gpu-pool-abcde")
    assert ("DELETE", "/apis/karpenter.sh/v1/nodeclaims/gpu-pool-abcde") in [c[:2] for c in kube.calls()]
    assert await p.replaced(ref, "rem-1") == Observation.DONE
    again = await p.replace(ref, "rem-1", "t")  # a re-run: 404 on delete means done
    assert "already gone" in again.detail


async def test_karpenter_refuses_other_nodes(kube, providers):
    kube.add_node("plain")
    p = providers(KarpenterProvider)
    with pytest.raises(ProviderError) as err:
        await p.resolve(NodeIdentity("plain", "u"))
    assert err.value.kind == "unsupported" and "karpenter.sh/nodepool" in err.value.detail


async def test_karpenter_stuck_finalizer_fails(kube, providers):
    karpenter_node(kube)
    # the NodeClaim keeps answering (its termination finalizer never finishes)
    kube.km["get", NODECLAIMS] << (lambda request: kmock.Response(status=200, payload={
        "apiVersion": "karpenter.sh/v1", "kind": "NodeClaim", "metadata": {"name": "gpu-pool-abcde",
                                                                           "finalizers": ["karpenter.sh/termination"]}}))
    p = providers(KarpenterProvider)
    with pytest.raises(ProviderError) as err:
        await p.replace(await p.resolve(NodeIdentity("gpu-k", "u")), "rem-2", "t")
    assert err.value.kind == "failed" and "finalizer" in err.value.detail


async def test_karpenter_forbidden_is_auth(kube, providers):
    karpenter_node(kube)
    kube.km["delete", NODECLAIMS] << (lambda request: kmock.Response(status=403, payload={
        "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
        "message": 'nodeclaims.karpenter.sh "gpu-pool-abcde" is forbidden'}))
    p = providers(KarpenterProvider)
    with pytest.raises(ProviderError) as err:
        await p.replace(await p.resolve(NodeIdentity("gpu-k", "u")), "rem-3", "t")
    assert err.value.kind == "auth" and "deploy/iam/k8s-native-rbac.yaml" in err.value.detail
    # (kmock's store applies the DELETE even when a reaction answers 403, so the object's fate is not asserted)


async def test_cluster_api_deletes_the_machine(kube, providers):
    capi_node(kube)
    p = providers(ClusterApiProvider)
    ref = await p.resolve(NodeIdentity("gpu-c", "u"))
    assert (ref.zone, ref.instance_id) == ("capi-system", "md-gpu-7f9c-xk2lp")
    result = await p.replace(ref, "rem-4", "t")
    assert result.new_host
    assert not exists(kube, "/apis/cluster.x-k8s.io/v1beta1/namespaces/capi-system/machines/md-gpu-7f9c-xk2lp")


async def test_cluster_api_refuses_unowned_and_unannotated(kube, providers):
    capi_node(kube, node="cp-0", machine="cp-0-machine", owned=False)
    kube.add_node("plain")
    p = providers(ClusterApiProvider)
    with pytest.raises(ProviderError) as err:
        await p.replace(await p.resolve(NodeIdentity("cp-0", "u")), "rem-5", "t")
    assert err.value.kind == "unsupported" and "MachineSet" in err.value.detail
    assert exists(kube, "/apis/cluster.x-k8s.io/v1beta1/namespaces/capi-system/machines/cp-0-machine")
    with pytest.raises(ProviderError) as err:
        await p.resolve(NodeIdentity("plain", "u"))
    assert err.value.kind == "unsupported"
    kube.add_node("evil", annotations={"cluster.x-k8s.io/machine": "../x",
                                       "cluster.x-k8s.io/cluster-namespace": "capi-system"})
    with pytest.raises(ProviderError) as err:
        await p.resolve(NodeIdentity("evil", "u"))
    assert err.value.kind == "invalid"
    assert not [c for c in kube.calls(mutating=True) if "machines" in c[1]]


async def test_missing_node_is_not_found(kube, providers):
    p = providers(KarpenterProvider)
    with pytest.raises(ProviderError) as err:
        await p.resolve(NodeIdentity("ghost", "u"))
    assert err.value.kind == "not_found"


def test_config_needs_kubernetes(tmp_path):
    from remediation_webhook.config import build_config

    raw = base_config(tmp_path, "http://127.0.0.1:1", providers={"karpenter": {"timeout": "1m"}},
                      policy={"dry_run": True, "rules": []})
    raw.pop("kubernetes")
    with pytest.raises(ConfigError):
        build_config(raw, base=tmp_path)
    with pytest.raises(ConfigError, match=r"providers.cluster_api.bogus"):
        ClusterApiProvider.from_config({"bogus": 1}, "providers.cluster_api")
    with pytest.raises(ConfigError, match=r"providers.karpenter: needs the kubernetes"):
        KarpenterProvider.from_config({}, "providers.karpenter").bind_kubernetes(None, "providers.karpenter")


async def test_replace_using_karpenter_through_the_webhook(tmp_path, kube):
    karpenter_node(kube, node="gpu-w", claim="gpu-pool-wxyz1")
    kube.add_pod("kube-system", "dcgm-w", "gpu-w", daemonset=True)
    raw = replace_config(tmp_path, kube.url, "karpenter", {"poll_interval": "20ms", "timeout": "5s"}, drain=False)
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    try:
        assert (await h.post(notification(alert("gpu-w", remediation="reboot")))).status == 200
        await await_for(lambda: h.states().get("gpu-w") == "SUCCEEDED", timeout=20, what="replace")
        assert not exists(kube, "/apis/karpenter.sh/v1/nodeclaims/gpu-pool-wxyz1")
    finally:
        await close_harness(h)
