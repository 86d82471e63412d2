"""Fast path for ONTAP's canonical SCREEN_REQ body: one regex scan instead of an lxml parse and tree walk.

ONTAP renders every ``FscreenReq`` in one byte layout (the captures in ``tests/data`` and the simulator's
renderer): no whitespace between elements, no attributes, comments, CDATA or DOCTYPE, elements in a fixed order.
:func:`scan_screen_request` recognises exactly that layout with a single anchored regex and returns its fields
as plain tuples; anything else (other spacing or order, a character reference, an unexpected or repeated
element, a value it cannot read exactly) returns None, and the caller decodes the body with the hardened lxml
decoder of :mod:`fpolicyd.protocol.xml_codec` instead. It is a shortcut for one layout, not a lenient parser.

The invariant, proven by ``tests/property/test_xml_fast.py`` against lxml: for every body ``b``,
``scan_screen_request(b)`` is None or equals :func:`fields_of` of the ``ScreenRequest`` that ``decode_payload``
makes of a SCREEN_REQ with body ``b``. In particular it accepts nothing lxml rejects: the text of every element
is restricted to XML characters other than CR (which XML normalises), ``]]>`` is refused, only the five standard
entities are decoded, integers are ASCII digits in 0..2**64-1, and the decoder's strip/last-one-wins/default
rules are reproduced for the one shape that is accepted.

The regex is linear: every repetition and optional element is possessive (``*+``, ``?+``, Python ≥ 3.11), each
starts with a literal ``<`` or ``&`` that text cannot contain, and the body is capped at
:data:`MAX_FAST_BODY_BYTES`.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

from fpolicyd.protocol.messages import PathName, ScreenRequest, UserContext

__all__ = ["MAX_FAST_BODY_BYTES", "PathTuple", "ScreenFields", "UserTuple", "fields_of", "scan_screen_request"]

UserTuple = tuple[str, int | None, str | None]
"""``(kind, uid, sid)``; kind is ``"UnixUid"``, ``"WinSid"`` or ``"MappedId"``."""
PathTuple = tuple[str, str]
"""``(PathNameType, PathName)``."""


class ScreenFields(NamedTuple):
    """Every field of a ``ScreenRequest`` except ``notf_type`` (a header matter), flat and in wire order."""

    req_id: int
    req_type: str
    op_element: str  # e.g. "SmbRenReq"
    client_ip: str | None
    generation_time: int | None
    usr_id_type: str | None
    usr_context: UserTuple | None
    file_owner: UserTuple | None
    access_paths: tuple[PathTuple, ...]
    vol_msid: int | None
    file_size: int | None
    num_hard_lnk: int | None
    is_offline: bool | None
    file_type: str | None
    is_sparse: bool | None
    is_dense: bool | None
    extra: tuple[tuple[str, str], ...]  # unknown ProtCommonInfo children (tag, text)
    display_path: str | None
    prot_ver: tuple[int, int] | None
    user_gids: tuple[str, ...]
    target_paths: tuple[PathTuple, ...]
    op_fields: tuple[tuple[str, str], ...]  # flattened "A/B" names as the lxml decoder produces


#: Bodies above this go to lxml. A real SCREEN_REQ is 1–2 KiB (paths are at most a few KiB); the cap bounds
#: the scan's cost and keeps every accepted document far below libxml2's own limits (names, text, depth).
MAX_FAST_BODY_BYTES: Final = 64 * 1024

_U64_MAX: Final = 2**64 - 1

# One character of element text: any XML character except '<' and '&' (markup), CR (XML turns CR and CRLF into
# LF, so text with CR is not read as written) and the C0 controls, surrogates and U+FFFE/U+FFFF XML forbids.
_CH: Final = r"[^<&\x00-\x08\x0b-\x1f\ud800-\udfff\ufffe\uffff]"
# Element text: such characters and the five standard entities, nothing else (no character references).
_TEXT: Final = rf"{_CH}*+(?:&(?:amp|lt|gt|quot|apos);{_CH}*+)*+"
# An unsigned integer as the decoder reads it: ASCII digits only (a str regex's \d takes any Unicode digit); at
# most 20 digits so int() stays cheap, and 2**64-1 has 20. No sign, no spaces, no underscores: those go to lxml.
_INT: Final = r"[0-9]{1,20}+"
_BOOL: Final = r"0|1|true|false"
# Element names accepted here: ASCII, no namespace prefix, far below libxml2's name length limit.
_NAME: Final = r"[A-Za-z][A-Za-z0-9]{0,63}+"
_PATHS: Final = rf"(?:<Path><PathNameType>[A-Za-z0-9_]*+</PathNameType><PathName>{_TEXT}</PathName></Path>)*+"


def _user(tag: str) -> str:
    """``UsrContext``/``FileOwner``: empty, or one choice. Groups: UnixUid, WinSid, MappedId mark, Uid, WinSid."""
    return (
        rf"(?:<{tag}>(?:<UnixUid>({_INT})</UnixUid>|<WinSid>({_TEXT})</WinSid>"
        rf"|(<MappedId>)(?:<Uid>({_INT})</Uid>)?+(?:<WinSid>({_TEXT})</WinSid>)?+</MappedId>)?+</{tag}>)?+"
    )


def _opt(tag: str, value: str) -> str:
    return rf"(?:<{tag}>({value})</{tag}>)?+"


_SCREEN_REQ: Final = re.compile(
    r'<\?xml version="1\.0"\?><FscreenReq>'
    rf"<ReqId>({_INT})</ReqId><ReqType>([A-Za-z0-9_]++)</ReqType>"
    rf"<NotfInfo><(?P<op>{_NAME})><CommonInfo><ProtCommonInfo>"
    + _opt("ClientIp", _TEXT)
    + _opt("GenerationTime", _INT)
    + _opt("UsrIdType", _TEXT)
    + _user("UsrContext")
    + _user("FileOwner")
    + _opt("AccessPath", _PATHS)
    + _opt("VolMsid", _INT)
    + _opt("FileSize", _INT)
    + _opt("NumHardLnk", _INT)
    + _opt("IsOfflineAttr", _BOOL)
    + _opt("FileType", _TEXT)
    + _opt("IsSparse", _BOOL)
    + _opt("IsDense", _BOOL)
    # Elements this version does not know, kept as extra: leaves only, after the known ones.
    + rf"((?:<(?P<x>{_NAME})>{_TEXT}</(?P=x)>)*+)"
    + r"</ProtCommonInfo>"
    + _opt("DisplayPath", _TEXT)
    + rf"(?:(<ProtVer>)(?:<MajorNum>({_INT})</MajorNum>)?+(?:<MinorNum>({_INT})</MinorNum>)?+</ProtVer>)?+"
    + rf"(?:<UserGids>(?:((?:<Gid>{_TEXT}</Gid>)++)|({_TEXT}))</UserGids>)?+"
    + r"</CommonInfo>"
    + _opt("TargetAccessPath", _PATHS)
    # Operation fields: leaves, or elements of leaves (SetAttrMtime/Secs); flattened below.
    + rf"((?:<(?P<f>{_NAME})>(?:{_TEXT}|(?:<(?P<g>{_NAME})>{_TEXT}</(?P=g)>)++)</(?P=f)>)*+)"
    + r"</(?P=op)></NotfInfo></FscreenReq>"
).fullmatch

# Extraction from regions the regex above has already validated (so these need not re-check anything).
_PATH_ITEMS: Final = re.compile(r"<PathNameType>([^<]*)</PathNameType><PathName>([^<]*)</PathName>").findall
_GID_ITEMS: Final = re.compile(r"<Gid>([^<]*)</Gid>").findall
_LEAF_ITEMS: Final = re.compile(r"<([A-Za-z0-9]+)>([^<]*)</[A-Za-z0-9]+>").findall
# One op field: a leaf (text in group 2) or an element of leaves (children in group 3).
_OP_ITEMS: Final = re.compile(r"<([A-Za-z0-9]+)>(?:([^<]*)|((?:<[A-Za-z0-9]+>[^<]*</[A-Za-z0-9]+>)+))</\1>").findall

_ENTITY: Final = re.compile(r"&(amp|lt|gt|quot|apos);")
_ENTITIES: Final = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}

#: ProtCommonInfo children the decoder reads by name: one of these among the extras would not be an extra.
_PCI_TAGS: Final = frozenset(
    {
        "ClientIp",
        "GenerationTime",
        "UsrIdType",
        "UsrContext",
        "FileOwner",
        "AccessPath",
        "VolMsid",
        "FileSize",
        "NumHardLnk",
        "IsOfflineAttr",
        "FileType",
        "IsSparse",
        "IsDense",
    }
)
#: Operation children the decoder does not flatten.
_OP_RESERVED: Final = frozenset({"CommonInfo", "TargetAccessPath"})
_BOOLS: Final = {"0": False, "false": False, "1": True, "true": True}


def _entity(match: re.Match[str]) -> str:
    return _ENTITIES[match[1]]


def _unescape(text: str) -> str:
    return _ENTITY.sub(_entity, text) if "&" in text else text


def _opt_int(text: str | None) -> int | None:
    return None if text is None else int(text)


def _opt_text(text: str | None, amp: bool) -> str | None:
    if text is None or not amp:
        return text
    return _unescape(text)


def _opt_stripped(text: str | None, amp: bool) -> str | None:
    if text is None:
        return None
    return (_unescape(text) if amp else text).strip()


def _user_tuple(
    unix_uid: str | None, win_sid: str | None, mapped: str | None, uid: str | None, sid: str | None, amp: bool
) -> UserTuple | None:
    if unix_uid is not None:
        return ("UnixUid", int(unix_uid), None)
    if win_sid is not None:
        return ("WinSid", None, (_unescape(win_sid) if amp else win_sid).strip())
    if mapped is not None:
        return ("MappedId", _opt_int(uid), _opt_stripped(sid, amp))
    return None


def _paths(region: str | None, amp: bool) -> tuple[PathTuple, ...]:
    if not region:
        return ()
    items = _PATH_ITEMS(region)
    if amp:
        return tuple([(kind, _unescape(name)) for kind, name in items])
    return tuple(items)


def _op_fields(region: str, amp: bool) -> tuple[tuple[str, str], ...] | None:
    out: list[tuple[str, str]] = []
    for tag, text, children in _OP_ITEMS(region):
        if tag in _OP_RESERVED:
            return None
        if children:
            out.extend((f"{tag}/{child}", _unescape(value) if amp else value) for child, value in _LEAF_ITEMS(children))
        else:
            out.append((tag, _unescape(text) if amp else text))
    return tuple(out)


def scan_screen_request(body_xml: bytes) -> ScreenFields | None:
    """The fields of a canonical ``FscreenReq`` body, or None if the body is not in ONTAP's canonical layout.

    ``body_xml`` is the body part of a payload as :func:`~fpolicyd.protocol.framing.split_payload` returns it.
    Never raises; None means "decode it with lxml" (which may then accept it, or raise the peer error).
    """
    if len(body_xml) > MAX_FAST_BODY_BYTES:
        return None
    try:
        text = body_xml.decode()
    except UnicodeDecodeError:
        return None
    m = _SCREEN_REQ(text)
    if m is None or "]]>" in text:
        return None
    (
        req_id,
        req_type,
        op,
        client_ip,
        generation_time,
        usr_id_type,
        u_unix,
        u_win,
        u_mapped,
        u_uid,
        u_sid,
        o_unix,
        o_win,
        o_mapped,
        o_uid,
        o_sid,
        access,
        vol_msid,
        file_size,
        num_hard_lnk,
        is_offline,
        file_type,
        is_sparse,
        is_dense,
        extra_region,
        _extra_tag,
        display_path,
        prot_ver_mark,
        major,
        minor,
        gid_children,
        gid_text,
        target,
        op_region,
        _op_tag,
        _op_child_tag,
    ) = m.groups()
    amp = "&" in text
    # Integers of up to 20 digits can still exceed 2**64-1, which the decoder refuses.
    for number in (req_id, generation_time, vol_msid, file_size, num_hard_lnk, u_unix, u_uid, o_unix, o_uid):
        if number is not None and len(number) == 20 and int(number) > _U64_MAX:
            return None
    if major is not None and len(major) == 20 and int(major) > _U64_MAX:
        return None
    if minor is not None and len(minor) == 20 and int(minor) > _U64_MAX:
        return None

    extra: tuple[tuple[str, str], ...] = ()
    if extra_region:
        items = _LEAF_ITEMS(extra_region)
        if any(tag in _PCI_TAGS for tag, _ in items):
            return None
        extra = tuple([(tag, _unescape(value)) for tag, value in items]) if amp else tuple(items)
    op_fields: tuple[tuple[str, str], ...] = ()
    if op_region:
        fields = _op_fields(op_region, amp)
        if fields is None:
            return None
        op_fields = fields

    user_gids: tuple[str, ...] = ()
    if gid_children is not None:
        user_gids = tuple([(_unescape(g) if amp else g).strip() for g in _GID_ITEMS(gid_children)])
    elif gid_text:
        user_gids = tuple((_unescape(gid_text) if amp else gid_text).replace(",", " ").split())

    return ScreenFields(
        int(req_id),
        req_type,
        op,
        _opt_stripped(client_ip, amp),
        _opt_int(generation_time),
        _opt_stripped(usr_id_type, amp),
        _user_tuple(u_unix, u_win, u_mapped, u_uid, u_sid, amp),
        _user_tuple(o_unix, o_win, o_mapped, o_uid, o_sid, amp),
        _paths(access, amp),
        _opt_int(vol_msid),
        _opt_int(file_size),
        _opt_int(num_hard_lnk),
        None if is_offline is None else _BOOLS[is_offline],
        _opt_stripped(file_type, amp),
        None if is_sparse is None else _BOOLS[is_sparse],
        None if is_dense is None else _BOOLS[is_dense],
        extra,
        _opt_text(display_path, amp),
        None if prot_ver_mark is None else (0 if major is None else int(major), 0 if minor is None else int(minor)),
        user_gids,
        _paths(target, amp),
        op_fields,
    )


def _user_of(user: UserContext | None) -> UserTuple | None:
    return None if user is None else (user.kind, user.uid, user.sid)


def _paths_of(paths: tuple[PathName, ...]) -> tuple[PathTuple, ...]:
    return tuple([(p.type, p.name) for p in paths])


def fields_of(request: ScreenRequest) -> ScreenFields:
    """The same fields from a decoded (or built) ``ScreenRequest``; ``notf_type`` is not among them."""
    c = request.common
    return ScreenFields(
        request.req_id,
        request.req_type,
        request.op_element,
        c.client_ip,
        c.generation_time,
        c.usr_id_type,
        _user_of(c.usr_context),
        _user_of(c.file_owner),
        _paths_of(c.access_paths),
        c.vol_msid,
        c.file_size,
        c.num_hard_lnk,
        c.is_offline,
        c.file_type,
        c.is_sparse,
        c.is_dense,
        c.extra,
        request.display_path,
        request.prot_ver,
        request.user_gids,
        _paths_of(request.target_paths),
        request.op_fields,
    )
