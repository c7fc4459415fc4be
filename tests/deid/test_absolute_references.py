"""A reference written as an absolute URL that is the ``fullUrl`` of an entry of its Bundle
(``http://hospital.example/fhir/Patient/p1``, as a FHIR server's searchset or an export with
absolute fullUrls writes it) is resolved by ingest to that entry, and the release keeps it as
the pseudonymous literal reference (``Patient/<pseudonym>``): the resource is its patient's,
the views give it that patient, and a prescription naming a Medication so counts. Before, the
release read such a reference by its text only (this server's base, not configured, or another
server's), dropped it, and the patient's requests were released with no patient. An absolute
URL of another server, named by no entry, is still dropped.

The pseudonyms expected are computed here with the key."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import orjson

from deid.policy import Policy
from deid.staging import publish_batch
from vault import warehouse
from vault.ingest import ingest_batch
from vault.keys import FileKeyProvider
from vault.pseudonym import Pseudonymizer

TODAY = date(2026, 11, 28)
BASE = "http://hospital.example/fhir"
ELSEWHERE = "http://other.example/fhir"
RX = "http://www.nlm.nih.gov/research/umls/rxnorm"


def _bundle(pid: str) -> dict[str, Any]:
    patient = f"{BASE}/Patient/{pid}"
    medication = f"{BASE}/Medication/{pid}-m"
    resources = [
        {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1960-06-15"},
        {
            "resourceType": "Medication",
            "id": f"{pid}-m",
            "code": {"coding": [{"system": RX, "code": "860975"}]},
        },
        {
            "resourceType": "MedicationRequest",
            "id": f"{pid}-r",
            "status": "active",
            "intent": "order",
            "subject": {"reference": patient},
            "medicationReference": {"reference": medication},
            "authoredOn": "2024-03-01T10:00:00Z",
        },
        {
            "resourceType": "MedicationRequest",
            "id": f"{pid}-elsewhere",
            "status": "active",
            "intent": "order",
            "subject": {"reference": f"{ELSEWHERE}/Patient/{pid}"},
            "medicationCodeableConcept": {"coding": [{"system": RX, "code": "860975"}]},
            "authoredOn": "2024-03-01T10:00:00Z",
        },
    ]
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": f"{BASE}/{r['resourceType']}/{r['id']}", "resource": r} for r in resources
        ],
    }


def test_an_absolute_reference_to_an_entry_of_its_bundle_is_released_resolved(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    folder = tmp_path / "landing" / "b1"
    folder.mkdir(parents=True)
    (folder / "p1.json").write_text(json.dumps(_bundle("p1")))
    report = ingest_batch(tmp_path / "w.duckdb", "b1", folder, key_provider, workers=1)
    assert report.accepted == 4
    con = warehouse.connect(tmp_path / "w.duckdb")
    try:
        release = publish_batch(con, key_provider, "b1", Policy.shipped("research"), today=TODAY)
        assert release.published and release.scan.passed
        rows = con.execute(
            "SELECT resource, patient_id FROM deid_resources "
            "WHERE resource_type = 'MedicationRequest'"
        ).fetchall()
    finally:
        con.close()
    key = Pseudonymizer(key_provider.pseudonym_key()).resource_key
    released = {orjson.loads(text)["id"]: (orjson.loads(text), pid) for text, pid in rows}
    ours, ours_patient = released[key("MedicationRequest", "p1-r")]
    assert ours["subject"] == {"reference": f"Patient/{key('Patient', 'p1')}"}
    assert ours["medicationReference"] == {"reference": f"Medication/{key('Medication', 'p1-m')}"}
    assert ours_patient == key("Patient", "p1")
    # another server's Patient/p1 is not ours: dropped, the request is no patient's
    theirs, theirs_patient = released[key("MedicationRequest", "p1-elsewhere")]
    assert "subject" not in theirs and theirs_patient is None
