"""What `fpolicyd ontap` and `serve` (``ontap_repoint_on_start``) share: settings → desired state, connection,
the plan of one action, and the start-up repoint that logs instead of raising."""

from __future__ import annotations

import asyncio
import os

from fpolicyd.config import Settings
from fpolicyd.errors import ConfigError
from fpolicyd.obs.log import get_logger
from fpolicyd.ontap.address import ECS_METADATA_ENV, detect_address
from fpolicyd.ontap.client import OntapClient, OntapConnection, OntapError, execute_plan
from fpolicyd.ontap.credentials import resolve_credentials
from fpolicyd.ontap.plan import (
    Desired,
    DesiredEngine,
    DesiredEvent,
    DesiredPolicy,
    DesiredStore,
    EngineType,
    Plan,
    Protocol,
    SslOption,
    event_name_for,
    plan_apply,
    plan_repoint,
)
from fpolicyd.protocol.session import EngineMode

__all__ = [
    "connection_from_settings",
    "desired_from_settings",
    "make_plan",
    "protocols_of",
    "repoint_on_start",
    "start_repoint_on_start",
]

log = get_logger("fpolicyd.ontap")

#: Start-up repoint tasks, referenced until done (the event loop keeps only weak references to tasks).
_BACKGROUND: set[asyncio.Task[bool]] = set()


def protocols_of(settings: Settings) -> tuple[Protocol, ...]:
    try:
        protocols = tuple(dict.fromkeys(Protocol(p.strip().lower()) for p in settings.ontap_protocols))
    except ValueError as exc:
        raise ConfigError(f"ontap_protocols: {exc}; use cifs, nfsv3, nfsv4") from None
    if not protocols:
        raise ConfigError("ontap_protocols: at least one of cifs, nfsv3, nfsv4")
    return protocols


def _ssl_option(settings: Settings) -> SslOption:
    mode = settings.tls_mode.value
    return SslOption.NO_AUTH if mode == "off" else SslOption(mode)


def desired_from_settings(settings: Settings, svm_uuid: str, address: str) -> Desired:
    """The engine points at ``address``:``listen_port``, its type follows ``engine_mode``, its ssl_option
    ``tls_mode`` and its format ``fpolicy_format`` (xml unless protobuf is chosen explicitly; ``auto`` keeps xml,
    the documented format), so ONTAP and fpolicyd always agree."""
    protocols = protocols_of(settings)
    if not settings.ontap_volumes:
        raise ConfigError("ontap_volumes: at least one volume (or * for all)")
    store: DesiredStore | None = None
    if settings.ontap_persistent_store or settings.ontap_persistent_store_volume:
        if not (settings.ontap_persistent_store and settings.ontap_persistent_store_volume):
            raise ConfigError("ontap_persistent_store and ontap_persistent_store_volume go together")
        store = DesiredStore(settings.ontap_persistent_store, settings.ontap_persistent_store_volume)
    operations = frozenset(op.strip().lower() for op in settings.ontap_file_operations)
    events = tuple(DesiredEvent(event_name_for(settings.ontap_event_name, p), p, operations) for p in protocols)
    engine_type = EngineType.SYNCHRONOUS if settings.engine_mode is EngineMode.SYNC else EngineType.ASYNCHRONOUS
    return Desired(
        svm_uuid=svm_uuid,
        engine=DesiredEngine(
            name=settings.ontap_engine_name,
            primary_servers=(address,),
            port=settings.listen_port,
            type=engine_type,
            ssl_option=_ssl_option(settings),
            format="protobuf" if settings.fpolicy_format.value == "protobuf" else "xml",
        ),
        events=events,
        policy=DesiredPolicy(
            name=settings.ontap_policy_name,
            engine=settings.ontap_engine_name,
            events=tuple(e.name for e in events),
            mandatory=settings.ontap_mandatory,
            include_volumes=settings.ontap_volumes,
            priority=settings.ontap_policy_priority,
            persistent_store=store.name if store else None,
        ),
        store=store,
    )


