"""The GPU Operator's DaemonSets and the NVIDIA device plugin, played against kmock (which runs no controllers).

Faithful to what a GPU reset meets on a real node (docs/reset.md, sections 2 and 4):
- each operand's pod runs on a node while its `nvidia.com/gpu.deploy.<operand>` label is "true", and is deleted
  once it is anything else (the DaemonSet's node selector); a deleted pod is created again while the label allows;
- on a node not managed by the Operator (`managed=False`) the device plugin pod is an ordinary DaemonSet pod: a
  deleted one comes back;
- the device plugin marks a GPU unhealthy after an Xid and never marks it healthy again: allocatable
  nvidia.com/gpu stays short until its pod starts again, and a fresh plugin advertises every GPU that `healthy`
  says is healthy; while no device plugin pod runs, the node advertises no allocatable GPU.
Not modelled: pod start-up time beyond one controller interval, the kubelet's grace period, MIG devices.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from remediation_webhook.actions._operands import APPS, DEPLOY

from .kube import KubeFake

NAMESPACE = "gpu-operator"
DEVICE_PLUGIN = "device-plugin"
# What the Operator labels a GPU node with: each operand's deploy label "true", the driver's included.
OPERATOR_LABELS = {**{DEPLOY + o: "true" for o in APPS}, DEPLOY + "driver": "true"}


@dataclass
class _Node:
    gpus: int
    managed: bool
    unhealthy: set[int] = field(default_factory=set)
    plugin: str = ""  # the device plugin pod now running, "" if none
    starts: int = 0  # device plugin pods started on the node


class GpuOperatorFake:
    """A controller thread over `nodes`; `healthy(node, gpu)` answers whether a starting plugin sees a GPU healthy."""

    def __init__(self, kube: KubeFake, nodes: Iterable[str], *, gpus: int = 8, managed: bool = True,
                 interval: float = 0.1, healthy: Callable[[str, int], bool] | None = None) -> None:
        self.kube = kube
        self.nodes = {n: _Node(gpus, managed) for n in nodes}
        self.interval = interval
        self.healthy = healthy or (lambda _node, _gpu: True)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if managed:
            for n in self.nodes:
                kube.label_node(n, dict(OPERATOR_LABELS))
        self.sync()
        self._thread = threading.Thread(target=self._run, name="gpu-operator-fake", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def xid(self, node: str, gpu: int) -> None:
        """The device plugin saw a critical Xid on `gpu`: unhealthy until a plugin restart finds it healthy."""
        with self._lock:
            self.nodes[node].unhealthy.add(gpu)
        self._advertise(node)

    def starts(self, node: str) -> int:
        return self.nodes[node].starts

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sync()
            except RuntimeError:
                continue  # kmock is going away at the end of a test

    def sync(self) -> None:
        pods = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in self.kube.list_path("/api/v1/pods")}
        for name, state in self.nodes.items():
            labels = (self.kube.node(name).get("metadata") or {}).get("labels") or {}
            for operand, app in APPS.items():
                pod = f"{app}-{name}"
                wanted = labels.get(DEPLOY + operand) == "true" if state.managed else operand == DEVICE_PLUGIN
                present = (NAMESPACE, pod) in pods
                if wanted and not present:
                    self.kube.add_pod(NAMESPACE, pod, name, daemonset=True, labels={"app": app})
                    if operand == DEVICE_PLUGIN:
                        self._plugin_started(name, pod)
                elif present and not wanted:
                    self.kube.delete_pod(NAMESPACE, pod)
                    present = False
                if operand != DEVICE_PLUGIN:
                    continue
                if not present and not wanted and state.plugin:
                    state.plugin = ""  # unregistered: the kubelet advertises none of its GPUs
                    self._advertise(name)
                elif present and not state.plugin:
                    self._plugin_started(name, pod)

    def _plugin_started(self, node: str, pod: str) -> None:
        state = self.nodes[node]
        with self._lock:
            state.plugin = pod
            state.starts += 1
            state.unhealthy = {g for g in state.unhealthy if not self.healthy(node, g)}
        self._advertise(node)

    def _advertise(self, node: str) -> None:
        state = self.nodes[node]
        count = max(0, state.gpus - len(state.unhealthy)) if state.plugin else 0
        self.kube.set_allocatable_gpus(node, count)


def status(kube: KubeFake, node: str) -> dict[str, Any]:
    """The node's deploy labels and our pause marks (for assertions and the demo's timeline)."""
    meta = kube.node(node).get("metadata") or {}
    return {"labels": {k: v for k, v in (meta.get("labels") or {}).items() if k.startswith(DEPLOY)
                       or k.startswith("gpu-health.io/operands")},
            "annotations": {k: v for k, v in (meta.get("annotations") or {}).items() if "operands" in k}}
