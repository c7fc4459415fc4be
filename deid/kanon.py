"""k-anonymity on what is released: the quasi-identifiers (age band, sex, ZIP3, state, race,
ethnicity) of every released patient are generalised over the whole release, the patients still
in groups smaller than k are withheld, and the Patient resources are rewritten to carry exactly
the generalised values, so ``released_patients``, the Patient rows of ``deid_resources`` and
every view read from them agree. A group's size is its number of people: the Patient records
that share an identifier or are linked by ``Patient.link`` are one person
(:func:`vault.lifecycle.person_keys`), so one person resent under several ids cannot make a
group look larger than it is.

Tables (all pseudonymous, in the warehouse's main schema):

- ``release_quasi_identifiers``: the quasi-identifiers of each released Patient as the policy
  left them, captured when its batch is published. Generalisation always starts from here, so
  running it again (a new batch, another day) never generalises an already generalised value.
- ``released_patients``: one row per released patient, generalised, every group >= k.
- ``withheld_patients``: the patients whose group stayed below k; the release stages (views and,
  through them, features) leave their rows out.
- ``released_patient_inputs``: per Patient, a digest of what its released form was last written
  from (its resource, released row, codings and the year), so a release rewrites only the
  Patients whose inputs changed since.

Everything is built under staging names and swapped in, with the Patient rows rewritten, in one
transaction, only when the share withheld is within the limit; otherwise nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from deid.methods import aggregated_birth_year, today_utc, year_over_age_limit_sql
from deid.released_table import ensure_resource_digests, resource_digest_sql
from deid.risk import (
    SUPPRESSED,
    GeneralisationStep,
    KAnonymityReport,
    generalise_until,
    group_size_sql,
    measure_k,
)
from vault.catalog import has_table
from vault.clock import Clock
from vault.lifecycle import person_keys

QUASI_TABLE = "release_quasi_identifiers"
RELEASED_PATIENTS = "released_patients"
WITHHELD_PATIENTS = "withheld_patients"
# per released Patient, a digest of what its released form was last written from
PATIENT_INPUTS = "released_patient_inputs"
# the Patient rows being rewritten, within the release's transaction
PATIENT_REWRITES = "temp.main.patient_rewrites"
STAGING_SUFFIX = "__staging"
QUASI_IDENTIFIERS = ["age_band", "sex", "zip3", "state", "race", "ethnicity"]
# the staged column naming whom each Patient record is about: k counts people, not records
PERSON = "person_key"
# the platform's k: the smallest group the release keeps, and the smallest count its
# aggregates show (DeidSettings.k, unless a deployment sets another)
DEFAULT_K = 5
DEFAULT_MAX_WITHHELD = 0.05
RACE_URL = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
ETHNICITY_URL = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"
UNKNOWN = "unknown"
_SEXES = {"male", "female", "other", "unknown"}

QUASI_DDL = f"""
CREATE TABLE IF NOT EXISTS {QUASI_TABLE} (
    patient_id VARCHAR PRIMARY KEY,
    batch_id VARCHAR NOT NULL,
    sex VARCHAR,
    birth_year INTEGER,
    zip3 VARCHAR,
    state VARCHAR,
    race_system VARCHAR,
    race_code VARCHAR,
    race_display VARCHAR,
    ethnicity_system VARCHAR,
    ethnicity_code VARCHAR,
    ethnicity_display VARCHAR
)"""
_QUASI_COLUMNS = (
    "patient_id", "batch_id", "sex", "birth_year", "zip3", "state",
    "race_system", "race_code", "race_display",
    "ethnicity_system", "ethnicity_code", "ethnicity_display",
)  # fmt: skip

# wider bands end at 89: ages over 89 are one group of their own ("90+"), never split or merged
_BAND_CASE = (
    "CASE WHEN age_band IN ('90+', '{s}', '{u}') THEN age_band "
    "ELSE (CAST(split_part(age_band, '-', 1) AS INT) // {w} * {w})::VARCHAR || '-' || "
    "least(CAST(split_part(age_band, '-', 1) AS INT) // {w} * {w} + {w} - 1, 89)::VARCHAR END"
)
# The OMB race categories kept apart at every level; the rarer ones are merged into "Other
# Race" by a ladder step (a category of 1-2% of patients leaves most of its groups below k).
COMMON_RACES = ("White", "Black or African American", "Asian", "Other Race", UNKNOWN)
OTHER_RACE = ("urn:oid:2.16.840.1.113883.6.238", "2131-1", "Other Race")
_COMMON_RACES_SQL = ", ".join(f"'{r}'" for r in (*COMMON_RACES, SUPPRESSED))

# Full-domain steps, in the order they cost the least analytic value: finer age first, then
# rare categories, then geography (in a catchment the ZIP3 areas share their first digit).
GENERALISATION_LADDER = [
    GeneralisationStep(
        "age: 5-year to 10-year bands",
        "age_band = " + _BAND_CASE.format(s=SUPPRESSED, u=UNKNOWN, w=10),
    ),
    GeneralisationStep(
        "race: rare categories to Other Race",
        f"race = CASE WHEN race IN ({_COMMON_RACES_SQL}) THEN race ELSE '{OTHER_RACE[2]}' END",
    ),
    GeneralisationStep(
        "ZIP3 to ZIP1 region",
        f"zip3 = CASE WHEN zip3 IN ('{SUPPRESSED}', '{UNKNOWN}', '000') THEN zip3 "
        "ELSE left(zip3, 1) || '**' END",
    ),
    GeneralisationStep(
        "age: 10-year to 20-year bands",
        "age_band = " + _BAND_CASE.format(s=SUPPRESSED, u=UNKNOWN, w=20),
    ),
    GeneralisationStep("state removed", f"state = '{SUPPRESSED}'"),
    GeneralisationStep("ethnicity removed", f"ethnicity = '{SUPPRESSED}'"),
    GeneralisationStep("ZIP removed", f"zip3 = '{SUPPRESSED}'"),
    GeneralisationStep("race removed", f"race = '{SUPPRESSED}'"),
]


def _coding_of(resource: dict[str, Any], url: str) -> dict[str, Any]:
    """The OMB category Coding of a us-core race or ethnicity extension, or {}."""
    for ext in resource.get("extension") or []:
        if not isinstance(ext, dict) or ext.get("url") != url:
            continue
        for sub in ext.get("extension") or []:
            coding = sub.get("valueCoding") if isinstance(sub, dict) else None
            if sub.get("url") == "ombCategory" and isinstance(coding, dict):
                return coding
    return {}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def quasi_identifiers(patient_id: str, batch_id: str, resource: dict[str, Any]) -> tuple[Any, ...]:
    """One ``release_quasi_identifiers`` row from a de-identified Patient resource."""
    birth = _str(resource.get("birthDate"))
    year = int(birth[:4]) if birth and birth[:4].isdigit() else None
    address = (resource.get("address") or [{}])[0]
    address = address if isinstance(address, dict) else {}
    postal = _str(address.get("postalCode")) or ""
    zip3 = postal[:3] if len(postal) >= 3 and postal[:3].isdigit() else None
    sex = resource.get("gender")
    race, ethnicity = _coding_of(resource, RACE_URL), _coding_of(resource, ETHNICITY_URL)
    return (
        patient_id,
        batch_id,
        sex if sex in _SEXES else None,
        year,
        zip3,
        _str(address.get("state")),
        *(_str(race.get(k)) for k in ("system", "code", "display")),
        *(_str(ethnicity.get(k)) for k in ("system", "code", "display")),
    )


def record_quasi_identifiers(
    con: duckdb.DuckDBPyConnection, rows: Iterable[tuple[str, str, dict[str, Any]]]
) -> int:
    """Store (replace) the quasi-identifiers of (patient id, batch id, Patient resource)."""
    con.execute(QUASI_DDL)
    values = [quasi_identifiers(pid, bid, resource) for pid, bid, resource in rows]
    if values:
        con.executemany(
            f"INSERT OR REPLACE INTO {QUASI_TABLE} VALUES ({', '.join('?' * len(_QUASI_COLUMNS))})",
            values,
        )
    return len(values)


def _backfill(con: duckdb.DuckDBPyConnection) -> None:
    """Quasi-identifiers of released Patients published before they were recorded (older
    warehouses): taken from their current resource. Those of patients no longer released (an
    erasure removes the Patient row) are dropped."""
    con.execute(QUASI_DDL)
    con.execute(
        f"DELETE FROM {QUASI_TABLE} WHERE patient_id NOT IN "
        "(SELECT id FROM deid_resources WHERE resource_type = 'Patient')"
    )
    ((missing,),) = con.execute(
        "SELECT count(*) FROM deid_resources WHERE resource_type = 'Patient' "
        f"AND id NOT IN (SELECT patient_id FROM {QUASI_TABLE})"
    ).fetchall()
    if not missing:  # the usual case: no resource text needs to be read
        return
    rows = con.execute(
        f"SELECT id, batch_id, resource FROM deid_resources WHERE resource_type = 'Patient' "
        f"AND id NOT IN (SELECT patient_id FROM {QUASI_TABLE})"
    ).fetchall()
    record_quasi_identifiers(con, ((pid, bid, orjson.loads(r)) for pid, bid, r in rows))


def _register_persons(con: duckdb.DuckDBPyConnection) -> None:
    """Temporary table ``patient_persons (patient_id, person_key)``: the person of each Patient
    with an indexed identifier (:func:`vault.lifecycle.person_keys`)."""
    persons = person_keys(con) if has_table(con, "identifier_index") else {}
    table = pa.table(
        {"patient_id": list(persons), "person_key": list(persons.values())},
        schema=pa.schema([("patient_id", pa.string()), ("person_key", pa.string())]),
    )
    con.register("_patient_persons_rows", table)
    try:
        con.execute(
            "CREATE OR REPLACE TEMP TABLE patient_persons AS SELECT * FROM _patient_persons_rows"
        )
    finally:
        con.unregister("_patient_persons_rows")


def _stage_patients(con: duckdb.DuckDBPyConnection, staging: str, as_of: date) -> None:
    """Ungeneralised released patients: 5-year age bands (90+ together), the rest as released,
    and the person each one is (``PERSON``: Patients sharing an identifier are one person, the
    others each their own). Only patients whose Patient is still in ``deid_resources``
    (erasure removes it there). In the order of their pseudonyms: the recorded table holds them
    in the source's order, which a list of the population sorted the same way would follow."""
    _register_persons(con)
    con.execute(
        f"""
        CREATE OR REPLACE TABLE {staging} AS
        SELECT q.patient_id, coalesce(pp.person_key, q.patient_id) AS {PERSON},
            coalesce(q.sex, '{UNKNOWN}') AS sex,
            CASE WHEN q.birth_year IS NULL THEN '{UNKNOWN}'
                 WHEN {year_over_age_limit_sql("q.birth_year", as_of)} THEN '90+'
                 ELSE (greatest({as_of.year} - q.birth_year, 0) // 5 * 5)::VARCHAR || '-' ||
                      (greatest({as_of.year} - q.birth_year, 0) // 5 * 5 + 4)::VARCHAR
            END AS age_band,
            coalesce(q.zip3, '{UNKNOWN}') AS zip3,
            coalesce(q.state, '{UNKNOWN}') AS state,
            coalesce(q.race_display, q.race_code, '{UNKNOWN}') AS race,
            coalesce(q.ethnicity_display, q.ethnicity_code, '{UNKNOWN}') AS ethnicity
        FROM {QUASI_TABLE} q
        SEMI JOIN (SELECT id FROM deid_resources WHERE resource_type = 'Patient') d
            ON d.id = q.patient_id
        LEFT JOIN patient_persons pp ON pp.patient_id = q.patient_id
        ORDER BY q.patient_id
        """
    )
    con.execute("DROP TABLE patient_persons")


