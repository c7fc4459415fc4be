"""The de-identification stage: vault → policy → ``deid_resources`` (a released table), the PHI
leak scan over what was released, and the released patient table with its k-anonymity."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import pickle
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import date
from functools import cache, partial
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from deid import leakscan
from deid.kanon import (
    DEFAULT_MAX_WITHHELD,
    QUASI_IDENTIFIERS,
    KAnonymousRelease,
    build_k_anonymous_release,
)
from deid.leakscan import (
    CANARY_RESOURCE_TYPES,
    IDENTIFIED_ONLY_TYPES,
    CanarySet,
    LeakScanResult,
    reason_birth_date_forms,
    scan_rows,
)
from deid.methods import earliest, today_utc
from deid.policy import Policy
from deid.released_table import (
    DEID_DDL,
    checked_table,
    ensure_resource_digests,
    resource_digest_sql,
)
from deid.terminology import Terminology
from deid.workers import (
    INGEST_RESOLVED_KINDS,
    ChunkResult,
    Item,
    Targets,
    WorkerSetup,
    deidentify_items,
)
from fhirlake import nested as fhirlake_nested
from vault import read as vault_read
from vault.catalog import has_table, multiset_digest_sql
from vault.errors import InvalidCiphertext, KeyDestroyedError
from vault.ingest import FHIR_BASE_ENV, criteria_holders_sql
from vault.keys import KeyProvider, key_fingerprint
from vault.pseudonym import Pseudonymizer
from vault.read import (
    current_rows_sql,
    iter_current_chunks,
    iter_every_version,
    iter_quarantined_records,
    iter_unattributed_quarantined_records,
)
from vault.sealed_cache import entry_state, read_entry, write_entry
from vault.warehouse import ERASED_BATCH_KEYS_TABLE, database_path

_log = logging.getLogger(__name__)

DEID_ERRORS_DDL = """
CREATE TABLE IF NOT EXISTS deid_errors (
    batch_id VARCHAR NOT NULL,
    resource_type VARCHAR,
    patient_id VARCHAR,
    reason_code VARCHAR NOT NULL,
    message VARCHAR NOT NULL
)"""


@dataclass
class DeidReport:
    batch_id: str
    policy: str
    resources_in: int = 0
    released: int = 0
    withheld: int = 0
    withheld_reasons: dict[str, int] = field(default_factory=dict)
    rule_counts: dict[str, int] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    # inside released resources: what the allow-list withheld or generalised, by kind
    release_counts: dict[str, int] = field(default_factory=dict)
    # the first day (ISO) after the day of this release on which a resource of it would be
    # released otherwise (a date crossing the age limit, a new year): it holds until then
    stable_until: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def erased_subjects(con: duckdb.DuckDBPyConnection) -> frozenset[str]:
    """Every tombstone's key: the erased patients' pseudonyms, their resources', and the keyed
    criteria of their identifiers."""
    if not has_table(con, "erased_subjects"):
        return frozenset()  # an older warehouse: nothing erased since tombstones exist
    rows = con.execute("SELECT subject_key FROM erased_subjects").fetchall()
    return frozenset(str(k) for (k,) in rows)


# the batch's resolved references while it is de-identified: a temporary table of the
# connection, so DuckDB holds them (spilling beyond its memory limit), not a Python dict of
# every reference of the batch (three per resource in a Synthea-shaped export). Each row holds
# the position of the vault row it is read with and the table is sorted by it, so a chunk of
# records (a run of positions) finds its references in a range DuckDB's zone maps skip to:
# looked up by key instead, every chunk scanned the whole table, and the stage's time grew
# with the square of the batch
_TARGETS_TABLE = "deid_reference_targets"


def _stage_reference_targets(con: duckdb.DuckDBPyConnection, batch_id: str) -> None:
    """The batch's urn:uuid, conditional and absolute references
    (:data:`deid.workers.INGEST_RESOLVED_KINDS`) with their targets, into the temporary table
    :data:`_TARGETS_TABLE` (position, resource key, keyed reference text, target type, target
    pseudonym), resolved through the identifier index where needed (to the one resource
    holding the identifier: ``vault.ingest.criteria_holders_sql``). A reference to an erased
    patient (or through an erased patient's identifier) resolves to nothing, so the release
    drops it instead of naming the erased patient's pseudonym.

    Only the references of the resources the batch's release reads are kept (those whose
    newest version the batch wrote: ``vault.read.current_rows_sql``), each with the position
    of that version's vault row, sorted by it."""
    erased = (
        "SELECT subject_key FROM erased_subjects"
        if has_table(con, "erased_subjects")
        else "SELECT ''::VARCHAR WHERE false"  # an older warehouse: nothing erased since
    )
    conditional = (
        "SELECT target_key FROM resource_references WHERE batch_id = $b AND kind = 'conditional'"
    )
    kinds = ", ".join(f"'{kind}'" for kind in INGEST_RESOLVED_KINDS)
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE {_TARGETS_TABLE} AS
        WITH holders AS ({criteria_holders_sql(conditional)}),
             current AS ({current_rows_sql("$b")})
        SELECT * FROM (
            SELECT c.ingest_seq AS position, r.resource_key, r.ref_mac, r.target_type,
                   CASE WHEN r.kind = 'conditional' THEN h.resource_key
                        ELSE r.target_key END AS target
            FROM resource_references r
            JOIN current c ON c.resource_key = r.resource_key
            LEFT JOIN holders h ON r.kind = 'conditional' AND h.criteria_key = r.target_key
            WHERE r.batch_id = $b AND r.kind IN ({kinds}) AND r.ref_mac IS NOT NULL
              AND r.target_key NOT IN ({erased}))
        WHERE target IS NOT NULL AND target NOT IN ({erased})
        ORDER BY position
        """,
        {"b": batch_id},
    )


def _reference_targets(con: duckdb.DuckDBPyConnection, positions: list[int]) -> dict[str, Targets]:
    """resource key → keyed reference text → (target type, target pseudonym), for the
    resources of a chunk of records, from :data:`_TARGETS_TABLE`. ``positions`` are the
    chunk's (ascending, a run of the batch's: ``vault.read.iter_current_chunks``), so the
    staged rows between its first and last are exactly its resources' references."""
    rows = con.execute(
        f"SELECT resource_key, ref_mac, target_type, target FROM {_TARGETS_TABLE} "
        "WHERE position BETWEEN ? AND ?",
        [positions[0], positions[-1]],
    ).fetchall()
    targets: dict[str, Targets] = {}
    for rk, mac, tt, tk in rows:
        targets.setdefault(rk, {})[mac] = (tt, tk)
    return targets


