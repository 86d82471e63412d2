"""The ``fpolicyd simulate`` client: plays ``nodes`` ONTAP nodes against an FPolicy server, one connection each.

Each node (an :class:`~fpolicyd.simulator.peer.OntapPeer`): NEGO_REQ/NEGO_RESP, a SCREEN_REQ stream written in
pre-encoded chunks with optional rate control, KEEP_ALIVE, BACK_PRESSURE honoured, and an optional synchronous
mode with a ``max_outstanding`` window. In that mode it asks about every request still unanswered after
``status_interval_s`` (STATUS_QUERY_REQ, again every interval, as ONTAP's ``status-req-interval``) and sends a
request again at once when the server answers 2 "request lost". Everything it sees the server do wrong raises
:class:`SimulatorError`; every loop ends by itself (timeouts and ``duration_limit_s``).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO, Final

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
    "expected_requests",
    "run",
]

MAX_NODES: Final = 4096

#: How long a finished node waits for the server to close after the simulator's half-close.
_LINGER_S: Final = 2.0
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

    host: str = field(default="127.0.0.1", metadata=_help("FPolicy server host"))
    port: int = field(default=9898, metadata=_help("FPolicy server port"))
    nodes: int = field(default=1, metadata=_help(f"simulated ONTAP nodes, one connection each (1..{MAX_NODES})"))
    events: int = field(default=1000, metadata=_help("SCREEN_REQs per node (the run sends nodes x events)"))
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
        if not _is_int(self.nodes) or not 1 <= self.nodes <= MAX_NODES:
            raise bad("nodes", f"must be an integer in 1..{MAX_NODES}")
        if not _is_int(self.events) or self.events < 0:
            raise bad("events", "must be an integer >= 0")
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


def expected_requests(config: SimulatorConfig) -> list[tuple[int, ScreenRequest]]:
    """Everything :func:`run` sends for ``config``, as (node, request), node by node in send order.

    A ``wall_clock`` run's GenerationTimes are not known in advance: read its manifest instead."""
    if config.wall_clock:
        raise ValueError("a wall_clock run is not reproducible: its manifest records what it sent")
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


# ----------------------------------------------------------------------------------------------- report


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
            "completed": self.completed,
            "elapsed_s": round(self.elapsed_s, 6),
            "events_per_s": round(self.events_per_s, 1),
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


