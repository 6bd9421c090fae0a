"""How busy each GPU is, and how much of its memory is used, free and reserved."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pynvml
from prometheus_client.core import Metric

from ..device import UNSUPPORTED, Device
from ..registry import RenderContext, Tier


@dataclass(frozen=True, slots=True)
class Utilization:
    gpu: Any
    memory_bandwidth: Any
    used: Any
    total: Any
    reserved: Any


class UtilizationCollector:
    name = "utilization"
    description = "GPU and memory-bandwidth utilisation ratios; memory used, total and reserved in bytes."
    tier = Tier.FAST
    default_enabled = True

    def read(self, dev: Device) -> Utilization:
        rates = dev.optional("nvmlDeviceGetUtilizationRates")
        mem = dev.optional("nvmlDeviceGetMemoryInfo", pynvml.nvmlMemory_v2)
        return Utilization(
            gpu=UNSUPPORTED if rates is UNSUPPORTED else rates.gpu / 100,
            memory_bandwidth=UNSUPPORTED if rates is UNSUPPORTED else rates.memory / 100,
            used=UNSUPPORTED if mem is UNSUPPORTED else mem.used,
            total=UNSUPPORTED if mem is UNSUPPORTED else mem.total,
            reserved=UNSUPPORTED if mem is UNSUPPORTED else mem.reserved,
        )

    def families(self, ctx: RenderContext) -> Iterable[Metric]:
        util = ctx.gauge("gpu_utilization_ratio", "Fraction of the last sample period in which a kernel ran (0-1).")
        membw = ctx.gauge(
            "gpu_memory_bandwidth_utilization_ratio",
            "Fraction of the last sample period in which device memory was read or written (0-1).",
        )
        used = ctx.gauge("gpu_memory_used_bytes", "Device memory allocated, in bytes.")
        total = ctx.gauge("gpu_memory_total_bytes", "Device memory installed, in bytes.")
        reserved = ctx.gauge("gpu_memory_reserved_bytes", "Device memory reserved by the driver and firmware, in bytes.")
        for gpu, r in ctx.readings:
            ctx.add(util, gpu, r.gpu)
            ctx.add(membw, gpu, r.memory_bandwidth)
            ctx.add(used, gpu, r.used)
            ctx.add(total, gpu, r.total)
            ctx.add(reserved, gpu, r.reserved)
        yield from (util, membw, used, total, reserved)
