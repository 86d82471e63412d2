"""The daemon a replay-test run drives when it is not given one (``--target``): :class:`InProcessDaemon`
(``fpolicyd.app.Daemon`` in this process) or :class:`SubprocessDaemon` (``python -m fpolicyd serve``, which can
be killed); both restartable on the same port and data directory, both report what each run of the daemon saw."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Final

import orjson

from fpolicyd.replaytest.config import ReplayTestError

__all__ = ["DaemonGroup", "InProcessDaemon", "SubprocessDaemon", "loopback_serve_argv"]


class InProcessDaemon:
    """fpolicyd.app.Daemon on 127.0.0.1 with its data in ``data_dir``; restartable on the same port."""

    def __init__(self, data_dir: Path, overrides: dict[str, Any]) -> None:
        from fpolicyd.config import Settings, load_settings  # noqa: PLC0415 - only the in-process mode needs it

        values: dict[str, Any] = {
            "listen_host": "127.0.0.1",
            "listen_port": 0,
            "data_dir": str(data_dir),
            "sinks": f"jsonl:{data_dir / 'events'}",
            "log_level": "warning",
        }
        if "http_enabled" in Settings.model_fields:
            values["http_enabled"] = False
        values.update(overrides)
        self.settings = load_settings(overrides=values, search_default_paths=False)
        self.sink_dir = data_dir / "events"
        self.port = 0
        self.instances: list[dict[str, Any]] = []
        self._daemon: Any = None

    async def start(self) -> None:
        from fpolicyd.app import Daemon  # noqa: PLC0415

        settings = self.settings
        if self.port:
            settings = settings.model_copy(update={"listen_port": self.port})
        daemon = Daemon(settings)
        try:
            await daemon.start()
        except BaseException:
            await daemon.stop()
            raise
        self._daemon = daemon
        self.port = daemon.port

    async def stop(self) -> None:
        daemon, self._daemon = self._daemon, None
        if daemon is None:
            return
        replay = daemon.context.ingest.replay
        report = await daemon.stop()
        # Close an episode still open at the stop (as if the idle time had passed) to report its figures.
        stats = replay.stats(asyncio.get_running_loop().time() + replay.episode_idle_s)
        self.instances.append(
            {
                "stop": {"events": report.events, "undelivered": report.undelivered, "failure": report.failure},
                "replay": _readable_stats(stats.to_dict()),
            }
        )
        if report.failure is not None:
            raise ReplayTestError(f"the daemon failed: {report.failure}")

    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def undelivered(self) -> int:
        return int(self.instances[-1]["stop"]["undelivered"]) if self.instances else 0

    def summary(self) -> dict[str, Any]:
        return {
            "process": "in-process",
            "restarts": max(0, len(self.instances) - 1),
            "totals": _daemon_totals([i["replay"] for i in self.instances]),
            "instances": self.instances,
        }


#: How long a daemon subprocess has to log "listening", and to exit after SIGTERM (it drains its sinks first).
_START_TIMEOUT_S: Final = 60.0
_STOP_TIMEOUT_S: Final = 600.0
#: Log lines of a daemon subprocess kept for error messages.
_LOG_TAIL: Final = 20


class SubprocessDaemon:
    """``python -m fpolicyd serve`` on 127.0.0.1 (port 0, read from its "listening" log line; HTTP port 0) with
    its data in ``data_dir``; stopped with SIGTERM (graceful) or SIGKILL, and started again on the same data.
    Settings other than the listener, data directory and sinks go in as ``FPOLICYD_<NAME>`` variables."""

    def __init__(self, data_dir: Path, overrides: dict[str, Any]) -> None:
        self.data_dir = data_dir
        self.sink_dir = data_dir / "events"
        self.overrides = dict(overrides)
        self.sinks = str(self.overrides.pop("sinks", f"jsonl:{self.sink_dir}"))
        self.port = 0
        self.instances: list[dict[str, Any]] = []
        self._process: asyncio.subprocess.Process | None = None
        self._log_task: asyncio.Task[None] | None = None
        self._log: list[dict[str, Any]] = []
        self._stopped: dict[str, Any] | None = None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key, value in self.overrides.items():
            env[f"FPOLICYD_{key.upper()}"] = value.value if isinstance(value, Enum) else str(value)
        return env

    async def _read_log(self, stream: asyncio.StreamReader, ready: asyncio.Future[int]) -> None:
        while line := await stream.readline():
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                record = {"event": "raw", "line": line.decode(errors="replace").rstrip()}
            if not isinstance(record, dict):
                continue
            self._log.append(record)
            del self._log[:-_LOG_TAIL]
            event = record.get("event")
            if event == "listening" and not ready.done():
                ready.set_result(int(record["port"]))
            elif event == "stopped":
                self._stopped = record
        if not ready.done():
            ready.set_exception(ReplayTestError(f"the daemon exited before listening; its last log: {self._log}"))

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log, self._stopped = [], None
        process = await asyncio.create_subprocess_exec(
            *loopback_serve_argv(self.data_dir, "--sinks", self.sinks),
            cwd=self.data_dir,  # no fpolicyd.toml of the caller's working directory
            env=self._env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            limit=1 << 20,
        )
        assert process.stderr is not None
        self._process = process
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._log_task = asyncio.create_task(self._read_log(process.stderr, ready))
        try:
            self.port = await asyncio.wait_for(ready, _START_TIMEOUT_S)
        except BaseException as exc:
            await self._end(signal.SIGKILL)
            if isinstance(exc, TimeoutError):
                raise ReplayTestError(f"the daemon did not listen within {_START_TIMEOUT_S:g} s: {self._log}") from None
            raise

    async def _end(self, how: signal.Signals) -> int | None:
        process, self._process = self._process, None
        if process is None:
            return None
        if process.returncode is None:
            process.send_signal(how)
        try:
            code = await asyncio.wait_for(process.wait(), _STOP_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            code = await process.wait()
        if self._log_task is not None:
            await self._log_task
        return code

    async def stop(self) -> None:
        """SIGTERM: the daemon drains and checkpoints, like a graceful in-process stop."""
        if self._process is None:
            return
        code = await self._end(signal.SIGTERM)
        stopped = self._stopped or {}
        self.instances.append(
            {
                "signal": "SIGTERM",
                "exit_code": code,
                "stop": {k: stopped.get(k) for k in ("events", "undelivered", "failure")},
            }
        )
        if code != 0 or stopped.get("failure"):
            raise ReplayTestError(f"the daemon failed (exit {code}); its last log: {self._log}")

    def freeze(self) -> None:
        """SIGSTOP: the daemon reads and answers nothing more, while the nodes can still write to its sockets."""
        if self._process is not None and self._process.returncode is None:
            self._process.send_signal(signal.SIGSTOP)

    async def kill(self) -> None:
        """SIGKILL: no drain, no checkpoint, nothing flushed; what the spool holds is all that is left."""
        code = await self._end(signal.SIGKILL)
        self.instances.append({"signal": "SIGKILL", "exit_code": code})

    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def undelivered(self) -> int:
        last = self.instances[-1] if self.instances else {}
        return int(last.get("stop", {}).get("undelivered") or 0)

    def summary(self) -> dict[str, Any]:
        return {
            "process": "subprocess",
            "restarts": max(0, len(self.instances) - 1),
            "kills": sum(1 for i in self.instances if i["signal"] == "SIGKILL"),
            "instances": self.instances,
        }


class DaemonGroup:
    """Several daemon instances (``--instances``), each on its own port, data directory and JSON Lines directory;
    started and stopped together (the planned outage leaves them all running, as it does one)."""

    def __init__(self, members: list[InProcessDaemon] | list[SubprocessDaemon]) -> None:
        self.members: list[InProcessDaemon | SubprocessDaemon] = list(members)

    async def start(self) -> None:
        try:
            await asyncio.gather(*(m.start() for m in self.members))
        except BaseException:
            await asyncio.gather(*(m.stop() for m in self.members), return_exceptions=True)
            raise

    async def stop(self) -> None:
        results = await asyncio.gather(*(m.stop() for m in self.members), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def undelivered(self) -> int:
        return sum(m.undelivered() for m in self.members)

    def summary(self) -> dict[str, Any]:
        members = [m.summary() for m in self.members]
        summary: dict[str, Any] = {
            "process": members[0]["process"],
            "restarts": 0,
        }
        runs = [run["replay"] for m in self.members if isinstance(m, InProcessDaemon) for run in m.instances]
        if runs:
            summary["totals"] = _daemon_totals(runs)
        summary["members"] = members
        return summary


#: ReplayStats fields that are the daemon's monotonic clock readings: meaningless outside its process.
_MONOTONIC_FIELDS: Final = ("replay_started_at", "replay_ended_at")


def loopback_serve_argv(data_dir: Path, *flags: str) -> list[str]:
    """The command line of ``fpolicyd serve`` in this interpreter on 127.0.0.1 with kernel-chosen FPolicy and HTTP
    ports (daemons side by side must not compete for 9898 or 9100) and its data under ``data_dir``; ``flags`` come
    last. The one spelling for replay-test, the tests and the benchmarks."""
    return [
        sys.executable, "-m", "fpolicyd", "serve", "--listen-host", "127.0.0.1", "--listen-port", "0",
        "--http-port", "0", "--data-dir", str(data_dir), *flags,
    ]  # fmt: skip


def _readable_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """The daemon's ReplayStats for the report: no monotonic clock readings, seconds and rates rounded."""
    return {
        key: round(value, 3) if isinstance(value, float) else value
        for key, value in stats.items()
        if key not in _MONOTONIC_FIELDS
    }


def _daemon_totals(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The daemon's own replay figures over its runs (one per start): what its metrics would show."""
    replay_s = sum(r["replay_duration_s"] for r in runs)
    replayed = sum(r["replay_episode_events"] for r in runs)
    return {
        "events": sum(r["events"] for r in runs),
        "replayed_events": sum(r["replayed_events"] for r in runs),
        "out_of_order_events": sum(r["out_of_order_events"] for r in runs),
        "duplicates": sum(r["duplicates"] for r in runs),
        "max_out_of_order_lag_us": max((r["max_out_of_order_lag_us"] for r in runs), default=0),
        "reconnects": sum(r["reconnects"] for r in runs),
        # Session lost → next NEGO_REQ of the same node: includes the planned outage (report.node_reconnect_s
        # does not).
        "max_session_gap_s": round(max((r["max_reconnect_s"] for r in runs), default=0.0), 3),
        # First → last replayed notification the daemon read, per run, summed: the replay as the daemon saw it.
        "replay_ingest_s": round(replay_s, 3),
        "replay_ingest_eps": round(replayed / replay_s, 1) if replay_s > 0 else 0.0,
    }