_DEID_COLUMNS = ("resource_type", "id", "patient_id", "batch_id", "resource")
_DEID_CHUNK = 2_000
_FLUSH_ROWS = 5_000

_ReleasedRow = tuple[str, str, str | None, str, str]
_WithheldRow = tuple[str, str | None, str | None, str, str]


@dataclass
class _BatchRun:
    """One batch's de-identification under way: released and withheld rows waiting for the next
    insert, and the counts its report is made of."""

    batch_id: str
    released: list[_ReleasedRow] = field(default_factory=list)
    errors: list[_WithheldRow] = field(default_factory=list)
    resources_in: int = 0
    rules: Counter[int] = field(default_factory=Counter)
    labels: Counter[str] = field(default_factory=Counter)
    withheld: Counter[str] = field(default_factory=Counter)
    release_counts: Counter[str] = field(default_factory=Counter)
    stable_until: date | None = None
    target: str = "deid_resources"
    errors_target: str = "deid_errors"


def _take_chunk(con: duckdb.DuckDBPyConnection, run: _BatchRun, result: ChunkResult) -> None:
    """Add one de-identified chunk to the run, inserting its rows once enough are pending."""
    batch = run.batch_id
    run.resources_in += len(result.released) + len(result.withheld)
    run.released.extend((t, k, p, batch, r) for t, k, p, r in result.released)
    run.errors.extend((batch, t, p, code, msg) for t, p, code, msg in result.withheld)
    run.rules.update(result.rules)
    run.labels.update(result.labels)
    run.withheld.update(result.reasons)
    run.release_counts.update(result.release_counts)
    run.stable_until = earliest(run.stable_until, result.stable_until)
    if len(run.released) >= _FLUSH_ROWS:
        _flush(con, run)


def _vault_items(
    con: duckdb.DuckDBPyConnection, provider: KeyProvider, batch_id: str
) -> Iterator[Item]:
    """The batch's records with their own resolved references (each resource carries its
    share, so no worker is sent the whole batch's), read a chunk at a time: the references of
    a chunk's resources are looked up in :data:`_TARGETS_TABLE` (staged by the caller) by the
    chunk's positions when the chunk is read, so neither memory nor a look-up's time grows
    with the batch."""
    # vault.read decrypts a chunk of ciphertexts at a time and checks each row's resource
    chunks = iter_current_chunks(con, provider, batch_id=batch_id, chunk_rows=_DEID_CHUNK)
    for positions, records in chunks:
        targets = _reference_targets(con, positions)
        for record in records:
            raw = orjson.dumps(record.resource)
            own = targets.get(record.resource_key)
            yield record.resource_key, record.resource_type, record.patient_key, raw, own


def _flush(con: duckdb.DuckDBPyConnection, run: _BatchRun) -> None:
    """Insert the run's pending released and withheld rows into the run's tables, and forget
    them."""
    if run.released:
        # one Arrow insert: executemany goes row by row and dominated the stage's time
        columns = list(zip(*run.released, strict=True))
        released = pa.table(
            {
                name: pa.array(values, pa.string())
                for name, values in zip(_DEID_COLUMNS, columns, strict=True)
            }
        )
        con.register("released_chunk", released)
        try:
            con.execute(
                f"INSERT INTO {run.target} BY NAME SELECT resource_type, id, patient_id, "
                f"batch_id, resource::JSON AS resource, {resource_digest_sql()} AS digest "
                "FROM released_chunk"
            )
        finally:
            con.unregister("released_chunk")
        run.released.clear()
    if run.errors:
        con.executemany(f"INSERT INTO {run.errors_target} VALUES (?, ?, ?, ?, ?)", run.errors)
        run.errors.clear()


def _report(run: _BatchRun, policy: Policy, started: float) -> DeidReport:
    withheld = sum(run.withheld.values())
    return DeidReport(
        run.batch_id,
        policy.name,
        resources_in=run.resources_in,
        released=run.resources_in - withheld,
        withheld=withheld,
        withheld_reasons=dict(run.withheld),
        rule_counts={
            f"{i}:{policy.rules[i].method}:{policy.rules[i].path}": n
            for i, n in sorted(run.rules.items())
        },
        labels=dict(run.labels),
        seconds=round(time.perf_counter() - started, 3),
        release_counts=dict(run.release_counts),
        stable_until=None if run.stable_until is None else run.stable_until.isoformat(),
    )


