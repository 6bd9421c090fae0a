"""The fleet soak's oracle (issue 16, build 4): from what was injected, what must have happened, and what did.

Ground truth is what the soak runner did (the faults it wrote into kernel logs, the people it played, when) and
what the webhook sent to the Kubernetes API (every request, timestamped by the API's front, gpu_health_stack.
kube_front). The journal (read-only) and the alerts are evidence: they say why, and they say where an alert went.
Nothing here asks the webhook what it thinks it did.

What must hold (docs/webhook.md, Safety, is the specification):

- every fatal fault outside a storm is remediated exactly once, at its rung (a reset-class Xid by reset_gpu or
  something stronger, Xid 79 and fatal SXids by reboot), and cordoned once: never again after a person uncordons;
- no node is acted on without a fatal fault before the action (application Xids, reboots, scrape gaps, power loss
  ask for nothing);
- each storm trips the breaker; while it is open no step starts and no call is made but those of a step already
  in flight; after a `skip-backlog` reset no node of that storm is acted on, after `resume` each at most once;
- the fleet cap (nodes carrying our cordon at once) and every rate limit hold at every moment;
- nothing the webhook accepted is lost: every planned or merged occurrence has its remediation, and at the end no
  remediation is stuck (unfinished, and neither waiting on a cap nor younger than `deadline`).

A remediation that waits on the fleet cap or a rate limit is late, not wrong: its fault is reported as delayed and
left out of the latency figures. Violations name the node, the fault and the evidence.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# What fixes a fault of each rung: the rung or a stronger action (the journal's RANK).
FIXES = {"reset_gpu": ("reset_gpu", "reboot", "replace"), "reboot": ("reboot", "replace")}
FATAL_KINDS = ("fatal_xid", "nvswitch_fatal", "storm")
ACTIVE = ("PLANNED", "BLOCKED", "AWAITING_APPROVAL", "RUNNING", "NEEDS_HUMAN", "HEALTHY_DELAY", "HELD")
WAITING = ("fleet cap", "rate limit", "breaker")


@dataclass(frozen=True)
class Fault:
    at: float  # unix time the kernel-log line was written
    node: str
    kind: str  # fatal_xid, nvswitch_fatal, storm, driver_rollout
    code: int
    rung: str  # what the policy must do: reboot, reset_gpu, or "" (nothing)
    storm: int | None = None
    reset: str = ""  # the storm's breaker reset: skip-backlog or resume


@dataclass(frozen=True)
class Call:
    """One request the webhook sent to the Kubernetes API. `action`: cordon, uncordon, evict, job:<action>, or ""
    for reads and Events."""

    at: float
    method: str
    path: str
    status: int
    action: str
    node: str


@dataclass(frozen=True)
class Step:
    remediation: str
    node: str
    action: str
    started_at: float
    finished_at: float | None
    outcome: str


@dataclass(frozen=True)
class Rem:
    id: str
    node: str
    state: str
    reason: str
    created_at: float
    finished_at: float | None
    since: float | None = None  # when it entered its state (the journal's state_since)


@dataclass(frozen=True)
class Occ:
    node: str
    alertname: str
    starts_ts: float
    fault_ts: float | None
    first_seen: float
    decision: str
    reason: str
    remediation: str | None


@dataclass(frozen=True)
class BreakerSpan:
    tripped: float
    reset: float | None  # None: still open at the end
    mode: str
    reason: str


@dataclass(frozen=True)
class PersonUncordon:
    at: float
    node: str


@dataclass(frozen=True)
class ResetRun:
    """A reset Job the runner played on a node: the GPU Operator operand labels still "true" when it ran (the
    webhook's pause missed them) and the process of the run's chaos that held the GPU ("" if none)."""

    at: float
    node: str
    unpaused: tuple[str, ...] = ()
    holder: str = ""


@dataclass(frozen=True)
class Limits:
    fleet_cap: int
    rate: Mapping[str, tuple[int, float]]  # action -> (max, per seconds)


@dataclass(frozen=True)
class Evidence:
    faults: Sequence[Fault]
    calls: Sequence[Call]
    steps: Sequence[Step]
    rems: Sequence[Rem]
    occs: Sequence[Occ]
    breaker: Sequence[BreakerSpan]
    uncordons: Sequence[PersonUncordon]
    limits: Limits
    end: float  # when the evidence was taken
    deadline: float  # how long a remediation may take before "unfinished" is a violation
    storm_slack: float  # how long after its last fault a storm may still trip the breaker
    gaps: Mapping[str, Sequence[tuple[float, float]]] = field(default_factory=dict)  # node -> scrape gaps
    boots: Mapping[str, Sequence[float]] = field(default_factory=dict)  # node -> new boots not of our doing
    # (from, to, what): component outages that hold every fault back (Prometheus, the webhook, the Kubernetes API)
    outages: Sequence[tuple[float, float, str]] = ()
    resets: Sequence[ResetRun] = ()
    # node -> its GPU Operator labels that are not as the run began (deploy labels not "true", our pause mark)
    operands: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Violation:
    rule: str
    node: str
    fault: str
    evidence: str

    def line(self) -> str:
        return f"{self.rule}: node={self.node or '-'} fault={self.fault or '-'}: {self.evidence}"


@dataclass
class Verdict:
    violations: list[Violation] = field(default_factory=list)
    fault_to_cordon: dict[str, float] = field(default_factory=dict)  # "node xid@t" -> seconds
    delayed: list[str] = field(default_factory=list)  # faults whose remediation waited on a cap
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, rule: str, node: str, fault: str, evidence: str) -> None:
        self.violations.append(Violation(rule, node, fault, evidence))


def describe(f: Fault) -> str:
    what = f"sxid {f.code}" if f.kind == "nvswitch_fatal" else f"xid {f.code}"
    return f"{f.kind} {what} at {f.at:.3f}" + (f" (storm {f.storm}, {f.reset})" if f.storm is not None else "")


def judge(ev: Evidence) -> Verdict:
    v = Verdict()
    mutating = [c for c in ev.calls if c.action]
    by_node_calls: dict[str, list[Call]] = defaultdict(list)
    for c in mutating:
        by_node_calls[c.node].append(c)
    steps_of: dict[str, list[Step]] = defaultdict(list)
    for s in ev.steps:
        steps_of[s.remediation].append(s)
    rems_of: dict[str, list[Rem]] = defaultdict(list)
    for r in sorted(ev.rems, key=lambda r: r.created_at):
        rems_of[r.node].append(r)
    fatal = sorted((f for f in ev.faults if f.kind in FATAL_KINDS), key=lambda f: f.at)
    first_fatal: dict[str, float] = {}
    for f in fatal:
        first_fatal.setdefault(f.node, f.at)
    spans = sorted(ev.breaker, key=lambda b: b.tripped)

    def in_span(t: float) -> BreakerSpan | None:
        return next((b for b in spans if b.tripped <= t < (b.reset if b.reset is not None else float("inf"))), None)

    _no_cause(ev, v, first_fatal)
    _breaker(ev, v, spans, fatal, steps_of)
    _caps(ev, v)
    _lost(ev, v, steps_of)
    _operands(ev, v)
    for f in fatal:
        span = in_span(f.at)
        storm_mode = f.reset if f.storm is not None else (span.mode if span is not None else "")
        _fault(ev, v, f, storm_mode, rems_of.get(f.node, []), steps_of, by_node_calls.get(f.node, []))
    v.counts = {"faults": len(ev.faults), "fatal": len(fatal), "calls": len(mutating), "remediations": len(ev.rems),
                "breaker_trips": len(spans), "violations": len(v.violations),
                "already_remediated": sum(1 for o in ev.occs if o.decision == "already_remediated")}
    return v


def _acting(rems: Sequence[Rem], steps_of: Mapping[str, list[Step]], since: float) -> list[Rem]:
    """The node's remediations created after `since` that started at least one step."""
    return [r for r in rems if r.created_at >= since - 1.0 and steps_of.get(r.id)]


def _fault(ev: Evidence, v: Verdict, f: Fault, storm_mode: str, rems: Sequence[Rem],
           steps_of: Mapping[str, list[Step]], calls: Sequence[Call]) -> None:
    name = describe(f)
    acting = _acting(rems, steps_of, f.at)
    cordons = [c for c in calls if c.action == "cordon" and c.at >= f.at and c.status < 300]
    person = [u for u in ev.uncordons if u.node == f.node and u.at >= f.at]
    if len(cordons) > 1:
        after = [c for c in cordons if person and c.at > person[0].at]
        rule = "cordoned again after a person uncordoned" if after else "cordoned more than once"
        v.add(rule, f.node, name, "; ".join(f"PATCH at {c.at:.3f}" for c in cordons))
    if len(acting) > 1:
        v.add("remediated more than once", f.node, name,
              "; ".join(f"{r.id} {r.state} created {r.created_at:.3f}" for r in acting))
    if storm_mode == "skip-backlog":
        # The storm was skipped: nothing of it starts after the reset (its fault came before the reset, however
        # often its alert fires again). Nodes acted on before the breaker tripped (the first of the storm) are fine.
        reset = next((b.reset for b in ev.breaker if b.mode == "skip-backlog" and b.reset is not None
                      and b.tripped <= f.at + ev.storm_slack and b.reset >= f.at), None)
        if reset is None:
            return
        after = [s for r in acting for s in steps_of[r.id] if s.started_at > reset]
        if after:
            v.add("acted on a skipped storm", f.node, name,
                  f"step {after[0].action} of {after[0].remediation} started at {after[0].started_at:.3f}, after the "
                  f"skip-backlog reset at {reset:.3f}")
        return
    if storm_mode == "resume" and f.storm is not None:
        return  # at most once (checked above); the backlog may still wait on the fleet cap
    seen_at = cordons[0].at if cordons else ev.end
    late = True
    if storm_mode == "resume" or any(b.tripped <= seen_at and (b.reset or ev.end) >= f.at for b in ev.breaker):
        # Held by an open breaker (a background fault during a storm): late by design, and out of the latencies.
        v.delayed.append(f"{f.node} {name}: held by the breaker")
    elif any(lo <= seen_at and hi >= f.at for lo, hi in ev.gaps.get(f.node, ())):
        v.delayed.append(f"{f.node} {name}: its node could not be scraped (a scrape gap)")
    elif any(lo <= seen_at and hi >= f.at for lo, hi, _ in ev.outages):
        what = next(w for lo, hi, w in ev.outages if lo <= seen_at and hi >= f.at)
        v.delayed.append(f"{f.node} {name}: held back by an outage ({what})")
    else:
        late = False
    if not acting:
        waiting = [r for r in rems if r.created_at >= f.at - 1 and r.state in ACTIVE
                   and any(w in r.reason for w in WAITING)]
        if waiting:
            v.delayed.append(f"{f.node} {name}: {waiting[0].state} ({waiting[0].reason})")
            return
        seen = [o for o in ev.occs if o.node == f.node and o.first_seen >= f.at - 1]
        if ev.end - f.at < ev.deadline:
            return  # too recent to judge
        if any(t >= f.at for t in ev.boots.get(f.node, ())) and not seen:
            return  # the node rebooted (power loss, a person) before any alert: the reboot fixed it
        evidence = ("no alert for it reached the webhook" if not seen else
                    "; ".join(f"{o.alertname}: {o.decision} ({o.reason})" for o in seen[:3]))
        v.add("fatal fault not remediated", f.node, name, evidence)
        return
    rem = acting[0]
    steps = steps_of[rem.id]
    fixed = [s for s in steps if s.action in FIXES.get(f.rung, ()) and s.outcome == "success"]
    if cordons and not late:
        v.fault_to_cordon[f"{f.node} {name}"] = cordons[0].at - f.at
    if fixed:
        return
    if rem.state == "OVERRIDDEN" and person:
        return  # a person took over (uncordoned while we worked): ours stops there, by design
    if rem.state in ACTIVE and (ev.end - f.at < ev.deadline or any(w in rem.reason for w in WAITING)):
        return
    done = ", ".join(f"{s.action}:{s.outcome or 'running'}" for s in steps)
    v.add("not remediated at its rung", f.node, name,
          f"wanted {f.rung}; remediation {rem.id} is {rem.state} ({rem.reason}); steps {done}")


def _no_cause(ev: Evidence, v: Verdict, first_fatal: Mapping[str, float]) -> None:
    for c in ev.calls:
        if not c.action:
            continue
        if c.node not in first_fatal or c.at < first_fatal[c.node]:
            why = "none" if c.node not in first_fatal else f"its first at {first_fatal[c.node]:.3f}"
            v.add("acted without a fatal fault", c.node, "",
                  f"{c.method} {c.path} ({c.action}) at {c.at:.3f}; fatal faults on the node: {why}")


def _breaker(ev: Evidence, v: Verdict, spans: Sequence[BreakerSpan], fatal: Sequence[Fault],
             steps_of: Mapping[str, list[Step]]) -> None:
    storms: dict[int, list[Fault]] = defaultdict(list)
    for f in fatal:
        if f.storm is not None:
            storms[f.storm].append(f)
    for i, members in sorted(storms.items()):
        lo, hi = min(f.at for f in members), max(f.at for f in members) + ev.storm_slack
        if not any(lo <= b.tripped <= hi for b in spans):
            v.add("storm did not trip the breaker", "", f"storm {i} ({len(members)} nodes)",
                  f"no trip between {lo:.3f} and {hi:.3f}; trips at {[round(b.tripped, 3) for b in spans]}")
    for b in spans:
        end = b.reset if b.reset is not None else float("inf")
        for s in ev.steps:
            if b.tripped <= s.started_at < end:
                v.add("acted while the breaker was open", s.node, "",
                      f"step {s.action} of {s.remediation} started at {s.started_at:.3f}, breaker open "
                      f"{b.tripped:.3f}..{end:.3f}")
        for c in ev.calls:
            if not c.action or not b.tripped <= c.at < end:
                continue
            in_flight = [s for s in ev.steps if s.node == c.node and s.started_at < b.tripped
                         and (s.finished_at is None or s.finished_at >= c.at - 1.0)]
            if not in_flight:
                v.add("acted while the breaker was open", c.node, "",
                      f"{c.method} {c.path} at {c.at:.3f} belongs to no step in flight at the trip ({b.tripped:.3f})")


def _caps(ev: Evidence, v: Verdict) -> None:
    # Nodes carrying our cordon: ours until we or a person uncordon them.
    events = sorted([(c.at, 1, c.node) for c in ev.calls if c.action == "cordon" and c.status < 300]
                    + [(c.at, -1, c.node) for c in ev.calls if c.action == "uncordon" and c.status < 300]
                    + [(u.at, -1, u.node) for u in ev.uncordons])
    held: set[str] = set()
    worst = 0
    for at, delta, node in events:
        if delta > 0:
            held.add(node)
        else:
            held.discard(node)
        if len(held) > ev.limits.fleet_cap:
            v.add("fleet cap exceeded", node, "", f"{len(held)} nodes held at {at:.3f}, cap {ev.limits.fleet_cap}: "
                                                  f"{sorted(held)}")
        worst = max(worst, len(held))
    v.counts["max_held"] = worst
    for action, (most, per) in ev.limits.rate.items():
        starts = sorted(s.started_at for s in ev.steps if s.action == action and s.outcome != "blocked")
        for i, t in enumerate(starts):
            n = bisect.bisect_right(starts, t + per - 1e-9) - i
            if n > most:
                v.add("rate limit exceeded", "", action, f"{n} {action} steps within {per:.0f}s from {t:.3f}, "
                                                         f"limit {most}")
                break


def _lost(ev: Evidence, v: Verdict, steps_of: Mapping[str, list[Step]]) -> None:
    ids = {r.id for r in ev.rems}
    for o in ev.occs:
        if o.decision in ("planned", "merged", "resumed") and o.remediation not in ids:
            v.add("accepted alert lost", o.node, o.alertname,
                  f"occurrence starting {o.starts_ts:.3f} was {o.decision} into {o.remediation}, which the journal "
                  f"does not hold")
    for r in ev.rems:
        # HELD waits for its alert to fire again (it resolved), by design; it ends by itself (resolved_hold).
        if r.state not in ACTIVE or r.state == "HELD" or any(w in r.reason for w in WAITING):
            continue
        # Stuck: nothing moved for `deadline`. A plan HELD for most of the run and resumed just before its end
        # (its alert fired again after the cold start) is young in its state, not stuck.
        last = max((s.finished_at or s.started_at for s in steps_of.get(r.id, [])), default=r.created_at)
        moved = max(last, r.since or r.created_at)
        if ev.end - moved < ev.deadline:
            continue
        v.add("remediation stuck", r.node, r.id,
              f"{r.state} ({r.reason}) since {moved:.3f} (created {r.created_at:.3f}), last step activity "
              f"{last:.3f}, end {ev.end:.3f}")


def _operands(ev: Evidence, v: Verdict) -> None:
    """No reset runs while an operand holds the GPU, and no node is left without its operands: a remediation still
    active is judged by the rules above instead (its step may be what holds them paused)."""
    for r in ev.resets:
        if r.unpaused:
            v.add("reset with operands running", r.node, "",
                  f"reset Job at {r.at:.3f} while {', '.join(r.unpaused)} still true")
    active = {r.node for r in ev.rems if r.state in ACTIVE}
    for node, labels in sorted(ev.operands.items()):
        if node not in active:
            v.add("operands left paused", node, "", f"at the end ({ev.end:.3f}): {dict(labels)}")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(-(-q * len(ordered) // 100)) - 1))
    return ordered[k]
