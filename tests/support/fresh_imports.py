"""What importing one module loads, seen from a fresh interpreter (the test process has imported everything)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fpolicyd

SRC = Path(fpolicyd.__file__).resolve().parents[1]


def modules_loaded_by(module: str) -> list[str]:
    """Every module in ``sys.modules`` after ``import module`` in a new interpreter on this source tree, sorted."""
    script = f"import sys\nimport {module}\nprint('\\n'.join(sorted(sys.modules)))\n"
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    return result.stdout.split()
