"""The instance storage: Dagster's SQLite layout, one SQLAlchemy engine per database."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import Counter
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
from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage
from dagster._core.storage.event_log.sqlite import sqlite_event_log

from pipelines import dagster_storage
from pipelines.dagster_storage import EngineReusingSqliteEventLogStorage
from pipelines.run import local_instance
from vault.keys import exclusive_lock

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


def _home_with_the_repos_dagster_yaml(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``home`` as DAGSTER_HOME, with this repository's ``dagster.yaml`` (as ``make ui``)."""
    shutil.copy(REPO_ROOT / ".dagster_home" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))


def _run_twice(instance: DagsterInstance) -> None:
    for _ in range(2):
        result = materialize([numbers, total, total_is_six], instance=instance)
        assert result.success


def test_the_instance_of_the_dagster_yaml_uses_the_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _home_with_the_repos_dagster_yaml(tmp_path, monkeypatch)
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
    # the index database (one engine for records, one for table probes) and one per run:
    # engines kept, not made per read or write
    assert len(set(ours)) == 3
    assert len(ours) == 4
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


def test_event_logs_commit_in_wal_mode_without_a_sync_per_event(tmp_path: Path) -> None:
    with local_instance(tmp_path / "ours") as instance:
        _run_twice(instance)
        storage = instance.event_log_storage
        assert isinstance(storage, EngineReusingSqliteEventLogStorage)
        run_id = instance.get_run_records()[0].dagster_run.run_id
        for shard in (run_id, "index"):
            with storage._connect(shard) as conn:
                journal = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
                synchronous = conn.exec_driver_sql("PRAGMA synchronous").scalar()
            # SQLite's codes: 1 is NORMAL (2, FULL, its default, syncs at every commit)
            assert (journal, synchronous) == ("wal", 1), shard
        # independently of the kept connections: the files themselves are in WAL mode
        for database in (tmp_path / "ours").rglob("runs/*.db"):
            with contextlib.closing(sqlite3.connect(database)) as plain:
                assert plain.execute("PRAGMA journal_mode").fetchone() == ("wal",), database


@pytest.fixture
def opened_connections() -> Any:
    opened: list[str] = []

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        rows = dbapi_connection.execute("PRAGMA database_list").fetchall()
        path = Path(rows[0][2]) if rows and rows[0][2] else None
        if path is not None and path.parent.name == "runs":  # the event log's databases
            opened.append(str(path))

    sqlalchemy.event.listen(sqlalchemy.pool.Pool, "connect", on_connect)
    try:
        yield opened
    finally:
        sqlalchemy.event.remove(sqlalchemy.pool.Pool, "connect", on_connect)


def test_connections_are_kept_where_dagster_opens_one_per_read_or_write(
    tmp_path: Path, opened_connections: list[str]
) -> None:
    with local_instance(tmp_path / "ours") as instance:
        _run_twice(instance)
        warmed = list(opened_connections)
        _run_twice(instance)
        ours = list(opened_connections)
    opened_connections.clear()
    (tmp_path / "dagster").mkdir()
    with DagsterInstance.local_temp(str(tmp_path / "dagster")) as instance:
        _run_twice(instance)
        _run_twice(instance)
    theirs = list(opened_connections)
    # two more runs open no connection to the index database, and a few to each new run's
    # database; Dagster's own storage opens one per read or write
    index = [p for p in ours if Path(p).name == "index.db"]
    assert index and index == [p for p in warmed if Path(p).name == "index.db"]
    for database in set(ours) - set(warmed):
        assert ours.count(database) <= 2 * dagster_storage.POOLED_CONNECTIONS, database
    assert len(theirs) > 10 * len(ours), (len(theirs), len(ours))


_OTHER_PROCESS = """
from dagster import DagsterInstance, asset, materialize

@asset
def numbers() -> list[int]:
    return [1, 2, 3]

with DagsterInstance.get() as instance:
    assert materialize([numbers], instance=instance).success
"""


