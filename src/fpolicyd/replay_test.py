"""``fpolicyd replay-test``: a persistent-store replay storm against a daemon, verified at its JSON Lines sink.

K simulated ONTAP nodes (one connection and session each, the simulator's handshake and frames) go through:

1. **live**: notifications generated now and sent at once;
2. **outage**: the node closes its connection and keeps generating into a per-node backlog for ``outage_s``,
   as ONTAP's persistent store holds notifications while no server is connected;
3. **replay**: the node reconnects and sends the backlog interleaved with new live notifications, live first
   (ONTAP prioritises live events), optionally shuffled (``shuffle``) and with some backlog notifications sent
   twice (``duplicates``).

Optionally the daemon is restarted half-way through the replay on the same data directory (``restart_daemon``):
gracefully (``restart_mode`` graceful: drain, checkpoint), or, with the daemon running as a ``python -m fpolicyd
serve`` subprocess, killed with SIGKILL (``restart_mode`` kill: no drain, no checkpoint). The nodes see the
disconnect, reconnect and carry on.

A SIGKILL is only survivable without loss if "delivered" means "durable". In ONTAP's asynchronous mode a
notification counts as delivered once the socket accepted it, so what sat in the daemon's kernel buffer or memory
at the kill is gone. The kill mode therefore plays a **synchronous** engine: the daemon answers a SCREEN_REQ with
SCREEN_RESP only once the event is in its spool (``engine_mode`` sync), each node keeps at most ``sync_window``
requests unanswered (ONTAP's max-server-reqs), and after a reconnect it sends again every request the lost
session had not answered, as ONTAP retries a request whose server went away.

The sink verified is the daemon's JSON Lines directory, or an SQS queue (``sink`` ``sqs:URL``, or ``eventbridge:BUS``
checked through a rule that targets the queue ``verify_queue``): the queue is drained (ReceiveMessage with
WaitTimeSeconds, DeleteMessageBatch) while the storm runs and afterwards, bounded in time.

Every notification's ``event_id`` is computed by the generator (:meth:`fpolicyd.simulator.generate.NodeStream.event_id`,
the recipe of ``fpolicyd.events.normalize``), so the verifier only needs a set of ids (kept as 128-bit ints) to
say what was delivered, lost or delivered twice; the backlog is held as small specs and rendered when sent, so
memory stays bounded at a million events. The sink is tailed while the storm runs (progress, arrival latency).

What the daemon should flag (``metadata.replayed`` / ``out_of_order`` / ``duplicate``) is mirrored on the
sending side from what each node sent (a node's own source address on loopback is its node key in the daemon,
see ``fpolicyd.pipeline.replay``) and compared with what the sink holds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import Enum, StrEnum
from pathlib import Path
from typing import IO, Any, Final, NamedTuple

import orjson

from fpolicyd.errors import ConfigError, RemoteProtocolError
from fpolicyd.protocol.messages import BackPressure, HandshakeResp, ScreenResponse
from fpolicyd.protocol.session import EngineMode
from fpolicyd.replaytest.plot import MAX_TIMELINE_POINTS, Phase, TimelinePoint, downsample, timeline_json
from fpolicyd.simulator.client import MAX_NODES
from fpolicyd.simulator.generate import DEFAULT_VS_UUID, NodeStream, NotificationSpec
from fpolicyd.simulator.peer import OntapPeer, PeerClosedError, PeerError, PeerResetError, handshake

__all__ = [
    "QueueTail",
    "ReplayTestConfig",
    "ReplayTestError",
    "RestartMode",
    "SinkTail",
    "max_displacement",
    "run_replay_test",
]

#: Frames per socket write.
_CHUNK: Final = 64
#: How far (in the node's own frames) after its original a duplicate is sent, at most.
_DUPLICATE_SPREAD: Final = 200
#: Steps in which an outage's backlog is generated.
_OUTAGE_STEPS: Final = 20
_RECONNECT_PAUSE_S: Final = 0.05
_SINK_POLL_S: Final = 0.25
_SINK_GLOB: Final = "fpolicy_events_*.jsonl"
#: Bytes read from one sink file per poll (the rest on the next one).
_MAX_READ: Final = 8 << 20


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
    #: The timeline's sampling period; None: 1 s, finer early in the run (:data:`TIMELINE_MIN_INTERVAL_S`).
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


# ---------------------------------------------------------------------------------------------- helpers


def _now_us() -> int:
    return time.time_ns() // 1000


def _id_int(event_id: str) -> int:
    """The id's first 64 bits (60 random ones: a collision among 10**6 ids has odds ~1e-6): a small int."""
    return int(event_id[:18].replace("-", ""), 16)


def _percentiles(values: array[int]) -> dict[str, float | int]:
    """p50/p95/p99/max in milliseconds (nearest rank) of µs values."""
    n = len(values)
    if not n:
        return {"count": 0}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return round(ordered[min(n - 1, max(0, math.ceil(p * n) - 1))] / 1000, 3)

    return {"count": n, "p50_ms": rank(0.50), "p95_ms": rank(0.95), "p99_ms": rank(0.99), "max_ms": rank(1.0)}


