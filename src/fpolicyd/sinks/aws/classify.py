"""Failures → what to do next: a whole-call exception (:func:`error_kind`, :func:`classify_exception`) or a
response's entries (:func:`classify_sqs` / :func:`classify_eventbridge` → :class:`Outcome`). Pure.

What "failed" means, in four kinds (one per bucket of :class:`Outcome`):

- *retry*: transient (throttling, 5xx, InternalFailure, connection errors): re-send only those entries after a
  capped, fully jittered backoff;
- *dead*: the service rejected this entry for its content and will again (SQS ``SenderFault=true``, EventBridge
  ``MalformedDetail``/``InvalidArgument``): hand it to the dead-letter callback with the reason;
- *blocked*: the sink itself is unusable (access denied, queue/bus or KMS key missing): nothing about the entry
  is wrong, so it is **not** dead-lettered; :func:`fpolicyd.sinks.aws.deliver.deliver` stops and returns it as
  pending with a non-retriable :class:`SinkError` so the events stay in the spool until an operator fixes the
  sink;
- a whole request refused for its content (``ValidationException``, ``BatchRequestTooLong``...) is split into
  single-entry requests so that only the offending entry is dead-lettered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from aiohttp import ClientError as AiohttpClientError
from botocore import exceptions as bx
from botocore.exceptions import ClientError

from fpolicyd.sinks.aws.encode import Batch, Entry

__all__ = [
    "ErrorKind",
    "Outcome",
    "classify_eventbridge",
    "classify_exception",
    "classify_sqs",
    "describe",
    "error_kind",
    "normal_code",
]


class ErrorKind(StrEnum):
    """What a failure says about what to do next (see the module docstring)."""

    RETRY = "retry"  # transient: send again later
    REQUEST = "request"  # this request's content was refused: isolate and dead-letter the culprit
    SINK = "sink"  # the sink is unusable (auth, missing queue/bus): keep the events, report, stop


# Throttling and transient codes: botocore's standard retry mode lists (botocore/retries/standard.py) plus the
# SQS, KMS and EventBridge codes documented as retryable.
_RETRY_CODES: Final = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "InternalFailure",
        "InternalServerError",
        "InternalServiceError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "KmsThrottled",
        "KMS.ThrottlingException",
        # botocore refreshes temporary credentials; the next attempt signs with fresh ones.
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
        "RequestTimeTooSkewed",
    }
)
# Errors about the sink, not the entry: no resend of the same request will work until someone fixes the set-up,
# and dead-lettering would only empty the spool into a file.
_SINK_CODES: Final = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "NonExistentQueue",
        "QueueDoesNotExist",
        "ResourceNotFoundException",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSecurity",
        "SignatureDoesNotMatch",
        "MissingAuthenticationToken",
        "IncompleteSignature",
        "OptInRequired",
        "NotAuthorized",
        "KmsAccessDenied",
        "KmsDisabled",
        "KmsNotFound",
        "KmsInvalidState",
        "KmsOptInRequired",
        "KmsInvalidKeyUsage",
        "NotAuthorizedForSourceException",
        "NotAuthorizedForDetailTypeException",
        "InvalidAccountIdException",
        "UnsupportedOperation",
    }
)
_SQS_CODE_PREFIX: Final = "AWS.SimpleQueueService."


def normal_code(code: object) -> str:
    """A service error code without the SQS ``AWS.SimpleQueueService.`` prefix."""
    text = str(code or "")
    return text.removeprefix(_SQS_CODE_PREFIX)


def _client_error_kind(response: Mapping[str, Any]) -> ErrorKind:
    error = response.get("Error") or {}
    code = normal_code(error.get("Code"))
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    if code in _RETRY_CODES:
        return ErrorKind.RETRY
    if code in _SINK_CODES:
        return ErrorKind.SINK
    if isinstance(status, int) and (status >= 500 or status == 429):
        return ErrorKind.RETRY
    if status in (401, 403):
        return ErrorKind.SINK
    return ErrorKind.REQUEST


def error_kind(exc: BaseException) -> ErrorKind:
    """Classify an exception raised by one SQS/EventBridge call.

    botocore ``ClientError``: throttling/transient codes, HTTP 5xx and 429 → RETRY; access and missing-resource
    codes (AccessDenied, NonExistentQueue, ResourceNotFoundException, KMS key problems...) → SINK; any other
    4xx (ValidationException, InvalidParameterValue, BatchRequestTooLong, ...) → REQUEST. Transport failures
    (botocore's ConnectionError/HTTPClientError family: EndpointConnectionError, ConnectionClosedError,
    ReadTimeoutError, ...), aiohttp errors, timeouts and ``OSError`` → RETRY. Credential look-up failures:
    ``CredentialRetrievalError`` → RETRY (a metadata endpoint hiccup), ``NoCredentialsError``/``NoRegionError``
    → SINK. ``ParamValidationError`` (botocore refused the request before sending) → REQUEST. Anything else is
    not an AWS failure: SINK, so that :func:`deliver` stops and keeps the events rather than guessing.
    """
    if isinstance(exc, bx.ClientError):
        return _client_error_kind(exc.response)
    if isinstance(exc, bx.ConnectionError | bx.HTTPClientError | bx.CredentialRetrievalError):
        return ErrorKind.RETRY
    if isinstance(exc, bx.ParamValidationError):
        return ErrorKind.REQUEST
    if isinstance(exc, bx.NoCredentialsError | bx.NoRegionError | bx.PartialCredentialsError):
        return ErrorKind.SINK
    if isinstance(exc, AiohttpClientError | TimeoutError | OSError):
        return ErrorKind.RETRY
    return ErrorKind.SINK


def classify_exception(exc: BaseException) -> bool:
    """Whether a whole-call failure is worth retrying (see :func:`error_kind`)."""
    return error_kind(exc) is ErrorKind.RETRY


def describe(exc: BaseException) -> str:
    """The reason a failed call gives: ``Code: Message (HTTP status)`` for a service error, else the exception."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error") or {}
        status = (exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return f"{error.get('Code', 'Unknown')}: {error.get('Message', '')} (HTTP {status})"
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one request went, entry by entry. Every entry of the request is in exactly one bucket; each failure
    carries its reason (service code and message)."""

    succeeded: tuple[Entry, ...] = ()
    retry: tuple[tuple[Entry, str], ...] = ()
    dead: tuple[tuple[Entry, str], ...] = ()
    blocked: tuple[tuple[Entry, str], ...] = ()


def _entry_failure(code: str, message: str) -> str:
    return f"{code}: {message}" if message else code


def classify_sqs(response: Mapping[str, Any], batch: Batch) -> Outcome:
    """SendMessageBatch response → :class:`Outcome`, matched by entry Id.

    ``Successful[]`` → succeeded. ``Failed[]``: a retryable code (throttling, internal errors) or
    ``SenderFault=false`` → retry; a sink-level code (KMS key or access problems) → blocked; any other
    ``SenderFault=true`` → dead with ``"Code: Message"``. An entry in neither list → retry (defensive: the
    service did not say, so send it again; at-least-once).
    """
    by_id = {str(e.request["Id"]): e for e in batch.entries}
    settled: set[str] = set()
    succeeded: list[Entry] = []
    retry: list[tuple[Entry, str]] = []
    dead: list[tuple[Entry, str]] = []
    blocked: list[tuple[Entry, str]] = []
    for ok in response.get("Successful") or ():
        entry_id = str(ok.get("Id"))
        entry = by_id.get(entry_id)
        if entry is not None and entry_id not in settled:
            settled.add(entry_id)
            succeeded.append(entry)
    for failed in response.get("Failed") or ():
        entry_id = str(failed.get("Id"))
        entry = by_id.get(entry_id)
        if entry is None or entry_id in settled:
            continue
        settled.add(entry_id)
        code = normal_code(failed.get("Code"))
        reason = _entry_failure(code or "Unknown", str(failed.get("Message") or ""))
        if code in _RETRY_CODES or not failed.get("SenderFault", False):
            retry.append((entry, reason))
        elif code in _SINK_CODES:
            blocked.append((entry, reason))
        else:
            dead.append((entry, reason))
    for entry_id, entry in by_id.items():
        if entry_id not in settled:
            retry.append((entry, "missing from the SendMessageBatch response"))
    return Outcome(tuple(succeeded), tuple(retry), tuple(dead), tuple(blocked))


def classify_eventbridge(response: Mapping[str, Any], batch: Batch) -> Outcome:
    """PutEvents response → :class:`Outcome`. ``Entries[i]`` answers request entry ``i`` (EventBridge: "the
    response Entries array always includes the same number of entries as the request array").

    ``EventId`` without ``ErrorCode`` → succeeded; ``InternalFailure``/``ThrottlingException`` (the documented
    retryable codes) → retry; access codes (``AccessDeniedException``, ``NotAuthorizedForSourceException``,
    ``NotAuthorizedForDetailTypeException``, ``InvalidAccountIdException``) → blocked; any other code
    (``InvalidArgument``, ``MalformedDetail``, ...) → dead. A response whose length does not match the request
    cannot be aligned: every entry is retried (duplicates are possible; loss is not).
    """
    results = list(response.get("Entries") or ())
    if len(results) != len(batch.entries):
        reason = f"PutEvents answered {len(results)} entries for {len(batch.entries)} sent"
        return Outcome(retry=tuple((e, reason) for e in batch.entries))
    succeeded: list[Entry] = []
    retry: list[tuple[Entry, str]] = []
    dead: list[tuple[Entry, str]] = []
    blocked: list[tuple[Entry, str]] = []
    for entry, result in zip(batch.entries, results, strict=True):
        code = str(result.get("ErrorCode") or "")
        if not code:
            if result.get("EventId"):
                succeeded.append(entry)
            else:
                retry.append((entry, "neither EventId nor ErrorCode in the PutEvents response"))
            continue
        reason = _entry_failure(code, str(result.get("ErrorMessage") or ""))
        if code in _RETRY_CODES:
            retry.append((entry, reason))
        elif code in _SINK_CODES:
            blocked.append((entry, reason))
        else:
            dead.append((entry, reason))
    return Outcome(tuple(succeeded), tuple(retry), tuple(dead), tuple(blocked))
