"""`fpolicyd ontap plan/apply/repoint/join/leave/prune/status` driven through the real CLI (in-process `main()`)
against a fake ONTAP REST server over HTTPS that enforces ONTAP's rules (tests/support/fake_ontap.py)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvloop

from fpolicyd.app import Daemon
from fpolicyd.cli.main import main
from fpolicyd.errors import ConfigError
from fpolicyd.ontap.client import OntapClient, OntapConnection, OntapError
from fpolicyd.ontap.ops import repoint_on_start
from support.daemon import make_settings
from support.fake_ontap import FakeOntap, RecordedRequest, running_fake_ontap

ADDRESS = "10.0.0.10"


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOntap]:
    monkeypatch.chdir(tmp_path)  # no ./fpolicyd.toml from elsewhere
    monkeypatch.delenv("ECS_CONTAINER_METADATA_URI_V4", raising=False)
    with running_fake_ontap(tmp_path) as server:
        monkeypatch.setenv("FPOLICYD_ONTAP_PASSWORD", server.password)
        yield server


def ontap(fake: FakeOntap, action: str, *extra: str, ca: bool = True, address: str | None = ADDRESS) -> list[str]:
    argv = [
        "ontap",
        action,
        "--ontap-url",
        fake.url,
        "--ontap-username",
        fake.username,
        "--ontap-svm",
        "svm1",
        "--ontap-volumes",
        "vol1,vol2",
        "--ontap-job-poll-interval-s",
        "0.01",
        "--ontap-retry-delay-s",
        "0",
        "--log-level",
        "error",
    ]
    if ca:
        argv += ["--ontap-ca-file", str(fake.ca_file)]
    if address is not None and action != "status":
        argv += ["--address", address]
    return [*argv, *extra]


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str], expect: int = 0) -> dict[str, Any]:
    code = main([*argv, "--format", "json"])
    out, err = capsys.readouterr()
    assert code == expect, err
    result: dict[str, Any] = orjson.loads(out)
    return result


def policy(fake: FakeOntap) -> dict[str, Any]:
    return fake.store("policies")["fpolicyd"]


def steps(requests: list[RecordedRequest]) -> list[tuple[str, str, Any]]:
    return [(r.method, r.path.rsplit("/", 2)[-2] + "/" + r.path.rsplit("/", 1)[-1], r.body) for r in requests]


def test_apply_from_empty_then_second_apply_is_a_no_op(fake: FakeOntap, capsys: pytest.CaptureFixture[str]) -> None:
    planned = run_json(capsys, ontap(fake, "plan"))
    assert planned["changes"] == 4  # engine, event, policy, enable
    assert fake.mutations() == []  # plan is a dry run

    applied = run_json(capsys, ontap(fake, "apply"))
    assert [a["step"] for a in applied["actions"]] == [
        "create_engine",
        "create_event",
        "create_policy",
        "enable_policy",
    ]
    engine = fake.store("engines")["fpolicyd"]
    assert engine["primary_servers"] == [ADDRESS]
    assert (engine["port"], engine["type"], engine["format"], engine["ssl_option"]) == (
        9898,
        "asynchronous",
        "xml",
        "no_auth",
    )
    assert fake.store("events")["fpolicyd_cifs"]["protocol"] == "cifs"
    assert policy(fake)["enabled"] is True
    assert policy(fake)["mandatory"] is False
    assert policy(fake)["scope"] == {"include_volumes": ["vol1", "vol2"]}

    before = len(fake.mutations())
    again = run_json(capsys, ontap(fake, "apply"))
    assert again["changes"] == 0
    assert len(fake.mutations()) == before

    code = main(ontap(fake, "plan"))
    assert "up to date" in capsys.readouterr().out
    assert code == 0


def test_apply_with_persistent_store_polls_the_job(fake: FakeOntap, capsys: pytest.CaptureFixture[str]) -> None:
    extra = ("--ontap-persistent-store", "ps1", "--ontap-persistent-store-volume", "fpolicy_ps")
    applied = run_json(capsys, ontap(fake, "apply", *extra, "--ontap-protocols", "cifs,nfsv3"))
    assert applied["actions"][0]["step"] == "create_persistent_store"
    assert fake.store("persistent-stores")["ps1"]["volume"] == "fpolicy_ps"
    assert policy(fake)["persistent_store"] == "ps1"
    assert sorted(e["name"] for e in policy(fake)["events"]) == ["fpolicyd_cifs", "fpolicyd_nfsv3"]
    job_polls = [r for r in fake.requests if r.path.startswith("/api/cluster/jobs/")]
    assert len(job_polls) == fake.job_polls  # polled until success, not once more
    assert run_json(capsys, ontap(fake, "apply", *extra, "--ontap-protocols", "cifs,nfsv3"))["changes"] == 0


def test_failed_job_surfaces_the_ontap_message(fake: FakeOntap, capsys: pytest.CaptureFixture[str]) -> None:
    fake.fail_next_job = "Volume fpolicy_ps is not online"
    code = main(
        ontap(fake, "apply", "--ontap-persistent-store", "ps1", "--ontap-persistent-store-volume", "fpolicy_ps")
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "create persistent store ps1 failed" in err
    assert "Volume fpolicy_ps is not online" in err
    assert fake.store("persistent-stores") == {}


def test_repoint_while_enabled_goes_disable_patch_enable(fake: FakeOntap, capsys: pytest.CaptureFixture[str]) -> None:
    run_json(capsys, ontap(fake, "apply"))
    start = len(fake.requests)
    repointed = run_json(capsys, ontap(fake, "repoint", address="10.0.0.77"))
    assert [a["step"] for a in repointed["actions"]] == ["disable_policy", "update_engine", "enable_policy"]
    assert steps([r for r in fake.requests[start:] if r.method == "PATCH"]) == [
        ("PATCH", "policies/fpolicyd", {"enabled": False}),
        ("PATCH", "engines/fpolicyd", {"primary_servers": ["10.0.0.77"]}),
        ("PATCH", "policies/fpolicyd", {"enabled": True, "priority": 1}),
    ]
    assert fake.store("engines")["fpolicyd"]["primary_servers"] == ["10.0.0.77"]
    assert policy(fake)["enabled"] is True
    assert run_json(capsys, ontap(fake, "repoint", address="10.0.0.77"))["changes"] == 0


def test_engine_patch_refused_while_enabled_is_enforced_by_the_fake(fake: FakeOntap) -> None:
    """The rule the disable/enable dance exists for: a direct PATCH of an engine of an enabled policy fails."""
    code = main(ontap(fake, "apply"))
    assert code == 0

    async def patch() -> None:
        connection = OntapConnection(fake.url, fake.username, fake.password, ca_file=fake.ca_file)
        async with OntapClient(connection) as client:
            await client.request(
                "PATCH",
                f"/api/protocols/fpolicy/{fake.svm_uuid()}/engines/fpolicyd",
                body={"primary_servers": ["10.9.9.9"]},
            )

    with pytest.raises(OntapError, match="9764942") as caught:
        uvloop.run(patch())
    assert caught.value.status == 400


def test_refused_patch_reenables_and_says_so(fake: FakeOntap, capsys: pytest.CaptureFixture[str]) -> None:
    """Another enabled policy uses the same engine: ONTAP refuses the PATCH even after ours is disabled. The
    policy is enabled again and the command fails with ONTAP's reason."""
    assert main(ontap(fake, "apply")) == 0
    other = {**policy(fake), "name": "other", "priority": 2}
    fake.store("policies")["other"] = other
    code = main(ontap(fake, "repoint", address="10.0.0.99"))
    err = capsys.readouterr().err
    assert code == 1
    assert "update engine fpolicyd (primary_servers: ['10.0.0.10'] -> ['10.0.0.99']) failed" in err
    assert "9764942" in err
    assert "was enabled again" in err
    assert policy(fake)["enabled"] is True
    assert fake.store("engines")["fpolicyd"]["primary_servers"] == [ADDRESS]


