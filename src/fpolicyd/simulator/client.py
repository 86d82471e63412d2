"""The ``fpolicyd simulate`` client: plays ``nodes`` ONTAP nodes against FPolicy servers.

Each node (an :class:`~fpolicyd.simulator.peer.OntapPeer`): NEGO_REQ/NEGO_RESP, a SCREEN_REQ stream written in
pre-encoded chunks with optional rate control, KEEP_ALIVE, BACK_PRESSURE honoured, and an optional synchronous
mode with a ``max_outstanding`` window. In that mode it asks about every request still unanswered after
``status_interval_s`` (STATUS_QUERY_REQ, again every interval, as ONTAP's ``status-req-interval``) and sends a
request again at once when the server answers 2 "request lost". Everything it sees the server do wrong raises
:class:`SimulatorError`; every loop ends by itself (timeouts and ``duration_limit_s``).

Several servers, as ONTAP's external engine lists them (``targets``, ``secondary_targets``): each node opens one
session per server and sends its notifications strictly round-robin over the connected primaries, and over the
connected secondaries only while no primary is connected. A session that breaks while another is connected is
not an error: its node reconnects in the background (a short pause, doubled after each failure) and the server
rejoins the rotation. In sync mode every request it left unanswered is sent at once to another server
(``resent_after_failover``); in async mode what it took is counted ``lost_at_target`` (there is no
acknowledgement, and the simulator has no persistent store to replay from). With no other session connected, a
break ends the run as the server's fault, as with one server. Every server must be reachable at the start.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import math
import operator
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO, Any, Final

import orjson

from fpolicyd.errors import FpolicydError, RemoteProtocolError
from fpolicyd.protocol.messages import (
    ALLOW,
    STATUS_IN_PROGRESS,
    STATUS_REQUEST_LOST,
    BackPressure,
    Handshake,
    HandshakeResp,
    Message,
    NotfType,
    ScreenRequest,
    ScreenResponse,
    StatusQuery,
    StatusQueryResp,
)
from fpolicyd.protocol.xml_codec import encode_keep_alive, encode_message
from fpolicyd.simulator.generate import (
    DEFAULT_BASE_TIME_US,
    DEFAULT_VS_UUID,
    _framed,
    _Spec,
    _specs,
    _to_request,
    generate_requests,
    manifest_record,
    wall_clock_us,
)
from fpolicyd.simulator.peer import DEFAULT_VERSIONS, OntapPeer, PeerError, handshake

__all__ = [
    "MAX_NODES",
    "NodeReport",
    "SimulationReport",
    "SimulatorConfig",
    "SimulatorConfigError",
    "SimulatorError",
    "TargetReport",
    "TargetRole",
    "expected_requests",
    "parse_target",
    "run",
]

MAX_NODES: Final = 4096

#: How long a finished node waits for the server to close after the simulator's half-close.
_LINGER_S: Final = 2.0
#: A lost target is tried again after this pause, doubled after every failure up to the maximum.
_RECONNECT_PAUSE_S: Final = 0.05
_RECONNECT_MAX_PAUSE_S: Final = 2.0
_KEEP_ALIVE_FRAME: Final = encode_keep_alive()


class SimulatorError(FpolicydError):
    """The FPolicy server under test misbehaved (or could not be reached), as seen by the simulator."""


# ----------------------------------------------------------------------------------------------- config


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _help(text: str) -> dict[str, str]:
    """A field's description (``metadata["help"]``): ``fpolicyd simulate --help`` shows it."""
    return {"help": text}


