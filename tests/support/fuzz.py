"""Fuzzing the whole daemon over TCP (issue 14, "Fuzz the whole server"): what a campaign sends, how it is played
over real loopback sockets, the healthy session that must get every event through, and how logs are judged.

One generator (:func:`draw_attack`) serves both campaigns: the CI test draws from Hypothesis (shrinking), ``make
fuzz`` (benchmarks/fuzz_server.py) from a seeded ``random.Random`` (fast, reproducible by seed). An attack is one
to three connections played at once; each connection's bytes are some of:

- garbage before NEGO_REQ, a valid or a mutated NEGO_REQ (or none), garbage after it;
- real frames (the ONTAP captures of tests/data, the simulator's canonical SCREEN_REQs of every ReqType, the other
  message types) and mutated ones: byte flips, insertions, deletions, duplications, "interesting" tokens (entities,
  DOCTYPE, CDATA, bad UTF-8, huge numbers), truncation, splices of two frames, another NotfType, a lying length
  prefix, a blown-up element — most re-framed with a consistent length so that they reach the decoder;
- split into writes at random byte offsets (TCP_NODELAY, a loop turn between writes), the first bytes possibly a
  byte at a time (a slow writer), then ended by FIN, a half-close (SHUT_WR: the daemon must close its side), an RST
  (SO_LINGER 0), or cut short (RST in the middle of the stream).

Nothing here decides what is a bug: the caller checks the daemon after each attack (connections back to the
healthy session only, /readyz, log lines) and at the end (every healthy event delivered exactly once, memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import random
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import orjson
import structlog

from fpolicyd.protocol.framing import PREFIX_LEN, XmlFrameReader
from fpolicyd.protocol.messages import (
    Alert,
    BackPressure,
    HandshakeResp,
    KeepAlive,
    Message,
    Outage,
    ScreenCancel,
    StatusQuery,
    UnknownMessage,
    VolumeNotification,
)
from fpolicyd.protocol.xml_codec import decode_payload, encode_handshake, encode_keep_alive, encode_message
from fpolicyd.simulator.generate import DEFAULT_VS_UUID, generate_frames
from fpolicyd.simulator.peer import handshake
from support.captures import KEEP_ALIVE, NEGO_REQ, SMB_OPEN, SMB_REN

#: The healthy session's notifications (seed, node): no attack frame comes from this stream.
HEALTHY_SEED: Final = 1401
#: The attacks' generated frames and handshakes.
FUZZ_SEED: Final = 1402
#: GenerationTime of the first generated notification (the captures' era).
BASE_TIME_US: Final = 1_707_492_532_000_000
#: Largest frame the daemon under fuzz accepts (its ``max_frame_bytes``); lying prefixes probe both sides of it.
FUZZ_MAX_FRAME_BYTES: Final = 64 << 10

#: Bounds of one played connection (an attack never holds the campaign up for long).
CONNECT_TIMEOUT_S: Final = 5.0
#: How long a half-closed connection may wait for the daemon to close its side (it should at once).
HALF_CLOSE_WAIT_S: Final = 5.0
#: A slow writer sends at most this many bytes one at a time, each after a pause of 1..SLOW_MAX_DELAY_MS.
SLOW_MAX_BYTES: Final = 48
SLOW_MAX_DELAY_MS: Final = 4
#: Connections per attack, frames per connection, cuts per stream, garbage per run of it.
MAX_CONNECTIONS: Final = 3
MAX_FRAMES: Final = 8
MAX_CUTS: Final = 12
MAX_GARBAGE: Final = 96
#: A blown-up frame stays under this (bigger than the daemon's max_frame_bytes above, so both paths are hit).
MAX_BLOWUP_BYTES: Final = 96 << 10

_PREFIX: Final = struct.Struct(">cIc")
T = TypeVar("T")

#: Byte strings that have broken XML parsers and number parsers before.
INTERESTING: Final[tuple[bytes, ...]] = (
    b"<",
    b">",
    b"&",
    b"&amp;",
    b"&#0;",
    b"&#x110000;",
    b"&#xD800;",
    b"&lt;",
    b"&unknown;",
    b"<![CDATA[x]]>",
    b"]]>",
    b"<!--",
    b"-->",
    b'<!DOCTYPE a [<!ENTITY e "eeeeeeeeeeeeeeee"><!ENTITY f "&e;&e;&e;&e;&e;&e;&e;&e;">]>',
    b"&e;&f;",
    b'<!DOCTYPE a SYSTEM "file:///etc/passwd">',
    b"<?xml version='1.0' encoding='UTF-16'?>",
    b"<?pi x?>",
    b"\x00",
    b"\xff",
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"\xef\xbb\xbf",
    b"\xf4\x90\x80\x80",
    b"9" * 40,
    b"-1",
    b"-9223372036854775809",
    b"18446744073709551616",
    b"1e308",
    b"NaN",
    b"0x10",
    b"\n\n",
    b"</FscreenReq>",
    b"<ReqId>",
    b"<ReqId>1</ReqId><ReqId>2</ReqId>",
    b"<a>" * 64,
    b"</a>" * 64,
    b"\t \r\n",
    "𝔘𝔫𝔦 \u202e \ufffe".encode(),
    b'"\x00\x00\x00\x01"',
    b'"\xff\xff\xff\xff"',
    b"<NotfType>SCREEN_REQ</NotfType>",
    b"<ContentLen>99999999</ContentLen>",
    b"<DataFormat>PROTOBUF</DataFormat>",
)

#: Other protocols' first bytes (HTTP, a TLS ClientHello, a bare line end), as a port scanner sends.
TEXT_PROBES: Final[tuple[bytes, ...]] = (
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
    b"\r\n",
)

#: NotfTypes a mutated header may claim (the real ones, lower-case, empty, unknown, long).
NOTF_TYPES: Final[tuple[bytes, ...]] = (
    b"NEGO_REQ",
    b"NEGO_RESP",
    b"KEEP_ALIVE",
    b"SCREEN_REQ",
    b"SCREEN_RESP",
    b"SCREEN_CANCEL",
    b"STATUS_QUERY_REQ",
    b"STATUS_QUERY_RESP",
    b"BACK_PRESSURE_APPLY",
    b"BACK_PRESSURE_REM",
    b"ALERT_MSG",
    b"VOLUME_NOTIFICATION",
    b"FILE_OUTAGE",
    b"screen_req",
    b"",
    b"X" * 300,
)


# ------------------------------------------------------------------------------------------------ the draw


class Draw(Protocol):
    """Where an attack's choices come from: Hypothesis (shrinkable) or a seeded ``random.Random``."""

    def integer(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi]."""
        ...

    def binary(self, max_size: int) -> bytes:
        """Arbitrary bytes, at most ``max_size``."""
        ...


class RandomDraw:
    """Draws from a seeded ``random.Random`` (the long campaign)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def binary(self, max_size: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, max_size))


