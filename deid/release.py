"""The de-identification stage: vault → policy → ``deid_resources`` (a released table), the PHI
leak scan over what was released, and the released patient table with its k-anonymity."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from deid.engine import Deidentifier, DeidSecrets, ProcessingError
from deid.leakscan import CanarySet, LeakScanResult, scan_rows
from deid.policy import Policy
from deid.risk import EnforcementReport, GeneralisationStep, enforce_k, measure_k
from fhirlake.references import classify, literal_target
from vault.keys import KeyProvider
from vault.pseudonym import Pseudonymizer
from vault.sealing import DataKeyStore

DEID_DDL = """
CREATE TABLE IF NOT EXISTS deid_resources (
    resource_type VARCHAR NOT NULL,
    id VARCHAR NOT NULL,
    patient_id VARCHAR,
    batch_id VARCHAR NOT NULL,
    resource JSON NOT NULL
)"""
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _reference_targets(
    con: duckdb.DuckDBPyConnection, batch_id: str
) -> dict[tuple[str, str], tuple[str, str]]:
    """(resource key, keyed reference text) → (target type, target pseudonym), for urn:uuid
    and conditional references, resolved through the identifier index where needed."""
    rows = con.execute(
        """
        SELECT r.resource_key, r.ref_mac, r.target_type,
               CASE WHEN r.kind = 'conditional'
                    THEN (SELECT min(i.resource_key) FROM identifier_index i
                          WHERE i.criteria_key = r.target_key)
                    ELSE r.target_key END
        FROM resource_references r
        WHERE r.batch_id = ? AND r.kind IN ('urn', 'conditional') AND r.ref_mac IS NOT NULL
        """,
        [batch_id],
    ).fetchall()
    return {(rk, mac): (tt, tk) for rk, mac, tt, tk in rows if tk is not None}


_DEID_COLUMNS = ("resource_type", "id", "patient_id", "batch_id", "resource")
_DEID_CHUNK = 2_000


def deidentify_batch(
    con: duckdb.DuckDBPyConnection,
    provider: KeyProvider,
    batch_id: str,
    policy: Policy,
    *,
    today: date | None = None,
) -> DeidReport:
    """De-identify every resource this batch put in the vault; replace the batch's rows."""
    started = time.perf_counter()
    con.execute(DEID_DDL)
    con.execute(DEID_ERRORS_DDL)
    con.execute("DELETE FROM deid_resources WHERE batch_id = ?", [batch_id])
    con.execute("DELETE FROM deid_errors WHERE batch_id = ?", [batch_id])
    pseudo = Pseudonymizer(provider.pseudonym_key())
    engine = Deidentifier(policy, DeidSecrets.derive(provider.pseudonym_key(), policy), today=today)
    keys = DataKeyStore(con, provider)
    targets = _reference_targets(con, batch_id)
    report = DeidReport(batch_id, policy.name)
    rules: Counter[int] = Counter()
    labels: Counter[str] = Counter()
    withheld: Counter[str] = Counter()
    out: list[tuple[str, str, str | None, str, str]] = []
    errors: list[tuple[str, str | None, str | None, str, str]] = []
    # Only the narrow positions are ranked and sorted; the ciphertexts are then read a chunk
    # at a time, so memory stays bounded under the warehouse cap whatever the batch size.
    positions = [
        int(seq)
        for (seq,) in con.execute(
            "SELECT ingest_seq FROM phi_vault_current WHERE batch_id = ? ORDER BY ingest_seq",
            [batch_id],
        ).fetchall()
    ]

    def chunks() -> Any:
        for start in range(0, len(positions), _DEID_CHUNK):
            window = positions[start : start + _DEID_CHUNK]
            yield con.execute(
                "SELECT resource_key, resource_type, patient_key, sealed, aad FROM phi_vault "
                "WHERE batch_id = ? AND ingest_seq BETWEEN ? AND ? "
                "AND ingest_seq IN (SELECT unnest(?::BIGINT[])) ORDER BY ingest_seq",
                [batch_id, window[0], window[-1], window],
            ).fetchall()

    def flush() -> None:
        if out:
            # one Arrow insert: executemany goes row by row and dominated the stage's time
            columns = list(zip(*out, strict=True))
            released = pa.table(
                {
                    name: pa.array(values, pa.string())
                    for name, values in zip(_DEID_COLUMNS, columns, strict=True)
                }
            )
            con.register("released_chunk", released)
            try:
                con.execute(
                    "INSERT INTO deid_resources SELECT resource_type, id, patient_id, batch_id, "
                    "resource::JSON FROM released_chunk"
                )
            finally:
                con.unregister("released_chunk")
            out.clear()
        if errors:
            con.executemany("INSERT INTO deid_errors VALUES (?, ?, ?, ?, ?)", errors)
            errors.clear()

    for rows in chunks():
        for resource_key, rtype, patient_key, sealed, aad in rows:
            report.resources_in += 1
            resource = orjson.loads(keys.open(bytes(sealed), bytes(aad)))

            def resolve(value: str, _rk: str = resource_key) -> tuple[str, str] | None:
                if classify(value) in ("urn", "conditional"):
                    return targets.get((_rk, pseudo.token("reference", value)))
                literal = literal_target(value)
                return (literal[0], pseudo.resource_key(*literal)) if literal else None

            try:
                outcome = engine.apply(resource, patient_scope=patient_key, resolve=resolve)
            except ProcessingError as exc:
                withheld[exc.code] += 1
                errors.append((batch_id, rtype, patient_key, exc.code, str(exc)))
                continue
            rules.update(outcome.rule_counts)
            labels.update(outcome.labels)
            out.append(
                (
                    rtype,
                    resource_key,
                    patient_key,
                    batch_id,
                    orjson.dumps(outcome.resource).decode(),
                )
            )
        if len(out) >= 5_000:
            flush()
    flush()
    report.released = report.resources_in - sum(withheld.values())
    report.withheld = sum(withheld.values())
    report.withheld_reasons = dict(withheld)
    report.rule_counts = {
        f"{i}:{policy.rules[i].method}:{policy.rules[i].path}": n for i, n in sorted(rules.items())
    }
    report.labels = dict(labels)
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def batch_canaries(
    con: duckdb.DuckDBPyConnection, provider: KeyProvider, batch_id: str
) -> CanarySet:
    """Canaries of every patient this batch touches, from their current Patient resources."""
    keys = DataKeyStore(con, provider)
    canaries = CanarySet()
    rows = con.execute(
        """
        SELECT v.resource_key, v.sealed, v.aad FROM phi_vault_current v
        WHERE v.resource_type = 'Patient' AND v.resource_key IN (
            SELECT DISTINCT patient_key FROM phi_vault
            WHERE batch_id = ? AND patient_key IS NOT NULL
        )
        """,
        [batch_id],
    ).fetchall()
    for resource_key, sealed, aad in rows:
        canaries.add_patient(orjson.loads(keys.open(bytes(sealed), bytes(aad))), resource_key)
    return canaries


