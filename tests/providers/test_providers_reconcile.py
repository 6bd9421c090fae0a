"""reset_gpu, reboot and replace in dry-run, and after a crash mid-step (reconciliation through `observe`).

Dry-run: the webhook reads what it needs and journals what it would do; kmock, moto and the fake scontrol see no
mutating call. Crash: the webhook runs up to the step's intent row (and, where the case needs it, the side
effect), the process "dies" there (its engine is cancelled: no completion row), the world moves on, and a
second webhook on the same journal reconciles: DONE completes the step without repeating it, NOT_DONE re-runs
it, and an outcome that cannot be told and must not be repeated (a cloud reboot, an Azure redeploy) goes to a
human. Every test counts the mutating calls the fakes saw, so a repeated side effect fails it.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import pytest

from remediation_webhook.executor import job_name
from tests.providers.fakes.support import (
    AZURE_SUB,
    JOBS,
    SETUP_UA,
    UUID,
    FakeAlertmanager,
    alert,
    await_for,
    aws_cfg,
    azure_credential,
    azure_provider,
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

NODECLAIMS = "/apis/karpenter.sh/v1/nodeclaims"
RECONCILED_DONE = "reconciled after a restart: already done"
AZURE_PID = (f"azure:///subscriptions/{AZURE_SUB}/resourceGroups/gpu-rg/providers/Microsoft.Compute/"
             f"virtualMachineScaleSets/gpu-vmss/virtualMachines/{{}}")


# ------------------------------------------------------------------------------------------------ helpers


def config(tmp_path, kube_url, ladder, *, dry_run=False, providers=None, **actions):
    raw = base_config(tmp_path, kube_url,
                      executor={"namespace": "gpu-health", "image": "nvcr.io/nvidia/cuda:12.4.1-base-ubuntu22.04",
                                "poll_interval": "20ms", "job_timeout": "30s"},
                      policy={"dry_run": dry_run, "rules": [{
                          "name": "gpu", "match_re": {"alertname": "GPU.*"}, "ladder": ladder,
                          "remediation_map": {"reboot": ladder[-1]}, "requires_approval": []}]},
                      actions={"drain": {"poll_interval": "20ms", "timeout": "5s"}, **actions})
    if providers:
        raw["providers"] = providers
    return raw


def aws_providers(aws):
    """providers: for the `aws` fixture (a replacement may take 20s here)."""
    return {"aws": aws_cfg(aws, replacement_timeout="20s")}


def job_posts(kube):
    return [c for c in kube.calls(mutating=True) if c[0] == "POST" and c[1] == JOBS]


def karpenter_node(kube, node, claim):
    for path, body in ((NODECLAIMS, {"apiVersion": "karpenter.sh/v1", "kind": "NodeClaim",
                                     "metadata": {"name": claim}}),
                       ("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {
                           "name": node, "uid": f"uid-{node}", "creationTimestamp": "2020-01-01T00:00:00Z",
                           "labels": {"karpenter.sh/nodepool": "gpu-pool", "kubernetes.io/hostname": node},
                           "ownerReferences": [{"apiVersion": "karpenter.sh/v1", "kind": "NodeClaim", "name": claim,
                                                "uid": "c1", "blockOwnerDeletion": True}]},
                           "spec": {"providerID": "aws:///us-east-1a/i-0123456789abcdef0"}})):
        r = kube.http.post(f"{kube.url}{path}", json=body, headers=SETUP_UA, timeout=5)
        assert r.status_code < 300, r.text
    kube.add_pod("kube-system", f"dcgm-{node}", node, daemonset=True)


def claim_exists(kube, claim):
    return kube.http.get(f"{kube.url}{NODECLAIMS}/{claim}", headers=SETUP_UA, timeout=5).status_code == 200


def instance(aws, iid):
    """(tags, EC2 state, ASG lifecycle state or None)."""
    res = aws.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    rows = aws.asg.describe_auto_scaling_instances(InstanceIds=[iid])["AutoScalingInstances"]
    return ({t["Key"]: t["Value"] for t in res.get("Tags", [])}, res["State"]["Name"],
            rows[0]["LifecycleState"] if rows else None)


def steps(h, rid):
    return h.sql("SELECT action, state, detail FROM step WHERE remediation_id=? ORDER BY seq", rid)


def journal_rows(tmp_path):
    """What a crashed process left behind: remediation states and step states, read straight from SQLite."""
    db = sqlite3.connect(tmp_path / "journal.db")
    try:
        rems = dict(db.execute("SELECT node, state FROM remediation"))
        rows = db.execute("SELECT action, state FROM step ORDER BY remediation_id, seq").fetchall()
    finally:
        db.close()
    return rems, rows


class Hang:
    """An async callable that records that it was reached and never returns: the process dies right here."""

    def __init__(self, before=None):
        self.before = before
        self.reached = asyncio.Event()

    async def __call__(self, *args, **kwargs):
        if self.before is not None:
            await self.before(*args, **kwargs)
        self.reached.set()
        await asyncio.Event().wait()


class Stuck:
    """Stands in for an action in the first process: the intent row is written, the process dies before the
    action sends anything. Everything but run() is the real action's."""

    def __init__(self, real):
        self._real = real
        self.run = Hang()

    def __getattr__(self, name):
        return getattr(self._real, name)


