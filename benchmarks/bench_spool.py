"""Spool append throughput per fsync policy, against SQLite in WAL mode (why the spool uses segment files).

    .venv/bin/python benchmarks/bench_spool.py [--seconds 2] [--max-mb 512] [--group 64] [--dir DIR]

Every case appends 1 KB payloads in groups of ``--group`` (what one socket read yields) until ``--seconds`` or
``--max-mb`` is reached, and prints records/s, MB/s, the CPU µs per record spent on the appending thread (the
event loop's share) and, where a commit is asynchronous, the append → durable latency (p50/p99 per group).

- ``segments never``: append_many + flush per group, no fsync.
- ``segments group 5ms``: as above, a worker thread runs ``sync()`` 5 ms after data became pending.
- ``segments always``: the worker thread syncs back to back whenever data is pending (one sync at a time).
- ``segments always inline``: ``sync()`` after every group on the appending thread (the worst case).
- ``... @20k/s``: the same, paced at 20,000 events/s (the design's latency budget: p99 to durable ≤ 20 ms).
- ``sqlite WAL NORMAL|FULL``: one transaction per group (``executemany`` + commit) on the appending thread.
- ``sqlite WAL FULL 5ms``: one transaction per 5 ms (SQLite's best group commit without a second thread).

Then it reads everything back and acks it (segments: read + ack_range; SQLite: SELECT + DELETE). First it times
crc32 on 1 KB (zlib's, binascii's, and ISA-L's, which the spool uses) and the daemon's side of an ack from a
delivery process (``ack_delivered``, one per 40 records).
"""

from __future__ import annotations

import argparse
import binascii
import os
import sqlite3
import statistics
import tempfile
import threading
import time
import timeit
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isal import isal_zlib

from fpolicyd.storage.spool import Spool, SpoolFsync, SpoolSettings

PAYLOAD_BYTES = 1024


@dataclass(frozen=True, slots=True)
class Result:
    name: str
    records: int
    seconds: float
    owner_cpu_s: float
    latencies_ms: tuple[float, ...] = ()
    read_per_s: float | None = None

    def row(self) -> str:
        rate = self.records / self.seconds
        mbps = rate * PAYLOAD_BYTES / 1e6
        cpu_us = self.owner_cpu_s / self.records * 1e6
        lat = "-"
        if self.latencies_ms:
            q = statistics.quantiles(self.latencies_ms, n=100) if len(self.latencies_ms) > 1 else [0.0] * 99
            lat = f"{statistics.median(self.latencies_ms):.2f} / {q[98]:.2f}"
        read = f"{self.read_per_s:>12,.0f}" if self.read_per_s is not None else f"{'-':>12}"
        return f"{self.name:<27} {rate:>12,.0f} {mbps:>8,.0f} {cpu_us:>9.2f} {lat:>15} {read}"


