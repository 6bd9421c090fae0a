"""deploy/kubernetes: every overlay renders with `kubectl kustomize`, every object is valid for Kubernetes
(kubernetes-validate, strict: an unknown field fails), and the manifests keep the promises the docs make: the
exporter takes no GPU and no privilege it does not need, the webhook is a single journal writer with exactly the
RBAC it uses, and the configuration shipped in the ConfigMap is one the webhook accepts.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from exporter.config import parse as parse_exporter_flags
from exporter.registry import discover as exporter_collectors
from remediation_webhook.cli import build_parser as webhook_parser
from remediation_webhook.config import load_config as load_webhook_config

ROOT = Path(__file__).resolve().parent.parent.parent
K8S = ROOT / "deploy" / "kubernetes"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
# Oldest Kubernetes minor still in the cloud providers' extended support, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
OVERLAYS = ("base", "overlays/gpu-operator", "overlays/gke")
CRDS = {"ServiceMonitor", "PrometheusRule"}


def _kustomize_cmd() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


KUSTOMIZE = _kustomize_cmd()
needs_kustomize = pytest.mark.skipif(KUSTOMIZE is None, reason="neither kubectl (1.14+) nor kustomize found")


@functools.cache
def _render_dir(path: str) -> tuple[dict[str, Any], ...]:
    assert KUSTOMIZE is not None
    result = subprocess.run([*KUSTOMIZE, path], capture_output=True, check=False, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def render(overlay: str, components: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The objects of an overlay, with components added through a temporary overlay (deep copies)."""
    if not components:
        return copy.deepcopy(list(_render_dir(str(K8S / overlay))))
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        (tmp / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            # kustomize wants paths relative to the kustomization
            "resources": [os.path.relpath(K8S / overlay, tmp)],
            "components": [os.path.relpath(K8S / c, tmp) for c in components]}), encoding="utf-8")
        return copy.deepcopy(list(_render_dir(str(tmp))))


def one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    containers = one(objs, kind, name)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def pod_spec(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return one(objs, kind, name)["spec"]["template"]["spec"]


MEBI = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}


def mib(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * MEBI[unit]


def millicores(quantity: str) -> float:
    return float(quantity[:-1]) if quantity.endswith("m") else float(quantity) * 1000


# --- rendering and schema ------------------------------------------------------------------------------------


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_is_valid_kubernetes(overlay: str) -> None:
    objs = render(overlay)
    kinds = {o["kind"] for o in objs}
    assert {"DaemonSet", "StatefulSet", "Service", "ServiceMonitor", "PrometheusRule", "NetworkPolicy",
            "ClusterRole", "ConfigMap"} <= kinds
    for obj in objs:
        if obj["kind"] in CRDS:
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes "
                            f"{version}: {exc.message} at {'.'.join(map(str, exc.path))}")


def test_base_manifest_files_are_valid_kubernetes_without_kustomize() -> None:
    """The same check on the files themselves, for machines without kubectl: every object under base/."""
    files = [p for p in sorted((K8S / "base").rglob("*.yaml"))
             if p.name != "kustomization.yaml" and p != K8S / "base" / "webhook" / "config.yaml"]
    assert len(files) >= 12
    for path in files:
        for obj in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if obj["kind"] in CRDS:
                continue
            try:
                kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{path.relative_to(ROOT)}: {obj['kind']}/{obj['metadata']['name']}: {exc.message}")


@needs_kustomize
def test_strict_validation_catches_a_misspelt_field() -> None:
    ds = one(render("base"), "DaemonSet", "gpu-health-exporter")
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesytem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSIONS[-1], strict=True)


@needs_kustomize
def test_components_render_on_every_overlay() -> None:
    for overlay in OVERLAYS:
        objs = render(overlay, ("components/kmsg",))
        c = container(objs, "DaemonSet", "gpu-health-exporter")
        assert "--xid.source=kmsg" in c["args"] and "--xid.source=journal" not in c["args"]
        assert c["securityContext"]["privileged"] is True


_SERVICEMONITOR_ENDPOINT_KEYS = {"port", "path", "interval", "scrapeTimeout", "honorLabels", "relabelings",
                                 "authorization", "scheme", "metricRelabelings"}


