"""A resource whose patient is given by a logical reference (``subject.identifier``, no
``reference``) is filed under the Patient holding that identifier, exactly as the conditional
form ``Patient?identifier=system|value`` is: released under that patient's pseudonym, with
that patient's date shift, and without the identifier."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import pytest

from deid.policy import Policy
from deid.release import scan_released_batch
from deid.staging import deidentified_batches, publish_batch
from pipelines.views.tables import load_views, run_view_over_release
from vault import warehouse
from vault.ingest import IngestReport, ingest_batch
from vault.keys import FileKeyProvider
from vault.pseudonym import Pseudonymizer

TODAY = date(2026, 11, 28)
MRN_SYSTEM = "http://hospital.example.org/mrn"
MRN = "12345"
LOGICAL = {"identifier": {"system": MRN_SYSTEM, "value": MRN}}
CONDITIONAL = {"reference": f"Patient?identifier={MRN_SYSTEM}|{MRN}"}
INDEX_STAY = "2020-01-01"
READMISSION = "2020-01-11"  # ten days after the index stay


def _patient(pid: str, mrn: str = MRN) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": pid,
        "identifier": [{"system": MRN_SYSTEM, "value": mrn}],
        "gender": "female",
        "birthDate": "1950-03-04",
    }


def _encounter(eid: str, start: str, subject: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
        "subject": subject,
        "period": {"start": start, "end": start},
    }


def _ingest(
    root: Path, batch: str, records: list[dict[str, Any]], provider: FileKeyProvider
) -> IngestReport:
    folder = root / "landing" / batch
    folder.mkdir(parents=True)
    (folder / "part.ndjson").write_text("".join(json.dumps(r) + "\n" for r in records))
    return ingest_batch(root / "w.duckdb", batch, folder, provider, workers=1)


def _publish(root: Path, provider: FileKeyProvider, *batches: str) -> dict[str, dict[str, Any]]:
    """Publish the batches; the released Encounters by their original id, each with the
    ``patient_id`` column it was released under."""
    pseudo = Pseudonymizer(provider.pseudonym_key())
    con = warehouse.connect(root / "w.duckdb")
    try:
        for batch in batches:
            release = publish_batch(con, provider, batch, Policy.shipped("research"), today=TODAY)
            assert release.published and release.scan.passed, release.scan.by_kind()
        rows = con.execute(
            "SELECT id, patient_id, resource FROM deid_resources WHERE resource_type = 'Encounter'"
        ).fetchall()
    finally:
        con.close()
    released = {rid: {**orjson.loads(text), "patient_id": pid} for rid, pid, text in rows}
    return {
        eid: released[key]
        for eid in ("e-literal", "e-logical", "e-conditional", "e-unknown")
        if (key := pseudo.resource_key("Encounter", eid)) in released
    }


def _shift(released: dict[str, Any], original_start: str) -> int:
    moved = date.fromisoformat(released["period"]["start"][:10])
    return (moved - date.fromisoformat(original_start)).days


def _assert_under_the_patient(
    released: dict[str, dict[str, Any]], provider: FileKeyProvider
) -> None:
    """The logical reference lands where the literal and the conditional ones do: the same
    patient pseudonym, in the column and in the released reference, and the same date shift
    (so the readmission is still ten days after the index stay)."""
    patient = Pseudonymizer(provider.pseudonym_key()).resource_key("Patient", "p1")
    shift = _shift(released["e-literal"], INDEX_STAY)
    assert shift != 0
    for eid, start in (("e-logical", READMISSION), ("e-conditional", "2020-01-21")):
        assert released[eid]["patient_id"] == patient, eid
        assert released[eid]["subject"] == {"reference": f"Patient/{patient}"}, eid
        assert _shift(released[eid], start) == shift, eid
    assert MRN_SYSTEM not in json.dumps(released) and MRN not in json.dumps(released)


def test_a_logical_reference_files_the_resource_under_its_patient_within_one_batch(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    report = _ingest(
        tmp_path,
        "b1",
        [
            _encounter("e-logical", READMISSION, LOGICAL),  # before its Patient in the batch
            _patient("p1"),
            _encounter("e-literal", INDEX_STAY, {"reference": "Patient/p1"}),
            _encounter("e-conditional", "2020-01-21", CONDITIONAL),
        ],
        key_provider,
    )
    _assert_under_the_patient(_publish(tmp_path, key_provider, "b1"), key_provider)
    assert report.references == 3 and report.unresolved_references == 0


def test_a_logical_reference_finds_a_patient_of_an_earlier_batch(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    _ingest(
        tmp_path,
        "b1",
        [_patient("p1"), _encounter("e-literal", INDEX_STAY, {"reference": "Patient/p1"})],
        key_provider,
    )
    report = _ingest(
        tmp_path,
        "b2",
        [
            _encounter("e-logical", READMISSION, LOGICAL),
            _encounter("e-conditional", "2020-01-21", CONDITIONAL),
        ],
        key_provider,
    )
    assert report.unresolved_patient_references == 0
    _assert_under_the_patient(_publish(tmp_path, key_provider, "b1", "b2"), key_provider)
    # the view reads the patient from the released reference: the stay is the patient's
    con = warehouse.connect(tmp_path / "w.duckdb")
    try:
        (view,) = [v for v in load_views() if v.resource == "Encounter"]
        run_view_over_release(con, view, tmp_path / "work")
        rows = con.execute(f"SELECT * FROM views.{view.name}").fetchall()
        patients = con.execute(f"SELECT DISTINCT patient_id FROM views.{view.name}").fetchall()
    finally:
        con.close()
    assert len(rows) == 3 and patients == [
        (Pseudonymizer(key_provider.pseudonym_key()).resource_key("Patient", "p1"),)
    ]
    assert not any(MRN in str(value) for row in rows for value in row)


def test_a_logical_reference_to_no_patient_is_counted_and_filed_under_none(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    unknown = {"identifier": {"system": MRN_SYSTEM, "value": "99999"}}
    _ingest(tmp_path, "b1", [_patient("p1")], key_provider)
    report = _ingest(tmp_path, "b2", [_encounter("e-unknown", READMISSION, unknown)], key_provider)
    assert report.accepted == 1 and report.unresolved_patient_references == 1
    released = _publish(tmp_path, key_provider, "b1", "b2")["e-unknown"]
    # outside any compartment, as an unresolved conditional reference; the reference, and
    # with it the identifier, is dropped
    assert released["patient_id"] is None and "subject" not in released
    assert "99999" not in json.dumps(released)


@pytest.mark.parametrize("subject", [LOGICAL, CONDITIONAL], ids=["logical", "conditional"])
def test_an_identifier_several_patients_hold_files_the_resource_under_none(
    tmp_path: Path, key_provider: FileKeyProvider, subject: dict[str, Any]
) -> None:
    _ingest(tmp_path, "b1", [_patient("p1"), _patient("p2")], key_provider)
    _ingest(tmp_path, "b2", [_encounter("e-unknown", READMISSION, subject)], key_provider)
    released = _publish(tmp_path, key_provider, "b1", "b2")["e-unknown"]
    # filed under neither patient, and its reference names neither: naming one of them would
    # give the resource a patient whose date shift it does not have
    assert released["patient_id"] is None and "subject" not in released


def test_the_leak_scan_catches_the_identifier_of_a_logical_reference(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """The identifier a logical reference names is its patient's: were it released in a batch
    holding no Patient, that patient's canaries, searched because the batch now writes to the
    patient's compartment, would find it."""
    _ingest(tmp_path, "b1", [_patient("p1")], key_provider)
    _ingest(tmp_path, "b2", [_encounter("e-logical", READMISSION, LOGICAL)], key_provider)
    _publish(tmp_path, key_provider, "b1", "b2")
    planted = _encounter("x", "2020-02-01", LOGICAL)
    con = warehouse.connect(tmp_path / "w.duckdb")
    try:
        con.execute(
            "INSERT INTO deid_resources (resource_type, id, patient_id, batch_id, resource) "
            "VALUES ('Encounter', 'x', NULL, 'b2', ?)",
            [json.dumps(planted)],
        )
        scan = scan_released_batch(con, key_provider, "b2")
    finally:
        con.close()
    assert not scan.passed and {h.row for h in scan.hits} == {"x"}


