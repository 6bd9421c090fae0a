"""pynvml's event API for the simulator: enough for the exporter's Xid event thread to run and hold NVML.

Faithful to nvidia-ml-py 13.x in names, arguments and errors: `nvmlEventSetCreate()` returns an opaque set,
`nvmlDeviceGetSupportedEventTypes(handle)` a bitmask, `nvmlDeviceRegisterEvents(handle, types, set)` refuses
types the GPU does not support with NOT_SUPPORTED, `nvmlEventSetWait_v2(set, timeout_ms)` blocks for the timeout
and raises `pynvml.NVMLError(NVML_ERROR_TIMEOUT)` (an NVMLError_Timeout, as pynvml raises it), and every call
answers UNINITIALIZED while NVML is not initialised. A registered GPU that is lost makes the wait answer
GPU_IS_LOST (nvml.h: "if the target GPU has fallen off the bus").

Not modelled: delivering events (no fault kind produces one; Xid faults live in the simulated kernel log), the
per-SKU supported mask (every model answers the same one), waking a wait early.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

import pynvml

if TYPE_CHECKING:
    from .sim import SimHandle, SimulatedNvml

SUPPORTED = (
    pynvml.nvmlEventTypeXidCriticalError | pynvml.nvmlEventTypeDoubleBitEccError
    | pynvml.nvmlEventTypePState | pynvml.nvmlEventTypeClock
)


@dataclass(eq=False)
class SimEventSet:
    """What nvmlEventSetCreate returns: opaque to callers, as the real c_nvmlEventSet_t is."""

    registered: dict[int, int] = field(default_factory=dict)  # GPU index -> event types
    freed: bool = False


class SimEvents:
    """The five event functions, bound onto a SimulatedNvml that has a driver directory."""

    def __init__(self, sim: SimulatedNvml) -> None:
        self._sim = sim

    def _check(self, event_set: SimEventSet) -> None:
        if not self._sim.init_count:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        if not isinstance(event_set, SimEventSet) or event_set.freed:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def nvmlEventSetCreate(self) -> SimEventSet:
        if not self._sim.init_count:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        return SimEventSet()

    def nvmlDeviceGetSupportedEventTypes(self, handle: SimHandle) -> int:
        self._sim._gpu(handle, "nvmlDeviceGetSupportedEventTypes")
        return SUPPORTED

    def nvmlDeviceRegisterEvents(self, handle: SimHandle, eventTypes: int, eventSet: SimEventSet) -> None:
        gpu = self._sim._gpu(handle, "nvmlDeviceRegisterEvents")
        self._check(eventSet)
        if eventTypes & ~SUPPORTED:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        eventSet.registered[gpu.index] = eventSet.registered.get(gpu.index, 0) | eventTypes

    def nvmlEventSetWait_v2(self, eventSet: SimEventSet, timeoutms: int) -> NoReturn:
        self._check(eventSet)
        for index in eventSet.registered:
            if self._sim.is_lost(index):
                raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        time.sleep(timeoutms / 1000)
        raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)

    def nvmlEventSetFree(self, eventSet: SimEventSet) -> None:
        self._check(eventSet)
        eventSet.freed = True
