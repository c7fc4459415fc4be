"""Key lifecycle and the privacy officer's acts: KEK rotation, crypto-shredding a patient, and
audited re-identification. Every act is written to the audit log (:mod:`vault.audit`).

Erasure convention: every released or derived table that holds patient-level rows names the
patient in a ``patient_id`` column holding the patient pseudonym. The vault erases its own
tables; the places of the release (warehouse tables, files, an online store) are passed to
:func:`forget_pseudonym` explicitly as an :class:`ErasurePlan` by the layer that owns them.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import duckdb
import pyarrow as pa

from vault import warehouse
from vault.audit import AuditLog, open_intents
from vault.catalog import has_table
from vault.catalog import quote_identifier as _quote
from vault.clock import Clock, RandomBytes, utcnow
from vault.clustered import CLUSTERED_TABLE
from vault.errors import (
    AuditLogError,
    ErasureIncompleteError,
    KeyDestroyedError,
    KeyRotationError,
    PatientNotFoundError,
    PseudonymKeyMismatchError,
    VaultError,
)
from vault.keys import (
    ENV_KEK,
    FileKeyProvider,
    KeyProvider,
    WrappedKey,
    _new_kek_entry,
    key_fingerprint,
    keyring_lock,
    read_keyring_document,
    shown,
    shown_key_file,
    wrap_retired_kek,
    write_keyring,
)
from vault.pseudonym import PSEUDONYM_HEX_CHARS
from vault.read import bind_pseudonym_key, read_current
from vault.sealed_cache import drop_entries
from vault.sealing import LIVE_DATA_KEY, _wrap_context

logger = logging.getLogger(__name__)


class ErasurePlace(Protocol):
    """A place outside the warehouse that keeps patient rows (released files, an online store).

    ``purge`` is called with the patient pseudonym after the warehouse erasure is committed and
    returns how many records it removed. It must be idempotent: a failed erasure is re-run.
    A place that keeps resources of no patient too (released views) may also have
    ``purge_resources(resource_keys) -> int``, called with the keys of the shared resources
    erased with the patient (:attr:`ErasurePlan.shared_resources`) and, when the erasure is
    run again after an interruption, of every resource its earlier run erased (it must then
    touch only released rows of no patient, ``patient_id`` NULL, whose key is one of them).
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
    # quarantined records of no patient (not readable as a resource, so sealed under the
    # shared key, which no erasure destroys) that name this patient, found by a caller who can
    # read them and knows what names the patient: (batch_id, file_index, position) each,
    # deleted with the patient's own rows
    unattributed_quarantine: tuple[tuple[str, int, int], ...] = ()
    # vault resources outside the patient's compartment some version of which names this
    # patient, found the same way: of no patient (sealed under the shared key: a Practitioner,
    # an Organization, a record naming the patient only by an identifier or an external URL),
    # or another patient's record holding her inside it (her Patient contained in her child's
    # lab result, which the release withholds and the vault cannot keep without her): their
    # resource keys. Every version of each is deleted with the patient's rows, whoever's key
    # it is sealed under, and their released copies
    shared_resources: tuple[str, ...] = ()
    # more tombstone keys: the keyed identifier criteria (exact and loose,
    # vault.ingest.identifier_keys) of the Patient versions the caller read, for Patients
    # indexed before loose forms existed
    identifier_keys: tuple[str, ...] = ()
    # batch keys (landing folder names, which the batch tables, run_summary.json and Dagster
    # keep) holding an identifier of the person, with each kind found: (batch key, kind) each,
    # found by a caller who knows what names the person, and recorded with the tombstone so
    # that every later release still flags those keys (``warehouse.ERASED_BATCH_KEYS_TABLE``)
    batch_key_kinds: tuple[tuple[str, str], ...] = ()


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
    warehouses: list[str] = field(default_factory=list)  # ids of the warehouses re-wrapped

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_keyring(key_file: Path) -> dict[str, Any]:
    FileKeyProvider.load(key_file)  # a valid keyring, or a precise KeyMaterialError
    return read_keyring_document(key_file)


_LIVE_DATA_KEYS = (
    f"SELECT key_id, owner, kek_id, wrapped FROM data_keys WHERE {LIVE_DATA_KEY} ORDER BY key_id"
)
_DESTROYED_DATA_KEY_COUNT = f"SELECT count(*) FROM data_keys WHERE NOT ({LIVE_DATA_KEY})"
_APPLY_REWRAPPED_KEYS = (
    "UPDATE data_keys SET kek_id = r.kek_id, wrapped = r.wrapped "
    "FROM _rewrapped_keys r WHERE data_keys.key_id = r.key_id"
)
_KEK_IDS_IN_USE = f"SELECT DISTINCT kek_id FROM data_keys WHERE {LIVE_DATA_KEY}"


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
                f"data key {kid.hex()} (under KEK {shown(kek_id, 'a KEK id in data_keys')}) "
                "cannot be unwrapped with this keyring; nothing was re-wrapped"
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
            # the keys wrapped under the KEK being retired stay in freed pages until the file
            # is rewritten: owed with the re-wrap, done after it (rewrite_rotated_warehouses)
            warehouse.owe_rewrite(con, "a key rotation")
        con.commit()
    except BaseException:
        con.rollback()
        raise
    con.execute("CHECKPOINT")  # the re-wrapped keys into the file before the old KEK retires
    return len(rows), destroyed


def refuse_environment_keys() -> None:
    if os.environ.get(ENV_KEK):
        raise KeyRotationError(
            f"{ENV_KEK} is set: an environment or KMS key is rotated by its owner "
            "(rotate it there and re-wrap through that provider), not by `ehr keys rotate`"
        )


def _register_in_document(
    document: dict[str, Any], con: duckdb.DuckDBPyConnection, clock: Clock
) -> str:
    """The warehouse of ``con`` in the keyring's registry (the caller writes the keyring)."""
    registry: dict[str, Any] = document.setdefault("warehouses", {})
    known = {k: str(v.get("path", "")) for k, v in registry.items() if isinstance(v, dict)}
    wid = warehouse.claim_id(con, known)
    path = warehouse.database_path(con)
    location = str(path.resolve()) if path is not None else ""
    if registry.get(wid, {}).get("path") != location:
        registry[wid] = {"path": location, "registered": _aware(clock).isoformat()}
    return wid