@dataclass
class KAnonymousRelease:
    """What the release-wide k-anonymity step did: the check's numbers, never a value."""

    before: KAnonymityReport
    after: KAnonymityReport
    max_withheld_share: float
    steps_applied: list[str] = field(default_factory=list)
    withheld: int = 0
    published: bool = False
    check: Any = None  # what the extra publish check returned, when one was given

    @property
    def withheld_share(self) -> float:
        return self.withheld / self.before.records if self.before.records else 0.0

    @property
    def passed(self) -> bool:
        return self.after.passed and self.withheld_share <= self.max_withheld_share

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.after.k,
            "quasi_identifiers": list(self.after.quasi_identifiers),
            "patients": self.before.records,
            "released": self.after.records,
            "withheld": self.withheld,
            "withheld_share": round(self.withheld_share, 4),
            "max_withheld_share": self.max_withheld_share,
            "min_group_before": self.before.min_group,
            "share_below_k_before": round(self.before.share_below_k, 4),
            "min_group_after": self.after.min_group,
            "generalised": self.steps_applied,
            "passed": self.passed,
            "published": self.published,
        }


def _generalise_and_withhold(
    con: duckdb.DuckDBPyConnection,
    staging: str,
    withheld: str,
    k: int,
    max_withheld: float,
    ladder: list[GeneralisationStep],
) -> KAnonymousRelease:
    """Full-domain generalisation, one ladder step at a time, while more than ``max_withheld``
    of the patients sit in groups below k; then the patients still below k are moved from
    ``staging`` to ``withheld`` (never blanked in place: a blanked row still joins). Groups are
    counted in people (``PERSON``), not Patient records; the column is dropped after."""
    before = measure_k(con, staging, QUASI_IDENTIFIERS, k, PERSON)
    report = KAnonymousRelease(before, before, max_withheld)
    _, report.steps_applied = generalise_until(
        con, staging, QUASI_IDENTIFIERS, k, ladder, max_withheld, measured=before, person=PERSON
    )
    key = ", ".join(QUASI_IDENTIFIERS)
    con.execute(
        f"""
        CREATE OR REPLACE TABLE {withheld} AS
        SELECT patient_id, 'k_anonymity' AS reason FROM {staging}
        WHERE ({key}) IN (
            SELECT ({key}) FROM {staging} GROUP BY {key}
            HAVING {group_size_sql(PERSON)} < {int(k)}
        )
        """
    )
    con.execute(f"DELETE FROM {staging} WHERE patient_id IN (SELECT patient_id FROM {withheld})")
    ((report.withheld,),) = con.execute(f"SELECT count(*) FROM {withheld}").fetchall()
    report.after = measure_k(con, staging, QUASI_IDENTIFIERS, k, PERSON)
    # who is whom stays out of the published table: it would link two released pseudonyms
    con.execute(f"ALTER TABLE {staging} DROP COLUMN {PERSON}")
    return report


