"""Each writer on a full disk (ENOSPC/EDQUOT injected where it calls the OS, or SQLITE_FULL from SQLite itself):
a typed, retriable error; nothing lost; the same write goes through once space frees. And the episode tracker."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fpolicyd.errors import DiskFullError, SinkError, is_disk_full
from fpolicyd.pipeline.backpressure import Watermarks
from fpolicyd.pipeline.dedup import DedupFailureMode, DedupRequest, exact_key
from fpolicyd.pipeline.processing import ProcessingState
from fpolicyd.pipeline.records import encode_duplicate
from fpolicyd.server.capture import CaptureLimits, CaptureRecorder
from fpolicyd.server.disk_monitor import DiskMonitor
from fpolicyd.server.processing import STATE_FILE, load_state, save_state
from fpolicyd.server.spooler import Spooler
from fpolicyd.storage.dedup_journal import DedupJournal, JournalError
from fpolicyd.storage.dedup_store import EmbeddedDedupStore
from fpolicyd.storage.disk import DiskFull, DiskRetry, Writer, sink_writer
from fpolicyd.storage.duplicate_ledger import LEDGER_CURSOR, DuplicateLedger
from fpolicyd.storage.jsonl import JsonlSettings, JsonlWriter
from fpolicyd.storage.ledger import AuditLedger
from fpolicyd.storage.spool import Spool, SpoolIOError, SpoolSettings
from support.full_disk import FullDisk, sqlite_full
from support.sinks import Collect

FAST = DiskRetry(initial_s=0.005, max_s=0.02)


# --------------------------------------------------------------------------------------- the tracker


def test_an_episode_is_reported_once_and_ends_at_the_next_write_that_passes() -> None:
    disk = DiskFull()
    assert disk.full("spool", "ENOSPC", 10.0) is not None
    assert disk.full("spool", "ENOSPC", 11.0) is None  # a retry: same episode
    assert disk.is_full("spool")
    assert disk.any
    ended = disk.freed("spool", 13.5)
    assert ended is not None
    assert ended[1] == pytest.approx(3.5)
    assert disk.freed("spool", 14.0) is None
    assert (disk.errors, disk.episodes, disk.full_seconds) == ({"spool": 2}, {"spool": 1}, {"spool": 3.5})
    assert not disk.any


@given(st.lists(st.tuples(st.sampled_from(["spool", "ledger", sink_writer("jsonl:/d")]), st.booleans()), max_size=60))
def test_the_tracker_follows_the_last_outcome_of_each_writer(calls: list[tuple[str, bool]]) -> None:
    disk = DiskFull()
    last: dict[str, bool] = {}
    starts: dict[str, int] = {}
    for now, (writer, refused) in enumerate(calls):
        if refused:
            started = disk.full(writer, "ENOSPC", float(now)) is not None
            assert started == (not last.get(writer, False))
            starts[writer] = starts.get(writer, 0) + started
        else:
            assert (disk.freed(writer, float(now)) is not None) == last.get(writer, False)
        last[writer] = refused
    assert set(disk.active) == {writer for writer, full in last.items() if full}
    assert disk.episodes == {w: n for w, n in starts.items() if n}
    assert sum(disk.errors.values()) == sum(1 for _, refused in calls if refused)


@given(st.floats(0.001, 10), st.floats(0, 100), st.integers(0, 200))
def test_retry_delays_double_up_to_the_cap(initial: float, extra: float, attempt: int) -> None:
    retry = DiskRetry(initial, initial + extra)
    assert initial <= retry.delay(attempt) <= initial + extra
    assert retry.delay(attempt + 1) >= retry.delay(attempt)
    assert retry.delay(0) == initial


def test_retry_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_s"):
        DiskRetry(1.0, 0.5)
    with pytest.raises(ValueError, match="initial_s"):
        DiskRetry(0.0, 1.0)


def test_disk_full_is_recognised_through_causes() -> None:
    assert is_disk_full(OSError(errno.EDQUOT, "quota"))
    assert not is_disk_full(OSError(errno.EACCES, "denied"))
    wrapped = SinkError("x", retriable=True)
    wrapped.__cause__ = OSError(errno.ENOSPC, "full")
    assert is_disk_full(wrapped)
    assert is_disk_full(DiskFullError(Writer.dedup_store, "full"))
    assert DiskFullError.retriable


# --------------------------------------------------------------------------------------- JSON Lines


@pytest.mark.parametrize(("code", "full"), [(errno.ENOSPC, True), (errno.EDQUOT, True), (errno.EIO, False)])
def test_a_jsonl_write_on_a_full_disk_says_so_and_can_be_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, full: bool
) -> None:
    writer = JsonlWriter(JsonlSettings(directory=tmp_path))
    writer.open(1000.0)
    disk = FullDisk(monkeypatch, tmp_path, code=code)
    disk.full = True
    with pytest.raises(SinkError) as caught:
        writer.write_batch([b'{"a":1}'], 1000.0)
    assert caught.value.retriable
    assert caught.value.disk_full is full
    disk.full = False
    writer.write_batch([b'{"a":1}'], 1000.0)
    writer.close()
    assert [p.read_bytes() for p in tmp_path.glob("*.jsonl")] == [b'{"a":1}\n']


# --------------------------------------------------------------------------------------- dedup journal


def test_the_journal_never_raises_on_append_and_keeps_every_claim_through_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal, _ = DedupJournal.open(tmp_path, segment_claims=1024, max_entries=10**6, ttl_s=1e9)
    disk = FullDisk(monkeypatch, tmp_path)
    disk.full = True
    seq = 0
    # 3 segments' worth: the rolls happen while full (a new file cannot be created), and append never raises.
    for _ in range(30):
        journal.append(1.0, [(seq + i, seq + i + 1) for i in range(100)])
        seq += 100
        with pytest.raises(JournalError) as caught:
            journal.flush()
        assert caught.value.retriable
        assert caught.value.disk_full
    assert journal.buffered
    assert not journal.sync_pending
    disk.full = False
    journal.flush()
    journal.sync()
    assert journal.durable_seq == seq - 1
    journal.close()
    _, recovery = DedupJournal.open(tmp_path, segment_claims=1024, max_entries=10**6, ttl_s=1e9)
    assert [claim[0] for claim in recovery.claims] == list(range(seq))
    assert recovery.cut_bytes == 0


# --------------------------------------------------------------------------------------- spool roll


def paused(spooler: Spooler) -> bool:
    return spooler.reading_paused


async def test_a_segment_roll_the_disk_refuses_holds_the_events_and_pauses_until_space_frees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool.open(SpoolSettings(directory=tmp_path / "spool", segment_bytes=4096, max_bytes=1 << 24), ["collect"])
    sink = Collect(max_records=1000)
    spooler = Spooler(
        spool,
        [sink],
        Watermarks(low_bytes=1 << 20, high_bytes=1 << 21, hard_bytes=1 << 22),
        checkpoint_interval_s=0.05,
        disk=DiskMonitor(FAST),
    )
    await spooler.start()
    disk = FullDisk(monkeypatch, tmp_path)
    sent = [b'{"n":%d,"pad":"%s"}' % (n, b"x" * 200) for n in range(100)]
    try:
        spooler.submit_many(sent[:10], [])
        await asyncio.sleep(0.05)
        disk.full = True
        for line in sent[10:]:  # several segments' worth: a roll (a new file) is refused
            spooler.submit(line)
        await asyncio.sleep(0.1)
        assert paused(spooler)
        assert spooler.disk.state.is_full(Writer.spool)
        assert spooler.fatal is None
        disk.full = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while len(sink.payloads) < len(sent) and loop.time() < deadline:  # noqa: ASYNC110 - bounded poll
            await asyncio.sleep(0.01)
        assert not paused(spooler)
    finally:
        await spooler.drain(5.0)
        spool.close()
    assert sink.payloads == sent
    assert spooler.disk.state.episodes[Writer.spool] == 1


# --------------------------------------------------------------------------------------- SQLite store


def request(n: int) -> DedupRequest:
    event_id = f"00000000-0000-5000-8000-{n:012d}"
    return DedupRequest(exact_key(event_id), event_id, f"i:{n}", 1.0, 1e12)


@pytest.mark.parametrize("mode", list(DedupFailureMode))
def test_a_full_sqlite_store_raises_disk_full_whatever_the_failure_mode(tmp_path: Path, mode: DedupFailureMode) -> None:
    store = EmbeddedDedupStore(tmp_path, max_entries=10**6, failure_mode=mode).open(1.0)
    try:
        assert store._conn is not None
        store.check_many([request(n) for n in range(100)], 1.0)
        with sqlite_full(store._conn):
            with pytest.raises(DiskFullError) as caught:
                store.check_many([request(n) for n in range(100, 5000)], 1.0)
            assert caught.value.writer == Writer.dedup_store
        assert (store.fail_open, store.fail_closed, store.disk_full_errors) == (0, 0, 1)
        # Nothing of the refused batch was kept: asked again, every one is still a first.
        results = store.check_many([request(n) for n in range(100, 5000)], 1.0)
        assert all(result.deliver for result in results)
        assert len(store) == 5000
    finally:
        store.close()


# --------------------------------------------------------------------------------------- state file


def test_a_state_save_on_a_full_disk_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_state(tmp_path, ProcessingState(5, (7, 9)))
    real_open = open

    def full_open(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        handle = real_open(file, mode, *args, **kwargs)  # type: ignore[call-overload]
        if "w" in mode:
            handle.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return handle

    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(OSError, match="No space left") as caught:
        save_state(tmp_path, ProcessingState(50, ()))
    monkeypatch.undo()
    assert is_disk_full(caught.value)
    assert load_state(tmp_path) == ProcessingState(5, (7, 9))
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]


# --------------------------------------------------------------------------------------- reader's ledger


async def test_the_reader_ledger_reports_a_full_disk_once_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool.open(SpoolSettings(directory=tmp_path / "spool"), [LEDGER_CURSOR])
    monitor = DiskMonitor(FAST)
    changes: list[bool] = []
    monitor.subscribe(lambda: changes.append(monitor.any))
    ledger = DuplicateLedger(AuditLedger.for_directory(tmp_path / "ledger"), spool, instance="i-1", disk=monitor)
    ledger.open()
    disk = FullDisk(monkeypatch, tmp_path / "ledger")
    disk.full = True
    try:
        original = b'{"event_id":"00000000-0000-5000-8000-000000000001"}'
        spool.append(original)
        duplicate = encode_duplicate(original)
        ledger.appended(spool.append(duplicate), duplicate)
        spool.flush()
        spool.sync()
        ledger.durable(spool.durable_seq)
        await asyncio.sleep(0.1)
        assert monitor.state.is_full(Writer.ledger)
        assert ledger.last_error is not None
        assert ledger.last_error.disk_full
        assert spool.acked_seq(LEDGER_CURSOR) == 1  # not past the duplicate
        disk.full = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while spool.acked_seq(LEDGER_CURSOR) < 2 and loop.time() < deadline:  # noqa: ASYNC110 - bounded poll
            await asyncio.sleep(0.01)
        assert spool.acked_seq(LEDGER_CURSOR) == 2
        assert changes == [True, False]  # one start, one end, however many retries
        assert monitor.state.errors[Writer.ledger] >= 2
    finally:
        await ledger.drain(1.0)
        ledger.close()
        spool.close()


def test_spool_io_errors_say_disk_full_only_for_space() -> None:
    from fpolicyd.storage.spool import _io_error

    assert _io_error("write", "/x", OSError(errno.ENOSPC, "full")).disk_full
    assert not _io_error("write", "/x", OSError(errno.EMFILE, "fds")).disk_full
    assert not isinstance(_io_error("write", "/x", OSError(errno.EIO, "io")), DiskFullError)
    assert isinstance(_io_error("write", "/x", OSError(errno.ENOSPC, "full")), SpoolIOError)


# --------------------------------------------------------------------------------------- wire capture


LIMITS = CaptureLimits(max_bytes_per_connection=1 << 20, max_frames_per_connection=100, max_total_bytes=1 << 20)


class _FullFile:
    """A capture file whose disk filled up after it was opened."""

    def __init__(self) -> None:
        self.closed = False

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True


def test_a_capture_on_a_full_disk_stops_recording_and_never_raises(tmp_path: Path) -> None:
    recorder = CaptureRecorder(tmp_path, LIMITS, max_frame_bytes=1 << 20)
    capture = recorder.open("10.0.0.1:1234", "xml")
    assert capture is not None
    full = _FullFile()
    assert capture._file is not None
    capture._file.close()
    capture._file = full  # type: ignore[assignment]
    capture.received(b"<?xml?>" * 10)  # no exception into the connection
    assert not capture.active
    assert full.closed
    capture.close()
    (tmp_path / "blocked").write_text("a file where the directory should be")
    assert CaptureRecorder(tmp_path / "blocked", LIMITS, max_frame_bytes=1 << 20).open("p", "xml") is None