@contextlib.contextmanager
def _registered_warehouses(
    document: dict[str, Any], own_id: str, con: duckdb.DuckDBPyConnection
) -> Iterator[dict[str, duckdb.DuckDBPyConnection]]:
    """A writable connection to every warehouse the keyring's registry lists (``con`` for
    its own). Refuses, before anything changes, naming every warehouse it cannot reach: a
    rotation that skipped one would strand its data keys once the old KEK is purged."""
    cons = {own_id: con}
    unreachable: list[str] = []
    try:
        for wid, entry in sorted(document.get("warehouses", {}).items()):
            if wid == own_id:
                continue
            path = Path(str(entry.get("path", "")))
            try:
                other = warehouse.connect(path) if path.is_file() else None
            except duckdb.Error:
                other = None  # locked by a running process, or not a warehouse
            if other is not None and warehouse.warehouse_id(other) != wid:
                other.close()
                other = None
            if other is None:
                unreachable.append(f"{wid} (last seen at {path})")
                continue
            cons[wid] = other
        if unreachable:
            raise KeyRotationError(
                "cannot reach every warehouse registered with this keyring, nothing was "
                f"rotated: {'; '.join(unreachable)}. Make them reachable (and stop their "
                "pipeline runs), or remove a deleted one with `ehr keys forget-warehouse ID`"
            )
        yield cons
    finally:
        for wid, other in cons.items():
            if wid != own_id:
                other.close()


def _require_the_warehouses_pseudonym_key(
    key_file: Path, cons: dict[str, duckdb.DuckDBPyConnection], act: str
) -> None:
    """Refuse, before anything changes, a keyring whose pseudonym key is not the one a
    registered warehouse records it was built with (key ids only, never a key): ``act``
    (rotation, purge) writes the keyring again, and would make a damaged or another keyring's
    pseudonym key the one kept, where a backup of the right one may still exist."""
    given = key_fingerprint(FileKeyProvider.load(key_file).pseudonym_key())
    for wid, con in sorted(cons.items()):
        recorded = warehouse.recorded_pseudonym_key_id(con)
        if recorded is not None and recorded != given:
            raise PseudonymKeyMismatchError(
                f"the keyring's pseudonym key (key id {given}) is not the one warehouse {wid} "
                f"was built with (key id {recorded}): nothing was {act}. The keyring is damaged "
                "or is another's; restore the keyring file from a backup"
            )


def _require_every_kek_in_use(
    key_file: Path, cons: dict[str, duckdb.DuckDBPyConnection], act: str
) -> None:
    """Refuse, before anything changes, a keyring that lacks a KEK live data keys of a
    registered warehouse are wrapped under (KEK ids only): an older copy restored after a
    rotation, or another's. ``act`` (rotation, purge) would write it again as the one kept:
    a rotation gave it a new KEK and an announced act that never completes, while the keyring
    that holds the missing KEK (and a backup of it) may still exist."""
    held = set(FileKeyProvider.load(key_file).kek_ids())
    missing: list[str] = []
    for wid, con in sorted(cons.items()):
        absent = sorted({str(k) for (k,) in con.execute(_KEK_IDS_IN_USE).fetchall()} - held)
        if absent:
            names = ", ".join(shown(k, "a KEK id in data_keys") for k in absent)
            missing.append(f"{wid}: {names}")
    if missing:
        raise KeyRotationError(
            f"key file {shown_key_file(key_file)} does not hold the KEKs that wrap live data "
            f"keys of registered warehouses ({'; '.join(missing)}): nothing was {act}. The "
            "keyring is older than those warehouses (a backup restored after a rotation?) or "
            "is another's; restore the keyring file that holds them"
        )


def _activate_new_kek(
    key_file: Path, document: dict[str, Any], random_bytes: RandomBytes, clock: Clock
) -> tuple[str, list[str]]:
    """Step (1): the keyring on disk gains a new active KEK, the old ones kept for unwrapping
    and the rotation recorded as under way. Resumes an interrupted rotation instead of
    starting another. Returns the new KEK's id and the KEKs it replaces."""
    pending = document.get("rotation")
    if isinstance(pending, dict) and pending.get("new_kek") == document.get("active_kek"):
        return str(pending["new_kek"]), [str(k) for k in pending.get("old_keks", [])]
    keks: dict[str, Any] = document["keks"]
    retired_doc: dict[str, Any] = document.setdefault("retired_keks", {})
    old_ids = sorted(keks)
    new_id, entry = _new_kek_entry(random_bytes, clock)
    if new_id in keks or new_id in retired_doc:
        raise KeyRotationError(f"new KEK {new_id} collides with an existing one")
    keks[new_id] = entry
    document["active_kek"] = new_id
    document["rotation"] = {"new_kek": new_id, "old_keks": old_ids}
    write_keyring(key_file, document)
    return new_id, old_ids


def _retire_old_keks(
    key_file: Path,
    document: dict[str, Any],
    old_ids: list[str],
    random_bytes: RandomBytes,
    clock: Clock,
) -> list[str]:
    """Step (3): the old KEKs leave the active set, kept wrapped under the new KEK (until
    ``ehr keys purge-retired``): a warehouse or backup still under them stays readable."""
    new_id = str(document["active_kek"])
    new_kek = base64.b64decode(document["keks"][new_id]["key"])
    retired_at = _aware(clock).isoformat()
    retired = [k for k in old_ids if k in document["keks"]]
    for old in retired:
        meta = document["keks"].pop(old)
        old_kek = base64.b64decode(meta["key"])
        document["retired_keks"][old] = {
            "created": meta.get("created"),
            "retired": retired_at,
            **wrap_retired_kek(old, old_kek, new_id, new_kek, random_bytes),
        }
    document.pop("rotation", None)
    write_keyring(key_file, document)
    return retired


def _finished_but_unrecorded(document: dict[str, Any], audit: AuditLog) -> RotationReport | None:
    """A rotation that ended (its KEK active, the under-way mark removed) before its
    completion was written, the process killed in between: its completion is written now, and
    its report returned, instead of a second rotation whose completion would leave the first
    announced forever. None when there is no such rotation."""
    active = document.get("active_kek")
    if "rotation" in document or not active:
        return None
    intent = _last_open_intent(audit, "rotate_keys", subject=str(active))
    if intent is None:
        return None
    warehouses = list(intent.get("details", {}).get("warehouses", []))
    report = RotationReport(str(active), [], 0, 0, [], warehouses)
    audit.complete(intent, {**report.to_dict(), "recorded_after_interruption": True})
    return report