async def crash(h, tmp_path, action):
    """Wait until `action`'s intent row is in the journal, then kill the process there (nothing completes)."""
    await await_for(lambda: h.sql("SELECT 1 FROM step WHERE action=? AND state='INTENT'", action), what="intent")
    await close_harness(h)
    rems, rows = journal_rows(tmp_path)
    assert list(rems.values()) == ["RUNNING"]
    assert rows[-1] == (action, "INTENT"), rows  # an intent row without completion
    assert [s for _, s in rows[:-1]] == ["SUCCEEDED"] * (len(rows) - 1)


# ------------------------------------------------------------------------------------------------ dry-run


async def test_dry_run_reset_gpu_creates_no_job(tmp_path, kube):
    gpu_node(kube, "gpu-d1")
    h = await make_harness(config(tmp_path, kube.url, ["cordon", "drain", "reset_gpu"], dry_run=True,
                                  reset_gpu={"verify_timeout": "5s", "verify_interval": "20ms"}),
                           tmp_path, kube.url, FakeAlertmanager())
    try:
        await h.post(notification(alert("gpu-d1", remediation="reset_gpu", gpu="3", uuid=UUID)))
        rid = await rid_of(h, "gpu-d1")
        await await_for(lambda: h.states().get("gpu-d1") == "DRY_RUN_RECORDED", what="dry run recorded")
        name = job_name("reset_gpu", rid)
        assert kube.calls(mutating=True) == []  # no Job, no cordon, no eviction, no Event
        assert job(kube, name) is None
        assert [a for a, _, _ in steps(h, rid)] == ["cordon", "drain", "reset_gpu"]
        assert steps(h, rid)[0][1] == "DRY_RUN" and steps(h, rid)[2][1] == "DRY_RUN"
        assert steps(h, rid)[2][2] == f"would create job gpu-health/{name} on gpu-d1 to reset {UUID}"
        calls = json.loads(h.sql("SELECT calls_json FROM step WHERE remediation_id=? AND action='reset_gpu'",
                                 rid)[0][0])
        posts = [c for c in calls if c["method"] == "POST" and c["path"] == JOBS]
        assert len(posts) == 1 and posts[0]["performed"] is False  # the Job it would have created, recorded
        assert kube.node("gpu-d1").get("spec", {}).get("unschedulable") is not True
    finally:
        await close_harness(h)


async def test_dry_run_reboot_by_executor_creates_no_job(tmp_path, kube):
    gpu_node(kube, "gpu-d2")
    h = await make_harness(config(tmp_path, kube.url, ["cordon", "drain", "reboot"], dry_run=True,
                                  reboot={"using": "executor", "verify_timeout": "5s", "verify_interval": "20ms"}),
                           tmp_path, kube.url, FakeAlertmanager())
    try:
        await h.post(notification(alert("gpu-d2", remediation="reboot")))
        rid = await rid_of(h, "gpu-d2")
        await await_for(lambda: h.states().get("gpu-d2") == "DRY_RUN_RECORDED", what="dry run recorded")
        assert kube.calls(mutating=True) == []
        assert job(kube, job_name("reboot", rid)) is None
        action, state, detail = steps(h, rid)[-1]
        assert (action, state) == ("reboot", "DRY_RUN")
        assert detail == f"would create job {job_name('reboot', rid)} to reboot gpu-d2"
    finally:
        await close_harness(h)


