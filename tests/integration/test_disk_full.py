"""A full disk pauses the daemon, it does not stop it (issue 14, defect 2): the simulator streams into a running
daemon, the data directory fills up (every write under it refused with ENOSPC or EDQUOT, SQLite answering
SQLITE_FULL), the daemon stops reading and /readyz answers 503 naming the writers, the disk is freed, and every
notification sent ends up in JSON Lines exactly once — with the default settings (the reader's exact dedup and its
journal) and with the processing stage's SQLite dedup store, where the hostile-peer campaign saw the daemon die.

No real small file system here (mounting one needs root): the fault is injected where the writers call the OS
(tests/support/full_disk.py), which is the production path."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
from test_end_to_end import assert_exactly_once, expected_events

from fpolicyd.app import Daemon
from fpolicyd.server.processing import STATE_FILE
from fpolicyd.simulator.client import SimulatorConfig, run
from fpolicyd.storage.dedup_store import EmbeddedDedupStore
from fpolicyd.storage.disk import Writer
from support.captures import NEGO_REQ, NEGO_RESP
from support.daemon import make_settings
from support.full_disk import FullDisk, sqlite_full
from support.notifications import frame
from support.peer import loopback_peer
from support.serve import VOLUME_NAMES, read_events

pytestmark = pytest.mark.slow

#: Retries come fast in a test (the defaults are 0.1 s doubling to 5 s).
FAST_RETRY = {"disk_full_retry_initial_s": 0.01, "disk_full_retry_max_s": 0.1}


def settings_for(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    return {
        "dedup_mode": "exact",  # the default (make_settings turns it off for tests that resend one capture)
        "volume_names": VOLUME_NAMES,
        "svm_name": "svm_e2e",
        **FAST_RETRY,
        **overrides,
    }


async def until(
    predicate: Callable[[], bool], what: str, within_s: float = 30.0, *, state: Callable[[], object] | None = None
) -> None:
    """Wait for ``predicate``; on a timeout the message carries ``state()`` (what the daemon was doing)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"not within {within_s} s: {what}" + ("" if state is None else f" ({state()})"))
        await asyncio.sleep(0.01)


def disk_state(daemon: Daemon) -> str:
    """The writers full now and the refused writes by writer (a counter, so a refusal cannot be missed)."""
    state = daemon.spooler.disk.state
    return f"full now: {sorted(state.active)}, refused writes: {state.errors}, episodes: {state.episodes}"


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def readyz(daemon: Daemon) -> tuple[int, dict[str, Any]]:
    port = daemon.http_port
    assert port is not None
    status, body = await http_get(port, "/readyz")
    return status, {check["name"]: check for check in orjson.loads(body)["checks"]}


def all_full(daemon: Daemon, writers: tuple[str, ...]) -> bool:
    return all(daemon.spooler.disk.state.is_full(writer) for writer in writers)


@dataclass(frozen=True, slots=True)
class Fill:
    """One step of a full disk: ``arm(True)`` makes the disk full under some writers, ``arm(False)`` frees it;
    ``writers`` are the writers that must then be refused (all of them: the step must guarantee that each one
    writes while it is armed).

    ``reader_side``: the writers are written as events are read (the spool, the reader's dedup journal), so while
    they refuse, the stream cannot end: the simulator finishes only once the daemon has read everything it sent,
    and reading is paused. Writers after the spool (the stage's dedup store, a sink) write what was read earlier:
    they can be refused after the daemon has read the whole stream, and the simulator may then already be done."""

    writers: tuple[str, ...]
    arm: Callable[[bool], None]
    reader_side: bool = False


