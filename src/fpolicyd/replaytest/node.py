"""One simulated ONTAP node across its sessions (:class:`Node`: live traffic, the outage's backlog, the replay,
reconnects, the sync engine's window and resends) and what the nodes share with the run (:class:`Shared`): the
ids generated, and the flags the daemon should set, mirrored from what each node sent."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Final, NamedTuple

from fpolicyd.errors import RemoteProtocolError
from fpolicyd.protocol.messages import BackPressure, HandshakeResp, ScreenResponse
from fpolicyd.replaytest.config import ReplayTestConfig, ReplayTestError
from fpolicyd.replaytest.tails import id_int, now_us
from fpolicyd.simulator.generate import NodeStream, NotificationSpec
from fpolicyd.simulator.peer import OntapPeer, PeerClosedError, PeerError, PeerResetError, handshake

__all__ = ["Node", "Shared", "SourceState", "source_address"]

#: Frames per socket write.
_CHUNK: Final = 64
#: How far (in the node's own frames) after its original a duplicate is sent, at most.
_DUPLICATE_SPREAD: Final = 200
#: Steps in which an outage's backlog is generated.
_OUTAGE_STEPS: Final = 20
_RECONNECT_PAUSE_S: Final = 0.05


def source_address(host: str, node: int) -> str | None:
    """On loopback each node connects from its own address (127.1.x.y), as real nodes do from their own LIFs;
    the daemon keys replay state by node address."""
    if not host.startswith("127."):
        return None
    return f"127.1.{node // 250}.{node % 250 + 2}"


@dataclass(slots=True)
class SourceState:
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
class Shared:
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
    #: Several daemon instances: injected duplicates sent to another instance than their original (delivered
    #: whatever the dedup mode), and what the daemons should flag on them.
    duplicates_cross: int = 0
    expect_cross: _Expected = field(default_factory=_Expected)
    first_backlog_at: float | None = None
    last_backlog_at: float | None = None
    reconnect_s: list[float] = field(default_factory=list)
    #: Node reconnects per daemon instance (the planned outage's included).
    reconnects_by_instance: list[int] = field(default_factory=lambda: [0])
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
    #: Duplicates: the daemon instance the original went to (a daemon flags only copies of what it saw itself).
    instance: int = 0


@dataclass(slots=True, eq=False)
class _Session:
    """A node's session with one daemon instance (one per instance; the node round-robins its chunks over them)."""

    instance: int
    address: Callable[[], tuple[str, int]]
    #: Mirror of that daemon's per-key highest GenerationTime for this node's key.
    source: SourceState
    session_start_us: int = 0
    peer: OntapPeer | None = None
    reader_task: asyncio.Task[None] | None = None
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    lost: asyncio.Event = field(default_factory=asyncio.Event)


class _DisconnectedError(Exception):
    """The daemon closed the connection (or it broke); the node reconnects."""


