"""CPU per event of each of the daemon's two processes — the reader (ingest, spool) and the delivery process (sinks)
— user and system time apart, for a few configurations, in one run.

    .venv/bin/python benchmarks/bench_processes.py [--events 300000] [--connections 4] [--runs 2]

`fpolicyd serve` (JSON Lines; `--delivery-process on`) in its own process, ``benchmarks/loadgen.py`` sending the
events as fast as the daemon reads them; CPU from /proc once every event is in the JSON Lines files. The per-process
split says which core limits the rate: the reader's CPU per event bounds events/s on its core, the delivery
process's on the other (shared with the load generator). Configurations: the defaults; `dedup_mode = off`; the
pure-Python path (`pure_python = true`, what a machine without a C compiler runs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from daemon_process import TICKS, Daemon, child_pids, loadgen_command  # noqa: E402 - benchmarks are run as scripts

CONFIGURATIONS: dict[str, tuple[str, ...]] = {
    "defaults": (),
    "dedup_mode = off": ("--dedup-mode", "off"),
    "pure Python (no accelerator)": ("--pure-python", "true"),
}
#: Bound on waiting for the last event to reach the JSON Lines files.
SETTLE_TIMEOUT_S = 300.0


def user_system(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def lines(directory: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in directory.glob("*.jsonl"))


def run(flags: tuple[str, ...], events: int, connections: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        daemon = Daemon(data, "--delivery-process", "on", *flags)
        try:
            for _ in range(200):  # the delivery process starts with the daemon (imports take a second)
                if child_pids(daemon.pid):
                    break
                time.sleep(0.05)
            [child] = child_pids(daemon.pid)
            main0, child0 = user_system(daemon.pid), user_system(child)
            started = time.monotonic()
            subprocess.run(
                loadgen_command(daemon.port, events, connections),
                capture_output=True,
                check=True,
                timeout=SETTLE_TIMEOUT_S,
            )
            deadline = time.monotonic() + SETTLE_TIMEOUT_S
            while lines(data / "events") < events:
                if time.monotonic() > deadline:
                    raise TimeoutError("not every event reached the JSON Lines files")
                time.sleep(0.02)
            elapsed = time.monotonic() - started
            main1, child1 = user_system(daemon.pid), user_system(child)
        finally:
            daemon.stop()
    per = 1e6 / events
    return {
        "events_per_s": events / elapsed,
        "reader_user_us": (main1[0] - main0[0]) * per,
        "reader_system_us": (main1[1] - main0[1]) * per,
        "delivery_user_us": (child1[0] - child0[0]) * per,
        "delivery_system_us": (child1[1] - child0[1]) * per,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in CONFIGURATIONS}
    for _ in range(args.runs):  # interleaved: a noisy minute hits every configuration alike
        for name, flags in CONFIGURATIONS.items():
            results[name].append(run(flags, args.events, args.connections))

    def span(name: str, key: str, fmt: str = "{:.1f}") -> str:
        values = [r[key] for r in results[name]]
        low, high = fmt.format(min(values)), fmt.format(max(values))
        return low if low == high else f"{low}–{high}"

    print(f"{args.events:,} events over {args.connections} connections to JSON Lines, {args.runs} run(s); µs per event")
    print("| configuration | events/s (incl. load start) | reader user | reader sys | delivery user | delivery sys |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in CONFIGURATIONS:
        cells = [span(name, "events_per_s", "{:,.0f}")]
        cells += [
            span(name, key) for key in ("reader_user_us", "reader_system_us", "delivery_user_us", "delivery_system_us")
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
