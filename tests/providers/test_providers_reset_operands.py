"""reset_gpu on a node the GPU Operator manages, against kmock with the Operator's DaemonSets and the device plugin
played by gpu_health_stack/gpu_operator.py: the operands are paused and put back on every path, the device plugin
is restarted when allocatable does not come back, and a pause nobody will undo is undone by the engine's sweep."""

from __future__ import annotations

import contextlib
import json

import pytest

from gpu_health_stack.gpu_operator import NAMESPACE, GpuOperatorFake
from tests.providers.fakes.support import (
    UUID,
    FakeAlertmanager,
    alert,
    await_for,
    base_config,
    close_harness,
    gpu_node,
    job,
    make_harness,
    notification,
    rid_of,
)

from remediation_webhook.actions._operands import ANN_PAUSED, LABEL_PAUSED
from remediation_webhook.config import build_config
from remediation_webhook.errors import ConfigError
from remediation_webhook.executor import job_name

DEPLOY = "nvidia.com/gpu.deploy."
OPERANDS = ("device-plugin", "gpu-feature-discovery", "dcgm", "dcgm-exporter")
REPORT = ("[0.1 s] GPU GPU-1111 at 00000000:18:00.0, /dev/nvidia3\n"
          "[0.4 s] holders of /dev/nvidia3: 812:nvidia-persiste\n"
          "[2.9 s] reset GPU-1111 at 00000000:18:00.0; same UUID back; no pending remap or retirement")


def config(tmp_path, kube, ladder, **reset):
    return base_config(tmp_path, kube.url,
                       executor={"namespace": "gpu-health", "image": "registry.example/gpu-health-executor@sha256:"
                                 + "0" * 64, "poll_interval": "20ms", "job_timeout": "5s",
                                 "termination_grace": "1s"},
                       engine={"tick": "50ms", "pool_refresh": "100ms"},
                       policy={"dry_run": False, "rules": [{"name": "gpu", "match_re": {"alertname": "GPU.*"},
                                                            "ladder": ladder}]},
                       actions={"drain": {"poll_interval": "20ms", "timeout": "5s"},
                                "reset_gpu": {"verify_timeout": "3s", "verify_interval": "20ms",
                                              "operands_timeout": "3s", **reset},
                                "reboot": {"using": "executor", "verify_timeout": "3s", "verify_interval": "20ms"}})


@contextlib.asynccontextmanager
async def resetting(tmp_path, kube, node, ladder, gpu="0", **reset):
    """A webhook whose remediation of `node` has created its reset Job: (harness, remediation id, Job name)."""
    h = await make_harness(config(tmp_path, kube, ladder, **reset), tmp_path, kube.url, FakeAlertmanager())
    try:
        await h.post(notification(alert(node, remediation="reset_gpu", gpu=gpu, uuid=UUID)))
        rid = await rid_of(h, node)
        name = job_name("reset_gpu", rid)
        await await_for(lambda: job(kube, name), what="reset job")
        yield h, rid, name
    finally:
        await close_harness(h)


def labels(kube, node):
    return kube.node(node)["metadata"].get("labels") or {}


def deploy(kube, node):
    return {k.removeprefix(DEPLOY): v for k, v in labels(kube, node).items() if k.startswith(DEPLOY)}


def operand_pods(kube, node):
    return sorted(p.split("/")[1] for p in kube.pods(node) if p.startswith(NAMESPACE + "/"))


@pytest.fixture
def operator(kube):
    fakes = []

    def start(node, **kw):
        gpu_node(kube, node)
        fake = GpuOperatorFake(kube, [node], interval=0.05, **kw)
        fakes.append(fake)
        return fake

    yield start
    for f in fakes:
        f.close()


