"""``fpolicyd simulate``: flags generated from :class:`SimulatorConfig`, report printed as JSON.

GenerationTime is this host's clock when each request is sent (what a node does), so a simulated run against a
fresh daemon is neither flagged ``replayed`` nor counted against the ingestion-latency SLO. ``--fixed-time`` or
``--base-time-us`` give the reproducible stream of :func:`~fpolicyd.simulator.client.expected_requests` instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, Final

import orjson
import uvloop

from fpolicyd.simulator.client import SimulationReport, SimulatorConfig, SimulatorConfigError, SimulatorError, run

_CONFIG_HINTS = typing.get_type_hints(SimulatorConfig)
_FIELDS = {f.name: f for f in dataclasses.fields(SimulatorConfig)}

#: The help's groups, in order; every field of SimulatorConfig but ``wall_clock`` (the time flags) is in one.
GROUPS: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    ("server", ("host", "port", "targets", "secondary_targets")),
    ("load", ("nodes", "events", "rate", "seed", "chunk_events")),
    (
        "ONTAP behaviour",
        (
            "sync",
            "max_outstanding",
            "status_interval_s",
            "keep_alive_interval_s",
            "duplicate_every",
            "versions",
            "policy_name",
            "vs_uuid",
            "notf_type",
        ),
    ),
    ("run", ("connect_timeout_s", "handshake_timeout_s", "duration_limit_s", "manifest")),
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _metavar(name: str) -> str:
    hint = _CONFIG_HINTS[name]
    if name.endswith("targets"):
        return "HOST:PORT,..."
    if name.endswith("_s"):
        return "SECONDS"
    if hint is int:
        return "N"
    if hint is float:
        return "X"
    if hint == tuple[str, ...]:
        return "A,B"
    if hint == Path | None:
        return "FILE"
    return "TEXT"


def _default_text(name: str) -> str:
    default = _FIELDS[name].default
    if default is None:
        return "none"
    if isinstance(default, tuple):
        return ",".join(default) or "none"
    return str(default)


def _convert(name: str, raw: str) -> Any:
    """The flag's text as the field's type; a text that is not one is passed through unchanged, so that
    SimulatorConfig's own check rejects it with the rule the value breaks."""
    hint = _CONFIG_HINTS[name]
    try:
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
    except ValueError:
        return raw
    if hint == tuple[str, ...]:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if hint == Path | None:
        return Path(raw)
    return raw


def _add_clock_flags(parser: argparse.ArgumentParser) -> None:
    clock = parser.add_argument_group(
        "GenerationTime (default: this host's clock when each request is sent, as a node does)"
    )
    clock.add_argument(
        "--fixed-time",
        action="store_true",
        help=f"a reproducible stream from the fixed base {_default_text('base_time_us')} (2023-11-14): every event "
        "is older than the session, so a daemon flags it replayed",
    )
    clock.add_argument(
        "--base-time-us",
        dest="sim_base_time_us",
        metavar="N",
        default=None,
        help="a reproducible stream from this base (epoch microseconds); implies --fixed-time",
    )
    # Before the clock became the default, --now asked for it; still accepted, and changes nothing.
    clock.add_argument("--now", action="store_true", help=argparse.SUPPRESS)


def add_simulate_parser(sub: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        "simulate",
        help="run simulated ONTAP nodes against an FPolicy server",
        usage="fpolicyd simulate [--port N] [--nodes N] [--events N] [--rate X] [options]",
        description="Simulated ONTAP nodes: NEGO, KEEP_ALIVE and a seeded SCREEN_REQ stream (SMB and NFS, all 27 "
        "ReqTypes), byte-exact with ONTAP's framing. Sends nodes x events requests; prints a JSON report; exits 1 "
        "on a peer error or an incomplete run, 2 on a bad flag.",
    )
    for title, names in GROUPS:
        group = parser.add_argument_group(title)
        for name in names:
            help_text = str(_FIELDS[name].metadata["help"]).replace("%", "%%")
            if _CONFIG_HINTS[name] is bool:
                group.add_argument(_flag(name), dest=f"sim_{name}", action="store_true", default=None, help=help_text)
            else:
                group.add_argument(
                    _flag(name),
                    dest=f"sim_{name}",
                    metavar=_metavar(name),
                    default=None,
                    help=f"{help_text} (default: {_default_text(name).replace('%', '%%')})",
                )
        if title == "load":
            _add_clock_flags(parser)
    return parser


def config_from_args(ns: argparse.Namespace) -> SimulatorConfig:
    """The config the flags describe; :class:`SimulatorConfigError` names the field a value breaks."""
    values: dict[str, Any] = {}
    for name in _FIELDS:
        raw = getattr(ns, f"sim_{name}", None)
        if raw is None:
            continue
        values[name] = raw if isinstance(raw, bool) else _convert(name, raw)
    values["wall_clock"] = not (ns.fixed_time or "base_time_us" in values)
    return SimulatorConfig(**values)


def flag_error(exc: SimulatorConfigError, ns: argparse.Namespace) -> str:
    """``--events: must be an integer >= 0, got 'abc'``: the flag and the text as typed."""
    raw = getattr(ns, f"sim_{exc.name}", None)
    return f"{_flag(exc.name)}: {exc.why}, got {raw if raw is not None else exc.value!r}"


def run_simulate(ns: argparse.Namespace) -> int:
    try:
        config = config_from_args(ns)
    except SimulatorConfigError as exc:
        sys.stderr.write(f"fpolicyd simulate: {flag_error(exc, ns)}\n")
        return 2
    try:
        report: SimulationReport = uvloop.run(run(config))
    except (SimulatorError, OSError, TimeoutError) as exc:
        sys.stderr.write(f"fpolicyd simulate: {type(exc).__name__}: {exc}\n")
        return 1
    sys.stdout.write(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0 if report.completed else 1
