"""The warehouse resource holds the file open for a run: steps share one open database, the
file is checkpointed and released when the run ends (whether it succeeded or failed), and
outside a run every connect opens the file as before."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import duckdb
import pytest
from dagster import asset, materialize

from pipelines.resources import RUN_SWITCH_INTERVAL, WarehouseResource
from tests.owed_rewrite import SECRET, warehouse_owing_a_rewrite
from vault import warehouse as warehouse_module


def _wal(path: Path) -> Path:
    return path.with_name(path.name + ".wal")


def _run(tmp_path: Path, fail: bool = False) -> tuple[WarehouseResource, list[object]]:
    seen: list[object] = []

    @asset
    def first(warehouse: WarehouseResource) -> None:
        con = warehouse.connect()
        try:
            con.execute("CREATE TABLE IF NOT EXISTS t (v INTEGER)")
            con.execute("INSERT INTO t VALUES (1)")
        finally:
            con.close()
        # closing the step's connection did not checkpoint: the run still holds the file
        seen.append(_wal(warehouse.path).exists())

    @asset(deps=[first])
    def second(warehouse: WarehouseResource) -> None:
        con = warehouse.connect(read_only=True)  # refused beside a writer unless shared
        try:
            seen.append(con.execute("SELECT count(*) FROM t").fetchall()[0][0])
            # shared, and still read-only: a write is refused
            with pytest.raises(duckdb.TransactionException, match="read-only"):
                con.execute("INSERT INTO t VALUES (2)")
        finally:
            con.close()
        writer = warehouse.connect()
        try:
            seen.append(writer.execute("SELECT count(*) FROM t").fetchall()[0][0])
        finally:
            writer.close()
        if fail:
            raise RuntimeError("step failed on purpose")

    warehouse = WarehouseResource(workdir=str(tmp_path / "work"))
    materialize([first, second], resources={"warehouse": warehouse}, raise_on_error=not fail)
    return warehouse, seen


def test_a_run_holds_the_file_and_releases_it_at_its_end(tmp_path: Path) -> None:
    warehouse, seen = _run(tmp_path)
    assert seen == [True, 1, 1]
    # the run checkpointed and closed the file: no log left, and this process may open it
    # read-only (DuckDB refuses that while a writable connection is open in the process)
    assert not _wal(warehouse.path).exists()
    con = duckdb.connect(str(warehouse.path), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM t").fetchall() == [(1,)]
    finally:
        con.close()


def test_a_failed_run_releases_the_file_too(tmp_path: Path) -> None:
    warehouse, seen = _run(tmp_path, fail=True)
    assert seen == [True, 1, 1]
    assert not _wal(warehouse.path).exists()
    con = duckdb.connect(str(warehouse.path), read_only=True)
    con.close()


def test_outside_a_run_each_connect_opens_and_closes_the_file(tmp_path: Path) -> None:
    warehouse = WarehouseResource(workdir=str(tmp_path / "work"))
    con = warehouse.connect()
    con.execute("CREATE TABLE t (v INTEGER)")
    con.execute("INSERT INTO t VALUES (1)")
    con.close()
    assert not _wal(warehouse.path).exists()  # the last connection closed: checkpointed
    reader = warehouse.connect(read_only=True)
    try:
        with pytest.raises(duckdb.Error):
            reader.execute("INSERT INTO t VALUES (2)")
    finally:
        reader.close()


@pytest.mark.parametrize("fail", [False, True])
def test_a_run_freezes_the_objects_alive_before_it_and_switches_the_lock_sooner(
    tmp_path: Path, fail: bool
) -> None:
    seen: list[int] = []
    intervals: list[float] = []

    @asset
    def step(warehouse: WarehouseResource) -> None:
        warehouse.connect().close()
        seen.append(gc.get_freeze_count())
        intervals.append(sys.getswitchinterval())
        if fail:
            raise RuntimeError("the step failed")

    assert gc.get_freeze_count() == 0
    before = sys.getswitchinterval()
    assert before != RUN_SWITCH_INTERVAL
    result = materialize(
        [step],
        resources={"warehouse": WarehouseResource(workdir=str(tmp_path))},
        raise_on_error=False,
    )
    assert result.success is not fail
    assert seen and seen[0] > 1_000  # the modules, Dagster's objects, this test's
    assert gc.get_freeze_count() == 0  # handed back, also after a failed run
    # the lock changes hands sooner during the run; the interval from before is put back
    assert intervals == [RUN_SWITCH_INTERVAL]
    assert sys.getswitchinterval() == before


def test_a_run_performs_the_rewrite_the_warehouse_owes(tmp_path: Path) -> None:
    """An erasure (or an ingest refusing an erased person) killed between its commit and its
    rewrite leaves the deleted rows in freed pages and the record that the file owes a
    rewrite: the next run that writes rewrites the file when it releases it."""
    path = tmp_path / "work" / "warehouse.duckdb"
    warehouse_owing_a_rewrite(path)
    resource, _ = _run(tmp_path)
    assert SECRET not in path.read_bytes()
    con = warehouse_module.connect(resource.path, read_only=True)
    try:
        assert not warehouse_module.rewrite_owed(con)
    finally:
        con.close()