async def test_dry_run_reboot_by_aws_calls_no_aws_api(tmp_path, kube, aws):
    victim = aws.ids[0]
    gpu_node(kube, "gpu-d3", provider_id=f"aws:///us-east-1a/{victim}")
    h = await make_harness(config(tmp_path, kube.url, ["cordon", "drain", "reboot"], dry_run=True,
                                  providers=aws_providers(aws),
                                  reboot={"using": "aws", "verify_timeout": "5s", "verify_interval": "20ms"}),
                           tmp_path, kube.url, FakeAlertmanager())
    try:
        await h.post(notification(alert("gpu-d3", remediation="reboot")))
        rid = await rid_of(h, "gpu-d3")
        await await_for(lambda: h.states().get("gpu-d3") == "DRY_RUN_RECORDED", what="dry run recorded")
        assert aws.proxy.seen == []  # the instance comes from the providerID: not even a read
        assert kube.calls(mutating=True) == []
        assert steps(h, rid)[-1] == ("reboot", "DRY_RUN", f"would reboot aws:us-east-1a/{victim}")
        tags, state, lifecycle = instance(aws, victim)
        assert state == "running" and lifecycle == "InService" and "remediation/id" not in tags
    finally:
        await close_harness(h)


async def test_dry_run_reboot_by_slurm_runs_no_scontrol_reboot(tmp_path, slurm_env):
    raw = base_config(tmp_path, "http://127.0.0.1:1", inventory={"kind": "slurm"},
                      providers={"slurm": {"timeout": "10s"}},
                      policy={"dry_run": True, "rules": [{"name": "gpu", "match_re": {"alertname": "GPU.*"},
                                                          "ladder": ["reboot"]}]},
                      actions={"reboot": {"using": "slurm"}})
    raw.pop("kubernetes")
    h = await make_harness(raw, tmp_path, None, FakeAlertmanager())
    try:
        await h.post(notification(alert("gpu001", remediation="reboot")))
        rid = await rid_of(h, "gpu001")
        await await_for(lambda: h.states().get("gpu001") == "DRY_RUN_RECORDED", what="dry run recorded")
        assert steps(h, rid) == [("reboot", "DRY_RUN", "would run scontrol reboot ASAP for gpu001")]
        calls = slurm_env()
        assert calls and all(c[0] == "show" for c in calls), calls  # only reads; no reboot, no update
    finally:
        await close_harness(h)


async def test_dry_run_replace_by_aws_terminates_nothing(tmp_path, kube, aws):
    victim = aws.ids[1]
    gpu_node(kube, "gpu-d4", provider_id=f"aws:///us-east-1a/{victim}")
    h = await make_harness(config(tmp_path, kube.url, ["cordon", "drain", "replace"], dry_run=True,
                                  providers=aws_providers(aws), replace={"using": "aws"}),
                           tmp_path, kube.url, FakeAlertmanager())
    try:
        await h.post(notification(alert("gpu-d4", remediation="reboot")))
        rid = await rid_of(h, "gpu-d4")
        await await_for(lambda: h.states().get("gpu-d4") == "DRY_RUN_RECORDED", what="dry run recorded")
        assert "TerminateInstanceInAutoScalingGroup" not in aws.proxy.seen
        assert aws.proxy.seen == []
        assert steps(h, rid)[-1] == ("replace", "DRY_RUN", f"would replace aws:us-east-1a/{victim}")
        tags, state, lifecycle = instance(aws, victim)
        assert (state, lifecycle) == ("running", "InService") and "remediation/id" not in tags
        g = aws.asg.describe_auto_scaling_groups(AutoScalingGroupNames=["gpu-asg"])["AutoScalingGroups"][0]
        assert g["DesiredCapacity"] == 3 and victim in {i["InstanceId"] for i in g["Instances"]}
    finally:
        await close_harness(h)


async def test_dry_run_replace_by_karpenter_keeps_the_nodeclaim(tmp_path, kube):
    karpenter_node(kube, "gpu-d5", "gpu-pool-d5")
    h = await make_harness(config(tmp_path, kube.url, ["cordon", "drain", "replace"], dry_run=True,
                                  providers={"karpenter": {"poll_interval": "20ms", "timeout": "5s"}},
                                  replace={"using": "karpenter"}),
                           tmp_path, kube.url, FakeAlertmanager())
    try:
        await h.post(notification(alert("gpu-d5", remediation="reboot")))
        rid = await rid_of(h, "gpu-d5")
        await await_for(lambda: h.states().get("gpu-d5") == "DRY_RUN_RECORDED", what="dry run recorded")
        assert claim_exists(kube, "gpu-pool-d5")
        assert kube.calls(mutating=True) == []
        assert steps(h, rid)[-1] == ("replace", "DRY_RUN", "would replace karpenter:gpu-pool-d5")
    finally:
        await close_harness(h)


