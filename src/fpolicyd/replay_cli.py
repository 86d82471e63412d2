"""``fpolicyd replay-test``: flags → :class:`~fpolicyd.replay_test.ReplayTestConfig`; the report as a summary
table (or JSON with ``--json``) on stdout, the JSON in ``--report FILE``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson
import uvloop

from fpolicyd.errors import ConfigError
from fpolicyd.obs.log import configure_logging
from fpolicyd.pipeline.redaction import Redactor
from fpolicyd.protocol.session import EngineMode
from fpolicyd.replay_summary import summary_text
from fpolicyd.replay_test import ReplayTestConfig, ReplayTestError, RestartMode, run_replay_test


def _fraction(raw: str) -> float:
    value = float(raw)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{raw} is not a fraction in 0..1")
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
    parser.add_argument("--events", type=int, default=10_000, help="notifications in all (default 10000)")
    parser.add_argument("--nodes", type=int, default=3, help="simulated nodes, one connection each (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--outage-fraction", type=_fraction, default=0.3, help="share generated during the outage (default 0.3)"
    )
    parser.add_argument(
        "--before-fraction", type=_fraction, default=0.4, help="share sent live before the outage (default 0.4)"
    )
    parser.add_argument("--outage-s", type=float, default=2.0, help="outage length, seconds (default 2)")
    parser.add_argument(
        "--duplicates", type=_fraction, default=0.0, help="share of backlog notifications sent twice (default 0)"
    )
    parser.add_argument("--shuffle", action="store_true", help="replay each backlog in a random order")
    parser.add_argument(
        "--restart-daemon",
        action="store_true",
        help="restart the daemon half-way through the replay on the same data directory (see --restart-mode)",
    )
    parser.add_argument(
        "--restart-mode",
        choices=[m.value for m in RestartMode],
        help="graceful (default): stop (drain, checkpoint) and start again; kill: run the daemon as a subprocess, "
        "SIGKILL it and start it again (implies --restart-daemon and the sync engine mode)",
    )
    parser.add_argument(
        "--subprocess",
        action="store_true",
        help="run the daemon as `python -m fpolicyd serve` (127.0.0.1, port 0) instead of in-process",
    )
    parser.add_argument(
        "--engine-mode",
        choices=[m.value for m in EngineMode],
        help="engine type the nodes play and the daemon is set to: async (default) or sync (SCREEN_RESP once "
        "durable; unanswered requests are sent again after a reconnect); default sync with --restart-mode kill",
    )
    parser.add_argument(
        "--sync-window",
        type=int,
        default=500,
        help="sync engine: unanswered requests per node at most (ONTAP max-server-reqs; default 500)",
    )
    parser.add_argument(
        "--sink",
        metavar="sqs:QUEUE_URL|eventbridge:BUS",
        help="deliver there instead of JSON Lines and verify by draining the queue (AWS from the standard "
        "environment, e.g. AWS_ENDPOINT_URL); with --target: the sink that daemon delivers to",
    )
    parser.add_argument(
        "--verify-queue",
        metavar="QUEUE_URL",
        help="the SQS queue to drain: required with --sink eventbridge:BUS (the target of a rule on the bus)",
    )
    parser.add_argument("--target", type=_target, metavar="HOST:PORT", help="a running fpolicyd instead")
    parser.add_argument("--sink-dir", type=Path, help="JSON Lines directory to verify (required with --target)")
    parser.add_argument("--data-dir", type=Path, help="in-process daemon's data directory (default: temporary)")
    parser.add_argument(
        "--clock-tolerance-s",
        type=float,
        default=0.0,
        help="with --target: the daemon's replay_clock_tolerance_s, for the expected flags",
    )
    parser.add_argument(
        "--daemon-setting",
        action="append",
        default=[],
        type=_setting,
        metavar="KEY=VALUE",
        help="in-process daemon: a setting (as in fpolicyd.toml), e.g. jsonl_fsync=never; repeatable",
    )
    parser.add_argument("--report", type=Path, help="write the full JSON report to this file")
    parser.add_argument(
        "--json", action="store_true", help="the JSON report on stdout instead of the summary table (for scripts)"
    )
    parser.add_argument("--progress-s", type=float, default=5.0, help="progress line period on stderr (0: none)")
    parser.add_argument(
        "--settle-timeout-s", type=float, default=60.0, help="wait this long at the end for the sink (default 60)"
    )
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="bound on the whole run (default 1800)")
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
        target=ns.target,
        sink_dir=ns.sink_dir,
        data_dir=ns.data_dir,
        clock_tolerance_s=ns.clock_tolerance_s,
        progress_s=ns.progress_s,
        settle_timeout_s=ns.settle_timeout_s,
        timeout_s=ns.timeout_s,
        daemon_settings=tuple(ns.daemon_setting),
    )


def run_replay_test_command(ns: argparse.Namespace) -> int:
    """Raises ConfigError on bad arguments (exit 2 from the CLI); 0 when nothing was lost, else 1."""
    config = config_from_args(ns)
    configure_logging(
        "warning", "json", redactor=Redactor()
    )  # the in-process daemon's warnings on stderr, beside the progress
    try:
        report = uvloop.run(run_replay_test(config))
    except (ReplayTestError, OSError) as exc:
        sys.stderr.write(f"fpolicyd replay-test: {type(exc).__name__}: {exc}\n")
        return 1
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