def deidentify_batch(
    con: duckdb.DuckDBPyConnection,
    provider: KeyProvider,
    batch_id: str,
    policy: Policy,
    *,
    today: date | None = None,
    target: str = "deid_resources",
    errors_target: str = "deid_errors",
    terminology: Terminology | None = None,
    workers: int | None = None,
) -> DeidReport:
    """De-identify every resource this batch put in the vault; replace the batch's rows in
    ``target`` (released) and ``errors_target`` (withheld), created with the release table's
    columns when missing, so a batch can be written to a staging table first."""
    started = time.perf_counter()
    target, errors_target = checked_table(target), checked_table(errors_target)
    con.execute(DEID_DDL.replace(" deid_resources ", f" {target} ", 1))
    ensure_resource_digests(con, target)
    con.execute(DEID_ERRORS_DDL.replace(" deid_errors ", f" {errors_target} ", 1))
    con.execute(f"DELETE FROM {target} WHERE batch_id = ?", [batch_id])
    con.execute(f"DELETE FROM {errors_target} WHERE batch_id = ?", [batch_id])
    run = _BatchRun(batch_id, target=target, errors_target=errors_target)
    setup = WorkerSetup(
        policy.source,
        policy.name,
        provider.pseudonym_key(),
        # read once, here: a worker reading it when it starts could count from another day
        today or today_utc(),
        dict((terminology or Terminology()).displays),
        server_base=os.environ.get(FHIR_BASE_ENV),
        erased=erased_subjects(con),
    )
    (expected,) = con.execute(
        "SELECT count(*) FROM phi_vault WHERE batch_id = ?", [batch_id]
    ).fetchone() or (0,)
    _stage_reference_targets(con, batch_id)
    try:
        deidentify_items(
            _vault_items(con, provider, batch_id),
            setup,
            partial(_take_chunk, con, run),
            workers=workers,
            expected=int(expected),
        )
    finally:
        # a temporary table ends with the connection anyway: an error dropping it (the
        # caller's transaction failed) must not hide the one that ended the loop
        with contextlib.suppress(duckdb.Error):
            con.execute(f"DROP TABLE IF EXISTS {_TARGETS_TABLE}")
    _flush(con, run)
    return _report(run, policy, started)


def _add_other_records(
    canaries: CanarySet,
    con: duckdb.DuckDBPyConnection,
    provider: KeyProvider,
    patients: set[str] | None,
    written_after: int | None = None,
) -> int:
    """Canaries of ``patients`` (every patient when None) beyond their Patient resources in
    the vault: their relatives and their other identifying records (every version the vault
    holds), and those records and their Patient records as the quarantine holds them (refused
    by validation, while their other records may be released). With ``written_after``, the
    vault's records of the resources with a version written after that position only, and no
    quarantined record. The vault's records read."""
    read = 0
    for rtype in (t for t in CANARY_RESOURCE_TYPES if t != "Patient"):
        identified = rtype in IDENTIFIED_ONLY_TYPES
        records = iter_every_version(
            con,
            provider,
            resource_type=rtype,
            identified_only=identified,
            written_after=written_after,
        )
        for record in records:
            read += 1
            if patients is None or record.patient_key in patients:
                canaries.add_resource(record.resource, record.patient_key)
    # a record of any type holding a person inside it (a lab result whose subject is its
    # contained Patient): that person is in no record of the types above
    holders = iter_every_version(con, provider, holding_persons=True, written_after=written_after)
    for record in holders:
        read += 1
        if patients is None or record.patient_key in patients:
            canaries.add_resource(record.resource, record.patient_key)
    if written_after is not None:
        return read
    quarantined = iter_quarantined_records(
        con, provider, CANARY_RESOURCE_TYPES, skip_destroyed=True, with_held=True
    )
    for owner, resource in quarantined:
        if patients is None or owner in patients:
            canaries.add_resource(resource, owner)
    _add_unattributed_records(canaries, con, provider, patients)
    return read


def _add_unattributed_records(
    canaries: CanarySet,
    con: duckdb.DuckDBPyConnection,
    provider: KeyProvider,
    patients: set[str] | None,
) -> None:
    """Canaries of the records the quarantine holds under no patient, refused before they
    could be read as FHIR (:func:`vault.read.iter_unattributed_quarantined_records`): a Patient
    written in Latin-1, or with a ``NaN``, is filed under no patient, while its Observations
    are released under it. A Patient's birth date is searched in the rows of the patient its
    id names."""
    pseudo = Pseudonymizer(provider.pseudonym_key())
    for resource in iter_unattributed_quarantined_records(con, provider, CANARY_RESOURCE_TYPES):
        rid = resource.get("id")
        owner = None
        if resource.get("resourceType") == "Patient" and isinstance(rid, str):
            owner = pseudo.resource_key("Patient", rid)
        if patients is None or owner in patients:
            canaries.add_resource(resource, owner)


def batch_canaries(
    con: duckdb.DuckDBPyConnection, provider: KeyProvider, batch_id: str
) -> CanarySet:
    """Canaries of every patient this batch touches, from every version the vault holds of
    their Patient resources (names, contacts, identifiers, phones, emails, addresses, birth
    dates: a name changed since still names them), and their other records
    (:func:`_add_other_records`)."""
    canaries = CanarySet()
    patients: set[str] = set()
    for patient in iter_every_version(
        con, provider, resource_type="Patient", patients_of_batch=batch_id
    ):
        canaries.add_patient(patient.resource, patient.resource_key)
        patients.add(patient.resource_key)
    _add_other_records(canaries, con, provider, patients)
    return canaries


def batch_key_hits(canaries: CanarySet, batch_key: str) -> list[str]:
    """Kinds of identifiers of the batch's patients (names, identifiers, phones, emails,
    addresses, and their Patient resources' own ids, kind ``id``; not birth dates, which a
    date-named export folder would match by chance) found in its batch key: the landing
    folder's name, which Dagster shows as the partition key. Read as written and with its
    separators as spaces (``li_wang`` holds the full name ``li wang``), also against the
    canaries with theirs as spaces (the key of a folder named ``zquix@example.org`` is
    ``zquix-example.org-<digest>``)."""
    found = _hits_as_written_and_spaced(canaries, batch_key)
    return sorted({*found, "id"}) if canaries.source_id_in(batch_key) else found


def erased_batch_key_kinds(con: duckdb.DuckDBPyConnection) -> dict[str, set[str]]:
    """The batch keys an erasure found holding an identifier of the person it erased, with the
    kinds it found (``ERASED_BATCH_KEYS_TABLE``): the key still names them, the vault no
    longer does, so both batch key checks add these to what they find."""
    erased: dict[str, set[str]] = {}
    if has_table(con, ERASED_BATCH_KEYS_TABLE):
        rows = con.execute(f"SELECT batch_id, kind FROM {ERASED_BATCH_KEYS_TABLE}").fetchall()
        for key, kind in rows:
            erased.setdefault(str(key), set()).add(str(kind))
    return erased


