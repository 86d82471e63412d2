"""The processing stage through a running daemon: routing (fan-out, per-route sinks, unrouted audit), exact and
window dedup with the audit ledger, settle (coalescing, cancel on delete, restart with a pending settle)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson

from fpolicyd.app import Daemon
from fpolicyd.pipeline.records import Record
from fpolicyd.server.processing import ProcessingWorker
from fpolicyd.simulator.peer import OntapPeer
from fpolicyd.sinks.local import JsonlSender
from support.captures import NEGO_REQ
from support.daemon import make_settings, running_daemon
from support.notifications import frame
from support.peer import eventually, loopback_peer, negotiated_peer

#: A spool small enough to fill in a test, shaped like the defaults (the gap from the pause watermark to the maximum
#: holds several segments, and less than the raw records reading may leave): reading pauses at 1 MiB, the stage
#: keeps 64 KiB free under 1.5 MiB.
SMALL_SPOOL = {
    "spool_segment_bytes": 64 << 10,
    "backpressure_low_bytes": 256 << 10,
    "backpressure_high_bytes": 512 << 10,
    "backpressure_pause_bytes": 1 << 20,
    "spool_max_bytes": 3 << 19,
}

ROUTES = """
[[route]]
name = "legal"
id = "UC1"
prefixes = ["/legal/"]
suffixes = [".pdf"]
operations = ["create", "write", "rename", "delete"]
target = "Compliance"
sinks = ["jsonl:{legal}"]

