"""The delivery process through `fpolicyd serve`: the sinks run in a second process, acks come back to the
daemon, and no event is lost when either process is killed or the whole process group is signalled."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from fpolicyd.replaytest.daemons import loopback_serve_argv
from fpolicyd.simulator.client import SimulatorConfig, run
from support.serve import Served, read_events, start_serve, stop

pytestmark = pytest.mark.slow

EVENTS_PER_NODE = 1500


def child_pid(daemon: Served) -> int:
    for record in daemon.log_lines:
        if record.get("event") == "delivery_process_started":
            return int(record["pid"])
    raise AssertionError(f"no delivery process in the log: {daemon.log_lines[-5:]}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def wait_gone(pid: int, within: float = 15.0) -> None:
    for _ in range(int(within / 0.05)):
        if not alive(pid):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"process {pid} still runs after {within:g} s")


async def send(daemon: Served, seed: int, nodes: int = 2) -> int:
    """Simulated ONTAP nodes send EVENTS_PER_NODE distinct notifications each; how many were sent."""
    config = SimulatorConfig(port=daemon.port, nodes=nodes, events=EVENTS_PER_NODE, seed=seed, keep_alive_interval_s=0)
    report = await run(config)
    assert report.completed, report
    return report.sent


async def delivered(data_dir: Path, expected: int, within: float = 30.0) -> set[str]:
    """The distinct event ids in the JSON Lines files once ``expected`` of them are there (or time ran out). The
    delivery process is still writing: a line it is in the middle of writing is read next time."""
    deadline = time.monotonic() + within
    while True:
        ids = {event["event_id"] for event in read_events(data_dir, live=True)}
        if len(ids) >= expected or time.monotonic() > deadline:
            return ids
        await asyncio.sleep(0.05)


async def test_sinks_run_in_their_own_process_and_deliver_everything(tmp_path: Path) -> None:
    daemon, reader = await start_serve(tmp_path, "--delivery-process", "on")
    try:
        pid = child_pid(daemon)
        assert pid != daemon.process.pid
        sent = await send(daemon, seed=1)
        assert len(await delivered(tmp_path, sent)) == sent
        assert await stop(daemon) == 0
    finally:
        reader.cancel()
    await wait_gone(pid)
    stats: dict[str, Any] = next(r for r in daemon.log_lines if r.get("event") == "sink_stats")["sinks"]
    assert stats[f"jsonl:{tmp_path / 'events'}"]["delivered"] == sent
    assert all(sink["lag"] == 0 for sink in stats.values())
    # The acks came back to the daemon and were persisted: a restart has nothing left to send.
    again, reader = await start_serve(tmp_path, "--delivery-process", "on")
    try:
        opened = next(r for r in again.log_lines if r.get("event") == "spool_opened")
        assert set(opened["pending"].values()) == {0}
        assert await stop(again) == 0
    finally:
        reader.cancel()
    assert len(read_events(tmp_path)) == sent  # nothing delivered twice either


async def test_a_killed_delivery_process_stops_the_daemon_and_the_next_start_delivers_the_rest(tmp_path: Path) -> None:
    daemon, reader = await start_serve(tmp_path, "--delivery-process", "on", "--sinks", f"jsonl:{tmp_path / 'events'}")
    try:
        sent = await send(daemon, seed=2)
        os.kill(child_pid(daemon), signal.SIGKILL)
        # Like an in-process sink worker that dies: the daemon stops with exit 1, its events kept in the spool.
        assert await asyncio.wait_for(daemon.process.wait(), 30) == 1
    finally:
        reader.cancel()
    assert any(r.get("event") == "delivery_process_exited" for r in daemon.log_lines)
    again, reader = await start_serve(tmp_path, "--delivery-process", "on")
    try:
        assert len(await delivered(tmp_path, sent)) == sent
        assert await stop(again) == 0
    finally:
        reader.cancel()


async def test_a_killed_daemon_takes_its_delivery_process_with_it_and_loses_nothing_stored(tmp_path: Path) -> None:
    daemon, reader = await start_serve(tmp_path, "--delivery-process", "on", "--spool-fsync", "always")
    try:
        pid = child_pid(daemon)
        sent = await send(daemon, seed=3)
        daemon.process.kill()
        await daemon.process.wait()
    finally:
        reader.cancel()
    await wait_gone(pid)  # the channel closed: the delivery process does not outlive the daemon
    again, reader = await start_serve(tmp_path, "--delivery-process", "on")
    try:
        assert len(await delivered(tmp_path, sent)) == sent
        assert await stop(again) == 0
    finally:
        reader.cancel()


async def test_sigterm_to_the_whole_process_group_still_drains_every_event(tmp_path: Path) -> None:
    """systemd (KillMode=control-group) and a terminal's Ctrl-C signal every process of the service: the delivery
    process ignores it and delivers until the daemon, which drains within its budget, tells it to stop."""
    daemon, reader = await start_serve(tmp_path, "--delivery-process", "on")
    try:
        pid = child_pid(daemon)
        sent = await send(daemon, seed=4)
        os.kill(pid, signal.SIGTERM)
        daemon.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(daemon.process.wait(), 30) == 0
    finally:
        reader.cancel()
    await wait_gone(pid)
    events = read_events(tmp_path)
    assert len(events) == len({event["event_id"] for event in events}) == sent


async def test_a_sink_that_cannot_start_fails_the_start_with_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the sink's directory should be")
    process = await asyncio.create_subprocess_exec(
        *loopback_serve_argv(tmp_path / "data", "--delivery-process", "on", "--sinks", f"jsonl:{blocker / 'events'}"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2, err.decode()[-2000:]
    assert str(blocker) in err.decode()


async def test_exact_dedup_survives_sigkill_the_window_is_rebuilt_from_journal_and_spool(tmp_path: Path) -> None:
    """The defaults (exact dedup in the reader): a SIGKILL, then ONTAP replays the same notifications (as its
    persistent store does after a reconnect). Every one is a duplicate: kept for the audit ledger, not delivered."""
    daemon, reader = await start_serve(tmp_path, "--dedup-mode", "exact", "--spool-fsync", "always")
    try:
        sent = await send(daemon, seed=5)
        assert len(await delivered(tmp_path, sent)) == sent
    finally:
        # SIGKILL also when an assertion failed: a daemon left running would hold the test's loop open.
        with contextlib.suppress(ProcessLookupError):
            daemon.process.kill()
        await daemon.process.wait()
        reader.cancel()
    again, reader = await start_serve(tmp_path, "--dedup-mode", "exact")
    try:
        opened = next(r for r in again.log_lines if r.get("event") == "dedup_window_opened")
        assert opened["held"] == sent
        assert await send(again, seed=5) == sent
        ledger_dir = tmp_path / "ledger"
        for _ in range(600):  # up to 30 s
            lines = sum(p.read_bytes().count(b"\n") for p in ledger_dir.glob("*.jsonl"))
            if lines >= sent:
                break
            await asyncio.sleep(0.05)
        assert lines == sent
        assert await stop(again) == 0
    finally:
        reader.cancel()
    # No replayed notification became an event. (What the sink had not acknowledged when the kill came is
    # delivered again, as the very same lines — at least once — so lines may repeat; ids never change.)
    events = read_events(tmp_path)
    assert len({event["event_id"] for event in events}) == sent
    assert len({orjson.dumps(event) for event in events}) == sent


async def test_several_delivery_processes_on_one_cpu_are_said_to_be_ignored(tmp_path: Path) -> None:
    """``delivery_process = auto`` on one CPU runs the sinks in the daemon: a ``delivery_processes`` above 1 is
    then ignored, and the log says so rather than leaving an operator to wonder where the processes are."""
    process = await asyncio.create_subprocess_exec(
        *loopback_serve_argv(tmp_path, "--delivery-processes", "2"),
        preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    lines: list[dict[str, Any]] = []
    try:
        while not any(r.get("event") == "listening" for r in lines):
            line = await asyncio.wait_for(process.stderr.readline(), 30)
            assert line, f"the daemon exited: {lines[-5:]}"
            lines.append(orjson.loads(line))
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.communicate(), 30)
    ignored = [r for r in lines if r.get("event") == "delivery_processes_ignored"]
    assert [r["delivery_processes"] for r in ignored] == [2]
    assert not any(r.get("event") == "delivery_process_started" for r in lines)
