"""gpu-health exporter: every NVML health signal of a node's GPUs on a Prometheus /metrics endpoint."""

__version__ = "0.1.0"
