"""The reader's exact-dedup window and its journal against brute-force models (Hypothesis)."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fpolicyd.pipeline.dedup_window import DedupWindow, key_of_digest, key_of_event_id
from fpolicyd.storage.dedup_journal import DedupJournal

PROPS = settings(max_examples=150, deadline=None, database=None)
# The journal property makes a fresh directory per example (the function-scoped tmp_path would be shared).
JOURNAL_PROPS = settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# Few distinct keys, so that repeats (duplicates) are common; times move forward by whole seconds.
keys = st.integers(0, 12)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("claim"), keys, st.integers(0, 3)),
        st.tuples(st.just("expire"), st.just(0), st.integers(0, 6)),
    ),
    max_size=60,
)


class Model:
    """The rule, spelled out: claims (key, time) in claim order; a key held is a duplicate; the oldest go first
    beyond ``max_entries``; claims older than ``ttl`` go on expire."""

    def __init__(self, max_entries: int, ttl: float) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self.claims: list[tuple[int, float]] = []

    def claim(self, key: int, now: float) -> bool:
        if any(k == key for k, _ in self.claims):
            return False
        self.claims.append((key, now))
        del self.claims[: max(0, len(self.claims) - self.max_entries)]
        return True

    def expire(self, now: float) -> None:
        self.claims = [(k, t) for k, t in self.claims if t >= now - self.ttl]


@PROPS
@given(ops=steps, max_entries=st.integers(1, 8), ttl=st.integers(1, 10))
def test_window_matches_the_model(ops: list[tuple[str, int, int]], max_entries: int, ttl: int) -> None:
    window = DedupWindow(max_entries=max_entries, ttl_s=float(ttl))
    model = Model(max_entries, float(ttl))
    now = 0.0
    for op, key, advance in ops:
        now += advance
        if op == "claim":
            assert window.claim(key, now) == model.claim(key, now)
        else:
            window.expire(now)
            model.expire(now)
        assert len(window) == len(model.claims)
        assert all(k in window for k, _ in model.claims)
    stats = window.stats()
    assert stats.held == len(model.claims)


@PROPS
@given(claims=st.lists(st.tuples(keys, st.integers(0, 20)), max_size=40), max_entries=st.integers(1, 8))
def test_load_keeps_the_newest_unexpired_claims_like_claiming_them(
    claims: list[tuple[int, int]], max_entries: int
) -> None:
    """Rebuilding from stored claims gives the window that claiming them live (then expiring) gives."""
    ordered = sorted(claims, key=lambda c: c[1])
    now = 25.0
    rebuilt = DedupWindow(max_entries=max_entries, ttl_s=10.0)
    rebuilt.load(((key, float(at)) for key, at in ordered), now)
    live = DedupWindow(max_entries=max_entries, ttl_s=10.0)
    for key, at in ordered:
        if at >= now - 10.0:
            live.claim(key, float(at))
    live.expire(now)
    assert len(rebuilt) == len(live)
    assert all((key in rebuilt) == (key in live) for key in range(13))


@PROPS
@given(name=st.binary(max_size=40))
def test_key_of_digest_is_the_event_ids_uuid(name: bytes) -> None:
    namespace = uuid.uuid4()
    digest = hashlib.sha1(namespace.bytes + name, usedforsecurity=False).hexdigest()
    event_id = str(_uuid5_of(namespace, name))
    assert key_of_digest(digest) == key_of_event_id(event_id) == uuid.UUID(event_id).int


def _uuid5_of(namespace: uuid.UUID, name: bytes) -> uuid.UUID:
    """``uuid.uuid5`` for a name given as bytes (the event id's recipe: SHA-1 of namespace + name)."""
    digest = hashlib.sha1(namespace.bytes + name, usedforsecurity=False).digest()
    return uuid.UUID(bytes=digest[:16], version=5)


@JOURNAL_PROPS
@given(
    batches=st.lists(st.lists(st.integers(0, 2**128 - 1), min_size=1, max_size=5), max_size=12),
    segment_claims=st.integers(1, 6),
    cut=st.integers(0, 200),
)
def test_journal_gives_back_every_synced_claim_in_order_and_survives_a_torn_tail(
    tmp_path_factory: pytest.TempPathFactory, batches: list[list[int]], segment_claims: int, cut: int
) -> None:
    directory = tmp_path_factory.mktemp("journal")
    journal, recovery = DedupJournal.open(directory, segment_claims=segment_claims, max_entries=10**6, ttl_s=1e9)
    assert recovery.claims == ()
    written: list[tuple[int, int, float]] = []
    seq = 0
    for at, batch in enumerate(batches):
        claims = []
        for key in batch:
            seq += 2  # duplicates between claims take seqs too
            claims.append((seq, key))
            written.append((seq, key, float(at)))
        journal.append(float(at), claims)
        journal.flush()
        journal.sync()
        assert journal.durable_seq == seq
    journal.close()
    _, again = DedupJournal.open(directory, segment_claims=segment_claims, max_entries=10**6, ttl_s=1e9)
    assert list(again.claims) == written
    files = sorted(directory.iterdir())
    if files and cut:
        # A crash tore the last segment: a prefix of whole blocks comes back, never a damaged claim.
        last = files[-1]
        data = last.read_bytes()
        last.write_bytes(data[: max(0, len(data) - cut)])
        _, torn = DedupJournal.open(directory, segment_claims=segment_claims, max_entries=10**6, ttl_s=1e9)
        assert list(torn.claims) == written[: len(torn.claims)]


def test_journal_retires_a_segment_once_nothing_in_it_can_still_be_in_the_window(tmp_path: Path) -> None:
    journal, _ = DedupJournal.open(tmp_path, segment_claims=2, max_entries=4, ttl_s=100.0)
    for i in range(6):
        journal.append(float(i), [(i + 1, i)])
        journal.flush()
    journal.sync()
    assert journal.segments == 3
    # 6 claims, window of 4: the first segment (claims 0-1) is wholly outside it.
    assert journal.retire(5.0) == 1
    assert journal.segments == 2
    # Everything older than the time to live: all but the current segment go.
    assert journal.retire(1000.0) == 1
    assert journal.segments == 1
    journal.close()
