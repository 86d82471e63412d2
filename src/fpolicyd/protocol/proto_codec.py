"""Protobuf-mode codec: payload bytes ⇄ :mod:`fpolicyd.protocol.messages`, on the PROVISIONAL schema.

The schema (``proto/fpolicy.proto``, compiled into :mod:`fpolicyd.protocol.fpolicy_pb2`) is unconfirmed: NetApp
has published none (``docs/protocol.md`` §9). This codec maps it onto the very dataclasses the XML codec
produces, in both directions, so the session, the normalizer and everything after them do not know which
format a connection speaks. One payload is one ``FPolicyMessage``; framing is the frame reader's job
(:mod:`fpolicyd.protocol.readers`).

- Unknown fields are never fatal: protobuf keeps them, and on a notification they are surfaced in
  ``ProtCommonInfo.extra`` as ``("protobuf_unknown/<path>", "<wire type>:<value>")`` (so they reach the event's
  metadata). A ``FileOperationNotification`` that carries only the public attempt's flat fields (1-14) is
  mapped as well as they allow; its fields with no XML counterpart go to ``extra`` too.
- :func:`walk_fields` dumps any payload without a schema (field number, wire type, value, nested messages
  tried recursively): what ``fpolicyd capture decode`` prints to confirm or correct the schema.

Every failure to decode raises :class:`~fpolicyd.errors.RemoteProtocolError`; nothing else escapes
:func:`decode_payload`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from google.protobuf.message import DecodeError, EncodeError
from google.protobuf.message import Message as PbMessage
from google.protobuf.unknown_fields import UnknownFieldSet

from fpolicyd.errors import LocalProtocolError, RemoteProtocolError
from fpolicyd.protocol import fpolicy_pb2 as pb
from fpolicyd.protocol.messages import (
    SCREEN_REQ_ALIASES,
    Alert,
    BackPressure,
    Handshake,
    HandshakeResp,
    Header,
    KeepAlive,
    Message,
    NotfType,
    Outage,
    PathName,
    PathNameType,
    ProtCommonInfo,
    ScreenCancel,
    ScreenRequest,
    ScreenResponse,
    StatusQuery,
    StatusQueryResp,
    UnknownMessage,
    UserContext,
    VolumeNotification,
)
from fpolicyd.protocol.req_types import REQ_TYPES, Operation
from fpolicyd.protocol.varint import MAX_VARINT_LEN, VarintEnd, decode_varint
from fpolicyd.protocol.xml_codec import Decoded

#: ``Header.data_format`` of every decoded protobuf message (XML mode's is ``XML``).
DATA_FORMAT: Final = "PROTOBUF"
#: Prefix of the ``ProtCommonInfo.extra`` names that carry fields the provisional schema does not know.
UNKNOWN_PREFIX: Final = "protobuf_unknown/"
#: Prefix of the public attempt's flat fields that have no XML counterpart, kept in ``extra``.
FLAT_PREFIX: Final = "protobuf/"
_U64: Final = 1 << 64

# --------------------------------------------------------------------------------------------------- decode


def _unknown_fields(message: pb.FPolicyMessage) -> list[tuple[str, str]]:
    """Every unknown field anywhere under ``message``, as (path, "wire_type:value").

    The walk visits every nested message from Python; a copy without unknown fields (discarded in C) that
    has the same size proves there is nothing to find, at a tenth of the cost.
    """
    known = pb.FPolicyMessage()
    known.CopyFrom(message)
    known.DiscardUnknownFields()
    if known.ByteSize() == message.ByteSize():
        return []
    out: list[tuple[str, str]] = []
    _collect_unknown(message, "", out)
    return out


def _collect_unknown(message: PbMessage, path: str, out: list[tuple[str, str]]) -> None:
    unknowns = UnknownFieldSet(message)
    for index in range(len(unknowns)):
        unknown = unknowns[index]
        out.append(
            (f"{UNKNOWN_PREFIX}{path}{unknown.field_number}", _describe_unknown(unknown.wire_type, unknown.data))
        )
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        items = value if descriptor.is_repeated else (value,)
        for index, item in enumerate(items):
            suffix = f"[{index}]" if descriptor.is_repeated else ""
            _collect_unknown(item, f"{path}{descriptor.name}{suffix}/", out)


def _describe_unknown(wire_type: int, data: object) -> str:
    if isinstance(data, bytes):
        return f"{wire_type}:{data.hex()}"
    if isinstance(data, UnknownFieldSet):
        return f"{wire_type}:group"
    return f"{wire_type}:{data}"


def _user(value: pb.UserContext, present: bool) -> UserContext | None:
    if not present:
        return None
    return UserContext(
        value.kind,
        uid=value.uid if value.HasField("uid") else None,
        sid=value.sid if value.HasField("sid") else None,
    )


def _paths(values: Iterable[pb.PathName]) -> tuple[PathName, ...]:
    return tuple(PathName(p.type, p.name) for p in values)


def _prot_common_info(value: pb.ProtCommonInfo, extra: list[tuple[str, str]]) -> ProtCommonInfo:
    has = value.HasField
    return ProtCommonInfo(
        client_ip=value.client_ip if has("client_ip") else None,
        generation_time=value.generation_time if has("generation_time") else None,
        usr_id_type=value.usr_id_type if has("usr_id_type") else None,
        usr_context=_user(value.usr_context, has("usr_context")),
        file_owner=_user(value.file_owner, has("file_owner")),
        access_paths=_paths(value.access_paths),
        vol_msid=value.vol_msid if has("vol_msid") else None,
        file_size=value.file_size if has("file_size") else None,
        num_hard_lnk=value.num_hard_lnk if has("num_hard_lnk") else None,
        is_offline=value.is_offline if has("is_offline") else None,
        file_type=value.file_type if has("file_type") else None,
        is_sparse=value.is_sparse if has("is_sparse") else None,
        is_dense=value.is_dense if has("is_dense") else None,
        extra=(*((e.name, e.value) for e in value.extra), *extra),
    )


#: Operation → the ``<OP>`` token of a ReqType, to rebuild a ReqType from the public attempt's flat fields.
_OP_TOKEN: Final = {
    Operation.CREATE: "CREAT",
    Operation.WRITE: "WR",
    Operation.DELETE: "DEL",
    Operation.RENAME: "REN",
    Operation.READ: "RD",
    Operation.OPEN: "OPEN",
    Operation.CLOSE: "CLOSE",
    Operation.SETATTR: "SET_ATTR",
    Operation.GETATTR: "GET_ATTR",
    Operation.LOOKUP: "LOOKUP",
    Operation.LINK: "LNK",
    Operation.SYMLINK: "SYM_LNK",
}


def _flat_req_type(value: pb.FileOperationNotification) -> str:
    """ReqType from the public attempt's ``protocol`` + ``operation_type`` (e.g. cifs + create → SMB_CREAT)."""
    op = value.operation_type.strip()
    if op.upper() in REQ_TYPES:
        return op.upper()
    proto = value.protocol.strip().upper()
    proto = {"CIFS": "SMB", "NFSV3": "NFS", "NFSV4": "NFS"}.get(proto, proto)
    try:
        token = _OP_TOKEN[Operation(op.lower())]
    except (ValueError, KeyError):
        token = op.upper()
    return f"{proto}_{token}" if proto else token


