"""Sharded spool tails (storage side of ``delivery_processes``): Shard, SpoolTail's sharded reads and acks,
Spool.available and Spool.ack_delivered_range."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fpolicyd.storage.shard import Shard
from fpolicyd.storage.spool import Spool, SpoolCorruptError, SpoolFsync, SpoolIOError, SpoolSettings, SpoolTail

SEG_HDR = 24
REC_HDR = 16


def open_spool(directory: Path, **kw: Any) -> Spool:
    return Spool.open(SpoolSettings(directory=directory, fsync=SpoolFsync.never, **kw), ["a"])


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = open_spool(tmp_path)
    yield s
    s.close()


def write(spool: Spool, n: int, size: int = 10) -> None:
    """Append records ``last_seq + 1 .. + n`` of ``size`` bytes each and make them durable."""
    start = spool.last_seq + 1
    spool.append_many([bytes([65 + (start + i) % 26]) * size for i in range(n)])
    spool.flush()


def tail_of(spool: Spool, shard: Shard | None, durable: int | None = None) -> SpoolTail:
    return SpoolTail(
        spool.settings.directory,
        {"a": (spool.acked_seq("a"), spool.position("a"))},
        spool.durable_seq if durable is None else durable,
        None if shard is None else {"a": shard},
    )


def seqs(tail: SpoolTail, max_records: int = 1000, max_bytes: int = 1 << 20) -> list[int]:
    return [r.seq for r in tail.read("a", max_records, max_bytes)]


@pytest.mark.parametrize(
    ("index", "count", "block"),
    [(0, 0, 1), (1, 1, 1), (-1, 2, 1), (2, 2, 1), (0, 1, 0), (True, 2, 1), (0, 2.0, 1), (0, 1, "4")],
)
def test_shard_validates_its_fields(index: Any, count: Any, block: Any) -> None:
    with pytest.raises(ValueError, match="shard"):
        Shard(index, count, block)


def test_shard_arithmetic() -> None:
    shard = Shard(1, 3, 4)  # owns 5..8, 17..20, 29..32, ...
    assert [s for s in range(1, 34) if shard.owns(s)] == [5, 6, 7, 8, 17, 18, 19, 20, 29, 30, 31, 32]
    assert [shard.block_last(s) for s in (1, 4, 5, 8, 9)] == [4, 4, 8, 8, 12]
    assert shard.owned_between(6, 18) == 5
    assert shard.owned_between(9, 16) == 0
    assert shard.owned_between(7, 6) == 0
    assert Shard(0, 1, 7).owned_between(1, 100) == 100
    with pytest.raises(ValueError, match="start at 1"):
        shard.owns(0)
    with pytest.raises(ValueError, match="start at 1"):
        shard.owned_between(0, 5)


def test_a_tail_that_owns_nothing_yet_skips_and_its_ack_moves_over_what_it_skipped(spool: Spool) -> None:
    write(spool, 5)
    tail = tail_of(spool, Shard(1, 2, 5))  # owns 6..10, 16..20, ...
    assert tail.available("a") == 0
    assert seqs(tail) == []
    assert tail.read_seq("a") == 6
    assert tail.acked_seq("a") == 5  # skipped records count as acknowledged
    assert tail.take_delivered("a") == []  # ... but as nothing this shard delivered
    write(spool, 7)  # 6..12
    tail.advance(spool.durable_seq)
    assert tail.available("a") == 5
    assert seqs(tail) == [6, 7, 8, 9, 10]
    assert tail.available("a") == 0
    tail.ack_range("a", 6, 10)
    assert tail.acked_seq("a") == 10
    assert seqs(tail) == []  # 11 and 12 are shard 0's
    assert tail.acked_seq("a") == 12
    assert tail.take_delivered("a") == [(6, 10)]
    assert tail.take_delivered("a") == []
    tail.close()


def test_skipped_records_wait_for_the_owned_batch_before_them(spool: Spool) -> None:
    write(spool, 8)
    tail = tail_of(spool, Shard(0, 2, 2))  # owns 1, 2, 5, 6
    assert seqs(tail) == [1, 2]
    assert seqs(tail) == [5, 6]  # 3 and 4 skipped on the way
    assert seqs(tail) == []  # 7 and 8 skipped
    assert tail.acked_seq("a") == 0  # 1..2 still in flight
    tail.ack_range("a", 5, 6)
    assert tail.acked_seq("a") == 0
    tail.ack_range("a", 1, 2)
    assert tail.acked_seq("a") == 8
    assert tail.take_delivered("a") == [(5, 6), (1, 2)]  # in the order they were acknowledged
    with pytest.raises(ValueError, match="not a batch"):
        tail.ack_range("a", 3, 4)  # skipped, never handed out
    tail.close()


def test_a_read_stops_at_its_block_end_and_at_max_bytes_inside_a_block(spool: Spool) -> None:
    write(spool, 12, size=10)
    whole = tail_of(spool, Shard(0, 1, 4))  # owns everything, still one block per read
    assert [seqs(whole) for _ in range(4)] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], []]
    whole.close()
    tail = tail_of(spool, Shard(0, 2, 4))
    assert seqs(tail, max_bytes=25) == [1, 2]
    assert seqs(tail, max_bytes=25) == [3, 4]
    assert seqs(tail, max_records=3) == [9, 10, 11]
    assert seqs(tail, max_bytes=1) == [12]  # at least one record, as unsharded reads
    tail.ack("a", 11)
    assert tail.take_delivered("a") == [(1, 2), (3, 4), (9, 11)]
    assert tail.acked_seq("a") == 11  # 12 is still in flight
    tail.ack("a", 12)
    assert tail.take_delivered("a") == [(12, 12)]
    assert tail.acked_seq("a") == 12
    tail.close()


def test_available_and_take_delivered_unsharded(spool: Spool) -> None:
    write(spool, 6)
    assert spool.available("a") == 6
    assert len(spool.read("a", 4)) == 4
    assert spool.available("a") == 2
    tail = tail_of(spool, None, durable=5)
    assert tail.available("a") == 5
    assert seqs(tail, max_records=2) == [1, 2]
    assert tail.available("a") == 3
    tail.ack_range("a", 1, 2)
    with pytest.raises(ValueError, match="not sharded"):
        tail.take_delivered("a")
    tail.close()
    with pytest.raises(ValueError, match="unknown sink"):
        SpoolTail(spool.settings.directory, {"a": (0, spool.position("a"))}, 0, {"b": Shard(0, 1, 1)})


def test_a_skipped_record_is_still_checked_for_seq_and_length(spool: Spool, tmp_path: Path) -> None:
    write(spool, 6, size=10)
    segment = next(tmp_path.glob("spool-*.seg"))
    data = bytearray(segment.read_bytes())
    # A flipped payload byte of record 2 (another shard's): no CRC check on a skipped record.
    data[SEG_HDR + (REC_HDR + 10) + REC_HDR] ^= 0xFF
    segment.write_bytes(bytes(data))
    tail = tail_of(spool, Shard(1, 2, 2), durable=2)  # owns 3, 4
    assert seqs(tail) == []  # up to the durable seq 2: nothing owned, nothing wrong that it checks
    tail.close()
    # A wrong seq in record 2's header is caught even though it is skipped.
    struct.pack_into("<Q", data, SEG_HDR + (REC_HDR + 10) + 8, 99)
    segment.write_bytes(bytes(data))
    tail = tail_of(spool, Shard(1, 2, 2))
    with pytest.raises(SpoolCorruptError, match="expected record 2"):
        tail.read("a")
    tail.close()


def test_a_skipped_record_cut_short_at_the_end_of_the_file_is_caught(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    try:
        spool.append_many([b"x" * 10, b"y" * (300 * 1024)])  # record 2 is bigger than one read chunk
        spool.flush()
        segment = next(tmp_path.glob("spool-*.seg"))
        tail = tail_of(spool, Shard(1, 2, 1))  # owns 2 only: 1 is skipped
        with segment.open("r+b") as f:
            f.truncate(segment.stat().st_size - 1)
        with pytest.raises(SpoolCorruptError, match="ends inside record 2"):
            tail.read("a")
        tail.close()
        skipping = tail_of(spool, Shard(0, 2, 1))  # owns 1: record 2 is skipped and cut short
        assert seqs(skipping) == [1]
        with pytest.raises(SpoolCorruptError, match="ends inside record 2"):
            skipping.read("a")
        skipping.close()
    finally:
        spool.abandon()


def test_ack_delivered_range_out_of_order_duplicate_and_beyond_durable(spool: Spool) -> None:
    write(spool, 12)
    spool.ack_delivered_range("a", 5, 8)
    assert spool.acked_seq("a") == 0  # held: 1..4 not delivered yet
    spool.ack_delivered_range("a", 9, 12)
    spool.ack_delivered_range("a", 5, 8)  # duplicate
    assert spool.acked_seq("a") == 0
    spool.ack_delivered_range("a", 1, 4)
    assert spool.acked_seq("a") == 12
    spool.ack_delivered_range("a", 1, 4)  # at or below the acked position: nothing to do
    assert spool.acked_seq("a") == 12
    with pytest.raises(ValueError, match="only 12 is durable"):
        spool.ack_delivered_range("a", 13, 13)
    with pytest.raises(ValueError, match="empty ack range"):
        spool.ack_delivered_range("a", 4, 3)
    with pytest.raises(ValueError, match="unknown sink"):
        spool.ack_delivered_range("b", 1, 1)


def test_ack_delivered_range_raises_hi_read_for_later_acks(spool: Spool) -> None:
    write(spool, 6)
    with pytest.raises(ValueError, match="only 0 was read"):
        spool.ack_range("a", 1, 2)
    spool.ack_delivered_range("a", 3, 4)
    spool.ack_range("a", 1, 2)  # allowed now: this process counts 1..4 as handed out
    assert spool.acked_seq("a") == 4


def test_ack_delivered_range_persists_the_cumulative_position_only(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    write(spool, 10)
    spool.ack_delivered_range("a", 1, 3)
    spool.ack_delivered_range("a", 6, 10)  # held
    assert spool.checkpoint()
    spool.close()
    again = open_spool(tmp_path)
    try:
        assert again.acked_seq("a") == 3
        # Held ranges were not persisted: 4..10 are delivered again (at least once).
        assert [r.seq for r in again.read("a")] == list(range(4, 11))
        again.ack_delivered_range("a", 6, 10)
        assert again.acked_seq("a") == 3
        again.ack_delivered_range("a", 4, 5)
        assert again.acked_seq("a") == 10
    finally:
        again.close()


def test_ack_delivered_range_joins_across_seqs_lost_between_segments(tmp_path: Path) -> None:
    spool = open_spool(tmp_path, segment_bytes=SEG_HDR + 3 * (REC_HDR + 10))
    for _ in range(3):
        write(spool, 3, size=10)  # a segment of three records each
    spool.close()
    segments = sorted(tmp_path.glob("spool-*.seg"))
    assert len(segments) == 3
    middle = segments[1]
    data = bytearray(middle.read_bytes())
    data[SEG_HDR + (REC_HDR + 10) + REC_HDR] ^= 0xFF  # record 5 is corrupt: 5 and 6 are cut
    middle.write_bytes(bytes(data))
    again = open_spool(tmp_path)
    try:
        assert again.recovery is not None
        assert again.recovery.records_lost == 2
        again.ack_delivered_range("a", 7, 9)
        assert again.acked_seq("a") == 0
        again.ack_delivered_range("a", 1, 4)
        assert again.acked_seq("a") == 9
    finally:
        again.close()


def test_a_segment_removed_before_a_sharded_tail_opened_it_is_passed_over(tmp_path: Path) -> None:
    spool = open_spool(tmp_path, segment_bytes=SEG_HDR + 3 * (REC_HDR + 10))
    try:
        for _ in range(3):
            write(spool, 3, size=10)  # segments 1..3, 4..6, 7..9
        unsharded = tail_of(spool, None)
        tail = tail_of(spool, Shard(1, 2, 3))  # owns 4..6; positioned in segment 1, not opened yet
        spool.ack_delivered_range("a", 1, 3)  # shard 0 delivered 1..3: the owner removes segment 1
        assert spool.segments == 2
        assert seqs(tail) == [4, 5, 6]
        tail.ack_range("a", 4, 6)
        assert seqs(tail) == []
        assert tail.acked_seq("a") == 9
        assert tail.take_delivered("a") == [(4, 6)]
        tail.close()
        with pytest.raises(SpoolIOError, match="cannot open"):  # unsharded: nobody else delivers, as before
            unsharded.read("a")
        unsharded.close()
    finally:
        spool.close()
