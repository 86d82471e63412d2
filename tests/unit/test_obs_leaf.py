"""obs is a leaf: its modules import nothing of fpolicyd but fpolicyd.errors, fpolicyd's version and obs itself.

They read the other packages' objects through typing.Protocol classes of their own and are given the label sets
of the other packages' enums (``fpolicyd.server.metric_labels``), so that any layer may import obs."""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import pytest

import fpolicyd
import fpolicyd.obs
from support.fresh_imports import modules_loaded_by

OBS_DIR = Path(fpolicyd.obs.__path__[0])
OBS_MODULES = sorted(f"fpolicyd.obs.{info.name}" for info in pkgutil.iter_modules([str(OBS_DIR)]))


def allowed(module: str) -> bool:
    return module in {"fpolicyd", "fpolicyd.errors", "fpolicyd.obs"} or module.startswith("fpolicyd.obs.")


def test_the_obs_modules_are_found() -> None:
    assert {"fpolicyd.obs.health", "fpolicyd.obs.http", "fpolicyd.obs.log", "fpolicyd.obs.metrics"} <= set(OBS_MODULES)


@pytest.mark.parametrize("module", OBS_MODULES)
def test_importing_an_obs_module_imports_nothing_else_of_fpolicyd(module: str) -> None:
    """In a fresh interpreter (this one has imported everything already)."""
    imported = [m for m in modules_loaded_by(module) if m == "fpolicyd" or m.startswith("fpolicyd.")]
    assert module in imported  # the probe saw the import it made
    assert [name for name in imported if not allowed(name)] == []


@pytest.mark.parametrize("module", OBS_MODULES)
def test_no_obs_module_names_another_fpolicyd_package_not_even_for_type_checking(module: str) -> None:
    """Every import statement, at module level, under ``if TYPE_CHECKING:`` or in a function."""
    path = OBS_DIR / f"{module.rsplit('.', 1)[1]}.py"
    named: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            named.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}:{node.lineno}: a relative import"
            assert node.module is not None
            named.append(node.module)
    assert [name for name in named if name.split(".")[0] == "fpolicyd" and not allowed(name)] == []
