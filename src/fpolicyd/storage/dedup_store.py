"""The embedded dedup store: dedup claims in a local SQLite file (the rule it applies: :mod:`fpolicyd.pipeline.dedup`).

What it stores: one row per claim (key, first-seen event id, claimant, event time, ``expires_at``,
``retain_until``) in ``<dedup_dir>/dedup.sqlite3``, bounded by ``max_entries`` (expired claims evicted first, then
the least recently written).

Durability contract: SQLite (stdlib) in WAL mode, one transaction per :meth:`~EmbeddedDedupStore.check_many` batch,
``synchronous=NORMAL``: a process crash keeps every committed batch; an OS crash may forget the last few, which
only means duplicates (losing dedup memory can only cause duplicates, never loss). A corrupt or foreign file is
moved aside and the store starts empty; a write the disk refuses raises :class:`~fpolicyd.errors.DiskFullError`
with nothing decided. Synchronous file I/O: run it on a thread. Cost (benchmarks/bench_dedup.py, this 2-core
machine, batch 1000): ~3.5 µs CPU per new event, ~2.5 µs per duplicate, ~25 µs alone (one transaction each);
~200 B on disk per claim.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, Final, NamedTuple, Self, TypeAlias

from fpolicyd.errors import DiskFullError
from fpolicyd.pipeline.dedup import (
    Claim,
    Decision,
    DedupFailureMode,
    DedupKey,
    DedupMode,
    DedupRequest,
    DedupResult,
    DedupStoreError,
    error_result,
    judge,
    result_of,
)
from fpolicyd.storage.closing import ClosedOnExit
from fpolicyd.storage.disk import Writer

__all__ = ["DB_FILE_NAME", "EmbeddedDedupStore"]

DB_FILE_NAME: Final = "dedup.sqlite3"

# Hot-path builder (one result per event): see fpolicyd.pipeline.dedup on building frozen dataclasses through their
# slot descriptors.
_new_object = object.__new__
(_set_decision, _set_result_key, _set_first_seen_id, _set_result_claimant, _set_first_claimant) = (
    DedupResult.__dict__[f.name].__set__ for f in fields(DedupResult)
)


def _make_result(
    decision: Decision, key: DedupKey, first_seen_id: str | None, claimant: str, first_claimant: str | None
) -> DedupResult:
    """``DedupResult(...)`` without the frozen-``__init__`` overhead (same positional order)."""
    result: DedupResult = _new_object(DedupResult)
    _set_decision(result, decision)
    _set_result_key(result, key)
    _set_first_seen_id(result, first_seen_id)
    _set_result_claimant(result, claimant)
    _set_first_claimant(result, first_claimant)
    return result


_SCHEMA_VERSION: Final = 2
# Eviction without an index on retain_until (which every insert paid for): a row is written with out_of_order = 0
# when its retain_until is at least that of every row written before it, so those rows are ordered by retention
# in rowid order and their expired ones are a rowid prefix; the others (a clock step back, retentions of different
# lengths, rows from schema 1) are in a partial index, normally empty.
_CLAIMS_TABLE: Final = (
    "CREATE TABLE IF NOT EXISTS claims ("
    " pk TEXT NOT NULL, sk TEXT NOT NULL, event_id TEXT NOT NULL, claimant TEXT NOT NULL,"
    " event_time REAL NOT NULL, expires_at REAL NOT NULL, retain_until REAL NOT NULL,"
    " out_of_order INTEGER NOT NULL DEFAULT 1,"
    " PRIMARY KEY (pk, sk))"
)
_OUT_OF_ORDER_INDEX: Final = (
    "CREATE INDEX IF NOT EXISTS claims_out_of_order ON claims (retain_until) WHERE out_of_order = 1"
)
_SCHEMA: Final = (_CLAIMS_TABLE, _OUT_OF_ORDER_INDEX)
#: Schema 1 → 2: the same table plus out_of_order (1 for every old row: conservative), the partial index instead
#: of the full one.
_MIGRATE_FROM_1: Final = (
    "ALTER TABLE claims ADD COLUMN out_of_order INTEGER NOT NULL DEFAULT 1",
    _OUT_OF_ORDER_INDEX,
    "DROP INDEX IF EXISTS claims_retain_until",
)
_SELECT_MANY: Final = "SELECT pk, sk, event_id, claimant, event_time, expires_at, retain_until FROM claims WHERE pk IN"
#: Keys per SELECT (SQLite before 3.32 allows 999 parameters; this keeps each statement small).
_IN_CHUNK: Final = 500
# REPLACE deletes the old row and inserts a new one, so rowid order is the order of the last write: "oldest"
# for eviction without another index.
_UPSERT: Final = "INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
#: The first attempt at a batch expected to be all new (EmbeddedDedupStore._check_batch).
_INSERT_NEW: Final = "INSERT OR IGNORE INTO claims VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
_FIRST_UNEXPIRED: Final = "SELECT rowid FROM claims WHERE retain_until > ? ORDER BY rowid LIMIT 1"
_DELETE_BEFORE: Final = "DELETE FROM claims WHERE rowid < ?"
_DELETE_EXPIRED: Final = "DELETE FROM claims WHERE retain_until <= ?"
_DELETE_UNORDERED_EXPIRED: Final = "DELETE FROM claims WHERE out_of_order = 1 AND retain_until <= ?"
#: A stored claim as the table holds it: pk, sk, event_id, claimant, event_time, expires_at, retain_until (rows
#: written by a batch carry out_of_order as an eighth item).
_Row: TypeAlias = tuple[Any, ...]
# A batch of new random ids dirties index pages all over the file, mostly the same ones batch after batch: a
# checkpoint every ~40 MB of WAL instead of SQLite's 4 MB copies each such page once instead of every few
# batches (~10% less CPU per new claim, benchmarks/bench_dedup.py); the WAL is cut back to 64 MB after a
# checkpoint and emptied at close.
_WAL_CHECKPOINT_PAGES: Final = 10_000
_WAL_SIZE_LIMIT: Final = 64 * 1024 * 1024
_CORRUPT_CODES: Final = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_FULL_CODE: Final = sqlite3.SQLITE_FULL
_IOERR_WRITE_CODE: Final = sqlite3.SQLITE_IOERR_WRITE
_DIR_MODE: Final = 0o750


class _Judged(NamedTuple):
    results: list[DedupResult]
    duplicates: int
    #: Keys of the batch that were not stored (each is written).
    added: int
    #: Rows to write, in write order (the row's last write in the batch).
    writes: dict[tuple[str, str], _Row]
    #: The largest retain_until of the rows held once these are written (EmbeddedDedupStore._max_retain).
    top: float


def _is_corruption(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and (code & 0xFF) in _CORRUPT_CODES


def _is_full(exc: sqlite3.Error) -> bool:
    """A write the disk refused: SQLITE_FULL (ENOSPC, or ``max_page_count`` reached) or SQLITE_IOERR_WRITE
    (SQLite's unix VFS reports every write error other than ENOSPC so, EDQUOT among them)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code in (_FULL_CODE, _IOERR_WRITE_CODE)


class _IncompatibleStoreError(Exception):
    """The file is a SQLite database, but not one this version wrote."""


class EmbeddedDedupStore(ClosedOnExit):
    """Claims in a local SQLite file (module docstring). Thread-safe (one lock); call it from one thread at a time.

    Corrupt or foreign files: the store never refuses to start over its own memory. A file that is not a
    database, is damaged (found at open or during a batch), or has another schema version is moved aside to
    ``dedup.sqlite3.corrupt-<now>`` (kept for an operator, with its WAL) and a fresh store takes its place:
    forgetting claims can only let duplicates through, whereas refusing to start would stop ingest.
    ``rebuilds`` counts this and ``last_rebuild`` says where the old file went (the caller logs it). A path
    that cannot be created or opened at all (a file where the directory should be, permissions) raises
    :class:`DedupStoreError`.

    Counters (plain ints): ``checks``, ``duplicates``, ``errors``, ``fail_open``, ``fail_closed``,
    ``evicted_expired``, ``evicted_oldest``, ``rebuilds``.

    Schema 2 (a schema 1 file is migrated in place at open, its claims kept): no index on ``retain_until`` (see
    ``_SCHEMA``), so opening counts the claims and finds the largest retention in one table scan (~20 ms per 200,000
    claims). Requires SQLite 3.8+ (partial indexes).
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_entries: int = 1_000_000,
        failure_mode: DedupFailureMode = DedupFailureMode.open,
    ) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries: must be a positive integer, got {max_entries!r}")
        self.directory = Path(directory)
        self.path = self.directory / DB_FILE_NAME
        self.max_entries = max_entries
        self.failure_mode = DedupFailureMode(failure_mode)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._count = 0
        #: At least the largest retain_until of any row held (see _SCHEMA): a row written with less is out of order.
        self._max_retain = -math.inf
        #: Whether the last full check met no stored claim (the next batch then tries the insert-only path).
        self._assume_new = True
        self.last_rebuild: Path | None = None
        self.checks = 0
        self.duplicates = 0
        self.errors = 0
        self.fail_open = 0
        self.fail_closed = 0
        self.evicted_expired = 0
        self.evicted_oldest = 0
        self.rebuilds = 0
        #: Batches the disk refused (DiskFullError raised; the batch is asked again).
        self.disk_full_errors = 0

    # -- life cycle --------------------------------------------------------------------------------------

    def open(self, now: float) -> Self:
        """Create or reopen the store; expired claims are purged (and count as evicted)."""
        with self._lock:
            if self._conn is not None:
                raise RuntimeError("the dedup store is already open")
            try:
                self.directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            except OSError as exc:
                raise DedupStoreError(f"dedup store: cannot create directory {self.directory}: {exc}") from exc
            try:
                self._conn = self._connect()
            except (_IncompatibleStoreError, sqlite3.DatabaseError) as exc:
                if isinstance(exc, sqlite3.OperationalError) and not _is_corruption(exc):
                    raise DedupStoreError(f"dedup store: cannot open {self.path}: {exc}") from exc
                self._rebuild(now)
            assert self._conn is not None
            self._purge_expired(self._conn, now)
        return self

    def close(self) -> None:
        """Checkpoint and close. Safe to call twice."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                conn.close()

    def __len__(self) -> int:
        """Claims held (expired ones included until evicted)."""
        return self._count

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise DedupStoreError(f"dedup store: cannot open {self.path}: {exc}") from exc
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                raise _IncompatibleStoreError(f"journal mode {mode!r}")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA wal_autocheckpoint = {_WAL_CHECKPOINT_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if version == 0 and not tables:
                self._ddl(conn, _SCHEMA)
            elif version == 1 and "claims" in tables:
                self._ddl(conn, _MIGRATE_FROM_1)
            elif version != _SCHEMA_VERSION or "claims" not in tables:
                raise _IncompatibleStoreError(f"schema version {version}, tables {sorted(tables)}")
            count, top = conn.execute("SELECT COUNT(*), MAX(retain_until) FROM claims").fetchone()
            self._count = int(count)
            self._max_retain = -math.inf if top is None else float(top)
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _ddl(conn: sqlite3.Connection, statements: Iterable[str]) -> None:
        """Create or migrate the schema in one transaction, ending at the current version."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    def _rebuild(self, now: float) -> None:
        """Move the unusable file (and its WAL) aside and start empty."""
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
        aside = self.path.with_name(f"{DB_FILE_NAME}.corrupt-{int(now * 1000)}")
        try:
            if self.path.exists():
                os.replace(self.path, aside)
            wal = Path(f"{self.path}-wal")
            if wal.exists():
                os.replace(wal, Path(f"{aside}-wal"))
            Path(f"{self.path}-shm").unlink(missing_ok=True)
            self._conn = self._connect()
        except (OSError, sqlite3.Error, _IncompatibleStoreError) as exc:
            raise DedupStoreError(f"dedup store: cannot rebuild {self.path}: {exc}") from exc
        self.rebuilds += 1
        self.last_rebuild = aside

    # -- checks ------------------------------------------------------------------------------------------

    def check_many(self, requests: Sequence[DedupRequest], now: float) -> list[DedupResult]:
        """Judge ``requests`` in order (a later request sees the claims of earlier ones in the same batch),
        in one transaction. A SQLite failure rolls the batch back and answers every request with the failure
        mode's decision; a corrupt file is rebuilt and the batch judged against the empty store. A write the disk
        refused (:func:`_is_full`) rolls the batch back and raises :class:`~fpolicyd.errors.DiskFullError`
        whatever the failure mode: nothing was decided, the caller asks again once space frees (the failure mode
        is for a store that is broken, not for one that is waiting for space)."""
        if not requests:
            return []
        with self._lock:
            conn = self._conn
            if conn is None:
                raise RuntimeError("the dedup store is not open")
            self.checks += len(requests)
            try:
                results, duplicates = self._check_batch(conn, requests, now)
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if _is_full(exc):
                    self.disk_full_errors += 1
                    raise DiskFullError(Writer.dedup_store, f"dedup store {self.path}: {exc}") from exc
                if not _is_corruption(exc):
                    return self._failed(requests)
                try:
                    self._rebuild(now)
                    assert self._conn is not None
                    results, duplicates = self._check_batch(self._conn, requests, now)
                except (DedupStoreError, sqlite3.Error):
                    return self._failed(requests)
            self.duplicates += duplicates
            return results

    def _failed(self, requests: Sequence[DedupRequest]) -> list[DedupResult]:
        self.errors += len(requests)
        if self.failure_mode is DedupFailureMode.open:
            self.fail_open += len(requests)
        else:
            self.fail_closed += len(requests)
        return [error_result(r, self.failure_mode) for r in requests]

    def _check_batch(
        self, conn: sqlite3.Connection, requests: Sequence[DedupRequest], now: float
    ) -> tuple[list[DedupResult], int]:
        """The batch's results and how many are duplicates.

        After a batch that met no stored claim, the next is first judged as if none of its keys were stored and
        its claims inserted with ``INSERT OR IGNORE`` (no SELECT): if every row went in, no key was stored and the
        answers are exactly those of the full path; otherwise that attempt is rolled back to a savepoint and the
        batch takes the full path (SELECT, judge, REPLACE), which also decides whether the next batch tries."""
        pairs = [(key.pk, key.sk) for key in [r.key for r in requests]]
        conn.execute("BEGIN IMMEDIATE")
        judged = None
        if self._assume_new:
            conn.execute("SAVEPOINT assume_new")
            judged = self._judge_batch(requests, pairs, {}, now)
            if conn.executemany(_INSERT_NEW, judged.writes.values()).rowcount != len(judged.writes):
                conn.execute("ROLLBACK TO assume_new")
                judged = None
            conn.execute("RELEASE assume_new")
        if judged is None:
            stored = self._load(conn, pairs)
            self._assume_new = not any(pair in stored for pair in pairs)
            judged = self._judge_batch(requests, pairs, stored, now)
            conn.executemany(_UPSERT, judged.writes.values())
        results, duplicates, added, _, top = judged
        count = self._count + added
        evicted_expired = evicted_oldest = 0
        if count > self.max_entries:
            evicted_expired = self._delete_expired(conn, now)
            count -= evicted_expired
        if count > self.max_entries:
            evicted_oldest = conn.execute(
                "DELETE FROM claims WHERE rowid IN (SELECT rowid FROM claims ORDER BY rowid LIMIT ?)",
                (count - self.max_entries,),
            ).rowcount
            count -= evicted_oldest
        conn.execute("COMMIT")
        self._count = count
        self._max_retain = top
        self.evicted_expired += evicted_expired
        self.evicted_oldest += evicted_oldest
        return results, duplicates

    def _judge_batch(
        self,
        requests: Sequence[DedupRequest],
        pairs: list[tuple[str, str]],
        state: dict[tuple[str, str], _Row],
        now: float,
    ) -> _Judged:
        """:func:`judge` over the batch, against ``state`` (the stored rows of its keys), which takes the batch's
        writes as they are made, so a key seen twice in one batch is judged against the first. Claims are rows
        (``_Row``) keyed by ``(pk, sk)``: no :class:`Claim`/:class:`DedupKey` is built per event."""
        writes: dict[tuple[str, str], _Row] = {}
        results: list[DedupResult] = []
        append = results.append
        added = duplicates = 0
        top = self._max_retain
        first, duplicate, exact = Decision.first, Decision.duplicate, DedupMode.exact
        for request, pair in zip(requests, pairs, strict=True):
            existing = state.get(pair)
            claimant = request.claimant
            if existing is None:
                added += 1  # a missing key is always written (judge)
                result = _make_result(first, request.key, request.event_id, claimant, claimant)
            elif request.mode is exact:
                # judge() for an exact request and a stored claim: past retention, our own, or expired → first
                # and rewritten; otherwise a duplicate.
                if not (existing[6] <= now or existing[3] == claimant or existing[5] <= now):
                    duplicates += 1
                    append(_make_result(duplicate, request.key, existing[2], claimant, existing[3]))
                    continue
                result = _make_result(first, request.key, request.event_id, claimant, claimant)
            else:
                claim = Claim(existing[2], existing[3], existing[4], existing[5], existing[6])
                judgement = judge(claim, request, now)
                result = result_of(request, judgement, claim)
                if not judgement.write:
                    duplicates += judgement.decision is duplicate
                    append(result)
                    continue
            append(result)
            writes.pop(pair, None)  # keep write order = rowid order = eviction age
            retain_until = request.retention
            # In order if it retains at least as long as every row written before it (a row moved to the end by a
            # later rewrite in this batch keeps a flag computed against more rows than precede it: still sound).
            # An int, not a bool: sqlite3 binds a bool through its adapter lookup, several times slower.
            if retain_until < top:
                out_of_order = 1
            else:
                out_of_order = 0
                top = retain_until
            state[pair] = writes[pair] = (
                *pair,
                request.event_id,
                claimant,
                request.event_time,
                request.expires_at,
                retain_until,
                out_of_order,
            )
        return _Judged(results, duplicates, added, writes, top)

    @staticmethod
    def _load(conn: sqlite3.Connection, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], _Row]:
        """The stored rows of the partition keys of ``pairs`` (other sort keys of those partitions too, which no
        request asks for): one indexed ``pk IN (...)`` query per chunk instead of one per key."""
        pks = list(dict.fromkeys([pk for pk, _ in pairs]))
        found: dict[tuple[str, str], _Row] = {}
        for start in range(0, len(pks), _IN_CHUNK):
            chunk = pks[start : start + _IN_CHUNK]
            rows: Iterable[_Row] = conn.execute(f"{_SELECT_MANY} ({','.join('?' * len(chunk))})", chunk)
            found.update({(row[0], row[1]): row for row in rows})
        return found

    @staticmethod
    def _delete_expired(conn: sqlite3.Connection, now: float) -> int:
        """Delete every claim past its retention: the in-order ones are the rows before the first unexpired row
        (a short scan of what is deleted anyway), the out-of-order ones come from their partial index."""
        first_unexpired = conn.execute(_FIRST_UNEXPIRED, (now,)).fetchone()
        if first_unexpired is None:
            return int(conn.execute(_DELETE_EXPIRED, (now,)).rowcount)
        removed = int(conn.execute(_DELETE_BEFORE, first_unexpired).rowcount)
        return removed + int(conn.execute(_DELETE_UNORDERED_EXPIRED, (now,)).rowcount)

    def _purge_expired(self, conn: sqlite3.Connection, now: float) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
            removed = self._delete_expired(conn, now)
            conn.execute("COMMIT")
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            return  # the next batch meets the same problem and applies the failure mode
        self._count -= removed
        self.evicted_expired += removed

    def claims(self) -> dict[DedupKey, Claim]:
        """Every claim held (tests, inspection)."""
        with self._lock:
            if self._conn is None:
                raise RuntimeError("the dedup store is not open")
            rows: Iterable[Any] = self._conn.execute(
                "SELECT pk, sk, event_id, claimant, event_time, expires_at, retain_until FROM claims"
            )
            return {DedupKey(r[0], r[1]): Claim(*r[2:]) for r in rows}
