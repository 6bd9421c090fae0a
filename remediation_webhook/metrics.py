"""The webhook's metrics, in a private CollectorRegistry (nothing global, nothing collected at import).

gpu_remediation_actions_total and gpu_remediation_last_success_timestamp_seconds follow
docs/webhook-metrics-contract.md exactly: restored from the journal at start, so they survive restarts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RESULTS = ("success", "failure", "dry_run", "blocked")
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_STEP = (0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 1800, 3600)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=False)
        self.actions = Counter("gpu_remediation_actions", "Remediation actions the webhook finished, by outcome.",
                               ["node", "gpu", "uuid", "action", "result"], registry=r)
        self.last_success = Gauge("gpu_remediation_last_success_timestamp_seconds",
                                  "Unix time at which the action last finished successfully on this node or GPU.",
                                  ["node", "gpu", "uuid", "action"], registry=r)
        self.requests = Counter("gpu_remediation_webhook_requests", "Webhook deliveries answered, by HTTP status.",
                                ["code"], registry=r)
        self.alerts = Counter("gpu_remediation_webhook_alerts", "Alerts received, by the decision taken.",
                              ["decision"], registry=r)
        self.duplicates = Counter("gpu_remediation_webhook_duplicate_alerts",
                                  "Alert occurrences delivered again (recognised, counted, not re-executed).",
                                  registry=r)
        self.truncated = Counter("gpu_remediation_webhook_truncated_alerts",
                                 "Alerts Alertmanager dropped from notifications (truncatedAlerts).", registry=r)
        self.accept_seconds = Histogram("gpu_remediation_webhook_accept_duration_seconds",
                                        "Time from a delivery's arrival to its journal commit.", buckets=_LATENCY,
                                        registry=r)
        self.remediations = Gauge("gpu_remediation_remediations", "Unfinished remediations, by state (in flight).",
                                  ["state"], registry=r)
        self.breaker_open = Gauge("gpu_remediation_breaker_open", "1 while the circuit breaker is open.", registry=r)
        self.breaker_trips = Counter("gpu_remediation_breaker_trips", "Times the circuit breaker tripped.", registry=r)
        self.paused = Gauge("gpu_remediation_paused", "1 while remediation is paused through the admin API.",
                            registry=r)
        self.budget = Gauge("gpu_remediation_budget_remaining",
                            "Actions still allowed now: fleet_cap (nodes) and one per rate-limited action.",
                            ["budget"], registry=r)
        self.pool = Gauge("gpu_remediation_pool_nodes", "Nodes in the remediation pool (denominator of % caps).",
                          registry=r)
        self.step_seconds = Histogram("gpu_remediation_step_duration_seconds", "Duration of remediation steps.",
                                      ["action", "result"], buckets=_STEP, registry=r)
        self.provider_events = Counter("gpu_remediation_provider_events",
                                       "Provider and executor errors by kind (auth, not_found, throttled, capacity, "
                                       "invalid, unsupported, failed, unavailable), fallbacks and human hand-offs.",
                                       ["provider", "action", "kind"], registry=r)
        for state in ("PLANNED", "BLOCKED", "AWAITING_APPROVAL", "RUNNING", "NEEDS_HUMAN", "HEALTHY_DELAY"):
            self.remediations.labels(state).set(0)

    def action_finished(self, node: str, gpu: str, uuid: str, action: str, result: str, ts: float) -> None:
        self.actions.labels(node, gpu, uuid, action, result).inc()
        if result == "success":
            self.last_success.labels(node, gpu, uuid, action).set(ts)

    def restore(self, counts: Iterable[tuple[tuple[str, str, str, str, str], int]],
                last: Iterable[tuple[tuple[str, str, str, str], float]]) -> None:
        for labels, n in counts:
            self.actions.labels(*labels).inc(n)
        for labels4, ts in last:
            self.last_success.labels(*labels4).set(ts)

    def set_states(self, counts: Mapping[str, int]) -> None:
        for state in ("PLANNED", "BLOCKED", "AWAITING_APPROVAL", "RUNNING", "NEEDS_HUMAN", "HEALTHY_DELAY"):
            self.remediations.labels(state).set(counts.get(state, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