def test_a_process_beside_one_that_keeps_connections_writes_and_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the webserver and a run process do: both write the same index database."""
    _home_with_the_repos_dagster_yaml(tmp_path, monkeypatch)
    with DagsterInstance.get() as instance:
        _run_twice(instance)  # connections to the index database are now kept open
        assert dagster_storage.POOLED_CONNECTIONS >= 1
        subprocess.run(
            [sys.executable, "-c", _OTHER_PROCESS],
            check=True,
            timeout=120,
            env={**os.environ, "DAGSTER_HOME": str(tmp_path)},
        )
        assert len(instance.get_run_records()) == 3
        latest = instance.get_latest_materialization_event(numbers.key)
        assert latest is not None and latest.run_id not in {
            r.dagster_run.run_id for r in instance.get_run_records()[1:]
        }
        _run_twice(instance)  # and this one still writes after the other process
        assert len(instance.get_run_records()) == 5


def _deleted_databases_open() -> list[str]:
    fds = Path("/proc/self/fd")
    targets = []
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            targets.append(os.readlink(fd))
    return [t for t in targets if ".db" in t and t.endswith("(deleted)")]


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc (Linux)")
def test_a_wipe_closes_the_kept_connections_before_deleting_the_files(tmp_path: Path) -> None:
    with local_instance(tmp_path) as instance:
        _run_twice(instance)
        storage = instance.event_log_storage
        assert isinstance(storage, EngineReusingSqliteEventLogStorage)
        assert storage._engines
        instance.wipe()
        # the index database (whose rows a wipe deletes) opened again, no run's
        assert set(storage._engines) <= {"index"}
        assert _deleted_databases_open() == []
        _run_twice(instance)
        assert len(instance.get_run_records()) == 2
        assert instance.get_latest_materialization_event(total.key) is not None


def _schema_and_stamp(database: Path) -> tuple[list[Any], list[Any]]:
    with contextlib.closing(sqlite3.connect(database)) as plain:
        schema = sorted(plain.execute("SELECT type, name, sql FROM sqlite_master").fetchall())
        return schema, plain.execute("SELECT version_num FROM alembic_version").fetchall()


def test_a_new_run_database_is_set_up_as_dagster_sets_it_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "dagster").mkdir()
    databases = {}
    for name, instance in (
        ("ours", local_instance(tmp_path / "ours")),
        ("dagster", DagsterInstance.local_temp(str(tmp_path / "dagster"))),
    ):
        with instance:
            result = materialize([numbers, total, total_is_six], instance=instance)
            assert result.success
        (databases[name],) = (tmp_path / name).rglob(f"runs/{result.run_id}.db")
    ours, dagsters = (_schema_and_stamp(databases[n]) for n in ("ours", "dagster"))
    assert ours == dagsters
    assert ours[1] and ours[1][0][0]  # stamped at Dagster's newest migration

    # the migration scripts are read once per process, not twice for every new run database
    # (Dagster itself reads them when an instance opens its index and run databases)
    read: list[int] = []
    original = dagster_storage.ScriptDirectory.from_config
    with local_instance(tmp_path / "ours") as instance:
        monkeypatch.setattr(
            dagster_storage.ScriptDirectory,
            "from_config",
            lambda config: read.append(1) or original(config),
        )
        dagster_storage._event_log_migrations.cache_clear()
        for _ in range(3):
            assert materialize([numbers, total, total_is_six], instance=instance).success
    assert len(read) == 1


def test_a_run_database_set_up_elsewhere_is_left_as_it_is(tmp_path: Path) -> None:
    storage = EngineReusingSqliteEventLogStorage(str(tmp_path))
    with storage.run_connection("run0") as conn:
        conn.execute(sqlalchemy.text("SELECT 1"))
    database = tmp_path / "run0.db"
    before = _schema_and_stamp(database)
    with contextlib.closing(sqlite3.connect(database)) as plain:
        plain.execute("CREATE TABLE kept_by_someone (x INTEGER)")
        plain.commit()
    storage.dispose()
    fresh = EngineReusingSqliteEventLogStorage(str(tmp_path))
    with fresh.run_connection("run0") as conn:
        conn.execute(sqlalchemy.text("SELECT 1"))
    fresh.dispose()
    schema, stamp = _schema_and_stamp(database)
    assert stamp == before[1]
    assert ("table", "kept_by_someone") in {(t, n) for t, n, _ in schema}


def test_runs_of_the_local_instance_write_no_telemetry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Dagster writes its telemetry under $DAGSTER_HOME/logs, or ~/.dagster/logs without it
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    with local_instance(tmp_path / "instance") as instance:
        assert not instance.telemetry_enabled
        _run_twice(instance)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "logs" in p.parts]
    assert written == []


def _count_schema_questions(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How often the index database's schema is asked about: its asset_keys columns reflected,
    and each data migration's checkpoint row looked up (Dagster's own methods, counted)."""
    asked: Counter[str] = Counter()
    reflect = SqlEventLogStorage._has_asset_key_col_on_connection
    migrated = SqlEventLogStorage.has_secondary_index

    def reflecting(self: Any, conn: Any, column_name: str) -> bool:
        asked[f"column {column_name}"] += 1
        return reflect(self, conn, column_name)

    def migration(self: Any, name: str) -> bool:
        asked[f"migration {name}"] += 1
        return migrated(self, name)

    monkeypatch.setattr(SqlEventLogStorage, "_has_asset_key_col_on_connection", reflecting)
    monkeypatch.setattr(SqlEventLogStorage, "has_secondary_index", migration)
    return asked