def representative_birth_year(age_band: str, as_of_year: int) -> int | None:
    """The birth year a generalised Patient carries: the middle of its age band (90 for 90+),
    the same for everybody in the band, so the resource says no more than the band."""
    if age_band == "90+":
        return aggregated_birth_year(as_of_year)
    low, _, high = age_band.partition("-")
    if low.isdigit() and high.isdigit():
        return as_of_year - (int(low) + int(high)) // 2
    return None


def _omb_extension(url: str, system: Any, code: Any, display: Any) -> dict[str, Any]:
    coding = {k: v for k, v in (("system", system), ("code", code), ("display", display)) if v}
    return {"url": url, "extension": [{"url": "ombCategory", "valueCoding": coding}]}


def _released_value(value: Any) -> bool:
    return isinstance(value, str) and value not in (SUPPRESSED, UNKNOWN)


def _released_coding(released: dict[str, Any], kind: str) -> tuple[Any, Any, Any] | None:
    """The OMB coding that says what ``released_patients`` says: the recorded one when the
    category was kept, Other Race when a rare race was merged into it, none when removed."""
    value = released[kind]
    raw = (released[f"{kind}_system"], released[f"{kind}_code"], released[f"{kind}_display"])
    if not _released_value(value):
        return None
    if value in (raw[2], raw[1]) and raw[1]:
        return raw
    return OTHER_RACE if kind == "race" and value == OTHER_RACE[2] else None


