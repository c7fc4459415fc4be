from __future__ import annotations

import pytest

from fhirlake.references import (
    classify,
    conditional_target,
    identifier_match_form,
    is_external,
    iter_logical_references,
    literal_target,
    local_target,
    logical_reference,
)

BASE = "https://ehr.example.org/fhir"


@pytest.mark.parametrize(
    ("value", "base", "target"),
    [
        ("Patient/1", None, ("Patient", "1")),
        ("Patient/1/_history/2", None, ("Patient", "1")),
        ("Patient/1", BASE, ("Patient", "1")),
        (f"{BASE}/Patient/1", BASE, ("Patient", "1")),
        (f"{BASE}/Patient/1", BASE + "/", ("Patient", "1")),
        (f"{BASE}/Patient/1", None, None),  # no base configured: every absolute URL is foreign
        ("http://other.example/fhir/Patient/1", BASE, None),
        (f"{BASE}x/Patient/1", BASE, None),  # a base is a whole path prefix, not a string prefix
        (f"{BASE}/nested/Patient/1", BASE, None),
        ("urn:uuid:0f0e", BASE, None),
        ("Patient?identifier=a|b", BASE, None),
        ("#c1", BASE, None),
    ],
)
def test_local_targets(value: str, base: str | None, target: tuple[str, str] | None) -> None:
    assert local_target(value, base) == target


def test_other_servers_are_external_never_local() -> None:
    value = "http://other.example/fhir/Patient/1"
    assert classify(value) == "absolute" and literal_target(value) == ("Patient", "1")
    assert is_external(value, BASE) and is_external(value, None)
    assert not is_external(f"{BASE}/Patient/1", BASE)
    assert not is_external("Patient/1", None)


@pytest.mark.parametrize(
    ("criteria", "loose"),
    [
        ("http://hl7.org/fhir/sid/us-ssn|731-55-9012", "http://hl7.org/fhir/sid/us-ssn|731559012"),
        ("http://hl7.org/fhir/sid/us-ssn|731559012", "http://hl7.org/fhir/sid/us-ssn|731559012"),
        (" urn:mrn |  mrn-4471 ", "urn:mrn|mrn4471"),
        ("urn:mrn|MRN 4471", "urn:mrn|mrn4471"),
        ("urn:mrn|\uff17\uff13\uff11", "urn:mrn|731"),  # full-width digits
        ("|A-1", "|a1"),  # no system: a system of its own
        ("urn:mrn|--", None),  # nothing left to compare
        ("no bar", None),
    ],
)
def test_identifier_match_form_keeps_the_system_and_the_letters_and_digits(
    criteria: str, loose: str | None
) -> None:
    assert identifier_match_form(criteria) == loose


@pytest.mark.parametrize(
    "system",
    [
        "HTTP://HOSPITAL.EXAMPLE.ORG/mrn",
        "http://hospital.example.org/mrn/",
        " http://Hospital.Example.org/mrn ",
        "Http://hospital.EXAMPLE.org/mrn//",
    ],
)
def test_one_system_written_differently_is_one_system(system: str) -> None:
    """The scheme and host of a URI are read without regard to case, and a trailing slash
    names the same system: her MRN under any of these is hers."""
    mine = identifier_match_form("http://hospital.example.org/mrn|88442211")
    assert identifier_match_form(f"{system}|88-44-22-11") == mine


def test_a_system_is_read_without_regard_to_case_and_a_urn_keeps_its_value() -> None:
    mine = identifier_match_form("http://hospital.example.org/mrn|1234567")
    assert identifier_match_form("HTTP://HOSPITAL.EXAMPLE.ORG/MRN|1234567") == mine
    assert identifier_match_form("http://hospital.example.org/mrn2|1234567") != mine
    oid = identifier_match_form("urn:oid:2.16.840.1.9|1234567")
    assert identifier_match_form("URN:OID:2.16.840.1.9|1234567") == oid
    assert identifier_match_form("urn:oid:2.16.840.1.99|1234567") != oid


