"""Logging set-up: lines go to the stderr of the moment, never to a stream that was replaced and closed."""

from __future__ import annotations

import io
import logging
import sys

import orjson
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


def test_what_libraries_log_through_logging_is_a_json_line_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio reports a task's unretrieved exception or a transport's fatal error through the standard logging
    module; without a handler Python printed it as bare text on stderr, which no JSON log pipeline can read (a
    `fpolicyd serve` test read such a line once)."""
    current = io.StringIO()
    monkeypatch.setattr(sys, "stderr", current)
    configure_logging()
    configure_logging()  # a second configure replaces fpolicyd's handler, it does not stack a second one
    try:
        raise ZeroDivisionError("planted")
    except ZeroDivisionError:
        logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=True)
    logging.getLogger("botocore").info("below warning: not written")
    [line] = current.getvalue().splitlines()
    record = orjson.loads(line)
    assert record["logger"] == "asyncio"
    assert record["level"] == "error"
    assert record["event"] == "Task exception was never retrieved"
    assert "ZeroDivisionError: planted" in record["exception"]
