"""The run: :func:`run_replay_test` starts the daemon (unless given one), drives the nodes through live, outage
and replay, restarts the daemon half-way through the replay if asked, shows progress, samples the timeline,
waits for the sink to settle, reads it afresh and builds the report (``report["lost"] == 0`` is success)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import IO, Any, Final

from fpolicyd.protocol.session_config import EngineMode
from fpolicyd.replaytest.config import ReplayTestConfig, ReplayTestError, RestartMode
from fpolicyd.replaytest.daemons import DaemonGroup, InProcessDaemon, SubprocessDaemon
from fpolicyd.replaytest.node import Node, Shared, SourceState, source_address
from fpolicyd.replaytest.plot import MAX_TIMELINE_POINTS, Phase, TimelinePoint, downsample, timeline_json
from fpolicyd.replaytest.tails import (
    QUEUE_RECEIVERS,
    QUEUE_WAIT_S,
    SINK_POLL_S,
    QueueTail,
    SinkTail,
    final_drain,
    percentiles,
)

__all__ = ["TIMELINE_INTERVAL_S", "TIMELINE_MIN_INTERVAL_S", "progress_line", "run_replay_test"]

#: Kill mode: how long the frozen daemon waits for the nodes to write more before the SIGKILL, at most (nodes with
#: a full sync window or no work left write nothing more).
_FREEZE_S: Final = 2.0


def _all_delivered(expected: set[int], delivered: set[int]) -> bool:
    return len(delivered) >= len(expected) and expected <= delivered


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


#: Width of the progress bars, characters.
_BAR: Final = 20


def _bar(done: int, total: int) -> str:
    """``[#####-----]  50%`` (a total of 0 is complete)."""
    share = min(1.0, done / total) if total > 0 else 1.0
    filled = round(share * _BAR)
    return f"[{'#' * filled}{'-' * (_BAR - filled)}] {share * 100:3.0f}%"


def progress_line(*, elapsed_s: float, phase: str, events: int, counts: tuple[int, int, int], rate: float) -> str:
    """One progress line: phase, the backlog replayed and the notifications delivered as bars, the sink's rate.
    ``counts``: (backlog sent, backlog planned, delivered)."""
    backlog_sent, backlog_planned, delivered = counts
    return (
        f"replay-test {elapsed_s:6.1f}s  {phase:<7} "
        f"backlog {_bar(backlog_sent, backlog_planned)} {backlog_sent:,}/{backlog_planned:,}  "
        f"delivered {_bar(delivered, events)} {delivered:,}/{events:,}  sink {rate:,.0f} ev/s\n"
    )


async def _progress(shared: Shared, sink: SinkTail, cfg: ReplayTestConfig, out: IO[str], started: float) -> None:
    last_lines, last_at = 0, started
    while True:
        await asyncio.sleep(cfg.progress_s)
        now = time.monotonic()
        rate = (sink.lines - last_lines) / max(now - last_at, 1e-9)
        last_lines, last_at = sink.lines, now
        counts = (shared.backlog_sent, shared.backlog_planned, len(sink.delivered))
        line = progress_line(elapsed_s=now - started, phase=shared.phase, events=cfg.events, counts=counts, rate=rate)
        out.write(line)
        out.flush()


#: The timeline's default sampling period, and the finest: early in a run the period is elapsed / 20 within these
#: bounds, so that a run of a few seconds still has ~20 points.
TIMELINE_INTERVAL_S: Final = 1.0
TIMELINE_MIN_INTERVAL_S: Final = 0.02
#: Points the timeline aims at over the first TIMELINE_INTERVAL_S × this many seconds (the auto period).
_TIMELINE_EARLY_POINTS: Final = 20
_PHASES: Final = {"live": Phase.LIVE, "outage": Phase.OUTAGE, "replay": Phase.REPLAY, "verify": Phase.SETTLE}


class _Timeline:
    """One :class:`~fpolicyd.replaytest.plot.TimelinePoint` per sampling interval: what was sent and first arrived at
    the sink since the last sample, and the latency percentiles of the arrivals since then; at most
    MAX_TIMELINE_POINTS (past it, adjacent points are merged and the period doubles)."""

    def __init__(self, interval_s: float | None) -> None:
        self.fixed_s = interval_s
        self.scale = 1
        self.points: list[TimelinePoint] = []
        #: Seconds since the start of the run: when the timeline began (the daemon is up, the nodes start), and
        #: the end of the last point.
        self.origin_s = 0.0
        self._at_s = 0.0
        self._sent = 0
        self._delivered = 0
        self._latencies = 0

    def begin(self, elapsed_s: float) -> None:
        """The first interval starts now (``elapsed_s`` since the start of the run)."""
        self.origin_s = self._at_s = elapsed_s

    def interval_s(self, elapsed_s: float) -> float:
        if self.fixed_s is not None:
            base = self.fixed_s
        else:
            early = (elapsed_s - self.origin_s) / _TIMELINE_EARLY_POINTS
            base = min(TIMELINE_INTERVAL_S, max(TIMELINE_MIN_INTERVAL_S, early))
        return base * self.scale

    def sample(self, elapsed_s: float, phase: str, sent: int, delivered: int, latencies_us: array[int]) -> None:
        fresh = latencies_us[self._latencies :]
        self._latencies = len(latencies_us)
        figures = percentiles(fresh)
        self.points.append(
            TimelinePoint(
                start_s=self._at_s,
                end_s=max(elapsed_s, self._at_s),
                phase=_PHASES.get(phase, Phase.SETTLE),
                sent=sent - self._sent,
                delivered=delivered - self._delivered,
                latency_count=len(fresh),
                p50_ms=float(figures.get("p50_ms", 0.0)),
                p99_ms=float(figures.get("p99_ms", 0.0)),
                max_ms=float(figures.get("max_ms", 0.0)),
            )
        )
        self._at_s = max(elapsed_s, self._at_s)
        self._sent, self._delivered = sent, delivered
        if len(self.points) > MAX_TIMELINE_POINTS:
            self.points = downsample(self.points, MAX_TIMELINE_POINTS)
            self.scale *= 2

    def sample_now(self, shared: Shared, sink: SinkTail, started: float, phase: str | None = None) -> None:
        self.sample(
            time.monotonic() - started,
            phase or shared.phase,
            shared.sent_frames,
            len(sink.delivered),
            sink.sink_latency_us,
        )


async def _sample_timeline(timeline: _Timeline, shared: Shared, sink: SinkTail, started: float) -> None:
    timeline.begin(time.monotonic() - started)
    while True:
        await asyncio.sleep(timeline.interval_s(time.monotonic() - started))
        timeline.sample_now(shared, sink, started)


async def _tail(
    sink: SinkTail, shared: Shared, stop: asyncio.Event, poll_s: Callable[[], float] = lambda: SINK_POLL_S
) -> None:
    """Poll the sink on a thread (the GIL is shared, but the event loop keeps its turns) every ``poll_s()``
    seconds until ``stop``."""
    while not stop.is_set():
        await asyncio.to_thread(sink.poll)
        if shared.phase == "verify" and _all_delivered(shared.expected, sink.delivered):
            shared.all_delivered.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), poll_s())


