"""The canary set keeps its canaries in its automatons only (``deid.leakscan._TextStore``): it
finds what the dict-backed set it replaced found (``reference_canaries``), kind for kind and in
the same order, in generated patients' records and in text naming them in many forms; and it
holds a third of that set's memory."""

from __future__ import annotations

import base64
import copy
import gc
import hashlib
import itertools
import json
import random
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from deid.leakscan import CanarySet, birth_date_forms
from fhirlake.synthetic import generate
from tests.deid.reference_canaries import ReferenceCanarySet

_KEY_SEPARATORS = "".join(chr(c) for c in range(32, 127) if not chr(c).isalnum())


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    generate(out, 40, seed=11, fmt="ndjson")
    return out


def _pseudonym(resource_id: str) -> str:
    return hashlib.sha256(resource_id.encode()).hexdigest()[:32]


def _patients(cohort: Path) -> list[dict[str, Any]]:
    patients = [json.loads(line) for line in (cohort / "Patient.ndjson").open()]
    # names outside ASCII, an sharp s, short names, a corrected birth date, contacts,
    # identifiers with punctuation, phones with a country code, an impossible birth date
    for i, (given, family, line, city) in enumerate(
        [
            ("Jürgen", "Müller", "Große Straße 5", "München"),
            ("Li", "Wang", "12 Elm St.", "Springfield"),
            ("Zoë", "O'Brien-Smith", "Apt. 4B, 221b Baker-Street", "Saint-Étienne"),
            ("\uff2d\uff29\uff2b\uff25", "Straße", "Weißdornweg 3", "Gießen"),
        ]
    ):
        patient = copy.deepcopy(patients[i])
        patient["id"] = f"crafted-{i}"
        patient["name"] = [{"given": [given, "J"], "family": family}, {"text": f"{given} {family}"}]
        patient["address"] = [{"line": [line], "city": city, "state": "MA", "postalCode": "02123"}]
        patient["identifier"] += [
            {"system": "urn:x", "value": f"MRN-ZQ/{99170 + i}"},
            {"system": "urn:x", "value": f"77{i}8812"},
        ]
        patient["telecom"] += [
            {"system": "phone", "value": f"+1 508 555 01{60 + i}"},
            {"system": "email", "value": f"zquix{i}@example.org"},
        ]
        patient["contact"] = [
            {
                "name": {"given": ["Bo"], "family": f"Kin{i}"},
                "telecom": [{"system": "phone", "value": f"001 617 555 02{i}0"}],
            }
        ]
        corrected = copy.deepcopy(patient)
        corrected["birthDate"] = f"19{50 + i}-0{i + 1}-1{i}"
        patients += [patient, corrected]
    impossible = copy.deepcopy(patients[5])
    impossible["id"], impossible["birthDate"] = "crafted-impossible", "1946-13-45"
    return [*patients, impossible]


def _build(canaries: Any, patients: list[dict[str, Any]]) -> Any:
    for patient in patients:
        canaries.add_patient(patient, _pseudonym(patient["id"]))
    relatives = [
        {"resourceType": "RelatedPerson", "name": [{"given": ["Eve"], "family": "Nakamura-Lee"}]},
        {"resourceType": "FamilyMemberHistory", "name": "Grandma Øyvor Tanaka"},
    ]
    for relative in relatives:
        canaries.add_resource(relative, _pseudonym(patients[0]["id"]))
    unnamed = copy.deepcopy(patients[7])  # its birth date a canary everywhere
    unnamed["birthDate"] = "1933-03-07"
    canaries.add_patient(unnamed)
    canaries.compile()
    return canaries


