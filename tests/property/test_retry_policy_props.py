"""The capped full-jitter backoff (``RetryPolicy.delay``) for any attempt number: within ``[0, cap]``, never an
error. Before the exponent was capped, ``base * 2**attempt`` raised OverflowError from attempt 1024 on, which a
sink or a fail-closed dedup store that stays down for an hour or so reaches (the task that retried it died)."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from fpolicyd.sinks.retry import RetryPolicy


@given(
    attempt=st.integers(min_value=0, max_value=10**9),
    base=st.floats(min_value=1e-4, max_value=10.0),
    cap=st.floats(min_value=1e-3, max_value=3600.0),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_delay_is_within_the_cap_for_any_attempt(attempt: int, base: float, cap: float, seed: int) -> None:
    delay = RetryPolicy(base_s=base, cap_s=cap).delay(attempt, random.Random(seed))
    assert 0.0 <= delay <= min(cap, base * 2.0 ** min(attempt, 64))


def test_a_long_outage_keeps_backing_off_at_the_cap() -> None:
    policy, rng = RetryPolicy(base_s=0.1, cap_s=10.0), random.Random(1)
    delays = [policy.delay(attempt, rng) for attempt in range(1020, 1100)]
    assert max(delays) <= 10.0
    assert sum(delays) / len(delays) > 2.5  # uniform in [0, 10]: the cap is reached, not a tiny delay
