"""Publishing a table to DuckDB and Parquet at once: all of it, or none of it."""

from __future__ import annotations

from pathlib import Path

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