def _last_open_intent(
    audit: AuditLog, action: str, subject: str | None = None
) -> dict[str, Any] | None:
    """The latest act of ``action`` (on ``subject``, when given) the audit log announced and
    never completed: a process killed between its work and its completion entry."""
    pending = [
        entry
        for entry in open_intents(audit.entries())
        if entry.get("action") == action and (subject is None or entry.get("subject") == subject)
    ]
    return pending[-1] if pending else None


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
    """Add a new KEK, re-wrap the live data keys of every registered warehouse under it, and
    retire the old KEKs (kept wrapped under the new one until ``purge_retired_keks``).

    Refuses before any change when a registered warehouse cannot be opened, naming it.
    Crash-safe and resumable: (1) the keyring gains the new KEK as active, old KEKs still
    present and the rotation marked under way (written atomically and fsynced); (2) each
    warehouse is re-wrapped in one DuckDB transaction; (3) the old KEKs move to
    ``retired_keks`` and the mark is removed. Rotating again after a crash finishes the same
    rotation (after (3), it only writes the completion the crash left out). Audited: an intent
    before (1), a completion after (3).
    """
    refuse_environment_keys()
    key_file = Path(key_file)
    audit.check_appendable()  # never rotate what could not be audited
    with keyring_lock(key_file):
        document = _read_keyring(key_file)
        finished = _finished_but_unrecorded(document, audit)
        if finished is not None:
            return finished
        own_id = _register_in_document(document, con, clock)
        with _registered_warehouses(document, own_id, con) as cons:
            _require_the_warehouses_pseudonym_key(key_file, cons, "rotated")
            _require_every_kek_in_use(key_file, cons, "rotated")
            new_id, old_ids = _activate_new_kek(key_file, document, random_bytes, clock)
            intent = audit.intend(
                "rotate_keys", new_id, reason, {"warehouses": sorted(cons)}, actor
            )
            provider = FileKeyProvider.load(key_file)
            rewrapped = destroyed = 0
            for wid in sorted(cons):
                done, skipped = _rewrap_all(cons[wid], provider)
                rewrapped, destroyed = rewrapped + done, destroyed + skipped
            retired = _retire_old_keks(key_file, document, old_ids, random_bytes, clock)
    report = RotationReport(new_id, retired, rewrapped, destroyed, [], sorted(cons))
    logger.info("rotated KEK: active %s, %d data keys re-wrapped", new_id, rewrapped)
    audit.complete(intent, report.to_dict())
    _rewrite_rotated(document, own_id)
    return report


def _rewrite_rotated(document: dict[str, Any], own_id: str) -> None:
    """Every registered warehouse but the caller's own (``con``, still open: the caller
    rewrites it once closed, :func:`vault.warehouse.rewrite_if_owed`) rewritten into a fresh
    file, so that no freed page keeps a data key wrapped under the KEK the rotation retired:
    whoever holds that KEK (the reason to rotate it) would unwrap them there, and with them
    every record. One that cannot be rewritten now keeps the record that it owes it, and its
    next writer rewrites it."""
    for wid, entry in sorted(document.get("warehouses", {}).items()):
        path = Path(str(entry.get("path", "")))
        if wid != own_id and path.is_file():
            with contextlib.suppress(duckdb.IOException):
                warehouse.rewrite_if_owed(path, wait_seconds=0)


def _purge_finished_but_unrecorded(document: dict[str, Any], audit: AuditLog) -> list[str]:
    """A purge that wrote the keyring (every KEK it announced has no material left) before its
    completion was written, the process killed in between: its completion is written now and
    its KEK ids returned, so that running it again closes the announced act, as ``ehr audit
    verify`` says to. An empty list when there is no such purge."""
    intent = _last_open_intent(audit, "purge_retired_keks")
    if intent is None:
        return []
    details = intent.get("details", {})
    kek_ids = [str(k) for k in details.get("kek_ids", [])] if isinstance(details, dict) else []
    retired = document.get("retired_keks", {})
    if any(not isinstance(retired.get(k), dict) or retired[k].get("wrapped") for k in kek_ids):
        return []  # not what that purge left: the next purge settles it
    audit.complete(intent, {"kek_ids": kek_ids, "recorded_after_interruption": True})
    return kek_ids


def purge_retired_keks(
    key_file: Path,
    audit: AuditLog,
    *,
    reason: str = "purge retired KEKs",
    actor: str | None = None,
    clock: Clock = utcnow,
) -> list[str]:
    """Drop the material of every retired KEK, once no registered warehouse has a live data
    key wrapped under one (all must be reachable). Returns the purged KEK ids. After this,
    backups made before the last rotation can no longer be read with this keyring."""
    refuse_environment_keys()
    key_file = Path(key_file)
    audit.check_appendable()
    with keyring_lock(key_file):
        document = _read_keyring(key_file)
        held = [k for k, v in document.get("retired_keks", {}).items() if v.get("wrapped")]
        if not held:
            return _purge_finished_but_unrecorded(document, audit)
        still_used: dict[str, list[str]] = {}
        for wid, entry in sorted(document.get("warehouses", {}).items()):
            path = Path(str(entry.get("path", "")))
            try:
                con = warehouse.connect(path, read_only=True) if path.is_file() else None
            except duckdb.Error:
                con = None
            if con is None:
                raise KeyRotationError(
                    f"cannot reach warehouse {wid} (last seen at {path}); nothing was purged"
                )
            if warehouse.warehouse_id(con) != wid:
                # as rotation: the keys in use there are another warehouse's, and the one
                # registered may still need a retired KEK wherever it is now
                con.close()
                raise KeyRotationError(
                    f"cannot reach warehouse {wid}: {path} holds another warehouse now; nothing "
                    "was purged. Make it reachable there, or remove a deleted one with `ehr keys "
                    "forget-warehouse ID`"
                )
            try:
                _require_the_warehouses_pseudonym_key(key_file, {wid: con}, "purged")
                _require_every_kek_in_use(key_file, {wid: con}, "purged")
                in_use = {str(k) for (k,) in con.execute(_KEK_IDS_IN_USE).fetchall()}
            finally:
                con.close()
            if in_use & set(held):
                still_used[wid] = sorted(in_use & set(held))
        if still_used:
            named = "; ".join(f"{w}: {', '.join(k)}" for w, k in still_used.items())
            raise KeyRotationError(
                f"retired KEKs still wrap live data keys ({named}); run `ehr keys rotate` first"
            )
        intent = audit.intend("purge_retired_keks", "keyring", reason, {"kek_ids": held}, actor)
        for kek_id in held:
            entry = document["retired_keks"][kek_id]
            entry.pop("wrapped", None)
            entry.pop("wrapped_by", None)
            entry["purged"] = _aware(clock).isoformat()
        write_keyring(key_file, document)
    audit.complete(intent, {"kek_ids": held})
    return held


