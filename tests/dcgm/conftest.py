"""Fixtures for the DCGM backend tests: the fake bindings, and a node polled through DCGM or NVML.

Test modules get the helpers below through the `h` fixture, never by importing conftest (tests/exporter
has a conftest too; which one `import conftest` finds depends on the order pytest loaded them).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.backends.dcgm import DcgmConnection, DcgmNvml, load_bindings
from exporter.backends.sim import SimulatedNvml, sim_config_from_dict
from exporter.poller import Poller, PollerConfig
from exporter.registry import Collector, CollectorOptions, Tier, create, discover
from exporter.state import ExpectedGpus

ROOT = Path(__file__).resolve().parents[2]
FAKE = ROOT / "tests" / "fakes" / "dcgm_bindings"
NODE = "node-a"
WALL = 1_800_000_000.0
SIM_START = 1000.0
SETTINGS = {"dcgm_bindings_path": str(FAKE)}
# Durations are real measurements; everything else is a function of the seed and the clocks.
VOLATILE = re.compile(r"^((?:gpu_exporter_collector_duration_seconds|gpu_collection_duration_seconds)\{[^}]*\}) .*$",
                      re.M)


class Clock:
    """A clock tests move by hand."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def gpu_collectors() -> list[str]:
    """The default-enabled per-GPU collectors: the ones both backends serve."""
    return [n for n, c in discover().items() if c.default_enabled and c.tier in (Tier.FAST, Tier.SLOW)]


def families(text: str) -> set[str]:
    return {fam.name for fam in text_string_to_metric_families(text)}


def samples(text: str, name: str, **labels: str) -> list[Any]:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def value(text: str, name: str, **labels: str) -> float:
    found = samples(text, name, **labels)
    assert len(found) == 1, f"expected one {name}{labels}, found {found}"
    return found[0].value


@dataclass
class Node:
    poller: Poller
    clock: Clock  # monotonic clock of the backend (snapshot age, backoff) and the simulator's timeline
    wall: Clock
    nvml: Any
    conn: DcgmConnection | None
    collectors: dict[str, Collector] = field(default_factory=dict)

    def cycle(self, advance: float = 0.0) -> str:
        self.clock.advance(advance)
        self.wall.advance(advance)
        return VOLATILE.sub(r"\1 0.0", self.poller.run_cycle().body.decode())


@pytest.fixture
def engine() -> Iterator[Any]:
    """The fake host engine, reset; the fake bindings are on sys.path from here on."""
    load_bindings(str(FAKE))
    import dcgm_fake_engine

    dcgm_fake_engine.ENGINE.reset()
    yield dcgm_fake_engine.ENGINE
    dcgm_fake_engine.ENGINE.unstall()
    dcgm_fake_engine.ENGINE.restore()
    dcgm_fake_engine.ENGINE.library_missing = False


@pytest.fixture
def make_node(engine: Any) -> Iterator[Callable[..., Node]]:
    """Build a node polled through DCGM (backend="dcgm", on the fake) or NVML (backend="sim")."""
    made: list[Node] = []
    available = discover()

    def build(
        sim: dict[str, Any] | None = None,
        *,
        backend: str = "dcgm",
        collectors: Sequence[str] | None = None,
        extra: Sequence[str] = ("dcgm", "dcgm_health"),
        scenario: dict[str, Any] | None = None,
        timeout: float = 0.5,
        interval: float = 5.0,
        deadline: float = 2.0,
        settings: dict[str, Any] | None = None,
        real_clock_for_deadlines: bool = False,
        address: str = "",
    ) -> Node:
        clock, wall = Clock(SIM_START), Clock(WALL)
        engine.reset({**(scenario or {}), "sim": sim or {}}, clock=clock, wall=wall)
        conn: DcgmConnection | None = None
        if backend == "dcgm":
            conn = DcgmConnection(load_bindings(str(FAKE)), address=address, timeout=timeout, wall=wall,
                                  clock=time.monotonic if real_clock_for_deadlines else clock)
            nvml: Any = DcgmNvml(conn, update_interval=interval, clock=clock)
        else:
            nvml = SimulatedNvml(sim_config_from_dict(sim or {}), clock=clock)
        names = [*(gpu_collectors() if collectors is None else collectors), *(extra if backend == "dcgm" else ())]
        options = CollectorOptions(node=NODE, nvml=nvml, settings={**SETTINGS, **(settings or {})})
        built = {n: create(available[n], options) for n in names}
        poller = Poller(
            nvml, list(built.values()),
            PollerConfig(node=NODE, interval=interval, slow_interval=0.0, deadline=deadline, version="golden"),
            ExpectedGpus(None, None, "boot-1"), wall=wall,
        )
        node = Node(poller, clock, wall, nvml, conn, built)
        made.append(node)
        return node

    yield build
    engine.unstall()
    for node in made:
        node.poller.stop()
        if node.conn is not None:
            node.conn.close()


@pytest.fixture(scope="session")
def h() -> SimpleNamespace:
    """The helpers and constants above, for test modules."""
    return SimpleNamespace(ROOT=ROOT, FAKE=FAKE, NODE=NODE, WALL=WALL, Clock=Clock, families=families,
                           samples=samples, value=value)
