"""ONTAP credentials from AWS Secrets Manager, against a moto server the tests start (never the real AWS)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from fpolicyd.cli.main import main
from fpolicyd.config import load_settings
from fpolicyd.errors import ConfigError
from fpolicyd.ontap.credentials import Credentials, resolve_credentials
from fpolicyd.sinks.aws.clients import AwsClients
from support.fake_ontap import running_fake_ontap
from support.moto_server import MotoEndpoint, isolate_aws_env, unique


@pytest.fixture
def aws_env(moto: MotoEndpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MotoEndpoint:
    isolate_aws_env(monkeypatch, tmp_path, moto, via_env=True)
    monkeypatch.delenv("FPOLICYD_ONTAP_PASSWORD", raising=False)
    monkeypatch.chdir(tmp_path)
    return moto


@pytest.fixture
async def clients(aws_env: MotoEndpoint) -> AsyncIterator[AwsClients]:
    async with AwsClients(endpoint_url=aws_env.url, region_name=aws_env.region) as made:
        yield made


async def put_secret(clients: AwsClients, value: str) -> str:
    secrets = await clients.client("secretsmanager")
    name = unique("ontap/fpolicyd")
    await secrets.create_secret(Name=name, SecretString=value)
    return name


async def test_secret_gives_username_and_password(clients: AwsClients) -> None:
    secret = await put_secret(clients, orjson.dumps({"username": "vsadmin", "password": "p@ss:word"}).decode())
    settings = load_settings(None, {"ontap_secret_id": secret, "ontap_username": "ignored"}, search_default_paths=False)
    got = await resolve_credentials(settings, clients)
    assert got == Credentials("vsadmin", "p@ss:word")
    assert "p@ss" not in repr(got)


async def test_username_may_come_from_the_settings(clients: AwsClients) -> None:
    secret = await put_secret(clients, '{"password": "only-the-password"}')
    settings = load_settings(None, {"ontap_secret_id": secret, "ontap_username": "admin"}, search_default_paths=False)
    assert await resolve_credentials(settings, clients) == Credentials("admin", "only-the-password")


async def test_missing_or_malformed_secret_is_a_clear_settings_error(clients: AwsClients) -> None:
    settings = load_settings(None, {"ontap_secret_id": "no-such-secret"}, search_default_paths=False)
    with pytest.raises(ConfigError, match=r"ontap_secret_id no-such-secret: Secrets Manager refused: ResourceNotFound"):
        await resolve_credentials(settings, clients)
    not_json = await put_secret(clients, "user=admin password=x")
    settings = load_settings(None, {"ontap_secret_id": not_json}, search_default_paths=False)
    with pytest.raises(ConfigError, match="not JSON"):
        await resolve_credentials(settings, clients)
    no_password = await put_secret(clients, '{"username": "admin"}')
    settings = load_settings(None, {"ontap_secret_id": no_password}, search_default_paths=False)
    with pytest.raises(ConfigError, match='no "password"'):
        await resolve_credentials(settings, clients)


async def test_cli_apply_reads_the_secret_from_the_standard_aws_environment(
    clients: AwsClients, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fpolicyd ontap apply --ontap-secret-id` with no password anywhere else: the secret (found through
    AWS_ENDPOINT_URL / AWS_REGION, as on ECS with the task role) authenticates against the fake ONTAP."""
    with running_fake_ontap(tmp_path) as fake:
        secret = await put_secret(
            clients, orjson.dumps({"username": fake.username, "password": fake.password}).decode()
        )
        argv = [
            "ontap",
            "apply",
            "--ontap-url",
            fake.url,
            "--ontap-ca-file",
            str(fake.ca_file),
            "--ontap-svm",
            "svm1",
            "--ontap-secret-id",
            secret,
            "--address",
            "10.1.2.3",
            "--log-level",
            "error",
        ]
        # main() runs its own event loop; run it on a worker thread so that this test's loop stays free.
        code = await asyncio.to_thread(main, argv)
        assert code == 0, capsys.readouterr().err
        assert fake.store("policies")["fpolicyd"]["enabled"] is True
        assert fake.store("engines")["fpolicyd"]["primary_servers"] == ["10.1.2.3"]
