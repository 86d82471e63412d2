"""Where a live daemon's CPU goes, per stage: py-spy samples of `fpolicyd serve` (and its delivery process) under
load, bucketed by the function each sample is in.

    .venv/bin/python benchmarks/profile_stages.py [--events 100000] [--nodes 4] [--rate 250] [--offered 0]
        [--sink jsonl|sqs]
        [-- SERVE FLAGS...]

The daemon runs with the defaults (plus SERVE FLAGS) in its own process; ``benchmarks/loadgen.py`` sends the events;
py-spy (`py-spy record --format raw --subprocesses`) samples every thread of the daemon and its delivery process
while they work. Each sample is charged to the innermost frame of ours it is in (stage rules below, first match
wins), so the table reads "of the daemon's busy CPU, this share is spent in this stage"; multiplied by the daemon's
CPU per event (from /proc, whole process tree) it gives µs per event per stage. Idle samples (threads waiting in a
selector or a queue) are not counted. ``--sink sqs``: the daemon delivers to ``benchmarks/aws_endpoint.py`` (its
own process, not profiled), one event per message, and the run ends when the endpoint holds every event. The
compiled accelerator's time shows as "ingest step (the rest)", the Python frame that calls it (py-spy is run
without ``--native``). py-spy needs ptrace rights on the daemon (root, or kernel.yama.ptrace_scope =
0).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from aws_endpoint import EndpointProcess, endpoint_process  # noqa: E402 - benchmarks are run as scripts
from daemon_process import Daemon, tree_cpu_seconds  # noqa: E402

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
    ("AWS sinks", ("sinks/aws/", "sqs_envelope.py")),
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


def load(port: int, events: int, connections: int, offered: float = 0.0) -> dict[str, object]:
    """``benchmarks/loadgen.py``: frames encoded before its clock starts, written as fast as the daemon reads
    (``offered`` 0) or paced at ``offered`` events/s in all."""
    command = [
        sys.executable,
        str(HERE / "loadgen.py"),
        "--port",
        str(port),
        "--connections",
        str(connections),
        "--events",
        str(events),
        "--rate",
        f"{offered:g}",
    ]
    out = subprocess.run(command, capture_output=True, check=True, timeout=900)
    report: dict[str, object] = json.loads(out.stdout.splitlines()[-1])
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--raw", type=Path, help="also keep py-spy's raw samples (collapsed stacks) in this file")
    parser.add_argument(
        "--offered", type=float, default=0.0, help="events/s the load generator paces itself to (0: unpaced)"
    )
    parser.add_argument("--sink", choices=("jsonl", "sqs"), default="jsonl", help="where the daemon delivers")
    parser.add_argument("serve_flags", nargs="*", help="extra `fpolicyd serve` flags (after --)")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        print("py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        endpoint = stack.enter_context(endpoint_process()) if args.sink == "sqs" else None
        data = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        return profile(args, py_spy, data, endpoint)


def delivered(data: Path, endpoint: EndpointProcess | None) -> int:
    """Events at the sink so far: lines in the JSON Lines files, or events the endpoint acknowledged."""
    if endpoint is None:
        return sum(p.read_bytes().count(b"\n") for p in (data / "events").glob("*.jsonl"))
    return sum(endpoint.stats()["sqs_events"].values())


def profile(args: argparse.Namespace, py_spy: str, data: Path, endpoint: EndpointProcess | None) -> int:
    flags: tuple[str, ...] = tuple(args.serve_flags)
    env = None
    if endpoint is not None:
        flags = ("--sinks", f"sqs:{endpoint.queues['fpolicy-bench']}", *flags)
        env = dict(
            os.environ,
            AWS_ENDPOINT_URL=endpoint.url,
            AWS_REGION=endpoint.region,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",  # the local endpoint takes any credentials
        )
    daemon = Daemon(data, *flags, env=env)
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
        report = load(daemon.port, args.events, args.nodes, args.offered)
        deadline = time.monotonic() + 300
        while delivered(data, endpoint) < args.events:
            if time.monotonic() > deadline:
                raise TimeoutError(f"events did not all arrive at the {args.sink} sink")
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        cpu = tree_cpu_seconds(daemon.pid) - cpu0
        spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
        spy.wait(60)
    finally:
        daemon.stop()
    if args.raw is not None:
        shutil.copyfile(raw, args.raw)
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
    print(f"fpolicyd serve {' '.join(flags)} — {args.events:,} events over {args.nodes} connections")
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
