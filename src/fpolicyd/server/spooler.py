"""The spooler, the reader side's asyncio edge: readers append to the spool; a commit task makes appends durable; sink
workers deliver from the spool; back-pressure follows the spool's size.

Order of events for one notification:
1. the reader normalizes it and calls :meth:`Spooler.submit` (an in-memory append, no syscall);
2. once per loop iteration the spool's buffer is flushed to the kernel (one ``write`` for every connection);
3. the commit task fsyncs on a worker thread (group commit: ``spool_group_commit_s`` after data became
   pending; what arrives meanwhile rides on the next fsync) and then releases what waited for durability —
   the SCREEN_RESP of a synchronous engine — and wakes the sink workers, which only ever read durable records.

If the spool is full (it should not be: reading pauses before that), the event is held in memory, every
reader stops, and the held events go in first as soon as space frees up: an event that was read is never lost.

A full disk (ENOSPC/EDQUOT) is handled the same way for every writer (``fpolicyd.storage.disk``): what could not
be written stays in memory (the spool's buffer, held events, the journal's buffer) or in the spool (what a sink,
the ledger or the processing stage could not write yet), reading pauses while any writer is full, the refused
write is tried again with a backoff (settings ``disk_full_retry_initial_s``/``disk_full_retry_max_s``), and
reading resumes by itself once every writer got its write through.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from fpolicyd.errors import SinkError
from fpolicyd.obs.log import get_logger
from fpolicyd.obs.metrics import COMMIT_BUCKETS, Histogram
from fpolicyd.pipeline.backpressure import Action, BackPressureGate, Pressure, Watermarks
from fpolicyd.pipeline.records import DUPLICATE_TAG
from fpolicyd.server.delivery import DeliveryGroup, DeliverySpec
from fpolicyd.server.disk_monitor import DiskMonitor
from fpolicyd.sinks.retry import RetryPolicy
from fpolicyd.sinks.runner import Sender, SinkHandle, SinkWorker
from fpolicyd.storage.dedup_journal import DedupJournal, JournalError
from fpolicyd.storage.disk import Writer, sink_writer
from fpolicyd.storage.duplicate_ledger import DuplicateLedger
from fpolicyd.storage.spool import Spool, SpoolFullError, SpoolIOError

log = get_logger("fpolicyd.pipeline")

OnDurable = Callable[[], None]


class SpoolConsumer(Protocol):
    """The processing stage as the spooler drives it (``server/processing.py``): a consumer of the spool that is
    woken when records became durable or space freed, and stopped first at the drain."""

    def wake(self) -> None: ...

    async def stop(self, timeout_s: float) -> None: ...


class ProcessingSlot:
    """Where the spooler reaches the processing stage. The two need each other (the stage appends through the
    spooler; the spooler wakes the stage and stops it first at the drain), so this is created before both and
    handed to both constructors: the stage's worker takes its place here as it is built, the spooler calls it."""

    def __init__(self) -> None:
        self._consumer: SpoolConsumer | None = None

    def fill(self, consumer: SpoolConsumer) -> None:
        if self._consumer is not None:
            raise ValueError("the processing slot is taken")
        self._consumer = consumer

    def wake(self) -> None:
        if self._consumer is not None:
            self._consumer.wake()

    async def stop(self, timeout_s: float) -> None:
        if self._consumer is not None:
            await self._consumer.stop(timeout_s)


