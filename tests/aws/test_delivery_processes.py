"""``delivery_processes = 2`` through `fpolicyd serve` and the local SQS endpoint (benchmarks/aws_endpoint.py, in
its own process): an SQS sink shared by two delivery processes gets every event once, the ordered JSON Lines sink
runs in the first alone, the acks of both come back into one cursor, and killing either process loses nothing —
including when the next start runs a different number of them."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from aws_endpoint import EndpointProcess, endpoint_process
from fpolicyd.replaytest.daemons import loopback_serve_argv
from fpolicyd.simulator.client import SimulatorConfig, run
from support.moto_server import isolate_aws_env
from support.serve import Served, read_events, start_serve, stop


async def finish(daemon: Served, reader: asyncio.Task[None]) -> None:
    """After the test's body: stop collecting its log, and kill the daemon if a failed assertion left it running
    (an orphan would hold the test's event loop at its close)."""
    reader.cancel()
    if daemon.process.returncode is None:
        daemon.process.kill()
        await daemon.process.wait()


pytestmark = pytest.mark.slow

EVENTS_PER_NODE = 1500
QUEUE = "fpolicy-shared"


def started(daemon: Served) -> list[dict[str, Any]]:
    return [r for r in daemon.log_lines if r.get("event") == "delivery_process_started"]


async def send(daemon: Served, seed: int) -> set[str]:
    """Two simulated ONTAP nodes send EVENTS_PER_NODE distinct notifications each; their event ids."""
    config = SimulatorConfig(port=daemon.port, nodes=2, events=EVENTS_PER_NODE, seed=seed, keep_alive_interval_s=0)
    report = await run(config)
    assert report.completed, report
    ids = {event["event_id"] for event in read_events(daemon.data_dir, live=True)}
    deadline = time.monotonic() + 30
    while len(ids) < report.sent and time.monotonic() < deadline:  # the JSON Lines sink, still writing
        await asyncio.sleep(0.05)
        ids = {event["event_id"] for event in read_events(daemon.data_dir, live=True)}
    assert len(ids) == report.sent
    return ids


def received(endpoint: EndpointProcess, record: Path) -> list[str]:
    """Event ids of every message the endpoint acknowledged, in arrival order (repeats included)."""
    endpoint.stats()  # flushes the record
    return [orjson.loads(line)["event_id"] for line in record.read_bytes().splitlines()]


async def until_received(endpoint: EndpointProcess, record: Path, ids: set[str], within_s: float = 60) -> list[str]:
    deadline = time.monotonic() + within_s
    while True:
        got = received(endpoint, record)
        if set(got) >= ids or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.1)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_aws_env(monkeypatch, tmp_path)


async def test_two_processes_share_an_sqs_sink_and_deliver_every_event_once(tmp_path: Path, aws_env: None) -> None:
    record = tmp_path / "record.jsonl"
    with endpoint_process(queues=(QUEUE,), record=record) as endpoint:
        sinks = f"sqs:{endpoint.queues[QUEUE]},jsonl:{tmp_path / 'events'}"
        flags = ("--delivery-process", "on", "--delivery-processes", "2", "--sinks", sinks)
        daemon, reader = await start_serve(tmp_path, *flags, environment={"AWS_ENDPOINT_URL": endpoint.url})
        try:
            processes = started(daemon)
            assert sorted(p["index"] for p in processes) == [0, 1]
            assert len({p["pid"] for p in processes}) == 2
            by_index = {p["index"]: p["sinks"] for p in processes}
            assert by_index[1] == [f"sqs:{endpoint.queues[QUEUE]}"]  # JSON Lines keeps its order in process 0
            assert len(by_index[0]) == 2
            ids = await send(daemon, seed=41)
            got = await until_received(endpoint, record, ids)
            assert await stop(daemon) == 0
        finally:
            await finish(daemon, reader)
        # Every event once: the blocks of the two processes neither overlap nor leave a gap.
        assert sorted(got) == sorted(ids)
        stats = next(r for r in daemon.log_lines if r.get("event") == "sink_stats")["sinks"]
        assert stats[f"sqs:{endpoint.queues[QUEUE]}"]["delivered"] == len(ids)  # the two processes' figures, added
        assert all(sink["lag"] == 0 for sink in stats.values())
        # Both processes' acks reached the one cursor and were persisted: the next start has nothing to send.
        again, reader = await start_serve(tmp_path, *flags, environment={"AWS_ENDPOINT_URL": endpoint.url})
        try:
            opened = next(r for r in again.log_lines if r.get("event") == "spool_opened")
            assert set(opened["pending"].values()) == {0}
            assert await stop(again) == 0
        finally:
            await finish(again, reader)
        assert sorted(received(endpoint, record)) == sorted(ids)