class SimulatorConfigError(ValueError):
    """A :class:`SimulatorConfig` value out of range: ``name`` is the field, ``why`` the rule it breaks."""

    def __init__(self, name: str, why: str, value: object) -> None:
        super().__init__(f"SimulatorConfig.{name}: {why} (got {value!r})")
        self.name = name
        self.why = why
        self.value = value


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """One simulation run. ``nodes`` connections, each sending ``events`` SCREEN_REQs.

    GenerationTime is deterministic by default (``base_time_us`` plus seeded offsets), so that
    :func:`expected_requests` reproduces exactly what :func:`run` sent. ``wall_clock`` stamps each request with
    this host's clock when it is sent instead (what a node does; ``fpolicyd simulate``'s default): such a run is
    not reproducible, and the manifest is the record of what was sent.
    """

    host: str = field(default="127.0.0.1", metadata=_help("FPolicy server host (the one target without --targets)"))
    port: int = field(default=9898, metadata=_help("FPolicy server port (the one target without --targets)"))
    targets: tuple[str, ...] = field(
        default=(),
        metadata=_help(
            "primary servers, HOST:PORT comma-separated (instead of host and port): each node opens a session to "
            "every one and sends its notifications round-robin over those connected, as ONTAP's primary_servers"
        ),
    )
    secondary_targets: tuple[str, ...] = field(
        default=(),
        metadata=_help(
            "secondary servers, HOST:PORT comma-separated: each node connects to them too but sends to them only "
            "while no primary is connected, as ONTAP's secondary_servers"
        ),
    )
    nodes: int = field(
        default=1, metadata=_help(f"simulated ONTAP nodes, each with one connection per target (1..{MAX_NODES})")
    )
    events: int = field(default=1000, metadata=_help("SCREEN_REQs per node (the run sends nodes x events)"))
    duplicate_every: int = field(
        default=0,
        metadata=_help(
            "send every Nth notification a second time right after it, with a new ReqId (events + 1, events + 2, "
            "...), as ONTAP does after a timeout: the next target in the rotation gets it; 0 = none"
        ),
    )
    rate: float = field(default=0.0, metadata=_help("events per second per node; 0 = as fast as the server reads"))
    seed: int = field(
        default=0, metadata=_help("seed of the event stream (same seed, same paths, users and operations)")
    )
    sync: bool = field(default=False, metadata=_help("synchronous engine: wait for a SCREEN_RESP to every request"))
    max_outstanding: int = field(default=500, metadata=_help("sync window, like ONTAP's max-server-reqs (1..10000)"))
    status_interval_s: float = field(
        default=10.0,
        metadata=_help(
            "sync mode: ask about a request unanswered this long (STATUS_QUERY_REQ), again every interval, like "
            "ONTAP's status-req-interval; 0 = never ask"
        ),
    )
    keep_alive_interval_s: float = field(
        default=120.0,
        metadata=_help("KEEP_ALIVE period; 0 = none (ONTAP's own range is 10-600 s; small values are for tests)"),
    )
    versions: tuple[str, ...] = field(
        default=DEFAULT_VERSIONS, metadata=_help("protocol versions offered in NEGO_REQ, comma-separated")
    )
    policy_name: str = field(default="fpolicyd-sim", metadata=_help("policy name in NEGO_REQ"))
    vs_uuid: str = field(default=DEFAULT_VS_UUID, metadata=_help("SVM UUID in NEGO_REQ"))
    base_time_us: int = field(
        default=DEFAULT_BASE_TIME_US,
        metadata=_help(
            "fixed GenerationTime of the stream (epoch microseconds), used unless wall_clock: reproducible runs"
        ),
    )
    wall_clock: bool = field(
        default=False,
        metadata=_help("stamp each request's GenerationTime with this host's clock when it is sent, as a node does"),
    )
    notf_type: str = field(default=NotfType.SCREEN_REQ.value, metadata=_help("header NotfType of every request"))
    connect_timeout_s: float = field(default=5.0, metadata=_help("TCP connect timeout"))
    handshake_timeout_s: float = field(default=5.0, metadata=_help("NEGO_RESP timeout"))
    duration_limit_s: float = field(
        default=600.0, metadata=_help("hard bound on the whole run; a run cut short reports completed=false")
    )
    chunk_events: int = field(default=256, metadata=_help("frames per socket write (1..65536)"))
    manifest: Path | None = field(
        default=None, metadata=_help("if set, one JSON line per sent request (node, req_id, GenerationTime, paths)")
    )

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> SimulatorConfigError:
            return SimulatorConfigError(name, why, getattr(self, name))

        if not isinstance(self.host, str) or not self.host:
            raise bad("host", "must be a non-empty host name or address")
        if not _is_int(self.port) or not 1 <= self.port <= 65535:
            raise bad("port", "must be an integer in 1..65535")
        seen: set[tuple[str, int]] = set()
        for name in ("targets", "secondary_targets"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(t, str) for t in value):
                raise bad(name, "must be a tuple of HOST:PORT strings")
            for text in value:
                try:
                    address = parse_target(text)
                except ValueError:
                    raise bad(name, f"{text!r} is not HOST:PORT with a port in 1..65535") from None
                if address in seen:
                    raise bad(name, f"{text!r} is listed twice (primaries and secondaries together)")
                seen.add(address)
        if self.secondary_targets and (self.host, self.port) in seen and not self.targets:
            raise bad("secondary_targets", f"{self.host}:{self.port} is the primary already")
        if not _is_int(self.nodes) or not 1 <= self.nodes <= MAX_NODES:
            raise bad("nodes", f"must be an integer in 1..{MAX_NODES}")
        if not _is_int(self.events) or self.events < 0:
            raise bad("events", "must be an integer >= 0")
        if not _is_int(self.duplicate_every) or self.duplicate_every < 0:
            raise bad("duplicate_every", "must be an integer >= 0 (0 = no duplicates)")
        if not _finite(self.rate) or self.rate < 0:
            raise bad("rate", "must be a finite number >= 0 (0 = unlimited)")
        if not _is_int(self.seed):
            raise bad("seed", "must be an integer")
        if not isinstance(self.sync, bool):
            raise bad("sync", "must be a bool")
        if not _is_int(self.max_outstanding) or not 1 <= self.max_outstanding <= 10000:
            raise bad("max_outstanding", "must be an integer in 1..10000 (ONTAP's max-server-reqs range)")
        if not _finite(self.status_interval_s) or self.status_interval_s < 0:
            raise bad("status_interval_s", "must be a finite number >= 0 (0 = no STATUS_QUERY)")
        if not _finite(self.keep_alive_interval_s) or self.keep_alive_interval_s < 0:
            raise bad("keep_alive_interval_s", "must be a finite number >= 0 (0 = no KEEP_ALIVE)")
        if (
            not isinstance(self.versions, tuple)
            or not self.versions
            or not all(isinstance(v, str) and v.strip() for v in self.versions)
        ):
            raise bad("versions", "must be a non-empty tuple of version strings")
        if len(set(self.versions)) != len(self.versions):
            raise bad("versions", "must not repeat a version")
        if not isinstance(self.policy_name, str) or not 1 <= len(self.policy_name) <= 256:
            raise bad("policy_name", "must be 1..256 characters")
        if not isinstance(self.vs_uuid, str) or not 1 <= len(self.vs_uuid) <= 36:
            raise bad("vs_uuid", "must be 1..36 characters")
        if not _is_int(self.base_time_us) or self.base_time_us < 0:
            raise bad("base_time_us", "must be an integer >= 0 (epoch microseconds)")
        if not isinstance(self.wall_clock, bool):
            raise bad("wall_clock", "must be a bool")
        if not isinstance(self.notf_type, str) or not self.notf_type.strip():
            raise bad("notf_type", "must be a non-empty header type")
        for name in ("connect_timeout_s", "handshake_timeout_s", "duration_limit_s"):
            value = getattr(self, name)
            if not _finite(value) or value <= 0:
                raise bad(name, "must be a finite number > 0")
        if not _is_int(self.chunk_events) or not 1 <= self.chunk_events <= 65536:
            raise bad("chunk_events", "must be an integer in 1..65536")
        if self.manifest is not None and not isinstance(self.manifest, Path):
            raise bad("manifest", "must be a pathlib.Path or None")

    @property
    def primaries(self) -> tuple[tuple[str, int], ...]:
        """The primary servers: ``targets``, or ``(host, port)`` without them."""
        return tuple(map(parse_target, self.targets)) if self.targets else ((self.host, self.port),)

    @property
    def secondaries(self) -> tuple[tuple[str, int], ...]:
        return tuple(map(parse_target, self.secondary_targets))

    @property
    def duplicates(self) -> int:
        """Notifications each node sends twice (``duplicate_every``)."""
        return self.events // self.duplicate_every if self.duplicate_every else 0

    @property
    def requests_per_node(self) -> int:
        """SCREEN_REQs each node sends: ``events`` and the duplicates."""
        return self.events + self.duplicates


