"""The dedup audit ledger file: one JSON line per suppressed duplicate and per fail-open delivery.

What it stores: the records of :mod:`fpolicyd.pipeline.ledger` (:func:`~fpolicyd.pipeline.ledger.ledger_record`,
:func:`~fpolicyd.pipeline.ledger.reader_duplicate_record`), after ``redact`` (default: identity), in JSON Lines
files under the ledger directory, prefix :data:`LEDGER_PREFIX`.

Durability contract: files rotate like every JSON Lines output (:class:`~fpolicyd.storage.jsonl.JsonlWriter`, UTC
names, never a torn line); :meth:`AuditLedger.write` returns once the batch is fsynced (unless the fsync policy is
``never``), so the caller may then let the spool forget the events. A failed write raises ``SinkError`` with the
file cut back (retrying the same batch writes no line twice). Synchronous: call it on a thread.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Self

import orjson

from fpolicyd.pipeline.dedup import Decision, DedupRequest, DedupResult
from fpolicyd.pipeline.ledger import Redact, finish_record, ledger_record
from fpolicyd.storage.closing import ClosedOnExit
from fpolicyd.storage.jsonl import FsyncPolicy, JsonlSettings, JsonlWriter

__all__ = ["LEDGER_PREFIX", "AuditLedger"]

LEDGER_PREFIX: Final = "dedup_ledger"


def _identity(record: dict[str, Any]) -> dict[str, Any]:
    return record


class AuditLedger(ClosedOnExit):
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

    def open(self, now: float) -> Self:
        """Create the directory and repair torn tails (raises ``SinkError``)."""
        with self._lock:
            self._writer.open(now)
        return self

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
            lines.append(orjson.dumps(finish_record(self.redact(record), request)))
            duplicates += result.decision is Decision.duplicate
        if not lines:
            return 0
        with self._lock:
            self._writer.write_batch(lines, now)
            self.records_written += len(lines)
            self.duplicates_recorded += duplicates
            self.error_open_recorded += len(lines) - duplicates
        return len(lines)
