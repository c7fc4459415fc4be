"""The Dagster instance's SQLite storage, with one SQLAlchemy engine per event-log database.

Dagster's SQLite event log builds a new SQLAlchemy engine (URL parsing, dialect set-up, pool and
event hooks) for every read and write, and disposes of it after: a release run writes ~170
events and reads asset records before each step, ~500 engines a run, 0.6 to 0.8 s of a release
refresh at 1,000 patients. This storage keeps each database's engine and still opens a fresh
SQLite connection for every block (``NullPool``, as Dagster does), so locking between the
webserver, the daemon and run processes is unchanged. Everything else (files, schema, layout
under ``base_dir``) is Dagster's own ``DagsterSqliteStorage``.

Configured in ``.dagster_home/dagster.yaml``; :func:`storage_overrides` gives the same for an
instance made with ``DagsterInstance.local_temp`` (``ehr run`` and the benches).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
    SQLITE_BUSY_TIMEOUT_SECONDS,
    SqliteEventLogStorage,
)
from dagster._core.storage.sqlite_storage import DagsterSqliteStorage, _event_logs_directory
from dagster._serdes import ConfigurableClassData
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

# engines kept at once: the index database and the runs being written or read (a webserver
# reading many old runs makes and drops engines as Dagster itself does)
MAX_ENGINES = 32


class EngineReusingSqliteEventLogStorage(SqliteEventLogStorage):
    """Dagster's SQLite event log, making each database's engine once (see the module)."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        # guarded by Dagster's own ``_db_lock``, which every connection block holds
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        super().__init__(base_dir, inst_data=inst_data)

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData | None, config_value: Any
    ) -> EngineReusingSqliteEventLogStorage:
        return cls(inst_data=inst_data, **config_value)

    def _engine(self, shard: str) -> Engine:
        """The shard's engine, made on first use (the caller holds ``_db_lock``)."""
        engine = self._engines.get(shard)
        if engine is not None:
            self._engines.move_to_end(shard)
            return engine
        engine = create_engine(
            self.conn_string_for_shard(shard),
            poolclass=NullPool,  # a new SQLite connection per block, as Dagster opens them
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS},
        )
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

    def dispose(self) -> None:
        with self._db_lock:
            for engine in self._engines.values():
                engine.dispose()
            self._engines.clear()
        super().dispose()


class SqliteStorage(DagsterSqliteStorage):
    """``DagsterSqliteStorage`` (runs, event logs and schedules under ``base_dir``) with the
    engine-reusing event log."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        super().__init__(base_dir, inst_data=inst_data)
        self._event_log_storage = EngineReusingSqliteEventLogStorage(
            _event_logs_directory(base_dir)
        )

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
