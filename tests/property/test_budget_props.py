"""The connection budget against its rules, over arbitrary sequences of accepts, negotiations and closes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fpolicyd.errors import ConfigError
from fpolicyd.server.budget import BudgetLimits, ConnectionBudget, Refusal

PEERS = ("10.0.0.1", "10.0.0.2", "10.0.0.3")
#: open(peer) | promote(n-th live key) | discard(n-th live key)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("open"), st.sampled_from(PEERS)),
        st.tuples(st.just("promote"), st.integers(0, 50)),
        st.tuples(st.just("discard"), st.integers(0, 50)),
    ),
    max_size=300,
)


@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 5), ops)
def test_limits_hold_and_the_oldest_pending_goes_first(
    max_sessions: int, max_pending: int, max_per_peer: int, sequence: list[tuple[str, object]]
) -> None:
    budget: ConnectionBudget[int] = ConnectionBudget(BudgetLimits(max_sessions, max_pending, max_per_peer))
    pending: list[tuple[int, str]] = []  # the model: oldest first
    sessions: dict[int, str] = {}
    next_key = 0
    for op, arg in sequence:
        if op == "open":
            assert isinstance(arg, str)
            key, next_key = next_key, next_key + 1
            held = sum(1 for _, p in pending if p == arg) + sum(1 for p in sessions.values() if p == arg)
            admission = budget.open(key, arg)
            if max_per_peer and held >= max_per_peer:
                assert admission == type(admission)(Refusal.MAX_PER_PEER)
            elif len(sessions) >= max_sessions:
                assert admission.refused is Refusal.MAX_CONNECTIONS
            else:
                # Never refused while sessions are under the limit and the peer under its own.
                assert admission.refused is None
                overflow = len(pending) - max_pending + 1
                expected = [k for k, _ in pending[: max(0, overflow)]]
                assert list(admission.evict) == expected
                pending = pending[len(expected) :]
                pending.append((key, arg))
            if admission.refused is not None:
                assert admission.evict == ()
        else:
            live = [k for k, _ in pending] + list(sessions)
            if not live:
                continue
            assert isinstance(arg, int)
            key = live[arg % len(live)]
            if op == "promote":
                was_pending = any(k == key for k, _ in pending)
                promoted = budget.promote(key)
                # A pending connection completing NEGO is refused only when the sessions are full.
                assert promoted == (was_pending and len(sessions) < max_sessions)
                if promoted:
                    peer = next(p for k, p in pending if k == key)
                    pending = [(k, p) for k, p in pending if k != key]
                    sessions[key] = peer
            else:
                budget.discard(key)
                pending = [(k, p) for k, p in pending if k != key]
                sessions.pop(key, None)
        assert budget.pending == len(pending) <= max_pending
        assert budget.sessions == len(sessions) <= max_sessions
        for peer in PEERS:
            count = sum(1 for _, p in pending if p == peer) + sum(1 for p in sessions.values() if p == peer)
            assert budget.peer_count(peer) == count
            if max_per_peer:
                assert count <= max_per_peer


def test_evicted_keys_are_no_longer_promotable_and_discard_ignores_them() -> None:
    budget: ConnectionBudget[str] = ConnectionBudget(BudgetLimits(max_sessions=4, max_pending=2))
    assert budget.open("a", "p").evict == ()
    assert budget.open("b", "p").evict == ()
    assert budget.open("c", "p").evict == ("a",)
    assert not budget.promote("a")
    budget.discard("a")
    assert budget.peer_count("p") == 2
    assert budget.promote("c")
    assert (budget.pending, budget.sessions) == (1, 1)


@pytest.mark.parametrize(
    ("limits", "name"),
    [((0, 1, 0), "max_connections"), ((1, 0, 0), "max_pending_handshakes"), ((1, 1, -1), "max_connections_per_peer")],
)
def test_bad_limits_are_refused(limits: tuple[int, int, int], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        BudgetLimits(*limits)
