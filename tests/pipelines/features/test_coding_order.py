"""A code is read from the coding of the system it is defined in, wherever that coding stands
among a CodeableConcept's codings. Sources often list a local code first: an HbA1c coded
[local, LOINC], metformin [local, RxNorm], a consent whose scope and policy rule are
[local, standard], a verification status [local, standard], a discharge disposition
[local, HL7]. Read from the first coding, the HbA1c and the metformin counted nowhere, an
opted-out patient stayed in every feature table, a refuted diabetes counted, and a death at
discharge was labelled as a discharge home.

FHIR resources go through the shipped ViewDefinitions and the feature SQL; what each resource
says is worked out here by picking, in Python, the coding of the standard system."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest

from pipelines.models.labels import readmission_labels_with_counts
from tests.pipelines.features.crafted import features_from_fhir, value_at

LOCAL = "urn:oid:1.2.840.99999.1"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
VER = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
DISPOSITION = "http://terminology.hl7.org/CodeSystem/discharge-disposition"


def _concept(*codings: tuple[str, str]) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code} for system, code in codings]}


def _subject(patient: str) -> dict[str, str]:
    return {"reference": f"Patient/{patient}"}


def _encounter(eid: str, patient: str, cls: str, start: str, end: str, **more: Any) -> dict:
    return {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "class": {"code": cls},
        "subject": _subject(patient),
        "period": {"start": start, "end": end},
        **more,
    }


RESOURCES: list[dict[str, Any]] = [
    {"resourceType": "Patient", "id": "p1", "birthDate": "1960-06-15"},
    _encounter("e1", "p1", "AMB", "2024-01-01T09:00:00Z", "2024-01-01T09:30:00Z"),
    {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "subject": _subject("p1"),
        "code": _concept((LOCAL, "HBA1C"), (LOINC, "4548-4")),
        "valueQuantity": {"value": 8.2},
        "effectiveDateTime": "2024-01-01T10:00:00Z",
    },
    {
        "resourceType": "MedicationRequest",
        "id": "m1",
        "status": "active",
        "intent": "order",
        "subject": _subject("p1"),
        "authoredOn": "2024-01-02T10:00:00Z",
        "medicationCodeableConcept": _concept((LOCAL, "MET500"), (RXNORM, "860975")),
    },
    {
        "resourceType": "Condition",
        "id": "c1",
        "subject": _subject("p1"),
        "verificationStatus": _concept((LOCAL, "RULED-OUT"), (VER, "refuted")),
        "code": _concept((ICD, "E11.9")),
        "recordedDate": "2024-01-03T10:00:00Z",
    },
    # p2 opted out of research, in a consent whose local codes come first
    {"resourceType": "Patient", "id": "p2", "birthDate": "1970-01-01"},
    _encounter("e2", "p2", "AMB", "2024-01-05T09:00:00Z", "2024-01-05T09:30:00Z"),
    {
        "resourceType": "Consent",
        "id": "k2",
        "status": "active",
        "patient": _subject("p2"),
        "scope": _concept((LOCAL, "RES"), (SCOPE, "research")),
        "category": [_concept((LOINC, "59284-0"))],
        "policyRule": _concept((LOCAL, "NO-RESEARCH"), (ACT, "OPTOUT")),
        "provision": {"type": "permit"},
    },
    # p3 died at the end of a stay, coded [local, HL7]
    {"resourceType": "Patient", "id": "p3", "birthDate": "1950-01-01"},
    _encounter(
        "e3",
        "p3",
        "IMP",
        "2024-02-01T09:00:00Z",
        "2024-02-05T09:00:00Z",
        hospitalization={"dischargeDisposition": _concept((LOCAL, "D9"), (DISPOSITION, "exp"))},
    ),
    _encounter("e4", "p1", "AMB", "2024-12-01T09:00:00Z", "2024-12-01T09:30:00Z"),  # data end
]


def _standard(concept: dict[str, Any], system: str) -> str | None:
    """The code of the coding of ``system``, picked here by hand."""
    return next((c["code"] for c in concept["coding"] if c["system"] == system), None)


def _resource(rid: str) -> dict[str, Any]:
    return next(r for r in RESOURCES if r.get("id") == rid)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> duckdb.DuckDBPyConnection:
    return features_from_fhir(RESOURCES, Path(tmp_path_factory.mktemp("coding")))


def test_a_lab_and_a_medication_are_read_from_their_standard_coding(
    built: duckdb.DuckDBPyConnection,
) -> None:
    at = datetime.fromisoformat("2024-01-04T00:00:00Z")
    lab = _resource("o1")
    assert _standard(lab["code"], LOINC) == "4548-4"  # HbA1c
    assert value_at(built, "patient_labs_vitals", "hba1c_latest", at, "p1") == pytest.approx(
        lab["valueQuantity"]["value"]
    )
    assert _standard(_resource("m1")["medicationCodeableConcept"], RXNORM) == "860975"
    assert value_at(built, "patient_medications", "on_metformin", at, "p1") is True


def test_a_refuted_diagnosis_coded_after_a_local_code_does_not_count(
    built: duckdb.DuckDBPyConnection,
) -> None:
    assert _standard(_resource("c1")["verificationStatus"], VER) == "refuted"
    at = datetime.fromisoformat("2024-01-04T00:00:00Z")
    assert value_at(built, "patient_comorbidities", "has_diabetes", at, "p1") is False


def test_an_opt_out_coded_after_local_codes_keeps_the_patient_out(
    built: duckdb.DuckDBPyConnection,
) -> None:
    consent = _resource("k2")
    opted_out = (
        _standard(consent["scope"], SCOPE) == "research"
        and _standard(consent["policyRule"], ACT) == "OPTOUT"
    )
    assert opted_out
    for (table,) in built.execute(
        "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'features'"
    ).fetchall():
        ((rows,),) = built.execute(
            f"SELECT count(*) FROM features.{table} WHERE patient_id = 'p2'"
        ).fetchall()
        assert rows == 0, table


def test_a_death_coded_after_a_local_disposition_is_no_discharge_to_label(
    built: duckdb.DuckDBPyConnection,
) -> None:
    stay = _resource("e3")
    assert _standard(stay["hospitalization"]["dischargeDisposition"], DISPOSITION) == "exp"
    labels, counts = readmission_labels_with_counts(built)
    assert "p3" not in set(labels["patient_id"])
    assert counts.died == 1