def _source_address(host: str, node: int) -> str | None:
    """On loopback each node connects from its own address (127.1.x.y), as real nodes do from their own LIFs;
    the daemon keys replay state by node address."""
    if not host.startswith("127."):
        return None
    return f"127.1.{node // 250}.{node % 250 + 2}"


# ------------------------------------------------------------------------------------------------ sink


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

    def __init__(self, directory: Path | None, skip: dict[Path, int] | None = None, *, live: bool = False) -> None:
        """``skip``: bytes at the start of each file not to read (default: what is there now, which belongs to
        an earlier run). ``live``: while the storm runs, keep only the delivered ids (for progress and the end
        of the run) and the arrival latency; the verification proper is a second, full read at the end.
        ``directory`` None: lines are handed in by a subclass (:class:`QueueTail`)."""
        self.directory = directory
        self.live = live
        #: Also record the arrival latency in the full (not live) mode: a queue is read only once.
        self.track_sink_latency = False
        if skip is None:
            skip = {}
            if directory is not None and directory.is_dir():
                for path in directory.glob(_SINK_GLOB):
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
        if self.directory is None or not self.directory.is_dir():
            return 0
        seen_at = _now_us()
        new = 0
        for path in sorted(self.directory.glob(_SINK_GLOB)):
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
            event_id = _id_int(doc["event_id"])
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
        seen_at = _now_us()
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


# ----------------------------------------------------------------------------------------------- nodes


@dataclass(slots=True)
class _SourceState:
    """Mirror of the daemon's per-key highest GenerationTime (reset when the daemon restarts)."""

    epoch: int = -1
    highest: int = -1


@dataclass(slots=True)
class _Expected:
    replayed: int = 0
    out_of_order: int = 0
    duplicate: int = 0
    max_lag_us: int = 0

    def plus(self, other: _Expected) -> _Expected:
        return _Expected(
            self.replayed + other.replayed,
            self.out_of_order + other.out_of_order,
            self.duplicate + other.duplicate,
            max(self.max_lag_us, other.max_lag_us),
        )


@dataclass(slots=True)
class _Shared:
    """What the nodes, the progress line and the coordinator share."""

    expected: set[int] = field(default_factory=set)
    generated: int = 0
    sent_frames: int = 0
    backlog_planned: int = 0
    #: Backlog notifications sent (first copies only: at most ``backlog_planned``).
    backlog_sent: int = 0
    #: Backlog frames sent: first copies and the injected duplicates (what the daemon should flag replayed).
    replay_frames: int = 0
    duplicates_sent: int = 0
    #: Flags the daemon should set on first sends (live and backlog) and on the injected duplicates, apart:
    #: a daemon that suppresses duplicates (dedup_mode = exact) delivers only the first.
    expect_first: _Expected = field(default_factory=_Expected)
    expect_duplicates: _Expected = field(default_factory=_Expected)
    first_backlog_at: float | None = None
    last_backlog_at: float | None = None
    reconnect_s: list[float] = field(default_factory=list)
    daemon_epoch: int = 0
    phase: str = "live"
    nodes_done: int = 0
    #: Set once half the planned backlog has been sent (the restart point).
    half_replayed: asyncio.Event = field(default_factory=asyncio.Event)
    #: Cleared at the restart point so that no node writes until the daemon is back: the stop then lands
    #: mid-replay whatever the size of the run (nodes still see the BACK_PRESSURE_APPLY and the close).
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    restart_begun: bool = False
    restart_at_half: bool = False
    #: Sync engine: requests sent again after a session was lost with them unanswered.
    resent: int = 0
    #: Sync engine: SCREEN_RESPs answered (and unmatched: for a ReqId not outstanding).
    answered: int = 0
    unmatched_responses: int = 0
    #: Set whenever a node wrote a chunk (the kill mode waits for one after freezing the daemon).
    wrote: asyncio.Event = field(default_factory=asyncio.Event)
    #: Kill mode: freezes the daemon (SIGSTOP) the moment half the backlog was written.
    freeze_at_half: Callable[[], None] | None = None
    #: Set by the sink tail once every generated notification is in the sink (checked after the drive only).
    all_delivered: asyncio.Event = field(default_factory=asyncio.Event)


class _Kind(Enum):
    LIVE = "live"
    BACKLOG = "backlog"
    DUPLICATE = "duplicate"
    #: Sync engine: sent again because the session that carried it was lost before it was answered.
    RESEND = "resend"


class _Item(NamedTuple):
    """One frame to send: the notification, why it is sent, and (duplicates) the daemon run of the original."""

    spec: NotificationSpec
    kind: _Kind
    epoch: int = -1


class _DisconnectedError(Exception):
    """The daemon closed the connection (or it broke); the node reconnects."""


