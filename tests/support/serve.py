"""Running `fpolicyd serve` as a real subprocess (real CLI, real signals) for end-to-end tests."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from fpolicyd.events import NameMaps, normalize
from fpolicyd.protocol.context import SessionContext
from fpolicyd.replaytest.daemons import loopback_serve_argv
from fpolicyd.simulator.client import SimulatorConfig, expected_requests
from fpolicyd.simulator.peer import handshake

VOLUME_NAMES = {2147830405: "vol_finance"}


@dataclass
class Served:
    process: asyncio.subprocess.Process
    port: int
    data_dir: Path
    log_lines: list[dict[str, Any]]


async def _read_log(stream: asyncio.StreamReader, into: list[dict[str, Any]], ready: asyncio.Future[int]) -> None:
    while line := await stream.readline():
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            # Everything fpolicyd writes is a JSON log line: anything else (a traceback) is a finding, shown whole.
            rest = await stream.read()
            raise AssertionError(
                f"not a JSON log line on fpolicyd's stderr: {(line + rest).decode(errors='replace')}"
            ) from None
        into.append(record)
        if record.get("event") == "listening" and not ready.done():
            ready.set_result(int(record["port"]))


async def start_serve(
    tmp_path: Path, *flags: str, environment: Mapping[str, str] | None = None
) -> tuple[Served, asyncio.Task[None]]:
    """Start the daemon on 127.0.0.1 (kernel-chosen port, read from its "listening" log line) with its data
    under ``tmp_path``; returns it and the task that collects its JSON log lines. ``environment``: extra
    variables for the daemon (the caller's FPOLICYD_* are never passed on)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FPOLICYD_")}
    env["FPOLICYD_VOLUME_NAMES"] = orjson.dumps({str(k): v for k, v in VOLUME_NAMES.items()}).decode()
    env.update(environment or {})
    process = await asyncio.create_subprocess_exec(
        *loopback_serve_argv(tmp_path, "--svm-name", "svm_e2e", "--jsonl-fsync", "never", *flags),
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    log_lines: list[dict[str, Any]] = []
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    reader = asyncio.create_task(_read_log(process.stderr, log_lines, ready))
    port = await asyncio.wait_for(ready, 20)
    return Served(process, port, tmp_path, log_lines), reader


async def stop(daemon: Served) -> int:
    daemon.process.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(daemon.process.wait(), 30)


def read_events(data_dir: Path, *, live: bool = False) -> list[dict[str, Any]]:
    """Every event in the JSON Lines files. A file must end with a whole line — unless ``live``: while a daemon
    still writes, a read can land in the middle of a write, and the incomplete last line is left for a later read."""
    out: list[dict[str, Any]] = []
    for path in sorted((data_dir / "events").glob("fpolicy_events_*.jsonl")):
        data = path.read_bytes()
        if live:
            data = data[: data.rfind(b"\n") + 1]
        assert not data or data.endswith(b"\n"), f"{path} ends with a torn line"  # empty: opened, nothing sent
        out.extend(orjson.loads(line) for line in data.splitlines())
    return out


def expected_event_ids(config: SimulatorConfig) -> set[str]:
    """The event_id of every notification a (reproducible) ``fpolicyd simulate`` run sends, as the daemon of
    :func:`start_serve` computes it (a re-sent copy has its original's id: the id does not depend on the ReqId or
    the session while the notification carries its GenerationTime)."""
    names = NameMaps(volumes=VOLUME_NAMES, svms={}, default_volume=None, default_svm="svm_e2e")
    ids = set()
    for node, request in expected_requests(config):
        hello = handshake(seed=config.seed, node=node, policy_name=config.policy_name, vs_uuid=config.vs_uuid)
        context = SessionContext(hello.vs_uuid, hello.policy_name, hello.session_id, "1.2", "ignored")
        ids.add(normalize(request, context, names, 0).event_id)
    return ids
