"""cordon: spec.unschedulable=true plus our labels and annotations, in one PATCH.

A node someone else cordoned is left exactly as it is (and never uncordoned by us). A node cordoned by us holds a
slot of the fleet cap; a person who uncordons it takes the slot back and overrides the remediation.
"""

from __future__ import annotations

from typing import ClassVar

from .base import (
    ANN_CORDONED_BY,
    ANN_PRIOR_UNSCHEDULABLE,
    ANN_REMEDIATION_ID,
    OWNER,
    ActionContext,
    NoOptions,
    Observation,
    Outcome,
    StepResult,
    annotations,
    our_metadata,
)


class Cordon(NoOptions):
    name: ClassVar[str] = "cordon"
    scope: ClassVar[str] = "node"
    idempotent: ClassVar[bool] = True
    cordons: ClassVar[bool] = True
    internal: ClassVar[bool] = False

    async def run(self, ctx: ActionContext) -> StepResult:
        node = await ctx.kube.read_node(ctx.node.name)
        ann = annotations(node)
        unschedulable = bool((node.get("spec") or {}).get("unschedulable"))
        if unschedulable and ann.get(ANN_REMEDIATION_ID) == ctx.remediation_id:
            return StepResult(Outcome.SUCCESS, "already cordoned by this remediation; nothing to do", holds=True)
        if unschedulable and ann.get(ANN_CORDONED_BY) != OWNER:
            return StepResult(Outcome.SUCCESS, "already cordoned by someone else; left as it is")
        meta = our_metadata(ctx, self.name)
        meta["annotations"][ANN_CORDONED_BY] = OWNER
        if not unschedulable:
            meta["annotations"][ANN_PRIOR_UNSCHEDULABLE] = "false"
        await ctx.kube.patch_node(ctx.node.name, {"metadata": meta, "spec": {"unschedulable": True}})
        if ctx.dry_run:
            return StepResult(Outcome.DRY_RUN, "would cordon")
        after = await ctx.kube.read_node(ctx.node.name)
        if (after.get("spec") or {}).get("unschedulable") and annotations(after).get(ANN_REMEDIATION_ID) == ctx.remediation_id:
            return StepResult(Outcome.SUCCESS, "cordoned", holds=True)
        return StepResult(Outcome.FAILURE, "node is not unschedulable after the patch")

    async def observe(self, ctx: ActionContext) -> Observation:
        node = await ctx.kube.read_node(ctx.node.name)
        done = (node.get("spec") or {}).get("unschedulable") and (
            annotations(node).get(ANN_REMEDIATION_ID) == ctx.remediation_id
            or annotations(node).get(ANN_CORDONED_BY) != OWNER)
        return Observation.DONE if done else Observation.NOT_DONE


ACTION = Cordon
