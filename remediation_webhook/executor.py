"""The node-level executor: a short-lived privileged Job pinned to one node, created and watched by the webhook.

Naming (deterministic, so a re-run or a restart finds the same Job instead of starting a second one):

  namespace  executor.namespace from the config
  name       gpu-health-<action with _ as ->-<first 16 hex of the remediation id>, e.g. gpu-health-reset-gpu-0123456789abcdef
  labels     app.kubernetes.io/managed-by=gpu-health-webhook, app.kubernetes.io/component=executor,
             gpu-health.io/remediation-id=<id>, gpu-health.io/action=<reset-gpu|reboot>

The pod is pinned with spec.nodeName (it bypasses the scheduler, so it runs on the cordoned node), tolerates
every taint, runs privileged with hostPID, never restarts (backoffLimit 0), and has an activeDeadlineSeconds.
The container's command is a fixed argument list: the reset's script is remediation_webhook/reset_gpu.sh (package
data, read once here) and the only variable input (a validated GPU UUID) is passed as a positional argument, never
interpolated.

A Job is done when status.succeeded >= 1 or a Complete condition is True; failed when status.failed >= 1 or a
Failed condition is True (its message is journaled). It is over (over()) only once its pod has ended too: a Failed
condition comes while the pod is still being killed. Its container's termination log is read back (report()).
"""

from __future__ import annotations

import re
from importlib import resources
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .actions.base import LABEL_REMEDIATION_ID, ActionContext
from .errors import ConfigError, KubeApiError, KubeConflict, KubeNotFound
from .kube import Call, KubernetesApi, KubernetesSettings

_NS = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}")
MANAGED_BY = "gpu-health-webhook"
LABEL_ACTION = "gpu-health.io/action"
ANN_BOOT_ID = "gpu-health.io/boot-id-before"
ANN_NODE = "gpu-health.io/node"

# Exit codes of the reset script, remediation_webhook/reset_gpu.sh (also in docs/providers.md).
EXIT_BUSY, EXIT_MIG, EXIT_UUID, EXIT_RESET, EXIT_PLATFORM, EXIT_CHECK = 10, 11, 12, 13, 14, 15
# The exporter's default --state-dir, a hostPath in deploy/kubernetes.
EXPORTER_STATE_DIR = "/var/lib/gpu-health-exporter"

RESET_SCRIPT = (resources.files(__package__) / "reset_gpu.sh").read_text(encoding="utf-8")
# The host's /run, where the GPU Operator's driver container root appears (/run/nvidia/driver): the reset runs that
# root's nvidia-smi. HostToContainer, so a driver root mounted after the pod started is seen too.
HOST_RUN = {"name": "host-run", "hostPath": {"path": "/run", "type": "Directory"}}
HOST_RUN_MOUNT = {"name": "host-run", "mountPath": "/host/run", "readOnly": True,
                  "mountPropagation": "HostToContainer"}
REBOOT_ARGV = ("nsenter", "--target", "1", "--mount", "--uts", "--ipc", "--net", "--pid", "--",
               "systemctl", "reboot")


@dataclass(frozen=True)
class ExecutorSettings:
    namespace: str
    image: str
    service_account: str = "gpu-health-executor"
    priority_class: str = ""
    runtime_class: str = ""
    poll_interval: float = 5.0
    job_timeout: float = 600.0
    ttl_after_finished: int = 3600
    image_pull_secrets: tuple[str, ...] = field(default=())
    # How long past its activeDeadlineSeconds, or its Failed condition, a Job's pod may take to end (its
    # terminationGracePeriodSeconds, 30, and slack): the webhook waits that much longer than the Job's own deadline,
    # and treats the Job as over only once its pod has ended.
    termination_grace: float = 90.0


def executor_settings(raw: object) -> ExecutorSettings | None:
    from .providers import duration, only_keys, opt

    if raw is None:
        return None
    key = "executor"
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a mapping")
    only_keys(raw, key, {"namespace", "image", "service_account", "priority_class", "runtime_class",
                         "poll_interval", "job_timeout", "ttl_after_finished", "image_pull_secrets",
                         "termination_grace"})
    ns = opt(raw, key, "namespace", str, "")
    if not _NS.fullmatch(ns):
        raise ConfigError(f"{key}.namespace: required, a namespace name")
    image = opt(raw, key, "image", str, "")
    if not _IMAGE.fullmatch(image):
        raise ConfigError(f"{key}.image: required, an image reference (pin it by digest)")
    secrets = raw.get("image_pull_secrets") or []
    if not isinstance(secrets, list) or not all(isinstance(s, str) and _NS.fullmatch(s) for s in secrets):
        raise ConfigError(f"{key}.image_pull_secrets: expected a list of secret names")
    for name in ("service_account", "priority_class", "runtime_class"):
        value = opt(raw, key, name, str, "gpu-health-executor" if name == "service_account" else "")
        if value and not _NS.fullmatch(value):
            raise ConfigError(f"{key}.{name}: not a valid name")
    timeout = duration(raw, key, "job_timeout", "10m")
    if timeout < 1:
        raise ConfigError(f"{key}.job_timeout: at least 1s")
    return ExecutorSettings(namespace=ns, image=image,
                            service_account=opt(raw, key, "service_account", str, "gpu-health-executor"),
                            priority_class=opt(raw, key, "priority_class", str, ""),
                            runtime_class=opt(raw, key, "runtime_class", str, ""),
                            poll_interval=duration(raw, key, "poll_interval", "5s"), job_timeout=timeout,
                            ttl_after_finished=opt(raw, key, "ttl_after_finished", int, 3600),
                            image_pull_secrets=tuple(secrets),
                            termination_grace=duration(raw, key, "termination_grace", "90s"))


