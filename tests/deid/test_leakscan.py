from __future__ import annotations

import base64

from deid.leakscan import CanarySet, scan_rows

PATIENT = {
    "resourceType": "Patient",
    "name": [{"family": "Quillfeather", "given": ["Marisol", "Jo"]}],
    "identifier": [{"value": "999-12-3456"}, {"value": "MRN778812"}],
    "address": [{"line": ["42 Wallaby Way"]}],
    "telecom": [
        {"system": "phone", "value": "(555) 013-4477"},
        {"system": "email", "value": "marisol.q@example.org"},
    ],
    "birthDate": "1948-02-29",
}


def canaries() -> CanarySet:
    c = CanarySet()
    c.add_patient(PATIENT)
    return c


def test_clean_release_passes() -> None:
    rows = [("p1", {"resourceType": "Patient", "id": "ab12", "birthDate": "1948"})]
    result = scan_rows(canaries(), rows)
    assert result.passed and result.scanned_rows == 1 and result.canaries > 5


def test_planted_leaks_are_found_case_folded_and_in_base64() -> None:
    note = base64.b64encode(b"Seen today: MARISOL QUILLFEATHER, dob 1948-02-29").decode()
    rows = [
        ("r1", {"note": [{"text": "pt quillfeather called"}]}),
        ("r2", {"attachment": {"data": note}}),
        ("r3", {"telecom": "5550134477"}),
        ("r4", {"identifier": "MRN778812"}),
        ("r5", {"text": "short name Jo and marisolxyz do not count"}),
    ]
    result = scan_rows(canaries(), rows)
    assert not result.passed
    assert {h.row for h in result.hits} == {"r1", "r2", "r3", "r4"}
    assert result.by_kind()["name"] >= 2
    assert "birth_date" in result.by_kind()
    # results name rows and kinds, never the text that matched
    assert all("quill" not in repr(h).lower() for h in result.hits)


def test_surnames_that_are_category_names_do_not_trip_terminology() -> None:
    c = CanarySet()
    c.add_patient({"name": [{"family": "Black", "given": ["Anna"]}], "identifier": []})
    race = {
        "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
        "extension": [
            {
                "url": "ombCategory",
                "valueCoding": {
                    "system": "urn:oid:2.16.840.1.113883.6.238",
                    "code": "2054-5",
                    "display": "Black or African American",
                },
            },
            {"url": "text", "valueString": "Black or African American"},
        ],
    }
    assert scan_rows(c, [("p", {"extension": [race]})]).passed
    assert not scan_rows(c, [("p", {"note": "seen: Black"})]).passed
    assert not scan_rows(c, [("p", {"display": "Anna Black"})]).passed  # full name anywhere


def test_birth_date_counts_only_in_its_patients_rows() -> None:
    c = CanarySet()
    c.add_patient({"birthDate": "1977-07-27"}, "p1")
    shifted_visit = {"resourceType": "Patient", "birthDate": "1977-07-27"}
    assert scan_rows(c, [("r", shifted_visit, "p2")]).passed  # somebody else's shifted date
    assert not scan_rows(c, [("r", shifted_visit, "p1")]).passed
    assert scan_rows(c, [("r", {"effectiveDateTime": "1977-07-27T00:00:00Z"}, "p1")]).passed
    unscoped = CanarySet()
    unscoped.add_patient({"birthDate": "1977-07-27"})
    assert not scan_rows(unscoped, [("r", shifted_visit, "p2")]).passed


def test_hex_pseudonyms_and_random_bytes_are_not_base64_text() -> None:
    c = CanarySet()
    c.add_patient({"name": [{"family": "Soto", "given": ["Tony"]}]}, "p1")
    # real pseudonyms from a release whose base64 decoding holds "soto" and "tony" by chance
    for pseudonym in ("c290b5b7c69bcaca7ec9d1568f436780", "c86a6ebc0c75c580a7d0b25556d74998"):
        assert scan_rows(c, [("r", {"reference": f"Patient/{pseudonym}"}, "p1")]).passed
    note = base64.b64encode(b"Seen today: Tony Soto, follow up.").decode()
    assert not scan_rows(c, [("r", {"data": note}, "p1")]).passed
