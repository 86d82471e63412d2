"""What `fpolicyd ontap` and `serve` (``ontap_repoint_on_start``, ``ontap_join_on_start``, ``ontap_leave_on_stop``)
share: settings → desired state, connection, the plan of one action, the membership changes (join, leave, prune)
with their re-read-and-retry loop, and the start-up / stop-time calls that log instead of raising."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fpolicyd.config import Settings
from fpolicyd.errors import ConfigError
from fpolicyd.obs.log import get_logger
from fpolicyd.ontap.address import ECS_METADATA_ENV, detect_address
from fpolicyd.ontap.client import OntapAuthError, OntapClient, OntapConnection, OntapError, execute_plan
from fpolicyd.ontap.credentials import resolve_credentials
from fpolicyd.ontap.membership import (
    Membership,
    Operation,
    Role,
    Servers,
    join,
    leave,
    plan_membership,
    prune,
    stale_servers,
)
from fpolicyd.ontap.plan import (
    CurrentState,
    Desired,
    DesiredEngine,
    DesiredEvent,
    DesiredPolicy,
    DesiredStore,
    EngineType,
    Plan,
    Protocol,
    SslOption,
    Step,
    event_name_for,
    plan_apply,
    plan_repoint,
    policy_disable,
    policy_enable,
)
from fpolicyd.protocol.session_config import EngineMode

__all__ = [
    "ENGINE_IN_USE_CODE",
    "MEMBERSHIP_BACKOFF_CAP_S",
    "MembershipRun",
    "change_membership",
    "connection_from_settings",
    "desired_from_settings",
    "join_on_start",
    "leave_on_stop",
    "make_plan",
    "protocols_of",
    "repoint_on_start",
    "start_join_on_start",
    "start_repoint_on_start",
]

log = get_logger("fpolicyd.ontap")

#: ONTAP's error code for "at least one FPolicy policy is using the FPolicy engine": the engine PATCH came after
#: another instance enabled the policy again. The window is re-opened and the change retried.
ENGINE_IN_USE_CODE = "9764942"

#: Longest pause between two join/leave/prune attempts (the jittered backoff doubles up to it).
MEMBERSHIP_BACKOFF_CAP_S = 10.0

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
        current = await _read_engine(client, svm_uuid, settings)
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


def _in_background(work: Coroutine[Any, Any, bool], name: str) -> asyncio.Task[bool]:
    """Run ``work`` as a task the module keeps a reference to until it ends (so it is not collected mid-run)."""
    task = asyncio.get_running_loop().create_task(work, name=name)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    return task


def start_repoint_on_start(settings: Settings) -> asyncio.Task[bool]:
    """Run :func:`repoint_on_start` in the background, so a slow ONTAP never delays the daemon's readiness."""
    return _in_background(repoint_on_start(settings), "ontap-repoint")


# ------------------------------------------------------------------------------------------- membership


@dataclass(frozen=True, slots=True)
class MembershipRun:
    """What :func:`change_membership` did: the operation's last outcome (on the lists read last), every action
    run over all attempts, and how many attempts it took."""

    address: str
    membership: Membership
    done: tuple[str, ...]
    attempts: int


def _operation(
    operation: Operation, address: str, role: Role, stale: frozenset[str]
) -> Callable[[Servers], Membership]:
    if operation is Operation.JOIN:
        return lambda servers: join(servers, address, role)
    if operation is Operation.LEAVE:
        return lambda servers: leave(servers, address)
    return lambda servers: prune(servers, stale)


def _backoff_s(settings: Settings, attempt: int) -> float:
    """Full jitter: random in [0, ontap_membership_backoff_s x 2^(attempt-2)] (attempt 2 is the first retry), at
    most :data:`MEMBERSHIP_BACKOFF_CAP_S`."""
    ceiling = min(MEMBERSHIP_BACKOFF_CAP_S, settings.ontap_membership_backoff_s * 2 ** (attempt - 2))
    return random.uniform(0.0, ceiling)


async def _read_engine(client: OntapClient, svm_uuid: str, settings: Settings) -> CurrentState:
    """The engine and the policy only (what repoint and membership changes read and write)."""
    return await client.read_state(
        svm_uuid, engine=settings.ontap_engine_name, policy=settings.ontap_policy_name, events=(), store=None
    )


