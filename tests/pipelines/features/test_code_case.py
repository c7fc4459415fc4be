"""An ICD-10-CM diagnosis counts however its source cased it. Each Condition goes through the
research release profile (the real de-identification), the shipped ViewDefinitions and the
feature SQL.

ICD-10-CM codes do not depend on case, but the release read a lower-case code (``i50.9``) as no
ICD-10-CM code at all and withheld it (``code_malformed``): the view read NULL system and code,
and heart failure and the Charlson index were never set, while ``I50.9`` and ``I509`` counted.
The release now writes such a code upper-cased, the code the value sets list.

What each patient's flags and index should be is written here by hand."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

import duckdb
import pytest

from tests.pipelines.features.crafted import (
    features_from_fhir,
    released_pseudonyms,
    released_records,
)

ICD = "http://hl7.org/fhir/sid/icd-10-cm"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
TODAY = date(2026, 11, 28)
KEY = b"\x0b" * 32

# patient -> the ICD-10-CM code of their one diagnosis (None: no diagnosis)
DIAGNOSES: dict[str, str | None] = {
    "lower-dotted": "i50.9",
    "lower-undotted": "i509",
    "upper-dotted": "I50.9",
    "lower-subcode": "i50.810",
    "not-a-code": "i50.9 heart failure",
    "no-diagnosis": None,
}
# read from DIAGNOSES by hand: heart failure (ICD-10-CM I50) is Charlson congestive heart
# failure, weight 2 (Quan 2011); the sentence is no code and counts for nothing
EXPECTED: dict[str, tuple[bool, int]] = {
    "lower-dotted": (True, 2),
    "lower-undotted": (True, 2),
    "upper-dotted": (True, 2),
    "lower-subcode": (True, 2),
    "not-a-code": (False, 0),
    "no-diagnosis": (False, 0),
}


def _encounter(eid: str, patient: str, start: str, end: str) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "class": {"system": ACT, "code": "AMB"},
        "subject": {"reference": f"Patient/{patient}"},
        "period": {"start": start, "end": end},
    }


def _record(patient: str, code: str | None) -> list[dict[str, Any]]:
    resources: list[dict[str, Any]] = [
        {"resourceType": "Patient", "id": patient, "birthDate": "1960-06-15"},
        _encounter(f"{patient}-1", patient, "2024-03-01T09:00:00Z", "2024-03-01T09:30:00Z"),
        _encounter(f"{patient}-2", patient, "2024-09-01T09:00:00Z", "2024-09-01T09:30:00Z"),
    ]
    if code is not None:
        resources.append(
            {
                "resourceType": "Condition",
                "id": f"{patient}-dx",
                "subject": {"reference": f"Patient/{patient}"},
                "code": {"coding": [{"system": ICD, "code": code}]},
                "recordedDate": "2024-03-01T10:00:00Z",
            }
        )
    return resources


@pytest.fixture(scope="module")
def released(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[duckdb.DuckDBPyConnection, dict[str, str], dict[str, dict[str, Any]]]:
    """The feature tables built from the released resources, each patient's pseudonym, and
    each patient's released Condition."""
    by_patient = released_records(
        {patient: _record(patient, code) for patient, code in DIAGNOSES.items()}, KEY, TODAY
    )
    out = [r for resources in by_patient.values() for r in resources]
    pseudonym = released_pseudonyms(by_patient)
    conditions = {
        p: r for p, rs in by_patient.items() for r in rs if r["resourceType"] == "Condition"
    }
    con = features_from_fhir(out, Path(tmp_path_factory.mktemp("codecase")))
    return con, pseudonym, conditions


def test_a_lower_case_icd10cm_code_is_released_upper_cased(released: tuple) -> None:
    _, _, conditions = released
    assert conditions["lower-dotted"]["code"]["coding"] == [{"system": ICD, "code": "I50.9"}]
    assert conditions["lower-undotted"]["code"]["coding"] == [{"system": ICD, "code": "I509"}]
    assert conditions["lower-subcode"]["code"]["coding"] == [{"system": ICD, "code": "I50.810"}]
    assert "code" not in conditions["not-a-code"]


def test_the_condition_view_reads_the_released_code(released: tuple) -> None:
    con, pseudonym, _ = released
    rows = con.execute(
        "SELECT code_system, code FROM views.condition WHERE patient_id = ?",
        [pseudonym["lower-dotted"]],
    ).fetchall()
    assert rows == [(ICD, "I50.9")]


def test_heart_failure_and_the_charlson_index_count_a_lower_case_code(released: tuple) -> None:
    con, pseudonym, _ = released
    for patient, expected in EXPECTED.items():
        latest = con.execute(
            "SELECT has_heart_failure, charlson_index FROM features.patient_comorbidities "
            "WHERE patient_id = ? ORDER BY event_timestamp DESC LIMIT 1",
            [pseudonym[patient]],
        ).fetchall()
        assert latest == [expected], patient
