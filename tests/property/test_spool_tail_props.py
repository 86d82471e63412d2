"""SpoolTail (the delivery process's read-only view) reads exactly what the spool's own reader reads."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fpolicyd.storage.spool import Spool, SpoolCorruptError, SpoolFsync, SpoolSettings, SpoolTail

PROPS = settings(
    max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

payloads = st.binary(min_size=1, max_size=300)


def open_spool(directory: Path) -> Spool:
    return Spool.open(
        SpoolSettings(directory=directory, segment_bytes=1 << 16, max_bytes=64 << 20, fsync=SpoolFsync.never), ["a"]
    )


@PROPS
@given(
    groups=st.lists(st.lists(payloads, min_size=1, max_size=40), min_size=1, max_size=12),
    reads=st.lists(st.tuples(st.integers(1, 50), st.integers(1, 4000)), min_size=1, max_size=40),
)
def test_tail_reads_the_same_records_as_the_spool_across_segments(
    tmp_path_factory: pytest.TempPathFactory, groups: list[list[bytes]], reads: list[tuple[int, int]]
) -> None:
    directory = tmp_path_factory.mktemp("spool")
    spool = open_spool(directory)
    try:
        tail = SpoolTail(directory, {"a": (0, spool.position("a"))}, spool.durable_seq)
        expected: list[tuple[int, bytes]] = []
        got: list[tuple[int, bytes]] = []
        for group in groups:
            seqs = spool.append_many(group)
            spool.flush()
            expected.extend(zip(seqs, group, strict=True))
            tail.advance(spool.durable_seq)
            for max_records, max_bytes in reads[: len(reads) // len(groups) + 1]:
                batch = tail.read("a", max_records, max_bytes)
                assert len(batch) <= max_records
                if batch:
                    tail.ack_range("a", batch[0].seq, batch[-1].seq)
                got.extend((r.seq, r.payload) for r in batch)
        while batch := tail.read("a", 1000):
            tail.ack_range("a", batch[0].seq, batch[-1].seq)
            got.extend((r.seq, r.payload) for r in batch)
        assert got == expected
        assert tail.acked_seq("a") == spool.last_seq
        tail.close()
    finally:
        spool.close()


def test_tail_never_reads_past_the_durable_seq_and_acks_out_of_order_batches_in_order(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    try:
        tail = SpoolTail(tmp_path, {"a": (0, spool.position("a"))}, 0)
        spool.append_many([b"one", b"two", b"three", b"four"])
        spool.flush()
        assert tail.read("a") == []  # flushed, but the owner has not announced it durable
        tail.advance(2)
        first = tail.read("a", 1)
        second = tail.read("a", 5)
        assert [r.seq for r in first] == [1]
        assert [r.seq for r in second] == [2]
        tail.ack_range("a", 2, 2)
        assert tail.acked_seq("a") == 0  # batch 1 is still in flight
        tail.ack_range("a", 1, 1)
        assert tail.acked_seq("a") == 2
        with pytest.raises(ValueError, match="not a batch"):
            tail.ack_range("a", 3, 4)
        tail.close()
    finally:
        spool.close()


def test_tail_resumes_where_the_spool_says_and_catches_corruption(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    try:
        spool.append_many([b"a" * 10, b"b" * 10, b"c" * 10])
        spool.flush()
        spool.ack_delivered("a", 1)
        tail = SpoolTail(tmp_path, {"a": (spool.acked_seq("a"), spool.position("a"))}, spool.durable_seq)
        assert [r.payload for r in tail.read("a")] == [b"b" * 10, b"c" * 10]
        tail.close()
        # A flipped byte in a payload fails its checksum, exactly as the spool's own reader would say.
        segment = next(tmp_path.glob("spool-*.seg"))
        data = bytearray(segment.read_bytes())
        data[-3] ^= 0xFF
        segment.write_bytes(bytes(data))
        corrupt = SpoolTail(tmp_path, {"a": (1, spool.position("a"))}, spool.durable_seq)
        with pytest.raises(SpoolCorruptError, match="checksum"):
            corrupt.read("a")
        corrupt.close()
    finally:
        spool.close()
