"""The AWS clients: one aiobotocore session, one long-lived SDK client per service, and the data-path client
(lean, :mod:`fpolicyd.sinks.aws.transport`, or the SDK's) for SendMessageBatch and PutEvents."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Self

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError

from fpolicyd.errors import SinkError
from fpolicyd.obs.log import get_logger
from fpolicyd.sinks.aws.targets import AwsDataPath
from fpolicyd.sinks.aws.transport import LeanUnsupportedError, build_lean_client

__all__ = ["AwsClients"]

log = get_logger("fpolicyd.sink.aws")


class AwsClients:
    """One aiobotocore session and one long-lived client per service, created on first use.

    By default everything comes from the standard AWS environment: region (``AWS_REGION``/
    ``AWS_DEFAULT_REGION``/profile), the credential chain (env, profile, ECS task role, EC2 instance profile)
    and ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_SQS``/``AWS_ENDPOINT_URL_EVENTBRIDGE`` (botocore reads these
    itself). ``endpoint_url``/``region_name`` override them (tests, VPC endpoints).

    SDK retries are off (``total_max_attempts=1``): :func:`deliver` retries, and only the entries that failed,
    within the caller's deadline and with every attempt counted. botocore's own retries would re-send whole
    batches invisibly (3 attempts by default, multiplied by ours), hide throttling from the metrics and stretch a
    drain past its budget.

    :meth:`data_client` hands out the client for the data path (SendMessageBatch, PutEvents): with ``data_path``
    lean (the default) a :class:`~fpolicyd.sinks.aws.transport.LeanAwsClient` built from the SDK client (same
    endpoint, credentials, timeouts, pool size; 6-8x less CPU per request), with ``sdk`` the SDK client itself.
    If the lean path cannot serve this set-up (a proxy, SigV4a...) the SDK client is used and a warning logged.
    Control calls (:meth:`client`) are always the SDK's.
    """

    def __init__(
        self,
        *,
        region_name: str | None = None,
        endpoint_url: str | None = None,
        max_pool_connections: int = 10,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 15.0,
        data_path: AwsDataPath = AwsDataPath.LEAN,
    ) -> None:
        self._session = get_session()
        self._region_name = region_name
        self._endpoint_url = endpoint_url
        self._max_pool_connections = max_pool_connections
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self.data_path = AwsDataPath(data_path)
        self._stack = contextlib.AsyncExitStack()
        self._clients: dict[str, Any] = {}
        self._data_clients: dict[str, Any] = {}
        self._lock = asyncio.Lock()
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _config(self) -> Any:
        return AioConfig(
            max_pool_connections=self._max_pool_connections,
            connect_timeout=self._connect_timeout_s,
            read_timeout=self._read_timeout_s,
            retries={"total_max_attempts": 1, "mode": "standard"},
        )

    async def client(self, service: str) -> Any:
        """The process-wide client for ``service`` (``"sqs"`` or ``"events"``)."""
        found = self._clients.get(service)
        if found is not None:
            return found
        async with self._lock:
            found = self._clients.get(service)
            if found is not None:
                return found
            if self._closed:
                raise SinkError("AWS clients are closed", retriable=False)
            kwargs: dict[str, Any] = {"config": self._config()}
            if self._region_name:
                kwargs["region_name"] = self._region_name
            if self._endpoint_url:
                kwargs["endpoint_url"] = self._endpoint_url
            try:
                made = await self._stack.enter_async_context(self._session.create_client(service, **kwargs))
            except BotoCoreError as exc:  # NoRegionError, bad endpoint URL, ...
                raise SinkError(f"cannot create the {service} client: {exc}", retriable=False) from exc
            self._clients[service] = made
            return made

    async def credentials(self) -> Any:
        """The session's credentials: the object every SDK client of this session signs with (refreshable when
        they come from a task role or instance profile), or None when the chain found none."""
        try:
            return await self._session.get_credentials()
        except BotoCoreError as exc:
            raise SinkError(f"cannot load AWS credentials: {exc}", retriable=True) from exc

    async def data_client(self, service: str) -> Any:
        """The client for ``service``'s data-path calls (``send_message_batch`` for ``"sqs"``, ``put_events``
        for ``"events"``): lean or SDK, see the class docstring."""
        found = self._data_clients.get(service)
        if found is not None:
            return found
        sdk = await self.client(service)
        if self.data_path is AwsDataPath.SDK:
            self._data_clients[service] = sdk
            return sdk
        credentials = await self.credentials()
        async with self._lock:
            found = self._data_clients.get(service)
            if found is not None:
                return found
            if self._closed:
                raise SinkError("AWS clients are closed", retriable=False)
            try:
                lean = await build_lean_client(
                    sdk,
                    credentials,
                    user_agent=f"{self._session.user_agent()} fpolicyd-lean",
                    max_connections=self._max_pool_connections,
                    connect_timeout_s=self._connect_timeout_s,
                    read_timeout_s=self._read_timeout_s,
                )
            except LeanUnsupportedError as exc:
                log.warning("aws_lean_data_path_unavailable", service=service, reason=str(exc), using="sdk")
                self._data_clients[service] = sdk
                return sdk
            except BotoCoreError as exc:  # NoRegionError, an endpoint the ruleset refuses, ...
                raise SinkError(f"cannot set up the {service} data path: {exc}", retriable=False) from exc
            self._stack.push_async_callback(lean.close)
            self._data_clients[service] = lean
            return lean

    async def sqs(self) -> Any:
        return await self.client("sqs")

    async def events(self) -> Any:
        return await self.client("events")

    async def sqs_data(self) -> Any:
        return await self.data_client("sqs")

    async def events_data(self) -> Any:
        return await self.data_client("events")

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            self._clients.clear()
            self._data_clients.clear()
            await self._stack.aclose()
