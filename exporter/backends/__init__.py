"""GPU backends. Each one looks like the `pynvml` module: same function names, return types and exceptions."""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["Nvml"]


class Nvml(Protocol):
    """The slice of nvidia-ml-py's `pynvml` module the collectors use.

    The real backend is the `pynvml` module itself; the simulator implements the same names.
    Only a few are listed for the type checker; collectors call others by the same pynvml names.
    """

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def __getattr__(self, name: str) -> Any: ...
