"""The audit ledger of the reader's dedup: every duplicate record gets its line, the cursor never passes one that
has not, a failing ledger is retried (and not ready), and a restart writes again what a crash left out."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from fpolicyd.errors import SinkError
from fpolicyd.pipeline.records import encode_duplicate
from fpolicyd.storage import duplicate_ledger as ledger_module
from fpolicyd.storage.duplicate_ledger import LEDGER_CURSOR, DuplicateLedger
from fpolicyd.storage.ledger import AuditLedger
from fpolicyd.storage.spool import Spool, SpoolFsync, SpoolSettings


def event(n: int) -> bytes:
    return orjson.dumps({"event_id": f"00000000-0000-5000-8000-{n:012d}", "operation_type": "write"})


def open_spool(directory: Path) -> Spool:
    settings = SpoolSettings(directory=directory, fsync=SpoolFsync.never)
    return Spool.open(settings, ["jsonl:/x", LEDGER_CURSOR])


def ledger_lines(directory: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.jsonl")):
        out.extend(orjson.loads(line) for line in path.read_bytes().splitlines())
    return out


def append(spool: Spool, ledger: DuplicateLedger, records: list[bytes]) -> list[int]:
    seqs = list(spool.append_many(records))
    for seq, record in zip(seqs, records, strict=True):
        if record[0] == 0x1F:
            ledger.appended(seq, record)
    spool.flush()
    return seqs


async def settle(ledger: DuplicateLedger) -> None:
    for _ in range(200):
        if not ledger.pending:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{ledger.pending} duplicates still pending")


async def test_every_duplicate_gets_its_line_and_the_cursor_follows(tmp_path: Path) -> None:
    spool = open_spool(tmp_path / "spool")
    ledger = DuplicateLedger(AuditLedger.for_directory(tmp_path / "ledger"), spool, instance="i-1")
    ledger.open()
    try:
        # No duplicate: the cursor follows the durable seq at once.
        append(spool, ledger, [event(1), event(2)])
        ledger.durable(spool.durable_seq)
        assert spool.acked_seq(LEDGER_CURSOR) == 2
        # A duplicate among events: written, then the cursor moves past it.
        append(spool, ledger, [event(3), encode_duplicate(event(1)), event(4)])
        ledger.durable(spool.durable_seq)
        await settle(ledger)
        assert spool.acked_seq(LEDGER_CURSOR) == 5
        [line] = ledger_lines(tmp_path / "ledger")
        assert line["event_id"] == "00000000-0000-5000-8000-000000000001"
        assert line["decision"] == "duplicate"
        assert line["claimant"] == "i-1:4"
        assert ledger.written == 1
    finally:
        ledger.close()
        spool.close()


async def test_a_failing_ledger_keeps_the_cursor_before_the_duplicate_and_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_module, "RETRY_S", 0.01)
    spool = open_spool(tmp_path / "spool")
    audit = AuditLedger.for_directory(tmp_path / "ledger")
    ledger = DuplicateLedger(audit, spool, instance="i-1")
    ledger.open()
    real = audit.write_duplicates
    failures = [SinkError("disk full", retriable=True)] * 3

    def flaky(rows: list[dict[str, Any]], now: float) -> int:
        if failures:
            raise failures.pop()
        return real(rows, now)

    monkeypatch.setattr(audit, "write_duplicates", flaky)
    try:
        append(spool, ledger, [event(1), encode_duplicate(event(1)), event(2)])
        ledger.durable(spool.durable_seq)
        await asyncio.sleep(0)
        assert spool.acked_seq(LEDGER_CURSOR) == 1  # not past the duplicate while its line is not written
        await settle(ledger)
        assert ledger.last_error is None
        assert spool.acked_seq(LEDGER_CURSOR) == 3
        assert len(ledger_lines(tmp_path / "ledger")) == 1
    finally:
        ledger.close()
        spool.close()


async def test_a_crash_before_the_line_is_written_is_made_good_at_the_next_start(tmp_path: Path) -> None:
    spool = open_spool(tmp_path / "spool")
    ledger = DuplicateLedger(AuditLedger.for_directory(tmp_path / "ledger"), spool, instance="i-1")
    ledger.open()
    append(spool, ledger, [event(1), encode_duplicate(event(1)), event(2), encode_duplicate(event(2))])
    spool.sync()
    spool.checkpoint()
    ledger.close()
    spool.close()  # "crash": the durable duplicates never reached the ledger file
    spool = open_spool(tmp_path / "spool")
    again = DuplicateLedger(AuditLedger.for_directory(tmp_path / "ledger"), spool, instance="i-1")
    again.open()
    try:
        assert again.recover() == 2
        again.durable(spool.durable_seq)
        await settle(again)
        assert [line["claimant"] for line in ledger_lines(tmp_path / "ledger")] == ["i-1:2", "i-1:4"]
        assert spool.acked_seq(LEDGER_CURSOR) == 4
    finally:
        again.close()
        spool.close()
