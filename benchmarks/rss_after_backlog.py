"""Does the daemon hand memory back after a backlog drains? Fragmentation or kept buffers?

    .venv/bin/python benchmarks/rss_after_backlog.py [--events N] [--nodes K]

One in-process daemon (JSON Lines sink, sinks in this process, reader dedup on, defaults otherwise). The sink is
held while the simulator sends ``--events`` per node, so they pile up as a backlog; then it is released and drains.
RSS (``/proc/self/status`` VmRSS) and the count of live Python objects are taken: at start, with the backlog, once
drained, after a full garbage collection, and after glibc's ``malloc_trim(0)``. Live objects back at their starting
count while RSS stays up means freed memory the allocators keep (fragmentation of CPython's arenas or glibc's heap);
what ``malloc_trim`` gives back is glibc's part; ``--trace`` adds the bytes Python's own allocations hold
(tracemalloc), which counts large buffers the object count does not. Numbers for one run on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import uvloop

from fpolicyd.app import Daemon
from fpolicyd.config import load_settings
from fpolicyd.pipeline.records import Record
from fpolicyd.simulator.client import SimulatorConfig, run
from fpolicyd.sinks.local import JsonlSender


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def sample(label: str) -> tuple[str, float, int, float]:
    traced = tracemalloc.get_traced_memory()[0] / (1 << 20) if tracemalloc.is_tracing() else float("nan")
    return label, rss_mib(), len(gc.get_objects()), traced


async def measure(events: int, nodes: int, data_dir: Path) -> list[tuple[str, float, int, float]]:
    gate = asyncio.Event()
    real_send = JsonlSender.send

    async def held(self: JsonlSender, records: Sequence[Record]) -> Sequence[Record]:
        await gate.wait()
        return await real_send(self, records)

    JsonlSender.send = held  # type: ignore[method-assign]
    settings = load_settings(
        overrides={
            "listen_host": "127.0.0.1",
            "listen_port": 0,
            "http_port": 0,
            "data_dir": str(data_dir),
            "jsonl_fsync": "never",
            "delivery_process": "off",
        },
        search_default_paths=False,
    )
    daemon = Daemon(settings)
    await daemon.start()
    samples = [sample("started")]
    try:
        report = await run(SimulatorConfig(port=daemon.port, nodes=nodes, events=events, seed=7))
        assert report.completed
        await asyncio.sleep(0.5)
        samples.append(sample(f"backlog of {report.sent:,} events held"))
        gate.set()
        deadline = time.monotonic() + 300
        while any(worker.lag for worker in daemon.spooler.local_workers) and time.monotonic() < deadline:  # noqa: ASYNC110 - a bounded poll of the sinks' state
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        samples.append(sample("drained"))
        gc.collect()
        samples.append(sample("after gc.collect()"))
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        samples.append(sample("after malloc_trim(0)"))
    finally:
        await daemon.stop()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000, help="per node")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--trace", action="store_true", help="also trace Python allocations (tracemalloc; slower)")
    args = parser.parse_args()
    if args.trace:
        tracemalloc.start()
    with tempfile.TemporaryDirectory() as tmp:
        samples = uvloop.run(measure(args.events, args.nodes, Path(tmp)))
    print("| moment | RSS MiB | live Python objects | traced Python allocations MiB |")
    print("|---|---:|---:|---:|")
    for label, rss, objects, traced in samples:
        print(f"| {label} | {rss:,.1f} | {objects:,} | {traced:,.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
