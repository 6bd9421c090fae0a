"""Every pod this project deploys, held to what a real cluster checks beyond the schema (tests/deploy/podspec_rules.py):
each overlay with each combination of components, and the executor Jobs the webhook creates at run time."""

from __future__ import annotations

import itertools
import os
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from remediation_webhook.actions.reboot import Reboot
from remediation_webhook.actions.reset_gpu import ResetGpu
from remediation_webhook.executor import REBOOT_ARGV, executor_settings, job_spec
from tests.deploy.podspec_rules import problems
from tests.deploy.test_deploy_kubernetes import K8S, OVERLAYS, ROOT, _render_dir, needs_kustomize, render

COMPONENTS = ("components/kmsg", "components/executor", "components/device-plugin-restart")
# Namespaces the renderings use but do not create: `default` (Events only, no pods) and the GPU Operator's.
OUTSIDE = {"default": "privileged", "gpu-operator": "privileged"}


def combinations() -> list[tuple[str, tuple[str, ...]]]:
    out = []
    for overlay in OVERLAYS:
        for n in range(len(COMPONENTS) + 1):
            for combo in itertools.combinations(COMPONENTS, n):
                if "components/device-plugin-restart" in combo and "components/executor" not in combo:
                    continue  # documented as an addition to the executor component
                out.append((overlay, combo))
    return out


@needs_kustomize
@pytest.mark.parametrize(("overlay", "components"), combinations())
def test_every_rendering_passes_the_clusters_cross_field_checks(overlay: str, components: tuple[str, ...]) -> None:
    assert problems(render(overlay, components), namespaces=OUTSIDE) == []


def executor_jobs() -> list[dict]:
    docs = list(yaml.safe_load_all((K8S / "components" / "executor" / "executor.yaml").read_text(encoding="utf-8")))
    ns = next(o for o in docs if o["kind"] == "Namespace")["metadata"]["name"]
    settings = executor_settings({"namespace": ns, "image": "registry.example/gpu-health-executor@sha256:" + "0" * 64})
    ctx = SimpleNamespace(node=SimpleNamespace(name="gpu-node-1"), remediation_id="0123456789abcdef" * 2)
    reset = job_spec(settings, ResetGpu.name, ctx, ResetGpu.argv("GPU-11111111-2222-3333-4444-555555555555"),
                     mounts=ResetGpu.mounts)
    reboot = job_spec(settings, Reboot.name, ctx, list(REBOOT_ARGV))
    return [*docs, reset, reboot]


def test_the_executor_jobs_pass_in_the_executor_components_namespace() -> None:
    objs = executor_jobs()
    assert len([o for o in objs if o["kind"] == "Job"]) == 2
    assert problems(objs) == []


@needs_kustomize
def test_the_rules_find_what_a_cluster_refuses() -> None:
    """Each rule on a pod a cluster would refuse, so that none of the checks above can pass for want of looking."""
    objs = executor_jobs()
    job = next(o for o in objs if o["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    c["securityContext"]["allowPrivilegeEscalation"] = False
    c["resources"]["requests"]["memory"] = "1Gi"
    c["readinessProbe"] = {"exec": {"command": ["true"]}, "tcpSocket": {"port": 1}}
    pod["securityContext"] = {"runAsNonRoot": True, "runAsUser": 0}
    pod["serviceAccountName"] = "nobody"
    found = problems(objs)
    for expected in ("cannot set `allowPrivilegeEscalation` to false and `privileged` to true",
                     "resources.requests[memory] 1Gi must be less than or equal to its limit 128Mi",
                     "readinessProbe must have exactly one handler",
                     "runAsNonRoot with runAsUser 0",
                     "ServiceAccount gpu-health-executor/nobody does not exist"):
        assert any(expected in p for p in found), (expected, found)
    ns = next(o for o in objs if o["kind"] == "Namespace")
    ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] = "baseline"
    found = problems(objs)
    assert any("hostPID is forbidden (Pod Security 'baseline'" in p for p in found)
    assert any("hostPath volume exporter-state is forbidden" in p for p in found)
    # Host access where the project does not mean it: a webhook pod with hostPID.
    sts = [o for o in render("base") if o["kind"] == "StatefulSet"]
    sts[0]["spec"]["template"]["spec"]["hostPID"] = True
    sts[0]["spec"]["selector"]["matchLabels"]["extra"] = "x"
    found = problems(sts, namespaces={"gpu-health": "privileged"},
                     service_accounts=[("gpu-health", "gpu-health-webhook")])
    assert "StatefulSet/gpu-health-webhook: uses hostPID, which this project does not mean it to" in found
    assert "StatefulSet/gpu-health-webhook: `selector` does not match template `labels`" in found


@needs_kustomize
def test_the_install_docs_apply_only_an_overlay_that_names_a_registry() -> None:
    """docs/install/kubernetes.md once offered `kubectl apply -k deploy/kubernetes/overlays/gpu-operator` as a
    shortcut: its images are the unqualified gpu-health-*:0.1.0, which no registry serves (ImagePullBackOff). The
    docs' own overlay, rendered against this checkout, must name a registry for every container."""
    text = (ROOT / "docs" / "install" / "kubernetes.md").read_text(encoding="utf-8")
    assert not re.search(r"kubectl apply -k deploy/kubernetes", text)
    block = re.search(r"```yaml\n(# my-cluster/gpu-health/kustomization.yaml\n.*?)```", text, re.S)
    assert block is not None
    overlay = yaml.safe_load(block.group(1))
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        overlay["resources"] = [os.path.relpath(K8S / re.sub(r"^.*//deploy/kubernetes/|\?ref=.*$", "", r), tmp)
                                for r in overlay["resources"]]
        (tmp / "kustomization.yaml").write_text(yaml.safe_dump(overlay), encoding="utf-8")
        objs = _render_dir(str(tmp))
    images = [c["image"] for o in objs if o["kind"] in ("DaemonSet", "StatefulSet")
              for c in o["spec"]["template"]["spec"]["containers"]]
    assert images and all(re.match(r"[a-z0-9.-]+[.:][a-z0-9]+[^/]*/", i) for i in images), images
