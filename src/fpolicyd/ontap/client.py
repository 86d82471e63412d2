"""A small async client for the ONTAP REST API (aiohttp), and the executor that runs a :class:`Plan`.

- HTTPS only, certificate verification on by default (``ontap_ca_file`` adds the cluster's CA); turning it off
  is logged as a warning on every use, never silent.
- Errors keep ONTAP's own error object (``{"error": {"message", "code", "target"}}``) and the HTTP status in an
  :class:`OntapError`, so what ONTAP said reaches the operator verbatim.
- Asynchronous calls: ONTAP answers ``202 Accepted`` with ``{"job": {"uuid", "_links"}}``; the job is polled at
  ``GET /api/cluster/jobs/{uuid}`` until it reaches a terminal state (``success`` or ``failure``; ``queued``,
  ``running`` and ``paused`` are not) or ``ontap_job_timeout_s`` passes. A failed job raises with its message.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Self
from urllib.parse import quote, urlsplit

import aiohttp
import orjson

from fpolicyd.errors import ConfigError, FpolicydError
from fpolicyd.obs.log import get_logger
from fpolicyd.ontap.plan import FPOLICY_API, Action, CurrentState, Plan, Step

__all__ = [
    "JOB_TERMINAL_STATES",
    "Execution",
    "OntapAuthError",
    "OntapClient",
    "OntapConnection",
    "OntapError",
    "OntapJobError",
    "OntapNotFoundError",
    "execute_plan",
]

log = get_logger("fpolicyd.ontap")

#: Terminal job states; everything else (queued, running, paused) is polled again.
JOB_TERMINAL_STATES: Final = frozenset({"success", "failure"})


class OntapError(FpolicydError):
    """ONTAP refused a request or could not be reached. ``status``/``code`` are ONTAP's when it answered."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        self.status = status
        self.code = code
        super().__init__(message)


class OntapAuthError(OntapError):
    """HTTP 401/403: the credentials or the role are wrong; retrying does not help."""


class OntapNotFoundError(OntapError):
    """HTTP 404: the object (or, on an older ONTAP, the endpoint) does not exist."""


class OntapJobError(OntapError):
    """An asynchronous job ended in ``failure`` or did not finish in time."""


@dataclass(frozen=True, slots=True)
class OntapConnection:
    base_url: str
    username: str
    password: str = field(repr=False)
    ca_file: Path | None = None
    verify_tls: bool = True
    request_timeout_s: float = 30.0
    job_timeout_s: float = 120.0
    job_poll_interval_s: float = 1.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.base_url)
        if parts.scheme != "https" or not parts.hostname:
            raise ConfigError(
                f"ontap_url: expected https://HOST[:PORT] (ONTAP's REST API is HTTPS only), got {self.base_url!r}"
            )
        if not self.username or ":" in self.username:
            raise ConfigError(f"ontap_username: {self.username!r} is empty or contains ':'")
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ConfigError(f"ontap_ca_file {self.ca_file}: no such file")

    def authorization(self) -> str:
        """HTTP basic auth (RFC 7617, UTF-8), the scheme ONTAP's REST API takes."""
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")
        return f"Basic {token}"

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.base_url).port or 443


def _ssl_context(connection: OntapConnection) -> ssl.SSLContext | bool:
    if not connection.verify_tls:
        log.warning("ontap_tls_verification_off", url=connection.base_url, detail="ontap_verify_tls=false")
        return False
    try:
        return ssl.create_default_context(cafile=str(connection.ca_file) if connection.ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"ontap_ca_file {connection.ca_file}: not a usable PEM CA bundle: {exc}") from None