def test_identifier_match_form_never_matches_across_systems() -> None:
    mine = identifier_match_form("http://hospital.example.org/mrn|88442211")
    assert mine != identifier_match_form("urn:oid:2.16.840.1.999999.1|88442211")


# every R4 resource type that can hold a patient's reference, written out here: the list the
# test's expectation is taken from, not the code's
R4_TYPES = (
    "Patient Encounter Observation Condition MedicationRequest Practitioner Organization "
    "Location DocumentReference Binary Bundle MedicinalProduct SubstanceSpecification "
    "EffectEvidenceSynthesis Media DeviceUseStatement"
).split()


@pytest.mark.parametrize("name", R4_TYPES)
def test_a_reference_to_a_resource_type_is_a_reference(name: str) -> None:
    assert classify(f"{name}/x1") == "relative"
    assert literal_target(f"{name}/x1") == (name, "x1")
    assert local_target(f"{BASE}/{name}/x1", BASE) == (name, "x1")
    assert classify(f"{name}?identifier=s|v") == "conditional"


@pytest.mark.parametrize(
    "name", ["CourtneyBarajas", "HumanName", "Resource", "DomainResource", "Patients", "MRN"]
)
def test_a_type_that_is_no_resource_type_makes_no_reference(name: str) -> None:
    """``CourtneyBarajas/x1``: text in the type's place (a name, here) is no reference, so it
    is neither indexed nor released as a type."""
    assert classify(f"{name}/x1") == "other"
    assert literal_target(f"{name}/x1") is None
    assert literal_target(f"http://other.example/fhir/{name}/x1") is None
    assert local_target(f"{BASE}/{name}/x1", BASE) is None
    assert conditional_target(f"{name}?identifier=s|v") is None
    assert classify(f"http://other.example/fhir/{name}/x1") == "other"
    assert not is_external(f"http://other.example/fhir/{name}/x1", BASE)


MRN = {"system": "http://hospital.example.org/mrn", "value": "12345"}


@pytest.mark.parametrize(
    ("node", "conditional"),
    [
        ({"identifier": MRN}, "Patient?identifier=http://hospital.example.org/mrn|12345"),
        (
            {"identifier": MRN, "type": "Group"},
            "Group?identifier=http://hospital.example.org/mrn|12345",
        ),
        (
            {"identifier": {"value": "12345"}},
            "Patient?identifier=|12345",
        ),  # as a Patient's is indexed
        (
            {"identifier": MRN, "display": "x"},
            "Patient?identifier=http://hospital.example.org/mrn|12345",
        ),
        ({"identifier": MRN, "reference": "Patient/p1"}, None),  # the literal reference decides
        ({"identifier": MRN, "type": "http://hl7.org/fhir/StructureDefinition/Patient"}, None),
        ({"identifier": MRN, "type": "Person1"}, None),
        ({"identifier": {"system": "urn:mrn"}}, None),
        ({"identifier": [MRN]}, None),  # Reference.identifier is one Identifier
        ({"display": "x"}, None),
        ("Patient/p1", None),
    ],
)
def test_a_logical_reference_reads_as_its_conditional_form(
    node: object, conditional: str | None
) -> None:
    assert logical_reference(node) == conditional
    if conditional is not None:
        assert classify(conditional) == "conditional"
        assert conditional_target(conditional) == (
            conditional.split("?")[0],
            conditional.split("=", 1)[1],
        )


def test_logical_references_are_found_where_references_sit() -> None:
    participants = [{"actor": {"reference": "Practitioner/1"}}, {"actor": {"identifier": MRN}}]
    contained = {
        "contained": [{"resourceType": "Patient", "link": [{"other": {"identifier": MRN}}]}]
    }
    assert [(r.path, r.value) for r in iter_logical_references(participants, "participant")] == [
        ("participant.actor", "Patient?identifier=http://hospital.example.org/mrn|12345")
    ]
    assert list(iter_logical_references(contained)) == []
