"""benchmarks/profile_stages.py's load: unpaced by default, paced with ``--offered`` (the load generator's own
report says which). The py-spy part is read by eye and not run here (it needs ptrace rights on the daemon)."""

from __future__ import annotations

from pathlib import Path

import pytest

import profile_stages
from daemon_process import Daemon

pytestmark = pytest.mark.slow

EVENTS = 40


@pytest.mark.parametrize(("offered", "mode"), [(0.0, "async unpaced"), (2000.0, "async paced 2000/s")])
def test_load_sends_every_event_paced_as_offered(tmp_path: Path, offered: float, mode: str) -> None:
    daemon = Daemon(tmp_path)
    try:
        report = profile_stages.load(daemon.port, EVENTS, 2, offered)
    finally:
        daemon.stop()
    assert report["mode"] == mode
    assert report["sent"] == EVENTS
    assert report["completed"] is True