def test_the_index_schema_is_asked_once_where_dagster_asks_at_every_read_and_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = _count_schema_questions(monkeypatch)
    with local_instance(tmp_path / "ours") as instance:
        _run_twice(instance)
        ours = Counter(asked)
        # what the runs wrote reads back as Dagster reads it
        record = instance.get_asset_records([total.key])[0]
        assert record.asset_entry.last_materialization is not None
        storage = instance.event_log_storage
        assert isinstance(storage, EngineReusingSqliteEventLogStorage)
        storage.wipe()  # a wipe forgets what was known of the schema
        assert not storage._schema_facts
    asked.clear()
    (tmp_path / "dagster").mkdir()
    with DagsterInstance.local_temp(str(tmp_path / "dagster")) as instance:
        _run_twice(instance)
        instance.get_asset_records([total.key])
    theirs = Counter(asked)
    # every question Dagster asks is asked here too, and each one that was answered yes only once
    assert set(ours) == set(theirs) and sum(theirs.values()) > 5 * len(theirs)
    present = {q for q in ours if ours[q] == 1}
    assert present and sum(ours.values()) < sum(theirs.values()) / 5


# a process that, once it has imported what it needs, says so and reads a start time; then
# makes an instance in each home given, one every 0.3 s from that time, and reads its runs:
# processes given the same start make the same new instances at once
_MAKE_AT = """
import sys, time
from pathlib import Path
from pipelines.run import local_instance
print("ready", flush=True)
start = float(sys.stdin.readline())
for i, home in enumerate(sys.argv[1:]):
    while time.time() < start + 0.3 * i:
        pass
    with local_instance(Path(home)) as instance:
        assert instance.get_run_records() == []
print("made", flush=True)
"""


def _making(homes: list[Path]) -> subprocess.Popen[str]:
    """A process making an instance in each of ``homes``, returned once it is ready."""
    maker = subprocess.Popen(
        [sys.executable, "-c", _MAKE_AT, *map(str, homes)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert maker.stdout is not None and maker.stdout.readline().strip() == "ready"
    return maker


def _start(makers: list[subprocess.Popen[str]]) -> None:
    start = time.time() + 0.5
    for maker in makers:
        assert maker.stdin is not None
        maker.stdin.write(f"{start}\n")
        maker.stdin.flush()


def _made(maker: subprocess.Popen[str]) -> None:
    out, err = maker.communicate(timeout=120)
    assert maker.returncode == 0 and out.strip() == "made", err[-2000:]


def test_processes_making_a_new_instance_at_once_all_open_it(tmp_path: Path) -> None:
    """Commands started together on a new work directory: each creates the instance's
    databases, and none may fail because another created a table first."""
    homes = [tmp_path / f"home{i}" for i in range(6)]
    makers = [_making(homes) for _ in range(4)]
    _start(makers)
    for maker in makers:
        _made(maker)
    for home in homes:
        with sqlite3.connect(home / "history" / "runs.db") as con:
            assert con.execute("SELECT count(*) FROM runs").fetchone() == (0,)


def test_an_instance_is_set_up_under_the_homes_lock(tmp_path: Path) -> None:
    """A process that would set up the databases while another holds the lock waits for it."""
    home = tmp_path / "home"
    home.mkdir()
    with exclusive_lock(home / dagster_storage.SET_UP_LOCK):
        maker = _making([home])
        _start([maker])
        with pytest.raises(subprocess.TimeoutExpired):
            maker.wait(timeout=3)
        assert not (home / "history" / "runs.db").exists()
    _made(maker)
