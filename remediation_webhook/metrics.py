"""The webhook's metrics, in a private CollectorRegistry (nothing global, nothing collected at import).

The families the rules read follow docs/webhook-metrics-contract.md exactly. The history they read is published
as gauges recomputed from the journal (every process shows the same values, so a restart, a new `instance` or a
scrape gap cannot invent or erase history); the counters are restored from the journal at start for dashboards.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RESULTS = ("success", "failure", "dry_run", "blocked")
STATES = ("PLANNED", "BLOCKED", "AWAITING_APPROVAL", "RUNNING", "NEEDS_HUMAN", "HEALTHY_DELAY", "HELD")
DECISIONS = ("planned", "duplicate", "merged", "resumed", "ignored", "refused", "rejected", "already_remediated",
             "unconfirmed", "conflict")
SLOT_RELEASES = ("uncordoned", "gone", "replaced", "overridden", "admin")
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_STEP = (0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 1800, 3600)
_LAST = {"success": "last_success", "failure": "last_failure"}


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=False)
        # History (the rules read it).
        self.actions = Counter("gpu_remediation_actions", "Remediation actions the webhook finished, by outcome "
                               "(restored from the journal at start: lifetime totals).",
                               ["node", "gpu", "uuid", "action", "result"], registry=r)
        self.successful = Gauge("gpu_remediation_successful_actions",
                                "Successful actions in the trailing window, counted in the journal, since the "
                                "node's last replace.", ["node", "gpu", "uuid", "action", "window"], registry=r)
        self.last_success = Gauge("gpu_remediation_last_success_timestamp_seconds",
                                  "Unix time at which the action last finished successfully on this node or GPU.",
                                  ["node", "gpu", "uuid", "action"], registry=r)
        self.last_failure = Gauge("gpu_remediation_last_failure_timestamp_seconds",
                                  "Unix time at which the action last failed on this node or GPU.",
                                  ["node", "gpu", "uuid", "action"], registry=r)
        self.provider_events = Counter("gpu_remediation_provider_events",
                                       "Provider and executor errors by kind (auth, not_found, throttled, capacity, "
                                       "invalid, unsupported, failed, unavailable), fallbacks and human hand-offs.",
                                       ["provider", "action", "kind"], registry=r)
        # The remediator's own state.
        self.remediations = Gauge("gpu_remediation_remediations", "Unfinished remediations, by state (in flight).",
                                  ["state"], registry=r)
        self.state_since = Gauge("gpu_remediation_state_since_timestamp_seconds",
                                 "Unix time at which the oldest unfinished remediation in this state entered it.",
                                 ["state"], registry=r)
        self.breaker_open = Gauge("gpu_remediation_breaker_open", "1 while the circuit breaker is open.", registry=r)
        self.breaker_since = Gauge("gpu_remediation_breaker_open_since_timestamp_seconds",
                                   "Unix time at which the open breaker tripped; 0 while it is closed.", registry=r)
        self.breaker_trips = Counter("gpu_remediation_breaker_trips", "Times the circuit breaker tripped.", registry=r)
        self.paused = Gauge("gpu_remediation_paused", "1 while remediation is paused through the admin API.",
                            registry=r)
        self.paused_since = Gauge("gpu_remediation_paused_since_timestamp_seconds",
                                  "Unix time at which remediation was paused; 0 while it is not paused.", registry=r)
        self.budget = Gauge("gpu_remediation_budget_remaining",
                            "Actions still allowed now: fleet_cap (nodes) and one per rate-limited action.",
                            ["budget"], registry=r)
        self.pool = Gauge("gpu_remediation_pool_nodes", "Nodes in the remediation pool (denominator of % caps).",
                          registry=r)
        self.slot_releases = Counter("gpu_remediation_slot_releases",
                                     "Fleet-cap slots given back, by why: uncordoned (by someone else), gone, "
                                     "replaced, overridden (mid-remediation), admin (by hand).", ["reason"],
                                     registry=r)
        self.operands_paused = Gauge("gpu_remediation_operands_paused",
                                     "Nodes whose GPU Operator operands a GPU reset of ours holds paused.", registry=r)
        self.operands_paused_since = Gauge("gpu_remediation_operands_paused_since_timestamp_seconds",
                                           "Unix time at which a reset paused the node's GPU Operator operands; "
                                           "a series only while they are paused.", ["node"], registry=r)
        self.operand_restores = Counter("gpu_remediation_operand_restores",
                                        "GPU Operator operand labels put back by the engine's sweep because the "
                                        "reset that paused them will not (remediation over, Job over).",
                                        registry=r)
        self.overrides = Counter("gpu_remediation_overrides",
                                 "Remediations stopped for good because a person undid our cordon or taint.",
                                 registry=r)
        self.engine_tick = Gauge("gpu_remediation_engine_last_tick_timestamp_seconds",
                                 "Unix time at which the engine last finished a scheduling pass.", registry=r)
        self.journal_errors = Counter("gpu_remediation_journal_errors",
                                      "Journal transactions that failed in SQLite (503s, retried steps).", registry=r)
        self.journal_bytes = Gauge("gpu_remediation_journal_size_bytes",
                                   "Bytes the journal takes on disk (database and write-ahead log).", registry=r)
        self.journal_pruned = Counter("gpu_remediation_journal_pruned_rows",
                                      "Journal rows deleted by retention (journal.retention).", registry=r)
        self.journal_last_prune = Gauge("gpu_remediation_journal_last_prune_timestamp_seconds",
                                        "Unix time at which the last retention pass finished.", registry=r)
        self.step_seconds = Histogram("gpu_remediation_step_duration_seconds", "Duration of remediation steps.",
                                      ["action", "result"], buckets=_STEP, registry=r)
        # Deliveries.
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
        self.last_notification = Gauge("gpu_remediation_webhook_last_notification_timestamp_seconds",
                                       "Unix time at which the last well-formed notification was journaled.",
                                       registry=r)
        for state in STATES:
            self.remediations.labels(state).set(0)
        for decision in DECISIONS:
            self.alerts.labels(decision)
        for reason in SLOT_RELEASES:
            self.slot_releases.labels(reason)
        self._history: set[tuple[str, ...]] = set()
        self._since: set[str] = set()
        self._journal_errors_seen = 0

    def action_finished(self, node: str, gpu: str, uuid: str, action: str, result: str, ts: float) -> None:
        self.actions.labels(node, gpu, uuid, action, result).inc()
        if result in _LAST:
            getattr(self, _LAST[result]).labels(node, gpu, uuid, action).set(ts)

    def restore(self, counts: Iterable[tuple[tuple[str, str, str, str, str], int]],
                last: Iterable[tuple[tuple[str, str, str, str, str], float]]) -> None:
        for labels, n in counts:
            self.actions.labels(*labels).inc(n)
        for (node, gpu, uuid, action, result), ts in last:
            getattr(self, _LAST[result]).labels(node, gpu, uuid, action).set(ts)

    def set_states(self, counts: Mapping[str, int], since: Mapping[str, float]) -> None:
        for state in STATES:
            self.remediations.labels(state).set(counts.get(state, 0))
        for state in self._since - set(since):
            self.state_since.remove(state)
        for state, ts in since.items():
            self.state_since.labels(state).set(ts)
        self._since = set(since)

    def set_history(self, counts: Mapping[tuple[str, str, str, str], Mapping[str, int]]) -> None:
        """The journal's counts replace the published ones; series without a success in any window go away."""
        now = {(*key, window) for key, windows in counts.items() for window in windows}
        for labels in self._history - now:
            self.successful.remove(*labels)
        for key, windows in counts.items():
            for window, n in windows.items():
                self.successful.labels(*key, window).set(n)
        self._history = now

    def sync_journal_errors(self, total: int) -> None:
        if total > self._journal_errors_seen:
            self.journal_errors.inc(total - self._journal_errors_seen)
            self._journal_errors_seen = total

    def render(self) -> bytes:
        return generate_latest(self.registry)
