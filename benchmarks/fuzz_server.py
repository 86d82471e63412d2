"""The long fuzz campaign (``make fuzz``): a real ``fpolicyd serve`` on 127.0.0.1 against up to a million attacks.

    python benchmarks/fuzz_server.py [--inputs 1000000] [--max-seconds 3600] [--seed 1] [--concurrency 16]
        [--progress-every 10000] [--check-every 5000] [--replay INDEX] [--keep DIR]

An input is one attack of tests/support/fuzz.py (one to three connections played at once: mutated real frames,
random splits, garbage before and after NEGO, slow writers, interleaved valid sessions, FIN / half-close / RST /
cut). Attack ``i`` is drawn from ``random.Random(f"{seed}:{i}")``, so any input is replayed alone with ``--replay
i`` (same seed). ``--concurrency`` attacks are in flight at once, while a healthy session streams notifications.

Checked continuously: every log line of the daemon (stderr, JSON): no ``task_failed``, exception, traceback,
non-JSON line (an unhandled exception printed by the interpreter) or error-level line that the peer's input does not
explain; every connect succeeds; every half-closed connection is closed by the daemon. Every ``--check-every``
inputs the attacks pause and the daemon must come back to the healthy session alone (``fpolicyd_sessions`` 1,
``fpolicyd_pending_connections`` 0), answer /readyz 200, and its RSS is sampled. At the end: every notification
of the healthy session is in the JSON Lines exactly once, the RSS grew less than ``--rss-bound-mb`` after the
warm-up (the first check), and the daemon exits 0 on SIGTERM. Bounded by ``--inputs`` and ``--max-seconds``;
prints progress every ``--progress-every`` inputs and a summary (JSON on the last line). Exit status 1 when a
check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.fuzz import (
    FUZZ_MAX_FRAME_BYTES,
    Corpus,
    Ending,
    HealthySession,
    LogTally,
    RandomDraw,
    draw_attack,
    exactly_once,
    play_attack,
    unexplained,
    wait_delivered,
)
from support.observability import http_get

#: Settle after a pause: the daemon must be back to the healthy session within this.
SETTLE_S: Final = 15.0
#: Bound of one attack (it has its own, shorter ones; this is the backstop).
ATTACK_TIMEOUT_S: Final = 60.0
#: Findings of each kind printed in full (the rest are counted).
SHOWN: Final = 5


@dataclass
class Daemon:
    process: asyncio.subprocess.Process
    port: int = 0
    http_port: int = 0
    #: Lines judged bad (see support.fuzz.unexplained), with the input window they came in.
    bad: list[dict[str, Any]] = field(default_factory=list)
    tally: LogTally = field(default_factory=LogTally)
    #: The inputs in flight (their indexes): a bad line is blamed on them.
    in_flight: set[int] = field(default_factory=set)

    async def read_log(self, stream: asyncio.StreamReader, ready: asyncio.Future[None]) -> None:
        while line := await stream.readline():
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                record = {"event": "non_json_stderr", "log_level": "error", "text": line.decode(errors="replace")}
            if not isinstance(record, dict):
                record = {"event": "non_json_stderr", "log_level": "error", "text": repr(record)}
            self.tally.add((record,))
            if unexplained((record,)):
                self.bad.append({"line": record, "inputs_in_flight": sorted(self.in_flight)[:20]})
            event = record.get("event")
            if event == "listening":
                self.port = int(record["port"])
            elif event == "http_listening":
                self.http_port = int(record["port"])
            if self.port and self.http_port and not ready.done():
                ready.set_result(None)

    def rss_bytes(self) -> int | None:
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def metrics(self) -> dict[str, dict[str, float]]:
        status, body = http_get(self.http_port, "/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        out: dict[str, dict[str, float]] = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                label = sample.labels.get("reason", "")
                out.setdefault(sample.name, {})[label] = sample.value
        return out


async def start_daemon(data_dir: Path, replay_window: int) -> tuple[Daemon, asyncio.Task[None]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FPOLICYD_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fpolicyd",
        "serve",
        "--listen-host=127.0.0.1",
        "--listen-port=0",
        "--http-host=127.0.0.1",
        "--http-port=0",
        f"--data-dir={data_dir}",
        "--jsonl-fsync=never",
        "--dedup-mode=off",  # a duplicate of the healthy session's events must show
        f"--max-frame-bytes={FUZZ_MAX_FRAME_BYTES}",
        "--handshake-timeout-s=2",
        f"--replay-duplicate-window={replay_window}",  # full early: later growth is not the window filling
        "--replay-max-nodes=64",
        cwd=data_dir,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    daemon = Daemon(process)
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    reader = asyncio.create_task(daemon.read_log(process.stderr, ready))
    await asyncio.wait_for(ready, 30)
    return daemon, reader


@dataclass
class Figures:
    inputs: int = 0
    connections: int = 0
    bytes_sent: int = 0
    closed_by_server: int = 0
    valid_sessions: int = 0
    endings: dict[str, int] = field(default_factory=dict)
    #: Findings other than log lines: (kind, input index, detail).
    findings: list[tuple[str, int, str]] = field(default_factory=list)
    rss: list[tuple[int, int]] = field(default_factory=list)  # (inputs, bytes)


def draw_input(seed: int, index: int, corpus: Corpus) -> Any:
    return draw_attack(RandomDraw(random.Random(f"{seed}:{index}")), corpus)


async def run_one(daemon: Daemon, seed: int, index: int, corpus: Corpus, figures: Figures) -> None:
    attack = draw_input(seed, index, corpus)
    daemon.in_flight.add(index)
    try:
        outcome = await asyncio.wait_for(play_attack(attack, daemon.port), ATTACK_TIMEOUT_S)
    except TimeoutError:
        figures.findings.append(("attack_timeout", index, attack.describe()))
        return
    finally:
        daemon.in_flight.discard(index)
    figures.inputs += 1
    figures.connections += len(attack.scripts)
    for script, result in zip(attack.scripts, outcome, strict=True):
        figures.bytes_sent += result.sent
        figures.closed_by_server += result.closed_by_server
        figures.valid_sessions += script.valid
        figures.endings[script.ending.value] = figures.endings.get(script.ending.value, 0) + 1
        if result.connect_failed:
            figures.findings.append(("connect_failed", index, script.describe()))
        if script.ending is Ending.HALF_CLOSE and not result.half_close_answered:
            figures.findings.append(("half_close_not_closed", index, script.describe()))


async def settle(daemon: Daemon) -> str | None:
    """None once the daemon holds only the healthy session, is ready, and nothing is pending; else what is off."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        metrics = await asyncio.to_thread(daemon.metrics)
        sessions = metrics.get("fpolicyd_sessions", {}).get("", -1)
        pending = metrics.get("fpolicyd_pending_connections", {}).get("", -1)
        if (sessions, pending) == (1, 0):
            status, body = await asyncio.to_thread(http_get, daemon.http_port, "/readyz")
            if status == 200:
                return None
            if time.monotonic() > deadline:
                return f"/readyz {status}: {body[:300]!r}"
        elif time.monotonic() > deadline:
            return f"sessions {sessions}, pending {pending} (want 1, 0)"
        await asyncio.sleep(0.05)


