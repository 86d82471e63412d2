"""Sink workers: one per configured sink, all the same shape — read from the spool → send → ack.

A worker reads the sink's next durable records from the spool (its own cursor), hands them to the sink's
:class:`Sender`, and acks the range once every record is settled (delivered, or dead-lettered with a reason).
What a send leaves unsettled is sent again — only that — after a capped, fully jittered backoff; nothing is
ever dropped, and records that are read but unacked when the process stops are read again after the next
start (at least once). Several reads may be in flight (``max_in_flight``); the spool's ``ack_range`` holds an
out-of-order completion until the gap before it closes.

Where work runs, measured (benchmarks/bench_ingest.py): handing every batch to a thread cost ~20 µs of CPU per
event, because the worker thread and the readers fight for the GIL at every lxml parse. So senders do their
work on the event loop (a file write to the page cache, an HTTP request) and only what really blocks — fsync,
a pipe that may stall — runs on a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from fpolicyd.errors import SinkError
from fpolicyd.obs.log import get_logger
from fpolicyd.obs.metrics import Histogram, SinkFigures, SinkInstruments
from fpolicyd.pipeline.records import Record
from fpolicyd.sinks.retry import RetryPolicy

log = get_logger("fpolicyd.sink")


class SpoolView(Protocol):
    """What a sink worker needs of the spool: :class:`~fpolicyd.storage.spool.Spool` in the daemon's own process,
    :class:`~fpolicyd.storage.spool.SpoolTail` in the delivery process."""

    @property
    def durable_seq(self) -> int: ...

    def read(self, sink: str, max_records: int = ..., max_bytes: int = ...) -> list[Record]: ...

    def ack_range(self, sink: str, first: int, last: int) -> None: ...

    def available(self, sink: str) -> int:
        """The records :meth:`read` could hand the sink now (a delivery process that shares the sink with others
        counts only its own blocks)."""
        ...

    def acked_seq(self, sink: str) -> int: ...

    def records_pending(self, sink: str) -> int: ...


@runtime_checkable
class CountsRequests(Protocol):
    """A sender that makes API requests and classifies every entry itself (SQS, EventBridge)."""

    requests: int
    retry_requests: int
    entries_failed_retryable: int
    entries_failed_permanent: int
    dead_lettered: int
    request_seconds: Histogram


class SinkHandle(Protocol):
    """A sink as the daemon sees it — a :class:`SinkWorker` here, or one of the delivery process
    (``server/delivery.py``): what metrics, readiness and the pipeline read of it."""

    @property
    def name(self) -> str: ...

    @property
    def lag(self) -> int: ...

    @property
    def last_error(self) -> SinkError | None: ...

    def figures(self) -> SinkFigures: ...

    def wake(self) -> None: ...


class Sender(Protocol):
    """What a sink does with records. ``send`` returns the records it could not settle (to be sent again)."""

    name: str
    #: Largest read handed to one ``send`` (records, payload bytes).
    max_records: int
    max_bytes: int
    #: Concurrent ``send`` calls; 1 keeps order (JSON Lines, FIFO queues).
    max_in_flight: int
    #: How long to wait at most, from the first available record, for a batch to fill up (0: send at once, and
    #: read whatever is there).
    linger_s: float
    #: What "filled up" means: the worker lingers only while fewer records than this are available (a full
    #: request's worth; at most ``max_records``), and, lingering on, reads a whole multiple of it when at least
    #: that many are available.
    linger_records: int

    async def start(self) -> None:
        """Open files / check the queue or bus exists. Raises SinkError."""
        ...

    async def send(self, records: Sequence[Record]) -> Sequence[Record]: ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class WorkerStats:
    delivered: int = 0
    sends: int = 0
    failures: int = 0


class SinkWorker:
    def __init__(
        self,
        sender: Sender,
        spool: SpoolView,
        *,
        on_ack: Callable[[], None],
        retry: RetryPolicy | None = None,
        select: Callable[[bytes], bytes | None] | None = None,
        ingestion_slo_s: float = 5.0,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        """``on_error``: called after every failed send and after the send that ends a failure (the pipeline
        watches for a full disk there)."""
        self.sender = sender
        self._on_error = on_error
        #: Which spool records are this sink's and what of them to send (processed records carry a destination
        #: header, see pipeline/processing.py); None: every record as it is.
        self._select = select
        self._spool = spool
        self._on_ack = on_ack
        self._retry = retry or RetryPolicy()
        self._rng = random.Random()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(sender.max_in_flight)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        #: Set by :meth:`stop`: deliver what is durable now, without lingering for more.
        self._draining = False
        self.stats = WorkerStats()
        #: Last send error, for readiness; None once a send succeeds again.
        self.last_error: SinkError | None = None
        #: Batch sizes, send times, failures and event latencies, read by the metrics collector.
        self.instruments = SinkInstruments(ingestion_slo_s=ingestion_slo_s)

    @property
    def name(self) -> str:
        return self.sender.name

    @property
    def lag(self) -> int:
        """Records appended and not yet acked by this sink."""
        return self._spool.records_pending(self.name)

    def figures(self) -> SinkFigures:
        """This sink's figures now (for the metrics collector and readiness; cheap, called at scrape time)."""
        inst = self.instruments
        sender = self.sender
        error = self.last_error
        # A cloud sender classifies every entry itself (what it hands back was already counted there).
        cloud = sender if isinstance(sender, CountsRequests) else None
        return SinkFigures(
            name=self.name,
            delivered=self.stats.delivered,
            sends=self.stats.sends,
            failures=self.stats.failures,
            last_error=None if error is None else str(error),
            last_error_retriable=True if error is None else error.retriable,
            last_error_disk_full=error is not None and error.disk_full,
            requests=0 if cloud is None else cloud.requests,
            retries=inst.retries + (0 if cloud is None else cloud.retry_requests),
            entries_failed_retryable=(inst if cloud is None else cloud).entries_failed_retryable,
            entries_failed_permanent=(inst if cloud is None else cloud).entries_failed_permanent,
            dead_lettered=0 if cloud is None else cloud.dead_lettered,
            ingestion_slo_breaches=inst.ingestion_slo_breaches,
            batch_records=inst.batch_records.state(),
            send_seconds=inst.send_seconds.state(),
            end_to_end_seconds=inst.end_to_end_seconds.state(),
            ingestion_seconds=inst.ingestion_seconds.state(),
            request_seconds=None if cloud is None else cloud.request_seconds.state(),
        )

    def _available(self) -> int:
        """Durable records not yet read by this sink (approximate across segment gaps; only sizes a linger)."""
        return self._spool.available(self.name)

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self._run(), name=f"sink-{self.name}")
        return self._task

    @property
    def _alive(self) -> bool:
        """Whether the worker's task still runs (a crashed one delivers nothing more)."""
        return self._task is not None and not self._task.done()

    def wake(self) -> None:
        """New durable records exist."""
        if not self._wakeup.is_set():
            self._wakeup.set()

    async def _run(self) -> None:
        spool = self._spool
        sender = self.sender
        while not self._stopping:
            max_records = sender.max_records
            if sender.linger_s and not self._draining:
                available = await self._linger(sender)
                if available is None:  # stopping
                    break
                if available >= sender.linger_records:
                    # Whole requests' worth only: the rest waits for the next read (and its linger), so that
                    # every request is full but a trickle's last (the AWS requests-per-event budget is 0.1).
                    max_records = min(max_records, available - available % sender.linger_records)
            records = spool.read(self.name, max_records, sender.max_bytes)
            if not records:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            first, last = records[0].seq, records[-1].seq
            if self._select is not None:
                records = self._selected(records)
                if not records:  # nothing here for this sink: the range is done
                    spool.ack_range(self.name, first, last)
                    self._on_ack()
                    continue
            await self._slots.acquire()
            task = asyncio.create_task(self._deliver(records, first, last))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _linger(self, sender: Sender) -> int | None:
        """From the first available record, wait until a request's worth (``linger_records``) is available or
        ``linger_s`` has passed, whichever comes first: at low rates this turns one request per event into one
        request per batch, at high rates it ends at the next durable notice. Returns the records available then
        (None: the worker is stopping)."""
        available = self._available()
        if not 0 < available < sender.linger_records:
            return available
        loop = asyncio.get_running_loop()
        deadline = loop.time() + sender.linger_s
        while not (self._stopping or self._draining):
            self._wakeup.clear()  # before the count: a notice after it is not lost
            available = self._available()
            remaining = deadline - loop.time()
            if available >= sender.linger_records or remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)
        return None if self._stopping else self._available()

    def _selected(self, records: Sequence[Record]) -> list[Record]:
        select = self._select
        assert select is not None
        out: list[Record] = []
        for record in records:
            payload = select(record.payload)
            if payload is not None:
                out.append(record if payload is record.payload else Record(record.seq, payload))
        return out

    async def _deliver(self, records: Sequence[Record], first: int, last: int) -> None:
        """Send ``records`` (this sink's part of the spool records ``first..last``) until settled, then ack the
        whole range."""
        self.instruments.batch_records.observe(len(records))
        sender = self.sender
        try:
            pending = records
            attempt = 0
            while True:
                self.stats.sends += 1
                sent_at = time.monotonic()
                try:
                    pending = await sender.send(pending)
                except SinkError as exc:
                    self.last_error = exc
                else:
                    if not pending:
                        break
                    self.last_error = self._unsettled(len(pending))
                finally:
                    self.instruments.send_seconds.observe(time.monotonic() - sent_at)
                self.stats.failures += 1
                self.instruments.send_failed(len(pending), retryable=self.last_error.retriable)
                if self._on_error is not None:
                    self._on_error()
                delay = self._retry.delay(attempt, self._rng)
                # A full disk is logged once per episode (disk_full / disk_space_recovered, in the daemon): its
                # retries are not, or a long episode would flood the log.
                if attempt == 0 or not self.last_error.disk_full:
                    log.warning(
                        "sink_send_incomplete",
                        sink=self.name,
                        events=len(pending),
                        error=str(self.last_error),
                        retry_in_s=round(delay, 3),
                        attempt=attempt + 1,
                    )
                attempt += 1
                await asyncio.sleep(delay)
            if self.last_error is not None:
                self.last_error = None
                if self._on_error is not None:
                    self._on_error()
            self._spool.ack_range(self.name, first, last)
            self.stats.delivered += len(records)
            self.instruments.settled(records)
            self._on_ack()
        finally:
            self._slots.release()

    def _unsettled(self, count: int) -> SinkError:
        """Why ``count`` records came back from a send that raised nothing: the sender's own last error when it
        keeps one (a JSON Lines write that failed midway: the OS error, e.g. no space left on device)."""
        cause = getattr(self.sender, "last_error", None)
        cause = cause if isinstance(cause, SinkError) else None
        detail = f": {cause}" if cause is not None else ""
        disk_full = cause is not None and cause.disk_full  # a JSON Lines file on a full disk: reading pauses on it
        return SinkError(f"{self.name}: {count} events not settled{detail}", retriable=True, disk_full=disk_full)

    async def stop(self, timeout_s: float) -> None:
        """Deliver what is durable within ``timeout_s``, then stop; the rest stays in the spool. Waits for the
        durable records only: after a failed fsync, what was appended but never made durable cannot be delivered
        and must not hold the stop until the budget ends."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        spool = self._spool
        self._draining = True
        while (
            self._alive
            and loop.time() < deadline
            and (spool.acked_seq(self.name) < spool.durable_seq or self._in_flight)
        ):
            self.wake()
            await asyncio.sleep(0.01)
        self._stopping = True
        self.wake()
        tasks = [t for t in (self._task, *self._in_flight) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.sender.close()
