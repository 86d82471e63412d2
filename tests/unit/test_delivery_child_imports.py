"""The delivery process and the settings load without the reader's XML codec: ``fpolicyd.config`` takes what
configures a session from ``fpolicyd.protocol.session_config``, not from the session machine, which needs lxml.
Every delivery process would otherwise carry lxml and the protocol modules (~4 MiB of RSS each)."""

from __future__ import annotations

import pytest

from support.fresh_imports import modules_loaded_by

#: Modules only the reader needs (and lxml: the package and its submodules).
READER_ONLY = ("fpolicyd.protocol.session", "fpolicyd.protocol.xml_codec")


@pytest.mark.parametrize("module", ["fpolicyd.config", "fpolicyd.server.delivery_child"])
def test_importing_it_loads_no_xml_codec(module: str) -> None:
    loaded = modules_loaded_by(module)
    assert module in loaded  # the probe saw the import it made
    assert [m for m in loaded if m in READER_ONLY or m.split(".")[0] == "lxml"] == []
