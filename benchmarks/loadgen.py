"""A load generator that can outrun an FPolicy server on a small box: ONTAP-shaped frames encoded before the clock
starts, then written over N connections with large writes.

    python benchmarks/loadgen.py --port PORT [--connections 4] [--events 100000] [--rate 0] [--sync]
        [--window 500] [--chunk-bytes 262144] [--max-seconds 120] [--ids] [--send-log FILE] [--control]

Each connection is its own simulated node (``fpolicyd.simulator``: one seeded stream per node, byte-exact ONTAP
SCREEN_REQ frames of ~1.1-1.3 KB, SMB and NFS; a real NEGO_REQ / NEGO_RESP handshake with its own SessionId).
Phases, in order:

1. connect every node and hand-shake (each bounded by ``CONNECT_TIMEOUT_S``);
2. encode every frame (``NodeStream``, GenerationTime = now + i x the node's period, so no event looks replayed:
   the times start after the handshake), and with ``--ids`` the event_id fpolicyd will give each one;
3. print ``{"ready": ...}`` and, with ``--control``, wait for ``go`` on stdin;
4. send; the clock (``t_first_write`` .. ``t_last_write``, ``time.monotonic()``, which is CLOCK_MONOTONIC and so
   comparable across processes on one host) and this process's CPU (``getrusage``) cover this phase only:

   - async engine, ``--rate 0`` (default): every connection writes pre-joined chunks of ``--chunk-bytes`` as fast
     as the kernel takes them (transport flow control; BACK_PRESSURE_APPLY pauses a node until REM, as ONTAP does);
   - ``--rate R``: paced, R events/s in all, split evenly over the connections, written every ``TICK_S``;
   - ``--sync``: the synchronous engine: at most ``--window`` unanswered requests per node (ONTAP's
     max-server-reqs); each SCREEN_RESP's arrival minus its request's write time is a frame -> durable latency
     (fpolicyd answers a synchronous engine only once the event is durable);

5. print the report (one JSON line); with ``--control``, hold the connections open until ``stop`` on stdin (or
   stdin closes, or ``--hold-seconds``), so that the server is not measured handling disconnects.

``--send-log FILE`` (needs ``--ids``): one line per event, ``event_id monotonic_ns`` (its write time), for matching
sink-side arrival times. Bounded: ``--events``, ``--max-seconds`` for the send phase (a run cut short reports
``completed: false``), ``--hold-seconds``. Connects to 127.0.0.1 by default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import resource
import socket
import sys
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

from fpolicyd.protocol.framing import XmlFrameReader
from fpolicyd.protocol.messages import ALLOW, BackPressure, HandshakeResp, KeepAlive, ScreenResponse
from fpolicyd.protocol.xml_codec import decode_payload, encode_handshake
from fpolicyd.simulator.generate import DEFAULT_VS_UUID, NodeStream
from fpolicyd.simulator.peer import DEFAULT_VERSIONS, handshake

#: Bounds of the set-up phase, per connection.
CONNECT_TIMEOUT_S: Final = 10.0
HANDSHAKE_TIMEOUT_S: Final = 10.0
#: Paced mode: how often the due frames are written (at 20,000 events/s over 4 nodes, ~5 frames per node).
TICK_S: Final = 0.001
#: Unpaced: GenerationTime step per node (a busy node: 50,000 events/s).
BLAST_STEP_US: Final = 20
#: The transport buffers up to this many chunks before flow control pauses a node.
HIGH_WATER_CHUNKS: Final = 4
MAX_CONNECTIONS: Final = 256
MAX_EVENTS: Final = 10_000_000
_SCREEN_RESP_TAG: Final = b"<NotfType>SCREEN_RESP</NotfType>"


class LoadgenError(Exception):
    """The server misbehaved or could not be reached."""


@dataclass(frozen=True, slots=True)
class LoadgenConfig:
    port: int
    host: str = "127.0.0.1"
    connections: int = 4
    events: int = 100_000
    #: Events per second in all; 0 = as fast as the server reads.
    rate: float = 0.0
    sync: bool = False
    #: Synchronous engine: unanswered requests per node at most (ONTAP's max-server-reqs).
    window: int = 500
    chunk_bytes: int = 256 * 1024
    max_seconds: float = 120.0
    ids: bool = False
    seed: int = 11
    policy_name: str = "fpolicyd-bench"
    vs_uuid: str = DEFAULT_VS_UUID

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port}: expected 1..65535")
        if not 1 <= self.connections <= MAX_CONNECTIONS:
            raise ValueError(f"connections {self.connections}: expected 1..{MAX_CONNECTIONS}")
        if not self.connections <= self.events <= MAX_EVENTS:
            raise ValueError(f"events {self.events}: expected connections..{MAX_EVENTS}")
        if not (math.isfinite(self.rate) and self.rate >= 0):
            raise ValueError(f"rate {self.rate}: expected a finite number >= 0")
        if not 1 <= self.window <= 10_000:
            raise ValueError(f"window {self.window}: expected 1..10000")
        if not 4096 <= self.chunk_bytes <= 64 << 20:
            raise ValueError(f"chunk_bytes {self.chunk_bytes}: expected 4096..64 MiB")
        if not (math.isfinite(self.max_seconds) and self.max_seconds > 0):
            raise ValueError(f"max_seconds {self.max_seconds}: expected > 0")

    def counts(self) -> list[int]:
        """Events per connection (the remainder goes to the first ones)."""
        base, extra = divmod(self.events, self.connections)
        return [base + (1 if node < extra else 0) for node in range(self.connections)]


def _cpu_s() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def percentiles_ms(samples: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max of latencies given in seconds, in ms (nearest rank)."""
    if not samples:
        return {}
    ordered = sorted(samples)
    n = len(ordered)

    def rank(q: float) -> float:
        return ordered[min(n - 1, max(0, math.ceil(q * n) - 1))] * 1e3

    return {
        "count": n,
        "p50": round(rank(0.50), 3),
        "p95": round(rank(0.95), 3),
        "p99": round(rank(0.99), 3),
        "max": round(ordered[-1] * 1e3, 3),
    }


