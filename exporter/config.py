"""Flags, node_exporter style, parsed once into a frozen config that is passed down."""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gpu_health_common.durations import parse_duration
from gpu_health_common.serving import Limits

from . import __version__
from .errors import ConfigError
from .registry import Collector


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str  # "" means every interface, as Go's ":9835" does
    port: int

    @classmethod
    def parse(cls, text: str, flag: str) -> ListenAddress:
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"{flag}: expected [host]:port such as :9835 or 127.0.0.1:9835, got {text!r}")
        return cls(host.strip("[]"), int(port))


@dataclass(frozen=True, slots=True)
class ExporterConfig:
    listen: ListenAddress
    telemetry_path: str
    web_config_file: str | None
    web_limits: Limits
    node: str
    backend: str
    sim_config: str | None
    expected_gpus: int | None
    state_dir: Path | None
    collect_interval: float
    slow_interval: float
    collect_timeout: float
    collectors: tuple[str, ...]
    log_level: str
    log_format: str
    # Collector-specific flags (--xid.source, ...), by dest name, for CollectorOptions.settings.
    settings: Mapping[str, object] = field(default_factory=dict)


DEFAULT_PORT = 9835
BACKENDS = ("auto", "nvml", "sim", "dcgm")


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so the CLI prints one clear message and picks the status."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def build_parser(available: Mapping[str, type[Collector]]) -> argparse.ArgumentParser:
    p = _Parser(
        prog="gpu-health-exporter",
        description="Prometheus exporter for NVIDIA GPU health (NVML), with a simulated backend for tests and demos.",
        epilog="Subcommand: gpu-health-exporter scan-log PATH  prints the XID/SXID events found in a kernel log.",
    )
    p.add_argument("--version", action="version", version=f"gpu-health-exporter {__version__}")
    p.add_argument("--web.listen-address", dest="listen", default=f":{DEFAULT_PORT}",
                   help=f"Address to listen on for HTTP requests. (default :{DEFAULT_PORT})")
    p.add_argument("--web.telemetry-path", dest="telemetry_path", default="/metrics",
                   help="Path under which to expose metrics. (default /metrics)")
    p.add_argument("--web.config.file", dest="web_config", default=None,
                   help="Path to a web configuration file (exporter-toolkit format) enabling TLS and/or basic auth.")
    p.add_argument("--web.read-timeout", dest="read_timeout", default="10s",
                   help="A request's headers must arrive within this of the connection opening or of the previous "
                        "response, and an idle kept-alive connection is closed after it. (default 10s)")
    p.add_argument("--web.max-connections", dest="max_connections", type=int, default=Limits.max_connections,
                   help=f"Open connections beyond this are closed at accept. (default {Limits.max_connections})")
    p.add_argument("--web.max-connections-per-client", dest="max_per_client", type=int,
                   default=Limits.max_connections_per_client,
                   help="Open connections from one source address beyond this are closed at accept. "
                        f"(default {Limits.max_connections_per_client})")
    p.add_argument("--node-name", dest="node", default=None,
                   help="Value of the node label on every series: the node's name as the remediator knows it. "
                        "(default: $NODE_NAME, else the hostname)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="Where GPU data comes from: nvml (libnvidia-ml), sim (simulated GPUs), auto (= nvml; "
                        "never falls back to the simulator). (default auto)")
    p.add_argument("--sim-config", dest="sim_config", default=None,
                   help="YAML file for --backend sim: GPU count, model, seed and a fault timeline. "
                        "(default: 8 healthy H100 SXM 80GB)")
    p.add_argument("--expected-gpus", dest="expected_gpus", type=int, default=None,
                   help="GPUs this node should have; a missing GPU then shows as gpu_devices_visible < "
                        "gpu_devices_expected. (default: the most seen since boot, kept in --state-dir)")
    p.add_argument("--state-dir", dest="state_dir", default="/var/lib/gpu-health-exporter",
                   help="Directory for state kept across restarts within a boot. Empty disables it. "
                        "(default /var/lib/gpu-health-exporter)")
    p.add_argument("--collect-interval", dest="interval", default="5s",
                   help="How often fast-changing signals are read. (default 5s)")
    p.add_argument("--collect-interval.slow", dest="slow_interval", default="30s",
                   help="How often costly or slow-changing signals (NVLink, ECC, retired pages, row remapping, "
                        "PCIe, fabric, identity) are read. (default 30s)")
    p.add_argument("--collect-timeout", dest="timeout", default="1s",
                   help="How long a cycle waits for a GPU; an NVML call running longer counts as stuck and the "
                        "GPU is reported stale. (default 1s)")
    p.add_argument("--collector.disable-defaults", dest="disable_defaults", action="store_true",
                   help="Disable every collector not enabled explicitly with --collector.<name>.")
    p.add_argument("--log.level", dest="log_level", choices=("debug", "info", "warn", "error"), default="info",
                   help="Only log messages with the given severity or above. (default info)")
    p.add_argument("--log.format", dest="log_format", choices=("logfmt", "json"), default="logfmt",
                   help="Output format of log messages. (default logfmt)")
    for name, cls in available.items():
        add_flags = getattr(cls, "add_flags", None)
        if add_flags is not None:
            # A collector's own flags are named --<name>.<flag> and land in settings as <name>_<flag>.
            add_flags(p)
        state = "enabled" if cls.default_enabled else "disabled"
        group = p.add_mutually_exclusive_group()
        group.add_argument(f"--collector.{name}", dest=f"c_{name}", action="store_true", default=None,
                           help=f"Enable the {name} collector ({state} by default): {cls.description}")
        group.add_argument(f"--no-collector.{name}", dest=f"c_{name}", action="store_false",
                           help=f"Disable the {name} collector.")
    return p


def parse(argv: Sequence[str], available: Mapping[str, type[Collector]], env: Mapping[str, str] = os.environ) -> ExporterConfig:
    """Parse flags into an ExporterConfig; every problem raises ConfigError naming the flag."""
    ns = build_parser(available).parse_args(list(argv))
    enabled = tuple(
        name for name, cls in available.items()
        if (explicit := getattr(ns, f"c_{name}")) is True or (explicit is None and cls.default_enabled and not ns.disable_defaults)
    )
    # DCGM: its backend brings the connection (dcgm) and health (dcgm_health) collectors; health beside
    # NVML brings the connection collector. An explicit --no-collector.<name> still wins.
    implied = {"dcgm", "dcgm_health"} if ns.backend == "dcgm" else {"dcgm"} if "dcgm_health" in enabled else set()
    implied = {n for n in implied if n in available and getattr(ns, f"c_{n}") is not False}
    enabled = tuple(n for n in available if n in enabled or n in implied)
    if ns.expected_gpus is not None and ns.expected_gpus < 0:
        raise ConfigError(f"--expected-gpus: must be 0 or more, got {ns.expected_gpus}")
    if {"dcgm", "dcgm_health"} & set(enabled):
        from .collectors.dcgm_health import validate_settings

        validate_settings(vars(ns))
    if ns.sim_config and ns.backend != "sim":
        raise ConfigError("--sim-config: only applies with --backend sim")
    if not ns.telemetry_path.startswith("/") or ns.telemetry_path in ("/", "/healthz"):
        raise ConfigError(f"--web.telemetry-path: expected a path such as /metrics, got {ns.telemetry_path!r}")
    interval = parse_duration(ns.interval, "--collect-interval", error=ConfigError)
    slow = parse_duration(ns.slow_interval, "--collect-interval.slow", error=ConfigError)
    timeout = parse_duration(ns.timeout, "--collect-timeout", error=ConfigError)
    if interval <= 0:
        raise ConfigError("--collect-interval: must be above zero")
    if slow < interval:
        raise ConfigError("--collect-interval.slow: must not be shorter than --collect-interval")
    if not 0 < timeout <= interval:
        raise ConfigError("--collect-timeout: must be above zero and no longer than --collect-interval")
    if ns.web_config is not None and not Path(ns.web_config).is_file():
        raise ConfigError(f"--web.config.file: no such file {ns.web_config!r}")
    read_timeout = parse_duration(ns.read_timeout, "--web.read-timeout", error=ConfigError)
    if read_timeout <= 0:
        raise ConfigError("--web.read-timeout: must be above zero")
    if ns.max_connections < 1:
        raise ConfigError(f"--web.max-connections: must be at least 1, got {ns.max_connections}")
    if ns.max_per_client < 1:
        raise ConfigError(f"--web.max-connections-per-client: must be at least 1, got {ns.max_per_client}")
    node = ns.node or env.get("NODE_NAME") or socket.gethostname()
    if not node.strip():
        raise ConfigError("--node-name: must not be empty")
    return ExporterConfig(
        listen=ListenAddress.parse(ns.listen, "--web.listen-address"),
        telemetry_path=ns.telemetry_path,
        web_config_file=ns.web_config,
        web_limits=Limits(read_timeout=read_timeout, max_connections=ns.max_connections,
                          max_connections_per_client=ns.max_per_client),
        node=node,
        backend=ns.backend,
        sim_config=ns.sim_config,
        expected_gpus=ns.expected_gpus,
        state_dir=Path(ns.state_dir) if ns.state_dir else None,
        collect_interval=interval,
        slow_interval=slow,
        collect_timeout=timeout,
        collectors=enabled,
        log_level="warning" if ns.log_level == "warn" else ns.log_level,
        log_format=ns.log_format,
        settings={
            k: v for k, v in vars(ns).items() if any(k.startswith(f"{name}_") for name in available)
        },
    )
