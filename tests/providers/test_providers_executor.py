"""The executor Job against kmock: spec asserted, the test plays the kubelet, the webhook verifies and falls back."""

from __future__ import annotations

import kmock
import pytest

from tests.providers.fakes.support import (
    UUID,
    FakeAlertmanager,
    alert,
    await_for,
    base_config,
    close_harness,
    finish_job,
    gpu_node,
    job,
    make_harness,
    notification,
    patch_status,
    rid_of,
)

from remediation_webhook.executor import RESET_SCRIPT, job_name


def config(tmp_path, kube, ladder, **actions):
    return base_config(tmp_path, kube.url,
                       executor={"namespace": "gpu-health", "image": "nvcr.io/nvidia/cuda:12.4.1-base-ubuntu22.04",
                                 "poll_interval": "20ms", "job_timeout": "5s"},
                       policy={"dry_run": False, "rules": [{"name": "gpu", "match_re": {"alertname": "GPU.*"},
                                                            "ladder": ladder}]},
                       actions={"drain": {"poll_interval": "20ms", "timeout": "5s"}, **actions})


async def test_reset_gpu_job_spec_success_and_verification(tmp_path, kube):
    gpu_node(kube, "gpu-1")
    h = await make_harness(config(tmp_path, kube, ["cordon", "drain", "reset_gpu"], reset_gpu={
        "verify_timeout": "5s", "verify_interval": "20ms"}), tmp_path, kube.url, FakeAlertmanager())
    try:
        r = await h.post(notification(alert("gpu-1", remediation="reset_gpu", gpu="3", uuid=UUID)))
        assert r.status == 200
        rid = await rid_of(h, "gpu-1")
        name = job_name("reset_gpu", rid)
        assert name == f"gpu-health-reset-gpu-{rid[:16]}"
        body = await await_for(lambda: job(kube, name), what="job")
        labels = body["metadata"]["labels"]
        assert labels["gpu-health.io/remediation-id"] == rid and labels["gpu-health.io/action"] == "reset-gpu"
        pod = body["spec"]["template"]["spec"]
        assert pod["nodeName"] == "gpu-1" and pod["restartPolicy"] == "Never" and pod["hostPID"] is True
        assert pod["tolerations"] == [{"operator": "Exists"}]
        c = pod["containers"][0]
        assert c["securityContext"] == {"privileged": True}
        assert c["command"][:2] == ["/bin/sh", "-c"] and c["command"][3:] == ["gpu-health-reset", UUID]
        assert c["command"][2] == RESET_SCRIPT  # run against the simulator in tests/test_reset_script.py
        # The exporter's state dir, where the script asks it to release NVML before the reset, and the host's /run,
        # where a GPU Operator's driver root (and its nvidia-smi) appears.
        assert pod["volumes"] == [
            {"name": "exporter-state", "hostPath": {"path": "/var/lib/gpu-health-exporter", "type": "DirectoryOrCreate"}},
            {"name": "host-run", "hostPath": {"path": "/run", "type": "Directory"}}]
        assert c["volumeMounts"] == [{"name": "exporter-state", "mountPath": "/exporter-state"},
                                     {"name": "host-run", "mountPath": "/host/run", "readOnly": True,
                                      "mountPropagation": "HostToContainer"}]
        assert body["spec"]["backoffLimit"] == 0 and body["spec"]["activeDeadlineSeconds"] == 5
        assert "gpu-1" in kube.cordoned()
        finish_job(kube, name)  # the kubelet: the pod exited 0
        patch_status(kube, "gpu-1", {"allocatable": {"nvidia.com/gpu": "8"}})  # the device plugin: healthy again
        await await_for(lambda: h.states().get("gpu-1") == "SUCCEEDED", what="succeeded")
        detail = h.sql("SELECT detail FROM step WHERE remediation_id=? AND action='reset_gpu'", rid)[0][0]
        assert "allocatable 8 of 8" in detail
        assert h.metric("gpu_remediation_actions_total", node="gpu-1", gpu="3", uuid=UUID, action="reset_gpu",
                        result="success") == 1
    finally:
        await close_harness(h)


async def test_reset_failure_falls_back_to_reboot_verified_by_boot_id(tmp_path, kube):
    gpu_node(kube, "gpu-2")
    h = await make_harness(config(tmp_path, kube, ["cordon", "drain", "reset_gpu", "reboot"],
                                  reset_gpu={"verify_timeout": "2s", "verify_interval": "20ms"},
                                  reboot={"using": "executor", "verify_timeout": "5s", "verify_interval": "20ms"}),
                           tmp_path, kube.url, FakeAlertmanager())
    try:
        await h.post(notification(alert("gpu-2", remediation="reset_gpu", gpu="0", uuid=UUID)))
        rid = await rid_of(h, "gpu-2")
        reset = job_name("reset_gpu", rid)
        await await_for(lambda: job(kube, reset), what="reset job")
        finish_job(kube, reset, ok=False, message="MIG is enabled: reset not possible")
        reboot = job_name("reboot", rid)
        body = await await_for(lambda: job(kube, reboot), what="reboot job")
        assert body["spec"]["template"]["spec"]["containers"][0]["command"][-2:] == ["systemctl", "reboot"]
        assert body["metadata"]["annotations"]["gpu-health.io/boot-id-before"] == "boot-1"
        patch_status(kube, "gpu-2", {"nodeInfo": {"bootID": "boot-2"}})  # the host came back
        await await_for(lambda: h.states().get("gpu-2") == "SUCCEEDED", what="succeeded")
        steps = h.sql("SELECT action, state, detail FROM step WHERE remediation_id=? ORDER BY seq", rid)
        assert [(a, s) for a, s, _ in steps] == [("cordon", "SUCCEEDED"), ("drain", "SUCCEEDED"),
                                                 ("reset_gpu", "FAILED"), ("reboot", "SUCCEEDED")]
        assert "MIG is enabled" in steps[2][2]
        assert h.metric("gpu_remediation_provider_events_total", provider="engine", action="reset_gpu",
                        kind="fallback") == 1
        assert h.sql("SELECT 1 FROM audit WHERE event='fallback' AND remediation_id=?", rid)
    finally:
        await close_harness(h)


