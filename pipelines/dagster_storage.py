"""The Dagster instance's SQLite storage, with one SQLAlchemy engine per event-log database
and its connections kept open between reads and writes.

Dagster's SQLite event log builds a new SQLAlchemy engine (URL parsing, dialect set-up, pool and
event hooks) for every read and write, opens a new SQLite connection in it and disposes of both
after: a release run writes ~170 events and reads asset records before each step, ~500 engines
and ~950 connections a run, about a second of a release refresh at 1,000 patients. This storage
keeps each database's engine and a small pool of its connections. An idle SQLite connection
holds no lock (a lock lasts one transaction, and the pool rolls back what it is given back), so
the webserver, the daemon and run processes share the files as they do under Dagster's own
storage. A wipe, which deletes the run databases' files, first closes every kept connection, so
that nothing is written to a deleted file. Its connections commit in WAL mode without an fsync
per commit (``synchronous=NORMAL``, see :func:`_sync_on_checkpoint`). Everything else (files,
schema, layout under ``base_dir``) is Dagster's own ``DagsterSqliteStorage``.

Configured in ``.dagster_home/dagster.yaml``; :func:`storage_overrides` gives the same for an
instance made with ``DagsterInstance.local_temp`` (``ehr run`` and the benches).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import sqlalchemy.exc
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from dagster._core.storage.event_log.schema import SqlEventLogStorageMetadata
from dagster._core.storage.event_log.sqlite import sqlite_event_log
from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
    INDEX_SHARD_NAME,
    SQLITE_BUSY_TIMEOUT_SECONDS,
    SqliteEventLogStorage,
)
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
from dagster._core.storage.schedules.sqlite.sqlite_schedule_storage import SqliteScheduleStorage
from dagster._core.storage.sql import get_alembic_config
from dagster._core.storage.sqlite_storage import (
    DagsterSqliteStorage,
    _event_logs_directory,
    _runs_directory,
    _schedule_directory,
)
from dagster._serdes import ConfigurableClassData
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection
from sqlalchemy.pool import QueuePool

from vault.keys import exclusive_lock

# engines kept at once: the index database and the runs being written or read (a webserver
# reading many old runs makes and drops engines as Dagster itself does)
MAX_ENGINES = 32
# the flock, in ``base_dir``, under which a process opens (and on first use creates) the databases
SET_UP_LOCK = ".storage.lock"
# connections kept open per database; threads beyond them (the webserver's) open and close
# their own, up to MAX_OVERFLOW more at once
POOLED_CONNECTIONS = 2
MAX_OVERFLOW = 16


def _sync_on_checkpoint(dbapi_connection: Any, _record: Any) -> None:
    """Commit without waiting for the disk, syncing at each WAL checkpoint instead: SQLite's
    advice for a database in WAL mode. Dagster puts its event logs in WAL mode when it makes
    them; set here first, so that a new run's database is in it from its first commit. A killed
    process loses no committed event (the OS holds the written pages); a power cut may lose
    the last events written, never the database's consistency. A release run writes ~170
    events, each commit otherwise an fsync."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


@cache
def _event_log_migrations() -> ScriptDirectory:
    """Dagster's migration scripts for the event log, read once per process: Dagster reads
    them twice for every new run database (its revision check, then its stamp), ~60 ms of
    every run."""
    return ScriptDirectory.from_config(get_alembic_config(sqlite_event_log.__file__))


