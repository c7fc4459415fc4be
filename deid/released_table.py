"""The released-resources table (``deid_resources``): its columns, and the digest of each row's
released text that every writer keeps beside it."""

from __future__ import annotations

import re

import duckdb

from vault.catalog import has_table

# a table name, optionally schema-qualified: the only text interpolated into the stage's SQL
_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


def checked_table(name: str) -> str:
    """``name`` when it is a (schema-qualified) table name, else ValueError."""
    if not _TABLE_NAME.match(name):
        raise ValueError(f"not a table name: {name!r}")
    return name


DEID_DDL = """
CREATE TABLE IF NOT EXISTS deid_resources (
    resource_type VARCHAR NOT NULL,
    id VARCHAR NOT NULL,
    patient_id VARCHAR,
    batch_id VARCHAR NOT NULL,
    resource JSON NOT NULL,
    digest UBIGINT
)"""


# The digest of a released resource's text, written with the row (and with every change of its
# text): the views compare it with what they were built from (pipelines.views.refresh), which
# read 8 bytes a row where hashing every resource again read the whole JSON column at every
# refresh. Every statement that writes a row's ``resource`` writes its ``digest`` from the same
# text. A 64-bit hash compared id by id: a collision would need an id's new text to hash to its
# old text's value.
def resource_digest_sql(text: str = "resource") -> str:
    """The SQL of the digest of ``text`` (a JSON or VARCHAR expression: both hash alike)."""
    return f"hash({text})"


def ensure_resource_digests(con: duckdb.DuckDBPyConnection, table: str = "deid_resources") -> None:
    """Give a released-resources table written before the ``digest`` column existed its column,
    and fill it where it is empty (rows of an older release, or written without it); a no-op
    for a table that has it filled, and for none."""
    schema, _, name = checked_table(table).rpartition(".")
    if not has_table(con, name, schema or "main"):
        return
    con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS digest UBIGINT")
    con.execute(f"UPDATE {table} SET digest = {resource_digest_sql()} WHERE digest IS NULL")