class _Node:
    """One simulated node across its sessions."""

    def __init__(
        self,
        *,
        cfg: ReplayTestConfig,
        node: int,
        count: int,
        shared: _Shared,
        address: Callable[[], tuple[str, int]],
        source: _SourceState,
    ) -> None:
        self.cfg = cfg
        self.node = node
        self.shared = shared
        self.address = address
        self.source = source
        self.stream = NodeStream(seed=cfg.seed, node=node, count=count, vs_uuid=cfg.vs_uuid)
        self.hello = handshake(seed=cfg.seed, node=node, policy_name=cfg.policy_name, vs_uuid=cfg.vs_uuid)
        self.rng = random.Random(f"replay-test:{cfg.seed}:{node}")
        self.before = round(count * cfg.before_fraction)
        self.outage = round(count * cfg.outage_fraction)
        self.after = count - self.before - self.outage
        self.live_left = self.before
        self.backlog: list[NotificationSpec] = []
        self.pending_duplicates: list[tuple[int, _Item]] = []  # (due after this many frames, the copy)
        self.frames_sent = 0
        self.last_generation_us = 0
        self.session_start_us = 0
        self.peer: OntapPeer | None = None
        self.reader_task: asyncio.Task[None] | None = None
        self.resume = asyncio.Event()
        self.lost = asyncio.Event()
        #: Sync engine: requests sent and not answered yet (ReqId → copies in flight, oldest first), and those
        #: a lost session left unanswered, to be sent again first.
        self.outstanding: dict[int, list[_Item]] = {}
        self.outstanding_count = 0
        self.resend: list[_Item] = []
        self.answer = asyncio.Event()

    # -- generation

    def _generate(self) -> NotificationSpec:
        stamp = max(_now_us(), self.last_generation_us + 1)
        self.last_generation_us = stamp
        spec = self.stream.next(stamp)
        self.shared.expected.add(_id_int(self.stream.event_id(spec)))
        self.shared.generated += 1
        return spec

    # -- connection

    async def _connect(self, deadline: float) -> None:
        while True:
            host, port = self.address()
            source = _source_address(host, self.node)
            try:
                peer = await OntapPeer.connect(host, port, source=source, timeout_s=5.0)
                break
            except (OSError, TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise ReplayTestError(f"node {self.node}: cannot connect to {host}:{port}: {exc}") from exc
                await asyncio.sleep(_RECONNECT_PAUSE_S)
        self.session_start_us = _now_us()
        try:
            # A reset before NEGO_REQ (PeerResetError): a connect can succeed and be reset at once when the kernel
            # takes it into the backlog of a daemon that is stopped (SIGSTOP before the kill mode's SIGKILL) and
            # resets it when the process dies. ONTAP reconnects.
            first = await peer.handshake(self.hello, 10.0)
            if not isinstance(peer.decode(first).message, HandshakeResp):
                raise ReplayTestError(f"node {self.node}: the first reply was not NEGO_RESP")
        except (PeerResetError, PeerClosedError) as exc:
            peer.writer.close()
            raise _DisconnectedError(str(exc)) from exc
        except (PeerError, RemoteProtocolError) as exc:
            peer.writer.close()
            raise _DisconnectedError(f"handshake failed: {exc}") from exc
        except BaseException:
            peer.writer.close()
            raise
        self.peer = peer
        self.resume.set()
        self.lost.clear()
        for payload in peer.take():
            self._server_message(payload)
        self.reader_task = asyncio.create_task(self._read(peer))

    def _server_message(self, payload: bytes) -> None:
        msg = OntapPeer.decode(payload).message
        if isinstance(msg, ScreenResponse):
            copies = self.outstanding.get(msg.req_id)
            if not copies:
                self.shared.unmatched_responses += 1
                return
            copies.pop(0)
            if not copies:
                del self.outstanding[msg.req_id]
            self.outstanding_count -= 1
            self.shared.answered += 1
            self.answer.set()
        elif isinstance(msg, BackPressure):
            if msg.apply:
                self.resume.clear()
            else:
                self.resume.set()

    async def _read(self, peer: OntapPeer) -> None:
        try:
            while await peer.read_some():
                for payload in peer.take():
                    self._server_message(payload)
        except (OSError, RemoteProtocolError):
            pass
        finally:
            self.lost.set()

    async def _close(self) -> None:
        """Half-close and wait until the daemon closes too: then it has read everything this node sent."""
        peer = self.peer
        self.peer = None
        if peer is None:
            return
        # A reset connection's transport is already closed (uvloop then raises RuntimeError, not OSError).
        if not peer.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                peer.half_close()
        if self.reader_task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.reader_task), 30.0)
        await peer.close()

    async def _reconnect(self, *, first: bool = False) -> None:
        """Connect and handshake, retrying for up to ``settle_timeout_s``; the time it took is a reconnect time
        (from the moment the session was found gone, or the planned outage ended) unless ``first``."""
        lost_at = time.monotonic()
        deadline = lost_at + self.cfg.settle_timeout_s
        await self._close()
        if self.outstanding:
            # The lost session never answered these: send them again first, as ONTAP retries a request whose
            # server went away (whether the daemon made them durable before it went is unknown here).
            unanswered = [_Item(item.spec, _Kind.RESEND, item.epoch) for c in self.outstanding.values() for item in c]
            unanswered.sort(key=lambda item: item.spec.req_id)
            self.resend[:0] = unanswered
            self.outstanding.clear()
            self.outstanding_count = 0
        while True:
            try:
                await self._connect(deadline)
                break
            except _DisconnectedError as exc:
                if time.monotonic() > deadline:
                    raise ReplayTestError(f"node {self.node}: no session within settle_timeout_s: {exc}") from exc
                await asyncio.sleep(_RECONNECT_PAUSE_S)
        if not first:
            self.shared.reconnect_s.append(time.monotonic() - lost_at)

    # -- sending

    async def _send(self, chunk: list[_Item]) -> None:
        """Write one chunk; raises _DisconnectedError if the session is gone (the chunk is then sent again)."""
        while not self.resume.is_set():
            if self.lost.is_set():
                raise _DisconnectedError("lost while paused")
            waiter = asyncio.create_task(self.resume.wait())
            lost = asyncio.create_task(self.lost.wait())
            await asyncio.wait((waiter, lost), return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            lost.cancel()
        await self.shared.gate.wait()
        peer = self.peer
        if peer is None or self.lost.is_set() or peer.is_closing():
            raise _DisconnectedError("connection closed")
        try:
            peer.write(b"".join([self.stream.frame(item.spec) for item in chunk]))
        except (OSError, RuntimeError) as exc:  # uvloop: RuntimeError once the transport is closed by a reset
            raise _DisconnectedError(str(exc)) from exc
        if self.cfg.sync:
            # Written: from now on the chunk is outstanding, and a lost session sends it again (not the pump).
            for item in chunk:
                self.outstanding.setdefault(item.spec.req_id, []).append(item)
            self.outstanding_count += len(chunk)
            self._account(chunk)
            with contextlib.suppress(OSError):
                await peer.drain()
            return
        try:
            await peer.drain()
        except OSError as exc:
            raise _DisconnectedError(str(exc)) from exc
        self._account(chunk)

    def _account(self, chunk: list[_Item]) -> None:
        """What the daemon should flag for a chunk it has read, mirrored from its rules; duplicates scheduled."""
        shared, source, cfg = self.shared, self.source, self.cfg
        epoch = shared.daemon_epoch
        if source.epoch != epoch:
            source.epoch, source.highest = epoch, -1
        replay_before = self.session_start_us - round(cfg.clock_tolerance_s * 1_000_000)
        now = time.monotonic()
        crossed_half = False
        for position, item in enumerate(chunk, self.frames_sent + 1):
            if item.kind is _Kind.RESEND:
                shared.resent += 1  # not mirrored: whether the daemon saw the first copy is unknown
                continue
            generation = item.spec.time_us
            expect = shared.expect_duplicates if item.kind is _Kind.DUPLICATE else shared.expect_first
            if generation < source.highest:
                expect.out_of_order += 1
                expect.max_lag_us = max(expect.max_lag_us, source.highest - generation)
            else:
                source.highest = generation
            if generation < replay_before:
                expect.replayed += 1
            if item.kind is _Kind.LIVE:
                continue
            shared.replay_frames += 1
            if shared.first_backlog_at is None:
                shared.first_backlog_at = now
            shared.last_backlog_at = now
            if item.kind is _Kind.DUPLICATE:
                shared.duplicates_sent += 1
                # The daemon remembers ids per run (a bounded window): a duplicate of a notification sent to the
                # daemon before it restarted is not recognisable as one.
                if item.epoch == epoch:
                    expect.duplicate += 1
                continue  # a second copy: not part of the backlog's progress
            if cfg.duplicates and self.rng.random() < cfg.duplicates:
                due = position + self.rng.randrange(1, _DUPLICATE_SPREAD)
                self.pending_duplicates.append((due, _Item(item.spec, _Kind.DUPLICATE, epoch)))
            shared.backlog_sent += 1
            if shared.backlog_sent * 2 >= shared.backlog_planned and not shared.half_replayed.is_set():
                shared.half_replayed.set()
                crossed_half = True
                if shared.restart_at_half:
                    shared.gate.clear()
        self.frames_sent += len(chunk)
        shared.sent_frames += len(chunk)
        shared.wrote.set()
        if crossed_half and shared.freeze_at_half is not None:
            # Right now, not when the restart task gets its turn: the nodes keep writing into the frozen daemon.
            shared.freeze_at_half()
            shared.wrote.clear()

    def _due_duplicates(self, room: int, *, all_now: bool = False) -> list[_Item]:
        due = [entry for entry in self.pending_duplicates if all_now or entry[0] <= self.frames_sent][:room]
        for entry in due:
            self.pending_duplicates.remove(entry)
        return [item for _due, item in due]

    def _next_chunk(self, size: int = _CHUNK) -> list[_Item]:
        """Requests a lost session left unanswered first (sync engine), then live: this chunk's share of new
        notifications, then backlog, then duplicates that are due; at most ``size``."""
        if self.resend:
            chunk, self.resend = self.resend[:size], self.resend[size:]
            return chunk
        live_total, backlog_left = self.live_left, len(self.backlog)
        if backlog_left:
            live_n = min(live_total, max(1, round(size * live_total / (live_total + backlog_left))))
        else:
            live_n = min(live_total, size)
        chunk = [_Item(self._generate(), _Kind.LIVE) for _ in range(live_n)]
        self.live_left -= live_n
        while self.backlog and len(chunk) < size:
            chunk.append(_Item(self.backlog.pop(), _Kind.BACKLOG))
        chunk.extend(self._due_duplicates(max(1, size - len(chunk))) if len(chunk) < size else [])
        return chunk or self._due_duplicates(size, all_now=True)  # only duplicates not yet due are left

    async def _pump(self, chunk: list[_Item]) -> None:
        """Send a chunk, reconnecting as often as needed."""
        while True:
            try:
                await self._send(chunk)
                return
            except _DisconnectedError:
                await self._reconnect()

    def _has_work(self) -> bool:
        return bool(self.resend or self.live_left or self.backlog or self.pending_duplicates)

    async def _drain_work(self) -> None:
        if not self.cfg.sync:
            while self._has_work():
                await self._pump(self._next_chunk())
            return
        # Sync engine: at most sync_window requests unanswered; done when everything was answered.
        window = self.cfg.sync_window
        while self._has_work() or self.outstanding_count:
            room = window - self.outstanding_count
            if room > 0 and self._has_work():
                await self._pump(self._next_chunk(min(_CHUNK, room)))
                continue
            if self.lost.is_set():
                await self._reconnect()
                continue
            self.answer.clear()
            answer = asyncio.create_task(self.answer.wait())
            lost = asyncio.create_task(self.lost.wait())
            await asyncio.wait((answer, lost), return_when=asyncio.FIRST_COMPLETED)
            answer.cancel()
            lost.cancel()

    async def run(self) -> None:
        cfg = self.cfg
        await self._reconnect(first=True)
        await self._drain_work()  # phase 1: live
        await self._close()
        if self.shared.phase == "live":
            self.shared.phase = "outage"
        # phase 2: outage; the backlog is generated while no connection exists
        step_s = cfg.outage_s / _OUTAGE_STEPS
        made = 0
        for step in range(1, _OUTAGE_STEPS + 1):
            target = self.outage * step // _OUTAGE_STEPS
            self.backlog.extend(self._generate() for _ in range(target - made))
            made = target
            await asyncio.sleep(step_s)
        if cfg.shuffle:
            self.rng.shuffle(self.backlog)
        self.backlog.reverse()  # popped from the end: oldest (or first shuffled) first
        self.shared.phase = "replay"
        # phase 3: reconnect, replay the backlog behind live traffic
        self.live_left = self.after
        await self._reconnect()
        await self._drain_work()
        await self._close()
        self.shared.nodes_done += 1


# ---------------------------------------------------------------------------------------------- daemon


class _InProcessDaemon:
    """fpolicyd.app.Daemon on 127.0.0.1 with its data in ``data_dir``; restartable on the same port."""

    def __init__(self, data_dir: Path, overrides: dict[str, Any]) -> None:
        from fpolicyd.config import Settings, load_settings  # noqa: PLC0415 - only the in-process mode needs it

        values: dict[str, Any] = {
            "listen_host": "127.0.0.1",
            "listen_port": 0,
            "data_dir": str(data_dir),
            "sinks": f"jsonl:{data_dir / 'events'}",
            "log_level": "warning",
        }
        if "http_enabled" in Settings.model_fields:
            values["http_enabled"] = False
        values.update(overrides)
        self.settings = load_settings(overrides=values, search_default_paths=False)
        self.sink_dir = data_dir / "events"
        self.port = 0
        self.instances: list[dict[str, Any]] = []
        self._daemon: Any = None

    async def start(self) -> None:
        from fpolicyd.app import Daemon  # noqa: PLC0415

        settings = self.settings
        if self.port:
            settings = settings.model_copy(update={"listen_port": self.port})
        daemon = Daemon(settings)
        try:
            await daemon.start()
        except BaseException:
            await daemon.stop()
            raise
        self._daemon = daemon
        self.port = daemon.port

    async def stop(self) -> None:
        daemon, self._daemon = self._daemon, None
        if daemon is None:
            return
        replay = daemon.context.ingest.replay
        report = await daemon.stop()
        # Close an episode still open at the stop (as if the idle time had passed) to report its figures.
        stats = replay.stats(asyncio.get_running_loop().time() + replay.episode_idle_s)
        self.instances.append(
            {
                "stop": {"events": report.events, "undelivered": report.undelivered, "failure": report.failure},
                "replay": _readable_stats(stats.to_dict()),
            }
        )
        if report.failure is not None:
            raise ReplayTestError(f"the daemon failed: {report.failure}")

    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def undelivered(self) -> int:
        return int(self.instances[-1]["stop"]["undelivered"]) if self.instances else 0

    def summary(self) -> dict[str, Any]:
        return {
            "process": "in-process",
            "restarts": max(0, len(self.instances) - 1),
            "totals": _daemon_totals([i["replay"] for i in self.instances]),
            "instances": self.instances,
        }


#: How long a daemon subprocess has to log "listening", and to exit after SIGTERM (it drains its sinks first).
_START_TIMEOUT_S: Final = 60.0
_STOP_TIMEOUT_S: Final = 600.0
#: Kill mode: how long the frozen daemon waits for the nodes to write more before the SIGKILL, at most (nodes with
#: a full sync window or no work left write nothing more).
_FREEZE_S: Final = 2.0
#: Log lines of a daemon subprocess kept for error messages.
_LOG_TAIL: Final = 20


class _SubprocessDaemon:
    """``python -m fpolicyd serve`` on 127.0.0.1 (port 0, read from its "listening" log line; HTTP port 0) with
    its data in ``data_dir``; stopped with SIGTERM (graceful) or SIGKILL, and started again on the same data.
    Settings other than the listener, data directory and sinks go in as ``FPOLICYD_<NAME>`` variables."""

    def __init__(self, data_dir: Path, overrides: dict[str, Any]) -> None:
        self.data_dir = data_dir
        self.sink_dir = data_dir / "events"
        self.overrides = dict(overrides)
        self.sinks = str(self.overrides.pop("sinks", f"jsonl:{self.sink_dir}"))
        self.port = 0
        self.instances: list[dict[str, Any]] = []
        self._process: asyncio.subprocess.Process | None = None
        self._log_task: asyncio.Task[None] | None = None
        self._log: list[dict[str, Any]] = []
        self._stopped: dict[str, Any] | None = None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key, value in self.overrides.items():
            env[f"FPOLICYD_{key.upper()}"] = value.value if isinstance(value, Enum) else str(value)
        return env

    async def _read_log(self, stream: asyncio.StreamReader, ready: asyncio.Future[int]) -> None:
        while line := await stream.readline():
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                record = {"event": "raw", "line": line.decode(errors="replace").rstrip()}
            if not isinstance(record, dict):
                continue
            self._log.append(record)
            del self._log[:-_LOG_TAIL]
            event = record.get("event")
            if event == "listening" and not ready.done():
                ready.set_result(int(record["port"]))
            elif event == "stopped":
                self._stopped = record
        if not ready.done():
            ready.set_exception(ReplayTestError(f"the daemon exited before listening; its last log: {self._log}"))

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log, self._stopped = [], None
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fpolicyd",
            "serve",
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            "0",
            "--http-port",
            "0",
            "--data-dir",
            str(self.data_dir),
            "--sinks",
            self.sinks,
            cwd=self.data_dir,  # no fpolicyd.toml of the caller's working directory
            env=self._env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            limit=1 << 20,
        )
        assert process.stderr is not None
        self._process = process
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._log_task = asyncio.create_task(self._read_log(process.stderr, ready))
        try:
            self.port = await asyncio.wait_for(ready, _START_TIMEOUT_S)
        except BaseException as exc:
            await self._end(signal.SIGKILL)
            if isinstance(exc, TimeoutError):
                raise ReplayTestError(f"the daemon did not listen within {_START_TIMEOUT_S:g} s: {self._log}") from None
            raise

    async def _end(self, how: signal.Signals) -> int | None:
        process, self._process = self._process, None
        if process is None:
            return None
        if process.returncode is None:
            process.send_signal(how)
        try:
            code = await asyncio.wait_for(process.wait(), _STOP_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            code = await process.wait()
        if self._log_task is not None:
            await self._log_task
        return code

    async def stop(self) -> None:
        """SIGTERM: the daemon drains and checkpoints, like a graceful in-process stop."""
        if self._process is None:
            return
        code = await self._end(signal.SIGTERM)
        stopped = self._stopped or {}
        self.instances.append(
            {
                "signal": "SIGTERM",
                "exit_code": code,
                "stop": {k: stopped.get(k) for k in ("events", "undelivered", "failure")},
            }
        )
        if code != 0 or stopped.get("failure"):
            raise ReplayTestError(f"the daemon failed (exit {code}); its last log: {self._log}")

    def freeze(self) -> None:
        """SIGSTOP: the daemon reads and answers nothing more, while the nodes can still write to its sockets."""
        if self._process is not None and self._process.returncode is None:
            self._process.send_signal(signal.SIGSTOP)

    async def kill(self) -> None:
        """SIGKILL: no drain, no checkpoint, nothing flushed; what the spool holds is all that is left."""
        code = await self._end(signal.SIGKILL)
        self.instances.append({"signal": "SIGKILL", "exit_code": code})

    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def undelivered(self) -> int:
        last = self.instances[-1] if self.instances else {}
        return int(last.get("stop", {}).get("undelivered") or 0)

    def summary(self) -> dict[str, Any]:
        return {
            "process": "subprocess",
            "restarts": max(0, len(self.instances) - 1),
            "kills": sum(1 for i in self.instances if i["signal"] == "SIGKILL"),
            "instances": self.instances,
        }


# ---------------------------------------------------------------------------------------------- engine


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


async def _progress(shared: _Shared, sink: SinkTail, cfg: ReplayTestConfig, out: IO[str], started: float) -> None:
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
        figures = _percentiles(fresh)
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

    def sample_now(self, shared: _Shared, sink: SinkTail, started: float, phase: str | None = None) -> None:
        self.sample(
            time.monotonic() - started,
            phase or shared.phase,
            shared.sent_frames,
            len(sink.delivered),
            sink.sink_latency_us,
        )


async def _sample_timeline(timeline: _Timeline, shared: _Shared, sink: SinkTail, started: float) -> None:
    timeline.begin(time.monotonic() - started)
    while True:
        await asyncio.sleep(timeline.interval_s(time.monotonic() - started))
        timeline.sample_now(shared, sink, started)


async def _tail(
    sink: SinkTail, shared: _Shared, stop: asyncio.Event, poll_s: Callable[[], float] = lambda: _SINK_POLL_S
) -> None:
    """Poll the sink on a thread (the GIL is shared, but the event loop keeps its turns) every ``poll_s()``
    seconds until ``stop``."""
    while not stop.is_set():
        await asyncio.to_thread(sink.poll)
        if shared.phase == "verify" and _all_delivered(shared.expected, sink.delivered):
            shared.all_delivered.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), poll_s())


