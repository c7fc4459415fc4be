"""Key lifecycle and the privacy officer's acts: KEK rotation, crypto-shredding a patient, and
audited re-identification. Every act is written to the audit log (:mod:`vault.audit`).

Erasure convention: every released or derived table that holds patient-level rows names the
patient in a ``patient_id`` column holding the patient pseudonym. The vault erases its own
tables; the places of the release (warehouse tables, files, an online store) are passed to
:func:`forget_pseudonym` explicitly as an :class:`ErasurePlan` by the layer that owns them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import duckdb
import pyarrow as pa

from vault.audit import AuditLog
from vault.clock import Clock, RandomBytes, utcnow
from vault.errors import (
    AuditLogError,
    ErasureIncompleteError,
    KeyDestroyedError,
    KeyMaterialError,
    KeyRotationError,
    PatientNotFoundError,
    VaultError,
)
from vault.keys import (
    ENV_KEK,
    KEYRING_FORMAT,
    FileKeyProvider,
    KeyProvider,
    WrappedKey,
    _new_kek_entry,
    write_keyring,
)
from vault.pseudonym import PSEUDONYM_HEX_CHARS, Pseudonymizer
from vault.read import read_current
from vault.sealing import _wrap_context

logger = logging.getLogger(__name__)


class ErasurePlace(Protocol):
    """A place outside the warehouse that keeps patient rows (released files, an online store).

    ``purge`` is called with the patient pseudonym after the warehouse erasure is committed and
    returns how many records it removed. It must be idempotent: a failed erasure is re-run.
    """

    @property
    def name(self) -> str: ...

    def purge(self, pseudonym: str) -> int: ...


@dataclass(frozen=True)
class ReleasedTables:
    """Warehouse tables of released rows, erased by their ``patient_id`` column: the named
    tables of a schema (each must have the column), or every table of the schema that has it."""

    schema: str
    tables: tuple[str, ...] = ()


@dataclass(frozen=True)
class ErasurePlan:
    """Where a patient's released rows live besides the vault's own tables."""

    tables: tuple[ReleasedTables, ...] = ()
    places: tuple[ErasurePlace, ...] = ()


_PSEUDONYM_RE = re.compile(rf"[0-9a-f]{{{PSEUDONYM_HEX_CHARS}}}")


def _aware(clock: Clock) -> datetime:
    now = clock()
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("clock must return timezone-aware datetimes")
    return now.astimezone(UTC)


def check_pseudonym(pseudonym: str) -> None:
    """Raise ValueError unless ``pseudonym`` has the shape of a patient pseudonym."""
    # The value is never echoed: a caller passing an original id by mistake must not see it
    # copied into an error message, a log or the audit log.
    if not isinstance(pseudonym, str) or not _PSEUDONYM_RE.fullmatch(pseudonym):
        raise ValueError(
            f"a patient pseudonym is {PSEUDONYM_HEX_CHARS} lowercase hex characters "
            "(pass an original Patient id to forget_patient instead)"
        )


def _check_reason(reason: str, act: str) -> str:
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError(f"{act} needs a non-empty reason")
    return reason.strip()


# -- KEK rotation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RotationReport:
    """What a rotation did; key ids and counts only."""

    new_kek_id: str
    retired_kek_ids: list[str]
    rewrapped: int
    destroyed_keys_skipped: int = 0
    # KEKs kept because a live data key was still wrapped under them after the re-wrap (only
    # when another writer added keys under an old KEK meanwhile); rotate again to retire them.
    kept_kek_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _keyring_lock(key_file: Path) -> Iterator[None]:
    """One rotation of a keyring at a time (an flock on ``<key file>.lock``)."""
    lock_path = key_file.with_name(key_file.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, stat.S_IRUSR | stat.S_IWUSR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read_keyring(key_file: Path) -> dict[str, Any]:
    FileKeyProvider.load(key_file)  # a valid keyring, or a precise KeyMaterialError
    document: dict[str, Any] = json.loads(key_file.read_text(encoding="utf-8"))
    if document.get("format") != KEYRING_FORMAT:  # pragma: no cover - load() checked it
        raise KeyMaterialError(f"key file is not an {KEYRING_FORMAT} keyring")
    return document


_LIVE_DATA_KEYS = (
    "SELECT key_id, owner, kek_id, wrapped FROM data_keys "
    "WHERE destroyed_at IS NULL AND wrapped IS NOT NULL ORDER BY key_id"
)
_DESTROYED_DATA_KEY_COUNT = (
    "SELECT count(*) FROM data_keys WHERE destroyed_at IS NOT NULL OR wrapped IS NULL"
)
_APPLY_REWRAPPED_KEYS = (
    "UPDATE data_keys SET kek_id = r.kek_id, wrapped = r.wrapped "
    "FROM _rewrapped_keys r WHERE data_keys.key_id = r.key_id"
)
_KEK_IDS_IN_USE = (
    "SELECT DISTINCT kek_id FROM data_keys WHERE destroyed_at IS NULL AND wrapped IS NOT NULL"
)


def _rewrapped(rows: list[tuple[Any, ...]], provider: FileKeyProvider) -> pa.Table:
    """(key_id, kek_id, wrapped) of each live data key, wrapped anew under the active KEK."""
    key_ids: list[bytes] = []
    kek_ids: list[str] = []
    blobs: list[bytes] = []
    for key_id, owner, kek_id, wrapped in rows:
        kid = bytes(key_id)
        context = _wrap_context(owner, kid)
        try:
            plain = provider.unwrap(WrappedKey(kek_id, bytes(wrapped)), context)
        except VaultError as exc:
            raise KeyRotationError(
                f"data key {kid.hex()} (under KEK {kek_id!r}) cannot be unwrapped with "
                "this keyring; nothing was re-wrapped"
            ) from exc
        rewrapped = provider.wrap(plain, context)
        key_ids.append(kid)
        kek_ids.append(rewrapped.kek_id)
        blobs.append(rewrapped.blob)
    return pa.table(
        {
            "key_id": pa.array(key_ids, pa.binary()),
            "kek_id": pa.array(kek_ids, pa.string()),
            "wrapped": pa.array(blobs, pa.binary()),
        }
    )


def _rewrap_all(con: duckdb.DuckDBPyConnection, provider: FileKeyProvider) -> tuple[int, int]:
    """Re-wrap every live data key under the provider's active KEK in one transaction.
    Returns (re-wrapped, destroyed keys left alone)."""
    con.begin()
    try:
        rows = con.execute(_LIVE_DATA_KEYS).fetchall()
        destroyed = _count(con, _DESTROYED_DATA_KEY_COUNT, [])
        if rows:
            con.register("_rewrapped_keys", _rewrapped(rows, provider))
            try:
                updated = _count(con, _APPLY_REWRAPPED_KEYS, [])
            finally:
                con.unregister("_rewrapped_keys")
            if updated != len(rows):
                raise KeyRotationError(
                    f"re-wrap updated {updated} of {len(rows)} data keys; rolled back"
                )
        con.commit()
    except BaseException:
        con.rollback()
        raise
    return len(rows), destroyed


def _refuse_environment_keys() -> None:
    if os.environ.get(ENV_KEK):
        raise KeyRotationError(
            f"{ENV_KEK} is set: an environment or KMS key is rotated by its owner "
            "(rotate it there and re-wrap through that provider), not by `ehr keys rotate`"
        )


def _activate_new_kek(
    key_file: Path, document: dict[str, Any], random_bytes: RandomBytes, clock: Clock
) -> tuple[str, FileKeyProvider]:
    """Step (1): the keyring on disk gains a new active KEK, the old ones kept for unwrapping.
    Returns the new KEK's id and a provider loaded back from the file just written."""
    keks: dict[str, Any] = document["keks"]
    retired_doc: dict[str, Any] = document.setdefault("retired_keks", {})
    new_id, entry = _new_kek_entry(random_bytes, clock)
    if new_id in keks or new_id in retired_doc:
        raise KeyRotationError(f"new KEK {new_id} collides with an existing one")
    keks[new_id] = entry
    document["active_kek"] = new_id
    write_keyring(key_file, document)
    provider = FileKeyProvider.load(key_file)
    if provider.active_kek_id() != new_id:  # pragma: no cover - written just above
        raise KeyRotationError("the keyring on disk does not have the new KEK active")
    return new_id, provider


