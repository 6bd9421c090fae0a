"""Row remapping (Ampere and newer): rows remapped, a remap pending a reset, and remapping failure."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.core import Metric

from ..device import UNSUPPORTED, Device
from ..registry import RenderContext, Tier


class RemappedRowsCollector:
    name = "remapped_rows"
    description = "Rows remapped (correctable, uncorrectable); remap pending (needs a GPU reset); remap failure."
    tier = Tier.SLOW
    default_enabled = True

    def read(self, dev: Device) -> Any:
        # NotSupported under MIG with active instances: the series disappear and gpu_nvml_unsupported says why,
        # so a rule can tell "no remap data" from "no remaps".
        return dev.optional("nvmlDeviceGetRemappedRows")

    def families(self, ctx: RenderContext) -> Iterable[Metric]:
        rows = ctx.gauge("gpu_remapped_rows", "Rows remapped in device memory, by the error that caused it.", ["cause"])
        pending = ctx.gauge("gpu_row_remap_pending", "1 if a remap waits for a GPU reset to take effect, else 0.")
        failure = ctx.gauge("gpu_row_remap_failure", "1 if a row could not be remapped (replace the GPU), else 0.")
        for gpu, r in ctx.readings:
            if r is UNSUPPORTED:
                continue
            correctable, uncorrectable, is_pending, failed = r
            ctx.add(rows, gpu, correctable, "correctable")
            ctx.add(rows, gpu, uncorrectable, "uncorrectable")
            ctx.add(pending, gpu, int(bool(is_pending)))
            ctx.add(failure, gpu, int(bool(failed)))
        yield from (rows, pending, failure)