def parse_target(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for an IPv6 address) as (host, port); ``ValueError`` if it is not one."""
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host, int(port)


def expected_requests(config: SimulatorConfig) -> list[tuple[int, ScreenRequest]]:
    """Everything :func:`run` sends for ``config``, as (node, request), node by node in send order.

    A ``wall_clock`` run's GenerationTimes are not known in advance: read its manifest instead. With
    ``duplicate_every`` the second copies are in the list too, each right after its original."""
    if config.wall_clock:
        raise ValueError("a wall_clock run is not reproducible: its manifest records what it sent")
    if not config.duplicate_every:
        return [
            (node, request)
            for node in range(config.nodes)
            for request in generate_requests(
                seed=config.seed,
                node=node,
                count=config.events,
                base_time_us=config.base_time_us,
                notf_type=config.notf_type,
            )
        ]
    return [
        (node, _to_request(spec, config.notf_type))
        for node in range(config.nodes)
        for spec in _with_duplicates(
            _specs(seed=config.seed, node=node, count=config.events, first_req_id=1, base_time_us=config.base_time_us),
            every=config.duplicate_every,
            first_req_id=config.events + 1,
        )
    ]


def _with_duplicates(specs: Iterator[_Spec], *, every: int, first_req_id: int) -> Iterator[_Spec]:
    """``specs`` with every ``every``-th one repeated right after it under a new ReqId (``first_req_id``, then
    one more each time): the same notification (same GenerationTime, so the same event_id), as ONTAP sends it
    again after a timeout. ``every`` = 0: ``specs`` unchanged."""
    next_req_id = first_req_id
    for i, spec in enumerate(specs, start=1):
        yield spec
        if every and i % every == 0:
            yield spec._replace(req_id=next_req_id)
            next_req_id += 1


# ----------------------------------------------------------------------------------------------- report


class TargetRole(enum.Enum):
    """ONTAP's two lists of servers: primaries share the traffic; secondaries get it only while no primary is up."""

    PRIMARY = "primary"
    SECONDARY = "secondary"


@dataclass(frozen=True, slots=True)
class TargetReport:
    """One target's figures (one node's, or every node's summed in :attr:`SimulationReport.targets`)."""

    target: str
    role: TargetRole
    #: SCREEN_REQs written to it: its round-robin share and what was re-sent to it after another target failed
    #: (not the re-sends after a STATUS_QUERY "request lost", which :attr:`NodeReport.resends` counts).
    sent: int
    #: Sync mode: SCREEN_RESPs it sent.
    answered: int
    #: Async mode: notifications written to a session of it that then broke. The asynchronous protocol has no
    #: acknowledgement, so whatever such a session took may be gone (the simulator has no persistent store to
    #: replay it from); what the target kept before it broke is among them.
    lost_at_target: int
    #: Sync mode: requests unanswered when a session of it broke, sent again at once to another target.
    resent_after_failover: int
    #: Sessions opened (NEGO handshakes completed): 1, plus one per reconnect.
    connects: int
    #: Sync mode: when (this host's clock, epoch seconds) the last failover away from it sent its unanswered
    #: requests to the other targets; None if a session of it never broke. Summed over nodes: the latest.
    last_failover_unix_s: float | None = None

    def __add__(self, other: TargetReport) -> TargetReport:
        return TargetReport(
            target=self.target,
            role=self.role,
            sent=self.sent + other.sent,
            answered=self.answered + other.answered,
            lost_at_target=self.lost_at_target + other.lost_at_target,
            resent_after_failover=self.resent_after_failover + other.resent_after_failover,
            connects=self.connects + other.connects,
            last_failover_unix_s=max(
                (t for t in (self.last_failover_unix_s, other.last_failover_unix_s) if t is not None), default=None
            ),
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "target": self.target,
            "role": self.role.value,
            "sent": self.sent,
            "answered": self.answered,
            "lost_at_target": self.lost_at_target,
            "resent_after_failover": self.resent_after_failover,
            "connects": self.connects,
            "last_failover_unix_s": self.last_failover_unix_s,
        }


