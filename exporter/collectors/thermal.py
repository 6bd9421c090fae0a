"""GPU and memory temperature, and the thresholds the driver slows down and shuts down at."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pynvml
from prometheus_client.core import Metric

from ..device import Device
from ..registry import RenderContext, Tier


@dataclass(frozen=True, slots=True)
class Thermal:
    gpu: Any
    memory: Any
    slowdown: Any
    shutdown: Any


class ThermalCollector:
    name = "thermal"
    description = "GPU and memory (HBM) temperature; slowdown and shutdown thresholds."
    tier = Tier.FAST
    default_enabled = True

    def read(self, dev: Device) -> Thermal:
        (memory,) = dev.fields([pynvml.NVML_FI_DEV_MEMORY_TEMP])
        return Thermal(
            gpu=dev.optional("nvmlDeviceGetTemperature", pynvml.NVML_TEMPERATURE_GPU),
            memory=memory,
            slowdown=dev.cached(
                "slowdown",
                lambda: dev.optional("nvmlDeviceGetTemperatureThreshold", pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN),
            ),
            shutdown=dev.cached(
                "shutdown",
                lambda: dev.optional("nvmlDeviceGetTemperatureThreshold", pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN),
            ),
        )

    def families(self, ctx: RenderContext) -> Iterable[Metric]:
        temp = ctx.gauge("gpu_temperature_celsius", "GPU die temperature in degrees Celsius.")
        mem = ctx.gauge("gpu_memory_temperature_celsius", "GPU memory (HBM) temperature in degrees Celsius.")
        threshold = ctx.gauge(
            "gpu_temperature_threshold_celsius",
            "Temperature at which the driver slows the GPU down (slowdown) or shuts it off (shutdown).",
            ["threshold"],
        )
        for gpu, r in ctx.readings:
            ctx.add(temp, gpu, r.gpu)
            ctx.add(mem, gpu, r.memory)
            ctx.add(threshold, gpu, r.slowdown, "slowdown")
            ctx.add(threshold, gpu, r.shutdown, "shutdown")
        yield from (temp, mem, threshold)