def release_canaries(con: duckdb.DuckDBPyConnection, provider: KeyProvider) -> CanarySet:
    """Canaries of every patient in the vault (for tables built over the whole release)."""
    keys = DataKeyStore(con, provider)
    canaries = CanarySet()
    cursor = con.cursor()
    try:
        cursor.execute(
            "SELECT resource_key, sealed, aad FROM phi_vault_current "
            "WHERE resource_type = 'Patient'"
        )
        while chunk := cursor.fetchmany(2_000):
            for resource_key, sealed, aad in chunk:
                patient = orjson.loads(keys.open(bytes(sealed), bytes(aad)))
                canaries.add_patient(patient, resource_key)
    finally:
        cursor.close()
    return canaries


def scan_released_table(
    con: duckdb.DuckDBPyConnection,
    canaries: CanarySet,
    table: str,
    id_column: str = "id",
    patient_column: str | None = "patient_id",
) -> LeakScanResult:
    """Scan every text-like column of a released table (views, features). Columns named
    ``*_display`` hold terminology text (single name parts are not counted there, as in a
    Coding's display); timestamps are event times, not birth dates, and are not searched."""
    cursor = con.cursor()
    try:
        described = cursor.execute(f"DESCRIBE {table}").fetchall()
        columns = [
            (name, type_)
            for name, type_, *_ in described
            if not str(type_).startswith(("TIMESTAMP", "DOUBLE", "BIGINT", "INTEGER", "BOOLEAN"))
        ]
        names = {name for name, *_ in described}
        patient_expr = f'"{patient_column}"' if patient_column in names else "NULL"
        id_expr = f'"{id_column}"' if id_column in names else "NULL"
        select = ", ".join(f'CAST("{name}" AS VARCHAR)' for name, _ in columns) or "NULL"
        cursor.execute(f"SELECT {id_expr}, {patient_expr}, {select} FROM {table}")

        def rows() -> Any:
            while chunk := cursor.fetchmany(5_000):
                for row_id, patient, *values in chunk:
                    value = [
                        {"system": "", "code": "", "display": v} if name.endswith("_display") else v
                        for (name, _), v in zip(columns, values, strict=False)
                        if v is not None
                    ]
                    yield str(row_id), value, patient

        return scan_rows(canaries, rows())
    finally:
        cursor.close()