def forget_warehouse(key_file: Path, warehouse_id: str) -> bool:
    """Remove a warehouse that no longer exists from the keyring's registry (``ehr keys
    forget-warehouse``), so that rotation and ``purge-retired`` no longer wait for it.

    Refused while the file it was last seen at still holds that warehouse, or cannot be read
    (open in a running process): a rotation that skipped a living warehouse would leave its
    data keys under a KEK that ``purge-retired`` then drops. Returns False when the keyring
    does not list it."""
    with keyring_lock(Path(key_file)):
        document = _read_keyring(Path(key_file))
        entry = document.get("warehouses", {}).get(warehouse_id)
        if entry is None:
            return False
        path = Path(str(entry.get("path", "")) if isinstance(entry, dict) else "")
        if path.is_file():
            try:
                con = warehouse.connect(path, read_only=True)
            except duckdb.Error as exc:
                raise KeyRotationError(
                    f"warehouse {warehouse_id} was last seen at {path}, which cannot be read "
                    "(open in a running pipeline?); it is kept in the registry"
                ) from exc
            try:
                found = warehouse.warehouse_id(con)
            finally:
                con.close()
            if found == warehouse_id:
                raise KeyRotationError(
                    f"warehouse {warehouse_id} still exists at {path}; only a warehouse deleted "
                    "for good is removed from the registry"
                )
        del document["warehouses"][warehouse_id]
        write_keyring(Path(key_file), document)
    return True


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
    # pseudonyms of the other Patient resources of the same person (sharing an identifier),
    # erased with the patient
    same_person: list[str] = field(default_factory=list)
    # record_ledger rows of the erased records, kept without their resource (status 'erased')
    ledger_rows_erased: int = 0
    # batch keys found holding an identifier of the person (ErasurePlan.batch_key_kinds)
    batch_keys_naming_the_person: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _released_tables(
    con: duckdb.DuckDBPyConnection, plan: ErasurePlan
) -> list[tuple[str, str, str, bool]]:
    """(label, qualified name, patient_id expression, whether it has a VARCHAR ``id`` column:
    the released resource's key) of every table the plan names that exists; a named table
    without a ``patient_id`` column is an error, not a silent skip."""
    found: list[tuple[str, str, str, bool]] = []
    for entry in plan.tables:
        rows = con.execute(
            """
            SELECT t.table_name, c.data_type, i.data_type = 'VARCHAR'
            FROM duckdb_tables() t
            LEFT JOIN duckdb_columns() c
              ON c.database_name = t.database_name AND c.schema_name = t.schema_name
             AND c.table_name = t.table_name AND lower(c.column_name) = 'patient_id'
            LEFT JOIN duckdb_columns() i
              ON i.database_name = t.database_name AND i.schema_name = t.schema_name
             AND i.table_name = t.table_name AND lower(i.column_name) = 'id'
            WHERE t.database_name = current_database() AND t.schema_name = ? AND NOT t.internal
            ORDER BY 1
            """,
            [entry.schema],
        ).fetchall()
        types = {t: kind for t, kind, _ in rows}
        with_id = {t for t, _, has_id in rows if has_id}
        for table in entry.tables or tuple(t for t, kind in types.items() if kind is not None):
            if table not in types:
                continue  # not built yet in this warehouse
            if types[table] is None:
                raise VaultError(
                    f"{entry.schema}.{table} is listed for erasure but has no patient_id"
                )
            label = table if entry.schema == "main" else f"{entry.schema}.{table}"
            expr = "patient_id" if types[table] == "VARCHAR" else "CAST(patient_id AS VARCHAR)"
            qualified = f"{_quote(entry.schema)}.{_quote(table)}"
            found.append((label, qualified, expr, table in with_id))
    return found


def _count(con: duckdb.DuckDBPyConnection, sql: str, params: Any) -> int:
    return int(con.execute(sql, params).fetchall()[0][0])


# The patients erased ($subjects: the patient and the other Patient resources of the same
# person) and the shared resources found naming them ($shared), as query parameters.
_SUBJECTS = "SELECT unnest($subjects::VARCHAR[])"
_SHARED = "SELECT unnest($shared::VARCHAR[])"
# The vault rows an erasure deletes, one rule for phi_vault and its clustered copies: every row
# of a subject's compartment and its Patient, and every row of the resources found outside it.
_ERASED_ROWS = (
    f"(patient_key IN ({_SUBJECTS}) OR resource_key IN ({_SUBJECTS}) "
    f"OR resource_key IN ({_SHARED}))"
)
# Which resources those rows are, for the index tables (known from the vault, so read first).
_ERASED_RESOURCES = f"SELECT resource_key FROM phi_vault WHERE {_ERASED_ROWS}"
_SHARED_ROWS = f"SELECT count(*) FROM phi_vault WHERE resource_key IN ({_SHARED})"
# Patient resources sharing an identifier criteria key (exact or loose) with the given ones.
_SHARING_AN_IDENTIFIER = """
SELECT DISTINCT b.resource_key FROM identifier_index a
JOIN identifier_index b ON a.criteria_key = b.criteria_key
WHERE a.resource_type = 'Patient' AND b.resource_type = 'Patient'
  AND a.resource_key IN (SELECT unnest($keys::VARCHAR[]))
"""
# Pairs of Patient resources of which one names the other in ``Patient.link``: each link type
# (replaced-by, replaces, refer, seealso) says the two are the same person. A link given by
# identifier (a conditional reference) names the Patient holding it. Either way round.
_PATIENT_LINKS = """
SELECT resource_key AS a, target_key AS b FROM resource_references
WHERE path = 'link.other' AND target_type = 'Patient' AND kind IN ('urn', 'relative', 'absolute')
UNION
SELECT r.resource_key, i.resource_key FROM resource_references r
JOIN identifier_index i ON i.criteria_key = r.target_key AND i.resource_type = 'Patient'
WHERE r.path = 'link.other' AND r.kind = 'conditional'
"""
# Patient resources linked to the given ones (``_PATIENT_LINKS``), either way round.
_LINKED = f"""
WITH links AS ({_PATIENT_LINKS})
SELECT b FROM links WHERE a IN (SELECT unnest($keys::VARCHAR[]))
UNION SELECT a FROM links WHERE b IN (SELECT unnest($keys::VARCHAR[]))
"""
_ERASED_WITH = "SELECT subject_key FROM erased_subjects WHERE kind = 'patient' AND erased_with = ?"