[[route]]
name = "finance"
id = "UC2"
prefixes = ["/finance/"]
suffixes = [".pdf"]
operations = ["create", "write"]
target = "Idp"
sinks = []
"""


def lines(directory: Path, pattern: str = "*.jsonl") -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in sorted(directory.glob(pattern)):
        out.extend(orjson.loads(line) for line in path.read_bytes().splitlines())
    return out


async def wait_for(directory: Path, count: int, within: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + within
    while True:
        found = lines(directory)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.02)


@asynccontextmanager
async def running(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[Daemon, OntapPeer]]:
    """Not the ``daemon`` fixture: exact dedup (what processing does), settings that name files under
    ``tmp_path`` (routes), and a peer past NEGO."""
    async with running_daemon(make_settings(tmp_path, **{"dedup_mode": "exact", **overrides})) as daemon:
        peer = await negotiated_peer(daemon.port)
        yield daemon, peer
        await peer.close()


def routes_file(tmp_path: Path) -> Path:
    path = tmp_path / "routes.toml"
    path.write_text(ROUTES.replace("{legal}", str(tmp_path / "legal")))
    return path


async def test_routes_fan_out_and_route_sinks_get_only_their_events(tmp_path: Path) -> None:
    async with running(tmp_path, routes_file=str(routes_file(tmp_path))) as (_, peer):
        await peer.send(
            frame(1, "SMB_CREAT", "/legal/contract.pdf"),  # legal by prefix, finance by suffix
            frame(2, "SMB_CREAT", "/finance/q3.xlsx"),  # finance only
            frame(3, "SMB_CREAT", "/tmp/scratch.txt"),  # no route
            frame(4, "SMB_OPEN", "/legal/contract.pdf"),  # open is no route's operation
        )
        defaults = await wait_for(tmp_path / "events", 3)
        legal = await wait_for(tmp_path / "legal", 1)
    by_op = {(e["file_path"], e["operation_type"]): e["metadata"]["routes"] for e in defaults}
    assert by_op == {
        ("/legal/contract.pdf", "create"): ["legal", "finance"],  # finance routes to the default sinks
        ("/finance/q3.xlsx", "create"): ["finance"],
        ("/tmp/scratch.txt", "create"): [],
        ("/legal/contract.pdf", "open"): [],
    }
    assert [(e["file_path"], e["metadata"]["routes"]) for e in legal] == [("/legal/contract.pdf", ["legal", "finance"])]


async def test_unrouted_events_can_go_to_an_audit_file_instead(tmp_path: Path) -> None:
    async with running(tmp_path, routes_file=str(routes_file(tmp_path)), unrouted_action="audit") as (_, peer):
        await peer.send(frame(1, "SMB_CREAT", "/finance/a.csv"), frame(2, "SMB_CREAT", "/tmp/b.txt"))
        audit = await wait_for(tmp_path / "unrouted", 1)
        defaults = await wait_for(tmp_path / "events", 1)
        await asyncio.sleep(0.2)
    assert [e["file_path"] for e in audit] == ["/tmp/b.txt"]
    assert [e["file_path"] for e in lines(tmp_path / "events")] == ["/finance/a.csv"]
    assert defaults


async def test_exact_dedup_folds_a_redelivered_notification_and_audits_it(tmp_path: Path) -> None:
    async with running(tmp_path) as (daemon, peer):
        first = frame(1, "SMB_WR", "/data/report.csv")
        rewrite = frame(2, "SMB_WR", "/data/report.csv")  # same file, later GenerationTime: a genuine rewrite
        await peer.send(first, rewrite, first)  # the first one again, as a persistent-store replay would
        events = await wait_for(tmp_path / "events", 2)
        ledger = await wait_for(tmp_path / "ledger", 1)
        await asyncio.sleep(0.2)
        # Exact dedup against the embedded backend is the reader's: no processing stage runs for it.
        assert daemon.processing is None
        assert daemon.context.ingest.counters.duplicates == 1
    assert len(lines(tmp_path / "events")) == 2
    assert len({e["event_id"] for e in events}) == 2
    [record] = ledger
    assert record["decision"] == "duplicate"
    assert record["event_id"] == record["first_seen_id"] == events[0]["event_id"]


async def test_dedup_survives_a_restart(tmp_path: Path) -> None:
    async with running(tmp_path) as (_, peer):
        await peer.send(frame(1, "SMB_WR", "/data/a.csv"))
        await wait_for(tmp_path / "events", 1)
    async with running(tmp_path) as (_, peer):
        await peer.send(frame(1, "SMB_WR", "/data/a.csv"), frame(2, "SMB_WR", "/data/a.csv"))
        await wait_for(tmp_path / "events", 2)
        await wait_for(tmp_path / "ledger", 1)
    assert len(lines(tmp_path / "events")) == 2


async def test_window_dedup_per_use_case(tmp_path: Path) -> None:
    overrides = {"routes_file": str(routes_file(tmp_path)), "dedup_mode": "window", "dedup_window_minutes": 5}
    async with running(tmp_path, **overrides) as (_, peer):
        # Two writes 1 s apart: one event for the window (the reference's tumbling buckets could miss this at
        # a bucket boundary); a write 6 minutes later is a new event.
        await peer.send(
            frame(1, "SMB_WR", "/finance/a.pdf", generation_us=1_707_492_600_000_000),
            frame(2, "SMB_WR", "/finance/a.pdf", generation_us=1_707_492_601_000_000),
            frame(3, "SMB_WR", "/finance/a.pdf", generation_us=1_707_492_960_000_000),
        )
        await wait_for(tmp_path / "ledger", 1)
        events = await wait_for(tmp_path / "events", 2)
        await asyncio.sleep(0.2)
    assert len(lines(tmp_path / "events")) == 2
    assert [e["timestamp"][11:19] for e in events] == ["15:30:00", "15:36:00"]


async def test_settle_coalesces_a_burst_and_a_delete_cancels_a_pending_create(tmp_path: Path) -> None:
    async with running(tmp_path, write_complete_delay_s=0.5) as (daemon, peer):
        await peer.send(
            frame(1, "SMB_CREAT", "/scans/a.tiff"),
            frame(2, "SMB_WR", "/scans/a.tiff"),
            frame(3, "SMB_WR", "/scans/a.tiff"),
            frame(4, "SMB_CREAT", "/scans/tmp.bin"),
            frame(5, "SMB_DEL", "/scans/tmp.bin"),
            frame(6, "SMB_OPEN", "/scans/a.tiff"),  # not held: out at once
        )
        early = await wait_for(tmp_path / "events", 2, within=0.4)
        assert {e["operation_type"] for e in early} <= {"open", "delete"}
        events = await wait_for(tmp_path / "events", 3)
        assert daemon.processing is not None
        assert daemon.processing.stage.pending == 0
    by_op = {e["operation_type"]: e for e in events}
    assert set(by_op) == {"open", "delete", "create"}
    assert by_op["create"]["file_path"] == "/scans/a.tiff"
    assert by_op["create"]["metadata"]["settle"]["coalesced"] == 3
    assert by_op["delete"]["metadata"]["settle"]["cancelled"] >= 1


async def test_a_pending_settle_survives_a_restart(tmp_path: Path) -> None:
    async with running(tmp_path, write_complete_delay_s=30, settle_max_hold_s=60) as (daemon, peer):
        await peer.send(frame(1, "SMB_CREAT", "/scans/b.tiff"), frame(2, "SMB_WR", "/scans/b.tiff"))
        processor = daemon.processing
        assert processor is not None
        for _ in range(500):  # up to 10 s on a loaded machine
            if processor.stage.pending:
                break
            await asyncio.sleep(0.02)
        assert processor.stage.pending == 1
    assert lines(tmp_path / "events") == []  # held at the stop, not dropped and not emitted early
    async with running(tmp_path, write_complete_delay_s=0.2) as (daemon, _):
        [event] = await wait_for(tmp_path / "events", 1)
    assert event["operation_type"] == "create"
    assert event["metadata"]["settle"]["coalesced"] == 2


async def test_rename_commit_emits_the_final_path_routed_as_a_create(tmp_path: Path) -> None:
    overrides = {
        "routes_file": str(routes_file(tmp_path)),
        "write_complete_delay_s": 30,
        "settle_strategy": "rename_commit",
    }
    async with running(tmp_path, **overrides) as (_, peer):
        await peer.send(
            frame(1, "SMB_CREAT", "/in/x.part"),
            frame(2, "SMB_WR", "/in/x.part"),
            frame(3, "SMB_REN", "/in/x.part", target="/in/x.pdf"),
        )
        [event] = await wait_for(tmp_path / "events", 1)
    assert (event["operation_type"], event["file_path"]) == ("create", "/in/x.pdf")
    assert event["metadata"]["settle"]["coalesced"] == 3
    # Neither the temp file nor the rename alone is a create of a .pdf: the coalesced event is routed anew.
    assert event["metadata"]["routes"] == ["legal", "finance"]


async def test_a_crashed_stage_stops_the_daemon_instead_of_starving_the_sinks(tmp_path: Path) -> None:
    daemon = Daemon(make_settings(tmp_path, dedup_mode="window"))
    await daemon.start()
    try:
        processor = daemon.processing
        assert processor is not None

        def broken(requests: object, now: float) -> list[Any]:
            raise RuntimeError("the store's file system went away")

        processor._dedup.check_many = broken  # type: ignore[union-attr,method-assign]
        peer = await loopback_peer(daemon.port)
        await peer.send(NEGO_REQ.frame)
        await peer.receive()
        await peer.send(frame(1, "SMB_WR", "/data/a.csv"))
        assert await eventually(lambda: daemon.spooler.fatal is not None, within=10)
        await peer.close()
    finally:
        # Stopped in any case: a daemon left running keeps threads that hang the test runner's teardown.
        report = await daemon.stop()
    assert report.failure is not None
    assert "file system went away" in report.failure


async def test_a_stalled_sink_stops_the_stage_before_the_spool_is_full(tmp_path: Path, monkeypatch: Any) -> None:
    """Reading pauses at the pause watermark, but the stage turns raw records into processed ones, which take
    space too: a stage working through a backlog while the sink is stalled must stop short of spool_max_bytes (it
    used to fill the spool, and its appends were then held in memory), and go on once the sink frees space.
    Nothing is lost."""
    sink_gate, stage_gate = asyncio.Event(), asyncio.Event()
    real_send, real_emit = JsonlSender.send, ProcessingWorker._emit

    async def stalled_send(self: JsonlSender, records: Sequence[Record]) -> Sequence[Record]:
        await sink_gate.wait()
        return await real_send(self, records)

    async def stalled_emit(self: ProcessingWorker, *args: Any) -> None:
        await stage_gate.wait()
        await real_emit(self, *args)

    monkeypatch.setattr(JsonlSender, "send", stalled_send)
    monkeypatch.setattr(ProcessingWorker, "_emit", stalled_emit)
    count = 8000
    stage_gate.set()
    async with running(tmp_path, dedup_mode="window", **SMALL_SPOOL) as (daemon, peer):
        spooler, processor = daemon.spooler, daemon.processing
        assert processor is not None
        frames = [frame(n, "SMB_CREAT", f"/data/dir{n % 7}/file{n}.txt") for n in range(1, count + 1)]
        # A first event is processed: the sink is stuck at it, so nothing after it can leave the spool.
        await peer.send(frames[0])
        assert await eventually(lambda: processor.stats.delivered == 1)
        stage_gate.clear()
        # The stage lags (stalled): raw records fill the spool to the pause watermark.
        sender = asyncio.create_task(peer.send(*frames[1:]))
        assert await eventually(lambda: spooler.reading_paused, within=20)
        stage_gate.set()  # the stage works through that backlog; the sink still delivers nothing
        largest = 0
        deadline = time.monotonic() + 20
        while not processor.stats.room_waits and time.monotonic() < deadline:
            largest = max(largest, spooler.spool.size_bytes)
            await asyncio.sleep(0.01)
        assert processor.stats.room_waits >= 1
        for _ in range(50):  # a while longer, stalled: the stage stays stopped, the spool under its maximum
            largest = max(largest, spooler.spool.size_bytes)
            await asyncio.sleep(0.01)
        assert largest < SMALL_SPOOL["spool_max_bytes"]
        assert spooler.held_total == 0  # nothing had to be held in memory at a full spool
        sink_gate.set()
        await asyncio.wait_for(sender, 60)
        events = await wait_for(tmp_path / "events", count, within=60)
    assert sorted(int(e["file_path"].rsplit("file", 1)[1].split(".")[0]) for e in events) == list(range(1, count + 1))
