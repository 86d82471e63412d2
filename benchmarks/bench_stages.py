"""Cost of the processing stage (route → settle → dedup) — per stage in process, and end to end in one run.

    .venv/bin/python benchmarks/bench_stages.py [--events 50000] [--nodes 2] [--runs 2]

Part 1, in process (no I/O but the embedded dedup store's SQLite file): µs per event of each step the stage adds
to an event that is already in the spool — decoding the spool record, routing it over the 17 routes, offering it
to settle, the dedup verdict (a batch of 1,000 against the embedded store), encoding the processed record.
Events come from the simulator (``fpolicyd.simulator.generate.generate_requests``), normalised as the reader does.

Part 2, end to end: ``fpolicyd serve`` fed by ``fpolicyd simulate`` (as bench_ingest.py), once with the stage off
(``--routing-enabled false --dedup-mode off``), with routing only (done by the reader as it stores the event: no
stage needed) and once per configuration with the stage on, in the same run: events/s
to the JSON Lines files and server CPU µs per event. With settle on, a burst of writes to one path is one
event, so the run ends when the files stop growing rather than at a line count.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import orjson  # noqa: E402

from bench_ingest import count_lines, simulate  # noqa: E402 - benchmarks are run as scripts
from daemon_process import Daemon, cpu_seconds, memory_mib  # noqa: E402
from fpolicyd.events import FileEvent, NameMaps, normalize  # noqa: E402
from fpolicyd.pipeline.dedup import DedupPolicy  # noqa: E402
from fpolicyd.pipeline.processing import encode_processed  # noqa: E402
from fpolicyd.pipeline.router import Router  # noqa: E402
from fpolicyd.pipeline.settle import SettlePolicy, Settler, received_at_s  # noqa: E402
from fpolicyd.protocol.context import SessionContext  # noqa: E402
from fpolicyd.simulator.generate import generate_requests  # noqa: E402
from fpolicyd.storage.dedup_store import EmbeddedDedupStore  # noqa: E402
from fpolicyd.storage.routes_file import load_routes  # noqa: E402

CONTEXT = SessionContext(
    vs_uuid="45228b37-6292-11ee-b5d1-000c29cdbe04",
    policy_name="bench",
    session_id="d8ad84cc-79dd-11ee-b638-000c29cdbe04",
    protocol_version="1.2",
    peer="127.0.0.1:1",
)


def per_event_us(events: int, work: Callable[[], object]) -> float:
    """CPU of ``work`` per event, with the garbage collector paused: here every result is kept alive in one big
    list, which makes CPython's collections scan ever more objects (the daemon handles batches and keeps
    nothing, and runs with ``gc_young_threshold``)."""
    gc.collect()
    gc.disable()
    try:
        start = time.process_time()
        work()
        return (time.process_time() - start) / events * 1e6
    finally:
        gc.enable()


def in_process(count: int) -> dict[str, float]:
    base_us = int(time.time() * 1e6)
    lines = [
        normalize(request, CONTEXT, NameMaps(), base_us + i).to_json()
        for i, request in enumerate(generate_requests(seed=7, node=0, count=count, base_time_us=base_us))
    ]
    events = [FileEvent.from_dict(orjson.loads(line)) for line in lines]
    router = Router(load_routes(None))
    routed = [event.with_routes(router.match(event.file_path, event.operation_type)) for event in events]
    policy = SettlePolicy(window_s=5.0, max_hold_s=60.0)
    dedup_policy = DedupPolicy()
    out: dict[str, float] = {}
    out["decode spool record"] = per_event_us(count, lambda: [FileEvent.from_dict(orjson.loads(b)) for b in lines])
    out["route (17 routes)"] = per_event_us(
        count, lambda: [e.with_routes(router.match(e.file_path, e.operation_type)) for e in events]
    )

    def settle() -> None:
        settler = Settler(lambda e: policy if policy.holds(e.operation_type) else None, max_pending=10_000_000)
        for seq, event in enumerate(routed, 1):
            settler.offer(event, seq, received_at_s(event))
        settler.flush_all()

    out["settle offer + emit"] = per_event_us(count, settle)
    with tempfile.TemporaryDirectory() as tmp:
        store = EmbeddedDedupStore(Path(tmp), max_entries=10_000_000).open(time.time())
        requests = [r for i, e in enumerate(routed) for r in dedup_policy.requests_for_event(e, f"b:{i}", time.time())]

        def dedup() -> None:
            now = time.time()
            for start in range(0, len(requests), 1000):
                store.check_many(requests[start : start + 1000], now)

        out["dedup exact, embedded (batch 1000)"] = per_event_us(count, dedup)
        store.close()
    out["encode processed record"] = per_event_us(count, lambda: [encode_processed(e.to_json(), None) for e in routed])
    return out


CONFIGS: dict[str, tuple[str, ...]] = {
    "stage off": ("--routing-enabled", "false", "--dedup-mode", "off"),
    "routing only (at ingest)": ("--routing-enabled", "true", "--dedup-mode", "off"),
    "routing + dedup (default)": ("--routing-enabled", "true", "--dedup-mode", "exact"),
    "routing + dedup + settle 0.2 s": ("--dedup-mode", "exact", "--write-complete-delay-s", "0.2"),
}


def end_to_end(name: str, flags: tuple[str, ...], events: int, nodes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        daemon = Daemon(data, "--jsonl-fsync", "never", *flags)
        try:
            cpu0 = cpu_seconds(daemon.pid)
            report = simulate(daemon.port, events, nodes)
            sent_at = time.perf_counter()
            seen, changed_at = -1, sent_at
            deadline = sent_at + 300
            while time.perf_counter() < deadline:
                now_count = count_lines(data / "events")
                if now_count != seen:
                    seen, changed_at = now_count, time.perf_counter()
                elif time.perf_counter() - changed_at > 1.0 and (seen >= events or "settle" in name):
                    break
                time.sleep(0.02)
            elapsed = report["elapsed_s"] + (changed_at - sent_at)
            cpu = cpu_seconds(daemon.pid) - cpu0
            rss = memory_mib(daemon.pid, "VmHWM")
        finally:
            daemon.stop()
    if "settle" not in name:
        assert seen == events, f"{name}: {seen} of {events} events"
    return {
        "config": name,
        "events_in": events,
        "events_out": seen,
        "events_per_s": round(events / elapsed),
        "server_cpu_us_per_event": round(cpu / events * 1e6, 1),
        "server_peak_rss_mib": round(rss, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--in-process-events", type=int, default=50_000)
    args = parser.parse_args()

    costs = in_process(args.in_process_events)
    print(f"{'stage step (in process)':40} {'µs/event':>9}")
    for step, us in costs.items():
        print(f"{step:40} {us:>9.2f}")
    print(f"{'total':40} {sum(costs.values()):>9.2f}\n")

    results: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    for _ in range(args.runs):  # interleaved, so a noisy minute hits every configuration alike
        for name, flags in CONFIGS.items():
            results[name].append(end_to_end(name, flags, args.events, args.nodes))
    best = {name: max(runs, key=lambda r: r["events_per_s"]) for name, runs in results.items()}
    off = best["stage off"]
    print(f"{'end to end (best of ' + str(args.runs) + ')':32} {'events/s':>9} {'vs off':>7} {'CPU µs/ev':>10} "
          f"{'events out':>11} {'RSS MiB':>8}")  # fmt: skip
    for name, r in best.items():
        print(
            f"{name:32} {r['events_per_s']:>9,} {r['events_per_s'] / off['events_per_s']:>7.0%} "
            f"{r['server_cpu_us_per_event']:>10} {r['events_out']:>11,} {r['server_peak_rss_mib']:>8}"
        )
    print(json.dumps({"in_process_us": costs, "end_to_end": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
