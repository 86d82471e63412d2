"""Differential tests of the SCREEN_REQ fast path (protocol/xml_fast.py) against the lxml decoder.

The invariant: for every body, ``scan_screen_request`` is None or equal to what ``decode_payload`` decodes
(``fields_of``), and None whenever lxml refuses the body. Every real capture and the simulator's corpus must be
taken by the fast path, as must every body in ONTAP's canonical layout, so the invariant cannot hold vacuously.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fpolicyd.protocol.framing import split_payload
from fpolicyd.protocol.messages import NotfType, PathName, ProtCommonInfo, ScreenRequest, UserContext
from fpolicyd.protocol.req_types import REQ_TYPES
from fpolicyd.protocol.xml_codec import screen_request_body
from fpolicyd.protocol.xml_fast import MAX_FAST_BODY_BYTES, ScreenFields, fields_of, scan_screen_request
from fpolicyd.simulator.generate import generate_frames, generate_requests
from support.captures import CAPTURES, SMB_REN
from support.screen_bodies import canonical_bodies, lxml_fields, perturbed_bodies

BASE_TIME_US = 1_700_000_000_000_000


def agree(body: bytes) -> ScreenFields | None:
    """Assert the invariant for one body; return what the fast path made of it."""
    fast = scan_screen_request(body)
    if fast is not None:
        expected = lxml_fields(body)
        assert expected is not None, f"fast path accepted a body lxml refuses: {body!r}"
        # repr as well: a tuple compares True equal to 1 and the fields must have the decoder's types.
        assert (fast, repr(fast)) == (expected, repr(expected)), body
    return fast


# ------------------------------------------------------------------------------------- real traffic


def test_every_real_capture_takes_the_fast_path() -> None:
    bodies = [c.body for c in CAPTURES if c.notf_type == NotfType.SCREEN_REQ and c.body is not None]
    assert len(bodies) == 2
    for body in bodies:
        assert agree(body) is not None


@pytest.mark.parametrize("seed", [0, 1, 7, 2024])
def test_the_simulator_corpus_takes_the_fast_path(seed: int) -> None:
    seen: set[str] = set()
    for node in (0, 1):
        frames = generate_frames(seed=seed, node=node, count=150, base_time_us=BASE_TIME_US)
        requests = generate_requests(seed=seed, node=node, count=150, base_time_us=BASE_TIME_US)
        for frame, request in zip(frames, requests, strict=True):
            _header, body = split_payload(frame[6:])
            assert body is not None
            fast = agree(body)
            assert fast == fields_of(request)
            seen.add(request.req_type)
    assert seen == set(REQ_TYPES)


# ------------------------------------------------------------------------------------- generated bodies


@given(body=canonical_bodies())
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_canonical_bodies_take_the_fast_path(body: bytes) -> None:
    assert agree(body) is not None, body


def test_perturbed_bodies_agree_with_lxml() -> None:
    outcomes: Counter[str] = Counter()

    @given(body=perturbed_bodies())
    @settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow], database=None)
    def check(body: bytes) -> None:
        outcome = "fast" if agree(body) is not None else "lxml" if lxml_fields(body) is not None else "refused"
        event(outcome)
        outcomes[outcome] += 1

    check()
    total = sum(outcomes.values())
    # A quarter of the bodies are unperturbed and some changes keep the layout: the fast path must be exercised.
    assert outcomes["fast"] >= total // 5, outcomes
    assert outcomes["lxml"] > 0, outcomes
    assert outcomes["refused"] > 0, outcomes


@given(body=perturbed_bodies(), notf_type=st.sampled_from([NotfType.SCREEN_REQ.value, "NOTI_REQ"]))
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_the_header_alias_decodes_the_same_fields(body: bytes, notf_type: str) -> None:
    fast = scan_screen_request(body)
    if fast is not None:
        assert fast == lxml_fields(body, notf_type)


# ------------------------------------------------------------------------------------------------ fuzz


@given(data=st.binary(max_size=2048))
@settings(max_examples=1000)
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    agree(data)


@given(
    data=st.binary(max_size=512),
    prefix=st.sampled_from(
        [
            b'<?xml version="1.0"?><FscreenReq><ReqId>1</ReqId><ReqType>SMB_OPEN</ReqType><NotfInfo><SmbOpenReq>',
            b'<?xml version="1.0"?><FscreenReq><ReqId>1</ReqId><ReqType>NFS_WR</ReqType><NotfInfo><NfsWrReq>'
            b"<CommonInfo><ProtCommonInfo>",
        ]
    ),
)
@settings(max_examples=500)
def test_fuzz_arbitrary_bytes_after_a_canonical_start(data: bytes, prefix: bytes) -> None:
    agree(prefix + data)


#: Real and simulated canonical bodies (the simulator's first 27 cover every ReqType).
CORPUS = [c.body for c in CAPTURES if c.notf_type == NotfType.SCREEN_REQ and c.body is not None] + [
    split_payload(frame[6:])[1] or b"" for frame in generate_frames(seed=3, node=0, count=40, base_time_us=BASE_TIME_US)
]


@st.composite
def mutated_bodies(draw: st.DrawFn) -> bytes:
    """A canonical body (real, simulated or generated) with byte flips, insertions, deletions, truncation."""
    body = bytearray(draw(st.sampled_from(CORPUS) | canonical_bodies()))
    interesting = st.sampled_from(list(b"<>/&;#\"' \t\n\r\x00\x80\xc3\xbf\xef]!?=0123456789ax"))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(body) - 1, 0)))
        if kind == "flip" and body:
            body[pos] = draw(interesting | st.integers(0, 255))
        elif kind == "insert":
            body[pos:pos] = bytes([draw(interesting | st.integers(0, 255))])
        elif kind == "delete" and body:
            del body[pos : pos + draw(st.integers(1, 8))]
        else:
            del body[pos:]
    return bytes(body)


@given(body=mutated_bodies())
@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_mutated_canonical_bodies(body: bytes) -> None:
    agree(body)


# ------------------------------------------------------------------------------------------- edge cases


assert SMB_REN.body is not None
_REN: bytes = SMB_REN.body


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"<ClientIp>10.202.17.170</ClientIp>", b"<ClientIp> 10.202.17.170\t</ClientIp>"),
        (b"<ClientIp>10.202.17.170</ClientIp>", b"<ClientIp>10&amp;1</ClientIp>"),
        (b"<ClientIp>10.202.17.170</ClientIp>", b"<ClientIp></ClientIp>"),
        (b"<FileType>FILE</FileType>", b"<FileType>\xc2\xa0FILE\xc2\xa0</FileType>"),
        (b"<IsSparse>0</IsSparse>", b"<IsSparse>false</IsSparse>"),
        (b"<IsDense>0</IsDense>", b"<IsDense>true</IsDense>"),
        (b"<FileSize>0</FileSize>", b"<FileSize>0000</FileSize>"),
        (b"<FileSize>0</FileSize>", b"<FileSize>9999999999999999999</FileSize>"),
        (b"\\renamed6.txt", b"\\R&amp;D &lt;1&gt; &quot;x&quot; &apos;y&apos; &amp;lt;"),
        (b"\\renamed6.txt", b"\\a > b ]] ]]&gt; \xf0\x9f\x93\x81 \xe5\x85\xb1\t\n"),
        (b"\\renamed6.txt", b""),
        (b"<UsrContext><MappedId><Uid>65534</Uid>", b"<UsrContext><MappedId>"),
        (b"<ClientIp>10.202.17.170</ClientIp>", b""),
        (b"<IsDense>0</IsDense>", b""),
        (b"<DisplayPath>\\\\NLABNASC9003\\test123\\renamed6.txt</DisplayPath>", b""),
        (b"<FileOwner><WinSid>", b"<FileOwner><WinSid> "),
        (b"<FileOwner><WinSid>", b"<FileOwner><WinSid>S-1" + b"-1234567890" * 30),  # too long to be cached
        (b"</ProtCommonInfo>", b"<NewField>x</NewField><Other></Other></ProtCommonInfo>"),
        (b"<ProtVer><MajorNum>3</MajorNum><MinorNum>1</MinorNum></ProtVer>", b"<ProtVer></ProtVer>"),
        (
            b"<ProtVer><MajorNum>3</MajorNum><MinorNum>1</MinorNum></ProtVer>",
            b"<ProtVer><MinorNum>1</MinorNum></ProtVer>",
        ),
        (b"</SmbRenReq>", b"<SetAttrMtime><Secs>1</Secs><NanoSecs>2</NanoSecs></SetAttrMtime><X></X></SmbRenReq>"),
        (
            b"<TargetAccessPath>",
            b"<TargetAccessPath><Path><PathNameType>WIN_8_3_NAME</PathNameType><PathName>A~1</PathName></Path>",
        ),
        (b"</CommonInfo>", b"<UserGids>1, 2\t3 ,</UserGids></CommonInfo>"),
        (b"</CommonInfo>", b"<UserGids><Gid> 1 </Gid><Gid></Gid></UserGids></CommonInfo>"),
        (b"</CommonInfo>", b"<UserGids></UserGids></CommonInfo>"),
    ],
)
def test_layouts_the_fast_path_reads_exactly(old: bytes, new: bytes) -> None:
    assert agree(_REN.replace(old, new, 1)) is not None


#: Characters XML allows that a hand-written filter might not: C1 controls, separators, non-characters, the BOM.
XML_CHARS = "\t\n\x7f\x80\x85\x9f\xa0\u2028\ud7ff\ue000\ufdd0\ufeff\ufffd\U0001fffe\U0010ffff"


@pytest.mark.parametrize("char", list(XML_CHARS))
def test_every_character_xml_allows_is_read(char: str) -> None:
    assert agree(_REN.replace(b"renamed6.txt", f"a{char}b".encode(), 1)) is not None


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"renamed6.txt", b"a]]>b"),
        (b"renamed6.txt", b"a\x01b"),
        (b"renamed6.txt", b"a\x00b"),
        (b"renamed6.txt", b"a\xef\xbf\xbeb"),  # U+FFFE
        (b"renamed6.txt", b"a\xed\xa0\x80b"),  # an encoded surrogate
        (b"renamed6.txt", b"a\xffb"),
        (b"renamed6.txt", b"a&b"),
        (b"renamed6.txt", b"&nbsp;"),
        (b"<ReqId>4996</ReqId>", b"<ReqId>-1</ReqId>"),
        (b"<ReqId>4996</ReqId>", b"<ReqId>18446744073709551616</ReqId>"),
        (b"<IsDense>0</IsDense>", b"<IsDense>2</IsDense>"),
        (b"</SmbRenReq>", b"</SmbRenreq>"),
        (b"</ProtCommonInfo>", b"<New>x</Old></ProtCommonInfo>"),
        (b"</SmbRenReq>", b"<A>1</B></SmbRenReq>"),
        (b"</SmbRenReq>", b"<A><B>1</C></A></SmbRenReq>"),
        (b"</SmbRenReq>", b"<A><B>1</B></C></SmbRenReq>"),
        (b"</Path></TargetAccessPath>", b"</Path></AccessPath>"),
        (b"<ProtCommonInfo>", b"<ProtCommonInfo><UsrContext><Nobody>1</Nobody></UsrContext>"),
    ],
)
def test_what_lxml_refuses_the_fast_path_refuses(old: bytes, new: bytes) -> None:
    body = _REN.replace(old, new, 1)
    assert lxml_fields(body) is None
    assert scan_screen_request(body) is None


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"renamed6.txt", b"a&#13;b"),
        (b"renamed6.txt", b"a&#x41;b"),
        (b"renamed6.txt", b"a\rb"),
        (b"renamed6.txt", b"<![CDATA[x]]>"),
        (b"renamed6.txt", b"a<!--c-->b"),
        (b"renamed6.txt", b"a<?pi x?>b"),
        (b"<ReqId>4996</ReqId>", b"<ReqId>18446744073709551615</ReqId>"),
        (b"<ReqId>4996</ReqId>", b"<ReqId> 4996 </ReqId>"),
        (b"<ReqId>4996</ReqId>", b"<ReqId>\xd9\xa4</ReqId>"),  # an Arabic-Indic digit: int() reads it
        (b"<ReqId>4996</ReqId>", b"<ReqId>4_996</ReqId>"),  # and underscores
        (b"<IsDense>0</IsDense>", b"<IsDense> 0 </IsDense>"),
        (b"<FscreenReq>", b'<FscreenReq a="1">'),
        (b"<FscreenReq>", b"<FscreenReq >"),
        (b"<FscreenReq>", b"<FscreenReq>\n"),
        (b"<ClientIp>10.202.17.170</ClientIp>", b"<ClientIp/>"),
        (b"<IsDense>0</IsDense>", b"<IsDense>0</IsDense><ClientIp>1</ClientIp>"),
        (b"<IsDense>0</IsDense>", b"<IsDense>0</IsDense><IsDense>1</IsDense>"),
        (b"</CommonInfo>", b"<Foo>1</Foo></CommonInfo>"),
        (b"</SmbRenReq>", b"<CommonInfo></CommonInfo></SmbRenReq>"),
        (b"</SmbRenReq>", b"<TargetAccessPath></TargetAccessPath></SmbRenReq>"),
        (b"</SmbRenReq>", b"<A><B><C>1</C></B></A></SmbRenReq>"),
        (b"<DisplayPath>", b"<DisplayPath/><DisplayPath>"),
        (b'<?xml version="1.0"?>', b'<?xml version="1.0" encoding="UTF-8"?>'),
        (b'<?xml version="1.0"?>', b""),
        (b"</FscreenReq>", b"</FscreenReq>\n"),
    ],
)
def test_other_layouts_go_to_lxml(old: bytes, new: bytes) -> None:
    body = _REN.replace(old, new, 1)
    assert body != _REN
    assert lxml_fields(body) is not None
    assert scan_screen_request(body) is None


def test_the_size_cap() -> None:
    request = ScreenRequest(
        1,
        "SMB_OPEN",
        "SmbOpenReq",
        ProtCommonInfo(access_paths=(PathName("WIN_NAME", "x" * MAX_FAST_BODY_BYTES),)),
    )
    big = screen_request_body(request)
    assert scan_screen_request(big) is None
    assert lxml_fields(big) is not None
    small = screen_request_body(
        ScreenRequest(
            1,
            "SMB_OPEN",
            "SmbOpenReq",
            ProtCommonInfo(access_paths=(PathName("WIN_NAME", "x" * (MAX_FAST_BODY_BYTES // 2)),)),
        )
    )
    assert agree(small) is not None


@pytest.mark.parametrize(
    "body",
    [
        # shapes that make a backtracking regex explode; each must be answered (None here) in linear time
        b'<?xml version="1.0"?><FscreenReq><ReqId>1</ReqId><ReqType>A</ReqType><NotfInfo><A><CommonInfo>'
        b"<ProtCommonInfo>" + b"<X>" + b"a" * 60_000,
        b'<?xml version="1.0"?><FscreenReq><ReqId>1</ReqId><ReqType>A</ReqType><NotfInfo><A><CommonInfo>'
        b"<ProtCommonInfo></ProtCommonInfo></CommonInfo>" + b"<X>1</X>" * 7000 + b"</B>",
        b'<?xml version="1.0"?><FscreenReq><ReqId>1</ReqId><ReqType>A</ReqType><NotfInfo><A><CommonInfo>'
        b"<ProtCommonInfo><AccessPath>"
        + (b"<Path><PathNameType>W</PathNameType><PathName>" + b"&amp;" * 500 + b"</PathName></Path>")
        * 20,
        b'<?xml version="1.0"?><FscreenReq><ReqId>' + b"1" * 60_000,
    ],
)
def test_adversarial_bodies_are_answered(body: bytes) -> None:
    assert len(body) <= MAX_FAST_BODY_BYTES
    assert agree(body) is None


def test_fields_of_reads_every_field() -> None:
    request = ScreenRequest(
        req_id=7,
        req_type="NFS_REN",
        op_element="NfsRenReq",
        common=ProtCommonInfo(
            "10.0.0.1",
            5,
            "UNIX_ONLY",
            UserContext("UnixUid", uid=0),
            UserContext("MappedId", uid=1, sid="S-1"),
            (PathName("UNIX_NAME", "/a"),),
            9,
            10,
            1,
            False,
            "FILE",
            True,
            False,
            (("New", "x"),),
        ),
        display_path=None,
        prot_ver=(4, 1),
        user_gids=("0", "10"),
        target_paths=(PathName("UNIX_NAME", "/b"),),
        op_fields=(("A/B", "1"),),
    )
    assert fields_of(request) == (
        7,
        "NFS_REN",
        "NfsRenReq",
        "10.0.0.1",
        5,
        "UNIX_ONLY",
        ("UnixUid", 0, None),
        ("MappedId", 1, "S-1"),
        (("UNIX_NAME", "/a"),),
        9,
        10,
        1,
        False,
        "FILE",
        True,
        False,
        (("New", "x"),),
        None,
        (4, 1),
        ("0", "10"),
        (("UNIX_NAME", "/b"),),
        (("A/B", "1"),),
    )
    assert agree(screen_request_body(request)) == fields_of(request)
