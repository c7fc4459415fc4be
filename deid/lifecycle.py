"""Key lifecycle and the privacy officer's acts: KEK rotation, crypto-shredding a patient, and
audited re-identification. Every act is written to the audit log."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson

from deid.audit import AuditLog
from deid.errors import DeidError, KeyDestroyedError
from deid.keys import (
    ENV_KEK,
    FileKeyProvider,
    KeyProvider,
    WrappedKey,
    _new_kek_entry,
    _write_private,
)
from deid.pseudonym import Pseudonymizer
from deid.vault import DataKeyStore, _wrap_context

Clock = Callable[[], datetime]
# Later stages (the Feast online store) register a purge for a patient pseudonym here.
ERASURE_HOOKS: list[Callable[[str], int]] = []


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class RotationReport:
    new_kek_id: str
    retired_kek_ids: list[str]
    rewrapped: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rotate_kek(
    key_file: Path,
    con: duckdb.DuckDBPyConnection,
    audit: AuditLog,
    *,
    random_bytes: Callable[[int], bytes] = os.urandom,
    clock: Clock = _now,
) -> RotationReport:
    """New KEK, every live data key re-wrapped under it, old KEKs retired and their material
    dropped. Crash-safe order: the keyring first gains the new KEK (old ones still usable),
    then the data keys are re-wrapped in one transaction, and only then is old material
    removed from the keyring."""
    if os.environ.get(ENV_KEK):
        raise DeidError(
            f"{ENV_KEK} is set: an environment or KMS key is rotated by its owner, not here"
        )
    provider = FileKeyProvider.load(key_file)
    document = json.loads(key_file.read_text(encoding="utf-8"))
    old_ids = sorted(document["keks"])
    new_id, entry = _new_kek_entry(random_bytes, clock)
    document["keks"][new_id] = entry
    document["active_kek"] = new_id
    _write_private(key_file, document)
    rotated = FileKeyProvider.load(key_file)
    rows = con.execute(
        "SELECT key_id, owner, kek_id, wrapped FROM data_keys WHERE wrapped IS NOT NULL"
    ).fetchall()
    con.execute("BEGIN TRANSACTION")
    try:
        for key_id, owner, kek_id, wrapped in rows:
            context = _wrap_context(owner, bytes(key_id))
            plain = provider.unwrap(WrappedKey(kek_id, bytes(wrapped)), context)
            rewrapped = rotated.wrap(plain, context)
            con.execute(
                "UPDATE data_keys SET kek_id = ?, wrapped = ? WHERE key_id = ?",
                [rewrapped.kek_id, rewrapped.blob, key_id],
            )
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    retired_at = clock().isoformat()
    for old in old_ids:
        document["keks"][old] = {
            "retired": retired_at,
            "created": document["keks"][old].get("created"),
        }
    document["keks"] = {k: v for k, v in document["keks"].items() if "key" in v}
    document.setdefault("retired_keks", {}).update({old: retired_at for old in old_ids})
    _write_private(key_file, document)
    report = RotationReport(new_id, old_ids, len(rows))
    audit.append("rotate_keys", new_id, "key rotation", report.to_dict())
    return report


@dataclass
class ErasureReport:
    patient: str
    data_keys_destroyed: int = 0
    rows_deleted: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def forget_pseudonym(
    con: duckdb.DuckDBPyConnection,
    pseudonym: str,
    audit: AuditLog,
    reason: str,
    *,
    clock: Clock = _now,
) -> ErasureReport:
    """Crypto-shred one patient: destroy the data key, delete the patient's vault, quarantine
    and index rows, and purge every released or derived table that has a ``patient_id``."""
    if not reason.strip():
        raise ValueError("an erasure needs a reason")
    report = ErasureReport(pseudonym)
    con.execute("BEGIN TRANSACTION")
    try:
        report.data_keys_destroyed = int(
            con.execute(
                "UPDATE data_keys SET wrapped = NULL, destroyed_at = ? "
                "WHERE owner = ? AND destroyed_at IS NULL",
                [clock(), pseudonym],
            ).fetchall()[0][0]
        )
        owned = "SELECT resource_key FROM phi_vault WHERE patient_key = $p OR resource_key = $p"
        for table in ("resource_references", "identifier_index"):
            report.rows_deleted[table] = int(
                con.execute(
                    f"DELETE FROM {table} WHERE resource_key IN ({owned})", {"p": pseudonym}
                ).fetchall()[0][0]
            )
        report.rows_deleted["phi_vault"] = int(
            con.execute(
                "DELETE FROM phi_vault WHERE patient_key = $p OR resource_key = $p",
                {"p": pseudonym},
            ).fetchall()[0][0]
        )
        report.rows_deleted["quarantine"] = int(
            con.execute("DELETE FROM quarantine WHERE patient_key = ?", [pseudonym]).fetchall()[0][
                0
            ]
        )
        tables = con.execute(
            "SELECT DISTINCT table_name FROM duckdb_columns() WHERE column_name = 'patient_id' "
            "AND NOT internal ORDER BY 1"
        ).fetchall()
        for (table,) in tables:
            report.rows_deleted[table] = int(
                con.execute(f'DELETE FROM "{table}" WHERE patient_id = ?', [pseudonym]).fetchall()[
                    0
                ][0]
            )
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    for hook in ERASURE_HOOKS:
        report.rows_deleted[getattr(hook, "__name__", "hook")] = hook(pseudonym)
    audit.append("forget", pseudonym, reason, report.to_dict())
    return report


def forget_patient(
    con: duckdb.DuckDBPyConnection,
    provider: KeyProvider,
    patient_id: str,
    audit: AuditLog,
    reason: str,
    *,
    clock: Clock = _now,
) -> ErasureReport:
    """:func:`forget_pseudonym` for an original Patient id."""
    pseudonym = Pseudonymizer(provider.pseudonym_key()).resource_key("Patient", patient_id)
    return forget_pseudonym(con, pseudonym, audit, reason, clock=clock)


def reidentify(
    con: duckdb.DuckDBPyConnection,
    provider: KeyProvider,
    pseudonym: str,
    audit: AuditLog,
    reason: str,
    actor: str | None = None,
) -> dict[str, Any]:
    """The original identifiers behind a patient pseudonym. The act is audited before the
    identifiers are returned, whether or not the patient is found."""
    if not reason.strip():
        raise ValueError("re-identification needs a reason")
    rows = con.execute(
        "SELECT sealed, aad FROM phi_vault_current WHERE resource_key = ? "
        "AND resource_type = 'Patient'",
        [pseudonym],
    ).fetchall()
    destroyed = con.execute(
        "SELECT count(*) FROM data_keys WHERE owner = ? AND destroyed_at IS NOT NULL", [pseudonym]
    ).fetchall()[0][0]
    audit.append(
        "reidentify", pseudonym, reason, {"found": bool(rows), "erased": bool(destroyed)}, actor
    )
    if not rows:
        if destroyed:
            raise KeyDestroyedError(f"patient {pseudonym} was erased; nothing can be recovered")
        raise DeidError(f"no patient with pseudonym {pseudonym}")
    sealed, aad = rows[0]
    patient = orjson.loads(DataKeyStore(con, provider).open(bytes(sealed), bytes(aad)))
    return {
        "id": patient.get("id"),
        "name": patient.get("name", []),
        "identifier": [
            {"system": i.get("system"), "value": i.get("value")}
            for i in patient.get("identifier", [])
        ],
        "birthDate": patient.get("birthDate"),
        "address": patient.get("address", []),
        "telecom": patient.get("telecom", []),
    }