def _retire_unused_keks(
    key_file: Path,
    document: dict[str, Any],
    con: duckdb.DuckDBPyConnection,
    old_ids: list[str],
    clock: Clock,
) -> tuple[list[str], list[str]]:
    """Step (3): old KEKs no live data key is wrapped under leave the keyring, material and all
    (only their dates stay, under ``retired_keks``). Returns (retired, kept) KEK ids."""
    still_used = {str(k) for (k,) in con.execute(_KEK_IDS_IN_USE).fetchall()}
    kept = sorted(still_used & set(old_ids))
    retired = [k for k in old_ids if k not in still_used]
    retired_at = _aware(clock).isoformat()
    for old in retired:
        meta = document["keks"].pop(old)
        document["retired_keks"][old] = {"created": meta.get("created"), "retired": retired_at}
    write_keyring(key_file, document)
    return retired, kept


def rotate_kek(
    key_file: Path,
    con: duckdb.DuckDBPyConnection,
    audit: AuditLog,
    *,
    random_bytes: RandomBytes = os.urandom,
    clock: Clock = utcnow,
    reason: str = "key rotation",
    actor: str | None = None,
) -> RotationReport:
    """Add a new KEK, re-wrap every live data key under it, retire the old KEKs and drop their
    material.

    Crash-safe order: (1) the keyring gains the new KEK as active, old KEKs still present
    (written atomically and fsynced); (2) every live data key is re-wrapped in one DuckDB
    transaction; (3) only then are the old KEKs moved to ``retired_keks`` without their key
    material. A crash after (1) or (2) leaves a keyring that can unwrap everything, and
    rotating again completes the job.

    Every warehouse whose data keys are wrapped with this keyring must be the one given here:
    a second warehouse sharing the keyring would keep keys under a KEK that is then dropped.
    Run it while no pipeline process holds the old keyring in memory.
    """
    _refuse_environment_keys()
    key_file = Path(key_file)
    audit.check_appendable()  # never rotate what could not be audited
    with _keyring_lock(key_file):
        document = _read_keyring(key_file)
        old_ids = sorted(document["keks"])
        new_id, provider = _activate_new_kek(key_file, document, random_bytes, clock)
        rewrapped, destroyed = _rewrap_all(con, provider)
        retired, kept = _retire_unused_keks(key_file, document, con, old_ids, clock)
    report = RotationReport(new_id, retired, rewrapped, destroyed, kept)
    logger.info(
        "rotated KEK: active %s, %d data keys re-wrapped, retired %s",
        new_id,
        rewrapped,
        ", ".join(retired) or "none",
    )
    audit.append("rotate_keys", new_id, reason, report.to_dict(), actor)
    return report


