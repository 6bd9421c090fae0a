"""Who each GPU is: one info series with everything that identifies it, refreshed on the slow tier."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pynvml
from prometheus_client.core import Metric

from ..device import UNSUPPORTED, Device, to_str
from ..registry import RenderContext, Tier

_LABELS = (
    "serial", "pci_bus_id", "model", "driver_version", "vbios_version",
    "cuda_version", "mig_mode", "persistence_mode",
)


@dataclass(frozen=True, slots=True)
class Identity:
    serial: str
    pci_bus_id: str
    model: str
    driver_version: str
    vbios_version: str
    cuda_version: str
    mig_mode: str
    persistence_mode: str


def _text(value: object) -> str:
    return "" if value is UNSUPPORTED else to_str(value)  # type: ignore[arg-type]


def _cuda(version: object) -> str:
    # NVML encodes CUDA 12.4 as 12040.
    return "" if not isinstance(version, int) else f"{version // 1000}.{version % 1000 // 10}"


def _mode(value: object) -> str:
    if value is UNSUPPORTED:
        return "unsupported"
    return "enabled" if value == pynvml.NVML_FEATURE_ENABLED else "disabled"


class IdentityCollector:
    name = "identity"
    description = "gpu_info: index, uuid, serial, PCI bus id, model, driver, VBIOS, CUDA, MIG and persistence mode."
    tier = Tier.SLOW
    default_enabled = True

    def read(self, dev: Device) -> Identity:
        mig = dev.optional("nvmlDeviceGetMigMode")
        return Identity(
            serial=_text(dev.optional("nvmlDeviceGetSerial")),
            pci_bus_id=dev.pci_bus_id,
            model=_text(dev.optional("nvmlDeviceGetName")),
            driver_version=to_str(dev.system("nvmlSystemGetDriverVersion")),
            vbios_version=_text(dev.optional("nvmlDeviceGetVbiosVersion")),
            cuda_version=_cuda(dev.system("nvmlSystemGetCudaDriverVersion")),
            mig_mode=_mode(UNSUPPORTED if mig is UNSUPPORTED else mig[0]),
            persistence_mode=_mode(dev.optional("nvmlDeviceGetPersistenceMode")),
        )

    def families(self, ctx: RenderContext) -> Iterable[Metric]:
        info = ctx.info("gpu", "Identity of each GPU; join on gpu and uuid for model, driver and more.", _LABELS)
        for gpu, r in ctx.readings:
            info.add_metric([ctx.node, str(gpu.index), gpu.uuid, *(getattr(r, k) for k in _LABELS)], {})
        yield info
