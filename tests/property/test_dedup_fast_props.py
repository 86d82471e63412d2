"""The embedded store's batch judging (rows instead of Claim objects, exact mode inlined) gives what the pure
:func:`judge` / :func:`result_of` give, and the policy's fast request builder what the validating constructor
gives (pipeline/dedup.py, storage/dedup_store.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from fpolicyd.pipeline.dedup import Claim, DedupMode, DedupPolicy, DedupRequest, exact_key, judge, result_of, window_key
from fpolicyd.storage.dedup_store import EmbeddedDedupStore

T0 = 1_714_557_600.0
offsets = st.integers(min_value=-3, max_value=3).map(float)
claimants = st.sampled_from(["a:1", "b:1"])


@st.composite
def cases(draw: st.DrawFn) -> tuple[Claim, DedupRequest, float]:
    """A stored claim and a request for the same key, times a few seconds apart so every branch is reached."""
    claim = Claim("first", draw(claimants), T0 + draw(offsets), T0 + draw(offsets), T0 + draw(offsets))
    now = T0 + draw(offsets)
    if draw(st.booleans()):
        request = DedupRequest(exact_key("k"), "second", draw(claimants), now, now + draw(offsets))
    else:
        event_time = T0 + draw(offsets)
        request = DedupRequest(
            window_key("UC", "/a", "write"),
            "second",
            draw(claimants),
            event_time,
            event_time + draw(st.integers(min_value=1, max_value=3)),
            mode=DedupMode.window,
            retain_until=now + draw(offsets),
        )
    return claim, request, now


_STORE = EmbeddedDedupStore(Path("never-opened"))  # _judge_batch needs no connection; nothing touches the path


@given(cases())
def test_batch_judging_matches_judge(case: tuple[Claim, DedupRequest, float]) -> None:
    claim, request, now = case
    pair = (request.key.pk, request.key.sk)
    row = (*pair, claim.event_id, claim.claimant, claim.event_time, claim.expires_at, claim.retain_until)
    judged = _STORE._judge_batch([request], [pair], {pair: row}, now)
    judgement = judge(claim, request, now)
    assert judged.results == [result_of(request, judgement, claim)]
    assert (pair in judged.writes) is judgement.write
    assert judged.added == 0
    fresh = _STORE._judge_batch([request], [pair], {}, now)
    assert fresh.results == [result_of(request, judge(None, request, now), None)]
    assert fresh.added == 1


valid_text = st.text(min_size=1, max_size=8)
any_text = st.text(max_size=3)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-(10**6), max_value=10**6), st.booleans()
)


@given(any_text, any_text, numbers, numbers, st.none() | valid_text)
def test_exact_request_matches_the_validating_constructor(
    event_id: str, claimant: str, event_time: float, now: float, use_case: str | None
) -> None:
    policy = DedupPolicy(exact_ttl_s=60.0)
    try:
        expected: DedupRequest | str = DedupRequest(
            exact_key(event_id), event_id, claimant, event_time, now + 60.0, use_case=use_case
        )
    except ValueError as exc:
        expected = str(exc)
    try:
        built: DedupRequest | str = policy.exact_request(event_id, claimant, event_time, now, use_case)
    except ValueError as exc:
        built = str(exc)
    assert built == expected
    if isinstance(built, DedupRequest):
        assert isinstance(expected, DedupRequest)
        assert (built.retain_until, hash(built.key)) == (expected.retain_until, hash(expected.key))


batch_specs = st.lists(
    st.tuples(
        st.integers(min_value=-50, max_value=50),  # the clock moves either way
        st.lists(
            st.tuples(st.sampled_from(["k0", "k1", "k2", "k3", "k4"]), claimants, st.sampled_from([10.0, 30.0, 60.0])),
            min_size=1,
            max_size=4,
        ),
        st.booleans(),  # reopen before the batch
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(batch_specs)
def test_eviction_without_a_retention_index_matches_a_model(
    batches: list[tuple[int, list[tuple[str, str, float]], bool]],
) -> None:
    """Expired claims first (however their retentions are ordered by write time), then the least recently
    written, exactly as a dict model does it, with the clock stepping back and forth and reopening."""
    limit = 3
    model: dict[str, tuple[str, float, float, int]] = {}  # pk -> claimant, expires_at, retain_until, write order
    order = 0
    now = T0
    with tempfile.TemporaryDirectory() as tmp:
        store = EmbeddedDedupStore(Path(tmp), max_entries=limit).open(now)
        try:
            for step, specs, reopen in batches:
                now += step
                if reopen:
                    store.close()
                    store = EmbeddedDedupStore(Path(tmp), max_entries=limit).open(now)
                    model = {k: v for k, v in model.items() if v[2] > now}
                requests = [DedupRequest(exact_key(k), k, c, now, now + ttl) for k, c, ttl in specs]
                results = store.check_many(requests, now)
                for request, result in zip(requests, results, strict=True):
                    held = model.get(request.key.pk)
                    free = held is None or held[2] <= now or held[0] == request.claimant or held[1] <= now
                    assert result.deliver is free
                    if free:
                        order += 1
                        model[request.key.pk] = (request.claimant, request.expires_at, request.retention, order)
                if len(model) > limit:
                    model = {k: v for k, v in model.items() if v[2] > now}
                for key in sorted(model, key=lambda k: model[k][3])[: max(0, len(model) - limit)]:
                    del model[key]
                assert {k.pk: (c.claimant, c.retain_until) for k, c in store.claims().items()} == {
                    k: (v[0], v[2]) for k, v in model.items()
                }
                assert len(store) == len(model)
        finally:
            store.close()
