"""The feature tables: each patient's feature values at every time one of them changes,
computed in DuckDB SQL.

Every table has ``patient_id`` (the release pseudonym), ``event_timestamp`` (TIMESTAMPTZ, on the
patient's shifted time line) and ``created`` (when the table was built). A row at time T holds the
exact value at every instant from T to the patient's next row, computed from data stamped <= T
only; so Feast's point-in-time join (latest row <= the entity timestamp) returns the value at any
entity timestamp, not only at the patient's events. Rows stop at the release's data end (the
latest time of a fact the tables count: an encounter that took place, a diagnosis not refuted, a
lab or prescription not entered in error or cancelled): what happens later is unknown to the
release.

Windows "last N days" are the half-open interval (T - N days, T]: an event at t counts from t
until t + N days, where a row drops it. Change points per table:

- ``patient_demographics``: the first data time and every later birthday up to 90 (age is whole
  years at T, capped at 90 at each T, from whatever birth date ``views.patient`` releases: a
  birth date generalised to a year gives ages from 1 January; a birth date withheld gives a null
  age). Before a patient's first data there is no row (and so no age).
- ``patient_utilisation`` (encounters that took place only, as the label:
  :func:`pipelines.features.cohort.encounter_held_sql`): the patient's first data, each encounter
  start and start + 30/180/365 days, each inpatient discharge + 1 microsecond (a stay is
  "prior" strictly after its discharge, so at the discharge itself the index stay is excluded)
  and + 30/180/365 days. An inpatient stay is one of class IMP, ACUTE or NONAC, as in the label
  (:func:`pipelines.features.cohort.inpatient_sql`). An ICU or ward segment of a
  hospitalisation in the data (``Encounter.partOf``) is no encounter or stay of its own, as in
  the label (:func:`pipelines.features.cohort.own_encounter_sql`).
- ``patient_comorbidities``: the patient's start plus each time a group is first known.
  A diagnosis is known from ``recordedDate``; only a condition without one falls back to its
  onset (an onset date is often back-dated: a 2009 onset recorded in 2024 was not known in 2009):
  ``onsetDateTime``, else ``onsetPeriod``, known once the period's end is over (its start when
  it has no end). An ``onsetAge`` alone dates nothing (it needs the birth date, which the
  release may generalise), so such a diagnosis never counts.
- ``patient_medications``: the patient's start, each prescription and prescription + 90/180 days.
- ``patient_labs_vitals``: each time a result becomes known and 365 days after.

A fact is known from the latest instant its date can stand for (the views' ``*_latest``
columns: a date without a time of day is over only at its end in the latest time zone; a month
or a year released under a date shift only once the patient's own period can be over on their
shifted time line, :func:`known_on_time_line_sql`), so an entity timestamp inside that day
never sees it. Encounter periods too.

A patient's rows start at their first data time (their start): from there counts are 0, not
null, and before it no table has a row. Rows at least every 365 days repeat unchanged values
(:func:`with_heartbeats`), so Feast reads with a 400-day TTL and never expires a known value.
Patients who opted out of research
(:func:`pipelines.features.cohort.opted_out_sql`) and patients absent from ``views.patient``
appear in no table.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import duckdb
import pyarrow as pa

from pipelines.features.cohort import (
    ADDED_VIEW_COLUMNS,
    encounter_held_sql,
    inpatient_sql,
    opted_out_sql,
    own_encounter_sql,
    sql_list,
    timestamptz_sql,
)
from pipelines.features.valuesets import (
    ICD10_SYSTEMS,
    ICD10CM,
    RXNORM,
    SNOMED,
    ValueSet,
    load_valuesets,
    of_kind,
    register_code_table,
    register_lookup_table,
)
from pipelines.publish import CheckOutcome, PublishCheck, publish_checked, publish_table

FEATURES_SCHEMA = "features"

# The view columns the feature SQL reads; a view table that does not exist yet reads as empty.
VIEW_COLUMNS: dict[str, dict[str, str]] = {
    "patient": {
        "id": "VARCHAR",
        "gender": "VARCHAR",
        "birth_date": "DATE",
        "race_code": "VARCHAR",
        "ethnicity_code": "VARCHAR",
    },
    "encounter": {
        "id": "VARCHAR",
        "patient_id": "VARCHAR",
        "part_of_id": "VARCHAR",
        "status": "VARCHAR",
        "class_code": "VARCHAR",
        "period_start": "TIMESTAMPTZ",
        "period_end": "TIMESTAMPTZ",
        "period_start_latest": "TIMESTAMPTZ",
        "period_end_latest": "TIMESTAMPTZ",
        # the dates as written, in the zone of each (views built before them read NULL)
        "period_start_date": "DATE",
        "period_end_date": "DATE",
    },
    "condition": {
        "patient_id": "VARCHAR",
        "verification_status": "VARCHAR",
        "onset_date_time": "TIMESTAMPTZ",
        "recorded_date": "TIMESTAMPTZ",
        "onset_date_time_latest": "TIMESTAMPTZ",
        # the first instant of the date onset_date_time_latest ends (views built before it: NULL)
        "onset_end_date_time": "TIMESTAMPTZ",
        "recorded_date_latest": "TIMESTAMPTZ",
        "code_system": "VARCHAR",
        "code": "VARCHAR",
    },
    "observation": {
        "patient_id": "VARCHAR",
        "status": "VARCHAR",
        "code": "VARCHAR",
        "component_code": "VARCHAR",
        "value_quantity": "DOUBLE",
        "value_unit": "VARCHAR",
        "effective_date_time": "TIMESTAMPTZ",
        "effective_date_time_latest": "TIMESTAMPTZ",
        "issued": "TIMESTAMPTZ",
    },
    "medication_request": {
        "patient_id": "VARCHAR",
        "status": "VARCHAR",
        "intent": "VARCHAR",
        "authored_on": "TIMESTAMPTZ",
        "authored_on_latest": "TIMESTAMPTZ",
        "medication_system": "VARCHAR",
        "medication_code": "VARCHAR",
        "medication_id": "VARCHAR",
    },
    "consent": {
        "patient_id": "VARCHAR",
        "status": "VARCHAR",
        "scope_code": "VARCHAR",
        "policy_rule_code": "VARCHAR",
        "provision_type": "VARCHAR",
        **ADDED_VIEW_COLUMNS["consent"],
    },
}

# The view of Medication resources: a request that names its drug by reference to one
# (``medication_request.medication_id``) has the drug's code there. It holds no patient, so it
# is read through ``src_medication_request`` only (see :func:`_resolve_medications`).
MEDICATION_VIEW = "medication"

# Which views each feature table reads (the Dagster assets depend on exactly these).
FEATURE_TABLES: dict[str, tuple[str, ...]] = {
    "patient_demographics": (
        "patient",
        "consent",
        "encounter",
        "condition",
        "observation",
        "medication_request",
    ),
    "patient_utilisation": ("patient", "consent", "encounter"),
    "patient_comorbidities": (
        "patient",
        "consent",
        "encounter",
        "condition",
        "observation",
        "medication_request",
    ),
    "patient_medications": (
        "patient",
        "consent",
        "encounter",
        "medication_request",
        MEDICATION_VIEW,
    ),
    "patient_labs_vitals": ("patient", "consent", "encounter", "observation"),
}

# Lab/vital measures: (code, is_component). Blood pressure comes as components of 85354-9
# (component_code set) or, from some sources, as standalone observations.
# HbA1c, eGFR and LDL come under several LOINC codes of one quantity (by method or equation:
# HPLC and electrophoresis; MDRD, CKD-EPI 2009 and 2021; direct and calculated LDL), and HbA1c
# also as a component of a diabetes panel.
LAB_MEASURES: dict[str, tuple[tuple[str, bool], ...]] = {
    "hba1c": tuple(
        (code, component) for code in ("4548-4", "17856-6", "4549-2") for component in (False, True)
    ),
    "glucose": (("2339-0", False), ("2345-7", False)),
    "creatinine": (("2160-0", False), ("38483-4", False)),
    "egfr": (
        ("33914-3", False),
        ("62238-1", False),
        ("98979-8", False),
        ("48642-3", False),
        ("48643-1", False),
        ("77147-7", False),
    ),
    "ldl": (("18262-6", False), ("2089-1", False), ("13457-7", False)),
    "bmi": (("39156-5", False),),
    "systolic_bp": (("8480-6", True), ("8480-6", False)),
    "diastolic_bp": (("8462-4", True), ("8462-4", False)),
    "heart_rate": (("8867-4", False),),
}

# The unit each measure's features are in (its first entry; the feature repo's ``unit`` tags
# name the same) and every UCUM code a result may state for it, with the factor that brings a
# value to that unit. Only the same quantity at another scale converts. A result in any other
# unit is left out of the features and counted (:func:`lab_unit_counts`): a molar unit under a
# mass LOINC code (a creatinine of 88 umol/L sent as 2160-0) or HbA1c in mmol/mol (IFCC) is not
# the quantity its code names, and averaged with the rest it gave a value never measured.
# Codes match whatever their case (``mg/dl`` is ``mg/dL``: no two codes of one measure differ
# in case only). A result stating no unit is read in the measure's unit, and counted too.
LAB_UNITS: dict[str, dict[str, float]] = {
    "hba1c": {"%": 1.0},
    "glucose": {"mg/dL": 1.0, "mg/L": 0.1, "g/L": 100.0},
    "creatinine": {"mg/dL": 1.0, "mg/L": 0.1},
    "egfr": {"mL/min/{1.73_m2}": 1.0, "mL/min/1.73m2": 1.0},
    "ldl": {"mg/dL": 1.0, "mg/L": 0.1, "g/L": 100.0},
    "bmi": {"kg/m2": 1.0},
    "systolic_bp": {"mm[Hg]": 1.0, "mmHg": 1.0},
    "diastolic_bp": {"mm[Hg]": 1.0, "mmHg": 1.0},
    "heart_rate": {"/min": 1.0, "{beats}/min": 1.0, "{beat}/min": 1.0},
}

# A prescription counts as active at T when authored <= T and either its status is still
# active/on-hold, or it was authored within the last ACTIVE_DAYS (a recent course, whatever
# its later status). Requests entered in error, cancelled or draft never count, nor do those
# whose intent is a proposal, a plan or an option (no order was given).
ACTIVE_DAYS = 90
RECENT_DAYS = 180
POLYPHARMACY_MIN = 5
AGE_CAP = 90
UTILISATION_WINDOWS = (30, 180, 365)
# Charlson categories a more severe one replaces (Quan: count only the severe one).
CHARLSON_HIERARCHY = {
    "charlson_diab": "charlson_diabwc",
    "charlson_canc": "charlson_metacanc",
    "charlson_mld": "charlson_msld",
}
_EXCLUDED_REQUEST_STATUS = "('entered-in-error', 'cancelled', 'draft')"
_NOT_AN_ORDER = "('proposal', 'plan', 'option')"


# What a fact must be to count: one rule per kind, read by its feature table and by the event
# times that set each patient's start and the data end (a refuted diagnosis or a lab entered in
# error, dated in the future by mistake, must not move the data end either).
def condition_counts_sql(alias: str) -> str:
    status = f"coalesce(lower({alias}.verification_status), '')"
    return f"{status} NOT IN ('refuted', 'entered-in-error')"


def observation_counts_sql(alias: str) -> str:
    return f"coalesce(lower({alias}.status), '') NOT IN ('entered-in-error', 'cancelled')"


def request_counts_sql(alias: str) -> str:
    # a proposal, a plan or an option is not a prescription: nobody was asked to take it
    status = f"lower(coalesce({alias}.status, '')) NOT IN {_EXCLUDED_REQUEST_STATUS}"
    return f"{status} AND coalesce(lower({alias}.intent), 'order') NOT IN {_NOT_AN_ORDER}"


# When a diagnosis became known: its recorded date; the onset only when nothing was recorded
# (``views.condition`` reads it from onsetDateTime, else onsetPeriod: the period's start as the
# value, its end, or its start when it has none, as the latest instant).
# Every time a fact is known from is the latest instant its value can stand for (the views'
# ``*_latest`` columns): a date without a time is known once that whole day is over wherever it
# was written, so an entity timestamp inside the day never sees what was recorded later that day.
CONDITION_KNOWN_AT = "coalesce(recorded_date_latest, onset_date_time_latest)"
# The earliest instant the same date can stand for (a date alone, its first instant in UTC)
CONDITION_DATED_FROM = "coalesce(recorded_date, onset_date_time)"
# When a result became known: when it was issued (made available, often hours or days after the
# sample), never before the measurement itself.
OBSERVATION_KNOWN_AT = (
    "greatest(effective_date_time_latest, coalesce(issued, effective_date_time_latest))"
)
OBSERVATION_DATED_FROM = "greatest(effective_date_time, coalesce(issued, effective_date_time))"
# "Prior" means strictly before T: a stay counts as prior from one microsecond after its
# discharge (the Parquet timestamps' resolution), so a row at the discharge excludes the stay.
AFTER = "INTERVAL 1 MICROSECOND"
# A date coarser than a day does not move along a patient's shifted time line as a day does:
# the research release moves a year-month with its 15th day and keeps a year as it is
# (docs/privacy.md), so the end of the month or year the patient's own date stands for, once
# shifted, can lie after the end of the period released: by up to 16 days for a month (the 15th
# of a 31-day month moved onto the last day of the month released) and by the whole shift for a
# year. Such a date is known from the end released plus that much (:func:`known_on_time_line_sql`).
MONTH_SHIFT_SLACK_DAYS = 16
LAB_WINDOW_DAYS = 365
# A row repeats a patient's unchanged values at least every HEARTBEAT_DAYS, so the Feast views
# can keep a TTL of FEAST_TTL_DAYS (feature_repo/features.py): a known value never expires, and
# the point-in-time join reads only a year of rows per entity instead of the whole history.
HEARTBEAT_DAYS = 365
FEAST_TTL_DAYS = 400


@dataclass(frozen=True)
class LabUnitCounts:
    """Per measure, the results left out for a unit :data:`LAB_UNITS` does not accept, and
    those that stated no unit (read in the measure's unit)."""

    unread: dict[str, int]
    without_unit: dict[str, int]


@dataclass(frozen=True)
class FeatureBuild:
    """Row counts and timing of one build; with checks, what each table's check said (a table
    whose check failed was not published, and its counts are those of the rows not published)."""

    rows: dict[str, int]
    patients: dict[str, int]
    opted_out: int
    seconds: float
    checks: dict[str, CheckOutcome] = field(default_factory=dict)
    # fact times left out of the data end: dated after everything the release can know
    dated_after_arrival: int = 0
    # lab and vital results by how their unit was read (see LAB_UNITS)
    lab_units: LabUnitCounts = field(default_factory=lambda: LabUnitCounts({}, {}))

    @property
    def unpublished(self) -> list[str]:
        return [name for name, check in self.checks.items() if not check.passed]


def prepare_sources(
    con: duckdb.DuckDBPyConnection,
    patients: str | None = None,
    data_end: datetime | None = None,
    known_by: datetime | None = None,
    shift_days: int = 0,
) -> None:
    """Temp views ``src_<view>`` over ``views.<view>`` (or an empty typed relation when the view
    has not been built), the opted-out and eligible patients, and every patient event time.
    ``shift_days``: the most the release moved a patient's dates (0: the views hold the dates
    as written), which a date coarser than a day is known later by
    (:func:`known_on_time_line_sql`).

    ``patients`` (a table with a ``patient_id`` column) restricts every source to those
    patients, and ``data_end`` then pins the release's data end (computed over every patient),
    so their rows come out exactly as in a build over everyone. Without it, the data end is
    the latest fact time, over the facts dated no later than ``known_by`` when it is given
    (:func:`pipelines.features.cohort.release_known_by`): a fact dated in the future of every
    export moves no one's rows. The data end is taken when the sources are prepared: a
    connection that changes the views prepares them again."""
    present = _built_view_columns(con)
    for view, columns in VIEW_COLUMNS.items():
        key = "id" if view == "patient" else "patient_id"
        only = f" WHERE {key} IN (SELECT patient_id FROM {patients})" if patients else ""
        if view in present:
            select = ", ".join(
                _source_column(view, c, t, present[view], shift_days) for c, t in columns.items()
            )
            body = f"SELECT {select} FROM views.{view}{only}"
        else:
            select = ", ".join(f'NULL::{t} AS "{c}"' for c, t in columns.items())
            body = f"SELECT {select} WHERE false"
        if view == "medication_request" and MEDICATION_VIEW in present:
            body = _resolve_medications(body)
        con.execute(f"CREATE OR REPLACE TEMP VIEW src_{view} AS {body}")
    _prepare_patients(con, data_end, known_by)


def _resolve_medications(requests: str) -> str:
    """``requests`` (the medication_request rows) with the code of the Medication resource a
    request names by reference when it has no code of its own (system and code from the same
    row). The code is part of the request's row, so a changed Medication changes the digest of
    every patient prescribed it (the incremental refresh computes them again)."""
    # one row per Medication id, whatever the view holds, so no request is counted twice
    return f"""
        SELECT r.* REPLACE (
            CASE WHEN r.medication_code IS NULL THEN d.code_system
                ELSE r.medication_system END AS medication_system,
            coalesce(r.medication_code, d.code) AS medication_code)
        FROM ({requests}) r
        LEFT JOIN (
            SELECT id, code_system::VARCHAR AS code_system, code::VARCHAR AS code
            FROM views.{MEDICATION_VIEW}
            QUALIFY row_number() OVER (PARTITION BY id ORDER BY code_system, code) = 1
        ) d ON d.id = r.medication_id
        """


def _built_view_columns(con: duckdb.DuckDBPyConnection) -> dict[str, set[str]]:
    """The columns of every table in schema ``views``, by table."""
    built: dict[str, set[str]] = {}
    for table, column in con.execute(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = 'views'"
    ).fetchall():
        built.setdefault(table, set()).add(column)
    return built


def _source_column(view: str, column: str, type_: str, built: set[str], shift_days: int) -> str:
    """One column of ``src_<view>``: the view's own, or NULL for a column of
    :data:`ADDED_VIEW_COLUMNS` the view was built without (any other missing column is an
    error, as it was). A ``*_latest`` column is the instant on the patient's time line
    (:func:`known_on_time_line_sql`)."""
    if column not in built and column in ADDED_VIEW_COLUMNS.get(view, {}):
        return f'NULL::{type_} AS "{column}"'
    value = LATEST_FIRST_INSTANT.get((view, column), column.removesuffix("_latest"))
    if column != value and value in VIEW_COLUMNS[view]:
        # a view built before its first-instant column: NULL, read as a year (the most slack)
        first = f'"{value}"::{type_}' if value in built else f"NULL::{type_}"
        known = known_on_time_line_sql(first, f'"{column}"::{type_}', shift_days)
        return f'{known} AS "{column}"'
    return f'"{column}"::{type_} AS "{column}"'


# The column holding the first instant of the date a ``*_latest`` column is the last instant of,
# where it is not the column of the same name without ``_latest``: a condition's onset value is
# the period's start, its latest instant the period's end's, and the span from a start to an end
# does not tell a day from a month or a year (:func:`known_on_time_line_sql`).
LATEST_FIRST_INSTANT = {("condition", "onset_date_time_latest"): "onset_end_date_time"}


def known_on_time_line_sql(value: str, latest: str, shift_days: int) -> str:
    """The last instant a view's released date can stand for on the patient's own time line,
    from its ``latest`` column (the last instant of the date as released; ``value`` the first
    instant of that same date, :data:`LATEST_FIRST_INSTANT`) when the release moved dates by up
    to ``shift_days`` either way: ``latest`` itself for an instant or a day (a day moves whole),
    later for a month or a year (:data:`MONTH_SHIFT_SLACK_DAYS`). A month or a year is told by
    its end, FHIRPath's ``highBoundary()``: 11:59:59.999 UTC on the first of a month (the end of
    the period at UTC-12), more than 48 hours after its first instant (a day's end lies 36 hours
    after it); a year spans more than 40 days. Without a first instant (a view built before the
    column) the date reads as a year: known later, never earlier.

    The span must be taken from the date's own first instant: taken from an onset period's
    start, a start the release moved past the end of the month released as the end (a day
    moves whole, a month with its 15th day) read the month as a day, and a start within 40
    days of a year released as the end read the year as a month, so the diagnosis counted up
    to the whole shift before the patient's own period was over."""
    if shift_days == 0:
        return latest
    month = min(shift_days, MONTH_SHIFT_SLACK_DAYS)
    span = f"date_diff('hour', {value}, {latest})"
    return (
        f"CASE WHEN {latest} - date_trunc('month', {latest}) <> INTERVAL '11:59:59.999' "
        f"OR {span} <= 48 THEN {latest} "
        f"WHEN {span} <= {40 * 24} THEN {latest} + to_days({month}) "
        f"ELSE {latest} + to_days({shift_days}) END"
    )


def feature_encounters_sql() -> str:
    """The encounters the feature tables count: those of eligible patients that took place and
    count on their own (:func:`pipelines.features.cohort.own_encounter_sql`: an ICU or ward
    segment of a hospitalisation in the data is no visit or stay of its own), each bound from
    the latest instant it can stand for, as every fact. A planned, cancelled or mistaken
    encounter is no visit, no stay and no data time (a planned one would move the data end into
    the future). A stay with an end and no start (FHIR allows it) is still a stay, as in the
    label: a prior stay from its discharge, though no visit in the windows counted from starts."""
    return f"""
        SELECT e.patient_id, e.class_code,
            e.period_start_latest AS period_start, e.period_end_latest AS period_end,
            -- the dates as released, in the zones they are written in, for the stay's length
            -- (a view built before those columns: the date of the value's first instant in UTC)
            coalesce(e.period_start_date, e.period_start::DATE) AS start_dated,
            coalesce(e.period_end_date, e.period_end::DATE) AS end_dated
        FROM src_encounter e SEMI JOIN feature_patients p ON p.patient_id = e.patient_id
        WHERE coalesce(e.period_start_latest, e.period_end_latest) IS NOT NULL
          AND {encounter_held_sql("e.status")}
          AND {own_encounter_sql("src_encounter", "e")}
        """


# the prepared sources' data end and the count of fact times left out of it (one row)
_TIME_BOUNDS = "feature_time_bounds"


def _prepare_patients(
    con: duckdb.DuckDBPyConnection, data_end: datetime | None, known_by: datetime | None
) -> None:
    """The eligible patients, their event times, start times and the release's data end."""
    con.execute(f"CREATE OR REPLACE TEMP VIEW feature_opted_out AS {opted_out_sql('src_consent')}")
    con.execute(
        """
        CREATE OR REPLACE TEMP VIEW feature_patients AS
        SELECT DISTINCT id AS patient_id FROM src_patient
        WHERE id IS NOT NULL AND id NOT IN (SELECT patient_id FROM feature_opted_out)
        """
    )
    con.execute(f"CREATE OR REPLACE TEMP VIEW feature_encounters AS {feature_encounters_sql()}")
    con.execute(
        f"""
        CREATE OR REPLACE TEMP VIEW feature_event_times AS
        SELECT t.patient_id, t.ts, coalesce(t.dated_from, t.ts) AS dated_from FROM (
            SELECT patient_id, period_start_latest AS ts, period_start AS dated_from
                FROM src_encounter WHERE {encounter_held_sql()}
            UNION ALL SELECT patient_id, period_end_latest, period_end FROM src_encounter
                WHERE {encounter_held_sql()}
            UNION ALL SELECT patient_id, {CONDITION_KNOWN_AT}, {CONDITION_DATED_FROM}
                FROM src_condition c WHERE {condition_counts_sql("c")}
            UNION ALL SELECT patient_id, {OBSERVATION_KNOWN_AT}, {OBSERVATION_DATED_FROM}
                FROM src_observation o WHERE {observation_counts_sql("o")}
            UNION ALL SELECT patient_id, authored_on_latest, authored_on
                FROM src_medication_request m WHERE {request_counts_sql("m")}
        ) t SEMI JOIN feature_patients p ON p.patient_id = t.patient_id
        WHERE t.ts IS NOT NULL
        """
    )
    # Fact times dated, even at their earliest, after everything the release can know
    known = f"dated_from > {timestamptz_sql(known_by)}" if known_by is not None else "false"
    con.execute(
        "CREATE OR REPLACE TEMP VIEW feature_dated_after_arrival AS "
        f"SELECT * FROM feature_event_times WHERE {known}"
    )
    # The release's data end: no row is written after it (later values are unknown). Taken
    # once, with the count of the times left out of it, in one pass over every fact time: as
    # a view, every statement that reads it would take it again.
    # A pinned data end reads no fact time (the count is then taken when asked for).
    # Never after ``known_by``: a fact dated before it can be known only later (a year alone
    # of the arrival's year, known from the year's end on the patient's line), and moved the
    # data end there, 13 months on, with every patient's latest row, the one the online store
    # serves (ages a year older, 30-day counts run down to 0); such a fact is in no row yet.
    if data_end is None:
        latest = f"max(ts) FILTER (WHERE NOT ({known}))"
        if known_by is not None:
            latest = f"least({latest}, {timestamptz_sql(known_by)})"  # least() skips a NULL
        bounds = (
            f"SELECT CASE WHEN count(*) FILTER (WHERE NOT ({known})) > 0 THEN {latest} END "
            f"AS data_end, count(*) FILTER (WHERE {known}) AS dated_after_arrival "
            "FROM feature_event_times"
        )
    else:
        bounds = (
            f"SELECT {timestamptz_sql(data_end)} AS data_end, NULL::BIGINT AS dated_after_arrival"
        )
    con.execute(f"CREATE OR REPLACE TEMP TABLE {_TIME_BOUNDS} AS {bounds}")
    con.execute(
        f"CREATE OR REPLACE TEMP VIEW feature_data_end AS SELECT data_end FROM {_TIME_BOUNDS}"
    )
    extend_rows_end(con, 0)
    # Where a patient's rows start (counts at 0): their first data. Rows from birth would add
    # a yearly heartbeat row per year of life before it (see with_heartbeats).
    con.execute(
        """
        CREATE OR REPLACE TEMP VIEW feature_starts AS
        SELECT patient_id, min(ts) AS ts FROM feature_event_times GROUP BY patient_id
        """
    )


def _frame(days: int) -> str:
    """A window frame over (T - days, T]: RANGE frames are closed, so one microsecond less."""
    return f"INTERVAL '{days - 1} days 23:59:59.999999' PRECEDING AND CURRENT ROW"


def _edge_rows(relation: str, days: tuple[int, ...], edges: bool) -> str:
    """Spine rows where a window of ``days`` drops an event of ``relation`` (none when
    ``edges`` is off: the events-only baseline the benchmark compares against)."""
    if not edges:
        return ""
    return "\n".join(
        f"UNION SELECT patient_id, ts + INTERVAL {d} DAY FROM {relation}" for d in days
    )


def extend_rows_end(con: duckdb.DuckDBPyConnection, days: int) -> None:
    """Compute rows up to ``days`` after the data end (``feature_rows_end``; 0, the data end
    itself, is what :func:`prepare_sources` sets). A row's values never depend on where the
    rows end, only whether it is written (its time at or before the end): so the rows of an
    end ``days`` later, cut at the data end, are the rows of the data end, and those after it
    say when a patient's rows next change as the data end moves (``pipelines.features.refresh``).
    """
    con.execute(
        "CREATE OR REPLACE TEMP VIEW feature_rows_end AS "
        f"SELECT data_end + to_days({int(days)}) AS rows_end FROM feature_data_end"
    )


def _before_data_end(alias: str = "s") -> str:
    return f"{alias}.ts <= (SELECT rows_end FROM feature_rows_end)"


def demographics_sql(created: datetime, edges: bool = True) -> str:
    """Age (whole years at T, capped at 90 at each T), sex, OMB race and ethnicity codes; a row
    at the first data time and at every birthday up to 90."""
    return f"""
    WITH firsts AS (
        SELECT patient_id, min(ts) AS ts FROM feature_event_times GROUP BY patient_id
    ),
    birthdays AS (
        -- birth + k years; a 29 February birth turns a year older on 1 March in other years
        SELECT p.id AS patient_id,
            CASE WHEN day(p.birth_date + to_years(k::INT)) <> day(p.birth_date)
                 THEN p.birth_date + to_years(k::INT) + INTERVAL 1 DAY
                 ELSE p.birth_date + to_years(k::INT) END::TIMESTAMPTZ AS ts
        FROM src_patient p SEMI JOIN feature_patients f ON f.patient_id = p.id,
            range(0, {AGE_CAP + 1 if edges else 0}) r(k)
        WHERE p.birth_date IS NOT NULL
    ),
    spine AS (
        SELECT s.patient_id, s.ts FROM (
            -- a patient's rows start at their first data: a birthday row per year of life
            -- before it would multiply the rows every point-in-time join reads
            SELECT b.patient_id, b.ts FROM birthdays b JOIN firsts f USING (patient_id)
            WHERE b.ts > f.ts
            UNION SELECT patient_id, ts FROM firsts
        ) s WHERE {_before_data_end()}
    ),
    aged AS (
        SELECT s.patient_id, s.ts, p.gender, p.race_code, p.ethnicity_code,
            year(s.ts::DATE) - year(p.birth_date)
              - CASE WHEN month(s.ts::DATE) * 100 + day(s.ts::DATE)
                          < month(p.birth_date) * 100 + day(p.birth_date) THEN 1 ELSE 0 END
              AS age
        FROM spine s JOIN src_patient p ON p.id = s.patient_id
    )
    SELECT patient_id, ts AS event_timestamp, {timestamptz_sql(created)} AS created,
        -- null before birth; the 90+ cap is applied at T, not at the release date
        CASE WHEN age >= 0 THEN least(age, {AGE_CAP}) END::BIGINT AS age_years,
        gender AS sex, race_code, ethnicity_code
    FROM aged
    ORDER BY patient_id, event_timestamp
    """


def _utilisation_items() -> str:
    """What the utilisation counts count: encounter starts (in the window from their start)
    and inpatient discharges (counted as prior from just after the discharge, whether or not
    the stay's start is known)."""
    return f"""
        SELECT patient_id, period_start AS ts, 1 AS n_enc, (class_code = 'EMER')::INT AS n_emer,
            0 AS n_stay
        FROM feature_encounters WHERE period_start IS NOT NULL
        UNION ALL
        SELECT patient_id, period_end + {AFTER}, 0, 0, 1
        FROM feature_encounters WHERE {inpatient_sql()} AND period_end IS NOT NULL
    """


def served_instant_sql(value: str) -> str:
    """A timestamp feature's value (``prior_discharge_at``, ``<lab>_measured_at``): ``value``
    at the whole second at or before it. Feast keeps a ``UnixTimestamp`` feature online as
    whole seconds since the epoch, so an instant with a fraction of a second (the end of a day
    a fact is dated to, 23:59:59.999 in the latest zone) was served online up to a second
    earlier than the offline tables gave it; whole seconds are the same in both stores."""
    return f"date_trunc('second', {value})"


def utilisation_sql(created: datetime, edges: bool = True) -> str:
    """Encounters and emergency visits started in the last 30/180/365 days, inpatient stays
    discharged in the 30/180/365 days before T (the stay discharged at T excluded), and the
    discharge time and length of the latest stay discharged before T (the longest of those
    discharged at that instant)."""
    windows = ",\n".join(
        f"w{d} AS (PARTITION BY patient_id ORDER BY ts RANGE BETWEEN {_frame(d)})"
        for d in UTILISATION_WINDOWS
    )
    counts = ",\n".join(
        f"coalesce(sum({col}) OVER w{d}, 0)::BIGINT AS {name}_{d}d"
        for d in UTILISATION_WINDOWS
        for col, name in (
            ("n_enc", "encounters"),
            ("n_emer", "emergency_visits"),
            ("n_stay", "prior_inpatient_stays"),
        )
    )
    names = ", ".join(
        f"snap.{name}_{d}d"
        for d in UTILISATION_WINDOWS
        for name in ("encounters", "emergency_visits", "prior_inpatient_stays")
    )
    drops = "\n".join(
        f"UNION SELECT patient_id, ts + INTERVAL {d} DAY FROM items"
        for d in (UTILISATION_WINDOWS if edges else ())
    )
    return f"""
    WITH items AS ({_utilisation_items()}),
    spine AS (
        SELECT s.patient_id, s.ts FROM (
            SELECT patient_id, ts FROM feature_starts
            UNION SELECT patient_id, ts FROM items
            {drops}
        ) s WHERE {_before_data_end()}
    ),
    ev AS (
        SELECT patient_id, ts, 0 AS n_enc, 0 AS n_emer, 0 AS n_stay, true AS is_spine FROM spine
        UNION ALL
        SELECT patient_id, ts, n_enc, n_emer, n_stay, false FROM items
    ),
    w AS (
        SELECT patient_id, ts, is_spine,
        {counts}
        FROM ev
        WINDOW {windows}
    ),
    stays AS (
        -- one row per discharge instant: of stays discharged at one instant (the research
        -- release dates both to a day) the longest counts; left to the ASOF join, the one met
        -- first in storage did, so the same records in another order gave another length
        SELECT patient_id, period_end,
            max(date_diff('day', start_dated, end_dated)) AS length_days
        FROM feature_encounters WHERE {inpatient_sql()} AND period_end IS NOT NULL
        GROUP BY patient_id, period_end
    ),
    snap AS (SELECT * FROM w WHERE is_spine)
    SELECT snap.patient_id AS patient_id, snap.ts AS event_timestamp,
        {timestamptz_sql(created)} AS created, {names},
        {served_instant_sql("s.period_end")} AS prior_discharge_at,
        -- from the admission's date to the discharge's, each as written: the latest instant of
        -- a date alone (the end of its day at UTC-12) made a same-day stay with a timed
        -- discharge -1 day long, and so did the UTC date of a discharge written at +02:00
        s.length_days::BIGINT AS prior_stay_length_days
    FROM snap ASOF LEFT JOIN stays s
        ON snap.patient_id = s.patient_id AND snap.ts > s.period_end
    ORDER BY patient_id, event_timestamp
    """


def _charlson_index(valuesets: list[ValueSet]) -> str:
    """The Charlson sum (Quan 2011 weights) over the flag columns; a category a more severe
    one replaces is not counted twice."""
    charlson = of_kind(valuesets, "charlson")
    charlson_columns = {v.column for v in charlson}
    terms = []
    for v in charlson:
        weight = v.charlson_weight or 0
        if weight == 0:
            continue
        replaced_by = CHARLSON_HIERARCHY.get(v.column)
        if replaced_by in charlson_columns:
            terms.append(f"CASE WHEN {v.column} AND NOT {replaced_by} THEN {weight} ELSE 0 END")
        else:
            terms.append(f"CASE WHEN {v.column} THEN {weight} ELSE 0 END")
    return " + ".join(terms) or "0"


def comorbidities_sql(created: datetime, valuesets: list[ValueSet]) -> str:
    """Flags per condition group (known at or before T) and the Charlson index."""
    groups = of_kind(valuesets, "condition")
    all_columns = [v.column for v in groups + of_kind(valuesets, "charlson")]
    flags = ",\n".join(
        f"coalesce(bool_or(m.column_name = '{c}'), false) AS {c}" for c in all_columns
    )
    group_columns = ", ".join(v.column for v in groups)
    return f"""
    WITH cond AS (
        SELECT c.patient_id, {CONDITION_KNOWN_AT} AS ts,
            c.code_system AS system, upper(replace(trim(c.code), '.', '')) AS code
        FROM src_condition c SEMI JOIN feature_patients p ON p.patient_id = c.patient_id
        WHERE {condition_counts_sql("c")}
          AND {CONDITION_KNOWN_AT} IS NOT NULL AND c.code IS NOT NULL
    ),
    keyed AS (
        -- SNOMED CT: the code itself; ICD-10-CM or ICD-10 (WHO): every prefix of 3+
        -- characters (is-a), read against the value sets' ICD-10 categories
        SELECT patient_id, ts, system, code AS key, false AS is_prefix FROM cond
        WHERE system = '{SNOMED}'
        UNION ALL
        SELECT patient_id, ts, '{ICD10CM}', left(code, n::INT), true
        FROM cond, range(3, 9) r(n)
        WHERE system IN ({sql_list(ICD10_SYSTEMS)}) AND n <= length(code)
    ),
    matched AS (
        SELECT k.patient_id, v.column_name, min(k.ts) AS first_ts
        FROM keyed k JOIN valueset_codes v
          ON v.system = k.system AND v.code = k.key AND v.is_prefix = k.is_prefix
        GROUP BY ALL
    ),
    spine AS (
        SELECT patient_id, ts FROM feature_starts
        UNION
        SELECT patient_id, first_ts FROM matched
    ),
    flagged AS (
        SELECT s.patient_id, s.ts, {flags}
        FROM spine s LEFT JOIN matched m ON m.patient_id = s.patient_id AND m.first_ts <= s.ts
        WHERE {_before_data_end()}
        GROUP BY s.patient_id, s.ts
    )
    SELECT patient_id, ts AS event_timestamp, {timestamptz_sql(created)} AS created,
        {group_columns},
        ({_charlson_index(valuesets)})::BIGINT AS charlson_index
    FROM flagged
    ORDER BY patient_id, event_timestamp
    """


def medications_sql(created: datetime, valuesets: list[ValueSet], edges: bool = True) -> str:
    """Active medication count, distinct drugs prescribed in 180 days, polypharmacy (>= 5 active)
    and a flag per drug class with an active prescription."""
    classes = of_kind(valuesets, "medication")
    class_flags = ",\n".join(
        f"coalesce(sum(d) FILTER (WHERE kind = 'class:{v.column}') OVER wall, 0) > 0 AS {v.column}"
        for v in classes
    )
    return f"""
    WITH med AS (
        SELECT m.patient_id, m.authored_on_latest AS ts, m.medication_code AS code,
            coalesce(m.medication_system, '{RXNORM}') AS system,
            lower(coalesce(m.status, '')) AS status
        FROM src_medication_request m SEMI JOIN feature_patients p ON p.patient_id = m.patient_id
        WHERE m.authored_on_latest IS NOT NULL AND m.medication_code IS NOT NULL
          AND {request_counts_sql("m")}
    ),
    spine AS (
        SELECT s.patient_id, s.ts FROM (
            SELECT patient_id, ts FROM feature_starts
            UNION SELECT patient_id, ts FROM med
            {_edge_rows("med", (ACTIVE_DAYS, RECENT_DAYS), edges)}
        ) s WHERE {_before_data_end()}
    ),
    spans AS (
        -- when each request counts, [from, until): active from its authoring for good while
        -- its status is active or on-hold, else for ACTIVE_DAYS (windows (T - N days, T]);
        -- recent for RECENT_DAYS; a drug class is active while one of its codes is. Counted
        -- from these spans by running sums, so a patient's work grows with her requests, not
        -- with her requests times her spine rows (a join of each spine row to every earlier
        -- active request grew with the square of one patient's active requests)
        SELECT patient_id, 'active' AS kind, code AS key, ts AS since,
            CASE WHEN status NOT IN ('active', 'on-hold')
                THEN ts + INTERVAL {ACTIVE_DAYS} DAYS END AS until
        FROM med
        UNION ALL
        SELECT patient_id, 'recent', code, ts, ts + INTERVAL {RECENT_DAYS} DAYS FROM med
        UNION ALL
        SELECT m.patient_id, 'class:' || v.column_name, v.column_name, m.ts,
            CASE WHEN m.status NOT IN ('active', 'on-hold')
                THEN m.ts + INTERVAL {ACTIVE_DAYS} DAYS END
        FROM med m JOIN valueset_codes v ON v.system = m.system AND v.code = m.code
    ),
    reach AS (
        -- how far the earlier spans of the same key reach (NULL: for good)
        SELECT *, max(coalesce(until, 'infinity'::TIMESTAMPTZ)) OVER (
                PARTITION BY patient_id, kind, key ORDER BY since, until NULLS LAST
                ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS reached
        FROM spans
    ),
    islands AS (
        -- overlapping spans of one key joined into one, so a key counts once at a time
        SELECT patient_id, kind, key, since,
            sum(CASE WHEN reached IS NULL OR since > reached THEN 1 ELSE 0 END) OVER (
                PARTITION BY patient_id, kind, key ORDER BY since, until NULLS LAST
                ROWS UNBOUNDED PRECEDING) AS island,
            coalesce(until, 'infinity'::TIMESTAMPTZ) AS until
        FROM reach
    ),
    joined AS (
        SELECT patient_id, kind, min(since) AS since, max(until) AS until
        FROM islands GROUP BY patient_id, kind, key, island
    ),
    ev AS (
        SELECT patient_id, ts, NULL::VARCHAR AS kind, 0 AS d, true AS is_spine FROM spine
        UNION ALL
        SELECT patient_id, since, kind, 1, false FROM joined
        UNION ALL
        SELECT patient_id, until, kind, -1, false FROM joined WHERE NOT isinf(until)
    ),
    counted AS (
        SELECT patient_id, ts, is_spine,
            coalesce(sum(d) FILTER (WHERE kind = 'active') OVER wall, 0)
                AS active_medication_count,
            coalesce(sum(d) FILTER (WHERE kind = 'recent') OVER wall, 0) AS medications_180d,
            {class_flags}
        FROM ev
        WINDOW wall AS (PARTITION BY patient_id ORDER BY ts
                        RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
    )
    SELECT patient_id, ts AS event_timestamp, {timestamptz_sql(created)} AS created,
        active_medication_count::BIGINT AS active_medication_count,
        medications_180d::BIGINT AS medications_180d,
        active_medication_count >= {POLYPHARMACY_MIN} AS polypharmacy,
        {", ".join(v.column for v in classes)}
    FROM counted WHERE is_spine
    ORDER BY patient_id, event_timestamp
    """


_LAB_CODES_SCHEMA = pa.schema(
    [("measure", pa.string()), ("code", pa.string()), ("is_component", pa.bool_())]
)


_LAB_UNITS_SCHEMA = pa.schema(
    [("measure", pa.string()), ("unit", pa.string()), ("factor", pa.float64())]
)


def register_lab_codes(con: duckdb.DuckDBPyConnection) -> None:
    """Temporary tables ``lab_codes (measure, code, is_component)`` of every measure's codes
    and ``lab_units (measure, unit, factor)`` of the units each one reads (lower case)."""
    rows = [(m, code, comp) for m, codes in LAB_MEASURES.items() for code, comp in codes]
    register_lookup_table(con, "lab_codes", _LAB_CODES_SCHEMA, rows)
    units = [
        (m, unit.lower(), factor)
        for m, accepted in LAB_UNITS.items()
        for unit, factor in accepted.items()
    ]
    register_lookup_table(con, "lab_units", _LAB_UNITS_SCHEMA, units)


# A result's status, by how far it stands: at one instant a corrected or amended result
# replaces the final one, and a final one the preliminary one, even when a source sent them as
# separate resources (two ids); a registered result (rank 0) is not yet a result, even alone at
# its instant: it is never a latest value or part of a mean.
RESULT_STATUS_RANK = {"corrected": 3, "amended": 3, "final": 2, "preliminary": 1, "registered": 0}


def lab_results_sql() -> str:
    """Every result of a measure over the prepared sources (``lab_codes`` and ``lab_units``
    registered): its measure, its value brought to the measure's unit (``value``), whether it
    stated no unit (``without_unit``), whether its unit is read (``unit_read``) and how far its
    status stands (``status_rank``, :data:`RESULT_STATUS_RANK`; a status outside it ranks with
    a preliminary one)."""
    stated = "nullif(trim(o.value_unit), '')"
    ranks = " ".join(f"WHEN '{k}' THEN {v}" for k, v in RESULT_STATUS_RANK.items())
    return f"""
        SELECT o.*, c.measure, {stated} IS NULL AS without_unit,
            o.value_quantity * coalesce(u.factor, 1.0) AS value,
            (u.factor IS NOT NULL OR {stated} IS NULL) AS unit_read,
            CASE lower(o.status) {ranks} ELSE 1 END AS status_rank
        FROM src_observation o
        SEMI JOIN feature_patients p ON p.patient_id = o.patient_id
        JOIN lab_codes c ON c.code = coalesce(o.component_code, o.code)
            AND c.is_component = (o.component_code IS NOT NULL)
        LEFT JOIN lab_units u ON u.measure = c.measure AND u.unit = lower({stated})
        WHERE o.value_quantity IS NOT NULL AND o.effective_date_time_latest IS NOT NULL
          AND {observation_counts_sql("o")}
    """


def lab_unit_counts(con: duckdb.DuckDBPyConnection) -> LabUnitCounts:
    """Per measure, the results of the prepared sources left out for their unit and those that
    stated none (:data:`LAB_UNITS`)."""
    register_lab_codes(con)
    found = con.execute(
        "SELECT measure, count(*) FILTER (WHERE NOT unit_read), "
        f"count(*) FILTER (WHERE without_unit) FROM ({lab_results_sql()}) GROUP BY measure"
    ).fetchall()
    return LabUnitCounts(
        {str(m): int(n) for m, n, _ in found if n},
        {str(m): int(n) for m, _, n in found if n},
    )


# Means are rounded to this many decimals: a sum of doubles depends on the order DuckDB adds
# them in, which its parallel plans do not fix, so one input gave 7.75 in one build and
# 7.750000000000001 in another (and a changed online row for nothing)
MEAN_DIGITS = 9


def _lab_instants_sql() -> str:
    """SQL CTEs ending in ``obs``: one row per patient, measure, instant measured and time a
    result of that instant was issued (``ts``, :data:`OBSERVATION_KNOWN_AT`), with the value
    the instant stands for from then (the mean of its results issued by ``ts`` that stand
    furthest: a correction replaces the final result, never averaged with it; a registered
    result is not yet a result) and when the next such row replaces it (``next_ts``; never,
    at the end of time). Taken over every result of the instant, whenever issued, a
    preliminary result and its final one issued days later were one value known only when
    the last was issued, and the features served an older sample's value until then."""
    return f"""
    results AS (
        -- in the measure's unit (a result in a unit it does not read is left out)
        SELECT *, {OBSERVATION_KNOWN_AT} AS known
        FROM ({lab_results_sql()}) WHERE unit_read AND status_rank > 0
    ),
    issues AS (
        SELECT DISTINCT patient_id, measure, effective_date_time_latest AS measured, known AS ts
        FROM results
    ),
    issued AS (
        SELECT i.patient_id, i.measure, i.measured, i.ts, r.value, r.status_rank,
            max(r.status_rank) OVER (
                PARTITION BY i.patient_id, i.measure, i.measured, i.ts) AS instant_rank
        FROM issues i JOIN results r ON r.patient_id = i.patient_id
            AND r.measure = i.measure AND r.effective_date_time_latest = i.measured
            AND r.known <= i.ts
    ),
    stands AS (
        SELECT patient_id, measure, measured, ts,
            round(avg(value) FILTER (WHERE status_rank = instant_rank), {MEAN_DIGITS}) AS value
        FROM issued GROUP BY patient_id, measure, measured, ts
    ),
    obs AS (
        SELECT *, coalesce(
            lead(ts) OVER (PARTITION BY patient_id, measure, measured ORDER BY ts),
            'infinity'::TIMESTAMPTZ) AS next_ts
        FROM stands
    )"""


def labs_vitals_sql(created: datetime, edges: bool = True) -> str:
    """Per measure: the latest value, when it was measured and the mean over 365 days, each
    result counted from when it became known (:data:`OBSERVATION_KNOWN_AT`). "Latest" is the
    result measured last among those known at T, not the one issued last: results are often
    issued out of order (a batch of old results loaded at once, a culture after a later
    panel). Results measured at one instant count as one: at T, the mean of those issued by T
    that stand furthest, counted in the mean until 365 days after the last of them was issued
    (:func:`_lab_instants_sql`); every other result counts once in the mean, whenever it was
    issued."""
    parts = []
    finals = []
    for m in LAB_MEASURES:
        parts.append(
            f"arg_max(CASE WHEN measure = '{m}' THEN value END, "
            f"CASE WHEN measure = '{m}' THEN {{'m': measured, 't': ts}} END) OVER wall "
            f"AS {m}_latest,\n"
            f"max(CASE WHEN measure = '{m}' THEN measured END) OVER wall AS {m}_measured_at,\n"
            f"round(fsum(CASE WHEN measure = '{m}' THEN d_sum END) OVER wall\n"
            f"  / nullif(sum(CASE WHEN measure = '{m}' THEN d_n END) OVER wall, 0), "
            f"{MEAN_DIGITS})::DOUBLE AS {m}_mean_365d"
        )
        measured_at = served_instant_sql(f"{m}_measured_at")
        finals.append(f"{m}_latest, {m}_mean_365d, {measured_at} AS {m}_measured_at")
    window_columns = ",\n".join(parts)
    final_columns = ",\n".join(finals)
    return f"""
    WITH {_lab_instants_sql()},
    spine AS (
        SELECT s.patient_id, s.ts FROM (
            SELECT patient_id, ts FROM obs
            {_edge_rows("obs", (LAB_WINDOW_DAYS,), edges)}
        ) s WHERE {_before_data_end()}
    ),
    ev AS (
        SELECT patient_id, ts, NULL::VARCHAR AS measure, NULL::DOUBLE AS value,
            NULL::TIMESTAMPTZ AS measured, NULL::DOUBLE AS d_sum,
            NULL::BIGINT AS d_n, true AS is_spine
        FROM spine
        UNION ALL
        SELECT patient_id, ts, measure, value, measured, value, 1, false FROM obs
        UNION ALL
        -- an instant leaves the mean when its next value replaces it, or 365 days on (the
        -- compensated sum gives the small values back after a huge one has left)
        SELECT patient_id, least(next_ts, ts + INTERVAL {LAB_WINDOW_DAYS} DAY), measure,
            NULL, NULL, -value, -1, false
        FROM obs
    ),
    w AS (
        SELECT patient_id, ts, is_spine,
        {window_columns}
        FROM ev
        WINDOW wall AS (PARTITION BY patient_id ORDER BY ts
                        RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
    )
    SELECT patient_id, ts AS event_timestamp, {timestamptz_sql(created)} AS created,
        {final_columns}
    FROM w WHERE is_spine
    ORDER BY patient_id, event_timestamp
    """


def with_heartbeats(body: str) -> str:
    """``body`` (a feature table query) plus, in every gap between a patient's rows longer than
    a year and after the last row up to the data end, a copy of the row before every 365 days.
    The values hold over the gap (there is a row at every change), so the copies are exact."""
    return f"""
    WITH t AS ({body}),
    gaps AS (
        SELECT *,
            coalesce(
                lead(event_timestamp) OVER (PARTITION BY patient_id ORDER BY event_timestamp),
                (SELECT rows_end FROM feature_rows_end) + {AFTER}
            ) AS next_ts
        FROM t
    ),
    beats AS (
        SELECT * EXCLUDE (next_ts, k)
            REPLACE (event_timestamp + to_days(({HEARTBEAT_DAYS} * k)::INT) AS event_timestamp)
        FROM gaps,
            LATERAL range(1, 1 + date_diff('day', event_timestamp, next_ts) // {HEARTBEAT_DAYS})
                r(k)
        WHERE event_timestamp + to_days(({HEARTBEAT_DAYS} * k)::INT) < next_ts
    )
    SELECT * FROM t
    UNION ALL BY NAME
    SELECT * FROM beats
    ORDER BY patient_id, event_timestamp
    """


def table_sql(name: str, created: datetime, valuesets: list[ValueSet], edges: bool = True) -> str:
    """The query of one feature table. ``edges=False`` leaves out the rows where a window drops
    an event and the birthdays (values then exact only at events): the benchmark's baseline."""
    builders: dict[str, Callable[[], str]] = {
        "patient_demographics": lambda: demographics_sql(created, edges),
        "patient_utilisation": lambda: utilisation_sql(created, edges),
        "patient_comorbidities": lambda: comorbidities_sql(created, valuesets),
        "patient_medications": lambda: medications_sql(created, valuesets, edges),
        "patient_labs_vitals": lambda: labs_vitals_sql(created, edges),
    }
    return with_heartbeats(builders[name]()) if edges else builders[name]()


def parquet_path(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / f"{name}.parquet"


def build_feature_tables_report(
    con: duckdb.DuckDBPyConnection,
    out_dir: Path,
    *,
    tables: tuple[str, ...] | None = None,
    created: datetime | None = None,
    valuesets_dir: Path | None = None,
    edges: bool = True,
    check: PublishCheck[CheckOutcome] | None = None,
    known_by: datetime | None = None,
    shift_days: int = 0,
    horizon_days: int = 0,
) -> FeatureBuild:
    """Build ``features.<table>`` and ``out_dir/<table>.parquet`` for each feature table. With
    ``check`` (run over each table's staged rows), a table is published only when its check
    passes; one that fails leaves the published table and file as they were. ``known_by`` and
    ``shift_days``: see :func:`prepare_sources`. With ``horizon_days``, each table's rows are
    computed that many days past the data end into the temporary table
    :func:`horizon_table` (kept for the caller: when each patient's rows next change), and
    published cut at the data end (:func:`extend_rows_end`)."""
    started = time.perf_counter()
    created = created or datetime.now(UTC)
    valuesets = load_valuesets(valuesets_dir) if valuesets_dir else load_valuesets()
    con.execute("SET TimeZone = 'UTC'")  # day boundaries and ages in UTC, as the views store
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {FEATURES_SCHEMA}")
    prepare_sources(con, known_by=known_by, shift_days=shift_days)
    extend_rows_end(con, horizon_days)
    register_code_table(con, valuesets)
    register_lab_codes(con)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, int] = {}
    patients: dict[str, int] = {}
    checks: dict[str, CheckOutcome] = {}
    for name in tables or tuple(FEATURE_TABLES):
        table = f"{FEATURES_SCHEMA}.{name}"
        path, sql = parquet_path(out_dir, name), table_sql(name, created, valuesets, edges)
        if horizon_days:
            con.execute(f"CREATE OR REPLACE TEMP TABLE {horizon_table(name)} AS {sql}")
            sql = up_to_data_end(horizon_table(name))
        # readers (Feast, the checks) never see a half-written table or file
        if check is None:
            rows[name] = publish_table(con, table, path, sql, compression="zstd")
        else:
            outcome = publish_checked(con, table, path, sql, check, compression="zstd")
            rows[name], checks[name] = outcome.rows, outcome.check
            if not outcome.published:
                patients[name] = 0
                continue
        ((distinct,),) = con.execute(f"SELECT count(DISTINCT patient_id) FROM {table}").fetchall()
        patients[name] = int(distinct)
    ((opted_out,),) = con.execute("SELECT count(*) FROM feature_opted_out").fetchall()
    seconds = round(time.perf_counter() - started, 3)
    return feature_build(con, rows, patients, int(opted_out), seconds, checks)


def horizon_table(name: str) -> str:
    """The temporary table a build with ``horizon_days`` leaves each table's rows in, computed
    past the data end (see :func:`build_feature_tables_report`)."""
    return f"feature_horizon__{name}"


def up_to_data_end(rows: str) -> str:
    """The rows of ``rows`` (a feature table's rows computed past the data end) that the table
    holds: those at or before the data end, in the table's order."""
    return (
        f"SELECT * FROM {rows} WHERE event_timestamp <= (SELECT data_end FROM feature_data_end) "
        "ORDER BY patient_id, event_timestamp"
    )


def feature_build(
    con: duckdb.DuckDBPyConnection,
    rows: dict[str, int],
    patients: dict[str, int],
    opted_out: int,
    seconds: float,
    checks: dict[str, CheckOutcome],
) -> FeatureBuild:
    """A build's figures, with what the prepared sources of ``con`` left out or read another
    way counted over them: fact times dated after the arrival, lab results by unit."""
    return FeatureBuild(
        rows, patients, opted_out, seconds, checks, dated_after_arrival(con), lab_unit_counts(con)
    )


def dated_after_arrival(con: duckdb.DuckDBPyConnection) -> int:
    """How many fact times the prepared sources left out of the data end (see
    :func:`prepare_sources`)."""
    ((count,),) = con.execute(f"SELECT dated_after_arrival FROM {_TIME_BOUNDS}").fetchall()
    if count is None:  # a pinned data end
        ((count,),) = con.execute("SELECT count(*) FROM feature_dated_after_arrival").fetchall()
    return int(count)


def prepared_data_end(con: duckdb.DuckDBPyConnection) -> datetime | None:
    """The data end of the prepared sources (see :func:`prepare_sources`); None without facts."""
    ((end,),) = con.execute("SELECT data_end FROM feature_data_end").fetchall()
    return cast(datetime | None, end)


def build_feature_tables(con: duckdb.DuckDBPyConnection, out_dir: Path) -> dict[str, int]:
    """Every feature table in schema ``features`` and as Parquet in ``out_dir``; row counts."""
    return build_feature_tables_report(con, out_dir).rows
