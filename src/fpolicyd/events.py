"""One decoded ``ScreenRequest`` → one normalized :class:`FileEvent`, the contract every sink emits.

:func:`normalize` is the pure, readable reference; the per-notification hot path (reader → spool) builds the
same event with :class:`EventBuilder` from the decoder's flat fields (or the C accelerator,
:mod:`fpolicyd.pipeline.speedups`, does). Both avoid ``datetime``/``uuid`` objects: timestamps are formatted from
integers with a per-second prefix cache and the UUIDv5 is built straight from a SHA-1 hex digest. The JSON
Schemas of the event ship with the package (``fpolicyd/schemas/``): ``event.schema.json`` is fpolicyd's own
contract, ``reference-event.schema.json`` restates the reference pipeline's published schema, which events of
the four core operations also satisfy.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Final

import orjson

from fpolicyd.protocol.context import SessionContext
from fpolicyd.protocol.messages import PathName, PathNameType, ProtCommonInfo, ScreenRequest, UserContext
from fpolicyd.protocol.req_types import REQ_TYPES, Operation, ReqTypeInfo, parse_req_type
from fpolicyd.protocol.xml_fast import ScreenFields

__all__ = [
    "CORE_OPERATIONS",
    "EVENT_ID_NAMESPACE",
    "KNOWN_REQ_TYPES",
    "PATH_HASH_HEX_CHARS",
    "PATH_MAX_CHARS_MIN",
    "PATH_TAIL_CHARS",
    "REFERENCE_PATH_MAX_CHARS",
    "EventBuilder",
    "FileEvent",
    "NameMaps",
    "Operation",
    "ReqTypeInfo",
    "event_id_from_identity",
    "format_rfc3339_us",
    "load_event_schema",
    "load_reference_schema",
    "normalize",
    "parse_req_type",
    "path_sha256",
    "truncate_path",
]


#: The operations the reference pipeline's schema allows (``docs/reference-pipeline.md`` §3).
CORE_OPERATIONS: frozenset[str] = frozenset({Operation.CREATE, Operation.WRITE, Operation.DELETE, Operation.RENAME})

#: Every ReqType ONTAP's notification schema defines (27), read-only. The table itself lives in
#: :mod:`fpolicyd.protocol.req_types`, shared with the codec and the simulator; this is a view of it.
KNOWN_REQ_TYPES: Mapping[str, ReqTypeInfo] = MappingProxyType(REQ_TYPES)

#: Operations whose event must carry ``previous_path`` (the source) even when ONTAP sent no target.
_NEEDS_PREVIOUS: frozenset[str] = frozenset({Operation.RENAME.value, Operation.LINK.value})

#: Hot-path cache: ReqType → (operation value as plain str, is_directory, protocol, needs a previous_path).
#: A plain dict of plain values: ``lru_cache`` calls, ``Enum.value`` and ``Enum.__hash__`` each cost
#: ~0.1–0.2 µs here. Bounded because ReqType is peer-controlled text.
_Parsed = tuple[str, bool, str | None, bool]
_REQ_TYPE_CACHE_MAX = 1024


def _parse(req_type: str) -> _Parsed:
    """Derived from :func:`parse_req_type` (``<PROTO>_<OP>[_DIR]``, unknown → ``unknown``), never a second parser."""
    info = parse_req_type(req_type)
    op = info.operation.value
    return (op, info.is_directory, info.protocol, op in _NEEDS_PREVIOUS)


_REQ_TYPE_CACHE: dict[str, _Parsed] = {rt: _parse(rt) for rt in KNOWN_REQ_TYPES}


def _req_type_info(req_type: str) -> _Parsed:
    parsed = _REQ_TYPE_CACHE.get(req_type)
    if parsed is None:
        parsed = _parse(req_type)
        if len(_REQ_TYPE_CACHE) < _REQ_TYPE_CACHE_MAX:
            _REQ_TYPE_CACHE[req_type] = parsed
    return parsed


# --------------------------------------------------------------------------------------------- time

_US_PER_SECOND = 1_000_000
_SECONDS_PER_DAY = 86_400
#: 10000-01-01T00:00:00Z in epoch µs: RFC 3339 has four-digit years.
MAX_EPOCH_US = 253_402_300_800_000_000
#: GenerationTime below this (2001-09-09T01:46:40Z) is not an epoch-µs value (SCHEMA's 2017 sample is tiny).
MIN_PLAUSIBLE_GENERATION_US = 10**15

_second_prefix: dict[int, str] = {}
_SECOND_PREFIX_MAX = 4096


def _format_second(secs: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS.`` for epoch seconds ``secs`` ≥ 0 (H. Hinnant's civil-from-days)."""
    days, rem = divmod(secs, _SECONDS_PER_DAY)
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (month <= 2)
    hour, rem = divmod(rem, 3600)
    minute, second = divmod(rem, 60)
    return f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}."


