"""SQS and EventBridge senders: spool records → planned batches → :func:`fpolicyd.sinks.aws.deliver.deliver`.

Only entries that failed retriably are sent again (by ``deliver`` within one call, and by the worker across
calls); permanent rejections and oversize events go to the dead-letter file with their reason. A FIFO queue
gets one batch in flight at a time, so a retried entry cannot overtake a later one of its group.

With packed SQS messages (``SqsTarget.pack_bytes``) a send reads many more events (``PACK_READ_*``), the pack
limit is lowered to the queue's MaximumMessageSize once the queue has been checked, and a packed message that is
still unsettled when its records come back from the worker is sent again as the same message (same body, same
FIFO deduplication id), not packed anew.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, Final

from fpolicyd.errors import SinkError
from fpolicyd.obs.log import get_logger
from fpolicyd.obs.metrics import REQUEST_BUCKETS, Histogram
from fpolicyd.pipeline.records import Record
from fpolicyd.sinks.aws.classify import Outcome
from fpolicyd.sinks.aws.clients import AwsClients
from fpolicyd.sinks.aws.deliver import (
    SqsQueueInfo,
    check_eventbridge,
    check_sqs,
    deliver,
    send_eventbridge_batch,
    send_sqs_batch,
)
from fpolicyd.sinks.aws.encode import Batch, Entry, Item, Oversize, batch_entries, items_of, plan_batches
from fpolicyd.sinks.aws.targets import AwsTarget, EventBridgeTarget, SqsTarget
from fpolicyd.sinks.dead_letter import DeadLetterWriter
from fpolicyd.sinks.retry import RetryPolicy

__all__ = [
    "AWS_RETRY",
    "PACK_READS_IN_FLIGHT",
    "PACK_READ_BYTES",
    "PACK_READ_RECORDS",
    "SEND_DEADLINE_S",
    "SINGLE_READ_RECORDS",
    "AwsSender",
]

log = get_logger("fpolicyd.sink")

#: Backoff for AWS requests (the runner's RetryPolicy shape; AWS guidance is a longer cap than a local file's):
#: 0.1 s doubling to 20 s, full jitter.
AWS_RETRY: Final = RetryPolicy(base_s=0.1, cap_s=20.0)

#: How long one ``send`` keeps retrying inside ``deliver`` before handing the rest back to the worker.
SEND_DEADLINE_S = 10.0
#: Events one send reads from the spool without packing: four SendMessageBatch / PutEvents requests' worth, sent
#: at once (at most ``sink_max_in_flight`` requests of the sink are in flight, over all its sends). Reading four
#: requests at a time rather than one costs 10-15 % less delivery CPU per event (the read, the worker's
#: bookkeeping and the ack are per read; benchmarks/bench_delivery.py); the worker still lingers only until one
#: request's worth is available, so a low rate waits no longer than before.
SINGLE_READ_RECORDS: Final = 40
#: Packed SQS messages: one send reads up to ``PACK_READ_RECORDS`` events, ~4 MB of ~1 KB ONTAP events:
#: gzip-packed (~5.5:1 with base64, measured) that is ~700 KB of messages, about one SendMessageBatch;
#: uncompressed, about four. The worker lingers (``sink_linger_s``) until that many events are available, so at
#: high rates every read is full. A read stays in memory until it is settled, up to ``sink_max_in_flight`` of
#: them; a bigger one would save at most part of one billed 64 KiB chunk per request.
PACK_READ_RECORDS: Final = 4096
#: The byte cap of a packed read, for events much bigger than usual (long paths, many routes).
PACK_READ_BYTES: Final = 8 * 1024 * 1024
#: Packed reads in flight at most (each holds up to ``PACK_READ_BYTES``; their requests still count against
#: ``sink_max_in_flight``): four keep ~16 MiB of events in memory and, at ~700 events per request, carry far more
#: than any one queue takes.
PACK_READS_IN_FLIGHT: Final = 4


class AwsSender:
    def __init__(
        self,
        target: AwsTarget,
        clients: AwsClients,
        dead_letter: DeadLetterWriter,
        *,
        max_in_flight: int,
        retry: RetryPolicy,
        linger_s: float,
    ) -> None:
        self.target = target
        self.name = target.name
        self._clients = clients
        self._dead_letter_writer = dead_letter
        self._dead_letter = dead_letter.for_sink(self.name)
        self._retry = retry
        self._rng = random.Random()
        fifo = isinstance(target, SqsTarget) and target.fifo
        #: FIFO queues: one send at a time, its batches one after another, and none after a batch that left entries
        #: unsettled.
        self._keeps_order = fifo
        self.packing = isinstance(target, SqsTarget) and target.packing
        #: Reads in flight (the worker's sends); requests in flight are bounded by ``_requests``.
        self.max_in_flight = 1 if fifo else min(max_in_flight, PACK_READS_IN_FLIGHT) if self.packing else max_in_flight
        #: Requests in flight over all sends: ``sink_max_in_flight``.
        self._requests = asyncio.Semaphore(1 if fifo else max_in_flight)
        self.max_records = PACK_READ_RECORDS if self.packing else SINGLE_READ_RECORDS
        self.linger_records = PACK_READ_RECORDS if self.packing else target.max_entries
        self.linger_s = linger_s
        self.max_bytes = PACK_READ_BYTES if self.packing else target.max_batch_bytes
        self._client: Any = None
        #: Packing: whether the queue's MaximumMessageSize has been read (and the pack limit fitted to it).
        self._queue_checked = False
        #: Packing: unsettled packed messages by the spool seq of each record they carry, kept so that the
        #: worker's next send of those records sends the very same messages.
        self._unsettled: dict[int, Entry] = {}
        self.last_error: SinkError | None = None
        self.dead_lettered = 0
        self.requests = 0
        #: For the metrics collector: retry rounds, entry failures (retried / not retriable), request durations.
        self.retry_requests = 0
        self.entries_failed_retryable = 0
        self.entries_failed_permanent = 0
        self.request_seconds = Histogram(REQUEST_BUCKETS)

    async def start(self) -> None:
        self._dead_letter_writer.open()
        # Batches go through the data-path client, the health check is a control call (SDK client). The data
        # client is set first: when the check fails retriably (endpoint down at start) sending goes on anyway.
        if isinstance(self.target, SqsTarget):
            self._client = await self._clients.sqs_data()
            self._fit_to_queue(await check_sqs(await self._clients.sqs(), self.target))
        else:
            self._client = await self._clients.events_data()
            await check_eventbridge(await self._clients.events(), self.target)

    def _fit_to_queue(self, info: SqsQueueInfo) -> None:
        """Packed messages must fit the queue's MaximumMessageSize, which may be below ``sqs_pack_bytes``."""
        self._queue_checked = True
        target = self.target
        if isinstance(target, SqsTarget) and target.packing and target.pack_bytes > info.max_message_bytes:
            log.warning(
                "sqs_pack_bytes_reduced",
                sink=self.name,
                pack_bytes=target.pack_bytes,
                queue_max_message_bytes=info.max_message_bytes,
                detail="packed messages are limited to the queue's MaximumMessageSize",
            )
            self.target = replace(target, pack_bytes=info.max_message_bytes)

    async def _check_queue_before_packing(self) -> None:
        """A queue that could not be checked at start (endpoint unreachable) is checked before the first packed
        message goes out: a message over its MaximumMessageSize would be rejected and dead-lettered."""
        if self._queue_checked or not isinstance(self.target, SqsTarget):
            return
        self._fit_to_queue(await check_sqs(await self._clients.sqs(), self.target))

    def _plan(self, records: Sequence[Record]) -> list[Batch | Oversize]:
        if not self.packing or not self._unsettled:  # nothing left over from an earlier send: all of it is new
            return plan_batches([Item(r.payload, ref=r) for r in records], self.target)
        # Records of a packed message that is still unsettled come back together (the worker sends exactly
        # what a send left pending); that message goes out again as it was. Any other record is packed anew.
        wanted = {r.seq for r in records}
        again: dict[int, Entry] = {}
        fresh: list[Item] = []
        for record in records:
            entry = self._unsettled.pop(record.seq, None)
            if entry is not None and all(_record(item).seq in wanted for item in entry.items):
                again.setdefault(id(entry), entry)
            else:
                fresh.append(Item(record.payload, ref=record))
        return batch_entries(again.values(), self.target) + plan_batches(fresh, self.target)

    def _send_function(self) -> Callable[[Batch], Awaitable[Outcome]]:
        client = self._client
        target = self.target
        if isinstance(target, SqsTarget):

            async def send_sqs(batch: Batch) -> Outcome:
                return await send_sqs_batch(client, target, batch)

            return send_sqs

        assert isinstance(target, EventBridgeTarget)

        async def send_events(batch: Batch) -> Outcome:
            return await send_eventbridge_batch(client, target, batch)

        return send_events

    def _timed(self, send: Callable[[Batch], Awaitable[Outcome]]) -> Callable[[Batch], Awaitable[Outcome]]:
        histogram = self.request_seconds

        async def timed(batch: Batch) -> Outcome:
            started = time.monotonic()
            try:
                return await send(batch)
            finally:
                histogram.observe(time.monotonic() - started)

        return timed

    async def send(self, records: Sequence[Record]) -> Sequence[Record]:
        if self._client is None:
            raise SinkError(f"{self.name}: not started", retriable=True)
        if self.packing:
            await self._check_queue_before_packing()
        send = self._timed(self._send_function())
        deadline = time.monotonic() + SEND_DEADLINE_S
        plan = self._plan(records)
        # Never raise after partial progress: what was delivered must not be sent again, so the worker gets
        # back exactly the unsettled records (and retries them with backoff, forever if the sink stays down).
        if self._keeps_order:
            pending: list[Record] = []
            for index, planned in enumerate(plan):
                if pending:
                    # A FIFO queue: nothing goes out after an entry that is still unsettled (a later message of
                    # its group would overtake it); the rest of the read goes back to the worker, in order, unsent.
                    pending.extend(_record(item) for step in plan[index:] for item in _items(step))
                    break
                pending += await self._settle(planned, send, deadline)
            return pending
        if len(plan) == 1:
            return await self._settle(plan[0], send, deadline)
        # Every batch of the read at once (within ``sink_max_in_flight`` requests): a region answers in tens of
        # milliseconds, so requests one after another would cap a sink at a few thousand events per second.
        settled = await asyncio.gather(*(self._settle(p, send, deadline) for p in plan), return_exceptions=True)
        for outcome in settled:
            if isinstance(outcome, BaseException):
                raise outcome
        return [record for part in settled if not isinstance(part, BaseException) for record in part]

    async def _settle(
        self, planned: Batch | Oversize, send: Callable[[Batch], Awaitable[Outcome]], deadline: float
    ) -> list[Record]:
        """Send one planned batch until settled or ``deadline`` (or dead-letter an oversize event); the records
        left unsettled, in order."""
        pending: list[Record] = []
        if isinstance(planned, Oversize):
            try:
                self._dead_letter(planned.item, planned.reason)
            except (SinkError, OSError) as exc:
                log.error("dead_letter_failed", sink=self.name, reason=planned.reason, error=str(exc))
                pending.append(_record(planned.item))
            else:
                self.dead_lettered += 1
                self.entries_failed_permanent += 1
            return pending
        async with self._requests:
            report = await deliver(
                planned, send, self._retry, self._rng, self._dead_letter, deadline=deadline, name=self.name
            )
        self.requests += report.requests
        self.dead_lettered += sum(len(entry.items) for entry, _ in report.dead)
        self.retry_requests += report.retry_requests
        self.entries_failed_retryable += report.retried_entries
        self.entries_failed_permanent += len(report.dead)
        if report.error is not None and not report.error.retriable:
            self.entries_failed_permanent += len(report.pending)
        for entry in report.pending:
            for item in entry.items:
                record = _record(item)
                pending.append(record)
                if self.packing and entry.packed:
                    self._unsettled[record.seq] = entry
        if report.error is not None:
            self.last_error = report.error
        return pending

    async def close(self) -> None:
        return None


def _items(step: Batch | Oversize) -> list[Item]:
    """Every event a planned step carries (packed messages' included)."""
    return [step.item] if isinstance(step, Oversize) else items_of(step.entries)


def _record(item: Item) -> Record:
    """The spool record an item was made from (its ``ref``)."""
    ref = item.ref
    assert isinstance(ref, Record)
    return ref
