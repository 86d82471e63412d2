"""Wall-clock jumps through a running daemon (in-process, the wall clock injected: ``Daemon(wall_clock=...)``).

The clock is stepped an hour back, then two hours forward (an hour ahead of the true time), while events flow
through the reader (receive times, exact dedup in the reader's window) and the processing stage (settle, window
dedup). What must hold: nothing is lost; a burst held when the clock steps back still goes out after its quiet
window (before the fix the settle watermark froze at the pre-step time and held it for the hour); an event
received after the step back is still held for its window (not released at once); dedup keys claimed before a
step are still honoured after it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from fpolicyd.app import Daemon
from fpolicyd.simulator.peer import OntapPeer
from support.daemon import make_settings, running_daemon
from support.notifications import frame
from support.peer import negotiated_peer

HOUR = 3600.0


class SteppedClock:
    """The true wall clock plus an offset the test steps."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def lines(directory: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for path in sorted(directory.glob("*.jsonl")) for line in path.read_bytes().splitlines()]


async def wait_for(directory: Path, count: int, within: float = 15.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + within
    while True:
        found = lines(directory)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.02)


@asynccontextmanager
async def running(tmp_path: Path, clock: SteppedClock, **overrides: Any) -> AsyncIterator[tuple[Daemon, OntapPeer]]:
    """Not the ``daemon`` fixture: the daemon's wall clock is the test's ``clock``, and a peer past NEGO."""
    async with running_daemon(make_settings(tmp_path, **overrides), wall_clock=clock) as daemon:
        peer = await negotiated_peer(daemon.port)
        yield daemon, peer
        await peer.close()


def received_at(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["metadata"]["received_at"]).timestamp()


async def test_settle_and_reader_dedup_through_an_hour_back_and_two_forward(tmp_path: Path) -> None:
    clock = SteppedClock()
    overrides = {"dedup_mode": "exact", "write_complete_delay_s": 1.0, "settle_max_hold_s": 3.0}
    async with running(tmp_path, clock, **overrides) as (daemon, peer):
        created = frame(1, "SMB_CREAT", "/scans/a.tiff")
        await peer.send(created)
        processor = daemon.processing
        assert processor is not None
        for _ in range(500):  # until settle holds it (bounded: 10 s)
            if processor.stage.pending:
                break
            await asyncio.sleep(0.02)
        assert processor.stage.pending == 1
        clock.offset -= HOUR  # the wall clock steps an hour back while /scans/a.tiff is held
        await peer.send(frame(2, "SMB_WR", "/scans/b.tiff"))
        await asyncio.sleep(0.2)
        await peer.send(frame(3, "SMB_WR", "/scans/b.tiff"))
        events = await wait_for(tmp_path / "events", 2)
        assert sorted(e["file_path"] for e in events) == ["/scans/a.tiff", "/scans/b.tiff"]
        by_path = {e["file_path"]: e for e in events}
        # Held for its quiet window after the step, not let out at once: both writes are one event.
        assert by_path["/scans/b.tiff"]["metadata"]["settle"]["coalesced"] == 2
        assert by_path["/scans/a.tiff"]["metadata"]["settle"]["reason"] == "quiet"
        # The receive times are the (stepped) wall clock's.
        assert received_at(by_path["/scans/a.tiff"]) - received_at(by_path["/scans/b.tiff"]) > HOUR - 60
        assert processor.stage.stats.clamped == 2
        # A redelivery of the notification received before the step is still a duplicate.
        await peer.send(created)
        clock.offset += 2 * HOUR  # now an hour ahead of the true time
        await peer.send(frame(4, "SMB_CREAT", "/scans/c.tiff"), created)
        events = await wait_for(tmp_path / "events", 3)
        await asyncio.sleep(0.3)
        assert daemon.context.ingest.counters.duplicates == 2
    events = lines(tmp_path / "events")
    assert sorted(e["file_path"] for e in events) == ["/scans/a.tiff", "/scans/b.tiff", "/scans/c.tiff"]
    assert len(lines(tmp_path / "ledger")) == 2


async def test_window_dedup_in_the_stage_through_clock_steps(tmp_path: Path) -> None:
    """Window dedup judges on the event's own time (ONTAP's GenerationTime), not on this host's clock: steps of
    the host clock change neither which events are duplicates nor lose any."""
    clock = SteppedClock()
    overrides = {"dedup_mode": "window", "dedup_window_minutes": 5, "write_complete_delay_s": 0.3}
    generation = 1_707_492_600_000_000
    async with running(tmp_path, clock, **overrides) as (daemon, peer):
        await peer.send(frame(1, "SMB_WR", "/data/x.csv", generation_us=generation))
        await wait_for(tmp_path / "events", 1)
        clock.offset -= HOUR
        await peer.send(frame(2, "SMB_WR", "/data/x.csv", generation_us=generation + 1_000_000))  # 1 s later
        await wait_for(tmp_path / "ledger", 1)
        clock.offset += 2 * HOUR
        await peer.send(frame(3, "SMB_WR", "/data/x.csv", generation_us=generation + 2_000_000))  # 2 s later
        await peer.send(frame(4, "SMB_WR", "/data/x.csv", generation_us=generation + 400_000_000))  # 6m40s later
        await wait_for(tmp_path / "events", 2)
        await wait_for(tmp_path / "ledger", 2)
        assert daemon.processing is not None
        await asyncio.sleep(0.3)
    assert [e["timestamp"][11:19] for e in lines(tmp_path / "events")] == ["15:30:00", "15:36:40"]
    assert [r["decision"] for r in lines(tmp_path / "ledger")] == ["duplicate", "duplicate"]
