"""Publishing a table to DuckDB and Parquet at once: all of it, or none of it."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest

from pipelines import publish
from pipelines.publish import publish_table


def _tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    rows = con.execute(
        "SELECT table_schema || '.' || table_name FROM information_schema.tables"
    ).fetchall()
    return {name for (name,) in rows}


def test_publish_replaces_table_and_file(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    target = tmp_path / "out" / "t.parquet"
    assert publish_table(con, "s.t", target, "SELECT range AS x FROM range(3)") == 3
    rows = publish_table(con, "s.t", target, con.sql("SELECT 'a' AS y"), compression="zstd")
    assert rows == 1
    assert con.execute("SELECT * FROM s.t").fetchall() == [("a",)]
    assert pq.read_table(target).to_pylist() == [{"y": "a"}]
    assert _tables(con) == {"s.t"}
    assert [p.name for p in target.parent.iterdir()] == ["t.parquet"]


def test_failed_copy_keeps_old_table_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    target = tmp_path / "out" / "t.parquet"
    publish_table(con, "s.t", target, "SELECT 1 AS old")
    before = target.read_bytes()

    def half_written(
        con: duckdb.DuckDBPyConnection, table: str, path: Path, compression: str | None
    ) -> None:
        path.write_bytes(b"PAR1 and then the disk filled up")
        raise duckdb.IOException("No space left on device")

    monkeypatch.setattr(publish, "_copy_parquet", half_written)
    with pytest.raises(duckdb.IOException):
        publish_table(con, "s.t", target, "SELECT 2 AS new")
    assert con.execute("SELECT * FROM s.t").fetchall() == [(1,)]
    assert _tables(con) == {"s.t"}  # no staging table left either
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["t.parquet"]


def test_failed_query_keeps_old_table_and_file(tmp_path: Path) -> None:
    con = duckdb.connect()
    target = tmp_path / "t.parquet"
    publish_table(con, "s.t", target, "SELECT 1 AS old")
    with pytest.raises(duckdb.Error):
        publish_table(con, "s.t", target, "SELECT no_such_column FROM s.t")
    assert con.execute("SELECT * FROM s.t").fetchall() == [(1,)]
    assert pq.read_table(target).to_pylist() == [{"old": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def _in_place_setup(tmp_path: Path) -> tuple[duckdb.DuckDBPyConnection, list[publish.TableChange]]:
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    for name in ("a", "b"):
        publish_table(
            con, f"s.{name}", tmp_path / f"{name}.parquet", "SELECT range AS x FROM range(4)"
        )
    con.execute("CREATE TABLE s.log (entry VARCHAR)")
    changes = [
        publish.TableChange(
            f"s.{name}",
            tmp_path / f"{name}.parquet",
            (f"DELETE FROM s.{name} WHERE x % 2 = 0", f"INSERT INTO s.{name} VALUES (10), (12)"),
        )
        for name in ("a", "b")
    ]
    return con, changes


def _published(con: duckdb.DuckDBPyConnection, tmp_path: Path, name: str) -> tuple[list, list]:
    table = sorted(x for (x,) in con.execute(f"SELECT x FROM s.{name}").fetchall())
    file = sorted(r["x"] for r in pq.read_table(tmp_path / f"{name}.parquet").to_pylist())
    return table, file


def test_in_place_changes_tables_files_and_bookkeeping_together(tmp_path: Path) -> None:
    con, changes = _in_place_setup(tmp_path)
    publish.publish_in_place(
        con, changes, record=lambda c: c.execute("INSERT INTO s.log VALUES ('done')")
    )
    for name in ("a", "b"):
        assert _published(con, tmp_path, name) == ([1, 3, 10, 12], [1, 3, 10, 12])
    assert con.execute("SELECT * FROM s.log").fetchall() == [("done",)]
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == ["a.parquet", "b.parquet"]
    assert not list(tmp_path.glob(".*.tmp"))


class _Scan:
    def __init__(self, passed: bool) -> None:
        self.passed = passed


def test_in_place_check_sees_the_changed_rows_and_a_failure_changes_nothing(
    tmp_path: Path,
) -> None:
    con, changes = _in_place_setup(tmp_path)
    before = (tmp_path / "a.parquet").read_bytes()
    seen: list[list[int]] = []

    def check(c: duckdb.DuckDBPyConnection) -> _Scan:
        seen.append(sorted(x for (x,) in c.execute("SELECT x FROM s.a").fetchall()))
        return _Scan(passed=False)

    result = publish.publish_in_place(
        con, changes, check=check, record=lambda c: c.execute("INSERT INTO s.log VALUES ('x')")
    )
    assert result is not None and not result.passed
    assert seen == [[1, 3, 10, 12]]  # the check read the uncommitted rows
    for name in ("a", "b"):
        assert _published(con, tmp_path, name) == ([0, 1, 2, 3], [0, 1, 2, 3])
    assert (tmp_path / "a.parquet").read_bytes() == before
    assert con.execute("SELECT count(*) FROM s.log").fetchall() == [(0,)]


def test_in_place_failed_copy_rolls_back_tables_and_bookkeeping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    con, changes = _in_place_setup(tmp_path)
    before = {name: (tmp_path / f"{name}.parquet").read_bytes() for name in ("a", "b")}
    real_copy = publish._copy_parquet
    copies: list[str] = []

    def second_copy_fails(
        con: duckdb.DuckDBPyConnection, table: str, path: Path, compression: str | None
    ) -> None:
        copies.append(table)
        if len(copies) == 2:
            path.write_bytes(b"PAR1 and then the disk filled up")
            raise duckdb.IOException("No space left on device")
        real_copy(con, table, path, compression)

    monkeypatch.setattr(publish, "_copy_parquet", second_copy_fails)
    with pytest.raises(duckdb.IOException):
        publish.publish_in_place(
            con, changes, record=lambda c: c.execute("INSERT INTO s.log VALUES ('x')")
        )
    for name in ("a", "b"):
        assert _published(con, tmp_path, name) == ([0, 1, 2, 3], [0, 1, 2, 3])
        assert (tmp_path / f"{name}.parquet").read_bytes() == before[name]
    assert con.execute("SELECT count(*) FROM s.log").fetchall() == [(0,)]
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_failed_replacing_write_keeps_the_old_file_and_leaves_no_temporary_one(
    tmp_path: Path,
) -> None:
    target = tmp_path / "plot.png"
    target.write_bytes(b"old")

    def half_written(path: Path) -> None:
        path.write_bytes(b"ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish.write_replacing(target, half_written)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]

    publish.write_replacing(target, lambda path: path.write_bytes(b"new"))
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]


# A publish killed after writing its temporary Parquet file, before the rename: os._exit runs
# no handler and no cleanup, as under SIGKILL or a power loss.
_KILLED_PUBLISH = """
import os, sys
from pathlib import Path
import duckdb
from pipelines import publish
real_copy = publish._copy_parquet
def copy_then_die(con, table, path, compression):
    real_copy(con, table, path, compression)
    os._exit(9)
