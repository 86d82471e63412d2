"""``fpolicyd replay-test``: flags → :class:`~fpolicyd.replaytest.config.ReplayTestConfig`; the report as a summary
table (or JSON with ``--json``) on stdout, the JSON in ``--report FILE``."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path
from typing import IO, Any

import orjson
import uvloop

from fpolicyd.errors import ConfigError
from fpolicyd.obs.log import configure_logging
from fpolicyd.pipeline.redaction import Redactor
from fpolicyd.protocol.session_config import EngineMode
from fpolicyd.replaytest.config import MAX_INSTANCES, ReplayTestConfig, ReplayTestError, RestartMode
from fpolicyd.replaytest.plot import MAX_TIMELINE_POINTS, plot_html
from fpolicyd.replaytest.run import TIMELINE_INTERVAL_S, TIMELINE_MIN_INTERVAL_S, run_replay_test
from fpolicyd.replaytest.summary import summary_text


def _fraction(raw: str) -> float:
    value = float(raw)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{raw} is not a fraction in 0..1")
    return value


def _positive(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{raw} is not a number > 0")
    return value


def _target(raw: str) -> tuple[str, int]:
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{raw!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _setting(raw: str) -> tuple[str, str]:
    key, sep, value = raw.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{raw!r} is not KEY=VALUE")
    return key.strip().replace("-", "_"), value


def add_replay_test_parser(sub: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        "replay-test",
        help="persistent-store replay storm: simulated nodes, outage, replay; verify zero loss at the sink",
        description="Drives K simulated ONTAP nodes through live traffic, an outage (each node keeps generating "
        "into a backlog, as ONTAP's persistent store does) and a reconnect that replays the backlog behind live "
        "traffic; then checks by event_id that every notification reached the sink (the JSON Lines directory, or "
        "an SQS queue with --sink). Runs a daemon in-process (or as a subprocess) unless --target is given. "
        "Progress bars on stderr; a summary table on stdout (the JSON report instead with --json), the JSON "
        "report in --report FILE. "
        "Exit 0: nothing lost; 1: something lost or the run failed; 2: bad arguments.",
    )
    shape = parser.add_argument_group("run shape")
    shape.add_argument(
        "--events",
        type=int,
        default=10_000,
        metavar="N",
        help="notifications in all: the total across the nodes, split evenly (default 10000)",
    )
    shape.add_argument(
        "--nodes", type=int, default=3, metavar="N", help="simulated nodes, one connection each (default 3)"
    )
    shape.add_argument("--outage-s", type=float, default=2.0, metavar="S", help="outage length, seconds (default 2)")
    shape.add_argument(
        "--outage-fraction",
        type=_fraction,
        default=0.3,
        metavar="F",
        help="share generated during the outage (default 0.3)",
    )
    shape.add_argument(
        "--before-fraction",
        type=_fraction,
        default=0.4,
        metavar="F",
        help="share sent live before the outage (default 0.4)",
    )
    shape.add_argument(
        "--duplicates",
        type=_fraction,
        default=0.0,
        metavar="F",
        help="share of backlog notifications sent twice (default 0)",
    )
    shape.add_argument("--shuffle", action="store_true", help="replay each backlog in a random order (default off)")
    shape.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seed of the generated notifications (default 0)"
    )
    daemon = parser.add_argument_group("daemon (run by replay-test unless --target)")
    daemon.add_argument(
        "--instances",
        type=int,
        default=1,
        metavar="N",
        help=f"daemons to run (1..{MAX_INSTANCES}), each with its own data and JSON Lines directories: every node "
        "holds one session per daemon and round-robins its notifications over them; the outage takes all the "
        "sessions down, the backlog is replayed over all of them; verified over the union of the sinks, with "
        "per-instance figures. Not with --target, --sink, --sink-dir, --restart-daemon, --restart-mode or "
        "--engine-mode sync (default 1)",
    )
    daemon.add_argument(
        "--restart-daemon",
        action="store_true",
        help="restart the daemon half-way through the replay on the same data directory (see --restart-mode; "
        "default off)",
    )
    daemon.add_argument(
        "--restart-mode",
        choices=[m.value for m in RestartMode],
        help="graceful (default): stop (drain, checkpoint) and start again; kill: run the daemon as a subprocess, "
        "SIGKILL it and start it again (implies --restart-daemon and the sync engine mode)",
    )
    daemon.add_argument(
        "--subprocess",
        action="store_true",
        help="run the daemon as `python -m fpolicyd serve` (127.0.0.1, port 0) instead of in-process (default off)",
    )
    daemon.add_argument(
        "--engine-mode",
        choices=[m.value for m in EngineMode],
        help="engine type the nodes play and the daemon is set to: async (default) or sync (SCREEN_RESP once "
        "durable; unanswered requests are sent again after a reconnect); default sync with --restart-mode kill",
    )
    daemon.add_argument(
        "--sync-window",
        type=int,
        default=500,
        metavar="N",
        help="sync engine: unanswered requests per node at most (ONTAP max-server-reqs; default 500)",
    )
    daemon.add_argument(
        "--daemon-setting",
        action="append",
        default=[],
        type=_setting,
        metavar="KEY=VALUE",
        help="a setting (as in fpolicyd.toml), e.g. jsonl_fsync=never; repeatable (default none)",
    )
    daemon.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="the daemon's data directory (default: a temporary one); with --instances N > 1, each "
        "daemon's is instance-0 … instance-<N-1> in it",
    )
    daemon.add_argument(
        "--target", type=_target, metavar="HOST:PORT", help="a running fpolicyd instead (default: none)"
    )
    daemon.add_argument(
        "--clock-tolerance-s",
        type=float,
        default=0.0,
        metavar="S",
        help="with --target: the daemon's replay_clock_tolerance_s, for the expected flags (default 0)",
    )
    sink = parser.add_argument_group("sink (default: the daemon's JSON Lines directory)")
    sink.add_argument(
        "--sink",
        metavar="sqs:QUEUE_URL|eventbridge:BUS",
        help="deliver there instead of JSON Lines and verify by draining the queue (AWS from the standard "
        "environment, e.g. AWS_ENDPOINT_URL); with --target: the sink that daemon delivers to (default none)",
    )
    sink.add_argument(
        "--verify-queue",
        metavar="QUEUE_URL",
        help="the SQS queue to drain: required with --sink eventbridge:BUS (the target of a rule on the bus); "
        "default the sqs: sink's own queue",
    )
    sink.add_argument(
        "--sink-dir",
        type=Path,
        metavar="DIR",
        help="JSON Lines directory to verify (required with --target; default the daemon's)",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--report", type=Path, metavar="FILE", help="write the full JSON report to this file (default: none)"
    )
    output.add_argument(
        "--json",
        action="store_true",
        help="the JSON report on stdout instead of the summary table, for scripts (default off)",
    )
    output.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.html",
        help="write a self-contained HTML plot (send and sink rates, totals, latency over time; phases shaded) "
        "and add the sampled series to the report as 'timeline' (default: none)",
    )
    output.add_argument(
        "--plot-interval-s",
        type=_positive,
        metavar="S",
        help=f"--plot sampling period, seconds (default {TIMELINE_INTERVAL_S:g}, finer early in the run down to "
        f"{TIMELINE_MIN_INTERVAL_S:g} so short runs get ~20 points; at most {MAX_TIMELINE_POINTS} points are kept, "
        "adjacent ones merged past that)",
    )
    output.add_argument(
        "--progress-s", type=float, default=5.0, metavar="S", help="progress line period on stderr, 0: none (default 5)"
    )
    bounds = parser.add_argument_group("time bounds")
    bounds.add_argument(
        "--settle-timeout-s",
        type=float,
        default=60.0,
        metavar="S",
        help="wait this long at the end for the sink, seconds (default 60)",
    )
    bounds.add_argument(
        "--timeout-s", type=float, default=1800.0, metavar="S", help="bound on the whole run, seconds (default 1800)"
    )
    return parser


def config_from_args(ns: argparse.Namespace) -> ReplayTestConfig:
    return ReplayTestConfig(
        events=ns.events,
        nodes=ns.nodes,
        seed=ns.seed,
        outage_fraction=ns.outage_fraction,
        before_fraction=ns.before_fraction,
        outage_s=ns.outage_s,
        duplicates=ns.duplicates,
        shuffle=ns.shuffle,
        restart_daemon=ns.restart_daemon or ns.restart_mode is not None,
        restart_mode=RestartMode(ns.restart_mode or RestartMode.GRACEFUL.value),
        subprocess=ns.subprocess,
        engine_mode=None if ns.engine_mode is None else EngineMode(ns.engine_mode),
        sync_window=ns.sync_window,
        sink=ns.sink,
        verify_queue=ns.verify_queue,
        instances=ns.instances,
        target=ns.target,
        sink_dir=ns.sink_dir,
        data_dir=ns.data_dir,
        clock_tolerance_s=ns.clock_tolerance_s,
        progress_s=ns.progress_s,
        settle_timeout_s=ns.settle_timeout_s,
        timeout_s=ns.timeout_s,
        daemon_settings=tuple(ns.daemon_setting),
        timeline=ns.plot is not None,
        timeline_interval_s=ns.plot_interval_s,
    )


def run_replay_test_command(ns: argparse.Namespace) -> int:
    """Raises ConfigError on bad arguments (exit 2 from the CLI); 0 when nothing was lost, else 1."""
    if ns.plot_interval_s is not None and ns.plot is None:
        raise ConfigError("--plot-interval-s needs --plot FILE.html")
    config = config_from_args(ns)
    plot: IO[str] | None = None
    if ns.plot is not None:
        try:  # before the run: a path that cannot be written fails now, not after a long run
            plot = ns.plot.open("w", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--plot {ns.plot}: {exc}") from exc
    with plot if plot is not None else contextlib.nullcontext():
        # The in-process daemon's warnings on stderr, beside the progress.
        configure_logging("warning", "json", redactor=Redactor())
        try:
            report = uvloop.run(run_replay_test(config))
        except (ReplayTestError, OSError) as exc:
            sys.stderr.write(f"fpolicyd replay-test: {type(exc).__name__}: {exc}\n")
            if plot is not None:
                plot.close()
                ns.plot.unlink(missing_ok=True)  # nothing to plot: no empty file left behind
            return 1
        if plot is not None:
            plot.write(plot_html(report))  # also (above all) when something was lost
        text = orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n"
        if ns.report is not None:
            try:
                ns.report.write_text(text)
            except OSError as exc:
                raise ConfigError(f"--report {ns.report}: {exc}") from exc
    sys.stdout.write(text if ns.json else summary_text(report))
    if report["lost"]:
        pending = report.get("undelivered_in_spool", 0)
        note = f" ({pending} still in the daemon's spool at the end)" if pending else ""
        sys.stderr.write(f"fpolicyd replay-test: {report['lost']} of {report['generated']} notifications lost{note}\n")
        return 1
    return 0
