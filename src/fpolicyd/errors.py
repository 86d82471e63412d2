"""Typed errors. Each says whose fault it is and what the caller should do about it.

- :class:`RemoteProtocolError`: the peer (an ONTAP node, or something pretending to be one) sent bytes that
  break the protocol. ``close`` says whether the connection must be dropped; ``reason`` is a short, stable
  token used as a metric label.
- :class:`LocalProtocolError`: fpolicyd itself tried to do something the protocol forbids (a bug or misuse).
- :class:`ConfigError`: bad settings; raised at start-up with the key named.
- :class:`SinkError`: a sink failed; ``retriable`` is data, not a guess made by the caller; ``disk_full`` says the
  cause was ENOSPC/EDQUOT (the daemon then pauses reading until the write goes through again).
- :class:`DiskFullError`: a local writer found no space (ENOSPC) or no quota (EDQUOT); always retriable: nothing
  was written, nothing was lost, the same write is tried again once space frees.

:func:`did_you_mean` words the suggestion for a mistyped name (a setting, an option, a command).
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Collection, Sequence
from typing import Final

#: errno values that mean "no space": the device is full (ENOSPC) or the user's quota is (EDQUOT).
DISK_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})


def did_you_mean(name: str, known: Collection[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``known``, or nothing when none is close."""
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


class FpolicydError(Exception):
    """Base of every error fpolicyd raises on purpose."""


class RemoteProtocolError(FpolicydError):
    """The peer broke the protocol."""

    def __init__(self, reason: str, detail: str = "", *, close: bool = True) -> None:
        self.reason = reason
        self.detail = detail
        self.close = close
        super().__init__(f"{reason}: {detail}" if detail else reason)


class LocalProtocolError(FpolicydError):
    """fpolicyd was asked to do something the protocol does not allow."""


class ConfigError(FpolicydError):
    """Settings are invalid; the message names the key."""


def settings_refused(problems: Sequence[str]) -> ConfigError:
    """One ConfigError for every problem found at once: the problem itself when it is alone, else one line each."""
    if len(problems) == 1:
        return ConfigError(problems[0])
    return ConfigError("settings refused:\n  " + "\n  ".join(problems))


class SinkError(FpolicydError):
    """A sink could not take a batch."""

    def __init__(self, message: str, *, retriable: bool, disk_full: bool = False) -> None:
        self.retriable = retriable
        #: The write failed for want of space (ENOSPC/EDQUOT): retriable, and reading pauses meanwhile.
        self.disk_full = disk_full
        super().__init__(message)


class DiskFullError(FpolicydError):
    """A local writer (``writer``: a closed set of names, see ``fpolicyd.pipeline.disk.Writer``) found no space.
    Nothing was written (or what was written is cut back): retry the same write once space frees."""

    retriable = True
    disk_full = True

    def __init__(self, writer: str, message: str) -> None:
        self.writer = writer
        super().__init__(message)


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a write refused for want of space: an OSError with
    ENOSPC/EDQUOT, or an fpolicyd error that says so (``disk_full``)."""
    seen = 0
    while exc is not None and seen < 8:
        if getattr(exc, "disk_full", False) is True:
            return True
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        exc = exc.__cause__
        seen += 1
    return False
