"""Dynamic page retirement (pre-Ampere mechanism; Ampere and newer use row remapping)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pynvml
from prometheus_client.core import Metric

from ..device import Device
from ..registry import RenderContext, Tier


@dataclass(frozen=True, slots=True)
class RetiredPages:
    single_bit: Any
    double_bit: Any
    pending: Any


class RetiredPagesCollector:
    name = "retired_pages"
    description = "Pages retired for multiple single-bit and for double-bit ECC errors; retirement pending."
    tier = Tier.SLOW
    default_enabled = True

    def read(self, dev: Device) -> RetiredPages:
        sbe, dbe, pending = dev.fields(
            [pynvml.NVML_FI_DEV_RETIRED_SBE, pynvml.NVML_FI_DEV_RETIRED_DBE, pynvml.NVML_FI_DEV_RETIRED_PENDING]
        )
        return RetiredPages(single_bit=sbe, double_bit=dbe, pending=pending)

    def families(self, ctx: RenderContext) -> Iterable[Metric]:
        pages = ctx.gauge("gpu_retired_pages", "Memory pages retired, by cause.", ["cause"])
        pending = ctx.gauge(
            "gpu_retired_pages_pending", "1 if pages are waiting to be retired at the next driver reload, else 0."
        )
        for gpu, r in ctx.readings:
            ctx.add(pages, gpu, r.single_bit, "multiple_single_bit")
            ctx.add(pages, gpu, r.double_bit, "double_bit")
            ctx.add(pending, gpu, r.pending)
        yield from (pages, pending)
