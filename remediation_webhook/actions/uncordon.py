"""uncordon (internal, used only by the healthy-delay undo): remove our cordon and our taint.

Only what we placed is undone: a node that was unschedulable before we came, or whose cordon annotation is
not ours, is left as it is.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..errors import KubeConflict
from .base import (
    ANN_ACTION,
    ANN_CORDONED_BY,
    ANN_PRIOR_UNSCHEDULABLE,
    ANN_REASON,
    ANN_REMEDIATION_ID,
    ANN_TAINTED_BY,
    LABEL_REMEDIATION_ID,
    OWNER,
    ActionContext,
    NoOptions,
    Observation,
    Outcome,
    StepResult,
    annotations,
)


class Uncordon(NoOptions):
    name: ClassVar[str] = "uncordon"
    scope: ClassVar[str] = "node"
    idempotent: ClassVar[bool] = True
    cordons: ClassVar[bool] = False
    internal: ClassVar[bool] = True

    def __init__(self, taint_key: str = "gpu-health.io/quarantine") -> None:
        self.taint_key = taint_key

    async def run(self, ctx: ActionContext) -> StepResult:
        for _ in range(5):
            node = await ctx.kube.read_node(ctx.node.name)
            ann = annotations(node)
            if ann.get(ANN_CORDONED_BY) != OWNER and ann.get(ANN_TAINTED_BY) != OWNER:
                return StepResult(Outcome.SUCCESS, "no cordon or taint of ours on the node; left as it is")
            spec: dict[str, Any] = {}
            if ann.get(ANN_CORDONED_BY) == OWNER and ann.get(ANN_PRIOR_UNSCHEDULABLE) == "false":
                spec["unschedulable"] = False
            meta: dict[str, Any] = {
                "annotations": {k: None for k in (ANN_CORDONED_BY, ANN_TAINTED_BY, ANN_PRIOR_UNSCHEDULABLE,
                                                  ANN_REMEDIATION_ID, ANN_REASON, ANN_ACTION)},
                "labels": {LABEL_REMEDIATION_ID: None},
            }
            if ann.get(ANN_TAINTED_BY) == OWNER:
                taints = [t for t in (node.get("spec") or {}).get("taints") or [] if t.get("key") != self.taint_key]
                spec["taints"] = taints
                version = (node.get("metadata") or {}).get("resourceVersion")
                if version:
                    meta["resourceVersion"] = version
            try:
                await ctx.kube.patch_node(ctx.node.name, {"metadata": meta, "spec": spec})
            except KubeConflict:
                continue
            if ctx.dry_run:
                return StepResult(Outcome.DRY_RUN, "would remove our cordon and taint")
            return StepResult(Outcome.SUCCESS, "removed our cordon and taint")
        return StepResult(Outcome.FAILURE, "node kept changing (conflicts)")

    async def observe(self, ctx: ActionContext) -> Observation:
        ann = annotations(await ctx.kube.read_node(ctx.node.name))
        ours = ann.get(ANN_CORDONED_BY) == OWNER or ann.get(ANN_TAINTED_BY) == OWNER
        return Observation.NOT_DONE if ours else Observation.DONE


ACTION = Uncordon
