"""fpolicyd's speed goals (issue 11) measured in one run, as one table: what ``make bench`` prints.

    .venv/bin/python benchmarks/bench_throughput.py [--events 100000] [--runs 2] [--connections 4]
        [--rows splitter,jsonl,sqs,sqs-packed,eventbridge] [--delivery-processes 2] [--no-latency] [--quick]
        [--json FILE] [--replay | --replay-only]

Throughput rows: the load generator (``benchmarks/loadgen.py``, its own process: ONTAP frames from the simulator
encoded before the clock starts, written over ``--connections`` simulated nodes, async engine) against

- the bare frame splitter (``benchmarks/bare_splitter.py``: reads, splits frames, answers NEGO_REQ; the ceiling);
- ``fpolicyd serve`` (``python -m fpolicyd serve`` of this checkout, bound to 127.0.0.1 port 0, a fresh data
  directory) delivering to JSON Lines, SQS (one event per message), packed SQS (``sqs_pack_bytes``) and
  EventBridge, each with the defaults and with ``dedup_mode = off``; the AWS sinks also with
  ``--delivery-processes`` N delivery processes sharing the sink (default 2; 1 leaves those rows out). SQS and
  EventBridge are
  ``benchmarks/aws_endpoint.py`` in its own process (O(1) per request; its CPU is reported, not charged to the
  server).

A row's clock runs from the load generator's first write to the moment every event is acknowledged at the sink:
JSON Lines lines counted in the files, events counted by the endpoint (a packed message counts its
``fpolicyd-count``). The server's CPU is its whole process tree's (``benchmarks/proctree.py``: parent and
children, from /proc) over the same span; its memory, the tree's peak RSS, sampled. Requests/event and billed
64 KiB chunks/event come from the endpoint's counts. With ``--runs`` > 1 the rows are interleaved (run 1 of
every row, then run 2, ...) so that a noisy minute hits all alike, and each figure is printed as the range over
the runs.

Latency and memory (``--no-latency`` skips them), paced at ``--latency-rate`` (20,000 events/s, the goal's rate)
and again at half the rate the same configuration's throughput row reached in this run (``--no-half-rate`` skips
these): at a rate the server cannot sustain, latency only measures how long the queue grew.

- frame -> durable: the synchronous engine, JSON Lines, defaults; the load generator takes each SCREEN_RESP's
  arrival minus its request's write time (fpolicyd answers a synchronous engine once the event is durable);
- frame -> acknowledged by SQS: async engine, SQS one event per message, defaults; the endpoint records each
  entry's arrival (``--record-times``), matched to the frame's write time by event id (the load generator computes
  every id from the simulator's spec, ``NodeStream.event_id``, before the clock starts).

The replay storm (``--replay``, or ``--replay-only``; ``make bench-replay``): issue 11's exact command,
``fpolicyd replay-test --events 1000000 --nodes 4 --duplicates 0.01 --shuffle --subprocess``, bounded by
``--replay-timeout-s``: its wall time and what it lost.

Every wait is bounded (``--row-timeout-s`` per row); nothing is asserted about speed. Exit 1 if a row failed
(lost or extra events, a process that did not start, a timeout): the table says which.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import orjson

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from aws_endpoint import EndpointProcess, endpoint_process  # noqa: E402 - benchmarks are run as scripts
from daemon_process import Daemon  # noqa: E402
from loadgen import percentiles_ms  # noqa: E402
from proctree import RssSampler, tree_cpu_seconds  # noqa: E402

QUEUE: Final = "fpolicy-bench"
BUS: Final = "fpolicy-bench"
#: Issue 11's replay storm, verbatim (but for ``--events``: ``--replay-events``, 1,000,000 unless told).
REPLAY_EVENTS: Final = 1_000_000
REPLAY_ARGS: Final = ("--nodes", "4", "--duplicates", "0.01", "--shuffle", "--subprocess")
#: How often the sink's count is read while a row runs (the clock's resolution at the end of a row).
POLL_S: Final = 0.02
START_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 120.0
#: Packed SQS: the packing limit of the packed rows (bench_sqs_pack.py's default: 0.0036 billed requests/event).
PACK_BYTES: Final = 256 * 1024

#: Issue 11's goals, for the summary under the table.
GOAL_JSONL_EPS: Final = 100_000
GOAL_CPU_US: Final = 20.0
GOAL_SQS_EPS: Final = 50_000
GOAL_SQS_REQ: Final = 0.1
GOAL_PACKED_EPS: Final = 100_000
GOAL_PACKED_BILLED: Final = 0.01
GOAL_EB_EPS: Final = 30_000
GOAL_DURABLE_P99_MS: Final = 20.0
GOAL_SQS_P99_MS: Final = 150.0
GOAL_RSS_MIB: Final = 250.0
GOAL_REPLAY_S: Final = 60.0


# ------------------------------------------------------------------------------------------ environment


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every child: this checkout's ``src`` first on PYTHONPATH, so that ``python -m fpolicyd``
    is the code being measured; no FPOLICYD_* settings from the caller (the rows say what they set)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FPOLICYD_")}
    paths = [str(REPO / "src"), str(HERE), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if extra:
        env.update(extra)
    return env


def aws_env(endpoint: EndpointProcess) -> dict[str, str]:
    """Dummy credentials, the endpoint as every AWS service, no shared config, no instance metadata."""
    env = {k: v for k, v in child_env().items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION=endpoint.region,
        AWS_DEFAULT_REGION=endpoint.region,
        AWS_ENDPOINT_URL=endpoint.url,
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    return env


def accelerator_status() -> str:
    """Whether ``fpolicyd._speedups`` (the compiled accelerator) imports, as the daemon would import it."""
    probe = "import fpolicyd._speedups as m; print(getattr(m, '__file__', '?'))"
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=child_env(), check=False
        )
    except subprocess.TimeoutExpired:
        return "import timed out"
    if out.returncode == 0:
        return f"loaded ({Path(out.stdout.strip()).name})"
    last = (out.stderr.strip().splitlines() or ["?"])[-1]
    return "absent" if "ModuleNotFoundError" in last else f"import failed: {last[:120]}"


def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = float("nan")
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_gib = int(Path("/proc/meminfo").read_text().split("MemTotal:", 1)[1].split()[0]) / 1024**2
    try:
        from importlib.metadata import version

        uv = version("uvloop")
    except ImportError:
        uv = "absent"
    commit = "?"
    if shutil.which("git"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            head = subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                check=False,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            commit = head + (" (modified)" if dirty else "")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_gib, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": uv,
        "accelerator": accelerator_status(),
        "commit": commit,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


#: A latency probe: (events, connections, rate, timeout_s) -> its figures.
Probe = Callable[[int, int, float, float], dict[str, Any]]

# -------------------------------------------------------------------------------------------- processes


class LoadgenProcess:
    """``benchmarks/loadgen.py --control``: ready after connecting, handshaking and encoding; ``go`` starts the
    clock; its report arrives when it has sent everything (and, sync, had every answer); ``stop`` closes."""

    def __init__(self, port: int, *args: str, max_seconds: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "loadgen.py"), "--port", str(port), "--control", "--max-seconds",
             f"{max_seconds:g}", "--hold-seconds", f"{max_seconds + START_TIMEOUT_S:g}", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=child_env(),
            text=True,
        )  # fmt: skip
        self.lines: list[dict[str, Any]] = []
        self._arrived = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with contextlib.suppress(ValueError):
                record = json.loads(raw)
                with self._arrived:
                    self.lines.append(record)
                    self._arrived.notify_all()
        with self._arrived:
            self._arrived.notify_all()

    def wait_line(self, index: int, timeout_s: float) -> dict[str, Any]:
        """The ``index``-th JSON line (0: ready, 1: the report); raises on an error line, exit or timeout."""
        deadline = time.monotonic() + timeout_s
        with self._arrived:
            while len(self.lines) <= index:
                if self.lines and "error" in self.lines[-1]:
                    break
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    break
                self._arrived.wait(min(left, 0.5))
            if self.lines and "error" in self.lines[-1]:
                raise RuntimeError(f"load generator: {self.lines[-1]['error']}")
            if len(self.lines) <= index:
                raise TimeoutError(f"load generator: no line {index} within {timeout_s:g} s (exit {self.proc.poll()})")
            return self.lines[index]

    def command(self, word: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write(word + "\n")
            self.proc.stdin.flush()

    def stop(self) -> None:
        self.command("stop")
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class Splitter:
    """``benchmarks/bare_splitter.py`` waiting for ``expect`` frames."""

    def __init__(self, work: Path, expect: int) -> None:
        self.port_file = work / "port"
        self.done_file = work / "done"
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "bare_splitter.py"), str(self.port_file), "--expect", str(expect),
             "--done-file", str(self.done_file)],
            stdout=subprocess.PIPE,
            env=child_env(),
            text=True,
        )  # fmt: skip
        wait_for(lambda: self.port_file.exists() and self.port_file.read_text().strip() != "", START_TIMEOUT_S,
                 "the splitter to listen")  # fmt: skip
        self.port = int(self.port_file.read_text())
        self.pid = self.proc.pid

    def done_at(self) -> float | None:
        try:
            return float(self.done_file.read_text())
        except (OSError, ValueError):
            return None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=STOP_TIMEOUT_S)
        return int(out.strip() or 0)


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(POLL_S)


class LineCounter:
    """Complete lines in the JSON Lines files of a directory, read incrementally (each byte once)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.offsets: dict[Path, int] = {}
        self.count = 0

    def __call__(self) -> int:
        if not self.directory.is_dir():
            return 0
        for path in sorted(self.directory.glob("fpolicy_events_*.jsonl")):
            offset = self.offsets.get(path, 0)
            with path.open("rb") as fh:
                fh.seek(offset)
                data = fh.read()
            # Up to the last newline only: a line still being written is counted when it is complete.
            end = data.rfind(b"\n") + 1
            self.count += data.count(b"\n", 0, end)
            self.offsets[path] = offset + end
        return self.count


