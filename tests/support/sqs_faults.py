"""An HTTP proxy in front of moto that injects SQS failures the way SQS reports them.

It understands the AWS JSON 1.0 protocol botocore uses for SQS (``X-Amz-Target: AmazonSQS.<Action>``). For
``SendMessageBatch`` it can fail whole requests (HTTP 500, or a 400 ``ThrottlingException``) and fail single
entries: those entries are removed from the request that reaches moto and reported in ``Failed[]`` with
``SenderFault`` true (permanent) or false (transient), exactly as SQS's partial-failure response looks.
Everything else is forwarded untouched. Binds 127.0.0.1 on a kernel-chosen port.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

_PASSED_HEADERS = ("content-type", "x-amzn-requestid")

#: Decides an entry's fate from its MessageBody: None = pass, "transient" / "permanent" = fail it this time.
EntryRule = Callable[[str], str | None]


@dataclass
class SqsFaults:
    target: str
    entry_rule: EntryRule = lambda body: None
    #: Acknowledged entries whose body matches get a wrong MD5OfMessageBody (the message is still enqueued).
    md5_rule: Callable[[str], bool] = lambda body: False
    #: Whole SendMessageBatch requests to fail first, in order: "500" or "throttle".
    request_failures: list[str] = field(default_factory=list)
    #: Every SendMessageBatch waits this long before it is forwarded (a slow SQS).
    delay_s: float = 0.0
    batches: int = 0
    failed_entries: int = 0
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None
    port: int = 0

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        address = self._runner.addresses[0]
        self.port = int(address[1])
        self._session = aiohttp.ClientSession()
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _forward(self, request: web.Request, body: bytes) -> web.Response:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(
            request.method, self.target + request.path_qs, data=body, headers=headers
        ) as upstream:
            data = await upstream.read()
            return web.Response(
                body=data,
                status=upstream.status,
                headers={
                    k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "x-amzn-requestid")
                },
            )

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("X-Amz-Target") != "AmazonSQS.SendMessageBatch":
            return await self._forward(request, body)
        self.batches += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.request_failures:
            kind = self.request_failures.pop(0)
            if kind == "500":
                return web.Response(status=500, text="injected")
            return web.json_response(
                {"__type": "com.amazonaws.sqs#ThrottlingException", "message": "Rate exceeded (injected)"},
                status=400,
                content_type="application/x-amz-json-1.0",
            )
        payload: dict[str, Any] = json.loads(body)
        keep: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        for entry in payload["Entries"]:
            fate = self.entry_rule(entry["MessageBody"])
            if fate is None:
                keep.append(entry)
            else:
                self.failed_entries += 1
                failed.append(
                    {
                        "Id": entry["Id"],
                        "SenderFault": fate == "permanent",
                        "Code": "InvalidParameterValue" if fate == "permanent" else "InternalError",
                        "Message": f"injected {fate} failure",
                    }
                )
        successful: list[dict[str, Any]] = []
        if keep:
            payload["Entries"] = keep
            response = await self._forward(request, json.dumps(payload).encode())
            if response.status != 200:
                return response
            assert isinstance(response.body, bytes)
            result = json.loads(response.body)
            successful = result.get("Successful", [])
            bodies = {entry["Id"]: entry["MessageBody"] for entry in keep}
            for ok in successful:
                if self.md5_rule(bodies[ok["Id"]]):
                    ok["MD5OfMessageBody"] = "0" * 32
            failed += result.get("Failed", [])
        return web.json_response(
            {"Successful": successful, "Failed": failed}, content_type="application/x-amz-json-1.0"
        )
