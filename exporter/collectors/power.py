"""Power draw, the enforced limit, and total energy since the driver loaded."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import Metric

from ..device import UNSUPPORTED, Device
from ..registry import RenderContext, Tier


@dataclass(frozen=True, slots=True)
class Power:
    usage_mw: Any
    limit_mw: Any
    energy_mj: Any


def _scaled(value: Any, factor: float) -> Any:
    return value if value is UNSUPPORTED else value * factor


class PowerCollector:
    name = "power"
    description = "Power usage and enforced limit in watts; energy consumed since driver load in joules."
    tier = Tier.FAST
    default_enabled = True

    def read(self, dev: Device) -> Power:
        return Power(
            usage_mw=dev.optional("nvmlDeviceGetPowerUsage"),
            limit_mw=dev.optional("nvmlDeviceGetEnforcedPowerLimit"),
            energy_mj=dev.optional("nvmlDeviceGetTotalEnergyConsumption"),
        )

    def families(self, ctx: RenderContext) -> Iterable[Metric]:
        usage = ctx.gauge("gpu_power_usage_watts", "Power draw in watts (averaged over 1 s on Ampere and newer).")
        limit = ctx.gauge("gpu_power_limit_watts", "Power limit the driver enforces, in watts.")
        energy = ctx.counter("gpu_energy_consumption_joules", "Energy consumed since the driver was loaded, in joules.")
        for gpu, r in ctx.readings:
            # NVML speaks milliwatts and millijoules; Prometheus wants base units.
            ctx.add(usage, gpu, _scaled(r.usage_mw, 1e-3))
            ctx.add(limit, gpu, _scaled(r.limit_mw, 1e-3))
            ctx.add(energy, gpu, _scaled(r.energy_mj, 1e-3))
        yield from (usage, limit, energy)
