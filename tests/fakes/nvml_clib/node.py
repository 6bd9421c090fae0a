"""The hardware behind the fake library: GPUs with fixed readings that a test can change between cycles.

Defaults are an HGX H100 board (8 x H100 SXM5 80GB, 18 NVLinks each, NVSwitch fabric): the names, bus ids
and limits are those such a node reports; the readings are fixed numbers, not a model of load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# PCI buses of the eight GPUs of an HGX H100 baseboard (domain 0).
HGX_H100_BUSES = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)


@dataclass
class Gpu:
    index: int
    bus: int
    name: str = "NVIDIA H100 80GB HBM3"
    vbios: str = "96.00.99.00.01"
    pci_device_id: int = 0x233010DE  # device 0x2330, vendor 0x10DE
    pci_subsystem_id: int = 0x16C110DE
    temperature: int = 34
    memory_temperature: int = 41
    slowdown: int = 87
    shutdown: int = 92
    power_mw: int = 71_500
    power_limit_mw: int = 700_000
    energy_mj: int = 123_456_789
    sm_mhz: int = 1980
    memory_mhz: int = 2619
    clock_reasons: int = 0x1  # idle
    pstate: int = 0
    utilization: tuple[int, int] = (0, 0)  # gpu, memory (percent)
    memory: tuple[int, int, int] = (85_520_809_984, 578_813_952, 4_194_304)  # total, reserved, used (bytes)
    ecc: dict[int, int] = field(default_factory=dict)  # ECC field id -> count (0 when absent)
    remapped: tuple[int, int, int, int] = (0, 0, 0, 0)  # correctable, uncorrectable, pending, failure
    page_retirement: bool = False  # Ampere and newer remap rows instead: the retired-page fields are NotSupported
    pcie: tuple[int, int, int, int, int] = (0, 5, 5, 16, 16)  # replays, gen, max gen, width, max width
    nvlinks: int = 18
    links_down: set[int] = field(default_factory=set)
    link_errors: dict[tuple[int, int], int] = field(default_factory=dict)  # (field id, link) -> count
    link_unsupported: set[tuple[int, int]] = field(default_factory=set)  # (field id, link) NotSupported
    fabric: bool = True  # attached to NVSwitches and registered with Fabric Manager
    fabric_health_summary: int = 0  # v3 healthSummary: H100 answers NOT_SUPPORTED (0)
    lost: bool = False  # every call on the GPU answers NVML_ERROR_GPU_IS_LOST

    @property
    def uuid(self) -> str:
        return f"GPU-5c1a{self.index:04x}-7e2b-4f0c-9d3e-0a1b2c3d4e{self.bus:02x}"

    @property
    def serial(self) -> str:
        return f"16532230{self.index:05d}"

    @property
    def bus_id(self) -> str:
        return f"00000000:{self.bus:02X}:00.0"


@dataclass
class Node:
    gpus: list[Gpu]


def hgx_h100(count: int = 8) -> Node:
    return Node([Gpu(i, HGX_H100_BUSES[i % len(HGX_H100_BUSES)]) for i in range(count)])
