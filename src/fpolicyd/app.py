"""The daemon: settings → spool → sinks → listener; SIGTERM/SIGINT → stop accepting, read what is in flight,
close sessions, make the spool durable, let the sinks drain within the budget (the rest stays in the spool)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

from fpolicyd.config import Settings
from fpolicyd.errors import ConfigError, FpolicydError
from fpolicyd.events import NameMaps
from fpolicyd.obs.health import HealthReport, Heartbeat, readiness
from fpolicyd.obs.http import ObservabilityServer
from fpolicyd.obs.log import get_logger
from fpolicyd.obs.looplag import LoopLag
from fpolicyd.obs.metrics import Metrics
from fpolicyd.obs.systemd import SystemdNotifier
from fpolicyd.pipeline.backpressure import Watermarks
from fpolicyd.pipeline.dedup_window import DedupWindow, key_of_event_id
from fpolicyd.pipeline.ingest import Ingest, IngestCounters
from fpolicyd.pipeline.records import stored_event_id
from fpolicyd.pipeline.replay import ReplayTracker
from fpolicyd.server.allowlist import PeerAllowlist
from fpolicyd.server.capture import capture_recorder
from fpolicyd.server.connection import LiveConnections, ServerContext
from fpolicyd.server.delivery import DeliverySpec, use_delivery_process
from fpolicyd.server.disk_monitor import DiskMonitor
from fpolicyd.server.listener import ServerGroup, TlsListener, bind_listener
from fpolicyd.server.metric_labels import METRIC_LABELS
from fpolicyd.server.preflight import preflight, write_targets
from fpolicyd.server.processing import CURSOR as PROCESSING_CURSOR
from fpolicyd.server.processing import ProcessingWorker, instance_id, start_processing
from fpolicyd.server.runtime import EventLoopProbe, tune_garbage_collector
from fpolicyd.server.spooler import ProcessingSlot, Spooler
from fpolicyd.server.tls import ReloadableTls, TlsFiles
from fpolicyd.sinks.aws.clients import AwsClients
from fpolicyd.sinks.dead_letter import DeadLetterWriter
from fpolicyd.sinks.factory import build_senders
from fpolicyd.sinks.runner import Sender
from fpolicyd.storage.dedup_journal import DedupJournal
from fpolicyd.storage.disk import DiskRetry
from fpolicyd.storage.duplicate_ledger import LEDGER_CURSOR, DuplicateLedger
from fpolicyd.storage.faults import FSYNC_EIO_AFTER_ENV, fsync_fault_from_environment
from fpolicyd.storage.ledger import AuditLedger
from fpolicyd.storage.spool import Spool, SpoolIOError, SpoolSettings

log = get_logger("fpolicyd.app")

#: A connection that received nothing for this long during shutdown is taken to have nothing more in flight.
SHUTDOWN_QUIET_S = 0.2
#: Spool records read per step while rebuilding the dedup window at start.
_REBUILD_BATCH = 10_000


async def _closing(what: str, closing: Awaitable[None]) -> None:
    """Await a resource's close; an I/O failure (a full disk at the last flush) is logged, not raised, so that the
    stop completes and the other resources are closed too."""
    try:
        await closing
    except (OSError, FpolicydError) as exc:
        log.error("close_failed", resource=what, error=str(exc), detail="recovered at the next start")


def _close_now(what: str, close: Callable[[], None]) -> None:
    """:func:`_closing` for a close that runs on the loop."""
    try:
        close()
    except (OSError, FpolicydError) as exc:
        log.error("close_failed", resource=what, error=str(exc), detail="recovered at the next start")


def open_reader_dedup(settings: Settings, spool: Spool, now: float) -> tuple[DedupWindow, DedupJournal, int]:
    """The reader's exact-dedup window, rebuilt from its journal and from the spool records after the journal's
    last claim (those claims are written to the journal before anything else happens). Blocking: run it on a
    thread. Returns the window, the journal and the number of claims recovered."""
    window = DedupWindow(max_entries=settings.dedup_embedded_max_entries, ttl_s=settings.dedup_exact_ttl_s)
    journal, recovery = DedupJournal.open(
        settings.effective_dedup_dir / "journal",
        segment_claims=settings.dedup_journal_segment_claims,
        max_entries=settings.dedup_embedded_max_entries,
        ttl_s=settings.dedup_exact_ttl_s,
    )
    last = spool.last_seq
    # A claim whose record did not survive (a torn spool tail) is dropped: its notification was never stored.
    claims = [claim for claim in recovery.claims if claim[0] <= last]
    window.load(((key, at) for _, key, at in claims), now)
    journaled = max((seq for seq, _, _ in claims), default=0)
    spool.retain_above(journaled)
    tail: list[tuple[int, int]] = []
    after = journaled
    while records := spool.scan(after, _REBUILD_BATCH, 16 << 20):
        for record in records:
            payload = record.payload
            if payload[:1] != b"{":
                continue  # processed records repeat raw ones; duplicates claimed nothing
            event_id = stored_event_id(payload)
            if event_id is None:
                continue
            key = key_of_event_id(event_id)
            if window.claim(key, now):
                tail.append((record.seq, key))
        after = records[-1].seq
    if tail:
        journal.append(now, tail)
        journal.flush()
        journal.sync()
    spool.retain_above(journal.durable_seq)
    return window, journal, len(claims) + len(tail)


@dataclass(frozen=True, slots=True)
class StopReport:
    events: int
    #: Largest sink backlog left in the spool (delivered after the next start).
    undelivered: int
    #: Why the daemon stopped on its own (the spool could not make events durable), or None.
    failure: str | None = None


class Daemon:
    """Owns the spool, the spooler and the listener; ``run`` returns once stopped and drained."""

    def __init__(self, settings: Settings, *, wall_clock: Callable[[], float] = time.time) -> None:
        """``wall_clock``: epoch seconds, for everything that stamps or ages by the wall clock (receive times,
        settle, dedup claims and their expiry); tests step it to see what a clock jump does."""
        self.settings = settings
        self._wall_clock = wall_clock
        #: Test-only (storage/faults.py): read once, here; None unless its environment variable is set.
        self._fsync_fault = fsync_fault_from_environment(os.environ)
        self._server: ServerGroup | TlsListener | None = None
        #: The FPolicy sockets, bound first thing in start(); handed to the server at the end of it.
        self._listen_sockets: list[socket.socket] = []
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()
        self._spool: Spool | None = None
        self._spooler: Spooler | None = None
        self._context: ServerContext | None = None
        self._clients: AwsClients | None = None
        self._dead_letter: DeadLetterWriter | None = None
        self.tls: ReloadableTls | None = None
        self._processing: ProcessingWorker | None = None
        self._journal: DedupJournal | None = None
        self._duplicates: DuplicateLedger | None = None
        #: READY/STATUS/STOPPING/WATCHDOG to systemd (Type=notify); a no-op without $NOTIFY_SOCKET.
        self.notifier = SystemdNotifier.from_environment()
        #: Replay detection over every session (read by the metrics at scrape time).
        self._replay = ReplayTracker(settings.replay_config())
        #: How late the loop runs its timers (fpolicyd_event_loop_lag_seconds, event_loop_stalled warnings).
        self.loop_probe = EventLoopProbe(
            LoopLag(
                interval_s=settings.event_loop_probe_interval_s,
                stall_warn_s=settings.event_loop_stall_warn_s,
                log_interval_s=settings.log_rate_limit_interval_s,
            )
        )
        #: This daemon's Prometheus registry (one per daemon: several may run in one test process).
        self.metrics = Metrics(
            labels=METRIC_LABELS,
            ingestion_slo_s=settings.slo_ingestion_latency_s,
            reconnect_slo_s=settings.slo_reconnect_s,
            replay_slo_s=settings.slo_replay_completion_s,
            replay=self._replay.stats,
            event_loop=self.loop_probe.lag,
        )
        self.heartbeat = Heartbeat(
            interval_s=settings.health_heartbeat_interval_s, stall_s=settings.health_loop_stall_s
        )
        self._http: ObservabilityServer | None = None

    @property
    def context(self) -> ServerContext:
        assert self._context is not None, "start() first"
        return self._context

    @property
    def processing(self) -> ProcessingWorker | None:
        """The processing stage (route, settle, dedup), None when the settings need none."""
        return self._processing

    @property
    def spooler(self) -> Spooler:
        assert self._spooler is not None, "start() first"
        return self._spooler

    @property
    def port(self) -> int:
        """The bound port (useful with ``listen_port = 0``)."""
        assert self._server is not None
        assert self._server.sockets
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def http_port(self) -> int | None:
        """The bound port of /metrics, /healthz, /readyz (None when ``http_enabled`` is false or not started)."""
        return self._http.port if self._http is not None else None

    def readiness(self) -> HealthReport:
        """What /readyz answers (called on the HTTP thread: reads state, never changes it)."""
        server = self._server
        listening = f"{self.settings.listen_host}:{self.port}" if server is not None and server.is_serving() else None
        return readiness(
            self.heartbeat,
            listening=listening,
            spooler=self._spooler,
            spool_limit_bytes=self.settings.spool_max_bytes,
            processing=self._processing,
        )

    def _start_http(self) -> None:
        self.heartbeat.start(asyncio.get_running_loop())
        self.loop_probe.start(asyncio.get_running_loop())
        if not self.settings.http_enabled:
            return
        self._http = ObservabilityServer(
            self.settings.http_host,
            self.settings.http_port,
            registry=self.metrics.registry,
            liveness=self.heartbeat.liveness,
            readiness=self.readiness,
        )
        self._http.start()
        log.info(
            "http_listening",
            host=self.settings.http_host,
            port=self._http.port,
            paths=["/metrics", "/healthz", "/readyz"],
        )

    async def start(self) -> None:
        settings = self.settings
        # Everything `fpolicyd config check` checks (routes, sinks, TLS files, directories), then the FPolicy
        # port: a problem with either is one line and exit 2 before anything is opened, started or logged.
        plan = await asyncio.to_thread(preflight, settings)
        backlog = max(128, settings.max_connections)
        self._listen_sockets = await asyncio.to_thread(
            bind_listener, settings.listen_host, settings.listen_port, backlog
        )
        if self._fsync_fault is not None:
            log.error(
                "fault_injection_armed",
                variable=FSYNC_EIO_AFTER_ENV,
                fsync_eio_after=self._fsync_fault.after,
                detail="test only: the spool's fsync will fail with EIO",
            )
        self._start_http()
        redactor = settings.redactor()
        tls_files = TlsFiles.from_settings(settings)
        self.tls = ReloadableTls(tls_files) if tls_files is not None else None
        spool_settings = SpoolSettings(
            directory=settings.effective_spool_dir,
            segment_bytes=settings.spool_segment_bytes,
            max_bytes=settings.spool_max_bytes,
            fsync=settings.spool_fsync,
            group_commit_s=settings.spool_group_commit_s,
            checkpoint_interval_s=settings.checkpoint_interval_s,
            fsync_fault=self._fsync_fault,
        )
        self._clients = AwsClients(
            region_name=settings.aws_region,
            max_pool_connections=max(10, settings.sink_max_in_flight * 2),
            data_path=settings.aws_data_path,
        )
        self._dead_letter = DeadLetterWriter(settings.dead_letter_file, limits=settings.dead_letter_limits())
        await asyncio.to_thread(self._open_dead_letter, self._dead_letter)
        senders: list[Sender] = list(
            build_senders(settings.sink_options(), self._clients, self._dead_letter, plan.uris)
        )
        names = {uri: sender.name for uri, sender in zip(plan.uris, senders, strict=True)}
        cursors = [sender.name for sender in senders]
        cursors += [PROCESSING_CURSOR] if plan.enabled else []
        cursors += [LEDGER_CURSOR] if settings.reader_dedup else []
        try:
            spool = await asyncio.to_thread(Spool.open, spool_settings, cursors)
        except SpoolIOError as exc:
            # Not foreseen by preflight (a directory that cannot be created after all, a file without permission).
            target = write_targets(settings, ())[0]
            raise ConfigError(f"{target.setting} {target.configured}: {exc}") from None
        self._spool = spool
        report = spool.recovery
        assert report is not None  # set by Spool.open
        log.info(
            "spool_opened",
            directory=str(settings.effective_spool_dir),
            records_recovered=report.records_recovered,
            torn_bytes=report.torn_bytes,
            corrupt_bytes=report.corrupt_bytes,
            records_lost=report.records_lost,
            quarantined=list(report.quarantined),
            new_sinks=list(report.new_sinks),
            dropped_sinks=list(report.dropped_sinks),
            pending={name: spool.records_pending(name) for name in spool.sinks},
        )
        if report.torn_bytes or report.corrupt_bytes or report.quarantined:
            emit = log.error if report.records_lost or report.quarantined else log.warning
            emit(
                "spool_repaired",
                torn_bytes=report.torn_bytes,
                corrupt_bytes=report.corrupt_bytes,
                records_lost=report.records_lost,
                quarantined=list(report.quarantined),
            )
        if report.dropped_sinks:
            log.warning(
                "spool_sinks_dropped",
                sinks=list(report.dropped_sinks),
                detail="no longer configured: their cursors were removed and their backlog no longer holds segments",
            )
        remote = use_delivery_process(settings.delivery_process.value)
        if not remote and settings.delivery_processes > 1:
            log.warning(
                "delivery_processes_ignored",
                delivery_processes=settings.delivery_processes,
                detail="delivery_process = auto and this process may use one CPU: the sinks run in the daemon's own "
                "process (delivery_process = on starts the delivery processes anyway)",
            )
        delivery: DeliverySpec | None = None
        if remote:
            delivery = DeliverySpec(
                settings=settings,
                names=tuple(sender.name for sender in senders),
                uris=plan.uris,
                processing=plan.enabled,
            )
            senders = []
        # Every writer reports a refused write here; reading pauses while one is full (server/spooler.py).
        disk = DiskMonitor(DiskRetry(settings.disk_full_retry_initial_s, settings.disk_full_retry_max_s))
        duplicates: DuplicateLedger | None = None
        if settings.reader_dedup:
            # Duplicates the reader suppresses are kept in the spool until their audit record is written.
            instance = await asyncio.to_thread(instance_id, settings.effective_spool_dir)
            ledger = AuditLedger(settings.dedup_ledger_files(), redact=redactor.redact_record)
            duplicates = DuplicateLedger(ledger, spool, instance=instance, disk=disk)
            await asyncio.to_thread(duplicates.open)
            requeued = await asyncio.to_thread(duplicates.recover)
            if requeued:
                log.info("ledger_requeued", duplicates=requeued, detail="left unrecorded by the last run")
            self._duplicates = duplicates
        window: DedupWindow | None = None
        if settings.reader_dedup:
            opened, self._journal, recovered = await asyncio.to_thread(
                open_reader_dedup, settings, spool, self._wall_clock()
            )
            log.info(
                "dedup_window_opened",
                claims_recovered=recovered,
                held=len(opened),
                max_entries=opened.max_entries,
                ttl_s=opened.ttl_s,
            )
            window = opened
        # The live connections and the processing stage's slot: each side of the spooler needs it and it needs them.
        connections = LiveConnections()
        processing = ProcessingSlot() if plan.enabled else None
        self._spooler = Spooler(
            spool,
            senders,
            Watermarks(
                low_bytes=settings.backpressure_low_bytes,
                high_bytes=settings.backpressure_high_bytes,
                hard_bytes=settings.backpressure_pause_bytes,
            ),
            checkpoint_interval_s=settings.checkpoint_interval_s,
            select=plan.selector,
            journal=self._journal,
            delivery=delivery,
            ingestion_slo_s=settings.slo_ingestion_latency_s,
            duplicates=duplicates,
            wall_clock=self._wall_clock,
            disk=disk,
            broadcast_back_pressure=connections.broadcast_back_pressure,
            on_fatal=self._on_fatal,
            processing=processing,
        )
        ingest = Ingest(
            names=NameMaps(
                volumes=settings.volume_names,
                svms=settings.svm_names,
                default_volume=settings.volume_name,
                default_svm=settings.svm_name,
            ),
            counters=IngestCounters(),
            replay=self._replay,
            route=plan.router.match if plan.router is not None else None,
            window=window,
            # With the processing stage on, events are redacted as they leave it (routing needs the clear path).
            redact=redactor.redact_event if redactor.redacts_events and not plan.enabled else None,
            accelerate=not settings.pure_python,
            path_max_chars=settings.path_max_chars,
        )
        # Not ``path=``: the log redactor hashes that key as a file path, and the operator could not read it.
        log.info("ingest_path", ingest=ingest.accelerator.path, reason=ingest.accelerator.reason)
        self._context = ServerContext(
            session_config=settings.session_config(),
            ingest=ingest,
            spooler=self._spooler,
            connections=connections,
            max_frame_bytes=settings.max_frame_bytes,
            max_connections=settings.max_connections,
            quarantine=self._quarantine,
            allowlist=PeerAllowlist.parse(settings.allowed_networks),
            frame_reader=settings.frame_reader,
            capture=capture_recorder(settings, mask=redactor.log_path),
            write_buffer_bytes=settings.peer_write_buffer_bytes,
            write_stall_timeout_s=settings.peer_write_stall_timeout_s,
            max_pending=settings.max_pending_handshakes,
            max_per_peer=settings.max_connections_per_peer,
            log_rate_limit_interval_s=settings.log_rate_limit_interval_s,
            wall_clock_us=lambda: round(self._wall_clock() * 1_000_000),
        )
        self.metrics.attach(self._context, self._spooler)
        dead_letter = self._dead_letter
        process = self._spooler.delivery
        self.metrics.watch_dead_letter(
            [dead_letter.figures] if process is None else [dead_letter.figures, process.dead_letter_figures],
            size=dead_letter.disk_bytes,
            limit_bytes=dead_letter.limits.max_bytes,
        )
        replay, loop = self._replay, asyncio.get_running_loop()
        # Ticked on the loop thread (an episode that went quiet ends without waiting for traffic), read on the
        # HTTP thread.
        self.heartbeat.on_beat.append(lambda: replay.tick(loop.time()))
        self.heartbeat.on_beat.append(self._context.flush_log_summaries)
        journal = self._journal
        if window is not None and journal is not None:
            self.heartbeat.on_beat.append(partial(_age_dedup, window, journal, self._wall_clock))
        await self._spooler.start()
        if processing is not None:
            self._processing = await start_processing(
                settings,
                plan=plan,
                names=names,
                spool=spool,
                spooler=self._spooler,
                slot=processing,
                clients=self._clients,
                redactor=redactor,
                wall_clock=self._wall_clock,
            )
            self.metrics.watch_processing(self._processing)
        sockets, self._listen_sockets = self._listen_sockets, []
        if self.tls is not None:
            self._server = TlsListener(self.context, sockets, self.tls.listener, settings.handshake_timeout_s)
        else:
            self._server = await ServerGroup.start(self.context, sockets, backlog)
        log.info(
            "listening",
            host=settings.listen_host,
            port=self.port,
            sinks=list(settings.effective_sinks),
            engine_mode=settings.engine_mode.value,
            idle_timeout_s=settings.effective_idle_timeout_s,
            tls=settings.tls_mode.value,
            allowed_networks=self.context.allowlist.describe(),
        )
        self.ready.set()
        # Listener bound and every sink started (a sink that cannot exist aborted the start above; one that is
        # only unreachable is retried while its events wait in the spool, so it must not hold back READY).
        self.notifier.ready(
            f"listening on {settings.listen_host}:{self.port}; sinks: {', '.join(settings.effective_sinks)}"
        )
        if settings.ontap_repoint_on_start:
            from fpolicyd.ontap.ops import start_repoint_on_start  # noqa: PLC0415 - only when configured

            start_repoint_on_start(settings)
        elif settings.ontap_join_on_start:
            from fpolicyd.ontap.ops import start_join_on_start  # noqa: PLC0415 - only when configured

            start_join_on_start(settings)

    async def stop(self) -> StopReport:
        self.notifier.stopping(f"draining (budget {self.settings.drain_timeout_s:g} s)")
        if self.settings.ontap_leave_on_stop and self.ready.is_set():
            # Before the listener closes, so ONTAP moves to the other servers; bounded by ontap_leave_timeout_s,
            # which is not taken from drain_timeout_s (the drain below gets its whole budget).
            from fpolicyd.ontap.ops import leave_on_stop  # noqa: PLC0415 - only when configured

            await leave_on_stop(self.settings)
        if self._server is not None:
            self._server.close()
        if self._context is None:  # start() failed before the spooler existed
            await self._close_resources()
            return StopReport(events=0, undelivered=0)
        await self._read_what_is_in_flight()
        for conn in list(self.context.connections):
            conn.shutdown()
        if self._server is not None:
            await self._server.wait_closed()
        # Listener and sessions are closed: ONTAP sends to its other servers while the spool drains.
        budget = self.settings.drain_timeout_s
        backlog = max((worker.lag for worker in self.spooler.workers), default=0)
        log.info("sink_drain_started", backlog=backlog, budget_s=budget)
        started = time.monotonic()
        undelivered = await self.spooler.drain(budget)
        log.info(
            "sink_drain_finished", undelivered=undelivered, took_s=round(time.monotonic() - started, 3), budget_s=budget
        )
        log.info("sink_stats", sinks=self.spooler.sink_stats())
        if undelivered:
            log.warning(
                "sink_drain_incomplete",
                undelivered=undelivered,
                detail="kept in the spool; delivered after the next start",
            )
        await self._close_resources()
        fatal = self.spooler.fatal
        report = StopReport(
            events=self.context.ingest.counters.events,
            undelivered=undelivered,
            failure=str(fatal) if fatal is not None else None,
        )
        log.info("stopped", events=report.events, undelivered=report.undelivered, failure=report.failure)
        return report

    async def _close_resources(self) -> None:
        """Close everything; a close that fails (a final fsync on a full disk) is logged and the others still run:
        what it could not write is recovered at the next start (spool, ledger, journal) or was never acked."""
        self.heartbeat.stop()
        self.loop_probe.stop()
        for sock in self._listen_sockets:  # start() failed before the server took them
            sock.close()
        self._listen_sockets = []
        if self._http is not None:
            await asyncio.to_thread(self._http.close)
        if self._processing is not None:
            await _closing("processor", self._processing.close())
        if self._clients is not None:
            await self._clients.close()
        if self._dead_letter is not None:
            _close_now("dead_letter", self._dead_letter.close)
        if self._journal is not None:
            _close_now("dedup_journal", self._journal.close)
        if self._duplicates is not None:
            await _closing("ledger", asyncio.to_thread(self._duplicates.close))
        if self._spool is not None:
            await _closing("spool", asyncio.to_thread(self._spool.close))

    async def _read_what_is_in_flight(self) -> None:
        """Ask every session to stop sending, then keep reading until all are quiet or the grace ends."""
        grace = self.settings.shutdown_read_grace_s
        connections = list(self.context.connections)
        if not grace or not connections:
            return
        for conn in connections:
            conn.begin_shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while loop.time() < deadline:
            live = [conn for conn in self.context.connections if not conn.closed.is_set()]
            if all(conn.quiet_for >= SHUTDOWN_QUIET_S for conn in live):
                return
            await asyncio.sleep(SHUTDOWN_QUIET_S / 4)
        log.warning("shutdown_read_grace_exhausted", grace_s=grace, connections=len(self.context.connections))

    async def run(self) -> StopReport:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)
        with contextlib.suppress(RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        watchdog = asyncio.create_task(self.notifier.run_watchdog(), name="systemd-watchdog")
        try:
            await self.start()
            await self._stop.wait()
        finally:
            report = await self.stop()
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
            self.notifier.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                with contextlib.suppress(RuntimeError):
                    loop.remove_signal_handler(sig)
        return report

    def reload(self) -> None:
        """SIGHUP: reload the TLS certificate, key and client CA for new handshakes; live sessions keep theirs."""
        if self.tls is None:
            log.info("reload", tls="off")
            return
        try:
            self.tls.reload()
        except ConfigError as exc:
            log.error("tls_reload_failed", error=str(exc), detail="the previous certificate stays in use")
            return
        log.info("tls_reloaded", cert_file=str(self.tls.files.cert_file), reloads=self.tls.reloads)

    @staticmethod
    def _open_dead_letter(writer: DeadLetterWriter) -> None:
        """Open the dead-letter files at start (bringing what an earlier run left within the cap: blocking, so on a
        thread). A directory that cannot be opened now is retried at the first record; the daemon runs on."""
        try:
            writer.open()
        except OSError as exc:
            log.error("dead_letter_open_failed", error=str(exc), detail="retried at the first record")
        limits = writer.limits
        log.info(
            "dead_letter_opened",
            directory=str(writer.path.parent),
            max_bytes=limits.max_bytes,
            max_files=limits.max_files,
            file_bytes=limits.file_bytes,
            pre_handshake_sample_bytes=limits.pre_handshake_sample_bytes,
        )

    def _quarantine(self, payload: bytes, reason: str, negotiated: bool) -> None:
        """Keep a payload that could not be decoded in the dead-letter file (raw, base64; only a sample before the
        handshake), never just a log line. Never raises: what the cap or the disk refused is counted and logged."""
        assert self._dead_letter is not None
        self._dead_letter.quarantine(payload, reason=reason, negotiated=negotiated)

    def _on_fatal(self, exc: BaseException) -> None:
        self._stop.set()

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("signal", signal=sig.name)
        self._stop.set()


def _age_dedup(window: DedupWindow, journal: DedupJournal, wall_clock: Callable[[], float]) -> None:
    """Claims past their time to live leave the window; journal files with nothing left in it go."""
    now = wall_clock()
    window.expire(now)
    journal.retire(now)


def run_daemon(settings: Settings) -> StopReport:
    """Run until SIGTERM/SIGINT on uvloop when available."""
    tune_garbage_collector(settings.gc_young_threshold)
    try:
        import uvloop  # noqa: PLC0415 - optional at import time so the package imports without it
    except ImportError:  # pragma: no cover - uvloop is a declared dependency on every supported platform
        return asyncio.run(Daemon(settings).run())
    return uvloop.run(Daemon(settings).run())
