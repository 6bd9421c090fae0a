"""Alertmanager restarted in the middle of a remediation (its own stack: two nodes, the same servers and webhook).

Alertmanager keeps no alerts across a restart; Prometheus sends a firing alert again only after its
--rules.alert.resend-delay (1 minute by default). A rung that starts inside that window and verifies its alert
against Alertmanager finds it gone. The remediation must wait for Prometheus to send the alert again, not give up:
giving up leaves the node cordoned and drained, and the alert's re-delivery is a duplicate that never acts.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gpu_health_stack.scenarios import policy_config, remediations, wait_state, xid79
from gpu_health_stack.stack import missing_binaries

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_binaries()), reason=f"needs {missing_binaries()} (.ci/run installs them)"),
    pytest.mark.skipif(importlib.util.find_spec("moto") is None, reason="needs moto[server] (the test extras)"),
]


def _replace_needs_approval(stack: Any, kube: Any, aws: Any) -> dict[str, Any]:
    config = policy_config(stack, kube, aws)
    config["policy"]["rules"][0].pop("requires_approval")  # replace waits for approval, the action's default
    return config


@pytest.fixture(scope="module")
def fleet() -> Iterator[Any]:
    from gpu_health_stack.fleet import Fleet

    fleet = Fleet.start({"node-a": None, "node-b": None}, webhook_config=_replace_needs_approval, cloud="moto")
    try:
        yield fleet
    finally:
        fleet.close()


def test_a_rung_approved_right_after_an_alertmanager_restart_still_runs(fleet: Any) -> None:
    injected = time.time()
    fleet.stack.inject_xid("node-a", xid79(3))
    rem = wait_state(fleet.webhook, "node-a", ("AWAITING_APPROVAL",), 30, since=injected)
    assert fleet.kube.node("node-a")["spec"].get("unschedulable") is True
    fleet.stack.restart_alertmanager(crash=True)
    fleet.webhook.admin(f"/v1/remediations/{rem['id']}:approve", {"reason": "e2e: approved after the restart"})
    # Prometheus re-sends its firing alerts to the new Alertmanager within its resend delay (1 minute).
    done = wait_state(fleet.webhook, "node-a", ("SUCCEEDED", "CANCELLED", "FAILED", "NEEDS_HUMAN"), 120,
                      since=injected)
    assert done["state"] == "SUCCEEDED", f"{done['state']}: {done['reason']}"
    assert fleet.instances["node-a"] not in fleet.aws.instance_ids()
    assert len(remediations(fleet.webhook, "node-a")) == 1