@dataclass(frozen=True, slots=True)
class NodeReport:
    node: int
    session_id: str
    #: The protocol version the server chose in NEGO_RESP.
    version: str
    sent: int
    responses: int
    keep_alives: int
    back_pressure_applied: int
    #: Sync mode: STATUS_QUERY_REQs sent, the answers "in progress" and "request lost", and the requests sent again
    #: because of a "request lost" for a request still unanswered.
    status_queries: int
    status_in_progress: int
    status_lost: int
    resends: int
    #: Connect to close, seconds.
    elapsed_s: float
    #: Every event sent (and answered, in sync mode) before ``duration_limit_s``.
    completed: bool
    #: One per target, primaries first, in the order configured.
    targets: tuple[TargetReport, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "node": self.node,
            "session_id": self.session_id,
            "version": self.version,
            "sent": self.sent,
            "responses": self.responses,
            "keep_alives": self.keep_alives,
            "back_pressure_applied": self.back_pressure_applied,
            "status_queries": self.status_queries,
            "status_in_progress": self.status_in_progress,
            "status_lost": self.status_lost,
            "resends": self.resends,
            "elapsed_s": round(self.elapsed_s, 6),
            "completed": self.completed,
            "targets": [t.to_dict() for t in self.targets],
        }


@dataclass(frozen=True, slots=True)
class SimulationReport:
    nodes: tuple[NodeReport, ...]
    sync: bool
    #: Wall time of the whole run, seconds.
    elapsed_s: float

    @property
    def sent(self) -> int:
        return sum(n.sent for n in self.nodes)

    @property
    def responses(self) -> int:
        return sum(n.responses for n in self.nodes)

    @property
    def keep_alives(self) -> int:
        return sum(n.keep_alives for n in self.nodes)

    @property
    def status_queries(self) -> int:
        return sum(n.status_queries for n in self.nodes)

    @property
    def resends(self) -> int:
        return sum(n.resends for n in self.nodes)

    @property
    def targets(self) -> tuple[TargetReport, ...]:
        """Each target's figures summed over the nodes."""
        if not self.nodes:
            return ()
        return tuple(functools.reduce(operator.add, per) for per in zip(*(n.targets for n in self.nodes), strict=True))

    @property
    def lost_at_target(self) -> int:
        return sum(t.lost_at_target for n in self.nodes for t in n.targets)

    @property
    def resent_after_failover(self) -> int:
        return sum(t.resent_after_failover for n in self.nodes for t in n.targets)

    @property
    def completed(self) -> bool:
        return all(n.completed for n in self.nodes)

    @property
    def events_per_s(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "sync": self.sync,
            "sent": self.sent,
            "responses": self.responses,
            "keep_alives": self.keep_alives,
            "status_queries": self.status_queries,
            "resends": self.resends,
            "lost_at_target": self.lost_at_target,
            "resent_after_failover": self.resent_after_failover,
            "completed": self.completed,
            "elapsed_s": round(self.elapsed_s, 6),
            "events_per_s": round(self.events_per_s, 1),
            "targets": [t.to_dict() for t in self.targets],
            "nodes": [n.to_dict() for n in self.nodes],
        }


# ----------------------------------------------------------------------------------------------- client


class _Manifest:
    """Append-only JSON Lines of sent requests; shared by all nodes, written a chunk at a time."""

    def __init__(self, path: Path) -> None:
        self._fh: IO[bytes] = path.open("wb")

    def write(self, node: int, specs: Sequence[_Spec], notf_type: str) -> None:
        self._fh.write(b"".join(orjson.dumps(manifest_record(node, _to_request(s, notf_type))) + b"\n" for s in specs))

    def close(self) -> None:
        self._fh.close()