def generalised_patient(
    resource: dict[str, Any], released: dict[str, Any] | None, as_of_year: int
) -> dict[str, Any]:
    """The Patient with its quasi-identifiers replaced by the released (generalised) values;
    ``released`` None (a withheld patient) removes them all. ``released`` holds the
    ``released_patients`` columns and the OMB codings of ``release_quasi_identifiers``."""
    quasi = ("gender", "birthDate", "address", "extension")
    out = {k: v for k, v in resource.items() if k not in quasi}
    extensions = [
        e
        for e in resource.get("extension") or []
        if isinstance(e, dict) and e.get("url") not in (RACE_URL, ETHNICITY_URL)
    ]
    if released is not None:
        if _released_value(released["sex"]):
            out["gender"] = released["sex"]
        year = representative_birth_year(str(released["age_band"]), as_of_year)
        if year is not None:
            out["birthDate"] = f"{year:04d}"
        address = {"country": "US"}
        if _released_value(released["state"]):
            address["state"] = released["state"]
        zip3 = released["zip3"]
        if _released_value(zip3) and str(zip3).isdigit():
            address["postalCode"] = f"{zip3}00"
        out["address"] = [address]
        for kind, url in (("race", RACE_URL), ("ethnicity", ETHNICITY_URL)):
            coding = _released_coding(released, kind)
            if coding is not None:
                extensions.append(_omb_extension(url, *coding))
    if extensions:
        out["extension"] = extensions
    return out