#: Concurrent ReceiveMessage loops draining the verification queue (10 messages per call at most).
_QUEUE_RECEIVERS: Final = 4
#: Long-poll wait of each ReceiveMessage (whole seconds, the API's unit).
_QUEUE_WAIT_S: Final = 1
#: Visibility timeout of each ReceiveMessage: a message whose receive response was lost (a call that failed after
#: the queue had handed it out) comes back after this long. Messages are deleted right after they are counted, so
#: this only has to outlast one DeleteMessageBatch; a re-receipt is counted as a redelivered line, never twice.
_QUEUE_VISIBILITY_S: Final = 10
#: Pause after a failed ReceiveMessage / DeleteMessageBatch.
_QUEUE_ERROR_PAUSE_S: Final = 0.5
#: Empty long polls in a row (per receiver) that end the final drain once the daemon has stopped.
_QUEUE_QUIET_POLLS: Final = 2


async def _drain_queue(queue: QueueTail, shared: _Shared, stop: asyncio.Event) -> None:
    """Receive and delete while the storm runs (so the queue never piles up), until ``stop``."""

    async def receiver() -> None:
        while not stop.is_set():
            await queue.receive(_QUEUE_WAIT_S)
            if shared.phase == "verify" and _all_delivered(shared.expected, queue.delivered):
                shared.all_delivered.set()

    await asyncio.gather(*(receiver() for _ in range(_QUEUE_RECEIVERS)))


