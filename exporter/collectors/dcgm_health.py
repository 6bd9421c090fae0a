"""DCGM: the host-engine connection (`dcgm`) and DCGM's health watches (`dcgm_health`).

Both are off by default. `--backend dcgm` turns both on; beside the NVML backend,
`--collector.dcgm_health --collector.dcgm` adds DCGM's health model to NVML's readings. They share
one connection (the backend's, when the backend is DCGM) configured by the --dcgm.* flags, which
live on the `dcgm` collector.

dcgm_health runs dcgmHealthCheck once per slow cycle for every GPU and NVSwitch (watches on every
system by default: PCIe, NVLink, PMU, MCU, memory, SM, InfoROM, thermal, power, driver, NVSwitch
fatal and non-fatal). The first check after (re)connecting only arms DCGM's watches: until the
second, gpu_dcgm_health_armed is 0 and no status series exists, so nothing reads as healthy early.
Status is 0 pass, 1 warn, 2 fail per GPU and system (pass when DCGM reports no incident for that
system). Incidents are counted by DCGM_FR_* code when they appear; one that stays across checks is
counted once.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from types import ModuleType
from typing import Any, ClassVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..backends.dcgm.connection import (
    DcgmConnection,
    GpuHealth,
    NodeHealth,
    acquire,
    release,
)
from ..backends.dcgm.fields import parse_health_systems
from ..device import Device
from ..errors import ConfigError
from ..registry import CollectorOptions, RenderContext, Tier, node_family


def _connection(options: CollectorOptions) -> tuple[DcgmConnection, bool]:
    """The backend's connection when the backend is DCGM, else the shared one for the --dcgm.* flags."""
    conn = getattr(options.nvml, "dcgm_connection", None)
    if isinstance(conn, DcgmConnection):
        return conn, False
    return acquire(options.settings), True


def _error_names(errors: ModuleType | None) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, value in vars(errors or ModuleType("none")).items():
        if name.startswith("DCGM_FR_") and isinstance(value, int) and not name.startswith("DCGM_FR_EC_"):
            names.setdefault(value, name)  # the first name of a code is the current one, later ones are aliases
    return names