# -- erasure (crypto-shredding) --------------------------------------------------------------


@dataclass
class ErasureReport:
    """What an erasure removed; the pseudonym and counts only."""

    pseudonym: str
    found: bool = False
    data_keys_destroyed: int = 0
    data_keys_already_destroyed: int = 0
    rows_deleted: dict[str, int] = field(default_factory=dict)
    places: dict[str, int] = field(default_factory=dict)
    places_failed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _released_tables(
    con: duckdb.DuckDBPyConnection, plan: ErasurePlan
) -> list[tuple[str, str, str]]:
    """(label, qualified name, patient_id expression) of every table the plan names that exists;
    a named table without a ``patient_id`` column is an error, not a silent skip."""
    found: list[tuple[str, str, str]] = []
    for entry in plan.tables:
        rows = con.execute(
            """
            SELECT t.table_name, c.data_type
            FROM duckdb_tables() t
            LEFT JOIN duckdb_columns() c
              ON c.database_name = t.database_name AND c.schema_name = t.schema_name
             AND c.table_name = t.table_name AND lower(c.column_name) = 'patient_id'
            WHERE t.database_name = current_database() AND t.schema_name = ? AND NOT t.internal
            ORDER BY 1
            """,
            [entry.schema],
        ).fetchall()
        types = dict(rows)
        for table in entry.tables or tuple(t for t, kind in rows if kind is not None):
            if table not in types:
                continue  # not built yet in this warehouse
            if types[table] is None:
                raise VaultError(
                    f"{entry.schema}.{table} is listed for erasure but has no patient_id"
                )
            label = table if entry.schema == "main" else f"{entry.schema}.{table}"
            expr = "patient_id" if types[table] == "VARCHAR" else "CAST(patient_id AS VARCHAR)"
            found.append((label, f"{_quote(entry.schema)}.{_quote(table)}", expr))
    return found


