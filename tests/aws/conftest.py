"""Fixtures of the AWS tests: one moto server per test module, started by the tests themselves on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from support.moto_server import MotoEndpoint, moto_server


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoEndpoint]:
    """One moto server for the module (each test names its own queues, buses and tables)."""
    with moto_server() as endpoint:
        yield endpoint
