"""The pipeline when the disk misbehaves: a full disk pauses reading and loses nothing; a failed fsync stops."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import pytest

from fpolicyd.pipeline.backpressure import Watermarks
from fpolicyd.pipeline.spool import Record, Spool, SpoolIOError, SpoolSettings
from fpolicyd.server.pipeline import EventPipeline


class Collect:
    name = "collect"
    max_records = 100
    max_bytes = 1 << 20
    max_in_flight = 1
    linger_s = 0.0

    def __init__(self) -> None:
        self.payloads: list[bytes] = []

    async def start(self) -> None:
        return None

    async def send(self, records: Sequence[Record]) -> Sequence[Record]:
        self.payloads.extend(r.payload for r in records)
        return ()

    async def close(self) -> None:
        return None


def make(tmp_path: Path) -> tuple[Spool, Collect, EventPipeline]:
    spool = Spool.open(
        SpoolSettings(directory=tmp_path / "spool", segment_bytes=1 << 16, max_bytes=1 << 24), ["collect"]
    )
    sink = Collect()
    pipeline = EventPipeline(
        spool, [sink], Watermarks(low_bytes=1 << 17, high_bytes=1 << 18, hard_bytes=1 << 19), checkpoint_interval_s=0.05
    )
    return spool, sink, pipeline


def paused(pipeline: EventPipeline) -> bool:
    return pipeline.reading_paused


async def wait_until(predicate: object, within: float = 5.0) -> None:
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate() and loop.time() < deadline:  # noqa: ASYNC110 - bounded poll of another task's state
        await asyncio.sleep(0.01)
    assert predicate()


async def test_a_full_disk_pauses_reading_and_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool, sink, pipeline = make(tmp_path)
    await pipeline.start()
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
        pipeline.submit(b'{"n":%d}' % n, partial(answered.append, n))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert paused(pipeline)  # the disk is full: stop reading, keep what was read
    assert answered == []  # nothing is acknowledged before it is durable
    await wait_until(lambda: len(sink.payloads) == 50)
    assert not paused(pipeline)
    assert answered == list(range(50))
    assert await pipeline.drain(2.0) == 0
    spool.close()


async def test_a_failed_fsync_stops_the_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool, _sink, pipeline = make(tmp_path)
    fatal: list[BaseException] = []
    pipeline.on_fatal = fatal.append
    await pipeline.start()

    def broken_sync() -> int:
        raise SpoolIOError("fsync: Input/output error", retriable=False)

    monkeypatch.setattr(spool, "sync", broken_sync)
    answered: list[int] = []
    pipeline.submit(b'{"n":1}', lambda: answered.append(1))
    await wait_until(lambda: bool(fatal))
    assert pipeline.reading_paused
    assert answered == []  # never acknowledged: ONTAP will send it again to a healthy server
    monkeypatch.undo()
    await pipeline.drain(1.0)
    spool.abandon()


class CountingSender(Collect):
    name = "counting"
    max_records = 10
    linger_s = 0.5

    def __init__(self) -> None:
        super().__init__()
        self.sends = 0

    async def send(self, records: Sequence[Record]) -> Sequence[Record]:
        self.sends += 1
        return await super().send(records)


async def test_linger_turns_a_trickle_into_full_batches(tmp_path: Path) -> None:
    spool = Spool.open(
        SpoolSettings(directory=tmp_path / "spool", segment_bytes=1 << 16, max_bytes=1 << 24), ["counting"]
    )
    sender = CountingSender()
    pipeline = EventPipeline(
        spool, [sender], Watermarks(low_bytes=1 << 17, high_bytes=1 << 18, hard_bytes=1 << 19), checkpoint_interval_s=1
    )
    await pipeline.start()
    for n in range(10):  # a trickle: one event every 10 ms, well inside one linger
        pipeline.submit(b'{"n":%d}' % n)
        await asyncio.sleep(0.01)
    await wait_until(lambda: len(sender.payloads) == 10)
    assert sender.sends == 1  # one request for ten events, not ten
    assert await pipeline.drain(2.0) == 0
    spool.close()
