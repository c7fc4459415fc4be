"""Copies of the vault rows of a few resource types, stored side by side.

Every release reads all current Patients (and the relatives' resources) back from the vault: the
leak scans' canaries (:mod:`deid.release`). In ``phi_vault`` those rows sit among every other
resource in the order they arrived, one Patient in about 130 rows, so reading 1,000 Patients
loads every block of the ciphertext column: 146 MB for 1,000 patients, about 0.1 s of each
release run (a new process, median of seven), growing with the vault. ``phi_vault_clustered``
holds the same rows (the same ciphertexts, under the same per-patient data keys, so destroying a
patient's key shreds both), appended batch by batch, so they fill a few blocks of their own.

The copies only speed reads up; they never decide what is read. A reader takes a copy only when
it matches the vault's row at the same position (resource, type, patient, batch and content
MAC); any other position is read from ``phi_vault`` itself. A copy left behind by a crash, or a
warehouse from before the table, therefore changes nothing but speed; a copy whose ciphertext
was altered by hand is refused by the reader's checks (:mod:`vault.read`), the content MAC
among them, as a row of ``phi_vault`` altered so is.
Ingest brings the copies up to date at the end of each batch (:func:`sync_clustered`); erasure
deletes the patient's copies with their vault rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import duckdb

from vault.catalog import has_table
from vault.warehouse import AT_POSITIONS, at_positions

CLUSTERED_TABLE = "phi_vault_clustered"
# the types read whole at every release: the Patients and the resources naming relatives (the
# canaries of deid.release); a test holds deid's canary types to this list
CLUSTERED_TYPES = ("Patient", "RelatedPerson", "FamilyMemberHistory")

_TYPES = "resource_type IN ('" + "', '".join(CLUSTERED_TYPES) + "')"
# a copy stands for the vault's row when every narrow column agrees (the ciphertext is never
# compared: that would read the very column the copies exist to spare)
_MATCHES = (
    "c.ingest_seq = v.ingest_seq AND c.resource_key = v.resource_key "
    "AND c.resource_type = v.resource_type AND c.patient_key IS NOT DISTINCT FROM v.patient_key "
    "AND c.content_mac = v.content_mac AND c.batch_id = v.batch_id"
)
_NARROW = "ingest_seq, resource_key, resource_type, patient_key, content_mac, batch_id"

# step 1 of the sync: copies that no longer stand for a vault row
_DROP_STALE_COPIES = f"""
DELETE FROM {CLUSTERED_TABLE} c WHERE NOT EXISTS (
    SELECT 1 FROM (SELECT {_NARROW} FROM phi_vault WHERE {_TYPES}) v WHERE {_MATCHES})
"""
# step 2: positions of vault rows without a copy (narrow columns only)
_UNCOPIED_POSITIONS = f"""
SELECT v.ingest_seq FROM (SELECT {_NARROW} FROM phi_vault WHERE {_TYPES}) v
WHERE NOT EXISTS (SELECT 1 FROM {CLUSTERED_TABLE} c WHERE {_MATCHES})
ORDER BY v.ingest_seq
"""
# step 3: those rows copied; the range lets DuckDB skip the blocks of older batches
_COPY_AT_POSITIONS = f"""
INSERT INTO {CLUSTERED_TABLE}
SELECT {_NARROW}, sealed, aad FROM phi_vault WHERE {AT_POSITIONS} ORDER BY ingest_seq
"""

# reading: the copies of the wanted positions that match the vault's row there (the copies'
# range given again, so that only their blocks in it are read)
_COPIED_ROWS_AT_POSITIONS = f"""
SELECT c.ingest_seq, c.resource_key, c.resource_type, c.patient_key, c.batch_id, c.sealed, c.aad,
    c.content_mac
FROM {CLUSTERED_TABLE} c
JOIN (SELECT {_NARROW} FROM phi_vault WHERE {AT_POSITIONS}) v ON {_MATCHES}
WHERE c.ingest_seq BETWEEN ? AND ?
"""


def sync_clustered(con: duckdb.DuckDBPyConnection, chunk_rows: int = 2_000) -> tuple[int, int]:
    """Bring the copies up to date with the vault: stale copies deleted, missing ones copied
    (a chunk of positions at a time, so memory stays bounded). Returns (deleted, copied)."""
    ((deleted,),) = con.execute(_DROP_STALE_COPIES).fetchall()
    missing = [int(seq) for (seq,) in con.execute(_UNCOPIED_POSITIONS).fetchall()]
    for start in range(0, len(missing), chunk_rows):
        window = missing[start : start + chunk_rows]
        con.execute(_COPY_AT_POSITIONS, at_positions(window))
    return int(deleted), len(missing)


def has_copies(con: duckdb.DuckDBPyConnection, resource_type: str | None) -> bool:
    """Whether reads of ``resource_type`` may take copies (a clustered type, and a warehouse
    that has the table: a read-only connection to an older one has not)."""
    return resource_type in CLUSTERED_TYPES and has_table(con, CLUSTERED_TABLE)


def copied_rows(con: duckdb.DuckDBPyConnection, window: Sequence[int]) -> list[tuple[Any, ...]]:
    """(ingest_seq, row columns...) of the copies standing for the vault rows at ``window``
    (sorted positions); positions without such a copy are left out."""
    params = [*at_positions(window), window[0], window[-1]]
    return [tuple(row) for row in con.execute(_COPIED_ROWS_AT_POSITIONS, params).fetchall()]
