"""Replay tracker and replay-test figures against brute-force recomputations, over arbitrary interleavings."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from fpolicyd.events import NameMaps, normalize
from fpolicyd.pipeline.replay import ReplayConfig, ReplayTracker
from fpolicyd.protocol.context import SessionContext
from fpolicyd.protocol.messages import ScreenRequest
from fpolicyd.protocol.xml_codec import decode_payload
from fpolicyd.replaytest.tails import max_displacement
from fpolicyd.simulator.generate import NodeStream

VS = "5e1f0c2a-6292-11ee-b5d1-000c29f00d01"
T0 = 1_700_000_000_000_000


@dataclass(frozen=True)
class Delivery:
    """One notification as a node sends it: which node, its GenerationTime, its id; or a reconnect of the node."""

    node: int
    generation_us: int
    event_id: str
    reconnect: bool = False


@st.composite
def storms(draw: st.DrawFn) -> list[Delivery]:
    """K nodes, each generating increasing GenerationTimes (some repeated ids), delivered in any interleaving,
    with reconnects of a node anywhere in the stream."""
    nodes = draw(st.integers(1, 4))
    per_node = [sorted(draw(st.lists(st.integers(0, 10**7), max_size=40))) for _ in range(nodes)]
    items = [Delivery(n, T0 + t, f"n{n}-{t}") for n, times in enumerate(per_node) for t in times]
    repeats = draw(st.lists(st.sampled_from(items), max_size=10)) if items else []
    reconnects = [Delivery(n, 0, "", reconnect=True) for n in draw(st.lists(st.integers(0, nodes - 1), max_size=5))]
    return draw(st.permutations(items + repeats + reconnects))


def run(storm: list[Delivery], window: int = 1 << 20) -> tuple[ReplayTracker, list[dict[str, object] | None]]:
    """Feed the storm; the wall clock of each handshake is T0 + 5 s (so 'replayed' means generated before)."""
    tracker = ReplayTracker(ReplayConfig(duplicate_window=window))
    sessions = {}
    flags: list[dict[str, object] | None] = []
    now = 0.0

    def handshake(node: int, wall_us: int) -> None:
        ctx = SessionContext(VS, "p", f"s{node}", "1.2", f"10.0.0.{node + 1}:{int(now * 1000) % 60000 + 1}")
        sessions[node] = tracker.session_started(ctx, now, wall_us)

    for node in range(4):
        handshake(node, T0)
    for item in storm:
        now += 0.001
        if item.reconnect:
            tracker.session_ended(sessions[item.node], now)
            handshake(item.node, T0 + 5_000_000)
            continue
        flags.append(sessions[item.node].observe(item.generation_us, item.event_id, now))
    return tracker, flags


def brute_force(storm: list[Delivery]) -> tuple[int, int, int, int]:
    """(out-of-order count, max lag µs, replayed count, duplicates) by definition, quadratic and obvious."""
    deliveries = [d for d in storm if not d.reconnect]
    ooo = lag = replayed = duplicates = 0
    for i, d in enumerate(deliveries):
        earlier = [e.generation_us for e in deliveries[:i] if e.node == d.node]
        if earlier and max(earlier) > d.generation_us:
            ooo += 1
            lag = max(lag, max(earlier) - d.generation_us)
        if any(e.event_id == d.event_id for e in deliveries[:i]):
            duplicates += 1
    for i, d in enumerate(storm):
        if d.reconnect:
            continue
        reconnected = any(e.reconnect and e.node == d.node for e in storm[:i])
        handshake_us = T0 + 5_000_000 if reconnected else T0
        replayed += d.generation_us < handshake_us
    return ooo, lag, replayed, duplicates


@settings(max_examples=200)
@given(storms())
def test_figures_equal_the_brute_force_ones(storm: list[Delivery]) -> None:
    tracker, flags = run(storm)
    stats = tracker.stats()
    ooo, lag, replayed, duplicates = brute_force(storm)
    assert (stats.out_of_order_events, stats.max_out_of_order_lag_us) == (ooo, lag)
    assert stats.replayed_events == replayed
    assert stats.duplicates == duplicates
    assert stats.reconnects == sum(d.reconnect for d in storm)
    assert sum(bool(f and f.get("out_of_order")) for f in flags) == ooo
    assert sum(bool(f and f.get("replayed")) for f in flags) == replayed
    assert sum(bool(f and f.get("duplicate")) for f in flags) == duplicates
    assert max((int(f["ooo_lag_us"]) for f in flags if f and "ooo_lag_us" in f), default=0) == lag  # type: ignore[call-overload]


@settings(max_examples=200)
@given(storms(), st.integers(1, 8))
def test_a_small_duplicate_window_never_invents_a_duplicate_and_always_sees_close_ones(
    storm: list[Delivery], window: int
) -> None:
    tracker, flags = run(storm, window)
    deliveries = [d for d in storm if not d.reconnect]
    seen: set[str] = set()
    first_at: dict[str, int] = {}
    close = 0
    for i, (d, f) in enumerate(zip(deliveries, flags, strict=True)):
        if f and f.get("duplicate"):
            assert d.event_id in seen  # a flagged duplicate is always a real one
        if d.event_id in seen and i - first_at[d.event_id] <= window:
            close += 1  # fewer than `window` ids were recorded since its first sighting: certainly remembered
            assert f
            assert f.get("duplicate")
        seen.add(d.event_id)
        first_at.setdefault(d.event_id, i)
    repeats = len(deliveries) - len(seen)
    assert close <= tracker.stats().duplicates <= repeats


@given(st.lists(st.integers(0, 50), max_size=60))
def test_max_displacement_equals_the_brute_force_one(times: list[int]) -> None:
    def rank(i: int) -> int:
        return sum(1 for j, t in enumerate(times) if t < times[i] or (t == times[i] and j < i))

    expected = max((i - rank(i) for i in range(len(times))), default=0)
    assert max_displacement(times) == expected
    assert (max_displacement(times) == 0) == (times == sorted(times))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 50), st.integers(0, 10**6))
def test_node_stream_event_ids_equal_the_daemons(seed: int, node: int, step_us: int) -> None:
    """replay-test's expected ids (computed from the spec, no decoding) are the ones the daemon would give."""
    stream = NodeStream(seed=seed, node=node, count=60)
    context = SessionContext(stream.vs_uuid, "p", "s", "1.2", "127.0.0.1:1")
    stamp = T0
    for _ in range(60):
        stamp += 1 + step_us
        spec = stream.next(stamp)
        frame = stream.frame(spec)
        request = decode_payload(frame[6:]).message
        assert isinstance(request, ScreenRequest)
        assert request == stream.request(spec)
        assert normalize(request, context, NameMaps(), 0).event_id == stream.event_id(spec)