async def test_a_500_on_the_reboot_jobs_create_is_read_back_not_handed_to_a_human(tmp_path, kube):
    """Found by the fleet soak: a Kubernetes API outage answered the reboot Job's POST with a 500, and the webhook
    sent the node to a person ("may or may not have happened"). The Job's name is fixed by the remediation, so the
    cluster can tell: the webhook waits for the API, reads it, and creates the Job once."""
    gpu_node(kube, "gpu-4")
    failed: list[bool] = []

    def outage(request: kmock.Request) -> kmock.Response | None:
        if failed or not str(request.headers.get("User-Agent", "")).startswith("OpenAPI-Generator"):
            return None
        failed.append(True)
        return kmock.Response(status=500, payload={"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                   "reason": "InternalError", "code": 500})

    kube.km["post", kmock.resource("batch", "v1", "jobs")] << outage
    h = await make_harness(config(tmp_path, kube, ["cordon", "drain", "reboot"],
                                  reboot={"using": "executor", "verify_timeout": "5s", "verify_interval": "20ms"}),
                           tmp_path, kube.url, FakeAlertmanager())
    try:
        await h.post(notification(alert("gpu-4", remediation="reboot")))
        rid = await rid_of(h, "gpu-4")
        name = job_name("reboot", rid)
        await await_for(lambda: job(kube, name), what="reboot job")
        patch_status(kube, "gpu-4", {"nodeInfo": {"bootID": "boot-2"}})
        await await_for(lambda: h.states().get("gpu-4") == "SUCCEEDED", what="succeeded")
        assert failed
        posts = [c for c in kube.calls(mutating=True) if c[0] == "POST" and c[1].endswith("/jobs")]
        assert len(posts) == 1  # one Job created (kmock's log holds what reached its store, not the 500)
        reasons = [r for (r,) in h.sql("SELECT detail_json FROM audit WHERE remediation_id=?", rid)]
        assert not any("may or may not" in r for r in reasons)
        # The 500 came after kmock's store took the Job (as an etcd timeout after the commit can): the step's
        # intent stayed open, the remediation waited, and reading the Job and the new boot id completed it.
        events = [e for (e,) in h.sql("SELECT event FROM audit WHERE remediation_id=? ORDER BY id", rid)]
        assert "blocked" in events and "needs_human" not in events
        assert h.sql("SELECT state, detail FROM step WHERE remediation_id=? AND action='reboot'", rid) == [
            ("SUCCEEDED", "reconciled after a restart: already done")]
    finally:
        await close_harness(h)


async def test_reset_failure_without_a_next_rung_escalates(tmp_path, kube):
    gpu_node(kube, "gpu-3")
    h = await make_harness(config(tmp_path, kube, ["cordon", "drain", "reset_gpu"],
                                  reset_gpu={"verify_timeout": "1s", "verify_interval": "20ms"}),
                           tmp_path, kube.url, FakeAlertmanager())
    try:
        await h.post(notification(alert("gpu-3", remediation="reset_gpu", gpu="0", uuid=UUID)))
        rid = await rid_of(h, "gpu-3")
        name = job_name("reset_gpu", rid)
        await await_for(lambda: job(kube, name), what="job")
        finish_job(kube, name)  # succeeded, but allocatable never comes back
        await await_for(lambda: h.states().get("gpu-3") == "FAILED", what="failed")
        reason = h.sql("SELECT reason FROM remediation WHERE id=?", rid)[0][0]
        assert "allocatable 7 of 8" in reason
    finally:
        await close_harness(h)


def test_check_config_accepts_configured_executors(tmp_path):
    from remediation_webhook.config import build_config
    from remediation_webhook.errors import ConfigError

    raw = config(tmp_path, type("K", (), {"url": "http://127.0.0.1:1"})(), ["cordon", "drain", "reset_gpu", "reboot"],
                 reset_gpu={}, reboot={"using": "executor"})
    cfg = build_config(raw, base=tmp_path)
    assert {"reset_gpu", "reboot"} <= set(cfg.actions)
    raw["actions"]["reboot"] = {"using": "aws"}
    with pytest.raises(ConfigError, match="actions.reboot.using: aws needs providers.aws configured"):
        build_config(raw, base=tmp_path)
    del raw["executor"]
    raw["actions"]["reboot"] = {"using": "executor"}
    with pytest.raises(ConfigError, match="needs the executor: section"):
        build_config(raw, base=tmp_path)
