"""Alertmanager webhook receiver that turns GPU health alerts into safe remediation (not built yet)."""
