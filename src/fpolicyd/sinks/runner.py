"""Batching sink runner: the asyncio edge between the readers and one sink.

Readers call :meth:`SinkRunner.submit` with an encoded event line; it only appends to a list, so a reader
never waits on a sink. One task per sink takes batches (up to ``max_events``, lingering ``linger_s`` after the
first entry for more), hands each batch to the sink's blocking ``write`` on a dedicated thread (file writes
and fsync must not stall the event loop), and retries a failed batch with capped exponential backoff and full
jitter. A batch is never dropped: a sink that keeps failing keeps its backlog, which the flow control of
:class:`Delivery` turns into TCP back-pressure on ONTAP.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from fpolicyd.errors import SinkError
from fpolicyd.obs.log import get_logger

log = get_logger("fpolicyd.sink")


class BlockingSink(Protocol):
    """A sink whose ``write`` may block (file, pipe); it runs on the runner's own thread."""

    name: str

    def open(self, now: float) -> None: ...

    def write(self, lines: Sequence[bytes], now: float) -> None: ...

    def tick(self, now: float) -> None:
        """Periodic housekeeping (e.g. interval fsync) while idle."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_s: float = 0.05
    cap_s: float = 5.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
        return rng.uniform(0.0, min(self.cap_s, self.base_s * (2**attempt)))


class SinkRunner:
    def __init__(
        self,
        sink: BlockingSink,
        *,
        max_events: int,
        linger_s: float,
        wall_clock: Callable[[], float],
        on_progress: Callable[[], None],
        retry: RetryPolicy | None = None,
        tick_interval_s: float = 0.5,
    ) -> None:
        self.sink = sink
        self._max_events = max_events
        self._linger_s = linger_s
        self._clock = wall_clock
        self._on_progress = on_progress
        self._retry = retry or RetryPolicy()
        self._tick_interval_s = tick_interval_s
        self._pending: list[bytes] = []
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
        return len(self._pending) + self.in_flight

    def submit(self, line: bytes) -> None:
        self._pending.append(line)
        if not self._wakeup.is_set():
            self._wakeup.set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.sink.open, self._clock())
        self._task = asyncio.create_task(self._run(), name=f"sink-{self.sink.name}")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._stopping:
                    return
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), self._tick_interval_s)
                except TimeoutError:
                    await loop.run_in_executor(self._executor, self.sink.tick, self._clock())
                    continue
            if self._linger_s and not self._stopping and len(self._pending) < self._max_events:
                await asyncio.sleep(self._linger_s)
            batch = self._pending[: self._max_events]
            del self._pending[: len(batch)]
            self.in_flight = len(batch)
            await self._write_with_retry(loop, batch)
            self.in_flight = 0
            self.delivered += len(batch)
            self.batches += 1
            self._on_progress()

    async def _write_with_retry(self, loop: asyncio.AbstractEventLoop, batch: list[bytes]) -> None:
        attempt = 0
        while True:
            try:
                await loop.run_in_executor(self._executor, self.sink.write, batch, self._clock())
                return
            except SinkError as exc:
                self.failures += 1
                delay = self._retry.delay(attempt, self._rng)
                log.error(
                    "sink_write_failed",
                    sink=self.sink.name,
                    events=len(batch),
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
