"""Settle against its rules over generated event streams: a plain model (lists and linear scans, no heap, no
index) run side by side with a fake clock; conservation (every event accounted for exactly once); restart
replay from ``oldest_pending_seq``; the order of what comes out."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import hypothesis
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fpolicyd.events import FileEvent
from fpolicyd.pipeline.settle import (
    SettleConfig,
    SettleOutput,
    SettleOverride,
    SettlePolicy,
    Settler,
    SettleReason,
    SettleStrategy,
)

PATHS = ("/d/a", "/d/b", "/d/a.done", "/d/_SUCCESS", "/d/s/c", "/d/s/_SUCCESS", "/e/a", "/_SUCCESS", "/d/.a.tmp")
OPS = ("create", "write", "write", "setattr", "read", "delete", "rename")
ROUTES = ((), ("q",), ("rc",), ("mk",), ("rc", "mk"), ("off",))
STEPS = (0.0, 0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 50.0)
READ_ONLY = {"read", "open", "close", "getattr", "lookup"}
MANY = 10**6


def make_config(window: float, hold: float, cancel: bool) -> SettleConfig:
    return SettleConfig(
        SettlePolicy(window_s=window, max_hold_s=hold, cancel_on_delete=cancel),
        {
            ("q", "*"): SettleOverride(cancel_on_delete=not cancel),
            ("rc", "*"): SettleOverride(strategy=SettleStrategy.RENAME_COMMIT),
            ("mk", "*"): SettleOverride(strategy=SettleStrategy.MARKER),
            ("mk", "setattr"): SettleOverride(strategy=SettleStrategy.QUIET),
            ("off", "*"): SettleOverride(window_s=0),
            ("*", "setattr"): SettleOverride(operations=("create", "write", "setattr")),
        },
    )


def make_event(  # noqa: PLR0917 -- one event per generated step, positional like the step tuple
    seq: int, op: str, path: str, previous: str, routes: tuple[str, ...], volume: str
) -> FileEvent:
    return FileEvent(
        event_id=f"id-{seq}",
        operation_type=op,
        file_path=path,
        previous_path=previous if op == "rename" else None,
        volume_name=volume,
        svm_name="svm",
        timestamp=f"ts-{seq}",
        file_size=seq % 3 * 10,
        client_ip=None,
        metadata={"received_at": f"at-{seq}", "routes": list(routes)},
    )


def same(out: SettleOutput) -> tuple[Any, ...]:
    """An output as a comparable, hashable value."""
    return (out.event.to_json(), out.seqs, out.coalesced, out.reason)


# ------------------------------------------------------------------------------------------------ model


@dataclass
class ModelBurst:
    key: tuple[str, str, str]
    policy: SettlePolicy
    events: list[tuple[FileEvent, int, float]] = field(default_factory=list)

    def deadline(self) -> float:
        hold = self.events[0][2] + self.policy.max_hold_s
        if self.policy.strategy is SettleStrategy.QUIET:
            return min(max(t for _, _, t in self.events) + self.policy.window_s, hold)
        return hold


class Model:
    """The settle rules, written for clarity: a list of bursts in start order, scanned in full every time."""

    def __init__(self, policy_for: Callable[[FileEvent], SettlePolicy | None], max_pending: int, max_ids: int) -> None:
        self.policy_for = policy_for
        self.max_pending = max_pending
        self.max_ids = max_ids
        self.bursts: list[ModelBurst] = []

    def find(self, key: tuple[str, str, str]) -> ModelBurst | None:
        return next((b for b in self.bursts if b.key == key), None)

    def next_deadline(self) -> float | None:
        return min((b.deadline() for b in self.bursts), default=None)

    def oldest_pending_seq(self) -> int | None:
        return self.bursts[0].events[0][1] if self.bursts else None

    def due(self, now: float) -> list[tuple[SettleOutput, float]]:
        out: list[tuple[SettleOutput, float]] = []
        while True:
            ready = [b for b in self.bursts if b.deadline() <= now]
            if not ready:
                return out
            burst = min(ready, key=lambda b: (b.deadline(), self.bursts.index(b)))
            p = burst.policy
            last_t = max(t for _, _, t in burst.events)
            quiet = p.strategy is SettleStrategy.QUIET and last_t + p.window_s <= burst.events[0][2] + p.max_hold_s
            deadline = burst.deadline()
            out.append((self.close(burst, SettleReason.QUIET if quiet else SettleReason.MAX_HOLD), deadline))

    def close(
        self, burst: ModelBurst, reason: SettleReason, commit: tuple[FileEvent, int] | None = None, marker: str = ""
    ) -> SettleOutput:
        self.bursts.remove(burst)
        events = [e for e, _, _ in burst.events] + ([commit[0]] if commit else [])
        first, last = events[0], events[-1]
        ops = {e.operation_type for e in events}
        op = "create" if first.operation_type == "create" else (first.operation_type if len(ops) == 1 else "write")
        routes: list[str] | None = None
        for e in events:
            if "routes" in e.metadata:
                routes = list(dict.fromkeys([*(routes or []), *e.metadata["routes"]]))
        metadata = dict(last.metadata)
        if routes is not None:
            metadata["routes"] = routes
        settle: dict[str, Any] = {
            "coalesced": len(events),
            "strategy": burst.policy.strategy.value,
            "reason": reason.value,
            "first_event_id": first.event_id,
            "first_received_at": first.metadata.get("received_at"),
            "ids": [e.event_id for e in events][: self.max_ids],
        }
        if commit:
            settle["renamed_from"] = commit[0].previous_path
        if marker:
            settle["marker"] = marker
        metadata["settle"] = settle
        size = last.file_size or (burst.events[-1][0].file_size if commit else 0)
        event = FileEvent(
            last.event_id,
            op,
            last.file_path,
            None if commit else last.previous_path,
            last.volume_name,
            last.svm_name,
            last.timestamp,
            size,
            last.client_ip,
            metadata,
        )
        last_seq = commit[1] if commit else burst.events[-1][1]
        return SettleOutput(event, (burst.events[0][1], last_seq), len(events), reason)

    def markers(self, event: FileEvent) -> list[SettleOutput]:
        directory, _, name = event.file_path.rpartition("/")
        directory = directory or "/"
        released = []
        for b in self.bursts:
            if b.policy.strategy is not SettleStrategy.MARKER or b.key[:2] != (event.svm_name, event.volume_name):
                continue
            path = b.key[2]
            under = directory == "/" or path.startswith(directory + "/")
            own = any(
                m.startswith(".")
                and path.rpartition("/")[0] == event.file_path.rpartition("/")[0]
                and name == b.key[2].rpartition("/")[2] + m
                for m in b.policy.marker_names
            )
            if (under and name in b.policy.marker_names) or own:
                released.append(b)
        return [self.close(b, SettleReason.MARKER, marker=event.file_path) for b in released]

    def offer(self, event: FileEvent, seq: int, t: float) -> list[SettleOutput]:
        out = [o for o, _ in self.due(t)]
        op = event.operation_type
        key = (event.svm_name, event.volume_name, event.file_path)
        policy = self.policy_for(event)
        burst = self.find(key)
        passed = SettleOutput(event, (seq, seq), 1, SettleReason.NOT_HELD)
        if op == "delete":
            if burst is None:
                return [*out, passed]
            if not burst.policy.cancel_on_delete:
                return [*out, self.close(burst, SettleReason.SUPERSEDED), passed]
            self.bursts.remove(burst)
            metadata = dict(event.metadata)
            ids = [e.event_id for e, _, _ in burst.events]
            routes = list(dict.fromkeys(r for e, _, _ in burst.events for r in e.metadata.get("routes", ())))
            first = burst.events[0][0]
            ops = {e.operation_type for e, _, _ in burst.events}
            cancelled_op = (
                "create" if first.operation_type == "create" else (first.operation_type if len(ops) == 1 else "write")
            )
            metadata["settle"] = {
                "reason": "cancelled",
                "strategy": burst.policy.strategy.value,
                "cancelled": len(ids),
                "cancelled_operation": cancelled_op,
                "cancelled_first_event_id": first.event_id,
                "cancelled_first_received_at": first.metadata["received_at"],
                "cancelled_ids": ids[: self.max_ids],
                "cancelled_routes": routes,
            }
            cancelled = FileEvent.from_dict({**event.to_dict(), "metadata": metadata})
            return [*out, SettleOutput(cancelled, (burst.events[0][1], seq), len(ids) + 1, SettleReason.CANCELLED)]
        if op == "rename":
            if burst is not None:
                out.append(self.close(burst, SettleReason.SUPERSEDED))
            source = None
            if event.previous_path not in (None, event.file_path):
                source = self.find((event.svm_name, event.volume_name, event.previous_path or ""))
            commit = source is not None and (
                source.policy.strategy is SettleStrategy.RENAME_COMMIT
                or (policy is not None and policy.active and policy.strategy is SettleStrategy.RENAME_COMMIT)
            )
            if source is not None and commit:
                out.append(self.close(source, SettleReason.RENAME_COMMIT, commit=(event, seq)))
            elif source is not None:
                out.append(self.close(source, SettleReason.SUPERSEDED))
            out += self.markers(event)
            return out if commit else [*out, passed]
        if op == "create":
            out += self.markers(event)
            burst = self.find(key)
        name = event.file_path.rpartition("/")[2]
        is_marker = policy is not None and any(
            name == m or (m.startswith(".") and name.endswith(m) and len(name) > len(m)) for m in policy.marker_names
        )
        if policy is not None and policy.holds(op) and not (policy.strategy is SettleStrategy.MARKER and is_marker):
            if burst is None:
                self.bursts.append(ModelBurst(key, policy, [(event, seq, t)]))
                while len(self.bursts) > self.max_pending:
                    out.append(self.close(self.bursts[0], SettleReason.MAX_PENDING))
            else:
                burst.events.append((event, seq, t))
                burst.policy = policy
            return out
        if burst is not None and op not in READ_ONLY:
            out.append(self.close(burst, SettleReason.SUPERSEDED))
        return [*out, passed]

    def flush_all(self) -> list[SettleOutput]:
        return [self.close(b, SettleReason.FLUSH) for b in list(self.bursts)]


# ------------------------------------------------------------------------------------------ state machine


class SettleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = 1000.0
        self.seq = 0

    @initialize(
        window=st.sampled_from([1.0, 2.0, 5.0]),
        hold_factor=st.sampled_from([1.0, 3.0, 100.0]),
        cancel=st.booleans(),
        max_pending=st.sampled_from([1, 2, 3, MANY]),
        max_ids=st.sampled_from([1, 2, MANY]),
    )
    def setup(self, window: float, hold_factor: float, cancel: bool, max_pending: int, max_ids: int) -> None:
        self.config = make_config(window, window * hold_factor, cancel)
        self.settler = Settler(self.config.policy_for, max_pending=max_pending, max_ids=max_ids)
        self.model = Model(self.config.policy_for, max_pending, max_ids)

    @precondition(lambda self: hasattr(self, "settler"))
    @rule(
        dt=st.sampled_from(STEPS),
        op=st.sampled_from(OPS),
        path=st.sampled_from(PATHS),
        previous=st.sampled_from(PATHS),
        routes=st.sampled_from(ROUTES),
        volume=st.sampled_from(["v1", "v1", "v1", "v2"]),
    )
    def offer(  # noqa: PLR0917 -- the rule's drawn values
        self, dt: float, op: str, path: str, previous: str, routes: tuple[str, ...], volume: str
    ) -> None:
        self.clock += dt
        self.seq += 1
        event = make_event(self.seq, op, path, previous, routes, volume)
        got = self.settler.offer(event, self.seq, self.clock)
        assert [same(o) for o in got] == [same(o) for o in self.model.offer(event, self.seq, self.clock)]

    @precondition(lambda self: hasattr(self, "settler"))
    @rule(dt=st.sampled_from(STEPS))
    def due(self, dt: float) -> None:
        self.clock += dt
        got = self.settler.due(self.clock)
        expected = self.model.due(self.clock)
        assert [same(o) for o in got] == [same(o) for o, _ in expected]
        assert all(deadline <= self.clock for _, deadline in expected)  # nothing released before its time

    @precondition(lambda self: hasattr(self, "settler"))
    @invariant()
    def same_state(self) -> None:
        assert self.settler.pending_count == len(self.model.bursts)
        assert self.settler.oldest_pending_seq() == self.model.oldest_pending_seq()
        assert self.settler.next_deadline() == self.model.next_deadline()

    def teardown(self) -> None:
        if hasattr(self, "settler"):
            assert [same(o) for o in self.settler.flush_all()] == [same(o) for o in self.model.flush_all()]


TestSettleMachine = SettleMachine.TestCase
TestSettleMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# ------------------------------------------------------------------------------------------- streams

# One step: ("offer", dt, op, path, previous, routes, volume) or ("due", dt).
offer_step = st.tuples(
    st.just("offer"),
    st.sampled_from(STEPS),
    st.sampled_from(OPS),
    st.sampled_from(PATHS),
    st.sampled_from(PATHS),
    st.sampled_from(ROUTES),
    st.sampled_from(["v1", "v1", "v2"]),
)
due_step = st.tuples(st.just("due"), st.sampled_from(STEPS))
streams = st.lists(st.one_of(offer_step, offer_step, offer_step, due_step), max_size=60)
#: Denser: few paths, mostly quiet routes, short steps; bursts overlap, so the cursor often falls inside one.
dense_offer_step = st.tuples(
    st.just("offer"),
    st.sampled_from((0.0, 0.5, 1.0, 1.0, 2.0)),
    st.sampled_from(("create", "write", "write", "write", "delete", "rename")),
    st.sampled_from(("/d/a", "/d/b", "/d/c", "/d/a.done")),
    st.sampled_from(("/d/a", "/d/b", "/d/.c.tmp")),
    st.sampled_from(((), (), ("q",), ("rc",), ("mk",))),
    st.just("v1"),
)
dense_due_step = st.tuples(st.just("due"), st.sampled_from((0.5, 1.0, 2.0)))
dense_streams = st.lists(
    st.one_of(dense_offer_step, dense_offer_step, dense_offer_step, dense_due_step), min_size=10, max_size=50
)


@dataclass
class Run:
    """A stream driven through a settler; outputs are kept with the index of the step that produced them."""

    settler: Settler
    clock: float = 1000.0
    seq: int = 0
    outputs: list[tuple[int, SettleOutput, float]] = field(default_factory=list)
    offered: dict[int, tuple[FileEvent, float]] = field(default_factory=dict)

    def step(self, index: int, step: tuple[Any, ...]) -> None:
        self.clock += step[1]
        if step[0] == "due":
            self.outputs += [(index, o, self.clock) for o in self.settler.due(self.clock)]
            return
        _, _, op, path, previous, routes, volume = step
        self.seq += 1
        event = make_event(self.seq, op, path, previous, routes, volume)
        self.offered[self.seq] = (event, self.clock)
        self.outputs += [(index, o, self.clock) for o in self.settler.offer(event, self.seq, self.clock)]


def covered_ids(out: SettleOutput) -> list[str]:
    settle = out.event.metadata.get("settle")
    if settle is None:
        return [out.event.event_id]
    if out.reason is SettleReason.CANCELLED:
        return [*settle["cancelled_ids"], out.event.event_id]
    return list(settle["ids"])


@settings(max_examples=300, deadline=None)
@given(
    stream=streams,
    window=st.sampled_from([1.0, 3.0]),
    hold=st.sampled_from([3.0, 8.0, 1000.0]),
    cancel=st.booleans(),
    max_pending=st.sampled_from([2, MANY]),
)
def test_every_event_is_accounted_for_exactly_once_and_in_order(
    stream: list[tuple[Any, ...]], window: float, hold: float, cancel: bool, max_pending: int
) -> None:
    config = make_config(window, hold, cancel)
    run = Run(Settler(config.policy_for, max_pending=max_pending, max_ids=MANY))
    for index, step in enumerate(stream):
        run.step(index, step)
    run.outputs += [(len(stream), o, run.clock) for o in run.settler.flush_all()]

    # (a) conservation: the ids covered by the outputs are the offered ids, each once.
    covered = Counter(i for _, o, _ in run.outputs for i in covered_ids(o))
    assert covered == Counter(e.event_id for e, _ in run.offered.values())
    assert sum(o.coalesced for _, o, _ in run.outputs) == len(run.offered)
    assert all(len(covered_ids(o)) == o.coalesced for _, o, _ in run.outputs)
    assert run.settler.pending_count == 0
    assert run.settler.oldest_pending_seq() is None

    # (d) order: per path, the events that change it come out in spool order; a timed release is never early.
    by_id = {e.event_id: (seq, e, t) for seq, (e, t) in run.offered.items()}
    last_seen: dict[tuple[str, str, str], int] = {}
    for _, out, now in run.outputs:
        for event_id in covered_ids(out):
            seq, event, _ = by_id[event_id]
            if event.operation_type in READ_ONLY:
                continue
            key = (event.svm_name, event.volume_name, event.file_path)
            assert last_seen.get(key, 0) < seq
            last_seen[key] = seq
        if out.reason in (SettleReason.QUIET, SettleReason.MAX_HOLD):
            times = [by_id[i][2] for i in covered_ids(out)]
            policy = config.policy_for(by_id[out.event.event_id][1])
            assert policy is not None
            if out.reason is SettleReason.QUIET:
                assert max(times) + policy.window_s <= now
            else:
                assert min(times) + policy.max_hold_s <= now
        lo, hi = out.seqs
        assert lo == min(by_id[i][0] for i in covered_ids(out))
        assert hi == max(by_id[i][0] for i in covered_ids(out))


@settings(max_examples=200, deadline=None)
@given(stream=st.one_of(streams, dense_streams), window=st.sampled_from([1.0, 3.0]), cancel=st.booleans())
def test_a_replay_from_the_oldest_pending_seq_reproduces_the_outputs_to_come(
    stream: list[tuple[Any, ...]], window: float, cancel: bool
) -> None:
    """(b) The integrator's restart, at every step of the stream: the spool from ``oldest_pending_seq()`` is
    offered to a fresh settler (without the ``due`` calls, which it did not record), then life goes on.
    Everything the original emitted after the cut comes out again, identical; anything else repeats an output
    emitted before the cut, with its event id and last seq (what the stage and dedup recognise it by). Exact only
    while no burst is cut by max_hold or max_pending (module docstring), so those are out of reach here."""
    config = make_config(window, 10.0**6, cancel)
    original = Run(Settler(config.policy_for, max_pending=MANY, max_ids=MANY))
    cuts = []  # before step k: (floor, last seq offered, clock)
    for index, step in enumerate(stream):
        cuts.append((original.settler.oldest_pending_seq(), original.seq, original.clock))
        original.step(index, step)
    cuts.append((original.settler.oldest_pending_seq(), original.seq, original.clock))
    original.outputs += [(len(stream), o, original.clock) for o in original.settler.flush_all()]
    every_original = {same(o) for _, o, _ in original.outputs}

    partial_rebuilt = False
    for cut, (floor, cut_seq, cut_clock) in enumerate(cuts):
        fresh = Run(Settler(config.policy_for, max_pending=MANY, max_ids=MANY))
        for seq in range(cut_seq + 1 if floor is None else floor, cut_seq + 1):
            event, t = original.offered[seq]
            fresh.outputs += [(-1, o, t) for o in fresh.settler.offer(event, seq, t)]
        fresh.seq, fresh.clock = cut_seq, cut_clock
        for index, step in enumerate(stream[cut:], cut):
            fresh.step(index, step)
        fresh.outputs += [(len(stream), o, fresh.clock) for o in fresh.settler.flush_all()]

        to_come = Counter(same(o) for i, o, _ in original.outputs if i >= cut)
        produced = Counter(same(o) for _, o, _ in fresh.outputs)
        assert not to_come - produced, f"cut before step {cut}: an output still to come was not reproduced"
        before = {(o.seqs[1], o.event.event_id) for i, o, _ in original.outputs if i < cut}
        for repeat in (produced - to_come).elements():
            event_json, (_, last_seq), *_ = repeat
            assert (last_seq, FileEvent.from_json(event_json).event_id) in before, f"cut before step {cut}"
            partial_rebuilt = partial_rebuilt or repeat not in every_original
    hypothesis.event(f"a replay rebuilt the tail of a burst that straddled the cursor: {partial_rebuilt}")