# Every Patient resource's identifier criteria keys: the links of the same-person rule.
_PATIENT_CRITERIA = (
    "SELECT resource_key, criteria_key FROM identifier_index WHERE resource_type = 'Patient'"
)


def person_keys(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """Every Patient resource with an indexed identifier or a link, and its person: the
    smallest pseudonym among the Patient resources it shares an identifier criteria key with
    or is linked to (``Patient.link``), directly or through others (the rule of
    :func:`same_person`, here over every patient at once: a union-find). A Patient neither
    indexed nor linked is not listed: it is a person of its own. A link may name a Patient
    never sent; its pseudonym then stands in the set like the others. The release counts
    k-anonymity's groups in these people."""
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]  # halve the path as it is walked
            key = parent[key]
        return key

    def join(one: str, other: str) -> None:
        here, there = root(one), root(other)
        if here != there:  # the larger root joins the smaller: a root is its set's smallest
            low, high = sorted((here, there))
            parent[high] = low

    first_with: dict[str, str] = {}
    for resource_key, criteria_key in con.execute(_PATIENT_CRITERIA).fetchall():
        join(str(resource_key), first_with.setdefault(str(criteria_key), str(resource_key)))
    if has_table(con, "resource_references"):
        for one, other in con.execute(_PATIENT_LINKS).fetchall():
            join(str(one), str(other))
    return {key: root(key) for key in parent}


def same_person(con: duckdb.DuckDBPyConnection, pseudonym: str) -> list[str]:
    """The pseudonyms of the other Patient resources of the same person: those sharing one of
    its identifier criteria (``identifier_index``: the exact ``system|value``, or its loose
    form under the same system) or linked to it by ``Patient.link`` (a merged record the
    hospital says is the same person, with no identifier in common), and the ones sharing one
    of theirs or linked to them, and so on; and those an earlier run of this erasure already
    took with it. Ingest would refuse any of them arriving after the erasure (the tombstones
    hold the identifiers), so an erasure takes them all. Sorted; the patient itself is not
    listed."""
    check_pseudonym(pseudonym)
    found = {pseudonym}
    frontier = [pseudonym]
    links = has_table(con, "resource_references")
    while frontier:
        rows = con.execute(_SHARING_AN_IDENTIFIER, {"keys": frontier}).fetchall()
        if links:
            rows += con.execute(_LINKED, {"keys": frontier}).fetchall()
        frontier = sorted({str(k) for (k,) in rows} - found)
        found.update(frontier)
    found.update(str(k) for (k,) in con.execute(_ERASED_WITH, [pseudonym]).fetchall())
    found.discard(pseudonym)
    return sorted(found)


# Vault resources of no patient with a resolved reference to one of the given resources (the
# compartment's, or a record found this way): an Observation with no subject filed under her
# Encounter, a Provenance of her Observation, a Provenance of that Observation.
_SHARED_REFERRING = """
SELECT DISTINCT r.resource_key FROM resource_references r
JOIN phi_vault v ON v.resource_key = r.resource_key AND v.patient_key IS NULL
WHERE r.kind IN ('urn', 'relative', 'absolute')
  AND r.target_key IN (SELECT unnest($keys::VARCHAR[]))
"""
_COMPARTMENTS = (
    f"SELECT DISTINCT resource_key FROM phi_vault "
    f"WHERE patient_key IN ({_SUBJECTS}) OR resource_key IN ({_SUBJECTS})"
)


def shared_records_about(con: duckdb.DuckDBPyConnection, subjects: list[str]) -> list[str]:
    """The vault resources of no patient that point at a record of the subjects' compartments,
    directly or through another record found so: a record filed under no patient (FHIR makes
    ``Observation.subject`` optional, a Provenance names its target alone) that belongs to
    one of her Encounters or describes one of her records is hers, though it holds none of
    her names or ids for the text search to find. Only references into her records are
    followed, never out of them (the Practitioner her Encounter names is not hers). Sorted."""
    if not has_table(con, "resource_references"):
        return []
    rows = con.execute(_COMPARTMENTS, {"subjects": subjects}).fetchall()
    seen = {str(k) for (k,) in rows}
    found: set[str] = set()
    frontier = sorted(seen)
    while frontier:
        rows = con.execute(_SHARED_REFERRING, {"keys": frontier}).fetchall()
        frontier = sorted({str(k) for (k,) in rows} - seen)
        seen.update(frontier)
        found.update(frontier)
    return sorted(found)


