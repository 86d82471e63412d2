"""Idempotency: which events are duplicates, decided by claims in a store (sans-IO rule + the embedded store).

Modes (:class:`DedupMode`):

- ``exact`` (default): the key is the ``event_id``. The same ONTAP notification received twice (a redelivery
  after a reconnect, a spool replay) has the same id; a genuine second write to a file has a different
  GenerationTime, hence a different id, and is never suppressed. A claim lives ``dedup_exact_ttl_s``.
- ``window`` (HYBRID deployments, per use case): the reference key ``pk = "{use_case}#{file_path}"``,
  ``sk = "{operation_type}"``, judged on the event's own time (GenerationTime, the same across replays). A
  claim covers ``[event_time, event_time + window)``: a later event of the same key inside it is a duplicate;
  one at or after its end takes the claim over. So, unlike the reference's tumbling 5-minute buckets, two
  events 1 s apart across a bucket boundary are caught and one 5 min + 1 s later is not suppressed. An event
  that arrives late and lies a full window or more *before* the current claim is not near any claimed event:
  it is delivered and leaves the (newer) claim in place. A window of 0 for a use case means exact mode for it.
- ``off``: no requests, everything is delivered.

The rule (:func:`judge`), in order: no claim, a claim past its retention (a store may keep it a while: DynamoDB
TTL deletion lags by up to days), or a claim by the **same claimant** (the integrator passes
``"{instance_id}:{spool_seq}"``: our own earlier claim for the same spool record, re-processed after a crash)
→ ``first`` and the claim is (re)written; a claim whose ``expires_at`` has passed (``now`` in exact mode, the
event's time in window mode) → ``first``, taken over; otherwise ``duplicate`` (or, in window mode, ``first``
without a write for a late event a window or more older than the claim). A store that cannot answer returns
``error_open`` (deliver) or ``error_closed`` (retry later; neither deliver nor drop) per ``dedup_failure_mode``.
Losing dedup memory can only cause duplicates, never loss, which decides every failure path here.

:class:`EmbeddedDedupStore`: SQLite (stdlib) in WAL mode, one transaction per :meth:`~EmbeddedDedupStore.check_many`
batch, ``synchronous=NORMAL`` (a process crash keeps every committed batch; an OS crash may forget the last few,
which only means duplicates), bounded by ``max_entries`` (expired claims evicted first, then the least recently
written). Synchronous file I/O: run it on a thread. Cost (benchmarks/bench_dedup.py, this 2-core machine): ~8-10 µs
CPU per event in batches of 100-1000, ~40 µs alone (one transaction each); ~210 B on disk per claim.
The DynamoDB store (:mod:`fpolicyd.sinks.dedup_dynamodb`) applies the same :func:`judge` as a conditional put.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol, Self

from fpolicyd.errors import FpolicydError

if TYPE_CHECKING:
    from fpolicyd.config import Settings
    from fpolicyd.events import FileEvent

__all__ = [
    "DB_FILE_NAME",
    "EXACT_SORT_KEY",
    "AsyncDedupStore",
    "Claim",
    "Decision",
    "DedupBackend",
    "DedupFailureMode",
    "DedupKey",
    "DedupMode",
    "DedupPolicy",
    "DedupRequest",
    "DedupResult",
    "DedupStore",
    "DedupStoreError",
    "EmbeddedDedupStore",
    "Judgement",
    "error_decision",
    "error_result",
    "event_time_s",
    "exact_key",
    "judge",
    "result_of",
    "window_key",
]


class DedupMode(StrEnum):
    off = "off"
    exact = "exact"
    window = "window"


class DedupBackend(StrEnum):
    embedded = "embedded"
    dynamodb = "dynamodb"


class DedupFailureMode(StrEnum):
    """What a failed check means: ``open`` delivers (duplicates possible), ``closed`` holds the event back."""

    open = "open"
    closed = "closed"


class Decision(StrEnum):
    first = "first"
    duplicate = "duplicate"
    #: The store failed; fail-open: deliver the event.
    error_open = "error_open"
    #: The store failed; fail-closed: the caller must retry later and must neither drop nor deliver the event.
    error_closed = "error_closed"


class DedupStoreError(FpolicydError):
    """The embedded store cannot be opened (a path problem an operator must fix)."""


#: Sort key of every exact-mode claim (window sort keys are operation names, never this).
EXACT_SORT_KEY: Final = "exact"
DB_FILE_NAME: Final = "dedup.sqlite3"


@dataclass(frozen=True, slots=True)
class DedupKey:
    """Partition and sort key of one claim (the DynamoDB item key; the embedded store's primary key)."""

    pk: str
    sk: str

    def __post_init__(self) -> None:
        for name in ("pk", "sk"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name}: must be a non-empty string, got {value!r}")

    def __str__(self) -> str:
        return f"{self.pk}|{self.sk}"


def exact_key(event_id: str) -> DedupKey:
    return DedupKey(event_id, EXACT_SORT_KEY)


def window_key(use_case: str, file_path: str, operation: str) -> DedupKey:
    """The reference pipeline's key without its time bucket: ``{use_case}#{file_path}`` / ``{operation}``."""
    return DedupKey(f"{use_case}#{file_path}", operation)


def _finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")


@dataclass(frozen=True, slots=True)
class DedupRequest:
    """One check: may ``event_id`` (under ``key``) be delivered by ``claimant``?

    ``event_time``: the event's timestamp, epoch seconds. ``expires_at``: end of the claim this request would
    make, on the axis the mode judges on (exact: ``now + ttl``; window: ``event_time + window``).
    ``retain_until``: wall-clock time after which a store may forget the claim (default ``expires_at``; in
    window mode longer, so that late replays still meet it). ``use_case`` is for the audit ledger.
    """

    key: DedupKey
    event_id: str
    claimant: str
    event_time: float
    expires_at: float
    mode: DedupMode = DedupMode.exact
    retain_until: float | None = None
    use_case: str | None = None

    def __post_init__(self) -> None:
        if self.mode is DedupMode.off or not isinstance(self.mode, DedupMode):
            raise ValueError(f"mode: a request is exact or window, got {self.mode!r}")
        if not self.event_id or not self.claimant:
            raise ValueError("event_id and claimant must be non-empty")
        _finite("event_time", self.event_time)
        _finite("expires_at", self.expires_at)
        if self.retain_until is None:
            object.__setattr__(self, "retain_until", self.expires_at)
        else:
            _finite("retain_until", self.retain_until)
        if self.mode is DedupMode.window and self.expires_at <= self.event_time:
            raise ValueError("window mode: expires_at must be after event_time")

    @property
    def retention(self) -> float:
        """``retain_until`` (always set after construction)."""
        assert self.retain_until is not None
        return self.retain_until

    @property
    def window_s(self) -> float:
        return self.expires_at - self.event_time

    def judged_at(self, now: float) -> float:
        """The instant compared with a claim's ``expires_at``: wall clock (exact) or the event's time (window)."""
        return now if self.mode is DedupMode.exact else self.event_time


@dataclass(frozen=True, slots=True)
class Claim:
    """What a store keeps per key: the first-seen event, who claimed it, and until when."""

    event_id: str
    claimant: str
    event_time: float
    expires_at: float
    retain_until: float

    @classmethod
    def of(cls, request: DedupRequest) -> Claim:
        return cls(request.event_id, request.claimant, request.event_time, request.expires_at, request.retention)


@dataclass(frozen=True, slots=True)
class DedupResult:
    """The answer to one request. ``claimant`` is the request's; ``first_seen_id``/``first_claimant`` name the
    claim that made it a duplicate (for ``first``: the request itself; for errors: ``None``)."""

    decision: Decision
    key: DedupKey
    first_seen_id: str | None
    claimant: str
    first_claimant: str | None = None

    @property
    def deliver(self) -> bool:
        return self.decision in (Decision.first, Decision.error_open)


class Judgement(NamedTuple):
    decision: Decision
    #: Whether the request's claim replaces what the store holds.
    write: bool


def judge(existing: Claim | None, request: DedupRequest, now: float) -> Judgement:
    """The dedup rule (module docstring). The DynamoDB condition expression is this ``write`` predicate."""
    if existing is None or existing.retain_until <= now or existing.claimant == request.claimant:
        return Judgement(Decision.first, True)
    if existing.expires_at <= request.judged_at(now):
        return Judgement(Decision.first, True)
    if request.mode is DedupMode.window and request.event_time <= existing.event_time - request.window_s:
        return Judgement(Decision.first, False)
    return Judgement(Decision.duplicate, False)


def result_of(request: DedupRequest, judgement: Judgement, existing: Claim | None) -> DedupResult:
    if judgement.decision is Decision.duplicate:
        assert existing is not None
        return DedupResult(Decision.duplicate, request.key, existing.event_id, request.claimant, existing.claimant)
    return DedupResult(Decision.first, request.key, request.event_id, request.claimant, request.claimant)


def error_decision(failure_mode: DedupFailureMode) -> Decision:
    return Decision.error_open if failure_mode is DedupFailureMode.open else Decision.error_closed


def error_result(request: DedupRequest, failure_mode: DedupFailureMode) -> DedupResult:
    return DedupResult(error_decision(failure_mode), request.key, None, request.claimant)


# ------------------------------------------------------------------------------------------- policy


def event_time_s(event: FileEvent) -> float:
    """The event's timestamp (GenerationTime, or receive time when ONTAP sent none) as epoch seconds."""
    return datetime.fromisoformat(event.timestamp).timestamp()


@dataclass(frozen=True, slots=True)
class DedupPolicy:
    """Turns events into requests (settings: ``dedup_mode``, ``dedup_exact_ttl_s``, ``dedup_window_minutes``,
    ``dedup_window_overrides``). Window lengths are in seconds here."""

    mode: DedupMode = DedupMode.exact
    exact_ttl_s: float = 7 * 86400.0
    window_s: float = 300.0
    window_overrides_s: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if not (math.isfinite(self.exact_ttl_s) and self.exact_ttl_s > 0):
            raise ValueError(f"exact_ttl_s: must be a positive number of seconds, got {self.exact_ttl_s}")
        for name, value in (("window_s", self.window_s), *self.window_overrides_s.items()):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"window {name!r}: must be a number of seconds >= 0, got {value}")
        object.__setattr__(self, "window_overrides_s", MappingProxyType(dict(self.window_overrides_s)))

    @classmethod
    def from_settings(cls, settings: Settings) -> DedupPolicy:
        return cls(
            mode=settings.dedup_mode,
            exact_ttl_s=settings.dedup_exact_ttl_s,
            window_s=settings.dedup_window_minutes * 60.0,
            window_overrides_s={k: v * 60.0 for k, v in settings.dedup_window_overrides.items()},
        )

    def window_for(self, use_case: str) -> float:
        return self.window_overrides_s.get(use_case, self.window_s)

    def exact_request(
        self, event_id: str, claimant: str, event_time: float, now: float, use_case: str | None = None
    ) -> DedupRequest:
        return DedupRequest(
            exact_key(event_id), event_id, claimant, event_time, now + self.exact_ttl_s, use_case=use_case
        )

    def requests_for(
        self,
        *,
        event_id: str,
        claimant: str,
        event_time: float,
        file_path: str,
        operation: str,
        use_cases: Iterable[str],
        now: float,
    ) -> list[DedupRequest]:
        """No request in ``off`` mode; one exact request in ``exact`` mode; in ``window`` mode one request per
        use case (an unrouted event is judged under use case ``""`` with the default window), or an exact
        request for a use case whose window is 0."""
        if self.mode is DedupMode.off:
            return []
        if self.mode is DedupMode.exact:
            return [self.exact_request(event_id, claimant, event_time, now)]
        out: list[DedupRequest] = []
        for use_case in dict.fromkeys(use_cases or ("",)):
            window = self.window_for(use_case)
            if window <= 0:
                out.append(self.exact_request(event_id, claimant, event_time, now, use_case))
                continue
            out.append(
                DedupRequest(
                    window_key(use_case, file_path, operation),
                    event_id,
                    claimant,
                    event_time,
                    event_time + window,
                    mode=DedupMode.window,
                    retain_until=now + max(self.exact_ttl_s, window),
                    use_case=use_case,
                )
            )
        return out

    def requests_for_event(self, event: FileEvent, claimant: str, now: float) -> list[DedupRequest]:
        """:meth:`requests_for` with the event's fields; use cases from ``metadata["routes"]``."""
        routes = event.metadata.get("routes") or ()
        return self.requests_for(
            event_id=event.event_id,
            claimant=claimant,
            event_time=event_time_s(event),
            file_path=event.file_path,
            operation=event.operation_type,
            use_cases=[str(r) for r in routes],
            now=now,
        )


