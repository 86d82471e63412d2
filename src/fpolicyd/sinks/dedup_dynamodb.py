"""The dedup store on DynamoDB: several fpolicyd instances share one claim table.

One conditional ``PutItem`` per request (BatchWriteItem cannot carry conditions; TransactWriteItems would fail a
whole batch for one duplicate), at most ``max_in_flight`` at a time; requests with the same key are sent one
after the other in batch order, so the earlier spool record wins, as in the embedded store. The condition is the
``write`` side of :func:`fpolicyd.pipeline.dedup.judge`::

    attribute_not_exists(pk) OR #ttl <= :now OR claimant = :claimant OR expires_at <= :at

``#ttl <= :now`` accepts a claim whose retention has passed but which DynamoDB's TTL sweeper has not deleted yet
(it lags by up to days); ``claimant = :claimant`` is our own earlier claim for the same spool record;
``:at`` is ``now`` in exact mode and the event's time in window mode. ``ConditionalCheckFailedException`` comes
with the current item (``ReturnValuesOnConditionCheckFailure=ALL_OLD``; a ``GetItem`` if a service does not
return it), which :func:`judge` turns into ``duplicate`` with its first-seen id (or, in window mode, ``first``
without a write for a late event a window or more before the claim).

Item: ``pk``, ``sk`` (strings: the table's hash and range keys), ``event_id`` (first seen), ``claimant``,
``event_time``, ``expires_at`` (numbers, epoch seconds), ``ttl`` (whole epoch seconds, rounded up: the table's
TTL attribute).

Failures: throttling (``ProvisionedThroughputExceededException`` and the other throttling codes), 5xx and
connection errors are retried (``retries`` times, capped full-jitter backoff); then, or at once for a
non-retriable error (access denied, missing table), the request gets ``error_open`` or ``error_closed`` per
``failure_mode``. Once one request of a batch has failed that way, the store is taken as down for the rest of
the batch: the requests not answered yet get the failure mode's decision without being sent (a table that
throttled one request through all its retries is not hammered with the other thousand, and a fail-open batch
against an endpoint that does not answer costs one request's retries, not every request's connect timeouts);
the next batch tries again. Counters (plain ints): ``checks``, ``duplicates``, ``errors``, ``fail_open``,
``fail_closed``, ``retries_done``, ``throttled`` (throttling answers), ``short_circuited`` (requests not sent
because the store was down), ``unjudgeable``; ``last_failure`` says what the last failed request met.

A request DynamoDB refuses as malformed (``ValidationException``: a key over its size limits, say) is
``error_open`` whatever ``failure_mode``: it would be refused forever, and fail-closed would hold the whole
stage behind it (the events after it included) for good. It is counted in ``unjudgeable``.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any, Final

from aiohttp import ClientError as AiohttpClientError
from botocore.exceptions import BotoCoreError, ClientError

from fpolicyd.errors import SinkError
from fpolicyd.pipeline.dedup import (
    Claim,
    Decision,
    DedupFailureMode,
    DedupKey,
    DedupRequest,
    DedupResult,
    error_result,
    judge,
    result_of,
)
from fpolicyd.sinks.aws.classify import ErrorKind, error_kind
from fpolicyd.sinks.aws.clients import AwsClients
from fpolicyd.sinks.retry import RetryPolicy

__all__ = ["CONDITION", "DEDUP_RETRY", "THROTTLING_CODES", "DynamoDbDedupStore", "claim_from_item", "item_of"]

CONDITION: Final = "attribute_not_exists(pk) OR #ttl <= :now OR claimant = :claimant OR expires_at <= :at"
#: Backoff of a dedup request: short, a spool batch waits on it.
DEDUP_RETRY: Final = RetryPolicy(base_s=0.05, cap_s=2.0)
_CONDITION_FAILED: Final = "ConditionalCheckFailedException"
#: DynamoDB's answer to a request it will never accept (a key over its size limit, a malformed item).
_VALIDATION: Final = "ValidationException"
#: DynamoDB's answers to a table (or account) over its capacity: counted as ``throttled``, then retried.
THROTTLING_CODES: Final = frozenset(
    {"ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded"}
)
_FAILURES: Final = (ClientError, BotoCoreError, AiohttpClientError, OSError, TimeoutError, SinkError)


def _number(value: float) -> dict[str, str]:
    return {"N": repr(float(value))}


def item_of(request: DedupRequest) -> dict[str, Any]:
    """The claim item a request writes (DynamoDB wire format)."""
    return {
        "pk": {"S": request.key.pk},
        "sk": {"S": request.key.sk},
        "event_id": {"S": request.event_id},
        "claimant": {"S": request.claimant},
        "event_time": _number(request.event_time),
        "expires_at": _number(request.expires_at),
        "ttl": {"N": str(math.ceil(request.retention))},
    }


def claim_from_item(item: Mapping[str, Any]) -> Claim:
    """A stored item (wire format) as a :class:`Claim`; its retention is the ``ttl`` attribute."""
    return Claim(
        event_id=str(item["event_id"]["S"]),
        claimant=str(item["claimant"]["S"]),
        event_time=float(item["event_time"]["N"]),
        expires_at=float(item["expires_at"]["N"]),
        retain_until=float(item["ttl"]["N"]),
    )


class _Down:
    """Whether a request of the current batch failed after its retries (the rest of the batch is not sent)."""

    __slots__ = ("failed",)

    def __init__(self) -> None:
        self.failed = False


def _code(exc: BaseException | None) -> str:
    return str((exc.response.get("Error") or {}).get("Code", "")) if isinstance(exc, ClientError) else ""


def _is_throttling(exc: BaseException) -> bool:
    return _code(exc) in THROTTLING_CODES


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error") or {}
        return f"{error.get('Code', 'Unknown')}: {error.get('Message', '')}"
    return f"{type(exc).__name__}: {exc}"


class DynamoDbDedupStore:
    """``async check_many(requests, now)`` against table ``table`` (module docstring)."""

    def __init__(
        self,
        clients: AwsClients,
        table: str,
        *,
        max_in_flight: int = 16,
        retries: int = 3,
        failure_mode: DedupFailureMode = DedupFailureMode.open,
        retry_policy: RetryPolicy = DEDUP_RETRY,
        rng: random.Random | None = None,
    ) -> None:
        if not table:
            raise ValueError("table: must not be empty")
        if max_in_flight < 1 or retries < 0:
            raise ValueError("max_in_flight must be >= 1 and retries >= 0")
        self.clients = clients
        self.table = table
        self.max_in_flight = max_in_flight
        self.retries = retries
        self.failure_mode = DedupFailureMode(failure_mode)
        self.retry_policy = retry_policy
        self._rng = rng or random.Random()
        self.checks = 0
        self.duplicates = 0
        self.errors = 0
        self.fail_open = 0
        self.fail_closed = 0
        self.retries_done = 0
        self.throttled = 0
        self.short_circuited = 0
        #: Requests DynamoDB refused as malformed: delivered (``error_open``) whatever the failure mode.
        self.unjudgeable = 0
        #: What the last request that failed met (``Code: message`` or the exception), for logs.
        self.last_failure: str | None = None

    async def check_table(self) -> None:
        """Start-up check: the table exists with string keys ``pk`` (hash) and ``sk`` (range). Raises
        ``SinkError``: not retriable for a missing or misshapen table or denied access, retriable when the
        endpoint cannot be reached."""
        try:
            client = await self.clients.client("dynamodb")
            table = (await client.describe_table(TableName=self.table))["Table"]
        except ClientError as exc:
            code = str((exc.response.get("Error") or {}).get("Code", ""))
            if code == "ResourceNotFoundException":
                raise SinkError(f"dedup table {self.table!r} does not exist", retriable=False) from exc
            raise SinkError(
                f"dedup table {self.table!r}: {code}", retriable=error_kind(exc) is ErrorKind.RETRY
            ) from exc
        except (BotoCoreError, AiohttpClientError, OSError, TimeoutError) as exc:
            raise SinkError(
                f"dedup table {self.table!r}: {type(exc).__name__}: {exc}",
                retriable=error_kind(exc) is ErrorKind.RETRY,
            ) from exc
        keys = {k["AttributeName"]: k["KeyType"] for k in table.get("KeySchema", ())}
        types = {a["AttributeName"]: a["AttributeType"] for a in table.get("AttributeDefinitions", ())}
        if keys != {"pk": "HASH", "sk": "RANGE"} or types.get("pk") != "S" or types.get("sk") != "S":
            raise SinkError(
                f"dedup table {self.table!r} must have string keys pk (HASH) and sk (RANGE), has {keys}",
                retriable=False,
            )

    async def check_many(self, requests: Sequence[DedupRequest], now: float) -> list[DedupResult]:
        """Results in request order. Never raises for a service failure (that is the failure mode's job)."""
        if not requests:
            return []
        self.checks += len(requests)
        results: list[DedupResult | None] = [None] * len(requests)
        by_key: dict[DedupKey, list[int]] = {}
        for i, request in enumerate(requests):
            by_key.setdefault(request.key, []).append(i)
        limit = asyncio.Semaphore(self.max_in_flight)
        down = _Down()

        async def run_key(indices: list[int]) -> None:
            for i in indices:
                async with limit:
                    if down.failed:
                        self.short_circuited += 1
                        results[i] = self._failed(requests[i])
                    else:
                        results[i] = await self._check_one(requests[i], now, down)

        await asyncio.gather(*(run_key(indices) for indices in by_key.values()))
        done = [r for r in results if r is not None]
        assert len(done) == len(requests)
        self.duplicates += sum(1 for r in done if r.decision is Decision.duplicate)
        return done

    async def _check_one(self, request: DedupRequest, now: float, down: _Down) -> DedupResult:
        params = {
            "TableName": self.table,
            "Item": item_of(request),
            "ConditionExpression": CONDITION,
            "ExpressionAttributeNames": {"#ttl": "ttl"},
            "ExpressionAttributeValues": {
                ":now": _number(now),
                ":claimant": {"S": request.claimant},
                ":at": _number(request.judged_at(now)),
            },
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        }
        attempt = 0
        while True:
            try:
                client = await self.clients.client("dynamodb")
                try:
                    await client.put_item(**params)
                except ClientError as exc:
                    if str((exc.response.get("Error") or {}).get("Code", "")) != _CONDITION_FAILED:
                        raise
                    item = exc.response.get("Item") or await self._current_item(client, request)
                    if item is not None:
                        existing = claim_from_item(item)
                        judgement = judge(existing, request, now)
                        if not judgement.write:
                            return result_of(request, judgement, existing)
                    # The claim changed between the put and the read: judge again with a new put.
                    failure: BaseException | None = None
                else:
                    return result_of(request, judge(None, request, now), None)
            except _FAILURES as exc:
                failure = exc
            kind = None if failure is None else error_kind(failure)
            if failure is not None:
                self.last_failure = _describe(failure)
                if _is_throttling(failure):
                    self.throttled += 1
            if kind is ErrorKind.REQUEST and _code(failure) == _VALIDATION:
                # DynamoDB refuses this request itself (a ValidationException): it can never be judged, and
                # holding it (fail-closed) would hold the stage for good. Delivered, counted, the batch goes on.
                self.unjudgeable += 1
                return self._failed(request, DedupFailureMode.open)
            if kind is None and attempt >= self.retries:
                return self._failed(request)  # the claim kept changing under us: contention, not an outage
            if kind not in (None, ErrorKind.RETRY) or attempt >= self.retries or down.failed:
                down.failed = True
                return self._failed(request)
            await asyncio.sleep(self.retry_policy.delay(attempt, self._rng))
            attempt += 1
            self.retries_done += 1

    async def _current_item(self, client: Any, request: DedupRequest) -> Mapping[str, Any] | None:
        response = await client.get_item(
            TableName=self.table,
            Key={"pk": {"S": request.key.pk}, "sk": {"S": request.key.sk}},
            ConsistentRead=True,
        )
        item = response.get("Item")
        return item if isinstance(item, Mapping) else None

    def _failed(self, request: DedupRequest, mode: DedupFailureMode | None = None) -> DedupResult:
        mode = self.failure_mode if mode is None else mode
        self.errors += 1
        if mode is DedupFailureMode.open:
            self.fail_open += 1
        else:
            self.fail_closed += 1
        return error_result(request, mode)
