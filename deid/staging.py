"""Stage, scan, then publish one batch of ``deid_resources``.

The batch is de-identified into staging tables of its own, the PHI leak scan runs over the
staged rows, and only when it passes are they swapped into ``deid_resources`` and
``deid_errors`` (the batch's previous rows replaced) in one transaction. A failed scan drops the
staging tables: the previous release of the batch stays as it was and nothing of the failed one
is ever in a released table.

The batch's Patient resources go in without their quasi-identifiers, which are kept in
``release_quasi_identifiers``: the release-wide k-anonymity step
(:func:`deid.kanon.build_k_anonymous_release`) writes them back generalised.

``deid_batches`` is the ledger of published batches, written in the same transaction as the
swap: which state of the vault batch (``vault.warehouse.BATCH_DIGEST_SQL``) was de-identified,
a digest of everything else the rows depend on but the day (:func:`settings_digest`: the policy,
the release terminology, the FHIR base), and the first day on which its rows would come out
otherwise (``stable_until``: the new year a date of it crosses the age limit on, or the next one
for a birth date over the limit; :class:`deid.methods.DayHorizon`). A batch whose row matches
both digests now, the day before that one, needs no second pass (:func:`deidentified_batches`);
one past it needs its de-identification alone, from the vault (:func:`day_changed_batches`). A
failed scan removes the batch's row. The ledger holds batch ids, digests and that day, always a
1 January (the age limit counts calendar years: a year, never a birthday), never a patient's
id.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from deid.kanon import QUASI_DDL, QUASI_TABLE, generalised_patient, record_quasi_identifiers
from deid.leakscan import SCAN_RULES, CanarySet, LeakScanResult
from deid.methods import today_utc
from deid.policy import Policy
from deid.release import (
    DEID_ERRORS_DDL,
    DeidReport,
    batch_canaries,
    batch_key_hits,
    deidentify_batch,
    erased_batch_key_kinds,
    release_canaries,
    scan_released_batch,
)
from deid.released_table import DEID_DDL, ensure_resource_digests, resource_digest_sql
from deid.terminology import UPPER_CASE_SYSTEMS, Terminology
from deid.workers import INGEST_RESOLVED_KINDS
from vault.catalog import has_table
from vault.ingest import FHIR_BASE_ENV, criteria_holders_sql
from vault.keys import KeyProvider
from vault.warehouse import BATCH_DIGEST_SQL, NEWEST_VERSION_FIRST

LEDGER_TABLE = "deid_batches"
LEDGER_DDL = f"""
    CREATE TABLE IF NOT EXISTS {LEDGER_TABLE} (
        batch_id VARCHAR PRIMARY KEY,
        vault_digest UBIGINT NOT NULL,
        settings VARCHAR NOT NULL,
        published_at TIMESTAMPTZ NOT NULL,
        stable_until DATE
    )"""
# added to ledgers created before it (their rows, under older settings, are current on no day)
LEDGER_MIGRATION = f"ALTER TABLE {LEDGER_TABLE} ADD COLUMN IF NOT EXISTS stable_until DATE"


def _migrate_ledger(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(LEDGER_DDL)
    con.execute(LEDGER_MIGRATION)


# What each published batch's conditional references resolved to when it was de-identified:
# the criteria key and a digest of the one resource holding it (NULL: none or several did). A
# later batch can add a holder (or an erasure remove one), which changes what the same
# references name. A digest, not the holder's key: an erased holder's key stays nowhere.
TARGETS_TABLE = "deid_conditional_targets"
TARGETS_DDL = f"""
    CREATE TABLE IF NOT EXISTS {TARGETS_TABLE} (
        batch_id VARCHAR NOT NULL,
        criteria_key VARCHAR NOT NULL,
        holder_digest UBIGINT
    )"""


@dataclass(frozen=True)
class BatchRelease:
    report: DeidReport
    scan: LeakScanResult
    published: bool
    # kinds of its patients' identifiers found in the batch key (deid.release.batch_key_hits)
    batch_key_hits: tuple[str, ...] = ()


def staging_tables(batch_id: str) -> tuple[str, str]:
    """Staging names of one batch (released, withheld): batch ids are not SQL identifiers,
    and two batches never share a name."""
    tag = hashlib.sha256(batch_id.encode()).hexdigest()[:16]
    return f"deid_stage_{tag}", f"deid_stage_{tag}_errors"


def _strip_staged_patients(con: duckdb.DuckDBPyConnection, batch_id: str, stage: str) -> None:
    """Record the staged Patients' quasi-identifiers, then remove them from the staged rows."""
    rows = con.execute(
        f"SELECT id, resource FROM {stage} WHERE resource_type = 'Patient'"
    ).fetchall()
    patients = [(pid, orjson.loads(resource)) for pid, resource in rows]
    con.execute(f"DELETE FROM {QUASI_TABLE} WHERE batch_id = ?", [batch_id])
    record_quasi_identifiers(con, ((pid, batch_id, r) for pid, r in patients))
    stripped = pa.table(
        {
            "id": pa.array([pid for pid, _ in patients], pa.string()),
            "resource": pa.array(
                [orjson.dumps(generalised_patient(r, None, 0)).decode() for _, r in patients],
                pa.string(),
            ),
        }
    )
    con.register("stripped_patients", stripped)
    try:
        con.execute(
            f"UPDATE {stage} SET resource = s.resource::JSON, "
            f"digest = {resource_digest_sql('s.resource')} FROM stripped_patients s "
            f"WHERE {stage}.resource_type = 'Patient' AND {stage}.id = s.id"
        )
    finally:
        con.unregister("stripped_patients")


