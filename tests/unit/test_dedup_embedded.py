"""The embedded dedup store's cheaper paths (storage/dedup_store.py): schema 1 → 2 migration, eviction of expired
claims without an index on retain_until (rows out of retention order included), the insert-only attempt for a
batch expected to be all new, and the request fast path."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest

from fpolicyd.pipeline.dedup import Decision, DedupMode, DedupPolicy, DedupRequest, exact_key, window_key
from fpolicyd.storage.dedup_store import DB_FILE_NAME, EmbeddedDedupStore

T0 = 1_714_557_600.0
DAY = 86400.0


def exact(event_id: str, claimant: str, now: float, ttl: float = 7 * DAY) -> DedupRequest:
    return DedupRequest(exact_key(event_id), event_id, claimant, now, now + ttl)


def decisions(store: EmbeddedDedupStore, requests: list[DedupRequest], now: float) -> list[Decision]:
    return [r.decision for r in store.check_many(requests, now)]


def pks(store: EmbeddedDedupStore) -> set[str]:
    return {key.pk for key in store.claims()}


def write_schema_1(path: Path, rows: list[tuple[str, str, str, str, float, float, float]]) -> None:
    """A store as the previous version wrote it (schema 1: full index on retain_until, no out_of_order)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(
        "CREATE TABLE claims (pk TEXT NOT NULL, sk TEXT NOT NULL, event_id TEXT NOT NULL, claimant TEXT NOT NULL,"
        " event_time REAL NOT NULL, expires_at REAL NOT NULL, retain_until REAL NOT NULL, PRIMARY KEY (pk, sk))"
    )
    conn.execute("CREATE INDEX claims_retain_until ON claims (retain_until)")
    conn.execute("PRAGMA user_version = 1")
    conn.executemany("INSERT INTO claims VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    conn.close()


def test_schema_1_store_is_migrated_with_its_claims(tmp_path: Path) -> None:
    write_schema_1(
        tmp_path / DB_FILE_NAME,
        [
            ("kept", "exact", "kept", "old:1", T0, T0 + DAY, T0 + DAY),
            ("gone", "exact", "gone", "old:2", T0 - DAY, T0 - 1, T0 - 1),  # past retention: purged at open
            ("UC1#/a", "write", "w1", "old:3", T0, T0 + 300, T0 + 2 * DAY),
        ],
    )
    with EmbeddedDedupStore(tmp_path, max_entries=3).open(T0) as store:
        assert (store.rebuilds, store.evicted_expired, len(store)) == (0, 1, 2)
        assert pks(store) == {"kept", "UC1#/a"}
        assert decisions(store, [exact("kept", "new:1", T0)], T0) == [Decision.duplicate]
        assert store._conn is not None
        assert store._conn.execute("PRAGMA user_version").fetchone()[0] == 2
        indexes = {r[0] for r in store._conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "claims_retain_until" not in indexes
        # migrated rows count as out of order: they still expire first once the store is over its bound
        store.check_many([exact("a", "n:1", T0 + DAY), exact("b", "n:2", T0 + DAY)], T0 + DAY)
        assert pks(store) == {"UC1#/a", "a", "b"}
        assert (store.evicted_expired, store.evicted_oldest) == (2, 0)
    with EmbeddedDedupStore(tmp_path, max_entries=3).open(T0 + DAY) as reopened:
        assert (reopened.rebuilds, len(reopened)) == (0, 3)


def test_expired_claims_out_of_retention_order_are_evicted(tmp_path: Path) -> None:
    """The clock steps back and retentions differ: every expired claim still goes before any unexpired one."""
    with EmbeddedDedupStore(tmp_path, max_entries=4).open(T0) as store:
        store.check_many([exact("long", "a", T0, ttl=1000)], T0)
        store.check_many([exact("back", "a", T0 - 500, ttl=100)], T0 - 500)  # written later, expires first
        store.check_many([exact("mid", "a", T0, ttl=200), exact("short", "a", T0, ttl=50)], T0)
        store.check_many([exact("new1", "a", T0 + 300)], T0 + 300)  # over the bound: back, short, mid expired
        assert pks(store) == {"long", "new1"}
        assert (store.evicted_expired, store.evicted_oldest) == (3, 0)
        store.check_many([exact(f"n{i}", "a", T0 + 300) for i in range(3)], T0 + 300)
        assert pks(store) == {"n0", "n1", "n2", "new1"}  # nothing expired: the oldest ("long") went
        assert (store.evicted_expired, store.evicted_oldest) == (3, 1)
    with EmbeddedDedupStore(tmp_path, max_entries=4).open(T0 + 300 + 7 * DAY) as reopened:
        assert (len(reopened), reopened.evicted_expired) == (0, 4)


def test_window_and_exact_retentions_mixed(tmp_path: Path) -> None:
    policy = DedupPolicy(mode=DedupMode.window, exact_ttl_s=100.0, window_s=300.0, window_overrides_s={"X": 0})
    with EmbeddedDedupStore(tmp_path, max_entries=2).open(T0) as store:
        first = policy.requests_for(
            event_id="e1", claimant="i:1", event_time=T0, file_path="/a", operation="write", use_cases=["UC"], now=T0
        )
        exact_one = policy.requests_for(
            event_id="e2", claimant="i:2", event_time=T0, file_path="/a", operation="write", use_cases=["X"], now=T0
        )
        store.check_many([*first, *exact_one], T0)  # retained 300 s and 100 s: the second is out of order
        later = T0 + 150
        store.check_many([exact("e3", "i:3", later)], later)
        assert set(store.claims()) == {window_key("UC", "/a", "write"), exact_key("e3")}
        assert (store.evicted_expired, store.evicted_oldest) == (1, 0)


def test_batch_expected_new_that_meets_stored_claims(tmp_path: Path) -> None:
    """The insert-only attempt is undone when a key is stored; answers, claims and write order as the full path."""
    with EmbeddedDedupStore(tmp_path, max_entries=4).open(T0) as store:
        assert decisions(store, [exact("s1", "a", T0), exact("s2", "a", T0)], T0) == [Decision.first] * 2
        batch = [exact("n1", "b", T0), exact("s1", "b", T0), exact("n2", "b", T0), exact("s2", "a", T0)]
        results = store.check_many(batch, T0)
        assert [r.decision for r in results] == [Decision.first, Decision.duplicate, Decision.first, Decision.first]
        assert (results[1].first_seen_id, results[1].first_claimant) == ("s1", "a")
        assert (len(store), store.duplicates) == (4, 1)
        # write order is now s1, n1, n2, s2 (s2 rewritten by its own claimant): one more evicts s1
        store.check_many([exact("n3", "c", T0)], T0)
        assert pks(store) == {"n1", "n2", "s2", "n3"}
        # all new again: the insert-only path, then a repeat within one batch
        assert decisions(store, [exact("n4", "c", T0), exact("n4", "d", T0)], T0) == [
            Decision.first,
            Decision.duplicate,
        ]
        assert pks(store) == {"n2", "s2", "n3", "n4"}


def test_policy_exact_request_fast_path_matches_the_constructor() -> None:
    policy = DedupPolicy(exact_ttl_s=60.0)
    fast = policy.exact_request("e1", "i:1", T0, T0 + 5, "UC1")
    assert fast == DedupRequest(exact_key("e1"), "e1", "i:1", T0, T0 + 65, use_case="UC1")
    assert (fast.retention, fast.mode, fast.key.sk) == (T0 + 65, DedupMode.exact, "exact")
    assert hash(fast.key) == hash(exact_key("e1"))
    assert policy.exact_request("e1", "i:1", 5, 7) == DedupRequest(exact_key("e1"), "e1", "i:1", 5, 67.0)
    for event_id, claimant, event_time, now, match in [
        ("", "i:1", T0, T0, "non-empty"),
        ("e1", "", T0, T0, "non-empty"),
        ("e1", "i:1", math.nan, T0, "event_time"),
        ("e1", "i:1", T0, math.inf, "expires_at"),
        ("e1", "i:1", True, T0, "event_time"),
    ]:
        with pytest.raises(ValueError, match=match):
            policy.exact_request(event_id, claimant, event_time, now)
