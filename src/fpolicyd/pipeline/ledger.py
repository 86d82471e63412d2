"""Audit ledger of dedup decisions: one JSON line per suppressed duplicate and per fail-open delivery.

Regulated users asked that a suppressed duplicate leave an audit record, never a silent drop
(``docs/reference-pipeline.md`` §6). A record::

    {"time": "2024-05-01T10:00:00.000000Z", "event_id": "...", "key": "pk|sk", "decision": "duplicate",
     "first_seen_id": "...", "claimant": "i-1:42", "first_claimant": "i-1:17", "mode": "window",
     "use_case": "UC1", "file_path": "/legal/a.pdf"}

``time`` is the decision time; ``claimant`` the suppressed event's, ``first_claimant`` the claim holder's;
``use_case`` and ``file_path`` appear for requests made for a use case (window mode). ``first``
decisions are not recorded (the event itself is delivered) and neither are ``error_closed`` ones (the event is
held back and judged again later).

Redaction: ``redact`` (default: identity) sees each record before it is written and returns the record to write;
the data-classification stage plugs in here (``Redactor.redact_record`` hashes ``file_path``). ``key`` is built
*after* redaction from the redacted ``file_path``, so a window key never leaks the clear path.

Files rotate like every JSON Lines output (:class:`~fpolicyd.sinks.jsonl.JsonlWriter`, prefix ``dedup_ledger``,
UTC names, never a torn line); :meth:`AuditLedger.write` returns once the batch is fsynced (unless the fsync
policy is ``never``), so the caller may then let the spool forget the events. Synchronous: call it on a thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

import orjson

from fpolicyd.events import format_rfc3339_us
from fpolicyd.pipeline.dedup import Decision, DedupMode, DedupRequest, DedupResult, exact_key
from fpolicyd.sinks.jsonl import FsyncPolicy, JsonlSettings, JsonlWriter

if TYPE_CHECKING:
    from fpolicyd.config import Settings

__all__ = ["LEDGER_PREFIX", "RECORDED_DECISIONS", "AuditLedger", "Redact", "ledger_record", "reader_duplicate_record"]

LEDGER_PREFIX: Final = "dedup_ledger"
RECORDED_DECISIONS: Final = frozenset({Decision.duplicate, Decision.error_open})

Redact = Callable[[dict[str, Any]], dict[str, Any]]


def _identity(record: dict[str, Any]) -> dict[str, Any]:
    return record


def ledger_record(request: DedupRequest, result: DedupResult, now: float) -> dict[str, Any] | None:
    """The unredacted record for one decision, or ``None`` when the decision is not recorded. ``key`` is left
    out when the request has a use case (it is derived from the possibly redacted ``file_path`` on write)."""
    if result.decision not in RECORDED_DECISIONS:
        return None
    record: dict[str, Any] = {
        "time": format_rfc3339_us(int(now * 1_000_000)),
        "event_id": request.event_id,
        "key": str(result.key),
        "decision": result.decision.value,
        "first_seen_id": result.first_seen_id,
        "claimant": result.claimant,
        "first_claimant": result.first_claimant,
        "mode": request.mode.value,
    }
    if request.use_case is not None:
        record["use_case"] = request.use_case
        prefix = f"{request.use_case}#"
        if request.key.pk.startswith(prefix):  # a window key: pk = "{use_case}#{file_path}"
            del record["key"]
            record["file_path"] = request.key.pk[len(prefix) :]
    return record


def reader_duplicate_record(event_id: str, claimant: str, now: float) -> dict[str, Any]:
    """The record of a duplicate the reader's exact-dedup window suppressed: the same fields as a stage decision
    in exact mode (key ``<event_id>|<EXACT_SORT_KEY>``), except ``first_claimant``, which the window does not
    keep (it holds keys only: the first event is the one with the same ``event_id``)."""
    return {
        "time": format_rfc3339_us(int(now * 1_000_000)),
        "event_id": event_id,
        "key": str(exact_key(event_id)),
        "decision": Decision.duplicate.value,
        "first_seen_id": event_id,
        "claimant": claimant,
        "mode": DedupMode.exact.value,
    }


def _finish(record: dict[str, Any], request: DedupRequest) -> dict[str, Any]:
    """Rebuild a window key from the (redacted) path; a redaction that removed the path leaves ``<redacted>``."""
    if "key" not in record and request.use_case is not None:
        path = record.get("file_path", "<redacted>")
        record["key"] = f"{request.use_case}#{path}|{request.key.sk}"
    return record


class AuditLedger:
    """Writes :func:`ledger_record` lines. Counters (plain ints): ``records_written``, ``duplicates_recorded``,
    ``error_open_recorded``. Thread-safe."""

    def __init__(self, settings: JsonlSettings, *, redact: Redact = _identity) -> None:
        self.settings = settings
        self.redact = redact
        self._writer = JsonlWriter(settings)
        self._lock = threading.Lock()
        self.records_written = 0
        self.duplicates_recorded = 0
        self.error_open_recorded = 0

    @classmethod
    def for_directory(
        cls,
        directory: Path,
        *,
        redact: Redact = _identity,
        fsync: FsyncPolicy = FsyncPolicy.always,
        max_file_bytes: int = 128 << 20,
        max_file_age_s: float = 3600.0,
    ) -> AuditLedger:
        settings = JsonlSettings(
            directory=Path(directory),
            prefix=LEDGER_PREFIX,
            max_file_bytes=max_file_bytes,
            max_file_age_s=max_file_age_s,
            fsync=fsync,
        )
        return cls(settings, redact=redact)

    @classmethod
    def from_settings(cls, settings: Settings, *, redact: Redact = _identity) -> AuditLedger:
        """Directory ``dedup_ledger_dir``; rotation as ``jsonl_max_file_*``; every batch fsynced unless
        ``jsonl_fsync`` is ``never``."""
        never = settings.jsonl_fsync is FsyncPolicy.never
        return cls.for_directory(
            settings.effective_dedup_ledger_dir,
            redact=redact,
            fsync=FsyncPolicy.never if never else FsyncPolicy.always,
            max_file_bytes=settings.jsonl_max_file_bytes,
            max_file_age_s=settings.jsonl_max_file_age_s,
        )

    def open(self, now: float) -> Self:
        """Create the directory and repair torn tails (raises ``SinkError``)."""
        with self._lock:
            self._writer.open(now)
        return self

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._writer.close()

    def write_duplicates(self, records: Sequence[dict[str, Any]], now: float) -> int:
        """Record duplicates the reader's exact-dedup window suppressed (:func:`reader_duplicate_record`);
        same guarantees as :meth:`write`."""
        if not records:
            return 0
        lines = [orjson.dumps(self.redact(record)) for record in records]
        with self._lock:
            self._writer.write_batch(lines, now)
            self.records_written += len(lines)
            self.duplicates_recorded += len(lines)
        return len(lines)

    def write(self, decisions: Sequence[tuple[DedupRequest, DedupResult]], now: float) -> int:
        """Record every duplicate and error_open decision of ``decisions``; returns the records written.
        Raises ``SinkError`` (the file is cut back: retrying the same batch writes no line twice) and lets an
        exception of ``redact`` through before anything is written."""
        lines: list[bytes] = []
        duplicates = 0
        for request, result in decisions:
            record = ledger_record(request, result, now)
            if record is None:
                continue
            lines.append(orjson.dumps(_finish(self.redact(record), request)))
            duplicates += result.decision is Decision.duplicate
        if not lines:
            return 0
        with self._lock:
            self._writer.write_batch(lines, now)
            self.records_written += len(lines)
            self.duplicates_recorded += duplicates
            self.error_open_recorded += len(lines) - duplicates
        return len(lines)
