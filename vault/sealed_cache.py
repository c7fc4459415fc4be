"""Values derived from the vault's PHI, kept between runs sealed: computed once per vault state
instead of once per run process (the leak scan's canaries, :mod:`deid.release`).

An entry is one blob under a name, sealed with AES-256-GCM under the shared data key (the key
of the vault's resources of no patient) and bound, as associated data, to its name and to the
state it was computed from; the state is stored beside it in the clear (a digest, no PHI), and
the blob in parts of 1 MiB, one a row. A reader asks for the state it is in and gets nothing
back when the entry was made in another.

An entry holds PHI of every patient it was made from, as the vault does, and is kept as the
vault's shared resources are: sealed at rest, and deleted by every erasure in the erasure's own
transaction (:func:`drop_entries`), whose rewrite of the file then wipes the freed pages
(:func:`vault.warehouse.rewrite`). No data key of a patient is needed to open it, so a
patient's erasure cannot rely on destroying one: the deletion is what removes them.
"""

from __future__ import annotations

import os

import duckdb

from vault.catalog import has_table, table_columns
from vault.clock import RandomBytes
from vault.keys import KeyProvider
from vault.sealing import SHARED_OWNER, DataKeyStore, seal

SEALED_CACHE_TABLE = "sealed_cache"
SEALED_CACHE_DDL = f"""
CREATE TABLE IF NOT EXISTS {SEALED_CACHE_TABLE} (
    name VARCHAR NOT NULL,
    state VARCHAR NOT NULL,
    part INTEGER NOT NULL,
    sealed BLOB NOT NULL,
    PRIMARY KEY (name, part)
)
"""
_AAD_PREFIX = b"ehr-sealed-cache/1|"
# An entry is sealed whole, then stored in parts of this size, one a row: a single value of
# tens of MB (the canaries of 3,000 patients are 36 MB) does not fit the warehouse's memory
# limit (vault.warehouse.DEFAULT_MEMORY_LIMIT) when DuckDB inserts it
PART_BYTES = 1 << 20


def _aad(name: str, state: str) -> bytes:
    return _AAD_PREFIX + name.encode() + b"|" + state.encode()


def read_entry(
    con: duckdb.DuckDBPyConnection, provider: KeyProvider, name: str, state: str
) -> bytes | None:
    """The entry ``name`` made in ``state``, opened; None when there is none, or only one made
    in another state. :class:`vault.errors.InvalidCiphertext` when the blob (a part of it
    changed, missing or moved), its name or its state was changed, or it is sealed under
    another key than the shared one; :class:`vault.errors.KeyDestroyedError` when it names a
    key the warehouse does not hold."""
    if "part" not in table_columns(con, SEALED_CACHE_TABLE):  # none, or one of one blob a row
        return None
    # the parts of another state are not read out: they are stale, and as large as the entry;
    # the others are streamed, a few at a time, and put in order here (sorted by DuckDB, an
    # entry of 80 MB ran out of the warehouse's memory limit)
    parts: dict[int, bytes] = {}
    cursor = con.cursor()
    try:
        cursor.execute(
            f"SELECT part, sealed FROM {SEALED_CACHE_TABLE} WHERE name = ? AND state = ?",
            [name, state],
        )
        while chunk := cursor.fetchmany(8):
            parts.update((int(number), bytes(part)) for number, part in chunk)
    finally:
        cursor.close()
    if not parts:
        return None
    store = DataKeyStore(con, provider)
    blob = b"".join(parts[number] for number in sorted(parts))
    return store.open_owned(blob, _aad(name, state), SHARED_OWNER)


def entry_state(con: duckdb.DuckDBPyConnection, name: str) -> str | None:
    """The state the entry ``name`` was made in, as stored beside it; None when there is none.
    Not authenticated here: :func:`read_entry` of that state opens the entry only when its
    blob was sealed for it."""
    if "part" not in table_columns(con, SEALED_CACHE_TABLE):
        return None
    rows = con.execute(
        f"SELECT DISTINCT state FROM {SEALED_CACHE_TABLE} WHERE name = ?", [name]
    ).fetchall()
    return str(rows[0][0]) if len(rows) == 1 else None


def write_entry(
    con: duckdb.DuckDBPyConnection,
    provider: KeyProvider,
    name: str,
    state: str,
    value: bytes,
    *,
    random_bytes: RandomBytes = os.urandom,
) -> None:
    """Seal ``value`` under the shared data key (made and written first when the vault has
    none yet) as the entry ``name`` of ``state``, replacing the one before, in one transaction
    on a cursor of its own (the caller's connection may be in a transaction of its own)."""
    cursor = con.cursor()
    try:
        store = DataKeyStore(cursor, provider, random_bytes=random_bytes)
        store.require_every_kek()  # a shared key made here is wrapped as the others are
        key = store.for_owner(SHARED_OWNER)
        blob = seal(key, value, _aad(name, state), random_bytes)
        parts = [
            (name, state, number, blob[at : at + PART_BYTES])
            for number, at in enumerate(range(0, len(blob), PART_BYTES))
        ]
        columns = table_columns(cursor, SEALED_CACHE_TABLE)
        if columns and "part" not in columns:  # one blob a row, as first made: a cache, dropped
            cursor.execute(f"DROP TABLE {SEALED_CACHE_TABLE}")
        if "part" not in columns:  # and a warehouse made before the table was
            cursor.execute(SEALED_CACHE_DDL)
        cursor.begin()
        try:
            store.flush()
            cursor.execute(f"DELETE FROM {SEALED_CACHE_TABLE} WHERE name = ?", [name])
            cursor.executemany(f"INSERT INTO {SEALED_CACHE_TABLE} VALUES (?, ?, ?, ?)", parts)
            cursor.commit()
        except BaseException:
            cursor.rollback()
            raise
    finally:
        cursor.close()


def drop_entries(con: duckdb.DuckDBPyConnection) -> int:
    """Delete every entry (within the caller's transaction: an erasure's); returns how many."""
    if not has_table(con, SEALED_CACHE_TABLE):
        return 0
    found = con.execute(f"SELECT count(DISTINCT name) FROM {SEALED_CACHE_TABLE}").fetchall()
    con.execute(f"DELETE FROM {SEALED_CACHE_TABLE}")
    return int(found[0][0]) if found else 0