def _error_object(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    error = payload.get("error")
    return error if isinstance(error, Mapping) else {}


def _error_of(status: int, payload: Mapping[str, Any], method: str, path: str) -> OntapError:
    error = _error_object(payload)
    message = str(error.get("message") or f"HTTP {status}")
    code = str(error["code"]) if error.get("code") is not None else None
    target = f" (target {error['target']})" if error.get("target") else ""
    text = f"{method} {path}: HTTP {status}, ONTAP error {code or '-'}: {message}{target}"
    if status in (401, 403):
        return OntapAuthError(text, status=status, code=code)
    if status == 404:
        return OntapNotFoundError(text, status=status, code=code)
    return OntapError(text, status=status, code=code)


class OntapClient:
    """One aiohttp session to one ONTAP cluster; use as ``async with OntapClient(connection) as client``."""

    def __init__(self, connection: OntapConnection) -> None:
        self._connection = connection
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        timeout = aiohttp.ClientTimeout(total=self._connection.request_timeout_s)
        self._session = aiohttp.ClientSession(
            base_url=self._connection.base_url.rstrip("/") + "/",
            timeout=timeout,
            connector=aiohttp.TCPConnector(ssl=_ssl_context(self._connection), limit=4),
            headers={"Accept": "application/json", "Authorization": self._connection.authorization()},
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self, method: str, path: str, *, params: Mapping[str, str] | None = None, body: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """One call; a 202 is followed to its job's end. Returns the JSON body (``{}`` when there is none)."""
        status, payload = await self._send(method, path, params=params, body=body)
        if status >= 400:
            raise _error_of(status, payload, method, path)
        if status == 202 and isinstance(payload.get("job"), Mapping):
            await self.wait_for_job(payload["job"], f"{method} {path}")
        return payload

    async def _send(
        self, method: str, path: str, *, params: Mapping[str, str] | None, body: Mapping[str, Any] | None
    ) -> tuple[int, dict[str, Any]]:
        if self._session is None:
            raise RuntimeError("OntapClient used outside `async with`")
        url = self._connection.base_url.rstrip("/") + path
        try:
            async with self._session.request(method, path.lstrip("/"), params=params, json=body) as response:
                text = await response.text()
                status = response.status
        except aiohttp.ClientConnectorCertificateError as exc:
            raise OntapError(
                f"{method} {url}: the ONTAP certificate did not verify ({exc.certificate_error}); give the CA that "
                "signed it with ontap_ca_file (verification stays on by default)"
            ) from None
        except aiohttp.ClientSSLError as exc:
            raise OntapError(f"{method} {url}: TLS handshake failed: {exc}") from None
        except TimeoutError:
            raise OntapError(
                f"{method} {url}: no answer within ontap_request_timeout_s={self._connection.request_timeout_s:g}"
            ) from None
        except aiohttp.ClientError as exc:
            raise OntapError(f"{method} {url}: cannot reach ONTAP: {exc}") from None
        payload: Any = {}
        if text.strip():
            try:
                payload = orjson.loads(text)
            except orjson.JSONDecodeError:
                payload = {"error": {"message": f"non-JSON answer: {text[:200]!r}"}}
        return status, payload if isinstance(payload, dict) else {"records": payload}

    async def wait_for_job(self, job: Mapping[str, Any], what: str) -> dict[str, Any]:
        """Poll ``/api/cluster/jobs/{uuid}`` until ``success`` (returned) or ``failure`` / timeout (raised)."""
        uuid = str(job.get("uuid") or "")
        if not uuid:
            raise OntapJobError(f"{what}: ONTAP answered 202 without a job uuid")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._connection.job_timeout_s
        state = "?"
        while True:
            job_path = f"/api/cluster/jobs/{quote(uuid, safe='')}"
            status, record = await self._send("GET", job_path, params=None, body=None)
            if status >= 400:
                raise _error_of(status, record, "GET", job_path)
            state = str(record.get("state") or "?")
            if state == "success":
                return record
            if state == "failure":
                error = _error_object(record)
                message = error.get("message") or record.get("message") or "no message"
                code = error.get("code") if error.get("code") is not None else record.get("code")
                raise OntapJobError(
                    f"{what}: ONTAP job {uuid} failed (code {code}): {message}",
                    status=202,
                    code=str(code) if code is not None else None,
                )
            if loop.time() >= deadline:
                raise OntapJobError(
                    f"{what}: ONTAP job {uuid} still {state} after ontap_job_timeout_s="
                    f"{self._connection.job_timeout_s:g}; check `job show -id` on the cluster"
                )
            await asyncio.sleep(self._connection.job_poll_interval_s)

    async def get_or_none(self, path: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", path, params={"fields": "*"})
        except OntapNotFoundError:
            return None

    async def svm_uuid(self, name: str) -> str:
        payload = await self.request("GET", "/api/svm/svms", params={"name": name, "fields": "uuid,name"})
        records = payload.get("records") or []
        if not records:
            raise OntapError(f"SVM {name!r} not found on the cluster (GET /api/svm/svms?name={name}: no record)")
        return str(records[0]["uuid"])

    async def read_state(
        self, svm_uuid: str, *, engine: str, policy: str, events: tuple[str, ...], store: str | None
    ) -> CurrentState:
        base = f"{FPOLICY_API}/{quote(svm_uuid, safe='')}"
        found_events = {name: await self.get_or_none(f"{base}/events/{quote(name, safe='')}") for name in events}
        return CurrentState(
            engine=await self.get_or_none(f"{base}/engines/{quote(engine, safe='')}"),
            events=found_events,
            policy=await self.get_or_none(f"{base}/policies/{quote(policy, safe='')}"),
            store=await self.get_or_none(f"{base}/persistent-stores/{quote(store, safe='')}") if store else None,
        )

    async def connections(self, svm_uuid: str, policy: str) -> list[dict[str, Any]] | None:
        """FPolicy server connections of the policy (ONTAP 9.10+); ``None`` when the endpoint does not exist."""
        try:
            payload = await self.request(
                "GET",
                f"{FPOLICY_API}/{quote(svm_uuid, safe='')}/connections",
                params={"policy.name": policy, "fields": "*"},
            )
        except OntapNotFoundError:
            return None
        return [dict(r) for r in payload.get("records") or []]


@dataclass(frozen=True, slots=True)
class Execution:
    """What :func:`execute_plan` did, in order."""

    done: tuple[Action, ...]


async def _enable(client: OntapClient, action: Action, attempts: int, delay_s: float) -> None:
    last: OntapError | None = None
    for attempt in range(1, attempts + 1):
        try:
            await client.request(action.method.value, action.path, body=action.body)
        except OntapAuthError:
            raise
        except OntapError as exc:
            last = exc
            log.warning("ontap_enable_failed", policy=action.target, attempt=attempt, attempts=attempts, error=str(exc))
            if attempt < attempts:
                await asyncio.sleep(delay_s)
            continue
        return
    assert last is not None
    raise last


def _disabled_message(plan: Plan, action: Action, svm: str) -> str:
    priority = action.body.get("priority", 1)
    return (
        f"policy {plan.policy} is DISABLED: ONTAP sends no notifications until it is enabled again "
        f"(`fpolicyd ontap apply`, or on the cluster `vserver fpolicy enable -vserver {svm} -policy-name "
        f"{plan.policy} -sequence-number {priority}`)"
    )


async def execute_plan(
    client: OntapClient, plan: Plan, *, svm_name: str, enable_attempts: int, retry_delay_s: float
) -> Execution:
    """Run the actions in order. Enabling is retried ``enable_attempts`` times. If a step fails after this run
    disabled the policy, the policy is enabled again before the error is raised, so a failed run never leaves it
    disabled silently; if that also fails, the error says loudly that the policy is disabled."""
    done: list[Action] = []
    disabled_by_us = False
    enable = plan.enable_action
    for action in plan.actions:
        try:
            if action.step is Step.ENABLE_POLICY:
                await _enable(client, action, enable_attempts, retry_delay_s)
            else:
                await client.request(action.method.value, action.path, body=action.body)
        except OntapError as exc:
            if action.step is Step.ENABLE_POLICY:
                raise type(exc)(
                    f"enable policy {plan.policy} failed after {enable_attempts} attempt(s): {exc}. "
                    + _disabled_message(plan, action, svm_name),
                    status=exc.status,
                    code=exc.code,
                ) from exc
            if disabled_by_us and enable is not None:
                applied = ", ".join(a.describe() for a in done if a.step is not Step.DISABLE_POLICY) or "none"
                try:
                    await _enable(client, enable, enable_attempts, retry_delay_s)
                except OntapError as enable_exc:
                    raise type(exc)(
                        f"{action.describe()} failed: {exc}; re-enabling failed too ({enable_exc}). "
                        + _disabled_message(plan, enable, svm_name),
                        status=exc.status,
                        code=exc.code,
                    ) from exc
                raise type(exc)(
                    f"{action.describe()} failed: {str(exc).rstrip('.')}. Policy {plan.policy} was enabled again "
                    f"(changes applied before the failure: {applied})",
                    status=exc.status,
                    code=exc.code,
                ) from exc
            raise type(exc)(f"{action.describe()} failed: {exc}", status=exc.status, code=exc.code) from exc
        done.append(action)
        log.info("ontap_change", step=action.step.value, target=action.target, endpoint=action.path)
        if action.step is Step.DISABLE_POLICY:
            disabled_by_us = True
    return Execution(tuple(done))
