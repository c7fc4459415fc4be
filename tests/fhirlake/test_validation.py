from __future__ import annotations

import json

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


def test_a_logical_patient_reference_joins_the_references_in_its_conditional_form() -> None:
    mrn = {"system": "urn:mrn", "value": "MRN-778812"}
    coverage = {
        "resourceType": "Coverage",
        "id": "c1",
        "status": "active",
        "beneficiary": {"identifier": mrn},
        "subscriber": {"reference": "Patient/p1"},
        "payor": [{"identifier": mrn}],  # not a compartment element: not read
    }
    checked = check_record(orjson.dumps(coverage))
    assert checked.code is None
    conditional = "Patient?identifier=urn:mrn|MRN-778812"
    # the literal patient reference comes first: it decides the patient when present
    assert checked.patient_refs == ("Patient/p1", conditional)
    assert checked.references == (("subscriber", "Patient/p1"), ("beneficiary", conditional))


@pytest.mark.parametrize(
    ("record", "code"),
    [
        (b'{"resourceType": "Patient", ', "invalid_json"),
        (b"[1, 2]", "not_a_resource"),
        (b'{"id": "x"}', "not_a_resource"),
        (b'{"resourceType": "Patientt", "id": "x"}', "unknown_resource_type"),
        (b'{"resourceType": "Money", "id": "x"}', "unknown_resource_type"),
        (b'{"resourceType": "Patient", "id": "bad id!"}', "invalid_id"),
        (b'{"resourceType": "Patient", "id": "abc\\n"}', "invalid_id"),  # "$" took the newline
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


MARK = "Zq7MarkerValue"


@pytest.mark.parametrize(
    ("resource", "code"),
    [
        # contained resources of no R4 type: an uncaught KeyError inside fhir.resources before
        ({"contained": [{"resourceType": MARK, "id": "c"}]}, "unknown_resource_type"),
        ({"contained": [{"resourceType": "Money", "id": "c"}]}, "unknown_resource_type"),
        (
            {"contained": [{"resourceType": "Patient", "contained": [{"resourceType": MARK}]}]},
            "unknown_resource_type",
        ),
        ({"contained": [MARK]}, "schema_violation"),
        ({"name": [{MARK: ""}]}, "schema_violation"),
        ({"name": [{"given": {MARK: MARK}}]}, "schema_violation"),
        ({"birthDate": f"2020-13-{MARK}"}, "schema_violation"),
        ({"birthDate": "0000-01-01"}, "schema_violation"),
        ({MARK: 1}, "schema_violation"),
    ],
)
def test_nested_defects_get_value_free_reasons(resource: dict, code: str) -> None:
    checked = check_record(orjson.dumps({"resourceType": "Patient", "id": "p1", **resource}))
    assert checked.code == code
    assert MARK not in checked.message and MARK.lower() not in checked.message.lower()


@pytest.mark.parametrize("resource_type", ["Parameters", "Bundle"])
def test_unknown_types_nested_in_other_resources(resource_type: str) -> None:
    nested = {"resourceType": MARK, "id": "x"}
    body = (
        {"parameter": [{"name": "p", "resource": nested}]}
        if resource_type == "Parameters"
        else {"type": "collection", "entry": [{"resource": nested}]}
    )
    checked = check_record(orjson.dumps({"resourceType": resource_type, "id": "r", **body}))
    assert checked.code == "unknown_resource_type" and MARK not in checked.message


def test_unknown_resource_type_name_is_not_repeated() -> None:
    checked = check_record(orjson.dumps({"resourceType": MARK, "id": "x"}))
    assert checked.code == "unknown_resource_type" and MARK not in checked.message


@pytest.mark.parametrize("depth", [150, 300, 900])
def test_deep_nesting_is_a_reason_not_a_crash(depth: int) -> None:
    node: object = MARK
    for _ in range(depth):
        node = [node]
    for where in ({"name": node}, {"contained": [{"resourceType": "Patient", "name": node}]}):
        raw = json.dumps({"resourceType": "Patient", **where}).encode()  # no id: one assigned
        checked = check_record(raw)
        assert checked.code == "schema_violation" and MARK not in checked.message


def test_validator_surprises_become_validation_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from fhirlake import validation

    def explode(raw: bytes) -> None:
        raise RuntimeError(MARK)

    monkeypatch.setattr(validation, "_check_record", explode)
    checked = check_record(orjson.dumps(PATIENT))
    assert checked == validation.Checked("validation_error", "validation raised RuntimeError")


def test_running_out_of_memory_fails_the_check_rather_than_the_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A MemoryError says nothing of the record: it was quarantined as a ``validation_error``
    and its batch marked ingested, so a valid record stayed out of the vault for good (a run
    again found the batch done). It leaves the check, and fails the pass that can be run
    again."""
    from fhirlake import validation

    def exhausted(raw: bytes) -> None:
        raise MemoryError

    monkeypatch.setattr(validation, "_check_record", exhausted)
    with pytest.raises(MemoryError):
        check_record(orjson.dumps(PATIENT))


@pytest.mark.parametrize(
    ("element", "value"),
    [
        ("birthDate", "9999-12-31"),
        ("birthDate", "0001-01-01"),
        ("birthDate", "1961"),
        ("birthDate", "1961-04"),
        ("deceasedDateTime", "9999-12-31T23:59:59-14:00"),
        ("deceasedDateTime", "0001-01-01T00:00:00+14:00"),
        ("deceasedDateTime", "2001-02"),
    ],
)
def test_extreme_and_partial_dates_are_accepted_at_ingest(element: str, value: str) -> None:
    """Valid R4 dates: ingest keeps them; the release shifts, clamps or withholds them."""
    checked = check_record(orjson.dumps({"resourceType": "Patient", "id": "p1", element: value}))
    assert checked.code is None


@pytest.mark.parametrize(
    ("element", "value", "where"),
    [
        ("meta", {"lastUpdated": None}, "meta"),
        ("meta", {"versionId": None}, "meta"),
        ("gender", None, "gender"),
        ("identifier", [{"system": None, "value": "MRN-778812"}], "identifier"),
        ("name", [{"family": "Quist", "given": ["Odalys", None]}], "name"),
        ("address", [None], "address"),
    ],
)
def test_a_null_value_is_a_schema_violation(element: str, value: object, where: str) -> None:
    """FHIR's JSON form allows no null (``"lastUpdated": null`` was read as no
    ``lastUpdated``, so the record ranked as undated among its versions); the message names
    the element, never the value beside it."""
    checked = check_record(orjson.dumps({**PATIENT, element: value}))
    assert (checked.code, checked.message) == ("schema_violation", f"Patient.{where}: null value")
    assert "MRN" not in checked.message


def test_a_null_beside_a_primitives_extensions_is_allowed() -> None:
    """The one null the JSON form allows: a place held in an array of primitives whose
    extensions stand beside it."""
    extension = {"extension": [{"url": "http://example.org/x", "valueString": "y"}]}
    name = {"family": "Quist", "given": ["Odalys", None], "_given": [None, extension]}
    assert check_record(orjson.dumps({**PATIENT, "name": [name]})).code is None
