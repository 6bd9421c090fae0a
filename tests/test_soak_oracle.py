"""gpu_health_stack/oracle.py on hand-made evidence: each rule it enforces finds its violation, and a clean run has
none. The soak itself (tests/e2e/test_e2e_fleet_soak.py) shows it on real components."""

from __future__ import annotations

from dataclasses import replace

from gpu_health_stack.oracle import (
    BreakerSpan,
    Call,
    Evidence,
    Fault,
    Limits,
    Occ,
    PersonUncordon,
    Rem,
    ResetRun,
    Step,
    judge,
    percentile,
)
from gpu_health_stack.soak import _call

T = 1_000_000.0


def cordon(at: float, node: str) -> Call:
    return Call(at, "PATCH", f"/api/v1/nodes/{node}", 200, "cordon", node)


def fixed(node: str, at: float, rid: str = "r1", action: str = "reset_gpu") -> tuple[Rem, list[Step]]:
    """A remediation created at `at` that cordoned, drained and ran `action` successfully."""
    rem = Rem(rid, node, "SUCCEEDED", "all steps done", at, at + 10)
    steps = [Step(rid, node, a, at + i, at + i + 1, "success") for i, a in enumerate(("cordon", "drain", action))]
    return rem, steps


def evidence(**changes: object) -> Evidence:
    """One reset-class fault on n1, remediated once; an application Xid on n2, left alone."""
    rem, steps = fixed("n1", T + 2)
    base = Evidence(
        faults=[Fault(T, "n1", "fatal_xid", 48, "reset_gpu"), Fault(T, "n2", "driver_rollout", 13, "")],
        calls=[cordon(T + 2.5, "n1")], steps=steps, rems=[rem],
        occs=[Occ("n1", "GPUXidResetRequired", T + 1, T, T + 1.5, "planned", "rule", "r1")],
        breaker=[], uncordons=[], limits=Limits(2, {"cordon": (2, 3600.0)}), end=T + 600, deadline=60,
        storm_slack=30)
    return replace(base, **changes)


def rules(ev: Evidence) -> list[str]:
    return [v.rule for v in judge(ev).violations]


def test_a_clean_run_has_no_violation_and_its_latency() -> None:
    verdict = judge(evidence())
    assert verdict.violations == []
    assert list(verdict.fault_to_cordon.values()) == [2.5]


def test_a_fault_behind_a_scrape_gap_is_late_not_timed() -> None:
    verdict = judge(evidence(gaps={"n1": [(T - 5, T + 2)]}))
    assert verdict.violations == [] and verdict.fault_to_cordon == {}
    assert verdict.delayed == ["n1 fatal_xid xid 48 at 1000000.000: its node could not be scraped (a scrape gap)"]


def test_a_fault_behind_an_outage_is_late_not_timed() -> None:
    verdict = judge(evidence(outages=[(T + 1, T + 2, "prometheus restart")]))
    assert verdict.violations == [] and verdict.fault_to_cordon == {}
    assert verdict.delayed == ["n1 fatal_xid xid 48 at 1000000.000: held back by an outage (prometheus restart)"]


def test_a_second_remediation_of_a_fixed_fault_is_a_violation() -> None:
    again, steps = fixed("n1", T + 100, "r2")
    ev = evidence()
    assert rules(replace(ev, rems=[*ev.rems, again], steps=[*ev.steps, *steps],
                         calls=[*ev.calls, cordon(T + 100.5, "n1")])) == ["cordoned more than once",
                                                                          "remediated more than once"]


def test_cordoning_again_after_a_person_uncordoned_is_named_so() -> None:
    ev = evidence(uncordons=[PersonUncordon(T + 50, "n1")])
    out = judge(replace(ev, calls=[*ev.calls, cordon(T + 60, "n1")]))
    assert [v.rule for v in out.violations] == ["cordoned again after a person uncordoned"]
    assert out.violations[0].node == "n1" and "xid 48" in out.violations[0].fault


def test_an_action_on_a_node_with_only_an_application_xid_is_a_violation() -> None:
    ev = evidence()
    assert rules(replace(ev, calls=[*ev.calls, cordon(T + 5, "n2")])) == ["acted without a fatal fault"]


def test_a_fault_left_alone_or_fixed_at_a_lower_rung_is_a_violation() -> None:
    assert rules(evidence(rems=[], steps=[], calls=[], occs=[])) == ["fatal fault not remediated"]
    # ... unless the node rebooted (power loss) before any alert: the reboot fixed it.
    assert rules(evidence(rems=[], steps=[], calls=[], occs=[], boots={"n1": [T + 1]})) == []
    rem, steps = fixed("n1", T + 2, action="drain")
    assert rules(evidence(rems=[rem], steps=steps[:2])) == ["not remediated at its rung"]
    # Waiting on the fleet cap is late, not wrong.
    waiting = Rem("r1", "n1", "BLOCKED", "fleet cap reached (2 of 2 nodes held by us)", T + 2, None)
    out = judge(evidence(rems=[waiting], steps=[], calls=[], occs=[]))
    assert out.violations == [] and out.delayed


