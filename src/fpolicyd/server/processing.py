"""The processing stage's asyncio edge: spool (raw) → route → settle → dedup → spool (processed) → sinks.

One task. Each round it reads a batch of durable raw records with its own spool cursor (``processor``), takes
the settled events that came due, asks the dedup store about the candidates (embedded: on a thread; DynamoDB:
awaited), writes every suppressed duplicate to the audit ledger, appends the rest as processed records, waits
until they are durable, and only then acknowledges its cursor up to the stage's floor. Rounds are sequential,
so the floor never passes an event whose output is not on disk (see pipeline/processing.py for the restart rules).

A fail-closed dedup store that cannot answer stops the stage (nothing is delivered or dropped) and it retries
with capped backoff (``dedup_closed_retry_max_s``); the spool keeps taking events meanwhile and back-pressure
does the rest. A fail-open store that cannot answer lets the events through unchecked (each one in the audit
ledger as ``error_open``). Either way the first failed batch logs ``dedup_store_failing`` (warning) and the first
batch answered in full after it ``dedup_recovered`` (info, with how long and how many events failed open or
were held); ``fpolicyd_dedup_store_up`` says which state the stage is in.

Clocks: settle runs on the wall clock (events carry their receive time) made steady by the monotonic clock
(:class:`~fpolicyd.pipeline.settle.SettleClock`); dedup's ``now`` is the wall clock (claims are shared with other
instances and outlive this process); the idle wait is on the event loop's monotonic clock.

A full disk (ENOSPC/EDQUOT) under the dedup store, the audit ledger or the state file does the same whatever the
failure mode: the round waits (nothing decided, delivered or dropped), the disk monitor pauses reading, and the
refused write is tried again with the ``disk_full_retry_*`` backoff until it goes through. The state file is
replaced atomically: a save the disk refused leaves the previous file as it was (at worst, outputs appended
since are appended again after a restart — at least once, as the module says).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Final, TypeVar

from fpolicyd.config import Settings
from fpolicyd.errors import DiskFullError, SinkError, is_disk_full
from fpolicyd.events import FileEvent
from fpolicyd.obs.log import get_logger
from fpolicyd.pipeline.dedup import (
    AsyncDedupStore,
    Decision,
    DedupBackend,
    DedupMode,
    DedupPolicy,
    DedupRequest,
    DedupResult,
    DedupStore,
)
from fpolicyd.pipeline.processing import Candidate, Destinations, ProcessingStage, ProcessingState
from fpolicyd.pipeline.records import encode_processed, sink_selector
from fpolicyd.pipeline.redaction import Redactor
from fpolicyd.pipeline.router import Router, RouteTable, UnroutedAction
from fpolicyd.pipeline.settle import SettleClock, SettleConfig, Settler, received_at_s
from fpolicyd.server.spooler import ProcessingSlot, Spooler
from fpolicyd.sinks.aws.clients import AwsClients
from fpolicyd.sinks.dedup_dynamodb import DynamoDbDedupStore
from fpolicyd.sinks.retry import RetryPolicy
from fpolicyd.storage.dedup_store import EmbeddedDedupStore
from fpolicyd.storage.disk import Writer
from fpolicyd.storage.ledger import AuditLedger
from fpolicyd.storage.routes_file import load_routes
from fpolicyd.storage.spool import Spool

log = get_logger("fpolicyd.processor")

#: Raw record bytes one round reads at most (less when the spool is near its maximum).
ROUND_MAX_BYTES: Final = 1 << 20
#: How often a stage waiting for room in the spool looks again, besides being woken by acknowledgements.
ROOM_POLL_S: Final = 0.1
#: The stage's spool cursor.
CURSOR: Final = "processor"
STATE_FILE: Final = "processor-state.json"
INSTANCE_FILE: Final = "instance-id"
#: How far settle's clock trails the wall clock when the stage is idle: longer than an event takes from the
#: socket to a durable spool record (group commit is 5 ms by default), so none arrives "in the past".
SETTLE_WATERMARK_LAG_S: Final = 0.5

_T = TypeVar("_T")


@dataclass(slots=True)
class ProcessingWorkerStats:
    rounds: int = 0
    delivered: int = 0
    duplicates: int = 0
    dedup_errors_open: int = 0
    dedup_errors_closed: int = 0
    #: Times the stage waited for room in the spool (it was near spool_max_bytes).
    room_waits: int = 0
    #: Outages of the dedup store: batches it failed after answering the one before in full.
    dedup_outages: int = 0


@dataclass(frozen=True, slots=True)
class DedupStoreFigures:
    """The dedup store's state for metrics: whether the last batch was answered in full, and the DynamoDB
    store's own counters (0 for the embedded store)."""

    up: bool
    retries: int = 0
    throttled: int = 0
    short_circuited: int = 0
    unjudgeable: int = 0


