"""What a replay-test run is asked to do (:class:`ReplayTestConfig`, checked when built), how the daemon is
restarted (:class:`RestartMode`), and the error of a run that could not be carried out."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from fpolicyd.errors import ConfigError
from fpolicyd.protocol.session_config import EngineMode
from fpolicyd.simulator.client import MAX_NODES
from fpolicyd.simulator.generate import DEFAULT_VS_UUID

__all__ = ["MAX_INSTANCES", "ReplayTestConfig", "ReplayTestError", "RestartMode"]

#: Daemon instances a run starts at most (``instances``).
MAX_INSTANCES: Final = 16


class ReplayTestError(Exception):
    """The storm could not be run (the daemon or a node failed, a bound ran out)."""


class RestartMode(StrEnum):
    """How ``restart_daemon`` restarts the daemon half-way through the replay."""

    #: Stop it (drain the sessions, flush the sinks, checkpoint) and start it again.
    GRACEFUL = "graceful"
    #: SIGKILL the daemon subprocess (nothing drained or checkpointed) and start it again.
    KILL = "kill"


#: Sink URI schemes verified by draining an SQS queue.
_QUEUE_SINKS: Final = ("sqs:", "eventbridge:")


@dataclass(frozen=True, slots=True)
class ReplayTestConfig:
    #: Notifications generated in all (split evenly over the nodes).
    events: int = 10_000
    nodes: int = 3
    seed: int = 0
    #: Share of each node's notifications generated during the outage (the backlog replayed afterwards).
    outage_fraction: float = 0.3
    #: Share sent live before the outage; the rest is live traffic during the replay.
    before_fraction: float = 0.4
    #: How long the nodes stay disconnected while generating their backlog.
    outage_s: float = 2.0
    #: Share of backlog notifications sent a second time (shortly after the first).
    duplicates: float = 0.0
    #: Replay the backlog in a random order (else in generation order, still behind live traffic).
    shuffle: bool = False
    #: Restart the local daemon half-way through the replay (how: ``restart_mode``).
    restart_daemon: bool = False
    restart_mode: RestartMode = RestartMode.GRACEFUL
    #: Run the local daemon as a ``python -m fpolicyd serve`` subprocess (implied by restart_mode kill).
    subprocess: bool = False
    #: The engine type the nodes play (and the local daemon is configured for); None: sync with restart_mode
    #: kill, else async.
    engine_mode: EngineMode | None = None
    #: Sync engine: requests a node keeps unanswered at most (ONTAP's max-server-reqs, 500 by default).
    sync_window: int = 500
    #: ``sqs:QUEUE_URL`` or ``eventbridge:BUS``: the local daemon delivers there (instead of JSON Lines) and the
    #: verification drains a queue; None verifies the JSON Lines directory.
    sink: str | None = None
    #: The queue to drain: default the ``sqs:`` sink's own; required for ``eventbridge:`` (a rule's target).
    verify_queue: str | None = None
    #: Daemons run by replay-test (each with its own data and JSON Lines directories); every node holds one
    #: session per instance and round-robins its notifications over them.
    instances: int = 1
    #: ``(host, port)`` of a running daemon; None runs one in-process.
    target: tuple[str, int] | None = None
    #: The JSON Lines directory to verify (required with ``target``; default: the in-process daemon's).
    sink_dir: Path | None = None
    #: In-process daemon's data directory (default: a temporary one, removed afterwards).
    data_dir: Path | None = None
    #: The daemon's ``replay_clock_tolerance_s`` (only for the expected flags with ``target``).
    clock_tolerance_s: float = 0.0
    policy_name: str = "fpolicyd-replay"
    vs_uuid: str = DEFAULT_VS_UUID
    #: Progress line on stderr every this many seconds (0: none).
    progress_s: float = 5.0
    #: After the last node is done, how long to wait for the sink to hold every notification.
    settle_timeout_s: float = 60.0
    #: Hard bound on the whole run.
    timeout_s: float = 1800.0
    #: In-process daemon's settings overrides (Settings field → value).
    daemon_settings: tuple[tuple[str, Any], ...] = ()
    #: Sample a timeline (rates, totals, latency per interval) into the report's ``timeline`` (``--plot``).
    timeline: bool = False
    #: The timeline's sampling period; None: 1 s, finer early in the run
    #: (:data:`~fpolicyd.replaytest.run.TIMELINE_MIN_INTERVAL_S`).
    timeline_interval_s: float | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"replay-test {name}: {why} (got {getattr(self, name)!r})")

        if self.events < 1:
            raise bad("events", "must be >= 1")
        if not 1 <= self.nodes <= min(MAX_NODES, 60_000):
            raise bad("nodes", f"must be in 1..{MAX_NODES}")
        for name in ("outage_fraction", "before_fraction", "duplicates"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 <= value <= 1):
                raise bad(name, "must be a fraction in 0..1")
        if self.outage_fraction + self.before_fraction > 1:
            raise bad("before_fraction", "plus outage_fraction must not exceed 1")
        for name in ("outage_s", "progress_s", "clock_tolerance_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise bad(name, "must be a finite number >= 0")
        for name in ("settle_timeout_s", "timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise bad(name, "must be a finite number > 0")
        if self.target is not None:
            if self.sink_dir is None and self.sink is None:
                raise ConfigError(
                    "replay-test: --target needs --sink-dir (the daemon's JSON Lines directory) or --sink"
                )
            if self.restart_daemon or self.daemon_settings or self.subprocess:
                raise ConfigError(
                    "replay-test: --restart-daemon, --restart-mode, --subprocess and --daemon-setting need a daemon "
                    "run by replay-test (no --target)"
                )
        if not 1 <= self.instances <= MAX_INSTANCES:
            raise bad("instances", f"must be in 1..{MAX_INSTANCES}")
        if self.instances > 1:
            if self.target is not None or self.sink is not None or self.sink_dir is not None:
                raise ConfigError(
                    "replay-test: --instances > 1 runs its own daemons and verifies their JSON Lines directories: "
                    "not with --target, --sink or --sink-dir"
                )
            if self.restart_daemon or self.engine_mode is EngineMode.SYNC:
                raise ConfigError(
                    "replay-test: --instances > 1 does not support --restart-daemon, --restart-mode or "
                    "--engine-mode sync yet (run them with one instance)"
                )
        if self.timeline_interval_s is not None and not (
            math.isfinite(self.timeline_interval_s) and self.timeline_interval_s > 0
        ):
            raise bad("timeline_interval_s", "must be a finite number > 0")
        if self.nodes > self.events:
            raise bad("nodes", "must not exceed events")
        if self.sync_window < 1:
            raise bad("sync_window", "must be >= 1")
        if self.restart_mode is RestartMode.KILL and self.engine_mode is EngineMode.ASYNC:
            raise ConfigError(
                "replay-test: --restart-mode kill needs the sync engine mode: in async mode ONTAP counts a "
                "notification as delivered once the socket accepted it, so a SIGKILL loses what was in the daemon's "
                "socket buffer and not yet in its spool, and nothing would send it again"
            )
        if self.sink is not None:
            if not self.sink.startswith(_QUEUE_SINKS) or not self.sink.partition(":")[2]:
                raise bad("sink", "must be sqs:QUEUE_URL or eventbridge:BUS")
            if self.sink.startswith("eventbridge:") and self.verify_queue is None:
                raise ConfigError(
                    "replay-test: --sink eventbridge:BUS needs --verify-queue (the SQS queue a rule on the bus targets)"
                )
        elif self.verify_queue is not None:
            raise ConfigError("replay-test: --verify-queue needs --sink (sqs:QUEUE_URL or eventbridge:BUS)")

    @property
    def kill(self) -> bool:
        return self.restart_daemon and self.restart_mode is RestartMode.KILL

    @property
    def sync(self) -> bool:
        """The nodes play a synchronous engine (wait for SCREEN_RESP, send unanswered requests again)."""
        return self.engine_mode is EngineMode.SYNC or (self.engine_mode is None and self.kill)

    @property
    def in_subprocess(self) -> bool:
        return self.target is None and (self.subprocess or self.kill)

    @property
    def queue_url(self) -> str | None:
        """The SQS queue the verification drains, if it drains one."""
        if self.sink is None:
            return None
        return self.verify_queue or self.sink.partition(":")[2]
