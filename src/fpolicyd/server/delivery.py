"""Delivery in a process of its own: the daemon's second core runs the sinks.

The daemon keeps everything that decides what is stored and when it is safe: the listener, the ingest step, the
spool (appends, group commit, recovery, retention, cursors), back-pressure, the processing stage, /metrics. The
delivery process (``server/delivery_child.py``) runs one sink worker per sink exactly as the daemon would, but
reads the spool's segment files itself (:class:`~fpolicyd.storage.spool.SpoolTail`), only up to the durable seq
the daemon announces. The two talk over a socketpair (``server/channel.py``):

====================  ======================  ==========================================================
message               direction               meaning
====================  ======================  ==========================================================
``hello``             daemon → delivery       settings, sinks, where each sink resumes, the durable seq
``ready``             delivery → daemon       every sink started (an unreachable one is retried later), figures
``start_failed``      delivery → daemon       a sink cannot exist (missing queue/bus): the start fails
``durable``           daemon → delivery       records up to ``seq`` are durable: deliver them
``ack``               delivery → daemon       ``sink`` delivered everything up to ``seq`` (cumulative)
``acked``             delivery → daemon       a shared ``sink`` delivered the seq ``ranges`` (in any order)
``stats``             delivery → daemon       every sink's figures (metrics, readiness), periodically
``fatal``             delivery → daemon       a sink worker died of an unexpected error: the daemon stops
``stop``              daemon → delivery       deliver what is durable within ``timeout_s``, then exit
``stopped``           delivery → daemon       done; final figures
====================  ======================  ==========================================================

Guarantees are the in-process ones: an ack names only records that were durable and delivered, the daemon records
it in the spool (:meth:`~fpolicyd.storage.spool.Spool.ack_delivered`) and persists it at checkpoints, so after
any crash of either process what was not acked is delivered again (at least once). If the delivery process dies
unexpectedly the daemon stops with exit 1 (its events stay in the spool), as it does when an in-process sink
worker dies. The delivery process ignores SIGTERM/SIGINT (a stop signal to the whole process group must not cut
delivery short: the daemon drains it within its budget) and exits as soon as the daemon's end of the channel
closes — also when the daemon was killed.

With ``delivery_processes = N`` > 1 there are N delivery processes (:class:`DeliveryGroup`), each told its index
in ``hello``. A sink that keeps no order (``max_in_flight`` > 1: SQS standard queues, EventBridge) runs in all of
them, each taking the blocks of records its :class:`~fpolicyd.storage.shard.Shard` owns and acking them as seq
ranges (``acked``); the daemon folds the ranges of all of them into the sink's one cumulative position
(:meth:`~fpolicyd.storage.spool.Spool.ack_delivered_range`), which is what it persists — so a crash delivers
again what some process had not acked, exactly as with one. Ordered sinks run in the first process only. The
sink's figures are the sum over the processes; any process that dies stops the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from fpolicyd.config import Settings
from fpolicyd.errors import SinkError
from fpolicyd.obs.log import get_logger
from fpolicyd.obs.metrics import DeadLetterFigures, SinkFigures
from fpolicyd.server.channel import Channel, Message, open_channel
from fpolicyd.sinks.runner import WorkerStats
from fpolicyd.storage.spool import Spool

log = get_logger("fpolicyd.delivery")

__all__ = ["DeliveryGroup", "DeliverySpec", "ProcessDelivery", "RemoteWorker", "use_delivery_process"]

#: The delivery process's module (run as ``python -m``).
CHILD_MODULE: Final = "fpolicyd.server.delivery_child"
#: Of the drain budget, what is kept for the delivery process's goodbye and exit after its sinks' share.
STOP_MARGIN_S: Final = 1.0
#: How long a delivery process that failed its start may take to exit before it is killed.
EXIT_WAIT_S: Final = 5.0
#: The least time a delivery process that said goodbye gets to exit (it is already on its way out).
EXIT_MIN_WAIT_S: Final = 0.2


def use_delivery_process(mode: str, cpus: int | None = None) -> bool:
    """``on``/``off`` as said; ``auto``: a process of its own when this process may run on two or more CPUs."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
    return cpus >= 2


@dataclass(frozen=True, slots=True)
class DeliverySpec:
    """What the delivery process must build: the settings, the sinks (URIs in order, and the names their spool
    cursors have) and whether the processing stage addresses records."""

    settings: Settings
    names: tuple[str, ...]
    uris: tuple[str, ...]
    processing: bool
    start_timeout_s: float = 60.0

    @property
    def processes(self) -> int:
        """How many delivery processes (``delivery_processes``)."""
        return self.settings.delivery_processes