class Spooler:
    """The reader side of the daemon: spool appends, group commit, back-pressure, sink workers, durable acks."""

    def __init__(
        self,
        spool: Spool,
        senders: Sequence[Sender],
        watermarks: Watermarks,
        *,
        checkpoint_interval_s: float,
        retry: RetryPolicy | None = None,
        select: Callable[[str], Callable[[bytes], bytes | None] | None] = lambda sink: None,
        journal: DedupJournal | None = None,
        wall_clock: Callable[[], float] = time.time,
        delivery: DeliverySpec | None = None,
        ingestion_slo_s: float = 5.0,
        duplicates: DuplicateLedger | None = None,
        disk: DiskMonitor | None = None,
        broadcast_back_pressure: Callable[[bool], None] = lambda apply: None,
        on_fatal: Callable[[BaseException], None] = lambda exc: None,
        processing: ProcessingSlot | None = None,
    ) -> None:
        """``senders`` run here, in the daemon's process; with ``delivery`` (and no ``senders``) the sinks run in
        the delivery process instead (``server/delivery.py``). ``disk``: the writers' disk-full episodes (every
        writer of the daemon reports there; reading pauses while one is full).

        ``broadcast_back_pressure``: called with True/False when ONTAP should be asked to stop/resume sending
        (the live connections' :meth:`~fpolicyd.server.connection.LiveConnections.broadcast_back_pressure`).
        ``on_fatal``: called once when the spool can no longer make events durable (a failed fsync is final) or a
        consumer task died: the daemon must stop so that recovery rebuilds the spool from disk at the next start.
        ``processing``: where the processing stage (route, settle, dedup) between the raw and the processed
        records takes its place once built; None when the settings need no stage."""
        if delivery is not None and senders:
            raise ValueError("sinks run either here (senders) or in the delivery process, not both")
        self.spool = spool
        #: Claims of the reader's dedup window, written and fsynced with the spool (see storage/dedup_journal.py).
        self.journal = journal
        #: The audit ledger of the duplicates the reader's window suppressed (kept in the spool until written).
        self.duplicates = duplicates
        self._wall_clock = wall_clock
        self.disk = disk or DiskMonitor()
        #: The sink workers that run in this process (none when the delivery process runs them).
        self.local_workers = [
            SinkWorker(
                sender,
                spool,
                on_ack=self._after_ack,
                retry=retry,
                select=select(sender.name),
                ingestion_slo_s=ingestion_slo_s,
                on_error=self._sinks_changed,
            )
            for sender in senders
        ]
        self.delivery = (
            None
            if delivery is None
            else DeliveryGroup(
                spool, delivery, on_ack=self._after_ack, on_fatal=self._fail, on_figures=self._sinks_changed
            )
        )
        #: Every sink, wherever it runs.
        self.workers: list[SinkHandle] = (
            list(self.local_workers) if self.delivery is None else list(self.delivery.workers)
        )
        self.pressure = BackPressureGate(watermarks)
        self._checkpoint_interval_s = checkpoint_interval_s
        self._waiters: deque[tuple[int, OnDurable]] = deque()
        #: Events read while the spool was full: (record, what to run once durable, dedup key or None).
        self._held: deque[tuple[bytes, OnDurable | None, int | None]] = deque()
        self._parked: dict[int, Callable[[], None]] = {}
        self._flush_scheduled = False
        self._commit_wakeup = asyncio.Event()
        #: Loop time at which data first became pending since the last commit started (None: nothing pending).
        self._pending_since: float | None = None
        #: For /metrics: each spool fsync's duration, and each commit's latency (pending since → durable).
        self.fsync_seconds = Histogram(COMMIT_BUCKETS)
        self.commit_latency_seconds = Histogram(COMMIT_BUCKETS)
        self._tasks: list[asyncio.Task[None]] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-sync")
        self._broadcast_back_pressure = broadcast_back_pressure
        self._on_fatal = on_fatal
        self.fatal: BaseException | None = None
        #: The last refused flush (or segment roll) while the spool or the journal cannot be written.
        self._flush_error: SpoolIOError | JournalError | None = None
        self._flush_attempts = 0
        self._checkpoint_error: SpoolIOError | None = None
        self._checkpoint_attempts = 0
        self.disk.subscribe(self._update_pressure)
        self.accepted = 0
        self.held_total = 0
        self.pauses = 0
        self._processing = processing

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.delivery is not None:
            await self.delivery.start()
        for worker in self.local_workers:
            try:
                await worker.sender.start()
            except SinkError as exc:
                if not exc.retriable:
                    raise
                log.error("sink_unavailable_at_start", sink=worker.name, error=str(exc), detail="events are spooled")
                worker.last_error = exc  # not ready until a send succeeds
            self.supervise(worker.start(), f"sink {worker.name}")
        self._tasks = [
            asyncio.create_task(self._commit_loop(), name="spool-commit"),
            asyncio.create_task(self._checkpoint_loop(), name="spool-checkpoint"),
        ]
        self._update_pressure()

    async def drain(self, timeout_s: float) -> int:
        """Make everything durable, let the sinks deliver within ``timeout_s``, persist the cursors; return the
        largest sink backlog left (it stays in the spool and is delivered after the next start)."""
        if self._held and self.fatal is None:
            self._take_back_held()
        if self._held:
            # Reachable when the spool hit its hard limit and never freed space before the stop, or when a reader
            # had events in hand as the spool failed.
            log.critical(
                "events_lost_at_stop",
                events=len(self._held),
                detail="the spool was full until the end; raise spool_max_bytes or fix the sinks"
                if self.fatal is None
                else "read after the spool failed, never stored; a synchronous engine never got their answer",
            )
        self._flush()
        await self._commit_now()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if self._processing is not None:
            # The stage first, so that what it turns out lands in the spool before the sinks drain it.
            await self._processing.stop(max(0.0, deadline - loop.time()))
            self._flush()
            await self._commit_now()
        for local in self.local_workers:
            await local.stop(max(0.0, deadline - loop.time()))
        if self.delivery is not None:
            await self.delivery.stop(max(0.0, deadline - loop.time()))
        if self.duplicates is not None:
            await self.duplicates.drain(max(0.0, deadline - loop.time()))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        left = max((worker.lag for worker in self.workers), default=0)
        try:
            await loop.run_in_executor(self._executor, self.spool.checkpoint)
        except SpoolIOError as exc:
            log.error(
                "spool_checkpoint_failed_at_stop",
                error=str(exc),
                detail="the previous cursors file is kept: what was acked since is delivered again (at least once)",
            )
        self._executor.shutdown(wait=True)
        return left

    def sink_stats(self) -> dict[str, dict[str, int]]:
        """Per sink: events delivered, sends, failed sends, lag; AWS sinks add requests and dead-lettered."""
        out: dict[str, dict[str, int]] = {}
        for worker in self.workers:
            figures = worker.figures()
            stats = {
                "delivered": figures.delivered,
                "sends": figures.sends,
                "failed_sends": figures.failures,
                "lag": worker.lag,
            }
            if figures.request_seconds is not None:
                stats["requests"] = figures.requests
                stats["dead_lettered"] = figures.dead_lettered
            out[worker.name] = stats
        return out

    # ------------------------------------------------------------------------------------------ readers

    def submit(self, line: bytes, on_durable: OnDurable | None = None, key: int | None = None) -> None:
        """Take one encoded event; ``on_durable`` runs once it is safe on disk (per the fsync policy); ``key``:
        the dedup window's claim for it (journaled with the record's seq)."""
        self.accepted += 1
        if self._held:
            self._held.append((line, on_durable, key))
        else:
            try:
                seq = self.spool.append(line)
            except SpoolFullError as exc:
                self._hold(line, on_durable, key, exc)
            except SpoolIOError as exc:
                # A segment roll the disk refused: held like at a full spool, and retried like a failed flush. A
                # failed spool (fatal): held, reading stops, and the stop reports them.
                self._hold(line, on_durable, key, exc)
                if self.fatal is None:
                    self._flush_failed(exc)
            else:
                if on_durable is not None:
                    self._waiters.append((seq, on_durable))
                if key is not None:
                    self._journal(((seq, key),))
                self._note_duplicate(seq, line)
        self._schedule_flush()

    def submit_many(
        self,
        lines: list[bytes],
        on_durable: Sequence[tuple[int, OnDurable]],
        claims: Sequence[tuple[int, int]] = (),
    ) -> None:
        """Take the events of one socket read in one spool append (half the per-event cost of :meth:`submit`).
        ``on_durable`` pairs an index into ``lines`` with what to run once that event is durable; ``claims`` pairs
        an index with the dedup key the reader claimed for that event."""
        if not lines:
            return
        if self._held:
            self._submit_each(lines, on_durable, claims)
            return
        try:
            seqs = self.spool.append_many(lines)
        except (SpoolFullError, SpoolIOError):
            # Full: as many as fit go in, the rest is held. Failed (the reader had these in hand as the spool
            # failed): every one is held, reading stops, and the stop reports them.
            self._submit_each(lines, on_durable, claims)
            return
        self.accepted += len(lines)
        waiters = self._waiters
        for index, callback in on_durable:
            waiters.append((seqs[index], callback))
        if claims:
            self._journal([(seqs[index], key) for index, key in claims])
        duplicates = self.duplicates
        if duplicates is not None and len(claims) < len(lines):  # some record is not a claimed event
            for seq, line in zip(seqs, lines, strict=True):
                if line[0] == DUPLICATE_TAG:
                    duplicates.appended(seq, line)
        self._schedule_flush()

    def _note_duplicate(self, seq: int, line: bytes) -> None:
        if self.duplicates is not None and line[0] == DUPLICATE_TAG:
            self.duplicates.appended(seq, line)

    def _journal(self, claims: Sequence[tuple[int, int]]) -> None:
        journal = self.journal
        if journal is not None:
            journal.append(self._wall_clock(), claims)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _submit_each(
        self, lines: list[bytes], on_durable: Sequence[tuple[int, OnDurable]], claims: Sequence[tuple[int, int]]
    ) -> None:
        callbacks = dict(on_durable)
        keys = dict(claims)
        for index, line in enumerate(lines):
            self.submit(line, callbacks.get(index), keys.get(index))

    @property
    def reading_paused(self) -> bool:
        """Whether readers must stop. The spool's own size is looked at too, not only the pressure state (which
        changes when a commit completes): readers stop right after the read that crossed the pause watermark, not
        a group commit's worth of reads later."""
        return (
            bool(self._held)
            or self.pressure.state is Pressure.PAUSED
            or self.spool.size_bytes >= self.pressure.watermarks.hard_bytes
            or self._flush_error is not None
            or self.disk.any
            or self.fatal is not None
        )

    @property
    def processing_room_bytes(self) -> int:
        """What the processing stage may still append: the spool's room under ``spool_max_bytes`` less a reserve of
        an eighth of the gap between the pause watermark and the maximum, and at least two segments if half the
        gap allows (for what readers already had in flight when reading paused, and for finishing the oldest
        segment, whose processing and delivery is what frees space).

        Reading stops at the pause watermark, but the stage turns raw records into processed ones, which the spool
        holds too until every consumer is past their segment: without a bound it filled the spool to its maximum
        while reading was paused, and its appends were then held in memory. It is not stopped at the pause
        watermark itself: a segment is freed only once the stage has processed its raw records and the sinks have
        passed them, so the stage must be able to work while the spool is over it."""
        settings = self.spool.settings
        gap = settings.max_bytes - self.pressure.watermarks.hard_bytes
        reserve = max(gap // 8, min(2 * settings.segment_bytes, gap // 2))
        return settings.max_bytes - reserve - self.spool.size_bytes

    @property
    def processing_blocked(self) -> bool:
        """The processing stage must not append now (no :attr:`processing_room_bytes` left)."""
        return self.processing_room_bytes <= 0

    @property
    def back_pressure_applied(self) -> bool:
        return self.pressure.state is not Pressure.NORMAL

    def park(self, key: int, resume: Callable[[], None]) -> None:
        """Remember a paused reader; ``resume`` is called once reading may go on."""
        if key not in self._parked:
            self.pauses += 1
        self._parked[key] = resume

    def forget(self, key: int) -> None:
        self._parked.pop(key, None)

    # ------------------------------------------------------------------------------------------ internals

    def _hold(
        self, line: bytes, on_durable: OnDurable | None, key: int | None, exc: SpoolFullError | SpoolIOError
    ) -> None:
        if isinstance(exc, SpoolFullError):
            if not self._held:
                log.error(
                    "spool_full", error=str(exc), detail="reading paused; events held in memory until space frees"
                )
            self.held_total += 1
        self._held.append((line, on_durable, key))

    def _flush(self) -> None:
        self._flush_scheduled = False
        spool = self.spool
        journal = self.journal
        if self.fatal is None:
            # Events held because the disk refused a segment roll go in first (a full spool is retried at acks).
            written = not (self._held and self._flush_error is not None) or self._take_back_held()
            if written and (spool.buffered_bytes or (journal is not None and journal.buffered)):
                try:
                    spool.flush()
                    if journal is not None:
                        journal.flush()
                except (SpoolIOError, JournalError) as exc:
                    self._flush_failed(exc)
                    return
            if written and self._flush_error is not None:
                self._flush_recovered()
        if spool.commit_delay is None:
            # fsync "never": handed to the kernel is as durable as it gets (the journal too, so no floor).
            self._durable()
        elif spool.sync_pending or (journal is not None and journal.sync_pending):
            if self._pending_since is None:
                self._pending_since = asyncio.get_running_loop().time()
            self._commit_wakeup.set()
        self._update_pressure()

    def _flush_failed(self, exc: SpoolIOError | JournalError) -> None:
        """The buffer stays in memory (nothing is lost); readers stop until a flush succeeds again, which is tried
        after a backoff (``disk_full_retry_*``)."""
        if not exc.retriable:
            self._fail(exc)
            return
        if exc.disk_full:
            self.disk.full(Writer.dedup_journal if isinstance(exc, JournalError) else Writer.spool, exc)
        elif self._flush_error is None:
            log.error("spool_flush_failed", error=str(exc), detail="reading paused; retrying")
        self._flush_error = exc
        delay = self.disk.retry.delay(self._flush_attempts)
        self._flush_attempts += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(delay, self._flush)
        self._update_pressure()

    def _flush_recovered(self) -> None:
        error, self._flush_error = self._flush_error, None
        self._flush_attempts = 0
        if error is not None and not error.disk_full:
            log.info("spool_flush_recovered")
        self.disk.freed(Writer.spool)
        self.disk.freed(Writer.dedup_journal)

    def _sinks_changed(self) -> None:
        """A sink failed or recovered: a sink whose disk is full pauses reading like the spool's own writes."""
        disk = self.disk
        for worker in self.workers:
            writer = sink_writer(worker.name)
            error = worker.last_error
            if error is not None and error.disk_full:
                if not disk.state.is_full(writer):
                    disk.full(writer, error)
            else:
                disk.freed(writer)

    def _fail(self, exc: BaseException) -> None:
        if self.fatal is None:
            self.fatal = exc
            log.critical("spool_failed", error=str(exc), detail="stopping; the spool is recovered at the next start")
            self._on_fatal(exc)

    def supervise(self, task: asyncio.Task[None], name: str) -> None:
        """A consumer task (a sink worker, the processing stage) that dies of an unexpected exception stops the
        daemon with exit 1 — its events wait in the spool for the next start — rather than leaving them
        undelivered in silence while ONTAP keeps sending."""

        def finished(done: asyncio.Task[None]) -> None:
            if done.cancelled() or done.exception() is None or self.fatal is not None:
                return
            exc = done.exception()
            assert exc is not None
            self.fatal = exc
            log.critical("task_failed", task=name, error=repr(exc), detail="stopping; its events stay in the spool")
            self._on_fatal(exc)

        task.add_done_callback(finished)

    async def _commit_now(self, pending_since: float | None = None) -> None:
        """fsync the spool, release what waited for it (a synchronous engine's replies, the sinks), then fsync the
        dedup journal. The journal's fsync is kept off that path on purpose: a claim matters only after a crash, and
        until it is durable the spool keeps its record (``retain_above``), from which the claim is rebuilt."""
        loop = asyncio.get_running_loop()
        journal = self.journal
        synced = False
        if self.spool.sync_pending and self.fatal is None:
            started = time.monotonic()
            try:
                await loop.run_in_executor(self._executor, self.spool.sync)
            except SpoolIOError as exc:
                self._fail(exc)
                return
            self.fsync_seconds.observe(time.monotonic() - started)
            synced = True
        self._durable()
        if synced and pending_since is not None:  # a commit of the journal alone made no event durable
            self.commit_latency_seconds.observe(loop.time() - pending_since)
        if journal is not None and journal.sync_pending and self.fatal is None:
            try:
                await loop.run_in_executor(self._executor, journal.sync)
            except JournalError as exc:
                self._fail(exc)
                return
        if journal is not None:
            self.spool.retain_above(journal.durable_seq)

    async def _commit_loop(self) -> None:
        """Group commit: the fsync starts ``commit_delay`` after data became pending, counted from then — data
        that arrived while the previous fsyncs ran has already waited that long, so a busy spool commits every
        ``commit_delay``, not every ``commit_delay`` plus the time the fsyncs took."""
        loop = asyncio.get_running_loop()
        while True:
            await self._commit_wakeup.wait()
            self._commit_wakeup.clear()
            delay = self.spool.commit_delay
            if delay:
                since = self._pending_since
                wait = delay if since is None else since + delay - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            since, self._pending_since = self._pending_since, None  # what is flushed from now waits for the next
            await self._commit_now(since)

    async def _checkpoint_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            delay = self._checkpoint_interval_s
            if self._checkpoint_error is not None:
                delay = min(delay, self.disk.retry.delay(self._checkpoint_attempts))
            await asyncio.sleep(delay)
            if self.spool.cursors_dirty:
                try:
                    await loop.run_in_executor(self._executor, self.spool.checkpoint)
                except SpoolIOError as exc:
                    self._checkpoint_failed(exc)
                    continue
                if self._checkpoint_error is not None:
                    self._checkpoint_error = None
                    self._checkpoint_attempts = 0
                    log.info("spool_checkpoint_recovered")
                self.disk.freed(Writer.spool_cursors)

    def _checkpoint_failed(self, exc: SpoolIOError) -> None:
        """The cursors file keeps its previous content (temp file, then rename): at worst what was acked since is
        delivered again after a restart. Tried again after a backoff; a full disk pauses reading meanwhile."""
        if exc.disk_full:
            self.disk.full(Writer.spool_cursors, exc)
        elif self._checkpoint_error is None:
            log.error("spool_checkpoint_failed", error=str(exc), detail="retrying; the previous cursors are kept")
        self._checkpoint_error = exc
        self._checkpoint_attempts += 1

    def _durable(self) -> None:
        durable = self.spool.durable_seq
        if self.duplicates is not None:
            self.duplicates.durable(durable)
        self.spool.collect()  # segments every sink acked can go once a later record is durable
        waiters = self._waiters
        while waiters and waiters[0][0] <= durable:
            waiters.popleft()[1]()
        for worker in self.workers:
            worker.wake()
        if self._processing is not None:
            self._processing.wake()

    def after_ack(self) -> None:
        """A consumer acknowledged records: space may have freed (held events, back-pressure)."""
        self._after_ack()

    def _after_ack(self) -> None:
        if self._held and self.fatal is None:
            self._take_back_held()
        self._update_pressure()
        if self._processing is not None and not self.processing_blocked:
            self._processing.wake()

    def _take_back_held(self) -> bool:
        """Append the held events (oldest first) while they fit; False if the disk refused (a retry is
        scheduled), True otherwise (all in, or the spool is still full: tried again at the next ack)."""
        while self._held:
            line, on_durable, key = self._held[0]
            try:
                seq = self.spool.append(line)
            except SpoolFullError:
                return True
            except SpoolIOError as exc:
                self._flush_failed(exc)
                return False
            self._held.popleft()
            if on_durable is not None:
                self._waiters.append((seq, on_durable))
            if key is not None:
                self._journal(((seq, key),))
            self._note_duplicate(seq, line)
        log.info("spool_space_recovered", held_total=self.held_total)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return True

    def _update_pressure(self) -> None:
        for action in self.pressure.update(self.spool.size_bytes):
            log.warning("back_pressure", action=action.value, spool_bytes=self.spool.size_bytes)
            if action is Action.APPLY:
                self._broadcast_back_pressure(True)
            elif action is Action.REMOVE:
                self._broadcast_back_pressure(False)
        if self._parked and not self.reading_paused:
            waiting = list(self._parked.values())
            self._parked.clear()
            for resume in waiting:
                resume()
