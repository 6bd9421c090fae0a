"""reboot: restart the machine on the same host, verified by a new boot id.

  actions:
    reboot: {using: executor | aws | gcp | azure | slurm | auto, verify_timeout: 20m, verify_interval: 15s}

  executor  bare metal: the executor Job (privileged, hostPID) runs `nsenter -t 1 ... systemctl reboot`
  aws       ec2:RebootInstances (same host)
  gcp       compute instances.reset (same host; requestId from the remediation id)
  azure     virtual_machine_scale_set_vms.begin_restart (same host, per instance)
  slurm     scontrol reboot ASAP nextstate=RESUME reason=... <node> (Slurm drains it first)
  auto      the node's cloud from its providerID when that provider is configured, else the executor

On Kubernetes the step succeeds when status.nodeInfo.bootID differs from the one read before and the node is
Ready again; a Slurm reboot succeeds once scontrol accepted it (Slurm resumes the node after the boot).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from ..errors import ConfigError, KubeApiError
from ..executor import ANN_BOOT_ID, REBOOT_ARGV, job_name, job_spec, job_state, poll
from ..providers import duration, only_keys, opt
from ._provider_common import boot_id, choose, pick, provider_step, ready
from .base import ActionContext, ActionDeps, Observation, Outcome, StepResult

USING = ("executor", "aws", "gcp", "azure", "slurm")


class Reboot:
    name: ClassVar[str] = "reboot"
    scope: ClassVar[str] = "node"
    idempotent: ClassVar[bool] = False  # a second reboot is a second outage: a lost outcome goes to a human
    cordons: ClassVar[bool] = True
    internal: ClassVar[bool] = False
    opt_in: ClassVar[bool] = True

    def __init__(self, using: str, deps: ActionDeps, verify_timeout: float, verify_interval: float) -> None:
        self.using = using
        self.deps = deps
        self.verify_timeout = verify_timeout
        self.verify_interval = verify_interval

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], key: str, deps: ActionDeps) -> Reboot:
        only_keys(raw, key, {"using", "verify_timeout", "verify_interval"})
        if "using" not in raw:
            raise ConfigError(f"{key}: no executor for reboot yet: set {key}.using to one of "
                              f"{', '.join(USING)} or auto (see docs/providers.md)")
        using = choose(opt(raw, key, "using", str, ""), USING, deps, key)
        slurm = deps.providers.get("slurm")
        if using in ("slurm", "auto") and slurm is not None and getattr(slurm, "rest", None) is not None:
            # `auto` picks slurm for slurm:// nodes: the same reboot would fail on every one of them.
            raise ConfigError(f"{key}.using: slurm reboots need scontrol, and providers.slurm uses slurmrestd, which "
                              f"has no reboot operation; use executor, or configure providers.slurm.scontrol")
        return cls(using, deps, duration(raw, key, "verify_timeout", "20m"),
                   duration(raw, key, "verify_interval", "15s"))

    async def run(self, ctx: ActionContext) -> StepResult:
        using = pick(self.using, ctx, self.deps, "executor")
        if using == "slurm":
            return await self._slurm(ctx)
        before = await boot_id(ctx)
        if using == "executor":
            if self.deps.executor is None:
                return StepResult(Outcome.FAILURE, "reboot: no executor configured for a node without a cloud API")
            body = job_spec(self.deps.executor.settings, self.name, ctx, list(REBOOT_ARGV), {ANN_BOOT_ID: before})
            job = await self.deps.executor.start(ctx, body)
            if ctx.dry_run:
                return StepResult(Outcome.DRY_RUN, f"would create job {body['metadata']['name']} to reboot "
                                                   f"{ctx.node.name}")
            # A re-run after a restart adopts the Job it created before (same name, no second reboot): compare
            # against the boot id that Job recorded, since the one read just now may already be the new one.
            before = _recorded_boot_id(job) or before
            how = f"job {body['metadata']['name']}"
        else:
            provider = self.deps.providers.get(using)
            if provider is None:
                return StepResult(Outcome.FAILURE, f"reboot: providers.{using} is not configured")
            result = await provider_step(ctx, using, self.name, "reboot", provider,
                                         lambda ref: f"would reboot {ref.describe()}")
            if isinstance(result, StepResult):
                return result
            how = result.detail
        if not before:
            return StepResult(Outcome.SUCCESS, f"{how}; no boot id to verify against")

        async def rebooted() -> bool:
            try:
                node = await ctx.kube.read_node(ctx.node.name)
            except KubeApiError:
                return False
            now = str(((node.get("status") or {}).get("nodeInfo") or {}).get("bootID") or "")
            return bool(now) and now != before and ready(node)

        if await poll(ctx, rebooted, self.verify_timeout, self.verify_interval):
            return StepResult(Outcome.SUCCESS, f"{how}; node is back with a new boot id")
        stop = ctx.should_stop()
        if stop:
            return StepResult(Outcome.INTERRUPTED, f"reboot verification stopped: {stop}")
        ctx.note(using, self.name, "failed")
        return StepResult(Outcome.FAILURE, f"{how}; boot id unchanged or node not Ready after "
                                           f"{self.verify_timeout:.0f}s")

    async def _slurm(self, ctx: ActionContext) -> StepResult:
        result = await provider_step(ctx, "slurm", self.name, "reboot", self.deps.providers["slurm"],
                                     lambda ref: f"would run scontrol reboot ASAP for {ref.instance_id}")
        if isinstance(result, StepResult):
            return result
        return StepResult(Outcome.SUCCESS, result.detail)

    async def observe(self, ctx: ActionContext) -> Observation:
        if self.deps.executor is None or pick(self.using, ctx, self.deps, "executor") != "executor":
            return Observation.UNKNOWN
        try:
            job = await self.deps.executor.find(ctx, job_name(self.name, ctx.remediation_id))
        except KubeApiError:
            return Observation.UNKNOWN
        if job is None:
            ttl = self.deps.executor.settings.ttl_after_finished
            if ctx.step_started is not None and ctx.clock() - ctx.step_started >= ttl:
                # Old enough that Kubernetes may have deleted our finished Job (ttlSecondsAfterFinished): it may
                # have rebooted the node already, and a new Job would reboot it again.
                return Observation.AMBIGUOUS
            return Observation.NOT_DONE
        before = _recorded_boot_id(job)
        now = await boot_id(ctx)
        if before and now and now != before:
            return Observation.DONE
        if before:
            # The Job exists and the node has not rebooted yet: a re-run adopts this Job (no second reboot) and
            # waits for a boot id other than the one it recorded.
            return Observation.NOT_DONE
        return Observation.UNKNOWN if job_state(job)[0] != "failed" else Observation.NOT_DONE


def _recorded_boot_id(job: Mapping[str, Any] | None) -> str:
    return str((((job or {}).get("metadata") or {}).get("annotations") or {}).get(ANN_BOOT_ID, "") or "")


ACTION = Reboot
