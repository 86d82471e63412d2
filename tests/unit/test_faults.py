"""The test-only fsync fault (storage/faults.py): off unless its variable is set, strict about its value, and
when armed it fails the spool's sync exactly as a real EIO does (for good, nothing reported durable)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fpolicyd.config import load_settings
from fpolicyd.errors import ConfigError
from fpolicyd.storage.faults import FSYNC_EIO_AFTER_ENV, FsyncFault, fsync_fault_from_environment
from fpolicyd.storage.spool import Spool, SpoolIOError, SpoolSettings


def test_absent_means_off() -> None:
    assert fsync_fault_from_environment({}) is None
    assert fsync_fault_from_environment({"FPOLICYD_SPOOL_FSYNC": "always"}) is None


@pytest.mark.parametrize("value", ["", "-1", "1.5", "soon", "0x10", " "])
def test_a_malformed_value_is_refused_with_the_variable_named(value: str) -> None:
    with pytest.raises(ConfigError, match=FSYNC_EIO_AFTER_ENV):
        fsync_fault_from_environment({FSYNC_EIO_AFTER_ENV: value})


@given(st.text(max_size=12))
def test_any_value_arms_the_fault_or_is_refused(value: str) -> None:
    try:
        fault = fsync_fault_from_environment({FSYNC_EIO_AFTER_ENV: value})
    except ConfigError:
        assert not value.strip().isdecimal()
    else:
        assert fault == FsyncFault(int(value.strip()))


def test_it_is_not_a_setting_but_does_not_trip_the_unknown_variable_check(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(FSYNC_EIO_AFTER_ENV, "3")
    settings = load_settings(search_default_paths=False)
    assert "fault_spool_fsync_eio_after" not in settings.model_dump()
    monkeypatch.setenv("FPOLICYD_FAULT_SOMETHING_ELSE", "3")
    with pytest.raises(ConfigError, match="FPOLICYD_FAULT_SOMETHING_ELSE"):
        load_settings(search_default_paths=False)


def test_armed_the_spool_sync_fails_for_good_after_n_syncs(tmp_path: Path) -> None:
    settings = SpoolSettings(directory=tmp_path / "spool", fsync_fault=FsyncFault(2))
    spool = Spool.open(settings, ["s"])
    try:
        for n in (1, 2):
            spool.append(b"%d" % n)
            spool.flush()
            assert spool.sync() == n
        spool.append(b"3")
        spool.flush()
        with pytest.raises(SpoolIOError, match=f"EIO.*{FSYNC_EIO_AFTER_ENV}=2") as failed:
            spool.sync()
        assert not failed.value.retriable
        assert spool.durable_seq == 2  # the record whose fsync failed is never reported durable
        with pytest.raises(SpoolIOError):
            spool.sync()  # final, like a real failed fsync
        with pytest.raises(SpoolIOError):
            spool.append(b"4")
    finally:
        spool.abandon()
    # The next start (no fault) recovers every record that reached the file.
    with Spool.open(SpoolSettings(directory=tmp_path / "spool"), ["s"]) as again:
        assert [record.payload for record in again.read("s")] == [b"1", b"2", b"3"]
