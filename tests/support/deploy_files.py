"""Readers for the deployment files (Dockerfile, systemd unit, CloudFormation) used by the deploy tests.

No Docker engine or systemd runs here, so the tests read these files the way those tools do: Dockerfile
instructions with line continuations and exec-form JSON arrays, unit files as sections of repeatable keys.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
UNIT_FILE = ROOT / "deploy" / "systemd" / "fpolicyd.service"
ENV_EXAMPLE = ROOT / "deploy" / "systemd" / "fpolicyd.env.example"
TASK_DEFINITION = ROOT / "deploy" / "ecs" / "task-definition.json"
CFN_TEMPLATE = ROOT / "deploy" / "ecs" / "fpolicyd-fargate.yaml"


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str
    arguments: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, or None for the shell form."""
        return _json_array(self.arguments)


def _json_array(text: str) -> list[str] | None:
    text = text.strip()
    if not text.startswith("["):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        return None
    return value


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order; comments dropped, backslash continuations joined (the default escape char)."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction is dropped by Docker too
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(part for part in pending if part)
        keyword, _, arguments = joined.partition(" ")
        out.append(Instruction(keyword.upper(), arguments.strip(), start))
        pending = []
    assert not pending, "Dockerfile ends inside a continued instruction"
    return out


def substitute_args(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def global_args(instructions: list[Instruction]) -> dict[str, str]:
    """ARG defaults declared before the first FROM (the only ones a FROM line can use)."""
    out: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "FROM":
            break
        if instruction.keyword == "ARG":
            name, _, default = instruction.arguments.partition("=")
            out[name.strip()] = default.strip()
    return out


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last_from = max(i for i, instruction in enumerate(instructions) if instruction.keyword == "FROM")
    return instructions[last_from:]


def image_env(instructions: list[Instruction]) -> dict[str, str]:
    """ENV of the final stage (``KEY=VALUE`` pairs; ``$PATH``-style references left as written)."""
    env: dict[str, str] = {}
    for instruction in final_stage(instructions):
        if instruction.keyword == "ENV":
            for match in re.finditer(r"(\w+)=(\S+)", instruction.arguments):
                env[match.group(1)] = match.group(2)
    return env


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [instruction for instruction in instructions if instruction.keyword == keyword]
    assert len(found) == 1, f"expected exactly one {keyword}, found {len(found)}"
    return found[0]


def entrypoint_and_cmd(instructions: list[Instruction]) -> list[str]:
    """What the container runs: ENTRYPOINT + CMD of the final stage, both in exec form."""
    stage = final_stage(instructions)
    entrypoint = only(stage, "ENTRYPOINT").exec_form()
    cmd = only(stage, "CMD").exec_form()
    assert entrypoint is not None, "ENTRYPOINT must be in exec form"
    assert cmd is not None, "CMD must be in exec form"
    return entrypoint + cmd


def healthcheck_command(instructions: list[Instruction]) -> list[str]:
    arguments = only(final_stage(instructions), "HEALTHCHECK").arguments
    _, sep, command = arguments.partition("CMD ")
    assert sep, "HEALTHCHECK needs CMD"
    parsed = _json_array(command)
    assert parsed is not None, "HEALTHCHECK CMD must be in exec form"
    return parsed


def healthcheck_options(instructions: list[Instruction]) -> dict[str, str]:
    arguments = only(final_stage(instructions), "HEALTHCHECK").arguments
    options, _, _ = arguments.partition("CMD ")
    return dict(re.findall(r"--([\w-]+)=(\S+)", options))


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values in order]}} (keys repeat; an empty value resets a list)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(value: str) -> float:
    """A systemd time span such as ``45s``, ``1min 30s`` or ``90``."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def env_file_names(text: str) -> list[str]:
    """Variable names of an environment file, including the commented-out examples (``#NAME=value``)."""
    return re.findall(r"^#?([A-Z][A-Z0-9_]*)=", text, flags=re.MULTILINE)


def load_template() -> dict[str, Any]:
    """The CloudFormation template with short-form tags (!Ref, !Sub, ...) as cfn-lint reads them."""
    from cfnlint.decode import decode  # type: ignore[import-untyped]  # dev dependency without type hints

    template, matches = decode(str(CFN_TEMPLATE))
    assert not matches, matches
    assert template is not None
    return dict(template)
