"""Where events go: the SQS and EventBridge targets, their limits and validation, and how data-path calls are
sent (:class:`AwsDataPath`).

Pure (no botocore): :mod:`fpolicyd.config` imports this module to validate the settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from fpolicyd.sinks.sqs_envelope import PackCompression

__all__ = [
    "DEFAULT_EVENTBRIDGE_DETAIL_TYPE",
    "DEFAULT_EVENTBRIDGE_SOURCE",
    "KIB",
    "MAX_BATCH_ENTRIES",
    "MIB",
    "PACK_GZIP_LEVEL",
    "AwsDataPath",
    "AwsTarget",
    "EventBridgeTarget",
    "SqsTarget",
]

KIB: Final = 1024
MIB: Final = 1024 * 1024
#: SendMessageBatch and PutEvents both take at most 10 entries per request.
MAX_BATCH_ENTRIES: Final = 10
DEFAULT_EVENTBRIDGE_SOURCE: Final = "fsxn.fpolicy"
DEFAULT_EVENTBRIDGE_DETAIL_TYPE: Final = "FPolicy File Operation"
#: gzip level (zlib's scale) of packed SQS messages; 1 is compressed by ISA-L (``encode.gzip_compress``). Measured
#: on simulator events (benchmarks/bench_sqs_pack.py): level 1 gives ~0.00245 billed requests per event for ~4 µs
#: of encoding per event; zlib's level 6 ~0.00195 for ~10 µs more. Both are far under the 0.01 goal, so the CPU
#: decides.
PACK_GZIP_LEVEL: Final = 1


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: must be a positive number of bytes, got {value!r}")


def _entries_limit(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BATCH_ENTRIES:
        raise ValueError(f"max_entries: must be 1..{MAX_BATCH_ENTRIES}, got {value!r}")


@dataclass(frozen=True, slots=True)
class SqsTarget:
    """``sqs:QUEUE_URL``. FIFO is derived from the URL (AWS requires FIFO queue names to end in ``.fifo``).

    ``group_id_field``: the event field whose value is a FIFO message's MessageGroupId (a dotted path such as
    ``metadata.vs_uuid`` reaches into objects); missing or empty falls back to ``svm_name``. Ordering is per
    group, so the default keeps one SVM's events in order while SVMs proceed in parallel.

    ``pack_bytes``: 0 = one event per message; otherwise several events go into one packed message (see
    :mod:`fpolicyd.sinks.sqs_envelope`) of at most :attr:`pack_limit` bytes, its array carried as
    ``pack_compression`` says, gzip at ``pack_gzip_level``.
    """

    queue_url: str
    group_id_field: str = "svm_name"
    max_batch_bytes: int = MIB
    max_message_bytes: int = MIB
    max_entries: int = MAX_BATCH_ENTRIES
    pack_bytes: int = 0
    pack_compression: PackCompression = PackCompression.GZIP
    pack_gzip_level: int = PACK_GZIP_LEVEL

    def __post_init__(self) -> None:
        if not self.queue_url or not self.queue_url.strip():
            raise ValueError("queue_url: must not be empty")
        if not self.group_id_field or any(not part for part in self.group_id_field.split(".")):
            raise ValueError(f"group_id_field: expected a field name or dotted path, got {self.group_id_field!r}")
        _positive("max_batch_bytes", self.max_batch_bytes)
        _positive("max_message_bytes", self.max_message_bytes)
        _entries_limit(self.max_entries)
        if self.pack_bytes:
            _positive("pack_bytes", self.pack_bytes)
        if not isinstance(self.pack_compression, PackCompression):
            raise ValueError(f"pack_compression: expected one of {[c.value for c in PackCompression]}")
        if not 1 <= self.pack_gzip_level <= 9:  # zlib's levels
            raise ValueError(f"pack_gzip_level: must be 1..9, got {self.pack_gzip_level!r}")

    @property
    def fifo(self) -> bool:
        return self.queue_url.endswith(".fifo")

    @property
    def name(self) -> str:
        return f"sqs:{self.queue_url}"

    @property
    def entry_limit(self) -> int:
        """The largest entry that can be sent: one message alone must also fit a batch."""
        return min(self.max_message_bytes, self.max_batch_bytes)

    @property
    def packing(self) -> bool:
        return self.pack_bytes > 0

    @property
    def pack_limit(self) -> int:
        """The largest packed message: ``pack_bytes``, within what any message may be."""
        return min(self.pack_bytes, self.entry_limit)


@dataclass(frozen=True, slots=True)
class EventBridgeTarget:
    """``eventbridge:BUS`` (a bus name or ARN). Source and detail-type default to the reference pipeline's, which
    its rules match on. ``max_entry_bytes`` defaults to 256 KiB, the limit every region had until 2026 (AWS has
    since raised event buses to 1 MiB; raise it when all your buses and their targets take that)."""

    bus_name: str
    source: str = DEFAULT_EVENTBRIDGE_SOURCE
    detail_type: str = DEFAULT_EVENTBRIDGE_DETAIL_TYPE
    max_batch_bytes: int = MIB
    max_entry_bytes: int = 256 * KIB
    max_entries: int = MAX_BATCH_ENTRIES
    #: Set the entry's Time from the event's timestamp (EventBridge keeps whole seconds; ``detail`` keeps µs).
    use_event_time: bool = True

    def __post_init__(self) -> None:
        if not self.bus_name or not self.bus_name.strip():
            raise ValueError("bus_name: must not be empty")
        # PutEventsRequestEntry: Source 1..256 chars, not "aws."-prefixed; DetailType 1..128 chars.
        if not 1 <= len(self.source) <= 256 or self.source.startswith("aws."):
            raise ValueError(f"source: must be 1-256 characters and not start with 'aws.', got {self.source!r}")
        if not 1 <= len(self.detail_type) <= 128:
            raise ValueError(f"detail_type: must be 1-128 characters, got {self.detail_type!r}")
        _positive("max_batch_bytes", self.max_batch_bytes)
        _positive("max_entry_bytes", self.max_entry_bytes)
        _entries_limit(self.max_entries)

    @property
    def name(self) -> str:
        return f"eventbridge:{self.bus_name}"

    @property
    def entry_limit(self) -> int:
        """The largest entry that can be sent: one entry alone must also fit a batch."""
        return min(self.max_entry_bytes, self.max_batch_bytes)


AwsTarget = SqsTarget | EventBridgeTarget


class AwsDataPath(StrEnum):
    """How SQS SendMessageBatch / EventBridge PutEvents are sent: ``lean`` (fpolicyd.sinks.aws.transport: the
    SDK's endpoint, credentials and signer, without its per-call machinery) or ``sdk`` (aiobotocore for them
    too). Control calls (health checks, DynamoDB) always use aiobotocore."""

    LEAN = "lean"
    SDK = "sdk"
