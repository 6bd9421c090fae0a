"""The alerting chain on real servers: simulated exporters -> Debian's Prometheus with rules/ -> Debian's
Alertmanager with the shipped route -> a receiver. No remediation here: what reaches the webhook, and what not."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from gpu_health_stack.procs import wait_until
from gpu_health_stack.receiver import RecordingReceiver
from gpu_health_stack.stack import Stack, missing_binaries

pytestmark = pytest.mark.skipif(bool(missing_binaries()), reason=f"needs {missing_binaries()} (.ci/run installs them)")

# Simulated H100 GPU 3 sits on PCI bus 5d, GPU 1 on 2a (exporter/backends/sim.py).
XID79_GPU3 = "NVRM: Xid (PCI:0000:5d:00): 79, pid=1101234, name=nvc:[driver], GPU has fallen off the bus."
XID13_GPU1 = ("NVRM: Xid (PCI:0000:2a:00): 13, pid='<unknown>', name=<unknown>, Graphics SM Warp Exception on "
              "(GPC 1, TPC 3, SM 0): Out Of Range Address")
XID45_GPU1 = "NVRM: Xid (PCI:0000:2a:00): 45, pid=12542, name=python3, Ch 00000008"


@pytest.fixture(scope="module")
def chain() -> Iterator[tuple[Stack, RecordingReceiver]]:
    receiver = RecordingReceiver()
    stack = Stack()
    try:
        for node in ("node-a", "node-b", "node-c"):
            stack.add_exporter(node)
        stack.start_alertmanager(webhook_url=receiver.url)
        stack.start_prometheus()
        yield stack, receiver
    finally:
        stack.close()
        receiver.close()


def test_fatal_xid_reaches_the_webhook_with_its_target(chain: tuple[Stack, RecordingReceiver],
                                                       report: Callable[[str], None]) -> None:
    stack, receiver = chain
    injected = time.time()
    stack.inject_xid("node-a", XID79_GPU3)

    def delivered() -> dict | None:
        return next((a for _, a in receiver.alerts("firing")
                     if a["labels"].get("node") == "node-a" and a["labels"].get("remediation") == "reboot"), None)

    alert = wait_until(delivered, 60, "XID 79 on node-a to reach the webhook")
    arrived = next(t for t, a in receiver.alerts("firing") if a is alert)
    report(f"alerting chain, XID 79: fault -> webhook {arrived - injected:.2f}s ({alert['labels']['alertname']})")
    labels = alert["labels"]
    assert labels["severity"] == "critical"
    assert labels.get("gpu") == "3"
    # No scrape-side label may reach the fingerprint.
    assert not {"instance", "job", "pod"} & set(labels)


def test_application_xid_storms_never_ask_for_remediation(chain: tuple[Stack, RecordingReceiver]) -> None:
    stack, receiver = chain
    for _ in range(200):
        stack.inject_xid("node-c", XID13_GPU1)
        stack.inject_xid("node-c", XID45_GPU1)
    # The storm is visible in Prometheus...
    wait_until(lambda: stack.query('sum(gpu_xid_errors_total{node="node-c",xid="45"})') == [200.0], 30,
               "node-c's Xid 45 count to reach Prometheus")
    # ...and several rule evaluations later nothing for node-c asks for an action.
    stack.wait_rule_evaluations(since=time.time(), rounds=3)
    acting = [a for a in stack.prometheus_alerts("firing") + stack.prometheus_alerts("pending")
              if a["labels"].get("node") == "node-c" and a["labels"].get("remediation", "none") != "none"]
    assert acting == []
    assert not [a for _, a in receiver.alerts() if a["labels"].get("node") == "node-c"
                and a["labels"].get("remediation", "none") != "none"]
