"""The spool against an in-memory model, under random appends, syncs, reads, acks, checkpoints and crashes.

Acks may also come from another process that read the records itself (``ack_delivered``), overtaking the
spool's own read position.

A crash drops the spool without closing it (the write buffer is lost) and may also cut the last segment file
anywhere past the last sync point (an OS crash losing unsynced data). Invariants: every synced record is
recoverable; nothing acked and checkpointed is delivered again; nothing is delivered that was not appended, and
each sink gets its records in seq order without skipping one; lag, sizes and segment removal stay exact.
"""

from __future__ import annotations

import struct
import tempfile
import zlib
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fpolicyd.storage import spool as spool_module
from fpolicyd.storage.spool import Spool, SpoolSettings

SINKS = ("a", "b")
SEG_HDR = 24
REC_HDR = 16

sinks = st.sampled_from(SINKS)
payload_groups = st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=8)


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("spool-*.seg"))


def record_ends(path: Path) -> list[tuple[int, int]]:
    """(seq, offset just after the record) for every well-formed record of a segment file."""
    data = path.read_bytes()
    out = []
    off = SEG_HDR
    while off + REC_HDR <= len(data):
        length, crc, seq = struct.unpack_from("<IIQ", data, off)
        payload = data[off + REC_HDR : off + REC_HDR + length]
        if length == 0 or len(payload) < length or zlib.crc32(payload) != crc:
            break
        off += REC_HDR + length
        out.append((seq, off))
    return out


class SpoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.directory = Path(self.tmp.name) / "spool"
        self.spool: Spool | None = None
        self.model: dict[int, bytes] = {}  # what the spool must hold: seq -> payload
        self.synced = 0  # highest seq a completed sync (or open) made durable
        self.acked = dict.fromkeys(SINKS, 0)  # the model's cumulative ack per sink
        self.pending: dict[str, list[tuple[int, int]]] = {s: [] for s in SINKS}  # out-of-order acked ranges
        self.ckpt = dict.fromkeys(SINKS, 0)  # acked positions known to be persisted
        self.read_pos = dict.fromkeys(SINKS, 0)  # last seq handed to the sink (or its acked seq after a reset)
        self.inflight: dict[str, list[tuple[int, int]]] = {s: [] for s in SINKS}

    @property
    def s(self) -> Spool:
        assert self.spool is not None
        return self.spool

    def open(self) -> Spool:
        self.spool = Spool.open(self.cfg, SINKS)
        return self.spool

    @initialize(segment_bytes=st.integers(min_value=64, max_value=300))
    def start(self, segment_bytes: int) -> None:
        self.cfg = SpoolSettings(directory=self.directory, segment_bytes=segment_bytes)
        self.open()
        self.s.checkpoint()

    def teardown(self) -> None:
        if self.spool is not None:
            self.spool.abandon()
        self.tmp.cleanup()

    # -- model helpers ---------------------------------------------------------------------------------

    def next_model_seq(self, after: int) -> int | None:
        return min((seq for seq in self.model if seq > after), default=None)

    def settle(self, sink: str) -> None:
        """The cumulative ack absorbs every held range that now touches it."""
        moved = True
        while moved:
            moved = False
            nxt = self.next_model_seq(self.acked[sink])
            edge = self.acked[sink] + 1 if nxt is None else nxt
            for first, last in list(self.pending[sink]):
                if first <= edge:
                    self.pending[sink].remove((first, last))
                    if last > self.acked[sink]:
                        self.acked[sink] = last
                        moved = True
        self.read_pos[sink] = max(self.read_pos[sink], self.acked[sink])

    # -- rules -----------------------------------------------------------------------------------------

    @rule(payloads=payload_groups, many=st.booleans())
    def append(self, payloads: list[bytes], many: bool) -> None:
        seqs = list(self.s.append_many(payloads)) if many else [self.s.append(p) for p in payloads]
        assert seqs == list(range(seqs[0], seqs[0] + len(payloads)))
        assert seqs[0] > max(self.model, default=0)
        self.model.update(zip(seqs, payloads, strict=True))

    @rule()
    def flush(self) -> None:
        self.s.flush()
        assert self.s.written_seq == self.s.last_seq

    @rule(flush_first=st.booleans())
    def sync(self, flush_first: bool) -> None:
        if flush_first:
            self.s.flush()
        written = self.s.written_seq
        assert self.s.sync() == written
        self.synced = written
        self.s.collect()  # what the asyncio side does once a sync completes

    @rule(sink=sinks, n=st.integers(min_value=1, max_value=6), max_bytes=st.sampled_from([1, 50, 10**6]))
    def read(self, sink: str, n: int, max_bytes: int) -> None:
        batch = self.s.read(sink, n, max_bytes)
        available = sorted(seq for seq in self.model if self.read_pos[sink] < seq <= self.s.durable_seq)
        assert [r.seq for r in batch] == available[: len(batch)]  # in order, nothing skipped, nothing invented
        assert all(r.payload == self.model[r.seq] for r in batch)
        assert all(r.seq > self.ckpt[sink] for r in batch)  # nothing acked and checkpointed comes back
        if available:
            assert batch, "a durable record was not delivered"
            assert len(batch) == n or sum(len(r.payload) for r in batch) <= max_bytes or len(batch) == 1
            if len(batch) < min(n, len(available)):
                assert sum(len(r.payload) for r in batch) + len(self.model[available[len(batch)]]) > max_bytes
            self.read_pos[sink] = batch[-1].seq
            self.inflight[sink].append((batch[0].seq, batch[-1].seq))

    @rule(sink=sinks, batches=st.integers(min_value=2, max_value=4), n=st.integers(min_value=1, max_value=2))
    def read_several(self, sink: str, batches: int, n: int) -> None:
        """A sink with several small batches in flight at once (what makes acks arrive out of order)."""
        for _ in range(batches):
            self.read(sink, n, 10**6)

    @rule(pick=st.integers(min_value=0, max_value=20))
    def ack_batch(self, pick: int) -> None:
        """A batch in flight completes, in any order, for any sink."""
        batches = [(sink, batch) for sink in SINKS for batch in self.inflight[sink]]
        if not batches:
            return
        sink, (first, last) = batches[pick % len(batches)]
        self.inflight[sink].remove((first, last))
        self.s.ack_range(sink, first, last)
        self.pending[sink].append((first, last))
        self.settle(sink)

    @rule(sink=sinks)
    def ack_everything_read(self, sink: str) -> None:
        if not self.inflight[sink]:
            return
        up_to = max(last for _, last in self.inflight[sink])
        self.inflight[sink].clear()
        self.s.ack(sink, up_to)
        self.acked[sink] = max(self.acked[sink], up_to)
        self.settle(sink)

    @rule(sink=sinks, n=st.integers(min_value=1, max_value=4))
    def catch_up(self, sink: str, n: int) -> None:
        """A healthy sink: reads what is durable in batches of ``n`` and acks it all."""
        while True:
            before = len(self.inflight[sink])
            self.read(sink, n, 10**6)
            if len(self.inflight[sink]) == before:
                break
        self.ack_everything_read(sink)

    @rule(sink=sinks, where=st.floats(min_value=0.0, max_value=1.0))
    def ack_delivered(self, sink: str, where: float) -> None:
        """Another process (the delivery process) read and delivered up to a durable seq: the ack overtakes this
        spool's own read position, which must then resume just after it."""
        if self.inflight[sink] or self.s.durable_seq <= self.acked[sink]:
            return
        up_to = self.acked[sink] + 1 + int(where * (self.s.durable_seq - self.acked[sink] - 1))
        self.s.ack_delivered(sink, up_to)
        self.acked[sink] = up_to
        self.settle(sink)

    @rule(sink=sinks)
    def rewind(self, sink: str) -> None:
        self.s.rewind(sink)
        self.read_pos[sink] = self.acked[sink]
        self.inflight[sink].clear()

    @rule()
    def checkpoint(self) -> None:
        self.s.checkpoint()
        self.ckpt = dict(self.acked)

    @rule(cut=st.booleans(), where=st.floats(min_value=0.0, max_value=1.0))
    def crash(self, cut: bool, where: float) -> None:
        written, acked_in_memory = self.s.written_seq, dict(self.acked)
        self.s.abandon()
        if cut:
            last = segment_files(self.directory)[-1]
            first_seq = int(last.name[6:26])
            size = last.stat().st_size
            floor = 0  # a segment created after the last sync may lose everything, even its name's contents
            if first_seq <= self.synced:
                floor = max((end for seq, end in record_ends(last) if seq <= self.synced), default=SEG_HDR)
            with last.open("r+b") as f:
                f.truncate(floor + int(where * (size - floor)))
        spool = self.open()
        assert spool.last_seq >= self.synced, "a synced record was lost"
        if not cut:
            assert spool.last_seq == written, "a record handed to the kernel was lost in a process crash"
        self.model = {seq: p for seq, p in self.model.items() if seq <= spool.last_seq}
        self.reset_sinks(acked_in_memory)

    @rule()
    def close_and_reopen(self) -> None:
        last = self.s.last_seq
        self.s.close()
        spool = self.open()
        assert spool.last_seq == last
        assert spool.recovery is not None
        assert spool.recovery.torn_bytes == spool.recovery.corrupt_bytes == 0
        assert all(spool.acked_seq(sink) == self.acked[sink] for sink in SINKS)
        self.ckpt = dict(self.acked)
        self.reset_sinks(self.acked)

    def reset_sinks(self, acked_in_memory: dict[str, int]) -> None:
        """After a reopen: every sink resumes between its checkpoint and its in-memory ack, and can read every
        surviving record after that, in order (held out-of-order acks are forgotten: at least once)."""
        self.synced = self.s.durable_seq
        assert self.synced == self.s.last_seq
        for sink in SINKS:
            acked = self.s.acked_seq(sink)
            assert self.ckpt[sink] <= acked <= acked_in_memory[sink]
            got = []
            while batch := self.s.read(sink, 50, 10**6):
                got.extend(batch)
            expected = sorted(seq for seq in self.model if seq > acked)
            assert [r.seq for r in got] == expected
            assert all(r.payload == self.model[r.seq] for r in got)
            self.s.rewind(sink)
            self.acked[sink] = self.read_pos[sink] = acked
            self.pending[sink].clear()
            self.inflight[sink].clear()

    # -- invariants ------------------------------------------------------------------------------------

    @invariant()
    def positions_and_sizes(self) -> None:
        if self.spool is None:
            return
        s = self.s
        assert s.durable_seq <= s.written_seq <= s.last_seq == max(self.model, default=s.last_seq)
        for sink in SINKS:
            assert s.acked_seq(sink) == self.acked[sink]
            assert s.records_pending(sink) == sum(1 for seq in self.model if seq > self.acked[sink])
        oldest = [self.next_model_seq(self.acked[sink]) for sink in SINKS]
        assert s.oldest_unacked_seq == min((seq for seq in oldest if seq is not None), default=None)
        files = segment_files(self.directory)
        assert s.bytes_on_disk == sum(p.stat().st_size for p in files)
        assert s.segments == len(files)

    @invariant()
    def acked_segments_are_removed(self) -> None:
        if self.spool is None:
            return
        floor = min(*self.acked.values(), self.s.durable_seq - 1)  # the newest durable record is kept
        for path in segment_files(self.directory)[:-1]:
            ends = record_ends(path)
            assert ends, f"{path.name}: an older segment with no records"
            assert ends[-1][0] > floor, f"{path.name} is fully acked by every sink and still there"


SpoolMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestSpoolAgainstModel = SpoolMachine.TestCase


@given(data=st.binary(max_size=5000), start=st.integers(min_value=0, max_value=2**32 - 1))
def test_the_record_checksum_is_zlibs_crc32(data: bytes, start: int) -> None:
    """The spool's checksum (ISA-L's) is zlib's CRC-32 bit for bit: files written before and after it, and any
    tool that checks them with zlib (``record_ends`` above), agree."""
    assert spool_module._crc32(data) == zlib.crc32(data)
    assert spool_module._crc32(data, start) == zlib.crc32(data, start)