def instance_id(directory: Path) -> str:
    """A stable id of this spool (and so of this daemon's records), kept next to the spool; part of every dedup
    claimant so that re-processing our own record after a crash is never taken for a duplicate."""
    path = directory / INSTANCE_FILE
    with contextlib.suppress(FileNotFoundError):
        existing = path.read_text().strip()
        if existing:
            return existing
    value = str(uuid.uuid4())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value + "\n")
    os.replace(tmp, path)
    return value


def load_state(directory: Path) -> ProcessingState:
    path = directory / STATE_FILE
    try:
        return ProcessingState.from_json(path.read_bytes())
    except FileNotFoundError:
        return ProcessingState()
    except ValueError as exc:
        log.error("processor_state_unreadable", file=str(path), error=str(exc), detail="starting from the cursor")
        return ProcessingState()


def save_state(directory: Path, state: ProcessingState) -> None:
    """Write the state to a temp file, fsync it, rename it over the state file. Raises OSError (ENOSPC, ...); the
    temp file is then removed and the previous state file is left exactly as it was."""
    path = directory / STATE_FILE
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(state.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class ProcessingWorker:
    """The processing stage's asyncio edge: one task that drives the sans-IO
    :class:`~fpolicyd.pipeline.processing.ProcessingStage` between the spool's raw and processed records."""

    def __init__(
        self,
        *,
        stage: ProcessingStage,
        spool: Spool,
        spooler: Spooler,
        slot: ProcessingSlot,
        destinations: Destinations,
        dedup_policy: DedupPolicy,
        dedup: DedupStore | None = None,
        dedup_async: AsyncDedupStore | None = None,
        ledger: AuditLedger | None,
        redact: Callable[[FileEvent], FileEvent],
        instance: str,
        state_dir: Path,
        batch_records: int,
        checkpoint_interval_s: float,
        retry: RetryPolicy | None = None,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``slot``: the spooler's place for the stage (the spooler wakes it and stops it through there); this
        worker takes it."""
        self.stage = stage
        self._spool = spool
        self._spooler = spooler
        self._destinations = destinations
        self._policy = dedup_policy
        self._dedup = dedup
        self._dedup_async = dedup_async
        self._rng = random.Random()
        self._ledger = ledger
        self._redact = redact
        self._instance = instance
        self._state_dir = state_dir
        self._batch_records = batch_records
        self._checkpoint_interval_s = checkpoint_interval_s
        self._retry = retry or RetryPolicy(base_s=0.1, cap_s=10.0)
        self._clock = wall_clock
        self._monotonic = monotonic
        self._settle_clock = SettleClock()
        #: Monotonic time the dedup store started failing (None while it answers), and what failed since.
        self._failing_since: float | None = None
        self._failed_open = 0
        self._failed_closed = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        #: When the state is saved next (loop time): every checkpoint interval, sooner after a refused save.
        self._save_at = 0.0
        self._saved: ProcessingState | None = None
        self._state_error: OSError | None = None
        self._state_attempts = 0
        self.stats = ProcessingWorkerStats()
        #: Last dedup failure (fail-closed), for readiness; None once the store answers again.
        self.last_error: SinkError | None = None
        slot.fill(self)

    async def close(self) -> None:
        """Release the dedup store and the ledger (after :meth:`stop`)."""
        if isinstance(self._dedup, EmbeddedDedupStore):
            await asyncio.to_thread(self._dedup.close)
        if self._ledger is not None:
            await asyncio.to_thread(self._ledger.close)

    def dedup_figures(self) -> DedupStoreFigures:
        """Read at scrape time (HTTP thread): plain attribute reads."""
        store = self._dedup_async
        up = self._failing_since is None
        if isinstance(store, DynamoDbDedupStore):
            return DedupStoreFigures(up, store.retries_done, store.throttled, store.short_circuited, store.unjudgeable)
        return DedupStoreFigures(up)

    @property
    def lag(self) -> int:
        """Records not yet handled (settle-held ones included)."""
        return self._spool.records_pending(CURSOR)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="processor")
        self._spooler.supervise(self._task, "processor")

    def wake(self) -> None:
        if not self._wakeup.is_set():
            self._wakeup.set()

    async def stop(self, timeout_s: float) -> None:
        """Handle what is durable within ``timeout_s``; settle-held events stay in the spool for the next start.
        After a failed fsync (the spooler is fatal) nothing the stage appends can become durable: it is stopped
        at once, its input stays in the spool for the next start."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        task = self._task
        failed = self._spooler.fatal is not None
        while (
            task is not None
            and not task.done()
            and not failed
            and loop.time() < deadline
            and self._spool.read_seq(CURSOR) <= self._spool.durable_seq
        ):
            self.wake()
            await asyncio.sleep(0.01)
        self._stopping = True
        self.wake()
        if task is not None and failed:
            task.cancel()
        if task is not None:
            # A task that crashed was reported by the spooler's supervision already; just collect it.
            await asyncio.wait({task}, timeout=max(0.1, deadline - loop.time()))
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if not await self._save_state(self.stage.state()):
            log.error(
                "processor_state_not_saved_at_stop",
                error=str(self._state_error),
                detail="the previous state file is kept; outputs since are appended again after the start",
            )

    # ------------------------------------------------------------------------------------------ loop

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            room = self._spooler.processing_room_bytes
            batch_records, batch_bytes = self._batch_records, max(1, min(ROUND_MAX_BYTES, room // 2))
            if room <= 0:
                # Near the maximum, only the oldest segment's records: once they are processed and delivered, that
                # segment goes and space frees (the reserve holds a segment's output). Past it: wait for room.
                batch_records = min(
                    batch_records, self._spool.oldest_segment_last_seq - self._spool.read_seq(CURSOR) + 1
                )
                batch_bytes = ROUND_MAX_BYTES
                if batch_records <= 0:
                    await self._wait_for_room()
                    continue
            # A round's output (processed records are the raw ones plus a few bytes) stays within the room left.
            records = self._spool.read(CURSOR, batch_records, batch_bytes)
            caught_up = len(records) < batch_records
            candidates = self.stage.take(records, self._watermark(caught_up=caught_up))
            candidates.extend(self.stage.due(self._watermark(caught_up=caught_up)))
            passthrough = self.stage.passthrough
            if passthrough:
                self.stage.passthrough = []
            if not records and not candidates and not passthrough:
                self._wakeup.clear()
                deadline = self.stage.next_deadline()
                timeout = None if deadline is None else max(0.0, deadline + SETTLE_WATERMARK_LAG_S - self._settle_now())
                if self._state_error is not None:  # a refused save is tried again even when nothing arrives
                    retry = max(0.0, self._save_at - loop.time())
                    timeout = retry if timeout is None else min(timeout, retry)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout)
                if self._state_error is not None and loop.time() >= self._save_at:
                    await self._checkpoint(loop)
                continue
            await self._emit(candidates, passthrough)
            floor = self.stage.floor()
            if floor > self._spool.acked_seq(CURSOR):
                self._spool.ack(CURSOR, floor)
                self._spooler.after_ack()
            self.stats.rounds += 1
            if loop.time() >= self._save_at:
                await self._checkpoint(loop)

    async def _checkpoint(self, loop: asyncio.AbstractEventLoop) -> None:
        state = self.stage.state()
        if state == self._saved:
            self._save_at = loop.time() + self._checkpoint_interval_s
        elif await self._save_state(state):
            self._saved = state
            self._save_at = loop.time() + self._checkpoint_interval_s
        else:
            self._save_at = loop.time() + self._spooler.disk.retry.delay(self._state_attempts - 1)

    async def _save_state(self, state: ProcessingState) -> bool:
        """Save the state; False (logged once per failure, a full disk reported to the disk monitor) if refused."""
        disk = self._spooler.disk
        try:
            await asyncio.to_thread(save_state, self._state_dir, state)
        except OSError as exc:
            if is_disk_full(exc):
                disk.full(Writer.processor_state, exc)
            elif self._state_error is None:
                log.error("processor_state_not_saved", error=str(exc), detail="the previous state file is kept")
            self._state_error = exc
            self._state_attempts += 1
            return False
        if self._state_error is not None:
            if not is_disk_full(self._state_error):
                log.info("processor_state_saved_again", attempts=self._state_attempts)
            self._state_error = None
            self._state_attempts = 0
            disk.freed(Writer.processor_state)
        return True

    async def _until_written(self, writer: Writer, call: Callable[[], _T]) -> _T:
        """Run ``call`` (a write, on a thread) until it goes through. A write refused for want of space is reported
        to the disk monitor (reading pauses) and tried again after the ``disk_full_retry_*`` backoff; another
        retriable error is logged once and tried again the same way (readiness shows it); a non-retriable one is
        raised (the stage stops and the daemon with it: its events stay in the spool)."""
        disk = self._spooler.disk
        attempt = 0
        failure: DiskFullError | SinkError | None = None
        while True:
            try:
                result = await asyncio.to_thread(call)
            except (DiskFullError, SinkError) as exc:
                if not exc.retriable:
                    raise
                if is_disk_full(exc):
                    disk.full(writer, exc)
                else:
                    if failure is None:
                        log.error("processor_write_failed", writer=writer.value, error=str(exc), detail="retrying")
                    self.last_error = SinkError(f"{writer.value}: {exc}", retriable=True)
                failure = exc
                await asyncio.sleep(disk.retry.delay(attempt))
                attempt += 1
                continue
            if failure is not None:
                if not is_disk_full(failure):
                    log.info("processor_write_recovered", writer=writer.value, attempts=attempt)
                    self.last_error = None
                disk.freed(writer)
            return result

    async def _wait_for_room(self) -> None:
        """The spool is near its maximum (:attr:`Spooler.processing_room_bytes`): wait until the sinks have
        freed space (each acknowledgement wakes the stage; a poll every :data:`ROOM_POLL_S` covers the rest)."""
        self.stats.room_waits += 1
        log.warning(
            "processing_paused",
            spool_bytes=self._spool.size_bytes,
            room_bytes=self._spooler.processing_room_bytes,
            detail="the spool is near spool_max_bytes: processing waits for the sinks to free space",
        )
        while self._spooler.processing_blocked and not self._stopping:
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), ROOM_POLL_S)
        log.info("processing_resumed", spool_bytes=self._spool.size_bytes)

    def _watermark(self, *, caught_up: bool) -> float:
        """Settle's clock: behind the wall clock by :data:`SETTLE_WATERMARK_LAG_S` once the stage has caught up
        with the spool (an event read from the socket a moment ago may not be durable yet), and the latest
        receive time taken while it works through a backlog (so a backlog settles as it would have live)."""
        if caught_up:
            return max(self._settle_now() - SETTLE_WATERMARK_LAG_S, self.stage.offered_through)
        return self.stage.offered_through

    def _settle_now(self) -> float:
        """Settle's clock: never behind the latest receive time offered either, so that after a restart that
        follows a step back (the spool replayed from the floor holds receive times from before the step) it
        runs on from those, in real time, instead of waiting for the wall clock to catch up with them."""
        return self._settle_clock.now(max(self._clock(), self.stage.offered_through), self._monotonic())

    async def _emit(self, candidates: Sequence[Candidate], passthrough: Sequence[tuple[int, bytes]]) -> None:
        now = self._clock()
        requests = [self._requests(c, now) for c in candidates]
        results = await self._judge([request for batch in requests for request in batch], now)
        lines: list[bytes] = []
        decisions: list[tuple[DedupRequest, DedupResult]] = []
        position = 0
        for candidate, batch in zip(candidates, requests, strict=True):
            verdicts = results[position : position + len(batch)]
            position += len(batch)
            decisions.extend(zip(batch, verdicts, strict=True))
            if not self._admitted(batch, verdicts):
                self.stats.duplicates += 1
                continue
            if candidate.line is not None:  # the fast path: as stored, to every sink
                lines.append(encode_processed(candidate.line, None))
                continue
            assert candidate.event is not None
            event = self._narrowed(candidate.event, batch, verdicts)
            keys = self._destinations.keys_for(event.metadata.get("routes") or ())
            lines.append(encode_processed(self._redact(event).to_json(), keys))
        # A raw line that is not an event (it never should be) goes on unchanged to every sink.
        lines.extend(encode_processed(payload, None) for _, payload in passthrough)
        ledger = self._ledger
        if ledger is not None and decisions:
            # fsyncs: off the loop; a batch the disk refused is cut back, so writing it again duplicates no line
            await self._until_written(Writer.ledger, partial(ledger.write, decisions, now))
        if lines:
            await self._durable(lines)
            self.stats.delivered += len(lines)
        self.stage.emitted([c.last_seq for c in candidates])
        self.stage.emitted([seq for seq, _ in passthrough])

    def _requests(self, candidate: Candidate, now: float) -> list[DedupRequest]:
        claimant = f"{self._instance}:{candidate.last_seq}"
        if candidate.event is not None:
            return self._policy.requests_for_event(candidate.event, claimant, now)
        if self._policy.mode is DedupMode.off:
            return []
        # Fast path (exact mode only, see ProcessingStage): the id is all the claim needs.
        return [self._policy.exact_request(candidate.event_id, claimant, now, now)]

    def _admitted(self, requests: Sequence[DedupRequest], results: Sequence[DedupResult]) -> bool:
        """Whether the event goes out: some claim is ours (or the store failed open), or it made none."""
        if not requests:
            return True
        self.stats.dedup_errors_open += sum(1 for result in results if result.decision is Decision.error_open)
        return any(result.deliver for result in results)

    @staticmethod
    def _narrowed(event: FileEvent, requests: Sequence[DedupRequest], results: Sequence[DedupResult]) -> FileEvent:
        """In window mode an event that is a duplicate for some use cases only keeps the others' routes."""
        kept = [request.use_case for request, result in zip(requests, results, strict=True) if result.deliver]
        if len(kept) == len(requests) or not requests or requests[0].use_case is None:
            return event
        return event.with_routes([route for route in event.metadata.get("routes") or () if route in kept])

    async def _judge(self, requests: list[DedupRequest], now: float) -> list[DedupResult]:
        """Dedup verdicts; while a fail-closed store cannot answer, wait and ask again (nothing moves meanwhile)."""
        if not requests or (self._dedup is None and self._dedup_async is None):
            return []
        attempt = 0
        while True:
            if self._dedup_async is not None:
                results = await self._dedup_async.check_many(requests, now)
            else:
                store = self._dedup
                assert store is not None
                # A full disk is waited out here whatever the failure mode (nothing is decided meanwhile).
                results = await self._until_written(Writer.dedup_store, partial(store.check_many, requests, now))
            closed = sum(1 for result in results if result.decision is Decision.error_closed)
            failed_open = sum(1 for result in results if result.decision is Decision.error_open)
            self._note_store(failed_open, closed)
            if not closed:
                self.last_error = None
                return results
            self.stats.dedup_errors_closed += closed
            self.last_error = SinkError(f"dedup store unavailable for {closed} events (fail-closed)", retriable=True)
            delay = self._retry.delay(attempt, self._rng)
            log.warning("dedup_unavailable", events=closed, retry_in_s=round(delay, 3), attempt=attempt + 1)
            attempt += 1
            await asyncio.sleep(delay)
            now = self._clock()

    def _note_store(self, failed_open: int, failed_closed: int) -> None:
        """Log the dedup store's state changes: the first failed batch, the first one answered in full after."""
        if failed_open or failed_closed:
            self._failed_open += failed_open
            self._failed_closed += failed_closed
            if self._failing_since is None:
                self._failing_since = self._monotonic()
                self.stats.dedup_outages += 1
                store = self._dedup_async
                log.warning(
                    "dedup_store_failing",
                    failure_mode="closed" if failed_closed else "open",
                    events=failed_open + failed_closed,
                    error=store.last_failure if isinstance(store, DynamoDbDedupStore) else None,
                    detail="events are held in the spool until the store answers"
                    if failed_closed
                    else "events are delivered unchecked (duplicates possible)",
                )
            return
        if self._failing_since is not None:
            log.info(
                "dedup_recovered",
                after_s=round(self._monotonic() - self._failing_since, 3),
                delivered_unchecked=self._failed_open,
                held_checks=self._failed_closed,
            )
            self._failing_since = None
            self._failed_open = self._failed_closed = 0

    async def _durable(self, lines: list[bytes]) -> None:
        done = asyncio.get_running_loop().create_future()

        def durable() -> None:
            if not done.done():
                done.set_result(None)

        self._spooler.submit_many(lines, [(len(lines) - 1, durable)])
        await done


# ---------------------------------------------------------------------------------------------- wiring


@dataclass(frozen=True, slots=True)
class ProcessingPlan:
    """What the settings ask of the stage, decided before any sink or the spool exists."""

    enabled: bool
    #: Every sink URI to build: the default sinks, the routes' own sinks and the unrouted-audit file.
    uris: tuple[str, ...]
    table: RouteTable | None
    #: The router over ``table`` (None: routing off): the reader routes each event, the stage re-routes a
    #: coalesced one.
    router: Router | None
    default_sinks: tuple[str, ...]
    unrouted_sinks: tuple[str, ...] | None
    #: Settle policies by route and operation (enabled: some event can be held).
    settle: SettleConfig
    #: Whether the stage dedups (window mode, or the DynamoDB backend); exact + embedded is the reader's job.
    dedup: bool = False

    def destinations(self, names: Mapping[str, str]) -> Destinations:
        """Destinations by sender name (``names``: URI → the sender's normalised name)."""
        routes = self.table.routes if self.table is not None else ()
        return Destinations(
            default_sinks=tuple(names[uri] for uri in self.default_sinks),
            route_sinks={route.name: tuple(names[uri] for uri in route.sinks) for route in routes},
            unrouted_sinks=None if self.unrouted_sinks is None else tuple(names[u] for u in self.unrouted_sinks),
        )

    def selector(self, sink: str) -> Callable[[bytes], bytes | None]:
        return sink_selector(sink, processing=self.enabled)


def plan_processing(settings: Settings) -> ProcessingPlan:
    table = load_routes(settings.routes_file) if settings.routing_enabled else None
    default_sinks = settings.effective_sinks
    unrouted = (
        (f"jsonl:{settings.data_dir / 'unrouted'}",)
        if table is not None and settings.unrouted_action is UnroutedAction.AUDIT
        else None
    )
    # Routing alone needs no stage (the reader stores each event with its routes); the stage runs for dedup,
    # for settle, and to address events to a route's own sinks or to the unrouted audit file.
    settle = settings.settle_config()
    routes_with_sinks = table is not None and any(route.sinks for route in table.routes)
    # Exact dedup with the embedded backend is done by the reader (pipeline/ingest.py); the stage dedups only in
    # window mode or against DynamoDB.
    stage_dedup = settings.dedup_mode is not DedupMode.off and not settings.reader_dedup
    enabled = stage_dedup or settle.enabled or routes_with_sinks or unrouted is not None
    uris: dict[str, None] = dict.fromkeys(default_sinks)
    if enabled:
        for route in table.routes if table is not None else ():
            uris.update(dict.fromkeys(route.sinks))
        uris.update(dict.fromkeys(unrouted or ()))
    router = Router(table, strict=settings.routes_strict) if table is not None else None
    return ProcessingPlan(enabled, tuple(uris), table, router, default_sinks, unrouted, settle, stage_dedup)


async def start_processing(
    settings: Settings,
    *,
    plan: ProcessingPlan,
    names: Mapping[str, str],
    spool: Spool,
    spooler: Spooler,
    slot: ProcessingSlot,
    clients: AwsClients,
    redactor: Redactor,
    wall_clock: Callable[[], float] = time.time,
) -> ProcessingWorker:
    """Build the stage from the settings, restore its state, start it. Raises ConfigError/SinkError."""
    state_dir = settings.effective_spool_dir
    state = await asyncio.to_thread(load_state, state_dir)
    state = ProcessingState(
        max(state.floor, spool.acked_seq(CURSOR)),
        tuple(seq for seq in state.emitted if seq > max(state.floor, spool.acked_seq(CURSOR))),
    )
    instance = await asyncio.to_thread(instance_id, state_dir)
    settle = plan.settle
    settler = Settler(settle.policy_for, max_pending=settings.settle_max_pending) if settle.enabled else None
    destinations = plan.destinations(names)
    decode = (
        settler is not None
        or settings.dedup_mode is DedupMode.window
        or redactor.redacts_events
        or not destinations.everything_everywhere
    )
    router = plan.router
    stage = ProcessingStage(
        settler=settler,
        state=state,
        received_at_s=received_at_s,
        decode=decode,
        route=router.match if router is not None else None,
    )
    dedup: EmbeddedDedupStore | None = None
    dedup_async: DynamoDbDedupStore | None = None
    ledger: AuditLedger | None = None
    if plan.dedup:
        now = wall_clock()
        if settings.dedup_backend is DedupBackend.dynamodb:
            if not settings.dedup_dynamodb_table:
                raise SinkError("dedup_dynamodb_table is not set", retriable=False)
            dedup_async = DynamoDbDedupStore(
                clients,
                settings.dedup_dynamodb_table,
                max_in_flight=settings.dedup_dynamodb_max_in_flight,
                retries=settings.dedup_dynamodb_retries,
                failure_mode=settings.dedup_failure_mode,
            )
            try:
                await dedup_async.check_table()  # a missing table stops the start with the table named
            except SinkError as exc:
                if not exc.retriable:
                    raise
                log.error("dedup_store_unreachable", error=str(exc), failure_mode=settings.dedup_failure_mode.value)
        else:
            store = EmbeddedDedupStore(
                settings.effective_dedup_dir,
                max_entries=settings.dedup_embedded_max_entries,
                failure_mode=settings.dedup_failure_mode,
            )
            dedup = await asyncio.to_thread(store.open, now)
            if dedup.rebuilds:
                log.error(
                    "dedup_store_rebuilt",
                    moved_aside=str(dedup.last_rebuild),
                    detail="the dedup store was unreadable: earlier claims are forgotten (duplicates may pass once)",
                )
        ledger = AuditLedger(settings.dedup_ledger_files(), redact=redactor.redact_record)
        await asyncio.to_thread(ledger.open, now)
    worker = ProcessingWorker(
        stage=stage,
        spool=spool,
        spooler=spooler,
        slot=slot,
        destinations=destinations,
        dedup_policy=settings.dedup_policy() if plan.dedup else DedupPolicy(mode=DedupMode.off),
        dedup=dedup,
        dedup_async=dedup_async,
        ledger=ledger,
        redact=redactor.redact_event,
        instance=instance,
        state_dir=state_dir,
        batch_records=settings.processor_batch_records,
        checkpoint_interval_s=settings.checkpoint_interval_s,
        retry=RetryPolicy(base_s=min(0.1, settings.dedup_closed_retry_max_s), cap_s=settings.dedup_closed_retry_max_s),
        wall_clock=wall_clock,
    )
    log.info(
        "processor_started",
        routes=len(plan.table.routes) if plan.table is not None else 0,
        routes_strict=settings.routes_strict,
        dedup=settings.dedup_mode.value if plan.dedup else "off",
        dedup_backend=settings.dedup_backend.value if plan.dedup else None,
        settle=settler is not None,
        fast_path=not decode,
        settle_window_s=settings.write_complete_delay_s,
        floor=state.floor,
        pending=spool.records_pending(CURSOR),
    )
    worker.start()
    return worker