def _erase_in_warehouse(
    con: duckdb.DuckDBPyConnection, report: ErasureReport, now: datetime, plan: ErasurePlan
) -> tuple[str, ...]:
    """The erasure's transaction; returns the keys of the resources of no patient whose
    released copies the places must purge: the shared resources of the plan, and every
    resource an earlier, interrupted run of this erasure already erased (its shared ones are
    no longer in the vault for the caller to find by their text)."""
    p = report.pseudonym
    con.begin()
    try:
        report.same_person = same_person(con, p)
        erased_before = [
            str(k)
            for (k,) in con.execute(
                _ERASED_BEFORE, {"subjects": [p, *report.same_person]}
            ).fetchall()
        ]
        named = {
            "subjects": [p, *report.same_person],
            "shared": list(plan.shared_resources),
            "now": now,
        }

        def run(sql: str) -> int:  # with the named parameters ``sql`` uses
            return _count(con, sql, warehouse.used_parameters(named, sql))

        live, dead = con.execute(
            "SELECT count(*) FILTER (WHERE destroyed_at IS NULL), "
            "count(*) FILTER (WHERE destroyed_at IS NOT NULL) FROM data_keys "
            f"WHERE owner IN ({_SUBJECTS})",
            {"subjects": named["subjects"]},
        ).fetchall()[0]
        report.data_keys_already_destroyed = int(dead)
        report.data_keys_destroyed = run(
            "UPDATE data_keys SET wrapped = NULL, destroyed_at = $now "
            f"WHERE owner IN ({_SUBJECTS}) AND destroyed_at IS NULL"
        )
        # durable with the destruction: the rewrite that wipes the freed pages is owed until it
        # is done, by this erasure or by the next writer (warehouse.rewrite_if_owed)
        warehouse.owe_rewrite(con, "an erasure")
        # Index rows first: which resources were erased is known from the vault.
        used = warehouse.used_parameters(named, _ERASED_RESOURCES)
        rows = con.execute(_ERASED_RESOURCES, used).fetchall()
        erased = sorted({str(k) for (k,) in rows})
        named["erased"] = erased
        _tombstone(con, p, report.same_person, plan.identifier_keys, now)
        tombstone(con, erased, now)
        for table in ("resource_references", "identifier_index"):
            report.rows_deleted[table] = run(
                f"DELETE FROM {table} WHERE resource_key IN ({_ERASED})"
            )
        if plan.shared_resources:
            report.rows_deleted["phi_vault_shared"] = run(_SHARED_ROWS)
        for table in ("phi_vault", CLUSTERED_TABLE):
            report.rows_deleted[table] = run(f"DELETE FROM {table} WHERE {_ERASED_ROWS}")
        report.rows_deleted["quarantine"] = run(
            f"DELETE FROM quarantine WHERE patient_key IN ({_SUBJECTS})"
        )
        # values derived from the vault (the leak scan's canaries) hold the patient's PHI
        # under the shared key, which no erasure destroys: deleted, the rewrite wipes them
        report.rows_deleted["sealed_cache"] = drop_entries(con)
        if plan.unattributed_quarantine:
            report.rows_deleted["quarantine_unattributed"] = sum(
                _count(con, _DELETE_UNATTRIBUTED, list(row)) for row in plan.unattributed_quarantine
            )
        # the ledger keeps a row for every record (the batch's counts), without its resource
        con.execute(_LEDGER_RESOURCES_GONE, {"now": now})
        report.ledger_rows_erased = run(_LEDGER_ERASED)
        con.execute(_LEDGER_MACS_OF_ERASED)
        # other resources' references to any erased patient or resource (another patient's
        # Observation naming one of their Encounters): the index keeps no erased pseudonym
        report.rows_deleted["resource_references_to_erased"] = run(_REFERENCES_TO_ERASED)
        if plan.batch_key_kinds:
            con.executemany(
                f"INSERT OR IGNORE INTO {warehouse.ERASED_BATCH_KEYS_TABLE} VALUES (?, ?)",
                [list(found) for found in plan.batch_key_kinds],
            )
        report.batch_keys_naming_the_person = len({key for key, _ in plan.batch_key_kinds})
        for label, qualified, column, has_id in _released_tables(con, plan):
            # a patient's released rows, and the released copies of the resources found
            # outside her compartment (another patient's among them)
            shared = f" OR id IN ({_SHARED})" if has_id else ""
            report.rows_deleted[label] = run(
                f"DELETE FROM {qualified} WHERE {column} IN ({_SUBJECTS}){shared}"
            )
        con.commit()
    except BaseException:
        con.rollback()
        raise
    report.found = bool(live or dead or any(report.rows_deleted.values()))
    return tuple(dict.fromkeys((*plan.shared_resources, *erased_before)))


# The resources an earlier run of the erasure of these patients ($subjects) erased: its
# resource tombstones carry the erased_at of the patients' own tombstones (one transaction).
# A run interrupted after its commit leaves their released copies in the places; the shared
# ones among them can no longer be found by their text, so a re-run purges them by these keys.
_ERASED_BEFORE = f"""
SELECT DISTINCT r.subject_key FROM erased_subjects r
JOIN erased_subjects s ON s.kind = 'patient' AND s.subject_key IN ({_SUBJECTS})
WHERE r.kind = 'resource' AND r.erased_at = s.erased_at
"""
# The resources erased ($erased: every resource key of the rows _ERASED_ROWS deletes).
_ERASED = "SELECT unnest($erased::VARCHAR[])"
# Ledger rows of records no table holds any more (what this erasure, and any before it, removed):
# status 'erased', without their resource key, type and content MAC, so the ledger still
# accounts for every record of its batch (reconciliation counts them) but no longer lists the
# person's resources.
# An accepted new version is held by the vault row at its position; an accepted repeat by any
# vault row of its resource; a quarantined record by the quarantine row at its position.
_HELD_NOWHERE = """
(l.status = 'accepted' AND l.outcome IN ('new', 'updated') AND NOT EXISTS (
        SELECT 1 FROM phi_vault v WHERE v.batch_id = l.batch_id
        AND v.file_index = l.file_index AND v.position = l.position))
   OR (l.status = 'accepted' AND l.outcome NOT IN ('new', 'updated')
       AND l.resource_key IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM phi_vault v WHERE v.resource_key = l.resource_key))
   OR (l.status = 'quarantined' AND NOT EXISTS (
        SELECT 1 FROM quarantine q WHERE q.batch_id = l.batch_id
        AND q.file_index = l.file_index AND q.position = l.position))
"""
# A record an ingest killed part-way left staged (its batch unfinished: the next pass replaces
# its rows) whose resource is erased: tombstoned, the vault row at its position gone with it.
# Emptied too, or the ledger would go on listing the person's resources, and the next pass of
# the batch would count them as no longer in its files (``_previous_keys`` in vault.ingest)
# when they are still there, refused as erased. Not every staged row without its vault row: a
# kill between a flush's two inserts leaves one of a resource nobody erased.
_STAGED_ERASED = """
(l.status = 'staged' AND l.resource_key IN (SELECT subject_key FROM erased_subjects)
   AND NOT EXISTS (
        SELECT 1 FROM phi_vault v WHERE v.batch_id = l.batch_id
        AND v.file_index = l.file_index AND v.position = l.position))
"""
# The ledger rows an erasure empties.
_LEDGER_ROWS_ERASED = f"(({_HELD_NOWHERE}) OR {_STAGED_ERASED})"
_ERASED_OUTCOME = (
    f"CASE WHEN l.status = 'quarantined' THEN '{warehouse.ERASED_FROM_QUARANTINE}' "
    "ELSE 'erased' END"
)
_LEDGER_ERASED = f"""
UPDATE record_ledger l SET status = 'erased', outcome = {_ERASED_OUTCOME}, resource_type = NULL,
    resource_key = NULL, content_mac = NULL
WHERE {_LEDGER_ROWS_ERASED}"""
# The same, in the batches other than $b (:func:`erase_earlier_compartments`; their resources
# are tombstoned by then).
_LEDGER_ERASED_ELSEWHERE = f"""
UPDATE record_ledger l SET status = 'erased', outcome = {_ERASED_OUTCOME}, resource_type = NULL,
    resource_key = NULL, content_mac = NULL
WHERE l.batch_id <> $b AND {_LEDGER_ROWS_ERASED}"""
# The content MAC of an erased record is a keyed digest of the record itself: whoever holds the
# pseudonym key and a copy of the record (an export kept at the source) could confirm it was
# here and where. Rows an erasure emptied before the MAC went with the rest lose it too.
_LEDGER_MACS_OF_ERASED = (
    "UPDATE record_ledger SET content_mac = NULL "
    "WHERE status = 'erased' AND content_mac IS NOT NULL"
)
_REFERENCES_TO_ERASED = """
DELETE FROM resource_references WHERE target_key IN (
    SELECT subject_key FROM erased_subjects WHERE kind IN ('patient', 'resource'))"""
