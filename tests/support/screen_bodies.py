"""SCREEN_REQ bodies for the fast-path differential tests: ONTAP's canonical layout, and departures from it.

:func:`canonical_bodies` renders requests of every ReqType (SMB and NFS layouts, every op field, nested
SetAttr fields) with the codec's encoder, which writes ONTAP's exact byte layout. :func:`perturbed_bodies`
takes such a body apart into tokens (tags and text) and applies a few targeted changes: whitespace, comments,
processing instructions, CDATA, attributes, self-closing and empty elements, dropped, repeated, swapped,
renamed and unknown elements, odd values in the text (entities, character references, forbidden characters,
signed / out-of-range / non-ASCII-digit integers, bad booleans), other prologs and trailing content.
:func:`differential` is the oracle: what lxml (``decode_payload``) makes of a body.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from hypothesis import strategies as st

from fpolicyd.errors import RemoteProtocolError
from fpolicyd.protocol.messages import NotfType, PathName, ProtCommonInfo, ScreenRequest, UserContext, UserKind
from fpolicyd.protocol.req_types import REQ_TYPES
from fpolicyd.protocol.xml_codec import decode_payload, encode_header, screen_request_body
from fpolicyd.protocol.xml_fast import ScreenFields, fields_of

# ------------------------------------------------------------------------------------------------ oracle


def lxml_fields(body: bytes, notf_type: str = NotfType.SCREEN_REQ.value) -> ScreenFields | None:
    """The fields lxml decodes from a SCREEN_REQ with this body (canonical header), or None if it raises."""
    payload = encode_header(notf_type, len(body)) + b"\n\n" + body + b"\x00"
    try:
        message = decode_payload(payload).message
    except RemoteProtocolError:
        return None
    assert isinstance(message, ScreenRequest)
    return fields_of(message)


# ----------------------------------------------------------------------------------------- canonical values

_CONTROLS = "".join(chr(c) for c in range(0x20) if c not in (0x09, 0x0A))
#: Text XML carries as written: every character XML allows except CR (XML reads CR and CRLF as LF).
canonical_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters=_CONTROLS + "\r\ufffe\uffff"),
    max_size=24,
)
#: Text of ONTAP's own values (names, addresses, SIDs): a few of every class, ASCII and beyond.
token_text = st.one_of(
    st.from_regex(r"[A-Za-z0-9_.:\-\\/$ ]{1,24}", fullmatch=True),
    st.sampled_from(["R&D", "a<b>c", 'it\'s "quoted"', "Q3 > Q2", "共有", "📁 Media", "𝔘𝔫𝔦", " padded ", "\tx\n"]),
    canonical_text,
)
#: Integers the fast path reads: below 10**19 (it sends 20-digit values to lxml).
fast_int = st.one_of(st.integers(0, 2**32), st.integers(0, 10**19 - 1))
sid = st.one_of(st.from_regex(r"S-1-5-21(-[0-9]{1,10}){1,4}", fullmatch=True), token_text)

_PATH_TYPES = ["WIN_NAME", "UNIX_NAME", "WIN_8_3_NAME"]
canonical_paths = st.lists(
    st.builds(PathName, type=st.sampled_from(_PATH_TYPES), name=st.one_of(token_text, st.just(""))), max_size=3
).map(tuple)

canonical_user = st.one_of(
    st.none(),
    st.builds(UserContext, kind=st.just(UserKind.UNIX_UID.value), uid=fast_int),
    st.builds(UserContext, kind=st.just(UserKind.WIN_SID.value), sid=sid),
    st.builds(UserContext, kind=st.just(UserKind.MAPPED_ID.value), uid=st.none() | fast_int, sid=st.none() | sid),
)

_PCI_TAGS = frozenset(
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
unknown_tag = st.from_regex(r"[A-Z][A-Za-z0-9]{0,11}", fullmatch=True).filter(
    lambda t: t not in _PCI_TAGS and t not in ("CommonInfo", "TargetAccessPath")
)
#: SMB_SET_ATTR's time fields are elements of leaves, flattened by the decoder.
_SET_ATTR_TIMES = tuple(f"SetAttr{t}/{p}" for t in ("Atime", "Mtime", "Ctime", "Crtime") for p in ("Secs", "NanoSecs"))


@st.composite
def canonical_requests(draw: st.DrawFn) -> ScreenRequest:
    """A request of any of the 27 ReqTypes, with its op fields, as ONTAP would fill it (optional parts vary)."""
    info = draw(st.sampled_from(list(REQ_TYPES.values())))
    smb = info.protocol == "smb"
    value = st.one_of(fast_int.map(str), token_text)
    names: list[str] = list(info.fields)
    if info.req_type == "SMB_SET_ATTR":
        names += draw(st.lists(st.sampled_from(_SET_ATTR_TIMES), unique=True, max_size=4))
    if draw(st.booleans()):
        names.append(draw(unknown_tag))  # a field a newer ONTAP might add
    op_fields = tuple((name, draw(value)) for name in names)
    common = ProtCommonInfo(
        client_ip=draw(st.none() | st.from_regex(r"[0-9]{1,3}(\.[0-9]{1,3}){3}", fullmatch=True) | token_text),
        generation_time=draw(st.none() | fast_int),
        usr_id_type=draw(st.none() | st.sampled_from(["UNIX_ONLY", "WIN_ONLY", "MAPPED_ID"]) | token_text),
        usr_context=draw(canonical_user),
        file_owner=draw(canonical_user),
        access_paths=draw(canonical_paths),
        vol_msid=draw(st.none() | fast_int),
        file_size=draw(st.none() | fast_int),
        num_hard_lnk=draw(st.none() | fast_int),
        is_offline=draw(st.none() | st.booleans()),
        file_type=draw(st.none() | st.sampled_from(["FILE", "DIR", "STREAM", "SYMLINK"]) | token_text),
        is_sparse=draw(st.none() | st.booleans()),
        is_dense=draw(st.none() | st.booleans()),
        extra=draw(st.dictionaries(unknown_tag, canonical_text, max_size=2).map(lambda d: tuple(d.items()))),
    )
    return ScreenRequest(
        req_id=draw(fast_int),
        req_type=info.req_type,
        op_element=info.element,
        common=common,
        display_path=draw(st.none() | token_text) if smb else None,
        prot_ver=draw(st.none() | st.tuples(st.integers(0, 4), st.integers(0, 3))),
        user_gids=() if smb else draw(st.lists(st.from_regex(r"[0-9]{1,6}", fullmatch=True), max_size=4).map(tuple)),
        target_paths=draw(canonical_paths) if info.has_target else (),
        op_fields=op_fields,
    )


_GIDS = re.compile(r"<UserGids>((?:<Gid>[^<]*</Gid>)+)</UserGids>")


@st.composite
def canonical_bodies(draw: st.DrawFn) -> bytes:
    """The encoder's byte layout (ONTAP's), with the variants ONTAP's layout allows: UserGids as a list,
    quotes unescaped in text."""
    text = screen_request_body(draw(canonical_requests())).decode()
    if draw(st.booleans()):
        sep = draw(st.sampled_from([",", ", ", " ", "\t"]))
        text = _GIDS.sub(lambda m: f"<UserGids>{sep.join(re.findall(r'<Gid>([^<]*)</Gid>', m[1]))}</UserGids>", text)
    if draw(st.booleans()):
        text = text.replace("&quot;", '"').replace("&apos;", "'")
    return text.encode()


# ------------------------------------------------------------------------------------------- perturbations

_TOKEN = re.compile(r"<[^>]*>|[^<]+")


def _is_open(token: str) -> bool:
    return token.startswith("<") and not token.startswith(("</", "<?", "<!")) and not token.endswith("/>")


def _tag(token: str) -> str:
    return token.strip("</>").split()[0] if token.strip("</>") else ""


def _spans(tokens: list[str]) -> list[tuple[int, int]]:
    """(start, end) token ranges of every element, outermost first."""
    spans: list[tuple[int, int]] = []
    stack: list[int] = []
    for i, token in enumerate(tokens):
        if _is_open(token):
            stack.append(i)
        elif token.startswith("</") and stack:
            spans.append((stack.pop(), i + 1))
    return sorted(spans)


def _texts(tokens: list[str]) -> list[int]:
    return [i for i, t in enumerate(tokens) if not t.startswith("<")]


def _span(draw: st.DrawFn, tokens: list[str]) -> tuple[int, int] | None:
    spans = _spans(tokens)
    return draw(st.sampled_from(spans)) if spans else None


#: Values that test how exactly the fast path reads text, numbers and booleans (inserted raw, as markup).
odd_values = st.sampled_from(
    [
        # integers: signs, spaces, zeros, range, non-ASCII digits, Python-only spellings
        "-1",
        "+1",
        " 7 ",
        "\t7\n",
        "007",
        "0",
        "9999999999999999999",
        "10000000000000000000",
        "18446744073709551615",
        "18446744073709551616",
        "9" * 40,
        "1_000",
        "١٢٣",
        "１２",
        "0x10",
        "1e3",
        "",
        # booleans
        "true",
        "false",
        "True",
        "TRUE",
        "2",
        "yes",
        " 1 ",
        # entities and character references
        "&amp;",
        "R&amp;D",
        "&lt;x&gt;",
        "&quot;&apos;",
        "&amp;lt;",
        "&#65;",
        "&#x41;",
        "&#0;",
        "&#13;",
        "&#xD;",
        "&#x10FFFF;",
        "&#xFFFE;",
        "&foo;",
        "&",
        "&amp",
        "a & b",
        # characters XML forbids or rewrites, and the CDATA end marker
        "\x00",
        "\x01",
        "\x1f",
        "\x7f",
        "\x85",
        "\r",
        "\r\n",
        "a\rb",
        "\ufffe",
        "\uffff",
        "\ud800",
        "]]>",
        "a]]>b",
        "]]&gt;",
        "]]",
        ">",
        "𝔘",
        "\ufeff",
        "\u2028",
        "\xa0x\xa0",
        " WIN_NAME ",
        "UNIX_NAME\n",
        "1, 2\t3",
    ]
)
forbidden_text = st.lists(
    st.sampled_from(list(_CONTROLS + "\r\ufffe\uffff\ud800\udfff<&>]")), min_size=1, max_size=6
).map("".join)
any_text = st.text(max_size=12)

_Perturbation = Callable[[st.DrawFn, list[str]], list[str]]


def _replace_text(draw: st.DrawFn, tokens: list[str]) -> list[str]:
    texts = _texts(tokens[1:])
    value = draw(st.one_of(odd_values, forbidden_text, any_text, canonical_text))
    leaves = [i for i in range(1, len(tokens) - 2) if _is_open(tokens[i]) and tokens[i + 1].startswith("</")]
    targets = [i + 1 for i in texts] + [-i for i in leaves]
    if not targets:
        return tokens
    where = draw(st.sampled_from(targets))
    if where > 0:
        return [*tokens[:where], value, *tokens[where + 1 :]]
    return [*tokens[: -where + 1], value, *tokens[-where + 1 :]]  # fill an empty element


def _insert_markup(draw: st.DrawFn, tokens: list[str]) -> list[str]:
    markup = draw(
        st.sampled_from(
            [
                " ",
                "\n",
                "\t",
                "\r\n",
                "<!--c-->",
                "<!---->",
                "<?pi x?>",
                "<![CDATA[x]]>",
                "<![CDATA[<&]]>",
                "x",
                "&amp;",
            ]
        )
    )
    at = draw(st.integers(1, len(tokens)))
    return [*tokens[:at], markup, *tokens[at:]]


def _cdata(draw: st.DrawFn, tokens: list[str]) -> list[str]:
    texts = _texts(tokens[1:])
    if not texts:
        return tokens
    i = draw(st.sampled_from(texts)) + 1
    return [*tokens[:i], f"<![CDATA[{tokens[i]}]]>", *tokens[i + 1 :]]


def _attribute(draw: st.DrawFn, tokens: list[str]) -> list[str]:
    opens = [i for i, t in enumerate(tokens) if _is_open(t)]
    if not opens:
        return tokens
    i = draw(st.sampled_from(opens))
    extra = draw(st.sampled_from([' a="1"', " a='1'", " ", '\txmlns="urn:x"', ' xmlns:p="urn:p"', ' p:a="1"']))
    return [*tokens[:i], f"<{_tag(tokens[i])}{extra}>", *tokens[i + 1 :]]


def _self_close(draw: st.DrawFn, tokens: list[str]) -> list[str]:
    span = _span(draw, tokens)
    if span is None:
        return tokens
    start, end = span
    return [*tokens[:start], f"<{_tag(tokens[start])}/>", *tokens[end:]]


def _empty(draw: st.DrawFn, tokens: list[str]) -> list[str]:
    span = _span(draw, tokens)
    if span is None:
        return tokens
    start, end = span
    return [*tokens[: start + 1], *tokens[end - 1 :]]


def _drop(draw: st.DrawFn, tokens: list[str]) -> list[str]:
    span = _span(draw, tokens)
    if span is None:
        return tokens
    start, end = span
    return [*tokens[:start], *tokens[end:]]


def _repeat(draw: st.DrawFn, tokens: list[str]) -> list[str]:
    span = _span(draw, tokens)
    if span is None:
        return tokens
    start, end = span
    copy = tokens[start:end]
    if draw(st.booleans()):  # the repeat with another value, so that "last one wins" is visible
        copy = [
            draw(st.one_of(odd_values, canonical_text, fast_int.map(str))) if not t.startswith("<") else t for t in copy
        ]
    return [*tokens[:end], *copy, *tokens[end:]]


def _swap(draw: st.DrawFn, tokens: list[str]) -> list[str]:
    spans = _spans(tokens)
    pairs = [(a, b) for a in spans for b in spans if a[1] == b[0]]
    if not pairs:
        return tokens
    (s1, e1), (s2, e2) = draw(st.sampled_from(pairs))
    return [*tokens[:s1], *tokens[s2:e2], *tokens[s1:e1], *tokens[e2:]]


_KNOWN_TAGS = [
    *sorted(_PCI_TAGS),
    "Path",
    "PathName",
    "PathNameType",
    "UnixUid",
    "WinSid",
    "MappedId",
    "Uid",
    "DisplayPath",
    "ProtVer",
    "MajorNum",
    "MinorNum",
    "UserGids",
    "Gid",
    "CommonInfo",
    "ProtCommonInfo",
    "TargetAccessPath",
    "NotfInfo",
    "ReqId",
    "ReqType",
    "FscreenReq",
]


def _rename(draw: st.DrawFn, tokens: list[str]) -> list[str]:
    span = _span(draw, tokens)
    if span is None:
        return tokens
    start, end = span
    new = draw(
        st.one_of(st.sampled_from(_KNOWN_TAGS), unknown_tag, st.sampled_from(["xml", "xmlns", "a:b", "É", "_x"]))
    )
    if draw(st.integers(0, 3)) == 0:  # only the closing tag: not well-formed
        return [*tokens[: end - 1], f"</{new}>", *tokens[end:]]
    return [*tokens[:start], f"<{new}>", *tokens[start + 1 : end - 1], f"</{new}>", *tokens[end:]]


def _unknown_element(draw: st.DrawFn, tokens: list[str]) -> list[str]:
    tag = draw(st.one_of(unknown_tag, st.sampled_from(_KNOWN_TAGS)))
    inner = draw(
        st.sampled_from(
            ["", "1", "x y", "<A>1</A>", "<A>1</A><B>2</B>", "<A><B>1</B></A>", "<Gid>5</Gid>", "<Path></Path>"]
        )
    )
    places = [i for i, t in enumerate(tokens) if t.startswith("<") and i > 0]
    if not places:
        return tokens
    at = draw(st.sampled_from(places))
    return [*tokens[:at], f"<{tag}>{inner}</{tag}>", *tokens[at:]]


def _prolog(draw: st.DrawFn, tokens: list[str]) -> list[str]:
    prolog = draw(
        st.sampled_from(
            [
                "",
                '<?xml version="1.0" encoding="UTF-8"?>',
                "<?xml version='1.0'?>",
                '<?xml version="1.1"?>',
                '<?xml  version="1.0"?>',
                '\ufeff<?xml version="1.0"?>',
                '<?xml version="1.0"?>\n',
                '<?xml version="1.0"?><!DOCTYPE FscreenReq>',
                '<?xml version="1.0"?><!DOCTYPE FscreenReq [<!ENTITY e "x">]>',
                '<?xml version="1.0"?><!--c-->',
                ' <?xml version="1.0"?>',
            ]
        )
    )
    return [prolog, *tokens[1:]]


def _trailer(draw: st.DrawFn, tokens: list[str]) -> list[str]:
    tail = draw(st.sampled_from(["\n", " ", "<!--c-->", "<?pi?>", "x", "<FscreenReq></FscreenReq>", "\x00", "]]>"]))
    return [*tokens, tail]


def _truncate(draw: st.DrawFn, tokens: list[str]) -> list[str]:
    if len(tokens) < 2:
        return tokens
    return tokens[: draw(st.integers(1, len(tokens) - 1))]


PERTURBATIONS: tuple[_Perturbation, ...] = (
    _replace_text,
    _replace_text,
    _replace_text,
    _insert_markup,
    _cdata,
    _attribute,
    _self_close,
    _empty,
    _drop,
    _repeat,
    _swap,
    _rename,
    _unknown_element,
    _prolog,
    _trailer,
    _truncate,
)


@st.composite
def perturbed_bodies(draw: st.DrawFn) -> bytes:
    """A canonical body with 0–3 targeted changes (0 about a quarter of the time)."""
    tokens = _TOKEN.findall(draw(canonical_bodies()).decode())
    if draw(st.integers(0, 3)) > 0:
        for _ in range(draw(st.integers(1, 3))):
            tokens = draw(st.sampled_from(PERTURBATIONS))(draw, tokens)
    return "".join(tokens).encode("utf-8", "surrogatepass")
