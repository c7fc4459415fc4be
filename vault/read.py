"""Reading the PHI vault back: decrypt, authenticate, and check each record is the resource
its row claims to be. Only code holding the keys can do this; views and features never do."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import duckdb
import orjson

from vault.errors import InvalidCiphertext
from vault.keys import KeyProvider
from vault.pseudonym import Pseudonymizer
from vault.sealing import DataKeyStore


def _checked(pseudo: Pseudonymizer, resource_key: str, plaintext: bytes) -> dict[str, Any]:
    resource: dict[str, Any] = orjson.loads(plaintext)
    if pseudo.resource_key(resource["resourceType"], resource["id"]) != resource_key:
        raise InvalidCiphertext(f"vault row {resource_key} holds a different resource")
    return resource


def iter_current_resources(
    con: duckdb.DuckDBPyConnection,
    provider: KeyProvider,
    batch_id: str | None = None,
    chunk_rows: int = 5_000,
) -> Iterator[dict[str, Any]]:
    """The newest version of every resource (optionally only those last written by one batch),
    decrypted, in chunks so memory stays bounded."""
    keys = DataKeyStore(con, provider)
    pseudo = Pseudonymizer(provider.pseudonym_key())
    where = "WHERE batch_id = ?" if batch_id is not None else ""
    params = [batch_id] if batch_id is not None else []
    cursor = con.cursor()
    try:
        cursor.execute(
            f"SELECT resource_key, sealed, aad FROM phi_vault_current {where} ORDER BY ingest_seq",
            params,
        )
        while rows := cursor.fetchmany(chunk_rows):
            for resource_key, sealed, aad in rows:
                yield _checked(pseudo, resource_key, keys.open(bytes(sealed), bytes(aad)))
    finally:
        cursor.close()


def read_resource(
    con: duckdb.DuckDBPyConnection, provider: KeyProvider, resource_type: str, resource_id: str
) -> dict[str, Any] | None:
    """The current version of one resource, or None when the vault does not hold it."""
    pseudo = Pseudonymizer(provider.pseudonym_key())
    resource_key = pseudo.resource_key(resource_type, resource_id)
    rows = con.execute(
        "SELECT sealed, aad FROM phi_vault_current WHERE resource_key = ?", [resource_key]
    ).fetchall()
    if not rows:
        return None
    sealed, aad = rows[0]
    return _checked(
        pseudo, resource_key, DataKeyStore(con, provider).open(bytes(sealed), bytes(aad))
    )