# The resources of those rows that the vault holds no version of: tombstoned too (an erasure
# from before resource tombstones existed left them in the ledger only).
_LEDGER_RESOURCES_GONE = f"""
INSERT INTO erased_subjects (subject_key, kind, erased_at)
SELECT DISTINCT l.resource_key, 'resource', $now FROM record_ledger l
WHERE {_HELD_NOWHERE} AND l.resource_key IS NOT NULL
  AND l.resource_key NOT IN (SELECT resource_key FROM phi_vault)
ON CONFLICT DO NOTHING"""


def tombstone(
    con: duckdb.DuckDBPyConnection, keys: list[str], now: datetime, kind: str = "resource"
) -> None:
    """Tombstones of erased subjects of ``kind`` (``patient``, or ``resource``: the resources
    an erasure removed). A reference to a resource tombstoned from a resource that stays
    (another patient's Observation naming one of their Encounters) is dropped by every later
    release (:func:`deid.release.erased_subjects`) and by the erasure's
    ``released_references`` place, instead of naming it. Nothing links them to the patient."""
    if keys:
        con.execute(
            "INSERT INTO erased_subjects (subject_key, kind, erased_at) "
            "SELECT unnest($keys::VARCHAR[]), $kind, $now ON CONFLICT DO NOTHING",
            {"keys": keys, "now": now, "kind": kind},
        )


def erase_earlier_compartments(
    con: duckdb.DuckDBPyConnection, patients: list[str], batch_id: str, now: datetime
) -> int:
    """The records other batches than ``batch_id`` stored in the compartments of ``patients``
    (Patients ingest has just refused as an erased person: a later batch sent her Patient
    under a new id with one of her identifiers, after an earlier one had sent records naming
    that id alone), removed from the vault as an erasure removes them: their vault rows and
    clustered copies, the quarantined records sealed under their key, their rows of the
    reference graph and the identifier index, references to them from other resources;
    their resources tombstoned, and the ledger rows of those batches emptied (status
    ``erased``), so every batch still reconciles. The caller has destroyed their data keys
    (which makes these rows unreadable) and tombstoned the patients; the released copies
    are dropped by the next de-identification (:func:`deid.staging.publish_batch`), and the
    file must be rewritten (:func:`vault.warehouse.rewrite`): the destroyed wrapped keys and
    the ciphertexts stay in its freed pages. Returns how many vault rows were removed. Within
    the caller's transaction."""
    named = {"subjects": patients, "b": batch_id}
    rows = con.execute(
        f"SELECT DISTINCT resource_key FROM phi_vault WHERE batch_id <> $b "
        f"AND patient_key IN ({_SUBJECTS})",
        named,
    ).fetchall()
    erased = sorted(str(k) for (k,) in rows)
    if not erased:
        return 0
    tombstone(con, erased, now)
    keys = {"erased": erased}
    for table in ("resource_references", "identifier_index"):
        con.execute(f"DELETE FROM {table} WHERE resource_key IN ({_ERASED})", keys)
    con.execute(
        f"DELETE FROM {CLUSTERED_TABLE} WHERE batch_id <> $b AND patient_key IN ({_SUBJECTS})",
        named,
    )
    removed = _count(
        con,
        f"DELETE FROM phi_vault WHERE batch_id <> $b AND patient_key IN ({_SUBJECTS})",
        named,
    )
    con.execute(
        f"DELETE FROM quarantine WHERE batch_id <> $b AND patient_key IN ({_SUBJECTS})", named
    )
    # the refusing batch's own ledger is settled after this (its records are quarantined)
    con.execute(_LEDGER_ERASED_ELSEWHERE, {"b": batch_id})
    con.execute(_LEDGER_MACS_OF_ERASED)
    con.execute(_REFERENCES_TO_ERASED)
    drop_entries(con)  # values derived from what was removed, the canaries among them
    return removed


_DELETE_UNATTRIBUTED = (
    "DELETE FROM quarantine WHERE patient_key IS NULL AND batch_id = ? AND file_index = ? "
    "AND position = ?"
)


def _tombstone(
    con: duckdb.DuckDBPyConnection,
    pseudonym: str,
    others: list[str],
    identifier_keys: tuple[str, ...],
    now: datetime,
) -> None:
    """Remember the erasure so it sticks: the patient pseudonym and those of the other Patient
    resources of the same person (linked to it, so that a re-run finds them), and the keyed
    identifier criteria of all of them (exact and loose, from the identifier index, and those
    the caller computed): a later ``Patient?identifier=`` reference, or a Patient under any id
    carrying one of those identifiers, resolves to them once the index rows are gone. Later
    records resolving to any of them are quarantined as ``erased_subject`` by ingest and never
    sealed again."""
    insert = (
        "INSERT INTO erased_subjects (subject_key, kind, erased_at, erased_with) "
        "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING"
    )
    con.execute(insert, [pseudonym, "patient", now, None])
    for other in others:
        con.execute(insert, [other, "patient", now, pseudonym])
    for key in identifier_keys:
        con.execute(insert, [key, "criteria", now, None])
    con.execute(
        "INSERT INTO erased_subjects (subject_key, kind, erased_at) "
        "SELECT DISTINCT criteria_key, 'criteria', $now FROM identifier_index "
        f"WHERE resource_type = 'Patient' AND resource_key IN ({_SUBJECTS}) "
        "ON CONFLICT DO NOTHING",
        {"subjects": [pseudonym, *others], "now": now},
    )


