"""An HTTP proxy in front of moto that throttles DynamoDB the way DynamoDB reports it.

botocore speaks the AWS JSON 1.0 protocol to DynamoDB (``X-Amz-Target: DynamoDB_20120810.<Action>``). While
``throttling`` is on (or for the next ``throttle_next`` requests), a ``PutItem`` is answered HTTP 400
``ProvisionedThroughputExceededException`` without reaching moto, as a table over its provisioned (or on-demand
burst) capacity answers; everything else is forwarded untouched. moto never throttles on its own. Binds
127.0.0.1 on a kernel-chosen port.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from aiohttp import web

PUT_ITEM = "DynamoDB_20120810.PutItem"
THROTTLED = "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException"


@dataclass
class DynamoDbFaults:
    target: str
    #: Throttle every PutItem while True.
    throttling: bool = False
    #: Throttle the next N PutItem requests (then pass them through).
    throttle_next: int = 0
    #: PutItem requests answered with a throttling error / forwarded to moto.
    throttled: int = 0
    forwarded: int = 0
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
        self.port = int(self._runner.addresses[0][1])
        self._session = aiohttp.ClientSession()
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("X-Amz-Target") == PUT_ITEM:
            if self.throttling or self.throttle_next > 0:
                self.throttle_next = max(0, self.throttle_next - 1)
                self.throttled += 1
                return web.json_response(
                    {"__type": THROTTLED, "message": "The level of configured provisioned throughput for the table "
                     "was exceeded (injected)"},
                    status=400,
                    content_type="application/x-amz-json-1.0",
                )  # fmt: skip
            self.forwarded += 1
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(
            request.method, self.target + request.path_qs, data=body, headers=headers
        ) as upstream:
            data = await upstream.read()
            # x-amz-crc32 is passed on: botocore checks it against the body, which is moto's, unchanged.
            passed = ("content-type", "x-amzn-requestid", "x-amz-crc32")
            return web.Response(
                body=data,
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() in passed},
            )
