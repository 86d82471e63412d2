"""Logging set-up: lines go to the stderr of the moment, never to a stream that was replaced and closed."""

from __future__ import annotations

import io
import sys

import pytest

from fpolicyd.obs.log import configure_logging, get_logger


def test_a_closed_former_stderr_does_not_break_later_log_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    former = io.StringIO()
    monkeypatch.setattr(sys, "stderr", former)
    configure_logging()  # configured while stderr is `former` (as a CLI command run in-process would be)
    current = io.StringIO()
    monkeypatch.setattr(sys, "stderr", current)
    former.close()  # what a test runner does with its capture stream
    get_logger("fpolicyd.test").info("still_logging", n=1)
    assert '"event": "still_logging"' in current.getvalue()
