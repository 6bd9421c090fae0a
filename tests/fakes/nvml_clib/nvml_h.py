"""What the fake library takes from nvml.h: return codes, field ids, buffer sizes and struct layouts.

Declared here from nvml.h, never taken from pynvml: the fake reads and writes these at the addresses
pynvml passes, as libnvidia-ml would, so if pynvml's own ctypes struct or constant disagreed with
nvml.h (a field missing, a wrong width, a wrong version), the values read back or the version check
would show it. Only what the exporter's calls use.
"""

from __future__ import annotations

import ctypes
from ctypes import c_char, c_double, c_int, c_longlong, c_uint, c_ulong, c_ulonglong, c_ushort, c_void_p

# nvmlReturn_t values.
SUCCESS = 0
ERROR_UNINITIALIZED = 1
ERROR_INVALID_ARGUMENT = 2
ERROR_NOT_SUPPORTED = 3
ERROR_NOT_FOUND = 6
ERROR_INSUFFICIENT_SIZE = 7
ERROR_TIMEOUT = 10
ERROR_FUNCTION_NOT_FOUND = 13
ERROR_GPU_IS_LOST = 15
ERROR_ARGUMENT_VERSION_MISMATCH = 25
ERROR_UNKNOWN = 999

# nvmlErrorString's text for each code the fake returns (the wording of the real library, not byte-checked).
ERROR_STRINGS = {
    SUCCESS: "Success",
    ERROR_UNINITIALIZED: "Uninitialized",
    ERROR_INVALID_ARGUMENT: "Invalid Argument",
    ERROR_NOT_SUPPORTED: "Not Supported",
    ERROR_NOT_FOUND: "Not Found",
    ERROR_INSUFFICIENT_SIZE: "Insufficient Size",
    ERROR_TIMEOUT: "Timeout",
    ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    ERROR_GPU_IS_LOST: "GPU is lost",
    ERROR_ARGUMENT_VERSION_MISMATCH: "Argument version mismatch",
    ERROR_UNKNOWN: "Unknown Error",
}

INIT_FLAG_NO_GPUS = 1  # NVML_INIT_FLAG_NO_GPUS: "Don't fail nvmlInit() when no GPUs are found"

# nvmlValueType_t
VALUE_TYPE_UNSIGNED_INT = 1
VALUE_TYPE_UNSIGNED_LONG_LONG = 3

# Field ids (NVML_FI_DEV_*) the fake answers; any other id is refused per value with INVALID_ARGUMENT.
FI_ECC_SBE_VOL_TOTAL = 3
FI_ECC_DBE_VOL_TOTAL = 4
FI_ECC_SBE_AGG_TOTAL = 5
FI_ECC_DBE_AGG_TOTAL = 6
FI_RETIRED_SBE = 29
FI_RETIRED_DBE = 30
FI_RETIRED_PENDING = 31
FI_MEMORY_TEMP = 82
FI_NVLINK_LINK_COUNT = 91
# Scoped per link (scopeId = link): "NVLink Replay/Recovery/CRC Error Counter", "NVLink State".
FI_NVLINK_ERROR_DL_REPLAY = 161
FI_NVLINK_ERROR_DL_RECOVERY = 162
FI_NVLINK_ERROR_DL_CRC = 163
FI_NVLINK_GET_STATE = 165
NVLINK_SCOPED = frozenset({FI_NVLINK_ERROR_DL_REPLAY, FI_NVLINK_ERROR_DL_RECOVERY, FI_NVLINK_ERROR_DL_CRC,
                           FI_NVLINK_GET_STATE})

# nvmlNvLinkErrorCounter_t, for the per-link call nvmlDeviceGetNvLinkErrorCounter.
NVLINK_ERROR_DL_REPLAY = 0
NVLINK_ERROR_DL_RECOVERY = 1
NVLINK_ERROR_DL_CRC_FLIT = 2
NVLINK_ERROR_DL_CRC_DATA = 3

NVLINK_STATE_INACTIVE = 0
NVLINK_STATE_ACTIVE = 1
FEATURE_DISABLED = 0
FEATURE_ENABLED = 1
GPU_FABRIC_STATE_COMPLETED = 3
EVENT_TYPE_XID_CRITICAL_ERROR = 0x8  # nvmlEventTypeXidCriticalError

