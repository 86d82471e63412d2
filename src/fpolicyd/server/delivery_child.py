"""The delivery process of ``fpolicyd serve``: the daemon's sink workers, on a core of their own.

Started by the daemon (``server/delivery.py``) as ``python -m fpolicyd.server.delivery_child FD`` with one end of a
socketpair; everything it needs comes in the ``hello`` message. It builds the same senders the daemon would
(``sinks/factory.py``, plus the dedup ledger), reads the spool with a :class:`~fpolicyd.storage.spool.SpoolTail`
up to the durable seq the daemon announces, and reports acks and figures back. Not a command for operators.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from fpolicyd.config import Settings
from fpolicyd.errors import SinkError
from fpolicyd.obs.log import configure_logging, get_logger
from fpolicyd.pipeline.records import sink_selector
from fpolicyd.pipeline.redaction import Redactor
from fpolicyd.server.channel import Channel, Message, open_channel
from fpolicyd.server.runtime import tune_garbage_collector
from fpolicyd.sinks.aws.clients import AwsClients
from fpolicyd.sinks.dead_letter import DeadLetterWriter
from fpolicyd.sinks.factory import build_senders
from fpolicyd.sinks.runner import Sender, SinkWorker
from fpolicyd.storage.shard import Shard
from fpolicyd.storage.spool import ReadPosition, SpoolTail

log = get_logger("fpolicyd.delivery")

#: How long to wait for the daemon's hello before giving up (it is sent right after the process starts).
HELLO_TIMEOUT_S: Final = 60.0
#: How often every sink's figures go to the daemon (what /metrics and /readyz show lags by at most this).
STATS_INTERVAL_S: Final = 0.5


class DeliveryChild:
    def __init__(self) -> None:
        self._channel: Channel | None = None
        self._hello: asyncio.Future[Message] | None = None
        self._stop: asyncio.Future[float] | None = None
        self._tail: SpoolTail | None = None
        self._workers: list[SinkWorker] = []
        #: Per sink this process runs alone: the cumulative ack last sent.
        self._sent_acks: dict[str, int] = {}
        #: The sinks this process shares with the other delivery processes (acked as seq ranges).
        self._shared: tuple[str, ...] = ()
        self._acks_scheduled = False
        self._failed = False
        self._dead_letter: DeadLetterWriter | None = None

    async def run(self, sock: socket.socket) -> int:
        loop = asyncio.get_running_loop()
        self._hello = loop.create_future()
        self._stop = loop.create_future()
        self._channel = await open_channel(sock, self._on_message, self._on_closed)
        try:
            hello = await asyncio.wait_for(self._hello, HELLO_TIMEOUT_S)
        except (TimeoutError, ConnectionError):
            return 1
        settings = Settings.model_validate(hello["settings"])
        redactor: Redactor = settings.redactor()
        configure_logging(settings.log_level, settings.log_format.value, redactor=redactor)
        tune_garbage_collector(settings.gc_young_threshold)  # the daemon's GC policy, here too
        clients = AwsClients(
            region_name=settings.aws_region,
            max_pool_connections=max(10, settings.sink_max_in_flight * 2),
            data_path=settings.aws_data_path,
        )
        dead_letter = DeadLetterWriter(settings.dead_letter_file, limits=settings.dead_letter_limits())
        self._dead_letter = dead_letter
        senders: list[Sender] = list(build_senders(settings.sink_options(), clients, dead_letter, hello["uris"]))
        shard = hello.get("shard") or {"index": 0, "count": 1}
        senders, shards = shares(senders, int(shard["index"]), int(shard["count"]))
        self._shared = tuple(shards)
        selectors: dict[str, Callable[[bytes], bytes | None]] = {
            sender.name: sink_selector(sender.name, processing=bool(hello["processing"])) for sender in senders
        }
        positions: dict[str, tuple[int, ReadPosition]] = {}
        for sender in senders:
            pos = hello["positions"][sender.name]
            positions[sender.name] = (
                int(pos["acked"]),
                ReadPosition(int(pos["segment"]), int(pos["offset"]), int(pos["next"])),
            )
            if sender.name not in shards:
                self._sent_acks[sender.name] = int(pos["acked"])
        tail = SpoolTail(Path(hello["spool_dir"]), positions, int(hello["durable"]), shards=shards)
        self._tail = tail
        try:
            return await self._deliver(senders, selectors, tail, settings.slo_ingestion_latency_s)
        finally:
            tail.close()
            await clients.close()
            dead_letter.close()

    async def _deliver(
        self,
        senders: list[Sender],
        selectors: dict[str, Callable[[bytes], bytes | None]],
        tail: SpoolTail,
        slo_s: float,
    ) -> int:
        channel = self._channel
        stop = self._stop
        assert channel is not None
        assert stop is not None
        workers: list[SinkWorker] = []
        for sender in senders:
            worker = SinkWorker(
                sender,
                tail,
                on_ack=self._schedule_acks,
                select=selectors.get(sender.name),
                ingestion_slo_s=slo_s,
            )
            try:
                await sender.start()
            except SinkError as exc:
                if not exc.retriable:
                    channel.send({"t": "start_failed", "error": str(exc)})
                    return 2
                log.error("sink_unavailable_at_start", sink=sender.name, error=str(exc), detail="events are spooled")
                worker.last_error = exc
            workers.append(worker)
        self._workers = workers
        for worker in workers:
            worker.start().add_done_callback(self._watch)
        # With every sink's figures: one that could not be reached at start is not ready from the first moment.
        channel.send({"t": "ready", "sinks": self._figures(), "dead_letter": self._dead_letter_figures()})
        ticker = asyncio.create_task(self._stats_loop())
        try:
            timeout_s = await stop
        except ConnectionError:
            # The daemon is gone (killed, or its channel closed): nothing can be acked any more; stop at once.
            for worker in workers:
                await worker.stop(0.0)
            return 1
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
        deadline = asyncio.get_running_loop().time() + timeout_s
        for worker in workers:
            await worker.stop(max(0.0, deadline - asyncio.get_running_loop().time()))
        self._send_acks()
        channel.send({"t": "stopped", "sinks": self._figures(), "dead_letter": self._dead_letter_figures()})
        return 1 if self._failed else 0

    def _watch(self, task: asyncio.Task[None]) -> None:
        """A sink worker that died of an unexpected error: the daemon stops (its events stay in the spool)."""
        if task.cancelled() or task.exception() is None or self._failed:
            return
        self._failed = True
        exc = task.exception()
        log.critical(
            "task_failed", task=task.get_name(), error=repr(exc), detail="stopping; its events stay in the spool"
        )
        if self._channel is not None:
            self._channel.send({"t": "fatal", "error": f"{task.get_name()}: {exc!r}"})

    async def _stats_loop(self) -> None:
        channel = self._channel
        assert channel is not None
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            channel.send({"t": "stats", "sinks": self._figures(), "dead_letter": self._dead_letter_figures()})

    def _figures(self) -> list[dict[str, Any]]:
        return [worker.figures().to_dict() for worker in self._workers]

    def _dead_letter_figures(self) -> dict[str, Any] | None:
        """This process's dead-letter counts (the daemon adds them to its own for /metrics)."""
        return None if self._dead_letter is None else self._dead_letter.figures().to_dict()

    def _schedule_acks(self) -> None:
        if not self._acks_scheduled:
            self._acks_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_acks)

    def _send_acks(self) -> None:
        self._acks_scheduled = False
        tail, channel = self._tail, self._channel
        if tail is None or channel is None:
            return
        for name, sent in self._sent_acks.items():
            acked = tail.acked_seq(name)
            if acked > sent:
                self._sent_acks[name] = acked
                channel.send({"t": "ack", "sink": name, "seq": acked})
        for name in self._shared:
            ranges = tail.take_delivered(name)
            if ranges:
                channel.send({"t": "acked", "sink": name, "ranges": ranges})

    def _on_message(self, message: Message) -> None:
        kind = message.get("t")
        if kind == "hello" and self._hello is not None and not self._hello.done():
            self._hello.set_result(message)
        elif kind == "durable":
            if self._tail is not None:
                self._tail.advance(int(message["seq"]))
                for worker in self._workers:
                    worker.wake()
        elif kind == "stop":
            if self._stop is not None and not self._stop.done():
                self._stop.set_result(float(message.get("timeout_s", 0.0)))
        else:
            log.error("delivery_message_unknown", kind=kind)

    def _on_closed(self, exc: Exception | None) -> None:
        gone = ConnectionError(f"the daemon's channel closed: {exc}")
        for future in (self._hello, self._stop):
            if future is not None and not future.done():
                future.set_exception(gone)