def payloads(n: int) -> list[bytes]:
    """Distinct 1 KB JSON-ish payloads (distinct so no layer can cheat by deduplicating)."""
    base = os.urandom(PAYLOAD_BYTES // 2).hex().encode()
    return [b'{"i":%08d,"x":"' % i + base[: PAYLOAD_BYTES - 20] + b'"}' for i in range(n)]


class Syncer(threading.Thread):
    """The asyncio side's commit task in miniature: sync ``delay`` seconds after data became pending."""

    def __init__(self, spool: Spool, delay: float, pending_since: list[tuple[float, int]]) -> None:
        super().__init__(daemon=True)
        self.spool = spool
        self.delay = delay
        self.stop = threading.Event()
        self.pending = pending_since  # (append time, last seq) per group, appended by the owner thread
        self.latencies_ms: list[float] = []
        self.done = 0

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.spool.sync_pending:
                time.sleep(0.0002)
                continue
            if self.delay:
                time.sleep(self.delay)
            durable = self.spool.sync()
            now = time.perf_counter()
            groups = self.pending
            while self.done < len(groups) and groups[self.done][1] <= durable:
                self.latencies_ms.append((now - groups[self.done][0]) * 1e3)
                self.done += 1


def bench_segments(
    name: str,
    directory: Path,
    *,
    policy: SpoolFsync,
    mode: str,
    seconds: float,
    max_bytes: int,
    group: int,
    rate: float | None = None,
) -> Result:
    data = payloads(group)
    settings = SpoolSettings(directory=directory, fsync=policy, max_bytes=max(max_bytes * 2, 64 * 1024 * 1024))
    spool = Spool.open(settings, ["bench"])
    groups: list[tuple[float, int]] = []
    syncer = Syncer(spool, 0.005 if mode == "group" else 0.0, groups) if mode in ("group", "always") else None
    if syncer is not None:
        syncer.start()
    n = 0
    cpu0 = time.thread_time()
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while n * PAYLOAD_BYTES < max_bytes and time.perf_counter() < deadline:
        if rate is not None:  # paced: one group every group/rate seconds
            pause = t0 + n / rate - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        seqs = spool.append_many(data)
        spool.flush()
        if syncer is not None:
            groups.append((time.perf_counter(), seqs[-1]))
        elif mode == "inline":
            spool.sync()
        n += group
    if syncer is not None:
        while syncer.done < len(groups):
            time.sleep(0.0005)
        syncer.stop.set()
        syncer.join()
    elapsed = time.perf_counter() - t0
    cpu = time.thread_time() - cpu0
    latencies = tuple(syncer.latencies_ms) if syncer is not None else ()
    # Read back and ack everything (segments are removed as they are acked).
    r0 = time.perf_counter()
    got = 0
    while True:
        batch = spool.read("bench", 1000, 1 << 20)
        if not batch:
            break
        spool.ack_range("bench", batch[0].seq, batch[-1].seq)
        got += len(batch)
    read_rate = got / (time.perf_counter() - r0)
    assert got == n, (got, n)
    spool.close()
    return Result(name, n, elapsed, cpu, latencies, read_rate)


def bench_sqlite(
    name: str, path: Path, *, synchronous: str, mode: str, seconds: float, max_bytes: int, group: int
) -> Result:
    data = payloads(group)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute("CREATE TABLE spool (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
    n = 0
    seq = 1
    in_tx = False
    last_commit = time.perf_counter()
    cpu0 = time.thread_time()
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while n * PAYLOAD_BYTES < max_bytes and time.perf_counter() < deadline:
        if not in_tx:
            db.execute("BEGIN")
            in_tx = True
        db.executemany("INSERT INTO spool VALUES (?, ?)", zip(range(seq, seq + group), data, strict=True))
        seq += group
        n += group
        now = time.perf_counter()
        if mode == "per-group" or now - last_commit >= 0.005:
            db.execute("COMMIT")
            in_tx = False
            last_commit = now
    if in_tx:
        db.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    cpu = time.thread_time() - cpu0
    r0 = time.perf_counter()
    got = 0
    after = 0
    while True:
        rows = db.execute("SELECT seq, payload FROM spool WHERE seq > ? ORDER BY seq LIMIT 1000", (after,)).fetchall()
        if not rows:
            break
        after = rows[-1][0]
        db.execute("DELETE FROM spool WHERE seq <= ?", (after,))
        got += len(rows)
    read_rate = got / (time.perf_counter() - r0)
    assert got == n, (got, n)
    db.close()
    return Result(name, n, elapsed, cpu, (), read_rate)


def bench_acks_from_another_process(directory: Path, *, records: int, every: int) -> float:
    """µs per ``Spool.ack_delivered``: the daemon's bookkeeping when a delivery process acks every ``every`` records
    it read itself (the acks overtake the spool's own read position, which the daemon never uses)."""
    spool = Spool.open(SpoolSettings(directory=directory, fsync=SpoolFsync.never), ["a"])
    try:
        group = payloads(1000)
        for _ in range(records // len(group)):
            spool.append_many(group)
        spool.flush()
        last = spool.sync()
        acks = range(every, last + 1, every)
        started = time.perf_counter()
        for up_to in acks:
            spool.ack_delivered("a", up_to)
        return (time.perf_counter() - started) / len(acks) * 1e6
    finally:
        spool.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=2.0, help="time budget per case")
    parser.add_argument("--max-mb", type=int, default=512, help="data budget per case")
    parser.add_argument("--group", type=int, default=64, help="records per append_many / transaction")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    max_bytes = args.max_mb * 1024 * 1024

    payload = payloads(1)[0]
    for label, fn in (("zlib.crc32", zlib.crc32), ("binascii.crc32", binascii.crc32), ("isal crc32", isal_zlib.crc32)):
        us = min(timeit.repeat(lambda fn=fn: fn(payload), number=100_000, repeat=5)) / 100_000 * 1e6  # type: ignore[misc]
        print(f"{label:<16} {us:.3f} µs per 1 KB")

    common = {"seconds": args.seconds, "max_bytes": max_bytes, "group": args.group}

    def kw(policy: SpoolFsync, mode: str) -> dict[str, Any]:
        return {"policy": policy, "mode": mode, **common}

    def sq(synchronous: str, mode: str) -> dict[str, Any]:
        return {"synchronous": synchronous, "mode": mode, **common}

    cases: list[Callable[[Path], Result]] = [
        lambda d: bench_segments("segments never", d, **kw(SpoolFsync.never, "none")),
        lambda d: bench_segments("segments group 5ms", d, **kw(SpoolFsync.group, "group")),
        lambda d: bench_segments("segments always", d, **kw(SpoolFsync.always, "always")),
        lambda d: bench_segments("segments always inline", d, **kw(SpoolFsync.always, "inline")),
        lambda d: bench_segments("segments group 5ms @20k/s", d, rate=20_000, **kw(SpoolFsync.group, "group")),
        lambda d: bench_segments("segments always @20k/s", d, rate=20_000, **kw(SpoolFsync.always, "always")),
        lambda d: bench_sqlite("sqlite WAL NORMAL", d / "s.db", **sq("NORMAL", "per-group")),
        lambda d: bench_sqlite("sqlite WAL FULL", d / "s.db", **sq("FULL", "per-group")),
        lambda d: bench_sqlite("sqlite WAL FULL 5ms", d / "s.db", **sq("FULL", "5ms")),
    ]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        per_ack = bench_acks_from_another_process(Path(tmp), records=100_000, every=40)
    print(f"ack_delivered    {per_ack:.1f} µs per ack (a delivery process's ack, one per 40 records)")

    print(f"\n1 KB payloads, groups of {args.group}, ≤{args.seconds:g} s or ≤{args.max_mb} MB per case")
    print(f"{'case':<27} {'records/s':>12} {'MB/s':>8} {'owner µs':>9} {'durable p50/p99':>15} {'read+ack/s':>12}")
    for case in cases:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            print(case(Path(tmp)).row(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