class Node:
    """One simulated node across its sessions: one at a time with each daemon instance (``addresses`` and
    ``sources``, one per instance), its chunks round-robined over them."""

    def __init__(
        self,
        *,
        cfg: ReplayTestConfig,
        node: int,
        count: int,
        shared: Shared,
        addresses: list[Callable[[], tuple[str, int]]],
        sources: list[SourceState],
    ) -> None:
        self.cfg = cfg
        self.node = node
        self.shared = shared
        self.sessions = [
            _Session(instance=i, address=address, source=source)
            for i, (address, source) in enumerate(zip(addresses, sources, strict=True))
        ]
        self._turn = 0
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
        #: Sync engine: requests sent and not answered yet (ReqId → copies in flight, oldest first), and those
        #: a lost session left unanswered, to be sent again first.
        self.outstanding: dict[int, list[_Item]] = {}
        self.outstanding_count = 0
        self.resend: list[_Item] = []
        self.answer = asyncio.Event()

    # -- generation

    def _generate(self) -> NotificationSpec:
        stamp = max(now_us(), self.last_generation_us + 1)
        self.last_generation_us = stamp
        spec = self.stream.next(stamp)
        self.shared.expected.add(id_int(self.stream.event_id(spec)))
        self.shared.generated += 1
        return spec

    # -- connection

    async def _connect(self, s: _Session, deadline: float) -> None:
        while True:
            host, port = s.address()
            source = source_address(host, self.node)
            try:
                peer = await OntapPeer.connect(host, port, source=source, timeout_s=5.0)
                break
            except (OSError, TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise ReplayTestError(f"node {self.node}: cannot connect to {host}:{port}: {exc}") from exc
                await asyncio.sleep(_RECONNECT_PAUSE_S)
        s.session_start_us = now_us()
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
        s.peer = peer
        s.resume.set()
        s.lost.clear()
        for payload in peer.take():
            self._server_message(s, payload)
        s.reader_task = asyncio.create_task(self._read(s, peer))

    def _server_message(self, s: _Session, payload: bytes) -> None:
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
                s.resume.clear()
            else:
                s.resume.set()

    async def _read(self, s: _Session, peer: OntapPeer) -> None:
        try:
            while await peer.read_some():
                for payload in peer.take():
                    self._server_message(s, payload)
        except (OSError, RemoteProtocolError):
            pass
        finally:
            s.lost.set()

    async def _close(self, s: _Session) -> None:
        """Half-close and wait until the daemon closes too: then it has read everything this node sent."""
        peer = s.peer
        s.peer = None
        if peer is None:
            return
        # A reset connection's transport is already closed (uvloop then raises RuntimeError, not OSError).
        if not peer.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                peer.half_close()
        if s.reader_task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(s.reader_task), 30.0)
        await peer.close()

    async def _reconnect(self, s: _Session, *, first: bool = False) -> None:
        """Connect and handshake, retrying for up to ``settle_timeout_s``; the time it took is a reconnect time
        (from the moment the session was found gone, or the planned outage ended) unless ``first``."""
        lost_at = time.monotonic()
        deadline = lost_at + self.cfg.settle_timeout_s
        await self._close(s)
        if self.outstanding:
            # The lost session never answered these: send them again first, as ONTAP retries a request whose
            # server went away (whether the daemon made them durable before it went is unknown here).
            unanswered = [
                _Item(item.spec, _Kind.RESEND, item.epoch, item.instance)
                for c in self.outstanding.values()
                for item in c
            ]
            unanswered.sort(key=lambda item: item.spec.req_id)
            self.resend[:0] = unanswered
            self.outstanding.clear()
            self.outstanding_count = 0
        while True:
            try:
                await self._connect(s, deadline)
                break
            except _DisconnectedError as exc:
                if time.monotonic() > deadline:
                    raise ReplayTestError(f"node {self.node}: no session within settle_timeout_s: {exc}") from exc
                await asyncio.sleep(_RECONNECT_PAUSE_S)
        if not first:
            self.shared.reconnect_s.append(time.monotonic() - lost_at)
            self.shared.reconnects_by_instance[s.instance] += 1

    # -- sending

    async def _send(self, s: _Session, chunk: list[_Item]) -> None:
        """Write one chunk; raises _DisconnectedError if the session is gone (the chunk is then sent again)."""
        while not s.resume.is_set():
            if s.lost.is_set():
                raise _DisconnectedError("lost while paused")
            waiter = asyncio.create_task(s.resume.wait())
            lost = asyncio.create_task(s.lost.wait())
            await asyncio.wait((waiter, lost), return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            lost.cancel()
        await self.shared.gate.wait()
        peer = s.peer
        if peer is None or s.lost.is_set() or peer.is_closing():
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
            self._account(s, chunk)
            with contextlib.suppress(OSError):
                await peer.drain()
            return
        try:
            await peer.drain()
        except OSError as exc:
            raise _DisconnectedError(str(exc)) from exc
        self._account(s, chunk)

    def _account(self, s: _Session, chunk: list[_Item]) -> None:
        """What the daemon should flag for a chunk it has read, mirrored from its rules; duplicates scheduled."""
        shared, source, cfg = self.shared, s.source, self.cfg
        epoch = shared.daemon_epoch
        if source.epoch != epoch:
            source.epoch, source.highest = epoch, -1
        replay_before = s.session_start_us - round(cfg.clock_tolerance_s * 1_000_000)
        now = time.monotonic()
        crossed_half = False
        for position, item in enumerate(chunk, self.frames_sent + 1):
            if item.kind is _Kind.RESEND:
                shared.resent += 1  # not mirrored: whether the daemon saw the first copy is unknown
                continue
            generation = item.spec.time_us
            expect = shared.expect_first
            if item.kind is _Kind.DUPLICATE:
                # A copy sent to another daemon instance than its original is new to that daemon: no instance
                # can suppress it.
                cross = item.instance != s.instance
                expect = shared.expect_cross if cross else shared.expect_duplicates
                shared.duplicates_cross += cross
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
                if item.epoch == epoch and item.instance == s.instance:
                    expect.duplicate += 1
                continue  # a second copy: not part of the backlog's progress
            if cfg.duplicates and self.rng.random() < cfg.duplicates:
                due = position + self.rng.randrange(1, _DUPLICATE_SPREAD)
                self.pending_duplicates.append((due, _Item(item.spec, _Kind.DUPLICATE, epoch, s.instance)))
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

    def _next_session(self) -> _Session:
        """The sessions in turn, skipping those found lost while another is still connected."""
        count = len(self.sessions)
        for step in range(count):
            s = self.sessions[(self._turn + step) % count]
            if not s.lost.is_set():
                self._turn = (self._turn + step + 1) % count
                return s
        s = self.sessions[self._turn]
        self._turn = (self._turn + 1) % count
        return s

    async def _pump(self, chunk: list[_Item]) -> None:
        """Send a chunk on the next session in turn, reconnecting as often as needed."""
        s = self._next_session()
        while True:
            try:
                await self._send(s, chunk)
                return
            except _DisconnectedError:
                await self._reconnect(s)

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
            only = self.sessions[0]  # the sync engine plays one daemon instance (checked by the config)
            if only.lost.is_set():
                await self._reconnect(only)
                continue
            self.answer.clear()
            answer = asyncio.create_task(self.answer.wait())
            lost = asyncio.create_task(only.lost.wait())
            await asyncio.wait((answer, lost), return_when=asyncio.FIRST_COMPLETED)
            answer.cancel()
            lost.cancel()

    async def run(self) -> None:
        cfg = self.cfg
        for s in self.sessions:
            await self._reconnect(s, first=True)
        await self._drain_work()  # phase 1: live
        for s in self.sessions:
            await self._close(s)
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
        for s in self.sessions:
            await self._reconnect(s)
        await self._drain_work()
        for s in self.sessions:
            await self._close(s)
        self.shared.nodes_done += 1
