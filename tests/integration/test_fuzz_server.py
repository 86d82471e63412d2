"""The whole daemon fuzzed over TCP, time-boxed for CI (issue 14, "Fuzz the whole server").

A real :class:`~fpolicyd.app.Daemon` (its own uvloop loop on a thread, as in production: it never pauses between
examples) on 127.0.0.1; Hypothesis draws attacks (tests/support/fuzz.py: mutated real frames, random splits, garbage
before and after NEGO, slow writers, interleaved valid sessions, FIN / half-close / RST / cut) and plays each over
real sockets while a healthy session streams notifications alongside. After every attack:

- the daemon's connections come back to the healthy session alone (none leaks, none is stuck pending);
- the healthy session is still open, /readyz answers 200;
- no log line carries an exception, a traceback or ``task_failed``, no error-level line other than what the peer's
  input explains (a FATAL ALERT_MSG it sent), and the loop's exception handler was never called.

At the end, every notification of the healthy session is in the JSON Lines exactly once (dedup off: a duplicate
would show); of what the daemon's own code allocated during :data:`TRACED` attacks after the warm-up (tracemalloc,
innermost frame under src/fpolicyd), less than :data:`TRACED_RETAINED_BOUND` is still held once it settled (the
bounded replay window and lxml's rotating error log account for ~150 kB); the test process's RSS grew by less than
:data:`RSS_GROWTH_BOUND` from the warm-up to the end. The long campaign is ``make fuzz``
(benchmarks/fuzz_server.py).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import fpolicyd
from fpolicyd.app import Daemon
from fpolicyd.config import Settings
from support.daemon import make_settings
from support.fuzz import (
    FUZZ_MAX_FRAME_BYTES,
    Attack,
    Corpus,
    Ending,
    HealthySession,
    LogWatch,
    draw_attack,
    exactly_once,
    play_attack,
    wait_delivered,
)
from support.observability import http_get

T = TypeVar("T")

pytestmark = pytest.mark.slow

#: Attacks drawn at most; the campaign also stops playing new ones after CAMPAIGN_S (a loaded machine plays fewer).
MAX_EXAMPLES = 300
CAMPAIGN_S = 30.0
#: Attacks played before memory is watched (caches, pools, counters and the replay window have filled by then).
WARM_UP = 25
#: Attacks played under tracemalloc after the warm-up (it slows allocation-heavy code ~5x: a window, not all).
TRACED = 100
#: What the daemon's own code may still hold, once it settled, of what it allocated during the traced attacks.
TRACED_RETAINED_BOUND = 384 << 10
#: Resident memory growth allowed from the warm-up to the end of the campaign (the test process: Hypothesis's
#: own bookkeeping included, so it only catches a gross leak; the traced window is the precise check).
RSS_GROWTH_BOUND = 64 << 20
#: Bounds of one attack and of the daemon's settling after it (seconds).
ATTACK_TIMEOUT_S = 30.0
SETTLE_S = 10.0


class HypothesisDraw:
    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))

    def binary(self, max_size: int) -> bytes:
        return self.data.draw(st.binary(max_size=max_size))


class DaemonThread:
    """A daemon on its own uvloop loop in a thread; coroutines (the attacks, the checks) run on that loop."""

    def __init__(self, settings: Settings) -> None:
        self.daemon = Daemon(settings)
        self.loop = uvloop.new_event_loop()
        #: Whatever reached the loop's exception handler (an exception escaping a callback or a protocol method).
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, context: self.loop_errors.append(context))
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzzed-daemon", daemon=True)

    def run(self, coro: Awaitable[T], timeout: float) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(_awaited(coro), self.loop)
        return future.result(timeout)

    @contextmanager
    def running(self) -> Iterator[Daemon]:
        self._thread.start()
        try:
            self.run(self.daemon.start(), 30)
            yield self.daemon
        finally:
            try:
                self.run(self.daemon.stop(), 60)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(30)
                self.loop.close()


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


async def settled(daemon: Daemon, healthy: HealthySession) -> str | None:
    """None once only the healthy session is connected (and nothing is pending); else what is left."""
    ctx = daemon.context
    deadline = asyncio.get_running_loop().time() + SETTLE_S
    while True:
        peers = sorted(conn.peer for conn in ctx.connections)
        budget = (ctx.budget.sessions, ctx.budget.pending)
        if peers == [healthy.peer] and budget == (1, 0):
            return None
        if asyncio.get_running_loop().time() > deadline:
            return f"connections {peers} (healthy: {healthy.peer}), (sessions, pending) = {budget}"
        await asyncio.sleep(0.01)


def own_memory(snapshot: tracemalloc.Snapshot) -> tuple[int, list[str]]:
    """Bytes still held by allocations the daemon's own code made (innermost frame under src/fpolicyd) while
    tracing, and the largest holders."""
    source = str(Path(fpolicyd.__file__).parent)
    stats = snapshot.filter_traces([tracemalloc.Filter(True, f"{source}/*")]).statistics("lineno")
    return sum(stat.size for stat in stats), [str(stat) for stat in stats[:8]]


def rss_bytes() -> int | None:
    """Resident set size of this process (Linux), None where /proc is not there."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.timeout(300)  # a passing run takes CAMPAIGN_S + ~10 s; a failing one also shrinks its example
