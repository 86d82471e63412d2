"""`fpolicyd serve` speaking systemd's notify protocol to a datagram socket the test binds, as systemd would
for a Type=notify unit with WatchdogSec=: READY=1 once the FPolicy port accepts, WATCHDOG=1 from the event loop,
STOPPING=1 when SIGTERM starts the drain, then a clean exit. Also: the unit's MemoryDenyWriteExecute=yes holds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from support.serve import read_events, start_serve, stop

pytestmark = pytest.mark.slow

#: 0.2 s: the daemon pings every 0.1 s, so a handful of pings arrive within a second.
WATCHDOG_USEC = 200_000
WATCHDOG_PINGS_WANTED = 5


class NotifyListener:
    """Plays systemd's side: receives notify datagrams and, at READY=1, checks that the port in STATUS accepts."""

    def __init__(self, path: Path) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(path))
        self.socket.setblocking(False)
        self.messages: list[dict[str, str]] = []
        loop = asyncio.get_running_loop()
        #: (port from STATUS, whether a TCP connect to it succeeded right when READY=1 arrived)
        self.ready: asyncio.Future[tuple[int, bool]] = loop.create_future()
        self.watchdog_after_ready = asyncio.Event()
        self.stopping = asyncio.Event()
        self._pings_after_ready = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.socket, 4096)
            fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
            self.messages.append(fields)
            if fields.get("READY") == "1" and not self.ready.done():
                self.ready.set_result(await self._probe(fields.get("STATUS", "")))
            if fields.get("WATCHDOG") == "1" and self.ready.done():
                self._pings_after_ready += 1
                if self._pings_after_ready >= WATCHDOG_PINGS_WANTED:
                    self.watchdog_after_ready.set()
            if fields.get("STOPPING") == "1":
                self.stopping.set()

    @staticmethod
    async def _probe(status: str) -> tuple[int, bool]:
        match = re.search(r"listening on [^ ]+:(\d+)", status)
        assert match, f"READY=1 without the bound port in STATUS: {status!r}"
        port = int(match.group(1))
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return port, False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return port, True

    def close(self) -> None:
        self.socket.close()


async def test_ready_watchdog_stopping_and_clean_exit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)  # absent = the watchdog is for whoever was started
    listener = NotifyListener(tmp_path / "notify.sock")
    collector = asyncio.create_task(listener.run())
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    try:
        daemon, log_reader = await start_serve(data_dir, "--http-port", "0")
        ready_port, accepted = await asyncio.wait_for(listener.ready, 20)
        assert ready_port == daemon.port
        assert accepted, "READY=1 was sent before the FPolicy port accepted connections"
        await asyncio.wait_for(listener.watchdog_after_ready.wait(), 20)
        assert not listener.stopping.is_set()

        assert await stop(daemon) == 0
        await asyncio.wait_for(listener.stopping.wait(), 10)
        await log_reader
    finally:
        collector.cancel()
        await asyncio.gather(collector, return_exceptions=True)
        listener.close()

    kinds = [next(iter(message)) for message in listener.messages]
    assert kinds.count("READY") == 1
    ready_at = kinds.index("READY")
    stopping_at = kinds.index("STOPPING")
    assert ready_at < stopping_at
    assert "draining" in listener.messages[stopping_at]["STATUS"]
    assert all(message == {"WATCHDOG": "1"} for message in listener.messages if "WATCHDOG" in message)
    assert any(record.get("event") == "stopped" for record in daemon.log_lines)


#: Runs ``python -m fpolicyd ARGS`` with the kernel's memory-deny-write-execute on (PR_SET_MDWE, Linux >= 6.3,
#: inherited across exec): what systemd's MemoryDenyWriteExecute=yes enforces. Exits 77 if the kernel lacks it.
MDWE_LAUNCHER = """
import ctypes, os, sys
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(77)
os.execv(sys.executable, [sys.executable, "-m", "fpolicyd", *sys.argv[1:]])
"""
MDWE_UNSUPPORTED = 77


async def test_serves_under_memory_deny_write_execute(tmp_path: Path) -> None:
    """The unit's MemoryDenyWriteExecute=yes is only safe if nothing fpolicyd loads (CPython, lxml, uvloop, orjson,
    pydantic-core, aiobotocore) maps writable+executable memory: run the daemon and a simulated ONTAP under it."""
    env = {
        name: value for name, value in os.environ.items() if not name.startswith(("FPOLICYD_", "NOTIFY_", "WATCHDOG_"))
    }
    flags = ["--listen-host", "127.0.0.1", "--listen-port", "0", "--http-port", "0", "--data-dir", str(tmp_path)]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        MDWE_LAUNCHER,
        "serve",
        *flags,
        "--svm-name",
        "svm1",
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    log: list[dict[str, Any]] = []
    try:
        port = None
        while port is None:
            line = await asyncio.wait_for(process.stderr.readline(), 30)
            if not line:
                if await process.wait() == MDWE_UNSUPPORTED:
                    pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
                pytest.fail(f"the daemon exited under MDWE before listening: {log}")
            record = orjson.loads(line)
            log.append(record)
            if record.get("event") == "listening":
                port = int(record["port"])
        drain = asyncio.create_task(_collect(process.stderr, log))
        simulator = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            MDWE_LAUNCHER,
            "simulate",
            "--port",
            str(port),
            "--nodes",
            "2",
            "--events",
            "300",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, simulator_err = await asyncio.wait_for(simulator.communicate(), 60)
        assert simulator.returncode == 0, simulator_err.decode()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0, log[-5:]
        await drain
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert any(record.get("event") == "stopped" and record.get("failure") is None for record in log)
    assert read_events(tmp_path), "events were written under MDWE"


async def _collect(stream: asyncio.StreamReader, log: list[dict[str, Any]]) -> None:
    while line := await stream.readline():
        log.append(orjson.loads(line))
