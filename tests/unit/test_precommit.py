"""The pre-commit hooks run exactly the static checks of `make test` (the Makefile's `test` recipe), in its order,
from the project's .venv: a check added to one and not the other fails here."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _make_test_checks() -> list[str]:
    """The `test:` recipe's commands other than pytest, with $(BIN) spelled as the hooks spell it."""
    lines = (ROOT / "Makefile").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^test:", line))
    recipe: list[str] = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip().replace("$(BIN)/", ".venv/bin/"))
    assert any("pytest" in command for command in recipe), recipe
    return [command for command in recipe if "pytest" not in command]


def _hook_entries() -> list[str]:
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text(encoding="utf-8"))
    hooks = [hook for repo in config["repos"] for hook in repo["hooks"]]
    for hook in hooks:
        # Local hooks from the pinned .venv, over the whole tree as make test does (not the staged files only).
        assert config["repos"][0]["repo"] == "local"
        assert hook["language"] == "system", hook
        assert hook["pass_filenames"] is False, hook
    return [str(hook["entry"]) for hook in hooks]


def test_hooks_are_the_static_checks_of_make_test() -> None:
    checks = _make_test_checks()
    assert len(checks) >= 4, checks  # ruff, ruff format, mypy, lint-imports
    assert _hook_entries() == checks
