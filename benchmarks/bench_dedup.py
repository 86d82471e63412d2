"""Embedded dedup store: cost per event of ``check_many`` at batch sizes 1, 100 and 1000.

    .venv/bin/python benchmarks/bench_dedup.py [--events 20000] [--seconds 5] [--dir DIR]

Cases, each at every batch size (wall and CPU µs per event on the calling thread, and events/s):

- ``new``: every event is new (SELECT miss + INSERT), the store below its size limit;
- ``duplicate``: every event was seen (SELECT hit, no write);
- ``new at cap``: every event is new and the store is at ``max_entries`` (each batch also evicts the oldest);
- ``new FULL``: as ``new`` with ``synchronous=FULL`` (an fsync per transaction), to show why NORMAL is the default.

Then the cost of building one exact request the way the processing stage does (``DedupPolicy.exact_request``,
not part of the cases above), the on-disk size per claim and the time ``open`` takes on a store of that size (it
counts the claims and purges expired ones). Each case runs ``--events`` events or ``--seconds``, whichever ends
first.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fpolicyd.pipeline.dedup import DedupPolicy, DedupRequest, exact_key
from fpolicyd.storage.dedup_store import DB_FILE_NAME, EmbeddedDedupStore

T0 = 1_714_557_600.0
TTL = 7 * 86400.0


@dataclass(frozen=True, slots=True)
class Row:
    case: str
    batch: int
    events: int
    wall_s: float
    cpu_s: float

    def render(self) -> str:
        return (
            f"{self.case:<14}{self.batch:>7}{self.events:>9}{self.wall_s / self.events * 1e6:>12.1f}"
            f"{self.cpu_s / self.events * 1e6:>12.1f}{self.events / self.wall_s:>12,.0f}"
        )


def requests(prefix: str, start: int, count: int, now: float) -> list[DedupRequest]:
    out = []
    for n in range(start, start + count):
        event_id = f"{prefix}-{n:012d}-5a1e-4c0f-9d3b-6f2e8a7c1b90"  # a UUID-sized id
        out.append(DedupRequest(exact_key(event_id), event_id, f"i-0abc:{n}", now, now + TTL))
    return out


def fresh(prefix: str, batch: int) -> Callable[[int], list[DedupRequest]]:
    """Batch ``i`` of never-seen ids."""

    def make(i: int) -> list[DedupRequest]:
        return requests(prefix, i * batch, batch, T0)

    return make


def run(
    case: str,
    batch: int,
    store: EmbeddedDedupStore,
    make: Callable[[int], list[DedupRequest]],
    args: argparse.Namespace,
) -> Row:
    batches = max(1, args.events // batch)
    deadline = time.perf_counter() + args.seconds
    done = 0
    wall = cpu = 0.0
    for i in range(batches):
        chunk = make(i)  # built outside the timed region
        w0, c0 = time.perf_counter(), time.thread_time()
        store.check_many(chunk, T0 + i * 0.001)
        cpu += time.thread_time() - c0
        wall += time.perf_counter() - w0
        done += len(chunk)
        if time.perf_counter() > deadline:
            break
    return Row(case, batch, done, wall, cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="events per case (upper bound)")
    parser.add_argument("--seconds", type=float, default=5.0, help="time per case (upper bound)")
    parser.add_argument("--dir", type=Path, default=None, help="directory for the stores (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        print(f"{'case':<14}{'batch':>7}{'events':>9}{'wall µs/ev':>12}{'cpu µs/ev':>12}{'events/s':>12}")
        for batch in (1, 100, 1000):
            directory = root / f"b{batch}"
            with EmbeddedDedupStore(directory, max_entries=10_000_000).open(T0) as store:
                print(run("new", batch, store, fresh("n", batch), args).render())
                # the same ids again, by another claimant: every one a duplicate
                seen = store.claims()
                ids = sorted(k.pk for k in seen)

                def again(i: int, b: int = batch, ids: list[str] = ids) -> list[DedupRequest]:
                    chunk = ids[(i * b) % len(ids) : (i * b) % len(ids) + b] or ids[:b]
                    return [DedupRequest(exact_key(e), e, "other:1", T0, T0 + TTL) for e in chunk]

                print(run("duplicate", batch, store, again, args).render())
            cap = len(ids)
            with EmbeddedDedupStore(directory, max_entries=cap).open(T0) as store:
                print(run("new at cap", batch, store, fresh("c", batch), args).render())
                assert len(store) == cap
            full_dir = root / f"full{batch}"
            with EmbeddedDedupStore(full_dir, max_entries=10_000_000).open(T0) as store:
                assert store._conn is not None
                store._conn.execute("PRAGMA synchronous=FULL")
                print(run("new FULL", batch, store, fresh("f", batch), args).render())

        print()
        policy = DedupPolicy(exact_ttl_s=TTL)
        ids = [f"r-{n:012d}-5a1e-4c0f-9d3b-6f2e8a7c1b90" for n in range(args.events)]
        c0 = time.thread_time()
        for n, event_id in enumerate(ids):
            policy.exact_request(event_id, f"i-0abc:{n}", T0, T0)
        built_s = time.thread_time() - c0
        print(f"request (DedupPolicy.exact_request): {built_s / len(ids) * 1e6:.2f} µs CPU per event")
        big = root / "size"
        count = 200_000
        with EmbeddedDedupStore(big, max_entries=10_000_000).open(T0) as store:
            for start in range(0, count, 1000):
                store.check_many(requests("s", start, 1000, T0), T0)
        size = (big / DB_FILE_NAME).stat().st_size
        t0 = time.perf_counter()
        with EmbeddedDedupStore(big, max_entries=10_000_000).open(T0) as store:
            opened_s = time.perf_counter() - t0
            assert len(store) == count
        print(f"on disk: {size / count:.0f} B per claim ({count:,} claims, {size / 1e6:.1f} MB)")
        print(f"open (count + purge) with {count:,} claims: {opened_s * 1000:.0f} ms")


if __name__ == "__main__":
    main()