def test_a_batch_whose_reference_a_later_batch_made_ambiguous_is_released_again(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """A conditional reference names the one resource holding the identifier when its batch is
    de-identified: a later batch bringing a second holder left the earlier batch's release
    naming the first, so the release depended on the order the batches came in. The earlier
    batch now leaves the ledger, and de-identified again it names no one, as a batch
    de-identified after both holders came does; a batch whose references did not change stays."""
    _ingest(
        tmp_path,
        "b1",
        [_patient("p1"), _encounter("e-conditional", "2020-01-21", CONDITIONAL)],
        key_provider,
    )
    _ingest(tmp_path, "b0", [_patient("p0", mrn="777")], key_provider)
    assert _publish(tmp_path, key_provider, "b1", "b0")["e-conditional"]["subject"]
    _ingest(tmp_path, "b2", [_patient("p2")], key_provider)  # the same MRN as p1
    _publish(tmp_path, key_provider, "b2")
    con = warehouse.connect(tmp_path / "w.duckdb")
    try:
        assert deidentified_batches(con) == {"b0", "b2"}
    finally:
        con.close()
    released = _publish(tmp_path, key_provider, "b1")["e-conditional"]
    assert "subject" not in released
    con = warehouse.connect(tmp_path / "w.duckdb")
    try:
        assert deidentified_batches(con) == {"b0", "b1", "b2"}
    finally:
        con.close()
