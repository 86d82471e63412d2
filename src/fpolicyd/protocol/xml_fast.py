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
entities are decoded, integers are at most 19 ASCII digits (so within 0..2**64-1), and the decoder's
strip/last-one-wins/default rules are reproduced for the one shape that is accepted.

The regex is linear: every repetition and optional element is possessive (``*+``, ``?+``, Python ≥ 3.11), each
starts with a literal ``<`` or ``&`` that text cannot contain, and the body is capped at
:data:`MAX_FAST_BODY_BYTES`.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Final, NamedTuple

from fpolicyd.protocol.messages import PathName, ScreenRequest, UserContext

__all__ = [
    "MAX_FAST_BODY_BYTES",
    "PROT_VER_CACHE_SIZE",
    "USER_CACHE_MAX_CHARS",
    "USER_CACHE_SIZE",
    "PathTuple",
    "ScreenFields",
    "UserTuple",
    "fields_of",
    "scan_screen_request",
]

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

#: How many ``UsrContext``/``FileOwner`` contents are kept already read. A node's users repeat from event to
#: event, so most reads are hits; the bound (and the one on a content's length below) caps the memory a peer
#: that sends a new user every time can make us hold to about 1 MiB.
USER_CACHE_SIZE: Final = 4096
#: Longer contents are read every time, not kept. A Windows SID is under 200 characters; a mapped user with
#: one is under 250 with its tags.
USER_CACHE_MAX_CHARS: Final = 256
#: How many ``ProtVer`` contents are kept already read (each is two short numbers).
PROT_VER_CACHE_SIZE: Final = 64

# One character of element text: any XML character except '<' and '&' (markup), CR (XML turns CR and CRLF into
# LF, so text with CR is not read as written) and the C0 controls, surrogates and U+FFFE/U+FFFF XML forbids.
_CH: Final = r"[^<&\x00-\x08\x0b-\x1f\ud800-\udfff\ufffe\uffff]"
# Element text: such characters and the five standard entities, nothing else (no character references).
_TEXT: Final = rf"{_CH}*+(?:&(?:amp|lt|gt|quot|apos);{_CH}*+)*+"
# An unsigned integer as the decoder reads it: ASCII digits only (a str regex's \d takes any Unicode digit); at
# most 19 digits, so every accepted value is below 2**64-1 (20 digits) and int() stays cheap. No sign, no
# spaces, no underscores, no 20-digit values: those go to lxml.
_INT: Final = r"[0-9]{1,19}+"
_BOOL: Final = r"0|1|true|false"
# Element names accepted here: ASCII, no namespace prefix, far below libxml2's name length limit.
_NAME: Final = r"[A-Za-z][A-Za-z0-9]{0,63}+"
_PATH_TYPE: Final = r"[A-Za-z0-9_]*+"
_PATH: Final = rf"<Path><PathNameType>({_PATH_TYPE})</PathNameType><PathName>({_TEXT})</PathName></Path>"
_MORE_PATHS: Final = rf"(?:<Path><PathNameType>{_PATH_TYPE}</PathNameType><PathName>{_TEXT}</PathName></Path>)*+"
_USER: Final = (
    rf"<UnixUid>{_INT}</UnixUid>|<WinSid>{_TEXT}</WinSid>"
    rf"|<MappedId>(?:<Uid>{_INT}</Uid>)?+(?:<WinSid>{_TEXT}</WinSid>)?+</MappedId>"
)


def _opt(tag: str, value: str) -> str:
    """An optional element; its text (or content) is one group, None when the element is absent."""
    return rf"(?:<{tag}>({value})</{tag}>)?+"


def _paths_element(tag: str) -> str:
    """A path list. ONTAP sends one or two paths (WIN_NAME, UNIX_NAME): those are four groups (type, name, type,
    name), any further paths one more group, read with a second scan."""
    return rf"(?:<{tag}>(?:{_PATH}(?:{_PATH}({_MORE_PATHS}))?+)?+</{tag}>)?+"