# The inputs of a Patient's released form (see generalised_patient): its current resource, its
# released row (none when withheld) and its recorded OMB codings; ``{released}`` is the staged or
# the published released_patients. The digest adds the year the birth year is counted from.
_PATIENT_ROWS = f"""
WITH patient_rows AS (
    SELECT d.id, d.batch_id, CAST(d.resource AS VARCHAR) AS resource,
        r.patient_id IS NOT NULL AS released,
        r.sex, r.age_band, r.zip3, r.state, r.race, r.ethnicity,
        q.race_system, q.race_code, q.race_display,
        q.ethnicity_system, q.ethnicity_code, q.ethnicity_display
    FROM deid_resources d
    LEFT JOIN {{released}} r ON r.patient_id = d.id
    LEFT JOIN {QUASI_TABLE} q ON q.patient_id = d.id
    WHERE d.resource_type = 'Patient'
)
SELECT p.*, md5(to_json(p)::VARCHAR || ?) AS inputs_digest FROM patient_rows p
"""
_INPUTS_DDL = (
    f"CREATE TABLE IF NOT EXISTS {PATIENT_INPUTS} (patient_id VARCHAR NOT NULL, digest VARCHAR)"
)


def _patient_updates(con: duckdb.DuckDBPyConnection, staging: str, as_of: date) -> pa.Table:
    """(id, batch_id, resource) of the released Patients whose inputs changed since their
    released form was last written (a new or re-sent Patient, other released values, another
    year), rewritten to their released values. generalised_patient is idempotent, so a Patient
    whose inputs are those recorded after its last rewrite already holds its released form."""
    con.execute(_INPUTS_DDL)
    cursor = con.execute(
        f"SELECT p.* EXCLUDE (inputs_digest) FROM ({_PATIENT_ROWS.format(released=staging)}) p "
        f"WHERE NOT EXISTS (SELECT 1 FROM {PATIENT_INPUTS} i "
        "WHERE i.patient_id = p.id AND i.digest = p.inputs_digest)",
        [str(as_of.year)],
    )
    names = [d[0] for d in cursor.description or []]
    ids, batches, resources = [], [], []
    for row in cursor.fetchall():
        values = dict(zip(names, row, strict=True))
        released = values if values["released"] else None
        patient = generalised_patient(orjson.loads(values["resource"]), released, as_of.year)
        ids.append(values["id"])
        batches.append(values["batch_id"])
        resources.append(orjson.dumps(patient).decode())
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "batch_id": pa.array(batches, pa.string()),
            "resource": pa.array(resources, pa.string()),
        }
    )


def _record_patient_inputs(con: duckdb.DuckDBPyConnection, as_of: date) -> None:
    """After the rewrite (in its transaction): the inputs digest of each Patient just
    rewritten, over the published table; the digests of Patients no longer released dropped."""
    con.execute(
        f"DELETE FROM {PATIENT_INPUTS} WHERE patient_id IN (SELECT id FROM patient_updates) "
        "OR patient_id NOT IN (SELECT id FROM deid_resources WHERE resource_type = 'Patient')"
    )
    con.execute(
        f"INSERT INTO {PATIENT_INPUTS} SELECT id, inputs_digest "
        f"FROM ({_PATIENT_ROWS.format(released=RELEASED_PATIENTS)}) "
        "WHERE id IN (SELECT id FROM patient_updates)",
        [str(as_of.year)],
    )


# the Patient rows whose released form changed (a row rewritten with the same text would still
# be written again), each with its new text
_CHANGED_PATIENT_ROWS = f"""
CREATE OR REPLACE TEMP TABLE {PATIENT_REWRITES} AS
SELECT d.resource_type, d.id, d.patient_id, d.batch_id, u.resource::JSON AS resource
FROM deid_resources d JOIN patient_updates u ON d.id = u.id AND d.batch_id = u.batch_id
WHERE d.resource_type = 'Patient' AND CAST(d.resource AS VARCHAR) IS DISTINCT FROM u.resource
"""


