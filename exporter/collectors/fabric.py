"""NVSwitch fabric registration of each GPU (Hopper and newer with NVSwitch and Fabric Manager)."""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pynvml
from prometheus_client.core import Metric

from ..device import UNSUPPORTED, Device
from ..registry import RenderContext, Tier


@dataclass(frozen=True, slots=True)
class Fabric:
    state: int
    status: int
    health_summary: int


class FabricCollector:
    name = "fabric"
    description = "Fabric state (1 not started, 2 in progress, 3 completed), registration status and health summary."
    tier = Tier.SLOW
    default_enabled = True

    def read(self, dev: Device) -> Fabric | Any:
        info = pynvml.c_nvmlGpuFabricInfo_v3_t()
        # pynvml hands this argument straight to C, which wants a pointer.
        if dev.optional("nvmlDeviceGetGpuFabricInfoV", ctypes.byref(info)) is UNSUPPORTED:
            # Single GPUs and boards without NVSwitch: no series, and gpu_nvml_unsupported says so.
            return UNSUPPORTED
        return Fabric(state=int(info.state), status=int(info.status), health_summary=int(info.healthSummary))

    def families(self, ctx: RenderContext) -> Iterable[Metric]:
        state = ctx.gauge(
            "gpu_fabric_state", "NVML fabric state: 0 not supported, 1 not started, 2 in progress, 3 completed."
        )
        status = ctx.gauge("gpu_fabric_status", "NVML return code of the fabric registration; 0 means success.")
        health = ctx.gauge(
            "gpu_fabric_health",
            "Fabric health summary: 0 not supported, 1 healthy, 2 unhealthy, 3 limited capacity.",
        )
        for gpu, r in ctx.readings:
            if r is UNSUPPORTED:
                continue
            ctx.add(state, gpu, r.state)
            ctx.add(status, gpu, r.status)
            ctx.add(health, gpu, r.health_summary)
        yield from (state, status, health)