def settings_digest(policy: Policy, terminology: Terminology | None = None) -> str:
    """A digest of what a batch's de-identified rows depend on besides its vault records and
    the day (which the ledger's ``stable_until`` follows, per batch): the policy (name and
    document), the displays
    the release may carry, the FHIR base that makes references local, and the rule that picks
    a resource's newest version among those the vault holds (the batch releases the resources
    whose newest version it wrote, and its swap drops other batches' rows of them), and the
    rule that reads a code written in another case as its required binding's code, the code
    systems whose codes are released upper-cased, the ASCII-only code syntax, the kinds of
    reference whose targets come from ingest's resolution, and what the leak scan that gates
    the batch finds."""
    displays = sorted(
        [system, code, display]
        for (system, code), display in (terminology or Terminology()).displays.items()
    )
    document = {
        "policy": policy.name,
        "source": policy.source,
        # the day is no part of the digest: each batch records the first day its rows would
        # come out otherwise (stable_until), and only a batch past it is de-identified again
        # (from the vault, not ingested again); batches released before recorded none, and are
        # de-identified again by the next run
        "day": "stable_until_per_batch",
        # the age limit counts calendar years (deid.methods.is_year_over_age_limit): a date is
        # over it from 1 January of the year of its 90th anniversary. Batches released before
        # kept a birth date of that year as a shifted full date (or, under safe_harbor, a date
        # of that year as its year) until the anniversary itself, and are de-identified again
        # by the next run
        "age_limit": "calendar_years",
        "displays": displays,
        "fhir_base": os.environ.get(FHIR_BASE_ENV),
        "newest_version": NEWEST_VERSION_FIRST,
        # a batch's swap drops the rows of other batches it supersedes (_drop_superseded):
        # warehouses published before hold older versions beside newer ones, and their
        # batches are de-identified again, in order, by the next `ehr run`
        "superseded_rows": "dropped",
        # a code differing from its required binding's code in case alone is released as that
        # code (deid.terminology.binding_code): batches released before withheld it (a
        # Consent's `Deny`, an opt-out lost), and are de-identified again by the next `ehr run`
        "binding_case": "normalised",
        # an ICD-10 or ICD-10-CM code written in lower case is released upper-cased
        # (deid.terminology.system_code): batches released before withheld it (`i50.9`, a
        # diagnosis lost), and are de-identified again by the next `ehr run`
        "upper_case_systems": sorted(UPPER_CASE_SYSTEMS),
        # codes are read in ASCII only (deid.terminology.CODE_SYNTAX): batches released before
        # may hold a "code" in other scripts' digits (an SSN in full-width digits), and are
        # de-identified again by the next `ehr run`
        # ... and whole: a code followed by a line break was released with it (``$`` matched
        # before it); a UCUM unit in UCUM's own syntax (``%``, ``mm[Hg]``, ``/min``,
        # ``{beats}/min``) is released, where it was withheld
        "code_syntax": "ascii_whole_ucum",
        # the release takes the targets of these references from ingest's resolution
        # (deid.workers.INGEST_RESOLVED_KINDS): batches released before dropped an absolute
        # reference naming a Bundle entry by its fullUrl (a request released with no patient),
        # and are de-identified again by the next `ehr run`
        "ingest_resolved": list(INGEST_RESOLVED_KINDS),
        # an age of 90 or more is capped in a FHIR Age in any unit and in an age observation's
        # integer value (deid.allowlist._cap_age, _scalar): batches released before hold such
        # ages as written (onsetAge 97 "years"), and are de-identified again by the next run;
        # a unit written in words is read as the unit it names (97 "months" is no 90 years);
        # an observation's component coded as an age is capped as an age observation is;
        # an age in days, weeks, hours or minutes is read with the fewest days 90 years span
        # (32,872 days, a 90th birthday, was 89.9986 years), and an observation coded 30972-4
        # or by a SNOMED CT age code is an age observation: batches released before hold such ages
        # as written, and are de-identified again by the next run; a date over the age limit
        # in an observation coded as a birth date or an age is a birth date (the year of 90);
        # every UCUM time unit is read as one (a_j, a_g, a_t, mo_s, mo_j, mo_g, s, and a unit
        # with annotations: a{age}), and so is one in words under UCUM's system (yr, years,
        # {yr}):
        # batches released before hold 93 a_j and 95 yr as written; an age or
        # birth-date code is read under any system or none (an age of 95 coded 30525-0
        # without a system was released as written); years old (yo) is read as years: 95 YO
        # was released as written
        "age_cap": "age_typed_and_integer_units_in_words_components_fewest_days_more_codes_births"
        "_every_ucum_time_unit_codes_under_any_system_words_under_ucum_annotations_years_old",
        # under the year date rule (safe_harbor) an age is released in whole years
        # (deid.allowlist._age_in_whole_years): batches released before hold ages in days, weeks
        # or months, which with their events' years narrow a birth date to a day, and are
        # de-identified again by the next run; an age whose resource's latest year puts the
        # birth 90 or more years ago (85 in 2015) is withheld (_tells_age_over_limit), under
        # the shift rule (research) too, which makes such a birth date the year of 90
        # a date over the age limit that is no birth date is withheld under the shift
        # rule too (deid.allowlist._date): batches released before hold it shifted
        "age_in_years": "year_rule_birth_over_89_withheld_both_rules_old_dates_withheld",
        # the dates of a resource of no patient are withheld under the per-patient shift
        # (deid.engine, ReleaseContext.shift_days): batches released before hold them shifted
        # by an offset of their own, which gives the patient's back
        "unfiled_dates": "withheld",
        # what each batch's conditional references resolved to is recorded, and a batch whose
        # references resolve otherwise since is de-identified again (_unsettle_changed_targets):
        # batches released before recorded nothing, and are de-identified again by the next run
        "conditional_targets": "recorded",
        # a ZIP of four digits is read as a five-digit ZIP whose leading zero was lost
        # (deid.methods.redact_zip_partially): batches released before hold its first four
        # digits (2139 as 2130, 6390 in the restricted area 063 as written), and are
        # de-identified again by the next run
        "zip_leading_zero": "restored",
        # a modifierExtension off the allow-list on an element the release keeps (a dosage, a
        # Consent's provision, a contained Medication) withholds the resource
        # (deid.allowlist.released_modifier_urls): batches released before hold such resources
        # with the modifier dropped, and are de-identified again by the next run
        "modifier_extensions": "top_and_released_elements",
        # a record whose released values name a person known only inside it (a Patient, a
        # RelatedPerson or a Person it contains, a patient reference by identifier or display
        # alone, any other reference by identifier alone) is withheld (deid.engine,
        # contained_person_named): batches released before hold such records, and are
        # de-identified again by the next run
        "contained_people": "named_withheld_persons_identifier_references",
        # the leak scan finds a birth date written 19-FEB-1946, 19FEB1946 or DOB19460219 and an
        # address written 709-Michele-Prairie (deid.leakscan.SCAN_RULES): batches published
        # before were scanned without them, and are de-identified and scanned again by the next
        # run, which fails (naming the leak scan) where such a value was released
        "leak_scan": list(SCAN_RULES),
        # a state is released in its own forms only (deid.terminology.us_state_code): dots as
        # abbreviation dots, 64 characters at most, and a country in 96 at most
        # (country_code); each as its code (USPS, ISO 3166-1 alpha-2): batches released before
        # hold them as written, and are de-identified again by the next run
        "state_forms": "abbreviation_dots_64_chars_country_96_chars_dotted_codes_as_codes",
        # a country name in either Unicode form, or with accents the database does not write
        # (deid.terminology.country_code): batches released before withheld it
        "country_forms": "nfc_and_unaccented",
        # a shifted date-time is released at midnight UTC, its zone dropped
        # (deid.methods.shift_date): batches released before kept the zone, whose summer-time
        # offset narrowed each patient's date shift, and are de-identified again by the next run
        "shifted_time_zone": "utc",
    }
    return hashlib.sha256(orjson.dumps(document, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _forget_published(con: duckdb.DuckDBPyConnection, batch_id: str) -> None:
    _migrate_ledger(con)
    con.execute(f"DELETE FROM {LEDGER_TABLE} WHERE batch_id = ?", [batch_id])


def _record_published(
    con: duckdb.DuckDBPyConnection, batch_id: str, settings: str, stable_until: str | None
) -> None:
    """The batch's ledger row: the vault state and settings it was de-identified from, and the
    first day its rows would come out otherwise (None: on no day)."""
    _forget_published(con, batch_id)
    if has_table(con, "batches"):  # a release without its vault ledger (tests of de-identification)
        con.execute(
            f"INSERT INTO {LEDGER_TABLE} (batch_id, vault_digest, settings, published_at, "
            f"stable_until) SELECT batch_id, {BATCH_DIGEST_SQL}, ?, now(), ?::DATE "
            "FROM batches WHERE batch_id = ? AND ingested_at IS NOT NULL",
            [settings, stable_until, batch_id],
        )


def _published_rows(
    con: duckdb.DuckDBPyConnection,
    settings: str | None,
    today: date | None,
    current: bool | None,
) -> set[str]:
    """Batches published from the vault's current state of them (under ``settings``, when
    given) whose rows hold on ``today`` (``current``), or not any more (the day reaching their
    ``stable_until``), or either (``current`` None)."""
    if not has_table(con, "batches") or not has_table(con, LEDGER_TABLE):
        return set()  # no batch ingested, or none published yet
    columns = {
        name
        for (name,) in con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE schema_name = 'main' "
            "AND table_name = ?",
            [LEDGER_TABLE],
        ).fetchall()
    }
    # a ledger written before the column (read only: not migrated yet) follows no day
    until = "d.stable_until" if "stable_until" in columns else "NULL::DATE"
    holds = f"({until} IS NULL OR {until} > $today)"
    parameters: dict[str, object] = {"settings": settings}
    if current is not None:  # DuckDB refuses a named parameter the statement does not use
        parameters["today"] = today or today_utc()
    rows = con.execute(
        f"SELECT d.batch_id FROM {LEDGER_TABLE} d JOIN batches b USING (batch_id) "
        f"WHERE b.ingested_at IS NOT NULL AND d.vault_digest = {BATCH_DIGEST_SQL} "
        "AND (d.settings = $settings OR $settings IS NULL) AND "
        + {True: holds, False: f"NOT {holds}", None: "TRUE"}[current],
        parameters,
    ).fetchall()
    return {str(batch_id) for (batch_id,) in rows}


def deidentified_batches(
    con: duckdb.DuckDBPyConnection, settings: str | None = None, today: date | None = None
) -> set[str]:
    """Batches published from the vault's current state of them (under ``settings``, when
    given) whose rows hold on ``today`` (by default today in UTC): nothing for a second pass to
    change. The one rule ``ehr run`` and the landing sensor judge a batch done by."""
    return _published_rows(con, settings, today, current=True)


def day_changed_batches(
    con: duckdb.DuckDBPyConnection, settings: str | None = None, today: date | None = None
) -> set[str]:
    """Batches published from the vault's current state of them (under ``settings``, when
    given) whose rows ``today`` changes (a date of theirs crossed the age limit since, or a
    new year came): their de-identification alone, from the vault, brings them up to date;
    their ingest holds (it never depends on the day)."""
    return _published_rows(con, settings, today, current=False)


def outdated_batches(
    con: duckdb.DuckDBPyConnection, settings: str | None = None, today: date | None = None
) -> set[str]:
    """Batches published from the vault's current state of them whose rows are out of date:
    published under settings other than ``settings`` (an earlier version of the platform,
    whose leak scan or release rules differ, or another profile), or changed by ``today``
    (:func:`day_changed_batches`). Their de-identification alone, from the vault, brings them
    up to date: their ingest holds."""
    released = _published_rows(con, None, today, current=None)
    return released - _published_rows(con, settings, today, current=True)


def _drop_superseded(con: duckdb.DuckDBPyConnection, batch_id: str, stage: str) -> None:
    """Another batch's released rows of the resources this batch releases: a batch releases
    a resource only when it wrote its newest version, so a row of it published by an earlier
    batch is an older version, and the release holds each resource once, newest (within the
    caller's transaction)."""
    con.execute(
        f"DELETE FROM deid_resources d WHERE d.batch_id <> ? AND EXISTS (SELECT 1 FROM {stage} "
        "s WHERE s.resource_type = d.resource_type AND s.id = d.id)",
        [batch_id],
    )


def _drop_erased(con: duckdb.DuckDBPyConnection) -> None:
    """Released rows of a patient or resource tombstoned since they were published: an ingest
    that refused a Patient as an erased person (her Patient under a new id, with one of her
    identifiers) erased from the vault what earlier batches had stored for that id
    (:func:`vault.lifecycle.erase_earlier_compartments`), and the release must not keep
    what an earlier batch published of it (within the caller's transaction)."""
    if not has_table(con, "erased_subjects"):
        return  # a release without its vault (tests of de-identification)
    con.execute(
        "DELETE FROM deid_resources WHERE patient_id IN (SELECT subject_key FROM "
        "erased_subjects WHERE kind = 'patient') OR id IN (SELECT subject_key FROM "
        "erased_subjects WHERE kind = 'resource')"
    )


def _unsettle_older_holders(con: duckdb.DuckDBPyConnection, batch_id: str, stage: str) -> None:
    """Batches holding an older version of a resource this batch released before and releases
    no more (its export, ingested again, dropped the resource): their released row of it was
    dropped when this batch released a newer one (:func:`_drop_superseded`), so they are
    taken out of the ledger and de-identified again by the next run, which releases the
    version the vault now holds as newest (within the caller's transaction)."""
    if not has_table(con, "phi_vault"):
        return
    con.execute(
        f"""
        DELETE FROM {LEDGER_TABLE} WHERE batch_id IN (
            SELECT DISTINCT v.batch_id FROM phi_vault v
            WHERE v.batch_id <> $batch AND v.resource_key IN (
                SELECT d.id FROM deid_resources d WHERE d.batch_id = $batch
                AND NOT EXISTS (
                    SELECT 1 FROM {stage} s WHERE s.resource_type = d.resource_type
                    AND s.id = d.id)))
        """,
        {"batch": batch_id},
    )


def _record_conditional_targets(con: duckdb.DuckDBPyConnection, batch_id: str) -> None:
    """The batch's conditional references as they resolve now, as its release wrote them
    (``deid.release._stage_reference_targets``; within the caller's transaction)."""
    con.execute(f"DELETE FROM {TARGETS_TABLE} WHERE batch_id = ?", [batch_id])
    if not has_table(con, "resource_references"):
        return
    referenced = (
        "SELECT target_key FROM resource_references WHERE batch_id = $b AND kind = 'conditional'"
    )
    con.execute(
        f"""
        INSERT INTO {TARGETS_TABLE}
        SELECT DISTINCT $b, r.target_key, hash(h.resource_key)
        FROM resource_references r
        LEFT JOIN ({criteria_holders_sql(referenced)}) h ON h.criteria_key = r.target_key
        WHERE r.batch_id = $b AND r.kind = 'conditional'
        """,
        {"b": batch_id},
    )


def _unsettle_changed_targets(con: duckdb.DuckDBPyConnection, batch_id: str) -> None:
    """Other batches whose conditional references no longer resolve as their release wrote
    them (a batch added a second holder of an identifier, or the first one, or an erasure
    removed one): taken out of the ledger and de-identified again by the next run, so that a
    batch's release does not depend on the order the batches came in (within the caller's
    transaction)."""
    holders = criteria_holders_sql(f"SELECT criteria_key FROM {TARGETS_TABLE} WHERE batch_id <> $b")
    con.execute(
        f"""
        DELETE FROM {LEDGER_TABLE} WHERE batch_id IN (
            SELECT t.batch_id FROM {TARGETS_TABLE} t
            LEFT JOIN ({holders}) h ON h.criteria_key = t.criteria_key
            WHERE t.batch_id <> $b AND t.holder_digest IS DISTINCT FROM hash(h.resource_key))
        """,
        {"b": batch_id},
    )


def refiled_batches(con: duckdb.DuckDBPyConnection) -> set[str]:
    """Batches with a conditional (or logical) reference to a Patient that resolves otherwise
    than when they were released: ingest filed records under the one Patient such a reference
    named (``vault.ingest``), so these batches are ingested again, not only de-identified
    again. A batch whose changed references name other resources (a Practitioner's NPI a
    later cohort holds too) keeps its vault rows as they are: its release changes alone."""
    if not has_table(con, TARGETS_TABLE) or not has_table(con, "resource_references"):
        return set()
    holders = criteria_holders_sql(f"SELECT criteria_key FROM {TARGETS_TABLE}")
    rows = con.execute(
        f"""
        SELECT DISTINCT t.batch_id FROM {TARGETS_TABLE} t
        LEFT JOIN ({holders}) h ON h.criteria_key = t.criteria_key
        WHERE t.holder_digest IS DISTINCT FROM hash(h.resource_key) AND EXISTS (
            SELECT 1 FROM resource_references r WHERE r.batch_id = t.batch_id
            AND r.kind = 'conditional' AND r.target_type = 'Patient'
            AND r.target_key = t.criteria_key)
        """
    ).fetchall()
    return {str(batch_id) for (batch_id,) in rows}


def _swap_batch(
    con: duckdb.DuckDBPyConnection,
    batch_id: str,
    stage: str,
    errors: str,
    settings: str,
    stable_until: str | None = None,
) -> None:
    """Replace the batch's released and withheld rows with the staged ones, and record it in
    the ledger, atomically."""
    con.execute(DEID_DDL)
    ensure_resource_digests(con)
    con.execute(DEID_ERRORS_DDL)
    con.execute(QUASI_DDL)
    _migrate_ledger(con)
    con.execute(TARGETS_DDL)
    con.execute("BEGIN TRANSACTION")
    try:
        _strip_staged_patients(con, batch_id, stage)
        _unsettle_older_holders(con, batch_id, stage)
        _record_conditional_targets(con, batch_id)
        _unsettle_changed_targets(con, batch_id)
        for target, source in (("deid_resources", stage), ("deid_errors", errors)):
            con.execute(f"DELETE FROM {target} WHERE batch_id = ?", [batch_id])
            con.execute(f"INSERT INTO {target} BY NAME SELECT * FROM {source}")
        _drop_superseded(con, batch_id, stage)
        _drop_erased(con)
        _record_published(con, batch_id, settings, stable_until)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def publish_batch(
    con: duckdb.DuckDBPyConnection,
    provider: KeyProvider,
    batch_id: str,
    policy: Policy,
    *,
    today: date | None = None,
    canaries: Callable[[duckdb.DuckDBPyConnection], CanarySet] | None = None,
    **options: Any,
) -> BatchRelease:
    """De-identify a batch into staging, scan it against the canaries of every patient of the
    vault (``canaries(con)`` when given, which can hold them loaded already), and publish it
    only when the scan passes. ``options`` go to :func:`deid.release.deidentify_batch` as
    they are."""
    stage, errors = staging_tables(batch_id)
    today = today or today_utc()
    settings = settings_digest(policy, options.get("terminology"))
    try:
        report = deidentify_batch(
            con,
            provider,
            batch_id,
            policy,
            today=today,
            target=stage,
            errors_target=errors,
            **options,
        )
        # every patient's: a batch's rows can name a patient of another batch
        every = canaries(con) if canaries is not None else release_canaries(con, provider)
        scan = scan_released_batch(con, provider, batch_id, table=stage, canaries=every)
        if scan.passed:
            _swap_batch(con, batch_id, stage, errors, settings, report.stable_until)
        else:
            _forget_published(con, batch_id)
        key_hits = sorted(
            {
                *batch_key_hits(batch_canaries(con, provider, batch_id), batch_id),
                *erased_batch_key_kinds(con).get(batch_id, ()),
            }
        )
        return BatchRelease(report, scan, scan.passed, tuple(key_hits))
    finally:
        for table in (stage, errors):
            con.execute(f"DROP TABLE IF EXISTS {table}")
