"""ONTAP node simulator: the peer of every integration test, ``replay-test`` and benchmark.

Two halves:

* **Pure, deterministic generation** (no clock, no I/O). Every random choice of a node's stream comes from one
  ``random.Random`` seeded from ``(seed, node)`` through BLAKE2b (never ``hash()``, which is salted per process),
  so the same arguments give byte-identical frames on every run. A stream is drawn as compact specs that point
  into per-node pools (paths, users, clients) whose XML fragments are escaped once. A spec renders either to the
  :class:`~fpolicyd.protocol.messages.ScreenRequest` the server should decode, or straight to frame bytes. The
  direct renderer exists for speed: the codec's general encoder does ~50k frames/s on one core, too slow to
  load-test a server from one process. Its output is byte-identical to
  :func:`~fpolicyd.protocol.xml_codec.encode_screen_request` (the unit tests check this on long streams).
* **An asyncio client** (:func:`run`) that plays ``nodes`` ONTAP nodes, one connection each: NEGO_REQ/NEGO_RESP,
  a SCREEN_REQ stream written in pre-encoded chunks with optional rate control, KEEP_ALIVE, BACK_PRESSURE
  honoured, and an optional synchronous mode with a ``max_outstanding`` window. In that mode it asks about every
  request still unanswered after ``status_interval_s`` (STATUS_QUERY_REQ, again every interval, as ONTAP's
  ``status-req-interval``) and sends a request again at once when the server answers 2 "request lost". Everything
  it sees the server do wrong raises :class:`SimulatorError`; every loop ends by itself (timeouts and
  ``duration_limit_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import random
import struct
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO, Final, NamedTuple

import orjson

from fpolicyd.errors import FpolicydError, RemoteProtocolError
from fpolicyd.events import event_id_from_identity
from fpolicyd.protocol.framing import XmlFrameReader
from fpolicyd.protocol.messages import (
    ALLOW,
    STATUS_IN_PROGRESS,
    STATUS_REQUEST_LOST,
    BackPressure,
    Handshake,
    HandshakeResp,
    Message,
    NotfType,
    PathName,
    PathNameType,
    ProtCommonInfo,
    ScreenRequest,
    ScreenResponse,
    StatusQuery,
    StatusQueryResp,
    UserContext,
    UserKind,
)
from fpolicyd.protocol.req_types import REQ_TYPES, Operation, ReqTypeInfo
from fpolicyd.protocol.xml_codec import (
    XML_PROLOG,
    decode_payload,
    encode_handshake,
    encode_keep_alive,
    encode_message,
    escape,
)

__all__ = [
    "DEFAULT_BASE_TIME_US",
    "DEFAULT_VERSIONS",
    "DEFAULT_VS_UUID",
    "NodeReport",
    "NodeStream",
    "NotificationSpec",
    "SimulationReport",
    "SimulatorConfig",
    "SimulatorConfigError",
    "SimulatorError",
    "expected_requests",
    "generate_frames",
    "generate_requests",
    "handshake",
    "manifest_record",
    "run",
    "wall_clock_us",
]

#: The offer of ONTAP 9.13/9.14 (SPL-CAP).
DEFAULT_VERSIONS: Final = ("1.0", "1.1", "1.2", "2.0")
DEFAULT_VS_UUID: Final = "5e1f0c2a-6292-11ee-b5d1-000c29f00d01"
#: 2023-11-14T22:13:20Z in epoch µs: fixed so that runs are reproducible unless the caller passes "now".
DEFAULT_BASE_TIME_US: Final = 1_700_000_000_000_000
#: The CIFS server name in every SMB ``DisplayPath`` (``\\<server>\<share>\<path>``).
CIFS_SERVER: Final = "FPSIM-SVM0"
MAX_NODES: Final = 4096

_READ_SIZE: Final = 1 << 16
#: How long a finished node waits for the server to close after the simulator's half-close.
_LINGER_S: Final = 2.0
_PREFIX: Final = struct.Struct(">BIB")
_MARK: Final = 0x22
_KEEP_ALIVE_FRAME: Final = encode_keep_alive()


class SimulatorError(FpolicydError):
    """The FPolicy server under test misbehaved (or could not be reached), as seen by the simulator."""


# ------------------------------------------------------------------------------------------- determinism


def _derive_seed(*parts: object) -> int:
    """A stable 128-bit seed from the parts (``hash()`` is salted per process, so never used)."""
    text = ":".join(("fpolicyd-sim", *(str(p) for p in parts))).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=16).digest(), "big")


def handshake(
    *,
    seed: int,
    node: int,
    policy_name: str,
    vs_uuid: str,
    versions: Sequence[str] = DEFAULT_VERSIONS,
) -> Handshake:
    """The NEGO_REQ node ``node`` sends; ``SessionId`` is a deterministic v1-looking UUID like ONTAP's."""
    digest = hashlib.blake2b(f"fpolicyd-sim:session:{seed}:{node}".encode(), digest_size=16).digest()
    session_id = str(uuid.UUID(bytes=digest, version=1))
    return Handshake(vs_uuid=vs_uuid, policy_name=policy_name, session_id=session_id, versions=tuple(versions))


# ------------------------------------------------------------------------------------------------ pools

#: (VolMsid, share name): a small fixed set; each node serves three of them. MSIDs as in real captures.
_VOLUMES: Final = (
    (2157674396, "ntfs01"),
    (2147830405, "test123"),
    (2163821121, "eng"),
    (2159485222, "home$"),
    (2151000777, "共有"),
    (2149993101, "R&D"),
)
_DIR_NAMES: Final = (
    "Projects",
    "home",
    "alice",
    "bob",
    "2024 Q1",
    "Finance & Legal",
    "R&D",
    "Übersicht",
    "données",
    "共有フォルダ",
    "資料",
    "한국어",
    "archive",
    "src",
    "build output",
    "📁 Media",
    "Ωmega",
    'it\'s "quoted"',
    "<tags>",
    "a > b",
)
_FILE_STEMS: Final = (
    "report",
    "budget 2024",
    "notes",
    "IMG_0042",
    "résumé",
    "Straße",
    "naïve café",
    "報告書",
    "数据表",
    "한국어 문서",
    "🎉 party",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "R&D plan",
    "a<b>c",
    "it's",
    '"quoted"',
    "Q3 > Q2",
    "draft (1)",
    "data",
    "index",
)
_FILE_EXTS: Final = (".txt", ".docx", ".xlsx", ".pdf", ".jpg", ".csv", ".log", "", ".tar.gz", ".md")
_ADMINISTRATORS_SID: Final = "S-1-5-32-544"
# Plain strings, as the decoder produces them, so generated and decoded requests serialise alike.
_WIN_NAME: Final = PathNameType.WIN_NAME.value
_UNIX_NAME: Final = PathNameType.UNIX_NAME.value
_UNIX_UID: Final = UserKind.UNIX_UID.value
_WIN_SID: Final = UserKind.WIN_SID.value
_MAPPED_ID: Final = UserKind.MAPPED_ID.value


def _path_xml(kind: str, name: str) -> str:
    return f"<Path><PathNameType>{kind}</PathNameType><PathName>{escape(name)}</PathName></Path>"


