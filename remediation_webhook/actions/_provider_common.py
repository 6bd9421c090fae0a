"""Shared plumbing of the provider-backed actions (reset_gpu, reboot, replace): `using` resolution,
provider calls with error accounting, dry-run records and the node boot-id check."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ConfigError, KubeApiError
from ..kube import Call
from ..providers import ProviderError, ProviderResult, provider_name_for
from .base import ActionContext, ActionDeps, Outcome, StepResult

GPU_RESOURCE = "nvidia.com/gpu"


def choose(using: str, allowed: tuple[str, ...], deps: ActionDeps, key: str) -> str:
    if using not in allowed + ("auto",):
        raise ConfigError(f"{key}.using: one of {', '.join(allowed + ('auto',))}, got {using!r}")
    if using in ("executor",) and deps.executor is None:
        raise ConfigError(f"{key}.using: executor needs the executor: section (namespace, image)")
    if using not in ("executor", "auto", "karpenter", "cluster_api") and using not in deps.providers:
        raise ConfigError(f"{key}.using: {using} needs providers.{using} configured")
    if using in ("karpenter", "cluster_api") and deps.kubernetes is None:
        raise ConfigError(f"{key}.using: {using} needs the kubernetes: section")
    return using


def pick(using: str, ctx: ActionContext, deps: ActionDeps, fallback: str) -> str:
    """`auto`: the node's cloud (from its providerID) when that provider is configured, else `fallback`."""
    if using != "auto":
        return using
    cloud = provider_name_for(ctx.node)
    if ctx.node.provider_id.startswith("slurm://") and "slurm" in deps.providers:
        return "slurm"
    return cloud if cloud and cloud in deps.providers else fallback


def record(ctx: ActionContext, provider: str, verb: str, target: str, performed: bool, result: str = "") -> None:
    ctx.kube.calls.append(Call("POST", f"{provider}:{verb}/{target}", None, performed,
                               result or ("dry-run" if not performed else "ok")))


def failed(ctx: ActionContext, provider: str, action: str, exc: ProviderError, *, fallback: bool = False) -> StepResult:
    ctx.note(provider, action, exc.kind)
    return StepResult(Outcome.FAILURE, f"{provider} {exc.kind}: {exc.detail}", fallback=fallback)


async def call(ctx: ActionContext, provider: str, action: str, verb: str, fn: Any, ref: Any) -> ProviderResult:
    result: ProviderResult = await fn(ref, ctx.remediation_id, ctx.reason)
    record(ctx, provider, verb, ref.describe(), True, result.operation or "ok")
    return result


async def provider_step(ctx: ActionContext, using: str, action: str, verb: str, provider: Any,
                        would: Callable[[Any], str]) -> ProviderResult | StepResult:
    """Resolve the node at `provider` and, unless dry-run, call its `verb`. Returns the ProviderResult, or a
    StepResult to hand back as it is: the dry-run's `would(ref)`, or a provider error journaled and counted."""
    try:
        ref = await provider.resolve(ctx.node)
        if ctx.dry_run:
            record(ctx, using, verb, ref.describe(), False)
            return StepResult(Outcome.DRY_RUN, would(ref))
        return await call(ctx, using, action, verb, getattr(provider, verb), ref)
    except ProviderError as exc:
        return failed(ctx, using, action, exc)


async def boot_id(ctx: ActionContext) -> str:
    try:
        node = await ctx.kube.read_node(ctx.node.name)
    except KubeApiError:
        return ""
    return str(((node.get("status") or {}).get("nodeInfo") or {}).get("bootID") or "")


def gpu_counts(node: Mapping[str, Any]) -> tuple[int, int]:
    status = node.get("status") or {}

    def num(v: Any) -> int:
        try:
            return int(str(v))
        except ValueError:
            return -1
    return (num((status.get("capacity") or {}).get(GPU_RESOURCE, "0")),
            num((status.get("allocatable") or {}).get(GPU_RESOURCE, "0")))


def ready(node: Mapping[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (node.get("status") or {}).get("conditions") or [])
