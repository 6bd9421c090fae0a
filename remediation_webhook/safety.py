"""Safety: the gates in front of every mutating step, and the verification right before it.

Gates (checked atomically with writing the step's intent row, see journal.begin_step): the global pause,
the circuit breaker, the fleet cap on nodes cordoned by us (absolute and percentage of the pool; in-flight
remediations count), and per-action rate limits. Per-node cooldown and the attempt cap are checked when an
alert is accepted (journal.accept). Verification (below) asks the outside world: is the alert still active
and not silenced in Alertmanager, and is the node still the same machine?
"""

from __future__ import annotations

import asyncio
import enum
import sqlite3
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from .actions.base import Action
from .alertmanager import AlertChecker, AlertState
from .config import SafetyConfig
from .errors import AlertmanagerUnavailable, InventoryUnavailable, NodeNotFound
from .inventory.base import Inventory, NodeIdentity
from .journal import Gates, Remediation, cordon_holders, get_meta, rate_used


class Verdict(str, enum.Enum):
    OK = "ok"
    BLOCK = "block"  # not now: retried on a later tick (pause, breaker, outage)
    HOLD = "hold"  # Alertmanager no longer has the alert: wait (HELD) for it to fire again
    CANCEL = "cancel"  # never: the alert is silenced or not the one Alertmanager has, or the node is another machine


@dataclass(frozen=True)
class Verification:
    verdict: Verdict
    reason: str = ""
    node: NodeIdentity | None = None
    alert: AlertState | None = None  # what Alertmanager said, when it was asked


def gates_for(action: Action, safety: SafetyConfig, pool: int | None) -> Gates:
    return Gates(cordons=action.cordons, fleet_cap=safety.fleet_cap(pool),
                 rate_limit=safety.rate_limits.get(action.name))


def gate_check(conn: sqlite3.Connection, rem_id: str, action: str, dry_run: bool, gates: Gates,
               now: float) -> str | None:
    """Read-only version of begin_step's checks: why the step may not start now, or None."""
    row = conn.execute("SELECT node, state FROM remediation WHERE id=?", (rem_id,)).fetchone()
    if row is None:
        return "remediation gone"
    if get_meta(conn, "pause") is not None:
        return "paused"
    if get_meta(conn, "breaker") is not None and row["state"] != "HEALTHY_DELAY":
        return "breaker open"
    if dry_run:
        return None
    if gates.cordons:
        held = cordon_holders(conn)
        if row["node"] not in held and len(held) >= gates.fleet_cap:
            return f"fleet cap reached ({len(held)} of {gates.fleet_cap} nodes held by us)"
    if gates.rate_limit is not None and rate_used(conn, action, now, gates.rate_limit) >= gates.rate_limit.max:
        return f"rate limit for {action} reached"
    return None


def budgets(conn: sqlite3.Connection, now: float, safety: SafetyConfig, pool: int | None) -> dict[str, int]:
    out = {"fleet_cap": max(0, safety.fleet_cap(pool) - len(cordon_holders(conn)))}
    for action, limit in safety.rate_limits.items():
        out[action] = max(0, limit.max - rate_used(conn, action, now, limit))
    return out


async def verify(rem: Remediation, inventory: Inventory, alertmanager: AlertChecker | None, *, retries: int,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 labels: Mapping[str, str] | None = None) -> Verification:
    """Right before a mutating step: alert still active, unsilenced and (given `labels`) the very alert
    Alertmanager has under its fingerprint; node UID/providerID unchanged and not created after the alert started."""
    if alertmanager is not None:
        state = AlertState.UNPROCESSED
        for attempt in range(retries):
            try:
                state = await alertmanager.state(rem.source_fp, rem.alertname, rem.node, labels)
            except AlertmanagerUnavailable as exc:
                return Verification(Verdict.BLOCK, f"cannot verify the alert: {exc}")
            if state != AlertState.UNPROCESSED:
                break
            await sleep(0.2 * 2 ** attempt)
        if state == AlertState.UNPROCESSED:
            return Verification(Verdict.BLOCK, "Alertmanager has not processed the alert yet")
        if state == AlertState.RESTARTED:
            # Cancelling here would strand a cordoned, drained node: wait for Prometheus to re-send.
            return Verification(Verdict.BLOCK, "Alertmanager restarted recently and does not know the alert yet",
                                alert=state)
        if state == AlertState.GONE:
            # Alertmanager resolves an alert it has not heard of for a while and fires it again with the same
            # startsAt (Prometheus could not reach it): hold the plan rather than lose it.
            return Verification(Verdict.HOLD, "the alert is no longer active in Alertmanager", alert=state)
        if state != AlertState.ACTIVE:
            text = {AlertState.SILENCED: "the alert is silenced in Alertmanager",
                    AlertState.INHIBITED: "the alert is inhibited in Alertmanager",
                    AlertState.MISMATCH: "Alertmanager's alert with this fingerprint has other labels: this alert "
                                         "is forged or corrupted"}[state]
            return Verification(Verdict.CANCEL, text, alert=state)
    try:
        node = await inventory.resolve(rem.node)
    except NodeNotFound:
        return Verification(Verdict.CANCEL, "the node no longer exists")
    except InventoryUnavailable as exc:
        return Verification(Verdict.BLOCK, f"cannot verify the node: {exc}")
    if rem.node_uid is not None and (node.uid != rem.node_uid or node.provider_id != (rem.provider_id or "")):
        return Verification(Verdict.CANCEL, "the node's UID or providerID changed: it is another machine")
    if node.created_at is not None and node.created_at > rem.starts_ts:
        return Verification(Verdict.CANCEL, "the node was created after the alert started: it is another machine")
    return Verification(Verdict.OK, "", node, AlertState.ACTIVE if alertmanager is not None else None)
