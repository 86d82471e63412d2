"""SCREEN_REQ payloads in ONTAP's canonical byte layout with awkward values, and byte-level damage to them, for the
differential tests of the C accelerator (``tests/property/test_speedups.py``, ``tests/unit/test_ingest.py``).

:func:`canonical_payloads` writes the layout ``xml_fast`` accepts element by element (every optional element
present or not, in its place), with the values that test how exactly text is read and re-encoded: every
whitespace character ``str.strip``/``str.split`` know (ASCII, NEL, NBSP, U+2000…, U+2028/2029, U+3000), the five
entities and the characters they stand for, JSON's specials (``"``, ``\\``, TAB, LF, DEL, C1 controls), non-BMP
and non-characters XML allows, leading ``/``\\``\\`` runs in paths, empty elements and values, repeated extras and
op fields, integers at the plausibility and range boundaries. :func:`damaged_payloads` flips, drops, inserts,
repeats and cuts bytes of such payloads. :func:`python_event` is the oracle: the Python path's event for a
payload (canonical fast path, else lxml), or None when it makes none.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from fpolicyd.errors import RemoteProtocolError
from fpolicyd.events import MAX_EPOCH_US, MIN_PLAUSIBLE_GENERATION_US, EventBuilder
from fpolicyd.protocol.messages import ScreenRequest
from fpolicyd.protocol.req_types import REQ_TYPES
from fpolicyd.protocol.xml_codec import decode_payload, encode_header, fast_screen
from fpolicyd.protocol.xml_fast import ScreenFields, fields_of

# ------------------------------------------------------------------------------------------------- oracle


def python_fields(payload: bytes) -> ScreenFields | None:
    """What the Python ingest path reads from a payload as a SCREEN_REQ event on an active session: the canonical
    fast path, else the full decoder (only when ``ContentLen`` agrees: otherwise the event comes with a notice the
    accelerator does not make, so it must leave such a payload alone). None: no event."""
    fields = fast_screen(payload)
    if fields is not None:
        return fields
    try:
        decoded = decode_payload(payload)
    except RemoteProtocolError:
        return None
    message = decoded.message
    if type(message) is not ScreenRequest or decoded.header.content_len != decoded.body_length:
        return None
    return fields_of(message)


def python_event(
    payload: bytes, builder: EventBuilder, received_at_us: int
) -> tuple[dict[str, Any], str, ScreenFields] | None:
    """The Python path's ``(event, SHA-1 hex digest, fields)`` for a payload, or None when it makes no event."""
    fields = python_fields(payload)
    if fields is None:
        return None
    try:
        event, digest = builder.build(fields, received_at_us)
    except ValueError:  # a receive time outside RFC 3339's range
        return None
    return event, digest, fields


# ------------------------------------------------------------------------------------------------- values

#: Every character ``str.isspace`` knows that XML text can carry as written (not CR, VT, FF or U+001C-001F).
SPACES = (
    " \t\n\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_TRICKY = list(SPACES) + list("\"\\/'<>&],;:\x7f\x80\x9f\ufdd0\ufffd\U0001f600\U0010fffd\u00e9\u65e5")
#: Characters XML text may carry as written (no C0 control but TAB and LF, no CR, no surrogate, no U+FFFE/FFFF).
_XML_CHAR = st.characters(
    exclude_categories=["Cs"],
    exclude_characters="".join(chr(c) for c in range(0x20) if c not in (0x09, 0x0A)) + "\r\ufffe\uffff",
)
values = st.lists(st.one_of(st.sampled_from(_TRICKY), _XML_CHAR), max_size=10).map("".join)

_ENTITY_OF = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&apos;"}


@st.composite
def xml_text(draw: st.DrawFn, value: str | None = None) -> str:
    """A value as element text: ``&`` and ``<`` always as entities, ``>``, ``"`` and ``'`` as written or not."""
    text = draw(values) if value is None else value
    optional = draw(st.sets(st.sampled_from([">", '"', "'"])))
    return "".join(_ENTITY_OF[c] if c in "&<" or c in optional else c for c in text)


