"""structlog set-up: one logger for the whole daemon, JSON lines on stderr, or console lines when asked for (or,
with ``auto``, when stderr is a terminal: a person reads it, as in structlog's own development set-up)."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Protocol, TextIO, cast

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class LogRedactor(Protocol):
    """A structlog processor that masks what a log line may not show (paths, user identities) per the data
    classification: ``fpolicyd.pipeline.redaction.Redactor``, passed in by whoever configures logging."""

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any], /
    ) -> MutableMapping[str, Any]: ...


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is when a line is written, not to the object it was when logging was
    configured: a replaced and closed stderr (a test runner's capture, an embedding program) must not break
    every later log line with "I/O operation on closed file"."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):  # a closed stream
        return False


def choose_renderer(fmt: str, terminal: bool) -> structlog.typing.Processor:
    """``json``: one JSON object a line; ``console``: key=value lines, no colour codes; ``auto``: console with
    colours on a terminal, JSON anywhere else (a pipe, a file, journald, a container's log driver)."""
    if fmt == "json" or (fmt == "auto" and not terminal):
        return structlog.processors.JSONRenderer()
    if fmt in {"console", "auto"}:
        return structlog.dev.ConsoleRenderer(colors=fmt == "auto", exception_formatter=structlog.dev.plain_traceback)
    raise ValueError(f"log format must be auto, json or console, got {fmt!r}")


def configure_logging(level: str = "info", fmt: str = "json", stream: Any = None, *, redactor: LogRedactor) -> None:
    """Configure structlog once per process; safe to call again (tests, ``config check``). ``redactor`` masks
    paths and user identities per the data classification (there is no default: a caller that forgot it would
    log them in clear). ``fmt="auto"`` looks at the stream (``sys.stderr`` unless given) once, now."""
    renderer = choose_renderer(fmt, _is_terminal(stream if stream is not None else sys.stderr))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redactor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # One write per line (message and newline together): print() writes them apart, and on Python's stderr
        # each is its own write(2), so a line of the delivery process, which shares the daemon's stderr, could
        # land between another line and its newline (two log lines glued into one, seen in the test suite).
        logger_factory=structlog.WriteLoggerFactory(file=stream or cast(TextIO, _CurrentStderr())),
        cache_logger_on_first_use=False,
    )
    _route_standard_logging(renderer, stream, redactor)


class _StructlogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the one handler fpolicyd puts on the root logger (replaced, not stacked, on a second configure)."""


def _route_standard_logging(renderer: structlog.typing.Processor, stream: Any, redactor: LogRedactor) -> None:
    """What libraries log through the standard ``logging`` module — asyncio's "Task exception was never
    retrieved" and "Fatal error on transport", botocore — comes out as the same JSON lines, with the logger's
    name, instead of Python's bare last-resort text on stderr (which a log pipeline that expects JSON cannot
    parse). Warnings and above; a handler someone else put on the root logger (a test runner's) stays."""
    handler = _StructlogHandler(stream or _CurrentStderr())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                redactor,
                renderer,
            ],
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.format_exc_info,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StructlogHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger
