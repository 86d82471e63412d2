"""The settings flags of ``serve``, ``config``, ``healthcheck`` and ``ontap``: one ``--NAME VALUE`` per field of
:class:`~fpolicyd.config.Settings`, grouped by area.

``--help`` stays short: the command's own options, the settings a command cannot run without (described, first),
then each area's flags by name only. ``--help-settings [AREA]`` prints every setting's description and default,
area by area; ``fpolicyd config example`` prints the same as a commented TOML file.
"""

from __future__ import annotations

import argparse
import enum
import json
import sys
import textwrap
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, NoReturn

from pydantic import SecretStr
from pydantic.fields import FieldInfo

from fpolicyd.cli.parser import FpolicydArgumentParser
from fpolicyd.config import Settings

__all__ = ["SETTING_AREAS", "add_settings_flags", "area_fields", "setting_flag", "setting_help"]

#: (key, title, first field): an area holds its first field and every field defined after it, up to the next
#: area's first field (the order of Settings, which groups its fields by these sections).
SETTING_AREAS: Final[tuple[tuple[str, str, str], ...]] = (
    ("listener", "listener", "listen_host"),
    ("tls", "TLS and peers", "tls_mode"),
    ("session", "FPolicy session", "engine_mode"),
    ("names", "volume and SVM names", "volume_names"),
    ("delivery", "delivery and JSON Lines", "data_dir"),
    ("spool", "spool and back-pressure", "spool_dir"),
    ("sinks", "cloud sinks and dead letters", "aws_region"),
    ("shutdown", "shutdown", "shutdown_read_grace_s"),
    ("http", "HTTP, health and SLO targets", "http_enabled"),
    ("ontap", "ONTAP REST (fpolicyd ontap)", "ontap_url"),
    ("replay", "replay awareness", "replay_duplicate_window"),
    ("routing", "routing", "routing_enabled"),
    ("classification", "data classification", "data_classification"),
    ("dedup", "dedup", "dedup_mode"),
    ("capture", "wire capture", "capture_enabled"),
    ("processing", "processing and settle", "processor_batch_records"),
    ("runtime", "runtime and logs", "delivery_process"),
)


def setting_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def area_fields() -> dict[str, list[str]]:
    """Every setting under its area's key, in the order of Settings."""
    starts = {first: key for key, _title, first in SETTING_AREAS}
    out: dict[str, list[str]] = {key: [] for key, _title, _first in SETTING_AREAS}
    names = list(Settings.model_fields)
    if names[0] not in starts:
        raise RuntimeError(f"SETTING_AREAS: the first setting, {names[0]}, starts no area")
    current = ""
    for name in names:
        current = starts.get(name, current)
        out[current].append(name)
    return out


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> X; ``Annotated[X, ...]`` -> X."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1 and type(None) in typing.get_args(annotation):
        return _unwrap(args[0])
    return annotation


def _metavar(name: str, info: FieldInfo) -> str:
    kind = _unwrap(info.annotation)
    origin = typing.get_origin(kind)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return "{" + ",".join(str(m.value) for m in kind) + "}"
    if kind is bool:
        return "BOOL"
    if kind is int:
        return "N"
    if kind is float:
        return "SECONDS" if name.endswith("_s") else "X"
    if kind is Path:
        return "PATH"
    if origin is dict:
        return "JSON"
    if origin is tuple:
        return "A,B"
    return "TEXT"


def _default_text(info: FieldInfo) -> str | None:
    default = info.get_default(call_default_factory=True)
    if default is None or isinstance(default, SecretStr):
        return None
    if isinstance(default, enum.Enum):
        return str(default.value)
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, tuple):
        return ",".join(str(v) for v in default) or "(empty)"
    if isinstance(default, dict):
        return json.dumps({str(k): v for k, v in default.items()}) if default else "{}"
    return str(default)


def setting_help(name: str) -> str:
    """The description of a setting and its default, as ``--help-settings`` shows it."""
    info = Settings.model_fields[name]
    default = _default_text(info)
    text = (info.description or "").rstrip()
    return f"{text} (default: {default})" if default is not None else text


def _add_flag(group: argparse._ArgumentGroup, name: str, *, described: bool) -> None:
    group.add_argument(
        setting_flag(name),
        dest=f"setting_{name}",
        metavar=_metavar(name, Settings.model_fields[name]),
        help=setting_help(name).replace("%", "%%") if described else argparse.SUPPRESS,
    )


def _titles() -> dict[str, str]:
    return {key: title for key, title, _first in SETTING_AREAS}


def _reference(prog: str, areas: Sequence[str]) -> str:
    """Every setting of ``areas``, described, with its flag and default."""
    parser = FpolicydArgumentParser(
        prog=prog, usage=argparse.SUPPRESS, add_help=False, formatter_class=SettingsHelpFormatter
    )
    titles, fields = _titles(), area_fields()
    for key in areas:
        group = parser.add_argument_group(
            f"{titles[key]} [{key}]", "each also FPOLICYD_<NAME> in the environment or NAME in TOML"
        )
        for name in fields[key]:
            _add_flag(group, name, described=True)
    return parser.format_help()


class SettingsHelpFormatter(argparse.HelpFormatter):
    """Never breaks a line inside a flag's name (``--tls-min-`` / ``version``): lists of flags are copied."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(
            " ".join(text.split()),
            width,
            initial_indent=indent,
            subsequent_indent=indent,
            break_on_hyphens=False,
            break_long_words=False,
        )

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)


class _HelpSettings(argparse.Action):
    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> NoReturn:
        areas = [values] if values else [key for key, _title, _first in SETTING_AREAS]
        sys.stdout.write(_reference(parser.prog, areas))
        parser.exit()


def add_settings_flags(
    parser: argparse.ArgumentParser,
    *,
    required: Sequence[str] = (),
    required_title: str = "required settings",
    described: Sequence[str] = (),
) -> argparse.ArgumentParser:
    """``--config``, ``--help-settings`` and one flag per setting. ``required`` settings come first, described;
    so do the areas in ``described``; every other area lists its flags by name (``--help-settings AREA``)."""
    if parser.usage is None:
        parser.usage = "%(prog)s [options] [--SETTING VALUE ...]"
    parser.formatter_class = SettingsHelpFormatter
    if required:
        group = parser.add_argument_group(required_title)
        for name in required:
            _add_flag(group, name, described=True)
    files = parser.add_argument_group(
        "settings",
        "Every setting is a flag (--NAME VALUE), FPOLICYD_<NAME> in the environment or NAME in a TOML file; "
        "flags win, then the environment, then the file. `fpolicyd config example` prints them all as TOML.",
    )
    files.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML settings file (default ./fpolicyd.toml, /etc/fpolicyd/)"
    )
    keys = [key for key, _title, _first in SETTING_AREAS]
    files.add_argument(
        "--help-settings",
        action=_HelpSettings,
        nargs="?",
        choices=keys,
        metavar="AREA",
        help=f"describe every setting (or one area's: {', '.join(keys)}), with its default, and exit",
    )
    titles = _titles()
    for key, names in area_fields().items():
        rest = [name for name in names if name not in required]
        if not rest:
            continue
        full = key in described
        group = parser.add_argument_group(
            f"{titles[key]} [{key}]",
            None if full else " ".join(setting_flag(name) for name in rest),
        )
        for name in rest:
            _add_flag(group, name, described=full)
    return parser