def _purge_places(report: ErasureReport, plan: ErasurePlan, shared: tuple[str, ...]) -> None:
    """Every place purged of each patient erased, and of the resources of no patient erased
    with them, ``shared`` (by a place that keeps released resources by their key:
    ``purge_resources``)."""
    for place in plan.places:
        try:
            removed = sum(
                int(place.purge(subject)) for subject in (report.pseudonym, *report.same_person)
            )
            purge_resources = getattr(place, "purge_resources", None)
            if shared and purge_resources is not None:
                removed += int(purge_resources(shared))
            report.places[place.name] = removed
        except Exception as exc:  # one failing place must not stop the others
            logger.warning(
                "erasure of %s from %s failed: %s", report.pseudonym, place.name, type(exc)
            )
            report.places_failed.append(place.name)


def _announce_forget(
    pseudonym: str, audit: AuditLog, reason: str, actor: str | None
) -> dict[str, Any]:
    check_pseudonym(pseudonym)
    reason = _check_reason(reason, "an erasure")
    audit.check_appendable()  # never destroy what could not be audited
    return audit.intend("forget", pseudonym, reason, {}, actor)


def _finish_forget(report: ErasureReport, audit: AuditLog, intent: dict[str, Any]) -> ErasureReport:
    logger.info(
        "erased %s: %d data keys destroyed, %d rows deleted",
        report.pseudonym,
        report.data_keys_destroyed,
        sum(report.rows_deleted.values()),
    )
    if report.places_failed:  # the intent stays open: verify lists it until a re-run
        raise ErasureIncompleteError(
            f"erasure of {report.pseudonym} committed in the warehouse, but purging failed "
            f"in: {', '.join(report.places_failed)}; run the erasure again"
        )
    try:
        audit.complete(intent, report.to_dict())
    except VaultError as exc:
        raise AuditLogError(
            f"erasure of {report.pseudonym} was committed but its completion could not be "
            f"audited: {exc}; run the erasure again"
        ) from exc
    return report


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
    """Crypto-shred the patient with this pseudonym, on an open connection.

    Audited first (an intent entry). Then in one transaction, for the patient and the other
    Patient resources of the same person (:func:`same_person`), with the shared resources
    ``plan`` names: a tombstone for the patient
    (``erased_subjects``), its data key(s) destroyed (``wrapped`` set to NULL), and its rows
    deleted from ``phi_vault`` (resources in its compartment and the Patient itself),
    ``quarantine``, ``resource_references`` and ``identifier_index`` (rows of its resources),
    and from the released tables ``plan`` names. Then every place of ``plan`` is purged and a
    completion entry is written. Erasing an already erased patient, or an unknown one (the
    report says ``found=False``; the tombstone is written anyway), is not an error, so an
    interrupted erasure is simply run again.

    The deleted rows stay in the database file's free pages until it is rewritten:
    :func:`forget_in_warehouse` does both and is what ``ehr forget`` runs.
    """
    intent = _announce_forget(pseudonym, audit, reason, actor)
    report = ErasureReport(pseudonym)
    shared = _erase_in_warehouse(con, report, _aware(clock), plan)
    _purge_places(report, plan, shared)
    return _finish_forget(report, audit, intent)


def forget_in_warehouse(
    warehouse_path: Path,
    pseudonym: str,
    audit: AuditLog,
    reason: str,
    *,
    plan: ErasurePlan = ErasurePlan(),
    clock: Clock = utcnow,
    actor: str | None = None,
) -> ErasureReport:
    """:func:`forget_pseudonym` on the warehouse file, which is then rewritten into a fresh
    file (atomically replacing it) so that no freed page keeps the destroyed wrapped key, a
    ciphertext or a released row of the patient. Each step waits while another process has the
    warehouse open (:func:`vault.warehouse.connect_when_free`): two erasures take turns."""
    intent = _announce_forget(pseudonym, audit, reason, actor)
    report = ErasureReport(pseudonym)
    con = warehouse.connect_when_free(warehouse_path)
    try:
        shared = _erase_in_warehouse(con, report, _aware(clock), plan)
        con.execute("CHECKPOINT")
    finally:
        con.close()
    _purge_places(report, plan, shared)
    _rewrite_after_erasure(warehouse_path, report.pseudonym)
    return _finish_forget(report, audit, intent)


def _rewrite_after_erasure(warehouse_path: Path, pseudonym: str) -> None:
    """The warehouse rewritten (:func:`vault.warehouse.rewrite`, waiting while another process
    has it open); when it cannot be, an error saying the erasure is committed and what is left
    (the intent stays open: ``ehr audit verify`` lists it until a re-run)."""
    try:
        warehouse.rewrite(warehouse_path)
    except duckdb.IOException as exc:
        raise ErasureIncompleteError(
            f"erasure of {pseudonym} committed in the warehouse, but the file could not be "
            f"rewritten ({exc}): its freed pages may still hold the erased rows until it is; "
            "run the erasure again once no other process has the warehouse open"
        ) from exc


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
    pseudonym = bind_pseudonym_key(con, provider).resource_key("Patient", patient_id)
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


def data_key_destroyed(con: duckdb.DuckDBPyConnection, pseudonym: str) -> bool:
    """Whether an erasure destroyed the data key of the patient ``pseudonym``."""
    if not has_table(con, "data_keys"):
        return False
    return bool(
        _count(
            con,
            "SELECT count(*) FROM data_keys WHERE owner = ? AND destroyed_at IS NOT NULL",
            [pseudonym],
        )
    )


def _absent(con: duckdb.DuckDBPyConnection, pseudonym: str) -> tuple[str, None, VaultError]:
    """Why the vault holds no Patient under ``pseudonym``: erased, or never there."""
    if data_key_destroyed(con, pseudonym):
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

    An intent entry is written before the vault is read, and a completion entry with the
    outcome before anything is returned (a failed lookup is audited too); if either cannot be
    written, nothing is returned. Raises
    :class:`KeyDestroyedError` for an erased patient and :class:`PatientNotFoundError` for an
    unknown pseudonym.
    """
    reason = _check_reason(reason, "re-identification")
    check_pseudonym(pseudonym)
    intent = audit.intend("reidentify", pseudonym, reason, {}, actor)
    outcome, found, error = _lookup(con, provider, pseudonym)
    details: dict[str, Any] = {"found": found is not None, "outcome": outcome}
    if error is not None:
        details["error"] = type(error).__name__
    audit.complete(intent, details)
    if error is not None:
        raise error
    assert found is not None
    return found
