"""Identifiers of a batch's patients in its batch key (the landing folder's name, which Dagster
shows as the partition key): found as written and with separators as spaces, birth dates not
searched (a date-named export folder would match a newborn's birth date by chance)."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from deid.leakscan import CanarySet
from deid.release import batch_canaries, batch_key_hits
from vault import warehouse
from vault.ingest import ingest_batch
from vault.keys import FileKeyProvider
from vault.landing import batch_key

PATIENTS = [
    {
        "resourceType": "Patient",
        "id": "p1",
        "name": [{"family": "Larkspur", "given": ["Odalys"]}],
        "identifier": [
            {"system": "http://hospital.example/mrn", "value": "MRN-778812"},
            {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "123-45-6789"},
            {"system": "http://hospital.example/chart", "value": "CH/4471-K"},
        ],
        "telecom": [
            {"system": "phone", "value": "(555) 867-5309"},
            {"system": "email", "value": "odalys@example.org"},
        ],
        "birthDate": "2024-05-01",
    },
    {"resourceType": "Patient", "id": "p2", "name": [{"family": "Wang", "given": ["Li"]}]},
    {"resourceType": "Patient", "id": "pat-zq4471", "gender": "unknown"},
    {
        "resourceType": "Patient",
        "id": "p4",
        "name": [{"family": "Müller", "given": ["Jürgen"]}, {"family": "Strauß", "given": ["Ida"]}],
        "address": [{"line": ["Lindenstraße 5"], "city": "Köln"}],
    },
]


@pytest.fixture(scope="module")
def canaries() -> CanarySet:
    found = CanarySet()
    for number, patient in enumerate(PATIENTS):
        found.add_patient(patient, f"pseudonym-{number}")
        found.add_source_id(patient["id"])
    return found


@pytest.mark.parametrize(
    ("batch_key", "kinds"),
    [
        ("Larkspur_Odalys", ["full_name", "name"]),  # family name first, as lists write it
        ("odalys.larkspur", ["full_name", "name"]),
        ("li_wang", ["full_name", "name"]),  # a short given name counts beside the family name
        ("Wang-Li-3f9a2c1b0d", ["full_name", "name"]),  # a slugged key keeps the name's text
        ("MRN-778812", ["identifier"]),
        ("5558675309", ["phone"]),
        ("123456789", ["ssn"]),
        ("odalys@example.org", ["email", "name"]),
        # the keys Dagster shows for such folders: "@", "/" and spaces made "-"
        (batch_key("odalys@example.org"), ["email", "name"]),
        (batch_key("CH/4471-K"), ["identifier"]),
        (batch_key("chart CH 4471 K"), ["identifier"]),
        # a Patient's own id (as a whole token; ids under four characters are not searched)
        ("pat-zq4471", ["id"]),
        ("export_pat-zq4471", ["id"]),
        ("pat-zq44710", []),
        ("p2", []),
        ("2024-05-01", []),  # the first patient's birth date: not searched in keys
        ("export-2024-05-01", []),
        ("larkspurs", []),  # inside a longer word
        ("synthetic", []),
        ("b1", []),
        # letters outside ASCII, which a key made safe writes as "-" (see the test below)
        (batch_key("Müller"), ["name"]),
        (batch_key("Jürgen Müller"), ["full_name", "name"]),
        (batch_key(unicodedata.normalize("NFD", "Müller")), ["name"]),  # as macOS writes it
        (batch_key("Strauß"), ["name"]),
        (batch_key("Lindenstraße 5"), ["address"]),
        (batch_key("Mahler"), []),
        (batch_key("Müllerin"), []),
    ],
)
def test_batch_key_hits(canaries: CanarySet, batch_key: str, kinds: list[str]) -> None:
    assert batch_key_hits(canaries, batch_key) == kinds


@pytest.mark.parametrize(
    ("folder", "shown"),
    [
        ("Müller", "M-ller"),
        ("Jürgen Müller", "J-rgen-M-ller"),
        (unicodedata.normalize("NFD", "Müller"), "Mu-ller"),
        ("Strauß", "Strau"),
        ("Lindenstraße 5", "Lindenstra-e-5"),
    ],
)
def test_a_key_made_safe_still_shows_the_name(folder: str, shown: str) -> None:
    """Why the keys above must be found: the key Dagster shows keeps every ASCII letter of
    the folder's name, so the name stays readable in it."""
    assert batch_key(folder).startswith(shown + "-")


def test_batch_canaries_hold_the_patients_source_ids(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """A folder named after a Patient's id in the source (a per-patient export's folder) is
    found as the kind ``id`` by the batch's canaries, which read the ids from the vault."""
    folder = tmp_path / "pat-zq4471"
    folder.mkdir()
    patient = {"resourceType": "Patient", "id": "pat-zq4471", "gender": "female"}
    (folder / "p.json").write_text(json.dumps(patient))
    wh = tmp_path / "w.duckdb"
    assert ingest_batch(wh, "pat-zq4471", folder, key_provider, workers=1).accepted == 1
    con = warehouse.connect(wh)
    try:
        canaries = batch_canaries(con, key_provider, "pat-zq4471")
        assert batch_key_hits(canaries, "pat-zq4471") == ["id"]
        assert batch_key_hits(canaries, "2024-05-01") == []
        # in released text too (letters and digits, six characters or more): it links a row to
        # the source's record (deid.leakscan.CanarySet.add_source_id)
        assert canaries.find("pat-zq4471") == ["id"]
    finally:
        con.close()
