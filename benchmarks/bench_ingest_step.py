"""Per-event CPU of the reader's ingest step, with the C accelerator and on the pure-Python path, in one run.

    .venv/bin/python benchmarks/bench_ingest_step.py [--events N] [--repeat R]

``IngestSession.feed`` on 64-frame reads of the simulator's corpus (3 nodes, all 27 ReqTypes), set up as the
daemon's defaults: the packaged routes matched, the exact-dedup window, replay tracking, an asynchronous engine.
Prints µs per event of the whole step on each path and their ratio, and of its parts: the frame split, the
canonical scan (header and body), the event build, the JSON encode (the Python path), and the accelerator's one
call that replaces those three. Best of ``--repeat`` runs, the garbage collector paused (as ``timeit`` does).
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson

from fpolicyd.events import EventBuilder, NameMaps
from fpolicyd.pipeline import speedups
from fpolicyd.pipeline.dedup_window import DedupWindow
from fpolicyd.pipeline.ingest import Ingest, IngestCounters, IngestSession
from fpolicyd.pipeline.replay import ReplayTracker
from fpolicyd.pipeline.router import Router
from fpolicyd.protocol.framing import XmlFrameReader
from fpolicyd.protocol.session import Session
from fpolicyd.protocol.session_config import SessionConfig
from fpolicyd.protocol.xml_codec import fast_screen
from fpolicyd.protocol.xml_fast import ScreenFields
from fpolicyd.simulator.generate import DEFAULT_VS_UUID, generate_frames
from fpolicyd.storage.routes_file import load_routes

READ_FRAMES = 64
NODES = 3
#: The corpus' first GenerationTime, the handshake before it (nothing is flagged as replayed), the reads after.
BASE_US = 1_700_000_000_000_000
HANDSHAKE_US = BASE_US - 1_000_000
RECEIVED_US = BASE_US + 100_000_000
NAMES = NameMaps(default_svm="svm1")


def corpus(events: int) -> list[bytes]:
    """The frames of NODES simulated nodes, interleaved read by read as a busy server sees them."""
    per_node = [
        list(generate_frames(seed=node, node=node, count=events // NODES, base_time_us=BASE_US))
        for node in range(NODES)
    ]
    frames: list[bytes] = []
    for start in range(0, events // NODES, READ_FRAMES):
        for node_frames in per_node:
            frames += node_frames[start : start + READ_FRAMES]
    return frames


def handshake_payload() -> bytes:
    from fpolicyd.protocol.messages import Handshake
    from fpolicyd.protocol.xml_codec import encode_message

    return encode_message(Handshake(DEFAULT_VS_UUID, "fpolicyd", "bench-session", ("1.2",)))[6:]


def ingest_session(accelerate: bool, router: Router) -> IngestSession:
    ingest = Ingest(
        names=NAMES,
        counters=IngestCounters(),
        replay=ReplayTracker(),
        route=router.match,
        window=DedupWindow(max_entries=1_000_000, ttl_s=3600.0),
        accelerate=accelerate,
    )
    session = ingest.session(Session(SessionConfig(), peer="127.0.0.1:40000", now=0.0, fast=fast_screen))
    session.feed([handshake_payload()], 0.0, HANDSHAKE_US, HANDSHAKE_US / 1e6)
    return session


def best(fn: Callable[[], Any], repeat: int) -> float:
    """Seconds of the fastest of ``repeat`` calls, the collector paused."""
    times = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    finally:
        if enabled:
            gc.enable()
    return min(times)


def each(fn: Callable[..., Any], items: list[Any], *rest: Any) -> None:
    """``fn(item, *rest)`` for every item, results dropped at once (keeping 30,000 of them alive would time the
    page faults of fresh memory instead)."""
    for item in items:
        fn(item, *rest)


def feed_all(session: IngestSession, reads: list[list[bytes]]) -> int:
    events = 0
    for i, read in enumerate(reads):
        received = RECEIVED_US + i
        events += session.feed(read, 1.0 + i, received, received / 1e6).events
    return events


def split(wire: bytes) -> None:
    XmlFrameReader().feed(wire)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    status = speedups.accelerator_status()
    if status.path != "c":
        print(f"nothing to compare: {status.reason}")
        return 0

    frames = corpus(args.events)
    n = len(frames)
    payloads = [frame[6:] for frame in frames]
    reads = [payloads[i : i + READ_FRAMES] for i in range(0, n, READ_FRAMES)]
    wire = [b"".join(frames[i : i + READ_FRAMES]) for i in range(0, n, READ_FRAMES)]
    router = Router(load_routes())

    # Both paths must do the same work: every frame is one event, identical bytes on both.
    check = [ingest_session(accelerate, router) for accelerate in (True, False)]
    outputs = [[r for read in reads for r in s.feed(read, 1.0, RECEIVED_US, RECEIVED_US / 1e6).records] for s in check]
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) == n
    assert check[0]._ingest.counters.accelerated == n

    probe = ingest_session(False, router)
    context = probe.session.context
    assert context is not None
    builder = EventBuilder(context, NAMES)
    fields: list[ScreenFields] = []
    for payload in payloads:
        parsed = fast_screen(payload)
        assert parsed is not None
        fields.append(parsed)
    events = [builder.build(f, RECEIVED_US)[0] for f in fields]
    encode = speedups.session_encoder(context, NAMES)
    assert encode is not None

    def whole_step(accelerate: bool) -> float:
        # A fresh session per run (the dedup window would otherwise hold every key already).
        times = []
        for _ in range(args.repeat):
            session = ingest_session(accelerate, router)
            times.append(best(partial(feed_all, session, reads), 1))
        return min(times)

    repeat = args.repeat
    rows = [
        ("frame split (XmlFrameReader, 64 frames/read)", best(partial(each, split, wire), repeat)),
        ("canonical scan (fast_screen: header + body)", best(partial(each, fast_screen, payloads), repeat)),
        ("event build (EventBuilder.build)", best(partial(each, builder.build, fields, RECEIVED_US), repeat)),
        ("event JSON (orjson.dumps)", best(partial(each, orjson.dumps, events), repeat)),
        (
            "accelerator (scan + build + JSON, one C call)",
            best(partial(each, encode, payloads, RECEIVED_US), args.repeat),
        ),
        ("ingest step, pure Python (IngestSession.feed)", whole_step(False)),
        ("ingest step, C accelerator (IngestSession.feed)", whole_step(True)),
    ]
    per_event = [(name, seconds / n * 1e6) for name, seconds in rows]
    width = max(len(name) for name, _ in per_event)
    print(f"{n} events, {len(reads)} reads of {READ_FRAMES} frames; µs/event, best of {args.repeat}")
    for name, us in per_event:
        print(f"{name:{width}}  {us:8.2f}")
    python_us, c_us = per_event[-2][1], per_event[-1][1]
    print(
        f"\ningest step: {python_us / c_us:.1f}x less CPU with the accelerator "
        f"({1e6 / python_us:,.0f} -> {1e6 / c_us:,.0f} events/s of one core for this step alone)"
    )
    print(orjson.dumps({name: round(us, 3) for name, us in per_event}).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