def job_name(action: str, remediation_id: str) -> str:
    return f"gpu-health-{action.replace('_', '-')}-{remediation_id[:16]}"


def job_labels(action: str, remediation_id: str) -> dict[str, str]:
    return {"app.kubernetes.io/managed-by": MANAGED_BY, "app.kubernetes.io/component": "executor",
            LABEL_REMEDIATION_ID: remediation_id, LABEL_ACTION: action.replace("_", "-")}


def job_spec(settings: ExecutorSettings, action: str, ctx: ActionContext, argv: list[str],
             annotations: Mapping[str, str] | None = None,
             mounts: tuple[tuple[Mapping[str, Any], Mapping[str, Any]], ...] = ()) -> dict[str, Any]:
    """`mounts`: (volume, volumeMount) pairs this action needs beyond the exporter's state directory."""
    labels = job_labels(action, ctx.remediation_id)
    pod: dict[str, Any] = {
        "nodeName": ctx.node.name,
        "restartPolicy": "Never",
        "hostPID": True,
        "serviceAccountName": settings.service_account,
        "automountServiceAccountToken": False,
        "tolerations": [{"operator": "Exists"}],
        "terminationGracePeriodSeconds": 30,
        "containers": [{
            "name": "executor", "image": settings.image, "command": list(argv),
            "securityContext": {"privileged": True},
            "env": [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"},
                    {"name": "NVIDIA_DRIVER_CAPABILITIES", "value": "utility"}],
            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
            "volumeMounts": [{"name": "exporter-state", "mountPath": "/exporter-state"},
                             *(dict(m) for _, m in mounts)],
        }],
        # The exporter's --state-dir on the host, where the reset asks it to release NVML.
        "volumes": [{"name": "exporter-state",
                     "hostPath": {"path": EXPORTER_STATE_DIR, "type": "DirectoryOrCreate"}},
                    *(dict(v) for v, _ in mounts)],
    }
    if settings.priority_class:
        pod["priorityClassName"] = settings.priority_class
    if settings.runtime_class:
        pod["runtimeClassName"] = settings.runtime_class
    if settings.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in settings.image_pull_secrets]
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": job_name(action, ctx.remediation_id), "namespace": settings.namespace,
                     "labels": labels, "annotations": {ANN_NODE: ctx.node.name, **(annotations or {})}},
        "spec": {"backoffLimit": 0, "activeDeadlineSeconds": int(settings.job_timeout),
                 "ttlSecondsAfterFinished": settings.ttl_after_finished,
                 "template": {"metadata": {"labels": labels}, "spec": pod}},
    }


def job_state(job: Mapping[str, Any]) -> tuple[str, str]:
    """('succeeded' | 'failed' | 'running', message)."""
    status = job.get("status") or {}
    for cond in status.get("conditions") or []:
        if str(cond.get("status")) == "True" and cond.get("type") in ("Complete", "SuccessCriteriaMet"):
            return "succeeded", str(cond.get("message") or "")
        if str(cond.get("status")) == "True" and cond.get("type") in ("Failed", "FailureTarget"):
            return "failed", f"{cond.get('reason', '')}: {cond.get('message', '')}".strip(": ")
    if int(status.get("succeeded") or 0) >= 1:
        return "succeeded", ""
    if int(status.get("failed") or 0) >= 1:
        return "failed", "the executor pod failed"
    return "running", ""


