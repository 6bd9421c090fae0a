"""A whole simulated fleet: Kubernetes nodes (kmock) backed by instances of an auto scaling group (moto) or by
made-up instance ids (cloud in dry-run), one simulated-GPU exporter per node, the webhook live against kmock,
Alertmanager with the shipped route delivering to it, and Prometheus scraping exporters and webhook with rules/.

    fleet = Fleet.start({"node-a": None, "node-b": {"gpus": 8, "faults": [...]}}, webhook_config=...)
    ...
    fleet.close()
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .kube import KubeFake
from .stack import Stack, Timings
from .webhook import Webhook

GPU_LABELS = {"nvidia.com/gpu.present": "true", "node.kubernetes.io/instance-type": "p5.48xlarge"}
NAMESPACE = "ml"


def base_webhook_config(stack: Stack, kube: KubeFake) -> dict[str, Any]:
    """Everything but the policy: the stack's Alertmanager and Kubernetes API, fast engine ticks."""
    return {
        "alertmanager": {"url": stack.am_url},
        "inventory": {"kind": "kubernetes"},
        "kubernetes": {"host": kube.url, "request_timeout": "5s", "event_namespace": "default"},
        "engine": {"tick": "250ms", "pool_refresh": "5s"},
        "actions": {"drain": {"timeout": "60s", "poll_interval": "200ms", "retry_interval": "200ms",
                              "max_retry_interval": "1s"}},
    }


def merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of mappings; lists and scalars of `extra` replace those of `base`."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


@dataclass
class Fleet:
    stack: Stack
    kube: KubeFake
    webhook: Webhook
    aws: Any = None  # AwsFake when the cloud is moto
    instances: dict[str, str] = field(default_factory=dict)  # node -> instance id

    @classmethod
    def start(cls, nodes: Mapping[str, dict[str, Any] | None], *,
              webhook_config: Callable[[Stack, KubeFake, Any], dict[str, Any]], cloud: str = "moto",
              timings: Timings | None = None, keep_dir: bool = False,
              exporter_args: Mapping[str, Sequence[str]] | None = None,
              drivers: Sequence[str] = ()) -> Fleet:
        """`webhook_config(stack, kube, aws)` returns the webhook's config (merged over base_webhook_config);
        `cloud` is "moto" (an auto scaling group in moto server mode) or "none" (made-up instance ids);
        `exporter_args` adds flags to some nodes' exporters (e.g. --collector.nvlink.per-link); the nodes in
        `drivers` get a simulated driver and nvidia-smi (Stack.add_exporter(driver=True))."""
        stack = Stack(timings=timings, keep_dir=keep_dir)
        try:
            kube = KubeFake()
            stack.closers.append(kube)
            aws = None
            if cloud == "moto":
                from .aws import AwsFake

                aws = AwsFake(size=len(nodes))
                stack.closers.append(aws)
                ids = list(aws.initial)
                provider_ids = [aws.provider_id(i) for i in ids]
            else:
                ids = [f"i-{secrets.token_hex(8)}" for _ in nodes]
                provider_ids = [f"aws:///us-east-1a/{i}" for i in ids]
            for (node, _), instance, pid in zip(nodes.items(), ids, provider_ids, strict=True):
                kube.add_node(node, provider_id=pid, labels=GPU_LABELS)
                kube.add_pod(NAMESPACE, f"train-{node}", node)
                kube.add_pod(NAMESPACE, f"infer-{node}", node)
                kube.add_pod("gpu-health", f"gpu-health-exporter-{node}", node, daemonset=True)
            for node, sim in nodes.items():
                stack.add_exporter(node, sim, extra_args=(exporter_args or {}).get(node, ()), driver=node in drivers)
            config = merge(base_webhook_config(stack, kube), webhook_config(stack, kube, aws))
            webhook = Webhook(stack.dir / "webhook", config, env=aws.env() if aws else None)
            stack.closers.append(webhook)
            stack.start_alertmanager(webhook_url=webhook.alerts_url, token_file=webhook.am_token_file)
            stack.start_prometheus([webhook.scrape_config()])
        except BaseException:
            stack.close()
            raise
        return cls(stack, kube, webhook, aws, dict(zip(nodes, ids, strict=True)))

    def close(self) -> None:
        self.stack.close()
