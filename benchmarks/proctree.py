"""CPU and memory of a process and all its descendants, from /proc (Linux): what a benchmark charges to a server
that may run several processes (a decoder pool, a delivery process).

CPU: for every process of the tree, user + system time plus the time of its children it has already reaped
(``cutime``/``cstime``), so a child that exited and was waited for during the run is still counted, once. Not
counted: a descendant that exited and was reaped by a process outside the tree (orphans re-parented to init).
Memory: the sum of VmRSS over the tree (pages shared between the processes count once per process, so this is
an upper bound for a forked tree).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Final

TICKS: Final = os.sysconf("SC_CLK_TCK")
PROC: Final = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may contain spaces: split after the last ')'.
    return text.rsplit(")", 1)[1].split()


def tree(root: int) -> list[int]:
    """``root`` and every live descendant (parents from /proc/PID/stat: no kernel option needed)."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out = [root]
    pending = [root]
    while pending:
        for child in children.get(pending.pop(), ()):
            out.append(child)
            pending.append(child)
    return out


def cpu_seconds(pid: int) -> float:
    """One process: user + system, its reaped children's too."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # After the ')': state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / TICKS


def tree_cpu_seconds(root: int) -> float:
    return sum(cpu_seconds(pid) for pid in tree(root))


def _status_kib(pid: int, field: str) -> int:
    try:
        text = (PROC / str(pid) / "status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0
    for line in text.splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def tree_rss_mib(root: int) -> float:
    return sum(_status_kib(pid, "VmRSS:") for pid in tree(root)) / 1024


def tree_hwm_mib(root: int) -> float:
    """The largest single-process peak (VmHWM) in the tree: exact for a one-process server."""
    return max((_status_kib(pid, "VmHWM:") for pid in tree(root)), default=0) / 1024


class RssSampler:
    """Samples a tree's RSS every ``period_s`` on a thread until stopped; ``peak_mib`` is the largest sum seen
    (or a process's own VmHWM, if larger: a peak between two samples)."""

    def __init__(self, root: int, period_s: float = 0.2) -> None:
        self.root = root
        self.period_s = period_s
        self.peak_mib = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def sample(self) -> None:
        self.peak_mib = max(self.peak_mib, tree_rss_mib(self.root), tree_hwm_mib(self.root))
        self.samples += 1

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(5)
            self.sample()