def release_batch_key_hits(
    con: duckdb.DuckDBPyConnection, canaries: CanarySet
) -> dict[str, list[str]]:
    """Every ingested batch's key against ``canaries`` (the release's: every patient of the
    vault), each key that holds one with the kinds found (:func:`batch_key_hits`). A batch's
    own check knows the patients it is filed under when it is de-identified only: a folder
    named after a patient of another batch, or one whose Patient came in a later batch, is
    found here. So is a key an erasure found naming the person it erased
    (``ERASED_BATCH_KEYS_TABLE``), with the kinds it found: the key still names her, and the
    vault no longer does."""
    if not has_table(con, "batches"):
        return {}
    keys = [str(k) for (k,) in con.execute("SELECT batch_id FROM batches ORDER BY 1").fetchall()]
    erased = erased_batch_key_kinds(con)
    hits = {key: sorted({*batch_key_hits(canaries, key), *erased.get(key, ())}) for key in keys}
    return {key: found for key, found in hits.items() if found}


class SubjectCanaries:
    """One patient's identifiers, to be found in free text an operator typed or a record kept
    as written (the reason of an erasure or a re-identification, which the audit log keeps for
    good; a quarantined record nobody could read as FHIR): the names, identifiers, phones,
    emails, addresses and birth date (in the forms people write it) of every version of the
    Patient resource (``versions``: a name changed since still names them), and ``ids``, the
    resource ids it is known by (``"id"``). Compiled once for many texts. A reason is held to
    more (``reason_hits``): the birth date with a two-digit year too, and identifiers and ids
    written with other separators or none."""

    def __init__(self, versions: Iterable[dict[str, Any]], *ids: str) -> None:
        versions = list(versions)
        self._canaries = CanarySet()
        self._reason_births = CanarySet()  # forms searched in a reason only
        for patient in versions:
            self._canaries.add_patient(patient)  # no pseudonym: the birth date as any canary
            ids = (*ids, str(patient.get("id") or ""))
            birth = patient.get("birthDate")
            for form in reason_birth_date_forms(birth) if isinstance(birth, str) else ():
                self._reason_births.add("birth_date", form)
        # an id as a whole token: "p7" is in "forget p7", not in "ticket p77"
        tokens = [re.escape(i.strip()) for i in dict.fromkeys(ids) if i.strip()]
        self._ids = (
            re.compile(rf"(?<![0-9A-Za-z])(?:{'|'.join(tokens)})(?![0-9A-Za-z])", re.IGNORECASE)
            if tokens
            else None
        )
        self._compact = {
            **_compact_forms("identifier", _identifier_values(versions)),
            **_compact_forms("id", ids),
        }

    def batch_key_hits(self, batch_key: str) -> list[str]:
        """Kinds of the person's identifiers found in a batch key, as the release's check
        reads one (:func:`batch_key_hits`: not the birth date)."""
        found = set(batch_key_hits(self._canaries, batch_key))
        if self._ids is not None and self._ids.search(batch_key):
            found.add("id")
        return sorted(found)

    @property
    def empty(self) -> bool:
        """Nothing to look for: no Patient resource and no id."""
        return self._ids is None and len(self._canaries) == 0

    def hits(self, text: str) -> list[str]:
        """Kinds found in ``text``, read as written and with separators as spaces."""
        found = set(_hits_as_written_and_spaced(self._canaries, text))
        if self._ids is not None and self._ids.search(text):
            found.add("id")
        return sorted(found)

    def reason_hits(self, text: str) -> list[str]:
        """Kinds found in a reason: ``hits``, the birth date with a two-digit year (3/7/46,
        07/03/46), and an identifier or id of eight letters and digits or more, with a digit,
        written with other separators or none (a UUID without its dashes, ``MRN778812``): the
        reason's letters and digits are compared with theirs, glued. Those forms are looked for
        in a reason only, a few words an operator typed, where a false refusal costs a
        rewording; in the records an erasure searches they would match other dates, doses and
        ratios (see ``reason_birth_date_forms``), and codes glued to other text."""
        found = set(self.hits(text)) | set(self._reason_births.find(text))
        compact = _compacted(text)
        found |= {kind for form, kind in self._compact.items() if form in compact}
        return sorted(found)


# an identifier or id compared in a reason by its letters and digits alone: at least this long,
# with a digit (a digit run alone is found whatever separates it already, and words glued
# together could spell a name-like id of letters)
MIN_COMPACT_ID = 8


def _compacted(text: str) -> str:
    """``text``'s letters and digits, case-folded, with nothing between them."""
    return "".join(ch for ch in text.casefold() if ch.isascii() and ch.isalnum())


def _identifier_values(versions: Iterable[dict[str, Any]]) -> list[str]:
    """The values of the Patient versions' identifiers."""
    return [
        str(identifier["value"])
        for patient in versions
        for identifier in leakscan.repeated(patient.get("identifier"))
        if isinstance(identifier, dict) and isinstance(identifier.get("value"), str)
    ]


def _compact_forms(kind: str, values: Iterable[str]) -> dict[str, str]:
    """Each value's compacted form (:func:`_compacted`) long enough to look for, to ``kind``:
    a UUID written without its dashes, an MRN with its letters glued to its digits."""
    forms = (_compacted(value) for value in values)
    return {
        form: kind
        for form in forms
        if len(form) >= MIN_COMPACT_ID and any(ch.isdigit() for ch in form)
    }


def _hits_as_written_and_spaced(canaries: CanarySet, text: str) -> list[str]:
    """Kinds found in ``text`` as written, and with its separators as spaces compared with
    the canaries as written and with theirs as spaces too: a batch key made safe rewrites
    ``@``, ``/`` and spaces as ``-`` (``zquix@example.org`` is the key
    ``zquix-example.org-<digest>``), which hid an email or a punctuated identifier."""
    spaced = " ".join(_KEY_SEPARATORS.split(text))
    found = set(canaries.find(text)) | set(canaries.find(spaced))
    return sorted(found | set(canaries.spaced().find(spaced)))


