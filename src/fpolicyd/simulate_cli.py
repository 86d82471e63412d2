"""``fpolicyd simulate``: flags generated from :class:`SimulatorConfig`, report printed as JSON."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import typing
from pathlib import Path
from typing import Any

import orjson
import uvloop

from fpolicyd.simulator import SimulationReport, SimulatorConfig, SimulatorError, run

_CONFIG_HINTS = typing.get_type_hints(SimulatorConfig)


def _convert(name: str, raw: str) -> Any:
    hint = _CONFIG_HINTS[name]
    if hint is int:
        return int(raw)
    if hint is float:
        return float(raw)
    if hint == tuple[str, ...]:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if hint == Path | None:
        return Path(raw)
    return raw


def add_simulate_parser(sub: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        "simulate",
        help="run simulated ONTAP nodes against an FPolicy server",
        description="Simulated ONTAP nodes: NEGO, KEEP_ALIVE and a seeded SCREEN_REQ stream (SMB and NFS, all 27 "
        "ReqTypes), byte-exact with ONTAP's framing. Prints a JSON report; exits 1 on a peer error or an "
        "incomplete run.",
    )
    for field in dataclasses.fields(SimulatorConfig):
        flag = "--" + field.name.replace("_", "-")
        if _CONFIG_HINTS[field.name] is bool:
            parser.add_argument(flag, dest=f"sim_{field.name}", action="store_true", default=None)
        else:
            parser.add_argument(flag, dest=f"sim_{field.name}", metavar="VALUE", default=None)
    parser.add_argument(
        "--now", action="store_true", help="use the current time as base GenerationTime (default: a fixed one)"
    )
    return parser


def config_from_args(ns: argparse.Namespace) -> SimulatorConfig:
    values: dict[str, Any] = {}
    for field in dataclasses.fields(SimulatorConfig):
        raw = getattr(ns, f"sim_{field.name}")
        if raw is None:
            continue
        values[field.name] = raw if isinstance(raw, bool) else _convert(field.name, raw)
    if ns.now:
        values["base_time_us"] = time.time_ns() // 1000
    return SimulatorConfig(**values)


def run_simulate(ns: argparse.Namespace) -> int:
    try:
        config = config_from_args(ns)
    except ValueError as exc:
        sys.stderr.write(f"fpolicyd simulate: {exc}\n")
        return 2
    try:
        report: SimulationReport = uvloop.run(run(config))
    except (SimulatorError, OSError, TimeoutError) as exc:
        sys.stderr.write(f"fpolicyd simulate: {type(exc).__name__}: {exc}\n")
        return 1
    sys.stdout.write(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0 if report.completed else 1
