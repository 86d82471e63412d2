"""`fpolicyd serve` as a subprocess for the benchmarks: bound to 127.0.0.1 on a kernel-chosen port, which is
read from its "listening" log line (no probing of the port, which would race with the bind)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from fpolicyd.replaytest.daemons import loopback_serve_argv


class Daemon:
    def __init__(self, data: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            loopback_serve_argv(data, *flags),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=data,
            env=env,
        )
        self.log: list[dict[str, Any]] = []
        self._listening = threading.Event()
        self.port = 0
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        if not self._listening.wait(30) or not self.port:
            self.proc.kill()
            raise RuntimeError(f"fpolicyd did not start: {self.log[-3:]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            try:
                record = json.loads(raw)
            except ValueError:
                record = {"event": "raw", "line": raw.decode(errors="replace")}
            self.log.append(record)
            if record.get("event") == "listening":
                self.port = int(record["port"])
                self._listening.set()
        self._listening.set()

    def stop(self, timeout: float = 120) -> list[dict[str, Any]]:
        """SIGTERM, then wait ``timeout`` for the exit (SIGKILL and ``subprocess.TimeoutExpired`` after it)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._reader.join(10)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
        return self.log


def loadgen_command(port: int, events: int, connections: int, *extra: str) -> list[str]:
    """``benchmarks/loadgen.py`` sending ``events`` over ``connections`` simulated nodes to ``port`` (plus ``extra``
    flags, e.g. ``--sync --rate 20000``): the load the benchmarks send."""
    script = Path(__file__).resolve().parent / "loadgen.py"
    return [
        sys.executable,
        str(script),
        "--port",
        str(port),
        "--events",
        str(events),
        "--connections",
        str(connections),
        *extra,
    ]


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def memory_mib(pid: int, field: str = "VmRSS") -> float:
    """A /proc/PID/status memory field (VmRSS now, VmHWM peak) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_pids(pid: int) -> list[int]:
    """Live children of a process (all its threads'), from /proc."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out.extend(int(child) for child in text)
    return out


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and of its live children (the daemon's delivery process)."""
    total = cpu_seconds(pid)
    for child in child_pids(pid):
        try:
            total += cpu_seconds(child)
        except FileNotFoundError:  # exited meanwhile
            continue
    return total
