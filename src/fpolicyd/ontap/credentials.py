"""ONTAP REST credentials: from AWS Secrets Manager (``ontap_secret_id``) or from the settings/environment.

The secret is a JSON object ``{"username": "...", "password": "..."}`` (the shape the AWS console's "other type
of secret" key/value editor produces). The password is never logged and never part of a repr.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from botocore.exceptions import BotoCoreError, ClientError

from fpolicyd.config import Settings
from fpolicyd.errors import ConfigError
from fpolicyd.sinks.aws.clients import AwsClients

__all__ = ["Credentials", "credentials_from_secret", "resolve_credentials"]


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)


def credentials_from_secret(secret_id: str, secret_string: str | None, fallback_username: str | None) -> Credentials:
    """Parse a secret's ``SecretString``; the username may come from the settings when the secret has none."""
    if not secret_string:
        raise ConfigError(f"ontap_secret_id {secret_id}: the secret has no SecretString (binary secrets are not read)")
    try:
        data = orjson.loads(secret_string)
    except orjson.JSONDecodeError:
        raise ConfigError(
            f'ontap_secret_id {secret_id}: the secret is not JSON; expected {{"username": ..., "password": ...}}'
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f'ontap_secret_id {secret_id}: expected a JSON object {{"username": ..., "password": ...}}')
    password = data.get("password")
    username = data.get("username") or fallback_username
    if not isinstance(password, str) or not password:
        raise ConfigError(f'ontap_secret_id {secret_id}: the secret has no "password"')
    if not isinstance(username, str) or not username:
        raise ConfigError(f'ontap_secret_id {secret_id}: the secret has no "username" and ontap_username is not set')
    return Credentials(username, password)


async def _fetch_secret(secret_id: str, clients: AwsClients) -> str | None:
    client: Any = await clients.client("secretsmanager")
    try:
        response = await client.get_secret_value(SecretId=secret_id)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        reason = f"{error.get('Code', '?')}: {error.get('Message', exc)}"
        raise ConfigError(f"ontap_secret_id {secret_id}: Secrets Manager refused: {reason}") from None
    except BotoCoreError as exc:  # no credentials, endpoint unreachable, ...
        raise ConfigError(f"ontap_secret_id {secret_id}: cannot read the secret: {exc}") from None
    value = response.get("SecretString")
    return value if isinstance(value, str) else None


async def resolve_credentials(settings: Settings, clients: AwsClients | None = None) -> Credentials:
    """``ontap_secret_id`` when set (read with the standard AWS environment, or ``clients``), else
    ``ontap_username`` + ``ontap_password`` (``FPOLICYD_ONTAP_PASSWORD``)."""
    if settings.ontap_secret_id:
        if clients is not None:
            secret = await _fetch_secret(settings.ontap_secret_id, clients)
        else:
            async with AwsClients(region_name=settings.aws_region, connect_timeout_s=5.0, read_timeout_s=15.0) as own:
                secret = await _fetch_secret(settings.ontap_secret_id, own)
        return credentials_from_secret(settings.ontap_secret_id, secret, settings.ontap_username)
    if not settings.ontap_username:
        raise ConfigError("ontap_username: needed (or ontap_secret_id with a username in the secret)")
    if settings.ontap_password is None or not settings.ontap_password.get_secret_value():
        raise ConfigError("ontap_password: set FPOLICYD_ONTAP_PASSWORD in the environment, or use ontap_secret_id")
    return Credentials(settings.ontap_username, settings.ontap_password.get_secret_value())