class _Entry:
    """One file or directory of a node's namespace, with its XML fragments escaped once."""

    __slots__ = (
        "access_win_xml",
        "access_xml",
        "display",
        "display_xml",
        "is_dir",
        "msid",
        "nlink",
        "offline",
        "paths",
        "size",
        "sparse",
        "target_win_xml",
        "target_xml",
        "unix",
        "vol",
        "win",
        "win_paths",
    )

    def __init__(
        self, parts: tuple[str, ...], vol: int, share: str, msid: int, *, is_dir: bool, size: int, nlink: int
    ) -> None:
        self.win = "\\" + "\\".join(parts)
        self.unix = "/" + "/".join(parts)
        self.display = f"\\\\{CIFS_SERVER}\\{share}{self.win}"
        self.vol = vol
        self.msid = msid
        self.is_dir = is_dir
        self.size = size
        self.nlink = nlink
        self.offline = False
        self.sparse = False
        win = _path_xml(_WIN_NAME, self.win)
        both = win + _path_xml(_UNIX_NAME, self.unix)
        self.paths = (PathName(_WIN_NAME, self.win), PathName(_UNIX_NAME, self.unix))
        self.win_paths = self.paths[:1]
        self.access_xml = f"<AccessPath>{both}</AccessPath>"
        self.access_win_xml = f"<AccessPath>{win}</AccessPath>"
        self.target_xml = f"<TargetAccessPath>{both}</TargetAccessPath>"
        self.target_win_xml = f"<TargetAccessPath>{win}</TargetAccessPath>"
        self.display_xml = f"<DisplayPath>{escape(self.display)}</DisplayPath>"


class _Ident:
    """Who did it: ``UsrIdType`` + ``UsrContext`` + ``FileOwner`` (+ NFS ``UserGids``), pre-rendered."""

    __slots__ = ("gids", "gids_xml", "owner", "usr_context", "usr_id_type", "xml")

    def __init__(
        self, usr_id_type: str, usr_context: UserContext, owner: UserContext, gids: tuple[str, ...] = ()
    ) -> None:
        self.usr_id_type = usr_id_type
        self.usr_context = usr_context
        self.owner = owner
        self.gids = gids
        self.xml = (
            f"<UsrIdType>{usr_id_type}</UsrIdType>"
            f"<UsrContext>{_user_xml(usr_context)}</UsrContext><FileOwner>{_user_xml(owner)}</FileOwner>"
        )
        self.gids_xml = "<UserGids>" + "".join(f"<Gid>{g}</Gid>" for g in gids) + "</UserGids>" if gids else ""


def _user_xml(user: UserContext) -> str:
    if user.kind == _UNIX_UID:
        return f"<UnixUid>{user.uid}</UnixUid>"
    if user.kind == _WIN_SID:
        return f"<WinSid>{user.sid}</WinSid>"
    return f"<MappedId><Uid>{user.uid}</Uid><WinSid>{user.sid}</WinSid></MappedId>"


class _Client:
    """A client machine: its address and the protocol version (SMB dialect / NFS version) it speaks."""

    __slots__ = ("ip", "ip_xml", "prot_ver", "ver_xml")

    def __init__(self, ip: str, prot_ver: tuple[int, int]) -> None:
        self.ip = ip
        self.ip_xml = f"<ClientIp>{ip}</ClientIp>"
        self.prot_ver = prot_ver
        self.ver_xml = f"<ProtVer><MajorNum>{prot_ver[0]}</MajorNum><MinorNum>{prot_ver[1]}</MinorNum></ProtVer>"


@dataclass(slots=True)
class _Pools:
    files: list[_Entry]
    dirs: list[_Entry]  # without the volume roots
    any_dirs: list[_Entry]  # with the volume roots (share roots: DisplayPath ends in "\")
    files_by_vol: list[list[_Entry]]
    dirs_by_vol: list[list[_Entry]]
    smb_clients: list[_Client]
    nfs_clients: list[_Client]
    nfs4_clients: list[_Client]
    smb_idents: list[_Ident]
    nfs_idents: list[_Ident]


def _build_namespace(rng: random.Random, volumes: Sequence[tuple[int, str]]) -> _Pools:
    files: list[_Entry] = []
    roots: list[_Entry] = []
    dir_parts: list[tuple[int, tuple[str, ...]]] = []
    taken: set[tuple[int, tuple[str, ...]]] = set()

    def new_dir(vol: int, parent: tuple[str, ...], serial: int) -> None:
        name = rng.choice(_DIR_NAMES)
        parts = (*parent, name)
        if (vol, parts) in taken:
            parts = (*parent, f"{name} {serial}")
        taken.add((vol, parts))
        dir_parts.append((vol, parts))

    for vol in range(len(volumes)):
        for serial in range(2):  # at least two directories per volume, so a rename target always exists
            new_dir(vol, (), serial)
    for serial in range(2, 48):
        vol, parent = dir_parts[rng.randrange(len(dir_parts))]
        new_dir(vol, parent if len(parent) < 5 and rng.random() < 0.8 else (), serial)

    subdirs: dict[tuple[int, tuple[str, ...]], int] = {}
    for vol, parts in dir_parts:
        key = (vol, parts[:-1])
        subdirs[key] = subdirs.get(key, 0) + 1
    dirs = [
        _Entry(
            parts, vol, volumes[vol][1], volumes[vol][0], is_dir=True, size=4096, nlink=2 + subdirs.get((vol, parts), 0)
        )
        for vol, parts in dir_parts
    ]
    for vol, (msid, share) in enumerate(volumes):
        roots.append(_Entry((), vol, share, msid, is_dir=True, size=4096, nlink=2 + subdirs.get((vol, ()), 0)))

    places = [(vol, ()) for vol in range(len(volumes))] + dir_parts
    for serial in range(400):
        vol, parent = places[serial % len(places)] if serial < 2 * len(places) else rng.choice(places)
        name = rng.choice(_FILE_STEMS)
        if rng.random() < 0.3:
            name += f" ({rng.randrange(2, 9)})"
        name += rng.choice(_FILE_EXTS)
        parts = (*parent, name)
        if (vol, parts) in taken:
            parts = (*parent, f"{serial} {name}")
        taken.add((vol, parts))
        size = rng.getrandbits(rng.choice((0, 8, 12, 16, 20, 24, 30)))
        entry = _Entry(
            parts, vol, volumes[vol][1], volumes[vol][0], is_dir=False, size=size, nlink=2 if rng.random() < 0.05 else 1
        )
        entry.sparse = rng.random() < 0.05
        entry.offline = rng.random() < 0.01
        files.append(entry)

    return _Pools(
        files=files,
        dirs=dirs,
        any_dirs=dirs + roots,
        files_by_vol=[[e for e in files if e.vol == v] for v in range(len(volumes))],
        dirs_by_vol=[[e for e in dirs if e.vol == v] for v in range(len(volumes))],
        smb_clients=[],
        nfs_clients=[],
        nfs4_clients=[],
        smb_idents=[],
        nfs_idents=[],
    )


