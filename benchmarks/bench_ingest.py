"""Ingest throughput: simulator → ``fpolicyd serve`` → JSON Lines, next to a bare frame splitter (the ceiling).

    .venv/bin/python benchmarks/bench_ingest.py [--events 100000] [--nodes 2] [--runs 3]

Each target runs in its own process with the simulator (``fpolicyd simulate``, unthrottled) in another, so on
a 2-core box the server has one core. For fpolicyd the clock stops when the last event is in the JSON Lines
files; it also reports the server's CPU time per event and its peak resident memory. The splitter only reads,
splits frames and answers NEGO_REQ: fpolicyd / splitter is the share of the ceiling fpolicyd reaches.
Bounded: every wait has a timeout; the loopback only.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from daemon_process import Daemon, cpu_seconds, memory_mib  # noqa: E402 - benchmarks are run as scripts


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.01)


def simulate(port: int, events: int, nodes: int) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fpolicyd",
            "simulate",
            "--fixed-time",  # the fixed, reproducible stream the figures were measured with
            "--port",
            str(port),
            "--nodes",
            str(nodes),
            "--events",
            str(events // nodes),
            "--keep-alive-interval-s",
            "0",
        ],
        capture_output=True,
        check=True,
        timeout=600,
    )
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def count_lines(directory: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in directory.glob("fpolicy_events_*.jsonl"))


def run_fpolicyd(events: int, nodes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        daemon = Daemon(data)
        try:
            cpu0 = cpu_seconds(daemon.pid)
            report = simulate(daemon.port, events, nodes)
            sent_at = time.perf_counter()
            wait_for(lambda: count_lines(data / "events") >= events, 300, "events in JSON Lines")
            # The simulator's own clock covers connect → last byte sent; add the time fpolicyd then needed to
            # write out what was still in flight. Process start-up of the simulator is not counted.
            elapsed = report["elapsed_s"] + (time.perf_counter() - sent_at)
            cpu = cpu_seconds(daemon.pid) - cpu0
            rss = memory_mib(daemon.pid, "VmHWM")
        finally:
            daemon.stop()
        assert count_lines(data / "events") == events, "events lost"
    return {
        "events": events,
        "elapsed_s": round(elapsed, 3),
        "events_per_s": round(events / elapsed),
        "server_cpu_us_per_event": round(cpu / events * 1e6, 1),
        "server_peak_rss_mib": round(rss, 1),
        "simulator_events_per_s": report["events_per_s"],
    }


def run_splitter(events: int, nodes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "bare_splitter.py"), str(port_file)], stdout=subprocess.PIPE
        )
        try:
            wait_for(port_file.exists, 20, "splitter to listen")
            wait_for(lambda: port_file.read_text() != "", 5, "port file")
            cpu0 = cpu_seconds(proc.pid)
            report = simulate(int(port_file.read_text()), events, nodes)
            elapsed = report["elapsed_s"]
            cpu = cpu_seconds(proc.pid) - cpu0
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
        frames = int(out.strip())
        assert frames == events + nodes, f"splitter saw {frames} frames"
    return {
        "events": events,
        "elapsed_s": round(elapsed, 3),
        "events_per_s": round(events / elapsed),
        "server_cpu_us_per_event": round(cpu / events * 1e6, 2),
        "simulator_events_per_s": report["events_per_s"],
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    fpd = [run_fpolicyd(args.events, args.nodes) for _ in range(args.runs)]
    bare = [run_splitter(args.events, args.nodes) for _ in range(args.runs)]
    best_fpd = max(fpd, key=lambda r: r["events_per_s"])
    best_bare = max(bare, key=lambda r: r["events_per_s"])
    print(f"{'target':32} {'events/s':>10} {'server CPU µs/event':>20} {'peak RSS MiB':>13}")
    print(
        f"{'fpolicyd serve -> JSON Lines':32} {best_fpd['events_per_s']:>10,} "
        f"{best_fpd['server_cpu_us_per_event']:>20} {best_fpd['server_peak_rss_mib']:>13}"
    )
    print(
        f"{'bare frame splitter (ceiling)':32} {best_bare['events_per_s']:>10,} "
        f"{best_bare['server_cpu_us_per_event']:>20} {'':>13}"
    )
    print(
        f"\nfpolicyd reaches {best_fpd['events_per_s'] / best_bare['events_per_s']:.0%} of the ceiling "
        f"(best of {args.runs} runs, {args.events:,} events over {args.nodes} connections)"
    )
    print(json.dumps({"fpolicyd": fpd, "bare_splitter": bare}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