async def stream_through_a_full_disk(daemon: Daemon, tmp_path: Path, *steps: Fill) -> SimulatorConfig:
    """Stream, fill the disk once events flow, check the daemon paused (and says why), free it, let the stream
    finish; returns the simulator's config (what was sent).

    Several steps: each is armed in turn, before the previous one is freed (so the disk is never all free in
    between), and its writers must all be full while it holds; the last one is freed at the end."""
    config = SimulatorConfig(port=daemon.port, nodes=2, events=1500, seed=14, rate=1000, keep_alive_interval_s=0.05)
    simulation = asyncio.create_task(run(config))
    state = partial(disk_state, daemon)
    try:
        await until(lambda: len(read_events(tmp_path, live=True)) >= 200, "the first events delivered")
        previous: Fill | None = None
        for step in steps:
            step.arm(True)
            if previous is not None:
                previous.arm(False)
            previous = step
            await until(lambda: daemon.spooler.reading_paused, "reading paused", state=state)
            writers = step.writers
            await until(partial(all_full, daemon, writers), f"{writers} full", state=state)
            status, checks = await readyz(daemon)
            assert status == 503
            assert not checks["disk"]["ok"]
            for writer in writers:
                assert writer in checks["disk"]["detail"]
            _, metrics = await http_get(daemon.http_port or 0, "/metrics")
            for writer in writers:
                assert f'fpolicyd_disk_full{{writer="{writer}"}} 1.0'.encode() in metrics
            # Held there while the writers retry: still full, still paused, nothing declared fatal.
            await asyncio.sleep(0.5)
            assert daemon.spooler.fatal is None
            assert daemon.spooler.reading_paused
            assert all_full(daemon, writers), state()
            if step.reader_side:
                assert not simulation.done()
        for step in steps:
            step.arm(False)
        report = await asyncio.wait_for(simulation, 120)
    finally:
        for step in steps:
            step.arm(False)
        if not simulation.done():
            simulation.cancel()
    assert report.completed
    assert report.sent == 3000
    await until(lambda: not daemon.spooler.disk.any, "every writer recovered", state=state)
    await until(lambda: daemon.readiness().status == 200, "/readyz 200 again")
    status, checks = await readyz(daemon)
    assert status == 200
    assert checks["disk"]["ok"]
    await until(lambda: len(read_events(tmp_path, live=True)) >= 3000, "every event delivered")
    return config


async def test_default_settings_a_full_data_directory_pauses_then_everything_arrives_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data directory fills in two steps: first every directory in it but the sink's (the spool with its
    cursors, the dedup journal, the ledger, ...), then the sink's, armed before the rest is freed.

    Not all at once: the spool sits before the sink, and whichever is refused first pauses reading. The spool
    first: nothing new becomes durable, so the sink is refused only if it still had durable records to deliver
    at that moment (if it had caught up it never writes: its refused-write counter stays at 0 and it never shows
    as full). The sink first: reading stops, so the spool is refused only if it still had read events to flush.
    Each step below is sure to happen: events keep arriving until the spool must write one (the stream is not
    over: the sink has delivered 200 of 3000), and once the spool has room again it writes what it was refused,
    reading resumes, and events keep going to the sink until it is refused (it must deliver all of them)."""
    settings = make_settings(tmp_path, **settings_for(tmp_path))
    daemon = Daemon(settings)
    await daemon.start()
    try:
        sink_dir = tmp_path / "events"
        data = FullDisk(
            monkeypatch,
            settings.effective_spool_dir,
            settings.effective_dedup_dir,
            settings.effective_dedup_ledger_dir,
            settings.effective_dead_letter_dir,
            settings.effective_capture_dir,
        )
        events = FullDisk(monkeypatch, sink_dir)

        def fill_data(full: bool) -> None:
            data.full = full

        def fill_events(full: bool) -> None:
            events.full = full

        sink = f"sink:jsonl:{sink_dir}"
        config = await stream_through_a_full_disk(
            daemon, tmp_path, Fill((Writer.spool.value,), fill_data, reader_side=True), Fill((sink,), fill_events)
        )
        assert data.refused > 0
        assert events.refused > 0
    finally:
        report = await daemon.stop()
    assert report.failure is None
    assert report.undelivered == 0
    assert_exactly_once(read_events(tmp_path), expected_events(config))
    episodes = daemon.spooler.disk.state.episodes
    assert episodes[Writer.spool.value] >= 1
    assert episodes[sink] >= 1


async def test_a_quota_on_the_dedup_journal_and_the_sink_is_handled_like_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EDQUOT where the spool still has room: the reader's dedup journal, then the JSON Lines files (armed before
    the journal is freed).

    Not both at once, for the same reason as above: the journal refused first stops reading, so the sink is
    refused only if it still had records to deliver (if it had caught up it never writes); the sink refused first
    stops reading, so the journal is refused only if claims were still buffered.
    Each step is sure to happen: events keep arriving until a first needs a claim the journal cannot write, and
    once the journal has room the records it held back become durable and events keep going to the sink until it
    is refused."""
    settings = make_settings(tmp_path, **settings_for(tmp_path))
    daemon = Daemon(settings)
    await daemon.start()
    try:
        journal_dir = FullDisk(monkeypatch, settings.effective_dedup_dir, code=errno.EDQUOT)
        sink_dir = FullDisk(monkeypatch, tmp_path / "events", code=errno.EDQUOT)

        def fill_journal(full: bool) -> None:
            journal_dir.full = full

        def fill_sink(full: bool) -> None:
            sink_dir.full = full

        sink = f"sink:jsonl:{tmp_path / 'events'}"
        config = await stream_through_a_full_disk(
            daemon,
            tmp_path,
            Fill((Writer.dedup_journal.value,), fill_journal, reader_side=True),
            Fill((sink,), fill_sink),
        )
        assert journal_dir.refused > 0
        assert sink_dir.refused > 0
    finally:
        report = await daemon.stop()
    assert report.failure is None
    assert_exactly_once(read_events(tmp_path), expected_events(config))
    episodes = daemon.spooler.disk.state.episodes
    assert episodes[Writer.dedup_journal.value] >= 1
    assert episodes[sink] >= 1