def _plan(settings: Settings, svm_uuid: str, state: CurrentState, membership: Membership, *, enable: bool) -> Plan:
    return plan_membership(
        svm_uuid,
        state,
        membership,
        engine_name=settings.ontap_engine_name,
        policy_name=settings.ontap_policy_name,
        priority=settings.ontap_policy_priority,
        enable_if_disabled=enable,
    )


async def _run_plan(client: OntapClient, settings: Settings, plan: Plan, done: list[str]) -> None:
    execution = await execute_plan(
        client,
        plan,
        svm_name=settings.ontap_svm or "",
        enable_attempts=settings.ontap_enable_attempts,
        retry_delay_s=settings.ontap_retry_delay_s,
    )
    done.extend(a.describe() for a in execution.done)


async def _stable(
    client: OntapClient, svm_uuid: str, settings: Settings, change: Callable[[Servers], Membership]
) -> bool:
    """The operation is a no-op on the engine read back now and, after ``ontap_membership_settle_s``, again."""
    for pause in (0.0, settings.ontap_membership_settle_s):
        if pause:
            await asyncio.sleep(pause)
        state = await _read_engine(client, svm_uuid, settings)
        if change(Servers.of_engine(state.engine or {})).changed:
            return False
    return True


async def change_membership(
    client: OntapClient,
    settings: Settings,
    svm_uuid: str,
    address: str,
    operation: Operation,
    *,
    role: Role = Role.PRIMARY,
    stale: frozenset[str] = frozenset(),
) -> MembershipRun:
    """Join, leave or prune with as few engine changes as possible, safe against other instances doing the same.

    ONTAP has no conditional write, so this re-reads and retries until stable: read the engine; if the operation
    changes nothing, stop (a join still enables a disabled policy). Else disable the policy, read the engine
    again *inside* that window (so a change another instance made meanwhile is kept), PATCH both server lists,
    enable, and read the engine back, at once and after ``ontap_membership_settle_s``. If another instance's
    PATCH replaced the lists (the operation would change them again), or ONTAP refused the PATCH because
    another instance enabled the policy in between (:data:`ENGINE_IN_USE_CODE`), try again after a jittered
    pause, at most ``ontap_membership_attempts`` times. A window this run opened is always closed (enabled), also
    when the run is cancelled inside it (the enable then still runs, so a cancel waits for it)."""
    change = _operation(operation, address, role, stale)
    done: list[str] = []
    refused: OntapError | None = None
    for attempt in range(1, settings.ontap_membership_attempts + 1):
        if attempt > 1:
            await asyncio.sleep(_backoff_s(settings, attempt))
        state = await _read_engine(client, svm_uuid, settings)
        membership = change(Servers.of_engine(state.engine or {}))
        plan = _plan(settings, svm_uuid, state, membership, enable=operation is Operation.JOIN)
        if not membership.changed:
            if not plan.empty:  # a joining task wants notifications: a disabled policy is enabled
                await _run_plan(client, settings, plan, done)
            return MembershipRun(address, membership, tuple(done), attempt)
        # Disabled even when found disabled (another instance's window): this run's PATCH needs its own window.
        opened = policy_disable(svm_uuid, settings.ontap_policy_name)
        enable = policy_enable(svm_uuid, settings.ontap_policy_name, settings.ontap_policy_priority)
        try:
            await _run_plan(client, settings, Plan((opened,), plan.policy), done)
            # Inside the window: the lists as they are now, with any change another instance made meanwhile.
            inside = await _read_engine(client, svm_uuid, settings)
            membership = change(Servers.of_engine(inside.engine or {}))
            patch = next(
                (
                    a
                    for a in _plan(settings, svm_uuid, inside, membership, enable=False).actions
                    if a.step is Step.UPDATE_ENGINE
                ),
                None,
            )
            if patch is not None:
                await client.request(patch.method.value, patch.path, body=patch.body)
                done.append(patch.describe())
        except asyncio.CancelledError:
            # Cut short (ontap_leave_timeout_s): the window this run may have opened is closed all the same, or
            # every instance would stop receiving notifications.
            await _run_plan(client, settings, Plan((enable,), plan.policy), done)
            raise
        except OntapError as exc:
            await _run_plan(client, settings, Plan((enable,), plan.policy), done)
            if isinstance(exc, OntapAuthError) or exc.code != ENGINE_IN_USE_CODE:
                raise
            refused = exc
            log.info("ontap_membership_retry", operation=operation.value, attempt=attempt, reason="engine_in_use")
            continue
        await _run_plan(client, settings, Plan((enable,), plan.policy), done)
        if await _stable(client, svm_uuid, settings, change):
            return MembershipRun(address, membership, tuple(done), attempt)
        refused = None
        log.info("ontap_membership_retry", operation=operation.value, attempt=attempt, reason="overwritten")
    why = (
        f"ONTAP kept refusing the engine change, last: {refused}"
        if refused is not None
        else "other instances kept changing them at the same time"
    )
    raise OntapError(
        f"ontap {operation.value} {address}: the engine's server lists did not settle after "
        f"ontap_membership_attempts={settings.ontap_membership_attempts} attempts ({why}); the policy is enabled",
        status=refused.status if refused else None,
        code=refused.code if refused else None,
    )


