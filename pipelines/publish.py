"""Publishing a table twice, as a DuckDB table and as a Parquet file, so that a reader of either
sees the old rows or the new ones and never a half-written table or file.

The DuckDB side swaps a fully built staging table in within one transaction; the Parquet side
is written to a temporary file beside the target, flushed to disk, then renamed over it (a rename
within one folder is atomic). A failure before the swap leaves the old table, the old file and
no temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import duckdb

from vault.keys import fsync_dir

STAGING_SUFFIX = "__staging"


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _stage(
    con: duckdb.DuckDBPyConnection, staging: str, source: str | duckdb.DuckDBPyRelation
) -> None:
    con.execute(f"DROP TABLE IF EXISTS {staging}")
    if isinstance(source, duckdb.DuckDBPyRelation):
        source.create(staging)
    else:
        con.execute(f"CREATE TABLE {staging} AS {source}")


def _copy_parquet(
    con: duckdb.DuckDBPyConnection, table: str, path: Path, compression: str | None
) -> None:
    """Write ``table`` to ``path`` as Parquet and flush the file to disk."""
    options = "FORMAT parquet" + (f", COMPRESSION {compression}" if compression else "")
    con.execute(f"COPY {table} TO {_sql_string(str(path))} ({options})")
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _swap_in(con: duckdb.DuckDBPyConnection, staging: str, target: str) -> None:
    """Replace ``target`` with ``staging`` in one transaction: readers see one or the other."""
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(f"DROP TABLE IF EXISTS {target}")
        con.execute(f"ALTER TABLE {staging} RENAME TO {target.split('.')[-1]}")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def publish_table(
    con: duckdb.DuckDBPyConnection,
    schema_table: str,
    parquet_path: Path,
    source: str | duckdb.DuckDBPyRelation,
    *,
    compression: str | None = None,
) -> int:
    """Replace the DuckDB table ``schema_table`` (``schema.name``) and the file ``parquet_path``
    with the rows of ``source`` (a SELECT statement or a relation of ``con``); the row count.

    ``compression`` is a DuckDB Parquet codec (``zstd``, ``snappy``...); DuckDB's default when
    None. Both names must be trusted identifiers: they are spliced into SQL.
    """
    schema, _, name = schema_table.rpartition(".")
    if not schema or not name:
        raise ValueError(f"expected schema.table, got {schema_table!r}")
    target = Path(parquet_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    staging = f"{schema}.{name}{STAGING_SUFFIX}"
    # a unique hidden name: two writers never share it, and globs for *.parquet never see it
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _stage(con, staging, source)
        ((rows,),) = con.execute(f"SELECT count(*) FROM {staging}").fetchall()
        _copy_parquet(con, staging, tmp, compression)
        _swap_in(con, staging, schema_table)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.execute(f"DROP TABLE IF EXISTS {staging}")
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return int(rows)
