"""Where a live daemon's CPU goes, per stage: py-spy samples of `fpolicyd serve` (and its delivery process) under
load, bucketed by the function each sample is in.

    .venv/bin/python benchmarks/profile_stages.py [--events 100000] [--nodes 4] [--rate 250] [-- SERVE FLAGS...]

The daemon runs with the defaults (plus SERVE FLAGS) in its own process; ``benchmarks/loadgen.py`` sends the events;
py-spy (`py-spy record --format raw --subprocesses`) samples every thread of the daemon and its delivery process
while they work. Each sample is charged to the innermost frame of ours it is in (stage rules below, first match
wins), so the table reads "of the daemon's busy CPU, this share is spent in this stage"; multiplied by the daemon's
CPU per event (from /proc, whole process tree) it gives µs per event per stage. Idle samples (threads waiting in a
selector or a queue) are not counted. py-spy needs ptrace rights on the daemon (root, or kernel.yama.ptrace_scope =
0).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from daemon_process import Daemon, tree_cpu_seconds  # noqa: E402 - benchmarks are run as scripts

#: (stage, substrings of a frame "function (file:line)"), first match from the innermost frame outwards.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("frame split", ("XmlFrameReader.feed", "framing.py")),
    ("decode: canonical fast path", ("scan_screen_request", "xml_fast.py", "fast_screen", "_decode_canonical_header")),
    ("decode: full XML parser", ("decode_payload", "xml_codec.py", "lxml")),
    ("compiled accelerator", ("_speedups",)),
    ("event build (fields → dict → JSON)", ("EventBuilder.build", "events.py")),
    ("replay flags", ("replay.py",)),
    ("routing", ("router.py",)),
    ("exact dedup window", ("dedup_window.py",)),
    ("dedup journal", ("dedup_journal.py",)),
    ("ingest step (the rest)", ("ingest.py", "session.py")),
    ("spool append/flush/fsync", ("Spool.append", "Spool.flush", "Spool.sync", "_datasync")),
    ("spool read (sinks)", ("Spool.read", "Spool._read", "SpoolTail", "spool.py")),
    ("JSON Lines sink", ("jsonl.py", "local.py")),
    ("AWS sinks", ("aws.py", "aws_transport.py", "cloud.py", "sqs_envelope.py")),
    ("sink workers / delivery IPC", ("runner.py", "delivery.py", "delivery_child.py", "channel.py")),
    ("metrics / health", ("metrics.py", "health.py", "http.py")),
    ("connection / pipeline (event loop glue)", ("connection.py", "pipeline.py")),
)
#: Innermost frames that mean "waiting", not working.
IDLE = ("select (selectors.py", "_worker (concurrent/futures/thread.py", "wait (threading.py", "poll (")


def stage_of(stack: list[str]) -> str | None:
    """The stage of one sample (``stack``: outermost first), or None when the thread was idle."""
    innermost = stack[-1] if stack else ""
    if any(marker in innermost for marker in IDLE):
        return None
    for frame in reversed(stack):
        for stage, markers in STAGES:
            if any(marker in frame for marker in markers):
                return stage
    return "other (interpreter, asyncio, libraries)"


def load(port: int, events: int, connections: int) -> dict[str, object]:
    """``benchmarks/loadgen.py``: frames encoded before its clock starts, written as fast as the daemon reads."""
    command = [
        sys.executable,
        str(HERE / "loadgen.py"),
        "--port",
        str(port),
        "--connections",
        str(connections),
        "--events",
        str(events),
    ]
    out = subprocess.run(command, capture_output=True, check=True, timeout=900)
    report: dict[str, object] = json.loads(out.stdout.splitlines()[-1])
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("serve_flags", nargs="*", help="extra `fpolicyd serve` flags (after --)")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        print("py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        daemon = Daemon(data, *args.serve_flags)
        raw = data / "profile.txt"
        try:
            time.sleep(1.0)  # the delivery process starts with the daemon
            cpu0 = tree_cpu_seconds(daemon.pid)
            spy = subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(daemon.pid),
                    "--subprocesses",
                    "--format",
                    "raw",
                    "--rate",
                    str(args.rate),
                    "--output",
                    str(raw),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            started = time.monotonic()
            report = load(daemon.port, args.events, args.nodes)
            lines = data / "events"
            deadline = time.monotonic() + 300
            while sum(p.read_bytes().count(b"\n") for p in lines.glob("*.jsonl")) < args.events:
                if time.monotonic() > deadline:
                    raise TimeoutError("events did not all arrive in the JSON Lines files")
                time.sleep(0.05)
            elapsed = time.monotonic() - started
            cpu = tree_cpu_seconds(daemon.pid) - cpu0
            spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
            spy.wait(60)
        finally:
            daemon.stop()
        samples: Counter[str] = Counter()
        for line in raw.read_text().splitlines():
            stack_text, _, weight = line.rpartition(" ")
            if not stack_text:
                continue
            stage = stage_of(stack_text.split(";")[1:])  # the first element names the process/thread
            if stage is not None:
                samples[stage] += int(weight)
    busy = sum(samples.values()) or 1
    us_per_event = cpu / args.events * 1e6
    print(f"fpolicyd serve {' '.join(args.serve_flags)} — {args.events:,} events over {args.nodes} connections")
    print(
        f"{args.events / elapsed:,.0f} events/s; daemon process tree CPU {us_per_event:.1f} µs/event; "
        f"load generator: {report.get('events_per_s')} events/s; {busy} busy samples"
    )
    print(f"\n{'stage':44} {'share':>7} {'µs/event':>9}")
    for stage, count in samples.most_common():
        print(f"{stage:44} {count / busy:7.1%} {count / busy * us_per_event:9.2f}")
    print(
        json.dumps(
            {
                "events": args.events,
                "cpu_us_per_event": round(us_per_event, 2),
                "stages": {s: round(c / busy, 4) for s, c in samples.items()},
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