# ------------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True, slots=True)
class Target:
    key: str
    label: str
    sink: str  # splitter | jsonl | sqs | sqs-packed | eventbridge
    flags: tuple[str, ...] = ()

    @property
    def aws(self) -> bool:
        return self.sink in ("sqs", "sqs-packed", "eventbridge")


SINKS: Final = ("splitter", "jsonl", "sqs", "sqs-packed", "eventbridge")
SINK_LABELS: Final = {
    "jsonl": "JSON Lines",
    "sqs": "SQS, 1 event/message",
    "sqs-packed": f"SQS packed {PACK_BYTES // 1024} KiB",
    "eventbridge": "EventBridge",
}


def targets(sinks: list[str], processes: int = 1) -> list[Target]:
    out = []
    for sink in sinks:
        if sink == "splitter":
            out.append(Target("splitter", "bare frame splitter (ceiling)", "splitter"))
            continue
        out.append(Target(f"{sink}", f"{SINK_LABELS[sink]}, defaults", sink))
        out.append(Target(f"{sink}/dedup-off", f"{SINK_LABELS[sink]}, dedup off", sink, ("--dedup-mode", "off")))
        if processes > 1 and sink != "jsonl":
            out.append(
                Target(
                    f"{sink}/processes-{processes}",
                    f"{SINK_LABELS[sink]}, {processes} delivery processes",
                    sink,
                    ("--delivery-process", "on", "--delivery-processes", str(processes)),
                )
            )
    return out


