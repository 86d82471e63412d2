"""The audit ledger as a sink: duplicates the reader's exact-dedup window suppressed → ledger lines.

A suppressed duplicate is kept in the spool (``pipeline/records.py``); this sender, run by an ordinary sink worker
with its own cursor, turns each into a ledger record (``pipeline/ledger.py``) and acknowledges the records once
the ledger batch is fsynced. So a duplicate's audit record is as durable as any delivered event: after a crash
it is written again (at least once), never lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Final

from fpolicyd.errors import SinkError
from fpolicyd.obs.log import get_logger
from fpolicyd.pipeline.ledger import AuditLedger, reader_duplicate_record
from fpolicyd.pipeline.records import duplicate_payload, stored_event_id
from fpolicyd.pipeline.spool import Record

log = get_logger("fpolicyd.sink")

#: The ledger's spool cursor.
LEDGER_CURSOR: Final = "dedup-ledger"


def ledger_select(payload: bytes) -> bytes | None:
    """The sink worker's selector: only duplicate records, as their event JSON."""
    return duplicate_payload(payload)


class LedgerSender:
    """Writes the ledger records of the duplicates it is handed (``send`` on a thread: the ledger fsyncs)."""

    name = LEDGER_CURSOR
    max_records = 1000
    max_bytes = 4 << 20
    max_in_flight = 1
    linger_s = 0.0

    def __init__(self, ledger: AuditLedger, *, instance: str, clock: Callable[[], float] = time.time) -> None:
        self._ledger = ledger
        self._instance = instance
        self._clock = clock

    async def start(self) -> None:
        await asyncio.to_thread(self._ledger.open, self._clock())

    async def send(self, records: Sequence[Record]) -> Sequence[Record]:
        now = self._clock()
        rows = []
        for record in records:
            event_id = stored_event_id(record.payload) or "<unreadable>"
            rows.append(reader_duplicate_record(event_id, f"{self._instance}:{record.seq}", now))
        try:
            await asyncio.to_thread(self._ledger.write_duplicates, rows, now)
        except SinkError as exc:
            log.error("ledger_write_failed", error=str(exc), records=len(rows))
            raise
        return ()

    async def close(self) -> None:
        await asyncio.to_thread(self._ledger.close)
