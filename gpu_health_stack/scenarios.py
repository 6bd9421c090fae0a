"""What the end-to-end tests, the latency benchmark and the demo share: kernel-log lines, the webhook policy of
this configuration ("replace, don't repair"), and waiting on the webhook's journal with deadlines."""

from __future__ import annotations

import time
from typing import Any

from .kube import KubeFake
from .procs import wait_until
from .stack import Stack
from .webhook import Webhook

# Simulated H100 GPU i sits on PCI bus 18, 2a, 3a, 5d, 9a, ab, ba, db (exporter/backends/sim.py).
BUS = ("18", "2a", "3a", "5d", "9a", "ab", "ba", "db")
EXECUTOR_NAMESPACE = "gpu-health"


def xid79(gpu: int) -> str:
    return f"NVRM: Xid (PCI:0000:{BUS[gpu]}:00): 79, pid=1101234, name=nvc:[driver], GPU has fallen off the bus."


def xid13(gpu: int) -> str:
    return (f"NVRM: Xid (PCI:0000:{BUS[gpu]}:00): 13, pid='<unknown>', name=<unknown>, Graphics SM Warp Exception "
            f"on (GPC 1, TPC 3, SM 0): Out Of Range Address")


def xid48(gpu: int) -> str:
    """A double-bit ECC error: the XID policy resets the GPU (GPUXidResetRequired)."""
    return (f"NVRM: Xid (PCI:0000:{BUS[gpu]}:00): 48, pid=2201, name=python3, An uncorrectable double bit error "
            f"(DBE) has been detected on GPU in the framebuffer at partition 0, subpartition 0.")


def xid45(gpu: int) -> str:
    return f"NVRM: Xid (PCI:0000:{BUS[gpu]}:00): 45, pid=12542, name=python3, Ch 00000008"


SXID_NONFATAL = "nvidia-nvswitch3: SXid (PCI:0000:04:00.0): 22013, Non-fatal, Link 44 Minion Link DLREQ interrupt"
SXID_FATAL = "nvidia-nvswitch3: SXid (PCI:0000:04:00.0): 24007, Fatal, Link 28 sourcetrack timeout error (First)"


def policy_config(stack: Stack, kube: KubeFake, aws: Any) -> dict[str, Any]:
    """The webhook's policy in this configuration: live against Kubernetes; a node whose alert asks for a reboot
    is replaced instead ("replace, don't repair"), after cordon and drain; a GPU that needs a reset gets a reset
    Job after cordon and drain. replace needs approval unless a rule grants it: this one does."""
    rules: list[dict[str, Any]] = [
        {"name": "replace-dont-repair", "match_re": {"alertname": "GPU.+"}, "match": {"severity": "critical"},
         "ladder": ["cordon", "drain", "replace"], "remediation_map": {"reboot": "replace"},
         "requires_approval": []},  # approval granted: replace waits for no one in this configuration
        {"name": "gpu-reset", "match_re": {"alertname": "GPU.+"}, "ladder": ["cordon", "drain", "reset_gpu"]},
    ]
    aws_provider: dict[str, Any] = {"region": "us-east-1", "poll_interval": "200ms", "replacement_timeout": "60s",
                                    "retry_base": "100ms", "retry_cap": "1s", "call_timeout": "10s"}
    if aws is not None:
        aws_provider.update({"endpoint_url": aws.url, "access_key_id": "testing", "secret_access_key": "testing",
                             "allowed_groups": [aws.asg_name]})
    return {
        "policy": {"dry_run": False, "max_alert_age": "1h",
                   "targets": {"node_selector": {"nvidia.com/gpu.present": "true"}}, "rules": rules},
        "safety": {
            "fleet_cap": {"max_nodes": 4, "max_percent": 100},
            "rate_limits": {"cordon": {"max": 10, "per": "1h"}, "drain": {"max": 10, "per": "1h"},
                            "reset_gpu": {"max": 5, "per": "1h"}, "replace": {"max": 2, "per": "1h"}},
            "per_node": {"cooldown": "1h", "max_attempts": 3, "attempts_window": "24h"},
            # More than 2 of the 4 nodes (50 %) asking for remediation within 15 minutes trips the breaker.
            "breaker": {"window": "15m", "max_nodes": 10, "max_percent": 50, "min_nodes": 2,
                        "trip_on_truncated": True, "trip_on_alerts": ["GPURemediationStorm"]},
        },
        "executor": {"namespace": EXECUTOR_NAMESPACE, "image": "nvcr.io/nvidia/cuda:12.4.1-base-ubuntu22.04",
                     "poll_interval": "200ms", "job_timeout": "60s"},
        "providers": {"aws": aws_provider},
        "actions": {"replace": {"using": "aws"}, "reset_gpu": {"verify_timeout": "30s", "verify_interval": "200ms"}},
    }


# ---- the webhook's journal, through its admin API


def remediations(webhook: Webhook, node: str, *, live_only: bool = True) -> list[dict[str, Any]]:
    """The node's remediations, oldest first; without the ones refused outright (a re-sent twin alert in the
    node's cooldown is journaled as REFUSED and never acts) when live_only."""
    rems = sorted(webhook.remediations(node=node), key=lambda r: r["created_at"])
    return [r for r in rems if not live_only or r["state"] != "REFUSED"]


def occurrences(webhook: Webhook, node: str) -> set[tuple[str, str]]:
    """(fingerprint, startsAt) of every alert occurrence of the node the webhook journaled with a remediation
    (planned, merged into one, or refused by the node's cooldown)."""
    return {(o["fingerprint"], o["startsAt"]) for r in webhook.remediations(node=node)
            for o in webhook.remediation(r["id"])["occurrences"]}


def wait_step(webhook: Webhook, node: str, action: str, timeout: float, *, since: float = 0.0,
              outcome: str = "success") -> dict[str, Any]:
    """The first finished `action` step of the node's remediations created after `since`; its journal times
    (started_at, finished_at) are the webhook's clock, the same host clock as the caller's."""

    def find() -> dict[str, Any] | None:
        for rem in remediations(webhook, node):
            if rem["created_at"] < since:
                continue
            for step in webhook.remediation(rem["id"])["steps"]:
                if step["action"] == action and step.get("finished_at"):
                    if step["outcome"] != outcome:
                        raise AssertionError(f"{action} on {node} ended {step['outcome']}: {step['detail']}")
                    return {**step, "remediation": rem}
        return None

    return wait_until(find, timeout, f"{action} of {node} to finish", interval=0.05)


def wait_state(webhook: Webhook, node: str, states: tuple[str, ...], timeout: float,
               since: float = 0.0) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        return next((r for r in remediations(webhook, node) if r["created_at"] >= since and r["state"] in states),
                    None)

    return wait_until(find, timeout, f"a remediation of {node} in {'/'.join(states)}", interval=0.05)


def now() -> float:
    return time.time()
