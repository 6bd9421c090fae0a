"""drain: evict every pod of the node through the Eviction API, as `kubectl drain` does.

DaemonSet pods (they would come straight back) and mirror pods (the kubelet owns them) are skipped. A 429
means a PodDisruptionBudget says "not now": that pod is retried with exponential backoff. The drain has a
deadline; when it passes, the node's pods are listed again (an eviction accepted just before the deadline is
not a pod left), and if some remain the step fails and the remediation escalates to a human. Pods are deleted
(bypassing PodDisruptionBudgets) only if actions.drain.force_delete_after_timeout is true. A person who
uncordons the node while it drains stops the drain: the remediation is overridden.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from gpu_health_common.durations import parse_duration

from ..errors import (
    ConfigError,
    KubeApiError,
    KubeNotFound,
    KubeTooManyRequests,
    KubeUnavailable,
)
from .base import ActionContext, Observation, Outcome, StepResult, our_hold

_MIRROR = "kubernetes.io/config.mirror"


def _duration(raw: Mapping[str, Any], name: str, key: str, default: float) -> float:
    return parse_duration(raw.get(name, default), f"{key}.{name}", error=ConfigError)


def evictable(pod: Mapping[str, Any]) -> bool:
    meta = pod.get("metadata") or {}
    if _MIRROR in (meta.get("annotations") or {}):
        return False
    return not any(ref.get("kind") == "DaemonSet" and ref.get("controller")
                   for ref in meta.get("ownerReferences") or [])


def _key(pod: Mapping[str, Any]) -> tuple[str, str]:
    meta = pod.get("metadata") or {}
    return str(meta.get("namespace", "")), str(meta.get("name", ""))


class Drain:
    name: ClassVar[str] = "drain"
    scope: ClassVar[str] = "node"
    idempotent: ClassVar[bool] = True
    cordons: ClassVar[bool] = True
    internal: ClassVar[bool] = False

    def __init__(self, *, timeout: float = 3600.0, retry_interval: float = 5.0, max_retry_interval: float = 60.0,
                 poll_interval: float = 5.0, grace_period_seconds: int | None = None,
                 force_delete_after_timeout: bool = False) -> None:
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.max_retry_interval = max_retry_interval
        self.poll_interval = poll_interval
        self.grace_period_seconds = grace_period_seconds
        self.force_delete_after_timeout = force_delete_after_timeout

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], key: str) -> Drain:
        allowed = {"timeout", "retry_interval", "max_retry_interval", "poll_interval", "grace_period_seconds",
                   "force_delete_after_timeout"}
        unknown = set(raw) - allowed
        if unknown:
            raise ConfigError(f"{key}.{sorted(map(str, unknown))[0]}: unknown key")
        grace = raw.get("grace_period_seconds")
        if grace is not None and (isinstance(grace, bool) or not isinstance(grace, int) or grace < 0):
            raise ConfigError(f"{key}.grace_period_seconds: expected a non-negative integer")
        force = raw.get("force_delete_after_timeout", False)
        if not isinstance(force, bool):
            raise ConfigError(f"{key}.force_delete_after_timeout: expected true or false")
        timeout = _duration(raw, "timeout", key, 3600.0)
        if timeout <= 0:
            raise ConfigError(f"{key}.timeout: must be positive")
        return cls(timeout=timeout, retry_interval=_duration(raw, "retry_interval", key, 5.0),
                   max_retry_interval=_duration(raw, "max_retry_interval", key, 60.0),
                   poll_interval=_duration(raw, "poll_interval", key, 5.0), grace_period_seconds=grace,
                   force_delete_after_timeout=force)

    async def run(self, ctx: ActionContext) -> StepResult:
        deadline = ctx.clock() + self.timeout
        evicted: set[tuple[str, str]] = set()
        backoff: dict[tuple[str, str], tuple[float, float]] = {}  # pod -> (next try, current interval)
        blocked = 0
        while True:
            stop = ctx.should_stop()
            if stop:
                return StepResult(Outcome.INTERRUPTED, f"drain stopped: {stop}")
            if ctx.hold_placed and not ctx.dry_run and our_hold(await ctx.kube.read_node(ctx.node.name)) == "":
                return StepResult(Outcome.OVERRIDDEN, f"the node was uncordoned by someone else while it drained "
                                                      f"({len(evicted)} pods evicted); stopped for good")
            pods = await self._pods(ctx)
            if not pods:
                return StepResult(Outcome.SUCCESS, f"drained: {len(evicted)} pods evicted, {blocked} evictions "
                                                   f"blocked by disruption budgets on the way")
            if ctx.dry_run:
                for pod in pods:
                    await ctx.kube.evict_pod(*_key(pod), self.grace_period_seconds)
                return StepResult(Outcome.DRY_RUN, f"would evict {len(pods)} pods")
            now = ctx.clock()
            for pod in pods:
                key = _key(pod)
                if (pod.get("metadata") or {}).get("deletionTimestamp") or backoff.get(key, (0.0, 0.0))[0] > now:
                    continue  # terminating, or waiting for its budget
                try:
                    await ctx.kube.evict_pod(*key, self.grace_period_seconds)
                    evicted.add(key)
                    backoff.pop(key, None)
                except KubeNotFound:
                    evicted.add(key)
                except (KubeTooManyRequests, KubeUnavailable) as exc:
                    # 429: a PodDisruptionBudget; 5xx: e.g. several budgets match the pod. Both: later.
                    blocked += isinstance(exc, KubeTooManyRequests)
                    interval = backoff.get(key, (0.0, self.retry_interval / 1.5))[1] * 1.5
                    interval = min(interval, self.max_retry_interval)
                    backoff[key] = (now + interval, interval)
                except KubeApiError as exc:
                    return StepResult(Outcome.FAILURE, f"eviction of {key[0]}/{key[1]} refused: {exc}")
            if ctx.clock() >= deadline:
                # What is left now, not what was there before this round's evictions.
                pods = await self._pods(ctx)
                if not pods:
                    continue
                left = [f"{ns}/{n}" for ns, n in map(_key, pods)]
                if not self.force_delete_after_timeout:
                    return StepResult(Outcome.FAILURE, f"drain deadline ({self.timeout:.0f}s) passed with "
                                                       f"{len(left)} pods left: {', '.join(left[:10])}; escalated")
                for pod in pods:
                    try:
                        await ctx.kube.delete_pod(*_key(pod), self.grace_period_seconds)
                    except KubeNotFound:
                        pass
                    except KubeApiError as exc:
                        return StepResult(Outcome.FAILURE, f"force delete of {'/'.join(_key(pod))} failed: {exc}")
                deadline = float("inf")
            await ctx.sleep(self.poll_interval)

    @staticmethod
    async def _pods(ctx: ActionContext) -> list[dict[str, Any]]:
        return [p for p in await ctx.kube.list_pods_on_node(ctx.node.name) if evictable(p)]

    async def observe(self, ctx: ActionContext) -> Observation:
        return Observation.NOT_DONE if await self._pods(ctx) else Observation.DONE


ACTION = Drain
