"""Reading the sink while the storm runs and after it: :class:`SinkTail` (a JSON Lines directory, complete lines
only), :class:`QueueTail` (an SQS queue, drained as it is read), the out-of-order measure
(:func:`max_displacement`) and the latency helpers (:func:`percentiles`)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson

from fpolicyd.replaytest.config import ReplayTestError

__all__ = [
    "QUEUE_RECEIVERS",
    "QUEUE_WAIT_S",
    "SINK_POLL_S",
    "QueueTail",
    "SinkTail",
    "final_drain",
    "id_int",
    "max_displacement",
    "now_us",
    "percentiles",
]

#: How often the sink directory is read while the storm runs.
SINK_POLL_S: Final = 0.25
_SINK_GLOB: Final = "fpolicy_events_*.jsonl"
#: Bytes read from one sink file per poll (the rest on the next one).
_MAX_READ: Final = 8 << 20

#: Concurrent ReceiveMessage loops draining the verification queue (10 messages per call at most).
QUEUE_RECEIVERS: Final = 4
#: Long-poll wait of each ReceiveMessage (whole seconds, the API's unit).
QUEUE_WAIT_S: Final = 1
#: Visibility timeout of each ReceiveMessage: a message whose receive response was lost (a call that failed after
#: the queue had handed it out) comes back after this long. Messages are deleted right after they are counted, so
#: this only has to outlast one DeleteMessageBatch; a re-receipt is counted as a redelivered line, never twice.
_QUEUE_VISIBILITY_S: Final = 10
#: Pause after a failed ReceiveMessage / DeleteMessageBatch.
_QUEUE_ERROR_PAUSE_S: Final = 0.5
#: Empty long polls in a row (per receiver) that end the final drain once the daemon has stopped.
_QUEUE_QUIET_POLLS: Final = 2


def now_us() -> int:
    return time.time_ns() // 1000


def id_int(event_id: str) -> int:
    """The id's first 64 bits (60 random ones: a collision among 10**6 ids has odds ~1e-6): a small int."""
    return int(event_id[:18].replace("-", ""), 16)


def percentiles(values: array[int]) -> dict[str, float | int]:
    """p50/p95/p99/max in milliseconds (nearest rank) of µs values."""
    n = len(values)
    if not n:
        return {"count": 0}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return round(ordered[min(n - 1, max(0, math.ceil(p * n) - 1))] / 1000, 3)

    return {"count": n, "p50_ms": rank(0.50), "p95_ms": rank(0.95), "p99_ms": rank(0.99), "max_ms": rank(1.0)}


_second_cache: dict[str, int] = {}


