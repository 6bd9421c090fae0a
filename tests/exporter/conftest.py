"""Shared helpers for the exporter tests: a simulated node under a controlled clock, and exposition parsing."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from exporter.backends.sim import SimHandle, SimulatedNvml, sim_config_from_dict
from exporter.poller import Poller, PollerConfig
from exporter.registry import Collector, CollectorOptions, Tier, create, discover
from exporter.state import ExpectedGpus

ROOT = Path(__file__).resolve().parents[2]
NODE = "test-node"

# The exporter's own series, present whatever collectors are enabled.
CORE_FAMILIES = frozenset({
    "gpu_exporter_collector_success",
    "gpu_exporter_collector_duration_seconds",
    "gpu_nvml_up",
    "gpu_devices_visible",
    "gpu_devices_expected",
    "gpu_exporter_build_info",
    "gpu_exporter_last_collection_timestamp_seconds",
    "gpu_exporter_state_write_errors_total",
    "gpu_exporter_nvml_released",
    "gpu_lost",
    "gpu_collection_last_success_timestamp_seconds",
    "gpu_collection_duration_seconds",
    "gpu_collection_stale",
    "gpu_nvml_stuck_calls_total",
    "gpu_nvml_errors_total",
    "gpu_nvml_unsupported",
})


# --- exposition parsing ------------------------------------------------------------------------


def parse_samples(text: str | bytes) -> list[Sample]:
    if isinstance(text, bytes):
        text = text.decode()
    return list(_parse(text))


@functools.lru_cache(maxsize=16)
def _parse(text: str) -> tuple[Sample, ...]:
    # The parser is slow (about 40 ms for 8 full GPUs) and tests look at one text many times.
    return tuple(s for fam in text_string_to_metric_families(text) for s in fam.samples)


def sample_names(text: str | bytes) -> set[str]:
    return {s.name for s in parse_samples(text)}


def select(text: str | bytes, name: str, **labels: str) -> list[Sample]:
    """Samples called `name` whose labels include `labels`."""
    return [
        s for s in parse_samples(text) if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def value(text: str | bytes, name: str, **labels: str) -> float:
    """The value of the one sample called `name` matching `labels`; fails if there is not exactly one."""
    found = select(text, name, **labels)
    assert len(found) == 1, f"expected one {name}{labels}, found {len(found)}: {found}"
    return found[0].value


def per_gpu(text: str | bytes, name: str, **labels: str) -> dict[str, float]:
    """gpu label -> value for one series per GPU."""
    out: dict[str, float] = {}
    for s in select(text, name, **labels):
        assert s.labels["gpu"] not in out, f"two {name}{labels} samples for gpu {s.labels['gpu']}"
        out[s.labels["gpu"]] = s.value
    return out


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --- an in-process simulated node --------------------------------------------------------------


class Clock:
    """A clock tests move by hand; used for both the simulator's timeline and the poller's wall time."""

    def __init__(self, start: float) -> None:
        self.now = [start]

    def __call__(self) -> float:
        return self.now[0]

    def advance(self, seconds: float) -> None:
        self.now[0] += seconds


@dataclass
class Node:
    sim: SimulatedNvml
    poller: Poller
    clock: Clock  # the simulator's timeline; t=0 at construction
    wall: Clock  # what the poller stamps last-success and snapshot times with
    collectors: dict[str, Collector] = field(default_factory=dict)

    def cycle(self, advance: float = 0.0) -> str:
        """Move both clocks by `advance` seconds, run one collection cycle, return the exposition text."""
        self.clock.advance(advance)
        self.wall.advance(advance)
        return self.poller.run_cycle().body.decode()

    def handle(self, index: int) -> SimHandle:
        return self.sim.nvmlDeviceGetHandleByIndex(index)

    def uuid(self, index: int) -> str:
        return self.sim.nvmlDeviceGetUUID(self.handle(index))


def gpu_collectors() -> list[str]:
    """The default-enabled collectors that read each GPU through NVML."""
    return [n for n, c in discover().items() if c.default_enabled and c.tier in (Tier.FAST, Tier.SLOW)]


def default_collectors() -> set[str]:
    return {n for n, c in discover().items() if c.default_enabled}


@pytest.fixture
def make_node() -> Iterator[Callable[..., Node]]:
    """Build a simulated node and its poller; every one is stopped (and its hangs released) afterwards."""
    made: list[Node] = []
    available = discover()

    def build(
        sim: dict[str, Any] | None = None,
        *,
        collectors: Sequence[str] | None = None,
        deadline: float = 2.0,
        interval: float = 5.0,
        slow_interval: float = 0.0,
        expected: ExpectedGpus | None = None,
    ) -> Node:
        clock = Clock(1000.0)
        wall = Clock(1_700_000_000.0)
        nvml = SimulatedNvml(sim_config_from_dict(sim or {}), clock=clock)
        # By default the per-GPU collectors: node collectors (XID) read host state and are tested elsewhere.
        names = list(collectors) if collectors is not None else gpu_collectors()
        built = {n: create(available[n], CollectorOptions(node=NODE)) for n in names}
        poller = Poller(
            nvml,
            list(built.values()),
            PollerConfig(node=NODE, interval=interval, slow_interval=slow_interval, deadline=deadline),
            expected or ExpectedGpus(None, None, "boot"),
            wall=wall,
        )
        node = Node(nvml, poller, clock, wall, built)
        made.append(node)
        return node

    yield build
    for node in made:
        node.sim.release_hangs()
        node.poller.stop()


# --- the real exporter as a subprocess ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exporter_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "exporter", *args]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NODE_NAME"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@dataclass
class ExporterProcess:
    proc: subprocess.Popen[bytes]
    url: str
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"exporter exited with {self.proc.returncode}:\n{self.stderr()}")
            try:
                return requests.get(self.url + "/healthz", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(ready, timeout, f"the exporter at {self.url} to serve")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_exporter(
    tmp: Path, *args: str, sim: dict[str, Any] | None = None, env: dict[str, str] | None = None
) -> ExporterProcess:
    """Start `python -m exporter --backend sim` on a free local port with its state in `tmp`."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = ["--backend", "sim", "--web.listen-address", f"127.0.0.1:{port}", "--state-dir", str(tmp / "state")]
    if "xid" in discover():
        # Keep the host's kernel log out of these tests.
        argv += ["--xid.source", "none"]
    if sim is not None:
        path = tmp / "sim.yaml"
        path.write_text(yaml.safe_dump(sim), encoding="utf-8")
        argv += ["--sim-config", str(path)]
    stderr_path = tmp / "stderr.log"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            exporter_cmd(*argv, *args), cwd=ROOT, env=env or subprocess_env(),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )
    return ExporterProcess(proc, f"http://127.0.0.1:{port}", stderr_path)


@pytest.fixture(scope="session")
def helpers() -> SimpleNamespace:
    """The helpers above, for test modules (which must not import conftest by name)."""
    return SimpleNamespace(
        NODE=NODE,
        ROOT=ROOT,
        CORE_FAMILIES=CORE_FAMILIES,
        parse_samples=parse_samples,
        sample_names=sample_names,
        select=select,
        value=value,
        per_gpu=per_gpu,
        wait_for=wait_for,
        free_port=free_port,
        exporter_cmd=exporter_cmd,
        subprocess_env=subprocess_env,
        start_exporter=start_exporter,
        gpu_collectors=gpu_collectors,
        default_collectors=default_collectors,
    )
