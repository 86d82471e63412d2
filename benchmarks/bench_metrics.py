"""What metrics cost: the reader's per-event counting, the sink worker's per-record latency observation, a scrape.

    .venv/bin/python benchmarks/bench_metrics.py [--events 20000] [--repeat 5]

1. reader: events by operation is one dict increment per event in the connection's read loop;
2. sink worker: ``SinkInstruments.settled`` reads ``received_at``/``generation_time`` from each acknowledged
   event's JSON bytes and observes two histograms per batch (one lock per batch);
3. scrape: ``generate_latest`` of a daemon that served the simulator (one jsonl sink), as /metrics runs it on the
   HTTP thread;
4. A/B, end to end: the daemon in this process, ``fpolicyd simulate`` in another; daemon CPU per event with the
   sink-side latency observation on and off (``SinkInstruments.settled`` replaced by a no-op), alternating runs.

Numbers are per event (µs) next to the reader's whole per-event budget (~50 µs, README "Performance").
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import uvloop
from prometheus_client import generate_latest

from fpolicyd.app import Daemon
from fpolicyd.config import load_settings
from fpolicyd.events import NameMaps, normalize
from fpolicyd.obs.metrics import SinkInstruments
from fpolicyd.pipeline.records import Record
from fpolicyd.protocol.context import SessionContext
from fpolicyd.simulator.client import SimulatorConfig, run
from fpolicyd.simulator.generate import generate_requests


def best_of(repeat: int, work: Callable[[], None]) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def events(count: int) -> list[bytes]:
    context = SessionContext(
        vs_uuid="5e1f0c2a-6292-11ee-b5d1-000c29f00d01",
        policy_name="p",
        session_id="s",
        protocol_version="1.2",
        peer="10.0.0.1:1",
    )
    now_us = time.time_ns() // 1000
    return [
        normalize(request, context, NameMaps(), now_us - 1000).to_json()
        for request in generate_requests(seed=1, node=0, count=count, base_time_us=now_us - 2_000_000)
    ]


def bench_reader(payloads: list[bytes], repeat: int) -> float:
    import orjson

    operations_in_order = [orjson.loads(p)["operation_type"] for p in payloads]

    def count() -> None:
        operations: dict[str, int] = {}
        for operation in operations_in_order:
            operations[operation] = operations.get(operation, 0) + 1

    def baseline() -> None:
        for _operation in operations_in_order:
            pass

    return (best_of(repeat, count) - best_of(repeat, baseline)) / len(payloads) * 1e6


def bench_settled(payloads: list[bytes], repeat: int, batch: int) -> float:
    records = [Record(i, p) for i, p in enumerate(payloads, 1)]
    batches = [records[i : i + batch] for i in range(0, len(records), batch)]

    def settle_all() -> None:
        instruments = SinkInstruments()
        for chunk in batches:
            instruments.settled(chunk)

    return best_of(repeat, settle_all) / len(payloads) * 1e6


async def bench_scrape(events_sent: int, scrapes: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as data:
        settings = load_settings(
            overrides={"listen_host": "127.0.0.1", "listen_port": 0, "http_enabled": False, "data_dir": data},
            search_default_paths=False,
        )
        daemon = Daemon(settings)
        await daemon.start()
        try:
            await run(SimulatorConfig(port=daemon.port, nodes=2, events=events_sent // 2, keep_alive_interval_s=0))
            registry = daemon.metrics.registry
            size = len(generate_latest(registry))
            started = time.perf_counter()
            for _ in range(scrapes):
                generate_latest(registry)
            return (time.perf_counter() - started) / scrapes * 1e3, size
        finally:
            await daemon.stop()


async def ingest_cpu_per_event(events_sent: int, observe: bool) -> float:
    """Daemon CPU µs per event for ``events_sent`` events from a simulator subprocess (2 nodes)."""
    original = SinkInstruments.settled
    if not observe:
        SinkInstruments.settled = lambda self, records: None  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory() as data:
            settings = load_settings(
                overrides={"listen_host": "127.0.0.1", "listen_port": 0, "http_port": 0, "data_dir": data},
                search_default_paths=False,
            )
            daemon = Daemon(settings)
            await daemon.start()
            try:
                cpu = time.process_time()
                command = [sys.executable, "-m", "fpolicyd", "simulate", "--fixed-time", "--port", str(daemon.port),
                           "--nodes", "2", "--events", str(events_sent // 2),
                           "--keep-alive-interval-s", "0"]  # fmt: skip
                simulator = await asyncio.create_subprocess_exec(*command, stdout=subprocess.DEVNULL)
                await asyncio.wait_for(simulator.wait(), 600)
                worker = daemon.spooler.workers[0]
                for _ in range(24_000):  # at most 2 minutes
                    if worker.figures().delivered >= events_sent:
                        break
                    await asyncio.sleep(0.005)
                else:
                    raise TimeoutError(f"only {worker.figures().delivered} of {events_sent} events delivered")
                return (time.process_time() - cpu) / events_sent * 1e6
            finally:
                await daemon.stop()
    finally:
        SinkInstruments.settled = original  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--ab-runs", type=int, default=3)
    args = parser.parse_args()
    payloads = events(args.events)
    print(f"events: {len(payloads)}, mean payload {statistics.mean(len(p) for p in payloads):.0f} bytes")
    print(f"reader, events by operation: {bench_reader(payloads, args.repeat):.3f} µs/event")
    for batch in (10, 1000):
        cost = bench_settled(payloads, args.repeat, batch)
        print(f"sink worker, latency observation, batches of {batch}: {cost:.3f} µs/event")
    scrape_ms, size = uvloop.run(bench_scrape(min(args.events, 4000), 50))
    print(f"scrape (generate_latest, one jsonl sink): {scrape_ms:.2f} ms, {size} bytes")
    results: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.ab_runs):
        for observe in (True, False):
            results[observe].append(uvloop.run(ingest_cpu_per_event(args.events, observe)))
    on, off = min(results[True]), min(results[False])
    print(f"daemon CPU per event, best of {args.ab_runs}: latency observation on {on:.1f} µs, off {off:.1f} µs "
          f"(+{on - off:.1f} µs, {100 * (on - off) / off:+.1f} %)")  # fmt: skip


if __name__ == "__main__":
    main()
