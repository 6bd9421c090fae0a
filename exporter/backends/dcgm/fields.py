"""The DCGM fields the exporter watches, and which NVML call or field each one stands in for.

Ids, not names: DCGM 4.6 renamed most fields (DCGM_FI_DEV_POWER_USAGE became
DCGM_FI_DEV_BOARD_POWER_WATTS, ...) and resolves the old names with a DeprecationWarning, while
DCGM 3 bindings only know the old names. The numbers have never changed (dcgm_fields.h), so they
are what we pass to DCGM; the 4.6 names are kept here for people reading the code.

Units (dcgm_fields.h, DcgmCacheManager.cpp) against NVML's:
  power 155, limit 164      W (double)       NVML mW      -> round(W * 1000)
  energy 156                mJ               NVML mJ      -> as is
  framebuffer 250-253       MiB (integer)    NVML bytes   -> MiB * 2**20 (sub-MiB precision is lost)
  clocks 100/101            MHz              NVML MHz     -> as is
  utilisation 203/204       percent          NVML percent -> as is
  temperatures              degrees C        NVML C       -> as is
  violations 240/241        the header says ns, dcgm_fields.py says usec: not used by any collector.
"""

from __future__ import annotations

from typing import Final

import pynvml

CUDA_DRIVER_VERSION: Final = 5  # DCGM_FI_CUDA_DRIVER_VERSION, NVML encoding (12040 = 12.4)
PERSISTENCE_MODE: Final = 66  # DCGM_FI_DEV_GPU_PERSISTENCE_MODE
MIG_MODE: Final = 67  # DCGM_FI_DEV_MIG_MODE (current only; DCGM has no pending MIG mode)
SM_CLOCK: Final = 100  # DCGM_FI_DEV_SM_CLOCK
MEM_CLOCK: Final = 101  # DCGM_FI_DEV_MEM_CLOCK
CLOCKS_EVENT_REASONS: Final = 112  # DCGM_FI_DEV_CLOCKS_EVENT_REASONS, the NVML bitmask
MEMORY_TEMP: Final = 140  # DCGM_FI_DEV_MEMORY_TEMP_CELSIUS
GPU_TEMP: Final = 150  # DCGM_FI_DEV_GPU_TEMP_CELSIUS
POWER_USAGE: Final = 155  # DCGM_FI_DEV_BOARD_POWER_WATTS (nvmlDeviceGetPowerUsage / 1000)
TOTAL_ENERGY: Final = 156  # DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION
SLOWDOWN_TEMP: Final = 158  # DCGM_FI_DEV_GPU_TEMP_SLOWDOWN_CELSIUS
SHUTDOWN_TEMP: Final = 159  # DCGM_FI_DEV_GPU_TEMP_SHUTDOWN_CELSIUS
POWER_LIMIT_ENFORCED: Final = 164  # DCGM_FI_DEV_BOARD_POWER_LIMIT_ENFORCED_WATTS
FABRIC_MANAGER_STATUS: Final = 170  # DCGM_FI_DEV_FABRIC_MANAGER_STATUS (dcgmFabricManagerStatus_t)
FABRIC_MANAGER_ERROR: Final = 171  # DCGM_FI_DEV_FABRIC_MANAGER_ERROR
FABRIC_HEALTH_SUMMARY: Final = 175  # DCGM_FI_DEV_FABRIC_HEALTH_SUMMARY
PSTATE: Final = 190  # DCGM_FI_DEV_GPU_PSTATE
PCIE_REPLAY: Final = 202  # DCGM_FI_DEV_PCIE_REPLAY_TOTAL
GPU_UTIL: Final = 203  # DCGM_FI_DEV_GPU_UTIL_RATIO (percent, despite the name)
MEM_COPY_UTIL: Final = 204  # DCGM_FI_DEV_MEM_COPY_UTIL (percent; NVML's utilization.memory)
PCIE_MAX_LINK_GEN: Final = 235  # DCGM_FI_DEV_PCIE_MAX_LINK_GEN
PCIE_MAX_LINK_WIDTH: Final = 236  # DCGM_FI_DEV_PCIE_MAX_LINK_WIDTH
PCIE_LINK_GEN: Final = 237  # DCGM_FI_DEV_PCIE_LINK_GEN
PCIE_LINK_WIDTH: Final = 238  # DCGM_FI_DEV_PCIE_LINK_WIDTH
FB_TOTAL: Final = 250  # DCGM_FI_DEV_FB_TOTAL (MiB)
FB_FREE: Final = 251  # DCGM_FI_DEV_FB_FREE
FB_USED: Final = 252  # DCGM_FI_DEV_FB_USED
FB_RESERVED: Final = 253  # DCGM_FI_DEV_FB_RESERVED
ECC_MODE: Final = 300  # DCGM_FI_DEV_ECC_MODE
ECC_PENDING: Final = 301  # DCGM_FI_DEV_ECC_PENDING
ECC_SBE_VOL_TOTAL: Final = 310  # DCGM_FI_DEV_ECC_SBE_VOL_TOTAL
ECC_DBE_VOL_TOTAL: Final = 311  # DCGM_FI_DEV_ECC_DBE_VOL_TOTAL
ECC_SBE_AGG_TOTAL: Final = 312  # DCGM_FI_DEV_ECC_SBE_AGG_TOTAL
ECC_DBE_AGG_TOTAL: Final = 313  # DCGM_FI_DEV_ECC_DBE_AGG_TOTAL
RETIRED_SBE: Final = 390  # DCGM_FI_DEV_PAGE_RETIRED_SBE_TOTAL
RETIRED_DBE: Final = 391  # DCGM_FI_DEV_PAGE_RETIRED_DBE_TOTAL
RETIRED_PENDING: Final = 392  # DCGM_FI_DEV_PAGE_RETIRED_PENDING
ROW_REMAP_UNCORRECTABLE: Final = 393  # DCGM_FI_DEV_ROW_REMAP_UNCORRECTABLE_TOTAL
ROW_REMAP_CORRECTABLE: Final = 394  # DCGM_FI_DEV_ROW_REMAP_CORRECTABLE_TOTAL
ROW_REMAP_FAILED: Final = 395  # DCGM_FI_DEV_ROW_REMAP_FAILED
ROW_REMAP_PENDING: Final = 396  # DCGM_FI_DEV_ROW_REMAP_PENDING