publish._copy_parquet = copy_then_die
con = duckdb.connect(sys.argv[1])
if sys.argv[2] == "in_place":
    change = publish.TableChange("s.t", Path(sys.argv[3]), ("INSERT INTO s.t VALUES ('new')",))
    publish.publish_in_place(con, [change])
else:
    publish.publish_table(con, "s.t", Path(sys.argv[3]), "SELECT 'killed' AS patient_id")
"""


def _killed_publish(database: Path, how: str, target: Path) -> list[Path]:
    """Run a publish of ``target`` in a child killed before its rename; the temporary files
    left beside ``target``."""
    import subprocess
    import sys

    child = subprocess.run(
        [sys.executable, "-c", _KILLED_PUBLISH, str(database), how, str(target)], check=False
    )
    assert child.returncode == 9
    return sorted(target.parent.glob(f".{target.name}.*.tmp"))


@pytest.mark.parametrize("how", ["table", "in_place"])
def test_the_next_publish_removes_what_a_killed_one_left(tmp_path: Path, how: str) -> None:
    """A publish killed between writing its temporary file and renaming it leaves that file,
    with every row the table had (patients withheld or erased since among them); the next
    publish of the same target removes it, and leaves another target's to that one."""
    database, out = tmp_path / "w.duckdb", tmp_path / "out"
    con = duckdb.connect(str(database))
    publish_table(con, "s.t", out / "t.parquet", "SELECT 'old' AS patient_id")
    publish_table(con, "s.u", out / "u.parquet", "SELECT 'old' AS patient_id")
    con.close()
    (left,) = _killed_publish(database, how, out / "t.parquet")
    (other,) = _killed_publish(database, how, out / "u.parquet")
    assert sorted(out.glob(".*.tmp")) == sorted([left, other])
    assert pq.read_table(left).num_rows >= 1  # a whole file, never renamed into place

    con = duckdb.connect(str(database))
    publish_table(con, "s.t", out / "t.parquet", "SELECT 'next' AS patient_id")
    assert sorted(out.glob(".*.tmp")) == [other]
    publish.publish_in_place(
        con, [publish.TableChange("s.u", out / "u.parquet", ("DELETE FROM s.u",))]
    )
    assert sorted(p.name for p in out.iterdir()) == ["t.parquet", "u.parquet"]


def test_two_replacing_writes_at_once_leave_one_whole_file(tmp_path: Path) -> None:
    """Each write has a temporary file of its own: a second writer finishing while the first
    is half-way (a release's summary beside an erasure's) neither truncates the first's file
    nor has its own renamed away; the last rename wins, whole."""
    target = tmp_path / "run_summary.json"
    target.write_text("old")

    def first(path: Path) -> None:
        path.write_text("first, ")
        publish.write_replacing(target, lambda other: other.write_text("second"))
        assert target.read_text() == "second"
        with path.open("a") as handle:
            handle.write("whole")

    publish.write_replacing(target, first)
    assert target.read_text() == "first, whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_summary.json"]