# nvml.h buffer sizes (NVML_*_BUFFER_SIZE) the wrappers allocate; a shorter buffer is INSUFFICIENT_SIZE.
UUID_V2_BUFFER_SIZE = 96
SERIAL_BUFFER_SIZE = 30
NAME_V2_BUFFER_SIZE = 96
VBIOS_VERSION_BUFFER_SIZE = 32
DRIVER_VERSION_BUFFER_SIZE = 80
FABRIC_UUID_LEN = 16  # NVML_GPU_FABRIC_UUID_LEN


def struct_version(struct: type[ctypes.Structure], version: int) -> int:
    """nvml.h's NVML_STRUCT_VERSION(data, ver): sizeof(the struct) | ver << 24."""
    return ctypes.sizeof(struct) | version << 24


class PciInfo(ctypes.Structure):
    """nvmlPciInfo_t (the layout nvmlDeviceGetPciInfo_v3 fills)."""

    _fields_ = [
        ("busIdLegacy", c_char * 16),  # NVML_DEVICE_PCI_BUS_ID_BUFFER_V2_SIZE
        ("domain", c_uint),
        ("bus", c_uint),
        ("device", c_uint),
        ("pciDeviceId", c_uint),
        ("pciSubSystemId", c_uint),
        ("busId", c_char * 32),  # NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE
    ]


class Utilization(ctypes.Structure):
    """nvmlUtilization_t: percent of the last sample period."""

    _fields_ = [("gpu", c_uint), ("memory", c_uint)]


class Memory_v2(ctypes.Structure):
    """nvmlMemory_v2_t (nvmlDeviceGetMemoryInfo_v2), bytes."""

    _fields_ = [
        ("version", c_uint),
        ("total", c_ulonglong),
        ("reserved", c_ulonglong),
        ("free", c_ulonglong),
        ("used", c_ulonglong),
    ]


class Value(ctypes.Union):
    """nvmlValue_t."""

    _fields_ = [
        ("dVal", c_double),
        ("siVal", c_int),
        ("uiVal", c_uint),
        ("ulVal", c_ulong),
        ("ullVal", c_ulonglong),
        ("sllVal", c_longlong),
        ("usVal", c_ushort),
    ]


class FieldValue(ctypes.Structure):
    """nvmlFieldValue_t: the caller sets fieldId and scopeId, the library the rest, per entry."""

    _fields_ = [
        ("fieldId", c_uint),
        ("scopeId", c_uint),
        ("timestamp", c_longlong),
        ("latencyUsec", c_longlong),
        ("valueType", c_uint),  # nvmlValueType_t
        ("nvmlReturn", c_uint),  # nvmlReturn_t
        ("value", Value),
    ]


class GpuFabricInfo(ctypes.Structure):
    """nvmlGpuFabricInfo_t: the unversioned struct of nvmlDeviceGetGpuFabricInfo (R535)."""

    _fields_ = [
        ("clusterUuid", ctypes.c_ubyte * FABRIC_UUID_LEN),
        ("status", c_uint),  # nvmlReturn_t
        ("cliqueId", c_uint),
        ("state", ctypes.c_ubyte),  # nvmlGpuFabricState_t
    ]


class GpuFabricInfo_v2(ctypes.Structure):
    """nvmlGpuFabricInfo_v2_t (nvmlDeviceGetGpuFabricInfoV, R550 and newer): adds version and healthMask."""

    _fields_ = [
        ("version", c_uint),
        ("clusterUuid", ctypes.c_ubyte * FABRIC_UUID_LEN),
        ("status", c_uint),
        ("cliqueId", c_uint),
        ("state", ctypes.c_ubyte),
        ("healthMask", c_uint),
    ]


class GpuFabricInfo_v3(ctypes.Structure):
    """nvmlGpuFabricInfo_v3_t (R580): adds healthSummary."""

    _fields_ = [*GpuFabricInfo_v2._fields_, ("healthSummary", ctypes.c_ubyte)]


class EventData(ctypes.Structure):
    """nvmlEventData_t, as nvmlEventSetWait_v2 fills it."""

    _fields_ = [
        ("device", c_void_p),  # nvmlDevice_t
        ("eventType", c_ulonglong),
        ("eventData", c_ulonglong),
        ("gpuInstanceId", c_uint),
        ("computeInstanceId", c_uint),
    ]


MEMORY_V2 = struct_version(Memory_v2, 2)
FABRIC_V2 = struct_version(GpuFabricInfo_v2, 2)
FABRIC_V3 = struct_version(GpuFabricInfo_v3, 3)
