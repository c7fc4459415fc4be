"""The warehouse rewrite that follows an erasure, when other processes use the warehouse: two
erasures at once (each rewrites), or an erasure while a run has the warehouse open.

Two ``ehr forget`` started a second apart used to leave both patients' destroyed wrapped keys
and ciphertexts in the file's freed pages: the second rewrite removed the first one's temporary
folder as stale while the first copied into it, and then found the warehouse locked; neither
rewrite finished. Each rewrite now takes the folder's rewrite lock, keeps the old file open for
writing from before the copy until the new file is in its place, and waits while another
process has the warehouse open.

Other processes are real ones (DuckDB's file lock is per process). What the file holds is read
from its raw bytes, freed pages included, against byte strings written here."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pytest

from tests.owed_rewrite import SECRET, warehouse_owing_a_rewrite
from tests.vault.processes import hold_open
from vault import warehouse
from vault.keys import exclusive_lock

# a deleted row's bytes: random, so no compression hides them (as a wrapped key or a ciphertext)
MARKER = bytes.fromhex("9c4e1f7a2b83d605e1aa7734c0de5f19b2487e6630d9a1c45f0e8b7d21c3a96e")
# rows enough that copying the file takes a good part of a second on a slow machine
FILLER_ROWS = 3_000_000


def _warehouse_with_deleted_row(path: Path) -> None:
    """A warehouse whose freed pages hold a dropped table's row (in the middle of the file, as
    an erased patient's rows are: a freed block at the end is cut off)."""
    con = warehouse.connect(path)
    con.execute("CREATE TABLE secrets (v BLOB)")
    con.execute("INSERT INTO secrets SELECT ? FROM range(3)", [MARKER])
    con.execute("CHECKPOINT")
    con.execute(
        "CREATE TABLE filler AS SELECT range AS i, md5(range::VARCHAR) AS h "
        f"FROM range({FILLER_ROWS})"
    )
    con.execute("CHECKPOINT")
    con.execute("DROP TABLE secrets")
    con.execute("CHECKPOINT")
    con.close()


def _holds_marker(path: Path) -> bool:
    return MARKER in path.read_bytes()


def _rewrite_in_process(path: Path) -> subprocess.Popen[str]:
    script = (
        "import sys; from pathlib import Path; from vault import warehouse; "
        "warehouse.rewrite(Path(sys.argv[1])); print('rewritten')"
    )
    return subprocess.Popen(
        [sys.executable, "-c", script, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )


@pytest.fixture
def deleted_row_warehouse(tmp_path: Path) -> Path:
    path = tmp_path / "work" / "warehouse.duckdb"
    _warehouse_with_deleted_row(path)
    assert _holds_marker(path)  # the deleted rows are still in the freed pages
    return path


def test_two_rewrites_at_once_both_finish_and_leave_no_freed_page(
    deleted_row_warehouse: Path,
) -> None:
    path = deleted_row_warehouse
    first = _rewrite_in_process(path)
    deadline = time.monotonic() + 60
    while not list(path.parent.glob(".warehouse-*")) and first.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    warehouse.rewrite(path)  # the second, while the first one copies
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-400:]
    assert not _holds_marker(path)
    con = duckdb.connect(str(path), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM filler").fetchall() == [(FILLER_ROWS,)]
        assert not con.execute(
            "SELECT * FROM duckdb_tables() WHERE table_name = 'secrets'"
        ).fetchall()
    finally:
        con.close()
    assert not list(path.parent.glob(".warehouse-*"))


def test_a_rewrite_waits_while_another_process_has_the_warehouse_open(
    deleted_row_warehouse: Path,
) -> None:
    path = deleted_row_warehouse
    holder = hold_open(path, 1.5)
    started = time.monotonic()
    warehouse.rewrite(path)
    assert time.monotonic() - started >= 1.0  # it waited for the holder
    holder.wait(timeout=30)
    assert not _holds_marker(path)


def test_a_rewrite_that_cannot_wait_longer_leaves_the_file_as_it_was(
    deleted_row_warehouse: Path,
) -> None:
    path = deleted_row_warehouse
    before = path.read_bytes()
    holder = hold_open(path, 5)
    try:
        with pytest.raises(warehouse.WarehouseBusyError, match="stayed open in another process"):
            warehouse.rewrite(path, wait_seconds=0.5)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert path.read_bytes() == before
    assert not list(path.parent.glob(".warehouse-*"))


def test_a_rewrite_leaves_a_live_rewrites_folder_alone(deleted_row_warehouse: Path) -> None:
    """Stale temporary folders are removed under the rewrite lock only: one made by a rewrite
    still holding the lock is not stale."""
    path = deleted_row_warehouse
    live = path.parent / ".warehouse-live"
    done = threading.Event()
    with exclusive_lock(path.parent / warehouse.REWRITE_LOCK):
        live.mkdir()
        (live / "warehouse.duckdb").write_bytes(b"being copied")
        waiting = threading.Thread(target=lambda: (warehouse.rewrite(path), done.set()))
        waiting.start()
        time.sleep(0.5)
        assert not done.is_set()  # it waits for the lock ...
        assert (live / "warehouse.duckdb").exists()  # ... and has removed nothing
    waiting.join(timeout=120)
    assert done.is_set() and not live.exists()  # stale once the lock is free
    assert not _holds_marker(path)


def test_an_error_other_than_a_lock_is_not_waited_for(tmp_path: Path) -> None:
    """A file DuckDB cannot read as a database fails at once: waiting would not mend it."""
    path = tmp_path / "work" / "warehouse.duckdb"
    path.parent.mkdir(mode=0o700)
    path.write_bytes(b"not a database" * 1000)
    started = time.monotonic()
    with pytest.raises(duckdb.Error) as raised:
        warehouse.connect_when_free(path, wait_seconds=30)
    assert not isinstance(raised.value, warehouse.WarehouseBusyError)
    assert time.monotonic() - started < 10


# a rewrite in another process, killed (SIGKILL) as it puts the new file in the old one's place
_REWRITE_KILLED_AT_REPLACE = """
import os, signal, sys
from vault import warehouse

def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

warehouse.os.replace = killed
warehouse.rewrite_if_owed(sys.argv[1])
"""


def test_a_rewrite_killed_before_its_file_is_in_place_is_owed_still(tmp_path: Path) -> None:
    """The record that the file owes a rewrite leaves only with the rewritten file: a rewrite
    killed before it is in place leaves the old file, record and freed pages, and the next
    :func:`warehouse.rewrite_if_owed` completes it; then nothing is owed."""
    path = tmp_path / "w" / "warehouse.duckdb"
    warehouse_owing_a_rewrite(path)
    killed = subprocess.run(
        [sys.executable, "-c", _REWRITE_KILLED_AT_REPLACE, str(path)],
        capture_output=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert SECRET in path.read_bytes()
    assert warehouse.rewrite_if_owed(path)
    assert SECRET not in path.read_bytes()
    assert not warehouse.rewrite_if_owed(path)  # nothing owed any more: left alone
    con = warehouse.connect(path, read_only=True)
    try:
        assert not warehouse.rewrite_owed(con)
    finally:
        con.close()
