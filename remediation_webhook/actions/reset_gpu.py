"""reset_gpu: reset one GPU in an executor Job pinned to the node (after cordon and drain); docs/reset.md.

  actions:
    reset_gpu:
      verify_timeout: 5m                 # for allocatable nvidia.com/gpu to come back after the Job
      verify_interval: 10s
      operator_namespace: gpu-operator   # GPU Operator nodes: where its operand pods run
      pause_operands: [device-plugin, gpu-feature-discovery, dcgm, dcgm-exporter]   # [] pauses nothing
      operands_timeout: 2m               # for their pods to leave the node
      device_plugin_selector: app=nvidia-device-plugin-daemonset
      restart_device_plugin_after: 2m30s # default: half of verify_timeout

The step, in order (each part is in the step's journaled detail and calls):
1. On a node the GPU Operator manages (it carries `nvidia.com/gpu.deploy.<operand>` labels), pause the operands
   that hold the GPU and wait until their pods have left (actions/_operands.py: the node carries what to restore).
2. The Job (remediation_webhook/reset_gpu.sh, the GPU UUID its only argument) releases the exporter's NVML, finds
   every process with the GPU's device file open and refuses while one that nobody paused remains, refuses the
   platforms that need a reboot (MIG, NVSwitch before Ampere or after Hopper, Ampere NVSwitch without Fabric Manager,
   pre-Ampere NVLink peers), resets, and checks the same UUID is back with no pending remap or retirement and, on
   NVSwitch systems, the fabric registration completed. Its termination log (each step, timed) is journaled.
3. Put the operands back whatever the Job did; then wait for allocatable nvidia.com/gpu to return to the node's
   GPU count before the reset, restarting the device plugin pod once if it has not come back by
   restart_device_plugin_after (the plugin never marks a GPU healthy again by itself).

Anything short of that is a FAILURE with fallback: the engine goes on to the rule's next rung (reboot). Two
refusals go to a person instead: another remediation's pause on the node, and a driver upgrade in progress. A step
interrupted (pause, cancel, shutdown) leaves the operands paused while its Job may still run: the re-run puts them
back, or, for a remediation that will not run again, the engine's sweep (engine/operands.py) once the Job is over.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from ..errors import ConfigError, KubeApiError
from ..executor import (HOST_RUN, HOST_RUN_MOUNT, RESET_SCRIPT, JobExecutor, job_name, job_spec, job_state,
                        poll)
from ..providers import duration
from ._operands import (APPS, DEPLOY, OperandSettings, check_keys, driver_upgrade, pause_patch, paused, pods_of,
                        restore_patch, selected)
from ._provider_common import gpu_counts
from .base import ActionContext, ActionDeps, Observation, Outcome, StepResult


class ResetGpu:
    name: ClassVar[str] = "reset_gpu"
    scope: ClassVar[str] = "gpu"
    idempotent: ClassVar[bool] = True  # the deterministic Job name makes a re-run adopt the running Job
    cordons: ClassVar[bool] = True
    internal: ClassVar[bool] = False
    opt_in: ClassVar[bool] = True
    # Beyond the exporter's state directory: the host's /run, where a GPU Operator's driver root appears.
    mounts: ClassVar[tuple[tuple[Mapping[str, Any], Mapping[str, Any]], ...]] = ((HOST_RUN, HOST_RUN_MOUNT),)

    def __init__(self, executor: JobExecutor, verify_timeout: float = 300.0, verify_interval: float = 10.0,
                 operands: OperandSettings | None = None) -> None:
        self.executor = executor
        self.verify_timeout = verify_timeout
        self.verify_interval = verify_interval
        self.operands = operands or OperandSettings(restart_after=verify_timeout / 2)

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], key: str, deps: ActionDeps) -> ResetGpu:
        check_keys(raw, key, {"verify_timeout", "verify_interval"})
        if deps.executor is None:
            raise ConfigError(f"{key}: needs the executor: section (namespace and image of the node Job)")
        verify = duration(raw, key, "verify_timeout", "5m")
        return cls(deps.executor, verify, duration(raw, key, "verify_interval", "10s"),
                   OperandSettings.from_config(raw, key, verify))

    @staticmethod
    def argv(uuid: str) -> list[str]:
        return ["/bin/sh", "-c", RESET_SCRIPT, "gpu-health-reset", uuid]

    async def run(self, ctx: ActionContext) -> StepResult:
        uuid = ctx.target.uuid
        if not uuid:
            return StepResult(Outcome.FAILURE, "the alert carries no uuid label: cannot tell which GPU to reset",
                              fallback=True)
        node = await ctx.kube.read_node(ctx.node.name)
        mark = paused(node)
        if mark is not None and not (mark.remediation and ctx.remediation_id.startswith(mark.remediation)):
            return StepResult(Outcome.FAILURE, f"the GPU Operator's operands on {ctx.node.name} are paused by "
                                               f"remediation {mark.remediation or '(unreadable)'}; a person decides")
        gpus = mark.gpus if mark is not None and mark.gpus else gpu_counts(node)[0]
        if gpus <= 0:
            return StepResult(Outcome.FAILURE, "the node reports no nvidia.com/gpu capacity", fallback=True)
        keys = sorted(mark.labels) if mark is not None else []
        if mark is None:
            upgrading = driver_upgrade(node)
            if upgrading:
                return StepResult(Outcome.FAILURE, f"the GPU Operator is upgrading the driver on {ctx.node.name} "
                                                   f"({upgrading}): no reset now; a person decides")
            patch = pause_patch(node, self.operands, ctx.remediation_id, gpus, ctx.clock())
            if patch is not None:
                await ctx.kube.patch_node(ctx.node.name, patch)
                keys = sorted(k for k, v in patch["metadata"]["labels"].items() if k.startswith(DEPLOY))
        names = ", ".join(k.removeprefix(DEPLOY) for k in keys)
        body = job_spec(self.executor.settings, self.name, ctx, self.argv(uuid), {"gpu-health.io/gpu-uuid": uuid},
                        mounts=self.mounts)
        name = body["metadata"]["name"]
        if ctx.dry_run:
            await self.executor.start(ctx, body)
            paused_note = f"pause {names}, " if keys else ""
            return StepResult(Outcome.DRY_RUN, f"would {paused_note}create job {self.executor.settings.namespace}/"
                                               f"{name} on {ctx.node.name} to reset {uuid}")
        parts = [f"paused {names}" if keys else "no GPU Operator operands to pause"]
        try:
            left = await self._operands_gone(ctx, keys) if keys else []
            stop = ctx.should_stop()
            if left and not stop:
                parts.append(f"their pods did not leave within {self.operands.timeout:.0f}s: {', '.join(left)}")
                return await self._restored(ctx, parts, ok=False)
            if stop:  # no Job yet: nothing runs that the operands could disturb
                await self._restored(ctx, parts, ok=False)
                return StepResult(Outcome.INTERRUPTED, f"reset stopped before its Job: {stop}; {'; '.join(parts)}")
            await self.executor.start(ctx, body)
        except KubeApiError:
            try:
                no_job = await self.executor.find(ctx, name) is None
            except KubeApiError:
                no_job = False  # cannot tell: the sweep restores once it can read the Job
            if no_job:
                await self._restored(ctx, parts, ok=False)  # put them back now, not at the next sweep
            raise
        state, message = await self.executor.wait(ctx, name, self.executor.settings.job_timeout
                                                  + self.executor.settings.termination_grace)
        if state == "interrupted":  # the Job may still run: the re-run (or the sweep, once it is over) restores
            return StepResult(Outcome.INTERRUPTED, f"reset stopped: {message}; {parts[0]}")
        report = await self.executor.report(name)
        parts.append(f"job {name} {state}" + (f": {message}" if message and state != "succeeded" else ""))
        grace = self.executor.settings.termination_grace
        if not await poll(ctx, lambda: self.executor.over(name), grace, self.verify_interval):
            stop = ctx.should_stop()
            if stop:
                return _with(StepResult(Outcome.INTERRUPTED, f"reset stopped: {stop}; {'; '.join(parts)}"), report)
            # A device plugin started now would take the GPU in the middle of the reset.
            ctx.note("executor", self.name, "failed")
            parts.append("its pod still runs: the operands stay paused until it ends (the engine's sweep puts "
                         "them back)")
            return _with(StepResult(Outcome.FAILURE, "; ".join(parts) + "; falling back", fallback=True), report)
        if state != "succeeded":
            ctx.note("executor", self.name, "failed")
            return _with(await self._restored(ctx, parts, ok=False), report)
        restored = await self._restored(ctx, parts, ok=True)
        if restored.outcome != Outcome.SUCCESS:
            return _with(restored, report)
        return _with(await self._verify(ctx, parts, gpus), report)

    async def _operands_gone(self, ctx: ActionContext, keys: list[str]) -> list[str]:
        apps = {APPS[k.removeprefix(DEPLOY)] for k in keys}
        left: list[str] = []

        async def gone() -> bool:
            nonlocal left
            left = pods_of(await ctx.kube.list_pods_on_node(ctx.node.name), self.operands.namespace, apps)
            return not left

        await poll(ctx, gone, self.operands.timeout, self.verify_interval)
        return left

    async def _restored(self, ctx: ActionContext, parts: list[str], *, ok: bool) -> StepResult:
        """Put the operands back; SUCCESS (so far) only if `ok` and nothing went wrong here."""
        node = await ctx.kube.read_node(ctx.node.name)
        if paused(node) is not None:
            restore = restore_patch(node)
            if restore is None:
                parts.append("the saved operand labels cannot be read (our annotation was changed): they stay as "
                             "they are for a person to set")
                return StepResult(Outcome.FAILURE, "; ".join(parts))
            patch, back, kept = restore
            await ctx.kube.patch_node(ctx.node.name, patch)
            parts.append("restored " + ", ".join(back) if back else "no operand label to restore")
            if kept:
                parts.append("left as someone changed them: " + ", ".join(kept))
        if ok:
            return StepResult(Outcome.SUCCESS, "; ".join(parts))
        return StepResult(Outcome.FAILURE, "; ".join(parts) + "; falling back to the next rung", fallback=True)

    async def _verify(self, ctx: ActionContext, parts: list[str], gpus: int) -> StepResult:
        seen: list[tuple[int, int]] = []

        async def back() -> bool:
            counts = gpu_counts(await ctx.kube.read_node(ctx.node.name))
            seen.append(counts)
            return counts[1] >= gpus

        first = min(self.operands.restart_after, self.verify_timeout)
        done = await poll(ctx, back, first, self.verify_interval)
        if not done and not ctx.should_stop():
            pods = selected(await ctx.kube.list_pods_on_node(ctx.node.name), self.operands.namespace,
                            self.operands.device_plugin_selector)
            restarted, refused = [], []
            for pod in pods:
                try:
                    await ctx.kube.delete_pod(self.operands.namespace, pod["metadata"]["name"], None)
                    restarted.append(pod["metadata"]["name"])
                except KubeApiError as exc:  # 403 without components/device-plugin-restart; 404 if replaced
                    refused.append(f"{pod['metadata']['name']} ({exc})")
            parts.append(f"allocatable not back after {first:.0f}s: "
                         + (f"restarted device plugin pod {', '.join(restarted)}" if restarted else "")
                         + (f"{'; ' if restarted else ''}could not restart {', '.join(refused)}" if refused else "")
                         + ("" if pods else f"no device plugin pod ({self.operands.device_plugin_selector}) on "
                                            f"the node to restart"))
            done = await poll(ctx, back, max(0.0, self.verify_timeout - first), self.verify_interval)
        last = seen[-1] if seen else (gpus, -1)
        if done:
            parts.append(f"nvidia.com/gpu allocatable {last[1]} of {gpus}")
            return StepResult(Outcome.SUCCESS, "; ".join(parts))
        stop = ctx.should_stop()
        if stop:  # the Job is over and the operands are back: the re-run only verifies again
            return StepResult(Outcome.INTERRUPTED, f"verification stopped: {stop}; {'; '.join(parts)}")
        ctx.note("executor", self.name, "failed")
        parts.append(f"nvidia.com/gpu allocatable {last[1]} of {gpus} within {self.verify_timeout:.0f}s; "
                     f"falling back")
        return StepResult(Outcome.FAILURE, "; ".join(parts), fallback=True)

    async def observe(self, ctx: ActionContext) -> Observation:
        name = job_name(self.name, ctx.remediation_id)
        try:
            job = await self.executor.find(ctx, name)
            node = await ctx.kube.read_node(ctx.node.name)
        except KubeApiError:
            return Observation.UNKNOWN
        if job is None:
            return Observation.NOT_DONE
        capacity, allocatable = gpu_counts(node)
        if job_state(job)[0] == "succeeded" and allocatable >= capacity > 0 and paused(node) is None:
            return Observation.DONE
        return Observation.NOT_DONE  # a re-run adopts the Job (409), waits for it and puts the operands back


def _with(result: StepResult, report: str) -> StepResult:
    """The Job's own log (its steps, the holders it found) after the step's verdict: the journal keeps a detail's
    first 4,000 characters, and the verdict must not be what is cut."""
    if not report:
        return result
    return dataclasses.replace(result, detail=f"{result.detail}\njob log:\n{report[-2500:]}")


ACTION = ResetGpu