@pytest.mark.parametrize("next_processes", [1, 3])
async def test_a_killed_delivery_process_stops_the_daemon_and_the_next_start_delivers_the_rest(
    tmp_path: Path, aws_env: None, next_processes: int
) -> None:
    """The second process is killed while the sink is behind (every request answered 30 ms late); the daemon
    stops with exit 1; the next start — with another number of processes, so other blocks go to other processes
    — delivers every event at least once."""
    record = tmp_path / "record.jsonl"
    with endpoint_process(queues=(QUEUE,), record=record, latency_s=0.03) as endpoint:
        env = {"AWS_ENDPOINT_URL": endpoint.url}
        sqs = f"sqs:{endpoint.queues[QUEUE]}"
        flags = (
            "--delivery-process",
            "on",
            "--sinks",
            f"{sqs},jsonl:{tmp_path / 'events'}",
            "--sink-max-in-flight",
            "2",
        )
        daemon, reader = await start_serve(tmp_path, *flags, "--delivery-processes", "2", environment=env)
        try:
            victim = next(p["pid"] for p in started(daemon) if p["index"] == 1)
            ids = await send(daemon, seed=42)
            before = set(received(endpoint, record))
            assert len(before) < len(ids), "the sink was not behind: the kill proves nothing"
            os.kill(victim, signal.SIGKILL)
            assert await asyncio.wait_for(daemon.process.wait(), 30) == 1
        finally:
            await finish(daemon, reader)
        assert any(r.get("event") == "delivery_process_exited" for r in daemon.log_lines)
        again, reader = await start_serve(
            tmp_path, *flags, "--delivery-processes", str(next_processes), environment=env
        )
        try:
            got = await until_received(endpoint, record, ids)
            assert await stop(again) == 0
        finally:
            await finish(again, reader)
        assert set(got) == ids  # at least once, nothing else


async def test_sigterm_to_every_process_drains_the_shared_sink_within_the_budget(tmp_path: Path, aws_env: None) -> None:
    """systemd (KillMode=control-group) signals every process of the service: both delivery processes ignore it
    and deliver their blocks until the daemon, draining within its budget, tells them to stop."""
    record = tmp_path / "record.jsonl"
    with endpoint_process(queues=(QUEUE,), record=record, latency_s=0.02) as endpoint:
        sinks = f"sqs:{endpoint.queues[QUEUE]},jsonl:{tmp_path / 'events'}"
        flags = ("--delivery-process", "on", "--delivery-processes", "2", "--sinks", sinks, "--sink-max-in-flight", "2")
        daemon, reader = await start_serve(tmp_path, *flags, environment={"AWS_ENDPOINT_URL": endpoint.url})
        try:
            pids = [p["pid"] for p in started(daemon)]
            ids = await send(daemon, seed=43)
            assert len(set(received(endpoint, record))) < len(ids), "nothing left to drain: the test proves nothing"
            for pid in pids:
                os.kill(pid, signal.SIGTERM)
            daemon.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(daemon.process.wait(), 60) == 0
        finally:
            await finish(daemon, reader)
        drained = next(r for r in daemon.log_lines if r.get("event") == "sink_drain_finished")
        assert drained["undelivered"] == 0
        assert sorted(received(endpoint, record)) == sorted(ids)  # every event once, from both processes


async def test_a_sink_that_cannot_start_in_any_process_fails_the_start_with_exit_2(
    tmp_path: Path, aws_env: None
) -> None:
    with endpoint_process(queues=(QUEUE,)) as endpoint:
        missing = endpoint.queues[QUEUE].rsplit("/", 1)[0] + "/no-such-queue"
        argv = ("--delivery-process", "on", "--delivery-processes", "2", "--sinks", f"sqs:{missing}")
        process = await asyncio.create_subprocess_exec(
            *loopback_serve_argv(tmp_path / "data", *argv),
            env={**os.environ, "AWS_ENDPOINT_URL": endpoint.url},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2, err.decode()[-2000:]
    assert "no-such-queue" in err.decode()