@needs_kustomize
def test_servicemonitors_keep_the_exporters_labels_and_scrape_the_services() -> None:
    objs = render("base")
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    for name in ("gpu-health-exporter", "gpu-health-webhook"):
        sm = one(objs, "ServiceMonitor", name)
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(sm["spec"]) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
        service = services[name]
        assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert sm["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
        for ep in sm["spec"]["endpoints"]:
            assert set(ep) <= _SERVICEMONITOR_ENDPOINT_KEYS, set(ep) - _SERVICEMONITOR_ENDPOINT_KEYS
            assert ep["honorLabels"] is True  # the `node` label of the series is the exporter's / the webhook's
            assert ep["port"] in {p["name"] for p in service["spec"]["ports"]}
    exporter = one(objs, "ServiceMonitor", "gpu-health-exporter")["spec"]["endpoints"][0]
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"} in exporter["relabelings"]
    # The rules find the exporter's `up` by job, and the Operator names the job after the Service.
    rules = (ROOT / "rules" / "exporter.alerts.yaml").read_text(encoding="utf-8")
    job_patterns = set(re.findall(r'job=~"([^"]+)"', rules))
    assert job_patterns
    for pattern in job_patterns:
        assert re.fullmatch(pattern, services["gpu-health-exporter"]["metadata"]["name"]), pattern


@needs_kustomize
def test_prometheusrule_is_the_generated_one_not_a_copy() -> None:
    rule = one(render("base"), "PrometheusRule", "gpu-health")
    generated = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheusrule.yaml").read_text(encoding="utf-8"))
    assert rule["spec"] == generated["spec"]
    assert rule["metadata"]["namespace"] == "gpu-health"
    copies = [p for p in K8S.rglob("*.yaml")
              for doc in yaml.safe_load_all(p.read_text(encoding="utf-8"))
              if isinstance(doc, dict) and doc.get("kind") == "PrometheusRule"]
    assert copies == [], f"PrometheusRule copied into {copies}: reference deploy/prometheus instead"


# --- the exporter ---------------------------------------------------------------------------------------------


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_exporter_takes_no_gpu_and_runs_on_gpu_nodes_only(overlay: str) -> None:
    objs = render(overlay)
    spec = pod_spec(objs, "DaemonSet", "gpu-health-exporter")
    for c in spec["containers"] + spec.get("initContainers", []):
        for kind in ("requests", "limits"):
            assert not any("nvidia.com" in r for r in c.get("resources", {}).get(kind, {})), \
                "requesting a GPU would take it from the workloads"
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    keys = {e["key"] for t in terms for e in t["matchExpressions"]}
    assert keys == ({"cloud.google.com/gke-accelerator"} if overlay.endswith("gke") else {"nvidia.com/gpu.present"})
    assert {"operator": "Exists"} in spec["tolerations"]  # cordoned, tainted and quarantined nodes too
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    assert spec["automountServiceAccountToken"] is False


@needs_kustomize
def test_exporter_runtime_per_distribution() -> None:
    base, operator, gke = (pod_spec(render(o), "DaemonSet", "gpu-health-exporter") for o in OVERLAYS)
    assert "runtimeClassName" not in base and "runtimeClassName" not in gke
    assert operator["runtimeClassName"] == "nvidia"
    env = {e["name"]: e.get("value") for e in base["containers"][0]["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all" and "utility" in env["NVIDIA_DRIVER_CAPABILITIES"]
    # GKE: the host's driver directory, as GKE's own DaemonSets mount it, and privileged for /dev/nvidia*.
    gke_c = gke["containers"][0]
    assert {"name": "LD_LIBRARY_PATH", "value": "/usr/local/nvidia/lib64"} in gke_c["env"]
    mounts = {m["name"]: m for m in gke_c["volumeMounts"]}
    volumes = {v["name"]: v for v in gke["volumes"]}
    assert mounts["nvidia-install-dir-host"] == {"name": "nvidia-install-dir-host", "mountPath": "/usr/local/nvidia",
                                                 "readOnly": True}
    assert volumes["nvidia-install-dir-host"]["hostPath"]["path"] == "/home/kubernetes/bin/nvidia"
    assert gke_c["securityContext"]["privileged"] is True


@needs_kustomize
def test_exporter_reads_the_hosts_journal_with_no_privilege() -> None:
    objs = render("base")
    spec = pod_spec(objs, "DaemonSet", "gpu-health-exporter")
    c = spec["containers"][0]
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"] == {"drop": ["ALL"]}
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "--xid.source=journal" in c["args"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    # Read-only: the journals and the machine id journalctl matches them with. Writable: the state directory only.
    for path in ("/var/log/journal", "/run/log/journal", "/etc/machine-id"):
        assert mounts[path].get("readOnly") is True, path
        assert volumes[mounts[path]["name"]]["hostPath"]["path"] == path
    writable = {p for p, m in mounts.items() if not m.get("readOnly")}
    host_writable = {p for p in writable if "hostPath" in volumes[mounts[p]["name"]]}
    assert host_writable == {"/var/lib/gpu-health-exporter"}
    assert "/dev/kmsg" not in mounts and not any("kmsg" in str(v) for v in volumes.values())


@needs_kustomize
def test_exporter_flags_are_valid_and_match_the_mounts() -> None:
    objs = render("base")
    c = container(objs, "DaemonSet", "gpu-health-exporter")
    config = parse_exporter_flags(c["args"], exporter_collectors(), env={"NODE_NAME": "gpu-node-1"})
    assert config.node == "gpu-node-1"
    assert str(config.state_dir) in {m["mountPath"] for m in c["volumeMounts"]}
    assert config.listen.port == c["ports"][0]["containerPort"] == 9835
    node_name = next(e for e in c["env"] if e["name"] == "NODE_NAME")
    assert node_name["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["path"] == "/healthz"


@needs_kustomize
def test_exporter_resources_follow_the_benchmarks() -> None:
    res = container(render("base"), "DaemonSet", "gpu-health-exporter")["resources"]
    # RSS ~46 MiB at 8 GPUs and ~54 MiB at 64: the request covers 64 GPUs, the limit leaves room for a storm.
    assert 54 <= mib(res["requests"]["memory"]) <= 96
    assert mib(res["limits"]["memory"]) >= 2.5 * 54
    # ~0.1 % of a core (1m) at 8 GPUs: a small request, a limit far above it.
    assert 5 <= millicores(res["requests"]["cpu"]) <= 50
    assert millicores(res["limits"]["cpu"]) >= 100


# --- the webhook ----------------------------------------------------------------------------------------------


@needs_kustomize
def test_webhook_is_one_journal_writer_with_a_persistent_journal() -> None:
    objs = render("base")
    assert not [o for o in objs if o["kind"] == "Deployment" and "webhook" in o["metadata"]["name"]]
    sts = one(objs, "StatefulSet", "gpu-health-webhook")
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["podManagementPolicy"] == "OrderedReady"
    assert sts["spec"]["updateStrategy"]["type"] == "RollingUpdate"  # old pod gone before the new one starts
    one(objs, "Service", sts["spec"]["serviceName"])
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    c = sts["spec"]["template"]["spec"]["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/var/lib/gpu-health-webhook"


@needs_kustomize
def test_webhook_pod_is_restricted_and_stays_off_gpu_nodes() -> None:
    for overlay in OVERLAYS:
        spec = pod_spec(render(overlay), "StatefulSet", "gpu-health-webhook")
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        sc = spec["containers"][0]["securityContext"]
        assert sc == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}
        assert not any("hostPath" in v for v in spec["volumes"])
        terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        (term,) = terms["nodeSelectorTerms"]
        (expr,) = term["matchExpressions"]
        assert expr["operator"] in {"NotIn", "DoesNotExist"}  # it drains GPU nodes: never one of them


def _webhook_config(objs: list[dict[str, Any]], tmp_path: Path) -> tuple[dict[str, Any], Any]:
    """The ConfigMap's config.yaml, loaded by the webhook itself with the Secret's files in tmp_path."""
    sts = one(objs, "StatefulSet", "gpu-health-webhook")
    spec = sts["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    cm = one(objs, "ConfigMap", volumes["config"]["configMap"]["name"])
    text = cm["data"]["config.yaml"]
    secret_dir = mounts["tokens"]
    files = {item["path"] for item in volumes["tokens"]["secret"]["items"]}
    (tmp_path / "secrets").mkdir()
    for i, name in enumerate(sorted(files)):  # a token of each file its own: the listeners' must differ
        (tmp_path / "secrets" / name).write_text(f"{i:02d}" + "a" * 30 + "\n" + f"{i:02d}" + "b" * 30 + "\n",
                                                 encoding="utf-8")
    path = tmp_path / "config.yaml"
    path.write_text(text.replace(secret_dir + "/", str(tmp_path / "secrets") + "/"), encoding="utf-8")
    return yaml.safe_load(text), load_webhook_config(path)


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_webhook_config_is_accepted_and_matches_the_pod(overlay: str, tmp_path: Path) -> None:
    objs = render(overlay)
    raw, config = _webhook_config(objs, tmp_path)
    c = container(objs, "StatefulSet", "gpu-health-webhook")
    args = webhook_parser().parse_args(c["args"])
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert args.config == mounts["config"] + "/config.yaml"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert raw["web"]["listen_address"] == f":{ports['http']}" and ports["http"] == 9096
    assert raw["admin"]["listen_address"] == f":{ports['admin']}" and ports["admin"] == 9097
    assert config.web.auth_enabled and config.admin.auth_enabled  # tokens on both listeners
    assert Path(raw["journal"]["path"]).parent == Path(mounts["journal"])
    assert raw["kubernetes"]["in_cluster"] is True
    assert config.policy.dry_run is True  # shipped in dry-run: going live is a decision
    # Node Events go where the RBAC allows them.
    role = one(objs, "Role", "gpu-health-webhook-events")
    assert role["metadata"]["namespace"] == raw["kubernetes"]["event_namespace"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"


@needs_kustomize
def test_gke_webhook_config_differs_from_the_base_only_in_the_pool_selector(tmp_path: Path) -> None:
    base = yaml.safe_load((K8S / "base" / "webhook" / "config.yaml").read_text(encoding="utf-8"))
    gke = yaml.safe_load((K8S / "overlays" / "gke" / "webhook-config.yaml").read_text(encoding="utf-8"))
    assert gke["policy"]["targets"].pop("node_selector") == {}
    base["policy"]["targets"].pop("node_selector")
    assert gke == base


def _rules(objs: list[dict[str, Any]], kind: str, name: str) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in one(objs, kind, name)["rules"] for g in rule["apiGroups"]
            for r in rule["resources"] for v in rule["verbs"]}


def _check_rbac(rbac: list[dict[str, Any]]) -> None:
    for obj in rbac:
        text = yaml.safe_dump(obj)
        assert "'*'" not in text and "secrets" not in text and "escalate" not in text and "bind" not in text
        if obj["kind"].endswith("Binding"):
            assert obj["subjects"] == [{"kind": "ServiceAccount", "name": "gpu-health-webhook",
                                        "namespace": "gpu-health"}]


@needs_kustomize
def test_webhook_rbac_is_exactly_what_it_uses() -> None:
    objs = render("base")
    rbac = [o for o in objs if o["apiVersion"].startswith("rbac.authorization.k8s.io")]
    assert _rules(objs, "ClusterRole", "gpu-health-webhook") == {
        ("", "nodes", "get"), ("", "nodes", "list"), ("", "nodes", "patch"),
        ("", "pods", "list"), ("", "pods/eviction", "create")}
    events = one(objs, "Role", "gpu-health-webhook-events")
    assert events["metadata"]["namespace"] == "default"
    assert _rules(objs, "Role", "gpu-health-webhook-events") == {("", "events", "create")}
    _check_rbac(rbac)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in rbac}
    assert kinds == {("ClusterRole", "gpu-health-webhook"), ("ClusterRoleBinding", "gpu-health-webhook"),
                     ("Role", "gpu-health-webhook-events"), ("RoleBinding", "gpu-health-webhook-events")}


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_base_cannot_start_a_privileged_pod_the_executor_component_can(overlay: str) -> None:
    # Creating Jobs in a namespace that admits privileged pods is root on every node: only with the component.
    plain = render(overlay)
    assert not [o for o in plain if o["metadata"].get("namespace") == "gpu-health-executor"
                or o["metadata"]["name"] == "gpu-health-executor"]
    assert not [r for o in plain if o["kind"] in ("Role", "ClusterRole") for r in o["rules"]
                if "batch" in r["apiGroups"] or "jobs" in r["resources"]]

    objs = render(overlay, ("components/executor",))
    for version in K8S_VERSIONS:
        for obj in objs:
            if obj["kind"] not in CRDS:
                kubernetes_validate.validate(obj, version, strict=True)
    ns = one(objs, "Namespace", "gpu-health-executor")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    sa = one(objs, "ServiceAccount", "gpu-health-executor")
    assert sa["metadata"]["namespace"] == "gpu-health-executor" and sa["automountServiceAccountToken"] is False
    role = one(objs, "Role", "gpu-health-webhook-executor")
    assert role["metadata"]["namespace"] == "gpu-health-executor"
    # only what remediation_webhook/executor.py calls: create a Job, read it back
    assert _rules(objs, "Role", "gpu-health-webhook-executor") == {("batch", "jobs", "create"),
                                                                   ("batch", "jobs", "get")}
    binding = one(objs, "RoleBinding", "gpu-health-webhook-executor")
    assert binding["metadata"]["namespace"] == "gpu-health-executor"
    assert binding["roleRef"]["name"] == "gpu-health-webhook-executor"
    _check_rbac([o for o in objs if o["apiVersion"].startswith("rbac.authorization.k8s.io")])
    # The ServiceAccount's RoleBinding grants nothing to the Job pods: they have no API rights.
    assert not [o for o in objs if o["kind"].endswith("Binding")
                and any(s["name"] == "gpu-health-executor" for s in o["subjects"])]
    assert all(o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "gpu-health"
               for o in objs if o["metadata"].get("namespace") == "gpu-health-executor")


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_device_plugin_restart_is_pods_delete_in_the_operators_namespace_only(overlay: str) -> None:
    objs = render(overlay, ("components/executor", "components/device-plugin-restart"))
    assert one(objs, "Role", "gpu-health-webhook-device-plugin")["metadata"]["namespace"] == "gpu-operator"
    assert _rules(objs, "Role", "gpu-health-webhook-device-plugin") == {("", "pods", "delete")}
    binding = one(objs, "RoleBinding", "gpu-health-webhook-device-plugin")
    assert binding["metadata"]["namespace"] == "gpu-operator"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "gpu-health-webhook", "namespace": "gpu-health"}]
    _check_rbac([o for o in objs if o["apiVersion"].startswith("rbac.authorization.k8s.io")])
    assert not [o for o in render(overlay, ("components/executor",)) if o["metadata"].get("namespace") == "gpu-operator"]


def test_executor_defaults_name_the_components_objects() -> None:
    from remediation_webhook.executor import executor_settings

    docs = yaml.safe_load_all((K8S / "components" / "executor" / "executor.yaml").read_text(encoding="utf-8"))
    sa = next(o for o in docs if o["kind"] == "ServiceAccount")
    settings = executor_settings({"namespace": sa["metadata"]["namespace"], "image": "example.com/x@sha256:" + "0" * 64})
    assert settings is not None and settings.service_account == sa["metadata"]["name"]


@needs_kustomize
def test_webhook_tokens_come_from_a_secret_and_the_admin_api_is_not_exposed() -> None:
    objs = render("base")
    assert not [o for o in objs if o["kind"] == "Secret"], "ship no Secret: a default token would be deployed"
    spec = pod_spec(objs, "StatefulSet", "gpu-health-webhook")
    tokens = next(v for v in spec["volumes"] if v["name"] == "tokens")
    assert tokens["secret"]["secretName"] == "gpu-health-webhook-tokens"
    sm = one(objs, "ServiceMonitor", "gpu-health-webhook")["spec"]["endpoints"][0]
    assert sm["authorization"]["credentials"]["name"] == "gpu-health-webhook-tokens"
    service = one(objs, "Service", "gpu-health-webhook")
    assert [p["port"] for p in service["spec"]["ports"]] == [9096]


@needs_kustomize
def test_network_policies() -> None:
    objs = render("base")
    exporter = one(objs, "NetworkPolicy", "gpu-health-exporter")["spec"]
    assert exporter["policyTypes"] == ["Ingress", "Egress"] and exporter["egress"] == []
    assert [p["port"] for rule in exporter["ingress"] for p in rule["ports"]] == ["metrics"]
    webhook = one(objs, "NetworkPolicy", "gpu-health-webhook")["spec"]
    assert webhook["policyTypes"] == ["Ingress", "Egress"]
    assert [p["port"] for rule in webhook["ingress"] for p in rule["ports"]] == ["http"]  # admin closed
    egress_ports = {p["port"] for rule in webhook["egress"] for p in rule["ports"]}
    assert egress_ports == {53, 80, 443, 988, 6443, 9093}
    # The credential endpoints docs/providers.md recommends: without them every cloud call fails to authenticate.
    for ip, port, what in (("169.254.169.254", 80, "EC2 instance metadata (IMDSv2), GCE and Azure IMDS"),
                           ("169.254.170.23", 80, "EKS Pod Identity agent"),
                           ("169.254.169.252", 988, "GKE metadata server, Dataplane V1 with Workload Identity")):
        assert egress_allows(webhook, ip, port), what
    assert not egress_allows(webhook, "169.254.169.254", 8080) and not egress_allows(webhook, "10.0.0.1", 80)


def egress_allows(policy: dict[str, Any], ip: str, port: int) -> bool:
    """Whether a NetworkPolicy's egress admits TCP to ip:port outside the cluster (selectors match only pods)."""
    import ipaddress

    addr = ipaddress.ip_address(ip)
    for rule in policy.get("egress") or []:
        peers = rule.get("to")
        ports = rule.get("ports")
        to_ok = peers is None or any(
            "ipBlock" in peer and addr in ipaddress.ip_network(peer["ipBlock"]["cidr"])
            and not any(addr in ipaddress.ip_network(e) for e in peer["ipBlock"].get("except") or [])
            for peer in peers)
        port_ok = ports is None or any(p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports)
        if to_ok and port_ok:
            return True
    return False


@needs_kustomize
def test_images_are_the_projects_at_its_version() -> None:
    objs = render("base")
    images = {container(objs, k, n)["image"] for k, n in (("DaemonSet", "gpu-health-exporter"),
                                                          ("StatefulSet", "gpu-health-webhook"))}
    assert images == {f"gpu-health-exporter:{VERSION}", f"gpu-health-webhook:{VERSION}"}
    for image in images:
        name = image.split(":")[0].removeprefix("gpu-health-")
        assert (ROOT / "deploy" / "docker" / f"{name}.Dockerfile").is_file()


# --- Alertmanager snippet -------------------------------------------------------------------------------------

AMTOOL = shutil.which("amtool")
SNIPPET = K8S / "alertmanager" / "receiver.yaml"


@needs_kustomize
def test_alertmanager_snippet_points_at_the_webhook_service() -> None:
    snippet = yaml.safe_load(SNIPPET.read_text(encoding="utf-8"))
    (receiver,) = snippet["receivers"]
    (hook,) = receiver["webhook_configs"]
    service = one(render("base"), "Service", "gpu-health-webhook")
    port = service["spec"]["ports"][0]["port"]
    assert hook["url"] == (f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{port}"
                           "/v1/alerts")
    assert hook["max_alerts"] == 0 and hook["send_resolved"] is True
    assert hook["http_config"]["authorization"]["credentials_file"].startswith("/etc/alertmanager/secrets/")


@pytest.mark.skipif(AMTOOL is None, reason="amtool not found: install Debian's `prometheus-alertmanager`")
def test_alertmanager_snippet_is_valid_and_routes_remediation_alerts(tmp_path: Path) -> None:
    snippet = yaml.safe_load(SNIPPET.read_text(encoding="utf-8"))
    token = tmp_path / "token"
    token.write_text("t" * 32, encoding="utf-8")
    for hook in snippet["receivers"][0]["webhook_configs"]:
        hook["http_config"]["authorization"]["credentials_file"] = str(token)
    config = {"route": {"receiver": "default", "group_by": ["alertname", "node"],
                        "routes": snippet["route"]["routes"] + [{"receiver": "default"}]},
              "receivers": [{"name": "default"}] + snippet["receivers"]}
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert AMTOOL is not None
    check = subprocess.run([AMTOOL, "check-config", str(path)], capture_output=True, check=False, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    for labels, expected in ((["remediation=reboot", "severity=critical", "node=n1"], "gpu-remediation"),
                             (["remediation=none", "severity=warning", "node=n1"], "default"),
                             (["alertname=GPURemediationStorm", "remediation=none"], "gpu-remediation"),
                             (["alertname=GPURemediationWatchdog", "remediation=none", "severity=info"],
                              "gpu-remediation")):
        routed = subprocess.run([AMTOOL, "config", "routes", "test", f"--config.file={path}", *labels],
                                capture_output=True, check=False, text=True, timeout=30)
        assert routed.returncode == 0, routed.stderr
        assert expected in routed.stdout.split(",")[0], (labels, routed.stdout)
        if labels[0] == "alertname=GPURemediationWatchdog":
            assert routed.stdout.strip() == "gpu-remediation", "the watchdog reaches the webhook only"