_KEY_SEPARATORS = re.compile(r"[^0-9A-Za-z]+")


def release_canaries(con: duckdb.DuckDBPyConnection, provider: KeyProvider) -> CanarySet:
    """Canaries of every patient in the vault, from every version of their Patient resources
    and their other records (:func:`_add_other_records`): for tables built over the whole
    release, and for each batch's rows, which can name a patient of another batch."""
    canaries = CanarySet()
    _add_release_records(canaries, con, provider, None)
    return canaries


def add_canaries_written_after(
    canaries: CanarySet, con: duckdb.DuckDBPyConnection, provider: KeyProvider, position: int
) -> int:
    """Add to ``canaries``, the release canaries of this vault as it was up to the ingest
    ``position`` (with its quarantine as it is now), those of every resource with a version
    written after it, every version of each: the canaries :func:`release_canaries` reads from
    the vault now, without decrypting the rest. A canary is added once whatever reads it again,
    so a text that is a canary of two kinds may keep the kind it was first read as. The vault's
    records read."""
    return _add_release_records(canaries, con, provider, position)


def _add_release_records(
    canaries: CanarySet,
    con: duckdb.DuckDBPyConnection,
    provider: KeyProvider,
    written_after: int | None,
) -> int:
    read = 0
    patients = iter_every_version(
        con, provider, resource_type="Patient", written_after=written_after
    )
    for patient in patients:
        read += 1
        canaries.add_patient(patient.resource, patient.resource_key)
    return read + _add_other_records(canaries, con, provider, None, written_after)


_VaultState = tuple[str, int, int | None, int | None, int, int | None, str, str]
# the vault's rows as the canaries depend on them: their count, highest ingest position, and a
# digest of which versions it holds (each row's key, position and MAC)
_VAULT_ROWS = (
    "SELECT count(*), max(ingest_seq), sum(hash(resource_key, ingest_seq, content_mac)) "
    "FROM phi_vault {where}"
)


def vault_state(con: duckdb.DuckDBPyConnection, provider: KeyProvider) -> _VaultState | None:
    """What the release canaries depend on, without decrypting anything: the warehouse file,
    the vault's rows (count, highest ingest position, a digest of which versions it holds),
    every quarantined record (count, digest) and the keys. None for an in-memory
    warehouse, which has no name to tell it apart by."""
    path = database_path(con)
    if path is None:
        return None
    rows, last_seq, digest = con.execute(_VAULT_ROWS.format(where="")).fetchone() or (
        0,
        None,
        None,
    )
    # the quarantined records canaries are read from too (:func:`_add_other_records`): every
    # one, since a refused record of any type may hold a Patient inside it
    quarantined: tuple[Any, ...] = (0, None)
    if has_table(con, "quarantine"):
        quarantined = con.execute(
            "SELECT count(*), sum(hash(batch_id, file_index, position, sealed)) FROM quarantine"
        ).fetchone() or (0, None)
    return (
        str(path.resolve()),
        int(rows),
        None if last_seq is None else int(last_seq),
        None if digest is None else int(digest),
        int(quarantined[0]),
        None if quarantined[1] is None else int(quarantined[1]),
        key_fingerprint(provider.pseudonym_key()),
        provider.active_kek_id(),
    )


# the sealed cache's entry of the release canaries (:mod:`vault.sealed_cache`)
SEALED_CANARIES = "release_canaries"
# the largest pickled set sealed: about 12 MB a thousand patients, so some 80,000 patients;
# one blob is written whole at each new vault state and held twice in memory while it is
MAX_SEALED_CANARY_BYTES = 1 << 30


@cache
def _canary_code() -> bytes:
    """What the canaries' forms and their pickled layout depend on besides the vault: the code
    that makes them (this module, :mod:`deid.leakscan` and :mod:`vault.read`, which reads the
    records they come from, and :mod:`fhirlake.nested`, which finds the resources a record
    holds, as files) and the versions of the libraries in them. A sealed set made by other
    code is made again."""
    digest = hashlib.sha256()
    sources = (leakscan.__file__, vault_read.__file__, fhirlake_nested.__file__)
    for source in (Path(__file__), *(Path(str(one)) for one in sources)):
        digest.update(source.read_bytes())
    for distribution in ("anyascii", "pyahocorasick", "pydantic-core", "ijson"):
        digest.update(f"|{distribution}={importlib.metadata.version(distribution)}".encode())
    digest.update(f"|python={sys.version_info[:2]}".encode())
    return digest.digest()


def sealed_state(state: _VaultState) -> str:
    """The state a sealed canary set is stored under: the vault's state but for the warehouse's
    path (a work directory moved or copied keeps its set), and the code that made the set."""
    return hashlib.sha256(repr(state[1:]).encode() + _canary_code()).hexdigest()


# A sealed set's blob: this line, then the vault state it was made from but for the path
# (counts, positions, digests, a key's fingerprint and id: no PHI) as a JSON line, then the
# pickled set. The state lets a later vault state that only appended rows extend it.
_SEALED_HEADER = b"ehr-release-canaries/2\n"
_EarlierState = tuple[int, int | None, int | None, int, int | None, str, str]


def _sealed_value(state: _VaultState, canaries: CanarySet) -> bytes:
    earlier = json.dumps(list(state[1:])).encode()
    return _SEALED_HEADER + earlier + b"\n" + pickle.dumps(canaries, 5)