def _decode_file_operation(value: pb.FileOperationNotification, unknown: list[tuple[str, str]]) -> ScreenRequest:
    if value.HasField("req_id") or value.req_type or value.HasField("common"):
        req_type = value.req_type
        has_ver = value.HasField("prot_ver_major") or value.HasField("prot_ver_minor")
        return ScreenRequest(
            req_id=value.req_id,
            req_type=req_type,
            op_element=value.op_element,
            common=_prot_common_info(value.common, unknown),
            display_path=value.display_path if value.HasField("display_path") else None,
            prot_ver=(value.prot_ver_major, value.prot_ver_minor) if has_ver else None,
            user_gids=tuple(value.user_gids),
            target_paths=_paths(value.target_paths),
            op_fields=tuple((f.name, f.value) for f in value.op_fields),
        )
    # Only the public attempt's flat fields: map what has an XML counterpart, keep the rest in ``extra``.
    req_type = _flat_req_type(value)
    info = REQ_TYPES.get(req_type)
    timestamp = value.timestamp.strip()
    flat_extra = [
        (f"{FLAT_PREFIX}{name}", text)
        for name, text in (
            ("volume_name", value.volume_name),
            ("svm_name", value.svm_name),
            ("user_name", value.user_name),
            ("vs_uuid", value.vs_uuid),
            ("session_id", value.session_id),
            ("volume_uuid", value.volume_uuid),
            ("parent_path", value.parent_path),
            ("timestamp", "" if timestamp.isdigit() else timestamp),
        )
        if text
    ]
    size = value.file_size if value.HasField("file_size") else None
    common = ProtCommonInfo(
        client_ip=value.client_ip if value.HasField("client_ip") else None,
        generation_time=int(timestamp) if timestamp.isdigit() and int(timestamp) < _U64 else None,
        access_paths=(PathName(PathNameType.UNIX_NAME, value.file_path),) if value.file_path else (),
        file_size=size % _U64 if size is not None else None,
        extra=(*flat_extra, *unknown),
    )
    return ScreenRequest(
        req_id=0,
        req_type=req_type,
        op_element=info.element if info is not None else "",
        common=common,
        target_paths=(PathName(PathNameType.UNIX_NAME, value.new_path),) if value.new_path else (),
    )