def pick(draw: Draw, items: Sequence[T]) -> T:
    return items[draw.integer(0, len(items) - 1)]


def chance(draw: Draw, one_in: int) -> bool:
    """True about once in ``one_in`` draws (Hypothesis shrinks it towards False: 0 is the simplest integer)."""
    return draw.integer(0, one_in - 1) == one_in - 1


# ------------------------------------------------------------------------------------------------ the corpus


def _frame(payload: bytes) -> bytes:
    """``payload`` framed with its true length (a 0-length payload gives the empty frame the daemon refuses)."""
    return _PREFIX.pack(b'"', len(payload), b'"') + payload


@dataclass(frozen=True)
class Corpus:
    """Real frames to send whole or mutate."""

    #: NEGO_REQs: the captured one and simulator handshakes (their own SessionIds; none is the healthy one's).
    negos: tuple[bytes, ...]
    #: Everything ONTAP sends after NEGO: captures, a generated SCREEN_REQ of every ReqType, other message types.
    frames: tuple[bytes, ...]

    @classmethod
    def build(cls) -> Corpus:
        negos = [NEGO_REQ.frame]
        for node in range(3):
            hello = handshake(seed=FUZZ_SEED, node=node, policy_name="fuzz", vs_uuid=DEFAULT_VS_UUID)
            negos.append(encode_handshake(hello))
        generated = generate_frames(seed=FUZZ_SEED, node=0, count=64, base_time_us=BASE_TIME_US)
        session_id = "5c8b0b6e-0000-11ee-8000-000c29f00d01"
        others: list[Message] = [
            KeepAlive(),
            StatusQuery(2822, "SMB_OPEN"),
            StatusQuery(7, "NFS_WRITE"),
            ScreenCancel(2822, "SMB_OPEN", "timeout"),
            Alert(session_id, "WARNING", "fuzz alert"),
            Alert(session_id, "FATAL", "fuzz fatal alert"),
            BackPressure(session_id, apply=True),
            VolumeNotification(2147830405, "VOLUME_OFFLINE", is_active=False),
            Outage("/vol/fuzz", "fuzz", "PERSISTENT_STORE_FULL"),
            HandshakeResp(DEFAULT_VS_UUID, "fuzz", session_id, "1.2"),
            UnknownMessage("FUTURE_MSG", b"<Future><X>1</X></Future>"),
        ]
        frames = [KEEP_ALIVE.frame, SMB_OPEN.frame, SMB_REN.frame, *generated, *map(encode_message, others)]
        return cls(negos=tuple(negos), frames=tuple(frames))