class RemoteWorker:
    """A sink worker of the delivery processes, as the daemon sees it: lag from its own spool, the rest from the
    latest figures of every delivery process that runs it (added up when there are several)."""

    def __init__(self, name: str, spool: Spool, wake: Callable[[], None]) -> None:
        self.name = name
        self._spool = spool
        self._wake = wake
        #: The latest figures, by delivery process index.
        self._parts: dict[int, SinkFigures] = {}
        self._figures = SinkFigures(name=name)

    @property
    def lag(self) -> int:
        return self._spool.records_pending(self.name)

    @property
    def last_error(self) -> SinkError | None:
        f = self._figures
        if f.last_error is None:
            return None
        return SinkError(f.last_error, retriable=f.last_error_retriable, disk_full=f.last_error_disk_full)

    @property
    def stats(self) -> WorkerStats:
        f = self._figures
        return WorkerStats(delivered=f.delivered, sends=f.sends, failures=f.failures)

    def figures(self) -> SinkFigures:
        return self._figures

    def update(self, figures: SinkFigures, process: int = 0) -> None:
        """The latest figures of the sink's part in delivery process ``process``."""
        self._parts[process] = figures
        parts = list(self._parts.values())
        self._figures = parts[0] if len(parts) == 1 else SinkFigures.total(self.name, parts)

    def wake(self) -> None:
        self._wake()


