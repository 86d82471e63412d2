"""The embedded dedup store against a plain dict model, with a fake clock (Hypothesis stateful).

The model states the rule in its own words (module docstring of pipeline/dedup.py) and keeps its own eviction
order; the store must give the same decision, first-seen id and claim set after every step, across
close/reopen, with both modes mixed in one store and a size limit small enough to evict all the time.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fpolicyd.pipeline.dedup import Decision, DedupKey, DedupMode, DedupRequest, exact_key, window_key
from fpolicyd.storage.dedup_store import EmbeddedDedupStore

T0 = 1_714_557_600.0
MAX_ENTRIES = 4
EXACT_TTL = 120.0
WINDOW = 30.0
WINDOW_RETAIN = 200.0
EVENT_IDS = [f"e{i}" for i in range(4)]
CLAIMANTS = [f"node:{i}" for i in range(4)]
PATHS = ["/a", "/b", "/c"]


@dataclass
class ModelClaim:
    event_id: str
    claimant: str
    event_time: float
    expires_at: float
    retain_until: float
    order: int


@dataclass(frozen=True)
class Spec:
    """One request to make: exact (``offset``/``path`` unused) or window (event time = now + ``offset``)."""

    window: bool
    event_id: str
    claimant: str
    offset: int
    path: int


request_spec = st.builds(
    Spec,
    window=st.booleans(),
    event_id=st.sampled_from(EVENT_IDS),
    claimant=st.sampled_from(CLAIMANTS),
    offset=st.integers(min_value=-90, max_value=90),
    path=st.integers(min_value=0, max_value=len(PATHS) - 1),
)


class DedupMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.directory = Path(self.tmp.name)
        self.now = T0
        self.store = EmbeddedDedupStore(self.directory, max_entries=MAX_ENTRIES).open(self.now)
        self.model: dict[DedupKey, ModelClaim] = {}
        self.order = 0
        self.open = True

    def teardown(self) -> None:
        self.store.close()
        self.tmp.cleanup()

    # -- model -----------------------------------------------------------------------------------------

    def model_decide(self, request: DedupRequest) -> tuple[Decision, bool]:
        claim = self.model.get(request.key)
        if claim is None or claim.retain_until <= self.now or claim.claimant == request.claimant:
            return Decision.first, True
        if request.mode is DedupMode.exact:
            return (Decision.first, True) if claim.expires_at <= self.now else (Decision.duplicate, False)
        if request.event_time >= claim.expires_at:
            return Decision.first, True
        if request.event_time <= claim.event_time - WINDOW:
            return Decision.first, False  # long before the claim: delivered, claim kept
        return Decision.duplicate, False

    def model_evict(self) -> None:
        if len(self.model) > MAX_ENTRIES:
            for key in [k for k, c in self.model.items() if c.retain_until <= self.now]:
                del self.model[key]
        while len(self.model) > MAX_ENTRIES:
            oldest = min(self.model, key=lambda k: self.model[k].order)
            del self.model[oldest]

    def build(self, spec: Spec) -> DedupRequest:
        if not spec.window:
            return DedupRequest(exact_key(spec.event_id), spec.event_id, spec.claimant, self.now, self.now + EXACT_TTL)
        event_time = self.now + spec.offset
        return DedupRequest(
            window_key("UC1", PATHS[spec.path], "write"),
            spec.event_id,
            spec.claimant,
            event_time,
            event_time + WINDOW,
            mode=DedupMode.window,
            retain_until=self.now + WINDOW_RETAIN,
            use_case="UC1",
        )

    # -- rules -----------------------------------------------------------------------------------------

    @precondition(lambda self: self.open)
    @rule(specs=st.lists(request_spec, min_size=1, max_size=6))
    def check(self, specs: list[Spec]) -> None:
        requests = [self.build(spec) for spec in specs]
        results = self.store.check_many(requests, self.now)
        assert len(results) == len(requests)
        for request, result in zip(requests, results, strict=True):
            expected, write = self.model_decide(request)
            assert result.decision is expected, (request, result, self.model.get(request.key))
            assert result.key == request.key
            assert result.claimant == request.claimant
            if expected is Decision.duplicate:
                claim = self.model[request.key]
                assert (result.first_seen_id, result.first_claimant) == (claim.event_id, claim.claimant)
            else:
                assert result.first_seen_id == request.event_id
            if write:
                self.order += 1
                self.model[request.key] = ModelClaim(
                    request.event_id,
                    request.claimant,
                    request.event_time,
                    request.expires_at,
                    request.retention,
                    self.order,
                )
        self.model_evict()

    @rule(seconds=st.sampled_from([0, 1, 5, 29, 30, 31, 60, 119, 120, 121, 250]))
    def advance(self, seconds: int) -> None:
        self.now += seconds

    @precondition(lambda self: self.open)
    @rule()
    def close(self) -> None:
        self.store.close()
        self.open = False

    @rule()
    def reopen(self) -> None:
        """A restart: the store comes back with its claims; open purges what is past retention."""
        self.store.close()
        self.store = EmbeddedDedupStore(self.directory, max_entries=MAX_ENTRIES).open(self.now)
        self.open = True
        for key in [k for k, c in self.model.items() if c.retain_until <= self.now]:
            del self.model[key]

    # -- invariants ------------------------------------------------------------------------------------

    @invariant()
    def same_claims(self) -> None:
        if not self.open:
            return
        assert len(self.store) == len(self.model) <= MAX_ENTRIES
        held = self.store.claims()
        assert set(held) == set(self.model)
        for key, claim in held.items():
            mine = self.model[key]
            assert (claim.event_id, claim.claimant, claim.event_time, claim.expires_at, claim.retain_until) == (
                mine.event_id,
                mine.claimant,
                mine.event_time,
                mine.expires_at,
                mine.retain_until,
            )
        assert self.store.errors == 0


DedupMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestEmbeddedStoreAgainstModel = DedupMachine.TestCase
