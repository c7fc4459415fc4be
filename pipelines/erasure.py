"""Erasure beyond the warehouse tables: the released Parquet files (views, features, models)
and the Feast online store, as the places :class:`pipelines.workdir.Workdir` lists for
``ehr forget``: after it nothing of the patient is left in any file the platform publishes."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import duckdb

from pipelines.features.online_scan import feature_view_tables
from vault.lifecycle import check_pseudonym


def purge_released_parquet(folders: tuple[Path, ...], pseudonym: str) -> int:
    """Rewrite every released Parquet file that holds the patient without its rows; returns
    the number of rows removed."""
    check_pseudonym(pseudonym)  # inlined into COPY statements below: its own alphabet only
    removed = 0
    con = duckdb.connect()
    try:
        for folder in folders:
            for path in sorted(Path(folder).glob("*.parquet")):
                source = "read_parquet('" + str(path).replace("'", "''") + "')"
                columns = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
                if "patient_id" not in columns:
                    continue
                found = con.execute(
                    f"SELECT count(*) FROM {source} WHERE patient_id = ?", [pseudonym]
                ).fetchall()[0][0]
                if not found:
                    continue
                tmp = path.with_name(path.name + ".erasing")
                target = str(tmp).replace("'", "''")
                con.execute(
                    f"COPY (SELECT * FROM {source} WHERE patient_id IS DISTINCT FROM "
                    f"'{pseudonym}') TO '{target}' (FORMAT PARQUET)"
                )
                tmp.replace(path)
                removed += int(found)
    finally:
        con.close()
    return removed


def purge_online_store(db_path: Path, pseudonym: str) -> int:
    """Delete the patient's rows from every feature view table of the SQLite online store and
    vacuum the file, so the deleted pages do not keep the values; returns rows removed."""
    check_pseudonym(pseudonym)
    if not Path(db_path).exists():
        return 0
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    key = serialize_entity_key(
        EntityKey(join_keys=["patient_id"], entity_values=[Value(string_val=pseudonym)]),
        entity_key_serialization_version=3,
    )
    removed = 0
    db = sqlite3.connect(db_path)
    try:
        for _, quoted in feature_view_tables(db):
            removed += db.execute(f"DELETE FROM {quoted} WHERE entity_key = ?", [key]).rowcount
        db.commit()
        db.execute("VACUUM")
    finally:
        db.close()
    return removed


@dataclass(frozen=True)
class ReleasedParquet:
    """The released Parquet files of a workdir (views, features, models)."""

    folders: tuple[Path, ...]
    name: str = "released_parquet"

    def purge(self, pseudonym: str) -> int:
        return purge_released_parquet(self.folders, pseudonym)


@dataclass(frozen=True)
class OnlineStore:
    """The Feast online store (SQLite) of a workdir."""

    path: Path
    name: str = "feast_online_store"

    def purge(self, pseudonym: str) -> int:
        return purge_online_store(self.path, pseudonym)