def _open_sealed(
    con: duckdb.DuckDBPyConnection, provider: KeyProvider, stored_as: str
) -> tuple[_EarlierState, bytes] | None:
    """The sealed set of the state ``stored_as``, opened: the state it was made from (without
    its path) and the pickled set; None when there is none, or when it fails authentication
    (logged, without content)."""
    try:
        value = read_entry(con, provider, SEALED_CANARIES, stored_as)
    except (InvalidCiphertext, KeyDestroyedError):
        _log.warning(
            "the sealed release canaries failed authentication (a changed blob or state, "
            "or a key that does not exist): loaded from the vault again and sealed anew"
        )
        return None
    if value is None or not value.startswith(_SEALED_HEADER):
        return None
    line, _, pickled = value[len(_SEALED_HEADER) :].partition(b"\n")
    return tuple(json.loads(line)), pickled


def _extended(
    con: duckdb.DuckDBPyConnection, provider: KeyProvider, state: _VaultState, stored_as: str
) -> CanarySet | None:
    """The set sealed for an earlier state of this vault, with the canaries of every resource
    written since added (:func:`add_canaries_written_after`), when the vault has only had rows
    appended since (:func:`_only_appended`) and the same code made it; None otherwise (and
    for a vault that was empty then). A batch ingested after the last seal decrypts its own
    resources, not every patient's (0.48 s of decryption at 1,000 patients, growing with them,
    up to the largest set sealed, ``MAX_SEALED_CANARY_BYTES``)."""
    before = entry_state(con, SEALED_CANARIES)
    if before is None or before == stored_as:  # none, or this state's, which failed to open
        return None
    opened = _open_sealed(con, provider, before)
    if opened is None:
        return None
    earlier, pickled = opened
    last_seq = earlier[1]
    if (
        last_seq is None
        or sealed_state((state[0], *earlier)) != before
        or not _only_appended(con, earlier, state)
    ):
        return None
    canaries: CanarySet = pickle.loads(pickled)  # authenticated above: sealed here
    read = add_canaries_written_after(canaries, con, provider, last_seq)
    _log.info("release canaries: the sealed set extended with %d records written since", read)
    return canaries


def _only_appended(
    con: duckdb.DuckDBPyConnection, earlier: _EarlierState, state: _VaultState
) -> bool:
    """Whether the vault of ``state`` is the one of ``earlier`` with rows appended: the same
    rows up to its highest ingest position (none changed or deleted: an erasure, a batch taken
    back), rows after it, the same quarantined records and the same keys."""
    rows, last_seq, digest, *quarantined_and_keys = earlier
    now_last = state[2]
    if last_seq is None or now_last is None or now_last <= last_seq:
        return False
    if tuple(quarantined_and_keys) != state[4:]:
        return False
    found = con.execute(_VAULT_ROWS.format(where="WHERE ingest_seq <= ?"), [last_seq]).fetchone()
    if found is None:
        return False
    count, _, sums = found
    return (int(count), None if sums is None else int(sums)) == (rows, digest)


class ReleaseCanaryCache:
    """The release canaries, decrypted once per vault state rather than once per released table
    (every view, the feature tables and the online store are scanned against them), and, asked
    with ``sealed``, kept between run processes in the warehouse, compiled and sealed
    (:mod:`vault.sealed_cache`): a release run started after its batch's run takes the set that
    run made instead of decrypting every patient again, and a batch's run takes the set sealed
    before its batch was ingested and adds that batch's resources to it (:func:`_extended`).

    An entry is reused only while :func:`vault_state` is unchanged, so a newly ingested batch,
    an erasure or other keys load them afresh. Canaries are PHI: one entry at most in memory,
    dropped before its replacement is loaded; the sealed one is bound to its state
    (:func:`sealed_state`) and deleted by every erasure. It is unpickled only once AES-GCM
    has authenticated it under the vault's shared data key, which only the key provider
    unwraps: a blob not sealed by the platform is never unpickled. One that fails
    authentication is logged (no content) and made again from the vault.

    Within one run (``run_id``) the vault cannot change: the run holds the warehouse's one
    writable connection from its first step to its end (DuckDB locks the file against every
    other process) and no release step writes the vault. A later step of the run that loaded
    the entry takes it without reading the vault's state again (a scan of every vault row's
    key, position and MAC: 20-30 ms, three times a release run)."""

    def __init__(
        self,
        load: Callable[[duckdb.DuckDBPyConnection, KeyProvider], CanarySet] = release_canaries,
    ) -> None:
        self._load = load
        self._lock = threading.RLock()
        self._state: _VaultState | None = None
        self._canaries: CanarySet | None = None
        self._run_id: str | None = None

    def get(
        self,
        con: duckdb.DuckDBPyConnection,
        provider: KeyProvider,
        run_id: str | None = None,
        *,
        sealed: bool = True,
    ) -> CanarySet:
        """The canaries of the vault as ``con`` sees it; ``sealed``: whether a sealed set is
        taken and kept (``KeyProviderResource.seal_canaries``)."""
        with self._lock:
            if run_id is not None and run_id == self._run_id and self._canaries is not None:
                return self._canaries
        state = vault_state(con, provider)
        with self._lock:  # concurrent callers wait for one load instead of decrypting twice
            if state is None:
                return self._load(con, provider)
            if self._canaries is None or state != self._state:
                self.clear()
                self._canaries = self._sealed_or_loaded(con, provider, state, sealed)
                self._state = state
            self._run_id = run_id
            return self._canaries

    def _sealed_or_loaded(
        self,
        con: duckdb.DuckDBPyConnection,
        provider: KeyProvider,
        state: _VaultState,
        sealed: bool,
    ) -> CanarySet:
        """With ``sealed``, the sealed set of this state when the warehouse holds one, else the
        sealed set of an earlier state extended (:meth:`_extended`) or the set loaded from the
        vault, compiled, and sealed in its place; without, the set loaded."""
        if not sealed:
            return self._load(con, provider)
        stored_as = sealed_state(state)
        opened = _open_sealed(con, provider, stored_as)
        if opened is not None:
            canaries: CanarySet = pickle.loads(opened[1])  # authenticated: sealed here
            return canaries
        extended = _extended(con, provider, state, stored_as)
        canaries = extended if extended is not None else self._load(con, provider)
        canaries.compile()
        value = _sealed_value(state, canaries)
        if len(value) <= MAX_SEALED_CANARY_BYTES:
            write_entry(con, provider, SEALED_CANARIES, stored_as, value)
        else:  # each release run loads them from the vault, as without sealing
            _log.info("release canaries of %d MB: not sealed", len(value) >> 20)
        return canaries

    def clear(self) -> None:
        """Drop the set held in memory (the sealed one stays in the warehouse)."""
        with self._lock:
            self._state, self._canaries, self._run_id = None, None, None


