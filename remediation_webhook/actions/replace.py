"""replace: get a new machine for the node (after cordon and drain). `requires_approval` unless a rule opts out.

  actions:
    replace: {using: aws | gcp | azure | karpenter | cluster_api | human | auto}

  aws    TerminateInstanceInAutoScalingGroup(ShouldDecrementDesiredCapacity=False) (or SetInstanceHealth with
         providers.aws.replace_mode: unhealthy), verified: a replacement InService, desired capacity unchanged
  gcp    instanceGroupManagers.recreateInstances (requestId from the remediation id), verified through
         listManagedInstances (currentAction NONE, RUNNING); reportHostAsFaulty on A3 Ultra/A4/A4X when
         providers.gcp.report_faulty_host is set
  azure  per-instance VMSS redeploy (default), reimage or delete + scale back out; AKS node pools through the
         agent-pool API (deleteMachines, count put back) when providers.azure.aks_cluster is set, else refused
  karpenter    delete the node's NodeClaim (karpenter.sh/v1), verified gone
  cluster_api  delete the node's Machine (cluster.x-k8s.io/v1beta1, MachineSet-owned), verified gone
  human  bare metal: a replacement record (journal, metric, optional notification webhook); the node stays
         cordoned and drained and the remediation parks in NEEDS_HUMAN
  auto   the node's cloud from its providerID when that provider is configured, else human
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from ..errors import ConfigError
from ..providers import ProviderError, only_keys, opt
from ._provider_common import choose, pick, provider_step
from .base import ActionContext, ActionDeps, Observation, Outcome, StepResult

USING = ("aws", "gcp", "azure", "karpenter", "cluster_api", "human")


class Replace:
    name: ClassVar[str] = "replace"
    scope: ClassVar[str] = "node"
    # Each provider says after a crash whether a re-run is safe (providers.replaced -> Observation): AWS checks the
    # lifecycle state, GCP repeats its requestId, an Azure redeploy cannot tell and answers AMBIGUOUS.
    idempotent: ClassVar[bool] = True
    cordons: ClassVar[bool] = True
    internal: ClassVar[bool] = False
    opt_in: ClassVar[bool] = True

    def __init__(self, using: str, deps: ActionDeps) -> None:
        self.using = using
        self.deps = deps

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], key: str, deps: ActionDeps) -> Replace:
        only_keys(raw, key, {"using"})
        if "using" not in raw:
            raise ConfigError(f"{key}: no executor for replace yet: set {key}.using to one of "
                              f"{', '.join(USING)} or auto (see docs/providers.md)")
        using = choose(opt(raw, key, "using", str, ""), USING, deps, key)
        if using == "auto" and "human" not in deps.providers:
            deps = ActionDeps(deps.kubernetes, deps.executor, {**deps.providers, "human": _human()})
        if using in ("karpenter", "cluster_api") and using not in deps.providers:
            deps = ActionDeps(deps.kubernetes, deps.executor, {**deps.providers, using: _native(using, deps, key)})
        return cls(using, deps)

    async def run(self, ctx: ActionContext) -> StepResult:
        using = pick(self.using, ctx, self.deps, "human")
        provider = self.deps.providers.get(using)
        if provider is None:
            return StepResult(Outcome.FAILURE, f"replace: providers.{using} is not configured for node "
                                               f"{ctx.node.name} ({ctx.node.provider_id or 'no providerID'})")
        result = await provider_step(ctx, using, self.name, "replace", provider,
                                     lambda ref: f"would replace {ref.describe()}")
        if isinstance(result, StepResult):
            return result
        if using == "human":
            ctx.note("human", self.name, "human_handoff")
            return StepResult(Outcome.SUCCESS, result.detail, needs_human=True)
        return StepResult(Outcome.SUCCESS, result.detail)

    async def observe(self, ctx: ActionContext) -> Observation:
        using = pick(self.using, ctx, self.deps, "human")
        provider = self.deps.providers.get(using)
        if provider is None or using == "human":
            return Observation.NOT_DONE
        try:
            ref = await provider.resolve(ctx.node)
        except ProviderError as exc:
            # The machine cannot be found any more, with our replace in flight: it is gone, which is what replace
            # was for. karpenter / cluster_api resolve through the Node, and their controller deletes the Node
            # with its NodeClaim / Machine; a re-run could not resolve it either and would end CANCELLED.
            return Observation.DONE if exc.kind == "not_found" else Observation.UNKNOWN
        try:
            return await provider.replaced(ref, ctx.remediation_id, since=ctx.step_started)
        except ProviderError:
            return Observation.UNKNOWN


def _human() -> Any:
    from ..providers.human import HumanProvider

    return HumanProvider()


def _native(using: str, deps: ActionDeps, key: str) -> Any:
    """`using: karpenter | cluster_api` without a providers entry: the provider with its defaults."""
    from ..providers.k8s_native import PROVIDERS

    provider = {p.name: p for p in PROVIDERS}[using].from_config({}, f"providers.{using}")
    provider.bind_kubernetes(deps.kubernetes, f"{key}.using")
    return provider


ACTION = Replace
