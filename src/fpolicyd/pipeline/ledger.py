"""Audit ledger records of dedup decisions (pure: building the records; the file writer is
:mod:`fpolicyd.storage.ledger`).

Regulated users asked that a suppressed duplicate leave an audit record, never a silent drop
(``docs/reference-pipeline.md`` §6). A record::

    {"time": "2024-05-01T10:00:00.000000Z", "event_id": "...", "key": "pk|sk", "decision": "duplicate",
     "first_seen_id": "...", "claimant": "i-1:42", "first_claimant": "i-1:17", "mode": "window",
     "use_case": "UC1", "file_path": "/legal/a.pdf"}

``time`` is the decision time; ``claimant`` the suppressed event's, ``first_claimant`` the claim holder's;
``use_case`` and ``file_path`` appear for requests made for a use case (window mode). ``first``
decisions are not recorded (the event itself is delivered) and neither are ``error_closed`` ones (the event is
held back and judged again later).

Redaction (:data:`Redact`): the writer passes each record through a redaction function before it is written; the
data-classification stage plugs in there (``Redactor.redact_record`` hashes ``file_path``). ``key`` is built
*after* redaction from the redacted ``file_path`` (:func:`finish_record`), so a window key never leaks the clear
path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from fpolicyd.events import format_rfc3339_us
from fpolicyd.pipeline.dedup import Decision, DedupMode, DedupRequest, DedupResult, exact_key

__all__ = ["RECORDED_DECISIONS", "Redact", "finish_record", "ledger_record", "reader_duplicate_record"]

RECORDED_DECISIONS: Final = frozenset({Decision.duplicate, Decision.error_open})

Redact = Callable[[dict[str, Any]], dict[str, Any]]


def ledger_record(request: DedupRequest, result: DedupResult, now: float) -> dict[str, Any] | None:
    """The unredacted record for one decision, or ``None`` when the decision is not recorded. ``key`` is left
    out when the request has a use case (it is derived from the possibly redacted ``file_path`` on write)."""
    if result.decision not in RECORDED_DECISIONS:
        return None
    record: dict[str, Any] = {
        "time": format_rfc3339_us(int(now * 1_000_000)),
        "event_id": request.event_id,
        "key": str(result.key),
        "decision": result.decision.value,
        "first_seen_id": result.first_seen_id,
        "claimant": result.claimant,
        "first_claimant": result.first_claimant,
        "mode": request.mode.value,
    }
    if request.use_case is not None:
        record["use_case"] = request.use_case
        prefix = f"{request.use_case}#"
        if request.key.pk.startswith(prefix):  # a window key: pk = "{use_case}#{file_path}"
            del record["key"]
            record["file_path"] = request.key.pk[len(prefix) :]
    return record


def reader_duplicate_record(event_id: str, claimant: str, now: float) -> dict[str, Any]:
    """The record of a duplicate the reader's exact-dedup window suppressed: the same fields as a stage decision
    in exact mode (key ``<event_id>|<EXACT_SORT_KEY>``), except ``first_claimant``, which the window does not
    keep (it holds keys only: the first event is the one with the same ``event_id``)."""
    return {
        "time": format_rfc3339_us(int(now * 1_000_000)),
        "event_id": event_id,
        "key": str(exact_key(event_id)),
        "decision": Decision.duplicate.value,
        "first_seen_id": event_id,
        "claimant": claimant,
        "mode": DedupMode.exact.value,
    }


def finish_record(record: dict[str, Any], request: DedupRequest) -> dict[str, Any]:
    """Rebuild a window key from the (redacted) path; a redaction that removed the path leaves ``<redacted>``."""
    if "key" not in record and request.use_case is not None:
        path = record.get("file_path", "<redacted>")
        record["key"] = f"{request.use_case}#{path}|{request.key.sk}"
    return record
