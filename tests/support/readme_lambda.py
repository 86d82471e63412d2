"""The README's Lambda consumer of packed SQS messages, loaded from the README itself (so that the documented
code is the tested code), and SQS messages in the shape an SQS-triggered Lambda function receives them."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- lambda-consumer:"
_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)

LambdaHandler = Callable[[dict[str, Any], object], dict[str, Any]]


def lambda_consumer_source() -> str:
    """The first ```python block after the lambda-consumer marker in README.md."""
    text = README.read_text(encoding="utf-8")
    at = text.index(MARKER)
    found = _BLOCK.search(text, at)
    if found is None:
        raise AssertionError("README.md: no python block after the lambda-consumer marker")
    return found.group(1)


def load_lambda_consumer(on_event: Callable[[dict[str, Any]], None]) -> LambdaHandler:
    """The README's ``lambda_handler``, with its ``handle_event`` (the user's code) replaced by ``on_event``."""
    namespace: dict[str, Any] = {"__name__": "readme_lambda_consumer"}
    code = compile(lambda_consumer_source(), f"{README}:lambda-consumer", "exec")
    exec(code, namespace)  # the README's own documented code is what is under test
    namespace["handle_event"] = on_event
    handler: LambdaHandler = namespace["lambda_handler"]
    return handler


def lambda_record(
    message_id: str, body: str, attributes: Mapping[str, Mapping[str, str]], *, queue_arn: str
) -> dict[str, Any]:
    """One element of an SQS event's ``Records``, as Lambda builds it from a message (``attributes`` in the SQS
    API's form, ``{"DataType": ..., "StringValue": ...}``)."""
    return {
        "messageId": message_id,
        "receiptHandle": f"handle-{message_id}",
        "body": body,
        "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "1714557600000"},
        "messageAttributes": {
            name: {
                "stringValue": value["StringValue"],
                "stringListValues": [],
                "binaryListValues": [],
                "dataType": value["DataType"],
            }
            for name, value in attributes.items()
        },
        "md5OfBody": hashlib.md5(body.encode(), usedforsecurity=False).hexdigest(),
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": "us-east-1",
    }


def record_of_received(message: Mapping[str, Any], *, queue_arn: str) -> dict[str, Any]:
    """A ReceiveMessage message as a Lambda record."""
    return lambda_record(
        str(message["MessageId"]), str(message["Body"]), message.get("MessageAttributes") or {}, queue_arn=queue_arn
    )