class _Node(asyncio.Protocol):
    """One simulated node: its connection, its pre-encoded frames and its send state."""

    def __init__(self, config: LoadgenConfig, node: int, count: int, on_progress: Callable[[], None]) -> None:
        self.config = config
        self.node = node
        self.count = count
        self.hs = handshake(
            seed=config.seed,
            node=node,
            policy_name=config.policy_name,
            vs_uuid=config.vs_uuid,
            versions=DEFAULT_VERSIONS,
        )
        self._on_progress = on_progress
        self.transport: asyncio.Transport | None = None
        self.frames_in = XmlFrameReader()
        self.negotiated: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.error: LoadgenError | None = None
        # Pre-encoded traffic: whole frames (paced and sync modes) or chunks of whole frames (blast).
        self.frames: list[bytes] = []
        self.chunks: list[tuple[bytes, int]] = []
        self.ids: list[str] = []
        self.send_times = array("d")
        self.latencies = array("d")
        self.answered = bytearray(count)
        self.last_answer = 0.0
        self.sent = 0
        self.chunk_index = 0
        self.responses = 0
        self.keep_alives = 0
        self.back_pressure_applied = 0
        self.bp_paused = False
        self.flow_paused = False
        self.started_at = 0.0
        self.pace_rate = 0.0
        self.last_write = 0.0

    # ------------------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # small paced writes must not wait for the peer's delayed ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.set_write_buffer_limits(high=HIGH_WATER_CHUNKS * self.config.chunk_bytes)
        self.transport.write(encode_handshake(self.hs))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.negotiated.done():
            self.negotiated.set_exception(LoadgenError(f"node {self.node}: closed before NEGO_RESP ({exc})"))
        if not self.closed.done():
            self.closed.set_result(None)
        self._on_progress()

    def pause_writing(self) -> None:
        self.flow_paused = True

    def resume_writing(self) -> None:
        self.flow_paused = False
        self.pump()

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        try:
            payloads = self.frames_in.feed(data)
        except Exception as exc:  # a framing error ends the run: report it
            self._fail(f"bad frame from the server: {exc}")
            return
        answered = False
        for payload in payloads:
            if _SCREEN_RESP_TAG in payload[:160] and self.config.sync and self.responses:
                # Fast path for the stream of answers (a full decode costs ~25 µs of this process's CPU): the
                # first answer of the node went through the full decoder and was checked completely.
                start = payload.find(b"<ReqId>", 160)
                end = payload.find(b"</ReqId>", start)
                if start < 0 or end < 0 or b"<NotfResp>1</NotfResp>" not in payload:
                    self._fail(f"malformed SCREEN_RESP: {payload[:300]!r}")
                    return
                self._answered(int(payload[start + 7 : end]), now)
                answered = True
                continue
            try:
                message = decode_payload(payload).message
            except Exception as exc:
                self._fail(f"undecodable message from the server: {exc}")
                return
            if isinstance(message, HandshakeResp):
                if (message.vs_uuid, message.policy_name, message.session_id) != (
                    self.hs.vs_uuid,
                    self.hs.policy_name,
                    self.hs.session_id,
                ) or message.version not in self.hs.versions:
                    self._fail(f"NEGO_RESP does not answer the NEGO_REQ: {message}")
                    return
                if not self.negotiated.done():
                    self.negotiated.set_result(message.version)
            elif isinstance(message, ScreenResponse):
                if not self.config.sync or message.notf_resp != ALLOW:
                    self._fail(f"unexpected SCREEN_RESP {message}")
                    return
                self._answered(message.req_id, now)
                answered = True
            elif isinstance(message, BackPressure):
                if message.apply:
                    self.back_pressure_applied += 1
                    self.bp_paused = True
                else:
                    self.bp_paused = False
                    self.pump()
            elif isinstance(message, KeepAlive):
                self.keep_alives += 1
            else:
                self._fail(f"unexpected {type(message).__name__} from the server")
                return
        if answered:
            self.pump()
            self._on_progress()

    def eof_received(self) -> bool | None:
        return None

    # ---------------------------------------------------------------------------------------- sending

    def _fail(self, why: str) -> None:
        if self.error is None:
            self.error = LoadgenError(f"node {self.node}: {why}")
        if not self.negotiated.done():
            self.negotiated.set_exception(self.error)
        if self.transport is not None:
            self.transport.abort()
        self._on_progress()

    def _answered(self, req_id: int, now: float) -> None:
        index = req_id - 1
        if not 0 <= index < self.sent or self.answered[index]:
            self._fail(f"SCREEN_RESP for ReqId {req_id}, which is not outstanding")
            return
        self.answered[index] = 1
        self.latencies.append(now - self.send_times[index])
        self.last_answer = now
        self.responses += 1

    @property
    def done_sending(self) -> bool:
        return self.sent >= self.count

    @property
    def done(self) -> bool:
        return self.done_sending and (not self.config.sync or self.responses >= self.count)

    def pump(self) -> None:
        """Write what may be written now: everything until flow control pauses (blast), what the schedule says
        is due (paced), no more than the window allows (sync); nothing while BACK_PRESSURE is applied."""
        transport = self.transport
        if transport is None or self.bp_paused or self.flow_paused or not self.started_at or self.done_sending:
            return
        if self.chunks:  # blast: pre-joined chunks
            while self.chunk_index < len(self.chunks) and not self.flow_paused and not self.bp_paused:
                chunk, n = self.chunks[self.chunk_index]
                transport.write(chunk)
                self.chunk_index += 1
                self.sent += n
            self.last_write = time.monotonic()
            if self.sent >= self.count:
                self._on_progress()
            return
        now = time.monotonic()
        n = self.count - self.sent
        if self.pace_rate > 0:
            n = min(n, int((now - self.started_at) * self.pace_rate) + 1 - self.sent)
        if self.config.sync:
            n = min(n, self.config.window - (self.sent - self.responses))
        if n <= 0:
            return
        first = self.sent
        transport.write(b"".join(self.frames[first : first + n]))
        self.send_times.extend([now] * n)
        self.sent += n
        self.last_write = now
        if self.sent >= self.count:
            self._on_progress()


