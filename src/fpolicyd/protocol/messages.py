"""The FPolicy messages as frozen dataclasses (``docs/protocol.md`` §2–§6), whatever the wire format.

Both codecs produce and consume these types (:mod:`fpolicyd.protocol.xml_codec` for XML mode,
:mod:`fpolicyd.protocol.proto_codec` for protobuf mode), so everything after them works on one model.
Fields mirror the wire elements; every element ONTAP documents as optional is ``None``/empty when absent.
Values ONTAP may extend (``ReqType``, ``FileType``, ``UsrIdType`` …) are kept as the exact wire strings so
that an unknown value survives to the event instead of failing the parse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class NotfType(StrEnum):
    """``Header/NotfType`` values that exist on the wire (SCHEMA header enum)."""

    NEGO_REQ = "NEGO_REQ"
    NEGO_RESP = "NEGO_RESP"
    SCREEN_REQ = "SCREEN_REQ"
    SCREEN_RESP = "SCREEN_RESP"
    SCREEN_CANCEL = "SCREEN_CANCEL"
    STATUS_QUERY_REQ = "STATUS_QUERY_REQ"
    STATUS_QUERY_RESP = "STATUS_QUERY_RESP"
    BACK_PRESSURE_APPLY = "BACK_PRESSURE_APPLY"
    BACK_PRESSURE_REM = "BACK_PRESSURE_REM"
    KEEP_ALIVE = "KEEP_ALIVE"
    ALERT_MSG = "ALERT_MSG"
    VOL_NOTFICATION = "VOL_NOTFICATION"  # sic: ONTAP's spelling
    OUTAGE_MSG = "OUTAGE_MSG"


#: Header types that public servers invented and that a user's existing tooling may still send to us
#: (e.g. a test harness written against the reference server). They are read as SCREEN_REQ.
SCREEN_REQ_ALIASES: frozenset[str] = frozenset({"NOTI_REQ"})


class PathNameType(StrEnum):
    WIN_NAME = "WIN_NAME"
    WIN_8_3_NAME = "WIN_8_3_NAME"
    UNIX_NAME = "UNIX_NAME"


class UserKind(StrEnum):
    """Which choice of the ``UsrContext``/``FileOwner`` choice type was sent."""

    UNIX_UID = "UnixUid"
    WIN_SID = "WinSid"
    MAPPED_ID = "MappedId"


#: ``FscreenResp/NotfResp`` codes (SCHEMA): 1 allow, 2 deny; 3–7 need protocol ≥ 1.1.
ALLOW = 1
DENY = 2

#: ``FscreenStatusResp/Resp`` codes: 1 still working, 2 request lost.
STATUS_IN_PROGRESS = 1
STATUS_REQUEST_LOST = 2


@dataclass(frozen=True, slots=True)
class Header:
    notf_type: str
    content_len: int
    data_format: str = "XML"


@dataclass(frozen=True, slots=True)
class Handshake:
    """NEGO_REQ body. ``versions`` keeps the offer order."""

    vs_uuid: str
    policy_name: str
    session_id: str
    versions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class HandshakeResp:
    """NEGO_RESP body: ids echoed byte for byte, one version chosen from the offer."""

    vs_uuid: str
    policy_name: str
    session_id: str
    version: str


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """Header-only liveness message; nothing is answered."""


@dataclass(frozen=True, slots=True)
class PathName:
    type: str
    name: str


@dataclass(frozen=True, slots=True)
class UserContext:
    """``UsrContext``/``FileOwner``: a UNIX uid, a Windows SID, or both (MappedId)."""

    kind: str
    uid: int | None = None
    sid: str | None = None


@dataclass(frozen=True, slots=True)
class ProtCommonInfo:
    client_ip: str | None = None
    generation_time: int | None = None
    usr_id_type: str | None = None
    usr_context: UserContext | None = None
    file_owner: UserContext | None = None
    access_paths: tuple[PathName, ...] = ()
    vol_msid: int | None = None
    file_size: int | None = None
    num_hard_lnk: int | None = None
    is_offline: bool | None = None
    file_type: str | None = None
    is_sparse: bool | None = None
    is_dense: bool | None = None
    #: Elements this version of fpolicyd does not know, as (tag, text), kept rather than dropped.
    extra: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ScreenRequest:
    """A file notification (SCREEN_REQ / ``FscreenReq``), sync or async.

    ``op_fields`` are the operation element's children after ``CommonInfo`` other than ``TargetAccessPath``,
    in wire order, as (path, text); a nested element such as ``SetAttrMtime/Secs`` is flattened with ``/``.
    """

    req_id: int
    req_type: str
    op_element: str
    common: ProtCommonInfo
    display_path: str | None = None
    prot_ver: tuple[int, int] | None = None
    user_gids: tuple[str, ...] = ()
    target_paths: tuple[PathName, ...] = ()
    op_fields: tuple[tuple[str, str], ...] = ()
    #: The header type it arrived as (``SCREEN_REQ``, or an alias such as ``NOTI_REQ``).
    notf_type: str = NotfType.SCREEN_REQ


@dataclass(frozen=True, slots=True)
class ScreenResponse:
    req_id: int
    req_type: str
    notf_resp: int = ALLOW


@dataclass(frozen=True, slots=True)
class ScreenCancel:
    """``CancelReason`` is an integer per SCHEMA but its own sample carries text: kept as sent."""

    req_id: int
    req_type: str
    cancel_reason: str


@dataclass(frozen=True, slots=True)
class StatusQuery:
    req_id: int
    req_type: str


@dataclass(frozen=True, slots=True)
class StatusQueryResp:
    req_id: int
    req_type: str
    resp: int = STATUS_IN_PROGRESS


@dataclass(frozen=True, slots=True)
class BackPressure:
    session_id: str
    apply: bool


@dataclass(frozen=True, slots=True)
class Alert:
    session_id: str
    severity: str
    message: str

    @property
    def is_fatal(self) -> bool:
        return self.severity.upper() == "FATAL"


@dataclass(frozen=True, slots=True)
class VolumeNotification:
    vol_msid: int
    action: str
    is_active: bool | None = None


@dataclass(frozen=True, slots=True)
class Outage:
    file_path: str
    policy_name: str
    status: str


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    """A header type fpolicyd does not know; logged and ignored, never fatal."""

    notf_type: str
    body: bytes = field(default=b"", repr=False)


Message = (
    Handshake
    | HandshakeResp
    | KeepAlive
    | ScreenRequest
    | ScreenResponse
    | ScreenCancel
    | StatusQuery
    | StatusQueryResp
    | BackPressure
    | Alert
    | VolumeNotification
    | Outage
    | UnknownMessage
)