def _build_pools(seed: int, node: int, rng: random.Random) -> _Pools:
    pools = _build_namespace(rng, rng.sample(_VOLUMES, 3))
    hi, lo = (node >> 8) & 15, node & 255
    smb_hosts = rng.sample(range(2, 255), 8)
    nfs_hosts = rng.sample(range(2, 255), 8)
    # Clients keep one dialect/version each, as a real client connection does; half the NFS clients are v4.
    smb_vers = ((3, 1), (3, 1), (3, 1), (2, 1))
    nfs_vers = ((4, 0), (4, 1), (3, 0), (3, 0))
    pools.smb_clients = [_Client(f"10.{100 + hi}.{lo}.{h}", smb_vers[i % 4]) for i, h in enumerate(smb_hosts)]
    pools.nfs_clients = [_Client(f"172.{16 + hi}.{lo}.{h}", nfs_vers[i % 4]) for i, h in enumerate(nfs_hosts)]
    pools.nfs4_clients = [c for c in pools.nfs_clients if c.prot_ver[0] == 4]

    # One AD domain for the whole simulated cluster, so it comes from the seed only.
    dom = random.Random(_derive_seed("domain", seed))
    domain = (
        f"S-1-5-21-{dom.randrange(10**9, 4 * 10**9)}-{dom.randrange(10**9, 4 * 10**9)}-{dom.randrange(10**8, 10**9)}"
    )
    for i in range(16):
        rid = 1000 + rng.randrange(200_000)
        sid = f"{domain}-{rid}"
        owner = UserContext(_WIN_SID, sid=_ADMINISTRATORS_SID if i % 4 == 3 else sid)
        if i % 4 == 1:
            pools.smb_idents.append(_Ident("WIN_ONLY", UserContext(_WIN_SID, sid=sid), owner))
        else:
            uid = 65534 if i % 8 == 2 else 1000 + rng.randrange(60_000)  # 65534: unmapped user, as captured
            pools.smb_idents.append(_Ident("MAPPED_ID", UserContext(_MAPPED_ID, uid=uid, sid=sid), owner))
    for i in range(12):
        uid = 0 if i == 0 else 1000 + rng.randrange(60_000)
        gid = 0 if uid == 0 else 100 + rng.randrange(2000)
        gids = (str(gid), *(str(100 + rng.randrange(2000)) for _ in range(rng.randrange(3))))
        owner = UserContext(_UNIX_UID, uid=0 if i % 5 == 4 else uid)
        pools.nfs_idents.append(_Ident("UNIX_ONLY", UserContext(_UNIX_UID, uid=uid), owner, gids))
    return pools


# ------------------------------------------------------------------------------------------- req types

_ValueGen = Callable[[random.Random, int], str]


def _one_of(*values: str) -> _ValueGen:
    n = len(values)
    return lambda rng, _size: values[int(rng.random() * n)]


def _offset(rng: random.Random, size: int) -> str:
    return str(int(rng.random() * size) & ~4095)


def _length(rng: random.Random, size: int) -> str:
    return str(min((512, 4096, 65536, 65536, 1048576)[int(rng.random() * 5)], max(size, 1)))


def _byte_count(rng: random.Random, size: int) -> str:
    return str(int(rng.random() * (size + 1)))


_SETATTR_BITS = _one_of("16", "32", "48", "112", "128", "256", "1", "2", "8", "12")

#: Plausible values per operation-specific field (access masks, share modes, dispositions as SMB clients send).
_FIELD_VALUES: Final[dict[str, _ValueGen]] = {
    "OpenAccmode": _one_of("129", "1179785", "1180063", "1507743", "1048577", "131200", "1179817"),
    "OpenSharemode": _one_of("7", "7", "3", "1", "0"),
    "OpenOptions": _one_of("0", "64", "2097152", "2097216", "16384"),
    "RdBytes": _byte_count,
    "WrBytes": _byte_count,
    "CreatAccmode": _one_of("1180063", "1507743", "1048854", "1179785", "1245599"),
    "CreatSharemode": _one_of("7", "3", "0"),
    "CreatDisposition": _one_of("1", "2", "3", "5", "0", "4"),
    "CreatOptions": _one_of("64", "2097216", "1", "33", "0"),
    "CreatNewObject": _one_of("1", "1", "1", "0"),
    "SetAttrChangeAttr": _SETATTR_BITS,
    "RdOffset": _offset,
    "WrOffset": _offset,
    "RdLength": _length,
    "WrLength": _length,
    "ChangeAttr": _SETATTR_BITS,
    "SetAttrCommon/SetAttrMode": _one_of("420", "493", "384", "511", "436", "488"),
}


def _unknown_field(rng: random.Random, _size: int) -> str:
    return str(rng.getrandbits(8))


def _op_template(fields: tuple[str, ...]) -> str:
    """``%s`` template of the op fields, nested like the codec's ``_unflatten`` (values are digits only)."""
    out: list[str] = []
    open_path: list[str] = []
    for path in fields:
        *parents, leaf = path.split("/")
        common = 0
        while common < min(len(open_path), len(parents)) and open_path[common] == parents[common]:
            common += 1
        out.extend(f"</{tag}>" for tag in reversed(open_path[common:]))
        out.extend(f"<{tag}>" for tag in parents[common:])
        open_path = parents
        out.append(f"<{leaf}>%s</{leaf}>")
    out.extend(f"</{tag}>" for tag in reversed(open_path))
    return "".join(out)


_PICK_FILE, _PICK_DIR, _PICK_EITHER = 0, 1, 2
#: Operations that touch whatever object exists (a file, sometimes a directory or a share root).
_EITHER_OPS: Final = frozenset(
    {Operation.OPEN, Operation.CLOSE, Operation.GETATTR, Operation.SETATTR, Operation.LOOKUP}
)
#: Relative frequency after the first shuffled cycle: like real traffic, opens/reads dominate.
_OP_WEIGHTS: Final = {
    Operation.OPEN: 10,
    Operation.CLOSE: 10,
    Operation.READ: 8,
    Operation.WRITE: 8,
    Operation.GETATTR: 5,
    Operation.LOOKUP: 5,
    Operation.CREATE: 4,
    Operation.DELETE: 3,
    Operation.SETATTR: 2,
    Operation.RENAME: 2,
    Operation.LINK: 1,
    Operation.SYMLINK: 1,
}