class JobsApi(KubernetesApi):
    """KubernetesApi plus the batch/v1 Job verbs the executor needs (same thread pool and error mapping)."""

    def __init__(self, settings: KubernetesSettings) -> None:
        from kubernetes import client

        super().__init__(settings, workers=2)
        self._batch = client.BatchV1Api(self._api_client)

    async def create_job(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call(self._batch.create_namespaced_job, namespace, body)  # type: ignore[no-any-return]

    async def read_job(self, namespace: str, name: str) -> dict[str, Any]:
        return await self._call(self._batch.read_namespaced_job, name, namespace)  # type: ignore[no-any-return]

    async def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        out = await self._call(self._core.list_namespaced_pod, namespace, label_selector=label_selector)
        return list(out.get("items") or [])


def termination_message(pods: list[Mapping[str, Any]], job: str) -> str:
    """What the Job's container wrote to its termination log (the reset script's steps), "" if none."""
    for pod in pods:
        if ((pod.get("metadata") or {}).get("labels") or {}).get("job-name") != job:
            continue  # a server that ignores the label selector
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            message = ((status.get("state") or {}).get("terminated") or {}).get("message")
            if message:
                return str(message).strip()
    return ""


class JobExecutor:
    """Creates the Job (or adopts the one a previous run created) and waits for it."""

    def __init__(self, settings: ExecutorSettings, kubernetes: KubernetesSettings | None) -> None:
        if kubernetes is None:
            raise ConfigError("executor: needs the kubernetes: section")
        self.settings = settings
        self._kubernetes = kubernetes
        self._api: JobsApi | None = None

    @property
    def api(self) -> JobsApi:
        if self._api is None:
            self._api = JobsApi(self._kubernetes)
        return self._api

    def close(self) -> None:
        if self._api is not None:
            self._api.close()

    async def start(self, ctx: ActionContext, body: dict[str, Any]) -> dict[str, Any] | None:
        ns, name = self.settings.namespace, body["metadata"]["name"]
        path = f"/apis/batch/v1/namespaces/{ns}/jobs"
        if ctx.dry_run:
            ctx.kube.calls.append(Call("POST", path, body, performed=False, result="dry-run"))
            return None
        try:
            job = await self.api.create_job(ns, body)
            ctx.kube.calls.append(Call("POST", path, body, performed=True, result="ok"))
            return job
        except KubeConflict:
            ctx.kube.calls.append(Call("POST", path, body, performed=True, result="409 exists; adopted"))
            return await self.read(ctx, name)

    async def read(self, ctx: ActionContext, name: str) -> dict[str, Any]:
        ns = self.settings.namespace
        ctx.kube.calls.append(Call("GET", f"/apis/batch/v1/namespaces/{ns}/jobs/{name}", None, True))
        return await self.api.read_job(ns, name)

    async def find(self, ctx: ActionContext, name: str) -> dict[str, Any] | None:
        try:
            return await self.read(ctx, name)
        except KubeNotFound:
            return None

    async def over(self, name: str) -> bool:
        """The Job is done and no pod of it still runs (a Failed condition comes while the pod is still being
        killed: FailureTarget, a deadline). A Job that is gone is over. False when it cannot be read."""
        try:
            job = await self.api.read_job(self.settings.namespace, name)
            if job_state(job)[0] == "running" or int((job.get("status") or {}).get("active") or 0) > 0 \
                    or int((job.get("status") or {}).get("terminating") or 0) > 0:
                return False
            pods = await self.api.list_pods(self.settings.namespace, f"job-name={name}")
        except KubeNotFound:
            return True
        except KubeApiError:
            return False
        return all((p.get("status") or {}).get("phase") in ("Succeeded", "Failed") for p in pods
                   if ((p.get("metadata") or {}).get("labels") or {}).get("job-name") == name)

    async def report(self, name: str) -> str:
        """The termination message of the Job's pod; "" when there is none or it cannot be read (the Job's own
        state decides the step either way)."""
        try:
            return termination_message(await self.api.list_pods(self.settings.namespace, f"job-name={name}"), name)
        except KubeApiError:
            return ""

    async def wait(self, ctx: ActionContext, name: str, timeout: float) -> tuple[str, str]:
        """Poll the Job until it finishes, the step is stopped, or `timeout` passes: (state, message)."""
        deadline = ctx.clock() + timeout
        while True:
            stop = ctx.should_stop()
            if stop:
                return "interrupted", stop
            state, message = job_state(await self.api.read_job(self.settings.namespace, name))
            if state != "running":
                return state, message
            if ctx.clock() > deadline:
                return "timeout", f"job {name} still running after {timeout:.0f}s"
            await ctx.sleep(self.settings.poll_interval)


async def poll(ctx: ActionContext, check: Any, timeout: float, interval: float) -> bool:
    """Call async `check()` until it is true or `timeout` passes; False at once when the step is stopped."""
    deadline = ctx.clock() + timeout
    while True:
        if ctx.should_stop():
            return False
        if await check():
            return True
        if ctx.clock() > deadline:
            return False
        await ctx.sleep(interval)


__all__ = ["ANN_BOOT_ID", "EXIT_BUSY", "EXIT_CHECK", "EXIT_MIG", "EXIT_PLATFORM", "EXIT_RESET", "EXIT_UUID",
           "HOST_RUN", "HOST_RUN_MOUNT", "REBOOT_ARGV", "RESET_SCRIPT", "termination_message",
           "ExecutorSettings", "JobExecutor", "executor_settings", "job_labels", "job_name", "job_spec",
           "job_state", "poll"]