_SCREEN_REQ: Final = re.compile(
    r'<\?xml version="1\.0"\?><FscreenReq>'
    rf"<ReqId>({_INT})</ReqId><ReqType>([A-Za-z0-9_]++)</ReqType>"
    rf"<NotfInfo><(?P<op>{_NAME})><CommonInfo><ProtCommonInfo>"
    + _opt("ClientIp", _TEXT)
    + _opt("GenerationTime", _INT)
    + _opt("UsrIdType", _TEXT)
    + _opt("UsrContext", f"(?:{_USER})?+")
    + _opt("FileOwner", f"(?:{_USER})?+")
    + _paths_element("AccessPath")
    + _opt("VolMsid", _INT)
    + _opt("FileSize", _INT)
    + _opt("NumHardLnk", _INT)
    + _opt("IsOfflineAttr", _BOOL)
    + _opt("FileType", _TEXT)
    + _opt("IsSparse", _BOOL)
    + _opt("IsDense", _BOOL)
    # Elements this version does not know, kept as extra: leaves only, after the known ones (that each closing
    # tag matches its opening one is checked when they are read).
    + rf"((?:<{_NAME}>{_TEXT}</{_NAME}>)*+)"
    + r"</ProtCommonInfo>"
    + _opt("DisplayPath", _TEXT)
    + _opt("ProtVer", rf"(?:<MajorNum>{_INT}</MajorNum>)?+(?:<MinorNum>{_INT}</MinorNum>)?+")
    # UserGids as <Gid> children (group 1) or as a comma/space separated list (group 2).
    + rf"(?:<UserGids>(?:((?:<Gid>{_TEXT}</Gid>)++)|({_TEXT}))</UserGids>)?+"
    + r"</CommonInfo>"
    + _paths_element("TargetAccessPath")
    # Operation fields: leaves, or elements of leaves (SetAttrMtime/Secs), flattened when read.
    + rf"((?:<(?P<f>{_NAME})>(?:{_TEXT}|(?:<(?P<g>{_NAME})>{_TEXT}</(?P=g)>)++)</(?P=f)>)*+)"
    + r"</(?P=op)></NotfInfo></FscreenReq>"
).fullmatch

# Reading regions the regex above has already validated, character by character: these only split them up
# (and check that the closing tags of extras match, which the regex above leaves to them).
_PATH_ITEMS: Final = re.compile(r"<PathNameType>([^<]*)</PathNameType><PathName>([^<]*)</PathName>").findall
_GID_ITEMS: Final = re.compile(r"<Gid>([^<]*)</Gid>").findall
_LEAVES_OK: Final = re.compile(r"(?:<([A-Za-z0-9]++)>[^<]*+</\1>)*+").fullmatch
_LEAF_ITEMS: Final = re.compile(r"<([A-Za-z0-9]++)>([^<]*+)</").findall
_OP_LEAVES: Final = re.compile(r"<([A-Za-z0-9]++)>([^<]*+)</\1>").findall
# One op field: a leaf (text in group 2) or an element of leaves (children in group 3).
_OP_ITEMS: Final = re.compile(
    r"<([A-Za-z0-9]++)>(?:([^<]*+)</\1>|((?:<[A-Za-z0-9]++>[^<]*+</[A-Za-z0-9]++>)++)</\1>)"
).findall
_USER_CHOICE: Final = re.compile(
    r"<UnixUid>([0-9]++)</UnixUid>|<WinSid>([^<]*+)</WinSid>"
    r"|<MappedId>(?:<Uid>([0-9]++)</Uid>)?+(?:<WinSid>([^<]*+)</WinSid>)?+</MappedId>"
).fullmatch

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
_BOOLS: Final = {"0": False, "false": False, "1": True, "true": True}


def _entity(match: re.Match[str]) -> str:
    return _ENTITIES[match[1]]


def _unescape(text: str) -> str:
    return _ENTITY.sub(_entity, text) if "&" in text else text


def _read_user(content: str) -> UserTuple | None:
    """A validated ``UsrContext``/``FileOwner`` content, read as ``xml_codec._decode_user`` reads it."""
    m = _USER_CHOICE(content)
    if m is None:  # the empty element: no choice, no user
        return None
    unix_uid, win_sid, uid, sid = m.groups()
    if unix_uid is not None:
        return ("UnixUid", int(unix_uid), None)
    if win_sid is not None:
        return ("WinSid", None, _unescape(win_sid).strip())
    return ("MappedId", None if uid is None else int(uid), None if sid is None else _unescape(sid).strip())


_cached_user: Final = lru_cache(maxsize=USER_CACHE_SIZE)(_read_user)


@lru_cache(maxsize=PROT_VER_CACHE_SIZE)
def _prot_ver(content: str) -> tuple[int, int]:
    """A validated ``ProtVer`` content; a missing number is 0, as the decoder has it."""
    major = minor = 0
    for tag, value in _LEAF_ITEMS(content):
        if tag == "MajorNum":
            major = int(value)
        else:
            minor = int(value)
    return (major, minor)


def _paths(
    type1: str | None, name1: str, type2: str | None, name2: str, more: str | None, *, amp: bool
) -> tuple[PathTuple, ...]:
    if type1 is None:
        return ()
    if amp:
        name1 = _unescape(name1)
    if type2 is None:
        return ((type1, name1),)
    if amp:
        name2 = _unescape(name2)
    if not more:
        return ((type1, name1), (type2, name2))
    items = _PATH_ITEMS(more)
    if amp:
        items = [(kind, _unescape(name)) for kind, name in items]
    return ((type1, name1), (type2, name2), *items)