async def test_processing_stage_sqlite_dedup_store_full_pauses_then_everything_arrives_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where it died: window dedup runs in the processing stage against the SQLite store (a window of 0 minutes
    judges each use case exactly, so that every simulated notification is a first).

    The store fills first, then the sink's directory, one after the other: the store sits before the sink, so
    while the store refuses, the stage holds its batch and the sink gets nothing new to write. Filled at once,
    the sink is refused only if it still had output to write at that moment (if it had caught up, it never is:
    its refused-write counter stays at 0 and it never shows as full), and the store only if the stage still has
    a batch to judge once the sink has paused reading. Each step below is sure to happen: events keep arriving
    until the store refuses one (every notification is a first, so each batch writes claims, and the file cannot
    grow), and the batch it refused holds at least one first, which goes to the sink once the store has room."""
    daemon = Daemon(make_settings(tmp_path, **settings_for(tmp_path, dedup_mode="window", dedup_window_minutes=0)))
    await daemon.start()
    processor = daemon.processing
    assert processor is not None
    store = processor._dedup
    assert isinstance(store, EmbeddedDedupStore)
    conn = store._conn
    assert conn is not None
    try:
        disk = FullDisk(monkeypatch, tmp_path / "events")
        limit: list[Any] = []

        def fill_store(full: bool) -> None:
            with store._lock:
                if full and not limit:
                    limit.append(sqlite_full(conn))
                    limit[0].__enter__()
                elif not full and limit:
                    limit.pop().__exit__(None, None, None)

        def fill_sink(full: bool) -> None:
            disk.full = full

        sink = f"sink:jsonl:{tmp_path / 'events'}"
        config = await stream_through_a_full_disk(
            daemon, tmp_path, Fill((Writer.dedup_store.value,), fill_store), Fill((sink,), fill_sink)
        )
        assert store.disk_full_errors > 0
        assert store.fail_open == 0  # nothing went out undeduplicated: the stage waited for the store
        assert disk.refused > 0
    finally:
        report = await daemon.stop()
    assert report.failure is None
    assert_exactly_once(read_events(tmp_path), expected_events(config))
    episodes = daemon.spooler.disk.state.episodes
    assert episodes[Writer.dedup_store.value] >= 1
    assert episodes[sink] >= 1


async def test_stop_on_a_full_disk_does_not_raise_and_keeps_the_state_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The campaign's shutdown raised again from save_state: now every close on a full disk is logged, the state
    file is the last one written, and the next start delivers what was left."""
    settings = make_settings(tmp_path, **settings_for(tmp_path, dedup_mode="window", dedup_window_minutes=0))
    daemon = Daemon(settings)
    await daemon.start()
    processor = daemon.processing
    assert processor is not None
    state_path = settings.effective_spool_dir / STATE_FILE
    peer = await loopback_peer(daemon.port)
    try:
        await peer.send(NEGO_REQ.frame)
        assert await peer.receive() == NEGO_RESP.payload
        await peer.send(frame(1, "SMB_WR", "/data/a.csv"))
        await until(lambda: len(read_events(tmp_path, live=True)) == 1, "the first event delivered")
        await until(state_path.exists, "a state file saved")
        before = state_path.read_bytes()
        disk = FullDisk(monkeypatch, tmp_path)
        disk.full = True
        real_open = open

        def full_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if "w" in mode and str(file).startswith(str(tmp_path)):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr("builtins.open", full_open)
        await peer.send(frame(2, "SMB_WR", "/data/b.csv"))
        await until(lambda: daemon.spooler.disk.any, "a writer full")
    finally:
        await peer.close()
        report = await daemon.stop()  # must not raise
    monkeypatch.undo()
    assert report.failure is None
    assert state_path.read_bytes() == before
    assert not state_path.with_suffix(".tmp").exists()
    again = Daemon(settings)  # starts from the kept state file and the spool
    await again.start()
    await again.stop()
    assert "/data/a.csv" in [event["file_path"] for event in read_events(tmp_path)]