def test_fuzz_the_whole_server_over_tcp(tmp_path: Path) -> None:
    corpus = Corpus.build()
    server = DaemonThread(
        make_settings(
            tmp_path,
            max_frame_bytes=FUZZ_MAX_FRAME_BYTES,
            handshake_timeout_s=2.0,  # a pending connection an attack left behind would show within SETTLE_S
            shutdown_read_grace_s=0.5,
            # Bounded structures small enough to be full by the end of the warm-up, so what grows after is a leak.
            replay_duplicate_window=512,
            replay_max_nodes=32,
        )
    )
    played = {"attacks": 0, "connections": 0, "bytes": 0, "closed_by_server": 0, "valid": 0}
    endings: dict[str, int] = {}
    watch = LogWatch()
    first_failure: list[str] = []
    memory: dict[str, Any] = {}

    def watch_memory() -> None:
        """After the warm-up: RSS baseline, trace allocations; TRACED attacks later: what is still held."""
        if played["attacks"] == WARM_UP:
            memory["rss_warm"] = rss_bytes()
            tracemalloc.start(1)
        elif played["attacks"] >= WARM_UP + TRACED:
            stop_tracing()

    def stop_tracing() -> None:
        if tracemalloc.is_tracing():
            memory["traced_attacks"] = played["attacks"] - WARM_UP
            memory["retained"], memory["holders"] = own_memory(tracemalloc.take_snapshot())
            tracemalloc.stop()

    with watch.installed(), server.running() as daemon:
        healthy = HealthySession(daemon.port)
        server.run(healthy.start(), 15)
        started = time.monotonic()

        @given(data=st.data())
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            phases=(Phase.generate, Phase.shrink),
            suppress_health_check=list(HealthCheck),
        )
        def attack_the_daemon(data: st.DataObject) -> None:
            attack: Attack = draw_attack(HypothesisDraw(data), corpus)
            if not first_failure and time.monotonic() - started > CAMPAIGN_S:
                stop_tracing()  # time-boxed inside the traced window: judge what was traced
                return  # time box: no new attacks played (a failure found in time is still shrunk)
            bad_mark, error_mark = len(watch.bad), len(server.loop_errors)
            try:
                outcome = server.run(play_attack(attack, daemon.port), ATTACK_TIMEOUT_S)
                left = server.run(settled(daemon, healthy), SETTLE_S + 5)
                assert left is None, f"the daemon kept connections after the attack: {left}"
                for script, result in zip(attack.scripts, outcome, strict=True):
                    assert not result.connect_failed, "the daemon stopped accepting"
                    if script.ending is Ending.HALF_CLOSE:
                        assert result.half_close_answered, "a half-closed connection was not closed by the daemon"
                assert healthy.healthy, f"the healthy session broke: {healthy.failure}"
                status, body = http_get(daemon.http_port or 0, "/readyz")
                assert status == 200, body
                assert not server.loop_errors[error_mark:], server.loop_errors[error_mark:]
                assert not watch.bad[bad_mark:], watch.bad[bad_mark:]
            except BaseException:
                if not first_failure:
                    first_failure.append(attack.describe())
                raise
            played["attacks"] += 1
            played["connections"] += len(attack.scripts)
            played["bytes"] += sum(result.sent for result in outcome)
            played["closed_by_server"] += sum(result.closed_by_server for result in outcome)
            played["valid"] += sum(script.valid for script in attack.scripts)
            for script in attack.scripts:
                endings[script.ending.value] = endings.get(script.ending.value, 0) + 1
            watch_memory()

        try:
            attack_the_daemon()
        except BaseException as exc:
            if first_failure:
                exc.add_note(f"first failing attack (before shrinking):\n{first_failure[0]}")
            raise
        finally:
            stop_tracing()
        campaign_s = time.monotonic() - started
        rss_end = rss_bytes()
        sent = server.run(healthy.stop_sending(), 10)
        ids = server.run(wait_delivered(tmp_path / "events", healthy.session_id, sent, within=20), 30)
        server.run(healthy.close(), 10)
        errors = dict(daemon.context.protocol_errors)
    rss_warm = memory.get("rss_warm")
    rss_growth = rss_end - rss_warm if rss_end is not None and rss_warm is not None else None
    print(
        f"\nfuzz: {played} in {campaign_s:.1f} s; endings {endings}; healthy session: {sent} events; "
        f"retained by the daemon's code from {memory.get('traced_attacks')} traced attacks: "
        f"{memory.get('retained', 0) / 1e3:.1f} kB; RSS growth after the warm-up: "
        f"{'n/a' if rss_growth is None else f'{rss_growth / 1e6:.1f} MB'}; "
        f"closes by reason {dict(sorted(errors.items()))}; log lines {watch.tally.top()}"
    )
    assert played["attacks"] >= WARM_UP + 10, "too few attacks to judge anything (a very loaded machine?)"
    wrong = exactly_once(ids, sent)
    assert sent > 0
    assert wrong is None, f"the healthy session's events: {wrong}"
    assert memory["retained"] < TRACED_RETAINED_BOUND, memory
    assert rss_growth is None or rss_growth < RSS_GROWTH_BOUND, (rss_warm, rss_end)
    # The campaign reached the decoder, not only the framer: frame-level and message-level errors both closed
    # connections.
    assert errors.get("bad_marker", 0) > 0
    assert sum(count for reason, count in errors.items() if reason not in ("bad_marker", "frame_too_large")) > 0
