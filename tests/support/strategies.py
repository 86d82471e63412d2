"""Hypothesis strategies for every FPolicy message, shaped like what ONTAP can send."""

from __future__ import annotations

from hypothesis import strategies as st

from fpolicyd.protocol.messages import (
    Alert,
    BackPressure,
    Handshake,
    HandshakeResp,
    KeepAlive,
    Message,
    NotfType,
    Outage,
    PathName,
    ProtCommonInfo,
    ScreenCancel,
    ScreenRequest,
    ScreenResponse,
    StatusQuery,
    StatusQueryResp,
    UnknownMessage,
    UserContext,
    UserKind,
    VolumeNotification,
)
from fpolicyd.protocol.req_types import REQ_TYPES

# Characters XML 1.0 allows in text (no C0 controls but tab/LF/CR, no U+FFFE/U+FFFF, no surrogates).
xml_text = st.text(
    alphabet=st.characters(
        blacklist_categories=["Cs"],
        blacklist_characters="".join(chr(c) for c in range(0x20) if c not in (0x09, 0x0A, 0x0D)) + "\ufffe\uffff",
    ),
    max_size=40,
)
#: Values the decoder strips (tokens, addresses, SIDs): no surrounding whitespace.
token = st.from_regex(r"[A-Za-z0-9_.:\-]{1,24}", fullmatch=True)
u64 = st.integers(min_value=0, max_value=2**64 - 1)
u32 = st.integers(min_value=0, max_value=2**32 - 1)
tag_name = st.from_regex(r"[A-Za-z][A-Za-z0-9]{0,11}", fullmatch=True).filter(
    lambda t: t not in ("CommonInfo", "TargetAccessPath")
)

path_name = st.builds(PathName, type=st.sampled_from(["WIN_NAME", "UNIX_NAME", "WIN_8_3_NAME"]), name=xml_text)
paths = st.lists(path_name, max_size=3).map(tuple)

user = st.one_of(
    st.none(),
    st.builds(UserContext, kind=st.just(UserKind.UNIX_UID.value), uid=u32),
    st.builds(UserContext, kind=st.just(UserKind.WIN_SID.value), sid=token),
    st.builds(
        UserContext,
        kind=st.just(UserKind.MAPPED_ID.value),
        uid=st.none() | u32,
        sid=st.none() | token,
    ),
)

_PCI_TAGS = {
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
extra_elements = st.dictionaries(tag_name.filter(lambda t: t not in _PCI_TAGS), xml_text, max_size=2).map(
    lambda d: tuple(d.items())
)

prot_common_info = st.builds(
    ProtCommonInfo,
    client_ip=st.none() | token,
    generation_time=st.none() | u64,
    usr_id_type=st.none() | st.sampled_from(["UNIX_ONLY", "WIN_ONLY", "MAPPED_ID"]),
    usr_context=user,
    file_owner=user,
    access_paths=paths,
    vol_msid=st.none() | u64,
    file_size=st.none() | u64,
    num_hard_lnk=st.none() | u32,
    is_offline=st.none() | st.booleans(),
    file_type=st.none() | st.sampled_from(["FILE", "DIR", "STREAM", "SYMLINK"]),
    is_sparse=st.none() | st.booleans(),
    is_dense=st.none() | st.booleans(),
    extra=extra_elements,
)

op_fields = st.lists(st.tuples(st.lists(tag_name, min_size=1, max_size=3).map("/".join), xml_text), max_size=4).map(
    tuple
)

req_type = st.sampled_from(sorted(REQ_TYPES)) | st.from_regex(r"[A-Z]{2,5}_[A-Z_]{1,12}", fullmatch=True)


@st.composite
def screen_requests(draw: st.DrawFn) -> ScreenRequest:
    rt = draw(req_type)
    info = REQ_TYPES.get(rt)
    element = info.element if info is not None else draw(tag_name)
    return ScreenRequest(
        req_id=draw(u64),
        req_type=rt,
        op_element=element,
        common=draw(prot_common_info),
        display_path=draw(st.none() | xml_text),
        prot_ver=draw(st.none() | st.tuples(st.integers(0, 9), st.integers(0, 9))),
        user_gids=draw(st.lists(st.from_regex(r"[0-9]{1,6}", fullmatch=True), max_size=3).map(tuple)),
        target_paths=draw(paths),
        op_fields=draw(op_fields),
        notf_type=draw(st.sampled_from([NotfType.SCREEN_REQ.value, "NOTI_REQ"])),
    )


known_types = {t.value for t in NotfType} | {"NOTI_REQ"}

messages: st.SearchStrategy[Message] = st.one_of(
    screen_requests(),
    st.builds(
        Handshake, vs_uuid=xml_text, policy_name=xml_text, session_id=xml_text, versions=st.lists(token).map(tuple)
    ),
    st.builds(HandshakeResp, vs_uuid=xml_text, policy_name=xml_text, session_id=xml_text, version=token),
    st.just(KeepAlive()),
    st.builds(ScreenResponse, req_id=u64, req_type=token, notf_resp=st.integers(1, 7)),
    st.builds(ScreenCancel, req_id=u64, req_type=token, cancel_reason=st.just("") | token),
    st.builds(StatusQuery, req_id=u64, req_type=token),
    st.builds(StatusQueryResp, req_id=u64, req_type=token, resp=st.integers(1, 2)),
    st.builds(BackPressure, session_id=xml_text, apply=st.booleans()),
    st.builds(Alert, session_id=st.just("") | token, severity=st.sampled_from(["FATAL", "WARNING"]), message=xml_text),
    st.builds(
        VolumeNotification,
        vol_msid=u64,
        action=st.sampled_from(["MOUNT", "UNMOUNT", "MODIFY"]),
        is_active=st.none() | st.booleans(),
    ),
    st.builds(Outage, file_path=xml_text, policy_name=xml_text, status=st.sampled_from(["incomplete", "done", "Done"])),
    st.builds(
        UnknownMessage,
        notf_type=st.from_regex(r"[A-Z][A-Z_]{2,20}", fullmatch=True).filter(lambda t: t not in known_types),
        body=st.binary(max_size=64).filter(lambda b: b"\x00" not in b[-1:]),
    ),
)
