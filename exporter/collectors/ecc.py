"""ECC error counts, corrected and uncorrected, volatile (since driver load) and aggregate (lifetime)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import pynvml
from prometheus_client.core import Metric

from ..device import UNSUPPORTED, Device
from ..registry import RenderContext, Tier

_FIELDS: Final = (
    (pynvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL, "corrected", "volatile"),
    (pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL, "uncorrected", "volatile"),
    (pynvml.NVML_FI_DEV_ECC_SBE_AGG_TOTAL, "corrected", "aggregate"),
    (pynvml.NVML_FI_DEV_ECC_DBE_AGG_TOTAL, "uncorrected", "aggregate"),
)


@dataclass(frozen=True, slots=True)
class Ecc:
    enabled: Any
    counts: tuple[Any, ...]


class EccCollector:
    name = "ecc"
    description = "ECC mode; corrected and uncorrected ECC errors, volatile and aggregate."
    tier = Tier.SLOW
    default_enabled = True

    def read(self, dev: Device) -> Ecc:
        mode = dev.optional("nvmlDeviceGetEccMode")
        enabled = UNSUPPORTED if mode is UNSUPPORTED else int(mode[0] == pynvml.NVML_FEATURE_ENABLED)
        # One batched call instead of four nvmlDeviceGetTotalEccErrors calls.
        counts = dev.fields([fid for fid, _, _ in _FIELDS]) if enabled else [UNSUPPORTED] * len(_FIELDS)
        return Ecc(enabled=enabled, counts=tuple(counts))

    def families(self, ctx: RenderContext) -> Iterable[Metric]:
        mode = ctx.gauge("gpu_ecc_enabled", "1 if ECC is enabled on the GPU's memory, else 0.")
        errors = ctx.counter(
            "gpu_ecc_errors",
            "ECC errors by type (corrected, uncorrected) and counter (volatile since driver load, aggregate lifetime).",
            ["error_type", "counter"],
        )
        for gpu, r in ctx.readings:
            ctx.add(mode, gpu, r.enabled)
            for (_, error_type, counter), value in zip(_FIELDS, r.counts, strict=True):
                ctx.add(errors, gpu, value, error_type, counter)
        yield from (mode, errors)
