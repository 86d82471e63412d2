"""Shard: which records of a sink one of several delivery processes delivers.

Seqs 1, 2, 3... are cut into blocks of ``block_records`` consecutive seqs (block ``k`` holds seqs
``k * block_records + 1 .. (k + 1) * block_records``), and the blocks are dealt round-robin to ``count`` shards:
shard ``index`` owns every block ``k`` with ``k % count == index``. Whole blocks keep every read, and every
request built from it, contiguous. Pure arithmetic, no I/O; :class:`~fpolicyd.storage.spool.SpoolTail` reads a
sharded sink with it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Shard"]


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard ``index`` of ``count``, dealt blocks of ``block_records`` seqs. ``Shard(0, 1, b)`` owns everything."""

    index: int
    count: int
    block_records: int

    def __post_init__(self) -> None:
        for name in ("index", "count", "block_records"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"shard {name}: expected an int, got {value!r}")
        if self.count < 1:
            raise ValueError(f"shard count: must be at least 1, got {self.count}")
        if self.block_records < 1:
            raise ValueError(f"shard block_records: must be at least 1, got {self.block_records}")
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index: must be within 0..{self.count - 1}, got {self.index}")

    def owns(self, seq: int) -> bool:
        """Whether ``seq`` (>= 1) is in one of this shard's blocks."""
        if seq < 1:
            raise ValueError(f"seqs start at 1, got {seq}")
        return (seq - 1) // self.block_records % self.count == self.index

    def block_last(self, seq: int) -> int:
        """The last seq of the block holding ``seq`` (>= 1), whoever owns it."""
        if seq < 1:
            raise ValueError(f"seqs start at 1, got {seq}")
        return ((seq - 1) // self.block_records + 1) * self.block_records

    def owned_between(self, first: int, last: int) -> int:
        """How many seqs of ``first..last`` (both included, ``first`` >= 1) this shard owns; 0 when
        ``last < first``. O(1)."""
        if first < 1:
            raise ValueError(f"seqs start at 1, got {first}")
        if last < first:
            return 0
        return self._owned_up_to(last) - self._owned_up_to(first - 1)

    def _owned_up_to(self, seq: int) -> int:
        """How many of the seqs ``1..seq`` this shard owns (``seq`` >= 0)."""
        blocks, partial = divmod(seq, self.block_records)  # whole blocks, then seqs of block number ``blocks``
        rounds, rest = divmod(blocks, self.count)
        owned = rounds * self.block_records
        if self.index < rest:
            owned += self.block_records
        if rest == self.index:
            owned += partial
        return owned