@dataclass(slots=True)
class _Node:
    """One simulated node's connection: handshake, sender, reader and keep-alive tasks."""

    config: SimulatorConfig
    node: int
    manifest: _Manifest | None
    stop_at: float
    hs: Handshake = field(init=False)
    peer: OntapPeer = field(init=False)
    outstanding: dict[int, str] = field(default_factory=dict)
    #: Sync mode with status queries: when to ask next about each unanswered request (earliest first: every entry
    #: is (re)inserted at now + interval), and its frame, to send again on "request lost".
    status_due: dict[int, float] = field(default_factory=dict)
    unanswered_frames: dict[int, bytes] = field(default_factory=dict)
    status_wake: asyncio.Event = field(default_factory=asyncio.Event)
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    version: str = ""
    sent: int = 0
    responses: int = 0
    keep_alives: int = 0
    back_pressure_applied: int = 0
    status_queries: int = 0
    status_in_progress: int = 0
    status_lost: int = 0
    resends: int = 0

    def _fail(self, why: str) -> SimulatorError:
        return SimulatorError(f"node {self.node}: {why}")

    async def run(self) -> NodeReport:
        cfg = self.config
        loop = asyncio.get_running_loop()
        start = loop.time()
        self.hs = handshake(
            seed=cfg.seed, node=self.node, policy_name=cfg.policy_name, vs_uuid=cfg.vs_uuid, versions=cfg.versions
        )
        try:
            self.peer = await OntapPeer.connect(cfg.host, cfg.port, timeout_s=cfg.connect_timeout_s)
        except TimeoutError:
            raise self._fail(f"connect to {cfg.host}:{cfg.port} timed out after {cfg.connect_timeout_s} s") from None
        except OSError as exc:
            raise self._fail(f"cannot connect to {cfg.host}:{cfg.port}: {exc}") from exc
        try:
            await self._handshake()
            self.resume.set()
            completed = await self._stream()
        finally:
            await self.peer.close()
        return NodeReport(
            node=self.node,
            session_id=self.hs.session_id,
            version=self.version,
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
        )

    # -- receiving

    async def _receive(self) -> bool:
        """Read once into the peer's inbox; False on EOF."""
        try:
            return await self.peer.read_checked()
        except PeerError as exc:
            raise self._fail(str(exc)) from exc

    def _decode(self, payload: bytes) -> tuple[str, Message]:
        try:
            decoded = self.peer.decode(payload)
        except RemoteProtocolError as exc:
            raise self._fail(f"undecodable message from the server: {exc}") from exc
        header = decoded.header
        if header.content_len != decoded.body_length:
            raise self._fail(
                f"{header.notf_type} header ContentLen {header.content_len} != body length {decoded.body_length}"
            )
        return header.notf_type, decoded.message

    async def _handshake(self) -> None:
        cfg, hs = self.config, self.hs
        try:
            first = await self.peer.handshake(hs, cfg.handshake_timeout_s)
        except PeerError as exc:
            raise self._fail(str(exc)) from exc
        notf_type, msg = self._decode(first)
        if not isinstance(msg, HandshakeResp):
            raise self._fail(f"expected NEGO_RESP as the first message, got {notf_type}")
        for what, got, want in (
            ("VsUUID", msg.vs_uuid, hs.vs_uuid),
            ("PolicyName", msg.policy_name, hs.policy_name),
            ("SessionId", msg.session_id, hs.session_id),
        ):
            if got != want:
                raise self._fail(f"NEGO_RESP {what} {got!r} does not echo the NEGO_REQ's {want!r}")
        if msg.version not in hs.versions:
            raise self._fail(f"NEGO_RESP chose version {msg.version!r}, not in the offer {list(hs.versions)}")
        self.version = msg.version

    def _handle(self, payload: bytes) -> None:
        notf_type, msg = self._decode(payload)
        if isinstance(msg, ScreenResponse):
            if not self.config.sync:
                raise self._fail(f"SCREEN_RESP (ReqId {msg.req_id}) from the server in asynchronous mode")
            req_type = self.outstanding.pop(msg.req_id, None)
            if req_type is None:
                raise self._fail(f"SCREEN_RESP for ReqId {msg.req_id}, which is not outstanding")
            if req_type != msg.req_type:
                raise self._fail(
                    f"SCREEN_RESP for ReqId {msg.req_id} has ReqType {msg.req_type!r}, the request was {req_type!r}"
                )
            if msg.notf_resp != ALLOW:
                raise self._fail(f"SCREEN_RESP for ReqId {msg.req_id} has NotfResp {msg.notf_resp}, expected 1")
            self.status_due.pop(msg.req_id, None)
            self.unanswered_frames.pop(msg.req_id, None)
            self.responses += 1
            self.progress.set()
        elif isinstance(msg, StatusQueryResp):
            self._status_answer(msg)
        elif isinstance(msg, BackPressure):
            if msg.session_id != self.hs.session_id:
                raise self._fail(f"{notf_type} for SessionId {msg.session_id!r}, not this session's")
            if msg.apply:
                self.back_pressure_applied += 1
                self.resume.clear()
            else:
                self.resume.set()
        else:
            raise self._fail(f"unexpected {notf_type} from the server")

    def _status_answer(self, msg: StatusQueryResp) -> None:
        """The answer to one of our STATUS_QUERY_REQs. "In progress" is only possible for a request not yet
        answered (the server answers the query when it reads it, before any later SCREEN_RESP); "request lost" for
        one still unanswered makes ONTAP send the request again at once, and so do we."""
        if not (self.config.sync and self.config.status_interval_s > 0):
            raise self._fail(f"STATUS_QUERY_RESP (ReqId {msg.req_id}) although no status query was sent")
        req_type = self.outstanding.get(msg.req_id)
        if req_type is not None and req_type != msg.req_type:
            raise self._fail(
                f"STATUS_QUERY_RESP for ReqId {msg.req_id} has ReqType {msg.req_type!r}, the request was {req_type!r}"
            )
        if msg.resp == STATUS_IN_PROGRESS:
            if req_type is None:
                raise self._fail(f"STATUS_QUERY_RESP 'in progress' for ReqId {msg.req_id}, already answered")
            self.status_in_progress += 1
        elif msg.resp == STATUS_REQUEST_LOST:
            self.status_lost += 1
            if req_type is not None:
                self.peer.write(self.unanswered_frames[msg.req_id])
                self.resends += 1
                del self.status_due[msg.req_id]
                self.status_due[msg.req_id] = asyncio.get_running_loop().time() + self.config.status_interval_s
        else:
            raise self._fail(f"STATUS_QUERY_RESP for ReqId {msg.req_id} has Resp {msg.resp}, expected 1 or 2")

    async def _status_loop(self) -> None:
        """ONTAP's status-req-interval: ask about every request unanswered for an interval, again every interval."""
        loop = asyncio.get_running_loop()
        interval = self.config.status_interval_s
        due = self.status_due
        while True:
            if not due:
                self.status_wake.clear()
                await self.status_wake.wait()
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
                frames.append(encode_message(StatusQuery(req_id, self.outstanding[req_id])))
            self.status_queries += len(frames)
            self.peer.write(b"".join(frames))

    async def _read_loop(self) -> None:
        while True:
            for payload in self.peer.take():
                self._handle(payload)
            if not await self._receive():
                if self.sent == self.config.events and not self.outstanding:
                    return
                raise self._fail(
                    f"server closed the connection after {self.sent}/{self.config.events} requests "
                    f"({self.responses} responses)"
                )

    # -- sending

    async def _keep_alive_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.keep_alive_interval_s
        due = loop.time() + interval
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            self.peer.write(_KEEP_ALIVE_FRAME)
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
        frames = _framed(specs, cfg.notf_type)
        total, rate, window = cfg.events, cfg.rate, cfg.max_outstanding
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
                await self._wait_progress(lambda: len(self.outstanding) < window)
                n = min(n, window - len(self.outstanding))
            if not self.resume.is_set():
                await self.resume.wait()
            batch = list(islice(frames, n))
            if cfg.sync:
                for spec, _frame in batch:
                    self.outstanding[spec.req_id] = spec.kind.req_type
                if cfg.status_interval_s > 0:
                    asked_at = loop.time() + cfg.status_interval_s
                    for spec, frame in batch:
                        self.status_due[spec.req_id] = asked_at
                        self.unanswered_frames[spec.req_id] = frame
                    self.status_wake.set()
            self.peer.write(b"".join([frame for _spec, frame in batch]))
            self.sent += n
            if self.manifest is not None:
                self.manifest.write(self.node, [spec for spec, _frame in batch], cfg.notf_type)
            await self.peer.drain()
        if cfg.sync:
            await self._wait_progress(lambda: not self.outstanding)

    async def _stream(self) -> bool:
        """Send everything (and collect every response); False if ``stop_at`` came first."""
        loop = asyncio.get_running_loop()

        def remaining() -> float:
            return max(0.0, self.stop_at - loop.time())

        # Frames that came with NEGO_RESP (e.g. BACK_PRESSURE_APPLY) take effect before the first request.
        for payload in self.peer.take():
            self._handle(payload)
        reader = asyncio.create_task(self._read_loop())
        sender = asyncio.create_task(self._send_all())
        keep_alive = status = None
        if self.config.keep_alive_interval_s > 0:
            keep_alive = asyncio.create_task(self._keep_alive_loop())
        if self.config.sync and self.config.status_interval_s > 0:
            status = asyncio.create_task(self._status_loop())
        tasks = [t for t in (sender, reader, keep_alive, status) if t is not None]
        try:
            done, _ = await asyncio.wait((sender, reader), timeout=remaining(), return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                reader.result()  # raises the server's misbehaviour; returns only after a clean end
                await asyncio.wait((sender,), timeout=remaining())
            if not sender.done():
                return False
            try:
                sender.result()
            except OSError as exc:
                raise self._fail(f"connection error after {self.sent} requests: {exc}") from exc
            if not reader.done():
                await self._linger(reader, keep_alive, min(_LINGER_S, remaining()))
            return True
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _linger(self, reader: asyncio.Task[None], keep_alive: asyncio.Task[None] | None, wait_s: float) -> None:
        """Half-close and read until the server closes too, so that whatever it still sends is checked and
        everything we sent has been read when :func:`run` returns. A server that keeps its side open only
        costs ``wait_s``."""
        if keep_alive is not None:
            keep_alive.cancel()
        try:
            self.peer.half_close()
        except OSError:
            return
        done, _ = await asyncio.wait((reader,), timeout=wait_s)
        if done:
            reader.result()


async def run(config: SimulatorConfig) -> SimulationReport:
    """Play ``config.nodes`` ONTAP nodes against the server; raise :class:`SimulatorError` on misbehaviour.

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
