"""Settle cost per call with 1k, 100k and 1M paths held: offers must stay O(log n) and a ``due`` call with
nothing due must not grow with the number of held paths.

    .venv/bin/python benchmarks/bench_settle.py [--sizes 1000,100000,1000000] [--ops 50000]

For each size the settler is filled with that many held paths (quiet window far in the future, so nothing
comes due), then it times, per call:

- ``offer new``: an event for a path not held yet (starts a burst: dict insert, heap push, FIFO append);
- ``offer join``: an event for a held path (coalesced: no heap operation at all);
  both as the mean (garbage collection included) / the median of 1,000-offer chunks;
- ``due empty``: ``due(now)`` with nothing due;
- ``next_deadline`` and ``oldest_pending_seq``;
- ``release``: ``due(now)`` once every held path is due, per output (heap pop + the coalesced event);

and the resident memory per held path: the event itself (small here: two metadata keys; a normalized event
carries ~18) and what settle adds. The last column is ``due empty`` relative to the smallest size. The
machine is shared: compare the rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import gc
import random
import resource
import statistics
import time
from collections.abc import Callable

from fpolicyd.events import FileEvent
from fpolicyd.pipeline.settle import SettlePolicy, Settler

POLICY = SettlePolicy(window_s=10.0**6, max_hold_s=2 * 10.0**6)
CHUNK = 1000


def make_event(n: int, op: str = "write") -> FileEvent:
    return FileEvent(
        event_id=f"{n:032x}",
        operation_type=op,
        file_path=f"/vol/dir{n % 1000}/file{n}.dat",
        previous_path=None,
        volume_name="vol1",
        svm_name="svm1",
        timestamp="2026-01-01T00:00:00.000000Z",
        file_size=n,
        client_ip="192.0.2.1",
        metadata={"received_at": "2026-01-01T00:00:00.000000Z", "routes": []},
    )


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    """Median over 1,000-call chunks: the intrinsic cost of an O(1) call, not the shared machine's noise."""
    chunks = []
    for _ in range(max(calls // CHUNK, 1)):
        start = time.perf_counter_ns()
        for _ in range(CHUNK):
            fn()
        chunks.append((time.perf_counter_ns() - start) / CHUNK)
    return statistics.median(chunks) / 1000


def bench(size: int, ops: int) -> dict[str, float]:
    gc.collect()
    rss_start = rss_bytes()
    held_events = [make_event(n) for n in range(size)]
    rss_events = rss_bytes()
    settler = Settler(lambda _e: POLICY, max_pending=10 * size + ops)
    seq = 0
    for event in held_events:
        seq += 1
        settler.offer(event, seq, float(seq) * 1e-6)
    del held_events
    rss_held = rss_bytes()
    t = float(size) * 1e-6

    def offers(events: list[FileEvent]) -> tuple[float, float]:
        """Mean µs per offer (garbage collection included) and the median of 1,000-offer chunks (the
        steady cost, without the collector's pauses and other processes' bursts on a shared machine)."""
        nonlocal seq
        chunks = []
        total = 0
        for lo in range(0, len(events), CHUNK):
            start = time.perf_counter_ns()
            for event in events[lo : lo + CHUNK]:
                seq += 1
                settler.offer(event, seq, t)
            elapsed = time.perf_counter_ns() - start
            total += elapsed
            chunks.append(elapsed / len(events[lo : lo + CHUNK]))
        return total / len(events) / 1000, statistics.median(chunks) / 1000

    offer_new, offer_new_median = offers([make_event(size + i) for i in range(ops)])
    rng = random.Random(7)
    offer_join, offer_join_median = offers([make_event(rng.randrange(size)) for _ in range(ops)])

    assert settler.due(t) == []
    due_empty = per_call_us(lambda: settler.due(t), ops)
    next_deadline = per_call_us(settler.next_deadline, ops)
    oldest = per_call_us(settler.oldest_pending_seq, ops)

    held = settler.pending_count
    start = time.perf_counter_ns()
    released = settler.due(float("inf"))
    release = (time.perf_counter_ns() - start) / max(len(released), 1) / 1000
    assert len(released) == held
    return {
        "held": held,
        "offer_new": offer_new,
        "offer_new_median": offer_new_median,
        "offer_join": offer_join,
        "offer_join_median": offer_join_median,
        "due_empty": due_empty,
        "next_deadline": next_deadline,
        "oldest": oldest,
        "release": release,
        "event_bytes": (rss_events - rss_start) / size,
        "settle_bytes": (rss_held - rss_events) / size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,100000,1000000", help="held paths per case, comma-separated")
    parser.add_argument("--ops", type=int, default=50_000, help="timed calls per measurement")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        f"{'held paths':>12} {'offer new':>14} {'offer join':>14} {'due empty':>10} {'next_dl':>8} "
        f"{'oldest':>7} {'release':>8} {'B/path':>13} {'due vs 1st':>10}"
    )
    print(
        f"{'':>12} {'µs mean/median':>14} {'µs mean/median':>14} {'µs':>10} {'µs':>8} {'µs':>7} {'µs/out':>8} "
        f"{'event/settle':>13}"
    )
    first_due: float | None = None
    for size in sizes:
        r = bench(size, args.ops)
        first_due = first_due or r["due_empty"]
        print(
            f"{size:>12,} {r['offer_new']:>7.2f}/{r['offer_new_median']:<6.2f} "
            f"{r['offer_join']:>7.2f}/{r['offer_join_median']:<6.2f} {r['due_empty']:>10.3f} "
            f"{r['next_deadline']:>8.3f} {r['oldest']:>7.3f} {r['release']:>8.2f} "
            f"{r['event_bytes']:>6.0f}/{r['settle_bytes']:<6.0f} "
            f"{r['due_empty'] / first_due:>9.2f}x"
        )


if __name__ == "__main__":
    main()