def format_rfc3339_us(epoch_us: int) -> str:
    """Epoch microseconds → ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (UTC, always six fractional digits).

    Raises ``ValueError`` outside 1970-01-01 … 9999-12-31. Notifications arrive in bursts, so the
    ``…SS.`` prefix is cached per second (bounded); a hit costs one dict lookup and one f-string,
    ~5x faster than ``datetime`` (measured on the project machine).
    """
    secs, frac = divmod(epoch_us, _US_PER_SECOND)
    prefix = _second_prefix.get(secs)
    if prefix is None:
        if not 0 <= epoch_us < MAX_EPOCH_US:
            raise ValueError(f"epoch microseconds out of RFC 3339 range: {epoch_us}")
        prefix = _format_second(secs)
        if len(_second_prefix) >= _SECOND_PREFIX_MAX:
            _second_prefix.clear()
        _second_prefix[secs] = prefix
    return f"{prefix}{frac:06d}Z"


# ----------------------------------------------------------------------------------------- event id

#: Namespace of every ``event_id``: ``uuid5(NAMESPACE_URL, "urn:fpolicyd:event-id:v1")``. A change to the
#: canonical identity form below must come with a new namespace (``…:v2``) so old and new ids never mix.
EVENT_ID_NAMESPACE = uuid.UUID("16078322-5580-5602-992b-ca981cb504ae")
#: SHA-1 already fed the namespace bytes; copying it is cheaper than hashing ``namespace + name`` afresh.
_NAMESPACE_SHA1 = hashlib.sha1(EVENT_ID_NAMESPACE.bytes, usedforsecurity=False)
#: RFC 4122 variant: the high two bits of the clock_seq_hi nibble become ``10``.
_VARIANT_NIBBLE: Mapping[str, str] = MappingProxyType({c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"})


def event_id_from_identity(identity: Sequence[str | int | None]) -> str:
    """``uuid5(EVENT_ID_NAMESPACE, json.dumps(identity, ensure_ascii=False, separators=(",", ":")))``.

    Computed from the SHA-1 hex digest directly (≈4x faster than ``uuid.uuid5``); equal by construction and by
    test. orjson's compact output is byte-identical to that ``json.dumps`` call for strings, ints and null.
    """
    h = _NAMESPACE_SHA1.copy()
    h.update(orjson.dumps(identity))
    x = h.hexdigest()
    return f"{x[:8]}-{x[8:12]}-5{x[13:16]}-{_VARIANT_NIBBLE[x[16]]}{x[17:20]}-{x[20:32]}"


# ------------------------------------------------------------------------------------------ long paths

#: The reference pipeline's bound on ``file_path`` and ``previous_path``, in characters (code points, as JSON
#: Schema's ``maxLength`` counts): ``schemas/reference-event.schema.json``.
REFERENCE_PATH_MAX_CHARS: Final = 4096
#: Characters kept from the end of a cut path: a whole file name (ONTAP names are at most 255 bytes, SMB's at
#: most 255 UTF-16 units), so suffix routes (``.pdf``) and EventBridge suffix rules still match.
PATH_TAIL_CHARS: Final = 255
#: Hex digits of the full path's SHA-256 in the marker (64 bits: two different paths cut to the same text only
#: by a hash collision); ``metadata.truncated_paths`` holds all 64.
PATH_HASH_HEX_CHARS: Final = 16
_MARKER_CHARS: Final = len("…[sha256:]…") + PATH_HASH_HEX_CHARS
#: Smallest non-zero ``path_max_chars``: the marker, the tail and a head of at least 230 characters.
PATH_MAX_CHARS_MIN: Final = 512


def path_sha256(path: str) -> str:
    """SHA-256 hex digest of ``path``'s UTF-8 bytes (what the marker and ``metadata.truncated_paths`` carry)."""
    return hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()


def truncate_path(path: str, max_chars: int) -> str:
    """``path`` itself when it has at most ``max_chars`` characters (or ``max_chars`` is 0), else exactly
    ``max_chars`` characters: ``head + "…[sha256:<16 hex>]…" + tail``, where ``head`` is the path's start (so
    it keeps the leading ``/`` and any route prefix), ``tail`` its last :data:`PATH_TAIL_CHARS` characters and
    the hex the first 64 bits of :func:`path_sha256` of the full path. Cut by characters (code points), never
    inside one. ``max_chars`` is 0 or at least :data:`PATH_MAX_CHARS_MIN` (``Settings.path_max_chars``)."""
    if max_chars <= 0 or len(path) <= max_chars:
        return path
    return _cut(path, max_chars, path_sha256(path))


def _cut(path: str, max_chars: int, digest: str) -> str:
    """:func:`truncate_path` of a path longer than ``max_chars``, whose :func:`path_sha256` is ``digest``."""
    if max_chars < PATH_MAX_CHARS_MIN:
        raise ValueError(f"path_max_chars must be 0 or at least {PATH_MAX_CHARS_MIN}, not {max_chars}")
    head = max_chars - _MARKER_CHARS - PATH_TAIL_CHARS
    return f"{path[:head]}…[sha256:{digest[:PATH_HASH_HEX_CHARS]}]…{path[-PATH_TAIL_CHARS:]}"


def _cut_paths(
    file_path: str, previous_path: str | None, max_chars: int, metadata: dict[str, Any]
) -> tuple[str, str | None]:
    """Both paths cut to ``max_chars`` (the caller checked that one is longer); records what was cut in
    ``metadata``: ``path_truncated: true`` and ``truncated_paths[field] = {"chars", "sha256"}`` of the full
    path, for each field that was cut."""
    cut: dict[str, dict[str, Any]] = {}
    file_path_out = file_path
    if len(file_path) > max_chars:
        digest = path_sha256(file_path)
        cut["file_path"] = {"chars": len(file_path), "sha256": digest}
        file_path_out = _cut(file_path, max_chars, digest)
    previous_out = previous_path
    if previous_path is not None and len(previous_path) > max_chars:
        digest = path_sha256(previous_path) if previous_path != file_path else cut["file_path"]["sha256"]
        cut["previous_path"] = {"chars": len(previous_path), "sha256": digest}
        previous_out = _cut(previous_path, max_chars, digest)
    metadata["path_truncated"] = True
    metadata["truncated_paths"] = cut
    return file_path_out, previous_out


# ------------------------------------------------------------------------------------------- names


def _frozen_mapping(value: Mapping[Any, str]) -> Mapping[Any, str]:
    return value if isinstance(value, MappingProxyType) else MappingProxyType(dict(value))


@dataclass(frozen=True, slots=True)
class NameMaps:
    """Names ONTAP does not send (it sends ``VolMsid`` and ``VsUUID``), from config.

    ``default_volume``/``default_svm`` are the reference server's ``VOLUME_NAME``/``SVM_NAME``; an empty
    string counts as unset (the reference default is ``""``, which its own schema rejects).
    """

    volumes: Mapping[int, str] = field(default_factory=lambda: MappingProxyType({}))
    svms: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    default_volume: str | None = None
    default_svm: str | None = None

    def __post_init__(self) -> None:
        # Copy into read-only views so a caller keeping the original dict cannot change a live NameMaps.
        object.__setattr__(self, "volumes", _frozen_mapping(self.volumes))
        object.__setattr__(self, "svms", _frozen_mapping(self.svms))
        object.__setattr__(self, "default_volume", self.default_volume or None)
        object.__setattr__(self, "default_svm", self.default_svm or None)

    def volume_name(self, msid: int | None) -> str:
        """map[msid] → ``default_volume`` → ``msid-<n>`` → ``unknown-volume`` (no MSID sent)."""
        if msid is not None:
            name = self.volumes.get(msid)
            if name:
                return name
        if self.default_volume is not None:
            return self.default_volume
        return "unknown-volume" if msid is None else f"msid-{msid}"

    def svm_name(self, vs_uuid: str) -> str:
        """map[vs_uuid] → ``default_svm`` → the VsUUID itself (``unknown-svm`` if even that is empty)."""
        name = self.svms.get(vs_uuid)
        if name:
            return name
        if self.default_svm is not None:
            return self.default_svm
        return vs_uuid or "unknown-svm"


# ------------------------------------------------------------------------------------------- event


@dataclass(frozen=True, slots=True)
class FileEvent:
    """The normalized event (README "Events", ``docs/reference-pipeline.md`` §3; ``schemas/event.schema.json``).

    Frozen, but ``metadata`` is a plain dict for speed: treat it as read-only and use :meth:`with_routes`.
    """

    event_id: str
    operation_type: str
    file_path: str
    previous_path: str | None
    volume_name: str
    svm_name: str
    timestamp: str
    file_size: int
    client_ip: str | None
    metadata: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object; ``previous_path``/``client_ip`` are omitted when ``None`` (the reference schema
        has ``additionalProperties: false`` and no nulls). ``metadata`` is shared, not copied."""
        d: dict[str, Any] = {
            "event_id": self.event_id,
            "operation_type": self.operation_type,
            "file_path": self.file_path,
        }
        if self.previous_path is not None:
            d["previous_path"] = self.previous_path
        d["volume_name"] = self.volume_name
        d["svm_name"] = self.svm_name
        d["timestamp"] = self.timestamp
        d["file_size"] = self.file_size
        if self.client_ip is not None:
            d["client_ip"] = self.client_ip
        d["metadata"] = self.metadata
        return d

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON, no trailing newline."""
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FileEvent:
        """Inverse of :meth:`to_dict` (for reading events back from the spool or a JSON Lines file)."""
        return cls(
            event_id=d["event_id"],
            operation_type=d["operation_type"],
            file_path=d["file_path"],
            previous_path=d.get("previous_path"),
            volume_name=d["volume_name"],
            svm_name=d["svm_name"],
            timestamp=d["timestamp"],
            file_size=d["file_size"],
            client_ip=d.get("client_ip"),
            metadata=dict(d.get("metadata") or {}),
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> FileEvent:
        return cls.from_dict(orjson.loads(data))

    def with_routes(self, routes: Sequence[str]) -> FileEvent:
        """A copy whose ``metadata["routes"]`` is ``routes`` (the router's verdict); self is unchanged."""
        return _make_event(
            self.event_id,
            self.operation_type,
            self.file_path,
            self.previous_path,
            self.volume_name,
            self.svm_name,
            self.timestamp,
            self.file_size,
            self.client_ip,
            {**self.metadata, "routes": list(routes)},
        )


_new_object = object.__new__
# The frozen dataclass ``__init__`` goes through ``object.__setattr__`` per field (~1.1 µs for ten fields);
# setting the slot descriptors directly builds the identical object in half that. Hot path only.
(
    _set_event_id,
    _set_operation_type,
    _set_file_path,
    _set_previous_path,
    _set_volume_name,
    _set_svm_name,
    _set_timestamp,
    _set_file_size,
    _set_client_ip,
    _set_metadata,
) = (FileEvent.__dict__[f.name].__set__ for f in fields(FileEvent))


def _make_event(  # noqa: PLR0917 -- mirrors the dataclass's positional field order
    event_id: str,
    operation_type: str,
    file_path: str,
    previous_path: str | None,
    volume_name: str,
    svm_name: str,
    timestamp: str,
    file_size: int,
    client_ip: str | None,
    metadata: dict[str, Any],
) -> FileEvent:
    """``FileEvent(...)`` without the frozen-``__init__`` overhead (same positional order)."""
    ev: FileEvent = _new_object(FileEvent)
    _set_event_id(ev, event_id)
    _set_operation_type(ev, operation_type)
    _set_file_path(ev, file_path)
    _set_previous_path(ev, previous_path)
    _set_volume_name(ev, volume_name)
    _set_svm_name(ev, svm_name)
    _set_timestamp(ev, timestamp)
    _set_file_size(ev, file_size)
    _set_client_ip(ev, client_ip)
    _set_metadata(ev, metadata)
    return ev


# ------------------------------------------------------------------------------------------ normalize

_UNIX = PathNameType.UNIX_NAME.value
_WIN = PathNameType.WIN_NAME.value
_WIN_8_3 = PathNameType.WIN_8_3_NAME.value

#: ``UsrContext`` choice → the ``UsrIdType`` it implies (used when UsrIdType is absent, and for FileOwner).
_KIND_TO_ID_TYPE: Mapping[str, str] = MappingProxyType(
    {"UnixUid": "UNIX_ONLY", "WinSid": "WIN_ONLY", "MappedId": "MAPPED_ID"}
)


def _rooted(path: str) -> str:
    """Exactly one leading ``/``; nothing else is touched (``//`` inside a name stays)."""
    if path[:1] == "/" and path[1:2] != "/":
        return path
    return "/" + path.lstrip("/")


def _pick_path(paths: tuple[PathName, ...]) -> str | None:
    """Choose by ``PathNameType``, never by position: UNIX_NAME, else WIN_NAME, else WIN_8_3_NAME, else a
    name of a type this version does not know; Windows forms get ``/`` separators. Empty names are skipped.
    ``None`` when no usable name was sent."""
    for p in paths:
        if p.type == _UNIX and p.name:
            name = p.name
            if name[0] == "/" and name[1:2] != "/":
                return name
            return "/" + name.lstrip("/")
    win = short = other = None
    for p in paths:
        name = p.name
        if not name:
            continue
        kind = p.type
        if kind == _WIN:
            win = win or name
        elif kind == _WIN_8_3:
            short = short or name
        elif kind != _UNIX:
            other = other or name
    chosen = win or short or other
    return None if chosen is None else _rooted(chosen.replace("\\", "/"))


def _user(uc: UserContext | None, id_type: str | None) -> dict[str, Any]:
    """``{"id_type", "uid", "sid"}`` with only the keys ONTAP sent; ``id_type`` falls back to the choice kind."""
    if uc is None:
        return {} if id_type is None else {"id_type": id_type}
    out: dict[str, Any] = {"id_type": id_type or _KIND_TO_ID_TYPE.get(uc.kind, uc.kind)}
    if uc.uid is not None:
        out["uid"] = uc.uid
    if uc.sid is not None:
        out["sid"] = uc.sid
    return out


def normalize(
    req: ScreenRequest, ctx: SessionContext, names: NameMaps, received_at_us: int, *, path_max_chars: int = 0
) -> FileEvent:
    """Turn one notification into one event. Pure: ``received_at_us`` (epoch µs) is the caller's clock.

    Paths: see :func:`_pick_path`. With a ``TargetAccessPath`` (rename/link) ``file_path`` is the **new** path
    and ``previous_path`` the source; a rename/link without a target gets ``file_path = previous_path =
    source`` and ``metadata["target_missing"] = True``; no usable source path gives ``/`` and
    ``metadata["path_missing"] = True``.

    Timestamp: ``GenerationTime`` when it is plausible epoch µs (≥ 10**15 and before year 10000), else the
    receive time (``metadata["timestamp_source"]`` says which; the raw value is ``metadata["generation_time"]``).

    ``event_id`` = :func:`event_id_from_identity` of this canonical identity (JSON array, in this order)::

        [vs_uuid, volume_msid, req_type, source_path, target_path, generation_time, client_ip, uid, sid]

    followed by ``session_id, req_id`` when ``timestamp_source`` is ``"received"`` (GenerationTime absent
    or not epoch µs: without it two genuine identical writes would otherwise share an id). Values are as in
    the emitted event: ``vs_uuid``/``session_id``/``req_id``/``req_type``/``volume_msid``/``generation_time``
    from ``metadata`` (ints or null), ``client_ip`` (null when omitted), ``uid``/``sid`` from
    ``metadata["user"]`` (null when absent), ``source_path`` = ``previous_path`` if present else
    ``file_path``, ``target_path`` = ``file_path`` if ``previous_path`` is present and ``target_missing`` is
    not set, else null. So any tool can recompute the id from the event alone; a replayed or redelivered
    notification gets the same id.

    Long paths: with ``path_max_chars`` > 0 (``Settings.path_max_chars``; 0 keeps every path whole), a
    ``file_path``/``previous_path`` longer than that many characters is cut by :func:`truncate_path` and
    ``metadata`` gets ``path_truncated: true`` and ``truncated_paths`` (each cut field's full length in
    characters and full SHA-256). The identity, hence ``event_id`` and the dedup key, is always made of the
    full paths, so two long paths that share a head never share an id (such an id is recomputed from the
    event only with the full paths, which the hashes identify).
    """
    req_type = req.req_type
    parsed = _REQ_TYPE_CACHE.get(req_type)
    if parsed is None:
        parsed = _req_type_info(req_type)
    operation, is_dir, protocol, needs_previous = parsed
    common: ProtCommonInfo = req.common

    source = _pick_path(common.access_paths)
    target = _pick_path(req.target_paths) if req.target_paths else None
    target_missing = False
    previous_path: str | None
    if target is not None:
        file_path = target
        previous_path = source or "/"
    elif needs_previous:
        file_path = previous_path = source or "/"
        target_missing = True
    else:
        file_path = source or "/"
        previous_path = None

    # format_rfc3339_us's cache hit, inlined (the call is a fifth of its cost); a miss takes the full path.
    secs = received_at_us // _US_PER_SECOND
    prefix = _second_prefix.get(secs)
    received_at = (
        format_rfc3339_us(received_at_us)
        if prefix is None
        else f"{prefix}{received_at_us - secs * _US_PER_SECOND:06d}Z"
    )
    gt = common.generation_time
    if gt is not None and MIN_PLAUSIBLE_GENERATION_US <= gt < MAX_EPOCH_US:
        secs = gt // _US_PER_SECOND
        prefix = _second_prefix.get(secs)
        timestamp = format_rfc3339_us(gt) if prefix is None else f"{prefix}{gt - secs * _US_PER_SECOND:06d}Z"
        ts_source = "generation_time"
    else:
        timestamp = received_at
        ts_source = "received"

    uc = common.usr_context
    uid: int | None = None
    sid: str | None = None
    if uc is not None:
        uid = uc.uid
        sid = uc.sid
    client_ip = common.client_ip or None
    msid = common.vol_msid

    identity: list[str | int | None] = [
        ctx.vs_uuid,
        msid,
        req_type,
        previous_path if previous_path is not None else file_path,
        target,
        gt,
        client_ip,
        uid,
        sid,
    ]
    if ts_source == "received":
        identity.append(ctx.session_id)
        identity.append(req.req_id)

    prot_ver = req.prot_ver
    metadata: dict[str, Any] = {
        "req_type": req_type,
        "req_id": req.req_id,
        "protocol": protocol,
        "protocol_version": None if prot_ver is None else f"{prot_ver[0]}.{prot_ver[1]}",
        "fpolicy_version": ctx.protocol_version,
        "is_directory": is_dir or common.file_type == "DIR",
        "file_type": common.file_type,
        "user": _user(uc, common.usr_id_type),
        "vs_uuid": ctx.vs_uuid,
        "policy_name": ctx.policy_name,
        "session_id": ctx.session_id,
        "volume_msid": msid,
        "received_at": received_at,
        "routes": [],
        "timestamp_source": ts_source,
        "generation_time": gt,
        "node": ctx.peer,
    }
    if common.file_owner is not None:
        metadata["file_owner"] = _user(common.file_owner, None)
    if req.display_path is not None:
        metadata["display_path"] = req.display_path
    if req.op_fields:
        metadata["op_fields"] = dict(req.op_fields)
    if target_missing:
        metadata["target_missing"] = True
    if source is None:
        metadata["path_missing"] = True
    if req.user_gids:
        metadata["user_gids"] = list(req.user_gids)
    if common.extra:
        metadata["extra"] = dict(common.extra)
    if path_max_chars and (
        len(file_path) > path_max_chars or (previous_path is not None and len(previous_path) > path_max_chars)
    ):
        file_path, previous_path = _cut_paths(file_path, previous_path, path_max_chars, metadata)

    size = common.file_size
    return _make_event(
        event_id_from_identity(identity),
        operation,
        file_path,
        previous_path,
        names.volume_name(msid),
        names.svm_name(ctx.vs_uuid),
        timestamp,
        size if size is not None and size > 0 else 0,
        client_ip,
        metadata,
    )


# -------------------------------------------------------------------------------------------- schemas


def _load_schema(name: str) -> dict[str, Any]:
    data = (importlib.resources.files("fpolicyd") / "schemas" / name).read_bytes()
    schema: dict[str, Any] = orjson.loads(data)
    return schema


@functools.cache
def load_event_schema() -> dict[str, Any]:
    """fpolicyd's event schema (draft 2020-12). Cached and shared: do not mutate it."""
    return _load_schema("event.schema.json")


@functools.cache
def load_reference_schema() -> dict[str, Any]:
    """The reference pipeline's published event schema (draft-07). Cached and shared: do not mutate it."""
    return _load_schema("reference-event.schema.json")


# ------------------------------------------------------------------------------------ fast event builder


def _pick_path_tuple(paths: tuple[tuple[str, str], ...]) -> str | None:
    """:func:`_pick_path` over ``(type, name)`` tuples (the decoder's flat fields): same choice, same result."""
    for kind, name in paths:
        if kind == _UNIX and name:
            if name[0] == "/" and name[1:2] != "/":
                return name
            return "/" + name.lstrip("/")
    win = short = other = None
    for kind, name in paths:
        if not name:
            continue
        if kind == _WIN:
            win = win or name
        elif kind == _WIN_8_3:
            short = short or name
        elif kind != _UNIX:
            other = other or name
    chosen = win or short or other
    return None if chosen is None else _rooted(chosen.replace("\\", "/"))


def _user_tuple(uc: tuple[str, int | None, str | None] | None, id_type: str | None) -> dict[str, Any]:
    """:func:`_user` over a ``(kind, uid, sid)`` tuple."""
    if uc is None:
        return {} if id_type is None else {"id_type": id_type}
    kind, uid, sid = uc
    out: dict[str, Any] = {"id_type": id_type or _KIND_TO_ID_TYPE.get(kind, kind)}
    if uid is not None:
        out["uid"] = uid
    if sid is not None:
        out["sid"] = sid
    return out


class EventBuilder:
    """Builds the events of one session from the decoder's flat fields (:class:`ScreenFields`).

    The hot-path twin of :func:`normalize`: no per-element objects, the session's constant values computed once,
    volume names cached per MSID. For every input both give the same JSON bytes, key order included
    (``tests/property/test_events_props.py`` proves it against :func:`normalize`, the readable reference)."""

    __slots__ = ("_ctx", "_names", "_path_max_chars", "_svm_name", "_volumes")

    #: Distinct MSIDs remembered per session (an SVM has at most a few thousand volumes; a peer that sends
    #: more only makes the cache restart).
    VOLUME_CACHE_MAX: Final = 4096

    def __init__(self, ctx: SessionContext, names: NameMaps, *, path_max_chars: int = 0) -> None:
        """``path_max_chars``: as :func:`normalize`'s (0: paths are kept whole)."""
        if path_max_chars and path_max_chars < PATH_MAX_CHARS_MIN:
            raise ValueError(f"path_max_chars must be 0 or at least {PATH_MAX_CHARS_MIN}, not {path_max_chars}")
        self._ctx = ctx
        self._names = names
        self._path_max_chars = path_max_chars
        self._svm_name = names.svm_name(ctx.vs_uuid)
        self._volumes: dict[int | None, str] = {}

    @property
    def context(self) -> SessionContext:
        return self._ctx

    @property
    def path_max_chars(self) -> int:
        return self._path_max_chars

    def build(self, f: ScreenFields, received_at_us: int) -> tuple[dict[str, Any], str]:
        """The event as its JSON object (``FileEvent.to_dict`` form) and the SHA-1 hex digest its ``event_id``
        was made from (the first 128 bits are the dedup key)."""
        ctx = self._ctx
        req_type = f.req_type
        parsed = _REQ_TYPE_CACHE.get(req_type)
        if parsed is None:
            parsed = _req_type_info(req_type)
        operation, is_dir, protocol, needs_previous = parsed

        paths = f.access_paths
        # ONTAP sends WIN_NAME then UNIX_NAME; the first UNIX name, rooted, is taken as it is (as _pick_path does).
        if (
            len(paths) == 2
            and paths[0][0] != _UNIX
            and paths[1][0] == _UNIX
            and (name := paths[1][1])
            and name[0] == "/"
            and name[1:2] != "/"
        ):
            source: str | None = name
        else:
            source = _pick_path_tuple(paths)
        target = _pick_path_tuple(f.target_paths) if f.target_paths else None
        target_missing = False
        previous_path: str | None
        if target is not None:
            file_path = target
            previous_path = source or "/"
        elif needs_previous:
            file_path = previous_path = source or "/"
            target_missing = True
        else:
            file_path = source or "/"
            previous_path = None

        secs = received_at_us // _US_PER_SECOND
        prefix = _second_prefix.get(secs)
        received_at = (
            format_rfc3339_us(received_at_us)
            if prefix is None
            else f"{prefix}{received_at_us - secs * _US_PER_SECOND:06d}Z"
        )
        gt = f.generation_time
        if gt is not None and MIN_PLAUSIBLE_GENERATION_US <= gt < MAX_EPOCH_US:
            secs = gt // _US_PER_SECOND
            prefix = _second_prefix.get(secs)
            timestamp = format_rfc3339_us(gt) if prefix is None else f"{prefix}{gt - secs * _US_PER_SECOND:06d}Z"
            ts_source = "generation_time"
        else:
            timestamp = received_at
            ts_source = "received"

        uc = f.usr_context
        id_type = f.usr_id_type
        if uc is None:
            uid = sid = None
            user: dict[str, Any] = {} if id_type is None else {"id_type": id_type}
        else:
            kind, uid, sid = uc
            user = {"id_type": id_type or _KIND_TO_ID_TYPE.get(kind, kind)}
            if uid is not None:
                user["uid"] = uid
            if sid is not None:
                user["sid"] = sid
        client_ip = f.client_ip or None
        msid = f.vol_msid
        vs_uuid = ctx.vs_uuid

        identity: list[str | int | None] = [
            vs_uuid,
            msid,
            req_type,
            previous_path if previous_path is not None else file_path,
            target,
            gt,
            client_ip,
            uid,
            sid,
        ]
        if ts_source == "received":
            identity.append(ctx.session_id)
            identity.append(f.req_id)
        h = _NAMESPACE_SHA1.copy()
        h.update(orjson.dumps(identity))
        x = h.hexdigest()

        prot_ver = f.prot_ver
        metadata: dict[str, Any] = {
            "req_type": req_type,
            "req_id": f.req_id,
            "protocol": protocol,
            "protocol_version": None if prot_ver is None else f"{prot_ver[0]}.{prot_ver[1]}",
            "fpolicy_version": ctx.protocol_version,
            "is_directory": is_dir or f.file_type == "DIR",
            "file_type": f.file_type,
            "user": user,
            "vs_uuid": vs_uuid,
            "policy_name": ctx.policy_name,
            "session_id": ctx.session_id,
            "volume_msid": msid,
            "received_at": received_at,
            "routes": [],
            "timestamp_source": ts_source,
            "generation_time": gt,
            "node": ctx.peer,
        }
        owner = f.file_owner
        if owner is not None:
            metadata["file_owner"] = _user_tuple(owner, None)
        if f.display_path is not None:
            metadata["display_path"] = f.display_path
        if f.op_fields:
            metadata["op_fields"] = dict(f.op_fields)
        if target_missing:
            metadata["target_missing"] = True
        if source is None:
            metadata["path_missing"] = True
        if f.user_gids:
            metadata["user_gids"] = list(f.user_gids)
        if f.extra:
            metadata["extra"] = dict(f.extra)
        bound = self._path_max_chars
        if bound and (len(file_path) > bound or (previous_path is not None and len(previous_path) > bound)):
            file_path, previous_path = _cut_paths(file_path, previous_path, bound, metadata)

        volume = self._volumes.get(msid)
        if volume is None:
            volume = self._names.volume_name(msid)
            if len(self._volumes) >= self.VOLUME_CACHE_MAX:
                self._volumes.clear()
            self._volumes[msid] = volume
        size = f.file_size
        event: dict[str, Any] = {
            "event_id": f"{x[:8]}-{x[8:12]}-5{x[13:16]}-{_VARIANT_NIBBLE[x[16]]}{x[17:20]}-{x[20:32]}",
            "operation_type": operation,
            "file_path": file_path,
        }
        if previous_path is not None:
            event["previous_path"] = previous_path
        event["volume_name"] = volume
        event["svm_name"] = self._svm_name
        event["timestamp"] = timestamp
        event["file_size"] = size if size is not None and size > 0 else 0
        if client_ip is not None:
            event["client_ip"] = client_ip
        event["metadata"] = metadata
        return event, x
