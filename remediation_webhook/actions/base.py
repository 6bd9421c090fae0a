"""The action seam: one module per action, each defining ACTION (a class with from_config).

An action does one thing to one node, is safe to run twice (`idempotent`), says whether a crash left it
done (`observe`) and reports its outcome; the engine does verification, journaling, metrics and Events.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Self

from ..inventory.base import NodeIdentity
from ..kube import RecordingKube
from ..models import Target

# Every action the policy may name. reset_gpu, reboot and replace are opt-in (`opt_in = True` on the class):
# a ladder that uses one fails check-config unless actions.<name> configures its executor or provider.
KNOWN_ACTIONS = ("cordon", "taint", "drain", "reset_gpu", "reboot", "replace")

# Node metadata we write. A cordon or taint is only ever undone if these say we placed it.
PREFIX = "gpu-health.io"
LABEL_REMEDIATION_ID = f"{PREFIX}/remediation-id"
ANN_REMEDIATION_ID = f"{PREFIX}/remediation-id"
ANN_REASON = f"{PREFIX}/remediation-reason"
ANN_ACTION = f"{PREFIX}/remediation-action"
ANN_CORDONED_BY = f"{PREFIX}/cordoned-by"
ANN_TAINTED_BY = f"{PREFIX}/tainted-by"
ANN_PRIOR_UNSCHEDULABLE = f"{PREFIX}/prior-unschedulable"
OWNER = "gpu-health-webhook"


class Outcome(str, enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    DRY_RUN = "dry_run"
    INTERRUPTED = "interrupted"  # stopped by a pause or a cancel; the step is re-run later
    OVERRIDDEN = "overridden"  # a person undid our cordon or taint meanwhile: the remediation stops for good


class Observation(str, enum.Enum):
    DONE = "done"
    NOT_DONE = "not_done"  # safe to run again
    UNKNOWN = "unknown"  # re-run only if the action is idempotent
    # It may have happened and repeating it is unsafe (an Azure redeploy has no idempotency key): a human decides,
    # whatever the action's `idempotent` says, because safety here depends on the provider behind the action.
    AMBIGUOUS = "ambiguous"


@dataclass(frozen=True)
class StepResult:
    outcome: Outcome
    detail: str = ""
    # FAILURE with fallback=True: the engine moves on to the rule's next rung (reset_gpu -> reboot) instead of
    # escalating to a human. SUCCESS with needs_human=True: the step did its part (a replacement record for a
    # human) and the remediation parks in NEEDS_HUMAN, the node left cordoned and drained.
    fallback: bool = False
    needs_human: bool = False
    # SUCCESS with holds=True: the node now carries a cordon or taint of ours (it holds a slot of the fleet cap, and
    # a person who removes it overrides the remediation).
    holds: bool = False


def _no_note(provider: str, action: str, kind: str) -> None:
    return None


@dataclass(frozen=True)
class ActionDeps:
    """What provider-backed actions are built with (config time): the executor and the configured providers."""

    kubernetes: Any = None  # KubernetesSettings | None
    executor: Any = None  # executor.JobExecutor | None
    providers: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ActionContext:
    """Everything an action may use. `kube` records every call; in dry-run it performs only reads."""

    remediation_id: str
    node: NodeIdentity
    target: Target
    reason: str
    kube: RecordingKube
    dry_run: bool
    should_stop: Callable[[], str | None]
    sleep: Callable[[float], Awaitable[None]]
    clock: Callable[[], float]
    # note(provider, action, kind): counts provider errors and hand-offs (gpu_remediation_provider_events_total)
    note: Callable[[str, str, str], None] = _no_note
    # When the step being reconciled after a restart began (its intent row); None on a first run.
    step_started: float | None = None
    # An earlier step of this remediation left our cordon or taint on the node: if it is gone, a person overrode us.
    hold_placed: bool = False


class Action(Protocol):
    name: ClassVar[str]
    scope: ClassVar[str]  # "node" or "gpu": gpu/uuid metric labels are empty for node actions
    idempotent: ClassVar[bool]  # False: an interrupted run whose effect cannot be observed goes to a human
    cordons: ClassVar[bool]  # leaves the node unschedulable: counts against the fleet cap
    internal: ClassVar[bool]  # not usable in policy ladders (uncordon)

    async def run(self, ctx: ActionContext) -> StepResult: ...

    async def observe(self, ctx: ActionContext) -> Observation: ...


class ActionFactory(Protocol):
    name: ClassVar[str]
    internal: ClassVar[bool]

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], key: str) -> Action: ...


def our_metadata(ctx: ActionContext, action: str) -> dict[str, dict[str, str]]:
    """Labels and annotations that carry the remediation id and reason onto the node."""
    return {
        "labels": {LABEL_REMEDIATION_ID: ctx.remediation_id},
        "annotations": {ANN_REMEDIATION_ID: ctx.remediation_id, ANN_REASON: ctx.reason[:1000],
                        ANN_ACTION: action},
    }


def annotations(node: Mapping[str, Any]) -> dict[str, str]:
    return dict((node.get("metadata") or {}).get("annotations") or {})


def our_hold(node: Mapping[str, Any]) -> str:
    """The remediation id whose cordon or taint the Node object carries ("" if none of ours): our annotations
    and `spec.unschedulable: true`, or our annotations and a taint whose value is that id. `kubectl uncordon` leaves
    the annotations and clears unschedulable, so it reads as "not held"."""
    ann = annotations(node)
    rid = ann.get(ANN_REMEDIATION_ID, "")
    spec = node.get("spec") or {}
    if not rid:
        return ""
    if spec.get("unschedulable") and ann.get(ANN_CORDONED_BY) == OWNER:
        return rid
    if ann.get(ANN_TAINTED_BY) == OWNER and any(t.get("value") == rid[:63] for t in spec.get("taints") or []):
        return rid
    return ""


def held_by(holder: str | None, rid: str) -> bool:
    """Does an identity's `held_by` name this remediation? (Slurm can only keep the id's first 16 characters.)"""
    return bool(holder) and rid.startswith(holder or "")


def no_options(raw: Mapping[str, Any], key: str) -> None:
    if raw:
        from ..errors import ConfigError

        raise ConfigError(f"{key}: takes no options, got {', '.join(sorted(map(str, raw)))}")


class NoOptions:
    """Mixin for an action that takes no options (cordon, uncordon): from_config refuses any options and
    returns the default instance."""

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], key: str) -> Self:
        no_options(raw, key)
        return cls()
