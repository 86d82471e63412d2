"""Pure, deterministic generation of an ONTAP node's notifications (no clock, no I/O).

Every random choice of a node's stream comes from one ``random.Random`` seeded from ``(seed, node)`` through
BLAKE2b (never ``hash()``, which is salted per process), so the same arguments give byte-identical frames on every
run. A stream is drawn as compact specs that point into per-node pools (paths, users, clients) whose XML fragments
are escaped once. A spec renders either to the :class:`~fpolicyd.protocol.messages.ScreenRequest` the server should
decode, or straight to frame bytes. The direct renderer exists for speed: the codec's general encoder does ~50k
frames/s on one core, too slow to load-test a server from one process. Its output is byte-identical to
:func:`~fpolicyd.protocol.xml_codec.encode_screen_request` (the unit tests check this on long streams).
"""

from __future__ import annotations

import hashlib
import random
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from fpolicyd.events import event_id_from_identity
from fpolicyd.protocol.messages import (
    NotfType,
    PathName,
    PathNameType,
    ProtCommonInfo,
    ScreenRequest,
    UserContext,
    UserKind,
)
from fpolicyd.protocol.req_types import REQ_TYPES, Operation, ReqTypeInfo
from fpolicyd.protocol.xml_codec import XML_PROLOG, escape

__all__ = [
    "DEFAULT_BASE_TIME_US",
    "DEFAULT_VS_UUID",
    "NodeStream",
    "NotificationSpec",
    "generate_frames",
    "generate_requests",
    "manifest_record",
    "wall_clock_us",
]

DEFAULT_VS_UUID: Final = "5e1f0c2a-6292-11ee-b5d1-000c29f00d01"
#: 2023-11-14T22:13:20Z in epoch µs: fixed so that runs are reproducible unless the caller passes "now".
DEFAULT_BASE_TIME_US: Final = 1_700_000_000_000_000
#: The CIFS server name in every SMB ``DisplayPath`` (``\\<server>\<share>\<path>``).
CIFS_SERVER: Final = "FPSIM-SVM0"

_PREFIX: Final = struct.Struct(">BIB")
_MARK: Final = 0x22


# ------------------------------------------------------------------------------------------- determinism


def _derive_seed(*parts: object) -> int:
    """A stable 128-bit seed from the parts (``hash()`` is salted per process, so never used)."""
    text = ":".join(("fpolicyd-sim", *(str(p) for p in parts))).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=16).digest(), "big")


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
