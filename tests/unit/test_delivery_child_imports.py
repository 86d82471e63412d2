"""The delivery process and the settings load without the reader's XML codec: ``fpolicyd.config`` takes what
configures a session from ``fpolicyd.protocol.session_config``, not from the session machine, which needs lxml.
Every delivery process would otherwise carry lxml and the protocol modules (~4 MiB of RSS each)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fpolicyd

SRC = Path(fpolicyd.__file__).resolve().parents[1]
#: Modules only the reader needs (lxml: the package and its submodules).
READER_ONLY = ("fpolicyd.protocol.session", "fpolicyd.protocol.xml_codec")


@pytest.mark.parametrize("module", ["fpolicyd.config", "fpolicyd.server.delivery_child"])
def test_importing_it_loads_no_xml_codec(module: str) -> None:
    """In a fresh interpreter (this one has imported everything already)."""
    script = (
        "import sys\n"
        f"import {module}\n"
        f"print('\\n'.join(sorted(m for m in sys.modules if m in {READER_ONLY!r} or m.split('.')[0] == 'lxml')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert result.stdout.split() == []