def sink_flags(target: Target, endpoint: EndpointProcess | None) -> tuple[str, ...]:
    if target.sink == "jsonl":
        return ()
    assert endpoint is not None
    if target.sink == "eventbridge":
        return ("--sinks", f"eventbridge:{BUS}")
    flags: tuple[str, ...] = ("--sinks", f"sqs:{endpoint.queues[QUEUE]}")
    if target.sink == "sqs-packed":
        flags += ("--sqs-pack-bytes", str(PACK_BYTES))
    return flags


def endpoint_counter(endpoint: EndpointProcess, sink: str) -> Callable[[], int]:
    def count() -> int:
        stats = endpoint.stats()
        if sink == "eventbridge":
            return int(stats["events"].get(BUS, 0))
        return int(stats["sqs_events"].get(QUEUE, 0))

    return count


def run_row(target: Target, events: int, connections: int, timeout_s: float) -> dict[str, Any]:
    """One throughput row; the figures, or ``error``."""
    row: dict[str, Any] = {"target": target.key, "events": events, "loadavg_1m": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="fpolicyd-bench-") as tmp:
        work = Path(tmp)
        try:
            if target.sink == "splitter":
                row.update(_run_splitter(work, events, connections, timeout_s))
            else:
                row.update(_run_fpolicyd(target, work, events, connections, timeout_s))
        except Exception as exc:  # a row that fails is reported in the table; the others still run
            row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def _measure(
    server_pid: int,
    port: int,
    *,
    events: int,
    connections: int,
    timeout_s: float,
    done_at: Callable[[], float | None],
    side_pid: int | None = None,
    loadgen_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Drive one run: load generator ready -> CPU snapshot -> go -> until ``done_at`` gives the completion time."""
    gen = LoadgenProcess(port, "--connections", str(connections), "--events", str(events), *loadgen_args,
                         max_seconds=timeout_s)  # fmt: skip
    try:
        ready = gen.wait_line(0, START_TIMEOUT_S)
        with RssSampler(server_pid) as rss:
            own0 = time.process_time()
            cpu0 = tree_cpu_seconds(server_pid)
            side0 = tree_cpu_seconds(side_pid) if side_pid else 0.0
            gen.command("go")
            deadline = time.monotonic() + timeout_s
            finished = None
            while finished is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not complete at the sink within {timeout_s:g} s")
                if gen.lines and "error" in gen.lines[-1]:
                    raise RuntimeError(f"load generator: {gen.lines[-1]['error']}")
                finished = done_at()
                if finished is None:
                    time.sleep(POLL_S)
            cpu = tree_cpu_seconds(server_pid) - cpu0
            side = (tree_cpu_seconds(side_pid) - side0) if side_pid else None
            own = time.process_time() - own0
        report = gen.wait_line(1, timeout_s)
    finally:
        gen.stop()
    elapsed = finished - report["t_first_write"]
    out: dict[str, Any] = {
        "elapsed_s": round(elapsed, 4),
        "events_per_s": round(events / elapsed, 1),
        "server_cpu_us_per_event": round(cpu / events * 1e6, 2),
        "server_cpu_cores": round(cpu / elapsed, 2),
        "peak_rss_mib": round(rss.peak_mib, 1),
        "loadgen_cpu_us_per_event": report["cpu_us_per_event"],
        "loadgen_offered_events_per_s": report["offered_events_per_s"],
        "loadgen_encode_s": ready["encode_s"],
        "back_pressure_applied": report["back_pressure_applied"],
        # This process (polling the sink, sampling memory): it shares the box with the server too.
        "bench_cpu_us_per_event": round(own / events * 1e6, 2),
        "loadgen": report,
    }
    if side is not None:
        out["endpoint_cpu_us_per_event"] = round(side / events * 1e6, 2)
    return out


def _run_splitter(work: Path, events: int, connections: int, timeout_s: float) -> dict[str, Any]:
    splitter = Splitter(work, events)
    try:
        out = _measure(
            splitter.pid,
            splitter.port,
            events=events,
            connections=connections,
            timeout_s=timeout_s,
            done_at=splitter.done_at,
        )
    finally:
        frames = splitter.stop()
    if frames != events + connections:
        raise RuntimeError(f"the splitter saw {frames} frames, expected {events} + {connections} NEGO_REQs")
    return out


def _when(counter: Callable[[], int], events: int) -> Callable[[], float | None]:
    """A completion probe: the moment ``counter`` first reached ``events`` (None before)."""

    def probe() -> float | None:
        return time.monotonic() if counter() >= events else None

    return probe


@contextlib.contextmanager
def _endpoint_for(target: Target, work: Path, record_times: bool = False) -> Iterator[EndpointProcess | None]:
    if not target.aws:
        yield None
        return
    record = work / "endpoint-record" if record_times else None
    with endpoint_process(queues=[QUEUE], buses=[BUS], record=record, record_times=record_times) as endpoint:
        yield endpoint


def _start_daemon(target: Target, work: Path, endpoint: EndpointProcess | None, *extra: str) -> Daemon:
    data = work / "data"
    data.mkdir()
    env = aws_env(endpoint) if endpoint is not None else child_env()
    return Daemon(data, *sink_flags(target, endpoint), *target.flags, *extra, env=env)


def _stop_daemon(daemon: Daemon) -> dict[str, Any]:
    log = daemon.stop(STOP_TIMEOUT_S)
    stopped: dict[str, Any] = next((line for line in reversed(log) if line.get("event") == "stopped"), {})
    errors = [line for line in log if line.get("level") in ("error", "critical")]
    return {"exit_code": daemon.proc.returncode, "undelivered": stopped.get("undelivered"), "errors": errors[:3]}


def _run_fpolicyd(target: Target, work: Path, events: int, connections: int, timeout_s: float) -> dict[str, Any]:
    with _endpoint_for(target, work) as endpoint:
        daemon = _start_daemon(target, work, endpoint)
        try:
            if endpoint is None:
                counter: Callable[[], int] = LineCounter(work / "data" / "events")
            else:
                counter = endpoint_counter(endpoint, target.sink)
            out = _measure(
                daemon.pid,
                daemon.port,
                events=events,
                connections=connections,
                timeout_s=timeout_s,
                done_at=_when(counter, events),
                side_pid=endpoint.pid if endpoint is not None else None,
            )
        finally:
            stop = _stop_daemon(daemon)
        delivered = counter()
        out["daemon_stop"] = stop
        if delivered != events:
            raise RuntimeError(f"{delivered} events at the sink, {events} sent")
        if endpoint is not None:
            stats = endpoint.stats()
            if target.sink == "eventbridge":
                requests = stats["requests"].get("AWSEvents.PutEvents", 0)
            else:
                requests = stats["requests"].get("AmazonSQS.SendMessageBatch", 0)
                out["billed_per_event"] = round(stats["sqs_billed"].get(QUEUE, 0) / events, 5)
                out["messages"] = stats["messages"].get(QUEUE, 0)
            out["requests_per_event"] = round(requests / events, 5)
            out["endpoint_errors"] = stats["errors"]
    return out


# --------------------------------------------------------------------------------------------- latency


def latency_durable(events: int, connections: int, rate: float, timeout_s: float) -> dict[str, Any]:
    """Frame -> durable: synchronous engine, JSON Lines, defaults, paced."""
    target = Target("latency/durable", "sync engine, JSON Lines, defaults", "jsonl", ("--engine-mode", "sync"))
    out: dict[str, Any] = {"target": target.key, "events": events, "rate": rate}
    with tempfile.TemporaryDirectory(prefix="fpolicyd-bench-") as tmp:
        work = Path(tmp)
        try:
            daemon = _start_daemon(target, work, None)
            try:
                counter = LineCounter(work / "data" / "events")
                row = _measure(
                    daemon.pid,
                    daemon.port,
                    events=events,
                    connections=connections,
                    timeout_s=timeout_s,
                    done_at=_when(counter, events),
                    loadgen_args=("--sync", "--rate", f"{rate:g}"),
                )
            finally:
                out["daemon_stop"] = _stop_daemon(daemon)
            report = row["loadgen"]
            if report["responses"] != events:
                raise RuntimeError(f"{report['responses']} SCREEN_RESP of {events}")
            out.update(
                latency_ms=report["latency_ms"],
                achieved_events_per_s=report.get("answered_events_per_s"),
                peak_rss_mib=row["peak_rss_mib"],
                server_cpu_us_per_event=row["server_cpu_us_per_event"],
                server_cpu_cores=row["server_cpu_cores"],
            )
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def latency_sqs(events: int, connections: int, rate: float, timeout_s: float) -> dict[str, Any]:
    """Frame -> acknowledged by SQS: async engine, one event per message, defaults, paced; matched by event id."""
    target = Target("latency/sqs", "async engine, SQS, defaults", "sqs")
    out: dict[str, Any] = {"target": target.key, "events": events, "rate": rate}
    with tempfile.TemporaryDirectory(prefix="fpolicyd-bench-") as tmp:
        work = Path(tmp)
        sends = work / "sends"
        try:
            with _endpoint_for(target, work, record_times=True) as endpoint:
                assert endpoint is not None
                daemon = _start_daemon(target, work, endpoint)
                try:
                    row = _measure(
                        daemon.pid,
                        daemon.port,
                        events=events,
                        connections=connections,
                        timeout_s=timeout_s,
                        done_at=_when(endpoint_counter(endpoint, "sqs"), events),
                        side_pid=endpoint.pid,
                        loadgen_args=("--rate", f"{rate:g}", "--ids", "--send-log", str(sends)),
                    )
                finally:
                    out["daemon_stop"] = _stop_daemon(daemon)
                endpoint.stats()  # flushes the record file
                latencies = match_latencies(sends, work / "endpoint-record")
            if len(latencies) != events:
                raise RuntimeError(f"{len(latencies)} of {events} events matched at the endpoint")
            out.update(
                latency_ms=percentiles_ms(latencies),
                achieved_events_per_s=row["events_per_s"],
                peak_rss_mib=row["peak_rss_mib"],
                server_cpu_us_per_event=row["server_cpu_us_per_event"],
                server_cpu_cores=row["server_cpu_cores"],
                endpoint_cpu_us_per_event=row["endpoint_cpu_us_per_event"],
            )
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def match_latencies(sends: Path, record: Path) -> list[float]:
    """Seconds from each frame's write to its entry's arrival at the endpoint, matched by event_id (each id once:
    a second arrival of an id would be a duplicate delivery, and is not a latency)."""
    sent: dict[str, int] = {}
    with sends.open() as fh:
        for line in fh:
            event_id, at = line.split()
            sent[event_id] = int(at)
    out: list[float] = []
    with record.open("rb") as fh:
        for raw in fh:
            stamp, _, body = raw.partition(b" ")
            sent_at = sent.pop(str(orjson.loads(body)["event_id"]), None)
            if sent_at is not None:
                out.append((int(stamp) - sent_at) / 1e9)
    return out


# ---------------------------------------------------------------------------------------------- replay


def replay_storm(timeout_s: float, events: int = REPLAY_EVENTS) -> dict[str, Any]:
    """Issue 11's replay-test command as a subprocess: wall time (process start to exit) and loss."""
    args = ("--events", str(events), *REPLAY_ARGS)
    command = [sys.executable, "-m", "fpolicyd", "replay-test", *args, "--progress-s", "0", "--json"]
    out: dict[str, Any] = {"command": "fpolicyd replay-test " + " ".join(args), "timeout_s": timeout_s}
    with tempfile.TemporaryDirectory(prefix="fpolicyd-bench-") as tmp:
        started = time.monotonic()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=child_env(), cwd=tmp,
                                  check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            out["error"] = f"not finished within {timeout_s:g} s"
            return out
        out["wall_s"] = round(time.monotonic() - started, 2)
        out["exit_code"] = done.returncode
    try:
        report = json.loads(done.stdout)
    except ValueError:
        out["error"] = f"no JSON report (exit {done.returncode}): {done.stderr.strip()[-300:]}"
        return out
    out.update(
        ok=report.get("ok"),
        lost=report.get("lost"),
        delivered=report.get("delivered"),
        duplicates_injected=report.get("duplicates_injected"),
        duplicates_delivered=report.get("duplicates_delivered"),
        report_elapsed_s=report.get("elapsed_s"),
        drive_s=report.get("drive_s"),
        replay=report.get("replay"),
    )
    return out


# ---------------------------------------------------------------------------------------------- output


def span(values: list[float], fmt: str) -> str:
    """``a`` or ``a–b`` (min–max over the runs)."""
    if not values:
        return "—"
    low, high = min(values), max(values)
    if fmt.format(low) == fmt.format(high):
        return fmt.format(low)
    return f"{fmt.format(low)}–{fmt.format(high)}"


def fmt_eps(x: float) -> str:
    return f"{x:,.0f}"


COLUMNS: Final = (
    ("events/s", "events_per_s", "{:,.0f}"),
    ("server CPU µs/ev", "server_cpu_us_per_event", "{:.1f}"),
    ("× splitter", "ratio", "{:.2f}"),
    ("req/ev", "requests_per_event", "{:.4f}"),
    ("billed/ev", "billed_per_event", "{:.4f}"),
    ("peak RSS MiB", "peak_rss_mib", "{:.0f}"),
    ("loadgen CPU µs/ev", "loadgen_cpu_us_per_event", "{:.1f}"),
    ("endpoint CPU µs/ev", "endpoint_cpu_us_per_event", "{:.1f}"),
)


def table(rows: dict[str, list[dict[str, Any]]], labels: dict[str, str]) -> list[str]:
    # A row's ratio is to the splitter of the same run (the same minute of this box).
    ceiling = {r["run"]: r["events_per_s"] for r in rows.get("splitter", []) if "error" not in r}
    lines = [
        "| target | " + " | ".join(c[0] for c in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for key, runs in rows.items():
        good = [r for r in runs if "error" not in r]
        for r in good:
            if r["run"] in ceiling:
                r["ratio"] = r["events_per_s"] / ceiling[r["run"]]
        cells = [span([r[field] for r in good if field in r], fmt) for _, field, fmt in COLUMNS]
        failed = [r["error"] for r in runs if "error" in r]
        label = labels[key] + (f" — **{len(failed)} of {len(runs)} runs failed**: {failed[0]}" if failed else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def goals(
    rows: dict[str, list[dict[str, Any]]], latency: list[dict[str, Any]], replay: dict[str, Any] | None
) -> list[str]:
    """Issue 11's goals next to the best run of each row (met: yes/no; nothing is asserted)."""

    def best(key: str, field: str, low: bool = False) -> float | None:
        values = [float(r[field]) for r in rows.get(key, []) if "error" not in r and field in r]
        if not values:
            return None
        return min(values) if low else max(values)

    checks: list[tuple[str, float | None, float, bool, str]] = [
        ("defaults → JSON Lines, events/s", best("jsonl", "events_per_s"), GOAL_JSONL_EPS, True, "{:,.0f}"),
        ("defaults → JSON Lines, server CPU µs/event", best("jsonl", "server_cpu_us_per_event", True), GOAL_CPU_US,
         False, "{:.1f}"),
        ("defaults → SQS, events/s", best("sqs", "events_per_s"), GOAL_SQS_EPS, True, "{:,.0f}"),
        ("defaults → SQS, requests/event", best("sqs", "requests_per_event", True), GOAL_SQS_REQ, False, "{:.4f}"),
        ("packed SQS, events/s", best("sqs-packed", "events_per_s"), GOAL_PACKED_EPS, True, "{:,.0f}"),
        ("packed SQS, billed requests/event", best("sqs-packed", "billed_per_event", True), GOAL_PACKED_BILLED, False,
         "{:.4f}"),
        ("EventBridge, events/s", best("eventbridge", "events_per_s"), GOAL_EB_EPS, True, "{:,.0f}"),
    ]  # fmt: skip
    for row in latency:
        if row.get("basis") != "goal":
            continue
        p99 = row.get("latency_ms", {}).get("p99")
        if row["target"] == "latency/durable":
            checks.append(("p99 frame → durable ms", p99, GOAL_DURABLE_P99_MS, False, "{:.1f}"))
        else:
            checks.append(("p99 frame → SQS acknowledged ms", p99, GOAL_SQS_P99_MS, False, "{:.1f}"))
    # The goal is the default configuration's: a row with extra delivery processes (each ~95 MiB more) is shown in
    # the table, not held to it.
    peaks = [
        r["peak_rss_mib"]
        for key, runs in rows.items()
        if "/processes-" not in key
        for r in runs
        if "peak_rss_mib" in r and "error" not in r
    ]
    peaks += [r["peak_rss_mib"] for r in latency if "peak_rss_mib" in r]
    checks.append(
        ("peak RSS MiB (any row, one delivery process)", max(peaks) if peaks else None, GOAL_RSS_MIB, False, "{:.0f}")
    )
    if replay is not None and replay["command"].startswith(f"fpolicyd replay-test --events {REPLAY_EVENTS} "):
        checks.append(("replay storm wall s", replay.get("wall_s"), GOAL_REPLAY_S, False, "{:.1f}"))
        checks.append(("replay storm lost events", replay.get("lost"), 0, False, "{:,.0f}"))
    lines = ["| goal (issue 11) | target | measured (best run) | met |", "|---|---:|---:|---|"]
    for name, value, goal, higher, fmt in checks:
        sign = "≥" if higher else "≤"
        met = "—" if value is None else ("yes" if (value >= goal if higher else value <= goal) else "no")
        shown = "—" if value is None else fmt.format(value)
        lines.append(f"| {name} | {sign} {fmt.format(goal)} | {shown} | {met} |")
    return lines


def latency_lines(latency: list[dict[str, Any]]) -> list[str]:
    """The paced runs' table. "server CPU, cores" is how much of the box the server's process tree kept busy at
    that rate. Its CPU per event is higher than the unpaced rows' (each read holds a few frames, each wakeup
    fewer events), so it is no capacity figure: it is what a moderate, steady load costs."""
    lines = [
        "| latency, paced | offered events/s | achieved events/s | p50 ms | p95 ms | p99 ms | max ms | peak RSS MiB "
        "| server CPU µs/ev | server CPU, cores | endpoint CPU µs/ev |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {
        "latency/durable": "frame → durable (SCREEN_RESP; sync engine, JSON Lines, defaults)",
        "latency/sqs": "frame → acknowledged by SQS (async engine, 1 event/message, defaults)",
    }
    for row in latency:
        name = names[row["target"]] + (f", {row['basis']}" if row.get("basis") != "goal" else "")
        if "error" in row:
            lines.append(f"| {name} — **failed**: {row['error']} | {row['rate']:,.0f} | | | | | | | | | |")
            continue
        ms = row["latency_ms"]
        cpu = row["server_cpu_us_per_event"]
        endpoint = row.get("endpoint_cpu_us_per_event")
        lines.append(
            f"| {name} | {row['rate']:,.0f} | {row['achieved_events_per_s'] or 0:,.0f} | {ms['p50']:.1f} "
            f"| {ms['p95']:.1f} | {ms['p99']:.1f} | {ms['max']:.1f} | {row['peak_rss_mib']:.0f} | {cpu:.1f} "
            f"| {row['server_cpu_cores']:.2f} | {'—' if endpoint is None else f'{endpoint:.1f}'} |"
        )
    return lines


def print_lines(lines: list[str], out: IO[str]) -> None:
    for line in lines:
        print(line, file=out)
    out.flush()


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--events", type=int, help="events per throughput row (default 100000; --quick: 2000)")
    parser.add_argument("--runs", type=int, help="runs of every row, interleaved (default 2; --quick: 1)")
    parser.add_argument("--connections", type=int, default=4, help="simulated nodes (connections) of the load")
    parser.add_argument("--rows", default=",".join(SINKS), help=f"comma-separated, of {', '.join(SINKS)}")
    parser.add_argument("--no-dedup-off", action="store_true", help="only the defaults of each sink")
    parser.add_argument(
        "--delivery-processes",
        type=int,
        default=2,
        help="the AWS rows again with this many delivery processes sharing the sink (1: no such rows)",
    )
    parser.add_argument("--no-latency", action="store_true", help="skip the latency runs")
    parser.add_argument("--latency-rate", type=float, default=20_000.0, help="events/s of the latency runs")
    parser.add_argument(
        "--no-half-rate", action="store_true", help="skip the latency runs at half the rate the rows reached"
    )
    parser.add_argument("--latency-seconds", type=float, help="length of each latency run (default 5; --quick 0.1)")
    parser.add_argument("--row-timeout-s", type=float, default=300.0, help="bound on each row and latency run")
    parser.add_argument("--replay", action="store_true", help="also run issue 11's replay storm (~2 min)")
    parser.add_argument("--replay-only", action="store_true", help="only the replay storm")
    parser.add_argument("--replay-timeout-s", type=float, default=900.0)
    parser.add_argument(
        "--replay-events", type=int, default=REPLAY_EVENTS, help="the storm's --events (issue 11: 1000000)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: few events, one run")
    parser.add_argument("--json", type=Path, help="also write every figure as JSON to this file ('-': stdout)")
    args = parser.parse_args(argv)
    events = args.events or (2_000 if args.quick else 100_000)
    runs = args.runs or (1 if args.quick else 2)
    latency_s = args.latency_seconds or (0.1 if args.quick else 5.0)
    sinks = [s.strip() for s in args.rows.split(",") if s.strip()]
    unknown = set(sinks) - set(SINKS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; known: {', '.join(SINKS)}")
    if not 1 <= args.delivery_processes <= 16:
        parser.error("--delivery-processes: 1..16")
    if not args.connections <= events <= 10_000_000 or not 1 <= runs <= 20 or not 1 <= args.connections <= 256:
        parser.error("--events: connections..10000000, --runs: 1..20, --connections: 1..256")
    if not 100 <= args.replay_events <= 10_000_000:
        parser.error("--replay-events: 100..10000000")
    if not (math.isfinite(args.latency_rate) and args.latency_rate > 0 and latency_s > 0):
        parser.error("--latency-rate and --latency-seconds must be > 0")
    out = sys.stderr if args.json is not None and str(args.json) == "-" else sys.stdout

    info = machine()
    print_lines(
        [
            f"fpolicyd throughput bench — {info['commit']} — {time.strftime('%Y-%m-%d %H:%M %Z')}",
            f"machine: {info['cpu']}, {info['cores']} cores ({info['cores_usable']} usable), "
            f"{info['memory_gib']} GiB, Linux {info['kernel']}; Python {info['python']}, uvloop {info['uvloop']}; "
            f"compiled accelerator (fpolicyd._speedups): {info['accelerator']}; "
            f"load average at start {' '.join(map(str, info['loadavg_start']))}",
            f"load: benchmarks/loadgen.py, {args.connections} simulated nodes (one connection each, NEGO handshake), "
            f"frames encoded before the clock, async engine unpaced; {events:,} events per row, {runs} run(s) "
            "per row, interleaved; server CPU and RSS = the whole process tree; the AWS endpoint's CPU separately",
            "",
        ],
        out,
    )
    rows: dict[str, list[dict[str, Any]]] = {}
    labels: dict[str, str] = {}
    latency: list[dict[str, Any]] = []
    replay: dict[str, Any] | None = None
    if not args.replay_only:
        chosen = [
            t
            for t in targets(sinks, args.delivery_processes)
            if not (args.no_dedup_off and t.key.endswith("/dedup-off"))
        ]
        for target in chosen:
            rows[target.key] = []
            labels[target.key] = target.label
        for run in range(runs):
            for target in chosen:
                row = run_row(target, events, args.connections, args.row_timeout_s)
                row["run"] = run + 1
                rows[target.key].append(row)
                state = row.get("error") or f"{row['events_per_s']:,.0f} events/s"
                print(f"  run {run + 1}/{runs} {target.label}: {state}", file=sys.stderr, flush=True)
        if not args.no_latency:
            # At the goal's rate; and, where this run measured the configuration, at half the rate it reached
            # (latency below saturation: at a rate the server cannot sustain, latency is the queue's length).
            kinds: tuple[tuple[str, Probe], ...] = (("jsonl", latency_durable), ("sqs", latency_sqs))
            probes: list[tuple[Probe, float, str]] = [(probe, args.latency_rate, "goal") for _, probe in kinds]
            for key, probe in kinds:
                reached = [r["events_per_s"] for r in rows.get(key, []) if "error" not in r]
                if reached and not args.no_half_rate:
                    probes.append((probe, round(max(reached) / 2), f"½ of the best {labels[key]} row above"))
            for probe, rate, basis in probes:
                count = max(args.connections, round(rate * latency_s))
                result = probe(count, args.connections, rate, args.row_timeout_s)
                result["basis"] = basis
                latency.append(result)
                print(f"  {result['target']}: {result.get('error') or result['latency_ms']}", file=sys.stderr,
                      flush=True)  # fmt: skip
    if args.replay or args.replay_only:
        replay = replay_storm(args.replay_timeout_s, args.replay_events)
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]

    lines: list[str] = []
    if rows:
        lines += table(rows, labels)
        lines.append("")
    if latency:
        lines += latency_lines(latency)
        lines.append("")
    if replay is not None:
        if "error" in replay:
            lines.append(f"replay storm ({replay['command']}): **failed**: {replay['error']}")
        else:
            lines.append(
                f"replay storm ({replay['command']}): {replay['wall_s']:.1f} s wall (process start to exit), "
                f"lost {replay['lost']:,}, delivered {replay['delivered']:,}, "
                f"{replay['duplicates_injected']:,} duplicates injected, {replay['duplicates_delivered']:,} delivered"
            )
        lines.append("")
    lines += goals(rows, latency, replay)
    lines.append("")
    lines.append(f"load average at end {' '.join(map(str, info['loadavg_end']))}")
    print_lines(lines, out)
    failed = [r for runs_ in rows.values() for r in runs_ if "error" in r] + [r for r in latency if "error" in r]
    if replay is not None and ("error" in replay or replay.get("lost")):
        failed.append(replay)
    if args.json is not None:
        document = orjson.dumps(
            {"machine": info, "events": events, "runs": runs, "rows": rows, "latency": latency, "replay": replay},
            option=orjson.OPT_INDENT_2,
        )
        if str(args.json) == "-":
            sys.stdout.buffer.write(document + b"\n")
            sys.stdout.flush()
        else:
            args.json.write_bytes(document + b"\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