def _notf_type(envelope: pb.FPolicyMessage, default: str) -> str:
    declared = envelope.header.notf_type if envelope.HasField("header") else ""
    return declared or default


def _body(envelope: pb.FPolicyMessage) -> tuple[str, Message]:
    """The message and its notf_type; a ScreenRequest keeps an alias header type such as ``NOTI_REQ``."""
    kind = envelope.WhichOneof("body")
    if kind == "file_operation":
        unknown = _unknown_fields(envelope)
        notf_type = _notf_type(envelope, NotfType.SCREEN_REQ)
        if notf_type != NotfType.SCREEN_REQ and notf_type not in SCREEN_REQ_ALIASES:
            notf_type = NotfType.SCREEN_REQ
        request = _decode_file_operation(envelope.file_operation, unknown)
        if notf_type != NotfType.SCREEN_REQ:
            request = ScreenRequest(
                request.req_id,
                request.req_type,
                request.op_element,
                request.common,
                request.display_path,
                request.prot_ver,
                request.user_gids,
                request.target_paths,
                request.op_fields,
                notf_type,
            )
        return notf_type, request
    if kind == "handshake_request":
        h = envelope.handshake_request
        return NotfType.NEGO_REQ, Handshake(h.vs_uuid, h.policy_name, h.session_id, tuple(h.versions))
    if kind == "handshake_response":
        r = envelope.handshake_response
        return NotfType.NEGO_RESP, HandshakeResp(r.vs_uuid, r.policy_name, r.session_id, r.prot_version)
    if kind == "keep_alive":
        return NotfType.KEEP_ALIVE, KeepAlive()
    if kind == "screen_response":
        s = envelope.screen_response
        return NotfType.SCREEN_RESP, ScreenResponse(s.req_id, s.req_type, s.notf_resp)
    if kind == "screen_cancel":
        c = envelope.screen_cancel
        return NotfType.SCREEN_CANCEL, ScreenCancel(c.req_id, c.req_type, c.cancel_reason)
    if kind == "status_query":
        q = envelope.status_query
        return NotfType.STATUS_QUERY_REQ, StatusQuery(q.req_id, q.req_type)
    if kind == "status_query_resp":
        qr = envelope.status_query_resp
        return NotfType.STATUS_QUERY_RESP, StatusQueryResp(qr.req_id, qr.req_type, qr.resp)
    if kind == "back_pressure":
        b = envelope.back_pressure
        notf = NotfType.BACK_PRESSURE_APPLY if b.apply else NotfType.BACK_PRESSURE_REM
        return notf, BackPressure(b.session_id, b.apply)
    if kind == "alert":
        a = envelope.alert
        return NotfType.ALERT_MSG, Alert(a.session_id, a.severity, a.message)
    if kind == "volume_notification":
        v = envelope.volume_notification
        return NotfType.VOL_NOTFICATION, VolumeNotification(
            v.vol_msid, v.action, v.is_active if v.HasField("is_active") else None
        )
    if kind == "outage":
        o = envelope.outage
        return NotfType.OUTAGE_MSG, Outage(o.file_path, o.policy_name, o.status)
    notf_type = _notf_type(envelope, "")
    if not notf_type:
        raise RemoteProtocolError("missing_body", "protobuf message with neither a known body nor header.notf_type")
    return notf_type, UnknownMessage(notf_type, envelope.unknown_body)


def decode_payload(payload: bytes) -> Decoded:
    """Decode one protobuf frame payload. Raises only :class:`RemoteProtocolError`."""
    envelope = pb.FPolicyMessage()
    try:
        envelope.ParseFromString(payload)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise RemoteProtocolError("bad_protobuf", f"FPolicyMessage: {exc}") from None
    notf_type, message = _body(envelope)
    return Decoded(Header(notf_type, len(payload), DATA_FORMAT), message, len(payload))


# --------------------------------------------------------------------------------------------------- encode


def _set_user(target: pb.UserContext, user: UserContext) -> None:
    target.SetInParent()
    target.kind = user.kind
    if user.uid is not None:
        target.uid = user.uid
    if user.sid is not None:
        target.sid = user.sid


