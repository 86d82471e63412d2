"""Scale-out on one machine (issue 12): total throughput with 1, 2 and 3 local ``fpolicyd serve`` instances, and
what a SIGKILL of one of three costs the simulated ONTAP nodes.

    .venv/bin/python benchmarks/bench_scaleout.py [--events 60000] [--rounds 2] [--quick] [--json FILE]

Throughput: N = 1, 2, 3 daemons (127.0.0.1, kernel-chosen ports, JSON Lines sinks, defaults otherwise), driven by
one ``fpolicyd simulate --targets H1:P1,...`` subprocess (its own process; every node has a session with every
daemon and sends round-robin over them, as ONTAP's primary_servers). Every N gets the same total events and the
runs are interleaved (N = 1, 2, 3, 1, 2, 3, ...) so that a change in the machine's load hits all of them. A run's
clock is the simulator's (connect to last byte written) plus the time until every event is in the JSON Lines
files of all daemons together; server CPU is every daemon's process tree (``proctree``). The table keeps each N's
best run and its ratio to N = 1, and the median of its runs. On a shared machine a run is short and noisy, and
N processes get a larger share of the CPU from the other work than one does: read the ratios with the load.

Kill: N = 3 in the synchronous engine mode (3 nodes, paced); one daemon is SIGKILLed mid-run (once the sinks hold
--kill-at of the events). Reported: how long after the kill the last node had written the killed daemon's
unanswered requests to the survivors (the simulator's ``last_failover_unix_s``), how long until the survivors'
sinks grew again, and, after the killed daemon is restarted on its data directory, that the union of the three
sinks holds every event id the run generated (and how many arrived twice: at least once at a sink).

On a machine with fewer cores than daemons + simulator, more instances cannot add CPU: what this measures there
is that the distribution works and what it costs. Bounded: every wait has a timeout; the loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from daemon_process import Daemon  # noqa: E402 - benchmarks are run as scripts
from proctree import tree_cpu_seconds  # noqa: E402

INSTANCES = (1, 2, 3)
#: Hard bound on one simulator run (its own --duration-limit-s is a little shorter).
RUN_TIMEOUT_S = 300.0


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.01)


def count_lines(data_dirs: Sequence[Path]) -> int:
    return sum(p.read_bytes().count(b"\n") for d in data_dirs for p in (d / "events").glob("fpolicy_events_*.jsonl"))


def event_ids(data_dirs: Sequence[Path]) -> list[str]:
    ids: list[str] = []
    for d in data_dirs:
        for path in sorted((d / "events").glob("fpolicy_events_*.jsonl")):
            ids.extend(json.loads(line)["event_id"] for line in path.read_bytes().splitlines() if line)
    return ids


def simulate_command(ports: Sequence[int], *, nodes: int, events_per_node: int, extra: Sequence[str] = ()) -> list[str]:
    return [
        sys.executable, "-m", "fpolicyd", "simulate",
        "--fixed-time",  # reproducible: the same stream for every N (and its event ids known by count)
        "--targets", ",".join(f"127.0.0.1:{port}" for port in ports),
        "--nodes", str(nodes),
        "--events", str(events_per_node),
        "--keep-alive-interval-s", "0",
        "--duration-limit-s", str(RUN_TIMEOUT_S - 30),
        *extra,
    ]  # fmt: skip


def start_daemons(root: Path, count: int, *flags: str) -> tuple[list[Daemon], list[Path]]:
    dirs = [root / f"daemon{i}" for i in range(count)]
    daemons: list[Daemon] = []
    try:
        for path in dirs:
            path.mkdir()
            daemons.append(Daemon(path, *flags))
    except BaseException:
        stop_all(daemons)
        raise
    return daemons, dirs


def stop_all(daemons: Sequence[Daemon]) -> None:
    for daemon in daemons:
        if daemon.proc.poll() is None:
            daemon.stop()


def throughput_run(instances: int, events: int, nodes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="scaleout-") as tmp:
        daemons, dirs = start_daemons(Path(tmp), instances)
        try:
            cpu0 = sum(tree_cpu_seconds(d.pid) for d in daemons)
            load = os.getloadavg()[0]
            out = subprocess.run(
                simulate_command([d.port for d in daemons], nodes=nodes, events_per_node=events // nodes),
                capture_output=True,
                check=True,
                timeout=RUN_TIMEOUT_S,
            )
            sent_at = time.perf_counter()
            report: dict[str, Any] = json.loads(out.stdout)
            wait_for(lambda: count_lines(dirs) >= events, 300, "events in the JSON Lines files")
            # The simulator's clock covers connect -> last byte written; add the time the daemons then needed to
            # write out what was in flight. The simulator's process start-up is not counted.
            elapsed = report["elapsed_s"] + (time.perf_counter() - sent_at)
            cpu = sum(tree_cpu_seconds(d.pid) for d in daemons) - cpu0
        finally:
            stop_all(daemons)
        delivered = count_lines(dirs)
    if delivered != events:
        raise RuntimeError(f"N={instances}: {delivered} events in the sinks, {events} sent")
    return {
        "instances": instances,
        "events": events,
        "elapsed_s": round(elapsed, 3),
        "events_per_s": round(events / elapsed),
        "server_cpu_us_per_event": round(cpu / events * 1e6, 1),
        "per_target_sent": [t["sent"] for t in report["targets"]],
        "loadavg_1m": round(load, 2),
    }


class SinkWatch:
    """Samples the JSON Lines line count of some daemons every 5 ms on a thread: (epoch seconds, count)."""

    def __init__(self, dirs: Sequence[Path]) -> None:
        self.dirs = dirs
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.samples.append((time.time(), count_lines(self.dirs)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def grew_after(self, at: float) -> float | None:
        """The first time after ``at`` at which the count was above its value at ``at``."""
        before = [count for t, count in self.samples if t <= at]
        base = before[-1] if before else 0
        return next((t for t, count in self.samples if t > at and count > base), None)


def kill_run(nodes: int, events_per_node: int, rate: float, kill_at: float) -> dict[str, Any]:
    events = nodes * events_per_node
    with tempfile.TemporaryDirectory(prefix="scaleout-kill-") as tmp:
        daemons, dirs = start_daemons(Path(tmp), 3, "--engine-mode", "sync")
        victim = 1
        survivors = [d for i, d in enumerate(daemons) if i != victim]
        watch = SinkWatch([d for i, d in enumerate(dirs) if i != victim])
        try:
            sim = subprocess.Popen(
                simulate_command(
                    [d.port for d in daemons],
                    nodes=nodes,
                    events_per_node=events_per_node,
                    extra=["--sync", "--rate", str(rate)],
                ),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            try:
                # Mid-run by the sinks, not by a sleep (the simulator's start-up time varies with the load).
                wait_for(
                    lambda: count_lines(dirs) >= kill_at * events or sim.poll() is not None, 120, "the run to start"
                )
                if sim.poll() is not None:
                    raise RuntimeError("the simulator ended before the kill: raise --kill-events or lower --kill-rate")
                before_kill = count_lines(dirs)
                killed_at = time.time()
                daemons[victim].proc.send_signal(signal.SIGKILL)
                daemons[victim].proc.wait(10)
                out, err = sim.communicate(timeout=RUN_TIMEOUT_S)
            finally:
                if sim.poll() is None:
                    sim.kill()
                    sim.wait()
            watch.stop()
            if sim.returncode != 0:
                raise RuntimeError(f"simulator exited {sim.returncode}: {err.decode(errors='replace')[-500:]}")
            report: dict[str, Any] = json.loads(out)
            dead = report["targets"][victim]
            failover_at = dead["last_failover_unix_s"]
            resumed_at = watch.grew_after(failover_at) if failover_at is not None else None
            stop_all(survivors)  # SIGTERM: a daemon writes out everything it answered before it exits
            # Restarted on its data directory: what it answered before the kill but had not written goes out now.
            again = Daemon(dirs[victim])
            again.stop()
        finally:
            watch.stop()
            stop_all(daemons)
        ids = event_ids(dirs)
    distinct = set(ids)
    return {
        "instances": 3,
        "mode": "sync",
        "events": events,
        "sent": report["sent"],
        "responses": report["responses"],
        "completed": report["completed"],
        "in_sinks_before_kill": before_kill,
        "resent_after_failover": dead["resent_after_failover"],
        "killed_target_connects": dead["connects"],
        "failover_after_kill_ms": None if failover_at is None else round((failover_at - killed_at) * 1000, 1),
        "sinks_grew_after_kill_ms": None if resumed_at is None else round((resumed_at - killed_at) * 1000, 1),
        "distinct_event_ids": len(distinct),
        "missing_event_ids": events - len(distinct),
        "delivered_twice": len(ids) - len(distinct),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=150_000, help="total events per throughput run (every N)")
    parser.add_argument("--nodes", type=int, default=2, help="simulated ONTAP nodes")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of N = 1, 2, 3")
    parser.add_argument("--kill-events", type=int, default=4000, help="events per node in the kill run (3 nodes)")
    parser.add_argument("--kill-rate", type=float, default=1500.0, help="events/s per node in the kill run")
    parser.add_argument(
        "--kill-at", type=float, default=0.3, help="SIGKILL once the sinks hold this share of the kill run's events"
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run (6,000 events, one round)")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.rounds, args.kill_events = 6000, 1, 1500
    if args.events % args.nodes or args.events <= 0 or args.rounds < 1 or not 0 < args.kill_at < 1:
        parser.error("--events must be a positive multiple of --nodes; --rounds at least 1; 0 < --kill-at < 1")
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    started = time.monotonic()
    runs = [throughput_run(n, args.events, args.nodes) for _ in range(args.rounds) for n in INSTANCES]
    kill = kill_run(3, args.kill_events, args.kill_rate, args.kill_at)
    best = {n: max((r for r in runs if r["instances"] == n), key=lambda r: r["events_per_s"]) for n in INSTANCES}
    base = best[1]["events_per_s"]
    print(
        f"{'instances':>9} {'events/s':>10} {'x N=1':>6} {'median events/s':>16} {'server CPU µs/event':>20} "
        f"{'load 1m':>8}"
    )
    for n in INSTANCES:
        row = best[n]
        median = statistics.median(r["events_per_s"] for r in runs if r["instances"] == n)
        print(
            f"{n:>9} {row['events_per_s']:>10,} {row['events_per_s'] / base:>6.2f} {round(median):>16,} "
            f"{row['server_cpu_us_per_event']:>20} {row['loadavg_1m']:>8}"
        )
    print(
        f"\n(best of {args.rounds} interleaved runs each, {args.events:,} events over {args.nodes} simulated nodes, "
        f"async engine, JSON Lines; {os.cpu_count()} cores, load average at start {loadavg_start})"
    )
    print(
        f"\nSIGKILL of 1 of 3 (sync, {kill['events']:,} events): failover {kill['failover_after_kill_ms']} ms after "
        f"the kill ({kill['resent_after_failover']} unanswered requests re-sent to the survivors), survivors' sinks "
        f"growing again after {kill['sinks_grew_after_kill_ms']} ms; run completed={kill['completed']} "
        f"({kill['responses']:,}/{kill['sent']:,} answered); after the restart {kill['missing_event_ids']} event ids "
        f"missing from the union of the sinks, {kill['delivered_twice']} delivered twice"
    )
    summary = {
        "loadavg_start": loadavg_start,
        "cpu_count": os.cpu_count(),
        "elapsed_s": round(time.monotonic() - started, 1),
        "runs": runs,
        "kill": kill,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    ok = kill["completed"] and kill["missing_event_ids"] == 0 and kill["responses"] == kill["sent"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