def ontap_problems(settings: Settings, action: str) -> list[str]:
    """Every ontap_* setting ``fpolicyd ontap ACTION`` needs that is missing or unusable, all at once, found
    without contacting ONTAP (so that one run lists them all, not one per run)."""
    problems: list[str] = []
    if not settings.ontap_url:
        problems.append("ontap_url: needed (https://<cluster or SVM management address>)")
    if not settings.ontap_svm:
        problems.append("ontap_svm: needed (the SVM whose FPolicy fpolicyd configures)")
    if not settings.ontap_secret_id:
        if not settings.ontap_username:
            problems.append("ontap_username: needed (or ontap_secret_id with a username in the secret)")
        if settings.ontap_password is None or not settings.ontap_password.get_secret_value():
            problems.append("ontap_password: set FPOLICYD_ONTAP_PASSWORD in the environment, or use ontap_secret_id")
    if action == "status":
        return problems
    if not settings.ontap_volumes:
        problems.append("ontap_volumes: at least one volume (or * for all)")
        return problems
    try:
        desired_from_settings(settings, svm_uuid="", address="0.0.0.0")  # only validated: the address is not used
    except ConfigError as exc:
        problems.append(str(exc))
    return problems


async def connection_from_settings(settings: Settings) -> OntapConnection:
    """Validated connection settings with resolved credentials (ConfigError names the missing key)."""
    if not settings.ontap_url:
        raise ConfigError("ontap_url: needed (https://<cluster or SVM management address>)")
    if not settings.ontap_svm:
        raise ConfigError("ontap_svm: needed (the SVM whose FPolicy fpolicyd configures)")
    credentials = await resolve_credentials(settings)
    return OntapConnection(
        base_url=settings.ontap_url,
        username=credentials.username,
        password=credentials.password,
        ca_file=settings.ontap_ca_file,
        verify_tls=settings.ontap_verify_tls,
        request_timeout_s=settings.ontap_request_timeout_s,
        job_timeout_s=settings.ontap_job_timeout_s,
        job_poll_interval_s=settings.ontap_job_poll_interval_s,
    )


async def make_plan(
    action: str,
    settings: Settings,
    client: OntapClient,
    connection: OntapConnection,
    svm_uuid: str,
    *,
    address_override: str | None = None,
) -> tuple[str, Plan]:
    """The address ONTAP must connect to and the plan of ``action`` (plan/apply or repoint)."""
    address = await detect_address(
        address_override or settings.ontap_server_address,
        ontap_host=connection.host,
        ontap_port=connection.port,
        metadata_uri=os.environ.get(ECS_METADATA_ENV),
        timeout_s=settings.ontap_request_timeout_s,
    )
    if action == "repoint":
        current = await client.read_state(
            svm_uuid, engine=settings.ontap_engine_name, policy=settings.ontap_policy_name, events=(), store=None
        )
        plan = plan_repoint(
            svm_uuid,
            current,
            engine_name=settings.ontap_engine_name,
            policy_name=settings.ontap_policy_name,
            priority=settings.ontap_policy_priority,
            address=address,
        )
        return address, plan
    desired = desired_from_settings(settings, svm_uuid, address)
    current = await client.read_state(
        svm_uuid,
        engine=desired.engine.name,
        policy=desired.policy.name,
        events=tuple(e.name for e in desired.events),
        store=desired.store.name if desired.store else None,
    )
    return address, plan_apply(desired, current)


async def repoint_on_start(settings: Settings) -> bool:
    """``serve`` with ``ontap_repoint_on_start``: repoint once the listener is bound. Never raises: the daemon
    keeps running either way; a failure is logged at error level with ONTAP's reason (and whether the policy
    is left disabled). Returns whether ONTAP now points at this server."""
    try:
        connection = await connection_from_settings(settings)
        async with OntapClient(connection) as client:
            svm_uuid = await client.svm_uuid(settings.ontap_svm or "")
            address, plan = await make_plan("repoint", settings, client, connection, svm_uuid)
            execution = await execute_plan(
                client,
                plan,
                svm_name=settings.ontap_svm or "",
                enable_attempts=settings.ontap_enable_attempts,
                retry_delay_s=settings.ontap_retry_delay_s,
            )
    except (OntapError, ConfigError) as exc:
        log.error("ontap_repoint_failed", error=str(exc), policy=settings.ontap_policy_name)
        return False
    log.info(
        "ontap_repointed",
        address=address,
        policy=settings.ontap_policy_name,
        changes=[a.describe() for a in execution.done],
    )
    return True


def start_repoint_on_start(settings: Settings) -> asyncio.Task[bool]:
    """Run :func:`repoint_on_start` in the background, so a slow ONTAP never delays the daemon's readiness."""
    task = asyncio.get_running_loop().create_task(repoint_on_start(settings), name="ontap-repoint")
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    return task