def test_a_replacing_write_keeps_the_files_mode_and_makes_a_new_file_private(
    tmp_path: Path,
) -> None:
    kept, new = tmp_path / "kept.json", tmp_path / "new.json"
    kept.write_text("old")
    kept.chmod(0o640)
    for path in (kept, new):
        publish.write_replacing(path, lambda p: p.write_text("new"))
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640
    assert stat.S_IMODE(new.stat().st_mode) == 0o600


def test_a_replacing_write_killed_before_its_rename_leaves_what_the_cleanup_finds(
    tmp_path: Path,
) -> None:
    """Killed (os._exit: as under SIGKILL) with its file written and not renamed, a write
    leaves its temporary file under a name :func:`publish.unfinished_temporaries` finds, for
    an erasure to delete: it holds what the file was to hold."""
    target = tmp_path / "trained_on.parquet"
    killed = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from pipelines.publish import write_replacing\n"
        "def die(path):\n"
        "    path.write_bytes(b'rows')\n"
        "    os._exit(9)\n"
        "write_replacing(Path(sys.argv[1]), die)\n"
    )
    run = subprocess.run([sys.executable, "-c", killed, str(target)], check=False)
    assert run.returncode == 9
    (left,) = publish.unfinished_temporaries(tmp_path, target.name)
    assert left.read_bytes() == b"rows" and not target.exists()


def test_unfinished_temporaries_are_the_publishes_own_names_only(tmp_path: Path) -> None:
    """What a killed publish leaves, found by target; never a published file, another
    program's file or a folder."""
    names = [
        ".t.parquet.ab1_x9zq.tmp",  # tempfile's eight characters
        ".u.parquet.0123abcd.tmp",
        "t.parquet",
        ".t.parquet.tmp",  # not a publish's name
        ".t.parquet.erasing",
        "notes.tmp",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".v.parquet.zzzzzzzz.tmp").mkdir()
    assert [p.name for p in publish.unfinished_temporaries(tmp_path)] == [
        ".t.parquet.ab1_x9zq.tmp",
        ".u.parquet.0123abcd.tmp",
    ]
    assert [p.name for p in publish.unfinished_temporaries(tmp_path, "u.parquet")] == [
        ".u.parquet.0123abcd.tmp"
    ]
    assert publish.unfinished_temporaries(tmp_path / "absent") == []


class _CommitFails:
    """A connection whose COMMIT fails, as one does on an I/O error: everything else is the
    DuckDB connection's own."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self._con = con

    def execute(self, sql: str, *args: Any) -> duckdb.DuckDBPyConnection:
        if sql.strip().upper() == "COMMIT":
            raise duckdb.IOException("IO Error: could not write the database file")
        return self._con.execute(sql, *args)


def test_in_place_a_commit_that_fails_puts_every_file_back(tmp_path: Path) -> None:
    """The new files were renamed over the old ones before the COMMIT; when it failed, the
    tables were rolled back and the files kept the rows never committed, until the next
    refresh wrote them again. Now both stay as they were, and nothing is left beside them."""
    con, changes = _in_place_setup(tmp_path)
    changes.append(
        publish.TableChange("s.log", tmp_path / "log.parquet", ("INSERT INTO s.log VALUES ('x')",))
    )
    before = {name: (tmp_path / f"{name}.parquet").read_bytes() for name in ("a", "b")}
    with pytest.raises(duckdb.IOException):
        publish.publish_in_place(_CommitFails(con), changes)  # type: ignore[arg-type]
    for name in ("a", "b"):
        assert _published(con, tmp_path, name) == ([0, 1, 2, 3], [0, 1, 2, 3])
        assert (tmp_path / f"{name}.parquet").read_bytes() == before[name]
    assert con.execute("SELECT count(*) FROM s.log").fetchall() == [(0,)]
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("w.duckdb"))
    assert left == ["a.parquet", "b.parquet"]


def test_in_place_without_hard_links_publishes_and_puts_files_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a file system without hard links (FAT, some network shares) the old files are kept
    as copies: a publish there failed every time once it kept them by a second name."""

    def no_links(*_: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(publish.os, "link", no_links)
    con, changes = _in_place_setup(tmp_path)
    before = {name: (tmp_path / f"{name}.parquet").read_bytes() for name in ("a", "b")}
    with pytest.raises(duckdb.IOException):
        publish.publish_in_place(_CommitFails(con), changes)  # type: ignore[arg-type]
    for name in ("a", "b"):
        assert (tmp_path / f"{name}.parquet").read_bytes() == before[name]
    publish.publish_in_place(con, changes)
    for name in ("a", "b"):
        assert _published(con, tmp_path, name) == ([1, 3, 10, 12], [1, 3, 10, 12])
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("w.duckdb"))
    assert left == ["a.parquet", "b.parquet"]