async def detect_this_address(settings: Settings, connection: OntapConnection, override: str | None = None) -> str:
    return await detect_address(
        override or settings.ontap_server_address,
        ontap_host=connection.host,
        ontap_port=connection.port,
        metadata_uri=os.environ.get(ECS_METADATA_ENV),
        timeout_s=settings.ontap_request_timeout_s,
    )


async def stale_from_ontap(client: OntapClient, settings: Settings, svm_uuid: str, grace_s: float) -> frozenset[str]:
    """Servers ONTAP shows disconnected on every node for longer than ``grace_s``."""
    connections = await client.connections(svm_uuid, settings.ontap_policy_name)
    if connections is None:
        raise OntapError(
            "ontap prune: GET /api/protocols/fpolicy/{svm.uuid}/connections is not available on this ONTAP (9.10+)"
        )
    return stale_servers(connections, now=datetime.now(UTC), grace_s=grace_s)


async def _membership_in_background(settings: Settings, operation: Operation) -> bool:
    try:
        connection = await connection_from_settings(settings)
        async with OntapClient(connection) as client:
            svm_uuid = await client.svm_uuid(settings.ontap_svm or "")
            address = await detect_this_address(settings, connection)
            run = await change_membership(client, settings, svm_uuid, address, operation)
    except (OntapError, ConfigError) as exc:
        log.error(f"ontap_{operation.value}_failed", error=str(exc), policy=settings.ontap_policy_name)
        return False
    log.info(
        f"ontap_{operation.value}_done",
        address=run.address,
        policy=settings.ontap_policy_name,
        servers=run.membership.after.to_dict(),
        kept=list(run.membership.kept),
        attempts=run.attempts,
        changes=list(run.done),
    )
    return True


async def join_on_start(settings: Settings) -> bool:
    """``serve`` with ``ontap_join_on_start``: join as a primary server once listening. Never raises (logged)."""
    return await _membership_in_background(settings, Operation.JOIN)


def start_join_on_start(settings: Settings) -> asyncio.Task[bool]:
    """Run :func:`join_on_start` in the background, so a slow ONTAP never delays the daemon's readiness."""
    return _in_background(join_on_start(settings), "ontap-join")


async def leave_on_stop(settings: Settings) -> bool:
    """``serve`` with ``ontap_leave_on_stop``: leave, at most ``ontap_leave_timeout_s`` (plus, when the time runs
    out inside the disable → modify → enable window, the enable that closes it). Never raises (logged)."""
    try:
        return await asyncio.wait_for(
            _membership_in_background(settings, Operation.LEAVE), timeout=settings.ontap_leave_timeout_s
        )
    except TimeoutError:
        log.error(
            "ontap_leave_failed",
            error=f"not done within ontap_leave_timeout_s={settings.ontap_leave_timeout_s:g}",
            policy=settings.ontap_policy_name,
        )
        return False
