"""Batches → the service, and back: :func:`send_sqs_batch` / :func:`send_eventbridge_batch` (one request, then
classify), the health checks :func:`check_sqs` / :func:`check_eventbridge`, and :func:`deliver`, the retry loop
that settles every entry of a batch as delivered, dead-lettered or still pending: an entry is never dropped
(what each kind of failure means: :mod:`fpolicyd.sinks.aws.classify`).

Deliberately thin: the requests go through the clients of :class:`~fpolicyd.sinks.aws.clients.AwsClients`,
with no SDK retries; :func:`deliver` retries, only the entries that failed, within the caller's deadline.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from fpolicyd.errors import SinkError
from fpolicyd.obs.log import get_logger
from fpolicyd.sinks.aws.classify import (
    ErrorKind,
    Outcome,
    classify_eventbridge,
    classify_sqs,
    describe,
    error_kind,
    normal_code,
)
from fpolicyd.sinks.aws.encode import Batch, Entry, Item
from fpolicyd.sinks.aws.targets import MIB, EventBridgeTarget, SqsTarget
from fpolicyd.sinks.retry import RetryPolicy

__all__ = [
    "DeadLetter",
    "DeliveryReport",
    "SendBatch",
    "SqsQueueInfo",
    "check_eventbridge",
    "check_sqs",
    "deliver",
    "send_eventbridge_batch",
    "send_sqs_batch",
]

log = get_logger("fpolicyd.sink.aws")


async def send_sqs_batch(client: Any, target: SqsTarget, batch: Batch) -> Outcome:
    """One SendMessageBatch on ``client`` (:meth:`AwsClients.data_client`: the lean client or the SDK's; both
    take the same arguments and answer alike). Whole-call failures raise (classify them with
    :func:`error_kind`)."""
    response = await client.send_message_batch(QueueUrl=target.queue_url, Entries=[e.request for e in batch.entries])
    return classify_sqs(response, batch)


async def send_eventbridge_batch(client: Any, target: EventBridgeTarget, batch: Batch) -> Outcome:
    """One PutEvents on ``client`` (:meth:`AwsClients.data_client`, lean or SDK, as for
    :func:`send_sqs_batch`). Whole-call failures raise (classify them with :func:`error_kind`)."""
    response = await client.put_events(Entries=[e.request for e in batch.entries])
    return classify_eventbridge(response, batch)


@dataclass(frozen=True, slots=True)
class SqsQueueInfo:
    arn: str
    fifo: bool
    #: The queue's MaximumMessageSize: a message over it is rejected even within the API limit.
    max_message_bytes: int


def _check_failure(what: str, exc: Exception) -> SinkError:
    kind = error_kind(exc)
    return SinkError(f"{what}: {describe(exc)}", retriable=kind is ErrorKind.RETRY)


async def check_sqs(client: Any, target: SqsTarget) -> SqsQueueInfo:
    """Health check at start: the queue exists and is what the URL says (FIFO or standard).
    Raises ``SinkError(retriable=False)`` for a missing queue or denied access; ``retriable=True`` when the
    endpoint could not be reached."""
    try:
        response = await client.get_queue_attributes(
            QueueUrl=target.queue_url, AttributeNames=["QueueArn", "FifoQueue", "MaximumMessageSize"]
        )
    except ClientError as exc:
        code = normal_code((exc.response.get("Error") or {}).get("Code"))
        if code in ("QueueDoesNotExist", "NonExistentQueue"):
            raise SinkError(
                f"{target.name}: the queue does not exist (or is in another region/account): {describe(exc)}",
                retriable=False,
            ) from exc
        raise _check_failure(f"{target.name}: GetQueueAttributes failed", exc) from exc
    except (BotoCoreError, OSError, TimeoutError) as exc:
        raise _check_failure(f"{target.name}: GetQueueAttributes failed", exc) from exc
    attributes = response.get("Attributes") or {}
    fifo = str(attributes.get("FifoQueue", "false")).lower() == "true"
    if fifo != target.fifo:
        kind = "a FIFO" if fifo else "a standard"
        raise SinkError(f"{target.name}: the queue is {kind} queue, the URL says otherwise", retriable=False)
    return SqsQueueInfo(
        arn=str(attributes.get("QueueArn", "")),
        fifo=fifo,
        max_message_bytes=int(attributes.get("MaximumMessageSize", MIB)),
    )


async def check_eventbridge(client: Any, target: EventBridgeTarget) -> str:
    """Health check at start: the bus exists (DescribeEventBus). Returns its ARN. Raises
    ``SinkError(retriable=False)`` for a missing bus or denied access."""
    try:
        response = await client.describe_event_bus(Name=target.bus_name)
    except ClientError as exc:
        code = normal_code((exc.response.get("Error") or {}).get("Code"))
        if code == "ResourceNotFoundException":
            raise SinkError(
                f"{target.name}: the event bus does not exist (or is in another region/account): {describe(exc)}",
                retriable=False,
            ) from exc
        raise _check_failure(f"{target.name}: DescribeEventBus failed", exc) from exc
    except (BotoCoreError, OSError, TimeoutError) as exc:
        raise _check_failure(f"{target.name}: DescribeEventBus failed", exc) from exc
    return str(response.get("Arn", ""))


# ----------------------------------------------------------------------------------------- delivery

SendBatch = Callable[[Batch], Awaitable[Outcome]]
DeadLetter = Callable[[Item, str], None]


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """Where every entry of a delivered batch ended up: each is in exactly one of ``delivered``, ``dead``
    (handed to the dead-letter callback, with the reason) or ``pending`` (not settled: keep it, send it later).
    ``error`` says why ``pending`` is not empty: retriable when the deadline ran out during a transient
    failure, not retriable when the sink is unusable (access, missing queue/bus) and retrying now is futile."""

    delivered: tuple[Entry, ...]
    dead: tuple[tuple[Entry, str], ...]
    pending: tuple[Entry, ...]
    requests: int
    retried_entries: int
    error: SinkError | None = None
    #: Requests that re-sent entries after a retriable failure (the retry rounds).
    retry_requests: int = 0

    @property
    def settled(self) -> bool:
        return not self.pending


@dataclass(slots=True)
class _Delivery:
    dead_letter: DeadLetter
    name: str
    delivered: list[Entry] = field(default_factory=list)
    dead: list[tuple[Entry, str]] = field(default_factory=list)
    parked: list[Entry] = field(default_factory=list)
    error: SinkError | None = None

    def bury(self, entry: Entry, reason: str) -> None:
        """Dead-letter what ``entry`` carries: every event of a packed message gets its own record, its reason
        saying which message it was in. If the file fails midway the whole entry stays pending (the events
        already written may then be written again: at least once, never lost)."""
        items = entry.items
        try:
            if len(items) == 1:
                self.dead_letter(items[0], reason)
            else:
                for index, item in enumerate(items, 1):
                    self.dead_letter(item, f"{reason} (packed message, event {index} of {len(items)})")
        except (SinkError, OSError) as exc:
            # The dead-letter file could not take it: keep the entry pending rather than lose it.
            self.parked.append(entry)
            self.error = SinkError(f"{self.name}: dead-letter write failed: {exc}", retriable=True)
            log.error("dead_letter_failed", sink=self.name, reason=reason, error=str(exc))
        else:
            self.dead.append((entry, reason))


async def deliver(
    batch: Batch,
    send: SendBatch,
    policy: RetryPolicy,
    rng: random.Random,
    dead_letter: DeadLetter,
    *,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    name: str = "aws",
) -> DeliveryReport:
    """Send ``batch`` until every entry is settled or ``deadline`` (on ``clock``) passes.

    Each round sends one request and classifies it (:class:`Outcome`): succeeded entries are done, dead ones
    go to ``dead_letter(item, reason)``, retry ones are sent again (only they) after ``policy.delay(n, rng)``
    with ``n`` the number of retry rounds so far; blocked ones, or a whole-call SINK error, stop the delivery
    with a non-retriable ``error`` and leave the rest pending. A whole request refused for its content
    (REQUEST) is split into one request per entry, so only the culprit is dead-lettered. A wait that would end
    past ``deadline`` is not started: what is unsettled then comes back as ``pending``, never dropped.
    """
    state = _Delivery(dead_letter, name)
    queue: deque[Batch] = deque([batch])
    requests = retried = rounds = 0
    pending_error: SinkError | None = None
    while queue:
        current = queue.popleft()
        if deadline is not None and clock() >= deadline:
            queue.appendleft(current)
            break
        requests += 1
        try:
            outcome = await send(current)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            kind = error_kind(exc)
            reason = describe(exc)
            if kind is ErrorKind.RETRY:
                outcome = Outcome(retry=tuple((e, reason) for e in current.entries))
            elif kind is ErrorKind.REQUEST and len(current.entries) > 1:
                log.warning("aws_request_refused_splitting", sink=name, entries=len(current.entries), error=reason)
                queue.extendleft(reversed([Batch((e,)) for e in current.entries]))
                continue
            elif kind is ErrorKind.REQUEST:
                outcome = Outcome(dead=((current.entries[0], reason),))
            else:
                log.error(
                    "aws_sink_unusable",
                    sink=name,
                    error=reason,
                    exc_info=not isinstance(exc, BotoCoreError | ClientError),
                )
                outcome = Outcome(blocked=tuple((e, reason) for e in current.entries))
        state.delivered.extend(outcome.succeeded)
        for entry, reason in outcome.dead:
            state.bury(entry, reason)
        if outcome.blocked:
            state.parked.extend(e for e, _ in outcome.blocked)
            state.parked.extend(e for e, _ in outcome.retry)
            state.error = SinkError(f"{name}: {outcome.blocked[0][1]}", retriable=False)
            break
        if outcome.retry:
            retry_batch = Batch(tuple(e for e, _ in outcome.retry))
            pending_error = SinkError(f"{name}: {outcome.retry[0][1]}", retriable=True)
            delay = policy.delay(rounds, rng)
            rounds += 1
            retried += len(retry_batch)
            log.warning(
                "aws_entries_retrying",
                sink=name,
                entries=len(retry_batch),
                reason=outcome.retry[0][1],
                retry_in_s=round(delay, 3),
                round=rounds,
            )
            queue.append(retry_batch)
            if deadline is not None and clock() + delay >= deadline:
                break
            await sleep(delay)
    pending = list(state.parked)
    for left in queue:
        pending.extend(left.entries)
    error = state.error
    if pending and error is None:
        error = pending_error or SinkError(f"{name}: deadline passed", retriable=True)
    return DeliveryReport(
        delivered=tuple(state.delivered),
        dead=tuple(state.dead),
        pending=tuple(pending),
        requests=requests,
        retried_entries=retried,
        error=error if pending else None,
        retry_requests=rounds,
    )