def _count(con: duckdb.DuckDBPyConnection, sql: str, params: Any) -> int:
    return int(con.execute(sql, params).fetchall()[0][0])


def _erase_in_warehouse(
    con: duckdb.DuckDBPyConnection, report: ErasureReport, now: datetime, plan: ErasurePlan
) -> None:
    p = report.pseudonym
    con.begin()
    try:
        live, dead = con.execute(
            "SELECT count(*) FILTER (WHERE destroyed_at IS NULL), "
            "count(*) FILTER (WHERE destroyed_at IS NOT NULL) FROM data_keys WHERE owner = ?",
            [p],
        ).fetchall()[0]
        report.data_keys_already_destroyed = int(dead)
        report.data_keys_destroyed = _count(
            con,
            "UPDATE data_keys SET wrapped = NULL, destroyed_at = ? "
            "WHERE owner = ? AND destroyed_at IS NULL",
            [now, p],
        )
        # Index rows first: which resources were the patient's is known from the vault.
        owned = "SELECT resource_key FROM phi_vault WHERE patient_key = $p OR resource_key = $p"
        for table in ("resource_references", "identifier_index"):
            report.rows_deleted[table] = _count(
                con, f"DELETE FROM {table} WHERE resource_key IN ({owned})", {"p": p}
            )
        report.rows_deleted["phi_vault"] = _count(
            con, "DELETE FROM phi_vault WHERE patient_key = $p OR resource_key = $p", {"p": p}
        )
        report.rows_deleted["quarantine"] = _count(
            con, "DELETE FROM quarantine WHERE patient_key = ?", [p]
        )
        for label, qualified, column in _released_tables(con, plan):
            report.rows_deleted[label] = _count(
                con, f"DELETE FROM {qualified} WHERE {column} = ?", [p]
            )
        con.commit()
    except BaseException:
        con.rollback()
        raise
    report.found = bool(live or dead or any(report.rows_deleted.values()))


def _purge_places(report: ErasureReport, plan: ErasurePlan) -> None:
    for place in plan.places:
        try:
            report.places[place.name] = int(place.purge(report.pseudonym))
        except Exception as exc:  # one failing place must not stop the others
            logger.warning(
                "erasure of %s from %s failed: %s", report.pseudonym, place.name, type(exc)
            )
            report.places_failed.append(place.name)


def forget_pseudonym(
    con: duckdb.DuckDBPyConnection,
    pseudonym: str,
    audit: AuditLog,
    reason: str,
    *,
    plan: ErasurePlan = ErasurePlan(),
    clock: Clock = utcnow,
    actor: str | None = None,
) -> ErasureReport:
    """Crypto-shred the patient with this pseudonym.

    In one transaction: its data key(s) are destroyed (``wrapped`` set to NULL), and its rows
    are deleted from ``phi_vault`` (resources in its compartment and the Patient itself),
    ``quarantine``, ``resource_references`` and ``identifier_index`` (rows of its resources),
    and from the released tables ``plan`` names. Then every place of ``plan`` is purged, and
    the act is audited. Erasing an already erased patient, or an unknown one (the report says
    ``found=False``), is not an error, so a failed erasure can simply be run again.

    Not erased: resources outside the patient compartment under the ``_shared`` key (an
    Organization, a quarantined record that named no patient) even if they mention the
    patient, references from other patients' resources to this one, and the pseudonymous
    ``record_ledger``. Copies of the destroyed wrapped key may survive in free pages of the
    database file, its WAL, or backups until the KEK is rotated.
    """
    check_pseudonym(pseudonym)
    reason = _check_reason(reason, "an erasure")
    now = _aware(clock)
    audit.check_appendable()  # never destroy what could not be audited
    report = ErasureReport(pseudonym)
    _erase_in_warehouse(con, report, now, plan)
    _purge_places(report, plan)
    logger.info(
        "erased %s: %d data keys destroyed, %d rows deleted",
        pseudonym,
        report.data_keys_destroyed,
        sum(report.rows_deleted.values()),
    )
    try:
        audit.append("forget", pseudonym, reason, report.to_dict(), actor)
    except VaultError as exc:
        raise AuditLogError(
            f"erasure of {pseudonym} was committed but could not be audited: {exc}"
        ) from exc
    if report.places_failed:
        raise ErasureIncompleteError(
            f"erasure of {pseudonym} committed in the warehouse, but purging failed in: "
            f"{', '.join(report.places_failed)}; run the erasure again"
        )
    return report


