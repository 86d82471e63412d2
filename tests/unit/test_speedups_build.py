"""The C accelerator is built wherever it can be (so CI cannot silently test without it), is built from the
source in the tree, agrees with the Python constants it copies, and is switched off when asked to be."""

from __future__ import annotations

import ast
import hashlib
import importlib
import shutil
import sysconfig
from pathlib import Path

import pytest

from fpolicyd.config import load_settings
from fpolicyd.events import MAX_EPOCH_US, MIN_PLAUSIBLE_GENERATION_US, NameMaps
from fpolicyd.pipeline import speedups
from fpolicyd.pipeline.ingest import Ingest, IngestCounters
from fpolicyd.pipeline.replay import ReplayTracker
from fpolicyd.protocol.context import SessionContext
from fpolicyd.protocol.xml_fast import MAX_FAST_BODY_BYTES

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "src" / "fpolicyd" / "_speedups.c"
STUB = ROOT / "src" / "fpolicyd" / "_speedups.pyi"


def can_compile() -> bool:
    """A C compiler and the Python headers: what setup.py needs to build the extension."""
    compiler = (sysconfig.get_config_var("CC") or "").split()
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return bool(compiler) and shutil.which(compiler[0]) is not None and include.is_file()


def test_the_extension_is_built_wherever_it_can_be() -> None:
    if not can_compile():
        pytest.skip("no C compiler or Python headers here: fpolicyd runs its pure-Python path, tested as such")
    try:
        module = importlib.import_module("fpolicyd._speedups")
    except ImportError as exc:
        pytest.fail(f"a C compiler is here but fpolicyd._speedups is not built ({exc}): pip install -e .")
    assert speedups.accelerator_status().path == "c"
    built_from: str = module.SOURCE_SHA256
    assert built_from == hashlib.sha256(SOURCE.read_bytes()).hexdigest(), (
        "fpolicyd._speedups was built from another _speedups.c: rebuild it (pip install -e . or "
        "python setup.py build_ext --inplace)"
    )


def test_the_constants_it_copies_are_pythons() -> None:
    module = pytest.importorskip("fpolicyd._speedups", reason="not built here (see the test above)")
    assert module.MAX_EPOCH_US == MAX_EPOCH_US
    assert module.MIN_PLAUSIBLE_GENERATION_US == MIN_PLAUSIBLE_GENERATION_US
    assert module.MAX_BODY_BYTES == MAX_FAST_BODY_BYTES


def test_the_stub_names_what_the_module_has() -> None:
    module = pytest.importorskip("fpolicyd._speedups", reason="not built here (see the test above)")
    tree = ast.parse(STUB.read_text(encoding="utf-8"))
    names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef)}
    names |= {
        node.target.id for node in tree.body if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }
    names -= {"_Sha1"}  # a typing protocol only
    assert names == {name for name in dir(module) if not name.startswith("_")}


def test_without_the_extension_the_python_path_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(speedups, "_Encoder", None)
    monkeypatch.setattr(speedups, "_IMPORT_ERROR", "No module named 'fpolicyd._speedups'")
    status = speedups.accelerator_status()
    assert status.path == "python"
    assert "not built" in status.reason
    context = SessionContext("vs", "p", "s", "1.2", "127.0.0.1:1")
    assert speedups.session_encoder(context, NameMaps()) is None
    ingest = Ingest(names=NameMaps(), counters=IngestCounters(), replay=ReplayTracker())
    assert ingest.accelerator.path == "python"


@pytest.mark.parametrize(
    ("enabled", "redacting", "path"), [(True, False, "c"), (False, False, "python"), (True, True, "python")]
)
def test_the_switches(enabled: bool, redacting: bool, path: str) -> None:
    status = speedups.accelerator_status(enabled=enabled, redacting=redacting)
    assert status.path == (path if speedups.accelerator_status().path == "c" else "python")
    assert status.reason


def test_pure_python_is_a_setting_and_an_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(search_default_paths=False).pure_python is False
    monkeypatch.setenv("FPOLICYD_PURE_PYTHON", "1")
    assert load_settings(search_default_paths=False).pure_python is True


def test_a_session_value_orjson_refuses_leaves_the_session_to_python() -> None:
    context = SessionContext("vs\ud800", "p", "s", "1.2", "127.0.0.1:1")
    assert speedups.session_encoder(context, NameMaps()) is None