def _factory(peer: _Node) -> Callable[[], _Node]:
    return lambda: peer


@dataclass(slots=True)
class Loadgen:
    """Connect, encode, send; see the module docstring for the phases."""

    config: LoadgenConfig
    nodes: list[_Node] = field(default_factory=list)
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    encode_s: float = 0.0

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        for node, count in enumerate(cfg.counts()):
            peer = _Node(cfg, node, count, self.progress.set)
            try:
                await asyncio.wait_for(loop.create_connection(_factory(peer), cfg.host, cfg.port), CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError) as exc:
                raise LoadgenError(f"node {node}: cannot connect to {cfg.host}:{cfg.port}: {exc!r}") from exc
            self.nodes.append(peer)
        for peer in self.nodes:
            try:
                await asyncio.wait_for(asyncio.shield(peer.negotiated), HANDSHAKE_TIMEOUT_S)
            except TimeoutError:
                raise LoadgenError(f"node {peer.node}: no NEGO_RESP within {HANDSHAKE_TIMEOUT_S} s") from None

    def encode(self) -> None:
        """Every frame (and event id) before the clock starts. GenerationTime starts now: after the handshake."""
        cfg = self.config
        started = time.perf_counter()
        base_us = time.time_ns() // 1000
        per_node_rate = cfg.rate / cfg.connections
        step_us = 1e6 / per_node_rate if per_node_rate > 0 else BLAST_STEP_US
        for peer in self.nodes:
            stream = NodeStream(seed=cfg.seed, node=peer.node, count=peer.count, vs_uuid=cfg.vs_uuid)
            specs = [stream.next(base_us + int(i * step_us)) for i in range(peer.count)]
            frames = [stream.frame(spec) for spec in specs]
            if cfg.ids:
                peer.ids = [stream.event_id(spec) for spec in specs]
            if cfg.rate > 0 or cfg.sync:
                peer.frames = frames
                peer.send_times = array("d")
            else:
                chunk: list[bytes] = []
                size = 0
                for frame in frames:
                    chunk.append(frame)
                    size += len(frame)
                    if size >= cfg.chunk_bytes:
                        peer.chunks.append((b"".join(chunk), len(chunk)))
                        chunk, size = [], 0
                if chunk:
                    peer.chunks.append((b"".join(chunk), len(chunk)))
            peer.pace_rate = per_node_rate
        self.encode_s = time.perf_counter() - started

    def frame_bytes(self) -> int:
        return sum(len(f) for p in self.nodes for f in p.frames) + sum(len(c) for p in self.nodes for c, _ in p.chunks)

    async def send(self) -> dict[str, Any]:
        """The measured phase; returns the report."""
        cfg = self.config
        cpu0 = _cpu_s()
        t0 = time.monotonic()
        deadline = t0 + cfg.max_seconds
        for peer in self.nodes:
            peer.started_at = t0
            peer.pump()
        while True:
            failed = next((p.error for p in self.nodes if p.error is not None), None)
            if failed is not None:
                raise failed
            if all(p.done for p in self.nodes):
                break
            now = time.monotonic()
            if now >= deadline:
                break
            if any(p.transport is None and not p.done for p in self.nodes):
                raise LoadgenError("the server closed a connection before the run ended")
            self.progress.clear()
            if cfg.rate > 0:
                await asyncio.sleep(TICK_S)
                for peer in self.nodes:
                    peer.pump()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.progress.wait(), min(0.5, deadline - now))
        # Everything written is in the kernel once the transports' buffers are empty (bounded by the deadline).
        while any(p.transport is not None and p.transport.get_write_buffer_size() for p in self.nodes):
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.001)
        t_end = time.monotonic()
        cpu1 = _cpu_s()
        sent = sum(p.sent for p in self.nodes)
        elapsed = max(1e-9, t_end - t0)
        latencies = [x for p in self.nodes for x in p.latencies]
        cpu_user, cpu_sys = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
        report: dict[str, Any] = {
            "completed": all(p.done for p in self.nodes),
            "mode": ("sync" if cfg.sync else "async") + (f" paced {cfg.rate:g}/s" if cfg.rate else " unpaced"),
            "connections": cfg.connections,
            "events": cfg.events,
            "sent": sent,
            "responses": sum(p.responses for p in self.nodes),
            "back_pressure_applied": sum(p.back_pressure_applied for p in self.nodes),
            "keep_alives": sum(p.keep_alives for p in self.nodes),
            "t_first_write": t0,
            "t_last_write": max(p.last_write for p in self.nodes),
            "t_flushed": t_end,
            "send_s": round(elapsed, 6),
            "offered_events_per_s": round(sent / elapsed, 1),
            "encode_s": round(self.encode_s, 3),
            "cpu_user_s": round(cpu_user, 4),
            "cpu_sys_s": round(cpu_sys, 4),
            "cpu_us_per_event": round((cpu_user + cpu_sys) / max(sent, 1) * 1e6, 3),
        }
        if cfg.sync:
            report["latency_ms"] = percentiles_ms(latencies)
            if latencies:
                last = max(p.last_answer for p in self.nodes)
                report["answered_events_per_s"] = round(len(latencies) / max(1e-9, last - t0), 1)
        return report

    def write_send_log(self, path: Path) -> None:
        """``event_id monotonic_ns`` per event written (needs ``ids`` and a paced or sync run)."""
        with path.open("w") as out:
            for peer in self.nodes:
                for event_id, at in zip(peer.ids, peer.send_times, strict=False):
                    out.write(f"{event_id} {int(at * 1e9)}\n")

    async def close(self, timeout_s: float = 10.0) -> None:
        for peer in self.nodes:
            if peer.transport is not None:
                if peer.transport.can_write_eof():
                    peer.transport.write_eof()
                peer.transport.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(p.closed for p in self.nodes)), timeout_s)


