"""Frame → durable at a paced rate, split into what the spool's group commit accounts for and the rest.

    .venv/bin/python benchmarks/bench_durable.py [--rate 20000] [--events 100000] [--runs 3] [-- SERVE FLAGS...]

The daemon runs with a synchronous engine (it answers a SCREEN_REQ once the event is durable), JSON Lines and
the defaults otherwise; ``benchmarks/loadgen.py --sync --rate`` times every SCREEN_RESP from its request's write.
After each run the daemon's own histograms are read from ``/metrics``: ``fpolicyd_spool_commit_latency_seconds``
(per group commit, from its first write handed to the kernel to durable: the group-commit window plus the fsync)
and ``fpolicyd_spool_fsync_duration_seconds``. A request's wait beyond its commit's is the rest of the path:
reading the frame, the ingest step, the event loop's other work, writing the answer, and the load generator's own
loop (on the same cores). ``fpolicyd_event_loop_lag_seconds`` (probed every ``PROBE_INTERVAL_S`` here, finer than
the daemon's default, so that a run holds a few hundred probes) says how late the daemon's loop runs its timers.
Histogram quantiles are the upper bound of the bucket that holds them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from daemon_process import Daemon, loadgen_command  # noqa: E402 - benchmarks are run as scripts

COMMIT = "fpolicyd_spool_commit_latency_seconds"
FSYNC = "fpolicyd_spool_fsync_duration_seconds"
LAG = "fpolicyd_event_loop_lag_seconds"
#: The daemon's event-loop probe interval for these runs (event_loop_probe_interval_s).
PROBE_INTERVAL_S = 0.01
#: The longest one run may take (bounded wait).
RUN_TIMEOUT_S = 300.0


def histogram(body: str, family: str) -> tuple[list[tuple[float, float]], float]:
    """(cumulative buckets as (upper bound, count), count) of one unlabelled histogram family."""
    for metric in text_string_to_metric_families(body):
        if metric.name == family:
            buckets = [(float(s.labels["le"]), s.value) for s in metric.samples if s.name.endswith("_bucket")]
            count = next(s.value for s in metric.samples if s.name.endswith("_count"))
            return sorted(buckets), count
    raise KeyError(family)


def quantile(buckets: list[tuple[float, float]], count: float, q: float) -> float:
    """The upper bound of the bucket holding the q-quantile (inf past the last finite bound)."""
    rank = q * count
    for bound, cumulative in buckets:
        if cumulative >= rank:
            return bound
    return float("inf")


def run_once(rate: float, events: int, flags: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fpolicyd-bench-durable-") as tmp:
        daemon = Daemon(
            Path(tmp), "--engine-mode", "sync", "--event-loop-probe-interval-s", f"{PROBE_INTERVAL_S:g}", *flags
        )
        try:
            http_port = next(int(r["port"]) for r in daemon.log if r.get("event") == "http_listening")
            load = subprocess.run(
                loadgen_command(daemon.port, events, 4, "--sync", "--rate", f"{rate:g}"),
                capture_output=True,
                text=True,
                check=True,
                timeout=RUN_TIMEOUT_S,
            )
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as response:
                body = response.read().decode()
        finally:
            daemon.stop()
    report = json.loads(load.stdout.strip().splitlines()[-1])
    commit, commits = histogram(body, COMMIT)
    fsync, fsyncs = histogram(body, FSYNC)
    lag, probes = histogram(body, LAG)
    return {
        "achieved": report.get("answered_events_per_s"),
        "latency_ms": report["latency_ms"],
        "commits": commits,
        "commit_ms": {q: quantile(commit, commits, q) * 1000 for q in (0.5, 0.99)},
        "fsync_ms": {q: quantile(fsync, fsyncs, q) * 1000 for q in (0.5, 0.99)},
        "probes": probes,
        "lag_ms": {q: quantile(lag, probes, q) * 1000 for q in (0.5, 0.99)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=20_000.0, help="events/s offered")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("serve_flags", nargs="*", help="extra `fpolicyd serve` flags (after --)")
    args = parser.parse_args()
    if not 1 <= args.runs <= 20 or not 100 <= args.events <= 10_000_000:
        parser.error("--runs: 1..20, --events: 100..10000000")
    print(f"sync engine, JSON Lines, {args.rate:,.0f} events/s offered, {args.events:,} events per run")
    print(
        "| run | achieved/s | frame → durable p50 / p99 / max ms | commits "
        "| commit p50 / p99 ms ≤ | fsync p50 / p99 ms ≤ | loop probes | loop lag p50 / p99 ms ≤ |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in range(1, args.runs + 1):
        row = run_once(args.rate, args.events, list(args.serve_flags))
        lat, commit, fsync, lag = row["latency_ms"], row["commit_ms"], row["fsync_ms"], row["lag_ms"]
        print(
            f"| {run} | {row['achieved']:,.0f} | {lat['p50']:.1f} / {lat['p99']:.1f} / {lat['max']:.1f} | "
            f"{row['commits']:,.0f} | {commit[0.5]:g} / {commit[0.99]:g} | {fsync[0.5]:g} / {fsync[0.99]:g} | "
            f"{row['probes']:,.0f} | {lag[0.5]:g} / {lag[0.99]:g} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
