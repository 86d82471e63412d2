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
written). Synchronous file I/O: run it on a thread. Cost (benchmarks/bench_dedup.py, this 2-core machine, batch
1000): ~3.5 µs CPU per new event, ~2.5 µs per duplicate, ~25 µs alone (one transaction each); ~200 B on disk per
claim; building the request (:meth:`DedupPolicy.exact_request`) ~1 µs.
The DynamoDB store (:mod:`fpolicyd.sinks.dedup_dynamodb`) applies the same :func:`judge` as a conditional put.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sqlite3
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol, Self, TypeAlias

from fpolicyd.errors import DiskFullError, FpolicydError
from fpolicyd.pipeline.disk import Writer

if TYPE_CHECKING:
    from fpolicyd.config import Settings
    from fpolicyd.events import FileEvent

__all__ = [
    "DB_FILE_NAME",
    "EXACT_SORT_KEY",
    "MAX_PARTITION_KEY_BYTES",
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


#: DynamoDB's limit on a partition key (UTF-8 bytes); a longer window key names its path by its SHA-256.
MAX_PARTITION_KEY_BYTES: Final = 2048


def window_key(use_case: str, file_path: str, operation: str) -> DedupKey:
    """The reference pipeline's key without its time bucket: ``{use_case}#{file_path}`` / ``{operation}``.

    A key over :data:`MAX_PARTITION_KEY_BYTES` (a long path: paths are unbounded unless ``path_max_chars`` is
    set) becomes ``{use_case}#sha256:{hex of the path}``, in both backends, so that DynamoDB can store it."""
    pk = f"{use_case}#{file_path}"
    if len(pk) * 4 > MAX_PARTITION_KEY_BYTES and len(pk.encode("utf-8", "surrogatepass")) > MAX_PARTITION_KEY_BYTES:
        digest = hashlib.sha256(file_path.encode("utf-8", "surrogatepass")).hexdigest()
        pk = f"{use_case}#sha256:{digest}"
    return DedupKey(pk, operation)


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


# Hot-path builders (one request and one result per event): the frozen dataclass ``__init__`` goes through
# ``object.__setattr__`` per field (and DedupKey/DedupRequest validate); setting the slot descriptors directly
# builds the identical object in about half the time.
_new_object = object.__new__
_isfinite = math.isfinite
_set_pk, _set_sk = (DedupKey.__dict__[f.name].__set__ for f in fields(DedupKey))
(
    _set_request_key,
    _set_event_id,
    _set_request_claimant,
    _set_event_time,
    _set_expires_at,
    _set_mode,
    _set_retain_until,
    _set_use_case,
) = (DedupRequest.__dict__[f.name].__set__ for f in fields(DedupRequest))


def _exact_request(
    event_id: str, claimant: str, event_time: float, expires_at: float, use_case: str | None
) -> DedupRequest:
    """``DedupRequest(exact_key(event_id), event_id, claimant, event_time, expires_at, use_case=use_case)``, built
    through the slot descriptors when the values plainly pass its validation (non-empty strings, finite floats:
    what the processing stage always passes), through the validating constructors otherwise (same errors)."""
    if not (
        type(event_id) is str
        and event_id
        and type(claimant) is str
        and claimant
        and type(event_time) is float
        and type(expires_at) is float
        and _isfinite(event_time)
        and _isfinite(expires_at)
    ):
        return DedupRequest(exact_key(event_id), event_id, claimant, event_time, expires_at, use_case=use_case)
    key: DedupKey = _new_object(DedupKey)
    _set_pk(key, event_id)
    _set_sk(key, EXACT_SORT_KEY)
    request: DedupRequest = _new_object(DedupRequest)
    _set_request_key(request, key)
    _set_event_id(request, event_id)
    _set_request_claimant(request, claimant)
    _set_event_time(request, event_time)
    _set_expires_at(request, expires_at)
    _set_mode(request, DedupMode.exact)
    _set_retain_until(request, expires_at)
    _set_use_case(request, use_case)
    return request


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
        return _exact_request(event_id, claimant, event_time, now + self.exact_ttl_s, use_case)

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
