"""Dedup rule, policy, embedded store and audit ledger (pipeline/dedup.py, storage/dedup_store.py,
pipeline/ledger.py, storage/ledger.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from fpolicyd.config import load_settings
from fpolicyd.errors import ConfigError
from fpolicyd.events import FileEvent
from fpolicyd.pipeline.dedup import (
    Claim,
    Decision,
    DedupFailureMode,
    DedupKey,
    DedupMode,
    DedupPolicy,
    DedupRequest,
    DedupStoreError,
    error_result,
    event_time_s,
    exact_key,
    judge,
    window_key,
)
from fpolicyd.storage.dedup_store import DB_FILE_NAME, EmbeddedDedupStore
from fpolicyd.storage.ledger import LEDGER_PREFIX, AuditLedger

T0 = 1_714_557_600.0  # 2024-05-01T10:00:00Z
DAY = 86400.0
WINDOW = 300.0


def exact(event_id: str, claimant: str, now: float, ttl: float = 7 * DAY) -> DedupRequest:
    return DedupRequest(exact_key(event_id), event_id, claimant, now, now + ttl)


def windowed(
    event_id: str,
    claimant: str,
    event_time: float,
    *,
    path: str = "/legal/a.pdf",
    op: str = "write",
    use_case: str = "UC1",
    now: float | None = None,
    window: float = WINDOW,
) -> DedupRequest:
    now = event_time if now is None else now
    return DedupRequest(
        window_key(use_case, path, op),
        event_id,
        claimant,
        event_time,
        event_time + window,
        mode=DedupMode.window,
        retain_until=now + 7 * DAY,
        use_case=use_case,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EmbeddedDedupStore]:
    with EmbeddedDedupStore(tmp_path / "dedup", max_entries=1000).open(T0) as opened:
        yield opened


def decisions(store: EmbeddedDedupStore, requests: list[DedupRequest], now: float) -> list[Decision]:
    return [r.decision for r in store.check_many(requests, now)]


# ----------------------------------------------------------------------------------------------- keys


def test_keys() -> None:
    assert exact_key("abc") == DedupKey("abc", "exact")
    assert window_key("UC1", "/a/b.txt", "write") == DedupKey("UC1#/a/b.txt", "write")
    assert str(window_key("UC1", "/a", "create")) == "UC1#/a|create"
    assert exact_key("e") != window_key("e", "", "exact")  # window pk always has the '#'
    with pytest.raises(ValueError, match="pk"):
        DedupKey("", "x")
    with pytest.raises(ValueError, match="sk"):
        DedupKey("x", "")


def test_request_validation() -> None:
    with pytest.raises(ValueError, match="mode"):
        DedupRequest(exact_key("e"), "e", "c", T0, T0 + 1, mode=DedupMode.off)
    with pytest.raises(ValueError, match="finite"):
        DedupRequest(exact_key("e"), "e", "c", float("nan"), T0 + 1)
    with pytest.raises(ValueError, match="expires_at must be after"):
        DedupRequest(window_key("u", "/p", "write"), "e", "c", T0, T0, mode=DedupMode.window)
    with pytest.raises(ValueError, match="non-empty"):
        DedupRequest(exact_key("e"), "e", "", T0, T0 + 1)
    assert DedupRequest(exact_key("e"), "e", "c", T0, T0 + 5).retention == T0 + 5


# ------------------------------------------------------------------------------------------ the rule


def test_judge_exact() -> None:
    request = exact("e1", "i:2", T0 + 10)
    assert judge(None, request, T0 + 10) == (Decision.first, True)
    live = Claim("e1", "i:1", T0, T0 + 100, T0 + 100)
    assert judge(live, request, T0 + 10) == (Decision.duplicate, False)
    assert judge(live, exact("e1", "i:1", T0 + 10), T0 + 10) == (Decision.first, True)  # same claimant
    assert judge(live, request, T0 + 100) == (Decision.first, True)  # expired: taken over
    lagging = Claim("e1", "i:1", T0, T0 + 1000, T0 + 50)  # retention over, not swept yet
    assert judge(lagging, request, T0 + 60) == (Decision.first, True)


def test_judge_window_sliding_and_late() -> None:
    claim = Claim("e1", "i:1", T0, T0 + WINDOW, T0 + 7 * DAY)
    assert judge(claim, windowed("e2", "i:2", T0 + 299), T0).decision is Decision.duplicate
    assert judge(claim, windowed("e2", "i:2", T0 + 300), T0) == (Decision.first, True)
    assert judge(claim, windowed("e0", "i:0", T0 - 299), T0).decision is Decision.duplicate  # slightly earlier
    assert judge(claim, windowed("e0", "i:0", T0 - 300), T0) == (Decision.first, False)  # a window before: kept


# ---------------------------------------------------------------------------------------- exact mode


def test_exact_first_duplicate_and_genuine_rewrite(store: EmbeddedDedupStore) -> None:
    results = store.check_many([exact("e1", "i:1", T0), exact("e1", "i:2", T0), exact("e2", "i:3", T0)], T0)
    assert [r.decision for r in results] == [Decision.first, Decision.duplicate, Decision.first]
    assert results[1].first_seen_id == "e1"
    assert results[1].first_claimant == "i:1"
    assert results[1].claimant == "i:2"
    assert results[0].first_seen_id == "e1"
    assert [r.deliver for r in results] == [True, False, True]
    assert decisions(store, [exact("e1", "i:9", T0 + 5)], T0 + 5) == [Decision.duplicate]
    assert (store.checks, store.duplicates) == (4, 2)


def test_same_claimant_is_first_again(store: EmbeddedDedupStore) -> None:
    assert decisions(store, [exact("e1", "node-a:41", T0)], T0) == [Decision.first]
    # crash before the spool ack: the same spool record comes back with the same claimant
    assert decisions(store, [exact("e1", "node-a:41", T0 + 1)], T0 + 1) == [Decision.first]
    assert decisions(store, [exact("e1", "node-a:42", T0 + 2)], T0 + 2) == [Decision.duplicate]


def test_ttl_expiry(store: EmbeddedDedupStore) -> None:
    assert decisions(store, [exact("e1", "a", T0, ttl=60)], T0) == [Decision.first]
    assert decisions(store, [exact("e1", "b", T0 + 59.9, ttl=60)], T0 + 59.9) == [Decision.duplicate]
    assert decisions(store, [exact("e1", "c", T0 + 60, ttl=60)], T0 + 60) == [Decision.first]
    assert decisions(store, [exact("e1", "d", T0 + 61, ttl=60)], T0 + 61) == [Decision.duplicate]  # c's claim


# --------------------------------------------------------------------------------------- window mode


def test_window_catches_the_tumbling_boundary_case(store: EmbeddedDedupStore) -> None:
    """10:04:59.5 and 10:05:00.5 lie in different reference buckets (floor to 5 min); both are one write."""
    before = T0 + 299.5
    after = T0 + 300.5
    assert int(before // 300) != int(after // 300)
    assert decisions(store, [windowed("e1", "a", before)], before) == [Decision.first]
    assert decisions(store, [windowed("e2", "b", after)], after) == [Decision.duplicate]


def test_window_rewrite_after_the_window_is_delivered(store: EmbeddedDedupStore) -> None:
    """The reference suppresses a genuine rewrite inside one bucket; 5 min + 1 s later is never suppressed."""
    assert decisions(store, [windowed("e1", "a", T0)], T0) == [Decision.first]
    assert decisions(store, [windowed("e2", "b", T0 + 301)], T0 + 301) == [Decision.first]
    # the claim slid: 10:05:01 + 5 min
    assert decisions(store, [windowed("e3", "c", T0 + 600)], T0 + 600) == [Decision.duplicate]
    assert decisions(store, [windowed("e4", "d", T0 + 601)], T0 + 601) == [Decision.first]


def test_window_judges_event_time_not_arrival(store: EmbeddedDedupStore) -> None:
    assert decisions(store, [windowed("e1", "a", T0)], T0) == [Decision.first]
    # arrives an hour later (replay) but happened 10 s after the first: a duplicate
    assert decisions(store, [windowed("e2", "b", T0 + 10, now=T0 + 3600)], T0 + 3600) == [Decision.duplicate]
    # a late event from long before the claim is delivered and leaves the claim alone
    assert decisions(store, [windowed("e0", "c", T0 - 3600, now=T0 + 3600)], T0 + 3600) == [Decision.first]
    assert store.claims()[window_key("UC1", "/legal/a.pdf", "write")].event_id == "e1"


def test_window_keys_are_per_use_case_path_and_operation(store: EmbeddedDedupStore) -> None:
    batch = [
        windowed("e1", "a", T0),
        windowed("e1", "a", T0, use_case="UC2"),
        windowed("e2", "b", T0 + 1, op="create"),
        windowed("e3", "c", T0 + 1, path="/legal/b.pdf"),
        windowed("e4", "d", T0 + 2),
    ]
    assert decisions(store, batch, T0) == [Decision.first] * 4 + [Decision.duplicate]


# --------------------------------------------------------------------------------------------- policy


def make_event(event_id: str = "e1", routes: list[str] | None = None) -> FileEvent:
    return FileEvent(
        event_id=event_id,
        operation_type="write",
        file_path="/legal/a.pdf",
        previous_path=None,
        volume_name="vol1",
        svm_name="svm1",
        timestamp="2024-05-01T10:00:00.250000Z",
        file_size=1,
        client_ip=None,
        metadata={"routes": routes or []},
    )


def test_event_time() -> None:
    assert event_time_s(make_event()) == T0 + 0.25


def test_policy_modes() -> None:
    event = make_event(routes=["UC1", "UC2", "UC1"])
    assert DedupPolicy(mode=DedupMode.off).requests_for_event(event, "i:1", T0) == []
    [one] = DedupPolicy(exact_ttl_s=100).requests_for_event(event, "i:1", T0 + 5)
    assert (one.key, one.expires_at, one.mode, one.event_time) == (
        exact_key("e1"),
        T0 + 105,
        DedupMode.exact,
        T0 + 0.25,
    )
    policy = DedupPolicy(mode=DedupMode.window, window_s=300, window_overrides_s={"UC2": 60, "UC3": 0})
    uc1, uc2 = policy.requests_for_event(event, "i:1", T0 + 5)
    assert (uc1.key, uc1.expires_at, uc1.use_case) == (window_key("UC1", "/legal/a.pdf", "write"), T0 + 300.25, "UC1")
    assert uc2.expires_at == T0 + 60.25
    assert uc1.retention == T0 + 5 + policy.exact_ttl_s
    [unrouted] = policy.requests_for_event(make_event(), "i:1", T0)
    assert unrouted.key == window_key("", "/legal/a.pdf", "write")
    [uc3] = policy.requests_for_event(make_event(routes=["UC3"]), "i:1", T0)
    assert (uc3.mode, uc3.key, uc3.use_case) == (DedupMode.exact, exact_key("e1"), "UC3")
    with pytest.raises(ValueError, match="UC9"):
        DedupPolicy(window_overrides_s={"UC9": -1})


def test_policy_from_settings(tmp_path: Path) -> None:
    settings = load_settings(
        overrides={
            "dedup_mode": "window",
            "dedup_window_minutes": 2,
            "dedup_window_overrides": {"UC1": 10},
            "data_dir": tmp_path,
        },
        search_default_paths=False,
    )
    policy = settings.dedup_policy()
    assert (policy.mode, policy.window_s, policy.window_for("UC1")) == (DedupMode.window, 120.0, 600.0)
    assert settings.effective_dedup_dir == tmp_path / "dedup"
    assert settings.effective_dedup_ledger_dir == tmp_path / "ledger"
    with pytest.raises(ConfigError, match="dedup_dynamodb_table"):
        load_settings(overrides={"dedup_backend": "dynamodb"}, search_default_paths=False)


def test_window_overrides_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FPOLICYD_DEDUP_WINDOW_OVERRIDES", '{"UC1": 1.5}')
    monkeypatch.setenv("DEDUP_WINDOW_MINUTES", "7")
    settings = load_settings(search_default_paths=False)
    assert settings.dedup_window_overrides == {"UC1": 1.5}
    assert settings.dedup_window_minutes == 7.0
    monkeypatch.setenv("FPOLICYD_DEDUP_WINDOW_OVERRIDES", '{"UC1": -1}')
    with pytest.raises(ConfigError, match="dedup_window_overrides"):
        load_settings(search_default_paths=False)


# ------------------------------------------------------------------------------------- embedded store


def test_persists_across_close_and_reopen(tmp_path: Path) -> None:
    with EmbeddedDedupStore(tmp_path).open(T0) as first:
        first.check_many([exact("e1", "a", T0), windowed("w1", "a", T0)], T0)
    with EmbeddedDedupStore(tmp_path).open(T0 + 10) as second:
        assert len(second) == 2
        assert decisions(second, [exact("e1", "b", T0 + 10), windowed("w2", "b", T0 + 10)], T0 + 10) == [
            Decision.duplicate,
            Decision.duplicate,
        ]
        assert second.rebuilds == 0


def test_reopen_purges_expired(tmp_path: Path) -> None:
    with EmbeddedDedupStore(tmp_path).open(T0) as first:
        first.check_many([exact("e1", "a", T0, ttl=10), exact("e2", "a", T0, ttl=1000)], T0)
    with EmbeddedDedupStore(tmp_path).open(T0 + 100) as second:
        assert len(second) == 1
        assert second.evicted_expired == 1


def test_eviction_bound_expired_first_then_oldest(tmp_path: Path) -> None:
    with EmbeddedDedupStore(tmp_path, max_entries=3).open(T0) as store:
        store.check_many([exact("short", "a", T0, ttl=5), exact("e1", "a", T0), exact("e2", "a", T0)], T0)
        store.check_many([exact("e3", "a", T0 + 10)], T0 + 10)  # "short" has expired: it goes, not e1
        assert (store.evicted_expired, store.evicted_oldest, len(store)) == (1, 0, 3)
        store.check_many([exact("e1", "a", T0 + 11)], T0 + 11)  # rewriting e1 makes it the newest
        store.check_many([exact("e4", "a", T0 + 12), exact("e5", "a", T0 + 12)], T0 + 12)
        assert (store.evicted_expired, store.evicted_oldest, len(store)) == (1, 2, 3)
        assert set(store.claims()) == {exact_key("e1"), exact_key("e4"), exact_key("e5")}
    with EmbeddedDedupStore(tmp_path, max_entries=3).open(T0 + 13) as reopened:
        assert len(reopened) == 3


def test_missing_directory_is_created(tmp_path: Path) -> None:
    with EmbeddedDedupStore(tmp_path / "a" / "b").open(T0) as store:
        assert (tmp_path / "a" / "b" / DB_FILE_NAME).is_file()
        assert decisions(store, [exact("e1", "a", T0)], T0) == [Decision.first]


def test_unusable_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(DedupStoreError, match="cannot create directory"):
        EmbeddedDedupStore(tmp_path / "file" / "dedup").open(T0)


@pytest.mark.parametrize(
    "content",
    [b"this is not a database at all" * 100, b"SQLite format 3\x00" + b"\xff" * 4000],
    ids=["garbage", "damaged-header"],
)
def test_corrupt_file_is_set_aside_and_rebuilt(tmp_path: Path, content: bytes) -> None:
    (tmp_path / DB_FILE_NAME).write_bytes(content)
    with EmbeddedDedupStore(tmp_path).open(T0) as store:
        assert store.rebuilds == 1
        assert store.last_rebuild is not None
        assert store.last_rebuild.read_bytes() == content
        assert decisions(store, [exact("e1", "a", T0), exact("e1", "b", T0)], T0) == [
            Decision.first,
            Decision.duplicate,
        ]


def test_foreign_schema_is_set_aside(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / DB_FILE_NAME)
    conn.execute("CREATE TABLE other (x)")
    conn.commit()
    conn.close()
    with EmbeddedDedupStore(tmp_path).open(T0) as store:
        assert store.rebuilds == 1
        assert decisions(store, [exact("e1", "a", T0)], T0) == [Decision.first]


def corrupt_pages(path: Path, *, keep: int = 2, page: int = 4096) -> None:
    """Overwrite the start of every page after the first ``keep`` (header and schema stay readable)."""
    with path.open("r+b") as f:
        size = f.seek(0, 2)
        for offset in range(keep * page, size, page):
            f.seek(offset)
            f.write(b"\xa5" * 64)


def test_corruption_found_at_open_rebuilds(tmp_path: Path) -> None:
    with EmbeddedDedupStore(tmp_path).open(T0) as store:
        store.check_many([exact(f"e{i}", "a", T0) for i in range(500)], T0)
    corrupt_pages(tmp_path / DB_FILE_NAME)
    with EmbeddedDedupStore(tmp_path).open(T0) as store:
        assert store.rebuilds == 1
        results = decisions(store, [exact("e1", "b", T0 + 1), exact("e1", "c", T0 + 1)], T0 + 1)
        # the memory is lost (a duplicate may pass), but the store answers and keeps working
        assert results == [Decision.first, Decision.duplicate]


def test_corruption_found_during_a_batch_rebuilds(tmp_path: Path) -> None:
    with EmbeddedDedupStore(tmp_path).open(T0) as store:
        store.check_many([exact(f"e{i}", "a", T0) for i in range(500)], T0)
    with EmbeddedDedupStore(tmp_path).open(T0) as store:
        assert store.rebuilds == 0
        corrupt_pages(tmp_path / DB_FILE_NAME)
        results = decisions(store, [exact("new", "b", T0 + 1), exact("new", "c", T0 + 1)], T0 + 1)
        assert results == [Decision.first, Decision.duplicate]
        assert (store.rebuilds, store.errors) == (1, 0)
        assert store.last_rebuild is not None


@pytest.mark.parametrize(
    ("mode", "decision"),
    [(DedupFailureMode.open, Decision.error_open), (DedupFailureMode.closed, Decision.error_closed)],
)
def test_sqlite_failure_applies_the_failure_mode(tmp_path: Path, mode: DedupFailureMode, decision: Decision) -> None:
    with EmbeddedDedupStore(tmp_path, failure_mode=mode).open(T0) as store:
        blocker = sqlite3.connect(tmp_path / DB_FILE_NAME, timeout=0)
        blocker.execute("PRAGMA busy_timeout = 0")
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock: SQLITE_BUSY
        try:
            store._conn.execute("PRAGMA busy_timeout = 0")  # type: ignore[union-attr]
            results = store.check_many([exact("e1", "a", T0), exact("e2", "a", T0)], T0)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert [r.decision for r in results] == [decision, decision]
        assert [r.first_seen_id for r in results] == [None, None]
        assert results[0].deliver is (mode is DedupFailureMode.open)
        assert store.errors == 2
        assert (store.fail_open, store.fail_closed) == ((2, 0) if mode is DedupFailureMode.open else (0, 2))
        # the store recovers once the lock is gone and nothing of the failed batch was kept
        assert decisions(store, [exact("e1", "a", T0)], T0) == [Decision.first]


def test_store_misuse(tmp_path: Path) -> None:
    store = EmbeddedDedupStore(tmp_path)
    with pytest.raises(RuntimeError, match="not open"):
        store.check_many([exact("e1", "a", T0)], T0)
    assert store.check_many([], T0) == []
    store.open(T0)
    with pytest.raises(RuntimeError, match="already open"):
        store.open(T0)
    store.close()
    store.close()
    with pytest.raises(ValueError, match="max_entries"):
        EmbeddedDedupStore(tmp_path, max_entries=0)


# -------------------------------------------------------------------------------------------- ledger


def read_ledger(directory: Path) -> list[dict[str, Any]]:
    return [
        orjson.loads(line)
        for path in sorted(directory.glob(f"{LEDGER_PREFIX}_*.jsonl"))
        for line in path.read_bytes().splitlines()
    ]


def test_ledger_records_duplicates_and_fail_open(store: EmbeddedDedupStore, tmp_path: Path) -> None:
    requests = [exact("e1", "i:1", T0), exact("e1", "i:2", T0), windowed("w1", "i:3", T0), windowed("w2", "i:4", T0)]
    results = store.check_many(requests, T0)
    error = error_result(exact("e9", "i:9", T0), DedupFailureMode.open)
    closed = [error_result(exact("e8", "i", T0), DedupFailureMode.closed)]
    with AuditLedger.for_directory(tmp_path / "ledger").open(T0) as ledger:
        written = ledger.write([*zip(requests, results, strict=True), (exact("e9", "i:9", T0), error)], T0 + 1)
        assert ledger.write([(exact("e8", "i", T0), closed[0])], T0 + 1) == 0
        assert (written, ledger.duplicates_recorded, ledger.error_open_recorded) == (3, 2, 1)
    records = read_ledger(tmp_path / "ledger")
    assert records == [
        {
            "time": "2024-05-01T10:00:01.000000Z",
            "event_id": "e1",
            "key": "e1|exact",
            "decision": "duplicate",
            "first_seen_id": "e1",
            "claimant": "i:2",
            "first_claimant": "i:1",
            "mode": "exact",
        },
        {
            "time": "2024-05-01T10:00:01.000000Z",
            "event_id": "w2",
            "key": "UC1#/legal/a.pdf|write",
            "decision": "duplicate",
            "first_seen_id": "w1",
            "claimant": "i:4",
            "first_claimant": "i:3",
            "mode": "window",
            "use_case": "UC1",
            "file_path": "/legal/a.pdf",
        },
        {
            "time": "2024-05-01T10:00:01.000000Z",
            "event_id": "e9",
            "key": "e9|exact",
            "decision": "error_open",
            "first_seen_id": None,
            "claimant": "i:9",
            "first_claimant": None,
            "mode": "exact",
        },
    ]


def test_ledger_redact_hook_hides_the_path_in_the_key(store: EmbeddedDedupStore, tmp_path: Path) -> None:
    requests = [windowed("w1", "i:1", T0), windowed("w2", "i:2", T0)]
    results = store.check_many(requests, T0)

    def redact(record: dict[str, Any]) -> dict[str, Any]:
        out = dict(record)
        if "file_path" in out:
            out["file_path"] = "sha256:0123456789abcdef"
        return out

    with AuditLedger.for_directory(tmp_path, redact=redact).open(T0) as ledger:
        ledger.write(list(zip(requests, results, strict=True)), T0)
    [record] = read_ledger(tmp_path)
    assert record["key"] == "UC1#sha256:0123456789abcdef|write"
    assert "/legal" not in orjson.dumps(record).decode()


def test_ledger_from_settings(tmp_path: Path) -> None:
    settings = load_settings(overrides={"data_dir": tmp_path}, search_default_paths=False)
    ledger = AuditLedger(settings.dedup_ledger_files())
    assert ledger.settings.directory == tmp_path / "ledger"
    assert ledger.settings.prefix == LEDGER_PREFIX