async def test_operands_are_paused_for_the_reset_and_put_back(tmp_path, kube, operator):
    gpu = operator("op-1")
    gpu.xid("op-1", 3)  # the device plugin dropped GPU 3 and will not take it back by itself
    assert kube.node("op-1")["status"]["allocatable"]["nvidia.com/gpu"] == "7"
    h = await make_harness(config(tmp_path, kube, ["cordon", "drain", "reset_gpu"]), tmp_path, kube.url,
                           FakeAlertmanager())
    try:
        await h.post(notification(alert("op-1", remediation="reset_gpu", gpu="3", uuid=UUID)))
        rid = await rid_of(h, "op-1")
        name = job_name("reset_gpu", rid)
        body = await await_for(lambda: job(kube, name), what="reset job")
        # The Job starts only once the paused operands' pods have left the node; the driver is never touched.
        assert deploy(kube, "op-1") == {**{o: "false" for o in OPERANDS}, "driver": "true"}
        assert operand_pods(kube, "op-1") == []
        saved = json.loads(kube.node("op-1")["metadata"]["annotations"][ANN_PAUSED])
        assert saved["remediation"] == rid and saved["gpus"] == 8
        assert saved["labels"] == {DEPLOY + o: "true" for o in OPERANDS}
        assert labels(kube, "op-1")[LABEL_PAUSED] == rid[:16]
        assert body["spec"]["template"]["spec"]["containers"][0]["command"][-1] == UUID
        kube.finish_job("gpu-health", name, report=REPORT)
        await await_for(lambda: h.states().get("op-1") == "SUCCEEDED", what="succeeded")
        assert deploy(kube, "op-1") == {**{o: "true" for o in OPERANDS}, "driver": "true"}
        assert LABEL_PAUSED not in labels(kube, "op-1")
        assert ANN_PAUSED not in (kube.node("op-1")["metadata"].get("annotations") or {})
        # The plugin came back as a new pod, found all eight healthy: nothing needed restarting by hand.
        assert kube.node("op-1")["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert gpu.starts("op-1") == 2
        detail = h.sql("SELECT detail FROM step WHERE remediation_id=? AND action='reset_gpu'", rid)[0][0]
        assert detail.startswith("paused dcgm, dcgm-exporter, device-plugin, gpu-feature-discovery; job ")
        assert "holders of /dev/nvidia3: 812:nvidia-persiste" in detail  # the Job's termination log, journaled
        assert "restored nvidia.com/gpu.deploy.dcgm=true" in detail and "allocatable 8 of 8" in detail
        assert "restarted device plugin" not in detail
    finally:
        await close_harness(h)


async def test_operands_are_put_back_when_the_reset_fails(tmp_path, kube, operator):
    operator("op-2")
    async with resetting(tmp_path, kube, "op-2", ["cordon", "drain", "reset_gpu", "reboot"]) as (h, rid, name):
        kube.finish_job("gpu-health", name, succeeded=False, exit_code=10, message="BackoffLimitExceeded",
                        report="[1.2 s] processes that nobody paused hold /dev/nvidia0 (pid:name): 4242:nv-hostengine;"
                               " reboot instead")
        await await_for(lambda: job(kube, job_name("reboot", rid)), what="reboot job (the next rung)")
        assert deploy(kube, "op-2") == {**{o: "true" for o in OPERANDS}, "driver": "true"}
        assert LABEL_PAUSED not in labels(kube, "op-2")
        state, detail = h.sql("SELECT state, detail FROM step WHERE remediation_id=? AND action='reset_gpu'", rid)[0]
        assert state == "FAILED" and "4242:nv-hostengine" in detail and "restored" in detail


async def test_a_webhook_crash_mid_reset_leaves_the_pause_to_its_re_run(tmp_path, kube, operator):
    """Killed while the Job runs: the operands stay paused (restoring would start the device plugin in the middle
    of the reset), the restarted webhook's sweep leaves them (the step is open), and the re-run adopts the Job, puts
    the labels back from what the node carries and verifies."""
    operator("cr-1")
    raw = config(tmp_path, kube, ["cordon", "drain", "reset_gpu"])
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    await h.post(notification(alert("cr-1", remediation="reset_gpu", gpu="1", uuid=UUID)))
    rid = await rid_of(h, "cr-1")
    name = job_name("reset_gpu", rid)
    await await_for(lambda: job(kube, name), what="reset job")
    await close_harness(h)
    assert deploy(kube, "cr-1")["device-plugin"] == "false"
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    try:
        await await_for(lambda: h.sql("SELECT 1 FROM step WHERE action='reset_gpu' AND state='ABANDONED'"),
                        what="reconciled: re-run")
        await h.engine._refresh_pool(force=True)  # a sweep while the re-run waits for the Job
        assert deploy(kube, "cr-1")["device-plugin"] == "false"
        kube.finish_job("gpu-health", name)
        await await_for(lambda: h.states().get("cr-1") == "SUCCEEDED", what="succeeded")
        assert deploy(kube, "cr-1") == {**{o: "true" for o in OPERANDS}, "driver": "true"}
        assert h.sql("SELECT 1 FROM audit WHERE event='operands_restored'") == []  # the step did it, not the sweep
        posts = [c for c in kube.calls(mutating=True) if c[0] == "POST" and c[1].endswith("/jobs")]
        assert len(posts) == 2  # the re-run's create answered 409 and adopted the running Job
        assert len(kube.jobs("gpu-health")) == 1
    finally:
        await close_harness(h)


async def test_the_device_plugin_pod_is_restarted_when_allocatable_does_not_come_back(tmp_path, kube, operator):
    """A host-managed node: nothing to pause, and the plugin ran through the reset still holding GPU 5 unhealthy.
    The webhook restarts its pod and waits for the new one to advertise all eight."""
    gpu = operator("dp-1", managed=False)
    gpu.xid("dp-1", 5)
    h = await make_harness(config(tmp_path, kube, ["cordon", "drain", "reset_gpu"],
                                  restart_device_plugin_after="300ms"), tmp_path, kube.url, FakeAlertmanager())
    try:
        await h.post(notification(alert("dp-1", remediation="reset_gpu", gpu="5", uuid=UUID)))
        rid = await rid_of(h, "dp-1")
        name = job_name("reset_gpu", rid)
        await await_for(lambda: job(kube, name), what="reset job")
        assert LABEL_PAUSED not in labels(kube, "dp-1") and gpu.starts("dp-1") == 1
        kube.finish_job("gpu-health", name)
        await await_for(lambda: h.states().get("dp-1") == "SUCCEEDED", what="succeeded")
        assert gpu.starts("dp-1") == 2
        assert kube.node("dp-1")["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        detail = h.sql("SELECT detail FROM step WHERE remediation_id=? AND action='reset_gpu'", rid)[0][0]
        assert "no GPU Operator operands to pause" in detail
        assert "restarted device plugin pod nvidia-device-plugin-daemonset-dp-1" in detail
        deletes = [c for c in kube.calls(mutating=True) if c[0] == "DELETE"]
        assert [c[1] for c in deletes] == [f"/api/v1/namespaces/{NAMESPACE}/pods/nvidia-device-plugin-daemonset-dp-1"]
    finally:
        await close_harness(h)


async def test_a_failed_job_whose_pod_still_runs_keeps_the_operands_paused_until_it_ends(tmp_path, kube, operator):
    """A Job is marked Failed (a deadline, FailureTarget) while its pod is still being killed, perhaps in the middle
    of nvidia-smi -r: a device plugin started then would take the GPU mid-reset. The step falls back with the
    operands still paused; the engine's sweep puts them back once the pod has ended."""
    operator("gr-1")
    async with resetting(tmp_path, kube, "gr-1", ["cordon", "drain", "reset_gpu", "reboot"]) as (h, rid, name):
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": f"{name}-x1", "namespace": "gpu-health", "labels": {"job-name": name}},
               "spec": {"nodeName": "gr-1", "containers": [{"name": "executor"}]}, "status": {"phase": "Running"}}
        kube._post("/api/v1/namespaces/gpu-health/pods", pod)
        kube.finish_job("gpu-health", name, succeeded=False, message="DeadlineExceeded")
        await await_for(lambda: job(kube, job_name("reboot", rid)), what="the reboot rung")
        state, detail = h.sql("SELECT state, detail FROM step WHERE remediation_id=? AND action='reset_gpu'", rid)[0]
        assert state == "FAILED" and "its pod still runs: the operands stay paused" in detail
        await h.engine._refresh_pool(force=True)  # a sweep while the pod runs: they stay
        assert deploy(kube, "gr-1")["device-plugin"] == "false"
        kube._patch(f"/api/v1/namespaces/gpu-health/pods/{name}-x1", {"status": {"phase": "Failed"}})
        await await_for(lambda: deploy(kube, "gr-1")["device-plugin"] == "true", what="restored by the sweep")
        assert await await_for(lambda: h.sql("SELECT remediation_id FROM audit WHERE event='operands_restored'"),
                               what="audit") == [(rid,)]


async def test_a_refused_device_plugin_restart_falls_back_with_the_reason(tmp_path, kube, operator):
    """Without components/device-plugin-restart the DELETE answers 403: the step says so and the ladder goes on to
    the reboot, as the component's comment promises, instead of handing the node to a person."""
    import kmock

    # GPU 2 stays unhealthy to any plugin (kmock applies a DELETE before a reaction answers it, so the pod does go).
    gpu = operator("dp-2", managed=False, healthy=lambda _node, g: g != 2)
    gpu.xid("dp-2", 2)

    def forbidden(request: kmock.Request) -> kmock.Response | None:
        if not str(request.headers.get("User-Agent", "")).startswith("OpenAPI-Generator"):
            return None
        return kmock.Response(status=403, payload={"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                   "reason": "Forbidden", "code": 403,
                                                   "message": "pods is forbidden: cannot delete"})

    kube.km["delete", kmock.resource("", "v1", "pods")] << forbidden
    h = await make_harness(config(tmp_path, kube, ["cordon", "drain", "reset_gpu", "reboot"],
                                  restart_device_plugin_after="300ms", verify_timeout="1s"),
                           tmp_path, kube.url, FakeAlertmanager())
    try:
        await h.post(notification(alert("dp-2", remediation="reset_gpu", gpu="2", uuid=UUID)))
        rid = await rid_of(h, "dp-2")
        name = job_name("reset_gpu", rid)
        await await_for(lambda: job(kube, name), what="reset job")
        kube.finish_job("gpu-health", name)
        await await_for(lambda: job(kube, job_name("reboot", rid)), what="the reboot rung")
        state, detail = h.sql("SELECT state, detail FROM step WHERE remediation_id=? AND action='reset_gpu'", rid)[0]
        assert state == "FAILED" and "could not restart nvidia-device-plugin-daemonset-dp-2" in detail
        assert "403" in detail and "allocatable 7 of 8" in detail
    finally:
        await close_harness(h)


async def test_a_cancel_while_the_operands_leave_starts_no_job_and_puts_them_back(tmp_path, kube, operator):
    operator("cx-1")
    kube.add_pod(NAMESPACE, "stuck-dcgm-cx-1", "cx-1", daemonset=True, labels={"app": "nvidia-dcgm"})  # never goes
    h = await make_harness(config(tmp_path, kube, ["cordon", "drain", "reset_gpu"], operands_timeout="30s"),
                           tmp_path, kube.url, FakeAlertmanager())
    try:
        await h.post(notification(alert("cx-1", remediation="reset_gpu", gpu="0", uuid=UUID)))
        rid = await rid_of(h, "cx-1")
        await await_for(lambda: deploy(kube, "cx-1")["device-plugin"] == "false", what="paused")
        r = await h.admin.post(f"/v1/remediations/{rid}/cancel", json={"reason": "wrong node"})
        assert r.status == 200
        await await_for(lambda: h.states().get("cx-1") == "CANCELLED", what="cancelled")
        await await_for(lambda: deploy(kube, "cx-1")["device-plugin"] == "true", what="put back")
        assert job(kube, job_name("reset_gpu", rid)) is None
        assert h.sql("SELECT state FROM step WHERE remediation_id=? AND action='reset_gpu'", rid) == [("CANCELLED",)]
    finally:
        await close_harness(h)


async def test_a_driver_upgrade_in_progress_refuses_the_reset_untouched(tmp_path, kube, operator):
    operator("up-1")
    kube.label_node("up-1", {DEPLOY + "device-plugin": "paused-for-driver-upgrade"})
    h = await make_harness(config(tmp_path, kube, ["cordon", "drain", "reset_gpu", "reboot"]), tmp_path, kube.url,
                           FakeAlertmanager())
    try:
        await h.post(notification(alert("up-1", remediation="reset_gpu", gpu="0", uuid=UUID)))
        rid = await rid_of(h, "up-1")
        await await_for(lambda: h.states().get("up-1") == "FAILED", what="handed to a person")
        assert job(kube, job_name("reset_gpu", rid)) is None and job(kube, job_name("reboot", rid)) is None
        assert deploy(kube, "up-1")["device-plugin"] == "paused-for-driver-upgrade"
        assert LABEL_PAUSED not in labels(kube, "up-1")
        assert "upgrading the driver" in h.sql("SELECT reason FROM remediation WHERE id=?", rid)[0][0]
    finally:
        await close_harness(h)


async def test_the_sweep_puts_back_a_pause_whose_reset_will_not(tmp_path, kube, operator):
    """Left by a remediation the journal does not know (a journal restored from backup, a webhook that crashed
    before its intent row): nothing will re-run it, and no Job of it runs, so the sweep restores at once. A pause
    whose Job still runs stays until the Job is over."""
    operator("sw-1")
    operator("sw-2")
    h = await make_harness(config(tmp_path, kube, ["cordon", "drain", "reset_gpu"]), tmp_path, kube.url,
                           FakeAlertmanager())
    try:
        for node, rid in (("sw-1", "a" * 32), ("sw-2", "b" * 32)):
            saved = {DEPLOY + o: "true" for o in OPERANDS}
            kube.label_node(node, {**{k: "false" for k in saved}, LABEL_PAUSED: rid[:16]})
            kube._patch(f"/api/v1/nodes/{node}", {"metadata": {"annotations": {ANN_PAUSED: json.dumps(
                {"remediation": rid, "labels": saved, "gpus": 8, "at": 1.0})}}})
        kube._post("/apis/batch/v1/namespaces/gpu-health/jobs", {
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": job_name("reset_gpu", "b" * 32), "namespace": "gpu-health"},
            "spec": {"template": {"spec": {"nodeName": "sw-2", "containers": [{"name": "executor"}]}}}})
        await await_for(lambda: deploy(kube, "sw-1")["device-plugin"] == "true", what="sw-1 restored")
        assert LABEL_PAUSED not in labels(kube, "sw-1")
        assert await await_for(lambda: h.sql("SELECT node FROM audit WHERE event='operands_restored'"),
                               what="audit") == [("sw-1",)]
        assert h.metric("gpu_remediation_operand_restores_total") == 1
        await await_for(lambda: h.metric("gpu_remediation_operands_paused") == 1, what="gauge")
        assert h.metric("gpu_remediation_operands_paused_since_timestamp_seconds", node="sw-2") == 1.0
        assert h.metric("gpu_remediation_operands_paused_since_timestamp_seconds", node="sw-1") is None
        assert deploy(kube, "sw-2")["device-plugin"] == "false"  # its Job runs
        kube.finish_job("gpu-health", job_name("reset_gpu", "b" * 32), succeeded=False)
        await await_for(lambda: deploy(kube, "sw-2")["device-plugin"] == "true", what="sw-2 restored")
        await await_for(lambda: h.metric("gpu_remediation_operands_paused") == 0, what="gauge back to 0")
        # Our annotation edited beyond reading: a "false" may be an administrator's own, so nothing is touched and
        # the node is reported paused since 0 (GPURemediationOperandsPausedTooLong fires at once).
        kube.label_node("sw-1", {DEPLOY + "dcgm": "false", LABEL_PAUSED: "c" * 16})
        kube._patch("/api/v1/nodes/sw-1", {"metadata": {"annotations": {ANN_PAUSED: "{not json"}}})
        await await_for(lambda: h.metric("gpu_remediation_operands_paused") == 1, what="the unreadable pause counted")
        assert h.metric("gpu_remediation_operands_paused_since_timestamp_seconds", node="sw-1") == 0
        assert deploy(kube, "sw-1")["dcgm"] == "false" and labels(kube, "sw-1")[LABEL_PAUSED] == "c" * 16
    finally:
        await close_harness(h)


@pytest.mark.parametrize(("reset", "error"), [
    ({"pause_operands": ["driver"]}, "actions.reset_gpu.pause_operands: a list of device-plugin, "
                                     "gpu-feature-discovery, dcgm, dcgm-exporter (never the driver)"),
    ({"device_plugin_selector": "app in (a,b)"}, "actions.reset_gpu.device_plugin_selector: one label as key=value"),
    ({"restart_device_plugin_after": "10m"}, "actions.reset_gpu.restart_device_plugin_after: at most verify_timeout"),
    ({"operator_namespace": "GPU_Operator"}, "actions.reset_gpu.operator_namespace: not a namespace name"),
])
def test_bad_operand_settings_name_the_key(tmp_path, reset, error):
    raw = base_config(tmp_path, "http://127.0.0.1:1",
                      executor={"namespace": "gpu-health", "image": "registry.example/executor:1"},
                      policy={"dry_run": True, "rules": [{"name": "gpu", "match": {"alertname": "X"},
                                                          "ladder": ["reset_gpu"]}]},
                      actions={"reset_gpu": reset})
    with pytest.raises(ConfigError, match=None) as info:
        build_config(raw)
    assert error in str(info.value)