class ProcessDelivery:
    """The daemon's side of one delivery process: start it, feed it durable seqs, record its acks, stop it."""

    def __init__(
        self,
        spool: Spool,
        spec: DeliverySpec,
        *,
        on_ack: Callable[[], None],
        on_fatal: Callable[[BaseException], None],
        on_figures: Callable[[], None] | None = None,
        index: int = 0,
        workers: Sequence[RemoteWorker] | None = None,
    ) -> None:
        """``on_figures``: called after the delivery process's figures arrived (the pipeline reads the sinks'
        errors there: a full disk pauses reading). ``index``: this process's place among ``spec.processes``;
        ``workers``: the sinks' daemon-side views, shared by the processes of a :class:`DeliveryGroup` (default:
        its own)."""
        self._on_figures = on_figures
        self._settings = spec.settings
        self._spool = spool
        self._spec = spec
        self._on_ack = on_ack
        self._on_fatal = on_fatal
        self._start_timeout_s = spec.start_timeout_s
        self.index = index
        #: The sinks this process runs, as it said when it was ready (a shared sink runs in every process of a
        #: group, an ordered one in the first only).
        self.sinks: tuple[str, ...] = ()
        self.workers = list(workers) if workers is not None else [RemoteWorker(n, spool, self.wake) for n in spec.names]
        self._by_name = {worker.name: worker for worker in self.workers}
        self._channel: Channel | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._ready: asyncio.Future[None] | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._stopping = False
        self._sent_durable = -1
        self._wake_scheduled = False
        #: The delivery process's dead-letter counts, as of its latest figures.
        self._dead_letter = DeadLetterFigures()

    def dead_letter_figures(self) -> DeadLetterFigures:
        return self._dead_letter

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        """Start the delivery process and wait until every sink started. Raises SinkError (non-retriable when a
        sink cannot exist, as an in-process start does)."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._stopped = loop.create_future()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                CHILD_MODULE,
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self._channel = await open_channel(ours, self._on_message, self._on_closed)
        spool = self._spool
        positions: dict[str, Any] = {}
        for worker in self.workers:
            position = spool.position(worker.name)
            positions[worker.name] = {
                "acked": spool.acked_seq(worker.name),
                "segment": position.segment_first_seq,
                "offset": position.offset,
                "next": position.next_seq,
            }
        self._channel.send(
            {
                "t": "hello",
                "settings": self._settings.model_dump(mode="json"),
                "spool_dir": str(spool.settings.directory),
                "uris": list(self._spec.uris),
                "processing": self._spec.processing,
                "positions": positions,
                "durable": spool.durable_seq,
                "shard": {"index": self.index, "count": self._spec.processes},
            }
        )
        self._sent_durable = spool.durable_seq
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), self._start_timeout_s)
        except TimeoutError:
            await self._kill()
            raise SinkError(
                f"the delivery process did not start within {self._start_timeout_s:g} s", retriable=False
            ) from None
        except SinkError:
            await self._reap(EXIT_WAIT_S)
            raise
        log.info(
            "delivery_process_started",
            pid=self.pid,
            index=self.index,
            processes=self._spec.processes,
            sinks=list(self.sinks),
        )

    def wake(self) -> None:
        """New durable records exist: tell the delivery process (once per loop iteration)."""
        if not self._wake_scheduled and self._channel is not None:
            self._wake_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_durable)

    def _send_durable(self) -> None:
        self._wake_scheduled = False
        durable = self._spool.durable_seq
        if durable > self._sent_durable and self._channel is not None:
            self._sent_durable = durable
            self._channel.send({"t": "durable", "seq": durable})

    async def stop(self, timeout_s: float) -> None:
        """Let the delivery process deliver what is durable, record its last acks and reap it — all within
        ``timeout_s`` (the drain budget, which must fit Fargate's stopTimeout / systemd's TimeoutStopSec): the
        delivery process gets the budget less :data:`STOP_MARGIN_S` for its sinks, the margin is for its goodbye
        and its exit; if it does not make it, it is killed (its unacked events stay in the spool)."""
        self._stopping = True
        channel, stopped = self._channel, self._stopped
        if channel is None or stopped is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if channel.is_open:
            self._send_durable()
            channel.send({"t": "stop", "timeout_s": max(0.0, timeout_s - STOP_MARGIN_S)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(stopped), max(0.0, deadline - loop.time()))
            if not stopped.done():
                log.error("delivery_process_stop_timeout", pid=self.pid, detail="killed; its unacked events are kept")
        channel.close()
        await self._reap(max(EXIT_MIN_WAIT_S, deadline - loop.time()))

    async def _reap(self, within_s: float) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            await asyncio.wait_for(proc.wait(), within_s)
        except TimeoutError:
            await self._kill()

    async def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    # ------------------------------------------------------------------------------------------ messages

    def _on_message(self, message: Message) -> None:
        kind = message.get("t")
        if kind == "ack":
            self._spool.ack_delivered(str(message["sink"]), int(message["seq"]))
            self._on_ack()
        elif kind == "acked":
            sink = str(message["sink"])
            for first, last in message["ranges"]:
                self._spool.ack_delivered_range(sink, int(first), int(last))
            self._on_ack()
        elif kind == "stats":
            self._figures(message)
        elif kind == "ready":
            self.sinks = tuple(str(data.get("name")) for data in message.get("sinks") or ())
            self._figures(message)
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
        elif kind == "start_failed":
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(SinkError(str(message.get("error")), retriable=False))
        elif kind == "stopped":
            self._figures(message)
            if self._stopped is not None and not self._stopped.done():
                self._stopped.set_result(None)
        elif kind == "fatal":
            error = str(message.get("error"))
            log.critical("delivery_process_failed", pid=self.pid, error=error)
            self._on_fatal(SinkError(f"delivery process: {error}", retriable=False))
        else:
            log.error("delivery_message_unknown", kind=kind)

    def _figures(self, message: Message) -> None:
        dead_letter = message.get("dead_letter")
        if dead_letter is not None:
            try:
                self._dead_letter = DeadLetterFigures.from_dict(dead_letter)
            except ValueError as exc:
                log.error("delivery_figures_unreadable", error=str(exc))
        for data in message.get("sinks") or ():
            try:
                figures = SinkFigures.from_dict(data)
            except ValueError as exc:
                log.error("delivery_figures_unreadable", error=str(exc))
                continue
            worker = self._by_name.get(figures.name)
            if worker is not None:
                worker.update(figures, self.index)
        if self._on_figures is not None:
            self._on_figures()

    def _on_closed(self, exc: Exception | None) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(
                SinkError(f"the delivery process exited during its start: {exc}", retriable=False)
            )
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)
        if not self._stopping:
            log.critical("delivery_process_exited", pid=self.pid, error=str(exc) if exc else None)
            self._on_fatal(SinkError("the delivery process exited unexpectedly", retriable=False))


class DeliveryGroup:
    """``spec.processes`` delivery processes as one: what the spooler starts, wakes and stops (with one process,
    exactly :class:`ProcessDelivery`). The sinks' daemon-side views are shared; dead-letter counts are added up."""

    def __init__(
        self,
        spool: Spool,
        spec: DeliverySpec,
        *,
        on_ack: Callable[[], None],
        on_fatal: Callable[[BaseException], None],
        on_figures: Callable[[], None] | None = None,
    ) -> None:
        self.workers = [RemoteWorker(name, spool, self.wake) for name in spec.names]
        self.processes = [
            ProcessDelivery(
                spool,
                spec,
                on_ack=on_ack,
                on_fatal=on_fatal,
                on_figures=on_figures,
                index=index,
                workers=self.workers,
            )
            for index in range(spec.processes)
        ]

    @property
    def pids(self) -> list[int | None]:
        return [process.pid for process in self.processes]

    def dead_letter_figures(self) -> DeadLetterFigures:
        return DeadLetterFigures.total(process.dead_letter_figures() for process in self.processes)

    async def start(self) -> None:
        """Start every process and wait until each has started its sinks; if one cannot, the others are stopped
        and its error is raised (the first one's, in index order)."""
        outcomes = await asyncio.gather(*(process.start() for process in self.processes), return_exceptions=True)
        errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if errors:
            await asyncio.gather(
                *(
                    process.stop(0.0)
                    for process, outcome in zip(self.processes, outcomes, strict=True)
                    if outcome is None
                ),
                return_exceptions=True,
            )
            raise errors[0]

    def wake(self) -> None:
        for process in self.processes:
            process.wake()

    async def stop(self, timeout_s: float) -> None:
        """Every process delivers what is durable within ``timeout_s`` (the same budget, in parallel)."""
        await asyncio.gather(*(process.stop(timeout_s) for process in self.processes))