@st.composite
def xml_int(draw: st.DrawFn) -> str:
    """An unsigned integer of at most 19 digits (what the fast paths read), sometimes with leading zeros."""
    value = draw(
        st.one_of(
            st.integers(0, 2**32),
            st.integers(0, 10**19 - 1),
            st.sampled_from(
                [MIN_PLAUSIBLE_GENERATION_US - 1, MIN_PLAUSIBLE_GENERATION_US, MAX_EPOCH_US - 1, MAX_EPOCH_US]
            ),
        )
    )
    text = str(value)
    zeros = draw(st.integers(0, 19 - len(text)))
    return "0" * zeros + text


_PCI = frozenset(
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
names = st.one_of(
    st.sampled_from(["Secs", "NanoSecs", "OpenAccmode", "DisplayPath", "ProtVer", "Gid", "A", "a1"]),
    st.from_regex(r"[A-Za-z][A-Za-z0-9]{0,8}", fullmatch=True),
).filter(lambda t: t not in _PCI and t not in ("CommonInfo", "TargetAccessPath"))
booleans = st.sampled_from(["0", "1", "true", "false"])
req_types = st.one_of(
    st.sampled_from(sorted(REQ_TYPES)), st.from_regex(r"[A-Za-z0-9_]{1,16}", fullmatch=True).filter(lambda t: t)
)
op_elements = st.one_of(st.sampled_from(sorted({info.element for info in REQ_TYPES.values()})), names)
path_types = st.sampled_from(["UNIX_NAME", "WIN_NAME", "WIN_8_3_NAME", "FUTURE_NAME", "", "unix_name"])


@st.composite
def path_names(draw: st.DrawFn) -> str:
    lead = draw(st.sampled_from(["", "/", "//", "///", "\\", "\\\\", "/\\", "\\/"]))
    parts = draw(st.lists(values, max_size=4))
    sep = draw(st.sampled_from(["/", "\\"]))
    return lead + sep.join(parts)


@st.composite
def paths(draw: st.DrawFn) -> str:
    items = draw(st.lists(st.tuples(path_types, st.one_of(path_names(), st.just(""))), max_size=4))
    return "".join(
        f"<Path><PathNameType>{kind}</PathNameType><PathName>{draw(xml_text(name))}</PathName></Path>"
        for kind, name in items
    )


@st.composite
def user(draw: st.DrawFn) -> str:
    """A UsrContext/FileOwner content: empty, or one choice (a MappedId with any of its parts)."""
    sid = st.one_of(st.from_regex(r"S-1-5-21(-[0-9]{1,10}){1,4}", fullmatch=True), values)
    kind = draw(st.sampled_from(["", "unix", "win", "mapped"]))
    if kind == "unix":
        return f"<UnixUid>{draw(xml_int())}</UnixUid>"
    if kind == "win":
        return f"<WinSid>{draw(xml_text(draw(sid)))}</WinSid>"
    if kind == "mapped":
        uid = f"<Uid>{draw(xml_int())}</Uid>" if draw(st.booleans()) else ""
        win = f"<WinSid>{draw(xml_text(draw(sid)))}</WinSid>" if draw(st.booleans()) else ""
        return f"<MappedId>{uid}{win}</MappedId>"
    return ""


def _maybe(draw: st.DrawFn, tag: str, content: st.SearchStrategy[str]) -> str:
    return f"<{tag}>{draw(content)}</{tag}>" if draw(st.booleans()) else ""


@st.composite
def user_gids(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        return "".join(f"<Gid>{draw(xml_text())}</Gid>" for _ in range(draw(st.integers(1, 4))))
    gids = draw(st.lists(st.one_of(st.from_regex(r"[0-9]{1,6}", fullmatch=True), values), max_size=4))
    separators = st.sampled_from([",", ", ", " ", "\t", "\n", ",,", " , ", "\u3000", "\xa0"])
    return draw(xml_text("".join(g + draw(separators) for g in gids)))


@st.composite
def op_fields(draw: st.DrawFn) -> str:
    """Leaves and elements of leaves, names sometimes repeated (dict(): first place, last value)."""
    pool = draw(st.lists(names, min_size=1, max_size=3))
    out = []
    for _ in range(draw(st.integers(0, 5))):
        tag = draw(st.sampled_from(pool))
        if draw(st.integers(0, 3)) == 0:
            children = "".join(
                f"<{child}>{draw(xml_text())}</{child}>"
                for child in draw(st.lists(st.sampled_from([*pool, "Secs", "NanoSecs"]), min_size=1, max_size=3))
            )
            out.append(f"<{tag}>{children}</{tag}>")
        else:
            out.append(f"<{tag}>{draw(xml_text())}</{tag}>")
    return "".join(out)


@st.composite
def canonical_bodies(draw: st.DrawFn) -> str:
    """An ``FscreenReq`` body in the canonical layout (as text)."""
    text = xml_text()
    pci = "".join(
        [
            _maybe(draw, "ClientIp", st.one_of(text, st.sampled_from(["10.0.0.1", " 10.0.0.1\t", "", " "]))),
            _maybe(draw, "GenerationTime", xml_int()),
            _maybe(draw, "UsrIdType", st.one_of(text, st.sampled_from(["UNIX_ONLY", "WIN_ONLY", "MAPPED_ID", " "]))),
            _maybe(draw, "UsrContext", user()),
            _maybe(draw, "FileOwner", user()),
            _maybe(draw, "AccessPath", paths()),
            _maybe(draw, "VolMsid", xml_int()),
            _maybe(draw, "FileSize", xml_int()),
            _maybe(draw, "NumHardLnk", xml_int()),
            _maybe(draw, "IsOfflineAttr", booleans),
            _maybe(draw, "FileType", st.one_of(text, st.sampled_from(["FILE", "DIR", " DIR\n", "\u3000DIR"]))),
            _maybe(draw, "IsSparse", booleans),
            _maybe(draw, "IsDense", booleans),
            "".join(
                f"<{tag}>{draw(xml_text())}</{tag}>"
                for tag in draw(st.lists(st.sampled_from(["Zone", "QoS", "Tier", "Extra1"]), max_size=3))
            ),
        ]
    )
    prot_ver = (
        f"<ProtVer>{_maybe(draw, 'MajorNum', xml_int())}{_maybe(draw, 'MinorNum', xml_int())}</ProtVer>"
        if draw(st.booleans())
        else ""
    )
    common = (
        f"<CommonInfo><ProtCommonInfo>{pci}</ProtCommonInfo>{_maybe(draw, 'DisplayPath', text)}{prot_ver}"
        f"{_maybe(draw, 'UserGids', user_gids())}</CommonInfo>"
    )
    op = draw(op_elements)
    return (
        f'<?xml version="1.0"?><FscreenReq><ReqId>{draw(xml_int())}</ReqId><ReqType>{draw(req_types)}</ReqType>'
        f"<NotfInfo><{op}>{common}{_maybe(draw, 'TargetAccessPath', paths())}{draw(op_fields())}</{op}>"
        "</NotfInfo></FscreenReq>"
    )


def payload_of(body: bytes, *, nul: bool = True) -> bytes:
    """A SCREEN_REQ payload (the frame without its 6-byte prefix) with the canonical header."""
    return encode_header("SCREEN_REQ", len(body)) + b"\n\n" + body + (b"\x00" if nul else b"")


@st.composite
def canonical_payloads(draw: st.DrawFn) -> bytes:
    """A canonical SCREEN_REQ payload, with or without the trailing NUL ONTAP sends."""
    return payload_of(draw(canonical_bodies()).encode(), nul=draw(st.booleans()))


@st.composite
def damaged_payloads(draw: st.DrawFn) -> bytes:
    """A canonical payload with 1-3 byte-level changes anywhere (header, ContentLen, body, NUL)."""
    data = bytearray(draw(canonical_payloads()))
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        change = draw(st.sampled_from(["flip", "set", "drop", "insert", "repeat", "cut"]))
        if change == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif change == "set":
            data[at] = draw(st.sampled_from([0, 0x0D, 0x26, 0x3C, 0x3E, 0x5D, 0x80, 0xC0, 0xED, 0xEF, 0xF4, 0xFF]))
        elif change == "drop":
            del data[at : at + draw(st.integers(1, 8))]
        elif change == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=6))
        elif change == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 40))]
        else:
            del data[at:]
    return bytes(data)