async def _final_drain(queue: QueueTail, bound_s: float) -> None:
    """After the daemon stopped: drain what is left (late deliveries, duplicates) until every receiver saw the
    queue empty ``_QUEUE_QUIET_POLLS`` times in a row and the queue holds no message (visible or in flight), or
    ``bound_s`` passed.

    In flight: a standard queue may hand one message to two concurrent receives; a delete with the older receipt
    handle may then leave it, invisible, until its visibility timeout. It is received (and counted as a
    redelivered line) once it is visible again, so a drain that stopped at the first quiet polls would leave it."""

    async def receiver() -> None:
        quiet = 0
        while quiet < _QUEUE_QUIET_POLLS:
            got = await queue.receive(_QUEUE_WAIT_S)
            quiet = quiet + 1 if got == 0 else 0  # a failed call (None) says nothing about the queue

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(bound_s):
            while True:
                await asyncio.gather(*(receiver() for _ in range(_QUEUE_RECEIVERS)))
                if await queue.remaining() == 0:
                    return


async def _restart_when_half_replayed(
    shared: _Shared, daemon: _InProcessDaemon | _SubprocessDaemon, mode: RestartMode, log: IO[str]
) -> None:
    await shared.half_replayed.wait()
    shared.restart_begun = True
    if mode is RestartMode.KILL:
        assert isinstance(daemon, _SubprocessDaemon)
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
    daemon: _InProcessDaemon | _SubprocessDaemon | None = None
    sink_dir: Path | None = cfg.sink_dir
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
            if cfg.in_subprocess:
                daemon = _SubprocessDaemon(data_dir, overrides)
            else:
                daemon = _InProcessDaemon(data_dir, overrides)
                cfg = replace(cfg, clock_tolerance_s=daemon.settings.replay_clock_tolerance_s)
        except BaseException:
            if temp is not None:
                shutil.rmtree(temp, ignore_errors=True)
            raise
        if cfg.sink is None:
            sink_dir = sink_dir or daemon.sink_dir
        address: Callable[[], tuple[str, int]] = daemon.address
    else:
        target = cfg.target

        def address() -> tuple[str, int]:
            return target

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
            sink = SinkTail(sink_dir, live=True)
        return await _run(cfg, sink, daemon, address, log=log, started=started, before_verify=before_verify)


