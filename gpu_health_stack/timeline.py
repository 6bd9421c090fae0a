"""A readable, live timeline of a running stack: fault -> alert -> decision -> action.

`Timeline.poll()` reads Prometheus' alerts, the webhook's admin API (remediations, their steps, the breaker) and
the Kubernetes API (cordoned nodes), and prints what changed since the last poll, one line per event, with the
time since the timeline started. Faults are added by whoever injects them (`fault()`). Used by the demo; a test can
print one too.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from .stack import Stack, _unix

COLORS = {"fault": "31", "alert": "33", "decision": "36", "action": "32", "kube": "35", "breaker": "31;1",
          "info": "0"}


@dataclass(order=True)
class Event:
    ts: float
    kind: str = field(compare=False)  # fault | alert | decision | action | kube | breaker | info
    node: str = field(compare=False)
    text: str = field(compare=False)


class Timeline:
    def __init__(self, stack: Stack, *, webhook: Any = None, kube: Any = None, out: TextIO = sys.stdout,
                 color: bool | None = None, start: float | None = None) -> None:
        self.stack = stack
        self.webhook = webhook
        self.kube = kube
        self.out = out
        self.color = out.isatty() if color is None else color
        self.start = time.time() if start is None else start
        self.events: list[Event] = []
        self._alerts: dict[tuple[str, ...], str] = {}
        self._rems: dict[str, str] = {}
        self._steps: set[tuple[str, int, str]] = set()
        self._cordoned: set[str] = set()
        self._breaker_open = False
        self._lock = threading.Lock()
        self._batch: list[Event] | None = None
        self._for: dict[str, float] = {}  # alertname -> its rule's `for`, in seconds
        self.errors: dict[str, str] = {}

    # ---- events

    def emit(self, kind: str, node: str, text: str, ts: float | None = None) -> Event:
        """Record and print an event; during poll() the events it finds are printed together, in time order."""
        event = Event(time.time() if ts is None else ts, kind, node, text)
        with self._lock:
            self.events.append(event)
            if self._batch is not None:
                self._batch.append(event)
            else:
                self._print(event)
        return event

    def fault(self, node: str, text: str) -> Event:
        return self.emit("fault", node, text)

    def info(self, text: str) -> Event:
        return self.emit("info", "", text)

    def _print(self, e: Event) -> None:
        label = f"{e.kind:<8}"
        if self.color:
            label = f"\033[{COLORS.get(e.kind, '0')}m{label}\033[0m"
        self.out.write(f"{e.ts - self.start:+8.1f}s  {label} {e.node:<7} {e.text}\n")
        self.out.flush()

    def first(self, kind: str, node: str, contains: str = "") -> Event | None:
        with self._lock:
            return next((e for e in self.events if e.kind == kind and e.node == node and contains in e.text), None)

    # ---- polling

    def poll(self) -> None:
        """Read every source once and print what changed. A source that does not answer is skipped this time."""
        with self._lock:
            self._batch = []
        try:
            for name, step in (("prometheus", self._poll_alerts), ("webhook", self._poll_webhook),
                               ("kubernetes", self._poll_kube)):
                try:
                    step()
                    self.errors.pop(name, None)
                except Exception as exc:  # noqa: BLE001 - a restarting component must not stop the timeline
                    self.errors[name] = str(exc)
        finally:
            with self._lock:
                batch, self._batch = self._batch or [], None
                for event in sorted(batch):
                    self._print(event)

    def run(self, stop: threading.Event, interval: float = 0.5, tick: Callable[[], None] | None = None) -> None:
        while not stop.is_set():
            self.poll()
            if tick is not None:
                tick()
            stop.wait(interval)

    def forget_cordon(self, node: str) -> None:
        """The node's Node object was replaced (a new machine): its cordon is gone with it, not undone."""
        self._cordoned.discard(node)

    def _rule_durations(self) -> None:
        from .procs import http_json

        groups = http_json(f"{self.stack.prom_url}/api/v1/rules?type=alert")["data"]["groups"]
        self._for = {r["name"]: float(r.get("duration", 0)) for g in groups for r in g["rules"]}

    def _poll_alerts(self) -> None:
        if not self._for:
            self._rule_durations()
        seen = set()
        for a in self.stack.prometheus_alerts("pending") + self.stack.prometheus_alerts("firing"):
            labels = a["labels"]
            key = (labels["alertname"], labels.get("node", ""), labels.get("gpu", ""), labels.get("xid", ""))
            seen.add(key)
            if self._alerts.get(key) == a["state"]:
                continue
            self._alerts[key] = a["state"]
            what = labels["alertname"] + (f" gpu {labels['gpu']}" if labels.get("gpu") else "")
            what += f" xid {labels['xid']}" if labels.get("xid") else ""
            extra = f"{labels.get('severity', '?')}, remediation={labels.get('remediation', 'none')}"
            # Prometheus tells when an alert became active; it fires its rule's `for` later.
            ts = _unix(a["activeAt"]) + (self._for.get(labels["alertname"], 0.0) if a["state"] == "firing" else 0.0)
            self.emit("alert", labels.get("node", ""), f"{what} {a['state']} ({extra})", ts)
        for key in [k for k in self._alerts if k not in seen]:
            del self._alerts[key]
            self.emit("alert", key[1], f"{key[0]} resolved")

    def _poll_webhook(self) -> None:
        if self.webhook is None:
            return
        for rem in sorted(self.webhook.remediations(), key=lambda r: r.get("created_at") or 0):
            rid, state = rem["id"], rem["state"]
            if self._rems.get(rid) != state:
                first = rid not in self._rems
                self._rems[rid] = state
                ladder = " -> ".join(rem.get("ladder") or [])
                if first and state == "REFUSED":
                    self.emit("decision", rem["node"], f"{rem.get('alertname')}: no action, {rem.get('reason')}",
                              rem.get("created_at"))
                elif first:
                    mode = " (dry-run)" if rem.get("dry_run") else ""
                    self.emit("decision", rem["node"], f"{rem.get('alertname')}: plan {ladder}{mode}, "
                              f"rule {rem.get('rule')}", rem.get("created_at"))
                if state not in ("PLANNED", "RUNNING", "REFUSED") or (not first and state != "RUNNING"):
                    reason = f": {rem['reason']}" if rem.get("reason") and state not in ("SUCCEEDED",) else ""
                    self.emit("decision", rem["node"], f"remediation {state}{reason}")
            if state in ("PLANNED",):
                continue
            detail = self.webhook.remediation(rid)
            for step in detail.get("steps", []):
                key = (rid, int(step["seq"]), str(step["state"]))
                if key in self._steps or step.get("finished_at") is None:
                    continue
                self._steps.add(key)
                calls = [c for c in step.get("calls") or [] if c.get("method") not in ("GET", None)]
                shown = ", ".join(f"{c.get('method')} {c.get('path')}" + ("" if c.get("performed", True)
                                                                           else " [dry-run]")
                                  for c in calls[:3])
                more = f" (+{len(calls) - 3} more)" if len(calls) > 3 else ""
                self.emit("action", rem["node"], f"{step['action']} {step['outcome']}"
                          + (f": {shown}{more}" if shown else "")
                          + (f" - {step['detail']}" if step.get("detail") and step["outcome"] != "success" else ""),
                          step["finished_at"])
        breaker = self.webhook.breaker()
        if breaker.get("open") and not self._breaker_open:
            self.emit("breaker", "", f"circuit breaker OPEN: {breaker.get('reason')}")
        elif not breaker.get("open") and self._breaker_open:
            self.emit("breaker", "", "circuit breaker closed")
        self._breaker_open = bool(breaker.get("open"))

    def _poll_kube(self) -> None:
        if self.kube is None:
            return
        now = set(self.kube.cordoned())
        for node in sorted(now - self._cordoned):
            self.emit("kube", node, f"kubectl get node {node}: SchedulingDisabled")
        for node in sorted(self._cordoned - now):
            self.emit("kube", node, f"Node {node} is schedulable again")
        self._cordoned = now