def _set_common(target: pb.ProtCommonInfo, pci: ProtCommonInfo) -> None:
    if pci.client_ip is not None:
        target.client_ip = pci.client_ip
    if pci.generation_time is not None:
        target.generation_time = pci.generation_time
    if pci.usr_id_type is not None:
        target.usr_id_type = pci.usr_id_type
    if pci.usr_context is not None:
        _set_user(target.usr_context, pci.usr_context)
    if pci.file_owner is not None:
        _set_user(target.file_owner, pci.file_owner)
    target.access_paths.extend(pb.PathName(type=p.type, name=p.name) for p in pci.access_paths)
    if pci.vol_msid is not None:
        target.vol_msid = pci.vol_msid
    if pci.file_size is not None:
        target.file_size = pci.file_size
    if pci.num_hard_lnk is not None:
        target.num_hard_lnk = pci.num_hard_lnk
    if pci.is_offline is not None:
        target.is_offline = pci.is_offline
    if pci.file_type is not None:
        target.file_type = pci.file_type
    if pci.is_sparse is not None:
        target.is_sparse = pci.is_sparse
    if pci.is_dense is not None:
        target.is_dense = pci.is_dense
    target.extra.extend(pb.NamedValue(name=name, value=value) for name, value in pci.extra)


def _set_file_operation(target: pb.FileOperationNotification, msg: ScreenRequest) -> None:
    target.req_id = msg.req_id
    target.req_type = msg.req_type
    target.op_element = msg.op_element
    _set_common(target.common, msg.common)
    if msg.display_path is not None:
        target.display_path = msg.display_path
    if msg.prot_ver is not None:
        target.prot_ver_major, target.prot_ver_minor = msg.prot_ver
    target.user_gids.extend(msg.user_gids)
    target.target_paths.extend(pb.PathName(type=p.type, name=p.name) for p in msg.target_paths)
    target.op_fields.extend(pb.NamedValue(name=name, value=value) for name, value in msg.op_fields)


def to_protobuf(msg: Message) -> pb.FPolicyMessage:
    """The ``FPolicyMessage`` for one message (``header.notf_type`` always set)."""
    envelope = pb.FPolicyMessage()
    match msg:
        case ScreenRequest():
            envelope.header.notf_type = msg.notf_type
            _set_file_operation(envelope.file_operation, msg)
        case Handshake():
            envelope.header.notf_type = NotfType.NEGO_REQ
            h = envelope.handshake_request
            h.vs_uuid, h.policy_name, h.session_id = msg.vs_uuid, msg.policy_name, msg.session_id
            h.versions.extend(msg.versions)
        case HandshakeResp():
            envelope.header.notf_type = NotfType.NEGO_RESP
            r = envelope.handshake_response
            r.vs_uuid, r.policy_name, r.session_id, r.prot_version = (
                msg.vs_uuid,
                msg.policy_name,
                msg.session_id,
                msg.version,
            )
        case KeepAlive():
            envelope.header.notf_type = NotfType.KEEP_ALIVE
            envelope.keep_alive.SetInParent()
        case ScreenResponse():
            envelope.header.notf_type = NotfType.SCREEN_RESP
            s = envelope.screen_response
            s.req_id, s.req_type, s.notf_resp = msg.req_id, msg.req_type, msg.notf_resp
        case ScreenCancel():
            envelope.header.notf_type = NotfType.SCREEN_CANCEL
            c = envelope.screen_cancel
            c.req_id, c.req_type, c.cancel_reason = msg.req_id, msg.req_type, msg.cancel_reason
        case StatusQuery():
            envelope.header.notf_type = NotfType.STATUS_QUERY_REQ
            envelope.status_query.req_id, envelope.status_query.req_type = msg.req_id, msg.req_type
        case StatusQueryResp():
            envelope.header.notf_type = NotfType.STATUS_QUERY_RESP
            qr = envelope.status_query_resp
            qr.req_id, qr.req_type, qr.resp = msg.req_id, msg.req_type, msg.resp
        case BackPressure():
            envelope.header.notf_type = NotfType.BACK_PRESSURE_APPLY if msg.apply else NotfType.BACK_PRESSURE_REM
            envelope.back_pressure.session_id, envelope.back_pressure.apply = msg.session_id, msg.apply
        case Alert():
            envelope.header.notf_type = NotfType.ALERT_MSG
            a = envelope.alert
            a.session_id, a.severity, a.message = msg.session_id, msg.severity, msg.message
        case VolumeNotification():
            envelope.header.notf_type = NotfType.VOL_NOTFICATION
            v = envelope.volume_notification
            v.vol_msid, v.action = msg.vol_msid, msg.action
            if msg.is_active is not None:
                v.is_active = msg.is_active
        case Outage():
            envelope.header.notf_type = NotfType.OUTAGE_MSG
            o = envelope.outage
            o.file_path, o.policy_name, o.status = msg.file_path, msg.policy_name, msg.status
        case UnknownMessage():
            envelope.header.notf_type = msg.notf_type
            envelope.unknown_body = msg.body
    return envelope