async def _run(
    cfg: ReplayTestConfig,
    sink: SinkTail,
    daemon: _InProcessDaemon | _SubprocessDaemon | None,
    address: Callable[[], tuple[str, int]],
    *,
    log: IO[str],
    started: float,
    before_verify: Callable[[Path], None] | None,
) -> dict[str, Any]:
    shared = _Shared()
    shared.gate.set()
    shared.restart_at_half = cfg.restart_daemon and daemon is not None and not cfg.kill
    if cfg.kill and isinstance(daemon, _SubprocessDaemon):
        shared.freeze_at_half = daemon.freeze
    sources: dict[str | None, _SourceState] = {}
    nodes: list[_Node] = []
    host = address()[0] if daemon is None else "127.0.0.1"
    for node, count in enumerate(_split(cfg.events, cfg.nodes)):
        key = _source_address(host, node)
        source = sources.setdefault(key, _SourceState())
        nodes.append(_Node(cfg=cfg, node=node, count=count, shared=shared, address=address, source=source))
    shared.backlog_planned = sum(n.outage for n in nodes)
    stop_tail = asyncio.Event()
    timeline = _Timeline(cfg.timeline_interval_s) if cfg.timeline else None
    if isinstance(sink, QueueTail):
        tail = asyncio.create_task(_drain_queue(sink, shared, stop_tail))
    elif timeline is not None:
        # Arrivals are counted when the tail reads them: it polls at least once per sampling interval, or the
        # arrival rate would show the poll period (bursts every 0.25 s) rather than the sink's.
        def poll_s() -> float:
            return min(_SINK_POLL_S, timeline.interval_s(time.monotonic() - started))

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


