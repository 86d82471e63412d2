"""No log call of the daemon names one of its own values with a key the log redactor treats as a file path.

The default redaction (``pipeline/redaction.py``) hashes every value under ``PATH_FIELDS`` keys, because those carry
the file paths of ONTAP notifications (classified data). A daemon value logged under such a key — which ingest path
runs, the daemon's own state or capture file, an ONTAP REST endpoint — came out as a hash the operator could not read
(the ``ingest_path`` start line did). This reads every logging call in ``src/fpolicyd`` (``log.info(...)`` and the
like on a name ending in ``log``) and refuses those keys."""

from __future__ import annotations

import ast
from pathlib import Path

from fpolicyd.pipeline.redaction import PATH_FIELDS

SRC = Path(__file__).resolve().parents[2] / "src" / "fpolicyd"
LEVELS = {"debug", "info", "warning", "error", "exception", "critical", "msg"}
#: Log calls that do carry an ONTAP file path under such a key (hashed on purpose): "module.py:event". None today.
ONTAP_PATH_LOGS: frozenset[str] = frozenset()


def _log_calls(tree: ast.AST) -> list[ast.Call]:
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LEVELS:
            receiver = node.func.value
            if isinstance(receiver, ast.Name) and receiver.id.lower().endswith("log"):
                calls.append(node)
    return calls


def test_the_scan_finds_log_calls() -> None:
    tree = ast.parse((SRC / "app.py").read_text(encoding="utf-8"))
    assert len(_log_calls(tree)) > 10


def test_no_log_call_uses_a_redacted_path_key() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call in _log_calls(tree):
            first = call.args[0] if call.args else None
            event = first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else "?"
            if f"{path.relative_to(SRC)}:{event}" in ONTAP_PATH_LOGS:
                continue
            for keyword in call.keywords:
                if keyword.arg in PATH_FIELDS:
                    offenders.append(f"{path.relative_to(SRC)}:{call.lineno} {keyword.arg}=")
    assert offenders == []