# ------------------------------------------------------------------------------------------------ mutations


class Mutation(enum.IntEnum):
    """How a frame is damaged. All but FLIP and LENGTH re-frame the payload with its true length."""

    FLIP = 0  # bytes anywhere (prefix included) set to random values; the length is left as it was
    PAYLOAD_FLIP = 1
    INSERT = 2
    DELETE = 3
    DUPLICATE = 4
    TOKEN = 5
    TRUNCATE = 6
    SPLICE = 7
    NOTF_TYPE = 8
    LENGTH = 9  # the prefix lies about the payload's length
    BLOWUP = 10  # one slice repeated until the frame is tens of KiB


def mutate(frame: bytes, draw: Draw, corpus: Corpus) -> bytes:
    """One damaged copy of ``frame``."""
    payload = frame[PREFIX_LEN:]
    size = len(payload)
    kind = Mutation(draw.integer(0, len(Mutation) - 1))
    if kind is Mutation.FLIP:
        out = bytearray(frame)
        for _ in range(draw.integer(1, 8)):
            out[draw.integer(0, len(out) - 1)] = draw.integer(0, 255)
        return bytes(out)
    if kind is Mutation.LENGTH:
        lengths = (0, 1, 5, size - 1, size + 1, size + 64, FUZZ_MAX_FRAME_BYTES, FUZZ_MAX_FRAME_BYTES + 1, 2**31)
        length = pick(draw, (*lengths, 2**32 - 1, draw.integer(0, 2**32 - 1)))
        return _PREFIX.pack(b'"', max(0, length), b'"') + payload
    at = draw.integer(0, size)
    if kind is Mutation.PAYLOAD_FLIP:
        out = bytearray(payload)
        for _ in range(draw.integer(1, 8)):
            if out:
                out[draw.integer(0, len(out) - 1)] = draw.integer(0, 255)
        return _frame(bytes(out))
    if kind is Mutation.INSERT:
        return _frame(payload[:at] + draw.binary(32) + payload[at:])
    if kind is Mutation.DELETE:
        return _frame(payload[:at] + payload[at + draw.integer(1, 64) :])
    if kind is Mutation.DUPLICATE:
        piece = payload[at : at + draw.integer(1, 128)]
        return _frame(payload[:at] + piece * draw.integer(2, 8) + payload[at:])
    if kind is Mutation.TOKEN:
        token = pick(draw, INTERESTING)
        replace = draw.integer(0, 16)  # 0: insert; else overwrite that many bytes
        return _frame(payload[:at] + token + payload[at + replace :])
    if kind is Mutation.TRUNCATE:
        return _frame(payload[:at])
    if kind is Mutation.SPLICE:
        other = pick(draw, (*corpus.frames, *corpus.negos))[PREFIX_LEN:]
        return _frame(payload[:at] + other[draw.integer(0, len(other)) :])
    if kind is Mutation.NOTF_TYPE:
        start, end = payload.find(b"<NotfType>"), payload.find(b"</NotfType>")
        if 0 <= start < end:
            payload = payload[: start + 10] + pick(draw, NOTF_TYPES) + payload[end:]
        return _frame(payload)
    # BLOWUP: a slice (an element, a path...) repeated; often past the daemon's max_frame_bytes.
    piece = payload[at : at + draw.integer(1, 256)] or b"A"
    times = min(draw.integer(16, 4096), MAX_BLOWUP_BYTES // len(piece))
    return _frame(payload[:at] + piece * times + payload[at:])


def garbage(draw: Draw, corpus: Corpus) -> bytes:
    """Bytes that are not a frame ONTAP would send: random bytes, a mutated frame, or text protocols."""
    choice = draw.integer(0, 3)
    if choice == 0:
        return draw.binary(MAX_GARBAGE)
    if choice == 1:
        return mutate(pick(draw, corpus.frames), draw, corpus)
    if choice == 2:
        return pick(draw, TEXT_PROBES)
    return b'"' + draw.binary(8)


# ------------------------------------------------------------------------------------------------ scripts


class Ending(enum.Enum):
    FIN = "fin"  # close(): FIN after everything was sent
    HALF_CLOSE = "half_close"  # shutdown(SHUT_WR), keep reading: the daemon must close its side
    RST = "rst"  # SO_LINGER 0 then close(): RST
    CUT = "cut"  # RST after only part of the stream (abrupt close in the middle of a frame)


@dataclass(frozen=True)
class Script:
    """One connection of an attack: the bytes, where they are cut into writes, and how it ends."""

    chunks: tuple[bytes, ...]
    #: The first this-many bytes go one at a time, each after ``slow_delay_ms``.
    slow_bytes: int
    slow_delay_ms: int
    ending: Ending
    #: CUT: the writes sent before the RST.
    cut_after: int
    #: Held open this long after the last write, before the ending (lets the daemon act on what it read).
    hold_ms: int
    #: Sends only what ONTAP would send (a valid NEGO_REQ, valid frames): an interleaved valid session.
    valid: bool

    @property
    def size(self) -> int:
        return sum(map(len, self.chunks))

    def describe(self) -> str:
        stream = b"".join(self.chunks)
        head = stream[:160]
        return (
            f"Script(valid={self.valid}, bytes={len(stream)}, writes={len(self.chunks)}, slow={self.slow_bytes}"
            f"@{self.slow_delay_ms}ms, ending={self.ending.value}, cut_after={self.cut_after}, hold={self.hold_ms}ms,"
            f" head={head!r}{'...' if len(stream) > len(head) else ''})"
        )


@dataclass(frozen=True)
class Attack:
    """Connections played at the same time."""

    scripts: tuple[Script, ...]

    def describe(self) -> str:
        return "\n".join(script.describe() for script in self.scripts)


def split(stream: bytes, cuts: Iterable[int]) -> tuple[bytes, ...]:
    """``stream`` cut at the given offsets (each modulo len+1; duplicates and empty pieces dropped)."""
    points = sorted({cut % (len(stream) + 1) for cut in cuts} | {0, len(stream)})
    return tuple(stream[a:b] for a, b in itertools.pairwise(points) if b > a)


def draw_script(draw: Draw, corpus: Corpus) -> Script:
    valid = chance(draw, 4)
    parts: list[bytes] = []
    if valid:
        parts.append(pick(draw, corpus.negos))
        parts.extend(pick(draw, corpus.frames) for _ in range(draw.integer(0, MAX_FRAMES)))
    else:
        if chance(draw, 3):
            parts.append(garbage(draw, corpus))  # before NEGO
        nego = draw.integer(0, 5)  # 0: no NEGO at all, 1: a mutated one, else a valid one
        if nego == 1:
            parts.append(mutate(pick(draw, corpus.negos), draw, corpus))
        elif nego > 1:
            parts.append(pick(draw, corpus.negos))
        if chance(draw, 3):
            parts.append(garbage(draw, corpus))  # after NEGO
        for _ in range(draw.integer(0, MAX_FRAMES)):
            frame = pick(draw, corpus.frames)
            parts.append(mutate(frame, draw, corpus) if chance(draw, 2) else frame)
    stream = b"".join(parts)
    chunks = split(stream, [draw.integer(0, len(stream)) for _ in range(draw.integer(0, MAX_CUTS))])
    slow = draw.integer(1, SLOW_MAX_BYTES) if chance(draw, 6) else 0
    ending = Ending.FIN if valid and chance(draw, 2) else pick(draw, tuple(Ending))
    cut_after = draw.integer(0, len(chunks)) if ending is Ending.CUT else len(chunks)
    return Script(
        chunks=chunks,
        slow_bytes=slow,
        slow_delay_ms=draw.integer(1, SLOW_MAX_DELAY_MS) if slow else 0,
        ending=ending,
        cut_after=cut_after,
        hold_ms=draw.integer(0, 50) if chance(draw, 4) else 0,
        valid=valid,
    )


def draw_attack(draw: Draw, corpus: Corpus) -> Attack:
    return Attack(tuple(draw_script(draw, corpus) for _ in range(draw.integer(1, MAX_CONNECTIONS))))


# ------------------------------------------------------------------------------------------------ playing


@dataclass
class Played:
    """What happened to one connection, from the client's side."""

    sent: int = 0
    received: int = 0
    #: The daemon closed (or reset) the connection while we were still sending.
    closed_by_server: bool = False
    #: HALF_CLOSE: the daemon closed its side within HALF_CLOSE_WAIT_S (None: not a half-close).
    half_close_answered: bool | None = None
    connect_failed: bool = False


async def _drain(loop: asyncio.AbstractEventLoop, sock: socket.socket, played: Played) -> None:
    """Read (and drop) whatever the daemon sends until it closes; its replies must never fill our window."""
    with contextlib.suppress(OSError):
        while data := await loop.sock_recv(sock, 65536):
            played.received += len(data)


async def _send(loop: asyncio.AbstractEventLoop, sock: socket.socket, script: Script, played: Played) -> None:
    slow_left = script.slow_bytes
    for chunk in script.chunks[: script.cut_after]:
        rest = chunk
        while slow_left and rest:
            await asyncio.sleep(script.slow_delay_ms / 1000)
            await loop.sock_sendall(sock, rest[:1])
            played.sent += 1
            rest = rest[1:]
            slow_left -= 1
        if rest:
            await loop.sock_sendall(sock, rest)
            played.sent += len(rest)
        await asyncio.sleep(0)  # a loop turn: the daemon may read each write on its own


async def play(script: Script, port: int) -> Played:
    """Play one connection against 127.0.0.1:``port``; never raises for what the daemon does to it."""
    loop = asyncio.get_running_loop()
    played = Played()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    drain: asyncio.Task[None] | None = None
    try:
        try:
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError):
            played.connect_failed = True
            return played
        drain = asyncio.create_task(_drain(loop, sock, played))
        try:
            await _send(loop, sock, script, played)
        except OSError:  # reset or closed by the daemon (a bad frame closes the connection)
            played.closed_by_server = True
        if script.hold_ms:
            await asyncio.sleep(script.hold_ms / 1000)
        if script.ending is Ending.HALF_CLOSE:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            try:
                await asyncio.wait_for(asyncio.shield(drain), HALF_CLOSE_WAIT_S)
                played.half_close_answered = True
            except TimeoutError:
                played.half_close_answered = False
        elif script.ending in (Ending.RST, Ending.CUT):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        if drain is not None:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
        sock.close()
    return played


