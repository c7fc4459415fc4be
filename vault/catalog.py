"""What a DuckDB database holds: the one check every layer uses before reading a table that
an older or partial warehouse may not have yet; and how every layer writes a name into SQL."""

from __future__ import annotations

import duckdb


def has_table(con: duckdb.DuckDBPyConnection, name: str, schema: str = "main") -> bool:
    """Whether the connection's own database (not an attached one) holds the table."""
    ((found,),) = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
        "AND schema_name = ? AND table_name = ?",
        [schema, name],
    ).fetchall()
    return bool(found)


def table_columns(con: duckdb.DuckDBPyConnection, name: str, schema: str = "main") -> set[str]:
    """The column names of a table (none when there is no such table)."""
    rows = con.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = ? AND table_name = ?",
        [schema, name],
    ).fetchall()
    return {column for (column,) in rows}


# 2**64: a multiset digest is a sum of 64-bit hashes, kept to 64 bits
_DIGEST_MODULUS = 1 << 64


def multiset_digest_sql(row_hash: str) -> str:
    """SQL aggregate: a digest of the rows it groups, independent of their order, from
    ``row_hash`` (a trusted UBIGINT expression of a row, such as ``hash(t)``): the sum of the
    hashes modulo 2**64 (NULL over no rows). A row present twice counts twice: an exclusive or
    of the hashes cancels a pair of equal rows, so two equal rows added (two results of one
    content sent as two resources are two equal view rows), or a pair replaced by another
    pair, left it as it was."""
    return f"(sum({row_hash}) % {_DIGEST_MODULUS})::UBIGINT"


def quote_identifier(name: str) -> str:
    """``name`` as a double-quoted SQL identifier (DuckDB and SQLite), inner quotes doubled."""
    return '"' + name.replace('"', '""') + '"'
