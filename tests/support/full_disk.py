"""A full disk for tests, without root: ``os.write`` and ``os.open`` (creating a file) refuse (ENOSPC, or EDQUOT)
what goes to files under the chosen directories while the disk is "full", as a full file system would; everything
else passes.

The daemon's writers call these very functions (spool, journal, JSON Lines, ledger, dead letters), so the code under
test is the production path. A descriptor's file is found through ``/proc/self/fd`` (Linux). SQLite writes through
its own VFS, not through ``os``: :func:`sqlite_full` makes SQLite itself answer SQLITE_FULL (``max_page_count``),
which is what it answers on ENOSPC.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


class FullDisk:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, *directories: Path, code: int = errno.ENOSPC) -> None:
        self.directories = tuple(str(d.resolve()) for d in directories)
        self.code = code
        self.full = False
        #: Calls refused so far.
        self.refused = 0
        real_write, real_open = os.write, os.open

        def write(fd: int, data: bytes | bytearray | memoryview) -> int:
            if self.full and len(data) and self._under(self._path_of(fd)):
                self._refuse()
            return real_write(fd, data)

        def open_(path: str | os.PathLike[str], flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
            creates = self.full and flags & os.O_CREAT and dir_fd is None and not os.path.exists(path)
            if creates and self._under(os.path.abspath(path)):
                self._refuse()  # a new file needs an inode and a directory entry
            return real_open(path, flags, mode, dir_fd=dir_fd)

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "open", open_)

    @staticmethod
    def _path_of(fd: int) -> str:
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return ""

    def _under(self, path: str) -> bool:
        return any(path == d or path.startswith(d + os.sep) for d in self.directories)

    def _refuse(self) -> None:
        self.refused += 1
        raise OSError(self.code, os.strerror(self.code))


@contextmanager
def sqlite_full(conn: sqlite3.Connection) -> Iterator[None]:
    """While inside, the database cannot grow by a page: writes that need one fail with SQLITE_FULL."""
    pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
    conn.execute(f"PRAGMA max_page_count = {pages}")
    try:
        yield
    finally:
        conn.execute("PRAGMA max_page_count = 1073741823")