async def campaign(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    corpus = Corpus.build()
    daemon, reader = await start_daemon(data_dir, args.replay_window)
    figures = Figures()
    healthy = HealthySession(daemon.port, interval_s=0.05, per_tick=4)
    await healthy.start()
    started = time.monotonic()
    deadline = started + args.max_seconds
    indexes = iter([args.replay] if args.replay is not None else range(args.inputs))
    next_progress = args.progress_every
    exhausted = False
    stop_reason = "inputs"
    rss_warm: int | None = None
    try:
        while not exhausted:
            # One window of --check-every inputs, --concurrency at a time; then the daemon is checked at rest.
            pending: set[asyncio.Task[None]] = set()
            started_in_window = 0
            while True:
                while len(pending) < args.concurrency and started_in_window < args.check_every and not exhausted:
                    if time.monotonic() > deadline:
                        exhausted, stop_reason = True, "max_seconds"
                        break
                    index = next(indexes, None)
                    if index is None:
                        exhausted = True
                        break
                    pending.add(asyncio.create_task(run_one(daemon, args.seed, index, corpus, figures)))
                    started_in_window += 1
                if not pending:
                    break
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if figures.inputs >= next_progress:
                    next_progress += args.progress_every
                    elapsed = time.monotonic() - started
                    rss = daemon.rss_bytes()
                    print(
                        f"{figures.inputs:>9} inputs  {figures.inputs / elapsed:7.0f}/s  {elapsed:7.0f} s  "
                        f"rss {0 if rss is None else rss / 1e6:6.1f} MB  bad lines {len(daemon.bad)}  "
                        f"findings {len(figures.findings)}  healthy {healthy.sent} sent",
                        flush=True,
                    )
            if started_in_window < args.check_every:
                exhausted = True
            problem = await settle(daemon)
            if problem is not None:
                figures.findings.append(("not_settled", figures.inputs, problem))
            if not healthy.healthy:
                figures.findings.append(("healthy_session_broken", figures.inputs, str(healthy.failure)))
                break
            rss = daemon.rss_bytes()
            if rss is not None:
                figures.rss.append((figures.inputs, rss))
                if rss_warm is None:
                    rss_warm = rss
            if args.stop_on_finding and (daemon.bad or figures.findings):
                stop_reason = "finding"
                break
        elapsed = time.monotonic() - started
        sent = await healthy.stop_sending()
        ids = await wait_delivered(data_dir / "events", healthy.session_id, sent, within=60)
        wrong = exactly_once(ids, sent)
        if wrong is not None:
            figures.findings.append(("healthy_events", -1, wrong))
        metrics = await asyncio.to_thread(daemon.metrics)
    finally:
        await healthy.close()
        if daemon.process.returncode is None:
            daemon.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(daemon.process.wait(), 60)
        except TimeoutError:
            daemon.process.kill()
            code = await daemon.process.wait()
        await reader
    if code != 0:
        figures.findings.append(("exit_status", -1, str(code)))
    rss_end = figures.rss[-1][1] if figures.rss else None
    rss_growth = rss_end - rss_warm if rss_end is not None and rss_warm is not None else None
    if rss_growth is not None and rss_growth > args.rss_bound_mb * 1e6:
        figures.findings.append(("rss_growth", -1, f"{rss_growth / 1e6:.1f} MB > {args.rss_bound_mb} MB"))
    return {
        "inputs": figures.inputs,
        "stopped_by": stop_reason,
        "seconds": round(elapsed, 1),
        "inputs_per_s": round(figures.inputs / elapsed, 1) if elapsed else None,
        "connections": figures.connections,
        "bytes_sent": figures.bytes_sent,
        "closed_by_server_while_sending": figures.closed_by_server,
        "valid_sessions": figures.valid_sessions,
        "endings": figures.endings,
        "healthy_events_sent": sent,
        "healthy_events_delivered": len(ids),
        "healthy_exactly_once": wrong is None,
        "rss_mb": {
            "after_warm_up": None if rss_warm is None else round(rss_warm / 1e6, 1),
            "end": None if rss_end is None else round(rss_end / 1e6, 1),
            "max": round(max(r for _, r in figures.rss) / 1e6, 1) if figures.rss else None,
        },
        "closes_by_reason": {k: int(v) for k, v in sorted(metrics.get("fpolicyd_parse_errors_total", {}).items())},
        "timeouts_by_reason": {
            k: int(v) for k, v in sorted(metrics.get("fpolicyd_session_timeouts_total", {}).items()) if v
        },
        "rejected_by_reason": {
            k: int(v) for k, v in sorted(metrics.get("fpolicyd_connections_rejected_total", {}).items()) if v
        },
        "log_lines": dict(daemon.tally.top(15)),
        "bad_log_lines": len(daemon.bad),
        "bad_log_lines_shown": daemon.bad[:SHOWN],
        "findings": len(figures.findings),
        "findings_by_kind": _count(kind for kind, _, _ in figures.findings),
        "findings_shown": [{"kind": k, "input": i, "detail": d[:2000]} for k, i, d in figures.findings[:SHOWN]],
        "exit_status": code,
    }


def _count(kinds: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for kind in kinds:
        out[kind] = out.get(kind, 0) + 1
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=1_000_000, help="attacks to play (default 10^6)")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="stop starting attacks after this")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=16, help="attacks in flight at once")
    parser.add_argument("--progress-every", type=int, default=10_000)
    parser.add_argument("--check-every", type=int, default=5_000, help="pause and check the daemon this often")
    parser.add_argument("--replay", type=int, default=None, metavar="INDEX", help="play only input INDEX")
    parser.add_argument("--replay-window", type=int, default=4096, help="the daemon's replay_duplicate_window")
    parser.add_argument("--rss-bound-mb", type=float, default=64.0, help="RSS growth allowed after the warm-up")
    parser.add_argument("--stop-on-finding", action="store_true", help="stop at the first check that finds one")
    parser.add_argument("--keep", type=Path, default=None, help="keep the daemon's data under this directory")
    args = parser.parse_args()
    if args.inputs < 1 or args.concurrency < 1 or args.check_every < 1 or args.progress_every < 1:
        parser.error("--inputs, --concurrency, --check-every and --progress-every must be at least 1")
    if args.max_seconds <= 0:
        parser.error("--max-seconds must be positive")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        data_dir = args.keep
    else:
        data_dir = Path(tempfile.mkdtemp(prefix="fpolicyd-fuzz-"))
    print(
        f"fuzzing fpolicyd serve on 127.0.0.1: up to {args.inputs} inputs / {args.max_seconds:g} s, seed {args.seed},"
        f" {args.concurrency} in flight, data in {data_dir}",
        flush=True,
    )
    try:
        summary = asyncio.run(campaign(args, data_dir))
    finally:
        if args.keep is None:
            shutil.rmtree(data_dir, ignore_errors=True)
    failed = bool(summary["findings"] or summary["bad_log_lines"])
    print(
        f"fuzz: {summary['inputs']} inputs in {summary['seconds']} s ({summary['inputs_per_s']}/s, stopped by "
        f"{summary['stopped_by']}); {summary['connections']} connections; healthy session "
        f"{summary['healthy_events_delivered']}/{summary['healthy_events_sent']} delivered, exactly once: "
        f"{summary['healthy_exactly_once']}; RSS {summary['rss_mb']}; bad log lines {summary['bad_log_lines']}; "
        f"findings {summary['findings_by_kind'] or 'none'} -> {'FAILED' if failed else 'ok'}"
    )
    print(json.dumps(summary, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