class _Control:
    """``go`` / ``stop`` lines on stdin (a reader thread: a pipe has no timeout), as asyncio events."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.go = asyncio.Event()
        self.stop = asyncio.Event()
        self._loop = loop
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in sys.stdin:
            word = line.strip()
            if word == "go":
                self._loop.call_soon_threadsafe(self.go.set)
            elif word == "stop":
                break
        self._loop.call_soon_threadsafe(self.go.set)
        self._loop.call_soon_threadsafe(self.stop.set)


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


async def _main(args: argparse.Namespace) -> int:
    config = LoadgenConfig(
        port=args.port,
        host=args.host,
        connections=args.connections,
        events=args.events,
        rate=args.rate,
        sync=args.sync,
        window=args.window,
        chunk_bytes=args.chunk_bytes,
        max_seconds=args.max_seconds,
        ids=args.ids,
        seed=args.seed,
    )
    control = _Control(asyncio.get_running_loop()) if args.control else None
    gen = Loadgen(config)
    try:
        await gen.connect()
        gen.encode()
        _emit({"ready": True, "encode_s": round(gen.encode_s, 3), "frame_bytes": gen.frame_bytes()})
        if control is not None:
            try:
                await asyncio.wait_for(control.go.wait(), args.hold_seconds)
            except TimeoutError:
                raise LoadgenError(f"no 'go' within {args.hold_seconds} s") from None
            if control.stop.is_set():
                raise LoadgenError("stopped before 'go'")
        report = await gen.send()
        if args.send_log is not None:
            gen.write_send_log(args.send_log)
        _emit(report)
        if control is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(control.stop.wait(), args.hold_seconds)
        return 0 if report["completed"] else 1
    except LoadgenError as exc:
        _emit({"error": str(exc)})
        return 1
    finally:
        await gen.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=4, help="simulated nodes, one connection each")
    parser.add_argument("--events", type=int, default=100_000, help="events in all")
    parser.add_argument("--rate", type=float, default=0.0, help="events/s in all (0: as fast as possible)")
    parser.add_argument("--sync", action="store_true", help="synchronous engine: wait for SCREEN_RESP")
    parser.add_argument("--window", type=int, default=500, help="sync: unanswered requests per node at most")
    parser.add_argument("--chunk-bytes", type=int, default=256 * 1024, help="unpaced: bytes per write")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="bound on the send phase")
    parser.add_argument("--hold-seconds", type=float, default=300.0, help="--control: bound on each wait")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--ids", action="store_true", help="compute each event's event_id before the clock")
    parser.add_argument("--send-log", type=Path, help="write 'event_id monotonic_ns' per event (needs --ids)")
    parser.add_argument("--control", action="store_true", help="wait for 'go' / 'stop' lines on stdin")
    args = parser.parse_args(argv)
    if args.send_log is not None and not (args.ids and (args.rate > 0 or args.sync)):
        parser.error("--send-log needs --ids and a paced (--rate) or --sync run")
    try:
        import uvloop
    except ImportError:  # the default loop works too, at a higher CPU cost per write
        return asyncio.run(_main(args))
    return int(uvloop.run(_main(args)))


if __name__ == "__main__":
    sys.exit(main())
