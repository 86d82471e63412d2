"""The backoff every retry loop uses: capped exponential with full jitter (sink workers, AWS requests, the
DynamoDB dedup store)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

__all__ = ["MAX_BACKOFF_EXPONENT", "RetryPolicy"]

#: Largest exponent of the backoff (``base * 2**64`` is past any cap a setting allows).
MAX_BACKOFF_EXPONENT: Final = 64


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_s: float = 0.05
    cap_s: float = 5.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**attempt)]. The exponent is capped at
        :data:`MAX_BACKOFF_EXPONENT`: ``2**attempt`` as an int overflows the float product from attempt 1024 on
        (OverflowError), which a sink or a fail-closed dedup store down for an hour or so reaches."""
        return rng.uniform(0.0, min(self.cap_s, self.base_s * 2.0 ** min(attempt, MAX_BACKOFF_EXPONENT)))