def validate_settings(settings: Mapping[str, Any]) -> None:
    """Check the --dcgm.* flag values without loading DCGM; ConfigError names the flag."""
    from ..backends.dcgm.connection import parse_timeout

    parse_timeout(settings.get("dcgm_timeout"))
    try:
        parse_health_systems(str(settings.get("dcgm_health_systems") or "all"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class Freshness:
    last_update: float | None


class DcgmCollector:
    name: ClassVar[str] = "dcgm"
    description: ClassVar[str] = (
        "DCGM host engine connection: connected, reconnects, failures, call timeouts; per GPU when its DCGM "
        "values were taken. Enabled by --backend dcgm; holds the --dcgm.* flags."
    )
    tier: ClassVar[Tier] = Tier.FAST
    default_enabled: ClassVar[bool] = False

    def __init__(self, conn: DcgmConnection, owned: bool, nvml: Any = None) -> None:
        self.conn = conn
        self._owned = owned
        self._nvml = nvml

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--dcgm.bindings-path", dest="dcgm_bindings_path", default=None,
            help="Directory holding DCGM's Python bindings (pydcgm.py, dcgm_agent.py, ...). (default: "
                 "/usr/share/datacenter-gpu-manager-4/bindings/python3, then /usr/local/dcgm/bindings/python3)",
        )
        parser.add_argument(
            "--dcgm.address", dest="dcgm_address", default="",
            help="nv-hostengine to read from: host:port (e.g. localhost:5555) or unix:///path. "
                 "Empty starts an embedded host engine in the exporter. (default: embedded)",
        )
        parser.add_argument(
            "--dcgm.timeout", dest="dcgm_timeout", default="500ms",
            help="Deadline of one DCGM call; past it the last values are served and the call counts as a timeout. "
                 "Keep it below --collect-timeout. (default 500ms)",
        )
        parser.add_argument(
            "--dcgm.health-systems", dest="dcgm_health_systems", default="all",
            help="DCGM health watches for dcgm_health: all, or a comma list of pcie, nvlink, pmu, mcu, mem, sm, "
                 "inforom, thermal, power, driver, nvswitch_nonfatal, nvswitch_fatal, connectx. (default all)",
        )

    @classmethod
    def from_options(cls, options: CollectorOptions) -> DcgmCollector:
        conn, owned = _connection(options)
        return cls(conn, owned, options.nvml)

    def read(self, dev: Device) -> Freshness:
        last_update = getattr(self._nvml, "last_update", None)
        return Freshness(last_update(dev.uuid) if last_update is not None else None)

    def families(self, ctx: RenderContext) -> Iterable[Metric]:
        state = self.conn.state()

        node_gauge = partial(node_family, GaugeMetricFamily, ctx.node)
        node_counter = partial(node_family, CounterMetricFamily, ctx.node)

        yield node_gauge(
            "gpu_dcgm_connected",
            "1 while the DCGM host engine is connected and answering within --dcgm.timeout, else 0.",
            int(state.connected),
        )
        yield node_counter("gpu_dcgm_reconnects", "Successful reconnections to the DCGM host engine.", state.reconnects)
        yield node_counter(
            "gpu_dcgm_connection_failures",
            "Failed connection attempts and lost connections to the DCGM host engine.",
            state.failures,
        )
        yield node_counter(
            "gpu_dcgm_call_timeouts", "DCGM calls that ran past --dcgm.timeout (a stalled host engine).", state.timeouts
        )
        fresh = ctx.gauge(
            "gpu_dcgm_last_update_timestamp_seconds",
            "When the DCGM values now exported for this GPU were read; it stops moving while DCGM is unreachable.",
        )
        for gpu, reading in ctx.readings:
            ctx.add(fresh, gpu, reading.last_update)
        yield fresh

    def close(self) -> None:
        if self._owned:
            self._owned = False
            release(self.conn)


class DcgmHealthCollector:
    name: ClassVar[str] = "dcgm_health"
    description: ClassVar[str] = (
        "DCGM health watches: per GPU and system pass/warn/fail once armed, incidents by DCGM error code, "
        "NVSwitch health. Enabled by --backend dcgm; works beside NVML too."
    )
    tier: ClassVar[Tier] = Tier.SLOW
    default_enabled: ClassVar[bool] = False

    def __init__(self, conn: DcgmConnection, owned: bool, systems: int) -> None:
        self.conn = conn
        self._owned = owned
        conn.watch_health(systems)
        self._errors = _error_names(conn.b.dcgm_errors)

    @classmethod
    def from_options(cls, options: CollectorOptions) -> DcgmHealthCollector:
        validate_settings(options.settings)
        systems = parse_health_systems(str(options.settings.get("dcgm_health_systems") or "all"))
        conn, owned = _connection(options)
        return cls(conn, owned, systems)

    def read(self, dev: Device) -> GpuHealth:
        return self.conn.health.for_gpu(dev.uuid)

    def families(self, ctx: RenderContext) -> Iterable[Metric]:
        node: NodeHealth = self.conn.health.node()
        armed = GaugeMetricFamily(
            "gpu_dcgm_health_armed",
            "1 once DCGM's health watches are armed (the second check after connecting), else 0; "
            "until then no health status is exported.",
            labels=["node"],
        )
        armed.add_metric([ctx.node], int(node.armed))
        checks = CounterMetricFamily(
            "gpu_dcgm_health_checks", "DCGM health checks completed, the arming ones included.", labels=["node"]
        )
        checks.add_metric([ctx.node], node.checks)
        status = ctx.gauge(
            "gpu_dcgm_health_status",
            "DCGM health of the GPU for one watched system: 0 pass, 1 warn, 2 fail. Absent until armed.",
            ["system"],
        )
        incidents = ctx.counter(
            "gpu_dcgm_health_incidents",
            "DCGM health incidents by system and DCGM error code (DCGM_FR_*), counted when they appear.",
            ["system", "error_code", "error"],
        )
        for gpu, reading in ctx.readings:
            for system, value in sorted((reading.status or {}).items()):
                ctx.add(status, gpu, value, system)
            for (system, code), count in sorted(reading.incidents.items()):
                ctx.add(incidents, gpu, count, system, str(code), self._errors.get(code, ""))
        switch_status = GaugeMetricFamily(
            "gpu_dcgm_nvswitch_health_status",
            "DCGM health of an NVSwitch for one watched system: 0 pass, 1 warn, 2 fail. Absent until armed.",
            labels=["node", "nvswitch", "system"],
        )
        for switch, systems in sorted(node.switches.items()):
            for system, value in sorted(systems.items()):
                switch_status.add_metric([ctx.node, str(switch), system], value)
        switch_incidents = CounterMetricFamily(
            "gpu_dcgm_nvswitch_health_incidents",
            "DCGM health incidents on an NVSwitch by system and DCGM error code, counted when they appear.",
            labels=["node", "nvswitch", "system", "error_code", "error"],
        )
        for (switch, system, code), count in sorted(node.switch_incidents.items()):
            switch_incidents.add_metric([ctx.node, str(switch), system, str(code), self._errors.get(code, "")], count)
        yield from (armed, checks, status, incidents, switch_status, switch_incidents)

    def close(self) -> None:
        if self._owned:
            self._owned = False
            release(self.conn)
