"""Fleet simulator: N simulated GPU nodes in one process, each its own scrape target.

Each node is the exporter's own collection side (``exporter.cli.build_poller`` over ``SimulatedNvml``, from the
same flags ``Stack.add_exporter`` gives a real exporter process), with its own fault timeline (a ``--sim-config``
mapping), kernel-log file followed by the XID collector's file source, boot id, and state directory. What a node
serves is its poller's published snapshot, byte for byte what the exporter would serve on /metrics. One aiohttp
server (``gpu_health_common.serving.serve``) answers for all of them:

- ``GET /node/<name>/metrics``: the node's exposition; 503 while the node is stopped (power loss: ``up`` is 0);
- ``GET /metrics``: the simulator's own figures (``fleetsim_*``);
- ``GET /sd``: the targets in Prometheus' HTTP service-discovery format (the same groups as ``targets.json``);
- the control API under ``/api/nodes`` (gpu_health_stack.fleetsim_http), which calls the Python API below.

Nodes are collected on one shared schedule instead of one loop thread each: node i's cycles are spread over the
collection interval, and one scheduler thread runs each due node's ``run_cycle``, the NVML jobs included
(``InlineWorker`` in place of the poller's thread per GPU; a node with a ``hang`` fault keeps the threads). The XID
collector keeps its two threads a node (file reader, publisher), polling the kernel log every ``xid_poll`` seconds
(1 s by default: the exporter's 25 ms, times 1,000 nodes, would be 40,000 wake-ups a second). The command line
also freezes the start-up objects out of the garbage collector (``quiet_gc``).

Measured on the project's 2-core machine (``benchmarks/fleet_sim.py --nodes 1000``: 8 H100s a node, collection
every 15 s, slow tier 60 s, Debian's Prometheus with rules/ at 15 s): the simulator 0.54 core and 414 MiB RSS,
Prometheus 0.45 core and 2.1 GiB (486 samples a node), scrape latency p99 92 ms per node target.

Prometheus sees one job: one target group per node in ``targets.json`` (file_sd) with labels ``node`` and
``__fleetsim_node``; relabelling turns the latter into ``__metrics_path__`` ``/node/<name>/metrics`` and
``instance`` ``<name>``, and leaves any other target of the job alone (``scrape_config``, ``attach``).

    fleet = FleetSim(Path(dir), FleetTimings(collect_interval="1s", slow_interval="2s"))
    fleet.start()
    fleet.add_node("fleet-0001", {"gpus": 8, "faults": [...]})
    fleet.append_kernel_log("fleet-0001", xid79(3))
    fleet.restart_node("fleet-0001", new_boot=True)      # a reboot: new boot id, empty kernel log
    fleet.stop_node("fleet-0001")                         # power loss: 503 until start_node
    fleet.close()

Command line (``python -m gpu_health_stack.fleetsim --help``)::

    python -m gpu_health_stack.fleetsim --nodes 1000 --listen 127.0.0.1:9900 --dir /tmp/fleet
    # then point Prometheus at the job printed with --print-scrape-config (it reads /tmp/fleet/targets.json)

Not modelled: a hung NVML call blocks only its node's worker thread, as in the exporter, but each cycle of that
node then holds the shared schedule for ``collect_timeout``; gzip (scrapes are answered uncompressed: the simulator
runs on loopback, and compressing 1,000 bodies every interval would cost CPU on both sides); faults added to a
running node (a node's timeline is fixed at each start: restart it with a new ``sim`` to change it).
"""

from __future__ import annotations

import argparse
import gc
import heapq
import itertools
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from exporter.backends.sim import SimulatedNvml, sim_config_from_dict
from exporter.cli import build_poller
from exporter.config import parse as parse_flags
from exporter.errors import ConfigError
from exporter.poller import Poller, Worker
from exporter.registry import Collector, discover
from exporter.xid.sources import FileSource

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
NODE_LABEL = "__fleetsim_node"


@dataclass(frozen=True)
class FleetTimings:
    """How each node collects (the exporter's flags) and how often its kernel log is looked at."""

    collect_interval: str = "15s"
    slow_interval: str = "60s"
    collect_timeout: str = "1s"
    xid_poll: float = 1.0
    xid_lazy: float = 5.0