def shares(senders: list[Sender], index: int, count: int) -> tuple[list[Sender], dict[str, Shard]]:
    """What delivery process ``index`` of ``count`` runs: the senders, and the shard of each sink it shares with
    the others. A sink that keeps no order (``max_in_flight`` > 1) is shared by all of them, by blocks of one read
    (``max_records``: every process builds the same senders from the same settings, so the blocks agree); a sink
    that keeps order runs in process 0 alone, unshared."""
    if not 0 <= index < count:
        raise ValueError(f"delivery process {index} of {count}")
    if count == 1:
        return senders, {}
    run = [sender for sender in senders if index == 0 or sender.max_in_flight > 1]
    shards = {sender.name: Shard(index, count, sender.max_records) for sender in run if sender.max_in_flight > 1}
    return run, shards


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m fpolicyd.server.delivery_child FD (started by fpolicyd serve)", file=sys.stderr)
        return 2
    # The daemon decides when delivery stops (it drains within its budget); a stop signal sent to the whole
    # process group (systemd, a terminal's Ctrl-C) must not cut delivery short. The daemon's exit ends us too.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[0]))
    try:
        import uvloop  # noqa: PLC0415 - optional at import time, as in app.run_daemon
    except ImportError:  # pragma: no cover - a declared dependency on every supported platform
        return asyncio.run(DeliveryChild().run(sock))
    started = time.monotonic()
    code = uvloop.run(DeliveryChild().run(sock))
    with contextlib.suppress(Exception):
        log.info("delivery_process_stopped", code=code, ran_s=round(time.monotonic() - started, 3))
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
