"""PCIe: replay counter, and current against maximum link generation and width."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import Metric

from ..device import Device
from ..registry import RenderContext, Tier


@dataclass(frozen=True, slots=True)
class Pcie:
    replays: Any
    generation: Any
    max_generation: Any
    width: Any
    max_width: Any


class PcieCollector:
    name = "pcie"
    description = "PCIe replay counter; current and maximum link generation and width."
    tier = Tier.SLOW
    default_enabled = True

    def read(self, dev: Device) -> Pcie:
        return Pcie(
            replays=dev.optional("nvmlDeviceGetPcieReplayCounter"),
            generation=dev.optional("nvmlDeviceGetCurrPcieLinkGeneration"),
            max_generation=dev.cached("pcie_max_gen", lambda: dev.optional("nvmlDeviceGetMaxPcieLinkGeneration")),
            width=dev.optional("nvmlDeviceGetCurrPcieLinkWidth"),
            max_width=dev.cached("pcie_max_width", lambda: dev.optional("nvmlDeviceGetMaxPcieLinkWidth")),
        )

    def families(self, ctx: RenderContext) -> Iterable[Metric]:
        replays = ctx.counter("gpu_pcie_replays", "PCIe link replays (retransmissions after link errors).")
        gen = ctx.gauge("gpu_pcie_link_generation", "Current PCIe link generation (drops at idle to save power).")
        max_gen = ctx.gauge("gpu_pcie_link_max_generation", "Highest PCIe link generation the GPU and slot support.")
        width = ctx.gauge("gpu_pcie_link_width_lanes", "Current PCIe link width in lanes.")
        max_width = ctx.gauge("gpu_pcie_link_max_width_lanes", "Widest PCIe link the GPU and slot support, in lanes.")
        for gpu, r in ctx.readings:
            ctx.add(replays, gpu, r.replays)
            ctx.add(gen, gpu, r.generation)
            ctx.add(max_gen, gpu, r.max_generation)
            ctx.add(width, gpu, r.width)
            ctx.add(max_width, gpu, r.max_width)
        yield from (replays, gen, max_gen, width, max_width)
