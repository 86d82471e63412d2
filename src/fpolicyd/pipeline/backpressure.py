"""Back-pressure policy (sans-IO): spool size in, actions out.

Three thresholds on the bytes fpolicyd holds but has not delivered everywhere:
- at ``high`` it asks every ONTAP session to stop sending (BACK_PRESSURE_APPLY);
- at ``hard`` it also stops reading its sockets (TCP then pushes back, whatever ONTAP does with the request);
- reading resumes once back under ``high``, and BACK_PRESSURE_REM is sent once under ``low``.

Two gaps are the hysteresis that keeps a spool hovering near one threshold from flapping on every batch: between
``low`` and ``high`` for APPLY/REM at ONTAP, between ``high`` and ``hard`` for pausing and resuming the sockets (a
spool that resumed reading as soon as it dipped under ``hard`` flipped 46 times in 9 s).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from fpolicyd.errors import ConfigError


class Pressure(Enum):
    NORMAL = "normal"
    APPLIED = "applied"
    PAUSED = "paused"


class Action(Enum):
    APPLY = "back_pressure_apply"
    REMOVE = "back_pressure_remove"
    PAUSE_READING = "pause_reading"
    RESUME_READING = "resume_reading"


@dataclass(frozen=True, slots=True)
class Watermarks:
    low_bytes: int
    high_bytes: int
    hard_bytes: int

    def __post_init__(self) -> None:
        if not 0 <= self.low_bytes < self.high_bytes < self.hard_bytes:
            raise ConfigError(
                "back-pressure watermarks must satisfy 0 <= low < high < hard "
                f"(low={self.low_bytes}, high={self.high_bytes}, hard={self.hard_bytes})"
            )


class BackPressureGate:
    """Tracks the pressure state; :meth:`update` returns the actions a change of level requires, in order."""

    __slots__ = ("state", "watermarks")

    def __init__(self, watermarks: Watermarks) -> None:
        self.watermarks = watermarks
        self.state = Pressure.NORMAL

    def update(self, held_bytes: int) -> tuple[Action, ...]:
        w = self.watermarks
        state = self.state
        if held_bytes >= w.hard_bytes:
            target = Pressure.PAUSED
        elif held_bytes >= w.high_bytes:
            # Between high and hard: stay paused if already paused (hysteresis), else applied.
            target = Pressure.PAUSED if state is Pressure.PAUSED else Pressure.APPLIED
        elif held_bytes <= w.low_bytes:
            target = Pressure.NORMAL
        else:
            # Between low and high: stay applied if already applied (hysteresis); a paused reader resumes.
            target = Pressure.NORMAL if state is Pressure.NORMAL else Pressure.APPLIED
        if target is state:
            return ()
        self.state = target
        return _TRANSITIONS[(state, target)]


_TRANSITIONS: dict[tuple[Pressure, Pressure], tuple[Action, ...]] = {
    (Pressure.NORMAL, Pressure.APPLIED): (Action.APPLY,),
    (Pressure.NORMAL, Pressure.PAUSED): (Action.APPLY, Action.PAUSE_READING),
    (Pressure.APPLIED, Pressure.PAUSED): (Action.PAUSE_READING,),
    (Pressure.APPLIED, Pressure.NORMAL): (Action.REMOVE,),
    (Pressure.PAUSED, Pressure.APPLIED): (Action.RESUME_READING,),
    (Pressure.PAUSED, Pressure.NORMAL): (Action.RESUME_READING, Action.REMOVE),
}