def test_the_breaker_must_trip_for_a_storm_and_hold_everything_while_open() -> None:
    storm = [Fault(T + i, f"s{i}", "storm", 79, "reboot", 0, "resume") for i in range(5)]
    ev = evidence(faults=[*evidence().faults, *storm])
    assert "storm did not trip the breaker" in rules(ev)
    span = BreakerSpan(T + 10, T + 100, "resume", "5 nodes alerting")
    late, steps = fixed("s4", T + 50, "r9", "reboot")
    out = rules(replace(ev, breaker=[span], rems=[*ev.rems, late], steps=[*ev.steps, *steps]))
    assert out.count("acted while the breaker was open") == 3


def test_a_skipped_storm_is_not_acted_on_after_the_reset() -> None:
    storm = [Fault(T + 200, "s0", "storm", 79, "reboot", 0, "skip-backlog")]
    span = BreakerSpan(T + 201, T + 220, "skip-backlog", "storm")
    rem, steps = fixed("s0", T + 225, "r5", "reboot")
    ev = evidence(faults=[*evidence().faults, *storm], breaker=[span])
    occ = Occ("s0", "GPUXidRebootRequired", T + 201, T + 200, T + 201, "planned", "", "r5")
    assert rules(replace(ev, rems=[*ev.rems, rem], steps=[*ev.steps, *steps], occs=[*ev.occs, occ])) == [
        "acted on a skipped storm"]
    # Firing again later (a new startsAt after a restart) does not make the same fault a new one.
    occ = replace(occ, starts_ts=T + 221)
    assert rules(replace(ev, rems=[*ev.rems, rem], steps=[*ev.steps, *steps], occs=[*ev.occs, occ])) == [
        "acted on a skipped storm"]
    # Acted on before the breaker tripped (the first nodes of the storm): fine.
    early, steps = fixed("s0", T + 200.5, "r6", "reboot")
    assert rules(replace(ev, rems=[*ev.rems, early], steps=[*ev.steps, *steps[:1]])) == []


def test_caps_rate_limits_and_lost_work() -> None:
    ev = evidence()
    three = [cordon(T + 3 + i, n) for i, n in enumerate(("n1", "x1", "x2"))]
    faults = [*ev.faults, Fault(T, "x1", "fatal_xid", 79, "reboot"), Fault(T, "x2", "fatal_xid", 79, "reboot")]
    out = rules(replace(ev, calls=three, faults=faults, rems=[], steps=[]))
    assert "fleet cap exceeded" in out
    fast = [Step(f"r{i}", "n1", "cordon", T + i, T + i, "success") for i in range(3)]
    assert "rate limit exceeded" in rules(replace(ev, steps=[*ev.steps, *fast]))
    lost = Occ("n1", "GPUXidResetRequired", T + 1, T, T + 1.5, "merged", "", "gone")
    assert "accepted alert lost" in rules(replace(ev, occs=[*ev.occs, lost]))
    stuck = Rem("r3", "n1", "RUNNING", "", T + 5, None)
    assert "remediation stuck" in rules(replace(ev, rems=[*ev.rems, stuck]))
    # Held for most of the run and resumed just before its end (seen at 1,000 nodes after the cold start): young
    # in its state, not stuck; the same plan unmoved since it was created is.
    resumed = Rem("r3", "n1", "PLANNED", "", T + 5, None, since=ev.end - 1)
    assert "remediation stuck" not in rules(replace(ev, rems=[*ev.rems, resumed]))
    assert "remediation stuck" in rules(replace(ev, rems=[*ev.rems, replace(resumed, since=T + 5)]))


def test_a_reset_with_operands_running_or_operands_left_paused_is_a_violation() -> None:
    # The chaos's holder made the reset refuse: no violation (the ladder fell back); the webhook's missed pause is.
    ok = [ResetRun(T + 4, "n1", (), "nsys")]
    assert rules(evidence(resets=ok)) == []
    missed = [ResetRun(T + 4, "n1", ("nvidia.com/gpu.deploy.device-plugin",))]
    assert rules(evidence(resets=missed)) == ["reset with operands running"]
    left = {"n1": {"nvidia.com/gpu.deploy.device-plugin": "false", "gpu-health.io/operands-paused": "r1"}}
    assert rules(evidence(operands=left)) == ["operands left paused"]
    # A remediation still active on the node is judged by the other rules (its step may hold them paused).
    ev = evidence(operands=left)
    active = [replace(r, state="RUNNING", finished_at=None) for r in ev.rems]
    assert "operands left paused" not in rules(replace(ev, rems=active))


def test_the_api_front_log_is_read_as_actions() -> None:
    assert _call((T, "PATCH", "/api/v1/nodes/n1", 200, b'{"spec": {"unschedulable": true}}')).action == "cordon"
    assert _call((T, "PATCH", "/api/v1/nodes/n1", 200, b'{"spec": {"unschedulable": false}}')).action == "uncordon"
    evict = _call((T, "POST", "/api/v1/namespaces/ml/pods/train-n7/eviction", 201, b"{}"))
    assert (evict.action, evict.node) == ("evict", "n7")
    job = _call((T, "POST", "/apis/batch/v1/namespaces/gpu-health/jobs", 201,
                 b'{"metadata": {"labels": {"gpu-health.io/action": "reboot"}, '
                 b'"annotations": {"gpu-health.io/node": "n3"}}}'))
    assert (job.action, job.node) == ("job:reboot", "n3")
    assert _call((T, "POST", "/api/v1/namespaces/default/events", 201, b"{}")).action == ""
    assert percentile([1, 2, 3, 4], 50) == 2 and percentile([1, 2, 3, 4], 99) == 4 and percentile([], 99) == 0
