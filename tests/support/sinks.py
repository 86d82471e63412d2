"""A sink (``Sender``) that keeps what it is sent, for tests that drive an ``Spooler`` directly."""

from __future__ import annotations

from collections.abc import Sequence

from fpolicyd.pipeline.records import Record


class Collect:
    """Settles every record at once and keeps its payload, in order."""

    name = "collect"
    max_bytes = 1 << 20
    max_in_flight = 1
    linger_s = 0.0

    def __init__(self, max_records: int = 100) -> None:
        self.max_records = max_records
        self.linger_records = max_records
        self.payloads: list[bytes] = []

    async def start(self) -> None:
        return None

    async def send(self, records: Sequence[Record]) -> Sequence[Record]:
        self.payloads.extend(r.payload for r in records)
        return ()

    async def close(self) -> None:
        return None
