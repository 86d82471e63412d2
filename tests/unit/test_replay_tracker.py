"""The replay tracker with a fake clock: reconnect time, replay and out-of-order flags, duplicates, episodes."""

from __future__ import annotations

import dataclasses

import pytest

from fpolicyd.errors import ConfigError
from fpolicyd.pipeline.replay import ReplayConfig, ReplaySession, ReplayStats, ReplayTracker, node_key
from fpolicyd.protocol.context import SessionContext

VS = "5e1f0c2a-6292-11ee-b5d1-000c29f00d01"
T0 = 1_700_000_000_000_000  # epoch µs: the wall clock of the handshakes below
S = 1_000_000  # µs per second


def context(peer: str = "10.0.0.5:40001", session_id: str = "s1", policy: str = "p1") -> SessionContext:
    return SessionContext(VS, policy, session_id, "1.2", peer)


def start(
    tracker: ReplayTracker,
    now: float,
    wall_us: int,
    peer: str = "10.0.0.5:40001",
    previous: ReplaySession | None = None,
) -> ReplaySession:
    return tracker.session_started(context(peer), now, wall_us, previous)


def test_node_key_is_svm_policy_and_node_address_without_port() -> None:
    assert node_key(context("10.0.0.5:40001")) == (VS, "p1", "10.0.0.5")
    assert node_key(context("fe80::1:40001")) == (VS, "p1", "fe80::1")
    assert node_key(context("10.0.0.5:40001")) == node_key(context("10.0.0.5:51234", session_id="other"))


def test_the_first_session_of_a_node_is_not_a_reconnect() -> None:
    tracker = ReplayTracker()
    start(tracker, 10.0, T0)
    stats = tracker.stats()
    assert (stats.reconnects, stats.sessions_active, stats.nodes_tracked) == (0, 1, 1)


def test_reconnect_time_runs_from_session_lost_to_next_handshake_of_the_same_node() -> None:
    tracker = ReplayTracker()
    first = start(tracker, 10.0, T0)
    tracker.session_ended(first, 12.0)
    tracker.session_ended(first, 99.0)  # idempotent: the later call changes nothing
    start(tracker, 19.5, T0 + 10 * S, peer="10.0.0.5:40777")  # new port, same node
    stats = tracker.stats()
    assert stats.reconnects == 1
    assert stats.last_reconnect_s == pytest.approx(7.5)
    assert stats.max_reconnect_s == pytest.approx(7.5)
    assert stats.sessions_active == 1


def test_reconnect_figures_keep_last_max_and_total() -> None:
    tracker = ReplayTracker()
    session = start(tracker, 0.0, T0)
    for lost, back in ((1.0, 4.0), (5.0, 6.0)):
        tracker.session_ended(session, lost)
        session = start(tracker, back, T0)
    stats = tracker.stats()
    assert stats.reconnects == 2
    assert stats.last_reconnect_s == pytest.approx(1.0)
    assert stats.max_reconnect_s == pytest.approx(3.0)
    assert stats.total_reconnect_s == pytest.approx(4.0)


def test_another_node_or_policy_is_its_own_key() -> None:
    tracker = ReplayTracker()
    a = start(tracker, 0.0, T0, peer="10.0.0.5:1")
    tracker.session_ended(a, 1.0)
    start(tracker, 2.0, T0, peer="10.0.0.6:1")
    tracker.session_started(context("10.0.0.5:2", policy="p2"), 3.0, T0)
    assert tracker.stats().reconnects == 0
    assert tracker.stats().nodes_tracked == 3


def test_a_second_live_session_on_a_key_is_concurrent_not_a_reconnect() -> None:
    tracker = ReplayTracker()
    old = start(tracker, 0.0, T0, peer="10.0.0.5:1")
    new = start(tracker, 1.0, T0, peer="10.0.0.5:2")
    tracker.session_ended(old, 2.0)
    stats = tracker.stats()
    assert (stats.reconnects, stats.concurrent_sessions, stats.sessions_active) == (0, 1, 1)
    tracker.session_ended(new, 3.0)
    start(tracker, 5.0, T0)
    assert tracker.stats().last_reconnect_s == pytest.approx(2.0)  # from the last session's loss