# ------------------------------------------------------------------------------------------------ crash


async def reset_gpu_webhook(tmp_path, kube, node):
    """A GPU node and a webhook whose ladder ends in reset_gpu: (its config, the harness)."""
    gpu_node(kube, node)
    raw = config(tmp_path, kube.url, ["cordon", "drain", "reset_gpu"],
                 reset_gpu={"verify_timeout": "5s", "verify_interval": "20ms"})
    return raw, await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())


async def test_crash_reset_gpu_after_the_job_succeeded_is_done_without_a_second_job(tmp_path, kube):
    raw, h = await reset_gpu_webhook(tmp_path, kube, "gpu-c1")
    await h.post(notification(alert("gpu-c1", remediation="reset_gpu", gpu="3", uuid=UUID)))
    rid = await rid_of(h, "gpu-c1")
    name = job_name("reset_gpu", rid)
    await await_for(lambda: job(kube, name), what="reset job")  # the webhook now waits for the Job
    await crash(h, tmp_path, "reset_gpu")
    # while the webhook is down the Job finishes and the device plugin reports the GPU again
    finish_job(kube, name)
    patch_status(kube, "gpu-c1", {"allocatable": {"nvidia.com/gpu": "8"}})
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    try:
        await await_for(lambda: h.states().get("gpu-c1") == "SUCCEEDED", what="reconciled")
        assert steps(h, rid)[-1] == ("reset_gpu", "SUCCEEDED", RECONCILED_DONE)
        assert len(job_posts(kube)) == 1  # not re-run: no second create (not even one answered 409)
        assert h.metric("gpu_remediation_actions_total", node="gpu-c1", gpu="3", uuid=UUID, action="reset_gpu",
                        result="success") == 1
    finally:
        await close_harness(h)


async def test_crash_reset_gpu_before_the_job_is_re_run(tmp_path, kube):
    raw, h = await reset_gpu_webhook(tmp_path, kube, "gpu-c2")
    h.engine.actions["reset_gpu"] = Stuck(h.engine.actions["reset_gpu"])  # dies before creating the Job
    await h.post(notification(alert("gpu-c2", remediation="reset_gpu", gpu="0", uuid=UUID)))
    rid = await rid_of(h, "gpu-c2")
    await crash(h, tmp_path, "reset_gpu")
    name = job_name("reset_gpu", rid)
    assert job(kube, name) is None and job_posts(kube) == []
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    try:
        await await_for(lambda: job(kube, name), what="the re-run's Job")
        finish_job(kube, name)
        patch_status(kube, "gpu-c2", {"allocatable": {"nvidia.com/gpu": "8"}})
        await await_for(lambda: h.states().get("gpu-c2") == "SUCCEEDED", what="succeeded")
        rows = steps(h, rid)
        assert [(a, s) for a, s, _ in rows[2:]] == [("reset_gpu", "ABANDONED"), ("reset_gpu", "SUCCEEDED")]
        assert "observed not_done; re-run" in rows[2][2]
        assert "allocatable 8 of 8" in rows[3][2]
        assert len(job_posts(kube)) == 1
    finally:
        await close_harness(h)


async def executor_reboot_crashed(tmp_path, kube, node):
    """A webhook that created the reboot Job for `node` (boot id boot-1) and died before it saw a new boot id:
    (its config, the remediation id, the Job name)."""
    gpu_node(kube, node, boot="boot-1")
    raw = config(tmp_path, kube.url, ["cordon", "drain", "reboot"],
                 reboot={"using": "executor", "verify_timeout": "20s", "verify_interval": "20ms"})
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    await h.post(notification(alert(node, remediation="reboot")))
    rid = await rid_of(h, node)
    name = job_name("reboot", rid)
    body = await await_for(lambda: job(kube, name), what="reboot job")
    assert body["metadata"]["annotations"]["gpu-health.io/boot-id-before"] == "boot-1"
    await crash(h, tmp_path, "reboot")
    return raw, rid, name


