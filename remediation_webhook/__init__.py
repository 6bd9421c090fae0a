"""Alertmanager webhook receiver that turns GPU health alerts into safe, journaled Kubernetes remediation."""

__version__ = "0.1.0"
