"""The stack's Kubernetes API (gpu_health_stack.kube.KubeFake): kmock, with a bounded request log for soaks."""

from __future__ import annotations

import pytest

from gpu_health_stack.kube import KubeFake


def test_a_bounded_request_log_serves_every_request_and_keeps_only_the_last() -> None:
    # kmock matches each request against every request it kept: a soak of 1,000 nodes keeps only the last few.
    kube = KubeFake(keep_requests=8)
    try:
        for i in range(40):
            kube.add_node(f"n{i:02d}", provider_id=f"aws:///us-east-1a/i-{i:012x}")
            kube.add_pod("default", f"train-{i:02d}", f"n{i:02d}")
        assert len(kube.nodes()) == 40 and kube.pods("n39") == ["default/train-39"]
        assert len(list(kube.km)) <= 8
        with pytest.raises(RuntimeError, match="keep_requests"):
            kube.calls()
    finally:
        kube.close()


def test_by_default_every_request_is_kept_for_calls() -> None:
    kube = KubeFake()
    try:
        for i in range(20):
            kube.add_node(f"n{i:02d}", provider_id=f"aws:///us-east-1a/i-{i:012x}")
        assert len(list(kube.km)) >= 20
        assert kube.calls() == []  # setup requests are ours, not the webhook's
    finally:
        kube.close()