def _extra(region: str, amp: bool) -> tuple[tuple[str, str], ...] | None:
    if _LEAVES_OK(region) is None:
        return None
    items = _LEAF_ITEMS(region)
    for tag, _text in items:
        if tag in _PCI_TAGS:
            return None
    if amp:
        return tuple([(tag, _unescape(value)) for tag, value in items])
    return tuple(items)


def _op_fields(region: str, amp: bool) -> tuple[tuple[str, str], ...] | None:
    # The decoder reads these by name instead of flattening them; nested or not, such a body goes to lxml.
    if "<CommonInfo>" in region or "<TargetAccessPath>" in region:
        return None
    leaves = _OP_LEAVES(region)
    if len(leaves) * 2 == region.count("<"):  # no element of elements: the (tag, text) pairs are the fields
        return tuple([(tag, _unescape(text)) for tag, text in leaves]) if amp else tuple(leaves)
    out: list[tuple[str, str]] = []
    for tag, text, children in _OP_ITEMS(region):
        if children:
            out.extend((f"{tag}/{child}", _unescape(value) if amp else value) for child, value in _LEAF_ITEMS(children))
        else:
            out.append((tag, _unescape(text) if amp else text))
    return tuple(out)


def _user_gids(children: str | None, text: str | None, amp: bool) -> tuple[str, ...]:
    if children is not None:
        return tuple([(_unescape(g) if amp else g).strip() for g in _GID_ITEMS(children)])
    if text:
        return tuple((_unescape(text) if amp else text).replace(",", " ").split())
    return ()


_new_fields: Final = tuple.__new__


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
    # "]]>" can only be in element text (no tag contains "]"); "]" first: a single-character scan is far faster.
    if m is None or ("]" in text and "]]>" in text):
        return None
    (
        req_id,
        req_type,
        op,
        client_ip,
        generation_time,
        usr_id_type,
        usr_context,
        file_owner,
        a_type1,
        a_name1,
        a_type2,
        a_name2,
        a_more,
        vol_msid,
        file_size,
        num_hard_lnk,
        is_offline,
        file_type,
        is_sparse,
        is_dense,
        extra_region,
        display_path,
        prot_ver,
        gid_children,
        gid_text,
        t_type1,
        t_name1,
        t_type2,
        t_name2,
        t_more,
        op_region,
        _op_tag,
        _op_child_tag,
    ) = m.groups()
    # Entities can only be in element text (no tag contains "&"), so without "&" nothing needs decoding.
    amp = "&" in text
    if amp:
        client_ip, usr_id_type, file_type, display_path = [
            None if value is None else _unescape(value) for value in (client_ip, usr_id_type, file_type, display_path)
        ]
    extra: tuple[tuple[str, str], ...] | None = ()
    if extra_region:
        extra = _extra(extra_region, amp)
        if extra is None:
            return None
    op_fields: tuple[tuple[str, str], ...] | None = ()
    if op_region:
        op_fields = _op_fields(op_region, amp)
        if op_fields is None:
            return None
    return _new_fields(
        ScreenFields,
        (
            int(req_id),
            req_type,
            op,
            None if client_ip is None else client_ip.strip(),
            None if generation_time is None else int(generation_time),
            None if usr_id_type is None else usr_id_type.strip(),
            None
            if usr_context is None
            else _cached_user(usr_context)
            if len(usr_context) <= USER_CACHE_MAX_CHARS
            else _read_user(usr_context),
            None
            if file_owner is None
            else _cached_user(file_owner)
            if len(file_owner) <= USER_CACHE_MAX_CHARS
            else _read_user(file_owner),
            # The common shape (two paths, no entity) is built here rather than in a call.
            ((a_type1, a_name1), (a_type2, a_name2))
            if a_more == "" and not amp
            else _paths(a_type1, a_name1, a_type2, a_name2, a_more, amp=amp),
            None if vol_msid is None else int(vol_msid),
            None if file_size is None else int(file_size),
            None if num_hard_lnk is None else int(num_hard_lnk),
            None if is_offline is None else _BOOLS[is_offline],
            None if file_type is None else file_type.strip(),
            None if is_sparse is None else _BOOLS[is_sparse],
            None if is_dense is None else _BOOLS[is_dense],
            extra,
            display_path,
            None if prot_ver is None else _prot_ver(prot_ver),
            () if gid_children is None and not gid_text else _user_gids(gid_children, gid_text, amp),
            ((t_type1, t_name1), (t_type2, t_name2))
            if t_more == "" and not amp
            else _paths(t_type1, t_name1, t_type2, t_name2, t_more, amp=amp),
            op_fields,
        ),
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