class DedupStore(Protocol):
    """A synchronous store (the embedded one). Results are in request order, one per request."""

    def check_many(self, requests: Sequence[DedupRequest], now: float) -> list[DedupResult]: ...


class AsyncDedupStore(Protocol):
    """The same contract, awaited (DynamoDB)."""

    async def check_many(self, requests: Sequence[DedupRequest], now: float) -> list[DedupResult]: ...


# ------------------------------------------------------------------------------------ embedded store

_SCHEMA_VERSION: Final = 1
_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS claims ("
    " pk TEXT NOT NULL, sk TEXT NOT NULL, event_id TEXT NOT NULL, claimant TEXT NOT NULL,"
    " event_time REAL NOT NULL, expires_at REAL NOT NULL, retain_until REAL NOT NULL,"
    " PRIMARY KEY (pk, sk))",
    "CREATE INDEX IF NOT EXISTS claims_retain_until ON claims (retain_until)",
)
_SELECT_MANY: Final = "SELECT pk, sk, event_id, claimant, event_time, expires_at, retain_until FROM claims WHERE pk IN"
#: Keys per SELECT (SQLite allows 32766 parameters since 3.32; this keeps each statement small).
_IN_CHUNK: Final = 500
# REPLACE deletes the old row and inserts a new one, so rowid order is the order of the last write: "oldest"
# for eviction without another index.
_UPSERT: Final = "INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?, ?, ?)"
_CORRUPT_CODES: Final = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_DIR_MODE: Final = 0o750