async def _drain_queue(queue: QueueTail, shared: Shared, stop: asyncio.Event) -> None:
    """Receive and delete while the storm runs (so the queue never piles up), until ``stop``."""

    async def receiver() -> None:
        while not stop.is_set():
            await queue.receive(QUEUE_WAIT_S)
            if shared.phase == "verify" and _all_delivered(shared.expected, queue.delivered):
                shared.all_delivered.set()

    await asyncio.gather(*(receiver() for _ in range(QUEUE_RECEIVERS)))


async def _restart_when_half_replayed(
    shared: Shared, daemon: InProcessDaemon | SubprocessDaemon, mode: RestartMode, log: IO[str]
) -> None:
    await shared.half_replayed.wait()
    shared.restart_begun = True
    if mode is RestartMode.KILL:
        assert isinstance(daemon, SubprocessDaemon)
        log.write("replay-test: killing the daemon mid-replay (SIGSTOP, then SIGKILL) and starting it again\n")
        # Frozen when half the backlog was written (by the node that wrote it) and killed once the nodes wrote
        # more (unread and unanswered for sure): the kill lands with requests in flight at any size and machine
        # speed — some in the spool and not answered yet, some unread in its socket buffers.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(shared.wrote.wait(), _FREEZE_S)
        await daemon.kill()
    else:
        log.write("replay-test: stopping the daemon mid-replay (graceful) and starting it again\n")
        await daemon.stop()
    shared.daemon_epoch += 1
    await daemon.start()
    shared.gate.set()