def exporter_flags(node: str, home: Path, timings: FleetTimings, *, expected_gpus: int | None = 8,
                   extra: Iterable[str] = ()) -> list[str]:
    """The exporter flags of one node: Stack.add_exporter's, without the listener and the sim file."""
    argv = [
        "--backend", "sim", "--node-name", node, "--state-dir", str(home / "state"),
        "--xid.source", f"file:{home / 'kern.log'}", "--xid.boot-id-file", str(home / "boot_id"),
        "--xid.nvml-events", "off", "--collect-interval", timings.collect_interval,
        "--collect-interval.slow", timings.slow_interval, "--collect-timeout", timings.collect_timeout,
        "--log.level", "warn",
    ]
    if expected_gpus is not None:
        argv += ["--expected-gpus", str(expected_gpus)]
    return argv + list(extra)


class InlineWorker:
    """The poller's Worker without its thread: submit() runs the job at once, on the caller's (the schedule's)
    thread. At 1,000 nodes, nine NVML threads a node (9,000 threads contending for the GIL) starved the HTTP server
    and took two cores of system time; this costs nothing per GPU. A job that hangs hangs the caller, so a node
    whose timeline has a `hang` fault gets the exporter's threaded workers instead."""

    def __init__(self, name: str, on_done: Callable[[], None]) -> None:
        self.name = name
        self.busy = False
        self._on_done = on_done

    def submit(self, job: Callable[[], None]) -> bool:
        if self.busy:
            return False
        self.busy = True
        try:
            job()
        except Exception:  # a job records its own errors; as the threaded worker, only keep going
            log.exception("worker job failed", extra={"worker": self.name})
        finally:
            self.busy = False
            self._on_done()
        return True

    def stop(self) -> None:
        pass


def boot_id_for(node: str, boot: int) -> str:
    """A deterministic boot id in the kernel's spelling (a random UUID), different for every boot of every node."""
    return str(uuid.UUID(int=random.Random(f"{node}/{boot}").getrandbits(128), version=4))


class SimNode:
    """One simulated node: its files, its boot, and (while running) its poller."""

    def __init__(self, fleet: FleetSim, name: str, sim: Mapping[str, Any] | None, extra_flags: Iterable[str]) -> None:
        if not _NAME_RE.fullmatch(name):
            raise ConfigError(f"node name {name!r}: letters, digits, '.', '_' and '-' only, at most 63")
        self.fleet = fleet
        self.name = name
        self.home = fleet.dir / "nodes" / name
        self.kern_log = self.home / "kern.log"
        self.extra_flags = list(extra_flags)
        self.sim = self._with_seed(sim)
        sim_config_from_dict(dict(self.sim))  # refuse a bad timeline before anything starts
        self.boot = 1
        self.poller: Poller | None = None
        self.nvml: SimulatedNvml | None = None
        self.started_at = 0.0  # time.time() of the last start
        self.lock = threading.Lock()  # one of: a cycle, a start, a stop
        self.epoch = 0  # new at every start and stop (fleet-wide): the schedule drops entries of another epoch
        self.unreachable_until = 0.0  # time.monotonic(): a scrape gap (the node collects on; scrapes get 503)
        self.home.mkdir(parents=True, exist_ok=True)
        self.kern_log.touch()

    def _with_seed(self, sim: Mapping[str, Any] | None) -> dict[str, Any]:
        # Without a seed of its own, each node gets its own GPUs (UUIDs, serials), stable for its name.
        out = dict(sim) if sim is not None else {"gpus": 8}
        out.setdefault("seed", zlib.crc32(self.name.encode()))
        return out

    @property
    def boot_id(self) -> str:
        return boot_id_for(self.name, self.boot)

    @property
    def running(self) -> bool:
        return self.poller is not None

    def start(self) -> None:
        """Build the node's poller as the exporter does, run its first cycle (XID catch-up included)."""
        with self.lock:
            if self.poller is not None:
                return
            (self.home / "boot_id").write_text(self.boot_id + "\n")
            config = parse_flags(exporter_flags(self.name, self.home, self.fleet.timings, extra=self.extra_flags),
                                 self.fleet.collectors, env={})
            self.nvml = SimulatedNvml(sim_config_from_dict(dict(self.sim)))
            hangs = any(f.get("kind") == "hang" for f in self.sim.get("faults") or [])
            poller = build_poller(config, self.nvml, self.fleet.collectors, boot_id=self.boot_id,
                                  worker=Worker if hangs else InlineWorker)
            for collector in poller.collectors:
                source = getattr(collector, "source", None)
                if isinstance(source, FileSource):
                    source.poll_interval = self.fleet.timings.xid_poll
                    # Its publisher wakes at once for an event; the lazy wake-up (lines without events) is rarer.
                    collector.LAZY_INTERVAL = self.fleet.timings.xid_lazy  # type: ignore[attr-defined]
            poller.run_cycle()
            self.poller = poller
            self.started_at = time.time()
            self.epoch = next(self.fleet.epochs)
        self.fleet.schedule(self)

    def stop(self) -> None:
        with self.lock:
            poller, self.poller = self.poller, None
            self.epoch = next(self.fleet.epochs)
        if poller is not None:
            poller.stop()
        if self.nvml is not None:
            self.nvml.release_hangs()  # a powered-off node's hung NVML calls end with it

    def cycle(self, epoch: int) -> bool:
        """One collection cycle, unless the node was stopped or restarted since it was scheduled."""
        with self.lock:
            if self.poller is None or epoch != self.epoch:
                return False
            self.poller.run_cycle()
            return True


