"""``fpolicyd`` command line: ``main`` and the ``serve`` and ``config`` commands. Flags of ``serve`` and ``config``
are generated from :class:`Settings` (:mod:`fpolicyd.cli.settings_flags`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from fpolicyd import __version__
from fpolicyd.cli.parser import FpolicydArgumentParser
from fpolicyd.cli.settings_flags import add_settings_flags
from fpolicyd.config import Settings, environment_aliases, example_toml, load_settings
from fpolicyd.errors import ConfigError, SinkError
from fpolicyd.obs.log import configure_logging


def _overrides(ns: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in vars(ns).items():
        if key.startswith("setting_") and value is not None:
            name = key[len("setting_") :]
            annotation = str(Settings.model_fields[name].annotation)
            out[name] = json.loads(value) if annotation.startswith("dict") else value
    return out


def settings_from_args(ns: argparse.Namespace) -> Settings:
    try:
        overrides = _overrides(ns)
    except json.JSONDecodeError as exc:
        raise ConfigError(f'a mapping flag needs JSON, e.g. \'{{"2157674396": "vol1"}}\': {exc}') from None
    return load_settings(ns.config, overrides)


def _cmd_serve(ns: argparse.Namespace) -> int:
    from fpolicyd.app import run_daemon  # noqa: PLC0415 - keeps `fpolicyd --help` fast

    settings = settings_from_args(ns)
    configure_logging(settings.log_level, settings.log_format.value, redactor=settings.redactor())
    report = run_daemon(settings)  # what a sink could not take within the drain budget stays in the spool
    return 0 if report.failure is None else 1


_CONFIG_ACTIONS = {
    "check": "validate the settings (flags, environment, TOML file); exit 2 naming each bad key",
    "show": "print the effective settings as JSON, derived values included",
    "example": "print every setting as a commented TOML file (descriptions and defaults)",
}


def _cmd_config(ns: argparse.Namespace) -> int:
    settings = settings_from_args(ns)
    if ns.action == "example":
        sys.stdout.write(example_toml())
        return 0
    if ns.action == "show":
        data = settings.model_dump(mode="json")
        data["effective_sinks"] = list(settings.effective_sinks)
        data["effective_idle_timeout_s"] = settings.effective_idle_timeout_s
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n")
    else:
        from fpolicyd.server.preflight import preflight  # noqa: PLC0415 - loads routing, TLS; only for `check`

        preflight(settings)  # what `serve` checks before it binds or opens anything
        sys.stdout.write("settings OK\n")
    return 0


def _cmd_simulate(ns: argparse.Namespace) -> int:
    from fpolicyd.cli.simulate import run_simulate  # noqa: PLC0415

    return run_simulate(ns)


def build_parser() -> argparse.ArgumentParser:
    parser = FpolicydArgumentParser(prog="fpolicyd", description="ONTAP FPolicy external server")
    parser.add_argument("--version", action="version", version=f"fpolicyd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="run the FPolicy server",
        description="Run the FPolicy server: accept ONTAP's connections, spool every notification durably and "
        "deliver it to the sinks (JSON Lines by default, SQS, EventBridge). Listens on 0.0.0.0:9898 unless "
        "--listen-host/--listen-port say otherwise.",
    )
    add_settings_flags(serve)
    serve.set_defaults(func=_cmd_serve)

    config = sub.add_parser(
        "config",
        help="validate or print the effective settings",
        description="Settings come from flags, FPOLICYD_<NAME> environment variables and a TOML file, in that "
        "order of precedence.",
    )
    actions = config.add_subparsers(dest="action", required=True, metavar="{check,show,example}")
    for action, text in _CONFIG_ACTIONS.items():
        add_settings_flags(actions.add_parser(action, help=text, description=text)).set_defaults(func=_cmd_config)

    from fpolicyd.cli.simulate import add_simulate_parser  # noqa: PLC0415

    add_simulate_parser(sub).set_defaults(func=_cmd_simulate)

    from fpolicyd.cli.replaytest import add_replay_test_parser, run_replay_test_command  # noqa: PLC0415

    add_replay_test_parser(sub).set_defaults(func=run_replay_test_command)

    from fpolicyd.cli.ontap import add_ontap_parser  # noqa: PLC0415

    add_ontap_parser(sub)

    from fpolicyd.cli.routes import add_routes_parser, run_routes  # noqa: PLC0415

    add_routes_parser(sub).set_defaults(func=run_routes)

    from fpolicyd.cli.capture import add_capture_parser, run_capture  # noqa: PLC0415

    add_capture_parser(sub).set_defaults(func=run_capture)

    _add_healthcheck(sub)

    aliases = ", ".join(f"{env}->{field}" for env, field in sorted(environment_aliases().items()))
    parser.epilog = f"Reference-server environment variables honoured: {aliases}."
    return parser


def _add_healthcheck(sub: Any) -> None:
    from fpolicyd.cli.healthcheck import add_healthcheck_parser, run_healthcheck  # noqa: PLC0415

    healthcheck = add_healthcheck_parser(sub)
    add_settings_flags(healthcheck)
    healthcheck.set_defaults(func=lambda ns: run_healthcheck(ns, lambda: settings_from_args(ns)))


def _healthcheck_parser() -> argparse.ArgumentParser:
    """``fpolicyd healthcheck`` alone: the container health check runs every 30 s, next to a busy daemon, and
    must not import every other command's modules (aiohttp, routing, ...) to probe one URL."""
    parser = FpolicydArgumentParser(prog="fpolicyd")
    _add_healthcheck(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    parser = _healthcheck_parser() if arguments[:1] == ["healthcheck"] else build_parser()
    ns = parser.parse_args(arguments)
    try:
        code: int = ns.func(ns)
    except (ConfigError, SinkError) as exc:
        sys.stderr.write(f"fpolicyd: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    return code