def test_renegotiation_on_the_same_connection_is_not_a_reconnect() -> None:
    tracker = ReplayTracker()
    first = start(tracker, 0.0, T0)
    again = start(tracker, 1.0, T0 + S, previous=first)
    stats = tracker.stats()
    assert (stats.reconnects, stats.sessions_active, stats.concurrent_sessions) == (0, 1, 0)
    assert again.observe(T0 + S // 2, "a", 1.0) == {"replayed": True}  # the new handshake time counts


def test_ordinary_notifications_get_no_flags() -> None:
    tracker = ReplayTracker()
    session = start(tracker, 0.0, T0)
    assert [session.observe(T0 + i, f"id{i}", 0.1) for i in range(1, 50)] == [None] * 49
    stats = tracker.stats()
    assert (stats.events, stats.replayed_events, stats.out_of_order_events, stats.duplicates) == (49, 0, 0, 0)


def test_generated_before_the_handshake_is_replayed() -> None:
    tracker = ReplayTracker()
    session = start(tracker, 0.0, T0)
    assert session.observe(T0 - 5 * S, "backlog-1", 0.1) == {"replayed": True}
    assert session.observe(T0 - 4 * S, "backlog-2", 0.2) == {"replayed": True}
    assert session.observe(T0, "at-handshake", 0.3) is None
    assert tracker.stats().replayed_events == 2


def test_clock_tolerance_keeps_live_notifications_of_a_node_clock_behind_ours_unflagged() -> None:
    tracker = ReplayTracker(ReplayConfig(clock_tolerance_us=S))
    session = start(tracker, 0.0, T0)
    assert session.observe(T0 - S // 2, "skewed-live", 0.1) is None
    assert session.observe(T0 - 2 * S, "backlog", 0.2) == {
        "out_of_order": True,
        "ooo_lag_us": int(1.5 * S),
        "replayed": True,
    }


def test_out_of_order_is_behind_the_highest_generation_time_seen_for_the_node_across_sessions() -> None:
    tracker = ReplayTracker()
    first = start(tracker, 0.0, T0)
    assert first.observe(T0 + 10, "a", 0.1) is None
    tracker.session_ended(first, 1.0)
    second = start(tracker, 3.0, T0 + 3 * S)
    assert second.observe(T0 + 3 * S + 5, "live", 3.1) is None  # live first
    assert second.observe(T0 + 20, "old", 3.2) == {"out_of_order": True, "ooo_lag_us": 3 * S - 15, "replayed": True}
    assert second.observe(T0 + 3 * S + 1, "late-live", 3.3) == {"out_of_order": True, "ooo_lag_us": 4}
    stats = tracker.stats()
    assert (stats.out_of_order_events, stats.max_out_of_order_lag_us) == (2, 3 * S - 15)


def test_equal_generation_time_is_not_out_of_order() -> None:
    tracker = ReplayTracker()
    session = start(tracker, 0.0, T0)
    assert session.observe(T0 + 1, "a", 0.0) is None
    assert session.observe(T0 + 1, "b", 0.0) is None


@pytest.mark.parametrize("generation", [None, 0, 12345, 10**15 - 1])
def test_missing_or_implausible_generation_time_is_never_replayed_or_out_of_order(generation: int | None) -> None:
    tracker = ReplayTracker()
    session = start(tracker, 0.0, T0)
    assert session.observe(T0 + 1, "a", 0.0) is None
    assert session.observe(generation, "b", 0.0) is None
    assert tracker.stats().events == 2


def test_duplicates_are_flagged_and_counted_within_the_window() -> None:
    tracker = ReplayTracker(ReplayConfig(duplicate_window=4))
    session = start(tracker, 0.0, T0)
    for i in range(3):
        session.observe(T0 + i + 1, f"id{i}", 0.0)
    assert session.observe(T0 + 1, "id0", 0.0) == {"out_of_order": True, "ooo_lag_us": 2, "duplicate": True}
    assert tracker.stats().duplicates == 1


def test_duplicate_memory_is_bounded_and_remembers_at_least_the_window() -> None:
    window = 8
    tracker = ReplayTracker(ReplayConfig(duplicate_window=window))
    session = start(tracker, 0.0, T0)
    for i in range(100):
        session.observe(None, f"id{i}", 0.0)
        assert len(tracker.recent_ids) + len(tracker.older_ids) <= 2 * window
    for i in range(100 - window, 100):  # the last `window` ids are always remembered
        assert session.observe(None, f"id{i}", 0.0) == {"duplicate": True}
    assert session.observe(None, "id0", 0.0) is None  # long forgotten


def test_duplicates_are_recognised_across_nodes() -> None:
    tracker = ReplayTracker()
    a = start(tracker, 0.0, T0, peer="10.0.0.5:1")
    b = start(tracker, 0.0, T0, peer="10.0.0.6:1")
    a.observe(T0 + 1, "same", 0.0)
    assert b.observe(T0 + 1, "same", 0.0) == {"duplicate": True}


def test_replay_episode_runs_from_first_to_last_replayed_and_ends_after_idle() -> None:
    tracker = ReplayTracker(ReplayConfig(episode_idle_s=2.0))
    session = start(tracker, 100.0, T0)
    session.observe(T0 + 1, "live", 100.0)
    for i in range(10):
        session.observe(T0 - S + i, f"b{i}", 101.0 + i * 0.5)  # 101.0 … 105.5
    active = tracker.stats(106.0)
    assert active.replay_active
    assert active.replay_started_at == 101.0
    assert active.replay_ended_at is None
    assert active.replay_duration_s == pytest.approx(4.5)
    session.observe(T0 + 2, "live-only", 107.4)  # 1.9 s after the last replayed one: still the same episode
    assert tracker.stats().replay_active
    session.observe(T0 + 3, "live-only", 107.5)  # 2.0 s: the episode is over
    done = tracker.stats()
    assert not done.replay_active
    assert (done.replay_episodes, done.replay_started_at, done.replay_ended_at) == (1, 101.0, 105.5)
    assert done.replay_episode_events == 10
    assert done.replay_throughput_eps == pytest.approx(10 / 4.5)
    assert done.max_replay_duration_s == pytest.approx(4.5)


def test_an_episode_ends_on_stats_when_no_notification_follows() -> None:
    tracker = ReplayTracker(ReplayConfig(episode_idle_s=1.0))
    session = start(tracker, 0.0, T0)
    session.observe(T0 - 1, "b", 5.0)
    assert tracker.stats(5.5).replay_active
    stats = tracker.stats(6.0)
    assert not stats.replay_active
    assert (stats.replay_episodes, stats.replay_duration_s, stats.replay_throughput_eps) == (1, 0.0, 0.0)


def test_a_late_replayed_notification_starts_a_new_episode() -> None:
    tracker = ReplayTracker(ReplayConfig(episode_idle_s=1.0))
    session = start(tracker, 0.0, T0)
    session.observe(T0 - 3, "b1", 1.0)
    session.observe(T0 - 2, "b2", 1.5)
    session.observe(T0 - 1, "b3", 10.0)  # no live notification in between
    stats = tracker.stats()
    assert stats.replay_episodes == 1
    assert stats.replay_active
    assert stats.replay_started_at == 10.0
    assert stats.replay_ended_at == 1.5  # of the ended one
    assert stats.max_replay_duration_s == pytest.approx(0.5)


def test_keys_are_bounded_and_idle_ones_are_forgotten_first() -> None:
    tracker = ReplayTracker(ReplayConfig(max_nodes=2))
    a = start(tracker, 0.0, T0, peer="10.0.0.1:1")
    start(tracker, 0.0, T0, peer="10.0.0.2:1")
    tracker.session_ended(a, 1.0)
    start(tracker, 2.0, T0, peer="10.0.0.3:1")
    assert tracker.stats().nodes_tracked == 2
    start(tracker, 3.0, T0, peer="10.0.0.1:1")  # forgotten: a first session again, not a reconnect
    assert tracker.stats().reconnects == 0


def test_stats_is_a_frozen_snapshot_with_every_figure() -> None:
    tracker = ReplayTracker()
    stats = tracker.stats()
    assert isinstance(stats, ReplayStats)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.reconnects = 5  # type: ignore[misc]
    assert set(stats.to_dict()) == {f.name for f in dataclasses.fields(ReplayStats)}
    start(tracker, 0.0, T0)
    assert stats.sessions_active == 0  # not a live view


@pytest.mark.parametrize(
    "kwargs",
    [{"duplicate_window": 0}, {"episode_idle_s": 0.0}, {"clock_tolerance_us": -1}, {"max_nodes": 0}],
)
def test_bad_config_is_refused(kwargs: dict[str, int | float]) -> None:
    with pytest.raises(ConfigError):
        ReplayConfig(**kwargs)  # type: ignore[arg-type]
