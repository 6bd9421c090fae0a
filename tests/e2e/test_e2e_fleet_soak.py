"""The short fleet soak (issue 16): 50 simulated nodes, 1 s settings, three minutes of seeded chaos, every real
component in the loop (Debian's Prometheus with rules/, three Debian Alertmanager peers in a cluster, the webhook
live against kmock through an API front that fails), judged by the oracle. A fixed seed: random seeds are for
benchmarks/fleet_soak.py.

Beside it, the same soak with the webhook's already-remediated check switched off (a test-only environment
switch): the oracle must find what that check prevents. Both run at once, each on its own ports and folders, so
that the pair costs the time of one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from gpu_health_stack.chaos import faults
from gpu_health_stack.soak import Report, Soak, SoakConfig, run_in_process
from gpu_health_stack.stack import missing_binaries

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_binaries()), reason=f"needs {missing_binaries()} (.ci/run installs them)"),
]

SEED = 1


def _short_without_check() -> SoakConfig:
    """A smaller, quieter soak whose fixed faults are sure to come back as new alerts: the cold start."""
    c = SoakConfig.short(SEED, no_already_remediated_check=True)
    chaos = replace(c.chaos, storms=(), fatal_share=0.4, rollout_share=0.1, reboots=0, scrape_gaps=0, kube_api_outages=0,
                    racks_down=0, restarts=(), human_uncordons=0)
    return replace(c, nodes=10, seconds=75.0, chaos=chaos, settle=20.0)


@pytest.fixture(scope="module")
def reports() -> Iterator[dict[str, Report]]:
    out: dict[str, Report] = {}
    errors: list[BaseException] = []

    def run(name: str, go: Callable[[], Report]) -> None:
        try:
            out[name] = go()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    # The second soak in a process of its own: two in one interpreter would contend for its lock.
    threads = [threading.Thread(target=run, args=("short", lambda: Soak(SoakConfig.short(SEED), progress=print).run())),
               threading.Thread(target=run, args=("unchecked", lambda: run_in_process(_short_without_check())))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    yield out


def test_the_short_soak_has_no_violation(reports: dict[str, Report]) -> None:
    report = reports["short"]
    assert report.violations == [], "\n".join(report.violations)


def test_the_short_soak_injected_what_the_issue_names(reports: dict[str, Report]) -> None:
    report = reports["short"]
    kinds = {e.kind for e in report.events}
    assert kinds >= {"rack_power_loss", "driver_rollout", "nvswitch_fatal", "fatal_xid", "storm", "reboot",
                     "scrape_gap", "restart", "kube_api", "human_uncordon"}
    assert faults(report.events) >= 50 and len(report.injected) >= 30
    counts = report.verdict.counts
    # Both storms tripped the breaker, and the operator reset it each way.
    assert counts["breaker_trips"] >= 2
    # The cold start made fixed faults fire again as new alerts, and the journal refused them.
    assert counts["already_remediated"] >= 1, report.as_json()["counts"]
    assert report.fault_to_cordon(99) <= 5.0, report.verdict.fault_to_cordon
    assert len(report.verdict.fault_to_cordon) >= 2
    assert report.failover and report.rule_eval_ms


def test_without_the_already_remediated_check_the_oracle_fails(reports: dict[str, Report]) -> None:
    report = reports["unchecked"]
    rules = {v.rule for v in report.verdict.violations}
    assert "remediated more than once" in rules, "\n".join(report.violations) or report.as_json()["counts"]
