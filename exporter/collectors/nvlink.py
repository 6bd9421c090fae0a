"""NVLink: links up and down, and the replay, recovery and CRC error counters, per GPU (per link on request).

Every link the driver reports (NVML_FI_DEV_NVLINK_LINK_COUNT, never a loop past it) is read in one
batched nvmlDeviceGetFieldValues call with the scoped field ids (scopeId = link): the numbered
per-link ids (`..._L0` to `..._L11`) stop at link 11, and an H100 has 18 links. A link or counter
that answers NotSupported is absent, reported in gpu_nvml_unsupported as `FIELD[link]`, and does not
stop the other links being read. Two calls per GPU per slow cycle, whatever the link count.

A backend that refuses every scoped id (DCGM, which has no such fields) is read the old way, one
nvmlDeviceGetNvLinkState / nvmlDeviceGetNvLinkErrorCounter call per link and counter.

Per-link series are about 720 of the 1,160 series of an 8 x H100 node, so by default only per-GPU
totals are published; `--collector.nvlink.per-link` adds the per-link series.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import pynvml
from prometheus_client.core import Metric

from ..device import UNSUPPORTED, Device, field_name
from ..registry import CollectorOptions, RenderContext, Tier

# The counter label and the scoped field that reads it for one link (nvml.h: "NVLink Replay Error
# Counter", "NVLink Recovery Error Counter", "NVLink CRC Error Counter").
COUNTERS: Final = (
    ("replay", pynvml.NVML_FI_DEV_NVLINK_ERROR_DL_REPLAY),
    ("recovery", pynvml.NVML_FI_DEV_NVLINK_ERROR_DL_RECOVERY),
    ("crc", pynvml.NVML_FI_DEV_NVLINK_ERROR_DL_CRC),
)
STATE_FIELD: Final = pynvml.NVML_FI_DEV_NVLINK_GET_STATE
_PER_LINK: Final = (STATE_FIELD, *(fid for _, fid in COUNTERS))

# NVML_NVLINK_STATE_*: a sleeping link (a power state) is up; inactive and traffic-disabled are not.
# nvmlDeviceGetNvLinkState answers NVML_FEATURE_ENABLED (1, the same value as ACTIVE) or DISABLED (0).
_UP_STATES: Final = frozenset({pynvml.NVML_NVLINK_STATE_ACTIVE, pynvml.NVML_NVLINK_STATE_SLEEP})

# The per-link calls of the fallback, by counter label: CRC is the sum of flit and data CRC errors.
_LEGACY_COUNTERS: Final = {
    "replay": (pynvml.NVML_NVLINK_ERROR_DL_REPLAY,),
    "recovery": (pynvml.NVML_NVLINK_ERROR_DL_RECOVERY,),
    "crc": (pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT, pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA),
}


@dataclass(frozen=True, slots=True)
class Link:
    """One link's reading; UNSUPPORTED where the driver does not report that value for this link."""

    link: int
    up: Any  # 1, 0 or UNSUPPORTED
    errors: tuple[Any, ...]  # in COUNTERS order


@dataclass(frozen=True, slots=True)
class Links:
    """Every link of one GPU, and each counter summed over them (UNSUPPORTED: absent this cycle)."""

    links: tuple[Link, ...]
    totals: tuple[Any, ...] = (UNSUPPORTED,) * len(COUNTERS)

    @property
    def up(self) -> int:
        return sum(1 for link in self.links if link.up == 1)

    @property
    def down(self) -> int:
        return sum(1 for link in self.links if link.up == 0)


def _sum_seen(seen: set[Any], parts: Iterable[tuple[Any, Any]]) -> Any:
    """Sum the values (key, value) that are known; UNSUPPORTED if none is, or if one seen before is missing.

    A sum over links (or over the flit and data CRC counters) is a counter only if it never dips: a value
    that answered before and not now (a blank, a link retraining) makes the sum absent this cycle instead
    of smaller. A value never seen (a link that has no such counter) does not count.
    """
    total, known = 0, False
    for key, value in parts:
        if value is UNSUPPORTED:
            if key in seen:
                return UNSUPPORTED
            continue
        seen.add(key)
        total, known = total + value, True
    return total if known else UNSUPPORTED