async def play_attack(attack: Attack, port: int) -> list[Played]:
    return list(await asyncio.gather(*(play(script, port) for script in attack.scripts)))


# ------------------------------------------------------------------------------------------------ healthy


class HealthySession:
    """A well-behaved ONTAP node that runs alongside the campaign: NEGO, then a few SCREEN_REQs and a KEEP_ALIVE
    every ``interval_s`` until stopped. Every one of its notifications must reach the sink exactly once."""

    def __init__(self, port: int, *, interval_s: float = 0.02, per_tick: int = 4, max_events: int = 200_000) -> None:
        self.port = port
        self.interval_s = interval_s
        self.per_tick = per_tick
        self.max_events = max_events
        hello = handshake(seed=HEALTHY_SEED, node=0, policy_name="healthy", vs_uuid=DEFAULT_VS_UUID)
        self.session_id = hello.session_id
        self._nego = encode_handshake(hello)
        self._frames: Iterator[bytes] = generate_frames(
            seed=HEALTHY_SEED, node=0, count=max_events, base_time_us=BASE_TIME_US
        )
        self.sent = 0
        #: Local address of its connection, as the daemon names the peer ("127.0.0.1:port").
        self.peer = ""
        #: Why it stopped being healthy (the daemon closed it, a write failed), or None.
        self.failure: str | None = None
        self._stop = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._reader_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writer = writer
        host, port = writer.get_extra_info("sockname")[:2]
        self.peer = f"{host}:{port}"
        writer.write(self._nego)
        frames = XmlFrameReader()
        async with asyncio.timeout(10):
            payloads: list[bytes] = []
            while not payloads:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("the daemon closed the healthy session before NEGO_RESP")
                payloads = frames.feed(data)
        answer = decode_payload(payloads[0]).message
        if not isinstance(answer, HandshakeResp):
            raise ConnectionError(f"the healthy session got {answer!r} instead of NEGO_RESP")
        self._reader_task = asyncio.create_task(self._read(reader))
        self._task = asyncio.create_task(self._run(writer))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                pass
        if not self._stop.is_set() and self.failure is None:
            self.failure = "closed by the daemon"

    async def _run(self, writer: asyncio.StreamWriter) -> None:
        keep_alive = encode_keep_alive()
        while not self._stop.is_set() and self.sent < self.max_events:
            batch = [frame for _, frame in zip(range(self.per_tick), self._frames, strict=False)]
            try:
                writer.write(b"".join(batch) + keep_alive)
                await writer.drain()
            except OSError as exc:
                self.failure = f"write failed: {exc!r}"
                return
            self.sent += len(batch)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)

    @property
    def healthy(self) -> bool:
        return self.failure is None and self._task is not None and not self._task.done()

    async def stop_sending(self) -> int:
        """Stop sending (the connection stays open); returns the notifications sent."""
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.sent

    async def close(self) -> None:
        self._stop.set()
        for task in (self._task, self._reader_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()


def delivered_req_ids(events_dir: Path, session_id: str, *, live: bool = True) -> list[int]:
    """ReqIds of the events of ``session_id`` in the JSON Lines files under ``events_dir`` (an incomplete last line
    is skipped while ``live``: the sink may be writing it)."""
    needle = session_id.encode()
    out: list[int] = []
    for path in sorted(events_dir.glob("fpolicy_events_*.jsonl")):
        data = path.read_bytes()
        if live:
            data = data[: data.rfind(b"\n") + 1]
        for line in data.splitlines():
            if needle in line:
                event = orjson.loads(line)
                if event["metadata"].get("session_id") == session_id:
                    out.append(int(event["metadata"]["req_id"]))
    return out


def exactly_once(req_ids: Sequence[int], sent: int) -> str | None:
    """None when ``req_ids`` are 1..sent, each once; else what is wrong."""
    seen: dict[int, int] = {}
    for req_id in req_ids:
        seen[req_id] = seen.get(req_id, 0) + 1
    twice = sorted(r for r, n in seen.items() if n > 1)
    missing = sorted(set(range(1, sent + 1)) - set(seen))
    extra = sorted(set(seen) - set(range(1, sent + 1)))
    if not (twice or missing or extra):
        return None
    return f"{len(missing)} missing (first {missing[:5]}), {len(twice)} twice (first {twice[:5]}), {len(extra)} unsent"


async def wait_delivered(events_dir: Path, session_id: str, sent: int, within: float) -> list[int]:
    deadline = time.monotonic() + within
    while True:
        ids = await asyncio.to_thread(delivered_req_ids, events_dir, session_id)
        if len(ids) >= sent or time.monotonic() > deadline:
            return ids
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------------------------ logs

#: Error-level lines the peer's input explains: ONTAP (or whoever) sent an ALERT_MSG of severity FATAL; the
#: dead-letter cap dropped records of undecodable frames the peer sent (by design: the cap is the defence).
PEER_EXPLAINED: Final[Mapping[str, Callable[[Mapping[str, Any]], bool]]] = {
    "ontap_alert": lambda line: str(line.get("severity", "")).upper() == "FATAL",
    "dead_letter_dropped": lambda line: line.get("reason") in ("evicted", "too_large"),
}
_ERROR_LEVELS: Final = frozenset({"error", "critical", "exception"})


def _level(line: Mapping[str, Any]) -> str:
    return str(line.get("log_level") or line.get("level") or "").lower()


def unexplained(lines: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Log lines that mean a bug rather than a bad peer: ``task_failed``, anything carrying an exception or a
    traceback, and error-level lines the peer's input does not explain (:data:`PEER_EXPLAINED`)."""
    bad: list[Mapping[str, Any]] = []
    for line in lines:
        event = str(line.get("event", ""))
        carries_exception = "exc_info" in line or "exception" in line or "stack" in line
        traceback = any(isinstance(v, str) and "Traceback (most recent call last)" in v for v in line.values())
        if event == "task_failed" or carries_exception or traceback:
            bad.append(line)
        elif _level(line) in _ERROR_LEVELS:
            explained = PEER_EXPLAINED.get(event)
            if explained is None or not explained(line):
                bad.append(line)
    return bad


@dataclass
class LogTally:
    """Counts of log lines by (level, event), for a campaign's summary."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, lines: Iterable[Mapping[str, Any]]) -> None:
        for line in lines:
            key = (_level(line), str(line.get("event", "")))
            self.counts[key] = self.counts.get(key, 0) + 1

    def top(self, n: int = 12) -> list[tuple[str, int]]:
        ranked = sorted(self.counts.items(), key=lambda item: -item[1])[:n]
        return [(f"{level}:{event}", count) for (level, event), count in ranked]


class LogWatch:
    """A structlog processor chain for in-process campaigns: every line is judged (:func:`unexplained`) and tallied
    as it is written, then dropped; only the bad lines are kept. (Keeping every line, as ``capture_logs`` does,
    would keep what the daemon allocated for them alive and blur the memory check.)"""

    def __init__(self) -> None:
        self.tally = LogTally()
        self.bad: list[dict[str, Any]] = []
        self.lines = 0

    def _judge(self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Mapping[str, Any]:
        self.lines += 1
        self.tally.add((event_dict,))
        if unexplained((event_dict,)):
            self.bad.append(dict(event_dict))
        raise structlog.DropEvent

    @contextlib.contextmanager
    def installed(self) -> Iterator[LogWatch]:
        previous = structlog.get_config()
        structlog.configure(
            processors=[structlog.processors.add_log_level, self._judge],
            wrapper_class=structlog.make_filtering_bound_logger(0),
            cache_logger_on_first_use=False,
        )
        try:
            yield self
        finally:
            structlog.configure(**previous)
