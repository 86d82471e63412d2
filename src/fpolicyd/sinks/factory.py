"""Sink URIs → senders. One place that knows every scheme."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fpolicyd.errors import ConfigError
from fpolicyd.sinks.aws.clients import AwsClients
from fpolicyd.sinks.aws.sender import AWS_RETRY, AwsSender
from fpolicyd.sinks.aws.targets import EventBridgeTarget, SqsTarget
from fpolicyd.sinks.dead_letter import DeadLetterWriter
from fpolicyd.sinks.jsonl import FsyncPolicy, JsonlSettings
from fpolicyd.sinks.local import JsonlSender, StdoutSender
from fpolicyd.sinks.runner import Sender
from fpolicyd.sinks.sqs_envelope import PackCompression


@dataclass(frozen=True, slots=True)
class SinkOptions:
    """What the senders take of the settings (:meth:`fpolicyd.config.Settings.sink_options`): the default sink
    URIs and the ``jsonl_*``, ``sqs_*``, ``eventbridge_*`` and ``sink_*`` values, named as the settings are."""

    sinks: tuple[str, ...]
    batch_max_bytes: int
    jsonl_max_file_bytes: int
    jsonl_max_file_age_s: float
    jsonl_fsync: FsyncPolicy
    jsonl_fsync_interval_s: float
    sqs_group_id_field: str
    sqs_max_batch_bytes: int
    sqs_pack_bytes: int
    sqs_pack_compression: PackCompression
    eventbridge_source: str
    eventbridge_detail_type: str
    eventbridge_max_batch_bytes: int
    eventbridge_max_entry_bytes: int
    sink_max_in_flight: int
    sink_linger_s: float


def build_senders(
    options: SinkOptions, clients: AwsClients, dead_letter: DeadLetterWriter, uris: Sequence[str] | None = None
) -> list[Sender]:
    """One sender per URI, in order (default: ``options.sinks``)."""
    senders: list[Sender] = []
    for uri in options.sinks if uris is None else uris:
        scheme, _, target = uri.partition(":")
        if not target and scheme != "stdout":
            raise ConfigError(f"sink {uri!r}: {scheme} needs a target, e.g. {scheme}:{_EXAMPLES[scheme]}")
        if scheme == "jsonl":
            jsonl = JsonlSettings(
                directory=Path(os.path.expanduser(target)),
                max_file_bytes=options.jsonl_max_file_bytes,
                max_file_age_s=options.jsonl_max_file_age_s,
                fsync=options.jsonl_fsync,
                fsync_interval_s=options.jsonl_fsync_interval_s,
            )
            senders.append(JsonlSender(jsonl, max_bytes=options.batch_max_bytes))
        elif scheme == "stdout":
            senders.append(StdoutSender())
        elif scheme == "sqs":
            sqs = SqsTarget(
                queue_url=target,
                group_id_field=options.sqs_group_id_field,
                max_batch_bytes=options.sqs_max_batch_bytes,
                pack_bytes=options.sqs_pack_bytes,
                pack_compression=options.sqs_pack_compression,
            )
            senders.append(_aws_sender(sqs, options, clients, dead_letter))
        elif scheme == "eventbridge":
            bus = EventBridgeTarget(
                bus_name=target,
                source=options.eventbridge_source,
                detail_type=options.eventbridge_detail_type,
                max_batch_bytes=options.eventbridge_max_batch_bytes,
                max_entry_bytes=options.eventbridge_max_entry_bytes,
            )
            senders.append(_aws_sender(bus, options, clients, dead_letter))
        else:
            raise ConfigError(f"sink {uri!r}: unknown scheme {scheme!r}")
    names = [sender.name for sender in senders]
    if len(set(names)) != len(names):
        raise ConfigError(f"sinks: the same sink is configured twice: {names}")
    return senders


def _aws_sender(
    target: SqsTarget | EventBridgeTarget, options: SinkOptions, clients: AwsClients, dead_letter: DeadLetterWriter
) -> AwsSender:
    return AwsSender(
        target,
        clients,
        dead_letter,
        max_in_flight=options.sink_max_in_flight,
        retry=AWS_RETRY,
        linger_s=options.sink_linger_s,
    )


_EXAMPLES = {
    "jsonl": "/var/log/fpolicy",
    "sqs": "https://sqs.eu-west-1.amazonaws.com/123456789012/fpolicy-events",
    "eventbridge": "fsxn-fpolicy-events",
}
