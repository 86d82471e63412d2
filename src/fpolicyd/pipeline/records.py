"""Spool records: what their first byte says, and which sink delivers what (pure, no I/O).

Three kinds of record share the spool:

- a raw event, as the reader stored it: a JSON object, ``{...`` (the ``event_id`` is its first field);
- a duplicate the reader's exact-dedup window suppressed: ``0x1F`` + the event JSON. Kept (what was read is never
  lost, and the audit ledger reports it), delivered by no sink;
- a processed event: ``0x1E`` + the destination header + ``\\n`` + the event JSON, appended by the processing stage
  (``pipeline/processing.py``). The header is ``*`` (every sink) or a comma-separated list of sink keys (8 hex digits
  of SHA-256 of the sink URI, stable across restarts and configuration changes). Sink workers deliver only
  processed records addressed to them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Final, NamedTuple

__all__ = [
    "ALL_SINKS",
    "DUPLICATE_TAG",
    "PROCESSED_TAG",
    "Record",
    "duplicate_payload",
    "encode_duplicate",
    "encode_processed",
    "processed_payload",
    "sink_key",
    "sink_selector",
    "stored_event_id",
]


class Record(NamedTuple):
    """One spooled event: its seq (unique, increasing) and its JSON bytes.

    Immutable like the frozen dataclass it was, but built in C: every read hands out one per record, and the
    dataclass's ``__init__`` cost 0.77 µs against 0.35 µs here — a fifth of reading a record back (timeit on the
    project machine; reading 100,000 1.2 KB records went from 4.2 to 3.5 µs each)."""

    seq: int
    payload: bytes


DUPLICATE_TAG: Final = 0x1F
_DUPLICATE_PREFIX: Final = bytes([DUPLICATE_TAG])


def encode_duplicate(event_json: bytes) -> bytes:
    return _DUPLICATE_PREFIX + event_json


def duplicate_payload(payload: bytes) -> bytes | None:
    """The event JSON of a duplicate record, or None for any other record."""
    return payload[1:] if payload and payload[0] == DUPLICATE_TAG else None


PROCESSED_TAG: Final = 0x1E
_PROCESSED_PREFIX: Final = bytes([PROCESSED_TAG])
ALL_SINKS: Final = b"*"


def sink_key(uri: str) -> bytes:
    """A short, stable name of a sink for the destination header."""
    return hashlib.sha256(uri.encode()).hexdigest()[:8].encode()


def encode_processed(event_json: bytes, keys: Sequence[bytes] | None) -> bytes:
    """A processed record: ``keys`` None means every sink."""
    head = ALL_SINKS if keys is None else b",".join(keys)
    return _PROCESSED_PREFIX + head + b"\n" + event_json


def processed_payload(payload: bytes, key: bytes) -> bytes | None:
    """The event JSON a sink with ``key`` delivers from a spool record, or None (raw, or addressed elsewhere)."""
    if not payload or payload[0] != PROCESSED_TAG:
        return None
    end = payload.find(b"\n")
    if end < 0:
        return None
    head = payload[1:end]
    if head == ALL_SINKS or key in head.split(b","):
        return payload[end + 1 :]
    return None


def sink_selector(sink: str, *, processing: bool) -> Callable[[bytes], bytes | None]:
    """What the sink worker of ``sink`` sends of each spool record. With the stage on: only processed records
    addressed to it. Without: raw records as they are, and processed ones left from a run with the stage on
    (addressed to it) — switching the stage off never strands a backlog. Duplicates: never."""
    key = sink_key(sink)
    if processing:
        return lambda payload: processed_payload(payload, key)

    def select(payload: bytes) -> bytes | None:
        if payload and payload[0] == PROCESSED_TAG:
            return processed_payload(payload, key)
        if payload and payload[0] == DUPLICATE_TAG:
            return None
        return payload

    return select


_ID_PREFIX: Final = b'{"event_id":"'
_ID_END: Final = len(_ID_PREFIX) + 36


def stored_event_id(payload: bytes) -> str | None:
    """The ``event_id`` of a stored event without parsing it: it is the first field and a 36-character UUID
    (:meth:`FileEvent.to_dict`); None when the record does not look like that (then it is parsed)."""
    if payload.startswith(_ID_PREFIX) and payload[_ID_END : _ID_END + 1] == b'"':
        return payload[len(_ID_PREFIX) : _ID_END].decode("ascii", "replace")
    return None