class EngineReusingSqliteEventLogStorage(SqliteEventLogStorage):
    """Dagster's SQLite event log, making each database's engine once (see the module)."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        # guarded by Dagster's own ``_db_lock``, which every connection block holds
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        # ``has_table`` may be asked within a connection block, which holds ``_db_lock``: its
        # own engine, under its own lock
        self._probe_lock = threading.Lock()
        self._probe: Engine | None = None
        # schema facts that, once true, stay true until a wipe or an upgrade (see _schema_fact)
        self._schema_facts: set[tuple[str, str]] = set()
        super().__init__(base_dir, inst_data=inst_data)

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData | None, config_value: Any
    ) -> EngineReusingSqliteEventLogStorage:
        return cls(inst_data=inst_data, **config_value)

    def _create_engine(self, shard: str) -> Engine:
        engine = create_engine(
            self.conn_string_for_shard(shard),
            poolclass=QueuePool,
            pool_size=POOLED_CONNECTIONS,
            max_overflow=MAX_OVERFLOW,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
        )
        event.listen(engine, "connect", _sync_on_checkpoint)
        return engine

    def _engine(self, shard: str) -> Engine:
        """The shard's engine, made on first use (the caller holds ``_db_lock``)."""
        engine = self._engines.get(shard)
        if engine is not None:
            self._engines.move_to_end(shard)
            return engine
        engine = self._create_engine(shard)
        self._engines[shard] = engine
        while len(self._engines) > MAX_ENGINES:
            _, dropped = self._engines.popitem(last=False)
            dropped.dispose()
        return engine

    @contextmanager
    def _connect(self, shard: str) -> Iterator[Connection]:
        # the body of SqliteEventLogStorage._connect, the engine kept instead of disposed
        with self._db_lock:
            engine = self._engine(shard)
            if shard not in self._initialized_dbs:
                self._initdb(engine)
                self._initialized_dbs.add(shard)
            with engine.connect() as conn:
                with conn.begin():
                    yield conn

    def _initdb(self, engine: Engine, for_index_shard: bool = False) -> None:
        """A run database as Dagster sets it up (its tables, WAL, stamped at the newest
        migration), with the migration scripts read once per process. The index database, and
        a run database that another process is setting up at the same moment (the launcher and
        the run both write a new run's first events), are left to Dagster's own set-up, which
        handles those cases and retries."""
        if for_index_shard:
            super()._initdb(engine, for_index_shard=True)
            return
        try:
            with engine.connect() as connection:
                context = MigrationContext.configure(connection)
                if context.get_current_revision() is not None:
                    return
                SqlEventLogStorageMetadata.create_all(connection)
                connection.exec_driver_sql("PRAGMA journal_mode=WAL")
                context.stamp(_event_log_migrations(), "head")
                connection.commit()
        except (sqlalchemy.exc.DatabaseError, sqlite3.DatabaseError):
            super()._initdb(engine)

    def has_table(self, table_name: str) -> bool:
        # Dagster's asks the index database with a new engine, ~70 times a release run
        with self._probe_lock:
            if self._probe is None:
                self._probe = self._create_engine(INDEX_SHARD_NAME)
            probe = self._probe
        with probe.connect() as conn:
            return bool(probe.dialect.has_table(conn, table_name))

    def _schema_fact(self, kind: str, name: str, ask: Callable[[], bool]) -> bool:
        """Whether the index database has a column or a completed data migration, asked once
        per process while the answer is yes. Dagster asks before every read of asset records
        and every asset event (~165 times a release run, a schema reflection or a query each);
        a column or a completed migration is never taken away, except by a wipe or an upgrade,
        which forget the answers. A no is asked again each time (another process may migrate).
        Dagster's consolidated SQLite event log caches its migrations' answers the same way."""
        if (kind, name) in self._schema_facts:
            return True
        found = ask()
        if found:
            self._schema_facts.add((kind, name))
        return found

    def has_secondary_index(self, name: str) -> bool:
        ask = super().has_secondary_index
        return self._schema_fact("migration", name, lambda: ask(name))

    def has_asset_key_col(self, column_name: str) -> bool:
        if ("asset_keys column", column_name) in self._schema_facts:
            return True  # without opening a connection to ask
        return super().has_asset_key_col(column_name)

    def _has_asset_key_col_on_connection(self, conn: Connection, column_name: str) -> bool:
        ask = super()._has_asset_key_col_on_connection
        return self._schema_fact("asset_keys column", column_name, lambda: ask(conn, column_name))

    def upgrade(self) -> None:
        self._schema_facts.clear()
        super().upgrade()

    def _close_engines(self) -> None:
        with self._db_lock:
            for engine in self._engines.values():
                engine.dispose()
            self._engines.clear()
        with self._probe_lock:
            if self._probe is not None:
                self._probe.dispose()
                self._probe = None

    def wipe(self) -> None:
        # Dagster deletes the run databases' files: no kept connection may write to them after
        self._close_engines()
        self._schema_facts.clear()
        super().wipe()

    def dispose(self) -> None:
        self._close_engines()
        super().dispose()


class SqliteStorage(DagsterSqliteStorage):
    """``DagsterSqliteStorage`` (runs, event logs and schedules under ``base_dir``) with the
    engine-reusing event log."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        # DagsterSqliteStorage.__init__ with this event log in place of Dagster's (whose set-up
        # reads the index database's schema, twice over if it were built and then replaced)
        self.base_dir = base_dir
        # one process at a time sets the databases up: two creating a new instance at once
        # (two commands on a new work directory, the webserver and the daemon on a new home)
        # would otherwise both create the runs database's tables, and Dagster's run storage,
        # unlike its event log, does not retry when the other was first ("table ... already
        # exists")
        os.makedirs(base_dir, exist_ok=True)
        with exclusive_lock(Path(base_dir) / SET_UP_LOCK):
            self._run_storage = SqliteRunStorage.from_local(_runs_directory(base_dir))
            self._event_log_storage = EngineReusingSqliteEventLogStorage(
                _event_logs_directory(base_dir)
            )
            self._schedule_storage = SqliteScheduleStorage.from_local(_schedule_directory(base_dir))
        self._inst_data = inst_data
        super(DagsterSqliteStorage, self).__init__()  # what DagsterSqliteStorage calls

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData, config_value: Any
    ) -> SqliteStorage:
        return cls.from_local(inst_data=inst_data, **config_value)


def storage_overrides(base_dir: str) -> dict[str, Any]:
    """Instance settings that select :class:`SqliteStorage` in ``base_dir`` (for
    ``DagsterInstance.local_temp``)."""
    return {
        "storage": {
            "custom": {
                "module": __name__,
                "class": SqliteStorage.__name__,
                "config": {"base_dir": base_dir},
            }
        }
    }