class FleetSim:
    """The nodes, their shared collection schedule, and the HTTP server every node is scraped through."""

    def __init__(self, directory: Path, timings: FleetTimings | None = None, *, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.timings = timings or FleetTimings()
        self.interval = _seconds(self.timings.collect_interval)
        self.host = host
        self.port = port
        self.collectors: Mapping[str, type[Collector]] = discover()
        self.nodes: dict[str, SimNode] = {}
        self.targets_file = self.dir / "targets.json"
        self._lock = threading.Lock()  # nodes dict and targets file
        self._heap: list[tuple[float, int, str, int]] = []
        self._seq = 0
        self.epochs = itertools.count(1)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._scheduler: threading.Thread | None = None
        self._server: Any = None  # fleetsim_http.Server
        # Figures for GET /metrics and the benchmark.
        self.cycles = 0
        self.cycle_seconds = 0.0
        self.last_lag = 0.0
        self.max_lag = 0.0

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> FleetSim:
        """Start the HTTP server (the port is known afterwards) and the scheduler."""
        from .fleetsim_http import Server

        self._server = Server(self)
        self.port = self._server.start(self.host, self.port)
        self._scheduler = threading.Thread(target=self._schedule_loop, name="fleetsim-schedule", daemon=True)
        self._scheduler.start()
        self._write_targets()
        return self

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._scheduler is not None:
            self._scheduler.join(5 + 2 * _seconds(self.timings.collect_timeout))
        if self._server is not None:
            self._server.stop()
        for node in list(self.nodes.values()):
            node.stop()

    def __enter__(self) -> FleetSim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the Python API (the HTTP control API calls these) ---------------------------------------------

    def add_node(self, name: str, sim: Mapping[str, Any] | None = None, *, extra_flags: Iterable[str] = (),
                 start: bool = True) -> SimNode:
        """A new node with its own fault timeline (a --sim-config mapping; default 8 H100s, no faults)."""
        with self._lock:
            if name in self.nodes:
                raise ConfigError(f"node {name!r} exists")
            node = SimNode(self, name, sim, extra_flags)
            self.nodes[name] = node
        if start:
            node.start()
        self._write_targets()
        return node

    def add_nodes(self, count: int, sim: Mapping[str, Any] | None = None, *, prefix: str = "fleet-",
                  extra_flags: Iterable[str] = ()) -> list[SimNode]:
        """`count` nodes named prefix0000, prefix0001, ... with the same timeline (each its own GPUs); the targets
        file is written once, at the end."""
        with self._lock:
            first = len(self.nodes)
            made = []
            for i in range(first, first + count):
                name = f"{prefix}{i:04d}"
                if name in self.nodes:
                    raise ConfigError(f"node {name!r} exists")
                made.append(SimNode(self, name, sim, extra_flags))
                self.nodes[name] = made[-1]
        for node in made:
            node.start()
        self._write_targets()
        return made

    def remove_node(self, name: str) -> None:
        """Gone from the fleet and from the targets (a decommissioned node); its files stay."""
        node = self.node(name)
        node.stop()
        with self._lock:
            self.nodes.pop(name, None)
        self._write_targets()

    def stop_node(self, name: str) -> None:
        """Power loss, or the exporter gone: its target answers 503 (``up`` 0) until start_node."""
        self.node(name).stop()

    def start_node(self, name: str, *, new_boot: bool = False, wipe_log: bool | None = None,
                   sim: Mapping[str, Any] | None = None) -> None:
        """Start a stopped node: the exporter again (same boot), or the machine again (`new_boot`: a new boot id,
        and its kernel log emptied unless `wipe_log` is False). `sim` replaces its fault timeline, whose times
        count from this start (as a restarted exporter's do)."""
        node = self.node(name)
        if node.running:
            raise ConfigError(f"node {name!r} is running")
        if sim is not None:
            checked = node._with_seed(sim)
            sim_config_from_dict(dict(checked))
            node.sim = checked
        if new_boot:
            node.boot += 1
        if wipe_log if wipe_log is not None else new_boot:
            node.kern_log.write_text("")
        node.start()

    def restart_node(self, name: str, *, new_boot: bool = False, wipe_log: bool | None = None,
                     sim: Mapping[str, Any] | None = None) -> None:
        """stop_node then start_node: an exporter restart, or with `new_boot` a reboot."""
        self.stop_node(name)
        self.start_node(name, new_boot=new_boot, wipe_log=wipe_log, sim=sim)

    def gap_node(self, name: str, seconds: float) -> None:
        """A scrape gap: the node keeps collecting, but its target answers 503 for `seconds` (a network partition,
        a congested switch, a scrape that times out), so `up` is 0 while nothing about the node changed."""
        if not 0 <= seconds <= 86400:
            raise ConfigError(f"seconds: expected 0 to 86400, got {seconds!r}")
        self.node(name).unreachable_until = time.monotonic() + seconds

    def append_kernel_log(self, name: str, *lines: str) -> None:
        """Append kernel-log lines to the node's log file, which its XID collector follows."""
        node = self.node(name)
        text = "".join(line.rstrip("\n") + "\n" for line in lines)
        with open(node.kern_log, "a", encoding="utf-8") as fh:
            fh.write(text)

    def node(self, name: str) -> SimNode:
        try:
            return self.nodes[name]
        except KeyError:
            raise KeyError(f"no node {name!r}") from None

    def node_url(self, name: str) -> str:
        return f"http://{self.host}:{self.port}/node/{name}/metrics"

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": n.name, "running": n.running, "boot": n.boot, "boot_id": n.boot_id,
                 "kernel_log": str(n.kern_log), "started_at": n.started_at,
                 "cycles": n.poller.cycles if n.poller is not None else 0} for n in list(self.nodes.values())]

    # --- Prometheus ----------------------------------------------------------------------------------

    def target_groups(self) -> list[dict[str, Any]]:
        """One group per node (file_sd and HTTP SD format): the shared listener, with the node's labels."""
        address = f"{self.host}:{self.port}"
        return [{"targets": [address], "labels": {"node": name, NODE_LABEL: name}} for name in sorted(self.nodes)]

    @staticmethod
    def relabel_configs() -> list[dict[str, Any]]:
        """What turns a simulator target into one node's: its path and its instance. Other targets of the same job
        (no __fleetsim_node label) are left as they are."""
        return [
            {"source_labels": [NODE_LABEL], "regex": "(.+)", "target_label": "__metrics_path__",
             "replacement": "/node/$1/metrics"},
            {"source_labels": [NODE_LABEL], "regex": "(.+)", "target_label": "instance", "replacement": "$1"},
        ]

    def exporter_job_extra(self) -> dict[str, list[Any]]:
        """The simulator's part of an exporter job: file_sd over targets.json, and the relabelling."""
        return {"file_sd_configs": [{"files": [str(self.targets_file)], "refresh_interval": "5s"}],
                "relabel_configs": self.relabel_configs()}

    def scrape_config(self, job_name: str = "gpu-health-exporter") -> dict[str, Any]:
        """A whole scrape job for the simulator's nodes (honor_labels as the shipped exporter job)."""
        return {"job_name": job_name, "honor_labels": True, **self.exporter_job_extra()}

    def attach(self, stack: Any) -> None:
        """Make the nodes targets of a gpu_health_stack.stack.Stack's exporter job (before start_prometheus)."""
        stack.exporter_job_extra = self.exporter_job_extra()
        stack.exporter_job_targets = lambda: sum(1 for n in list(self.nodes.values()) if n.running)

    def _write_targets(self) -> None:
        if self._server is None:
            return  # the port is not known yet; start() writes it
        with self._lock:
            tmp = self.targets_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.target_groups(), indent=1))
            os.replace(tmp, self.targets_file)

    # --- the shared schedule ---------------------------------------------------------------------------

    def schedule(self, node: SimNode) -> None:
        """Put a (re)started node on the schedule, its cycles at a phase of the interval its name decides."""
        now = time.monotonic()
        phase = (zlib.crc32(node.name.encode()) % 10_000) / 10_000 * self.interval
        first = now + (phase - now) % self.interval
        self._push(first, node.name, node.epoch)

    def _push(self, due: float, name: str, epoch: int) -> None:
        with self._cond:
            self._seq += 1
            heapq.heappush(self._heap, (due, self._seq, name, epoch))
            self._cond.notify()

    def _schedule_loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while not self._stop.is_set():
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    if wait is not None and wait <= 0:
                        break
                    self._cond.wait(wait)
                if self._stop.is_set():
                    return
                due, _, name, epoch = heapq.heappop(self._heap)
            node = self.nodes.get(name)
            if node is None:
                continue
            t0 = time.monotonic()
            self.last_lag = t0 - due
            self.max_lag = max(self.max_lag, self.last_lag)
            try:
                ran = node.cycle(epoch)
            except Exception:  # one node's failure must not stop the others' collection
                log.exception("fleetsim cycle failed", extra={"node": name})
                ran = True
            if not ran:
                continue
            self.cycles += 1
            self.cycle_seconds += time.monotonic() - t0
            # After a stall, skip the missed cycles instead of running them back to back (as the exporter's loop).
            self._push(max(due + self.interval, time.monotonic()), name, epoch)


