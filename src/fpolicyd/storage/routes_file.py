"""Reading the routes file: a path, or the routes packaged with fpolicyd (parsed by :mod:`fpolicyd.pipeline.router`).

What it reads: a TOML file of ``[[route]]`` tables (``routes_file``), or the packaged ``fpolicyd/data/routes.toml``
(the 17 reference use cases) through importlib.resources, so it works from a wheel or a zip. Nothing is written.

Contract: a file that cannot be read or decoded as UTF-8 raises :class:`~fpolicyd.errors.ConfigError` naming it;
its text is then validated as a whole by :meth:`RouteTable.from_toml <fpolicyd.pipeline.router.RouteTable.from_toml>`
(which raises ``ConfigError`` too), so a table is returned complete or not at all. Read once, at start.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Final

from fpolicyd.errors import ConfigError
from fpolicyd.pipeline.router import RouteTable

__all__ = ["load_routes", "packaged_routes_text"]

_PACKAGED: Final = "packaged fpolicyd/data/routes.toml"


def packaged_routes_text() -> str:
    """The packaged routes file (read through importlib.resources, so it works from a wheel or a zip)."""
    return (importlib.resources.files("fpolicyd") / "data" / "routes.toml").read_text(encoding="utf-8")


def load_routes(path: Path | None = None) -> RouteTable:
    """The routes of ``path``, or the packaged 17 reference routes when ``path`` is None."""
    if path is None:
        return RouteTable.from_toml(packaged_routes_text(), source=_PACKAGED)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"routes file {path}: {exc}") from None
    return RouteTable.from_toml(text, source=str(path))
