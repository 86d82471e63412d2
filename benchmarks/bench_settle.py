"""Settle cost per call with 1k, 100k and 1M paths held: offers must stay O(log n) and a ``due`` call with
nothing due must not grow with the number of held paths.

    .venv/bin/python benchmarks/bench_settle.py [--sizes 1000,100000,1000000] [--ops 50000]

For each size the settler is filled with that many held paths (quiet window far in the future, so nothing
comes due), then it times, per call:

- ``offer new``: an event for a path not held yet (starts a burst: dict insert, heap push, FIFO append);
- ``offer join``: an event for a held path (coalesced: no heap operation at all);
- ``due empty``: ``due(now)`` with nothing due;
- ``next_deadline`` and ``oldest_pending_seq``;
- ``release``: ``due(now)`` once every held path is due, per output (heap pop + the coalesced event);

and the resident memory per held path (small events: two metadata keys; a normalized event carries ~18, so
expect more in production). The last column is ``due empty`` relative to the smallest size.
"""

from __future__ import annotations

import argparse
import gc
import random
import resource
import time

from fpolicyd.events import FileEvent
from fpolicyd.pipeline.settle import SettlePolicy, Settler

POLICY = SettlePolicy(window_s=10.0**6, max_hold_s=2 * 10.0**6)


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


def per_call_us(fn: object, calls: int) -> float:
    assert callable(fn)
    start = time.perf_counter_ns()
    for _ in range(calls):
        fn()
    return (time.perf_counter_ns() - start) / calls / 1000


def bench(size: int, ops: int) -> dict[str, float]:
    gc.collect()
    rss_before = rss_bytes()
    settler = Settler(lambda _e: POLICY, max_pending=10 * size + ops)
    seq = 0
    for n in range(size):
        seq += 1
        settler.offer(make_event(n), seq, float(n) * 1e-6)
    rss_held = rss_bytes() - rss_before
    t = float(size) * 1e-6

    new_events = [make_event(size + i) for i in range(ops)]
    start = time.perf_counter_ns()
    for event in new_events:
        seq += 1
        settler.offer(event, seq, t)
    offer_new = (time.perf_counter_ns() - start) / ops / 1000

    rng = random.Random(7)
    join_events = [make_event(rng.randrange(size)) for _ in range(ops)]
    start = time.perf_counter_ns()
    for event in join_events:
        seq += 1
        settler.offer(event, seq, t)
    offer_join = (time.perf_counter_ns() - start) / ops / 1000

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
        "offer_join": offer_join,
        "due_empty": due_empty,
        "next_deadline": next_deadline,
        "oldest": oldest,
        "release": release,
        "rss_per_path": rss_held / size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,100000,1000000", help="held paths per case, comma-separated")
    parser.add_argument("--ops", type=int, default=50_000, help="timed calls per measurement")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        f"{'held paths':>12} {'offer new':>10} {'offer join':>11} {'due empty':>10} {'next_dl':>8} "
        f"{'oldest':>7} {'release':>8} {'B/path':>7} {'due vs 1st':>10}"
    )
    print(f"{'':>12} {'µs':>10} {'µs':>11} {'µs':>10} {'µs':>8} {'µs':>7} {'µs/out':>8} {'RSS':>7}")
    first_due: float | None = None
    for size in sizes:
        r = bench(size, args.ops)
        first_due = first_due or r["due_empty"]
        print(
            f"{size:>12,} {r['offer_new']:>10.2f} {r['offer_join']:>11.2f} {r['due_empty']:>10.3f} "
            f"{r['next_deadline']:>8.3f} {r['oldest']:>7.3f} {r['release']:>8.2f} {r['rss_per_path']:>7.0f} "
            f"{r['due_empty'] / first_due:>9.2f}x"
        )


if __name__ == "__main__":
    main()
