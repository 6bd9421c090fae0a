"""NVSwitch fabric registration of each GPU (Hopper and newer with NVSwitch and Fabric Manager).

The struct has grown with the drivers, and each driver refuses a version it does not know: R580 and newer
take nvmlDeviceGetGpuFabricInfoV with the v3 struct (which adds the health summary), R550 to R575 only v2
(v3 answers NVML_ERROR_ARGUMENT_VERSION_MISMATCH), and R535 lacks nvmlDeviceGetGpuFabricInfoV altogether
(FunctionNotFound) but has nvmlDeviceGetGpuFabricInfo with the unversioned struct. The newest one that
answers is used, and remembered for the GPU: a refusal is the driver's, and lasts until it is replaced.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import pynvml
from prometheus_client.core import Metric

from ..device import UNSUPPORTED, Device
from ..registry import RenderContext, Tier

# Newest first: the function and the struct it is called with.
VERSIONS: Final = (
    ("nvmlDeviceGetGpuFabricInfoV", pynvml.c_nvmlGpuFabricInfo_v3_t),
    ("nvmlDeviceGetGpuFabricInfoV", pynvml.c_nvmlGpuFabricInfo_v2_t),
    ("nvmlDeviceGetGpuFabricInfo", pynvml.c_nvmlGpuFabricInfo_t),
)
# What makes the next older version worth a try; NotSupported is the GPU's answer, whatever the version.
_OLDER: Final = frozenset({pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND})


@dataclass(frozen=True, slots=True)
class Fabric:
    state: int
    status: int
    health_summary: Any  # UNSUPPORTED before the v3 struct (R580)


class FabricCollector:
    name = "fabric"
    description = "Fabric state (1 not started, 2 in progress, 3 completed), registration status and health summary."
    tier = Tier.SLOW
    default_enabled = True

    def read(self, dev: Device) -> Fabric | Any:
        first = dev.cache.get("fabric.version", 0)
        for version in range(first, len(VERSIONS)):
            name, struct = VERSIONS[version]
            info = struct()
            try:
                # pynvml hands this argument straight to C, which wants a pointer.
                dev.call(name, ctypes.byref(info))
            except pynvml.NVMLError as exc:
                if exc.value in _OLDER:
                    dev.cache["fabric.version"] = version + 1
                    continue
                if exc.value == pynvml.NVML_ERROR_NOT_SUPPORTED:
                    break
                raise
            health = getattr(info, "healthSummary", None)
            if health is None:
                dev.mark_unsupported("nvmlGpuFabricInfo_v3")
            return Fabric(state=int(info.state), status=int(info.status),
                          health_summary=UNSUPPORTED if health is None else int(health))
        # Single GPUs and boards without NVSwitch: no series, and gpu_nvml_unsupported says so.
        dev.mark_unsupported("nvmlDeviceGetGpuFabricInfoV")
        return UNSUPPORTED

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
