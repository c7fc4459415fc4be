"""A prescription that names its drug by ``medicationReference`` counts as one that codes it.

Epic and Cerner exports often send the drug as a contained Medication (``"#m1"``) or as a
Medication resource of the same export (``Medication/abc``) instead of a
``medicationCodeableConcept``. The view read the code only from the latter: such a
prescription had no code, and counted in no medication feature. The research release dropped
``contained`` too, so the drug could not have been read from the release anyway.

Each patient's record goes through the research release (the real de-identification; a
Medication resource belongs to no patient and is released in no patient's scope), the shipped
ViewDefinitions and the feature SQL. What each feature should be is written out here from the
crafted prescriptions."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest

from deid.engine import Deidentifier, DeidSecrets
from deid.policy import Policy
from tests.pipelines.features.crafted import (
    features_from_fhir,
    released_pseudonyms,
    released_records,
)

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOCAL = "urn:oid:1.2.840.99999.7"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
TODAY = date(2026, 11, 28)
KEY = b"\x0c" * 32
# text a source put beside the drug's code: none of it may leave the vault
SECRET_TEXT = "Metformin for Jane Q Doormouse"
SECRET_ID = "MRN-7730042"

AMLODIPINE = "197361"  # antihypertensive
METFORMIN = "860975"
ATORVASTATIN = "617312"  # statin


def _concept(*codings: tuple[str, str]) -> dict[str, Any]:
    return {"coding": [{"system": s, "code": c} for s, c in codings], "text": SECRET_TEXT}


def _medication(mid: str, concept: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Medication",
        "id": mid,
        "identifier": [{"system": "urn:oid:1.2.3", "value": SECRET_ID}],
        "code": concept,
        "status": "active",
    }


def _request(rid: str, patient: str, **drug: Any) -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "id": rid,
        "status": "active",
        "intent": "order",
        "subject": {"reference": f"Patient/{patient}"},
        "authoredOn": "2024-03-01T10:00:00Z",
        **drug,
    }


def _contained(rid: str, patient: str, local_id: str, concept: dict[str, Any]) -> dict:
    return _request(
        rid,
        patient,
        contained=[_medication(local_id, concept)],
        medicationReference={"reference": f"#{local_id}", "display": SECRET_TEXT},
    )


# the Medication resource the "standalone" patient's prescription names (no patient's own)
STANDALONE = _medication("med-abc", _concept((LOCAL, "ATV40"), (RXNORM, ATORVASTATIN)))

# patient -> their prescriptions
PRESCRIPTIONS: dict[str, list[dict[str, Any]]] = {
    # as today: the code in the request itself
    "concept": [
        _request("r-concept", "concept", medicationCodeableConcept=_concept((RXNORM, METFORMIN)))
    ],
    # a contained Medication, its RxNorm coding after a local one; a second request whose
    # contained Medication has the same local id (ids are local to their container)
    "contained": [
        _contained("r-c1", "contained", "m1", _concept((LOCAL, "AML5"), (RXNORM, AMLODIPINE))),
        _contained("r-c2", "contained", "m1", _concept((RXNORM, METFORMIN))),
    ],
    "standalone": [
        _request("r-sa", "standalone", medicationReference={"reference": "Medication/med-abc"})
    ],
    # neither form, or a reference to a contained Medication the request does not hold: no
    # drug, as before
    "absent": [
        _request("r-absent", "absent"),
        _request("r-dangling", "absent", medicationReference={"reference": "#nowhere"}),
    ],
}

# Written out from PRESCRIPTIONS: every one is active and authored on 2024-03-01
# (active_medication_count, medications_180d, polypharmacy, on_metformin,
# on_antihypertensive, on_statin)
EXPECTED: dict[str, tuple[int, int, bool, bool, bool, bool]] = {
    "concept": (1, 1, False, True, False, False),
    "contained": (2, 2, False, True, True, False),
    "standalone": (1, 1, False, False, False, True),
    "absent": (0, 0, False, False, False, False),
}
COLUMNS = (
    "active_medication_count, medications_180d, polypharmacy, on_metformin, "
    "on_antihypertensive, on_statin"
)


def _record(patient: str) -> list[dict[str, Any]]:
    return [
        {"resourceType": "Patient", "id": patient, "birthDate": "1960-06-15"},
        {
            "resourceType": "Encounter",
            "id": f"{patient}-e1",
            "status": "finished",
            "class": {"system": ACT, "code": "AMB"},
            "subject": {"reference": f"Patient/{patient}"},
            "period": {"start": "2024-03-01T09:00:00Z", "end": "2024-03-01T09:30:00Z"},
        },
        *PRESCRIPTIONS[patient],
    ]


def _released_shared(resource: dict[str, Any]) -> dict[str, Any]:
    """A resource of no patient's compartment as the research release writes it."""
    policy = Policy.shipped("research")
    engine = Deidentifier(policy, DeidSecrets.derive(KEY, policy), today=TODAY)
    return engine.apply(resource).resource


@pytest.fixture(scope="module")
def released(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[duckdb.DuckDBPyConnection, dict[str, str], list[dict[str, Any]]]:
    """The feature tables built from the release, each patient's pseudonym, and every
    released resource."""
    by_patient = released_records({p: _record(p) for p in PRESCRIPTIONS}, KEY, TODAY)
    out = [r for resources in by_patient.values() for r in resources]
    out.append(_released_shared(STANDALONE))
    pseudonym = released_pseudonyms(by_patient)
    con = features_from_fhir(out, Path(tmp_path_factory.mktemp("medref")))
    return con, pseudonym, out


def test_a_drug_named_by_reference_counts_in_the_medication_features(released: tuple) -> None:
    con, pseudonym, _ = released
    for patient, expected in EXPECTED.items():
        # the latest row: dates are shifted by at most 50 days each way, so the data end is
        # within 100 days of every prescription (active, and recent: 180 days)
        rows = con.execute(
            f"SELECT {COLUMNS} FROM features.patient_medications "
            "WHERE patient_id = ? ORDER BY event_timestamp DESC LIMIT 1",
            [pseudonym[patient]],
        ).fetchall()
        assert rows == [expected], patient


def test_the_view_reads_the_contained_drug_and_keys_the_referenced_one(released: tuple) -> None:
    con, pseudonym, _ = released
    rows = con.execute(
        "SELECT medication_system, medication_code, medication_id FROM views.medication_request "
        "WHERE patient_id = ? ORDER BY medication_code",
        [pseudonym["contained"]],
    ).fetchall()
    assert rows == [(RXNORM, AMLODIPINE, None), (RXNORM, METFORMIN, None)]
    ((medication_id,),) = con.execute(
        "SELECT medication_id FROM views.medication_request WHERE patient_id = ?",
        [pseudonym["standalone"]],
    ).fetchall()
    drug = con.execute(
        "SELECT code_system, code FROM views.medication WHERE id = ?", [medication_id]
    ).fetchall()
    assert drug == [(RXNORM, ATORVASTATIN)]
    assert medication_id != STANDALONE["id"]  # the pseudonym, never the source's id


def test_only_codes_of_the_drug_leave(released: tuple) -> None:
    _, _, out = released
    text = orjson.dumps(out).decode()
    for secret in (SECRET_TEXT, SECRET_ID, "med-abc", "Doormouse"):
        assert secret not in text
    contained = [
        c for r in out if r["resourceType"] == "MedicationRequest" for c in r.get("contained", [])
    ]
    assert {c["id"] for c in contained} == {"c0"}  # renamed by place, never the source's id
    assert all(set(c) <= {"resourceType", "id", "status", "code"} for c in contained)