_NOT_TEXT = ("TIMESTAMP", "DOUBLE", "BIGINT", "INTEGER", "BOOLEAN")


def _scanned_columns(
    cursor: duckdb.DuckDBPyConnection, table: str
) -> tuple[list[tuple[str, str]], set[str]]:
    """Each column the scan reads (every one that can hold text: timestamps are event times,
    not birth dates, and so is the date of one, :func:`_event_dates`), with the SQL that gives
    its value as the text scanned (:func:`_as_scanned_text`); and the names of all the table's
    columns."""
    described = cursor.execute(f"DESCRIBE {table}").fetchall()
    events = _event_dates([(str(name), str(type_)) for name, type_, *_ in described])
    scanned = [
        (name, _as_scanned_text(name, str(type_)))
        for name, type_, *_ in described
        if not str(type_).startswith(_NOT_TEXT) and name not in events
    ]
    return scanned, {name for name, *_ in described}


def _event_dates(columns: list[tuple[str, str]]) -> set[str]:
    """The DATE columns ``<x>_date`` of a table that has a timestamp column ``<x>``: the date
    of an event time the same row releases, as written in its own zone
    (``views.encounter.period_start_date`` of ``period_start``). It says no more than the
    timestamp, which is not searched; searched as a date, an encounter whose released date
    fell on the patient's own birth date (by the date shift, or a visit on the day of birth)
    withheld the whole view from publication."""
    timestamps = {name for name, type_ in columns if type_.startswith("TIMESTAMP")}
    return {
        name
        for name, type_ in columns
        if type_ == "DATE" and name.endswith("_date") and name.removesuffix("_date") in timestamps
    }


def _as_scanned_text(name: str, type_: str) -> str:
    """A column's value as text to scan. A DATE on 1 January is scanned as its year alone:
    that is what a date known to its year is written as once a view pads it to a DATE (the
    research release gives a Patient's birth date as the year of the middle of its age band),
    and it says no more than the year. Scanned as a whole date it matched the birth date of a
    patient born on 1 January whenever their band's year was their own, and withheld every
    view from publication for a value that discloses nothing beyond the band."""
    column = f'"{name}"'
    if type_ == "DATE":
        return (
            f"CASE WHEN month({column}) = 1 AND day({column}) = 1 "
            f"THEN strftime({column}, '%Y') ELSE CAST({column} AS VARCHAR) END"
        )
    return f"CAST({column} AS VARCHAR)"


@contextlib.contextmanager
def _reader(
    con: duckdb.DuckDBPyConnection, in_transaction: bool
) -> Iterator[duckdb.DuckDBPyConnection]:
    """``con`` itself (its open transaction's rows) or a cursor of its own, closed after."""
    if in_transaction:
        yield con
        return
    cursor = con.cursor()
    try:
        yield cursor
    finally:
        cursor.close()


def _scan_value(name: str, value: Any) -> Any:
    # *_display columns hold terminology text: single name parts are not counted there
    return {"system": "", "code": "", "display": value} if name.endswith("_display") else value


def scan_released_table(
    con: duckdb.DuckDBPyConnection,
    canaries: CanarySet,
    table: str,
    id_column: str = "id",
    patient_column: str | None = "patient_id",
    *,
    distinct_rows: bool = False,
    in_transaction: bool = False,
    where: str = "",
) -> LeakScanResult:
    """Scan every text-like column of a released table (views, features). Columns named
    ``*_display`` hold terminology text (single name parts are not counted there, as in a
    Coding's display); timestamps are event times, not birth dates, and are not searched.

    ``distinct_rows`` scans each distinct combination of the row name, the patient and the text
    columns once: exactly what a row-by-row scan finds, for tables whose rows repeat the same
    text (feature tables: a patient's codes on each of their rows).

    ``in_transaction`` reads through ``con`` itself, which sees the rows of its open
    transaction (a table changed in place, not yet committed); a cursor would not. ``where``
    (trusted SQL) scans only the rows it selects."""
    with _reader(con, in_transaction) as cursor:
        scanned, names = _scanned_columns(cursor, table)
        columns = [name for name, _ in scanned]
        patient_expr = f'"{patient_column}"' if patient_column in names else "NULL"
        id_expr = f'"{id_column}"' if id_column in names else "NULL"
        select = ", ".join(text for _, text in scanned) or "NULL"
        distinct = "DISTINCT " if distinct_rows else ""
        condition = f" WHERE {where}" if where else ""
        cursor.execute(
            f"SELECT {distinct}{id_expr}, {patient_expr}, {select} FROM {table}{condition}"
        )

        def rows() -> Any:
            while chunk := cursor.fetchmany(5_000):
                for row_id, patient, *values in chunk:
                    value = [
                        _scan_value(name, v)
                        for name, v in zip(columns, values, strict=False)
                        if v is not None
                    ]
                    yield str(row_id), value, patient

        return scan_rows(canaries, rows())


