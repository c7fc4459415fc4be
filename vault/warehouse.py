"""The DuckDB warehouse: one file holding the ingest ledger, the encrypted PHI vault, the
quarantine and the reference graph. Nothing in it is plaintext PHI: resources and file names
are sealed, ids are keyed pseudonyms, and messages are built from schema paths only."""

from __future__ import annotations

from pathlib import Path

import duckdb

from vault.sealing import DATA_KEYS_DDL

SCHEMA = [
    DATA_KEYS_DDL,
    """
    CREATE TABLE IF NOT EXISTS batches (
        batch_id VARCHAR PRIMARY KEY,
        seq BIGINT NOT NULL,
        ingested_at TIMESTAMPTZ,
        report JSON
    )""",
    """
    CREATE TABLE IF NOT EXISTS source_files (
        batch_id VARCHAR NOT NULL,
        file_index INTEGER NOT NULL,
        file_id VARCHAR NOT NULL,
        kind VARCHAR NOT NULL,
        bytes BIGINT NOT NULL,
        records BIGINT NOT NULL,
        name_sealed BLOB NOT NULL,
        PRIMARY KEY (batch_id, file_index)
    )""",
    """
    CREATE TABLE IF NOT EXISTS record_ledger (
        batch_id VARCHAR NOT NULL,
        file_index INTEGER NOT NULL,
        position BIGINT NOT NULL,
        status VARCHAR NOT NULL,
        outcome VARCHAR NOT NULL,
        resource_type VARCHAR,
        resource_key VARCHAR
    )""",
    """
    CREATE TABLE IF NOT EXISTS phi_vault (
        resource_key VARCHAR NOT NULL,
        resource_type VARCHAR NOT NULL,
        patient_key VARCHAR,
        version_id VARCHAR,
        last_updated VARCHAR,
        content_mac VARCHAR NOT NULL,
        batch_id VARCHAR NOT NULL,
        file_index INTEGER NOT NULL,
        position BIGINT NOT NULL,
        ingest_seq BIGINT NOT NULL,
        sealed BLOB NOT NULL,
        aad BLOB NOT NULL
    )""",
    """
    CREATE TABLE IF NOT EXISTS quarantine (
        batch_id VARCHAR NOT NULL,
        file_index INTEGER NOT NULL,
        file_id VARCHAR NOT NULL,
        position BIGINT NOT NULL,
        reason_code VARCHAR NOT NULL,
        message VARCHAR NOT NULL,
        resource_type VARCHAR,
        patient_key VARCHAR,
        sealed BLOB NOT NULL,
        aad BLOB NOT NULL,
        quarantined_at TIMESTAMPTZ NOT NULL
    )""",
    """
    CREATE TABLE IF NOT EXISTS resource_references (
        batch_id VARCHAR NOT NULL,
        resource_key VARCHAR NOT NULL,
        content_mac VARCHAR NOT NULL,
        path VARCHAR NOT NULL,
        ref_mac VARCHAR NOT NULL,
        kind VARCHAR NOT NULL,
        target_type VARCHAR,
        target_key VARCHAR NOT NULL,
        resolved BOOLEAN
    )""",
    """
    CREATE TABLE IF NOT EXISTS identifier_index (
        batch_id VARCHAR NOT NULL,
        criteria_key VARCHAR NOT NULL,
        resource_key VARCHAR NOT NULL,
        resource_type VARCHAR NOT NULL
    )""",
    # warehouses created before the column existed
    "ALTER TABLE resource_references ADD COLUMN IF NOT EXISTS ref_mac VARCHAR",
    # The newest version of each resource: numeric versionId first, then lastUpdated, then the
    # order it arrived in.
    """
    CREATE OR REPLACE VIEW phi_vault_current AS
    SELECT v.* FROM phi_vault v
    JOIN (
        -- rank narrow rows only: a window over the ciphertexts would hold every blob in
        -- memory at once, and the warehouse runs under a memory cap
        SELECT resource_key, ingest_seq FROM (
            SELECT resource_key, ingest_seq, row_number() OVER (
                PARTITION BY resource_key
                ORDER BY TRY_CAST(version_id AS BIGINT) DESC NULLS LAST,
                         last_updated DESC NULLS LAST, ingest_seq DESC
            ) AS rn
            FROM phi_vault
        ) WHERE rn = 1
    ) AS current USING (resource_key, ingest_seq)""",
]

BATCH_TABLES = (
    "source_files",
    "record_ledger",
    "phi_vault",
    "quarantine",
    "resource_references",
    "identifier_index",
)


DEFAULT_MEMORY_LIMIT = "256MB"  # DuckDB spills beyond it; ingest memory must not scale with input


def connect(
    path: Path | str, read_only: bool = False, memory_limit: str = DEFAULT_MEMORY_LIMIT
) -> duckdb.DuckDBPyConnection:
    """Open the warehouse file, creating its schema when writable."""
    path = Path(path)
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(path), read_only=read_only, config={"memory_limit": memory_limit})
    if not read_only:
        for ddl in SCHEMA:
            con.execute(ddl)
    return con