class _State(enum.Enum):
    """A target's session as its node sees it."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    #: Broke mid-run; the node reconnects in the background.
    LOST = "lost"
    #: The server closed it once everything was sent (and answered): not an error, and not used again.
    CLOSED = "closed"


@dataclass(slots=True, eq=False)
class _Session:
    """One node's session with one target: its connection, what it has unanswered, its figures."""

    index: int
    host: str
    port: int
    role: TargetRole
    hs: Handshake
    state: _State = _State.CONNECTING
    peer: OntapPeer | None = None
    version: str = ""
    #: Sync mode: every request written here and not answered yet (ReqId → ReqType) and its frame (to send again
    #: on "request lost" or to another target when this one breaks); with status queries, when to ask next about
    #: each (earliest first: every entry is (re)inserted at now + interval).
    outstanding: dict[int, str] = field(default_factory=dict)
    unanswered_frames: dict[int, bytes] = field(default_factory=dict)
    status_due: dict[int, float] = field(default_factory=dict)
    status_wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: Cleared by BACK_PRESSURE_APPLY, set by BACK_PRESSURE_REM (and by every new connection).
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None
    keep_alive: asyncio.Task[None] | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: SCREEN_REQs written on the current connection.
    written: int = 0
    sent: int = 0
    answered: int = 0
    lost_at_target: int = 0
    resent_after_failover: int = 0
    connects: int = 0
    last_failover_unix_s: float | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def report(self) -> TargetReport:
        return TargetReport(
            target=self.address,
            role=self.role,
            sent=self.sent,
            answered=self.answered,
            lost_at_target=self.lost_at_target,
            resent_after_failover=self.resent_after_failover,
            connects=self.connects,
            last_failover_unix_s=self.last_failover_unix_s,
        )


