"""Every committed benchmark is run by `make bench-all` (the README's figures come from these scripts), and every
benchmark the Makefile names exists: a new script cannot be forgotten, a removed one cannot leave a dead target."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Support modules of the benchmarks (servers, load generators, process helpers) and tools that are not a figure
#: source: not run on their own by bench-all.
NOT_BENCHMARKS = {
    "aws_endpoint",  # the local SQS/EventBridge endpoint the SQS benchmarks start
    "bare_splitter",  # the ceiling server bench_ingest starts
    "daemon_process",  # `fpolicyd serve` as a subprocess, for the benchmarks
    "loadgen",  # the load generator
    "proctree",  # CPU and RSS of a process tree
    "fuzz_server",  # the long fuzz campaign: `make fuzz`
    "profile_stages",  # a py-spy profile read by eye (py-spy needs ptrace rights on the daemon)
}


def _bench_all() -> list[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    match = re.search(r"^BENCHMARKS := ((?:.*\\\n)*.*)$", text, re.MULTILINE)
    assert match is not None, "the Makefile has no BENCHMARKS list"
    return match.group(1).replace("\\\n", " ").split()


def test_bench_all_runs_every_benchmark() -> None:
    scripts = {path.stem for path in (ROOT / "benchmarks").glob("*.py")}
    listed = _bench_all()
    assert len(listed) == len(set(listed)), listed
    assert set(listed) <= scripts, set(listed) - scripts
    assert scripts - NOT_BENCHMARKS == set(listed), (scripts - NOT_BENCHMARKS) ^ set(listed)
    assert scripts >= NOT_BENCHMARKS, NOT_BENCHMARKS - scripts