def _rewrite_patient_rows(con: duckdb.DuckDBPyConnection) -> None:
    """Replace the Patient rows whose released form changed (within the caller's transaction):
    deleted, and appended again with their new text. Not an UPDATE of the JSON column: DuckDB
    then writes that column again, at the next checkpoint, for every row group holding one of
    the rows (34 Patients among 385,000 resources: 1.6-2.6 s, at every release), where a
    delete and an append write only the new rows and the delete marks."""
    # no try/finally: after a failed statement DuckDB refuses every other one in the
    # transaction (a DROP there would hide the failure), and the caller's rollback removes the
    # temporary table created in it
    con.execute(_CHANGED_PATIENT_ROWS)
    con.execute(
        f"DELETE FROM deid_resources d USING {PATIENT_REWRITES} w "
        "WHERE d.resource_type = 'Patient' AND d.id = w.id AND d.batch_id = w.batch_id"
    )
    con.execute(
        f"INSERT INTO deid_resources BY NAME SELECT *, {resource_digest_sql()} AS digest "
        f"FROM {PATIENT_REWRITES}"
    )
    con.execute(f"DROP TABLE {PATIENT_REWRITES}")


def _swap_in(
    con: duckdb.DuckDBPyConnection,
    staging: str,
    withheld: str,
    updates: pa.Table,
    as_of: date,
) -> None:
    """In one transaction: the new ``released_patients`` and ``withheld_patients``, and the
    Patient rows rewritten to match them. Readers see the old release or the new one."""
    con.register("patient_updates", updates)
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            for stage, target in ((staging, RELEASED_PATIENTS), (withheld, WITHHELD_PATIENTS)):
                con.execute(f"DROP TABLE IF EXISTS {target}")
                con.execute(f"ALTER TABLE {stage} RENAME TO {target}")
            _rewrite_patient_rows(con)
            _record_patient_inputs(con, as_of)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        con.unregister("patient_updates")


def build_k_anonymous_release(
    con: duckdb.DuckDBPyConnection,
    k: int,
    *,
    as_of: date | None = None,
    max_withheld: float = DEFAULT_MAX_WITHHELD,
    ladder: list[GeneralisationStep] | None = None,
    check: Callable[[duckdb.DuckDBPyConnection, str], Any] | None = None,
    clock: Clock | None = None,
) -> KAnonymousRelease:
    """Generalise the release's quasi-identifiers and withhold the patients still below k;
    publish ``released_patients``, ``withheld_patients`` and the rewritten Patient rows only
    when the withheld share is within ``max_withheld`` and ``check`` (run over the staged
    table, e.g. a leak scan; its result has ``passed``) passes. A failed check changes
    nothing. Ages are counted as of ``as_of``, by default today's date in UTC by ``clock``
    (the yearly rebuild runs on UTC's New Year)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not 0.0 <= max_withheld <= 1.0:
        raise ValueError("max_withheld must be within [0, 1]")
    as_of = as_of or today_utc(clock)
    staging = f"{RELEASED_PATIENTS}{STAGING_SUFFIX}"
    withheld = f"{WITHHELD_PATIENTS}{STAGING_SUFFIX}"
    _backfill(con)
    ensure_resource_digests(con)
    try:
        _stage_patients(con, staging, as_of)
        steps = GENERALISATION_LADDER if ladder is None else ladder
        report = _generalise_and_withhold(con, staging, withheld, k, max_withheld, steps)
        report.check = check(con, staging) if check is not None else None
        if report.passed and (report.check is None or report.check.passed):
            _swap_in(con, staging, withheld, _patient_updates(con, staging, as_of), as_of)
            report.published = True
    finally:
        for table in (staging, withheld):
            con.execute(f"DROP TABLE IF EXISTS {table}")
    return report


def released_filter(con: duckdb.DuckDBPyConnection, column: str = "patient_id") -> str:
    """A SQL condition on ``column`` that keeps rows of no patient (a Practitioner, an
    Organization) and rows of the patients the k-anonymity step released: a withheld patient's
    rows are left out, and so are those of a patient whose Patient resource has not arrived,
    who is in no k-anonymity group (their quasi-identifiers were never measured), until it
    does. Each list is read where it exists (always true while neither does: the views
    alone). ``column`` must be a trusted identifier."""
    rules = []
    if has_table(con, RELEASED_PATIENTS):
        rules.append(f"{column} IN (SELECT patient_id FROM {RELEASED_PATIENTS})")
    if has_table(con, WITHHELD_PATIENTS):
        rules.append(f"{column} NOT IN (SELECT patient_id FROM {WITHHELD_PATIENTS})")
    if not rules:
        return "TRUE"
    return f"({column} IS NULL OR ({' AND '.join(rules)}))"
