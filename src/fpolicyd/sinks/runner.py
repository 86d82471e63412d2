"""Batching sink runner: the asyncio edge between the readers and one sink.

Readers call :meth:`SinkRunner.submit` with an encoded event line; it only appends to a buffer, so a reader
never waits on a sink. One task per sink takes batches (whole lines, up to ``max_bytes``, lingering
``linger_s`` after the first entry for more), writes each batch, and retries a failed batch with capped
exponential backoff and full jitter. A batch is never dropped: a sink that keeps failing keeps its backlog,
which the flow control of :class:`Delivery` turns into TCP back-pressure on ONTAP.

Where work runs, measured (benchmarks/bench_ingest.py): handing every batch to a thread cost ~20 µs of CPU per
event, because the worker thread and the readers fight for the GIL at every lxml parse. So a file write to the
page cache (a fraction of a millisecond per batch) runs inline on the loop, and only what really blocks runs
on the sink's own thread: fsync (which holds no GIL while it waits) and writes to a pipe that may stall.
Lines are appended to one ``bytearray`` rather than kept as a list of ``bytes``: tens of thousands of live
1 KB objects made every allocation fault in fresh pages (to_json went from 1.5 to 8 µs per event).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from fpolicyd.errors import SinkError
from fpolicyd.obs.log import get_logger

log = get_logger("fpolicyd.sink")


class LocalSink(Protocol):
    """A sink driven by :class:`SinkRunner`."""

    name: str
    #: True when ``write`` may block for long (a pipe to a slow reader): it then runs on the sink's thread.
    blocking_writes: bool
    #: Largest batch the sink takes at once (e.g. a JSON Lines file's size limit), or None for no limit.
    max_batch_bytes: int | None

    def open(self, now: float) -> None: ...

    def write(self, block: memoryview, lines: int, now: float) -> None:
        """Hand ``lines`` complete, newline-terminated lines to the kernel (no fsync). Raises SinkError.
        ``block`` is only valid during the call: copy what must outlive it."""
        ...

    def sync_due(self, now: float) -> bool:
        """Whether :meth:`sync` has work to do now (its policy, pending data)."""
        ...

    def sync(self, now: float) -> None:
        """Make written data durable (blocking; runs on the sink's thread). Raises SinkError."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_s: float = 0.05
    cap_s: float = 5.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
        return rng.uniform(0.0, min(self.cap_s, self.base_s * (2**attempt)))


def _slices(raw: bytearray, limit: int) -> Iterator[tuple[memoryview, int]]:
    """Consecutive views of ``raw`` made of whole lines, each at most ``limit`` bytes unless one line is longer,
    with the number of lines in each."""
    data = memoryview(raw)
    start, end = 0, len(raw)
    while start < end:
        stop = start + limit
        if stop >= end:
            stop = end
        else:
            cut = raw.rfind(b"\n", start, stop)
            stop = (cut if cut >= start else raw.find(b"\n", stop)) + 1
        yield data[start:stop], raw.count(b"\n", start, stop)
        start = stop


class SinkRunner:
    def __init__(
        self,
        sink: LocalSink,
        *,
        max_bytes: int,
        linger_s: float,
        wall_clock: Callable[[], float],
        on_progress: Callable[[], None],
        retry: RetryPolicy | None = None,
        tick_interval_s: float = 0.5,
    ) -> None:
        self.sink = sink
        self._max_bytes = min(max_bytes, sink.max_batch_bytes or max_bytes)
        self._linger_s = linger_s
        self._clock = wall_clock
        self._on_progress = on_progress
        self._retry = retry or RetryPolicy()
        self._tick_interval_s = tick_interval_s
        self._buffer = bytearray()
        self._buffered = 0
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sink-{sink.name}")
        self._rng = random.Random()
        self.delivered = 0
        self.batches = 0
        self.failures = 0
        self.in_flight = 0

    @property
    def pending(self) -> int:
        """Events accepted and not yet written (queued plus the batch being written)."""
        return self._buffered + self.in_flight

    def submit(self, line: bytes) -> None:
        """Queue one JSON document (no newline inside: orjson never writes one)."""
        self._buffer += line
        self._buffer += b"\n"
        self._buffered += 1
        if not self._wakeup.is_set():
            self._wakeup.set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.sink.open, self._clock())
        self._task = asyncio.create_task(self._run(), name=f"sink-{self.sink.name}")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._buffered:
                if self._stopping:
                    return
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), self._tick_interval_s)
                except TimeoutError:
                    await self._retrying(loop, self._sync_if_due, 0)
                    continue
            if self._linger_s and not self._stopping and len(self._buffer) < self._max_bytes:
                await asyncio.sleep(self._linger_s)
            # Take the whole buffer (O(1), whatever the backlog), then write it in slices of whole lines.
            taken, self._buffer = self._buffer, bytearray()
            self.in_flight, self._buffered = self._buffered, 0
            for block, lines in _slices(taken, self._max_bytes):
                await self._retrying(loop, self._write_batch, lines, block, lines)
                self.in_flight -= lines
                self.delivered += lines
                self.batches += 1
                self._on_progress()

    async def _write_batch(self, loop: asyncio.AbstractEventLoop, block: memoryview, lines: int) -> None:
        if self.sink.blocking_writes:
            await loop.run_in_executor(self._executor, self.sink.write, block, lines, self._clock())
        else:
            self.sink.write(block, lines, self._clock())
        await self._sync_if_due(loop)

    async def _sync_if_due(self, loop: asyncio.AbstractEventLoop) -> None:
        now = self._clock()
        if self.sink.sync_due(now):
            await loop.run_in_executor(self._executor, self.sink.sync, now)

    async def _retrying(
        self,
        loop: asyncio.AbstractEventLoop,
        step: Callable[..., Awaitable[None]],
        events: int,
        *args: object,
    ) -> None:
        attempt = 0
        while True:
            try:
                await step(loop, *args)
                return
            except SinkError as exc:
                self.failures += 1
                delay = self._retry.delay(attempt, self._rng)
                log.error(
                    "sink_write_failed",
                    sink=self.sink.name,
                    events=events,
                    retriable=exc.retriable,
                    error=str(exc),
                    retry_in_s=round(delay, 3),
                    attempt=attempt + 1,
                )
                attempt += 1
                await asyncio.sleep(delay)

    async def drain(self, timeout_s: float) -> int:
        """Stop taking new work, write what is pending within ``timeout_s``; return events left unwritten."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=timeout_s)
            if not done:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        left = self.pending
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.sink.close)
        self._executor.shutdown(wait=True)
        return left