def _rfc3339_us(text: str) -> int:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (as fpolicyd writes it) → epoch µs; seconds cached."""
    head = text[:19]
    secs = _second_cache.get(head)
    if secs is None:
        secs = int(datetime.fromisoformat(head).replace(tzinfo=UTC).timestamp())
        if len(_second_cache) > 100_000:
            _second_cache.clear()
        _second_cache[head] = secs
    return secs * 1_000_000 + int(text[20:26])


@dataclass(slots=True)
class _NodeArrivals:
    """GenerationTimes of one node key in sink order (first delivery of each id only)."""

    times: array[int] = field(default_factory=lambda: array("q"))


class SinkTail:
    """Reads a JSON Lines directory as it grows (complete lines only) and keeps what verification needs."""

    def __init__(
        self,
        directory: Path | None,
        skip: dict[Path, int] | None = None,
        *,
        live: bool = False,
        more: Sequence[Path] = (),
    ) -> None:
        """``skip``: bytes at the start of each file not to read (default: what is there now, which belongs to
        an earlier run). ``live``: while the storm runs, keep only the delivered ids (for progress and the end
        of the run) and the arrival latency; the verification proper is a second, full read at the end.
        ``directory`` None: lines are handed in by a subclass (:class:`QueueTail`). ``more``: further directories
        read as one sink with ``directory`` (the JSON Lines directories of several daemon instances)."""
        self.directory = directory
        self.directories: tuple[Path, ...] = () if directory is None else (directory, *more)
        self.live = live
        #: Also record the arrival latency in the full (not live) mode: a queue is read only once.
        self.track_sink_latency = False
        if skip is None:
            skip = {}
            for each in self.directories:
                if each.is_dir():
                    for path in each.glob(_SINK_GLOB):
                        skip[path] = path.stat().st_size
        self.skipped = dict(skip)
        self._offsets = dict(skip)
        self.lines = 0
        self.bad_lines = 0
        self.delivered: set[int] = set()
        self._distinct_lines: set[int] = set()
        self.flagged_replayed = 0
        self.flagged_out_of_order = 0
        self.flagged_duplicate = 0
        self.max_lag_us = 0
        self.arrivals: dict[str, _NodeArrivals] = {}
        self.ingest_latency_us: array[int] = array("q")
        self.sink_latency_us: array[int] = array("q")

    def forget_ids(self) -> None:
        """Free the id sets (keeps the counters and latencies)."""
        self.delivered = set()
        self._distinct_lines = set()
        self.arrivals = {}

    @property
    def distinct_lines(self) -> int:
        return len(self._distinct_lines)

    def poll(self) -> int:
        """Read what was appended since the last poll; returns the number of new lines."""
        paths = [path for each in self.directories if each.is_dir() for path in sorted(each.glob(_SINK_GLOB))]
        if not paths:
            return 0
        seen_at = now_us()
        new = 0
        for path in paths:
            offset = self._offsets.get(path, 0)
            try:
                with path.open("rb") as fh:
                    fh.seek(offset)
                    data = fh.read(_MAX_READ)
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1
            if not end:
                continue
            self._offsets[path] = offset + end
            for line in data[:end].splitlines():
                self._line(line, seen_at)
                new += 1
        return new

    def _line(self, line: bytes, seen_at_us: int) -> None:
        self.lines += 1
        try:
            doc = orjson.loads(line)
            event_id = id_int(doc["event_id"])
            meta = doc["metadata"]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            self.bad_lines += 1
            return
        if self.live:
            if event_id not in self.delivered:
                self.delivered.add(event_id)
                generation = meta.get("generation_time")
                if isinstance(generation, int) and not meta.get("replayed", False):
                    self.sink_latency_us.append(seen_at_us - generation)
            return
        digest = hash(line)
        if digest in self._distinct_lines:
            return  # the same line again: the spool re-sent what the sink had not acknowledged (at least once)
        self._distinct_lines.add(digest)
        replayed = meta.get("replayed", False)
        if replayed:
            self.flagged_replayed += 1
        if meta.get("out_of_order", False):
            self.flagged_out_of_order += 1
            self.max_lag_us = max(self.max_lag_us, int(meta.get("ooo_lag_us", 0)))
        if meta.get("duplicate", False):
            self.flagged_duplicate += 1
        if event_id in self.delivered:
            return
        self.delivered.add(event_id)
        generation = meta.get("generation_time")
        if not isinstance(generation, int):
            return
        if self.track_sink_latency and not replayed:
            self.sink_latency_us.append(seen_at_us - generation)
        node = str(meta.get("node", "")).rpartition(":")[0]
        arrivals = self.arrivals.get(node)
        if arrivals is None:
            arrivals = self.arrivals[node] = _NodeArrivals()
        arrivals.times.append(generation)
        if not replayed:
            with contextlib.suppress(KeyError, ValueError, TypeError):
                self.ingest_latency_us.append(_rfc3339_us(meta["received_at"]) - generation)

    def max_displacement(self) -> int:
        """Largest out-of-order displacement over the nodes (:func:`max_displacement`)."""
        return max((max_displacement(a.times) for a in self.arrivals.values()), default=0)


class QueueTail(SinkTail):
    """Drains an SQS queue (the ``sqs:`` sink's, or the target of a rule on an ``eventbridge:`` bus) and keeps
    what verification needs, as :class:`SinkTail` does for files. A message is read once (it is deleted after
    it was counted), so there is no second read: everything is counted as it arrives."""

    def __init__(self, clients: Any, queue_url: str, *, envelope: bool) -> None:
        """``envelope``: messages are EventBridge events (the fpolicyd event is their ``detail``)."""
        super().__init__(None, {})
        self.track_sink_latency = True
        self.clients = clients
        self.queue_url = queue_url
        self.envelope = envelope
        self.receives = 0
        self.delete_failures = 0
        #: Calls that failed (throttling, a dropped connection): retried after a pause; an undeleted message
        #: comes back after its visibility timeout.
        self.errors = 0
        #: What those failures were: exception type and message (first line, shortened) -> count.
        self.error_kinds: collections.Counter[str] = collections.Counter()

    async def check(self) -> None:
        """The queue exists and is readable: a wrong URL fails the run before the storm, not after it."""
        sqs = await self.clients.sqs()
        try:
            await sqs.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=["QueueArn"])
        except Exception as exc:  # botocore's ClientError and connection errors alike: the run cannot verify
            raise ReplayTestError(f"cannot read the verification queue {self.queue_url}: {exc}") from exc

    async def _failed(self, exc: Exception) -> None:
        self.errors += 1
        first_line = str(exc).partition("\n")[0]
        self.error_kinds[f"{type(exc).__name__}: {first_line[:160]}"] += 1
        await asyncio.sleep(_QUEUE_ERROR_PAUSE_S)

    async def remaining(self) -> int | None:
        """Messages still in the queue, visible or in flight (received, not deleted); None if the call failed."""
        try:
            sqs = await self.clients.sqs()
            response = await sqs.get_queue_attributes(
                QueueUrl=self.queue_url,
                AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
            )
            return sum(int(value) for value in response["Attributes"].values())
        except Exception as exc:  # as in receive(): counted, and the drain goes on
            await self._failed(exc)
            return None

    async def receive(self, wait_s: int) -> int | None:
        """One ReceiveMessage (up to 10, long poll ``wait_s``), counted, then one DeleteMessageBatch; the number
        of messages, or None if a call failed (after a pause)."""
        try:
            return await self._receive(wait_s)
        except Exception as exc:  # botocore/aiohttp errors of one call: the next call tries again
            await self._failed(exc)
            return None

    async def _receive(self, wait_s: int) -> int:
        sqs = await self.clients.sqs()
        response = await sqs.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=wait_s,
            VisibilityTimeout=_QUEUE_VISIBILITY_S,
        )
        self.receives += 1
        messages = response.get("Messages", [])
        if not messages:
            return 0
        seen_at = now_us()
        for message in messages:
            body = message.get("Body", "").encode()
            if self.envelope:
                try:
                    body = orjson.dumps(orjson.loads(body)["detail"])
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    self.lines += 1
                    self.bad_lines += 1
                    continue
            self._line(body, seen_at)
        deleted = await sqs.delete_message_batch(
            QueueUrl=self.queue_url,
            Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
        )
        # Not deleted: it comes back after the visibility timeout and is then counted as a redelivered line.
        self.delete_failures += len(deleted.get("Failed", []))
        return len(messages)


def max_displacement(times: Sequence[int]) -> int:
    """How many places later than its GenerationTime rank a notification arrived, at most (0: in order).

    ``times`` are GenerationTimes in arrival order; ranks are stable (equal times keep their arrival order)."""
    order = sorted(range(len(times)), key=times.__getitem__)
    return max((index - rank for rank, index in enumerate(order)), default=0)


async def final_drain(queue: QueueTail, bound_s: float) -> None:
    """After the daemon stopped: drain what is left (late deliveries, duplicates) until every receiver saw the
    queue empty ``_QUEUE_QUIET_POLLS`` times in a row and the queue holds no message (visible or in flight), or
    ``bound_s`` passed.

    In flight: a standard queue may hand one message to two concurrent receives; a delete with the older receipt
    handle may then leave it, invisible, until its visibility timeout. It is received (and counted as a
    redelivered line) once it is visible again, so a drain that stopped at the first quiet polls would leave it."""

    async def receiver() -> None:
        quiet = 0
        while quiet < _QUEUE_QUIET_POLLS:
            got = await queue.receive(QUEUE_WAIT_S)
            quiet = quiet + 1 if got == 0 else 0  # a failed call (None) says nothing about the queue

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(bound_s):
            while True:
                await asyncio.gather(*(receiver() for _ in range(QUEUE_RECEIVERS)))
                if await queue.remaining() == 0:
                    return
