"""The spooler when the disk misbehaves: a full disk pauses reading and loses nothing; a failed fsync stops."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from fpolicyd.pipeline.backpressure import Watermarks
from fpolicyd.pipeline.records import Record
from fpolicyd.server.spooler import Spooler
from fpolicyd.sinks.local import JsonlSender
from fpolicyd.sinks.retry import RetryPolicy
from fpolicyd.storage.jsonl import FsyncPolicy, JsonlSettings
from fpolicyd.storage.spool import Spool, SpoolIOError, SpoolSettings
from support.sinks import Collect


def make(
    tmp_path: Path, on_fatal: Callable[[BaseException], None] = lambda exc: None
) -> tuple[Spool, Collect, Spooler]:
    spool = Spool.open(
        SpoolSettings(directory=tmp_path / "spool", segment_bytes=1 << 16, max_bytes=1 << 24), ["collect"]
    )
    sink = Collect()
    spooler = Spooler(
        spool,
        [sink],
        WATERMARKS,
        checkpoint_interval_s=0.05,
        on_fatal=on_fatal,
    )
    return spool, sink, spooler


def paused(spooler: Spooler) -> bool:
    return spooler.reading_paused


#: Small watermarks: every test's spool is a few hundred KiB at most.
WATERMARKS = Watermarks(low_bytes=1 << 17, high_bytes=1 << 18, hard_bytes=1 << 19)


async def wait_until(predicate: object, within: float = 5.0) -> None:
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate() and loop.time() < deadline:  # noqa: ASYNC110 - bounded poll of another task's state
        await asyncio.sleep(0.01)
    assert predicate()


async def test_a_full_disk_pauses_reading_and_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool, sink, spooler = make(tmp_path)
    await spooler.start()
    real_flush = spool.flush
    failures = 3

    def flaky_flush() -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise SpoolIOError("write: No space left on device", retriable=True)
        real_flush()

    monkeypatch.setattr(spool, "flush", flaky_flush)
    answered: list[int] = []
    for n in range(50):
        spooler.submit(b'{"n":%d}' % n, partial(answered.append, n))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert paused(spooler)  # the disk is full: stop reading, keep what was read
    assert answered == []  # nothing is acknowledged before it is durable
    await wait_until(lambda: len(sink.payloads) == 50)
    assert not paused(spooler)
    assert answered == list(range(50))
    assert await spooler.drain(2.0) == 0
    spool.close()


async def test_a_failed_fsync_stops_the_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fatal: list[BaseException] = []
    spool, _sink, spooler = make(tmp_path, on_fatal=fatal.append)
    await spooler.start()

    def broken_sync() -> int:
        raise SpoolIOError("fsync: Input/output error", retriable=False)

    monkeypatch.setattr(spool, "sync", broken_sync)
    answered: list[int] = []
    spooler.submit(b'{"n":1}', lambda: answered.append(1))
    await wait_until(lambda: bool(fatal))
    assert spooler.reading_paused
    assert answered == []  # never acknowledged: ONTAP will send it again to a healthy server
    monkeypatch.undo()
    await spooler.drain(1.0)
    spool.abandon()


class CountingSender(Collect):
    name = "counting"
    linger_s = 0.5

    def __init__(self) -> None:
        super().__init__(max_records=10)
        self.sends = 0

    async def send(self, records: Sequence[Record]) -> Sequence[Record]:
        self.sends += 1
        return await super().send(records)


async def counting_spooler(tmp_path: Path, sender: CountingSender) -> tuple[Spool, Spooler]:
    """A started spooler delivering to ``sender`` (the linger tests)."""
    spool = Spool.open(
        SpoolSettings(directory=tmp_path / "spool", segment_bytes=1 << 16, max_bytes=1 << 24), [sender.name]
    )
    spooler = Spooler(spool, [sender], WATERMARKS, checkpoint_interval_s=1)
    await spooler.start()
    return spool, spooler


async def test_linger_turns_a_trickle_into_full_batches(tmp_path: Path) -> None:
    sender = CountingSender()
    spool, spooler = await counting_spooler(tmp_path, sender)
    for n in range(10):  # a trickle: one event every 10 ms, well inside one linger
        spooler.submit(b'{"n":%d}' % n)
        await asyncio.sleep(0.01)
    await wait_until(lambda: len(sender.payloads) == 10)
    assert sender.sends == 1  # one request for ten events, not ten
    assert await spooler.drain(2.0) == 0
    spool.close()


class WideReadSender(CountingSender):
    """Reads up to four requests' worth, lingers (long) only until one request's worth is there (AwsSender's shape)."""

    linger_s = 30.0

    def __init__(self) -> None:
        super().__init__()
        self.max_records = 40
        self.linger_records = 10


async def test_a_read_takes_whole_requests_and_the_rest_waits_for_a_full_one(tmp_path: Path) -> None:
    sender = WideReadSender()
    spool, spooler = await counting_spooler(tmp_path, sender)
    spooler.submit_many([b'{"n":%d}' % n for n in range(25)], on_durable=())
    # 25 >= linger_records: no 30 s linger (wait_until gives up long before); the read takes two requests' worth.
    await wait_until(lambda: len(sender.payloads) == 20)
    assert sender.sends == 1
    # The other 5 linger (30 s) for a full request: they go as soon as the next 5 make one.
    await asyncio.sleep(0.3)
    assert len(sender.payloads) == 20
    spooler.submit_many([b'{"n":%d}' % n for n in range(25, 30)], on_durable=())
    await wait_until(lambda: len(sender.payloads) == 30)
    assert sender.sends == 2
    assert [json.loads(p)["n"] for p in sender.payloads] == list(range(30))
    assert await spooler.drain(2.0) == 0
    spool.close()


async def test_the_linger_ends_as_soon_as_a_request_is_full(tmp_path: Path) -> None:
    """A linger of 30 s is not waited out: the batch goes as soon as its tenth event is durable."""
    sender = WideReadSender()
    spool, spooler = await counting_spooler(tmp_path, sender)
    spooler.submit_many([b'{"n":%d}' % n for n in range(3)], on_durable=())
    await asyncio.sleep(0.3)
    assert sender.payloads == []  # lingering: fewer than a request's worth
    spooler.submit_many([b'{"n":%d}' % n for n in range(3, 10)], on_durable=())
    await wait_until(lambda: len(sender.payloads) == 10)  # gives up long before 30 s
    assert sender.sends == 1
    assert await spooler.drain(2.0) == 0
    spool.close()


async def test_a_drain_does_not_linger(tmp_path: Path) -> None:
    """At a stop, what is durable goes at once: the 30 s linger would outlast any drain budget."""
    sender = WideReadSender()
    spool, spooler = await counting_spooler(tmp_path, sender)
    spooler.submit_many([b'{"n":%d}' % n for n in range(13)], on_durable=())
    await wait_until(lambda: len(sender.payloads) >= 10)
    budget_s = 5.0
    started = time.monotonic()
    assert await spooler.drain(budget_s) == 0
    assert len(sender.payloads) == 13
    # Delivered at once, not at the end of the budget (when a stopping worker ends its linger anyway).
    assert time.monotonic() - started < budget_s / 2
    spool.close()


async def test_group_commit_window_counts_from_when_data_became_pending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event flushed while the previous commit's fsync runs waits one window from its own flush, not the rest of
    that commit plus a whole window after it. The first commit is held ``hold_s`` after its fsync; the second event
    arrives then, so it rides on the next fsync. Counted from the end of the first commit, the second event would
    wait at least ``hold_s + window_s``."""
    window_s, hold_s = 1.0, 0.8
    spool = Spool.open(
        SpoolSettings(directory=tmp_path / "spool", group_commit_s=window_s, segment_bytes=1 << 16, max_bytes=1 << 24),
        ["collect"],
    )
    first_sync_started = threading.Event()
    real_sync = spool.sync
    syncs = 0

    def held_sync() -> int:
        nonlocal syncs
        syncs += 1
        durable_seq = real_sync()
        if syncs == 1:  # the first event is on disk; the commit is held before it is reported
            first_sync_started.set()
            time.sleep(hold_s)
        return durable_seq

    monkeypatch.setattr(spool, "sync", held_sync)
    spooler = Spooler(
        spool,
        [Collect()],
        WATERMARKS,
        checkpoint_interval_s=5,
    )
    await spooler.start()
    loop = asyncio.get_running_loop()
    durable: dict[str, float] = {}

    def on_durable(name: str) -> None:
        durable[name] = loop.time()

    spooler.submit(b'{"n":1}', partial(on_durable, "first"))
    await wait_until(first_sync_started.is_set, within=2 * window_s + 5)
    submitted = loop.time()
    spooler.submit(b'{"n":2}', partial(on_durable, "second"))
    await wait_until(lambda: "second" in durable, within=2 * (window_s + hold_s) + 5)
    assert durable["second"] - submitted < window_s + hold_s / 2
    assert syncs == 2
    assert await spooler.drain(2.0) == 0
    spool.close()


async def test_a_json_lines_write_that_fails_is_retried_and_its_os_error_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry log and the worker's last error name the OS error (they used to say only "N events not
    settled"), and once space is back every event is written, once."""
    sender = JsonlSender(JsonlSettings(directory=tmp_path / "events", fsync=FsyncPolicy.never), max_bytes=1 << 20)
    settings = SpoolSettings(directory=tmp_path / "spool", segment_bytes=1 << 16, max_bytes=1 << 24)
    spool = Spool.open(settings, [sender.name])
    spooler = Spooler(
        spool,
        [sender],
        WATERMARKS,
        checkpoint_interval_s=0.05,
        retry=RetryPolicy(base_s=0.01, cap_s=0.05),
    )
    await spooler.start()
    real_write = os.write
    full = True

    def write(fd: int, data: Any) -> int:
        if full and fd == sender.writer._fd:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    try:
        for n in range(20):
            spooler.submit(b'{"n":%d}' % n)
        [worker] = spooler.local_workers
        await wait_until(lambda: worker.last_error is not None)
        assert "No space left on device" in str(worker.last_error)
        full = False
        await wait_until(lambda: worker.last_error is None and worker.stats.delivered == 20)
    finally:
        await spooler.drain(2.0)
    lines = [line for path in sorted((tmp_path / "events").glob("*.jsonl")) for line in path.read_bytes().splitlines()]
    assert lines == [b'{"n":%d}' % n for n in range(20)]
