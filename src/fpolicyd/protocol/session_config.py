"""What configures a session (:class:`SessionConfig`, :class:`EngineMode` and their bounds), apart from the session
machine itself (:mod:`fpolicyd.protocol.session`): the settings, and so every process that reads them (the delivery
processes), import this without the XML codec (lxml) the session needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from fpolicyd.errors import ConfigError

__all__ = ["DEFAULT_MAX_OUTSTANDING", "MIN_IDLE_FACTOR", "EngineMode", "SessionConfig"]

#: The idle timeout must exceed the keep-alive interval by this factor: a timeout equal to the interval
#: closes the connection just before each KEEP_ALIVE (a public server's "handshake works, no events" bug).
MIN_IDLE_FACTOR: Final = 3.0

#: Default bound on a synchronous session's outstanding requests: the top of ONTAP's ``max-server-reqs`` range
#: (1–10000; its default is 500), so that no ONTAP setting can make the session forget a request it still holds.
DEFAULT_MAX_OUTSTANDING: Final = 10_000


class EngineMode(StrEnum):
    """The ONTAP external engine type this server is configured for."""

    ASYNC = "async"
    SYNC = "sync"


@dataclass(frozen=True, slots=True)
class SessionConfig:
    engine_mode: EngineMode = EngineMode.ASYNC
    #: Versions this server speaks, most preferred first; only versions ONTAP offered are ever answered.
    #: 1.2 is the most field-tested and the first with GenerationTime; 2.0 adds only OUTAGE_MSG.
    preferred_versions: tuple[str, ...] = ("1.2", "1.1", "1.0")
    handshake_timeout_s: float = 5.0
    keep_alive_interval_s: float = 120.0
    idle_timeout_s: float = 360.0
    #: Synchronous engines: requests a session tracks as outstanding at most (see :class:`OutstandingRequests`).
    max_outstanding: int = DEFAULT_MAX_OUTSTANDING

    def __post_init__(self) -> None:
        if not self.preferred_versions:
            raise ConfigError("preferred_versions must name at least one protocol version")
        if self.handshake_timeout_s <= 0:
            raise ConfigError("handshake_timeout_s must be > 0")
        if self.keep_alive_interval_s < 0:
            raise ConfigError("keep_alive_interval_s must be >= 0 (0: ONTAP keep-alives disabled)")
        if self.idle_timeout_s < 0:
            raise ConfigError("idle_timeout_s must be >= 0 (0: no idle timeout)")
        if self.max_outstanding < 1:
            raise ConfigError("max_outstanding must be >= 1")
        if self.idle_timeout_s and self.idle_timeout_s < MIN_IDLE_FACTOR * self.keep_alive_interval_s:
            raise ConfigError(
                f"idle_timeout_s ({self.idle_timeout_s}) must be at least {MIN_IDLE_FACTOR:g} x "
                f"keep_alive_interval_s ({self.keep_alive_interval_s}); equal values drop every session "
                "just before its keep-alive"
            )
