"""The journal: WAL with synchronous=FULL, group commit, occurrence keys, one active remediation per node."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from remediation_webhook.config import SafetyConfig
from remediation_webhook.errors import JournalError
from remediation_webhook.journal import VERSION, AcceptIn, AlertIn, Journal, accept
from remediation_webhook.models import labels_hash


def _alert(fp: str, node: str = "n1", status: str = "firing", starts: str = "2026-11-29T09:03:30Z") -> AlertIn:
    return AlertIn(fingerprint=fp, starts_key=starts, starts_ts=time.time() - 60, status=status,
                   alertname="GPUXidFatal", labels_json="{}", node=node, gpu="", uuid="", decision="plan",
                   reason="rule gpu", wants="cordon", rule="gpu", ladder=("cordon",), target_index=0, dry_run=False)


def _batch(*alerts: AlertIn) -> AcceptIn:
    return AcceptIn(alerts=alerts, group_key="g", truncated=0, now=time.time(), pool=100, policy_hash="h",
                    safety=SafetyConfig())


@pytest.fixture(name="journal")
def _journal(tmp_path):
    j = Journal(str(tmp_path / "j.db"))
    yield j
    j.close()


def test_wal_and_synchronous_full(journal):
    assert journal.run_sync(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
    assert journal.run_sync(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2  # FULL


def test_occurrence_key_is_fingerprint_startsat_and_labels_with_the_last_status(journal):
    first = journal.run_sync(accept, _batch(_alert("aa")))
    assert first.accepted == 1
    again = journal.run_sync(accept, _batch(_alert("aa"), _alert("aa", status="resolved"),
                                            _alert("aa", starts="2026-11-29T10:00:00Z")))
    # Resolved (its plan held), then the same alert fires again with a new startsAt: the held plan resumes.
    assert (again.duplicates, again.ignored, again.merged, again.resumed) == (1, 1, 0, 1)
    rows = journal.run_sync(lambda c: c.execute("SELECT status, deliveries FROM occurrence ORDER BY starts_at").fetchall())
    assert [tuple(r) for r in rows] == [("resolved", 3), ("firing", 1)]
    # The same fingerprint and startsAt with other labels is another occurrence, not a duplicate. Its twin that
    # fired again is now the live alert of the resumed remediation: a conflict, not planned.
    other = journal.run_sync(accept, _batch(dataclasses.replace(_alert("aa"), labels_hash="other")))
    assert (other.duplicates, other.conflicts, other.accepted, other.merged) == (0, 1, 0, 0)
    # Twins that are no live alert of a remediation (a resolved one) merge like any new alert of the node.
    journal.run_sync(accept, _batch(_alert("zz", node="n9"), _alert("yy", node="n9")))
    journal.run_sync(accept, _batch(_alert("yy", node="n9", status="resolved")))
    merged = journal.run_sync(accept, _batch(dataclasses.replace(_alert("yy", node="n9"), labels_hash="other")))
    assert (merged.conflicts, merged.merged) == (0, 1)
    # With a firing alert of an unfinished remediation under that fingerprint, it is a conflict.
    journal.run_sync(accept, _batch(_alert("bb", node="n2")))
    twin = journal.run_sync(accept, _batch(dataclasses.replace(_alert("bb", node="n3"), labels_hash="other")))
    assert (twin.conflicts, twin.accepted) == (1, 0)


def test_one_active_remediation_per_node_is_enforced_by_the_schema(journal):
    journal.run_sync(accept, _batch(_alert("aa")))

    def second(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO remediation(id, node, gpu, uuid, alertname, rule, ladder_json, target, state, "
                     "dry_run, requires_approval_json, source_fp, source_starts_at, starts_ts, policy_hash, "
                     "created_at, updated_at) VALUES ('x','n1','','','a','r','[]',0,'PLANNED',0,'[]','f','s',0,'h',0,0)")
    with pytest.raises(JournalError, match="UNIQUE"):
        journal.run_sync(second)
    assert journal.run_sync(lambda c: c.execute("SELECT COUNT(*) FROM remediation").fetchone()[0]) == 1


def test_concurrent_callers_share_commits(journal):
    before = journal.commits
    futures = []
    barrier = threading.Barrier(8)

    def submit(i: int) -> None:
        barrier.wait()
        for k in range(25):
            futures.append(journal.submit(accept, _batch(_alert(f"{i:02x}{k:02x}", node=f"n{i}-{k}"))))
    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(f.result(10).accepted == 1 for f in futures)
    assert journal.commits - before < 200  # group commit: fewer fsyncs than deliveries


def test_a_failing_item_does_not_take_its_group_down(journal):
    def boom(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO meta(key, value) VALUES ('x', '1')")
        raise RuntimeError("boom")
    bad = journal.submit(boom)
    good = journal.submit(accept, _batch(_alert("bb")))
    with pytest.raises(RuntimeError):
        bad.result(5)
    assert good.result(5).accepted == 1
    assert journal.run_sync(lambda c: c.execute("SELECT COUNT(*) FROM meta WHERE key='x'").fetchone()[0]) == 0


def test_unwritable_journal_fails_loudly(tmp_path):
    with pytest.raises(JournalError):
        Journal(str(tmp_path / "missing-dir" / "j.db"))


def test_a_version_1_journal_is_migrated_in_place_and_keeps_its_meaning(tmp_path):
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript((Path(__file__).parents[1] / "fixtures" / "journal-v1.sql").read_text())
    old.close()
    j = Journal(str(path))
    try:
        rows = j.run_sync(lambda c: [dict(r) for r in c.execute("SELECT * FROM occurrence")])
        assert len(rows) == 1  # the firing and the resolved row of one occurrence are one row now
        occ = rows[0]
        assert (occ["status"], occ["deliveries"], occ["decision"], occ["firing_decided"]) == ("resolved", 4, "planned", 1)
        assert occ["labels_hash"] == labels_hash(json.loads(occ["labels_json"]))
        rem = j.run_sync(lambda c: dict(c.execute("SELECT * FROM remediation").fetchone()))
        assert rem["source_labels_hash"] == occ["labels_hash"] and rem["hold_placed"] == 1
        assert rem["state_since"] == rem["updated_at"]
        history = j.run_sync(lambda c: [tuple(r) for r in c.execute(
            "SELECT action, node_uid, dry_run, started_at, finished_at FROM history")])
        assert history == [("cordon", "uid-1", 0, 1764400002.0, 1764400003.0)]
        assert j.run_sync(lambda c: c.execute("PRAGMA user_version").fetchone()[0]) == VERSION
        # One active remediation per node, HELD included: v1's index (without it) is gone.
        index = j.run_sync(lambda c: c.execute("SELECT sql FROM sqlite_master WHERE name="
                                                "'remediation_one_active_per_node'").fetchone()[0])
        assert "'HELD'" in index
        assert occ["annotations_json"] == '{"fault_timestamp": "1764399940"}'  # v1 kept the time, not the text
        # The migrated occurrence is recognised: firing again is never planned twice.
        labels = json.loads(occ["labels_json"])
        again = dataclasses.replace(_alert(occ["fingerprint"], node="gpu-1", starts=occ["starts_at"]),
                                    labels_hash=labels_hash(labels))
        out = j.run_sync(accept, _batch(again))
        assert (out.accepted, out.duplicates) == (0, 1)
    finally:
        j.close()
    # Opening it again changes nothing.
    j = Journal(str(path))
    assert j.run_sync(lambda c: c.execute("SELECT COUNT(*) FROM occurrence").fetchone()[0]) == 1
    j.close()


def test_a_journal_from_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "new.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={VERSION + 1}")
    conn.close()
    with pytest.raises(JournalError, match="newer than this webhook"):
        Journal(str(path))
