"""A fake ONTAP REST API (aiohttp.web over HTTPS on 127.0.0.1, port 0) that enforces ONTAP's FPolicy rules.

It holds SVMs and, per SVM, FPolicy engines, events, policies and persistent stores in memory, checks HTTP basic
auth, answers with ONTAP's status codes and error object (``{"error": {"message", "code", "target"}}``), and runs
some calls as asynchronous jobs (``202`` + ``{"job": {"uuid", "_links"}}``, finished after ``job_polls`` polls
of ``/api/cluster/jobs/{uuid}``). Rules enforced, from the ONTAP REST reference:

- PATCH/DELETE of an engine attached to an enabled policy: refused, 400, code 9764942 ("At least one FPolicy
  policy is using the FPolicy engine"); the same for an event used by an enabled policy;
- PATCH of a persistent store that is part of an enabled policy: 400, code 9765070; its volume must exist
  (9765053); one persistent store per SVM;
- an enabled policy's engine, events, scope and other settings cannot be changed (disable it first);
  enabling needs ``priority``; a policy with a persistent store needs an asynchronous engine and
  ``mandatory: false``;
- a policy naming a missing engine, event or store, and a duplicate name: 409 (ONTAP's "a different object
  must be created first or the requested object already exists"); a missing object: 404, code 4;
- engine defaults are ONTAP's: ``type`` synchronous, ``format`` xml; policy ``mandatory`` defaults to true;
- event protocol and file operations must be a supported combination.

Codes 9764942, 9765053, 9765070 and 4 are documented ONTAP codes; the message texts are paraphrases.
Faults for tests: ``fail_next_job`` (the next job ends in ``failure``), ``fail_enable`` (that many enable
PATCHes answer 500). Every request is recorded in ``requests``; ``after_request`` (if set) is called with each
one once it was answered, so a test can act as another client at an exact point (e.g. overwrite the engine).

Concurrency is ONTAP's: each request is applied whole, in arrival order, and a PATCH replaces the lists it names
(``primary_servers``, ``secondary_servers``) — no merge, no version check —, so two clients that read the same
lists and each PATCH their own version lose one another's entries unless they re-read (the join/leave race).

FPolicy server connections (``GET /api/protocols/fpolicy/{svm.uuid}/connections``, 9.10+) are the records in
``connections``; :meth:`FakeOntap.connection` adds one with ONTAP's fields (``node``, ``policy``, ``server``,
``state`` connected|disconnected, ``type`` primary|secondary, ``update_time`` ISO 8601 with an offset: when the
server connected or disconnected, ``disconnected_reason``).

The server runs on its own thread and event loop (``running_fake_ontap``), so a test can drive the real CLI,
which runs its own loop, against it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import trustme
import uvloop
from aiohttp import web

SUPPORTED_OPERATIONS: dict[str, frozenset[str]] = {
    "cifs": frozenset(
        [
            "close",
            "create",
            "create_dir",
            "delete",
            "delete_dir",
            "getattr",
            "open",
            "read",
            "write",
            "rename",
            "rename_dir",
            "setattr",
        ]
    ),
    "nfsv3": frozenset(
        [
            "create",
            "create_dir",
            "delete",
            "delete_dir",
            "link",
            "lookup",
            "read",
            "write",
            "rename",
            "rename_dir",
            "setattr",
            "symlink",
        ]
    ),
    "nfsv4": frozenset(
        [
            "close",
            "create",
            "create_dir",
            "delete",
            "delete_dir",
            "getattr",
            "link",
            "lookup",
            "open",
            "read",
            "write",
            "rename",
            "rename_dir",
            "setattr",
            "symlink",
        ]
    ),
}
COLLECTIONS = ("engines", "events", "policies", "persistent-stores")
#: Policy fields that cannot change while the policy is enabled.
POLICY_CONFIG_FIELDS = ("engine", "events", "mandatory", "scope", "persistent_store")


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    body: Any


@dataclass(slots=True)
class Job:
    polls_left: int
    apply: Callable[[], None]
    failure: str | None = None
    state: str = "queued"


class FakeOntapError(Exception):
    def __init__(self, status: int, message: str, code: str, target: str | None = None) -> None:
        self.status = status
        self.message = message
        self.code = code
        self.target = target
        super().__init__(message)

    def response(self) -> web.Response:
        error: dict[str, Any] = {"message": self.message, "code": self.code}
        if self.target:
            error["target"] = self.target
        return web.json_response({"error": error}, status=self.status)


def _missing(kind: str, name: str) -> FakeOntapError:
    return FakeOntapError(404, f'{kind} "{name}": entry doesn\'t exist', "4", "name")


@dataclass
class FakeOntap:
    username: str = "fpolicyd-admin"
    password: str = "s3cret-Passw0rd"
    svm_names: tuple[str, ...] = ("svm1",)
    volumes: tuple[str, ...] = ("vol1", "vol2", "fpolicy_ps")
    job_polls: int = 2
    async_collections: frozenset[str] = frozenset({"persistent-stores"})
    fail_next_job: str | None = None
    fail_enable: int = 0
    url: str = ""
    ca_file: Path = Path()
    requests: list[RecordedRequest] = field(default_factory=list)
    connections: list[dict[str, Any]] = field(default_factory=list)
    after_request: Callable[[RecordedRequest], None] | None = None
    svms: dict[str, str] = field(init=False)
    objects: dict[str, dict[str, dict[str, dict[str, Any]]]] = field(init=False)
    jobs: dict[str, Job] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.svms = {name: str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{name}.fake-ontap")) for name in self.svm_names}
        self.objects = {svm: {c: {} for c in COLLECTIONS} for svm in self.svms.values()}

    # ------------------------------------------------------------------------------------ test helpers

    def svm_uuid(self, name: str = "svm1") -> str:
        return self.svms[name]

    def store(self, collection: str, svm: str = "svm1") -> dict[str, dict[str, Any]]:
        return self.objects[self.svms[svm]][collection]

    def mutations(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method in ("POST", "PATCH", "DELETE")]

    def connection(
        self,
        server: str,
        *,
        state: str = "connected",
        age_s: float = 0.0,
        node: str = "node-01",
        policy: str = "fpolicyd",
        kind: str = "primary",
    ) -> dict[str, Any]:
        """Add a connection record: ``server`` on ``node`` has been ``state`` for ``age_s`` seconds."""
        since = datetime.now(UTC) - timedelta(seconds=age_s)
        record: dict[str, Any] = {
            "node": {"name": node, "uuid": str(uuid.uuid5(uuid.NAMESPACE_DNS, node))},
            "svm": {"name": self.svm_names[0], "uuid": self.svm_uuid(self.svm_names[0])},
            "policy": {"name": policy},
            "server": server,
            "state": state,
            "type": kind,
            "update_time": since.astimezone(timezone(timedelta(hours=2))).isoformat(timespec="seconds"),
        }
        if state == "disconnected":
            record["disconnected_reason"] = {"code": 9370, "message": "TCP Connection to FPolicy server failed."}
        self.connections.append(record)
        return record

    # ----------------------------------------------------------------------------------------- server

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        try:
            login, _, password = base64.b64decode(token, validate=True).decode().partition(":")
        except ValueError:
            login = password = ""
        if scheme.lower() != "basic" or (login, password) != (self.username, self.password):
            return FakeOntapError(401, "not authorized for that command", "6").response()
        response: web.StreamResponse = await handler(request)
        return response

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body: Any = None
        if request.can_read_body:
            try:
                body = await request.json()
            except ValueError:
                return FakeOntapError(400, "invalid JSON in the request body", "2").response()
        recorded = RecordedRequest(request.method, request.path, body)
        self.requests.append(recorded)
        parts = [p for p in request.path.split("/") if p]
        try:
            response = self._route(request.method, parts, dict(request.query), body)
        except FakeOntapError as fault:
            response = fault.response()
        if self.after_request is not None:
            self.after_request(recorded)
        return response

    def _route(self, method: str, parts: list[str], query: Mapping[str, str], body: Any) -> web.Response:
        if parts[:3] == ["api", "svm", "svms"] and len(parts) == 3 and method == "GET":
            records = [
                {"uuid": u, "name": n} for n, u in self.svms.items() if "name" not in query or query["name"] == n
            ]
            return web.json_response({"records": records, "num_records": len(records)})
        if parts[:3] == ["api", "cluster", "jobs"] and len(parts) == 4 and method == "GET":
            return self._job(parts[3])
        if parts[:3] == ["api", "protocols", "fpolicy"] and len(parts) in (5, 6):
            svm = parts[3]
            if svm not in self.objects:
                raise FakeOntapError(404, f'SVM "{svm}" does not exist', "4", "svm.uuid")
            collection = parts[4]
            if collection == "connections" and len(parts) == 5 and method == "GET":
                records = [c for c in self.connections if query.get("policy.name") in (None, c["policy"]["name"])]
                return web.json_response({"records": records, "num_records": len(records)})
            if collection in COLLECTIONS:
                name = parts[5] if len(parts) == 6 else None
                return self._fpolicy(method, svm, collection, name, body)
        raise FakeOntapError(404, "API not found", "3")

    def _job(self, job_uuid: str) -> web.Response:
        job = self.jobs.get(job_uuid)
        if job is None:
            raise _missing("job", job_uuid)
        if job.state not in ("success", "failure"):
            job.polls_left -= 1
            job.state = "running"
            if job.polls_left <= 0:
                if job.failure is None:
                    try:
                        job.apply()
                    except FakeOntapError as fault:
                        job.failure = fault.message
                job.state = "success" if job.failure is None else "failure"
        record: dict[str, Any] = {"uuid": job_uuid, "state": job.state, "message": job.failure or job.state}
        if job.state == "failure":
            record["code"] = 9765000
            record["error"] = {"message": job.failure, "code": "9765000"}
        return web.json_response(record)

    def _respond(self, collection: str, method: str, apply: Callable[[], None], status: int) -> web.Response:
        if collection in self.async_collections and method in ("POST", "PATCH"):
            job_uuid = str(uuid.uuid4())
            failure, self.fail_next_job = self.fail_next_job, None
            self.jobs[job_uuid] = Job(polls_left=self.job_polls, apply=apply, failure=failure)
            link = {"self": {"href": f"/api/cluster/jobs/{job_uuid}"}}
            return web.json_response({"job": {"uuid": job_uuid, "_links": link}}, status=202)
        apply()
        return web.json_response({}, status=status)

    def _fpolicy(self, method: str, svm: str, collection: str, name: str | None, body: Any) -> web.Response:
        objects = self.objects[svm][collection]
        kind = collection.rstrip("s").replace("-", " ")
        if name is None:
            if method == "GET":
                records = list(objects.values())
                return web.json_response({"records": records, "num_records": len(records)})
            if method == "POST":
                if not isinstance(body, dict) or not body.get("name"):
                    raise FakeOntapError(400, 'Missing value for required field "name"', "2", "name")
                if body["name"] in objects:
                    raise FakeOntapError(409, f'duplicate entry: {kind} "{body["name"]}" already exists', "1", "name")
                record = self._validate_create(svm, collection, body)
                return self._respond(collection, method, lambda: objects.__setitem__(record["name"], record), 201)
            raise FakeOntapError(405, f"{method} is not allowed here", "3")
        current = objects.get(name)
        if current is None:
            raise _missing(kind, name)
        if method == "GET":
            return web.json_response(current)
        if method == "PATCH":
            if not isinstance(body, dict):
                raise FakeOntapError(400, "a JSON object is required", "2")
            updated = self._validate_patch(svm, collection, current, body)
            return self._respond(collection, method, lambda: objects.__setitem__(name, updated), 200)
        if method == "DELETE":
            self._check_not_in_use(svm, collection, name, "delete", any_policy=True)
            del objects[name]
            return web.json_response({})
        raise FakeOntapError(405, f"{method} is not allowed here", "3")

    # ------------------------------------------------------------------------------------------ rules

    def _policies_using(self, svm: str, collection: str, name: str, *, enabled_only: bool) -> list[str]:
        users = []
        for policy in self.objects[svm]["policies"].values():
            if enabled_only and not policy["enabled"]:
                continue
            refs = {
                "engines": {policy["engine"]["name"]},
                "events": {e["name"] for e in policy["events"]},
                "persistent-stores": {policy.get("persistent_store")},
            }[collection]
            if name in refs:
                users.append(policy["name"])
        return users

    def _check_not_in_use(self, svm: str, collection: str, name: str, verb: str, *, any_policy: bool = False) -> None:
        users = self._policies_using(svm, collection, name, enabled_only=not any_policy)
        if not users:
            return
        if collection == "engines":
            raise FakeOntapError(
                400,
                f'Cannot {verb} FPolicy engine "{name}": at least one FPolicy policy is using the FPolicy engine '
                f"({', '.join(users)} {'exist' if any_policy else 'enabled'}). Disable the policy first.",
                "9764942",
            )
        if collection == "persistent-stores":
            raise FakeOntapError(
                400,
                f"Cannot update a persistent store volume when it is part of an enabled policy ({users[0]})",
                "9765070",
            )
        raise FakeOntapError(
            400, f'Cannot {verb} FPolicy event "{name}": it is used by FPolicy policy {", ".join(users)}', "9764943"
        )

    def _validate_engine(self, record: dict[str, Any]) -> None:
        if not isinstance(record.get("port"), int) or not 1 <= record["port"] <= 65535:
            raise FakeOntapError(400, "port: expected an integer 1..65535", "2", "port")
        servers = record.get("primary_servers")
        if not isinstance(servers, list) or not servers:
            raise FakeOntapError(400, 'Missing value for required field "primary_servers"', "2", "primary_servers")
        if record["type"] not in ("synchronous", "asynchronous"):
            raise FakeOntapError(400, f"type: invalid value {record['type']!r}", "2", "type")
        if record["format"] not in ("xml", "protobuf"):
            raise FakeOntapError(400, f"format: invalid value {record['format']!r}", "2", "format")
        if record["ssl_option"] not in ("no_auth", "server_auth", "mutual_auth"):
            raise FakeOntapError(400, f"ssl_option: invalid value {record['ssl_option']!r}", "2", "ssl_option")

    def _validate_event(self, record: dict[str, Any]) -> None:
        protocol = record.get("protocol")
        operations = record.get("file_operations") or {}
        on = {op for op, value in operations.items() if value}
        if (protocol is None) != (not on):
            raise FakeOntapError(400, "protocol and file_operations must be given together", "2", "protocol")
        if protocol is None:
            return
        if protocol not in SUPPORTED_OPERATIONS:
            raise FakeOntapError(400, f"protocol: invalid value {protocol!r}", "2", "protocol")
        bad = sorted(on - SUPPORTED_OPERATIONS[protocol])
        if bad:
            raise FakeOntapError(400, f"file operations {bad} are not supported for protocol {protocol}", "2")

    def _validate_policy(self, svm: str, record: dict[str, Any]) -> None:
        objects = self.objects[svm]
        engine = record["engine"]["name"]
        if engine not in objects["engines"]:
            raise FakeOntapError(409, f'FPolicy engine "{engine}" does not exist', "9764929", "engine.name")
        if not record["events"]:
            raise FakeOntapError(400, 'Missing value for required field "events"', "2", "events")
        for event in record["events"]:
            if event["name"] not in objects["events"]:
                raise FakeOntapError(409, f'FPolicy event "{event["name"]}" does not exist', "9764930", "events")
        store = record.get("persistent_store")
        if store:
            if store not in objects["persistent-stores"]:
                raise FakeOntapError(409, f'persistent store "{store}" does not exist', "9765056", "persistent_store")
            if record["mandatory"] or objects["engines"][engine]["type"] != "asynchronous":
                raise FakeOntapError(
                    400, "a persistent store needs an asynchronous engine and a non-mandatory policy", "9765057"
                )

    def _validate_create(self, svm: str, collection: str, body: dict[str, Any]) -> dict[str, Any]:
        if collection == "engines":
            record: dict[str, Any] = {
                "type": "synchronous",
                "format": "xml",
                "ssl_option": "no_auth",
                "secondary_servers": [],
                **body,
            }
            self._validate_engine(record)
            return record
        if collection == "events":
            record = {"volume_monitoring": False, "file_operations": {}, **body}
            self._validate_event(record)
            return record
        if collection == "policies":
            record = {"mandatory": True, "enabled": False, "scope": {}, "engine": {"name": "native"}, **body}
            record.setdefault("events", [])
            if "priority" in body and "enabled" not in body:
                record["enabled"] = True
            self._validate_policy(svm, record)
            return record
        if self.objects[svm]["persistent-stores"]:
            raise FakeOntapError(409, "an SVM can only have one persistent store", "9765058")
        if body.get("volume") not in self.volumes:
            raise FakeOntapError(400, "Volume mentioned does not exist in the SVM", "9765053", "volume")
        return dict(body)

    def _validate_patch(
        self, svm: str, collection: str, current: dict[str, Any], body: dict[str, Any]
    ) -> dict[str, Any]:
        name = current["name"]
        if "name" in body and body["name"] != name:
            raise FakeOntapError(400, "name cannot be modified", "2", "name")
        if collection == "policies":
            return self._patch_policy(svm, current, body)
        self._check_not_in_use(svm, collection, name, "modify")
        updated = {**current, **body}
        if collection == "engines":
            self._validate_engine(updated)
        elif collection == "events":
            updated["file_operations"] = {**current.get("file_operations", {}), **body.get("file_operations", {})}
            self._validate_event(updated)
        elif body.get("volume") not in self.volumes:
            raise FakeOntapError(400, "Volume mentioned does not exist in the SVM", "9765053", "volume")
        return updated

    def _patch_policy(self, svm: str, current: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        changing = [key for key in POLICY_CONFIG_FIELDS if key in body and body[key] != current.get(key)]
        enabling = body.get("enabled") is True or ("priority" in body and "enabled" not in body)
        if changing and current["enabled"] and body.get("enabled") is not False:
            raise FakeOntapError(
                400,
                f'Cannot modify {", ".join(changing)} of FPolicy policy "{current["name"]}" while it is enabled; '
                "if the policy is enabled, the FPolicy policy engine cannot be modified. Disable the policy first.",
                "9764944",
            )
        updated = {**current, **{k: v for k, v in body.items() if k not in ("enabled", "priority")}}
        if enabling:
            if "priority" not in body:
                raise FakeOntapError(400, "When enabling a policy, the policy priority must be specified", "9764945")
            if self.fail_enable > 0:
                self.fail_enable -= 1
                raise FakeOntapError(500, "FPolicy enable failed: injected fault", "9764946")
            updated["enabled"] = True
            updated["priority"] = body["priority"]
        elif body.get("enabled") is False:
            updated["enabled"] = False
            updated.pop("priority", None)
        self._validate_policy(svm, updated)
        return updated


@contextlib.contextmanager
def running_fake_ontap(tmp_path: Path, **options: Any) -> Iterator[FakeOntap]:
    """Serve a :class:`FakeOntap` over HTTPS with a certificate from a throw-away CA (written to
    ``fake.ca_file``), on 127.0.0.1 and a kernel-chosen port (``fake.url``)."""
    fake = FakeOntap(**options)
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1", "localhost").configure_cert(server_context)
    fake.ca_file = tmp_path / "fake-ontap-ca.pem"
    authority.cert_pem.write_to_path(str(fake.ca_file))

    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-ontap", daemon=True)
    thread.start()
    runner = web.AppRunner(fake.app(), access_log=None)

    async def start() -> int:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context)
        await site.start()
        port: int = runner.addresses[0][1]
        return port

    try:
        port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
        fake.url = f"https://127.0.0.1:{port}"
        yield fake
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