async def _settle(shared: _Shared, sink: SinkTail, idle_timeout_s: float) -> None:
    """Wait until the sink holds every generated notification, or it took nothing new for ``idle_timeout_s``."""
    lines, progress_at = sink.lines, time.monotonic()
    while time.monotonic() - progress_at < idle_timeout_s:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(shared.all_delivered.wait(), _SINK_POLL_S * 4)
            return
        if sink.lines != lines:
            lines, progress_at = sink.lines, time.monotonic()


async def _drive_and_verify(
    *,
    cfg: ReplayTestConfig,
    shared: _Shared,
    nodes: list[_Node],
    sink: SinkTail,
    daemon: _InProcessDaemon | _SubprocessDaemon | None,
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
    if isinstance(sink, QueueTail):
        # A queue is read once: what was received while the storm ran is the verification; drain the rest.
        await _final_drain(sink, cfg.settle_timeout_s)
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
        sink = SinkTail(sink.directory, live_sink.skipped)
        live_sink.forget_ids()
        while sink.poll():
            pass
    report = _report(
        cfg=cfg,
        shared=shared,
        sink=sink,
        live_sink=live_sink,
        daemon=daemon,
        drove_s=drove_s,
        elapsed_s=time.monotonic() - started,
    )
    if timeline is not None:
        report["timeline"] = timeline_json(timeline.points)
    return report


#: ReplayStats fields that are the daemon's monotonic clock readings: meaningless outside its process.
_MONOTONIC_FIELDS: Final = ("replay_started_at", "replay_ended_at")


def _readable_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """The daemon's ReplayStats for the report: no monotonic clock readings, seconds and rates rounded."""
    return {
        key: round(value, 3) if isinstance(value, float) else value
        for key, value in stats.items()
        if key not in _MONOTONIC_FIELDS
    }


def _daemon_totals(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The daemon's own replay figures over its runs (one per start): what its metrics would show."""
    replay_s = sum(r["replay_duration_s"] for r in runs)
    replayed = sum(r["replay_episode_events"] for r in runs)
    return {
        "events": sum(r["events"] for r in runs),
        "replayed_events": sum(r["replayed_events"] for r in runs),
        "out_of_order_events": sum(r["out_of_order_events"] for r in runs),
        "duplicates": sum(r["duplicates"] for r in runs),
        "max_out_of_order_lag_us": max((r["max_out_of_order_lag_us"] for r in runs), default=0),
        "reconnects": sum(r["reconnects"] for r in runs),
        # Session lost → next NEGO_REQ of the same node: includes the planned outage (report.node_reconnect_s
        # does not).
        "max_session_gap_s": round(max((r["max_reconnect_s"] for r in runs), default=0.0), 3),
        # First → last replayed notification the daemon read, per run, summed: the replay as the daemon saw it.
        "replay_ingest_s": round(replay_s, 3),
        "replay_ingest_eps": round(replayed / replay_s, 1) if replay_s > 0 else 0.0,
    }


def _report(
    *,
    cfg: ReplayTestConfig,
    shared: _Shared,
    sink: SinkTail,
    live_sink: SinkTail,
    daemon: _InProcessDaemon | _SubprocessDaemon | None,
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
        and duplicates_delivered in (0, shared.duplicates_sent)
        and not cfg.kill
        and not shared.resent
    )
    expect = shared.expect_first
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
            "ingest": _percentiles(sink.ingest_latency_us),
            "sink": _percentiles(live_sink.sink_latency_us),
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