@dataclass(slots=True)
class _Node:
    """One simulated node: a session with every target, one sender spreading the stream over them."""

    config: SimulatorConfig
    node: int
    manifest: _Manifest | None
    stop_at: float
    sessions: list[_Session] = field(init=False)
    #: The first error of a session's task (the server's misbehaviour, or the loss of the last target).
    failure: asyncio.Future[None] = field(init=False)
    reconnects: set[asyncio.Task[None]] = field(default_factory=set)
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set when a session connects, breaks or has its back pressure removed: the sender's rotation may change.
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: The round-robin position.
    turn: int = 0
    sent: int = 0
    responses: int = 0
    keep_alives: int = 0
    back_pressure_applied: int = 0
    status_queries: int = 0
    status_in_progress: int = 0
    status_lost: int = 0
    resends: int = 0

    def __post_init__(self) -> None:
        cfg = self.config
        addresses = [(a, TargetRole.PRIMARY) for a in cfg.primaries] + [
            (a, TargetRole.SECONDARY) for a in cfg.secondaries
        ]
        self.sessions = [
            _Session(
                index,
                host,
                port,
                role,
                handshake(
                    seed=cfg.seed,
                    node=self.node,
                    policy_name=cfg.policy_name,
                    vs_uuid=cfg.vs_uuid,
                    versions=cfg.versions,
                    target=index,
                ),
            )
            for index, ((host, port), role) in enumerate(addresses)
        ]

    def _fail(self, why: str, session: _Session | None = None) -> SimulatorError:
        if session is None or len(self.sessions) == 1:
            return SimulatorError(f"node {self.node}: {why}")
        return SimulatorError(f"node {self.node}, target {session.address}: {why}")

    async def run(self) -> NodeReport:
        loop = asyncio.get_running_loop()
        start = loop.time()
        self.failure = loop.create_future()
        try:
            for session in self.sessions:
                await self._connect_first(session)
            completed = await self._stream()
        finally:
            for session in self.sessions:
                if session.peer is not None:
                    await session.peer.close()
            if self.failure.done() and not self.failure.cancelled():
                self.failure.exception()  # retrieved: run() raised it already or it came too late to matter
        first = self.sessions[0]
        return NodeReport(
            node=self.node,
            session_id=first.hs.session_id,
            version=first.version,
            sent=self.sent,
            responses=self.responses,
            keep_alives=self.keep_alives,
            back_pressure_applied=self.back_pressure_applied,
            status_queries=self.status_queries,
            status_in_progress=self.status_in_progress,
            status_lost=self.status_lost,
            resends=self.resends,
            elapsed_s=loop.time() - start,
            completed=completed,
            targets=tuple(session.report() for session in self.sessions),
        )

    # -- sessions

    async def _connect_first(self, s: _Session) -> None:
        """The run's first session with ``s``: every target must be reachable at the start."""
        cfg = self.config
        try:
            await self._open(s)
        except TimeoutError:
            raise self._fail(f"connect to {s.host}:{s.port} timed out after {cfg.connect_timeout_s} s", s) from None
        except PeerError as exc:
            raise self._fail(str(exc), s) from exc
        except OSError as exc:
            raise self._fail(f"cannot connect to {s.host}:{s.port}: {exc}", s) from exc

    async def _open(self, s: _Session) -> None:
        """Connect, NEGO, and start the session's reader, keep-alive and status tasks. Raises ``OSError``,
        ``TimeoutError`` or :class:`PeerError` when the target cannot be reached, :class:`SimulatorError` when it
        answers wrongly."""
        cfg = self.config
        s.state = _State.CONNECTING
        peer = await OntapPeer.connect(s.host, s.port, timeout_s=cfg.connect_timeout_s)
        s.peer = peer
        try:
            await self._handshake(s, peer)
        except BaseException:
            await peer.close()
            raise
        s.state = _State.CONNECTED
        s.connects += 1
        s.written = 0
        s.resume.set()
        # Frames that came with NEGO_RESP (e.g. BACK_PRESSURE_APPLY) take effect before the first request.
        for payload in peer.take():
            self._handle(s, payload)
        s.reader = self._spawn(s, self._read_loop(s, peer))
        s.keep_alive = None
        if cfg.keep_alive_interval_s > 0:
            s.keep_alive = self._spawn(s, self._keep_alive_loop(s))
        if cfg.sync and cfg.status_interval_s > 0:
            self._spawn(s, self._status_loop(s))
        self.changed.set()

    def _spawn(self, s: _Session | None, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        if s is not None:
            s.tasks.append(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not self.failure.done():
            self.failure.set_exception(exc)

    def _lose(self, s: _Session, why: str) -> None:
        """``s`` broke. Alone, that ends the run as the server's fault (``why``); with another target connected,
        its traffic moves there: in sync mode everything it had unanswered is sent there at once, in async mode
        what it took is counted lost; and the node reconnects to it in the background."""
        if s.state is not _State.CONNECTED:
            return
        s.state = _State.LOST
        up = [o for o in self.sessions if o.state is _State.CONNECTED]
        if not up:
            raise self._fail(why, s)
        current = asyncio.current_task()
        for task in s.tasks:
            if task is not current:
                task.cancel()
        assert s.peer is not None
        s.peer.abort()
        if self.config.sync:
            self._failover(s, up)
        else:
            s.lost_at_target += s.written
        s.written = 0
        self.progress.set()
        self.changed.set()
        self.reconnects.add(self._spawn(None, self._reconnect(s)))

    def _failover(self, dead: _Session, up: list[_Session]) -> None:
        """Send every request ``dead`` left unanswered to the connected targets, round-robin, at once."""
        cfg = self.config
        pool = [o for o in up if o.role is TargetRole.PRIMARY] or up
        moved = list(dead.outstanding.items())
        dead.resent_after_failover += len(moved)
        asked_at = asyncio.get_running_loop().time() + cfg.status_interval_s
        frames: dict[_Session, list[bytes]] = {}
        for req_id, req_type in moved:
            to = pool[self.turn % len(pool)]
            self.turn += 1
            frame = dead.unanswered_frames[req_id]
            to.outstanding[req_id] = req_type
            to.unanswered_frames[req_id] = frame
            if cfg.status_interval_s > 0:
                to.status_due[req_id] = asked_at
                to.status_wake.set()
            frames.setdefault(to, []).append(frame)
        dead.outstanding.clear()
        dead.unanswered_frames.clear()
        dead.status_due.clear()
        for to, batch in frames.items():
            to.sent += len(batch)
            to.written += len(batch)
            self._write(to, b"".join(batch))
        dead.last_failover_unix_s = time.time()  # the re-sends are written (buffered to the survivors' sockets)

    async def _reconnect(self, s: _Session) -> None:
        """Reconnect to a lost target, pausing ``_RECONNECT_PAUSE_S`` and doubling the pause after each failure
        up to ``_RECONNECT_MAX_PAUSE_S``; once connected, it rejoins the rotation."""
        pause = _RECONNECT_PAUSE_S
        while True:
            await asyncio.sleep(pause)
            try:
                await self._open(s)
            except (OSError, TimeoutError, PeerError):
                s.state = _State.LOST
                pause = min(2 * pause, _RECONNECT_MAX_PAUSE_S)
                continue
            return

    def _write(self, s: _Session, data: bytes) -> None:
        assert s.peer is not None
        try:
            s.peer.write(data)
        except (OSError, RuntimeError) as exc:  # uvloop raises RuntimeError on a transport closed by a reset
            self._lose(s, f"connection error after {self.sent} requests: {exc}")

    def _rotation(self) -> list[_Session]:
        """Where notifications go now: the connected primaries, or the connected secondaries while no primary is
        connected; of those, the ones not holding back pressure."""
        up = [s for s in self.sessions if s.state is _State.CONNECTED]
        pool = [s for s in up if s.role is TargetRole.PRIMARY] or up
        return [s for s in pool if s.resume.is_set()]

    def _outstanding(self) -> int:
        return sum(len(s.outstanding) for s in self.sessions)

    # -- receiving

    def _decode(self, s: _Session, peer: OntapPeer, payload: bytes) -> tuple[str, Message]:
        try:
            decoded = peer.decode(payload)
        except RemoteProtocolError as exc:
            raise self._fail(f"undecodable message from the server: {exc}", s) from exc
        header = decoded.header
        if header.content_len != decoded.body_length:
            raise self._fail(
                f"{header.notf_type} header ContentLen {header.content_len} != body length {decoded.body_length}", s
            )
        return header.notf_type, decoded.message

    async def _handshake(self, s: _Session, peer: OntapPeer) -> None:
        hs = s.hs
        first = await peer.handshake(hs, self.config.handshake_timeout_s)
        notf_type, msg = self._decode(s, peer, first)
        if not isinstance(msg, HandshakeResp):
            raise self._fail(f"expected NEGO_RESP as the first message, got {notf_type}", s)
        for what, got, want in (
            ("VsUUID", msg.vs_uuid, hs.vs_uuid),
            ("PolicyName", msg.policy_name, hs.policy_name),
            ("SessionId", msg.session_id, hs.session_id),
        ):
            if got != want:
                raise self._fail(f"NEGO_RESP {what} {got!r} does not echo the NEGO_REQ's {want!r}", s)
        if msg.version not in hs.versions:
            raise self._fail(f"NEGO_RESP chose version {msg.version!r}, not in the offer {list(hs.versions)}", s)
        s.version = msg.version

    def _handle(self, s: _Session, payload: bytes) -> None:
        assert s.peer is not None
        notf_type, msg = self._decode(s, s.peer, payload)
        if isinstance(msg, ScreenResponse):
            if not self.config.sync:
                raise self._fail(f"SCREEN_RESP (ReqId {msg.req_id}) from the server in asynchronous mode", s)
            req_type = s.outstanding.pop(msg.req_id, None)
            if req_type is None:
                raise self._fail(f"SCREEN_RESP for ReqId {msg.req_id}, which is not outstanding", s)
            if req_type != msg.req_type:
                raise self._fail(
                    f"SCREEN_RESP for ReqId {msg.req_id} has ReqType {msg.req_type!r}, the request was {req_type!r}",
                    s,
                )
            if msg.notf_resp != ALLOW:
                raise self._fail(f"SCREEN_RESP for ReqId {msg.req_id} has NotfResp {msg.notf_resp}, expected 1", s)
            s.status_due.pop(msg.req_id, None)
            s.unanswered_frames.pop(msg.req_id, None)
            s.answered += 1
            self.responses += 1
            self.progress.set()
        elif isinstance(msg, StatusQueryResp):
            self._status_answer(s, msg)
        elif isinstance(msg, BackPressure):
            if msg.session_id != s.hs.session_id:
                raise self._fail(f"{notf_type} for SessionId {msg.session_id!r}, not this session's", s)
            if msg.apply:
                self.back_pressure_applied += 1
                s.resume.clear()
            else:
                s.resume.set()
                self.changed.set()
        else:
            raise self._fail(f"unexpected {notf_type} from the server", s)

    def _status_answer(self, s: _Session, msg: StatusQueryResp) -> None:
        """The answer to one of our STATUS_QUERY_REQs. "In progress" is only possible for a request not yet
        answered (the server answers the query when it reads it, before any later SCREEN_RESP); "request lost" for
        one still unanswered makes ONTAP send the request again at once, and so do we."""
        if not (self.config.sync and self.config.status_interval_s > 0):
            raise self._fail(f"STATUS_QUERY_RESP (ReqId {msg.req_id}) although no status query was sent", s)
        req_type = s.outstanding.get(msg.req_id)
        if req_type is not None and req_type != msg.req_type:
            raise self._fail(
                f"STATUS_QUERY_RESP for ReqId {msg.req_id} has ReqType {msg.req_type!r}, the request was {req_type!r}",
                s,
            )
        if msg.resp == STATUS_IN_PROGRESS:
            if req_type is None:
                raise self._fail(f"STATUS_QUERY_RESP 'in progress' for ReqId {msg.req_id}, already answered", s)
            self.status_in_progress += 1
        elif msg.resp == STATUS_REQUEST_LOST:
            self.status_lost += 1
            if req_type is not None:
                self.resends += 1
                del s.status_due[msg.req_id]
                s.status_due[msg.req_id] = asyncio.get_running_loop().time() + self.config.status_interval_s
                self._write(s, s.unanswered_frames[msg.req_id])
        else:
            raise self._fail(f"STATUS_QUERY_RESP for ReqId {msg.req_id} has Resp {msg.resp}, expected 1 or 2", s)

    async def _status_loop(self, s: _Session) -> None:
        """ONTAP's status-req-interval: ask about every request unanswered for an interval, again every interval."""
        loop = asyncio.get_running_loop()
        interval = self.config.status_interval_s
        due = s.status_due
        while True:
            if not due:
                s.status_wake.clear()
                await s.status_wake.wait()
                continue
            wait = next(iter(due.values())) - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            now = loop.time()
            asked: list[int] = []
            for req_id, at in due.items():
                if at > now:
                    break
                asked.append(req_id)
            frames = []
            for req_id in asked:
                del due[req_id]
                due[req_id] = now + interval
                frames.append(encode_message(StatusQuery(req_id, s.outstanding[req_id])))
            self.status_queries += len(frames)
            self._write(s, b"".join(frames))

    async def _read_loop(self, s: _Session, peer: OntapPeer) -> None:
        """Read until the session ends: cleanly once everything is sent (and, in sync mode, answered), or by
        breaking (:meth:`_lose`). A bad frame is the server's fault and ends the run."""
        while True:
            for payload in peer.take():
                self._handle(s, payload)
            try:
                alive = await peer.read_some()
            except RemoteProtocolError as exc:
                raise self._fail(f"bad frame from the server: {exc}", s) from exc
            except OSError as exc:
                self._lose(s, f"connection error: {exc}")
                return
            if not alive:
                if self.sent == self.config.requests_per_node and not s.outstanding:
                    s.state = _State.CLOSED
                    return
                self._lose(
                    s,
                    f"server closed the connection after {self.sent}/{self.config.requests_per_node} requests "
                    f"({self.responses} responses)",
                )
                return

    # -- sending

    async def _keep_alive_loop(self, s: _Session) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.keep_alive_interval_s
        due = loop.time() + interval
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            self._write(s, _KEEP_ALIVE_FRAME)
            self.keep_alives += 1
            due += interval

    async def _wait_progress(self, until: Callable[[], bool]) -> None:
        while not until():
            self.progress.clear()
            await self.progress.wait()

    async def _send_all(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        specs = _specs(
            seed=cfg.seed,
            node=self.node,
            count=cfg.events,
            first_req_id=1,
            base_time_us=cfg.base_time_us,
            clock_us=wall_clock_us if cfg.wall_clock else None,
        )
        specs = _with_duplicates(specs, every=cfg.duplicate_every, first_req_id=cfg.events + 1)
        frames = _framed(specs, cfg.notf_type)
        total, rate, window = cfg.requests_per_node, cfg.rate, cfg.max_outstanding
        start = loop.time()
        while self.sent < total:
            n = min(cfg.chunk_events, total - self.sent)
            if rate > 0:
                # Events whose slot on the schedule start + i/rate has begun; late slots are sent at once.
                due = int((loop.time() - start) * rate) + 1 - self.sent
                if due <= 0:
                    await asyncio.sleep(start + self.sent / rate - loop.time())
                    continue
                n = min(n, due)
            if cfg.sync:
                await self._wait_progress(lambda: self._outstanding() < window)
                n = min(n, window - self._outstanding())
            rotation = self._rotation()
            while not rotation:
                self.changed.clear()
                await self.changed.wait()
                rotation = self._rotation()
            batch = list(islice(frames, n))
            # Strict round-robin, one notification at a time, written a chunk per target.
            if len(rotation) == 1:
                shares = {rotation[0]: batch}
            else:
                shares = {}
                for item in batch:
                    shares.setdefault(rotation[self.turn % len(rotation)], []).append(item)
                    self.turn += 1
            for s, share in shares.items():
                if cfg.sync:
                    for spec, frame in share:
                        s.outstanding[spec.req_id] = spec.kind.req_type
                        s.unanswered_frames[spec.req_id] = frame
                    if cfg.status_interval_s > 0:
                        asked_at = loop.time() + cfg.status_interval_s
                        for spec, _frame in share:
                            s.status_due[spec.req_id] = asked_at
                        s.status_wake.set()
                s.sent += len(share)
                s.written += len(share)
            self.sent += n
            for s, share in shares.items():
                if s.state is _State.CONNECTED:  # else an earlier write of this batch found it broken
                    self._write(s, b"".join([frame for _spec, frame in share]))
            if self.manifest is not None:
                self.manifest.write(self.node, [spec for spec, _frame in batch], cfg.notf_type)
            for s in shares:
                if s.state is _State.CONNECTED and s.peer is not None:
                    try:
                        await s.peer.drain()
                    except OSError as exc:
                        self._lose(s, f"connection error after {self.sent} requests: {exc}")
        if cfg.sync:
            await self._wait_progress(lambda: not self._outstanding())

    async def _stream(self) -> bool:
        """Send everything (and collect every response); False if ``stop_at`` came first."""
        loop = asyncio.get_running_loop()

        def remaining() -> float:
            return max(0.0, self.stop_at - loop.time())

        sender = asyncio.create_task(self._send_all())
        try:
            await asyncio.wait((sender, self.failure), timeout=remaining(), return_when=asyncio.FIRST_COMPLETED)
            if self.failure.done():
                self.failure.result()  # raises the server's misbehaviour, or the loss of the last target
            if not sender.done():
                return False
            sender.result()
            for task in self.reconnects:
                task.cancel()
            await self._linger(min(_LINGER_S, remaining()))
            return True
        finally:
            tasks = [sender, *self.reconnects, *(task for s in self.sessions for task in s.tasks)]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _linger(self, wait_s: float) -> None:
        """Half-close every session and read until the server closes too, so that whatever it still sends is
        checked and everything we sent has been read when :func:`run` returns. A server that keeps its side open
        only costs ``wait_s``."""
        readers = []
        for s in self.sessions:
            if s.state is not _State.CONNECTED or s.reader is None or s.reader.done() or s.peer is None:
                continue
            if s.keep_alive is not None:
                s.keep_alive.cancel()
            try:
                s.peer.half_close()
            except (OSError, RuntimeError):
                if len(self.sessions) == 1:
                    continue  # as before several targets: a break this late is no error
                # Broken: its reader is about to see it and counts what the session took (or moves it).
            readers.append(s.reader)
        if readers:
            done, _ = await asyncio.wait(readers, timeout=wait_s)
            for reader in done:
                reader.result()
        if self.failure.done():
            self.failure.result()


async def run(config: SimulatorConfig) -> SimulationReport:
    """Play ``config.nodes`` ONTAP nodes against the servers; raise :class:`SimulatorError` on misbehaviour.

    Works on the default loop and on uvloop. Returns when every node has sent (and, in sync mode, had answered)
    all its events, or when ``duration_limit_s`` has passed (then ``completed`` is False).
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    stop_at = start + config.duration_limit_s
    manifest = _Manifest(config.manifest) if config.manifest is not None else None
    try:
        tasks = [asyncio.create_task(_Node(config, node, manifest, stop_at).run()) for node in range(config.nodes)]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            exc = None if task.cancelled() else task.exception()
            if exc is not None:
                raise exc
        reports = tuple(task.result() for task in tasks)
    finally:
        if manifest is not None:
            manifest.close()
    return SimulationReport(nodes=reports, sync=config.sync, elapsed_s=loop.time() - start)
