"""``fpolicyd ontap plan | apply | repoint | join | leave | prune | status``: configure ONTAP's FPolicy side over its
REST API. ``repoint`` makes this server the engine's only one (one instance); ``join``/``leave``/``prune`` add or
remove servers and keep the other instances' entries (several instances, see :mod:`fpolicyd.ontap.membership`).

Exit codes: 0 done (or nothing to do), 1 ONTAP refused or could not be reached (the message says what ONTAP
said and in which state the policy is), 2 bad settings (raised as ConfigError, handled by ``fpolicyd.cli.main``).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

import orjson

from fpolicyd.cli.main import settings_from_args
from fpolicyd.cli.settings_flags import add_settings_flags
from fpolicyd.errors import settings_refused
from fpolicyd.obs.log import configure_logging
from fpolicyd.pipeline.redaction import Redactor

if TYPE_CHECKING:
    from fpolicyd.config import Settings
    from fpolicyd.ontap.client import OntapClient, OntapConnection
    from fpolicyd.ontap.plan import Plan

# The REST client (aiohttp, AWS) is imported when an ontap command runs, not when any fpolicyd command builds
# its parser: that import alone cost every command ~0.5-1.5 s on a loaded box.

__all__ = ["REQUIRED_SETTINGS", "add_ontap_parser", "run_ontap"]

#: What every ontap command needs (ops.connection_from_settings and credentials.resolve_credentials check them).
REQUIRED_SETTINGS = ("ontap_url", "ontap_svm", "ontap_username", "ontap_password", "ontap_secret_id")

_ACTIONS = {
    "plan": "show what `apply` would change (dry run)",
    "apply": "create or update the engine, events, policy and persistent store, then enable the policy",
    "repoint": "point the engine's primary_servers at this server alone (disable -> update engine -> enable)",
    "join": "add this server to the engine's primary_servers (--secondary: secondary_servers), keeping the others",
    "leave": "remove this server from the engine's primary_servers and secondary_servers, keeping the others",
    "prune": "remove the servers ONTAP has shown disconnected for longer than ontap_prune_grace_s",
    "status": "show the engine, events, policy, persistent store and the FPolicy server connections",
}


def add_ontap_parser(sub: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        "ontap",
        help="configure ONTAP's FPolicy side (engine, event, policy, persistent store) over the REST API",
        description="Talk to the ONTAP REST API (https, certificate verified) with ontap_* settings. Password: "
        "FPOLICYD_ONTAP_PASSWORD or ontap_secret_id (AWS Secrets Manager). Exit 1 when ONTAP refuses.",
    )
    actions = parser.add_subparsers(dest="ontap_action", required=True)
    for name, help_text in _ACTIONS.items():
        action = actions.add_parser(name, help=help_text, description=help_text)
        if name == "join":
            action.add_argument(
                "--secondary",
                action="store_true",
                help="join the engine's secondary_servers (used when no primary server answers)",
            )
        if name == "prune":
            action.add_argument(
                "--grace-s",
                type=float,
                metavar="SECONDS",
                help="disconnected for longer than this (overrides ontap_prune_grace_s)",
            )
        if name not in ("status", "prune"):
            action.add_argument(
                "--address",
                help="IP address ONTAP connects to (overrides ontap_server_address; default: detected)",
            )
        action.add_argument(
            "--format",
            choices=("text", "json"),
            default="text",
            help="text for people, json for scripts (default text)",
        )
        add_settings_flags(
            action,
            required=REQUIRED_SETTINGS,
            required_title="required settings: where ONTAP is, which SVM, and credentials (ontap_username and "
            "ontap_password, or ontap_secret_id)",
            described=("ontap",),
        )
    parser.set_defaults(func=run_ontap)
    return parser


def _write(data: dict[str, Any], fmt: str, lines: list[str]) -> None:
    if fmt == "json":
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write("".join(line + "\n" for line in lines))


def _plan_lines(plan: Plan, verb: str) -> list[str]:
    if plan.empty:
        return [f"policy {plan.policy}: up to date, nothing to change"]
    return [f"{verb} {i}. {action.describe()}" for i, action in enumerate(plan.actions, 1)]


async def _status(client: OntapClient, settings: Settings, svm: str, svm_uuid: str, fmt: str) -> int:
    from fpolicyd.ontap.ops import protocols_of  # noqa: PLC0415
    from fpolicyd.ontap.plan import event_name_for  # noqa: PLC0415

    event_names = tuple(event_name_for(settings.ontap_event_name, p) for p in protocols_of(settings))
    state = await client.read_state(
        svm_uuid,
        engine=settings.ontap_engine_name,
        policy=settings.ontap_policy_name,
        events=event_names,
        store=settings.ontap_persistent_store,
    )
    connections = await client.connections(svm_uuid, settings.ontap_policy_name)
    data: dict[str, Any] = {
        "svm": {"name": svm, "uuid": svm_uuid},
        "engine": state.engine,
        "events": dict(state.events),
        "policy": state.policy,
        "policy_enabled": state.policy_enabled,
        "persistent_store": state.store,
        "connections": connections,
    }
    engine = state.engine or {}
    lines = [
        f"svm {svm} ({svm_uuid})",
        f"engine {settings.ontap_engine_name}: "
        + (
            f"primary_servers={engine.get('primary_servers')} port={engine.get('port')} type={engine.get('type')} "
            f"format={engine.get('format')} ssl_option={engine.get('ssl_option')}"
            if state.engine
            else "missing"
        ),
        *(f"event {name}: {'present' if record else 'missing'}" for name, record in state.events.items()),
        f"policy {settings.ontap_policy_name}: "
        + (("enabled" if state.policy_enabled else "DISABLED") if state.policy else "missing"),
    ]
    if settings.ontap_persistent_store:
        lines.append(f"persistent store {settings.ontap_persistent_store}: {'present' if state.store else 'missing'}")
    if connections is None:
        lines.append("connections: not available on this ONTAP (9.10+)")
    else:
        lines.extend(
            f"connection {c.get('node', {}).get('name', '?')} -> {c.get('server')}: {c.get('state')}"
            + (f" ({c['disconnected_reason'].get('message')})" if c.get("disconnected_reason") else "")
            for c in connections
        )
    _write(data, fmt, lines)
    return 0


async def _membership(
    ns: argparse.Namespace, settings: Settings, client: OntapClient, connection: OntapConnection, svm_uuid: str
) -> int:
    from fpolicyd.ontap.membership import Operation, Role  # noqa: PLC0415
    from fpolicyd.ontap.ops import change_membership, detect_this_address, stale_from_ontap  # noqa: PLC0415

    operation = Operation(ns.ontap_action)
    role = Role.SECONDARY if getattr(ns, "secondary", False) else Role.PRIMARY
    stale: frozenset[str] = frozenset()
    if operation is Operation.PRUNE:
        grace_s = ns.grace_s if ns.grace_s is not None else settings.ontap_prune_grace_s
        if grace_s <= 0:
            sys.stderr.write(f"fpolicyd ontap prune: --grace-s must be > 0, got {grace_s:g}\n")
            return 2
        stale = await stale_from_ontap(client, settings, svm_uuid, grace_s)
        address = ""
    else:
        address = await detect_this_address(settings, connection, ns.address)
    run = await change_membership(client, settings, svm_uuid, address, operation, role=role, stale=stale)
    membership = run.membership
    report: dict[str, Any] = {
        "svm": settings.ontap_svm,
        "policy": settings.ontap_policy_name,
        "operation": operation.value,
        "changed": membership.changed or bool(run.done),
        "before": membership.before.to_dict(),
        "after": membership.after.to_dict(),
        "kept": list(membership.kept),
        "attempts": run.attempts,
        "done": list(run.done),
    }
    if operation is Operation.PRUNE:
        report["stale"] = sorted(stale)
    else:
        report["address"] = address
        if operation is Operation.JOIN:
            report["role"] = role.value
    who = f"{operation.value} {address}".rstrip() if address else operation.value
    lines = [f"{who}: no change (engine {settings.ontap_engine_name} already right)"] if not run.done else []
    lines.extend(f"done {i}. {what}" for i, what in enumerate(run.done, 1))
    lines.extend(f"kept {kept}: the engine's last primary server (ONTAP needs one)" for kept in membership.kept)
    after = membership.after
    lines.append(f"primary_servers={list(after.primary)} secondary_servers={list(after.secondary)}")
    _write(report, ns.format, lines)
    return 0


async def _run(ns: argparse.Namespace, settings: Settings) -> int:
    from fpolicyd.ontap.client import OntapClient, execute_plan  # noqa: PLC0415
    from fpolicyd.ontap.ops import connection_from_settings, make_plan  # noqa: PLC0415

    connection = await connection_from_settings(settings)
    svm = settings.ontap_svm or ""
    async with OntapClient(connection) as client:
        svm_uuid = await client.svm_uuid(svm)
        if ns.ontap_action == "status":
            return await _status(client, settings, svm, svm_uuid, ns.format)
        if ns.ontap_action in ("join", "leave", "prune"):
            return await _membership(ns, settings, client, connection, svm_uuid)
        address, plan = await make_plan(
            ns.ontap_action, settings, client, connection, svm_uuid, address_override=ns.address
        )
        report: dict[str, Any] = {"svm": svm, "address": address, **plan.to_dict()}
        if ns.ontap_action == "plan":
            _write(report, ns.format, _plan_lines(plan, "would"))
            return 0
        execution = await execute_plan(
            client,
            plan,
            svm_name=svm,
            enable_attempts=settings.ontap_enable_attempts,
            retry_delay_s=settings.ontap_retry_delay_s,
        )
        report["done"] = [a.describe() for a in execution.done]
        _write(report, ns.format, _plan_lines(plan, "done"))
        return 0


def run_ontap(ns: argparse.Namespace) -> int:
    import uvloop  # noqa: PLC0415

    from fpolicyd.ontap.client import OntapError  # noqa: PLC0415
    from fpolicyd.ontap.ops import ontap_problems  # noqa: PLC0415

    settings = settings_from_args(ns)
    problems = ontap_problems(settings, ns.ontap_action)
    if problems:
        raise settings_refused(problems)
    configure_logging(settings.log_level, settings.log_format.value, redactor=Redactor())
    try:
        return uvloop.run(_run(ns, settings))
    except OntapError as exc:
        sys.stderr.write(f"fpolicyd ontap {ns.ontap_action}: {exc}\n")
        return 1