def _is_corruption(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and (code & 0xFF) in _CORRUPT_CODES


class _IncompatibleStoreError(Exception):
    """The file is a SQLite database, but not one this version wrote."""


class EmbeddedDedupStore:
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
        self.last_rebuild: Path | None = None
        self.checks = 0
        self.duplicates = 0
        self.errors = 0
        self.fail_open = 0
        self.fail_closed = 0
        self.evicted_expired = 0
        self.evicted_oldest = 0
        self.rebuilds = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbeddedDedupStore:
        return cls(
            settings.effective_dedup_dir,
            max_entries=settings.dedup_embedded_max_entries,
            failure_mode=settings.dedup_failure_mode,
        )

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

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

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
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if version == 0 and not tables:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            elif version != _SCHEMA_VERSION or "claims" not in tables:
                raise _IncompatibleStoreError(f"schema version {version}, tables {sorted(tables)}")
            self._count = int(conn.execute("SELECT COUNT(*) FROM claims").fetchone()[0])
        except BaseException:
            conn.close()
            raise
        return conn

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
        mode's decision; a corrupt file is rebuilt and the batch judged against the empty store."""
        if not requests:
            return []
        with self._lock:
            conn = self._conn
            if conn is None:
                raise RuntimeError("the dedup store is not open")
            self.checks += len(requests)
            try:
                results = self._check_batch(conn, requests, now)
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if not _is_corruption(exc):
                    return self._failed(requests)
                try:
                    self._rebuild(now)
                    assert self._conn is not None
                    results = self._check_batch(self._conn, requests, now)
                except (DedupStoreError, sqlite3.Error):
                    return self._failed(requests)
            self.duplicates += sum(1 for r in results if r.decision is Decision.duplicate)
            return results

    def _failed(self, requests: Sequence[DedupRequest]) -> list[DedupResult]:
        self.errors += len(requests)
        if self.failure_mode is DedupFailureMode.open:
            self.fail_open += len(requests)
        else:
            self.fail_closed += len(requests)
        return [error_result(r, self.failure_mode) for r in requests]

    def _check_batch(self, conn: sqlite3.Connection, requests: Sequence[DedupRequest], now: float) -> list[DedupResult]:
        # The overlay holds this batch's writes, so a key seen twice in one batch is judged against the first.
        overlay: dict[DedupKey, Claim | None] = {}
        writes: dict[DedupKey, Claim] = {}
        results: list[DedupResult] = []
        added = 0
        conn.execute("BEGIN IMMEDIATE")
        stored = self._load(conn, {r.key for r in requests})
        for request in requests:
            key = request.key
            if key in overlay:
                existing = overlay[key]
            else:
                existing = stored.get(key)
                overlay[key] = existing
                added += existing is None  # a missing key is always written (judge)
            judgement = judge(existing, request, now)
            if judgement.write:
                claim = Claim.of(request)
                overlay[key] = claim
                writes.pop(key, None)  # keep write order = rowid order = eviction age
                writes[key] = claim
            results.append(result_of(request, judgement, existing))
        conn.executemany(
            _UPSERT,
            [
                (k.pk, k.sk, c.event_id, c.claimant, c.event_time, c.expires_at, c.retain_until)
                for k, c in writes.items()
            ],
        )
        count = self._count + added
        evicted_expired = evicted_oldest = 0
        if count > self.max_entries:
            evicted_expired = conn.execute("DELETE FROM claims WHERE retain_until <= ?", (now,)).rowcount
            count -= evicted_expired
        if count > self.max_entries:
            evicted_oldest = conn.execute(
                "DELETE FROM claims WHERE rowid IN (SELECT rowid FROM claims ORDER BY rowid LIMIT ?)",
                (count - self.max_entries,),
            ).rowcount
            count -= evicted_oldest
        conn.execute("COMMIT")
        self._count = count
        self.evicted_expired += evicted_expired
        self.evicted_oldest += evicted_oldest
        return results

    @staticmethod
    def _load(conn: sqlite3.Connection, keys: set[DedupKey]) -> dict[DedupKey, Claim]:
        """The stored claims of ``keys``: one indexed ``pk IN (...)`` query per chunk instead of one per key."""
        by_pk: dict[str, list[DedupKey]] = {}
        for key in keys:
            by_pk.setdefault(key.pk, []).append(key)
        pks = list(by_pk)
        found: dict[DedupKey, Claim] = {}
        for start in range(0, len(pks), _IN_CHUNK):
            chunk = pks[start : start + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            for pk, sk, *rest in conn.execute(f"{_SELECT_MANY} ({marks})", chunk):
                key = DedupKey(pk, sk)
                if key in keys:
                    found[key] = Claim(*rest)
        return found

    def _purge_expired(self, conn: sqlite3.Connection, now: float) -> None:
        try:
            removed = conn.execute("DELETE FROM claims WHERE retain_until <= ?", (now,)).rowcount
        except sqlite3.Error:
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
