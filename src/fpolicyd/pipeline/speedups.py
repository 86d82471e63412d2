"""The optional C accelerator of the reader's hot path, :mod:`fpolicyd._speedups`, as the ingest step uses it.

For a SCREEN_REQ in ONTAP's canonical layout, one C call does what the Python path does with
:func:`~fpolicyd.protocol.xml_codec.fast_screen`, :meth:`~fpolicyd.events.EventBuilder.build` and
``orjson.dumps``: it returns the event's JSON split around ``metadata["routes"]``, and :func:`event_record`
splices the route list and the replay flags into it. Anything else returns None and takes the Python path,
which stays the reference (``tests/property/test_speedups.py`` checks byte equality against it).

The extension is built where a C compiler is available (``setup.py``, ``Extension(optional=True)``); without
one, fpolicyd installs and runs on the Python path. ``pure_python = true`` (``FPOLICYD_PURE_PYTHON=1``) forces
the Python path; the daemon logs which path runs (``ingest_path``) and counts SCREEN_REQs by path
(``fpolicyd_notifications_decoded_total{decoder}``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import orjson

from fpolicyd.events import (
    _NAMESPACE_SHA1,
    _REQ_TYPE_CACHE_MAX,
    KNOWN_REQ_TYPES,
    EventBuilder,
    NameMaps,
    _req_type_info,
)
from fpolicyd.protocol.context import SessionContext

if TYPE_CHECKING:
    from fpolicyd._speedups import EventEncoder, ReqTypeEntry

__all__ = [
    "NO_ROUTES",
    "AcceleratorStatus",
    "Encode",
    "EncodedEvent",
    "accelerator_status",
    "event_record",
    "routes_json",
    "session_encoder",
]

_Encoder: type[EventEncoder] | None
try:
    from fpolicyd._speedups import EventEncoder as _Encoder
except ImportError as exc:  # no compiler where fpolicyd was installed: the Python path runs
    _Encoder = None
    _IMPORT_ERROR: str | None = str(exc)
else:
    _IMPORT_ERROR = None

#: What the encoder returns for a payload it read: ``(head, tail, event_id, key, file_path, operation,
#: generation_time, req_id, req_type)``. ``key`` is the dedup key (``dedup_window.key_of_digest``),
#: ``generation_time`` the raw GenerationTime (what the replay tracker observes).
EncodedEvent = tuple[bytes, bytes, str, int, str, str, int | None, int, str]
#: One session's encoder: ``(payload, received_at_us)`` → the event's parts, or None (take the Python path).
Encode = Callable[[bytes, int], EncodedEvent | None]


@dataclass(frozen=True, slots=True)
class AcceleratorStatus:
    """Which path builds events, and why (the ``ingest_path`` log line at start)."""

    #: ``"c"`` (the accelerator, with the Python path for what it leaves) or ``"python"``.
    path: str
    reason: str


def accelerator_status(*, enabled: bool = True, redacting: bool = False) -> AcceleratorStatus:
    """The path the ingest step takes: ``enabled`` is False with ``pure_python``; redaction needs the event as
    an object, so it keeps the Python path."""
    if _Encoder is None:
        return AcceleratorStatus("python", f"the C accelerator is not built: {_IMPORT_ERROR}")
    if not enabled:
        return AcceleratorStatus("python", "pure_python is set (FPOLICYD_PURE_PYTHON)")
    if redacting:
        return AcceleratorStatus("python", "events are redacted as they are built (classification)")
    return AcceleratorStatus("c", "fpolicyd._speedups")


# ReqType → what the event needs of it, serialised once (events._REQ_TYPE_CACHE's values plus their JSON).
_REQ_TYPES: dict[str, ReqTypeEntry] = {}


def _req_type_entry(req_type: str) -> ReqTypeEntry:
    """The encoder's ReqType entry, from :func:`~fpolicyd.events._req_type_info` (never a second parser);
    cached up to the same bound, since ReqType is peer-controlled text."""
    operation, is_directory, protocol, needs_previous = _req_type_info(req_type)
    entry = (operation, orjson.dumps(operation), is_directory, orjson.dumps(protocol), needs_previous)
    if len(_REQ_TYPES) < _REQ_TYPE_CACHE_MAX:
        _REQ_TYPES[req_type] = entry
    return entry


for _req_type in KNOWN_REQ_TYPES:
    _req_type_entry(_req_type)


def _volume_json(volumes: dict[int | None, bytes], names: NameMaps, msid: int | None) -> bytes:
    """A volume name as JSON, cached per session like :class:`~fpolicyd.events.EventBuilder`'s names."""
    name = orjson.dumps(names.volume_name(msid))
    if len(volumes) >= EventBuilder.VOLUME_CACHE_MAX:
        volumes.clear()
    volumes[msid] = name
    return name


def session_encoder(context: SessionContext, names: NameMaps, *, path_max_chars: int = 0) -> Encode | None:
    """The encoder of one negotiated session, or None when the accelerator is not built (or a session value
    cannot be serialised, which the Python path then reports as it always has). With ``path_max_chars`` > 0 it
    returns None for a payload with a longer path: the Python path cuts it (:func:`~fpolicyd.events.truncate_path`)."""
    if _Encoder is None:
        return None
    dumps = orjson.dumps
    try:
        constants = [
            dumps(value)
            for value in (
                context.vs_uuid,
                context.policy_name,
                context.session_id,
                context.protocol_version,
                context.peer,
                names.svm_name(context.vs_uuid),
            )
        ]
    except orjson.JSONEncodeError:
        return None
    vs_uuid, policy_name, session_id, fpolicy_version, node, svm_name = constants
    volumes: dict[int | None, bytes] = {}
    encoder = _Encoder(
        _NAMESPACE_SHA1,
        _REQ_TYPES,
        _req_type_entry,
        volumes,
        partial(_volume_json, volumes, names),
        vs_uuid,
        policy_name,
        session_id,
        fpolicy_version,
        node,
        svm_name,
        path_max_chars,
    )
    return encoder.encode


#: ``metadata["routes"]`` when routing is off.
NO_ROUTES: Final = b"[]"
# Route lists as JSON: the router hands out a few distinct tuples (one per table entry, and cached merges).
_ROUTES_JSON: dict[tuple[str, ...], bytes] = {}
_ROUTES_JSON_MAX: Final = 4096


def routes_json(routes: tuple[str, ...]) -> bytes:
    """``orjson.dumps(routes)``, cached (bounded: the cache stops growing at ``_ROUTES_JSON_MAX`` lists)."""
    json = _ROUTES_JSON.get(routes)
    if json is None:
        json = orjson.dumps(routes)
        if len(_ROUTES_JSON) < _ROUTES_JSON_MAX:
            _ROUTES_JSON[routes] = json
    return json


def event_record(head: bytes, routes: bytes, tail: bytes, flags: Mapping[str, Any] | None) -> bytes:
    """The stored event: the encoder's parts with ``metadata["routes"]`` (its JSON: :func:`routes_json`, or
    :data:`NO_ROUTES` when routing is off) and the replay flags (appended to ``metadata`` in their order, as
    ``metadata.update(flags)`` does) spliced in — the bytes ``orjson.dumps`` makes of the Python path's event."""
    if not flags:
        return b"".join((head, routes, tail, b"}}"))
    return b"".join((head, routes, tail, b",", orjson.dumps(flags)[1:], b"}"))