async def test_crash_reboot_by_executor_with_a_new_boot_id_is_done(tmp_path, kube):
    raw, rid, _ = await executor_reboot_crashed(tmp_path, kube, "gpu-c3")
    patch_status(kube, "gpu-c3", {"nodeInfo": {"bootID": "boot-2"}})  # the host rebooted while we were down
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    try:
        await await_for(lambda: h.states().get("gpu-c3") == "SUCCEEDED", what="reconciled")
        assert steps(h, rid)[-1] == ("reboot", "SUCCEEDED", RECONCILED_DONE)
        assert len(job_posts(kube)) == 1
    finally:
        await close_harness(h)


async def test_crash_reboot_by_executor_before_the_boot_adopts_the_job(tmp_path, kube):
    raw, rid, name = await executor_reboot_crashed(tmp_path, kube, "gpu-c4")  # the host has not gone down yet
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    try:
        await await_for(lambda: len(steps(h, rid)) == 4, what="the re-run")
        patch_status(kube, "gpu-c4", {"nodeInfo": {"bootID": "boot-2"}})  # the adopted Job's reboot lands
        await await_for(lambda: h.states().get("gpu-c4") == "SUCCEEDED", what="succeeded")
        rows = steps(h, rid)
        assert [(a, s) for a, s, _ in rows[2:]] == [("reboot", "ABANDONED"), ("reboot", "SUCCEEDED")]
        assert "new boot id" in rows[3][2]
        # the re-run's create was answered 409 and adopted the first Job: one reboot, not two
        assert len(job_posts(kube)) == 2 and job(kube, name)["metadata"]["annotations"][
            "gpu-health.io/boot-id-before"] == "boot-1"
    finally:
        await close_harness(h)


async def test_crash_reboot_by_executor_with_the_job_gone_past_its_ttl_goes_to_a_human(tmp_path, kube):
    gpu_node(kube, "gpu-c6", boot="boot-1")
    raw = config(tmp_path, kube.url, ["cordon", "drain", "reboot"],
                 reboot={"using": "executor", "verify_timeout": "20s", "verify_interval": "20ms"})
    raw["executor"]["ttl_after_finished"] = 1
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    await h.post(notification(alert("gpu-c6", remediation="reboot")))
    rid = await rid_of(h, "gpu-c6")
    name = job_name("reboot", rid)
    await await_for(lambda: job(kube, name), what="reboot job")
    await crash(h, tmp_path, "reboot")
    r = kube.http.delete(f"{kube.url}{JOBS}/{name}", headers=SETUP_UA, timeout=5)
    assert r.status_code < 300, r.text  # the TTL controller removed the finished Job while we were down
    await asyncio.sleep(1.1)
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    try:
        await await_for(lambda: h.states().get("gpu-c6") == "NEEDS_HUMAN", what="needs human")
        assert steps(h, rid)[-1][:2] == ("reboot", "AMBIGUOUS")
        assert len(job_posts(kube)) == 1  # no second reboot Job
    finally:
        await close_harness(h)


async def test_crash_reboot_by_aws_goes_to_a_human_without_a_second_reboot(tmp_path, kube, aws):
    victim = aws.ids[0]
    gpu_node(kube, "gpu-c4", provider_id=f"aws:///us-east-1a/{victim}", boot="boot-1")
    raw = config(tmp_path, kube.url, ["cordon", "drain", "reboot"], providers=aws_providers(aws),
                 reboot={"using": "aws", "verify_timeout": "30s", "verify_interval": "20ms"})
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    await h.post(notification(alert("gpu-c4", remediation="reboot")))
    rid = await rid_of(h, "gpu-c4")
    await await_for(lambda: "RebootInstances" in aws.proxy.seen, what="RebootInstances")
    await crash(h, tmp_path, "reboot")  # sent; the boot id never changed before the crash
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    try:
        await await_for(lambda: h.states().get("gpu-c4") == "NEEDS_HUMAN", what="needs human")
        await h.settle()
        action, state, detail = steps(h, rid)[-1]
        assert (action, state) == ("reboot", "AMBIGUOUS")
        assert "cannot tell whether it happened" in detail
        reason = h.sql("SELECT reason FROM remediation WHERE id=?", rid)[0][0]
        assert reason.startswith("reboot may or may not have happened and cannot safely be repeated")
        assert aws.proxy.seen.count("RebootInstances") == 1  # a second reboot would be a second outage
    finally:
        await close_harness(h)


