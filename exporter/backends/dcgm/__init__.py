"""The DCGM backend: NVIDIA's Data Center GPU Manager, embedded or through nv-hostengine.

  load_bindings(path)          DCGM's own Python bindings (not on PyPI); BackendUnavailable if absent
  DcgmConnection               one host-engine connection: I/O thread, deadline, reconnect, health
  DcgmNvml                     the pynvml calls the collectors make, answered from DCGM's watches
  make_dcgm_backend(settings, interval)   what --backend dcgm uses

The dcgm and dcgm_health collectors (exporter/collectors/dcgm_health.py) share the same connection.
"""

from .bindings import DEFAULT_PATHS, Bindings, load_bindings
from .connection import (
    ConnectionState,
    DcgmConnection,
    DcgmError,
    DcgmUnavailable,
    GpuHealth,
    NodeHealth,
    acquire,
    release,
)
from .nvml import DcgmGpuHandle, DcgmNvml, make_dcgm_backend

__all__ = [
    "DEFAULT_PATHS", "Bindings", "ConnectionState", "DcgmConnection", "DcgmError", "DcgmGpuHandle", "DcgmNvml",
    "DcgmUnavailable", "GpuHealth", "NodeHealth", "acquire", "load_bindings", "make_dcgm_backend", "release",
]