def scan_released_batch(
    con: duckdb.DuckDBPyConnection, provider: KeyProvider, batch_id: str
) -> LeakScanResult:
    canaries = batch_canaries(con, provider, batch_id)
    cursor = con.cursor()
    cursor.execute(
        "SELECT id, resource, patient_id FROM deid_resources WHERE batch_id = ?", [batch_id]
    )

    def rows() -> Any:
        while chunk := cursor.fetchmany(2_000):
            for row_id, resource, patient in chunk:
                yield row_id, orjson.loads(resource), patient

    try:
        return scan_rows(canaries, rows())
    finally:
        cursor.close()


QUASI_IDENTIFIERS = ["age_band", "sex", "zip3", "race", "ethnicity"]
RACE_URL = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
ETHNICITY_URL = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"

GENERALISATION_LADDER = [
    GeneralisationStep(
        "age: 5-year to 10-year bands",
        "age_band = CASE WHEN age_band IN ('90+', '*', 'unknown') THEN age_band "
        "ELSE (CAST(split_part(age_band, '-', 1) AS INT) // 10 * 10)::VARCHAR || '-' || "
        "(CAST(split_part(age_band, '-', 1) AS INT) // 10 * 10 + 9)::VARCHAR END",
    ),
    GeneralisationStep(
        "ZIP3 to ZIP1 region",
        "zip3 = CASE WHEN zip3 IN ('*', 'unknown', '000') THEN zip3 ELSE left(zip3, 1) || '**' END",
    ),
    GeneralisationStep(
        "age: 10-year to 20-year bands",
        "age_band = CASE WHEN age_band IN ('90+', '*', 'unknown') THEN age_band "
        "ELSE (CAST(split_part(age_band, '-', 1) AS INT) // 20 * 20)::VARCHAR || '-' || "
        "(CAST(split_part(age_band, '-', 1) AS INT) // 20 * 20 + 19)::VARCHAR END",
    ),
    GeneralisationStep("ethnicity removed", "ethnicity = '*'"),
]


def build_released_patients(
    con: duckdb.DuckDBPyConnection, k: int, as_of: date | None = None
) -> EnforcementReport:
    """``released_patients``: one row per de-identified patient with its quasi-identifiers
    (5-year age band capped at 90+, sex, ZIP3, race, ethnicity), brought to k-anonymity."""
    as_of = as_of or date.today()
    con.execute(
        f"""
        CREATE OR REPLACE TABLE released_patients AS
        WITH p AS (
            SELECT id AS patient_id, resource::JSON AS r FROM deid_resources
            WHERE resource_type = 'Patient'
        ),
        fields AS (
            SELECT patient_id,
                coalesce(r->>'gender', 'unknown') AS sex,
                TRY_CAST(left(r->>'birthDate', 4) AS INT) AS birth_year,
                left(coalesce(r->'address'->0->>'postalCode', ''), 3) AS zip3_raw,
                (SELECT x->'extension'->0->'valueCoding'->>'display'
                   FROM unnest(CAST(coalesce(r->'extension', '[]') AS JSON[])) t(x)
                   WHERE x->>'url' = '{RACE_URL}' LIMIT 1) AS race,
                (SELECT x->'extension'->0->'valueCoding'->>'display'
                   FROM unnest(CAST(coalesce(r->'extension', '[]') AS JSON[])) t(x)
                   WHERE x->>'url' = '{ETHNICITY_URL}' LIMIT 1) AS ethnicity
            FROM p
        )
        SELECT patient_id, sex,
            CASE WHEN birth_year IS NULL THEN 'unknown'
                 WHEN {as_of.year} - birth_year >= 90 THEN '90+'
                 ELSE (({as_of.year} - birth_year) // 5 * 5)::VARCHAR || '-' ||
                      (({as_of.year} - birth_year) // 5 * 5 + 4)::VARCHAR END AS age_band,
            CASE WHEN length(zip3_raw) = 3 THEN zip3_raw ELSE 'unknown' END AS zip3,
            coalesce(race, 'unknown') AS race,
            coalesce(ethnicity, 'unknown') AS ethnicity
        FROM fields
        """
    )
    return enforce_k(con, "released_patients", QUASI_IDENTIFIERS, k, GENERALISATION_LADDER)


def released_k(con: duckdb.DuckDBPyConnection, k: int) -> Any:
    return measure_k(con, "released_patients", QUASI_IDENTIFIERS, k)
