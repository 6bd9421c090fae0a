"""NVLink per link: whether it is up, and its replay, recovery and CRC error counters."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import pynvml
from prometheus_client.core import Metric

from ..device import UNSUPPORTED, Device
from ..registry import RenderContext, Tier

COUNTERS: Final = (
    ("replay", pynvml.NVML_NVLINK_ERROR_DL_REPLAY),
    ("recovery", pynvml.NVML_NVLINK_ERROR_DL_RECOVERY),
    ("crc_flit", pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT),
    ("crc_data", pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA),
)


@dataclass(frozen=True, slots=True)
class Link:
    link: int
    up: int
    errors: tuple[Any, ...]


class NvlinkCollector:
    name = "nvlink"
    description = "NVLink state per link; replay, recovery, CRC flit and CRC data error counters per link."
    tier = Tier.SLOW
    default_enabled = True

    def read(self, dev: Device) -> list[Link] | Any:
        (count,) = dev.fields([pynvml.NVML_FI_DEV_NVLINK_LINK_COUNT])
        if count is UNSUPPORTED:
            # Older drivers lack the link-count field; NotSupported on link 0 then means "no NVLink".
            count = pynvml.NVML_NVLINK_MAX_LINKS
        links: list[Link] = []
        for link in range(int(count)):
            state = dev.optional("nvmlDeviceGetNvLinkState", link)
            if state is UNSUPPORTED:
                break
            errors = tuple(dev.optional("nvmlDeviceGetNvLinkErrorCounter", link, c) for _, c in COUNTERS)
            links.append(Link(link, int(state == pynvml.NVML_FEATURE_ENABLED), errors))
        return links

    def families(self, ctx: RenderContext) -> Iterable[Metric]:
        up = ctx.gauge("gpu_nvlink_up", "1 if the NVLink link is active, else 0.", ["link"])
        errors = ctx.counter(
            "gpu_nvlink_errors", "NVLink data-link errors per link, by counter.", ["link", "counter"]
        )
        for gpu, links in ctx.readings:
            for link in links:
                ctx.add(up, gpu, link.up, str(link.link))
                for (name, _), value in zip(COUNTERS, link.errors, strict=True):
                    ctx.add(errors, gpu, value, str(link.link), name)
        yield from (up, errors)
