"""The audit ledger of the reader's exact dedup: every suppressed duplicate → one ledger line, never lost.

The reader keeps each duplicate it suppresses in the spool (a duplicate record, ``pipeline/records.py``). The
daemon's pipeline hands this writer the sequence number and event id of each duplicate record it appends
(:meth:`DuplicateLedger.appended`); once those records are durable (:meth:`DuplicateLedger.durable`, called after
each commit) the writer appends their ledger lines (``pipeline/ledger.py``) on a thread, waits for the fsync, and
only then moves its spool cursor (:data:`LEDGER_CURSOR`) past them. With no duplicate waiting, the cursor follows
the durable seq at no cost — duplicates are rare, so the ledger never reads the spool's other records (a sink worker
would read every record to find them: measured, that was 3.5 µs per event in the delivery process).

After a crash the records after the cursor are scanned once at start (:meth:`DuplicateLedger.recover`) and their
lines written again (at least once, as every sink): a suppressed duplicate always leaves an audit record.

A write the disk refuses (ENOSPC/EDQUOT) is reported to the daemon's disk monitor (reading pauses, one log line per
episode) and tried again after its backoff; the duplicates wait in the spool meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol

from fpolicyd.errors import SinkError
from fpolicyd.obs.log import get_logger
from fpolicyd.pipeline.disk import Writer
from fpolicyd.pipeline.ledger import AuditLedger, reader_duplicate_record
from fpolicyd.pipeline.records import DUPLICATE_TAG, duplicate_payload, stored_event_id
from fpolicyd.pipeline.spool import Spool

log = get_logger("fpolicyd.ledger")

__all__ = ["LEDGER_CURSOR", "Backoff", "DiskReports", "DuplicateLedger"]

#: The ledger's spool cursor.
LEDGER_CURSOR: Final = "dedup-ledger"
#: Spool records read per step by the start-up scan.
_SCAN_BATCH: Final = 10_000
#: After a failed ledger write, how long before the next attempt (the duplicates wait in the spool meanwhile),
#: when no disk monitor is given (with one: its ``disk_full_retry_*`` backoff).
RETRY_S: Final = 1.0


class Backoff(Protocol):
    """How long to wait before a refused write is tried again (``pipeline.disk.DiskRetry``)."""

    def delay(self, attempt: int) -> float: ...


class DiskReports(Protocol):
    """Where a refused write is reported (the daemon's disk monitor, ``server/disk_monitor.py``): a full disk
    pauses reading until a write goes through again; ``retry`` paces the attempts meanwhile."""

    @property
    def retry(self) -> Backoff: ...

    def full(self, writer: str, error: BaseException | str) -> bool: ...

    def freed(self, writer: str) -> bool: ...


def _event_id(payload: bytes) -> str:
    """The event id of a duplicate record's event (the first field; ``<unreadable>`` if it is not)."""
    event = duplicate_payload(payload)
    return (stored_event_id(event) if event is not None else None) or "<unreadable>"


class DuplicateLedger:
    """Single owner (the event loop); the ledger file is written on a worker thread."""

    def __init__(
        self,
        ledger: AuditLedger,
        spool: Spool,
        *,
        instance: str,
        clock: Callable[[], float] = time.time,
        disk: DiskReports | None = None,
    ) -> None:
        self._ledger = ledger
        self._disk = disk
        self._spool = spool
        self._instance = instance
        self._clock = clock
        #: Duplicate records appended and not yet in the ledger file: (seq, event id), in seq order.
        self._pending: deque[tuple[int, str]] = deque()
        self._writing: asyncio.Task[None] | None = None
        self._wanted = 0
        #: The last write's error while the ledger is failing (readiness), None once a write succeeds.
        self.last_error: SinkError | None = None
        self.written = 0

    def open(self) -> None:
        """Create the ledger's directory and repair a torn tail (blocking: on a thread at start)."""
        self._ledger.open(self._clock())

    def recover(self) -> int:
        """At start (blocking): the duplicate records after the cursor, which a crash may have left out of the
        ledger file, are queued again. Returns how many."""
        spool = self._spool
        after = spool.acked_seq(LEDGER_CURSOR)
        found = 0
        while records := spool.scan(after, _SCAN_BATCH, 16 << 20):
            for record in records:
                if record.payload[:1] == bytes([DUPLICATE_TAG]):
                    self._pending.append((record.seq, _event_id(record.payload)))
                    found += 1
            after = records[-1].seq
        return found

    def appended(self, seq: int, payload: bytes) -> None:
        """A duplicate record was appended (not yet durable)."""
        self._pending.append((seq, _event_id(payload)))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def durable(self, durable_seq: int) -> None:
        """After a commit: write what became durable; with nothing waiting, move the cursor along."""
        self._wanted = max(self._wanted, durable_seq)
        if self._writing is not None:
            return
        pending = self._pending
        self._ack(durable_seq if not pending else min(durable_seq, pending[0][0] - 1))
        if pending and pending[0][0] <= durable_seq:
            self._writing = asyncio.get_running_loop().create_task(self._write(), name="dedup-ledger")

    async def _write(self) -> None:
        attempt = 0
        try:
            while self._pending and self._pending[0][0] <= self._wanted:
                upto = self._wanted
                batch = [entry for entry in self._pending if entry[0] <= upto]
                now = self._clock()
                rows = [reader_duplicate_record(event_id, f"{self._instance}:{seq}", now) for seq, event_id in batch]
                try:
                    await asyncio.to_thread(self._ledger.write_duplicates, rows, now)
                except SinkError as exc:
                    disk = self._disk
                    delay = RETRY_S if disk is None else disk.retry.delay(attempt)
                    if disk is not None and exc.disk_full:
                        disk.full(Writer.ledger, exc)  # logged once per episode there
                    elif self.last_error is None:
                        log.error("ledger_write_failed", error=str(exc), duplicates=len(rows), retry_in_s=delay)
                    self.last_error = exc
                    attempt += 1
                    await asyncio.sleep(delay)
                    continue
                if self.last_error is not None and not self.last_error.disk_full:
                    log.info("ledger_write_recovered", duplicates=len(rows))
                if self._disk is not None:
                    self._disk.freed(Writer.ledger)
                self.last_error = None
                attempt = 0
                self.written += len(batch)
                for _ in batch:
                    self._pending.popleft()
                self._ack(upto if not self._pending else min(upto, self._pending[0][0] - 1))
        finally:
            self._writing = None

    def _ack(self, seq: int) -> None:
        spool = self._spool
        if seq > spool.acked_seq(LEDGER_CURSOR):
            spool.ack_delivered(LEDGER_CURSOR, min(seq, spool.durable_seq))

    async def drain(self, timeout_s: float) -> None:
        """At stop: write what is durable within ``timeout_s``; the rest is written at the next start."""
        self.durable(self._spool.durable_seq)
        task = self._writing
        if task is not None:
            await asyncio.wait({task}, timeout=timeout_s)
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._pending:
            log.warning("ledger_pending_at_stop", duplicates=len(self._pending), detail="written at the next start")

    def close(self) -> None:
        self._ledger.close()
