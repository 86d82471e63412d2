"""``fpolicyd routes export|check``: the routes file turned into EventBridge patterns, a CloudFormation template
or a normalized routes file, and a "which routes take this path, and why" explainer.

Everything is generated from one :class:`RouteTable` (the ``routes_file`` setting, else the packaged 17 routes;
``--routes`` overrides) and the EventBridge source/detail-type come from the settings, so the rules deployed on
the bus and the daemon's in-process routing cannot drift apart.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from fpolicyd.config import Settings, load_settings
from fpolicyd.errors import ConfigError
from fpolicyd.pipeline.router import (
    EVENTBRIDGE_PATTERN_QUOTA_CHARS,
    KNOWN_OPERATIONS,
    Route,
    Router,
    RouteTable,
    event_pattern,
)

#: CloudFormation's per-template quotas this export can run into.
CFN_MAX_RESOURCES: Final = 500
CFN_MAX_PARAMETERS: Final = 200
#: Largest ``Description`` of an ``AWS::Events::Rule``.
CFN_RULE_DESCRIPTION_MAX: Final = 512

_FORMATS: Final = ("eventbridge", "cloudformation", "toml")


def add_routes_parser(sub: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        "routes",
        help="export the use-case routes (EventBridge, CloudFormation, TOML) or check which routes match a path",
        description="The use-case routes of the `routes_file` setting (default: the 17 packaged reference routes), "
        "matched as EventBridge matches: any prefix or any suffix of file_path, and operation_type listed.",
    )
    actions = parser.add_subparsers(dest="routes_action", required=True)

    export = actions.add_parser(
        "export",
        help="print the routes as EventBridge patterns, a CloudFormation template or a routes file",
        description="eventbridge: a JSON object {route name: event pattern}. cloudformation: a JSON template with "
        "one AWS::Events::Rule per route on an EventBusName parameter and one ARN parameter per target. toml: the "
        "routes file, normalized (`> config/routes.toml` regenerates the editable copy).",
    )
    export.add_argument("--format", choices=_FORMATS, required=True, help="output format")
    _add_common(export)

    check = actions.add_parser(
        "check",
        help="show which routes match a path and operation, and why",
        description="Every route that takes the event, and for the others why not. Exit 0 whether or not a route "
        "matches (an unrouted event is a valid outcome); exit 2 on a bad routes file.",
    )
    check.add_argument("path", help="file_path as in the event, e.g. /legal/audit/report.pdf")
    check.add_argument("--op", required=True, choices=sorted(KNOWN_OPERATIONS), help="operation_type")
    check.add_argument("--json", action="store_true", help="print a JSON document instead of text")
    _add_common(check)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--routes", type=Path, help="routes file (default: the routes_file setting, else packaged)")
    parser.add_argument(
        "--strict",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="strict ownership: only prefixes count (default: the routes_strict setting)",
    )
    parser.add_argument("--config", type=Path, help="settings file (default ./fpolicyd.toml, /etc/fpolicyd/)")


@dataclass(frozen=True, slots=True)
class _Context:
    table: RouteTable
    strict: bool
    settings: Settings


def _context(ns: argparse.Namespace) -> _Context:
    settings = load_settings(ns.config)
    path = ns.routes if ns.routes is not None else settings.routes_file
    strict = ns.strict if ns.strict is not None else settings.routes_strict
    return _Context(RouteTable.load(path), strict, settings)


def run_routes(ns: argparse.Namespace) -> int:
    context = _context(ns)
    if ns.routes_action == "check":
        return _check(context, ns.path, ns.op, as_json=ns.json)
    if ns.format == "toml":
        sys.stdout.write(context.table.to_toml())
        return 0
    patterns = eventbridge_patterns(
        context.table,
        source=context.settings.eventbridge_source,
        detail_type=context.settings.eventbridge_detail_type,
        strict=context.strict,
    )
    for route in context.table.routes:
        if route.name not in patterns:
            sys.stderr.write(f"fpolicyd routes: {route.name}: no prefixes, so strict mode leaves it no rule\n")
        elif len(_compact(patterns[route.name])) > EVENTBRIDGE_PATTERN_QUOTA_CHARS:
            sys.stderr.write(
                f"fpolicyd routes: {route.name}: its pattern exceeds EventBridge's default quota of "
                f"{EVENTBRIDGE_PATTERN_QUOTA_CHARS} characters per event pattern (adjustable to 4096)\n"
            )
    document = patterns if ns.format == "eventbridge" else cloudformation_template(context.table, patterns)
    sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def _compact(pattern: dict[str, Any]) -> str:
    return orjson.dumps(pattern).decode()


def eventbridge_patterns(
    table: RouteTable, *, source: str, detail_type: str, strict: bool = False
) -> dict[str, dict[str, Any]]:
    """Route name → event pattern, in table order (strict mode omits routes that have no prefix)."""
    out: dict[str, dict[str, Any]] = {}
    for route in table.routes:
        pattern = event_pattern(route, source=source, detail_type=detail_type, strict=strict)
        if pattern is not None:
            out[route.name] = pattern
    return out


def _logical_id(text: str, suffix: str, taken: set[str]) -> str:
    """A CloudFormation logical id (alphanumeric) from free text: ``legal-compliance`` → ``LegalComplianceRule``."""
    words = re.split(r"[^A-Za-z0-9]+", text)
    base = "".join(word[:1].upper() + word[1:] for word in words) + suffix
    candidate, n = base, 2
    while candidate in taken:
        candidate, n = f"{base}{n}", n + 1
    taken.add(candidate)
    return candidate


def cloudformation_template(table: RouteTable, patterns: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One ``AWS::Events::Rule`` per exported pattern on the ``EventBusName`` parameter, each invoking its
    route's target, whose ARN is a parameter (one per distinct target)."""
    routes = [route for route in table.routes if route.name in patterns]
    taken: set[str] = {"EventBusName", "TargetRoleArn"}
    target_params: dict[str, str] = {}
    for route in routes:
        if route.target not in target_params:
            target_params[route.target] = _logical_id(route.target, "Arn", taken)
    if len(routes) > CFN_MAX_RESOURCES:
        raise ConfigError(
            f"cloudformation: {len(routes)} rules exceed CloudFormation's {CFN_MAX_RESOURCES} resources per "
            "template; split the routes file"
        )
    if len(target_params) + 2 > CFN_MAX_PARAMETERS:
        raise ConfigError(
            f"cloudformation: {len(target_params)} distinct targets exceed CloudFormation's {CFN_MAX_PARAMETERS} "
            "parameters per template; share targets or split the routes file"
        )
    parameters: dict[str, Any] = {
        "EventBusName": {"Type": "String", "Description": "Name of the event bus fpolicyd sends to."},
        "TargetRoleArn": {
            "Type": "String",
            "Default": "",
            "Description": "IAM role EventBridge assumes to invoke the targets (needed for Step Functions state "
            "machines); empty for targets that use resource policies (Lambda, SQS).",
        },
    }
    for target, param in target_params.items():
        users = ", ".join(route.name for route in routes if route.target == target)
        parameters[param] = {"Type": "String", "Description": f"ARN of {target} (routes: {users})"[:4000]}
    resources: dict[str, Any] = {}
    for route in routes:
        resources[_logical_id(route.name, "Rule", taken)] = {
            "Type": "AWS::Events::Rule",
            "Properties": {
                "Description": _rule_description(route),
                "EventBusName": {"Ref": "EventBusName"},
                "State": "ENABLED",
                "EventPattern": patterns[route.name],
                "Targets": [
                    {
                        "Id": route.name,
                        "Arn": {"Ref": target_params[route.target]},
                        "RoleArn": {"Fn::If": ["HasTargetRole", {"Ref": "TargetRoleArn"}, {"Ref": "AWS::NoValue"}]},
                    }
                ],
            },
        }
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Description": "fpolicyd use-case routes: one EventBridge rule per route. Generated by `fpolicyd routes "
        "export --format cloudformation` from the routes file; edit that file, not this template.",
        "Parameters": parameters,
        "Conditions": {"HasTargetRole": {"Fn::Not": [{"Fn::Equals": [{"Ref": "TargetRoleArn"}, ""]}]}},
        "Resources": resources,
    }


