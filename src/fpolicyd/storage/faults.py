"""The one fault-injection seam: make the spool's data fsync fail, so the fatal path runs end to end in a test.

It stores nothing and changes no durability contract unless armed; armed, the spool's fsync fails as a real disk's
would (the daemon stops: a failed fsync is fatal, see :mod:`fpolicyd.storage.spool`).

A failed fsync cannot be produced on demand without root (a dm-error device, a FUSE file system), and the point
is to test the daemon production runs — its CLI, its signals, its logs, its exit code, the next start on the same
data directory — not a monkeypatched copy. So :meth:`Spool.sync <fpolicyd.storage.spool.Spool.sync>` consults an
:class:`FsyncFault` given in its settings, and the daemon builds one from the environment **once, at start**, only
when :data:`FSYNC_EIO_AFTER_ENV` is set:

- it is not a setting: no flag, no TOML key, not in ``fpolicyd config show``/``example``, and ``FPOLICYD_SETTINGS_TOML``
  cannot set it (config.py exempts exactly this name from its unknown-variable check, nothing else);
- its value must be a whole number >= 0, anything else stops the start with a ConfigError naming it;
- when armed, the daemon logs ``fault_injection_armed`` at error level at start, and the injected error names the
  variable, so a log can never hide that the failure was injected.

Only :meth:`Spool.sync` (the group commit that a synchronous engine's SCREEN_RESP and every sink wait for) fails;
recovery's fsyncs and the cursor checkpoint do not, and under ``spool_fsync = "never"`` nothing is fsynced so the
fault never fires.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from fpolicyd.errors import ConfigError

#: Test-only: after this many successful spool syncs, every further one fails with EIO.
FSYNC_EIO_AFTER_ENV: Final = "FPOLICYD_FAULT_SPOOL_FSYNC_EIO_AFTER"


@dataclass(frozen=True, slots=True)
class FsyncFault:
    """The spool's data fsync fails with EIO once ``after`` syncs have succeeded."""

    after: int

    def __post_init__(self) -> None:
        if isinstance(self.after, bool) or not isinstance(self.after, int) or self.after < 0:
            raise ConfigError(f"{FSYNC_EIO_AFTER_ENV}: must be a whole number >= 0, got {self.after!r}")

    def check(self, succeeded: int) -> None:
        """Raise the injected EIO if ``succeeded`` syncs already went through."""
        if succeeded >= self.after:
            raise OSError(errno.EIO, f"Input/output error (injected by {FSYNC_EIO_AFTER_ENV}={self.after})")


def fsync_fault_from_environment(environ: Mapping[str, str]) -> FsyncFault | None:
    """The fault armed by :data:`FSYNC_EIO_AFTER_ENV`, or None (the variable is absent: always, in production)."""
    raw = environ.get(FSYNC_EIO_AFTER_ENV)
    if raw is None:
        return None
    text = raw.strip()
    if not text.isdecimal():
        raise ConfigError(f"{FSYNC_EIO_AFTER_ENV}: must be a whole number >= 0, got {raw!r}")
    return FsyncFault(int(text))