def encode_message(msg: Message) -> bytes:
    """One message as an ``FPolicyMessage`` payload (unframed: the frame reader's ``frame`` wraps it)."""
    try:
        return to_protobuf(msg).SerializeToString()
    except (EncodeError, ValueError, TypeError) as exc:
        raise LocalProtocolError(f"cannot encode {type(msg).__name__} as protobuf: {exc}") from None


# ------------------------------------------------------------------------------------- schema-less walker

WIRE_TYPE_NAMES: Final = {0: "varint", 1: "i64", 2: "len", 3: "sgroup", 4: "egroup", 5: "i32"}
#: Nested LEN fields are tried as messages this deep at most (a crafted capture cannot recurse forever).
MAX_WALK_DEPTH: Final = 16


@dataclass(frozen=True, slots=True)
class RawField:
    """One field of a protobuf payload read without a schema.

    ``value`` is the integer of a varint/i64/i32 field or the bytes of a LEN field; ``children`` is set when a
    LEN field's bytes themselves parse completely as a message (it may still be a string that happens to).
    """

    number: int
    wire_type: int
    value: int | bytes
    children: tuple[RawField, ...] | None = None


class WireFormatError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint_error(end: int) -> WireFormatError:
    """Why :func:`~fpolicyd.protocol.varint.decode_varint` ending at ``end`` (a position ≥ 0: the value is 64
    bits or more) is not a protobuf varint."""
    if end == VarintEnd.TRUNCATED:
        return WireFormatError("truncated varint")
    if end == VarintEnd.TOO_LONG:
        return WireFormatError(f"varint longer than {MAX_VARINT_LEN} bytes")
    return WireFormatError("varint over 64 bits")


def walk_fields(data: bytes, depth: int = 0) -> tuple[RawField, ...]:
    """Every field of ``data`` in wire order. Raises :class:`WireFormatError` if it is not a message.

    Groups (wire types 3/4, deprecated) are refused; proto3 never emits them.
    """
    fields: list[RawField] = []
    pos = 0
    end = len(data)
    while pos < end:
        key, pos = decode_varint(data, pos)
        if pos < 0 or key >= _U64:
            raise _varint_error(pos)
        number, wire_type = key >> 3, key & 7
        if number == 0 or number >= 1 << 29:
            raise WireFormatError(f"invalid field number {number}")
        if wire_type == 0:
            value, pos = decode_varint(data, pos)
            if pos < 0 or value >= _U64:
                raise _varint_error(pos)
            fields.append(RawField(number, 0, value))
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            if pos + size > end:
                raise WireFormatError(f"truncated fixed field {number}")
            fields.append(RawField(number, wire_type, int.from_bytes(data[pos : pos + size], "little")))
            pos += size
        elif wire_type == 2:
            length, pos = decode_varint(data, pos)
            if pos < 0 or length >= _U64:
                raise _varint_error(pos)
            if pos + length > end:
                raise WireFormatError(f"field {number}: length {length} runs past the end")
            chunk = data[pos : pos + length]
            pos += length
            children: tuple[RawField, ...] | None = None
            if chunk and depth < MAX_WALK_DEPTH:
                try:
                    children = walk_fields(chunk, depth + 1)
                except WireFormatError:
                    children = None
            fields.append(RawField(number, 2, chunk, children))
        else:
            raise WireFormatError(f"field {number}: wire type {wire_type} ({WIRE_TYPE_NAMES.get(wire_type, '?')})")
    return tuple(fields)


def dump_fields(fields: Iterable[RawField], indent: str = "") -> list[str]:
    """Human-readable lines for :func:`walk_fields` output (strings shown when the bytes are UTF-8 text)."""
    lines: list[str] = []
    for f in fields:
        kind = WIRE_TYPE_NAMES[f.wire_type]
        if isinstance(f.value, int):
            lines.append(f"{indent}{f.number}: {kind} {f.value}")
            continue
        text = _printable(f.value)
        if text is not None:
            shown = repr(text)
        elif f.children is not None:
            shown = "message:"
        else:
            shown = f"0x{f.value.hex()}"
        lines.append(f"{indent}{f.number}: {kind}[{len(f.value)}] {shown}")
        if f.children is not None:
            lines.extend(dump_fields(f.children, indent + "  "))
    return lines


def _printable(data: bytes) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() else None
