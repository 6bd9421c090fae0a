"""One GPU as the collectors see it: NVML calls with NotSupported, lost-GPU and hang bookkeeping."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import pynvml

from .backends import Nvml
from .errors import GpuLost
from .pci import nvml_pci_id

log = logging.getLogger(__name__)


class _Unsupported:
    """Sentinel for a call or field the GPU or driver does not support."""

    def __repr__(self) -> str:
        return "UNSUPPORTED"

    def __bool__(self) -> bool:
        return False


UNSUPPORTED: Final = _Unsupported()

# A missing function (old driver, or a name gone from the bindings) is as much "not supported" as
# NotSupported itself, and so is a struct version the driver does not know (ARGUMENT_VERSION_MISMATCH:
# a versioned call made with a newer struct than this driver has).
UNSUPPORTED_CODES: Final = frozenset({
    pynvml.NVML_ERROR_NOT_SUPPORTED,
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
})
# These mean the GPU is gone until a reset or reboot; every later call would fail the same way.
LOST_CODES: Final = frozenset(
    {pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_RESET_REQUIRED, pynvml.NVML_ERROR_GPU_NOT_FOUND}
)

_FIELD_NAMES: Final = {
    value: name for name, value in vars(pynvml).items() if name.startswith("NVML_FI_DEV_") and isinstance(value, int)
}

_VALUE_DECODERS: Final[dict[int, Callable[[Any], float]]] = {
    pynvml.NVML_VALUE_TYPE_DOUBLE: lambda v: v.dVal,
    pynvml.NVML_VALUE_TYPE_UNSIGNED_INT: lambda v: v.uiVal,
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG: lambda v: v.ulVal,
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: lambda v: v.ullVal,
    pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: lambda v: v.sllVal,
    pynvml.NVML_VALUE_TYPE_SIGNED_INT: lambda v: v.siVal,
    pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT: lambda v: v.usVal,
}


def field_name(field_id: int | tuple[int, int]) -> str:
    """pynvml's constant name for a field id, for logs and the unsupported series.

    A scoped field (id, scopeId), such as an NVLink counter of one link, is named with its scope:
    `NVML_FI_DEV_NVLINK_GET_STATE[5]`, so the series says which link lacks it.
    """
    if isinstance(field_id, tuple):
        fid, scope = field_id
        return f"{field_name(fid)}[{scope}]"
    return _FIELD_NAMES.get(field_id, f"field_{field_id}")


def nvml_init(nvml: Nvml) -> None:
    """nvmlInit that does not fail on a node without GPUs (NVML_INIT_FLAG_NO_GPUS).

    Without the flag NVML refuses to initialise when it finds no GPU, which would read as "NVML down"
    (gpu_nvml_up 0) instead of "0 GPUs visible". A backend without nvmlInitWithFlags (the simulator
    before it had one, an old binding) gets the plain nvmlInit.
    """
    try:
        init_with_flags = nvml.nvmlInitWithFlags
    except AttributeError:
        nvml.nvmlInit()
        return
    try:
        init_with_flags(pynvml.NVML_INIT_FLAG_NO_GPUS)
    except pynvml.NVMLError as exc:
        if exc.value != pynvml.NVML_ERROR_FUNCTION_NOT_FOUND:
            raise
        nvml.nvmlInit()


def to_str(value: str | bytes) -> str:
    """pynvml returns str from functions but bytes from struct char arrays."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


