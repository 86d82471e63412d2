"""Build of the optional C accelerator ``fpolicyd._speedups``; everything else is in pyproject.toml.

``optional=True``: where it cannot be compiled (no C compiler, no Python headers) the build warns and goes on,
and fpolicyd runs its pure-Python path. The SHA-256 of the source is compiled in, so that a test can tell a
stale in-place build from a current one (``tests/unit/test_speedups_build.py``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from setuptools import Extension, setup

SOURCE = "src/fpolicyd/_speedups.c"
DIGEST = hashlib.sha256((Path(__file__).resolve().parent / SOURCE).read_bytes()).hexdigest()

setup(
    ext_modules=[
        Extension(
            "fpolicyd._speedups",
            sources=[SOURCE],
            define_macros=[("FPOLICYD_SPEEDUPS_SOURCE_SHA256", f'"{DIGEST}"')],
            optional=True,
        )
    ]
)
