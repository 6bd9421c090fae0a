"""The exporter's exception tree.

ExporterError
 +-- ConfigError          a flag, the web config or the simulator config is wrong; names the key
 +-- BackendUnavailable   the chosen backend cannot start (no libnvidia-ml, no DCGM bindings)
 +-- GpuLost              a GPU stopped answering for good (NVMLError_GpuIsLost and friends)
"""


class ExporterError(Exception):
    """Base class for every error the exporter raises on purpose."""


class ConfigError(ExporterError):
    """A flag or configuration file is invalid; the message names the key."""


class BackendUnavailable(ExporterError):
    """The selected GPU backend cannot be used on this host."""


class GpuLost(ExporterError):
    """NVML reported the GPU lost, gone, or in need of a reset."""

    def __init__(self, index: int, code: int, message: str) -> None:
        super().__init__(f"GPU {index}: {message}")
        self.index = index
        self.code = code