async def test_crash_replace_by_gcp_after_recreate_is_sent_again_under_the_same_request_id(tmp_path, kube):
    from tests.providers.fakes.gcp_compute import GcpFake

    gcp = GcpFake()
    gcp.add_instance("gpu-g1")
    try:
        gpu_node(kube, "gpu-g1", provider_id="gce://gpu-proj/us-central1-a/gpu-g1")
        raw = config(tmp_path, kube.url, ["cordon", "drain", "replace"], replace={"using": "gcp"},
                     providers={"gcp": {"endpoint": gcp.url, "anonymous": True, "poll_interval": "10ms",
                                        "retry_base": "10ms", "replacement_timeout": "10s"}})
        h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
        provider = h.engine.actions["replace"].deps.providers["gcp"]
        provider._await_recreated = waiting = Hang()  # dies after recreateInstances, before the VM is back
        await h.post(notification(alert("gpu-g1", remediation="reboot")))
        rid = await rid_of(h, "gpu-g1")
        await asyncio.wait_for(waiting.reached.wait(), 20)
        await crash(h, tmp_path, "replace")
        provider.close()
        h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
        try:
            await await_for(lambda: h.states().get("gpu-g1") == "SUCCEEDED", what="re-run and verified")
            rows = steps(h, rid)
            assert [(a, s) for a, s, _ in rows[2:]] == [("replace", "ABANDONED"), ("replace", "SUCCEEDED")]
            sent = [q.get("requestId") for verb, _n, q, _b in gcp.seen if verb == "recreateInstances"]
            assert len(sent) == 2 and sent[0] == sent[1]  # the same request: Compute Engine runs it once
            assert "RUNNING with no pending action" in rows[3][2]
        finally:
            await close_harness(h)
    finally:
        gcp.close()


async def test_crash_replace_by_aws_after_the_terminate_is_done(tmp_path, kube, aws):
    victim = aws.ids[0]
    gpu_node(kube, "gpu-c5", provider_id=f"aws:///us-east-1a/{victim}")
    raw = config(tmp_path, kube.url, ["cordon", "drain", "replace"], providers=aws_providers(aws),
                 replace={"using": "aws"})
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    provider = h.engine.actions["replace"].deps.providers["aws"]
    provider._await_replacement = waiting = Hang()  # dies after the terminate, before the replacement is seen
    await h.post(notification(alert("gpu-c5", remediation="reboot")))
    rid = await rid_of(h, "gpu-c5")
    await asyncio.wait_for(waiting.reached.wait(), 20)
    await crash(h, tmp_path, "replace")
    tags, state, _ = instance(aws, victim)
    assert state in ("shutting-down", "terminated") and tags["remediation/id"] == rid
    kube.delete_node("gpu-c5")  # the cloud node controller removes the Node of a terminated instance
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    try:
        await await_for(lambda: h.states().get("gpu-c5") == "SUCCEEDED", what="reconciled")
        assert steps(h, rid)[-1] == ("replace", "SUCCEEDED", RECONCILED_DONE)
        assert aws.proxy.seen.count("TerminateInstanceInAutoScalingGroup") == 1
    finally:
        await close_harness(h)


async def test_crash_replace_by_aws_before_the_terminate_is_re_run(tmp_path, kube, aws):
    victim = aws.ids[1]
    gpu_node(kube, "gpu-c6", provider_id=f"aws:///us-east-1a/{victim}")
    raw = config(tmp_path, kube.url, ["cordon", "drain", "replace"], providers=aws_providers(aws),
                 replace={"using": "aws"})
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    provider = h.engine.actions["replace"].deps.providers["aws"]
    real_call, stop = provider.call, Hang()

    async def call(service, op, **kwargs):
        if op == "terminate_instance_in_auto_scaling_group":
            await stop()
        return await real_call(service, op, **kwargs)

    provider.call = call  # dies after tagging the instance, before the terminate is sent
    await h.post(notification(alert("gpu-c6", remediation="reboot")))
    rid = await rid_of(h, "gpu-c6")
    await asyncio.wait_for(stop.reached.wait(), 20)
    await crash(h, tmp_path, "replace")
    tags, state, lifecycle = instance(aws, victim)
    assert (state, lifecycle) == ("running", "InService") and tags["remediation/id"] == rid
    assert "TerminateInstanceInAutoScalingGroup" not in aws.proxy.seen
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    try:
        await await_for(lambda: h.states().get("gpu-c6") == "SUCCEEDED", timeout=30, what="re-run replace")
        rows = steps(h, rid)
        assert [(a, s) for a, s, _ in rows[2:]] == [("replace", "ABANDONED"), ("replace", "SUCCEEDED")]
        assert "observed not_done; re-run" in rows[2][2]
        assert aws.proxy.seen.count("TerminateInstanceInAutoScalingGroup") == 1
        assert instance(aws, victim)[1] in ("shutting-down", "terminated")
    finally:
        await close_harness(h)


