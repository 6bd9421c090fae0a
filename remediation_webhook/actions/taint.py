"""taint: add our NoSchedule taint. spec.taints has no merge key, so the full list is written together
with the resourceVersion it was read at; a 409 means someone changed it meanwhile: re-read and retry.

NoExecute deletes pods without regard for PodDisruptionBudgets; it is refused unless
actions.taint.allow_no_execute is true.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

from ..errors import ConfigError, KubeConflict
from .base import (
    ANN_TAINTED_BY,
    OWNER,
    ActionContext,
    Observation,
    Outcome,
    StepResult,
    annotations,
    our_hold,
    our_metadata,
)

_QUALIFIED = re.compile(r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_RETRIES = 5


def _has(node: Mapping[str, Any], key: str, effect: str) -> bool:
    return any(t.get("key") == key and t.get("effect") == effect
               for t in (node.get("spec") or {}).get("taints") or [])


class Taint:
    name: ClassVar[str] = "taint"
    scope: ClassVar[str] = "node"
    idempotent: ClassVar[bool] = True
    cordons: ClassVar[bool] = True
    internal: ClassVar[bool] = False

    def __init__(self, key: str = "gpu-health.io/quarantine", effect: str = "NoSchedule") -> None:
        self.key = key
        self.effect = effect

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], key: str) -> Taint:
        unknown = set(raw) - {"key", "effect", "allow_no_execute"}
        if unknown:
            raise ConfigError(f"{key}.{sorted(unknown)[0]}: unknown key")
        taint_key = raw.get("key", "gpu-health.io/quarantine")
        if not isinstance(taint_key, str) or len(taint_key) > 316 or not _QUALIFIED.fullmatch(taint_key):
            raise ConfigError(f"{key}.key: not a valid taint key")
        effect = raw.get("effect", "NoSchedule")
        if effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise ConfigError(f"{key}.effect: must be NoSchedule, PreferNoSchedule or NoExecute")
        allow = raw.get("allow_no_execute", False)
        if not isinstance(allow, bool):
            raise ConfigError(f"{key}.allow_no_execute: expected true or false")
        if effect == "NoExecute" and not allow:
            raise ConfigError(f"{key}.effect: NoExecute deletes pods and ignores PodDisruptionBudgets; "
                              f"set {key}.allow_no_execute: true if you mean it")
        return cls(taint_key, effect)

    async def run(self, ctx: ActionContext) -> StepResult:
        for _ in range(_RETRIES):
            node = await ctx.kube.read_node(ctx.node.name)
            if _has(node, self.key, self.effect):
                return StepResult(Outcome.SUCCESS, "taint already present; nothing to do",
                                  holds=our_hold(node) == ctx.remediation_id
                                  and annotations(node).get(ANN_TAINTED_BY) == OWNER)
            taints = list((node.get("spec") or {}).get("taints") or [])
            taints.append({"key": self.key, "value": ctx.remediation_id[:63], "effect": self.effect})
            meta: dict[str, Any] = our_metadata(ctx, self.name)
            meta["annotations"][ANN_TAINTED_BY] = OWNER
            version = (node.get("metadata") or {}).get("resourceVersion")
            if version:
                meta["resourceVersion"] = version
            try:
                await ctx.kube.patch_node(ctx.node.name, {"metadata": meta, "spec": {"taints": taints}})
            except KubeConflict:
                continue
            if ctx.dry_run:
                return StepResult(Outcome.DRY_RUN, f"would add taint {self.key}:{self.effect}")
            if _has(await ctx.kube.read_node(ctx.node.name), self.key, self.effect):
                return StepResult(Outcome.SUCCESS, f"tainted {self.key}:{self.effect}", holds=True)
            return StepResult(Outcome.FAILURE, "taint missing after the patch")
        return StepResult(Outcome.FAILURE, f"taint list kept changing ({_RETRIES} conflicts)")

    async def observe(self, ctx: ActionContext) -> Observation:
        node = await ctx.kube.read_node(ctx.node.name)
        return Observation.DONE if _has(node, self.key, self.effect) else Observation.NOT_DONE


ACTION = Taint
