"""Clocks, clock-event (throttle) reasons one series per reason, and the performance state."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import pynvml
from prometheus_client.core import Metric

from ..device import UNSUPPORTED, Device
from ..registry import RenderContext, Tier

# nvmlClocksEventReason* bits (nvml.h, R535+); 0x200 and 0x400 exist only under the old Throttle names.
REASONS: Final = (
    ("gpu_idle", 0x1),
    ("applications_clocks_setting", 0x2),
    ("sw_power_cap", 0x4),
    ("hw_slowdown", 0x8),
    ("sync_boost", 0x10),
    ("sw_thermal_slowdown", 0x20),
    ("hw_thermal_slowdown", 0x40),
    ("hw_power_brake_slowdown", 0x80),
    ("display_clock_setting", 0x100),
)


@dataclass(frozen=True, slots=True)
class Clocks:
    sm_mhz: Any
    memory_mhz: Any
    reasons: Any
    pstate: Any


class ClocksCollector:
    name = "clocks"
    description = "SM and memory clocks in hertz, active clock-event (throttle) reasons, performance state."
    tier = Tier.FAST
    default_enabled = True

    def read(self, dev: Device) -> Clocks:
        reasons = dev.optional("nvmlDeviceGetCurrentClocksEventReasons")
        if reasons is UNSUPPORTED:
            # Drivers older than R535 only have the deprecated name.
            reasons = dev.optional("nvmlDeviceGetCurrentClocksThrottleReasons")
        return Clocks(
            sm_mhz=dev.optional("nvmlDeviceGetClockInfo", pynvml.NVML_CLOCK_SM),
            memory_mhz=dev.optional("nvmlDeviceGetClockInfo", pynvml.NVML_CLOCK_MEM),
            reasons=reasons,
            pstate=dev.optional("nvmlDeviceGetPerformanceState"),
        )

    def families(self, ctx: RenderContext) -> Iterable[Metric]:
        clock = ctx.gauge("gpu_clock_hertz", "Current clock frequency in hertz.", ["clock"])
        reason = ctx.gauge(
            "gpu_clock_event_reason_active",
            "1 while the driver holds clocks down for this reason (nvmlClocksEventReason*), else 0.",
            ["reason"],
        )
        pstate = ctx.gauge("gpu_performance_state", "Performance state, 0 (P0, fastest) to 15 (slowest).")
        for gpu, r in ctx.readings:
            ctx.add(clock, gpu, None if r.sm_mhz is UNSUPPORTED else r.sm_mhz * 1e6, "sm")
            ctx.add(clock, gpu, None if r.memory_mhz is UNSUPPORTED else r.memory_mhz * 1e6, "memory")
            if r.reasons is not UNSUPPORTED:
                for name, bit in REASONS:
                    ctx.add(reason, gpu, 1 if r.reasons & bit else 0, name)
            ctx.add(pstate, gpu, r.pstate)
        yield from (clock, reason, pstate)