def _rule_description(route: Route) -> str:
    text = f"{route.id} {route.name}" + (f": {route.description}" if route.description else "")
    if len(text) > CFN_RULE_DESCRIPTION_MAX:
        text = text[: CFN_RULE_DESCRIPTION_MAX - 1] + "…"
    return text


def _check(context: _Context, path: str, operation: str, *, as_json: bool) -> int:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"PATH {path!r} is not valid UTF-8 (an event's file_path always is)") from None
    router = Router(context.table, strict=context.strict)
    matched = router.match(path, operation)
    explanations = router.explain(path, operation)
    if as_json:
        document = {
            "file_path": path,
            "operation_type": operation,
            "strict": context.strict,
            "routes": list(matched),
            "explanations": [e.to_dict() for e in explanations],
        }
        sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    mode = " (strict ownership: only prefixes count)" if context.strict else ""
    out = [f"{path!r} {operation}{mode} in {context.table.source}:"]
    if matched:
        out.append(f"  matches {len(matched)} route(s): {', '.join(matched)}")
    else:
        out.append("  matches no route (unrouted: the unrouted_action setting decides where it goes)")
    width = max(len(e.route) for e in explanations)
    id_width = max(len(e.route_id) for e in explanations)
    quiet = 0
    for e in explanations:
        near_miss = e.path_matched or e.matched_suffixes
        if not e.matched and not near_miss:
            quiet += 1
            continue
        mark = "MATCH" if e.matched else "no   "
        target = f" -> {e.target}" if e.matched else ""
        out.append(f"  {mark} {e.route_id:<{id_width}} {e.route:<{width}}  {e.reason}{target}")
    if quiet:
        out.append(f"  {quiet} other route(s): no prefix/suffix matched")
    sys.stdout.write("\n".join(out) + "\n")
    return 0