def test_enable_is_retried_then_reported_as_disabled(fake: FakeOntap, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(ontap(fake, "apply")) == 0
    fake.fail_enable = 2  # two failures, the third attempt succeeds
    assert main(ontap(fake, "repoint", "--ontap-enable-attempts", "3", address="10.0.0.5")) == 0
    assert policy(fake)["enabled"] is True
    capsys.readouterr()

    fake.fail_enable = 5
    code = main(ontap(fake, "repoint", "--ontap-enable-attempts", "2", address="10.0.0.6"))
    err = capsys.readouterr().err
    assert code == 1
    assert "enable policy fpolicyd failed after 2 attempt(s)" in err
    assert "policy fpolicyd is DISABLED" in err
    assert "vserver fpolicy enable -vserver svm1 -policy-name fpolicyd -sequence-number 1" in err
    assert policy(fake)["enabled"] is False
    fake.fail_enable = 0
    assert main(ontap(fake, "repoint", address="10.0.0.6")) == 0  # the next start repairs it
    assert policy(fake)["enabled"] is True


def test_tls_verification_is_on_by_default(fake: FakeOntap, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(ontap(fake, "status", ca=False))
    err = capsys.readouterr().err
    assert code == 1
    assert "certificate did not verify" in err
    assert "ontap_ca_file" in err
    assert fake.requests == []  # nothing, not even the credentials, went out
    assert main(ontap(fake, "status")) == 0


def test_plain_http_is_refused(fake: FakeOntap, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ontap(fake, "status")
    argv[argv.index("--ontap-url") + 1] = fake.url.replace("https://", "http://")
    assert main(argv) == 2
    assert "HTTPS only" in capsys.readouterr().err


def test_bad_credentials_give_401(
    fake: FakeOntap, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FPOLICYD_ONTAP_PASSWORD", "wrong")
    code = main(ontap(fake, "apply"))
    err = capsys.readouterr().err
    assert code == 1
    assert "HTTP 401" in err
    assert "not authorized" in err
    assert fake.mutations() == []


def test_missing_password_is_a_settings_error(
    fake: FakeOntap, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FPOLICYD_ONTAP_PASSWORD")
    assert main(ontap(fake, "plan")) == 2
    assert "FPOLICYD_ONTAP_PASSWORD" in capsys.readouterr().err


def test_every_missing_ontap_setting_is_listed_in_one_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in [name for name in os.environ if name.startswith("FPOLICYD_")]:
        monkeypatch.delenv(name)
    for action in ("plan", "apply", "repoint", "status"):
        assert main(["ontap", action]) == 2
        err = capsys.readouterr().err
        for key in ("ontap_url", "ontap_svm", "ontap_username", "ontap_password"):
            assert f"\n  {key}: " in err, (action, err)
    assert main(["ontap", "plan", "--ontap-protocols", "nfsv3", "--ontap-file-operations", "open"]) == 2
    err = capsys.readouterr().err
    assert "ontap_url: needed" in err
    assert "open cannot be monitored over nfsv3" in err  # found with the missing settings, not in a later run


def test_status_reports_state_and_connections(fake: FakeOntap, capsys: pytest.CaptureFixture[str]) -> None:
    missing = run_json(capsys, ontap(fake, "status"))
    assert missing["engine"] is None
    assert missing["policy_enabled"] is False
    assert main(ontap(fake, "apply")) == 0
    fake.connections.append(
        {
            "node": {"name": "node-01", "uuid": "n1"},
            "policy": {"name": "fpolicyd"},
            "server": ADDRESS,
            "state": "connected",
            "type": "primary",
        }
    )
    capsys.readouterr()
    status = run_json(capsys, ontap(fake, "status"))
    assert status["engine"]["primary_servers"] == [ADDRESS]
    assert status["policy_enabled"] is True
    assert status["connections"][0]["state"] == "connected"
    assert main(ontap(fake, "status")) == 0
    assert "connection node-01 -> 10.0.0.10: connected" in capsys.readouterr().out


def test_unknown_svm_and_unsupported_operation(fake: FakeOntap, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ontap(fake, "plan")
    argv[argv.index("--ontap-svm") + 1] = "nosuchsvm"
    assert main(argv) == 1
    assert "SVM 'nosuchsvm' not found" in capsys.readouterr().err
    assert main(ontap(fake, "plan", "--ontap-protocols", "nfsv3", "--ontap-file-operations", "open")) == 2
    assert "open cannot be monitored over nfsv3" in capsys.readouterr().err


def test_address_is_detected_from_the_route_to_ontap(fake: FakeOntap, capsys: pytest.CaptureFixture[str]) -> None:
    planned = run_json(capsys, ontap(fake, "plan", address=None))
    assert planned["address"] == "127.0.0.1"  # the fake listens on loopback


def test_address_comes_from_the_ecs_task_metadata_endpoint(
    fake: FakeOntap, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    document = orjson.dumps({"Networks": [{"NetworkMode": "awsvpc", "IPv4Addresses": ["10.0.2.106"]}]})

    class Metadata(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(document)))
            self.end_headers()
            self.wfile.write(document)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Metadata)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("ECS_CONTAINER_METADATA_URI_V4", f"http://127.0.0.1:{server.server_address[1]}/v4/abc")
        repointed = run_json(capsys, ontap(fake, "apply", address=None))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert repointed["address"] == "10.0.2.106"
    assert fake.store("engines")["fpolicyd"]["primary_servers"] == ["10.0.2.106"]


async def test_serve_repoints_once_listening(fake: FakeOntap, tmp_path: Path) -> None:
    """`ontap_repoint_on_start`: the daemon re-points the engine at its own address after binding, in the
    background; a failure is logged and the daemon keeps serving."""
    assert await asyncio.to_thread(main, ontap(fake, "apply")) == 0
    connection = {
        "ontap_url": fake.url,
        "ontap_username": fake.username,
        "ontap_ca_file": str(fake.ca_file),
        "ontap_svm": "svm1",
        "ontap_server_address": "10.0.0.42",
        "ontap_retry_delay_s": 0,
    }
    daemon = Daemon(make_settings(tmp_path, ontap_repoint_on_start=True, http_port=0, **connection))
    await daemon.start()
    try:
        repoint = next(t for t in asyncio.all_tasks() if t.get_name() == "ontap-repoint")
        assert await asyncio.wait_for(repoint, timeout=60) is True
    finally:
        await daemon.stop()
    assert fake.store("engines")["fpolicyd"]["primary_servers"] == ["10.0.0.42"]
    assert policy(fake)["enabled"] is True

    wrong = make_settings(tmp_path, ontap_password="wrong", **connection)
    assert await repoint_on_start(wrong) is False


# --------------------------------------------------------------------------- join / leave / prune (membership)

#: Short pauses so the membership tests stay fast (the defaults are seconds).
FAST_MEMBERSHIP = (
    "--ontap-membership-backoff-s",
    "0.01",
    "--ontap-membership-settle-s",
    "0.02",
)


def engine(fake: FakeOntap) -> dict[str, Any]:
    return fake.store("engines")["fpolicyd"]


def membership_settings(fake: FakeOntap, tmp_path: Path, **overrides: Any) -> Any:
    return make_settings(
        tmp_path,
        ontap_url=fake.url,
        ontap_username=fake.username,
        ontap_password=fake.password,
        ontap_ca_file=str(fake.ca_file),
        ontap_svm="svm1",
        ontap_retry_delay_s=0,
        ontap_membership_attempts=30,
        ontap_membership_backoff_s=0.01,
        ontap_membership_settle_s=0.05,
        **overrides,
    )


def test_join_leave_keep_the_other_servers_and_change_nothing_when_already_right(
    fake: FakeOntap, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(ontap(fake, "apply")) == 0
    capsys.readouterr()
    start = len(fake.requests)
    joined = run_json(capsys, ontap(fake, "join", *FAST_MEMBERSHIP, address="10.0.0.11"))
    assert engine(fake)["primary_servers"] == [ADDRESS, "10.0.0.11"]
    assert joined["changed"] is True
    assert joined["after"] == {"primary_servers": [ADDRESS, "10.0.0.11"], "secondary_servers": []}
    assert steps([r for r in fake.requests[start:] if r.method == "PATCH"]) == [
        ("PATCH", "policies/fpolicyd", {"enabled": False}),
        ("PATCH", "engines/fpolicyd", {"primary_servers": [ADDRESS, "10.0.0.11"], "secondary_servers": []}),
        ("PATCH", "policies/fpolicyd", {"enabled": True, "priority": 1}),
    ]
    assert policy(fake)["enabled"] is True

    before = len(fake.mutations())
    again = run_json(capsys, ontap(fake, "join", *FAST_MEMBERSHIP, address="10.0.0.11"))
    assert again["changed"] is False
    assert len(fake.mutations()) == before  # no disable → modify → enable window
    assert main(ontap(fake, "join", *FAST_MEMBERSHIP, address="10.0.0.11")) == 0
    assert "join 10.0.0.11: no change" in capsys.readouterr().out

    assert main(ontap(fake, "join", "--secondary", *FAST_MEMBERSHIP, address="10.0.0.12")) == 0
    out = capsys.readouterr().out
    assert "done 2. update engine fpolicyd (secondary_servers: [] -> ['10.0.0.12'])" in out
    assert engine(fake)["secondary_servers"] == ["10.0.0.12"]

    left = run_json(capsys, ontap(fake, "leave", *FAST_MEMBERSHIP, address="10.0.0.11"))
    assert left["after"] == {"primary_servers": [ADDRESS], "secondary_servers": ["10.0.0.12"]}
    before = len(fake.mutations())
    assert run_json(capsys, ontap(fake, "leave", *FAST_MEMBERSHIP, address="10.0.0.11"))["changed"] is False
    assert len(fake.mutations()) == before

    last = run_json(capsys, ontap(fake, "leave", *FAST_MEMBERSHIP, address=ADDRESS))
    assert last["kept"] == [ADDRESS]  # ONTAP needs a primary server
    assert engine(fake)["primary_servers"] == [ADDRESS]


def test_prune_removes_servers_disconnected_longer_than_the_grace(
    fake: FakeOntap, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(ontap(fake, "apply")) == 0
    for address in ("10.0.0.11", "10.0.0.12", "10.0.0.13"):
        assert main(ontap(fake, "join", *FAST_MEMBERSHIP, address=address)) == 0
    fake.connection(ADDRESS, state="connected", age_s=3600)
    fake.connection("10.0.0.11", state="disconnected", age_s=600)
    fake.connection("10.0.0.12", state="disconnected", age_s=30)  # within the grace
    fake.connection("10.0.0.13", state="disconnected", age_s=600, node="node-01")
    fake.connection("10.0.0.13", state="connected", age_s=600, node="node-02")  # connected elsewhere
    capsys.readouterr()
    pruned = run_json(capsys, ontap(fake, "prune", *FAST_MEMBERSHIP, "--grace-s", "120", address=None))
    assert pruned["stale"] == ["10.0.0.11"]
    assert engine(fake)["primary_servers"] == [ADDRESS, "10.0.0.12", "10.0.0.13"]
    before = len(fake.mutations())
    assert run_json(capsys, ontap(fake, "prune", *FAST_MEMBERSHIP, "--grace-s", "120", address=None))["done"] == []
    assert len(fake.mutations()) == before
    assert main(ontap(fake, "prune", *FAST_MEMBERSHIP, "--ontap-prune-grace-s", "10", address=None)) == 0
    assert "done 2. update engine fpolicyd" in capsys.readouterr().out
    assert engine(fake)["primary_servers"] == [ADDRESS, "10.0.0.13"]


async def test_five_concurrent_joins_then_five_concurrent_leaves_lose_nobody(fake: FakeOntap, tmp_path: Path) -> None:
    """Five tasks start together: each reads the engine, and a plain read-modify-write would let the last PATCH
    win. The re-read inside the window, the read-back and the jittered retries end with all five listed."""
    from fpolicyd.ontap.membership import Operation
    from fpolicyd.ontap.ops import change_membership, connection_from_settings

    assert await asyncio.to_thread(main, ontap(fake, "apply")) == 0
    settings = membership_settings(fake, tmp_path)
    addresses = [f"10.0.1.{i}" for i in range(1, 6)]

    async def one(address: str, operation: Operation) -> int:
        async with OntapClient(await connection_from_settings(settings)) as client:
            run = await change_membership(client, settings, fake.svm_uuid(), address, operation)
        return run.attempts

    attempts = await asyncio.gather(*(one(a, Operation.JOIN) for a in addresses))
    assert sorted(engine(fake)["primary_servers"]) == sorted([ADDRESS, *addresses])
    assert policy(fake)["enabled"] is True
    assert max(attempts) > 1, "no task had to retry: the test did not race"

    await asyncio.gather(*(one(a, Operation.LEAVE) for a in addresses))
    assert engine(fake)["primary_servers"] == [ADDRESS]
    assert policy(fake)["enabled"] is True


async def test_an_overwrite_after_the_enable_is_seen_and_retried(fake: FakeOntap, tmp_path: Path) -> None:
    """Deterministic race: right after this task's enable, another instance PATCHes its own stale lists (without
    this address). The read-back sees it and the join is done again, keeping the other's entry."""
    from fpolicyd.ontap.membership import Operation
    from fpolicyd.ontap.ops import change_membership, connection_from_settings

    assert await asyncio.to_thread(main, ontap(fake, "apply")) == 0
    settings = membership_settings(fake, tmp_path)
    overwritten: list[bool] = []

    def other_instance(request: RecordedRequest) -> None:
        if not overwritten and request.body == {"enabled": True, "priority": 1}:
            engine(fake)["primary_servers"] = [ADDRESS, "10.0.2.2"]
            overwritten.append(True)

    fake.after_request = other_instance
    async with OntapClient(await connection_from_settings(settings)) as client:
        run = await change_membership(client, settings, fake.svm_uuid(), "10.0.2.1", Operation.JOIN)
    assert overwritten
    assert run.attempts == 2
    assert engine(fake)["primary_servers"] == [ADDRESS, "10.0.2.2", "10.0.2.1"]


def test_join_refused_by_ontap_reenables_and_reports_why(fake: FakeOntap, capsys: pytest.CaptureFixture[str]) -> None:
    """Another enabled policy uses the engine: every PATCH is refused (9764942); the attempts run out, the
    policy is enabled again and ONTAP's reason is in the error."""
    assert main(ontap(fake, "apply")) == 0
    fake.store("policies")["other"] = {**policy(fake), "name": "other", "priority": 2}
    code = main(ontap(fake, "join", *FAST_MEMBERSHIP, "--ontap-membership-attempts", "2", address="10.0.0.99"))
    err = capsys.readouterr().err
    assert code == 1
    assert "did not settle after ontap_membership_attempts=2 attempts (ONTAP kept refusing" in err
    assert "9764942" in err
    assert policy(fake)["enabled"] is True
    assert engine(fake)["primary_servers"] == [ADDRESS]


def test_repoint_and_join_on_start_exclude_each_other(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ontap_repoint_on_start and ontap_join_on_start exclude each other"):
        make_settings(tmp_path, ontap_repoint_on_start=True, ontap_join_on_start=True)


async def test_serve_joins_once_listening_and_leaves_on_stop(fake: FakeOntap, tmp_path: Path) -> None:
    assert await asyncio.to_thread(main, ontap(fake, "apply")) == 0
    settings = membership_settings(
        fake, tmp_path, ontap_join_on_start=True, ontap_leave_on_stop=True, ontap_server_address="10.0.0.42"
    )
    daemon = Daemon(settings)
    await daemon.start()
    try:
        joined = next(t for t in asyncio.all_tasks() if t.get_name() == "ontap-join")
        assert await asyncio.wait_for(joined, timeout=60) is True
        assert engine(fake)["primary_servers"] == [ADDRESS, "10.0.0.42"]
    finally:
        await daemon.stop()
    assert engine(fake)["primary_servers"] == [ADDRESS]
    assert policy(fake)["enabled"] is True


async def test_leave_on_stop_is_bounded_by_its_timeout(fake: FakeOntap, tmp_path: Path) -> None:
    from fpolicyd.ontap.ops import leave_on_stop

    assert await asyncio.to_thread(main, ontap(fake, "apply")) == 0
    assert await asyncio.to_thread(main, ontap(fake, "join", *FAST_MEMBERSHIP, address="10.0.0.42")) == 0
    fake.after_request = lambda _: time.sleep(0.05)  # a slow ONTAP: every answer takes 50 ms or more
    settings = membership_settings(fake, tmp_path, ontap_server_address="10.0.0.42", ontap_leave_timeout_s=0.1)
    started = time.monotonic()
    assert await leave_on_stop(settings) is False
    assert time.monotonic() - started < 1.0
    fake.after_request = None
    await asyncio.sleep(0.3)  # the abandoned HTTPS connection finishes closing before this test's loop does


async def test_a_leave_cut_short_inside_its_window_still_enables_the_policy(fake: FakeOntap, tmp_path: Path) -> None:
    from fpolicyd.ontap.ops import leave_on_stop

    assert await asyncio.to_thread(main, ontap(fake, "apply")) == 0
    assert await asyncio.to_thread(main, ontap(fake, "join", *FAST_MEMBERSHIP, address="10.0.0.42")) == 0

    def slow_disable(request: RecordedRequest) -> None:
        if request.body == {"enabled": False}:
            time.sleep(1.2)  # the timeout (0.8 s after the start) falls while the disable is answered

    fake.after_request = slow_disable
    settings = membership_settings(fake, tmp_path, ontap_server_address="10.0.0.42", ontap_leave_timeout_s=0.8)
    assert await leave_on_stop(settings) is False
    assert [r.body for r in fake.requests[-2:]] == [{"enabled": False}, {"enabled": True, "priority": 1}]
    assert policy(fake)["enabled"] is True
    assert engine(fake)["primary_servers"] == [ADDRESS, "10.0.0.42"]  # the leave did not happen