class NvlinkCollector:
    name = "nvlink"
    description = (
        "NVLink links up and down and replay, recovery and CRC error counters per GPU; per link with "
        "--collector.nvlink.per-link."
    )
    tier = Tier.SLOW
    default_enabled = True

    def __init__(self, per_link: bool = False) -> None:
        self.per_link = per_link

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--collector.nvlink.per-link", dest="nvlink_per_link", action="store_true",
            help="Also publish NVLink series per link (gpu_nvlink_link_up, gpu_nvlink_link_errors_total): "
                 "18 x 4 series per H100 instead of 5. (default off: per-GPU totals only)",
        )

    @classmethod
    def from_options(cls, options: CollectorOptions) -> NvlinkCollector:
        return cls(per_link=bool(options.settings.get("nvlink_per_link")))

    def read(self, dev: Device) -> Links | Any:
        (count,) = dev.fields([pynvml.NVML_FI_DEV_NVLINK_LINK_COUNT])
        if count is UNSUPPORTED:
            # No NVLink on this board (or a driver without the link count): no series, and
            # gpu_nvml_unsupported says so.
            return UNSUPPORTED
        count = int(count)
        # Which values this GPU has answered before, kept with the GPU's handle (see _sum_seen).
        seen: set[Any] = dev.cache.setdefault("nvlink.seen", set())
        ids = [(fid, link) for link in range(count) for fid in _PER_LINK]
        values = dev.fields(ids, mark=False) if count else []
        if values and all(v is UNSUPPORTED for v in values):
            links = tuple(self._legacy(dev, link, seen) for link in range(count))
        else:
            width = len(_PER_LINK)
            built: list[Link] = []
            for link in range(count):
                row = values[link * width:(link + 1) * width]
                for requested, value in zip(ids[link * width:(link + 1) * width], row, strict=True):
                    if value is UNSUPPORTED:
                        dev.mark_unsupported(field_name(requested))
                state, *errors = row
                up = UNSUPPORTED if state is UNSUPPORTED else int(int(state) in _UP_STATES)
                built.append(Link(link, up, tuple(errors)))
            links = tuple(built)
        totals = tuple(
            _sum_seen(seen, (((link.link, name), link.errors[i]) for link in links))
            for i, (name, _) in enumerate(COUNTERS)
        )
        return Links(links, totals)

    @staticmethod
    def _legacy(dev: Device, link: int, seen: set[Any]) -> Link:
        state = dev.optional("nvmlDeviceGetNvLinkState", link)
        up = UNSUPPORTED if state is UNSUPPORTED else int(int(state) in _UP_STATES)
        errors = tuple(
            _sum_seen(seen, (((link, name, c), dev.optional("nvmlDeviceGetNvLinkErrorCounter", link, c))
                             for c in _LEGACY_COUNTERS[name]))
            for name, _ in COUNTERS
        )
        return Link(link, up, errors)

    def families(self, ctx: RenderContext) -> Iterable[Metric]:
        up = ctx.gauge("gpu_nvlink_links_up", "NVLink links of the GPU that are active.")
        down = ctx.gauge(
            "gpu_nvlink_links_down", "NVLink links of the GPU that the driver reports but that are not active."
        )
        errors = ctx.counter(
            "gpu_nvlink_errors", "NVLink data-link errors summed over the GPU's links, by counter.", ["counter"]
        )
        link_up = ctx.gauge("gpu_nvlink_link_up", "1 if the NVLink link is active, else 0.", ["link"])
        link_errors = ctx.counter(
            "gpu_nvlink_link_errors", "NVLink data-link errors per link, by counter.", ["link", "counter"]
        )
        for gpu, r in ctx.readings:
            if r is UNSUPPORTED:
                continue
            ctx.add(up, gpu, r.up)
            ctx.add(down, gpu, r.down)
            for (name, _), total in zip(COUNTERS, r.totals, strict=True):
                ctx.add(errors, gpu, total, name)
            if not self.per_link:
                continue
            for link in r.links:
                ctx.add(link_up, gpu, link.up, str(link.link))
                for (name, _), value in zip(COUNTERS, link.errors, strict=True):
                    ctx.add(link_errors, gpu, value, str(link.link), name)
        yield from (up, down, errors)
        if self.per_link:
            yield from (link_up, link_errors)
