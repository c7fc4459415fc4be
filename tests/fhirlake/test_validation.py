from __future__ import annotations

import orjson
import pytest

from fhirlake.validation import check_record

PATIENT = {
    "resourceType": "Patient",
    "id": "p1",
    "name": [{"family": "Zamora-Quist", "given": ["Odalys"]}],
    "birthDate": "1961-04-03",
    "managingOrganization": {"reference": "Organization?identifier=urn:x|42"},
    "identifier": [{"system": "urn:mrn", "value": "MRN-778812"}],
}


def test_valid_resource_extracts_what_ingest_needs() -> None:
    checked = check_record(orjson.dumps(PATIENT))
    assert checked.code is None
    assert (checked.resource_type, checked.resource_id) == ("Patient", "p1")
    assert checked.references == (("managingOrganization", "Organization?identifier=urn:x|42"),)
    assert checked.identifiers == ("urn:mrn|MRN-778812",)
    assert len(checked.content_digest) == 32


@pytest.mark.parametrize(
    ("record", "code"),
    [
        (b'{"resourceType": "Patient", ', "invalid_json"),
        (b"[1, 2]", "not_a_resource"),
        (b'{"id": "x"}', "not_a_resource"),
        (b'{"resourceType": "Patientt", "id": "x"}', "unknown_resource_type"),
        (b'{"resourceType": "Money", "id": "x"}', "unknown_resource_type"),
        (b'{"resourceType": "Patient", "id": "bad id!"}', "invalid_id"),
        (b'{"resourceType": "Patient", "id": "x", "birthDate": 19610403}', "schema_violation"),
        (b'{"resourceType": "Observation", "id": "x", "status": "final"}', "schema_violation"),
        (b'{"resourceType": "Patient", "id": "x", "name": []}', "schema_violation"),
    ],
)
def test_defects_get_reason_codes(record: bytes, code: str) -> None:
    assert check_record(record).code == code


def test_messages_carry_no_input_values() -> None:
    bad = dict(PATIENT, birthDate="Odalys-1961", gender=["Zamora-Quist"], nickname="MRN-778812")
    checked = check_record(orjson.dumps(bad))
    assert checked.code == "schema_violation"
    for secret in ("Odalys", "Zamora", "MRN-778812", "nickname", "1961"):
        assert secret not in checked.message
    assert "birthDate" in checked.message


def test_missing_id_gets_a_stable_content_derived_id() -> None:
    raw = orjson.dumps({"resourceType": "Patient", "gender": "female"})
    first, second = check_record(raw), check_record(raw)
    assert first.code is None and first.resource_id == second.resource_id
    assert orjson.loads(first.assigned_raw or b"")["id"] == first.resource_id
