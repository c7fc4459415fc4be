from __future__ import annotations

import pytest

from fhirlake.references import (
    classify,
    identifier_match_form,
    is_external,
    literal_target,
    local_target,
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


def test_identifier_match_form_never_matches_across_systems() -> None:
    mine = identifier_match_form("http://hospital.example.org/mrn|88442211")
    assert mine != identifier_match_form("urn:oid:2.16.840.1.999999.1|88442211")
