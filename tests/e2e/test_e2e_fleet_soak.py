"""The short fleet soak (issue 16): 50 simulated nodes, 1 s settings, three minutes of seeded chaos, every real
component in the loop (Debian's Prometheus with rules/, three Debian Alertmanager peers in a cluster, the webhook
live against kmock through an API front that fails), judged by the oracle. A fixed seed: random seeds are for
benchmarks/fleet_soak.py. tests/test_soak_oracle.py shows each of the oracle's rules finding its violation.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gpu_health_stack.chaos import faults
from gpu_health_stack.soak import Report, Soak, SoakConfig
from gpu_health_stack.stack import missing_binaries

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_binaries()), reason=f"needs {missing_binaries()} (.ci/run installs them)"),
]

SEED = 1


@pytest.fixture(scope="module")
def report() -> Iterator[Report]:
    yield Soak(SoakConfig.short(SEED), progress=print).run()


def test_the_short_soak_has_no_violation(report: Report) -> None:
    assert report.violations == [], "\n".join(report.violations)


def test_the_short_soak_injected_what_the_issue_names(report: Report) -> None:
    kinds = {e.kind for e in report.events}
    assert kinds >= {"rack_power_loss", "driver_rollout", "nvswitch_fatal", "fatal_xid", "storm", "reboot",
                     "scrape_gap", "restart", "kube_api", "human_uncordon"}
    assert faults(report.events) >= 50 and len(report.injected) >= 30
    # Both storms tripped the breaker, and the operator reset it each way.
    assert report.verdict.counts["breaker_trips"] >= 2
    assert report.fault_to_cordon(99) <= 5.0, report.verdict.fault_to_cordon
    assert len(report.verdict.fault_to_cordon) >= 2
    assert report.failover and report.rule_eval_ms