# Per-link NVLink error counters, links 0-17 (DCGM_FI_DEV_NVLINK_<KIND>_ERROR_L<n>_TOTAL). They are GPU
# fields, so one watch covers them; DCGM 4.6 also has per-link-entity fields (1525-1528, DCGM_FE_LINK)
# that reach links 18-35, which no NVLink generation shipping today uses.
NVLINK_LINKS: Final = 18
_CRC_FLIT = (400, 401, 402, 403, 404, 405, 451, 452, 453, 454, 455, 456, 406, 407, 408, 481, 482, 483)
_CRC_DATA = (410, 411, 412, 413, 414, 415, 457, 458, 459, 460, 461, 462, 416, 417, 418, 484, 485, 486)
_REPLAY = (420, 421, 422, 423, 424, 425, 463, 464, 465, 466, 467, 468, 426, 427, 428, 487, 488, 489)
_RECOVERY = (430, 431, 432, 433, 434, 435, 469, 470, 471, 472, 473, 474, 436, 437, 438, 491, 492, 493)
NVLINK_ERROR_FIELDS: Final[dict[int, tuple[int, ...]]] = {
    pynvml.NVML_NVLINK_ERROR_DL_REPLAY: _REPLAY,
    pynvml.NVML_NVLINK_ERROR_DL_RECOVERY: _RECOVERY,
    pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT: _CRC_FLIT,
    pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA: _CRC_DATA,
}
NVLINK_FIELD_NAMES: Final = {
    fid: f"DCGM_FI_DEV_NVLINK_{kind}_ERROR_L{link}_TOTAL"
    for kind, ids in (("CRC_FLIT", _CRC_FLIT), ("CRC_DATA", _CRC_DATA), ("REPLAY", _REPLAY), ("RECOVERY", _RECOVERY))
    for link, fid in enumerate(ids)
}