@pytest.mark.parametrize("node_gone", [False, True], ids=["node-still-there", "node-deleted-by-karpenter"])
async def test_crash_replace_by_karpenter_with_the_nodeclaim_gone_is_done(tmp_path, kube, node_gone):
    karpenter_node(kube, "gpu-c7", "gpu-pool-c7")
    raw = config(tmp_path, kube.url, ["cordon", "drain", "replace"],
                 providers={"karpenter": {"poll_interval": "20ms", "timeout": "5s"}}, replace={"using": "karpenter"})
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    provider = h.engine.actions["replace"].deps.providers["karpenter"]
    provider._get = waiting = Hang()  # dies after the DELETE, before it saw the NodeClaim go
    await h.post(notification(alert("gpu-c7", remediation="reboot")))
    rid = await rid_of(h, "gpu-c7")
    await asyncio.wait_for(waiting.reached.wait(), 20)
    await crash(h, tmp_path, "replace")
    assert not claim_exists(kube, "gpu-pool-c7")
    if node_gone:
        kube.delete_node("gpu-c7")  # Karpenter's termination finalizer deletes the Node with its NodeClaim
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    try:
        await await_for(lambda: h.states().get("gpu-c7") not in ("RUNNING", "PLANNED", "BLOCKED"), what="settled")
        assert h.states()["gpu-c7"] == "SUCCEEDED", h.sql("SELECT reason FROM remediation")
        assert steps(h, rid)[-1] == ("replace", "SUCCEEDED", RECONCILED_DONE)
        deletes = [c for c in kube.calls(mutating=True) if c[0] == "DELETE" and c[1].startswith(NODECLAIMS)]
        assert len(deletes) == 1
    finally:
        await close_harness(h)


async def test_crash_replace_by_cluster_api_with_machine_and_node_gone_is_done(tmp_path, kube):
    machines = "/apis/cluster.x-k8s.io/v1beta1/namespaces/capi-system/machines"
    r = kube.http.post(f"{kube.url}{machines}", headers=SETUP_UA, timeout=5, json={
        "apiVersion": "cluster.x-k8s.io/v1beta1", "kind": "Machine", "metadata": {
            "name": "md-gpu-c9", "namespace": "capi-system", "ownerReferences": [{
                "apiVersion": "cluster.x-k8s.io/v1beta1", "kind": "MachineSet", "name": "md-gpu", "uid": "ms1",
                "controller": True}]}})
    assert r.status_code < 300, r.text
    gpu_node(kube, "gpu-c9")
    r = kube.http.patch(f"{kube.url}/api/v1/nodes/gpu-c9", timeout=5, json={"metadata": {"annotations": {
        "cluster.x-k8s.io/machine": "md-gpu-c9", "cluster.x-k8s.io/cluster-namespace": "capi-system"}}},
                        headers={"Content-Type": "application/merge-patch+json", **SETUP_UA})
    assert r.status_code < 300, r.text
    raw = config(tmp_path, kube.url, ["cordon", "drain", "replace"],
                 providers={"cluster_api": {"poll_interval": "20ms", "timeout": "5s"}},
                 replace={"using": "cluster_api"})
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    provider = h.engine.actions["replace"].deps.providers["cluster_api"]
    real_get, waiting, reads = provider._get, Hang(), []

    async def get(ref):  # the first read checks the MachineSet owner; the next one waits for the delete
        if reads:
            await waiting()
        reads.append(ref)
        return await real_get(ref)

    provider._get = get  # dies after the DELETE, before it saw the Machine go
    await h.post(notification(alert("gpu-c9", remediation="reboot")))
    rid = await rid_of(h, "gpu-c9")
    await asyncio.wait_for(waiting.reached.wait(), 20)
    await crash(h, tmp_path, "replace")
    assert kube.http.get(f"{kube.url}{machines}/md-gpu-c9", headers=SETUP_UA, timeout=5).status_code == 404
    kube.delete_node("gpu-c9")  # Cluster API deletes the Node of a deleted Machine
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    try:
        await await_for(lambda: h.states().get("gpu-c9") not in ("RUNNING", "PLANNED", "BLOCKED"), what="settled")
        assert h.states()["gpu-c9"] == "SUCCEEDED", h.sql("SELECT reason FROM remediation")
        assert steps(h, rid)[-1] == ("replace", "SUCCEEDED", RECONCILED_DONE)
        deletes = [c for c in kube.calls(mutating=True) if c[0] == "DELETE" and c[1].startswith(machines)]
        assert len(deletes) == 1
    finally:
        await close_harness(h)


