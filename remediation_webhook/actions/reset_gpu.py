"""reset_gpu: reset one GPU with `nvidia-smi -r` in an executor Job pinned to the node (after cordon and drain).

  actions:
    reset_gpu: {verify_timeout: 5m, verify_interval: 10s}   # needs the executor: section

The Job (see remediation_webhook/executor.py for its name, labels and spec) runs a fixed script with the
alert's GPU UUID as its only argument: it refuses when MIG is enabled (exit 11) or a process still holds the
GPU (exit 10), resolves the UUID to its PCI bus id, runs `nvidia-smi -r -i <bus id>`, and checks that the same
UUID answers at that bus id afterwards (exit 12 otherwise). The webhook then verifies the node's
status.allocatable["nvidia.com/gpu"] is back to status.capacity["nvidia.com/gpu"].

Anything short of that (no UUID on the alert, Job failed or timed out, allocatable not restored) is a FAILURE
with fallback: the engine goes on to the rule's next rung (reboot), or escalates when there is none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from ..errors import ConfigError, KubeApiError
from ..executor import RESET_SCRIPT, JobExecutor, job_name, job_spec, job_state, poll
from ..providers import duration, only_keys
from ._provider_common import gpu_counts
from .base import ActionContext, ActionDeps, Observation, Outcome, StepResult


class ResetGpu:
    name: ClassVar[str] = "reset_gpu"
    scope: ClassVar[str] = "gpu"
    idempotent: ClassVar[bool] = True  # the deterministic Job name makes a re-run adopt the running Job
    cordons: ClassVar[bool] = True
    internal: ClassVar[bool] = False
    opt_in: ClassVar[bool] = True

    def __init__(self, executor: JobExecutor, verify_timeout: float = 300.0, verify_interval: float = 10.0) -> None:
        self.executor = executor
        self.verify_timeout = verify_timeout
        self.verify_interval = verify_interval

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], key: str, deps: ActionDeps) -> ResetGpu:
        only_keys(raw, key, {"verify_timeout", "verify_interval"})
        if deps.executor is None:
            raise ConfigError(f"{key}: needs the executor: section (namespace and image of the node Job)")
        return cls(deps.executor, duration(raw, key, "verify_timeout", "5m"),
                   duration(raw, key, "verify_interval", "10s"))

    def argv(self, uuid: str) -> list[str]:
        return ["/bin/sh", "-c", RESET_SCRIPT, "gpu-health-reset", uuid]

    async def run(self, ctx: ActionContext) -> StepResult:
        uuid = ctx.target.uuid
        if not uuid:
            return StepResult(Outcome.FAILURE, "the alert carries no uuid label: cannot tell which GPU to reset",
                              fallback=True)
        node = await ctx.kube.read_node(ctx.node.name)
        capacity, _ = gpu_counts(node)
        if capacity <= 0:
            return StepResult(Outcome.FAILURE, "the node reports no nvidia.com/gpu capacity", fallback=True)
        body = job_spec(self.executor.settings, self.name, ctx, self.argv(uuid),
                        {"gpu-health.io/gpu-uuid": uuid})
        name = body["metadata"]["name"]
        await self.executor.start(ctx, body)
        if ctx.dry_run:
            return StepResult(Outcome.DRY_RUN, f"would create job {self.executor.settings.namespace}/{name} on "
                                               f"{ctx.node.name} to reset {uuid}")
        state, message = await self.executor.wait(ctx, name, self.executor.settings.job_timeout)
        if state == "interrupted":
            return StepResult(Outcome.INTERRUPTED, f"reset stopped: {message}")
        if state != "succeeded":
            ctx.note("executor", self.name, "failed")
            return StepResult(Outcome.FAILURE, f"reset job {name} {state}: {message or 'no message'}; "
                                               f"falling back to the next rung", fallback=True)
        return await self._verify(ctx, name, capacity)

    async def _verify(self, ctx: ActionContext, name: str, capacity: int) -> StepResult:
        seen: list[tuple[int, int]] = []

        async def restored() -> bool:
            counts = gpu_counts(await ctx.kube.read_node(ctx.node.name))
            seen.append(counts)
            return counts[1] >= max(capacity, counts[0]) > 0

        if await poll(ctx, restored, self.verify_timeout, self.verify_interval):
            return StepResult(Outcome.SUCCESS, f"job {name} reset {ctx.target.uuid} (same UUID back, checked on the "
                                               f"node); nvidia.com/gpu allocatable {seen[-1][1]} of {seen[-1][0]}")
        ctx.note("executor", self.name, "failed")
        last = seen[-1] if seen else (capacity, -1)
        return StepResult(Outcome.FAILURE, f"after job {name}: nvidia.com/gpu allocatable {last[1]} of {last[0]} "
                                           f"within {self.verify_timeout:.0f}s; falling back", fallback=True)

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
        if job_state(job)[0] == "succeeded" and allocatable >= capacity > 0:
            return Observation.DONE
        return Observation.NOT_DONE  # a re-run adopts the Job (409) and waits for it


ACTION = ResetGpu
