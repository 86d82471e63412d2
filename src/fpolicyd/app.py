"""The daemon: settings → sinks → listener; SIGTERM/SIGINT → stop accepting, close sessions, drain sinks."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from dataclasses import dataclass

from fpolicyd.config import Settings
from fpolicyd.events import NameMaps
from fpolicyd.obs.log import get_logger
from fpolicyd.server.connection import FPolicyConnection, ServerContext
from fpolicyd.server.delivery import Delivery
from fpolicyd.sinks.local import build_sink
from fpolicyd.sinks.runner import SinkRunner

log = get_logger("fpolicyd.app")

#: A connection that received nothing for this long during shutdown is taken to have nothing more in flight.
SHUTDOWN_QUIET_S = 0.2


@dataclass(frozen=True, slots=True)
class StopReport:
    events: int
    undelivered: int


class Daemon:
    """Owns the listener and the sink runners; ``run`` returns once stopped and drained."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.delivery = Delivery(settings.max_pending_events)
        self.context = ServerContext(
            session_config=settings.session_config(),
            names=NameMaps(
                volumes=settings.volume_names,
                svms=settings.svm_names,
                default_volume=settings.volume_name,
                default_svm=settings.svm_name,
            ),
            delivery=self.delivery,
            max_frame_bytes=settings.max_frame_bytes,
            max_connections=settings.max_connections,
        )
        self._server: asyncio.Server | None = None
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()

    @property
    def port(self) -> int:
        """The bound port (useful with ``listen_port = 0``)."""
        assert self._server is not None
        assert self._server.sockets
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def request_stop(self) -> None:
        self._stop.set()

    async def start(self) -> None:
        settings = self.settings
        for uri in settings.effective_sinks:
            runner = SinkRunner(
                build_sink(uri, settings),
                max_bytes=settings.batch_max_bytes,
                linger_s=settings.batch_linger_s,
                wall_clock=time.time,
                on_progress=self.delivery.on_progress,
            )
            await runner.start()
            self.delivery.add(runner)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: FPolicyConnection(self.context),
            host=settings.listen_host,
            port=settings.listen_port,
            reuse_address=True,
            backlog=max(128, settings.max_connections),
        )
        log.info(
            "listening",
            host=settings.listen_host,
            port=self.port,
            sinks=list(settings.effective_sinks),
            engine_mode=settings.engine_mode.value,
            idle_timeout_s=settings.effective_idle_timeout_s,
        )
        if settings.write_complete_delay_s:
            log.warning(
                "setting_not_active",
                setting="write_complete_delay_s",
                value=settings.write_complete_delay_s,
                detail="file-readiness settle is not implemented in this release; events are emitted at once",
            )
        self.ready.set()

    async def stop(self) -> StopReport:
        if self._server is not None:
            self._server.close()
        await self._read_what_is_in_flight()
        for conn in list(self.context.connections):
            conn.shutdown()
        if self._server is not None:
            await self._server.wait_closed()
        budget = self.settings.drain_timeout_s
        undelivered = 0
        for runner in self.delivery.runners:
            left = await runner.drain(budget)
            if left:
                log.error("sink_drain_incomplete", sink=runner.sink.name, undelivered=left)
            undelivered += left
        report = StopReport(events=self.context.events, undelivered=undelivered)
        log.info("stopped", events=report.events, undelivered=report.undelivered)
        return report

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
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self.start()
            await self._stop.wait()
        finally:
            report = await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
        return report

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("signal", signal=sig.name)
        self._stop.set()


def run_daemon(settings: Settings) -> StopReport:
    """Run until SIGTERM/SIGINT on uvloop when available."""
    try:
        import uvloop  # noqa: PLC0415 - optional at import time so the package imports without it
    except ImportError:  # pragma: no cover - uvloop is a declared dependency on every supported platform
        return asyncio.run(Daemon(settings).run())
    return uvloop.run(Daemon(settings).run())