def forget_patient(
    con: duckdb.DuckDBPyConnection,
    provider: KeyProvider,
    patient_id: str,
    audit: AuditLog,
    reason: str,
    *,
    plan: ErasurePlan = ErasurePlan(),
    clock: Clock = utcnow,
    actor: str | None = None,
) -> ErasureReport:
    """:func:`forget_pseudonym` for an original Patient resource id."""
    if not isinstance(patient_id, str) or not patient_id.strip():
        raise ValueError("patient_id must be a non-empty Patient resource id")
    pseudonym = Pseudonymizer(provider.pseudonym_key()).resource_key("Patient", patient_id)
    return forget_pseudonym(con, pseudonym, audit, reason, plan=plan, clock=clock, actor=actor)


# -- re-identification ------------------------------------------------------------------------


def _identifiers(patient: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": patient.get("id"),
        "name": patient.get("name", []),
        "identifier": [
            {"system": i.get("system"), "value": i.get("value")}
            for i in patient.get("identifier", [])
            if isinstance(i, dict)
        ],
        "birthDate": patient.get("birthDate"),
        "address": patient.get("address", []),
        "telecom": patient.get("telecom", []),
    }


def _absent(con: duckdb.DuckDBPyConnection, pseudonym: str) -> tuple[str, None, VaultError]:
    """Why the vault holds no Patient under ``pseudonym``: erased, or never there."""
    destroyed = _count(
        con,
        "SELECT count(*) FROM data_keys WHERE owner = ? AND destroyed_at IS NOT NULL",
        [pseudonym],
    )
    if destroyed:
        return (
            "erased",
            None,
            KeyDestroyedError(f"patient {pseudonym} was erased: its data key was destroyed"),
        )
    return "not_found", None, PatientNotFoundError(f"no patient with pseudonym {pseudonym}")


def _lookup(
    con: duckdb.DuckDBPyConnection, provider: KeyProvider, pseudonym: str
) -> tuple[str, dict[str, Any] | None, VaultError | None]:
    """(outcome, identifiers, error): outcome is found, erased, not_found or unreadable."""
    try:
        record = read_current(con, provider, pseudonym, "Patient")
    except KeyDestroyedError as exc:
        return "erased", None, exc
    except VaultError as exc:  # tampered or foreign row: reported, never shown
        return "unreadable", None, exc
    if record is None:
        return _absent(con, pseudonym)
    return "found", _identifiers(record.resource), None


def reidentify(
    con: duckdb.DuckDBPyConnection,
    provider: KeyProvider,
    pseudonym: str,
    audit: AuditLog,
    reason: str,
    actor: str | None = None,
) -> dict[str, Any]:
    """The original identifiers behind a patient pseudonym: ``id``, ``name``, ``identifier``
    (system and value), ``birthDate``, ``address`` and ``telecom``.

    The act is audited (with its outcome) before anything is returned, and a failed lookup is
    audited too; if the audit entry cannot be written, nothing is returned. Raises
    :class:`KeyDestroyedError` for an erased patient and :class:`PatientNotFoundError` for an
    unknown pseudonym.
    """
    reason = _check_reason(reason, "re-identification")
    check_pseudonym(pseudonym)
    outcome, found, error = _lookup(con, provider, pseudonym)
    details: dict[str, Any] = {"found": found is not None, "outcome": outcome}
    if error is not None:
        details["error"] = type(error).__name__
    audit.append("reidentify", pseudonym, reason, details, actor)
    if error is not None:
        raise error
    assert found is not None
    return found
