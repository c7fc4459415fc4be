"""Identifiers of a batch's patients in its batch key (the landing folder's name, which Dagster
shows as the partition key): found as written and with separators as spaces, birth dates not
searched (a date-named export folder would match a newborn's birth date by chance)."""

from __future__ import annotations

import pytest

from deid.leakscan import CanarySet
from deid.release import batch_key_hits

PATIENTS = [
    {
        "resourceType": "Patient",
        "id": "p1",
        "name": [{"family": "Larkspur", "given": ["Odalys"]}],
        "identifier": [
            {"system": "http://hospital.example/mrn", "value": "MRN-778812"},
            {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "123-45-6789"},
        ],
        "telecom": [
            {"system": "phone", "value": "(555) 867-5309"},
            {"system": "email", "value": "odalys@example.org"},
        ],
        "birthDate": "2024-05-01",
    },
    {"resourceType": "Patient", "id": "p2", "name": [{"family": "Wang", "given": ["Li"]}]},
]


@pytest.fixture(scope="module")
def canaries() -> CanarySet:
    found = CanarySet()
    for number, patient in enumerate(PATIENTS):
        found.add_patient(patient, f"pseudonym-{number}")
    return found


@pytest.mark.parametrize(
    ("batch_key", "kinds"),
    [
        ("Larkspur_Odalys", ["name"]),
        ("odalys.larkspur", ["full_name", "name"]),
        ("li_wang", ["full_name", "name"]),  # a short given name counts beside the family name
        ("Wang-Li-3f9a2c1b0d", ["full_name", "name"]),  # a slugged key keeps the name's text
        ("MRN-778812", ["identifier"]),
        ("5558675309", ["phone"]),
        ("123456789", ["ssn"]),
        ("odalys@example.org", ["email", "name"]),
        ("2024-05-01", []),  # the first patient's birth date: not searched in keys
        ("export-2024-05-01", []),
        ("larkspurs", []),  # inside a longer word
        ("synthetic", []),
        ("b1", []),
    ],
)
def test_batch_key_hits(canaries: CanarySet, batch_key: str, kinds: list[str]) -> None:
    assert batch_key_hits(canaries, batch_key) == kinds
