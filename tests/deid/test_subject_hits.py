"""One patient's identifiers in free text an operator typed (the reason of an erasure or a
re-identification, which the audit log keeps for good): names, identifiers, phones, emails,
addresses, the birth date in the forms people write it, and the ids the patient is known by,
each as a whole token. The kinds each text must give are written out here."""

from __future__ import annotations

import pytest

from deid.release import SubjectCanaries

PATIENT = {
    "resourceType": "Patient",
    "id": "7d0c5a1e-9b2f-4c1d-8e3a-5f6b7c8d9e0f",
    "name": [{"family": "Larkspur", "given": ["Odalys"]}],
    "identifier": [{"system": "http://hospital.example/mrn", "value": "MRN-778812"}],
    "telecom": [
        {"system": "phone", "value": "(555) 867-5309"},
        {"system": "email", "value": "odalys@example.org"},
    ],
    "address": [{"line": ["42 Quillfeather Lane"], "city": "Brookline", "postalCode": "02445"}],
    "birthDate": "1948-02-29",
}
TYPED_ID = "pt-778"  # the original id the operator typed (``ehr forget pt-778``)


@pytest.mark.parametrize(
    ("reason", "kinds"),
    [
        ("request from Odalys Larkspur", ["full_name", "name"]),
        ("larkspur called", ["name"]),
        ("MRN-778812", ["identifier"]),
        ("call back 555 867 5309", ["phone"]),
        ("mail odalys@example.org", ["email", "name"]),
        ("lives at 42 Quillfeather Lane", ["address"]),
        ("born 02/29/1948", ["birth_date"]),
        ("born February 29, 1948", ["birth_date"]),
        ("resource 7D0C5A1E-9B2F-4C1D-8E3A-5F6B7C8D9E0F", ["id"]),  # the Patient's own id
        ("pt-778 asked to be forgotten", ["id"]),  # the id typed on the command line
        ("ticket pt-7781", []),  # not the id: a longer token
        ("ticket 4711", []),
        ("erasure request under GDPR article 17", []),
        ("born 1948", []),  # a year alone names no one
    ],
)
def test_subject_canaries(reason: str, kinds: list[str]) -> None:
    assert SubjectCanaries([PATIENT], TYPED_ID).hits(reason) == kinds


def test_without_the_resource_only_the_typed_ids_count() -> None:
    # an erased patient: its Patient resource is gone, the id the operator typed is not
    assert SubjectCanaries([], TYPED_ID).hits("pt-778 asked") == ["id"]
    assert SubjectCanaries([], TYPED_ID).hits("Odalys Larkspur asked") == []
    assert SubjectCanaries([]).empty and not SubjectCanaries([], TYPED_ID).empty


# the same patient before a marriage and a move: an earlier version of the Patient resource
EARLIER = {
    **PATIENT,
    "name": [{"family": "Vantreight", "given": ["Odalys"]}],
    "telecom": [{"system": "phone", "value": "(555) 201-4477"}],
    "address": [{"line": ["9 Marrowbone Court"], "city": "Quincy", "postalCode": "02169"}],
    "birthDate": "1948-03-29",  # corrected since
}


@pytest.mark.parametrize(
    ("reason", "kinds"),
    [
        ("request from Odalys Vantreight", ["full_name", "name"]),  # the name before marriage
        ("vantreight called", ["name"]),
        ("call back 555-201-4477", ["phone"]),
        ("lives at 9 Marrowbone Court", ["address"]),
        ("born 03/29/1948", ["birth_date"]),
        ("request from Odalys Larkspur", ["full_name", "name"]),  # the current name still
        ("ticket 4711", []),
    ],
)
def test_every_version_of_the_patient_names_them(reason: str, kinds: list[str]) -> None:
    assert SubjectCanaries([EARLIER, PATIENT], TYPED_ID).hits(reason) == kinds
    assert SubjectCanaries([PATIENT, EARLIER], TYPED_ID).hits(reason) == kinds  # any order
