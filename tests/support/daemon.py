"""The in-process daemon of the integration tests: its settings (loopback, a temporary data dir) and the daemon
started and stopped around a block. The ``daemon`` fixture (tests/conftest.py) is built on these."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import pytest

from fpolicyd.app import Daemon
from fpolicyd.config import Settings, load_settings

#: The daemon as deployed where a test reads what it reports (metrics, health): exact dedup and the delivery
#: process as ``auto`` picks it (make_settings turns both off), and a short drain so that stop() is quick.
AS_DEPLOYED: Final[dict[str, Any]] = {"dedup_mode": "exact", "delivery_process": "auto", "drain_timeout_s": 2.0}


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "listen_host": "127.0.0.1",
        "listen_port": 0,
        "data_dir": str(tmp_path),
        "jsonl_fsync": "never",
        "http_port": 0,
        # These tests send one capture many times over: identical notifications, which exact dedup would fold.
        "dedup_mode": "off",
        # In-process tests read the sink workers' state directly; the delivery process (the default on two CPUs)
        # is exercised through `fpolicyd serve` (tests/support/serve.py) and tests/integration/test_delivery.py.
        "delivery_process": "off",
    }
    base.update(overrides)
    return load_settings(overrides=base, search_default_paths=False)


def marked_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The overrides of every ``@pytest.mark.settings(**overrides)`` on the test, the nearest winning (a test's
    marker over its module's ``pytestmark``)."""
    merged: dict[str, Any] = {}
    for marker in reversed(list(request.node.iter_markers("settings"))):
        merged.update(marker.kwargs)
    return merged


@asynccontextmanager
async def running_daemon(settings: Settings, *, wall_clock: Callable[[], float] | None = None) -> AsyncIterator[Daemon]:
    """A started daemon, stopped when the block ends (``wall_clock``: the daemon's, if a test steps it)."""
    daemon = Daemon(settings) if wall_clock is None else Daemon(settings, wall_clock=wall_clock)
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()
