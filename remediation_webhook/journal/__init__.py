"""The durable journal: SQLite in WAL mode with synchronous=FULL, one writer thread with group commit.

The journal decides: what was already done, what history an escalation may claim, which nodes hold the fleet
cap. Modules: writer (the thread and its transactions), schema (tables, states, migration), rows (row types and
shared writes), accept (a notification's occurrences and decisions), history (what the journal knows was
done), steps (what the engine writes while it drives a remediation), ops (what people do and read through the
admin API).
"""

from .accept import AcceptIn, AcceptOut, AlertIn, accept, hold_remediation, replan, skip_cutoff, storm_skip_reason
from .history import (
    Fix,
    count_since_replace,
    last_fix,
    resolved_nodes,
    restore_metrics,
    successful_counts,
    unconfirmed,
)
from .retention import prune_batch, reclaim
from .ops import (
    approve,
    breaker_status,
    cancel,
    detail,
    list_remediations,
    ping,
    release_slot,
    reset_breaker,
    set_pause,
    slots,
    state_counts,
    state_since,
)
from .rows import (
    OVERFLOW_NODE,
    MetricEvent,
    Remediation,
    audit,
    get_meta,
    know_node,
    load,
    occurrence,
    set_meta,
    source_occurrence,
)
from .schema import ACTIVE, TERMINAL, VERSION
from .steps import (
    Gates,
    active_on,
    begin_step,
    clear_mark,
    climb,
    complete,
    cordon_holders,
    drop_escalation,
    finish_step,
    mark_forged,
    marks,
    open_step,
    merged,
    override,
    rate_used,
    runnable,
    save_identity,
    settle_due,
    settled,
    transition,
    twins,
)
from .writer import Journal

__all__ = [
    "ACTIVE", "OVERFLOW_NODE", "TERMINAL", "VERSION", "AcceptIn", "AcceptOut", "AlertIn", "Fix", "Gates", "Journal", "MetricEvent",
    "Remediation", "accept", "active_on", "approve", "audit", "begin_step", "breaker_status", "cancel", "clear_mark",
    "climb", "complete", "cordon_holders", "drop_escalation", "count_since_replace", "detail", "finish_step", "get_meta",
    "hold_remediation", "know_node", "last_fix", "list_remediations", "load", "mark_forged", "occurrence", "marks", "open_step",
    "override", "ping", "prune_batch", "rate_used", "reclaim", "release_slot", "replan", "reset_breaker", "resolved_nodes", "restore_metrics", "runnable",
    "save_identity", "set_meta", "set_pause", "settle_due", "settled", "skip_cutoff", "slots", "source_occurrence",
    "state_counts", "state_since", "storm_skip_reason", "successful_counts", "transition", "twins",
    "unconfirmed",
]
