"""The instance storage: Dagster's SQLite layout, one SQLAlchemy engine per database."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from dagster import (
    AssetCheckResult,
    DagsterEventType,
    DagsterInstance,
    asset,
    asset_check,
    materialize,
)
from dagster._core.storage.event_log.sqlite import sqlite_event_log

from pipelines import dagster_storage
from pipelines.dagster_storage import EngineReusingSqliteEventLogStorage
from pipelines.run import local_instance

REPO_ROOT = Path(__file__).resolve().parents[2]


@asset
def numbers() -> list[int]:
    return [1, 2, 3]


@asset
def total(numbers: list[int]) -> int:
    return sum(numbers)


@asset_check(asset=total)
def total_is_six(total: int) -> AssetCheckResult:
    return AssetCheckResult(passed=total == 6)


def _count_engines(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[str]:
    made: list[str] = []

    def counting(url: Any, *args: Any, **kwargs: Any) -> Any:
        made.append(str(url))
        return sqlalchemy.create_engine(url, *args, **kwargs)

    monkeypatch.setattr(module, "create_engine", counting)
    return made


def _run_twice(instance: DagsterInstance) -> None:
    for _ in range(2):
        result = materialize([numbers, total, total_is_six], instance=instance)
        assert result.success


def test_the_instance_of_the_dagster_yaml_uses_the_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(REPO_ROOT / ".dagster_home" / "dagster.yaml", tmp_path / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    with DagsterInstance.get() as instance:
        assert isinstance(instance.event_log_storage, EngineReusingSqliteEventLogStorage)
        _run_twice(instance)
    # Dagster's own layout under DAGSTER_HOME: the runs, the index and one database per run
    assert (tmp_path / "history" / "runs.db").exists()
    assert (tmp_path / "history" / "runs" / "index.db").exists()
    assert len(list((tmp_path / "history" / "runs").glob("*.db"))) == 3


def test_a_run_makes_one_engine_per_database_where_dagster_makes_hundreds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours = _count_engines(monkeypatch, dagster_storage)
    theirs = _count_engines(monkeypatch, sqlite_event_log)
    with local_instance(tmp_path / "ours") as instance:
        _run_twice(instance)
        runs = instance.get_run_records()
        assert len(runs) == 2
        # what a run wrote reads back: its materialisations and the check's evaluation
        for record in runs:
            events = instance.all_logs(record.dagster_run.run_id)
            kinds = {e.dagster_event.event_type for e in events if e.dagster_event}
            assert {
                DagsterEventType.ASSET_MATERIALIZATION,
                DagsterEventType.ASSET_CHECK_EVALUATION,
                DagsterEventType.RUN_SUCCESS,
            } <= kinds
        assert instance.get_latest_materialization_event(total.key) is not None
    # the index database and one per run: engines kept, not made per read or write
    assert sorted(set(ours)) == sorted(ours)
    assert len(ours) == 3
    # independently: Dagster's own SQLite event log on the same two runs
    (tmp_path / "dagster").mkdir()
    with DagsterInstance.local_temp(str(tmp_path / "dagster")) as instance:
        _run_twice(instance)
    assert len(theirs) > 10 * len(ours)


def test_engines_beyond_the_bound_are_disposed(tmp_path: Path) -> None:
    storage = EngineReusingSqliteEventLogStorage(str(tmp_path))
    shards = [f"run{i}" for i in range(dagster_storage.MAX_ENGINES + 5)]
    for shard in shards:
        with storage.run_connection(shard) as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
    assert list(storage._engines) == shards[-dagster_storage.MAX_ENGINES :]
    storage.dispose()
    assert not storage._engines
