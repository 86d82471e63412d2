"""Settle (file readiness): each strategy and edge, the policy table and the settings that build it."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from fpolicyd.config import load_settings
from fpolicyd.errors import ConfigError
from fpolicyd.events import FileEvent
from fpolicyd.pipeline.settle import (
    SETTLE_MAX_IDS,
    SettleConfig,
    SettleInputError,
    SettleOutput,
    SettleOverride,
    SettlePolicy,
    Settler,
    SettleReason,
    SettleStrategy,
    parse_override_key,
    received_at_s,
)

QUIET = SettlePolicy(window_s=5.0, max_hold_s=60.0)


def make_event(
    seq: int,
    op: str,
    path: str,
    *,
    previous: str | None = None,
    routes: Iterable[str] = (),
    size: int = 0,
    volume: str = "vol1",
) -> FileEvent:
    return FileEvent(
        event_id=f"id-{seq}",
        operation_type=op,
        file_path=path,
        previous_path=previous,
        volume_name=volume,
        svm_name="svm1",
        timestamp=f"2026-01-01T00:00:{seq:02d}.000000Z",
        file_size=size,
        client_ip="192.0.2.7",
        metadata={"received_at": f"2026-01-01T00:00:{seq:02d}.000000Z", "routes": list(routes), "req_id": seq},
    )


class Feed:
    """A settler fed with events numbered 1, 2, … at chosen times."""

    def __init__(self, settler: Settler) -> None:
        self.settler = settler
        self.seq = 0

    def __call__(self, t: float, op: str, path: str, **kw: Any) -> list[SettleOutput]:
        self.seq += 1
        return self.settler.offer(make_event(self.seq, op, path, **kw), self.seq, t)


def feed(policy: SettlePolicy | None = QUIET, *, max_pending: int = 1000, max_ids: int = SETTLE_MAX_IDS) -> Feed:
    return Feed(Settler(lambda _e: policy, max_pending=max_pending, max_ids=max_ids))


def summary(outputs: list[SettleOutput]) -> list[tuple[str, str, str, tuple[int, int], int, str]]:
    return [
        (o.event.event_id, o.event.operation_type, o.event.file_path, o.seqs, o.coalesced, o.reason) for o in outputs
    ]


# ------------------------------------------------------------------------------------------------ quiet


def test_create_and_writes_become_one_create_once_quiet() -> None:
    f = feed()
    events_in = [make_event(1, "create", "/d/a", size=0)]
    assert f.settler.offer(events_in[0], 1, 0.0) == []
    f.seq = 1
    before = copy.deepcopy(events_in[0].metadata)
    assert f(1.0, "write", "/d/a", size=10) == []
    assert f(2.0, "write", "/d/a", size=25) == []
    assert f.settler.pending_count == 1
    assert f.settler.oldest_pending_seq() == 1
    assert f.settler.next_deadline() == 7.0
    assert f.settler.due(6.999) == []
    [out] = f.settler.due(7.0)
    assert summary([out]) == [("id-3", "create", "/d/a", (1, 3), 3, SettleReason.QUIET)]
    assert out.event.file_size == 25
    assert out.event.timestamp == "2026-01-01T00:00:03.000000Z"
    assert out.event.metadata["req_id"] == 3
    assert out.event.metadata["settle"] == {
        "coalesced": 3,
        "strategy": "quiet",
        "reason": "quiet",
        "first_event_id": "id-1",
        "first_received_at": "2026-01-01T00:00:01.000000Z",
        "ids": ["id-1", "id-2", "id-3"],
    }
    assert events_in[0].metadata == before  # the input's metadata is not touched
    assert f.settler.pending_count == 0
    assert f.settler.oldest_pending_seq() is None
    assert f.settler.next_deadline() is None
    assert f.settler.stats.held == 1
    assert f.settler.stats.coalesced == 2


def test_each_write_pushes_the_deadline() -> None:
    f = feed()
    f(0.0, "write", "/a")
    f(4.0, "write", "/a")
    assert f.settler.next_deadline() == 9.0
    assert f.settler.due(5.0) == []
    f(8.5, "write", "/a")
    assert f.settler.due(9.0) == []
    [out] = f.settler.due(13.5)
    assert out.event.operation_type == "write"
    assert (out.seqs, out.coalesced) == ((1, 3), 3)


def test_an_event_after_the_quiet_period_starts_a_new_burst_and_releases_the_old_first() -> None:
    f = feed()
    f(0.0, "create", "/a")
    f(1.0, "write", "/b")
    outputs = f(6.0, "write", "/a")  # /a was quiet for 5 s: its create goes out before this write is held
    assert summary(outputs) == [
        ("id-1", "create", "/a", (1, 1), 1, "quiet"),
        ("id-2", "write", "/b", (2, 2), 1, "quiet"),
    ]
    assert f.settler.oldest_pending_seq() == 3


def test_max_hold_emits_a_path_that_never_goes_quiet() -> None:
    f = feed(SettlePolicy(window_s=5.0, max_hold_s=10.0))
    outputs: list[SettleOutput] = []
    for second in range(15):
        outputs += f(float(second), "write", "/busy")
    assert summary(outputs) == [("id-10", "write", "/busy", (1, 10), 10, "max_hold")]
    assert f.settler.stats.hold_expired == 1
    assert f.settler.oldest_pending_seq() == 11  # the rest is a new burst, held from second 10
    assert f.settler.next_deadline() == 19.0


def test_due_releases_in_deadline_order_with_ties_by_start() -> None:
    f = feed()
    f(0.0, "write", "/a")
    f(0.0, "write", "/b")
    f(1.0, "write", "/c")
    f(2.0, "write", "/a")
    assert [o.event.file_path for o in f.settler.due(100.0)] == ["/b", "/c", "/a"]


def test_ids_are_capped_but_the_count_is_exact() -> None:
    f = feed()
    for i in range(SETTLE_MAX_IDS + 5):
        f(i * 0.1, "write", "/a")
    [out] = f.settler.flush_all()
    assert out.coalesced == SETTLE_MAX_IDS + 5
    assert out.event.metadata["settle"]["ids"] == [f"id-{i}" for i in range(1, SETTLE_MAX_IDS + 1)]
    assert out.reason is SettleReason.FLUSH


def test_paths_on_other_volumes_are_other_paths() -> None:
    f = feed()
    f(0.0, "write", "/a", volume="v1")
    f(0.0, "write", "/a", volume="v2")
    assert f.settler.pending_count == 2


def test_routes_of_a_burst_are_merged() -> None:
    f = feed()
    f(0.0, "create", "/a", routes=["r1"])
    f(1.0, "write", "/a", routes=["r2", "r1"])
    [out] = f.settler.flush_all()
    assert out.event.metadata["routes"] == ["r1", "r2"]


def test_a_burst_follows_the_policy_of_its_latest_event() -> None:
    config = SettleConfig(SettlePolicy(window_s=5.0), {("*", "create"): SettleOverride(window_s=50.0)})
    f = Feed(Settler(config.policy_for, max_pending=100))
    f(0.0, "create", "/a")
    assert f.settler.next_deadline() == 50.0
    f(1.0, "write", "/a")  # the write's policy has a 5 s window: the deadline comes earlier
    assert f.settler.next_deadline() == 6.0
    assert summary(f.settler.due(6.0)) == [("id-2", "create", "/a", (1, 2), 2, "quiet")]
    assert f.settler.due(100.0) == []


# ----------------------------------------------------------------------------------------- pass-through


def test_events_without_a_policy_pass_through_unchanged() -> None:
    f = feed(None)
    event = make_event(1, "create", "/a")
    [out] = f.settler.offer(event, 1, 0.0)
    assert out.event is event
    assert (out.seqs, out.coalesced, out.reason) == ((1, 1), 1, SettleReason.NOT_HELD)


def test_a_zero_window_is_off() -> None:
    f = feed(SettlePolicy(window_s=0.0))
    assert summary(f(0.0, "write", "/a")) == [("id-1", "write", "/a", (1, 1), 1, "not_held")]


def test_operations_not_held_pass_and_reads_leave_the_burst_alone() -> None:
    f = feed()
    f(0.0, "create", "/a")
    [read] = f(1.0, "read", "/a")
    assert read.reason is SettleReason.NOT_HELD
    assert f.settler.pending_count == 1
    outputs = f(2.0, "setattr", "/a")  # changes the file: the held create goes first, order kept
    assert summary(outputs) == [
        ("id-1", "create", "/a", (1, 1), 1, "superseded"),
        ("id-3", "setattr", "/a", (3, 3), 1, "not_held"),
    ]


def test_held_operations_are_configurable() -> None:
    f = feed(SettlePolicy(window_s=5.0, operations=frozenset({"write", "setattr"})))
    assert f(0.0, "create", "/a")[0].reason is SettleReason.NOT_HELD
    f(1.0, "write", "/a")
    f(2.0, "setattr", "/a")
    [out] = f.settler.flush_all()
    assert (out.event.operation_type, out.coalesced) == ("write", 2)


# ------------------------------------------------------------------------------------------------ delete


def test_a_delete_cancels_the_held_create_and_says_so() -> None:
    f = feed()
    f(0.0, "create", "/tmp/~lock", routes=["r1"])
    f(1.0, "write", "/tmp/~lock")
    [out] = f(2.0, "delete", "/tmp/~lock", routes=["r2"])
    assert summary([out]) == [("id-3", "delete", "/tmp/~lock", (1, 3), 3, "cancelled")]
    assert out.event.metadata["routes"] == ["r2"]
    assert out.event.metadata["settle"] == {
        "reason": "cancelled",
        "strategy": "quiet",
        "cancelled": 2,
        "cancelled_operation": "create",
        "cancelled_first_event_id": "id-1",
        "cancelled_first_received_at": "2026-01-01T00:00:01.000000Z",
        "cancelled_ids": ["id-1", "id-2"],
        "cancelled_routes": ["r1"],
    }
    assert f.settler.stats.cancelled == 2
    assert f.settler.pending_count == 0
    assert f.settler.due(1e9) == []


def test_without_cancel_the_held_event_goes_out_before_the_delete() -> None:
    f = feed(SettlePolicy(window_s=5.0, cancel_on_delete=False))
    f(0.0, "create", "/a")
    outputs = f(1.0, "delete", "/a")
    assert summary(outputs) == [
        ("id-1", "create", "/a", (1, 1), 1, "superseded"),
        ("id-2", "delete", "/a", (2, 2), 1, "not_held"),
    ]


def test_a_delete_of_a_path_not_held_passes_through() -> None:
    f = feed()
    f(0.0, "create", "/a")
    [out] = f(1.0, "delete", "/b")
    assert out.reason is SettleReason.NOT_HELD
    assert "settle" not in out.event.metadata


# ------------------------------------------------------------------------------------------------ rename


def test_rename_commit_coalesces_the_temp_file_into_its_final_name() -> None:
    f = feed(SettlePolicy(window_s=5.0, strategy=SettleStrategy.RENAME_COMMIT))
    f(0.0, "create", "/up/.x.pdf.part", routes=["tmp"], size=0)
    f(1.0, "write", "/up/.x.pdf.part", size=100)
    assert f.settler.due(50.0) == []  # no quiet release under rename_commit
    [out] = f(51.0, "rename", "/up/x.pdf", previous="/up/.x.pdf.part", routes=["final"])
    assert summary([out]) == [("id-3", "create", "/up/x.pdf", (1, 3), 3, "rename_commit")]
    assert out.event.previous_path is None
    assert out.event.file_size == 100  # the rename carried no size
    assert out.event.metadata["routes"] == ["tmp", "final"]
    assert out.event.metadata["settle"]["renamed_from"] == "/up/.x.pdf.part"
    assert out.event.metadata["settle"]["ids"] == ["id-1", "id-2", "id-3"]
    assert f.settler.pending_count == 0
    assert f.settler.stats.commits == 1


def test_the_renames_own_policy_can_commit_a_quietly_held_temp_file() -> None:
    config = SettleConfig(
        SettlePolicy(window_s=5.0), {("media", "*"): SettleOverride(strategy=SettleStrategy.RENAME_COMMIT)}
    )
    f = Feed(Settler(config.policy_for, max_pending=100))
    f(0.0, "write", "/m/.tmp123")  # unrouted: quiet
    [out] = f(1.0, "rename", "/m/shot.exr", previous="/m/.tmp123", routes=["media"])
    assert summary([out]) == [("id-2", "write", "/m/shot.exr", (1, 2), 2, "rename_commit")]


def test_rename_commit_holds_until_max_hold_when_no_rename_comes() -> None:
    f = feed(SettlePolicy(window_s=5.0, max_hold_s=30.0, strategy=SettleStrategy.RENAME_COMMIT))
    f(0.0, "write", "/direct")
    assert f.settler.next_deadline() == 30.0
    assert summary(f.settler.due(30.0)) == [("id-1", "write", "/direct", (1, 1), 1, "max_hold")]


def test_a_rename_under_quiet_releases_the_source_first() -> None:
    f = feed()
    f(0.0, "create", "/a")
    outputs = f(1.0, "rename", "/b", previous="/a")
    assert summary(outputs) == [
        ("id-1", "create", "/a", (1, 1), 1, "superseded"),
        ("id-2", "rename", "/b", (2, 2), 1, "not_held"),
    ]
    assert outputs[1].event.previous_path == "/a"


def test_a_rename_onto_a_held_path_releases_that_path_first() -> None:
    f = feed(SettlePolicy(window_s=5.0, strategy=SettleStrategy.RENAME_COMMIT))
    f(0.0, "write", "/final")
    f(1.0, "write", "/tmp1")
    outputs = f(2.0, "rename", "/final", previous="/tmp1")
    assert summary(outputs) == [
        ("id-1", "write", "/final", (1, 1), 1, "superseded"),
        ("id-3", "write", "/final", (2, 3), 2, "rename_commit"),
    ]


def test_a_rename_of_a_path_not_held_passes_through() -> None:
    f = feed(SettlePolicy(window_s=5.0, strategy=SettleStrategy.RENAME_COMMIT))
    event = make_event(1, "rename", "/b", previous="/a")
    [out] = f.settler.offer(event, 1, 0.0)
    assert out.event is event


# ------------------------------------------------------------------------------------------------ marker

MARKER = SettlePolicy(window_s=5.0, max_hold_s=100.0, strategy=SettleStrategy.MARKER)


def test_a_file_marker_releases_its_file() -> None:
    f = feed(MARKER)
    f(0.0, "create", "/in/data.csv")
    f(1.0, "write", "/in/data.csv")
    f(1.0, "write", "/in/other.csv")
    assert f.settler.due(50.0) == []  # no quiet release under marker
    outputs = f(60.0, "create", "/in/data.csv.done")
    assert summary(outputs) == [
        ("id-2", "create", "/in/data.csv", (1, 2), 2, "marker"),
        ("id-4", "create", "/in/data.csv.done", (4, 4), 1, "not_held"),  # a marker is never held
    ]
    assert outputs[0].event.metadata["settle"]["marker"] == "/in/data.csv.done"
    assert f.settler.pending_count == 1


def test_a_directory_marker_releases_everything_held_under_it() -> None:
    f = feed(MARKER)
    f(0.0, "write", "/out/year=2026/part-1")
    f(1.0, "write", "/out/part-0")
    f(2.0, "write", "/other/part-9")
    f(3.0, "write", "/outside")
    outputs = f(4.0, "create", "/out/_SUCCESS")
    assert [(o.event.file_path, o.reason) for o in outputs] == [
        ("/out/year=2026/part-1", "marker"),
        ("/out/part-0", "marker"),
        ("/out/_SUCCESS", "not_held"),
    ]
    assert f.settler.pending_count == 2
    assert f.settler.stats.marker_released == 2


def test_a_marker_in_the_root_directory_and_by_rename() -> None:
    f = feed(MARKER)
    f(0.0, "write", "/x")
    f(0.0, "write", "/y")
    outputs = f(1.0, "rename", "/x.done", previous="/x.done.tmp")
    assert [(o.event.file_path, o.reason) for o in outputs] == [("/x", "marker"), ("/x.done", "not_held")]
    outputs = f(2.0, "create", "/_SUCCESS")
    assert [(o.event.file_path, o.reason) for o in outputs] == [("/y", "marker"), ("/_SUCCESS", "not_held")]


def test_marker_names_are_per_policy() -> None:
    f = feed(SettlePolicy(window_s=5.0, strategy=SettleStrategy.MARKER, marker_names=(".ready",)))
    f(0.0, "write", "/d/a")
    assert f(1.0, "create", "/d/a.done") == []  # not a marker of this policy: held like any file
    assert f.settler.pending_count == 2
    outputs = f(2.0, "create", "/d/a.ready")
    assert [(o.event.file_path, o.reason) for o in outputs] == [("/d/a", "marker"), ("/d/a.ready", "not_held")]


def test_marker_strategy_still_has_a_max_hold() -> None:
    f = feed(MARKER)
    f(0.0, "write", "/d/a")
    assert summary(f.settler.due(100.0)) == [("id-1", "write", "/d/a", (1, 1), 1, "max_hold")]


# -------------------------------------------------------------------------------------- bounded memory


def test_max_pending_emits_the_oldest_early_and_counts_it() -> None:
    f = feed(max_pending=2)
    f(0.0, "write", "/a")
    f(0.1, "write", "/b")
    outputs = f(0.2, "write", "/c")
    assert summary(outputs) == [("id-1", "write", "/a", (1, 1), 1, "max_pending")]
    assert f.settler.pending_count == 2
    assert f.settler.oldest_pending_seq() == 2
    assert f.settler.stats.evicted == 1


def test_dead_heap_entries_are_compacted() -> None:
    f = feed()
    for i in range(5000):
        f(float(i), "create", f"/f{i}")
        f(float(i), "delete", f"/f{i}")
    assert f.settler.pending_count == 0
    assert len(f.settler._heap) <= 1024 + 1
    assert len(f.settler._by_age) <= 1024 + 1


def test_flush_all_emits_in_start_order_and_leaves_nothing() -> None:
    f = feed()
    f(0.0, "write", "/b")
    f(1.0, "write", "/a")
    f(2.0, "write", "/b")
    assert [o.event.file_path for o in f.settler.flush_all()] == ["/b", "/a"]
    assert (f.settler.pending_count, f.settler.next_deadline(), f.settler.oldest_pending_seq()) == (0, None, None)


# ------------------------------------------------------------------------------------------------ restart


def test_replay_from_the_oldest_pending_seq_reproduces_what_was_still_to_come() -> None:
    """/a's burst straddles the cursor (starts before /b's, ends after it): the replay rebuilds its tail, which
    ends at the same last event, so it carries the same id and last seq as the output already emitted."""
    events = [
        (make_event(1, "write", "/a"), 0.0),
        (make_event(2, "write", "/b"), 1.0),
        (make_event(3, "write", "/a"), 2.0),
        (make_event(4, "write", "/b"), 4.0),
        (make_event(5, "write", "/c"), 7.5),
    ]
    original = Settler(lambda _e: QUIET, max_pending=100)
    emitted = [o for event, t in events for o in original.offer(event, int(event.event_id[3:]), t)]
    assert summary(emitted) == [("id-3", "write", "/a", (1, 3), 2, "quiet")]
    cursor = original.oldest_pending_seq()
    assert cursor == 2
    remaining = original.flush_all()

    fresh = Settler(lambda _e: QUIET, max_pending=100)
    replayed = [o for event, t in events[cursor - 1 :] for o in fresh.offer(event, int(event.event_id[3:]), t)]
    replayed += fresh.flush_all()
    assert summary(replayed[:1]) == [("id-3", "write", "/a", (3, 3), 1, "quiet")]  # the duplicate, same id
    assert [(o.event.to_dict(), o.seqs) for o in replayed[1:]] == [(o.event.to_dict(), o.seqs) for o in remaining]


# ------------------------------------------------------------------------------------------------ inputs


def test_seqs_must_increase_and_times_be_finite() -> None:
    f = feed()
    f(0.0, "write", "/a")
    with pytest.raises(SettleInputError, match="seqs must increase"):
        f.settler.offer(make_event(1, "write", "/a"), 1, 1.0)
    with pytest.raises(SettleInputError, match="not finite"):
        f.settler.offer(make_event(2, "write", "/a"), 2, math.nan)
    assert f.settler.offer(make_event(2, "write", "/a"), 2, 1.0) == []  # a refused offer changed nothing


def test_received_at_seconds() -> None:
    event = make_event(1, "write", "/a")
    assert received_at_s(event) == 1767225601.0
    for bad in (None, "yesterday", "2026-01-01T00:00:01"):
        with pytest.raises(SettleInputError, match="received_at"):
            received_at_s(FileEvent.from_dict({**event.to_dict(), "metadata": {"received_at": bad}}))


def test_settler_limits_are_checked() -> None:
    with pytest.raises(ConfigError, match="max pending"):
        Settler(lambda _e: None, max_pending=0)


# ------------------------------------------------------------------------------------------------ policies


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window_s": 10.0, "max_hold_s": 5.0}, "shorter than the window"),
        ({"window_s": -1.0}, "window"),
        ({"max_hold_s": math.inf}, "max hold"),
        ({"operations": frozenset({"create", "delete"})}, "cannot hold"),
        ({"operations": frozenset({"scribble"})}, "unknown"),
        ({"marker_names": ("a/b",)}, "marker name"),
        ({"strategy": SettleStrategy.MARKER, "marker_names": ()}, "at least one marker"),
    ],
)
def test_policy_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SettlePolicy(**kwargs)


def test_policy_precedence_route_op_over_route_over_any_op_over_default() -> None:
    config = SettleConfig(
        SettlePolicy(window_s=5.0),
        {
            ("*", "write"): SettleOverride(window_s=6.0),
            ("r1", "*"): SettleOverride(window_s=7.0, cancel_on_delete=False),
            ("r1", "write"): SettleOverride(window_s=8.0),
            ("off", "*"): SettleOverride(window_s=0.0),
        },
    )
    assert config.resolve([], "create") == SettlePolicy(window_s=5.0)
    assert config.resolve([], "write") == SettlePolicy(window_s=6.0)
    assert config.resolve(["r2"], "write") == SettlePolicy(window_s=6.0)
    assert config.resolve(["r1"], "create") == SettlePolicy(window_s=7.0, cancel_on_delete=False)
    assert config.resolve(["r1"], "write") == SettlePolicy(window_s=8.0, cancel_on_delete=False)
    assert config.resolve(["off"], "create") is None
    # An event of several routes waits for the most patient of them.
    assert config.resolve(["off", "r2"], "create") == SettlePolicy(window_s=5.0)
    assert config.resolve(["r2", "r1"], "write") == config.resolve(["r1", "r2"], "write")
    assert config.enabled
    assert not SettleConfig(SettlePolicy(window_s=0.0)).enabled


def test_strategies_rank_above_windows_when_routes_disagree() -> None:
    config = SettleConfig(
        SettlePolicy(window_s=5.0),
        {
            ("vfx", "*"): SettleOverride(strategy=SettleStrategy.RENAME_COMMIT),
            ("slow", "*"): SettleOverride(window_s=60),
        },
    )
    chosen = config.resolve(["slow", "vfx"], "write")
    assert chosen is not None
    assert chosen.strategy is SettleStrategy.RENAME_COMMIT


@pytest.mark.parametrize(
    ("key", "expected"), [("r1", ("r1", "*")), ("r1:write", ("r1", "write")), ("*:create", ("*", "create"))]
)
def test_override_keys(key: str, expected: tuple[str, str]) -> None:
    assert parse_override_key(key) == expected


@pytest.mark.parametrize("key", ["", "*", "*:*", "r1:", "r1:scribble", ":write"])
def test_bad_override_keys(key: str) -> None:
    with pytest.raises(ConfigError, match="settle_overrides key"):
        parse_override_key(key)


def test_an_override_that_breaks_a_limit_is_named() -> None:
    with pytest.raises(ConfigError, match=r"settle_overrides\['r1:write'\].*shorter than the window"):
        SettleConfig(SettlePolicy(window_s=5.0, max_hold_s=60.0), {("r1", "write"): SettleOverride(window_s=90.0)})


# ------------------------------------------------------------------------------------------------ settings


@pytest.fixture
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("FPOLICYD_") or name == "WRITE_COMPLETE_DELAY_SEC":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.mark.usefixtures("_clean_env")
def test_settings_from_toml_build_the_table(tmp_path: Path) -> None:
    config_file = tmp_path / "f.toml"
    config_file.write_text(
        "write_complete_delay_s = 5\n"
        "settle_max_hold_s = 120\n"
        "[settle_overrides]\n"
        '"legal-compliance:write" = 10\n'
        '"*:create" = 2\n'
        '[settle_overrides."media-vfx"]\n'
        'strategy = "rename_commit"\n'
        "max_hold_s = 600\n"
    )
    settings = load_settings(config_file)
    config = settings.settle_config()
    assert config.resolve([], "write") == SettlePolicy(window_s=5.0, max_hold_s=120.0)
    assert config.resolve([], "create") == SettlePolicy(window_s=2.0, max_hold_s=120.0)
    assert config.resolve(["legal-compliance"], "write") == SettlePolicy(window_s=10.0, max_hold_s=120.0)
    assert config.resolve(["media-vfx"], "write") == SettlePolicy(
        window_s=5.0, max_hold_s=600.0, strategy=SettleStrategy.RENAME_COMMIT
    )


@pytest.mark.usefixtures("_clean_env")
def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WRITE_COMPLETE_DELAY_SEC", "3")
    monkeypatch.setenv("FPOLICYD_SETTLE_OPERATIONS", "create, write, setattr")
    monkeypatch.setenv("FPOLICYD_SETTLE_MARKER_NAMES", ".ok")
    monkeypatch.setenv("FPOLICYD_SETTLE_STRATEGY", "marker")
    monkeypatch.setenv("FPOLICYD_SETTLE_OVERRIDES", '{"r1": {"strategy": "quiet", "window_s": 1}, "r2:write": 0}')
    config = load_settings().settle_config()
    assert config.default == SettlePolicy(
        window_s=3.0,
        strategy=SettleStrategy.MARKER,
        marker_names=(".ok",),
        operations=frozenset({"create", "write", "setattr"}),
    )
    assert config.resolve(["r1"], "create") == SettlePolicy(
        window_s=1.0, marker_names=(".ok",), operations=frozenset({"create", "write", "setattr"})
    )
    assert config.resolve(["r2"], "write") is None


@pytest.mark.usefixtures("_clean_env")
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"settle_overrides": {"r1:scribble": 1}}, "unknown operation"),
        ({"settle_overrides": {"r1": {"window_s": 1, "colour": "red"}}}, "colour"),
        ({"settle_operations": "create,delete"}, "cannot hold"),
        ({"write_complete_delay_s": 500}, "shorter than the window"),
    ],
)
def test_bad_settle_settings_fail_at_load(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(overrides=overrides, search_default_paths=False)
