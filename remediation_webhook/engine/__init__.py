"""The engine: drives every remediation rung by rung (core), reconciles steps a restart interrupted (reconcile),
undoes our cordon after the healthy delay (undo), keeps the fleet cap true to the nodes (fleet), climbs the
ladder when a condition persists (settle), decides again for alerts left without an owner (replan), and
publishes the gauges (gauges)."""

from .core import Engine

__all__ = ["Engine"]
