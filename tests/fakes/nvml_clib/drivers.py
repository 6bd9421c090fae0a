"""The three driver branches the fake library can be: what each one's libnvidia-ml exports and accepts.

What differs between them, as far as the exporter's calls go (nvml.h of each branch, and the NVML API
reference's "Change log" per release):

- R535 has no nvmlDeviceGetGpuFabricInfoV symbol (pynvml answers FunctionNotFound when it looks the name
  up), only nvmlDeviceGetGpuFabricInfo with the unversioned nvmlGpuFabricInfo_t.
- R550 to R575 export nvmlDeviceGetGpuFabricInfoV and know nvmlGpuFabricInfo_v2_t; the v3 struct (with the
  health summary) is newer than they are and is refused with NVML_ERROR_ARGUMENT_VERSION_MISMATCH.
- R580 knows v3, and still takes v2 (a versioned call accepts the versions before its newest).
- The driver and CUDA versions they report.

The same on all three (and so not a per-branch knob): the scoped NVLink field ids 161 to 165, present
since the headers of R525; nvmlDeviceGetMemoryInfo_v2; nvmlDeviceGetCurrentClocksEventReasons (R535+).
"""

from __future__ import annotations

from dataclasses import dataclass

from .nvml_h import FABRIC_V2, FABRIC_V3


@dataclass(frozen=True)
class Driver:
    branch: str
    version: str  # nvmlSystemGetDriverVersion
    cuda: int  # nvmlSystemGetCudaDriverVersion: 1000 * major + 10 * minor
    missing: frozenset[str]  # symbols this branch's library does not export
    fabric_versions: frozenset[int]  # struct versions nvmlDeviceGetGpuFabricInfoV accepts


R535 = Driver("R535", "535.183.06", 12020, frozenset({"nvmlDeviceGetGpuFabricInfoV"}), frozenset())
R550 = Driver("R550", "550.127.08", 12040, frozenset(), frozenset({FABRIC_V2}))
R580 = Driver("R580", "580.65.06", 13000, frozenset(), frozenset({FABRIC_V2, FABRIC_V3}))
DRIVERS = {d.branch: d for d in (R535, R550, R580)}
