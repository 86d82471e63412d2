"""Sharded delivery: K SpoolTails, one per Shard of a sink, deliver every record exactly once, each by its owner,
one block at most per read, and the owner's cumulative ack (fed what each shard delivered, in any order) reaches
the durable seq."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fpolicyd.storage.shard import Shard
from fpolicyd.storage.spool import Spool, SpoolFsync, SpoolSettings, SpoolTail

PROPS = settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

shards = st.builds(
    lambda count, block, pick: Shard(pick % count, count, block),
    st.integers(1, 6),
    st.integers(1, 12),
    st.integers(0, 5),
)


@PROPS
@given(shard=shards, first=st.integers(1, 120), span=st.integers(-3, 120))
def test_owned_between_counts_what_owns_says(shard: Shard, first: int, span: int) -> None:
    last = first + span
    assert shard.owned_between(first, last) == sum(shard.owns(seq) for seq in range(first, last + 1))


@PROPS
@given(shard=shards, seq=st.integers(1, 500))
def test_block_last_is_the_end_of_the_block_holding_seq(shard: Shard, seq: int) -> None:
    last = shard.block_last(seq)
    b = shard.block_records
    assert seq <= last < seq + b
    assert last % b == 0
    # Ownership is the same across a block and changes right after it (unless one shard owns everything).
    first = last - b + 1
    assert {shard.owns(s) for s in range(first, last + 1)} == {shard.owns(seq)}
    if shard.count > 1:
        assert not (shard.owns(last) and shard.owns(last + 1))


@PROPS
@given(count=st.integers(1, 6), block=st.integers(1, 12), seq=st.integers(1, 1000))
def test_every_seq_has_exactly_one_owner(count: int, block: int, seq: int) -> None:
    owners = [i for i in range(count) if Shard(i, count, block).owns(seq)]
    assert len(owners) == 1


def open_spool(directory: Path) -> Spool:
    # Small segments: a few records each, so reads and skips cross many segment files.
    return Spool.open(
        SpoolSettings(directory=directory, segment_bytes=256, max_bytes=64 << 20, fsync=SpoolFsync.never), ["a"]
    )


@PROPS
@given(
    data=st.data(),
    n=st.integers(1, 300),
    count=st.integers(1, 4),
    block=st.integers(1, 25),
)
def test_shards_deliver_every_record_once_by_its_owner(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, n: int, count: int, block: int
) -> None:
    directory = tmp_path_factory.mktemp("spool")
    spool = open_spool(directory)
    try:
        payloads = [bytes([65 + seq % 26]) * (1 + seq * 7 % 40) for seq in range(1, n + 1)]
        owners = [Shard(i, count, block) for i in range(count)]
        tails = [SpoolTail(directory, {"a": (0, spool.position("a"))}, 0, {"a": shard}) for shard in owners]
        outstanding: list[list[tuple[int, int]]] = [[] for _ in owners]  # batches read and not yet acked
        delivered: list[tuple[int, int]] = []  # taken from the tails, not yet fed to the owner
        handed: dict[int, int] = {}  # seq -> index of the tail that handed it out
        appended = 0

        def read(i: int, max_records: int, max_bytes: int) -> None:
            tail, shard = tails[i], owners[i]
            available = tail.available("a")
            assert available == shard.owned_between(tail.read_seq("a"), tail.durable_seq)
            batch = tail.read("a", max_records, max_bytes)
            assert bool(batch) == (available > 0)
            if not batch:
                assert tail.read_seq("a") == tail.durable_seq + 1  # every other shard's record skipped
                return
            seqs = [r.seq for r in batch]
            assert seqs == list(range(seqs[0], seqs[-1] + 1))
            assert len(batch) <= max_records
            assert len(batch) == 1 or sum(len(r.payload) for r in batch) <= max_bytes
            assert shard.block_last(seqs[0]) == shard.block_last(seqs[-1])  # one block
            for r in batch:
                assert shard.owns(r.seq)
                assert r.seq not in handed
                assert r.payload == payloads[r.seq - 1]
                handed[r.seq] = i
            outstanding[i].append((seqs[0], seqs[-1]))

        def feed_owner(everything: bool) -> None:
            for tail in tails:
                delivered.extend(tail.take_delivered("a"))
                assert tail.take_delivered("a") == []
                assert tail.acked_seq("a") <= tail.durable_seq
            order = data.draw(st.permutations(delivered))
            cut = len(order) if everything else data.draw(st.integers(0, len(order)))
            for first, last in order[:cut]:
                spool.ack_delivered_range("a", first, last)
            delivered[:] = order[cut:]

        steps = data.draw(st.lists(st.integers(0, 4), max_size=80))
        for step in steps:
            if step == 0 and appended < n:  # append a group and make it durable
                size = data.draw(st.integers(1, 40))
                spool.append_many(payloads[appended : appended + size])
                spool.flush()
                appended = spool.durable_seq
            elif step == 1:  # the owner announces the durable seq to one tail
                tails[data.draw(st.integers(0, count - 1))].advance(spool.durable_seq)
            elif step == 2:
                read(
                    data.draw(st.integers(0, count - 1)), data.draw(st.integers(1, 30)), data.draw(st.integers(1, 600))
                )
            elif step == 3:  # one outstanding batch of one tail is delivered, in any order
                i = data.draw(st.integers(0, count - 1))
                if outstanding[i]:
                    first, last = outstanding[i].pop(data.draw(st.integers(0, len(outstanding[i]) - 1)))
                    tails[i].ack_range("a", first, last)
            else:
                feed_owner(everything=False)

        # Drain: everything appended, announced, read and acked; the owner gets the rest in a random order.
        if appended < n:
            spool.append_many(payloads[appended:])
            spool.flush()
        max_records, max_bytes = data.draw(st.integers(1, 30)), data.draw(st.integers(1, 600))
        for i, tail in enumerate(tails):
            tail.advance(spool.durable_seq)
            while tail.read_seq("a") <= tail.durable_seq:
                read(i, max_records, max_bytes)
            for first, last in data.draw(st.permutations(outstanding[i])):
                tail.ack_range("a", first, last)
        feed_owner(everything=True)

        assert spool.durable_seq == n
        assert sorted(handed) == list(range(1, n + 1))  # every record once (no seq twice: checked at each read)
        assert all(owners[i].owns(seq) for seq, i in handed.items())
        for tail in tails:
            assert tail.acked_seq("a") == n
            tail.close()
        assert spool.acked_seq("a") == n
    finally:
        spool.close()
