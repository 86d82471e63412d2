"""Logging set-up: lines go to the stderr of the moment, never to a stream that was replaced and closed."""

from __future__ import annotations

import io
import logging
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import structlog

from fpolicyd.config import LogFormat, Settings
from fpolicyd.obs.log import choose_renderer, configure_logging, get_logger
from fpolicyd.pipeline.redaction import Redactor


def test_a_closed_former_stderr_does_not_break_later_log_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    former = io.StringIO()
    monkeypatch.setattr(sys, "stderr", former)
    # configured while stderr is `former` (as a CLI command run in-process would be)
    configure_logging(redactor=Redactor())
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
    configure_logging(redactor=Redactor())
    # a second configure replaces fpolicyd's handler, it does not stack a second one
    configure_logging(redactor=Redactor())
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


# ------------------------------------------------------------------------------- auto: console on a terminal


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_console_on_a_terminal_and_json_elsewhere() -> None:
    terminal, pipe = _Terminal(), io.StringIO()
    configure_logging("info", "auto", stream=terminal, redactor=Redactor())
    get_logger("fpolicyd.test").info("listening", port=9898)
    configure_logging("info", "auto", stream=pipe, redactor=Redactor())
    get_logger("fpolicyd.test").info("listening", port=9898)
    configure_logging(redactor=Redactor())
    [console] = terminal.getvalue().splitlines()
    assert "listening" in console
    assert "port" in console
    assert "\x1b[" in console  # colours, as structlog's own development set-up
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(console)
    [line] = pipe.getvalue().splitlines()
    assert orjson.loads(line)["port"] == 9898


def test_console_and_json_ignore_the_terminal() -> None:
    assert isinstance(choose_renderer("json", terminal=True), structlog.processors.JSONRenderer)
    assert isinstance(choose_renderer("console", terminal=False), structlog.dev.ConsoleRenderer)
    with pytest.raises(ValueError, match="auto, json or console"):
        choose_renderer("xml", terminal=False)


def test_the_daemon_defaults_to_auto() -> None:
    assert Settings.model_fields["log_format"].default is LogFormat.AUTO


def test_serve_logs_console_lines_on_a_real_terminal(tmp_path: Path) -> None:
    """`fpolicyd serve` with its stderr on a pseudo-terminal (as a person runs it) writes console lines; the
    serve tests, whose stderr is a pipe, read JSON lines from the same default."""
    primary, secondary = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FPOLICYD_")}
    flags = ["--listen-host", "127.0.0.1", "--listen-port", "0", "--http-port", "0", "--data-dir", str(tmp_path)]
    process = subprocess.Popen(
        [sys.executable, "-m", "fpolicyd", "serve", *flags],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=secondary,
    )
    os.close(secondary)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while b"listening" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 1.0)
            if ready:
                try:
                    seen += os.read(primary, 65536)
                except OSError:  # the daemon exited and closed the terminal
                    break
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        os.close(primary)
    first = seen.splitlines()[0]
    assert b"listening" in seen
    assert not first.lstrip().startswith(b"{")
    assert b"\x1b[" in first


class _RecordingStream:
    """A stream that keeps every write() call apart, as an unbuffered stderr turns each into its own write(2)."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        return None


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_every_log_line_is_one_write_with_its_newline(fmt: str) -> None:
    """The daemon and its delivery process share stderr, where Python writes each write() call at once: a line
    written in two calls (text, then newline) can get the other process's line in between, gluing two JSON lines
    into one. Each line must reach the stream whole, newline included, in one call."""
    stream = _RecordingStream()
    configure_logging("info", fmt, stream, redactor=Redactor())
    log = get_logger("fpolicyd.test")
    log.info("first_line", n=1)
    log.warning("second_line", n=2)
    assert len(stream.writes) == 2
    assert all(text.endswith("\n") and text.count("\n") == 1 for text in stream.writes)
