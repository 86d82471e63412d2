"""SQS and EventBridge senders: spool records → planned batches → :func:`fpolicyd.sinks.aws.deliver`.

Only entries that failed retriably are sent again (by ``deliver`` within one call, and by the worker across
calls); permanent rejections and oversize events go to the dead-letter file with their reason. A FIFO queue
gets one batch in flight at a time, so a retried entry cannot overtake a later one of its group.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fpolicyd.errors import SinkError
from fpolicyd.obs.log import get_logger
from fpolicyd.obs.metrics import REQUEST_BUCKETS, Histogram
from fpolicyd.pipeline.spool import Record
from fpolicyd.sinks.aws import (
    AwsClients,
    AwsTarget,
    Batch,
    DeadLetterWriter,
    EventBridgeTarget,
    Item,
    Outcome,
    Oversize,
    SqsTarget,
    check_eventbridge,
    check_sqs,
    deliver,
    plan_batches,
    send_eventbridge_batch,
    send_sqs_batch,
)
from fpolicyd.sinks.runner import RetryPolicy

log = get_logger("fpolicyd.sink")

#: How long one ``send`` keeps retrying inside ``deliver`` before handing the rest back to the worker.
SEND_DEADLINE_S = 10.0


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
        self.max_in_flight = 1 if fifo else max_in_flight
        self.max_records = 10
        self.linger_s = linger_s
        self.max_bytes = target.max_batch_bytes
        self._client: Any = None
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
            await check_sqs(await self._clients.sqs(), self.target)
        else:
            self._client = await self._clients.events_data()
            await check_eventbridge(await self._clients.events(), self.target)

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
        send = self._timed(self._send_function())
        pending: list[Record] = []
        deadline = time.monotonic() + SEND_DEADLINE_S
        for planned in plan_batches((Item(r.payload, ref=r) for r in records), self.target):
            if isinstance(planned, Oversize):
                try:
                    self._dead_letter(planned.item, planned.reason)
                except (SinkError, OSError) as exc:
                    log.error("dead_letter_failed", sink=self.name, reason=planned.reason, error=str(exc))
                    ref = planned.item.ref
                    assert isinstance(ref, Record)
                    pending.append(ref)
                else:
                    self.dead_lettered += 1
                    self.entries_failed_permanent += 1
                continue
            report = await deliver(
                planned, send, self._retry, self._rng, self._dead_letter, deadline=deadline, name=self.name
            )
            self.requests += report.requests
            self.dead_lettered += len(report.dead)
            self.retry_requests += report.retry_requests
            self.entries_failed_retryable += report.retried_entries
            self.entries_failed_permanent += len(report.dead)
            if report.error is not None and not report.error.retriable:
                self.entries_failed_permanent += len(report.pending)
            for entry in report.pending:
                ref = entry.item.ref
                assert isinstance(ref, Record)
                pending.append(ref)
            if report.error is not None:
                self.last_error = report.error
        # Never raise after partial progress: what was delivered must not be sent again, so the worker gets
        # back exactly the unsettled records (and retries them with backoff, forever if the sink stays down).
        return pending

    async def close(self) -> None:
        return None
