"""``fpolicyd simulate`` with two ``fpolicyd serve`` daemons as ONTAP's two primary servers (issue 12): one is
SIGKILLed mid-run in sync mode, the simulator sends what it left unanswered to the other, and once the killed
daemon has been restarted on its data directory (its spool recovers what it answered), the two JSON Lines sinks
together hold every notification."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from fpolicyd.simulator.client import SimulatorConfig, run
from support.serve import expected_event_ids, read_events, start_serve, stop

pytestmark = pytest.mark.slow


async def test_sync_a_primary_sigkilled_mid_run_the_two_sinks_hold_every_event(tmp_path: Path) -> None:
    dirs = [tmp_path / "a", tmp_path / "b"]
    for path in dirs:
        path.mkdir()
    (killed, killed_log), (survivor, survivor_log) = [await start_serve(path, "--engine-mode", "sync") for path in dirs]
    try:
        config = SimulatorConfig(
            targets=(f"127.0.0.1:{killed.port}", f"127.0.0.1:{survivor.port}"),
            nodes=2,
            events=1000,
            seed=12,
            sync=True,
            max_outstanding=50,
            rate=2500.0,
            keep_alive_interval_s=0,
            duration_limit_s=30.0,
        )
        simulation = asyncio.create_task(run(config))
        await asyncio.sleep(0.15)  # about a third of the run
        assert not simulation.done()
        killed.process.send_signal(signal.SIGKILL)
        await killed.process.wait()
        await killed_log
        report = await simulation
    finally:
        if killed.process.returncode is None:
            killed.process.kill()
            await killed.process.wait()
        if survivor.process.returncode is None:
            assert await stop(survivor) == 0
        await survivor_log
    assert report.completed
    assert report.responses == report.sent == 2000
    dead, alive = report.targets
    assert dead.sent > 0
    assert dead.resent_after_failover > 0
    assert alive.answered == alive.sent == 2000 - dead.sent + dead.resent_after_failover
    # The killed daemon, restarted on its data directory, delivers what its spool holds.
    again, again_log = await start_serve(dirs[0])
    assert await stop(again) == 0
    await again_log
    delivered = {event["event_id"] for path in dirs for event in read_events(path)}
    expected = expected_event_ids(config)
    assert delivered <= expected
    missing = expected - delivered
    assert not missing, f"{len(missing)} of {len(expected)} events in neither sink"