@dataclass
class CallTrace:
    """Per-function latencies in seconds; used by the real-GPU check, off in production."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            self.latencies.setdefault(name, []).append(seconds)


class Device:
    """A GPU handle plus the bookkeeping the poller needs to report on it.

    Every NVML call for a GPU goes through here, on that GPU's worker thread only. The poller reads
    `current_call` from its own thread to tell a stuck call from a slow one; a tuple swap is atomic.
    """

    def __init__(self, nvml: Nvml, index: int, *, trace: CallTrace | None = None) -> None:
        self.nvml = nvml
        self.index = index
        self.handle: Any = None
        self.uuid = "unknown"
        self.pci_bus_id = ""
        self.trace = trace
        self.current_call: tuple[str, float] | None = None
        # NotSupported calls per collector, replaced after each of its reads: support can come back
        # (MIG turned off again), and then the series must say so.
        self.unsupported_by: dict[str, frozenset[str]] = {}
        self._collector = ""
        self._pending: set[str] = set()
        self._logged: set[str] = set()
        self.cache: dict[str, Any] = {}

    @property
    def unsupported(self) -> frozenset[str]:
        return frozenset().union(*self.unsupported_by.copy().values())

    def begin(self, collector: str) -> None:
        """Start a collector's read: NotSupported seen from now on is attributed to it."""
        self._collector, self._pending = collector, set()

    def end(self) -> None:
        self.unsupported_by[self._collector] = frozenset(self._pending)

    def open(self) -> None:
        """Get the handle and the identity every series carries."""
        self.handle = self._invoke("nvmlDeviceGetHandleByIndex", (self.index,), with_handle=False)
        self.uuid = to_str(self._invoke("nvmlDeviceGetUUID", ()))
        # One spelling everywhere (gpu_info, the Xid map, the status page): exporter/pci.py.
        self.pci_bus_id = nvml_pci_id(to_str(self._invoke("nvmlDeviceGetPciInfo_v3", ()).busId))

    def system(self, name: str, *args: Any) -> Any:
        """A pynvml call without a device handle (driver version), tracked like any other for hangs."""
        return self._invoke(name, args, with_handle=False)

    def call(self, name: str, *args: Any) -> Any:
        """Call `pynvml.<name>(handle, *args)`; NVMLError propagates, a lost GPU raises GpuLost."""
        return self._invoke(name, args)

    def optional(self, name: str, *args: Any) -> Any:
        """Like call(), but NotSupported returns UNSUPPORTED and is remembered (and logged once)."""
        try:
            return self._invoke(name, args)
        except pynvml.NVMLError as exc:
            if exc.value in UNSUPPORTED_CODES:
                self.mark_unsupported(name)
                return UNSUPPORTED
            if exc.value == pynvml.NVML_ERROR_NO_DATA:
                return UNSUPPORTED  # no sample yet (a DCGM blank): absent this cycle, not unsupported
            raise

    def fields(self, field_ids: Sequence[int | tuple[int, int]], *, mark: bool = True) -> list[Any]:
        """Batch read with nvmlDeviceGetFieldValues; each entry is a number or UNSUPPORTED.

        Each field carries its own return code: NotSupported or NoData makes that entry UNSUPPORTED
        (and, with `mark`, reported in gpu_nvml_unsupported), any other failure raises as the
        equivalent single call would. A (field id, scopeId) pair reads a scoped field, e.g. one link.
        """
        values = self.optional("nvmlDeviceGetFieldValues", list(field_ids))
        if values is UNSUPPORTED:
            return [UNSUPPORTED] * len(field_ids)
        out: list[Any] = []
        for requested, fv in zip(field_ids, values, strict=True):
            ret = fv.nvmlReturn
            if ret == pynvml.NVML_SUCCESS:
                out.append(_VALUE_DECODERS[fv.valueType](fv.value))
            elif ret in UNSUPPORTED_CODES or ret == pynvml.NVML_ERROR_NO_DATA:
                if mark:
                    self.mark_unsupported(field_name(requested))
                out.append(UNSUPPORTED)
            else:
                self._raise(pynvml.NVMLError(ret), f"nvmlDeviceGetFieldValues({field_name(requested)})")
        return out

    def cached(self, key: str, load: Callable[[], Any]) -> Any:
        """Values that never change while the driver is loaded (thresholds, limits) are read once."""
        if key not in self.cache:
            self.cache[key] = load()
        return self.cache[key]

    def _invoke(self, name: str, args: Iterable[Any], *, with_handle: bool = True) -> Any:
        started = time.monotonic()
        self.current_call = (name, started)
        try:
            try:
                fn = getattr(self.nvml, name)
            except AttributeError:
                # A function the installed bindings (or this backend) lack is as unsupported as one the
                # driver lacks: FunctionNotFound, which optional() reports and call() raises as NVML would.
                raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND) from None
            return fn(self.handle, *args) if with_handle else fn(*args)
        except pynvml.NVMLError as exc:
            if exc.value in LOST_CODES:
                self._raise(exc, name)
            raise
        finally:
            self.current_call = None
            if self.trace is not None:
                self.trace.add(name, time.monotonic() - started)

    def _raise(self, exc: pynvml.NVMLError, what: str) -> None:
        if exc.value in LOST_CODES:
            raise GpuLost(self.index, exc.value, f"{what}: {exc}") from exc
        raise exc

    def mark_unsupported(self, what: str) -> None:
        """Report `what` (a call or field name) as not supported on this GPU by the running collector."""
        self._pending.add(what)
        if what not in self._logged:
            self._logged.add(what)
            log.info("not supported on this GPU, skipped", extra={"gpu": self.index, "call": what})
