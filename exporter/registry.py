"""The collector contract, node_exporter style: one module per collector, found by name, switched by flag.

A collector has two halves. `read(dev)` runs on the GPU's own worker thread and is the only place
NVML is called; it returns a plain reading or raises. `families(ctx)` turns the latest readings of
every GPU into metric families; it never touches NVML, so rendering cannot hang. Node-level
collectors have no `read` and render from `ctx` alone.
"""

from __future__ import annotations

import enum
import importlib
import pkgutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)

from .device import UNSUPPORTED
from .render import TextFamily, label_prefix


def node_family(kind: type[GaugeMetricFamily] | type[CounterMetricFamily], node: str, name: str, doc: str,
                value: float) -> Metric:
    """A family of one sample labelled with the node: the shape of every node-level gauge and counter."""
    fam = kind(name, doc, labels=["node"])
    fam.add_metric([node], value)
    return fam


class Tier(enum.Enum):
    """How often a collector's read() runs."""

    FAST = "fast"  # every --collect-interval
    SLOW = "slow"  # every --collect-interval.slow: costly calls, and values that rarely change
    NODE = "node"  # no per-GPU read; renders node-level state


@dataclass(frozen=True, slots=True)
class CollectorOptions:
    """What a collector may need at construction; GPU collectors need none of it."""

    node: str = ""
    state_dir: Any = None  # pathlib.Path | None
    nvml: Any = None
    # Latest PCI bus id -> GpuKey map, refreshed on the slow tier; a call, never an NVML query.
    pci_map: Callable[[], Mapping[str, GpuKey]] = dict
    settings: Mapping[str, Any] = field(default_factory=dict)
    state_errors: Any = None  # exporter.state.WriteErrors: a collector that writes --state-dir counts failures
    boot_id: str | None = None  # this boot's id, read once for everything kept per boot (None: read it yourself)


@runtime_checkable
class Collector(Protocol):
    """What every collector has. The poller also calls these where a collector has them (event-driven ones):
    `bind_republish(fn)`, `start()` once the GPUs are enumerated, `release_nvml(timeout) -> bool` and
    `resume_nvml()` around a GPU reset (every NVML user of the process must let go), and `close()`."""

    name: ClassVar[str]
    description: ClassVar[str]
    tier: ClassVar[Tier]
    default_enabled: ClassVar[bool]

    def families(self, ctx: RenderContext) -> Iterable[Metric | TextFamily]: ...


def create(cls: type[Collector], options: CollectorOptions) -> Collector:
    """Collectors that need options take them as their only argument; the rest take none."""
    factory = getattr(cls, "from_options", None)
    return factory(options) if factory else cls()


@dataclass(frozen=True, slots=True)
class GpuKey:
    """The labels every per-GPU series carries besides `node`."""

    index: int
    uuid: str


@dataclass(frozen=True, slots=True)
class FleetView:
    """Node-level facts the poller knows, for node-level collectors."""

    nvml_up: bool
    visible: int
    expected: int | None  # None: unknown (no --expected-gpus, no GPU seen this boot)
    driver_version: str


@dataclass(slots=True)
class RenderContext:
    """What families() gets: this collector's readings per GPU, and helpers that add the common labels."""

    node: str
    readings: list[tuple[GpuKey, Any]]
    fleet: FleetView
    extra: Mapping[str, Any] = field(default_factory=dict)

    _prefixes: dict[GpuKey, str] = field(default_factory=dict)

    def gauge(self, name: str, doc: str, labels: Iterable[str] = ()) -> TextFamily:
        return TextFamily(name, doc, "gauge", ["node", "gpu", "uuid", *labels])

    def counter(self, name: str, doc: str, labels: Iterable[str] = ()) -> TextFamily:
        return TextFamily(name, doc, "counter", ["node", "gpu", "uuid", *labels])

    def info(self, name: str, doc: str, labels: Iterable[str]) -> InfoMetricFamily:
        return InfoMetricFamily(name, doc, labels=["node", "gpu", "uuid", *labels])

    def add(self, family: TextFamily, gpu: GpuKey, value: Any, *labels: str) -> None:
        """Add one sample; UNSUPPORTED and None are skipped, so a missing signal is absent, not zero."""
        if value is UNSUPPORTED or value is None:
            return
        prefix = self._prefixes.get(gpu)
        if prefix is None:
            prefix = self._prefixes[gpu] = label_prefix(("node", "gpu", "uuid"), (self.node, str(gpu.index), gpu.uuid))
        family.add_line(prefix, labels, value)


def discover() -> dict[str, type[Collector]]:
    """Every collector class in exporter.collectors, by name; adding a collector is adding a file."""
    from . import collectors

    found: dict[str, type[Collector]] = {}
    for mod in pkgutil.iter_modules(collectors.__path__):
        module = importlib.import_module(f"{collectors.__name__}.{mod.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and obj.__module__ == module.__name__ and hasattr(obj, "tier"):
                if obj.name in found:
                    raise RuntimeError(f"two collectors named {obj.name}")
                found[obj.name] = obj
    return dict(sorted(found.items()))
