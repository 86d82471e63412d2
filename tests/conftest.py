"""Every async test runs on uvloop, the loop the daemon runs on in production (``both_loops``: and on the standard
loop, the daemon's fallback)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import structlog
import uvloop

if TYPE_CHECKING:
    from fpolicyd.app import Daemon
    from support.moto_server import MotoEndpoint


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.get_closest_marker("both_loops") is not None:
        # Behaviour that differs between the loops' implementations (TLS handshakes): run on both.
        return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoEndpoint]:
    """One moto server per test module (each test names its own queues, buses and tables), on 127.0.0.1."""
    from support.moto_server import moto_server  # imported here: only the AWS tests pay for moto

    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """Every test starts with the logging configuration the one before it started with. A command run in process
    (``fpolicyd ontap``, ``replay-test``) configures structlog at its own level; ``capture_logs`` swaps only the
    processors, so a WARNING filter left behind hid the info lines that a later test on the same worker looked for
    (whether it failed depended on xdist's scheduling)."""
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**config)
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
async def daemon(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Daemon]:
    """An in-process daemon on loopback (support.daemon.make_settings over ``tmp_path``), with the overrides of the
    test's ``@pytest.mark.settings(**overrides)`` markers (a module's ``pytestmark`` first, then the test's)."""
    # Imported here: only the tests that start a daemon import the app.
    from support.daemon import make_settings, marked_settings, running_daemon

    async with running_daemon(make_settings(tmp_path, **marked_settings(request))) as started:
        yield started