# Every GPU field in the watched field group, with its DCGM 4.6 name.
NAMES: Final[dict[int, str]] = {
    CUDA_DRIVER_VERSION: "DCGM_FI_CUDA_DRIVER_VERSION",
    PERSISTENCE_MODE: "DCGM_FI_DEV_GPU_PERSISTENCE_MODE",
    MIG_MODE: "DCGM_FI_DEV_MIG_MODE",
    SM_CLOCK: "DCGM_FI_DEV_SM_CLOCK",
    MEM_CLOCK: "DCGM_FI_DEV_MEM_CLOCK",
    CLOCKS_EVENT_REASONS: "DCGM_FI_DEV_CLOCKS_EVENT_REASONS",
    MEMORY_TEMP: "DCGM_FI_DEV_MEMORY_TEMP_CELSIUS",
    GPU_TEMP: "DCGM_FI_DEV_GPU_TEMP_CELSIUS",
    POWER_USAGE: "DCGM_FI_DEV_BOARD_POWER_WATTS",
    TOTAL_ENERGY: "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
    SLOWDOWN_TEMP: "DCGM_FI_DEV_GPU_TEMP_SLOWDOWN_CELSIUS",
    SHUTDOWN_TEMP: "DCGM_FI_DEV_GPU_TEMP_SHUTDOWN_CELSIUS",
    POWER_LIMIT_ENFORCED: "DCGM_FI_DEV_BOARD_POWER_LIMIT_ENFORCED_WATTS",
    FABRIC_MANAGER_STATUS: "DCGM_FI_DEV_FABRIC_MANAGER_STATUS",
    FABRIC_MANAGER_ERROR: "DCGM_FI_DEV_FABRIC_MANAGER_ERROR",
    FABRIC_HEALTH_SUMMARY: "DCGM_FI_DEV_FABRIC_HEALTH_SUMMARY",
    PSTATE: "DCGM_FI_DEV_GPU_PSTATE",
    PCIE_REPLAY: "DCGM_FI_DEV_PCIE_REPLAY_TOTAL",
    GPU_UTIL: "DCGM_FI_DEV_GPU_UTIL_RATIO",
    MEM_COPY_UTIL: "DCGM_FI_DEV_MEM_COPY_UTIL",
    PCIE_MAX_LINK_GEN: "DCGM_FI_DEV_PCIE_MAX_LINK_GEN",
    PCIE_MAX_LINK_WIDTH: "DCGM_FI_DEV_PCIE_MAX_LINK_WIDTH",
    PCIE_LINK_GEN: "DCGM_FI_DEV_PCIE_LINK_GEN",
    PCIE_LINK_WIDTH: "DCGM_FI_DEV_PCIE_LINK_WIDTH",
    FB_TOTAL: "DCGM_FI_DEV_FB_TOTAL",
    FB_FREE: "DCGM_FI_DEV_FB_FREE",
    FB_USED: "DCGM_FI_DEV_FB_USED",
    FB_RESERVED: "DCGM_FI_DEV_FB_RESERVED",
    ECC_MODE: "DCGM_FI_DEV_ECC_MODE",
    ECC_PENDING: "DCGM_FI_DEV_ECC_PENDING",
    ECC_SBE_VOL_TOTAL: "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
    ECC_DBE_VOL_TOTAL: "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
    ECC_SBE_AGG_TOTAL: "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL",
    ECC_DBE_AGG_TOTAL: "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL",
    RETIRED_SBE: "DCGM_FI_DEV_PAGE_RETIRED_SBE_TOTAL",
    RETIRED_DBE: "DCGM_FI_DEV_PAGE_RETIRED_DBE_TOTAL",
    RETIRED_PENDING: "DCGM_FI_DEV_PAGE_RETIRED_PENDING",
    ROW_REMAP_UNCORRECTABLE: "DCGM_FI_DEV_ROW_REMAP_UNCORRECTABLE_TOTAL",
    ROW_REMAP_CORRECTABLE: "DCGM_FI_DEV_ROW_REMAP_CORRECTABLE_TOTAL",
    ROW_REMAP_FAILED: "DCGM_FI_DEV_ROW_REMAP_FAILED",
    ROW_REMAP_PENDING: "DCGM_FI_DEV_ROW_REMAP_PENDING",
    **NVLINK_FIELD_NAMES,
}
WATCHED: Final[tuple[int, ...]] = tuple(NAMES)

