"""Crafted ``views.*`` tables with known feature answers."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from deid.engine import Deidentifier, DeidSecrets
from deid.policy import Policy
from fhirlake.viewdef import write_view_table
from pipelines.features.tables import VIEW_COLUMNS, build_feature_tables
from pipelines.views.tables import load_views

SNOMED = "http://snomed.info/sct"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"

# Pseudonyms: A has history, B is 95 years old, C opted out, D opted in.
A = "a" * 32
B = "b" * 32
C = "c" * 32
D = "d" * 32


def ts(y: int, m: int, d: int) -> datetime:
    return datetime(y, m, d, tzinfo=UTC)


def write_views(con: duckdb.DuckDBPyConnection, rows: dict[str, list[dict[str, Any]]]) -> None:
    """Create ``views.<name>`` with the columns the feature SQL reads and the given rows."""
    con.execute("CREATE SCHEMA IF NOT EXISTS views")
    for view, columns in VIEW_COLUMNS.items():
        cols = dict(columns)
        if view != "patient":
            cols.setdefault("id", "VARCHAR")
        for name, type_ in columns.items():  # a view has each value beside its latest instant
            if name.endswith("_latest"):
                cols.setdefault(name.removesuffix("_latest"), type_)
        ddl = ", ".join(f'"{c}" {t}' for c, t in cols.items())
        con.execute(f"CREATE OR REPLACE TABLE views.{view} ({ddl})")
        data = rows.get(view, [])
        if data:
            names = list(cols)
            marks = ", ".join("?" for _ in names)
            con.executemany(
                f"INSERT INTO views.{view} VALUES ({marks})",
                [[_value(r, n) for n in names] for r in data],
            )


def _value(row: dict[str, Any], column: str) -> Any:
    """A crafted row's value; a ``*_latest`` column not given is its instant's own (the rows'
    times all have a time of day, and such an instant is the latest it stands for)."""
    if column.endswith("_latest") and column not in row:
        return row.get(column.removesuffix("_latest"))
    return row.get(column)


def crafted_rows(base: datetime | None = None) -> dict[str, list[dict[str, Any]]]:
    """The crafted record. ``base`` moves the whole time line (online tests want it near now)."""
    t0 = ts(2024, 1, 1)
    shift = (base - t0) if base else timedelta(0)

    def at(y: int, m: int, d: int) -> datetime:
        return ts(y, m, d) + shift

    def enc(pid: str, n: int, cls: str, start: datetime, end: datetime) -> dict[str, Any]:
        return {
            "id": f"e{pid[0]}{n}",
            "patient_id": pid,
            "class_code": cls,
            "period_start": start,
            "period_end": end,
        }

    return {
        "patient": [
            {
                "id": A,
                "gender": "female",
                "birth_date": date(1960, 6, 15) + shift,
                "race_code": "2106-3",
                "ethnicity_code": "2186-5",
            },
            {
                "id": B,
                "gender": "male",
                "birth_date": date(1925, 3, 1) + shift,
                "race_code": "2054-5",
                "ethnicity_code": "2135-2",
            },
            {
                "id": C,
                "gender": "male",
                "birth_date": date(1970, 1, 1) + shift,
                "race_code": "2106-3",
                "ethnicity_code": "2186-5",
            },
            {
                "id": D,
                "gender": "female",
                "birth_date": date(1980, 1, 1) + shift,
                "race_code": "2028-9",
                "ethnicity_code": "2186-5",
            },
        ],
        "consent": [
            {
                "id": "k1",
                "patient_id": A,
                "status": "active",
                "scope_code": "research",
                "policy_rule_code": "OPTIN",
                "provision_type": "permit",
            },
            {
                "id": "k2",
                "patient_id": C,
                "status": "active",
                "scope_code": "research",
                "policy_rule_code": "OPTOUT",
                "provision_type": "deny",
            },
            {
                "id": "k3",
                "patient_id": D,
                "status": "inactive",
                "scope_code": "research",
                "policy_rule_code": "OPTOUT",
                "provision_type": "deny",
            },
        ],
        "encounter": [
            enc(A, 1, "AMB", at(2024, 1, 1), at(2024, 1, 1)),
            enc(A, 2, "EMER", at(2024, 3, 1), at(2024, 3, 1)),
            enc(A, 3, "IMP", at(2024, 3, 10), at(2024, 3, 15)),
            enc(A, 4, "AMB", at(2024, 4, 1), at(2024, 4, 1)),
            enc(A, 5, "IMP", at(2024, 6, 1), at(2024, 6, 4)),
            enc(A, 6, "AMB", at(2024, 7, 1), at(2024, 7, 1)),
            enc(B, 1, "AMB", at(2024, 5, 1), at(2024, 5, 1)),
            enc(C, 1, "IMP", at(2024, 2, 1), at(2024, 2, 3)),
            enc(D, 1, "AMB", at(2024, 2, 1), at(2024, 2, 1)),
        ],
        "condition": [
            # A: diabetes (ICD-10-CM E11.9 and SNOMED), CHF from 2024-03-10, metastatic cancer
            {
                "id": "c1",
                "patient_id": A,
                "verification_status": "confirmed",
                "onset_date_time": at(2024, 1, 1),
                "code_system": ICD,
                "code": "E11.9",
            },
            {
                "id": "c1",
                "patient_id": A,
                "verification_status": "confirmed",
                "onset_date_time": at(2024, 1, 1),
                "code_system": SNOMED,
                "code": "44054006",
            },
            {
                "id": "c2",
                "patient_id": A,
                "verification_status": "confirmed",
                "onset_date_time": None,
                "recorded_date": at(2024, 3, 10),
                "code_system": SNOMED,
                "code": "84114007",
            },
            {
                "id": "c3",
                "patient_id": A,
                "verification_status": "confirmed",
                "onset_date_time": at(2024, 4, 1),
                "code_system": ICD,
                "code": "C34.90",
            },
            {
                "id": "c4",
                "patient_id": A,
                "verification_status": "confirmed",
                "onset_date_time": at(2024, 4, 1),
                "code_system": ICD,
                "code": "C78.00",
            },
            # refuted: never counts
            {
                "id": "c5",
                "patient_id": A,
                "verification_status": "refuted",
                "onset_date_time": at(2024, 1, 1),
                "code_system": ICD,
                "code": "J44.9",
            },
            {
                "id": "c6",
                "patient_id": C,
                "verification_status": "confirmed",
                "onset_date_time": at(2024, 2, 1),
                "code_system": ICD,
                "code": "I10",
            },
            {
                "id": "c7",
                "patient_id": D,
                "verification_status": "confirmed",
                "onset_date_time": at(2024, 2, 1),
                "code_system": ICD,
                "code": "I10",
            },
        ],
        "observation": [
            {
                "id": "o1",
                "patient_id": A,
                "status": "final",
                "code": "4548-4",
                "value_quantity": 7.0,
                "effective_date_time": at(2024, 1, 1),
            },
            {
                "id": "o2",
                "patient_id": A,
                "status": "final",
                "code": "4548-4",
                "value_quantity": 9.0,
                "effective_date_time": at(2024, 3, 10),
            },
            {
                "id": "o3",
                "patient_id": A,
                "status": "final",
                "code": "85354-9",
                "component_code": "8480-6",
                "value_quantity": 140.0,
                "effective_date_time": at(2024, 3, 10),
            },
            {
                "id": "o3",
                "patient_id": A,
                "status": "final",
                "code": "85354-9",
                "component_code": "8462-4",
                "value_quantity": 90.0,
                "effective_date_time": at(2024, 3, 10),
            },
            {
                "id": "o4",
                "patient_id": A,
                "status": "entered-in-error",
                "code": "4548-4",
                "value_quantity": 15.0,
                "effective_date_time": at(2024, 3, 20),
            },
            # more than 365 days after the first: the mean then only holds the later values
            {
                "id": "o5",
                "patient_id": A,
                "status": "final",
                "code": "4548-4",
                "value_quantity": 8.0,
                "effective_date_time": at(2025, 1, 5),
            },
            {
                "id": "o6",
                "patient_id": C,
                "status": "final",
                "code": "4548-4",
                "value_quantity": 6.0,
                "effective_date_time": at(2024, 2, 1),
            },
            # an HbA1c in mmol/mol (IFCC), not the % its feature is in: left out, counted
            {
                "id": "o7",
                "patient_id": A,
                "status": "final",
                "code": "4548-4",
                "value_quantity": 53.0,
                "value_unit": "mmol/mol",
                "effective_date_time": at(2024, 6, 1),
            },
        ],
        "medication_request": [
            {
                "id": f"m{i}",
                "patient_id": A,
                "status": status,
                "authored_on": when,
                "medication_system": RXNORM,
                "medication_code": code,
            }
            for i, (code, status, when) in enumerate(
                [
                    ("860975", "active", at(2024, 1, 1)),  # metformin
                    ("311041", "active", at(2024, 1, 1)),  # insulin
                    ("314076", "active", at(2024, 3, 10)),  # lisinopril
                    ("617312", "completed", at(2024, 3, 10)),  # atorvastatin, recent only
                    ("855332", "active", at(2024, 3, 15)),  # warfarin
                    ("312940", "stopped", at(2024, 3, 15)),  # sertraline, recent only
                    ("308182", "entered-in-error", at(2024, 3, 15)),  # never
                ]
            )
        ]
        + [
            {
                "id": "mc",
                "patient_id": C,
                "status": "active",
                "authored_on": at(2024, 2, 1),
                "medication_system": RXNORM,
                "medication_code": "314076",
            },
        ],
    }


# the patient of the lab tests' crafted FHIR
LAB_PATIENT: dict[str, Any] = {"resourceType": "Patient", "id": "p1", "birthDate": "1960-06-15"}


def lab_result(
    rid: str, code: str, quantity: dict[str, Any], measured: str, issued: str | None = None
) -> dict[str, Any]:
    """A final, LOINC-coded Observation of ``LAB_PATIENT`` (FHIR)."""
    result: dict[str, Any] = {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "valueQuantity": quantity,
        "effectiveDateTime": measured,
    }
    if issued is not None:
        result["issued"] = issued
    return result


def released_records(
    records: dict[str, list[dict[str, Any]]], key: bytes, today: date
) -> dict[str, list[dict[str, Any]]]:
    """Each patient's FHIR resources as the research release writes them (the real
    de-identification, in the patient's own scope), in the order given."""
    policy = Policy.shipped("research")
    engine = Deidentifier(policy, DeidSecrets.derive(key, policy), today=today)
    return {
        patient: [engine.apply(r, patient_scope=patient).resource for r in resources]
        for patient, resources in records.items()
    }


def released_pseudonyms(released: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """Each patient's pseudonym: the id of their released Patient resource."""
    return {
        patient: next(r["id"] for r in resources if r["resourceType"] == "Patient")
        for patient, resources in released.items()
    }


def features_from_fhir(resources: list[dict[str, Any]], out_dir: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory database with ``views.*`` built from FHIR ``resources`` through the shipped
    ViewDefinitions, and the feature tables built over them."""
    con = duckdb.connect()
    for view in load_views():
        mine = [r for r in resources if r["resourceType"] == view.resource]
        write_view_table(con, view, mine, f"views.{view.name}")
    build_feature_tables(con, out_dir)
    return con


def value_at(
    con: duckdb.DuckDBPyConnection, table: str, column: str, at: datetime, patient: str
) -> Any:
    """The value a point-in-time read gives at ``at``, worked out here: the patient's latest
    row at or before it (None before their first row)."""
    rows = con.execute(
        f"SELECT event_timestamp, {column} FROM features.{table} WHERE patient_id = ?", [patient]
    ).fetchall()
    earlier = [(ts, value) for ts, value in rows if ts <= at]
    return max(earlier, key=lambda row: row[0])[1] if earlier else None
