"""The 27 ``ReqType`` values of ``FscreenReq`` and their wire shape (``docs/protocol.md`` §4.2).

One source of truth: the protobuf codec, the event normalizer (and through it the C accelerator), the
simulator and the tests all read this table.
A ReqType is ``<PROTO>_<OP>[_DIR]``; directory variants reuse the file element (KB-REN: ``SMB_REN_DIR``
inside ``SmbRenReq``). Values not in the table are still accepted on the wire and kept as sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import Final


class Operation(StrEnum):
    """The event's ``operation_type``: the reference pipeline's four, then the rest of ONTAP's set."""

    CREATE = "create"
    WRITE = "write"
    DELETE = "delete"
    RENAME = "rename"
    READ = "read"
    OPEN = "open"
    CLOSE = "close"
    SETATTR = "setattr"
    GETATTR = "getattr"
    LOOKUP = "lookup"
    LINK = "link"
    SYMLINK = "symlink"
    UNKNOWN = "unknown"


#: ``<OP>`` token of a ReqType → operation.
OP_TOKENS: Final[dict[str, Operation]] = {
    "OPEN": Operation.OPEN,
    "CLOSE": Operation.CLOSE,
    "CREAT": Operation.CREATE,
    "DEL": Operation.DELETE,
    "REN": Operation.RENAME,
    "GET_ATTR": Operation.GETATTR,
    "SET_ATTR": Operation.SETATTR,
    "RD": Operation.READ,
    "WR": Operation.WRITE,
    "LOOKUP": Operation.LOOKUP,
    "LNK": Operation.LINK,
    "SYM_LNK": Operation.SYMLINK,
}


@dataclass(frozen=True, slots=True)
class ReqTypeInfo:
    """How one ReqType looks on the wire and what it means."""

    req_type: str
    protocol: str
    operation: Operation
    is_directory: bool
    #: The ``NotfInfo`` child element, e.g. ``SmbRenReq``.
    element: str
    #: Whether the element carries ``TargetAccessPath`` (rename, hard link).
    has_target: bool
    #: Operation-specific children after ``CommonInfo`` (flattened with ``/``), in SCHEMA order.
    fields: tuple[str, ...] = ()


def _info(req_type: str, element: str, *, has_target: bool = False, fields: tuple[str, ...] = ()) -> ReqTypeInfo:
    parsed = parse_req_type(req_type)
    return ReqTypeInfo(req_type, parsed.protocol, parsed.operation, parsed.is_directory, element, has_target, fields)


@dataclass(frozen=True, slots=True)
class ParsedReqType:
    protocol: str
    operation: Operation
    is_directory: bool


@lru_cache(maxsize=1024)
def parse_req_type(req_type: str) -> ParsedReqType:
    """Split ``<PROTO>_<OP>[_DIR]`` generically, so an unknown protocol or operation still parses.

    Cached: ReqType strings repeat on every notification, and the cache is bounded for peers that invent
    new ones.
    """
    proto, sep, rest = req_type.partition("_")
    if not sep or not proto:
        return ParsedReqType(req_type.lower() or "unknown", Operation.UNKNOWN, False)
    is_directory = rest.endswith("_DIR")
    if is_directory:
        rest = rest[: -len("_DIR")]
    return ParsedReqType(proto.lower(), OP_TOKENS.get(rest, Operation.UNKNOWN), is_directory)


_RW = ("Offset", "Length")

REQ_TYPES: Final[dict[str, ReqTypeInfo]] = {
    info.req_type: info
    for info in (
        _info("SMB_OPEN", "SmbOpenReq", fields=("OpenAccmode", "OpenSharemode", "OpenOptions")),
        _info("SMB_CLOSE", "SmbCloseReq", fields=("RdBytes", "WrBytes")),
        _info(
            "SMB_CREAT",
            "SmbCreatReq",
            fields=("CreatAccmode", "CreatSharemode", "CreatDisposition", "CreatOptions", "CreatNewObject"),
        ),
        _info(
            "SMB_CREAT_DIR",
            "SmbCreatReq",
            fields=("CreatAccmode", "CreatSharemode", "CreatDisposition", "CreatOptions", "CreatNewObject"),
        ),
        _info("SMB_DEL", "SmbDelReq"),
        _info("SMB_DEL_DIR", "SmbDelReq"),
        _info("SMB_REN", "SmbRenReq", has_target=True),
        _info("SMB_REN_DIR", "SmbRenReq", has_target=True),
        _info("SMB_GET_ATTR", "SmbGetAttrReq"),
        _info("SMB_SET_ATTR", "SmbSetAttrReq", fields=("SetAttrChangeAttr",)),
        _info("SMB_RD", "SmbRdReq", fields=tuple(f"Rd{f}" for f in _RW)),
        _info("SMB_WR", "SmbWrReq", fields=tuple(f"Wr{f}" for f in _RW)),
        _info("NFS_LOOKUP", "NfsLookupReq"),
        _info("NFS_CREAT", "NfsCreatReq"),
        _info("NFS_CREAT_DIR", "NfsCreatReq"),
        _info("NFS_DEL", "NfsDelReq"),
        _info("NFS_DEL_DIR", "NfsDelReq"),
        _info("NFS_REN", "NfsRenReq", has_target=True),
        _info("NFS_REN_DIR", "NfsRenReq", has_target=True),
        _info("NFS_OPEN", "NfsOpenReq"),
        _info("NFS_CLOSE", "NfsCloseReq"),
        _info("NFS_RD", "NfsRdReq", fields=tuple(f"Rd{f}" for f in _RW)),
        _info("NFS_WR", "NfsWrReq", fields=tuple(f"Wr{f}" for f in _RW)),
        _info("NFS_GET_ATTR", "NfsGetAttrReq"),
        _info("NFS_SET_ATTR", "NfsSetAttrReq", fields=("ChangeAttr", "SetAttrCommon/SetAttrMode")),
        _info("NFS_LNK", "NfsLnkReq", has_target=True),
        _info("NFS_SYM_LNK", "NfsSymLnkReq"),
    )
}
