"""The warehouse's folder is private: DuckDB writes the write-ahead log beside the file with the
process umask, so the file's own 0600 would not keep the rows a connection is writing from
other users."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from vault import warehouse
from vault.warehouse import WarehouseFolderError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def test_a_shared_folder_is_narrowed_before_the_log_is_written(
    tmp_path: Path, open_umask: None
) -> None:
    folder = tmp_path / "work"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    path = folder / "warehouse.duckdb"
    con = warehouse.connect(path)
    try:
        con.execute("CREATE TABLE t (a VARCHAR)")
        con.execute("INSERT INTO t VALUES ('a row only the log holds yet')")
        wal = path.with_name(path.name + ".wal")
        assert wal.exists()
        # the log itself takes the umask; the folder is what keeps it private
        assert _mode(wal) & 0o077
        assert _mode(folder) == 0o700
        assert _mode(path) == 0o600
    finally:
        con.close()


def test_a_new_folder_is_made_private_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        con = warehouse.connect(tmp_path / "a" / "b" / "warehouse.duckdb")
        con.close()
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "a" / "b") == 0o700


def test_a_read_only_connect_leaves_the_folder_as_it_is(tmp_path: Path, open_umask: None) -> None:
    folder = tmp_path / "shared"
    warehouse.connect(folder / "warehouse.duckdb").close()
    os.chmod(folder, 0o750)
    warehouse.connect(folder / "warehouse.duckdb", read_only=True).close()
    assert _mode(folder) == 0o750


def test_a_folder_that_cannot_be_narrowed_is_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "theirs"
    folder.mkdir()
    os.chmod(folder, 0o775)

    def not_the_owner(path: object, mode: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(warehouse.os, "chmod", not_the_owner)
    with pytest.raises(WarehouseFolderError, match="0775") as raised:
        warehouse.connect(folder / "warehouse.duckdb")
    assert str(folder) in str(raised.value)
    assert not (folder / "warehouse.duckdb").exists()


@pytest.mark.parametrize("mode", [0o1777, 0o777])
def test_a_shared_folder_is_refused_and_left_as_it_is(tmp_path: Path, mode: int) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    os.chmod(folder, mode)
    with pytest.raises(WarehouseFolderError, match=f"{mode:04o}"):
        warehouse.connect(folder / "warehouse.duckdb")
    assert _mode(folder) == mode
    assert not (folder / "warehouse.duckdb").exists()
