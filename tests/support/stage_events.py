"""Small, valid events for tests of the processing stage (routing, settle, dedup)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from fpolicyd.events import FileEvent


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


#: Epoch second that the ``received_at`` offsets of :func:`make_event` count from.
BASE = 1_700_000_000.0


def make_event(n: int, path: str, operation: str, received_at: float, previous_path: str | None = None) -> FileEvent:
    """Event number ``n`` (its id is derived from ``n``) on ``path``, received ``received_at`` s after BASE."""
    base = BASE
    return FileEvent(
        event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"fpolicyd-test-{n}")),
        operation_type=operation,
        file_path=path,
        previous_path=previous_path,
        volume_name="vol1",
        svm_name="svm1",
        timestamp=iso(base + received_at),
        file_size=n,
        client_ip="192.0.2.10",
        metadata={"received_at": iso(base + received_at), "routes": []},
    )