class _Kind:
    """Everything about one ReqType the generator needs, derived from :data:`REQ_TYPES`."""

    __slots__ = (
        "creates",
        "fields",
        "gens",
        "head_xml",
        "info",
        "nfs4_only",
        "op_template",
        "pick",
        "req_type",
        "smb",
        "symlink",
        "tail_xml",
        "target",
        "weight",
    )

    def __init__(self, info: ReqTypeInfo) -> None:
        self.info = info
        self.req_type = info.req_type
        self.smb = info.protocol == "smb"
        self.target = info.has_target
        self.symlink = info.operation is Operation.SYMLINK
        self.creates = info.operation is Operation.CREATE and not info.is_directory
        self.nfs4_only = not self.smb and info.operation in (Operation.OPEN, Operation.CLOSE)
        if info.is_directory:
            self.pick = _PICK_DIR
        elif info.operation in _EITHER_OPS:
            self.pick = _PICK_EITHER
        else:
            self.pick = _PICK_FILE
        self.fields = info.fields
        self.gens = tuple(_FIELD_VALUES.get(f, _unknown_field) for f in info.fields)
        self.op_template = _op_template(info.fields)
        weight = _OP_WEIGHTS.get(info.operation, 1)
        self.weight = max(1, weight // 2) if info.is_directory else weight
        self.head_xml = (
            f"</ReqId><ReqType>{escape(info.req_type)}</ReqType><NotfInfo><{info.element}><CommonInfo><ProtCommonInfo>"
        )
        self.tail_xml = f"</{info.element}></NotfInfo></FscreenReq>"


_KINDS: Final = tuple(_Kind(info) for info in REQ_TYPES.values())
_WEIGHTED: Final = tuple(kind for kind in _KINDS for _ in range(kind.weight))


class _Spec(NamedTuple):
    """All random draws of one event; rendered to a ScreenRequest or to frame bytes."""

    req_id: int
    kind: _Kind
    time_us: int
    client: _Client
    ident: _Ident
    entry: _Entry
    target: _Entry | None
    win_only: bool
    size: int
    file_type: str
    values: tuple[str, ...]


def _specs(
    *, seed: int, node: int, count: int, first_req_id: int, base_time_us: int, clock_us: Callable[[], int] | None = None
) -> Iterator[_Spec]:
    """A node's stream. GenerationTime: ``base_time_us`` plus seeded offsets, or, with ``clock_us``, the clock's
    reading when each spec is drawn (a lazily drawn stream carries the time each request is sent, so it never
    drifts from the clock at any rate). Both strictly increasing (+1 µs when the clock stood still or went back).
    The content (paths, users, operations) is the same either way."""
    rng = random.Random(_derive_seed("stream", seed, node))
    pools = _build_pools(seed, node, rng)
    rnd = rng.random
    cycle = list(_KINDS)
    rng.shuffle(cycle)  # every ReqType within the first len(REQ_TYPES) events
    n_cycle = len(cycle)
    weighted = _WEIGHTED
    n_weighted = len(weighted)
    files, dirs, any_dirs = pools.files, pools.dirs, pools.any_dirs
    n_files, n_dirs, n_any = len(files), len(dirs), len(any_dirs)
    smb_clients, nfs_clients, nfs4_clients = pools.smb_clients, pools.nfs_clients, pools.nfs4_clients
    smb_idents, nfs_idents = pools.smb_idents, pools.nfs_idents
    n_nfs4 = len(nfs4_clients)
    t = base_time_us if clock_us is None else -1
    for i in range(count):
        kind = cycle[i] if i < n_cycle else weighted[int(rnd() * n_weighted)]
        step = 1 + int(rnd() * 1500)  # strictly increasing, µs apart as in a busy node
        if clock_us is None:
            t += step
        else:
            now = clock_us()
            t = now if now > t else t + 1
        if kind.smb:
            client = smb_clients[int(rnd() * 8)]
            ident = smb_idents[int(rnd() * 16)]
        elif kind.nfs4_only:  # NFS_OPEN / NFS_CLOSE exist in NFSv4 only
            client = nfs4_clients[int(rnd() * n_nfs4)]
            ident = nfs_idents[int(rnd() * 12)]
        else:
            client = nfs_clients[int(rnd() * 8)]
            ident = nfs_idents[int(rnd() * 12)]
        pick = kind.pick
        if pick == _PICK_FILE:
            entry = files[int(rnd() * n_files)]
        elif pick == _PICK_DIR:
            entry = dirs[int(rnd() * n_dirs)]
        elif rnd() < 0.15:
            entry = any_dirs[int(rnd() * n_any)]
        else:
            entry = files[int(rnd() * n_files)]
        target: _Entry | None = None
        if kind.target:
            same_vol = (pools.dirs_by_vol if entry.is_dir else pools.files_by_vol)[entry.vol]
            j = int(rnd() * len(same_vol))
            if same_vol[j] is entry:
                j = (j + 1) % len(same_vol)
            target = same_vol[j]
        if kind.symlink:
            file_type, size = "SYMLINK", len(entry.unix)
        elif entry.is_dir:
            file_type, size = "DIR", entry.size
        else:
            file_type, size = "FILE", 0 if kind.creates else entry.size
        if kind.gens:  # byte counts and offsets are about file data: none for a directory
            data_size = 0 if entry.is_dir else size
            values = tuple([gen(rng, data_size) for gen in kind.gens])
        else:
            values = ()
        yield _Spec(first_req_id + i, kind, t, client, ident, entry, target, rnd() < 0.01, size, file_type, values)


def wall_clock_us() -> int:
    """This host's clock in epoch microseconds (a ``wall_clock`` run's GenerationTime)."""
    return time.time_ns() // 1000


def _to_request(spec: _Spec, notf_type: str) -> ScreenRequest:
    kind, entry, ident, client, target = spec.kind, spec.entry, spec.ident, spec.client, spec.target
    common = ProtCommonInfo(
        client_ip=client.ip,
        generation_time=spec.time_us,
        usr_id_type=ident.usr_id_type,
        usr_context=ident.usr_context,
        file_owner=ident.owner,
        access_paths=entry.win_paths if spec.win_only else entry.paths,
        vol_msid=entry.msid,
        file_size=spec.size,
        num_hard_lnk=entry.nlink,
        is_offline=entry.offline,
        file_type=spec.file_type,
        is_sparse=entry.sparse,
        is_dense=False,
    )
    target_paths: tuple[PathName, ...] = ()
    if target is not None:
        target_paths = target.win_paths if spec.win_only else target.paths
    return ScreenRequest(
        req_id=spec.req_id,
        req_type=kind.req_type,
        op_element=kind.info.element,
        common=common,
        display_path=entry.display if kind.smb else None,
        prot_ver=client.prot_ver,
        user_gids=ident.gids,
        target_paths=target_paths,
        op_fields=tuple(zip(kind.fields, spec.values, strict=True)),
        notf_type=notf_type,
    )


class _FrameHeader(NamedTuple):
    """The fixed parts of a SCREEN_REQ frame for one ``NotfType``."""

    before_len: bytes
    after_len: bytes
    fixed: int


def _frame_header(notf_type: str) -> _FrameHeader:
    before = XML_PROLOG + f"<Header><NotfType>{escape(notf_type)}</NotfType><ContentLen>".encode()
    after = b"</ContentLen><DataFormat>XML</DataFormat></Header>\n\n"
    return _FrameHeader(before, after, len(before) + len(after) + 1)  # + the NUL


def _render(s: _Spec, hdr: _FrameHeader) -> bytes:
    """One spec straight to its frame, byte-identical to ``encode_screen_request``."""
    kind, e, target = s.kind, s.entry, s.target
    target_xml = "" if target is None else target.target_win_xml if s.win_only else target.target_xml
    body = (
        f'<?xml version="1.0"?><FscreenReq><ReqId>{s.req_id}{kind.head_xml}{s.client.ip_xml}'
        f"<GenerationTime>{s.time_us}</GenerationTime>{s.ident.xml}"
        f"{e.access_win_xml if s.win_only else e.access_xml}<VolMsid>{e.msid}</VolMsid>"
        f"<FileSize>{s.size}</FileSize><NumHardLnk>{e.nlink}</NumHardLnk>"
        f"<IsOfflineAttr>{1 if e.offline else 0}</IsOfflineAttr><FileType>{s.file_type}</FileType>"
        f"<IsSparse>{1 if e.sparse else 0}</IsSparse><IsDense>0</IsDense></ProtCommonInfo>"
        f"{e.display_xml if kind.smb else ''}{s.client.ver_xml}{s.ident.gids_xml}</CommonInfo>"
        f"{target_xml}{kind.op_template % s.values if s.values else ''}{kind.tail_xml}"
    ).encode()
    n = len(body)
    digits = b"%d" % n
    return b"".join(
        (_PREFIX.pack(_MARK, hdr.fixed + len(digits) + n, _MARK), hdr.before_len, digits, hdr.after_len, body, b"\0")
    )


def _framed(specs: Iterator[_Spec], notf_type: str) -> Iterator[tuple[_Spec, bytes]]:
    """Render specs straight to frames, byte-identical to ``encode_screen_request``."""
    hdr = _frame_header(notf_type)
    for s in specs:
        yield s, _render(s, hdr)


def generate_requests(
    *,
    seed: int,
    node: int,
    count: int,
    first_req_id: int = 1,
    base_time_us: int,
    notf_type: str = "SCREEN_REQ",
    clock_us: Callable[[], int] | None = None,
) -> Iterator[ScreenRequest]:
    """The ``count`` SCREEN_REQs node ``node`` sends, exactly as the server should decode them.

    Deterministic in its arguments. The first ``len(REQ_TYPES)`` requests cover every ReqType once (shuffled),
    the rest follow a realistic mix. SMB and NFS, files, directories, share roots, renames and links with
    ``TargetAccessPath``, unicode and XML-special names; ~1% carry only the WIN_NAME path. With ``clock_us``
    each request is stamped with the clock's reading when it is drawn instead of ``base_time_us`` + offsets.
    """
    specs = _specs(
        seed=seed, node=node, count=count, first_req_id=first_req_id, base_time_us=base_time_us, clock_us=clock_us
    )
    for spec in specs:
        yield _to_request(spec, notf_type)


def generate_frames(
    *,
    seed: int,
    node: int,
    count: int,
    first_req_id: int = 1,
    base_time_us: int,
    notf_type: str = "SCREEN_REQ",
) -> Iterator[bytes]:
    """The wire frames of :func:`generate_requests` (same arguments, same stream), rendered fast."""
    specs = _specs(seed=seed, node=node, count=count, first_req_id=first_req_id, base_time_us=base_time_us)
    for _spec, frame in _framed(specs, notf_type):
        yield frame


#: One notification of a :class:`NodeStream` (opaque: render it with the stream that made it).
NotificationSpec = _Spec


class NodeStream:
    """One node's notifications one at a time, each stamped with the ``GenerationTime`` the caller gives.

    ``replay-test`` stamps real time: a notification is generated now and delivered now (live) or after an
    outage (replayed from the persistent store). Content is the stream of :func:`generate_requests` for the
    same ``(seed, node)``; only the times differ. Specs are small (they point into the node's pools), so a
    backlog can be held as specs and rendered when sent.
    """

    __slots__ = ("_hdr", "_notf_type", "_specs", "node", "vs_uuid")

    def __init__(
        self,
        *,
        seed: int,
        node: int,
        count: int,
        vs_uuid: str = DEFAULT_VS_UUID,
        notf_type: str = NotfType.SCREEN_REQ.value,
    ) -> None:
        self.node = node
        self.vs_uuid = vs_uuid
        self._notf_type = notf_type
        self._hdr = _frame_header(notf_type)
        self._specs = _specs(seed=seed, node=node, count=count, first_req_id=1, base_time_us=0)

    def next(self, generation_time_us: int) -> NotificationSpec:
        """The next notification, generated at ``generation_time_us``; StopIteration after ``count``."""
        return next(self._specs)._replace(time_us=generation_time_us)

    def frame(self, spec: NotificationSpec) -> bytes:
        return _render(spec, self._hdr)

    def request(self, spec: NotificationSpec) -> ScreenRequest:
        return _to_request(spec, self._notf_type)

    def event_id(self, spec: NotificationSpec) -> str:
        """The ``event_id`` fpolicyd gives this notification (the recipe of ``fpolicyd.events.normalize``),
        computed from the spec without decoding; the unit tests check it against ``normalize``."""
        entry, target = spec.entry, spec.target
        user = spec.ident.usr_context
        return event_id_from_identity(
            [
                self.vs_uuid,
                entry.msid,
                spec.kind.req_type,
                _event_path(entry, spec.win_only),
                None if target is None else _event_path(target, spec.win_only),
                spec.time_us,
                spec.client.ip,
                user.uid,
                user.sid,
            ]
        )


def _event_path(entry: _Entry, win_only: bool) -> str:
    """The path fpolicyd reports for an entry: the UNIX name, else the WIN name with ``/`` separators."""
    if not win_only:
        return entry.unix
    return "/" + entry.win.replace("\\", "/").lstrip("/")


def manifest_record(node: int, request: ScreenRequest) -> dict[str, object]:
    """One manifest line (as a dict) for a request: what a consumer needs to find it again downstream."""
    common = request.common
    return {
        "node": node,
        "req_id": request.req_id,
        "req_type": request.req_type,
        "generation_time": common.generation_time,
        "client_ip": common.client_ip,
        "paths": {str(p.type): p.name for p in common.access_paths},
        "target_paths": {str(p.type): p.name for p in request.target_paths} or None,
        "display_path": request.display_path,
    }


# ----------------------------------------------------------------------------------------------- config


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _help(text: str) -> dict[str, str]:
    """A field's description (``metadata["help"]``): ``fpolicyd simulate --help`` shows it."""
    return {"help": text}


class SimulatorConfigError(ValueError):
    """A :class:`SimulatorConfig` value out of range: ``name`` is the field, ``why`` the rule it breaks."""

    def __init__(self, name: str, why: str, value: object) -> None:
        super().__init__(f"SimulatorConfig.{name}: {why} (got {value!r})")
        self.name = name
        self.why = why
        self.value = value


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """One simulation run. ``nodes`` connections, each sending ``events`` SCREEN_REQs.

    GenerationTime is deterministic by default (``base_time_us`` plus seeded offsets), so that
    :func:`expected_requests` reproduces exactly what :func:`run` sent. ``wall_clock`` stamps each request with
    this host's clock when it is sent instead (what a node does; ``fpolicyd simulate``'s default): such a run is
    not reproducible, and the manifest is the record of what was sent.
    """

    host: str = field(default="127.0.0.1", metadata=_help("FPolicy server host"))
    port: int = field(default=9898, metadata=_help("FPolicy server port"))
    nodes: int = field(default=1, metadata=_help(f"simulated ONTAP nodes, one connection each (1..{MAX_NODES})"))
    events: int = field(default=1000, metadata=_help("SCREEN_REQs per node (the run sends nodes x events)"))
    rate: float = field(default=0.0, metadata=_help("events per second per node; 0 = as fast as the server reads"))
    seed: int = field(
        default=0, metadata=_help("seed of the event stream (same seed, same paths, users and operations)")
    )
    sync: bool = field(default=False, metadata=_help("synchronous engine: wait for a SCREEN_RESP to every request"))
    max_outstanding: int = field(default=500, metadata=_help("sync window, like ONTAP's max-server-reqs (1..10000)"))
    status_interval_s: float = field(
        default=10.0,
        metadata=_help(
            "sync mode: ask about a request unanswered this long (STATUS_QUERY_REQ), again every interval, like "
            "ONTAP's status-req-interval; 0 = never ask"
        ),
    )
    keep_alive_interval_s: float = field(
        default=120.0,
        metadata=_help("KEEP_ALIVE period; 0 = none (ONTAP's own range is 10-600 s; small values are for tests)"),
    )
    versions: tuple[str, ...] = field(
        default=DEFAULT_VERSIONS, metadata=_help("protocol versions offered in NEGO_REQ, comma-separated")
    )
    policy_name: str = field(default="fpolicyd-sim", metadata=_help("policy name in NEGO_REQ"))
    vs_uuid: str = field(default=DEFAULT_VS_UUID, metadata=_help("SVM UUID in NEGO_REQ"))
    base_time_us: int = field(
        default=DEFAULT_BASE_TIME_US,
        metadata=_help(
            "fixed GenerationTime of the stream (epoch microseconds), used unless wall_clock: reproducible runs"
        ),
    )
    wall_clock: bool = field(
        default=False,
        metadata=_help("stamp each request's GenerationTime with this host's clock when it is sent, as a node does"),
    )
    notf_type: str = field(default=NotfType.SCREEN_REQ.value, metadata=_help("header NotfType of every request"))
    connect_timeout_s: float = field(default=5.0, metadata=_help("TCP connect timeout"))
    handshake_timeout_s: float = field(default=5.0, metadata=_help("NEGO_RESP timeout"))
    duration_limit_s: float = field(
        default=600.0, metadata=_help("hard bound on the whole run; a run cut short reports completed=false")
    )
    chunk_events: int = field(default=256, metadata=_help("frames per socket write (1..65536)"))
    manifest: Path | None = field(
        default=None, metadata=_help("if set, one JSON line per sent request (node, req_id, GenerationTime, paths)")
    )

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> SimulatorConfigError:
            return SimulatorConfigError(name, why, getattr(self, name))

        if not isinstance(self.host, str) or not self.host:
            raise bad("host", "must be a non-empty host name or address")
        if not _is_int(self.port) or not 1 <= self.port <= 65535:
            raise bad("port", "must be an integer in 1..65535")
        if not _is_int(self.nodes) or not 1 <= self.nodes <= MAX_NODES:
            raise bad("nodes", f"must be an integer in 1..{MAX_NODES}")
        if not _is_int(self.events) or self.events < 0:
            raise bad("events", "must be an integer >= 0")
        if not _finite(self.rate) or self.rate < 0:
            raise bad("rate", "must be a finite number >= 0 (0 = unlimited)")
        if not _is_int(self.seed):
            raise bad("seed", "must be an integer")
        if not isinstance(self.sync, bool):
            raise bad("sync", "must be a bool")
        if not _is_int(self.max_outstanding) or not 1 <= self.max_outstanding <= 10000:
            raise bad("max_outstanding", "must be an integer in 1..10000 (ONTAP's max-server-reqs range)")
        if not _finite(self.status_interval_s) or self.status_interval_s < 0:
            raise bad("status_interval_s", "must be a finite number >= 0 (0 = no STATUS_QUERY)")
        if not _finite(self.keep_alive_interval_s) or self.keep_alive_interval_s < 0:
            raise bad("keep_alive_interval_s", "must be a finite number >= 0 (0 = no KEEP_ALIVE)")
        if (
            not isinstance(self.versions, tuple)
            or not self.versions
            or not all(isinstance(v, str) and v.strip() for v in self.versions)
        ):
            raise bad("versions", "must be a non-empty tuple of version strings")
        if len(set(self.versions)) != len(self.versions):
            raise bad("versions", "must not repeat a version")
        if not isinstance(self.policy_name, str) or not 1 <= len(self.policy_name) <= 256:
            raise bad("policy_name", "must be 1..256 characters")
        if not isinstance(self.vs_uuid, str) or not 1 <= len(self.vs_uuid) <= 36:
            raise bad("vs_uuid", "must be 1..36 characters")
        if not _is_int(self.base_time_us) or self.base_time_us < 0:
            raise bad("base_time_us", "must be an integer >= 0 (epoch microseconds)")
        if not isinstance(self.wall_clock, bool):
            raise bad("wall_clock", "must be a bool")
        if not isinstance(self.notf_type, str) or not self.notf_type.strip():
            raise bad("notf_type", "must be a non-empty header type")
        for name in ("connect_timeout_s", "handshake_timeout_s", "duration_limit_s"):
            value = getattr(self, name)
            if not _finite(value) or value <= 0:
                raise bad(name, "must be a finite number > 0")
        if not _is_int(self.chunk_events) or not 1 <= self.chunk_events <= 65536:
            raise bad("chunk_events", "must be an integer in 1..65536")
        if self.manifest is not None and not isinstance(self.manifest, Path):
            raise bad("manifest", "must be a pathlib.Path or None")


def expected_requests(config: SimulatorConfig) -> list[tuple[int, ScreenRequest]]:
    """Everything :func:`run` sends for ``config``, as (node, request), node by node in send order.

    A ``wall_clock`` run's GenerationTimes are not known in advance: read its manifest instead."""
    if config.wall_clock:
        raise ValueError("a wall_clock run is not reproducible: its manifest records what it sent")
    return [
        (node, request)
        for node in range(config.nodes)
        for request in generate_requests(
            seed=config.seed,
            node=node,
            count=config.events,
            base_time_us=config.base_time_us,
            notf_type=config.notf_type,
        )
    ]


# ----------------------------------------------------------------------------------------------- report


@dataclass(frozen=True, slots=True)
class NodeReport:
    node: int
    session_id: str
    #: The protocol version the server chose in NEGO_RESP.
    version: str
    sent: int
    responses: int
    keep_alives: int
    back_pressure_applied: int
    #: Sync mode: STATUS_QUERY_REQs sent, the answers "in progress" and "request lost", and the requests sent again
    #: because of a "request lost" for a request still unanswered.
    status_queries: int
    status_in_progress: int
    status_lost: int
    resends: int
    #: Connect to close, seconds.
    elapsed_s: float
    #: Every event sent (and answered, in sync mode) before ``duration_limit_s``.
    completed: bool

    def to_dict(self) -> dict[str, object]:
        return {
            "node": self.node,
            "session_id": self.session_id,
            "version": self.version,
            "sent": self.sent,
            "responses": self.responses,
            "keep_alives": self.keep_alives,
            "back_pressure_applied": self.back_pressure_applied,
            "status_queries": self.status_queries,
            "status_in_progress": self.status_in_progress,
            "status_lost": self.status_lost,
            "resends": self.resends,
            "elapsed_s": round(self.elapsed_s, 6),
            "completed": self.completed,
        }


@dataclass(frozen=True, slots=True)
class SimulationReport:
    nodes: tuple[NodeReport, ...]
    sync: bool
    #: Wall time of the whole run, seconds.
    elapsed_s: float

    @property
    def sent(self) -> int:
        return sum(n.sent for n in self.nodes)

    @property
    def responses(self) -> int:
        return sum(n.responses for n in self.nodes)

    @property
    def keep_alives(self) -> int:
        return sum(n.keep_alives for n in self.nodes)

    @property
    def status_queries(self) -> int:
        return sum(n.status_queries for n in self.nodes)

    @property
    def resends(self) -> int:
        return sum(n.resends for n in self.nodes)

    @property
    def completed(self) -> bool:
        return all(n.completed for n in self.nodes)

    @property
    def events_per_s(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "sync": self.sync,
            "sent": self.sent,
            "responses": self.responses,
            "keep_alives": self.keep_alives,
            "status_queries": self.status_queries,
            "resends": self.resends,
            "completed": self.completed,
            "elapsed_s": round(self.elapsed_s, 6),
            "events_per_s": round(self.events_per_s, 1),
            "nodes": [n.to_dict() for n in self.nodes],
        }


# ----------------------------------------------------------------------------------------------- client


class _Manifest:
    """Append-only JSON Lines of sent requests; shared by all nodes, written a chunk at a time."""

    def __init__(self, path: Path) -> None:
        self._fh: IO[bytes] = path.open("wb")

    def write(self, node: int, specs: Sequence[_Spec], notf_type: str) -> None:
        self._fh.write(b"".join(orjson.dumps(manifest_record(node, _to_request(s, notf_type))) + b"\n" for s in specs))

    def close(self) -> None:
        self._fh.close()


@dataclass(slots=True)
class _Node:
    """One simulated node's connection: handshake, sender, reader and keep-alive tasks."""

    config: SimulatorConfig
    node: int
    manifest: _Manifest | None
    stop_at: float
    hs: Handshake = field(init=False)
    reader: asyncio.StreamReader = field(init=False)
    writer: asyncio.StreamWriter = field(init=False)
    frames: XmlFrameReader = field(default_factory=XmlFrameReader)
    pending: list[bytes] = field(default_factory=list)
    outstanding: dict[int, str] = field(default_factory=dict)
    #: Sync mode with status queries: when to ask next about each unanswered request (earliest first: every entry
    #: is (re)inserted at now + interval), and its frame, to send again on "request lost".
    status_due: dict[int, float] = field(default_factory=dict)
    unanswered_frames: dict[int, bytes] = field(default_factory=dict)
    status_wake: asyncio.Event = field(default_factory=asyncio.Event)
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    version: str = ""
    sent: int = 0
    responses: int = 0
    keep_alives: int = 0
    back_pressure_applied: int = 0
    status_queries: int = 0
    status_in_progress: int = 0
    status_lost: int = 0
    resends: int = 0

    def _fail(self, why: str) -> SimulatorError:
        return SimulatorError(f"node {self.node}: {why}")

    async def run(self) -> NodeReport:
        cfg = self.config
        loop = asyncio.get_running_loop()
        start = loop.time()
        self.hs = handshake(
            seed=cfg.seed, node=self.node, policy_name=cfg.policy_name, vs_uuid=cfg.vs_uuid, versions=cfg.versions
        )
        try:
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_connection(cfg.host, cfg.port), cfg.connect_timeout_s
            )
        except TimeoutError:
            raise self._fail(f"connect to {cfg.host}:{cfg.port} timed out after {cfg.connect_timeout_s} s") from None
        except OSError as exc:
            raise self._fail(f"cannot connect to {cfg.host}:{cfg.port}: {exc}") from exc
        try:
            await self._handshake()
            self.resume.set()
            completed = await self._stream()
        finally:
            self.writer.close()
            with contextlib.suppress(OSError):  # the peer reset a connection we are closing anyway
                await self.writer.wait_closed()
        return NodeReport(
            node=self.node,
            session_id=self.hs.session_id,
            version=self.version,
            sent=self.sent,
            responses=self.responses,
            keep_alives=self.keep_alives,
            back_pressure_applied=self.back_pressure_applied,
            status_queries=self.status_queries,
            status_in_progress=self.status_in_progress,
            status_lost=self.status_lost,
            resends=self.resends,
            elapsed_s=loop.time() - start,
            completed=completed,
        )

    # -- receiving

    async def _receive(self) -> bool:
        """Read once into ``pending``; False on EOF."""
        try:
            data = await self.reader.read(_READ_SIZE)
        except OSError as exc:
            raise self._fail(f"connection error: {exc}") from exc
        if not data:
            return False
        try:
            self.pending.extend(self.frames.feed(data))
        except RemoteProtocolError as exc:
            raise self._fail(f"bad frame from the server: {exc}") from exc
        return True

    def _decode(self, payload: bytes) -> tuple[str, Message]:
        try:
            decoded = decode_payload(payload)
        except RemoteProtocolError as exc:
            raise self._fail(f"undecodable message from the server: {exc}") from exc
        header = decoded.header
        if header.content_len != decoded.body_length:
            raise self._fail(
                f"{header.notf_type} header ContentLen {header.content_len} != body length {decoded.body_length}"
            )
        return header.notf_type, decoded.message

    async def _handshake(self) -> None:
        cfg, hs = self.config, self.hs
        self.writer.write(encode_handshake(hs))
        try:
            async with asyncio.timeout(cfg.handshake_timeout_s):
                await self.writer.drain()
                while not self.pending:
                    if not await self._receive():
                        raise self._fail("server closed the connection before NEGO_RESP")
        except TimeoutError:
            raise self._fail(f"no NEGO_RESP within {cfg.handshake_timeout_s} s") from None
        except OSError as exc:
            raise self._fail(f"connection error during the handshake: {exc}") from exc
        notf_type, msg = self._decode(self.pending.pop(0))
        if not isinstance(msg, HandshakeResp):
            raise self._fail(f"expected NEGO_RESP as the first message, got {notf_type}")
        for what, got, want in (
            ("VsUUID", msg.vs_uuid, hs.vs_uuid),
            ("PolicyName", msg.policy_name, hs.policy_name),
            ("SessionId", msg.session_id, hs.session_id),
        ):
            if got != want:
                raise self._fail(f"NEGO_RESP {what} {got!r} does not echo the NEGO_REQ's {want!r}")
        if msg.version not in hs.versions:
            raise self._fail(f"NEGO_RESP chose version {msg.version!r}, not in the offer {list(hs.versions)}")
        self.version = msg.version

    def _handle(self, payload: bytes) -> None:
        notf_type, msg = self._decode(payload)
        if isinstance(msg, ScreenResponse):
            if not self.config.sync:
                raise self._fail(f"SCREEN_RESP (ReqId {msg.req_id}) from the server in asynchronous mode")
            req_type = self.outstanding.pop(msg.req_id, None)
            if req_type is None:
                raise self._fail(f"SCREEN_RESP for ReqId {msg.req_id}, which is not outstanding")
            if req_type != msg.req_type:
                raise self._fail(
                    f"SCREEN_RESP for ReqId {msg.req_id} has ReqType {msg.req_type!r}, the request was {req_type!r}"
                )
            if msg.notf_resp != ALLOW:
                raise self._fail(f"SCREEN_RESP for ReqId {msg.req_id} has NotfResp {msg.notf_resp}, expected 1")
            self.status_due.pop(msg.req_id, None)
            self.unanswered_frames.pop(msg.req_id, None)
            self.responses += 1
            self.progress.set()
        elif isinstance(msg, StatusQueryResp):
            self._status_answer(msg)
        elif isinstance(msg, BackPressure):
            if msg.session_id != self.hs.session_id:
                raise self._fail(f"{notf_type} for SessionId {msg.session_id!r}, not this session's")
            if msg.apply:
                self.back_pressure_applied += 1
                self.resume.clear()
            else:
                self.resume.set()
        else:
            raise self._fail(f"unexpected {notf_type} from the server")

    def _status_answer(self, msg: StatusQueryResp) -> None:
        """The answer to one of our STATUS_QUERY_REQs. "In progress" is only possible for a request not yet
        answered (the server answers the query when it reads it, before any later SCREEN_RESP); "request lost" for
        one still unanswered makes ONTAP send the request again at once, and so do we."""
        if not (self.config.sync and self.config.status_interval_s > 0):
            raise self._fail(f"STATUS_QUERY_RESP (ReqId {msg.req_id}) although no status query was sent")
        req_type = self.outstanding.get(msg.req_id)
        if req_type is not None and req_type != msg.req_type:
            raise self._fail(
                f"STATUS_QUERY_RESP for ReqId {msg.req_id} has ReqType {msg.req_type!r}, the request was {req_type!r}"
            )
        if msg.resp == STATUS_IN_PROGRESS:
            if req_type is None:
                raise self._fail(f"STATUS_QUERY_RESP 'in progress' for ReqId {msg.req_id}, already answered")
            self.status_in_progress += 1
        elif msg.resp == STATUS_REQUEST_LOST:
            self.status_lost += 1
            if req_type is not None:
                self.writer.write(self.unanswered_frames[msg.req_id])
                self.resends += 1
                del self.status_due[msg.req_id]
                self.status_due[msg.req_id] = asyncio.get_running_loop().time() + self.config.status_interval_s
        else:
            raise self._fail(f"STATUS_QUERY_RESP for ReqId {msg.req_id} has Resp {msg.resp}, expected 1 or 2")

    async def _status_loop(self) -> None:
        """ONTAP's status-req-interval: ask about every request unanswered for an interval, again every interval."""
        loop = asyncio.get_running_loop()
        interval = self.config.status_interval_s
        due = self.status_due
        while True:
            if not due:
                self.status_wake.clear()
                await self.status_wake.wait()
                continue
            wait = next(iter(due.values())) - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            now = loop.time()
            asked: list[int] = []
            for req_id, at in due.items():
                if at > now:
                    break
                asked.append(req_id)
            frames = []
            for req_id in asked:
                del due[req_id]
                due[req_id] = now + interval
                frames.append(encode_message(StatusQuery(req_id, self.outstanding[req_id])))
            self.status_queries += len(frames)
            self.writer.write(b"".join(frames))

    async def _read_loop(self) -> None:
        while True:
            pending, self.pending = self.pending, []
            for payload in pending:
                self._handle(payload)
            if not await self._receive():
                if self.sent == self.config.events and not self.outstanding:
                    return
                raise self._fail(
                    f"server closed the connection after {self.sent}/{self.config.events} requests "
                    f"({self.responses} responses)"
                )

    # -- sending

    async def _keep_alive_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.keep_alive_interval_s
        due = loop.time() + interval
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            self.writer.write(_KEEP_ALIVE_FRAME)
            self.keep_alives += 1
            due += interval

    async def _wait_progress(self, until: Callable[[], bool]) -> None:
        while not until():
            self.progress.clear()
            await self.progress.wait()

    async def _send_all(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        specs = _specs(
            seed=cfg.seed,
            node=self.node,
            count=cfg.events,
            first_req_id=1,
            base_time_us=cfg.base_time_us,
            clock_us=wall_clock_us if cfg.wall_clock else None,
        )
        frames = _framed(specs, cfg.notf_type)
        total, rate, window = cfg.events, cfg.rate, cfg.max_outstanding
        start = loop.time()
        while self.sent < total:
            n = min(cfg.chunk_events, total - self.sent)
            if rate > 0:
                # Events whose slot on the schedule start + i/rate has begun; late slots are sent at once.
                due = int((loop.time() - start) * rate) + 1 - self.sent
                if due <= 0:
                    await asyncio.sleep(start + self.sent / rate - loop.time())
                    continue
                n = min(n, due)
            if cfg.sync:
                await self._wait_progress(lambda: len(self.outstanding) < window)
                n = min(n, window - len(self.outstanding))
            if not self.resume.is_set():
                await self.resume.wait()
            batch = list(islice(frames, n))
            if cfg.sync:
                for spec, _frame in batch:
                    self.outstanding[spec.req_id] = spec.kind.req_type
                if cfg.status_interval_s > 0:
                    asked_at = loop.time() + cfg.status_interval_s
                    for spec, frame in batch:
                        self.status_due[spec.req_id] = asked_at
                        self.unanswered_frames[spec.req_id] = frame
                    self.status_wake.set()
            self.writer.write(b"".join([frame for _spec, frame in batch]))
            self.sent += n
            if self.manifest is not None:
                self.manifest.write(self.node, [spec for spec, _frame in batch], cfg.notf_type)
            await self.writer.drain()
        if cfg.sync:
            await self._wait_progress(lambda: not self.outstanding)

    async def _stream(self) -> bool:
        """Send everything (and collect every response); False if ``stop_at`` came first."""
        loop = asyncio.get_running_loop()

        def remaining() -> float:
            return max(0.0, self.stop_at - loop.time())

        # Frames that came with NEGO_RESP (e.g. BACK_PRESSURE_APPLY) take effect before the first request.
        pending, self.pending = self.pending, []
        for payload in pending:
            self._handle(payload)
        reader = asyncio.create_task(self._read_loop())
        sender = asyncio.create_task(self._send_all())
        keep_alive = status = None
        if self.config.keep_alive_interval_s > 0:
            keep_alive = asyncio.create_task(self._keep_alive_loop())
        if self.config.sync and self.config.status_interval_s > 0:
            status = asyncio.create_task(self._status_loop())
        tasks = [t for t in (sender, reader, keep_alive, status) if t is not None]
        try:
            done, _ = await asyncio.wait((sender, reader), timeout=remaining(), return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                reader.result()  # raises the server's misbehaviour; returns only after a clean end
                await asyncio.wait((sender,), timeout=remaining())
            if not sender.done():
                return False
            try:
                sender.result()
            except OSError as exc:
                raise self._fail(f"connection error after {self.sent} requests: {exc}") from exc
            if not reader.done():
                await self._linger(reader, keep_alive, min(_LINGER_S, remaining()))
            return True
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _linger(self, reader: asyncio.Task[None], keep_alive: asyncio.Task[None] | None, wait_s: float) -> None:
        """Half-close and read until the server closes too, so that whatever it still sends is checked and
        everything we sent has been read when :func:`run` returns. A server that keeps its side open only
        costs ``wait_s``."""
        if keep_alive is not None:
            keep_alive.cancel()
        try:
            self.writer.write_eof()
        except OSError:
            return
        done, _ = await asyncio.wait((reader,), timeout=wait_s)
        if done:
            reader.result()


async def run(config: SimulatorConfig) -> SimulationReport:
    """Play ``config.nodes`` ONTAP nodes against the server; raise :class:`SimulatorError` on misbehaviour.

    Works on the default loop and on uvloop. Returns when every node has sent (and, in sync mode, had answered)
    all its events, or when ``duration_limit_s`` has passed (then ``completed`` is False).
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    stop_at = start + config.duration_limit_s
    manifest = _Manifest(config.manifest) if config.manifest is not None else None
    try:
        tasks = [asyncio.create_task(_Node(config, node, manifest, stop_at).run()) for node in range(config.nodes)]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            exc = None if task.cancelled() else task.exception()
            if exc is not None:
                raise exc
        reports = tuple(task.result() for task in tasks)
    finally:
        if manifest is not None:
            manifest.close()
    return SimulationReport(nodes=reports, sync=config.sync, elapsed_s=loop.time() - start)