# ------------------------------------------------------------------------------------------------ Azure


def adopt_azure(az, h):
    """The replace action's AzureProvider in harness `h`, with a token, closed by the `az` fixture."""
    return azure_credential(az, h.engine.actions["replace"].deps.providers["azure"])


async def test_crash_replace_by_azure_redeploy_goes_to_a_human_without_a_second_redeploy(tmp_path, kube, az, tls):
    gpu_node(kube, "gpu-c8", provider_id=AZURE_PID.format(1))
    raw = config(tmp_path, kube.url, ["cordon", "drain", "replace"], replace={"using": "azure"},
                 providers={"azure": {"base_url": az.url, "ca_file": tls[0], "polling_interval": "10ms",
                                      "max_attempts": 2, "operation_timeout": "10s", "replace_mode": "redeploy"}})
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    provider = adopt_azure(az, h)
    provider.lro = sent = Hang(before=provider.lro)  # the redeploy runs to the end; the process dies after it
    await h.post(notification(alert("gpu-c8", remediation="reboot")))
    rid = await rid_of(h, "gpu-c8")
    await asyncio.wait_for(sent.reached.wait(), 20)
    await crash(h, tmp_path, "replace")
    assert az.verbs().count("redeploy") == 1
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    adopt_azure(az, h)
    try:
        await await_for(lambda: h.states().get("gpu-c8") == "NEEDS_HUMAN", what="needs human")
        await h.settle()
        action, state, _ = steps(h, rid)[-1]
        assert (action, state) == ("replace", "AMBIGUOUS")
        reason = h.sql("SELECT reason FROM remediation WHERE id=?", rid)[0][0]
        assert reason.startswith("replace may or may not have happened and cannot safely be repeated")
        assert az.verbs().count("redeploy") == 1  # Replace is idempotent in general; an Azure redeploy is not
        assert az.scale_set_actions == []
    finally:
        await close_harness(h)


@pytest.mark.parametrize("mode,expected", [("redeploy", "ambiguous"), ("reimage", "ambiguous"),
                                           ("delete", "not_done")])
async def test_replace_observe_by_azure_mode(kube, az, tls, mode, expected):
    """Replace.observe on its own: redeploy and reimage leave nothing to observe; a delete not yet sent is safe."""
    from remediation_webhook.actions.base import ActionContext, ActionDeps, Observation
    from remediation_webhook.actions.replace import Replace
    from remediation_webhook.inventory.base import NodeIdentity
    from remediation_webhook.kube import (
        KubernetesApi,
        KubernetesSettings,
        RecordingKube,
    )
    from remediation_webhook.models import Target

    p = azure_provider(az, tls, replace_mode=mode, max_attempts=2)
    api = KubernetesApi(KubernetesSettings(host=kube.url, request_timeout=5))
    try:
        node = NodeIdentity("gpu-az", "uid", provider_id=AZURE_PID.format(2))
        ctx = ActionContext(remediation_id="0123456789abcdef0123", node=node, target=Target("gpu-az", "", ""),
                            reason="test", kube=RecordingKube(api, dry_run=False), dry_run=False,
                            should_stop=lambda: None, sleep=asyncio.sleep, clock=time.time)
        seen = await Replace("azure", ActionDeps(providers={"azure": p})).observe(ctx)
        assert seen == Observation(expected)
        assert not {"redeploy", "reimage", "delete", "restart"} & set(az.verbs())
    finally:
        api.close()