# nvmlDeviceGetFieldValues ids the collectors ask for -> the DCGM field that answers them.
NVML_FIELDS: Final[dict[int, int]] = {
    pynvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL: ECC_SBE_VOL_TOTAL,
    pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL: ECC_DBE_VOL_TOTAL,
    pynvml.NVML_FI_DEV_ECC_SBE_AGG_TOTAL: ECC_SBE_AGG_TOTAL,
    pynvml.NVML_FI_DEV_ECC_DBE_AGG_TOTAL: ECC_DBE_AGG_TOTAL,
    pynvml.NVML_FI_DEV_RETIRED_SBE: RETIRED_SBE,
    pynvml.NVML_FI_DEV_RETIRED_DBE: RETIRED_DBE,
    pynvml.NVML_FI_DEV_RETIRED_PENDING: RETIRED_PENDING,
    pynvml.NVML_FI_DEV_MEMORY_TEMP: MEMORY_TEMP,
    pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER: PCIE_REPLAY,
    pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION: TOTAL_ENERGY,
}
# Answered from dcgmGetNvLinkLinkStatus, not from a field.
NVML_NVLINK_LINK_COUNT: Final = pynvml.NVML_FI_DEV_NVLINK_LINK_COUNT

# Health watch systems (dcgm_structs.DCGM_HEALTH_WATCH_*), by the name used in the `system` label.
HEALTH_SYSTEMS: Final[dict[str, int]] = {
    "pcie": 0x1,
    "nvlink": 0x2,
    "pmu": 0x4,
    "mcu": 0x8,
    "mem": 0x10,
    "sm": 0x20,
    "inforom": 0x40,
    "thermal": 0x80,
    "power": 0x100,
    "driver": 0x200,
    "nvswitch_nonfatal": 0x400,
    "nvswitch_fatal": 0x800,
    "connectx": 0x1000,
}
HEALTH_WATCH_ALL: Final = 0xFFFFFFFF
# Systems that concern a GPU entity, and those that concern an NVSwitch entity.
GPU_SYSTEMS: Final = ("pcie", "nvlink", "pmu", "mcu", "mem", "sm", "inforom", "thermal", "power", "driver")
NVSWITCH_SYSTEMS: Final = ("nvswitch_nonfatal", "nvswitch_fatal")


def system_name(bit: int) -> str:
    for name, value in HEALTH_SYSTEMS.items():
        if value == bit:
            return name
    return f"0x{bit:x}"


def parse_health_systems(text: str, flag: str = "--dcgm.health-systems") -> int:
    """ "all" or a comma list of system names -> the DCGM_HEALTH_WATCH_* mask; ValueError names the bad one."""
    words = [w.strip().lower() for w in text.split(",") if w.strip()]
    if not words:
        raise ValueError(f"{flag}: expected 'all' or a comma list of {', '.join(HEALTH_SYSTEMS)}")
    if words == ["all"]:
        return HEALTH_WATCH_ALL
    mask = 0
    for word in words:
        if word not in HEALTH_SYSTEMS:
            raise ValueError(f"{flag}: unknown system {word!r}; choose 'all' or from {', '.join(HEALTH_SYSTEMS)}")
        mask |= HEALTH_SYSTEMS[word]
    return mask