def _written(patient: dict[str, Any]) -> list[str]:
    """Text naming ``patient`` as records and exports write it."""
    out = []
    for name in patient.get("name") or []:
        given, family = (name.get("given") or [""])[0], name.get("family") or ""
        out += [f"{given} {family}", f"{family}, {given}", f"{given}{family}", f"{given}-{family}"]
        out += [f"Pt {given.upper()} {family} seen", f"x{given}{family}x", family, f"dr {family}"]
    for telecom in patient.get("telecom") or []:
        value = telecom["value"]
        digits = "".join(ch for ch in value if ch.isdigit())
        out += [value, value.replace("@", "-"), digits, f"+1{digits[-10:]}", f"ab{digits}cd"]
        out += [f"X{digits}", f"{digits[:3]}.{digits[3:6]}.{digits[6:]}", f"1{digits}9"]
    for ident in patient.get("identifier") or []:
        value = ident["value"]
        out += [
            value,
            f"MRN{value}",
            f"ID:{value}x",
            f"a{value}",
            f"{value}0",
            value.replace("-", " "),
        ]
    for address in patient.get("address") or []:
        out += [line.replace(" ", "-") for line in address.get("line") or []]
        city, state, zip_ = (address.get(k, "") for k in ("city", "state", "postalCode"))
        out += [f"{city} {zip_}", f"{city}, {state} {zip_}", f"{city}-{state}-{zip_}"]
    birth = patient.get("birthDate") or ""
    forms = birth_date_forms(birth)
    out += [*forms[::5], f"DOB{birth.replace('-', '')}", f"{birth}T00:00:00Z", f"1{birth}"]
    out += [base64.b64encode(" ".join(out[:6]).encode()).decode(), f"Patient-{patient['id']}-b1"]
    return out


def test_the_same_kinds_are_found_as_by_the_dict_backed_set(cohort: Path) -> None:
    patients = _patients(cohort)
    reference = _build(ReferenceCanarySet(), patients)
    canaries = _build(CanarySet(), patients)
    assert len(canaries) == len(reference)
    rng = random.Random(3)
    texts = [(t, _pseudonym(p["id"])) for p in patients for t in _written(p)]
    # a patient's forms in another patient's row: a birth date counts in its own rows only
    texts += [(t, _pseudonym(rng.choice(patients)["id"])) for t, _ in rng.sample(texts, 300)]
    texts += [(t, None) for t in ("Øyvor Tanaka", "m ller 02123", "stra e", "07/03/1933", "")]
    found = 0
    for text, patient in texts:
        spaced = " ".join(text.translate({ord(c): " " for c in _KEY_SEPARATORS}).split())
        for look in (
            lambda c, text=text: c.find(text),
            lambda c, text=text: c.find(text, True),
            lambda c, text=text, patient=patient: c.scan_value({"text": [text]}, patient),
            lambda c, text=text, patient=patient: c.birth_dates_only().scan_value(text, patient),
            lambda c, spaced=spaced: c.spaced().find(spaced),
            lambda c, text=text: c.source_id_in(text),
            lambda c, patient=patient: c.birth_dates_of(patient),
        ):
            expected = look(reference)
            assert look(canaries) == expected, text
            found += bool(expected)
    rows = [
        json.loads(line)
        for name in ("DocumentReference", "Observation", "Encounter", "Claim")
        for line in itertools.islice((cohort / f"{name}.ndjson").open(), 150)
    ]
    for row in rows:
        subject = (row.get("subject") or row.get("patient") or {}).get("reference", "")
        patient = _pseudonym(subject.split("/")[-1])
        expected = reference.scan_value(row, patient)
        assert canaries.scan_value(row, patient) == expected, row["id"]
        found += bool(expected)
    assert found > 1_000  # the inputs name the patients: most comparisons find something


def _traced_bytes(build: Any) -> tuple[int, Any]:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = build()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before, kept
    finally:
        tracemalloc.stop()


def test_the_canaries_are_held_once(cohort: Path) -> None:
    """Compiled with their spaced set (the release builds both), the canaries take a third of
    the dict-backed set's memory or less (about 0.011 against 0.034 MiB a patient)."""
    patients = _patients(cohort)

    def build(canaries: Any) -> Any:
        _build(canaries, patients)
        canaries.spaced().compile()
        return canaries

    new, _ = _traced_bytes(lambda: build(CanarySet()))
    old, _ = _traced_bytes(lambda: build(ReferenceCanarySet()))
    assert new * 2.5 < old, (new, old)
