"""One patient's identifiers in free text an operator typed (the reason of an erasure or a
re-identification, which the audit log keeps for good): names, identifiers, phones, emails,
addresses, the birth date in the forms people write it, and the ids the patient is known by,
each as a whole token. The kinds each text must give are written out here."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

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


# Numeric birth dates written here by strftime, independently of deid.leakscan: day first,
# month first and year first, with slashes, dashes or dots, four- and two-digit years
_NUMERIC_PATTERNS = [
    f"{a}{sep}{b}{sep}{year}"
    for sep in "/-."
    for year in ("%Y", "%y")
    for a, b in (("%d", "%m"), ("%m", "%d"))
] + [f"%Y{sep}%m{sep}%d" for sep in "/-."]


def _written(born: date) -> list[str]:
    """``born`` in every numeric pattern, with leading zeros and without them."""
    forms: list[str] = []
    for pattern in _NUMERIC_PATTERNS:
        forms.append(born.strftime(pattern))
        bare = pattern.replace("%d", str(born.day)).replace("%m", str(born.month))
        forms.append(born.strftime(bare))
    return list(dict.fromkeys(forms))


def _birth_patient(born: date) -> dict[str, object]:
    return {"resourceType": "Patient", "id": "bd-1", "birthDate": born.isoformat()}


# 7 March 1946: day and month differ and are both under 13, so day-first and month-first are
# both dates; 17 April 1931: day-first only reads one way. Beside each, some forms the
# formatter must give (a check on the formatter itself)
BIRTH_DATES = {
    date(1946, 3, 7): {"07/03/1946", "7/3/1946", "07.03.1946", "1946.03.07", "3/7/46", "07/03/46"},
    date(1931, 4, 17): {"17/04/1931", "17-04-1931", "17.4.1931", "1931/04/17", "4/17/31"},
}


@pytest.mark.parametrize("born", BIRTH_DATES, ids=str)
def test_a_reason_holding_the_birth_date_in_any_numeric_form_is_refused(born: date) -> None:
    subject = SubjectCanaries([_birth_patient(born)])
    forms = _written(born)
    assert BIRTH_DATES[born] <= set(forms)
    for form in forms:
        assert subject.reason_hits(f"REQ-40 {form}") == ["birth_date"], form
        assert subject.reason_hits(f"dob {form}, per ticket 4471") == ["birth_date"], form
    # a reference, and a date that is not the birth date in any form, are still accepted
    other_year = born.replace(year=born.year + 1)  # same day and month
    other_day = born + timedelta(days=1)  # the birth year, another day
    reasons = ["REQ-2024-0317", "ticket 4471", "erasure request under GDPR article 17"]
    reasons += [f"REQ-41 {form}" for form in _written(other_year) + _written(other_day)]
    reasons += [f"REQ-1{born:%m/%d/%y}9"]  # a longer number holding a form is not the form
    for reason in reasons:
        assert subject.reason_hits(reason) == [], reason


def test_two_digit_years_are_looked_for_in_a_reason_only() -> None:
    """In the records an erasure searches (``hits``) a two-digit year does not count; the
    four-digit forms, day first included, do."""
    born = date(1946, 3, 7)
    subject = SubjectCanaries([_birth_patient(born)])
    assert subject.hits(f"seen {born:%m/%d/%y}") == []
    assert subject.hits(f"seen {born:%d.%m.%Y}") == ["birth_date"]


@pytest.mark.parametrize(
    ("reason", "kinds"),
    [
        # the Patient's own id, a UUID, without its dashes or with spaces for them
        ("resource 7d0c5a1e9b2f4c1d8e3a5f6b7c8d9e0f", ["id"]),
        ("7D0C 5A1E 9B2F 4C1D 8E3A 5F6B 7C8D 9E0F asked", ["id"]),
        # the MRN with its letters glued to its digits, or split elsewhere
        ("MRN778812", ["identifier"]),
        ("ticket for mrn/7788 12", ["identifier"]),
        # near misses: another UUID (its last digit), a shorter number, a ticket
        ("resource 7d0c5a1e9b2f4c1d8e3a5f6b7c8d9e0e", []),
        ("MRN77881", []),
        ("REQ-2024-0317", []),
        ("erasure request under GDPR article 17", []),
    ],
)
def test_a_reason_holding_an_identifier_with_other_separators_or_none_is_refused(
    reason: str, kinds: list[str]
) -> None:
    """The audit log keeps a reason for good: an identifier written without its punctuation
    names the patient as surely as with it. Compared in a reason only (``hits``, which an
    erasure uses on records, does not)."""
    subject = SubjectCanaries([PATIENT], TYPED_ID)
    assert subject.reason_hits(reason) == kinds
    assert "id" not in subject.hits(reason) and "identifier" not in subject.hits(reason)


def test_a_short_id_or_one_without_a_digit_is_not_compared_glued() -> None:
    """Under eight letters and digits, or without a digit, an id glued into other words could
    be spelt by them: ``pt778`` is only found as a whole token, as before."""
    subject = SubjectCanaries([], "pt-778", "ab-cd-ef-gh-ij")
    assert subject.reason_hits("ticket pt778") == []
    assert subject.reason_hits("lab cd efgh ij") == []
    assert subject.reason_hits("pt-778 asked") == ["id"]


def test_versions_the_quarantine_refused_for_their_shape_still_name_the_patient() -> None:
    """An erasure reads the patient's Patient records the quarantine holds, of any shape: an
    identifier whose type is a string, or identifiers given as a number, once stopped
    ``ehr forget`` of that patient with an AttributeError or a TypeError."""
    refused: list[dict[str, Any]] = [
        {"resourceType": "Patient", "id": "pt-778", "identifier": [{"type": "MRN-778812"}]},
        {
            "resourceType": "Patient",
            "id": "pt-778",
            "identifier": 778812,
            "name": "Odalys Larkspur",
        },
        {"resourceType": "Patient", "id": "pt-778", "identifier": {"value": "MRN-778812"}},
    ]
    subject = SubjectCanaries(refused, TYPED_ID)
    assert subject.reason_hits("MRN778812") == ["identifier"]
    assert sorted(subject.hits("Odalys Larkspur called")) == ["full_name", "name"]