def scan_column_values(
    con: duckdb.DuckDBPyConnection,
    canaries: CanarySet,
    table: str,
    skip_columns: tuple[str, ...] = ("id", "patient_id"),
    *,
    in_transaction: bool = False,
) -> LeakScanResult:
    """Scan each distinct value of every text-like column of ``table`` once, without its
    patient: names, identifiers, phones, emails and addresses of any patient are found wherever
    they stand; a patient's own birth date (searched only in that patient's rows) is not.
    ``skip_columns`` are the platform's own pseudonyms (keyed digests, never input text). A
    hit is named ``<column>:distinct``, never by the value. ``in_transaction`` as in
    :func:`scan_released_table`."""
    with _reader(con, in_transaction) as cursor:
        columns = [(c, t) for c, t in _scanned_columns(cursor, table)[0] if c not in skip_columns]
        if not columns:
            return LeakScanResult(canaries=len(canaries))
        # one statement for every column: (column name, distinct value), nulls left out
        as_text = ", ".join(f'{text} AS "{name}"' for name, text in columns)
        cursor.execute(
            f"SELECT DISTINCT column_name, value FROM (UNPIVOT (SELECT {as_text} FROM {table}) "
            "ON COLUMNS(*) INTO NAME column_name VALUE value)"
        )

        def rows() -> Any:
            while chunk := cursor.fetchmany(5_000):
                for name, value in chunk:
                    yield f"{name}:distinct", [_scan_value(name, value)], None

        return scan_rows(canaries, rows())


def merged_scans(*results: LeakScanResult) -> LeakScanResult:
    """One result of several scans over parts of a table, with the same canaries."""
    merged = LeakScanResult(canaries=max((r.canaries for r in results), default=0))
    for result in results:
        merged.scanned_rows += result.scanned_rows
        merged.hits.extend(result.hits)
    return merged


def scan_released_batch(
    con: duckdb.DuckDBPyConnection,
    provider: KeyProvider,
    batch_id: str,
    table: str = "deid_resources",
    canaries: CanarySet | None = None,
) -> LeakScanResult:
    """The batch's rows of ``table`` (the release, or the staging table a batch is written to
    before it is published) scanned against the canaries of the patients the batch touches
    (``canaries``, when the caller has loaded them already)."""
    if canaries is None:
        canaries = batch_canaries(con, provider, batch_id)
    cursor = con.cursor()
    cursor.execute(
        f"SELECT id, resource, patient_id FROM {checked_table(table)} WHERE batch_id = ?",
        [batch_id],
    )

    def rows() -> Any:
        while chunk := cursor.fetchmany(2_000):
            for row_id, resource, patient in chunk:
                yield row_id, orjson.loads(resource), patient

    try:
        return scan_rows(canaries, rows())
    finally:
        cursor.close()


def build_released_patients(
    con: duckdb.DuckDBPyConnection,
    k: int,
    as_of: date | None = None,
    *,
    max_withheld: float = DEFAULT_MAX_WITHHELD,
    canaries: CanarySet | Callable[[], CanarySet] | None = None,
) -> KAnonymousRelease:
    """``released_patients`` (one row per released patient: age band, sex, ZIP3, state, race,
    ethnicity), generalised over the whole release to k, with the patients still below k
    withheld and the Patient resources rewritten to match (see :mod:`deid.kanon`). With
    ``canaries``, the staged table is leak-scanned too and published only when clean; given as
    a function, it is called when the scan starts (the canaries can load meanwhile)."""
    check = None
    if canaries is not None:
        check = partial(_scan_staged_patients, canaries)
    return build_k_anonymous_release(con, k, as_of=as_of, max_withheld=max_withheld, check=check)


def _scan_staged_patients(
    canaries: CanarySet | Callable[[], CanarySet], con: duckdb.DuckDBPyConnection, staging: str
) -> LeakScanResult:
    """Every value of the staged table is a category (a race named White, a state): scanned
    as terminology text, where a surname that is also a category name is not a leak.

    The rows repeat a few combinations: each distinct combination is scanned once for every
    patient's identifiers. A patient's own birth date is searched in the rows of that patient
    whose values hold a run of four digits (every written form of a date holds its year); no
    other row can hold it. This finds exactly what a row-by-row scan finds."""
    table = checked_table(staging)
    columns = ", ".join(QUASI_IDENTIFIERS)
    as_text = " || ' ' || ".join(f"coalesce(CAST({c} AS VARCHAR), '')" for c in QUASI_IDENTIFIERS)

    def as_terminology(values: Any) -> list[dict[str, str]]:
        return [{"system": "", "code": "", "display": v} for v in values if v]

    combinations = con.execute(f"SELECT DISTINCT {columns} FROM {table}").fetchall()
    with_years = con.execute(
        f"SELECT patient_id, {columns} FROM {table} WHERE regexp_matches({as_text}, '[0-9]{{4}}')"
    ).fetchall()
    distinct = (("released_patients:distinct", as_terminology(v)) for v in combinations)
    own_births = ((pid, as_terminology(v), pid) for pid, *v in with_years)
    if not isinstance(canaries, CanarySet):
        canaries = canaries()
    return merged_scans(
        scan_rows(canaries, distinct), scan_rows(canaries.birth_dates_only(), own_births)
    )


def release_version(con: duckdb.DuckDBPyConnection) -> str:
    """A version of the de-identified resources as they are now: their count and an
    order-independent digest of their content (pseudonymous ids and released JSON only)."""
    ((count, digest),) = con.execute(
        f"SELECT count(*), coalesce({multiset_digest_sql('hash(resource_type, id, resource)')}, 0) "
        "FROM deid_resources"
    ).fetchall()
    return f"{int(count)}-{int(digest):016x}"


def _count_by(con: duckdb.DuckDBPyConnection, table: str, column: str) -> dict[Any, int]:
    """Rows of ``table`` (a trusted name) by ``column``; none when there is no table yet."""
    if not has_table(con, table):
        return {}
    rows = con.execute(f"SELECT {column}, count(*) FROM {table} GROUP BY 1 ORDER BY 1")
    return {k: int(v) for k, v in rows.fetchall()}


def release_totals(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """The whole release after a batch: resources released (by type) and withheld (by reason);
    none before a first batch is published (its leak scan failed: no table yet)."""
    by_type = _count_by(con, "deid_resources", "resource_type")
    withheld = _count_by(con, "deid_errors", "reason_code")
    return {
        "released": sum(by_type.values()),
        "released_by_type": by_type,
        "withheld": withheld,
    }