async def run_replay_test(
    cfg: ReplayTestConfig,
    *,
    progress: IO[str] | None = None,
    before_verify: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Run the storm and return the report (``report["lost"] == 0`` is success).

    ``before_verify`` is called with the sink directory once the run is over and before the final read of the
    sink: a seam to check the checker (delete a line, see the loss reported)."""
    log = progress if progress is not None else sys.stderr
    started = time.monotonic()
    temp: Path | None = None
    daemon: InProcessDaemon | SubprocessDaemon | DaemonGroup | None = None
    sink_dir: Path | None = cfg.sink_dir
    more_sink_dirs: list[Path] = []
    addresses: list[Callable[[], tuple[str, int]]] = []
    if cfg.target is None:
        data_dir = cfg.data_dir
        if data_dir is None:
            data_dir = temp = Path(tempfile.mkdtemp(prefix="fpolicyd-replay-test-"))
        overrides: dict[str, Any] = {}
        if cfg.sync:
            overrides["engine_mode"] = EngineMode.SYNC.value
        if cfg.sink is not None:
            overrides["sinks"] = cfg.sink
        overrides.update(cfg.daemon_settings)
        try:
            if cfg.instances > 1:
                dirs = [data_dir / f"instance-{i}" for i in range(cfg.instances)]
                group: DaemonGroup
                if cfg.in_subprocess:
                    group = DaemonGroup([SubprocessDaemon(d, overrides) for d in dirs])
                else:
                    members = [InProcessDaemon(d, overrides) for d in dirs]
                    group = DaemonGroup(members)
                    cfg = replace(cfg, clock_tolerance_s=members[0].settings.replay_clock_tolerance_s)
                daemon = group
                sink_dir, *more_sink_dirs = [m.sink_dir for m in group.members]
                addresses = [m.address for m in group.members]
            elif cfg.in_subprocess:
                daemon = SubprocessDaemon(data_dir, overrides)
            else:
                daemon = InProcessDaemon(data_dir, overrides)
                cfg = replace(cfg, clock_tolerance_s=daemon.settings.replay_clock_tolerance_s)
        except BaseException:
            if temp is not None:
                shutil.rmtree(temp, ignore_errors=True)
            raise
        if not isinstance(daemon, DaemonGroup):
            if cfg.sink is None:
                sink_dir = sink_dir or daemon.sink_dir
            addresses = [daemon.address]
    else:
        target = cfg.target

        def address() -> tuple[str, int]:
            return target

        addresses = [address]

    cleanup = contextlib.AsyncExitStack()
    if temp is not None:
        cleanup.callback(shutil.rmtree, temp, ignore_errors=True)
    async with cleanup:
        sink: SinkTail
        if cfg.queue_url is not None:
            from fpolicyd.sinks.aws.clients import AwsClients  # noqa: PLC0415 - only queue verification needs botocore

            clients = await cleanup.enter_async_context(AwsClients())
            queue = QueueTail(clients, cfg.queue_url, envelope=bool(cfg.sink and cfg.sink.startswith("eventbridge:")))
            await queue.check()
            sink = queue
        else:
            assert sink_dir is not None
            sink = SinkTail(sink_dir, live=True, more=more_sink_dirs)
        return await _run(cfg, sink, daemon, addresses, log=log, started=started, before_verify=before_verify)


async def _run(
    cfg: ReplayTestConfig,
    sink: SinkTail,
    daemon: InProcessDaemon | SubprocessDaemon | DaemonGroup | None,
    addresses: list[Callable[[], tuple[str, int]]],
    *,
    log: IO[str],
    started: float,
    before_verify: Callable[[Path], None] | None,
) -> dict[str, Any]:
    shared = Shared(reconnects_by_instance=[0] * len(addresses))
    shared.gate.set()
    shared.restart_at_half = cfg.restart_daemon and daemon is not None and not cfg.kill
    if cfg.kill and isinstance(daemon, SubprocessDaemon):
        shared.freeze_at_half = daemon.freeze
    # The daemon keys replay state by node address: one mirror per (node key, daemon instance).
    sources: dict[tuple[str | None, int], SourceState] = {}
    nodes: list[Node] = []
    host = addresses[0]()[0] if daemon is None else "127.0.0.1"
    for node, count in enumerate(_split(cfg.events, cfg.nodes)):
        key = source_address(host, node)
        node_sources = [sources.setdefault((key, i), SourceState()) for i in range(len(addresses))]
        nodes.append(Node(cfg=cfg, node=node, count=count, shared=shared, addresses=addresses, sources=node_sources))
    shared.backlog_planned = sum(n.outage for n in nodes)
    stop_tail = asyncio.Event()
    timeline = _Timeline(cfg.timeline_interval_s) if cfg.timeline else None
    if isinstance(sink, QueueTail):
        tail = asyncio.create_task(_drain_queue(sink, shared, stop_tail))
    elif timeline is not None:
        # Arrivals are counted when the tail reads them: it polls at least once per sampling interval, or the
        # arrival rate would show the poll period (bursts every 0.25 s) rather than the sink's.
        def poll_s() -> float:
            return min(SINK_POLL_S, timeline.interval_s(time.monotonic() - started))

        tail = asyncio.create_task(_tail(sink, shared, stop_tail, poll_s))
    else:
        tail = asyncio.create_task(_tail(sink, shared, stop_tail))
    return await _drive_and_verify(
        cfg=cfg,
        shared=shared,
        nodes=nodes,
        sink=sink,
        daemon=daemon,
        tail=tail,
        stop_tail=stop_tail,
        log=log,
        started=started,
        before_verify=before_verify,
        timeline=timeline,
    )


async def _settle(shared: Shared, sink: SinkTail, idle_timeout_s: float) -> None:
    """Wait until the sink holds every generated notification, or it took nothing new for ``idle_timeout_s``."""
    lines, progress_at = sink.lines, time.monotonic()
    while time.monotonic() - progress_at < idle_timeout_s:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(shared.all_delivered.wait(), SINK_POLL_S * 4)
            return
        if sink.lines != lines:
            lines, progress_at = sink.lines, time.monotonic()


async def _drive_and_verify(
    *,
    cfg: ReplayTestConfig,
    shared: Shared,
    nodes: list[Node],
    sink: SinkTail,
    daemon: InProcessDaemon | SubprocessDaemon | DaemonGroup | None,
    tail: asyncio.Task[None],
    stop_tail: asyncio.Event,
    log: IO[str],
    started: float,
    before_verify: Callable[[Path], None] | None,
    timeline: _Timeline | None,
) -> dict[str, Any]:
    helpers: list[asyncio.Task[None]] = []
    try:
        async with asyncio.timeout(cfg.timeout_s):
            if daemon is not None:
                await daemon.start()
            if timeline is not None:
                helpers.append(asyncio.create_task(_sample_timeline(timeline, shared, sink, started)))
            if cfg.progress_s > 0:
                helpers.append(asyncio.create_task(_progress(shared, sink, cfg, log, started)))
            restart: asyncio.Task[None] | None = None
            if cfg.restart_daemon and daemon is not None:
                assert not isinstance(daemon, DaemonGroup)  # refused by the config
                restart = asyncio.create_task(_restart_when_half_replayed(shared, daemon, cfg.restart_mode, log))
            await asyncio.gather(*(n.run() for n in nodes))
            if restart is not None:
                if not shared.restart_begun:  # no backlog to replay: no restart point
                    restart.cancel()
                    log.write("replay-test: no backlog was replayed, so no restart was done\n")
                with contextlib.suppress(asyncio.CancelledError):
                    await restart
            drove_s = time.monotonic() - started
            shared.phase = "verify"
            await _settle(shared, sink, cfg.settle_timeout_s)
            if daemon is not None:
                await daemon.stop()
    except TimeoutError:
        raise ReplayTestError(f"the run did not finish within timeout_s={cfg.timeout_s:g} s") from None
    finally:
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        stop_tail.set()
        await tail  # never cancelled mid-read: the final read below must not race with it
        if daemon is not None:
            await daemon.stop()
    live_sink: SinkTail = sink
    #: Several instances: each one's JSON Lines directory read on its own (the per-instance figures).
    per_instance: list[SinkTail] = []
    if isinstance(sink, QueueTail):
        # A queue is read once: what was received while the storm ran is the verification; drain the rest.
        await final_drain(sink, cfg.settle_timeout_s)
        if timeline is not None:
            timeline.sample_now(shared, sink, started, "verify")
    else:
        assert sink.directory is not None
        if before_verify is not None:
            before_verify(sink.directory)
        # Verification reads the sink afresh (what the tail saw while the storm ran only fed the progress line
        # and the arrival latency): it checks the files as they are now, not as they were.
        if timeline is not None:
            timeline.sample_now(shared, live_sink, started, "verify")
        sink = SinkTail(sink.directory, live_sink.skipped, more=live_sink.directories[1:])
        live_sink.forget_ids()
        while sink.poll():
            pass
        if isinstance(daemon, DaemonGroup):
            for directory in sink.directories:
                own = SinkTail(directory, live_sink.skipped)
                while own.poll():
                    pass
                per_instance.append(own)
    report = _report(
        cfg=cfg,
        shared=shared,
        sink=sink,
        live_sink=live_sink,
        daemon=daemon,
        drove_s=drove_s,
        elapsed_s=time.monotonic() - started,
    )
    if isinstance(daemon, DaemonGroup):
        _add_instances(report, shared, sink, per_instance, daemon)
    if timeline is not None:
        report["timeline"] = timeline_json(timeline.points)
    return report


def _add_instances(
    report: dict[str, Any], shared: Shared, sink: SinkTail, per_instance: list[SinkTail], group: DaemonGroup
) -> None:
    """Several instances: the figures of each (``instances``) beside the totals over the union of their sinks."""
    expected = shared.expected
    members = report["daemon"]["members"]
    instances: list[dict[str, Any]] = []
    for index, (own, member, summary) in enumerate(zip(per_instance, group.members, members, strict=True)):
        host, port = member.address()
        instances.append(
            {
                "instance": index,
                "address": f"{host}:{port}",
                "verified_at": f"jsonl:{own.directory}",
                "delivered": len(expected & own.delivered),
                "sink_lines": own.lines,
                # The daemon's own ReplayStats over its runs (in-process daemons only).
                "replay": summary.get("totals"),
                "undelivered_in_spool": member.undelivered(),
                # Nodes' reconnects to this instance (the planned outage's included).
                "node_reconnects": shared.reconnects_by_instance[index],
            }
        )
    report["instances"] = instances
    # An id delivered by more than one instance: a duplicate across instances (already counted in
    # duplicates_delivered, which is over the union).
    report["delivered_by_several_instances"] = sum(i["delivered"] for i in instances) - report["delivered"]
    # Arrival order is per sink: the union's file order says nothing across instances.
    report["max_out_of_order_displacement"] = max((own.max_displacement() for own in per_instance), default=0)
    report["config"]["instances"] = len(instances)
    report["config"]["verified_at"] = ", ".join(f"jsonl:{d}" for d in sink.directories)


def _report(
    *,
    cfg: ReplayTestConfig,
    shared: Shared,
    sink: SinkTail,
    live_sink: SinkTail,
    daemon: InProcessDaemon | SubprocessDaemon | DaemonGroup | None,
    drove_s: float,
    elapsed_s: float,
) -> dict[str, Any]:
    expected = shared.expected
    delivered = len(expected & sink.delivered)
    unexpected = len(sink.delivered - expected)
    lost = len(expected) - delivered
    replay_s = (shared.last_backlog_at or 0.0) - (shared.first_backlog_at or 0.0) if shared.first_backlog_at else 0.0
    reconnects = shared.reconnect_s
    duplicates_delivered = sink.distinct_lines - len(sink.delivered)
    # Exact only if each node is its own key in the daemon (loopback sources) and the sink holds either every
    # injected duplicate or none of them (a daemon deduplicating by event_id delivers only first sends).
    # A killed daemon never read what was in its socket buffer, and a request sent again may or may not have been
    # seen before: the mirror cannot know, so it is not exact after a kill or a resend.
    exact = (
        (cfg.target is None or cfg.target[0].startswith("127."))
        and duplicates_delivered in (shared.duplicates_cross, shared.duplicates_sent)
        and not cfg.kill
        and not shared.resent
    )
    expect = shared.expect_first.plus(shared.expect_cross)
    if shared.duplicates_sent and duplicates_delivered == shared.duplicates_sent:
        expect = expect.plus(shared.expect_duplicates)
    report: dict[str, Any] = {
        "ok": lost == 0,
        "config": {
            "events": cfg.events,
            "nodes": cfg.nodes,
            "seed": cfg.seed,
            "outage_fraction": cfg.outage_fraction,
            "before_fraction": cfg.before_fraction,
            "outage_s": cfg.outage_s,
            "duplicates": cfg.duplicates,
            "shuffle": cfg.shuffle,
            "restart_daemon": cfg.restart_daemon,
            "restart_mode": cfg.restart_mode.value if cfg.restart_daemon else None,
            "daemon": "target" if cfg.target is not None else ("subprocess" if cfg.in_subprocess else "in-process"),
            "engine_mode": (EngineMode.SYNC if cfg.sync else EngineMode.ASYNC).value,
            "sync_window": cfg.sync_window if cfg.sync else None,
            "target": None if cfg.target is None else f"{cfg.target[0]}:{cfg.target[1]}",
            "sink": cfg.sink,
            "verified_at": f"sqs:{cfg.queue_url}" if cfg.queue_url else f"jsonl:{sink.directory}",
            "daemon_settings": dict(cfg.daemon_settings),
        },
        "generated": shared.generated,
        "sent_frames": shared.sent_frames,
        "backlog_events": shared.backlog_planned,
        "duplicates_injected": shared.duplicates_sent,
        "delivered": delivered,
        "lost": lost,
        "unexpected": unexpected,
        "sink_lines": sink.lines,
        "sink_bad_lines": sink.bad_lines,
        # Lines the spool sent again after a restart (at least once), byte-identical to the first copy.
        "redelivered_lines": sink.lines - sink.bad_lines - sink.distinct_lines,
        # Distinct deliveries of an id already delivered: the injected duplicates that reached the sink.
        "duplicates_delivered": duplicates_delivered,
        # Sync engine: requests sent again because the session carrying them was lost before it answered them.
        "resent": shared.resent,
        "answered": shared.answered,
        "max_out_of_order_displacement": sink.max_displacement(),
        "flags": {
            "exact_expectation": exact,
            "replayed": {"sink": sink.flagged_replayed, "expected": expect.replayed},
            "out_of_order": {"sink": sink.flagged_out_of_order, "expected": expect.out_of_order},
            "max_ooo_lag_us": {"sink": sink.max_lag_us, "expected": expect.max_lag_us},
            "duplicate": {"sink": sink.flagged_duplicate, "expected": expect.duplicate},
        },
        # The nodes' side of the replay: backlog frames written to the sockets, first → last write (the kernel's
        # buffers take them faster than the daemon reads: the daemon's own figure is daemon.totals.replay_ingest_s).
        "replay": {
            "backlog_sent": shared.backlog_sent,
            "frames_sent": shared.replay_frames,
            "send_s": round(replay_s, 3),
            "send_eps": round(shared.replay_frames / replay_s, 1) if replay_s > 0 else 0.0,
        },
        # The nodes' side of a reconnect: from the end of the planned outage (or the moment a node found its
        # session gone) to a new session (NEGO_RESP). The daemon's figure (daemon.totals.max_session_gap_s)
        # runs from the session lost to the next NEGO_REQ, so it includes the outage itself.
        "node_reconnect_s": {
            "count": len(reconnects),
            "max": round(max(reconnects), 3) if reconnects else 0.0,
            "mean": round(sum(reconnects) / len(reconnects), 3) if reconnects else 0.0,
        },
        "latency": {
            "ingest": percentiles(sink.ingest_latency_us),
            "sink": percentiles(live_sink.sink_latency_us),
        },
        "drive_s": round(drove_s, 3),
        "elapsed_s": round(elapsed_s, 3),
        "events_per_s": round(shared.sent_frames / drove_s, 1) if drove_s > 0 else 0.0,
    }
    report["flags"]["match"] = all(
        v["sink"] == v["expected"] for k, v in report["flags"].items() if isinstance(v, dict)
    )
    if isinstance(sink, QueueTail):
        report["queue"] = {
            "receives": sink.receives,
            "delete_failures": sink.delete_failures,
            "errors": sink.errors,
            "error_kinds": dict(sink.error_kinds),
        }
    if daemon is not None:
        # Not at the sink when the daemon stopped (kept in its spool, so not lost by the daemon, but not delivered
        # within the run either).
        report["undelivered_in_spool"] = daemon.undelivered()
        report["daemon"] = daemon.summary()
    return report