def _seconds(duration: str) -> float:
    from gpu_health_common.durations import parse_duration

    return parse_duration(duration, "duration", error=ConfigError)


def quiet_gc() -> None:
    """Keep the cyclic garbage collector from stopping the process for a second at a time: 1,000 nodes' pollers
    are millions of long-lived objects, and each full collection walked them all (a 1.3 s scrape p99 and 1.7 s of
    schedule lag at 1,000 nodes before this). What exists now is frozen out of collection; collections run rarer."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 1000)


# --- command line ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpu_health_stack.fleetsim", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=10, help="how many nodes to start (default 10)")
    p.add_argument("--prefix", default="fleet-", help="node names are PREFIX0000, PREFIX0001, ... (default fleet-)")
    p.add_argument("--sim-config", default=None, help="YAML --sim-config every node gets (default: 8 H100s)")
    p.add_argument("--listen", default="127.0.0.1:0", help="host:port to serve on (default 127.0.0.1, any port)")
    p.add_argument("--dir", default=None, help="where node files and targets.json go (default: a temporary one)")
    p.add_argument("--collect-interval", default="15s")
    p.add_argument("--collect-interval.slow", dest="slow_interval", default="60s")
    p.add_argument("--collect-timeout", default="1s")
    p.add_argument("--xid-poll", type=float, default=1.0, help="seconds between looks at each kernel log")
    p.add_argument("--exporter-flag", action="append", default=[], metavar="FLAG",
                   help="an exporter flag every node gets, such as --collector.nvlink.per-link (repeatable)")
    p.add_argument("--print-scrape-config", action="store_true", help="print the Prometheus job (YAML) and go on")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # Every node's new boot starts with an empty kernel log, and the file source says so once per node.
    logging.getLogger("exporter.xid.sources").setLevel(logging.ERROR)
    host, _, port = args.listen.rpartition(":")
    directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fleetsim-"))
    sim = yaml.safe_load(Path(args.sim_config).read_text()) if args.sim_config else None
    from gpu_health_common.serving import raise_nofile_limit

    raise_nofile_limit()  # two descriptors a node (log file, scrape connection) and then some
    timings = FleetTimings(args.collect_interval, args.slow_interval, args.collect_timeout, args.xid_poll)
    fleet = FleetSim(directory, timings, host=host or "127.0.0.1", port=int(port or 0))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        fleet.start()
        t0 = time.monotonic()
        fleet.add_nodes(args.nodes, sim, prefix=args.prefix, extra_flags=args.exporter_flag)
        quiet_gc()
        if args.print_scrape_config:
            print(yaml.safe_dump({"scrape_configs": [fleet.scrape_config()]}, sort_keys=False), end="", flush=True)
        print(f"fleetsim listening on http://{fleet.host}:{fleet.port} pid={os.getpid()} nodes={len(fleet.nodes)} "
              f"started_in={time.monotonic() - t0:.1f}s dir={directory}", flush=True)
        stop.wait()
    finally:
        fleet.close()
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
