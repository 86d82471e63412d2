"""Sink URIs → senders. One place that knows every scheme."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from fpolicyd.config import Settings
from fpolicyd.errors import ConfigError
from fpolicyd.sinks.aws import AwsClients, DeadLetterWriter, EventBridgeTarget, SqsTarget
from fpolicyd.sinks.cloud import AwsSender
from fpolicyd.sinks.jsonl import JsonlSettings
from fpolicyd.sinks.local import JsonlSender, StdoutSender
from fpolicyd.sinks.runner import RetryPolicy, Sender

#: Backoff of cloud sends: 0.1 s doubling to 20 s, full jitter (AWS's recommended shape).
AWS_RETRY = RetryPolicy(base_s=0.1, cap_s=20.0)


def build_senders(
    settings: Settings, clients: AwsClients, dead_letter: DeadLetterWriter, uris: Sequence[str] | None = None
) -> list[Sender]:
    """One sender per URI, in order (default: the settings' sinks)."""
    senders: list[Sender] = []
    for uri in settings.effective_sinks if uris is None else uris:
        scheme, _, target = uri.partition(":")
        if not target and scheme != "stdout":
            raise ConfigError(f"sink {uri!r}: {scheme} needs a target, e.g. {scheme}:{_EXAMPLES[scheme]}")
        if scheme == "jsonl":
            jsonl = JsonlSettings(
                directory=Path(os.path.expanduser(target)),
                max_file_bytes=settings.jsonl_max_file_bytes,
                max_file_age_s=settings.jsonl_max_file_age_s,
                fsync=settings.jsonl_fsync,
                fsync_interval_s=settings.jsonl_fsync_interval_s,
            )
            senders.append(JsonlSender(jsonl, max_bytes=settings.batch_max_bytes))
        elif scheme == "stdout":
            senders.append(StdoutSender())
        elif scheme == "sqs":
            sqs = SqsTarget(
                queue_url=target,
                group_id_field=settings.sqs_group_id_field,
                max_batch_bytes=settings.sqs_max_batch_bytes,
                pack_bytes=settings.sqs_pack_bytes,
                pack_compression=settings.sqs_pack_compression,
            )
            senders.append(_aws_sender(sqs, settings, clients, dead_letter))
        elif scheme == "eventbridge":
            bus = EventBridgeTarget(
                bus_name=target,
                source=settings.eventbridge_source,
                detail_type=settings.eventbridge_detail_type,
                max_batch_bytes=settings.eventbridge_max_batch_bytes,
                max_entry_bytes=settings.eventbridge_max_entry_bytes,
            )
            senders.append(_aws_sender(bus, settings, clients, dead_letter))
        else:
            raise ConfigError(f"sink {uri!r}: unknown scheme {scheme!r}")
    names = [sender.name for sender in senders]
    if len(set(names)) != len(names):
        raise ConfigError(f"sinks: the same sink is configured twice: {names}")
    return senders


def _aws_sender(
    target: SqsTarget | EventBridgeTarget, settings: Settings, clients: AwsClients, dead_letter: DeadLetterWriter
) -> AwsSender:
    return AwsSender(
        target,
        clients,
        dead_letter,
        max_in_flight=settings.sink_max_in_flight,
        retry=AWS_RETRY,
        linger_s=settings.sink_linger_s,
    )


_EXAMPLES = {
    "jsonl": "/var/log/fpolicy",
    "sqs": "https://sqs.eu-west-1.amazonaws.com/123456789012/fpolicy-events",
    "eventbridge": "fsxn-fpolicy-events",
}
