"""A diagnosis coded in WHO's ICD-10 counts as its ICD-10-CM twin: the value sets' ICD codes are
Quan's ICD-10 categories (each file's description), which ICD-10-CM keeps with their meaning. An
ICD-9-CM code is read by no value set. Conditions go through the shipped ViewDefinitions and
the feature SQL; each patient's flag and index are written here by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.pipelines.features.crafted import features_from_fhir

ICD10_WHO = "http://hl7.org/fhir/sid/icd-10"
ICD10_CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD9_CM = "http://hl7.org/fhir/sid/icd-9-cm"
# patient -> (system, code) of their one diagnosis
DIAGNOSES = {
    "who-heart-failure": (ICD10_WHO, "I50.9"),
    "cm-heart-failure": (ICD10_CM, "I50.9"),
    "who-routine-exam": (ICD10_WHO, "Z00.0"),
    "icd9-heart-failure": (ICD9_CM, "428.0"),
}
# by hand: I50 is Charlson congestive heart failure, weight 2 (Quan 2011); Z00.0 is no
# comorbidity; ICD-9-CM is no system the value sets list
EXPECTED = {
    "who-heart-failure": (True, 2),
    "cm-heart-failure": (True, 2),
    "who-routine-exam": (False, 0),
    "icd9-heart-failure": (False, 0),
}


def _record(patient: str, system: str, code: str) -> list[dict[str, Any]]:
    return [
        {"resourceType": "Patient", "id": patient, "birthDate": "1960-06-15"},
        {
            "resourceType": "Encounter",
            "id": f"{patient}-visit",
            "status": "finished",
            "class": {"code": "AMB"},
            "subject": {"reference": f"Patient/{patient}"},
            "period": {"start": "2024-03-01T09:00:00Z", "end": "2024-03-01T09:30:00Z"},
        },
        {
            "resourceType": "Condition",
            "id": f"{patient}-dx",
            "subject": {"reference": f"Patient/{patient}"},
            "code": {"coding": [{"system": system, "code": code}]},
            "recordedDate": "2024-03-01T10:00:00Z",
        },
    ]


@pytest.fixture(scope="module")
def con(tmp_path_factory: pytest.TempPathFactory) -> Any:
    resources = [r for p, (system, code) in DIAGNOSES.items() for r in _record(p, system, code)]
    return features_from_fhir(resources, Path(tmp_path_factory.mktemp("who")))


@pytest.mark.parametrize("patient", sorted(EXPECTED))
def test_an_icd10_diagnosis_counts_as_its_icd10cm_twin(con: Any, patient: str) -> None:
    latest = con.execute(
        "SELECT has_heart_failure, charlson_index FROM features.patient_comorbidities "
        "WHERE patient_id = ? ORDER BY event_timestamp DESC LIMIT 1",
        [patient],
    ).fetchall()
    assert latest == [EXPECTED[patient]]
