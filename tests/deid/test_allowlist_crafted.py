"""A crafted patient with a canary in every element kind where PHI was seen surviving a
block-list release; none may survive either shipped profile. Plus a property test: a random
string put in an element the profile does not name never survives."""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deid.engine import Deidentifier, DeidSecrets, ProcessingError
from deid.policy import Policy
from deid.release import deidentify_batch
from vault import warehouse
from vault.ingest import ingest_batch
from vault.keys import FileKeyProvider

TODAY = date(2026, 11, 28)
PATIENT = "Patient/p1"
CORE = "http://hl7.org/fhir/us/core/StructureDefinition/"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


def canary(kind: str) -> str:
    return f"Qzx{kind}Canary"


def _coding(code: str, kind: str, system: str = "http://snomed.info/sct") -> dict[str, Any]:
    return {"system": system, "code": code, "display": canary(kind)}


CRAFTED: list[dict[str, Any]] = [
    {
        "resourceType": "Patient",
        "id": "p1",
        "implicitRules": "http://rules.example.org/" + canary("implicitRules"),
        "meta": {
            "lastUpdated": "2011-11-11T11:11:11.111Z",
            "versionId": canary("versionId"),
            "tag": [{"system": "http://t.example", "code": "t", "display": canary("tagDisplay")}],
            "source": canary("metaSource"),
        },
        "text": {"status": "generated", "div": f"<div>{canary('narrative')}</div>"},
        "gender": f"{canary('gender')} Smith",
        "birthDate": "1931-02-03",
        "name": [{"family": canary("family"), "given": [canary("given")]}],
        "telecom": [{"system": "phone", "value": "(555) 867-5309"}],
        "address": [
            {"line": [canary("line")], "city": canary("city"), "state": "MA", "postalCode": "02139"}
        ],
        "extension": [
            {
                "url": CORE + "us-core-race",
                "extension": [
                    {
                        "url": "ombCategory",
                        "valueCoding": _coding(
                            "2106-3", "raceDisplay", "urn:oid:2.16.840.1.113883.6.238"
                        ),
                    },
                    {"url": "text", "valueString": canary("raceText")},
                ],
            },
            {"url": "http://example.org/nickname", "valueString": canary("extension")},
        ],
        "contact": [{"name": {"family": canary("contact")}}],
    },
    {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "code": {"coding": [_coding("8302-2", "codingDisplay", LOINC)], "text": canary("ccText")},
        "subject": {"reference": PATIENT, "display": canary("refDisplay")},
        "effectiveDateTime": "2020-03",
        "valueString": canary("valueString"),
        "note": [{"text": canary("note")}],
        "component": [
            {
                "code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
                "valueString": canary("componentString"),
            }
        ],
    },
    {
        "resourceType": "Observation",
        "id": "age",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "30525-0"}]},
        "subject": {"reference": PATIENT},
        "valueQuantity": {"value": 97, "unit": "years", "system": UCUM, "code": "a"},
    },
    {
        "resourceType": "Condition",
        "id": "c1",
        "subject": {"reference": PATIENT},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
        "onsetString": canary("onsetString"),
        "clinicalStatus": {"coding": [{"code": canary("statusCode")}]},
    },
    {
        "resourceType": "DiagnosticReport",
        "id": "d1",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "24323-8"}]},
        "subject": {"reference": PATIENT},
        "conclusion": canary("conclusion"),
    },
    {
        "resourceType": "MedicationRequest",
        "id": "m1",
        "status": "active",
        "intent": "order",
        "subject": {"reference": PATIENT},
        "medicationCodeableConcept": {
            "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "860975"}]
        },
        "dosageInstruction": [
            {"text": canary("dosageText"), "patientInstruction": canary("patientInstruction")}
        ],
    },
    {
        "resourceType": "Communication",
        "id": "cm1",
        "status": "completed",
        "subject": {"reference": PATIENT},
        "payload": [{"contentString": canary("payload")}],
    },
    {
        "resourceType": "QuestionnaireResponse",
        "id": "q1",
        "status": "completed",
        "subject": {"reference": PATIENT},
        "item": [
            {
                "linkId": "1",
                "text": canary("itemText"),
                "answer": [{"valueString": canary("answer")}],
            }
        ],
    },
    {
        "resourceType": "FamilyMemberHistory",
        "id": "f1",
        "status": "completed",
        "patient": {"reference": PATIENT},
        "relationship": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "MTH"}
            ]
        },
        "name": canary("relativeName"),
    },
    {
        "resourceType": "Provenance",
        "id": "pv1",
        "target": [{"reference": PATIENT}],
        "recorded": "2020-01-01T00:00:00Z",
        "agent": [{"who": {"reference": PATIENT}}],
        "signature": [
            {
                "type": [
                    {"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.1"}
                ],
                "when": "2020-01-01T00:00:00Z",
                "who": {"reference": PATIENT},
                "data": base64.b64encode(canary("signature").encode()).decode(),
            }
        ],
    },
    {
        "resourceType": "Device",
        "id": "dv1",
        "patient": {"reference": PATIENT},
        "deviceName": [{"name": canary("deviceName"), "type": "user-friendly-name"}],
        "partNumber": canary("partNumber"),
        "version": [{"value": canary("deviceVersion")}],
        "serialNumber": canary("serial"),
    },
    {
        "resourceType": "Coverage",
        "id": "cv1",
        "status": "active",
        "beneficiary": {"reference": PATIENT},
        "payor": [{"reference": PATIENT}],
        "class": [
            {
                "type": {"coding": [{"code": "group"}]},
                "value": canary("groupNumber"),
                "name": canary("employer"),
            }
        ],
    },
    {
        "resourceType": "ImagingStudy",
        "id": "is1",
        "status": "available",
        "subject": {"reference": PATIENT},
        "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.840.99999.1"}],
        "series": [
            {
                "uid": "1.2.840.99999.2",
                "modality": {
                    "system": "http://dicom.nema.org/resources/ontology/DCM",
                    "code": "CT",
                },
                "instance": [{"uid": "1.2.840.99999.3", "sopClass": {"code": "1.2"}}],
            }
        ],
    },
]
CANARIES = [
    "implicitRules",
    "versionId",
    "tagDisplay",
    "metaSource",
    "narrative",
    "gender",
    "family",
    "given",
    "line",
    "city",
    "raceDisplay",
    "raceText",
    "extension",
    "contact",
    "codingDisplay",
    "ccText",
    "refDisplay",
    "valueString",
    "note",
    "componentString",
    "onsetString",
    "statusCode",
    "conclusion",
    "dosageText",
    "patientInstruction",
    "payload",
    "itemText",
    "answer",
    "relativeName",
    "signature",
    "deviceName",
    "partNumber",
    "deviceVersion",
    "serial",
    "groupNumber",
    "employer",
]
OTHER_MARKERS = ["2011-11-11", "lastUpdated", "versionId", "99999", "867", "02139"]


def _release(profile: str, resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    policy = Policy.shipped(profile)
    engine = Deidentifier(policy, DeidSecrets.derive(b"\x01" * 32, policy), today=TODAY)
    out = []
    for resource in resources:
        try:
            out.append(engine.apply(resource, patient_scope="p1").resource)
        except ProcessingError:
            pass  # withheld whole: nothing of it is released
    return out


@pytest.mark.parametrize("profile", ["research", "safe_harbor"])
def test_no_canary_survives(profile: str) -> None:
    released = _release(profile, CRAFTED)
    assert {r["resourceType"] for r in released} >= {"Patient", "Observation", "Condition"}
    blob = orjson.dumps(released).decode()
    folded = blob.casefold()
    for kind in CANARIES:
        word = canary(kind)
        assert word.casefold() not in folded, kind
        assert base64.b64encode(word.encode()).decode() not in blob, kind
    # pseudonyms are hex: digits in them are not the markers
    text_only = re.sub(r'"(id|reference)":"[^"]*"', "", blob)
    for marker in OTHER_MARKERS:
        assert marker not in text_only, marker
    # a gender that is not a gender is gone, not kept as text
    patient = next(r for r in released if r["resourceType"] == "Patient")
    assert "gender" not in patient
    # the race category stays, its display only from the OMB value set
    race = patient["extension"][0]["extension"]
    assert race == [
        {
            "url": "ombCategory",
            "valueCoding": {
                "system": "urn:oid:2.16.840.1.113883.6.238",
                "code": "2106-3",
                "display": "White",
            },
        }
    ]
    # meta carries security labels and nothing else
    assert all(set(r.get("meta", {})) <= {"security"} for r in released)


@pytest.mark.parametrize("profile", ["research", "safe_harbor"])
def test_an_age_over_89_is_released_as_90(profile: str) -> None:
    released = _release(profile, CRAFTED)
    age = next(
        r for r in released if r.get("code", {}).get("coding", [{}])[0].get("code") == "30525-0"
    )
    assert age["valueQuantity"]["value"] == 90 and age["valueQuantity"]["code"] == "a"


AGES_WITHOUT_A_UCUM_TIME_UNIT: list[dict[str, Any]] = [
    {
        "resourceType": "Condition",
        "id": "onset",
        "subject": {"reference": PATIENT},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
        "onsetAge": {"value": 97, "unit": "years"},
    },
    {
        "resourceType": "Condition",
        "id": "abatement",
        "subject": {"reference": PATIENT},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003"}]},
        "abatementAge": {"value": 96, "unit": "yr", "system": UCUM, "code": "yr"},
    },
    {
        "resourceType": "FamilyMemberHistory",
        "id": "mother",
        "status": "completed",
        "patient": {"reference": PATIENT},
        "relationship": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "MTH"}
            ]
        },
        "condition": [
            {
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "22298006"}]},
                "onsetAge": {"value": 93, "system": "http://snomed.info/sct", "code": "258707000"},
            }
        ],
    },
    {
        "resourceType": "Observation",
        "id": "age-integer",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "30525-0"}]},
        "subject": {"reference": PATIENT},
        "valueInteger": 98,
    },
    {
        "resourceType": "Observation",
        "id": "count",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "8867-4"}]},
        "subject": {"reference": PATIENT},
        "valueInteger": 97,
    },
]


@pytest.mark.parametrize("profile", ["research", "safe_harbor"])
def test_an_age_over_89_in_any_unit_or_as_an_integer_is_released_as_90(profile: str) -> None:
    """A FHIR Age is an age whatever unit it is written in (``years`` without a system, UCUM
    ``yr``, a SNOMED unit), and an age observation's integer value an age in years: each was
    released as written (onsetAge 97), an age over 89 in both profiles."""
    released = _release(profile, AGES_WITHOUT_A_UCUM_TIME_UNIT)
    onset, abatement, mother, age, count = released
    capped = {"value": 90, "system": UCUM, "code": "a", "unit": "a"}
    assert onset["onsetAge"] == capped
    assert abatement["abatementAge"] == capped
    assert mother["condition"][0]["onsetAge"] == capped
    assert age["valueInteger"] == 90
    assert count["valueInteger"] == 97  # a heart rate is no age


def _component(code: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"code": {"coding": [{"system": LOINC, "code": code}]}, **value}


@pytest.mark.parametrize("profile", ["research", "safe_harbor"])
def test_an_age_over_89_in_a_component_is_released_as_90(profile: str) -> None:
    """A panel (not coded as an age) with an "Age" component: the rule applied to the
    observation's own code only, so the component's integer 97 and its quantity of 96 with no
    unit were released as written, ages over 89 in both profiles. Its other components keep
    their values, and an age component under 90 keeps its own."""
    panel = {
        "resourceType": "Observation",
        "id": "panel",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "8716-3"}]},
        "subject": {"reference": PATIENT},
        "component": [
            _component("30525-0", {"valueInteger": 97}),
            _component("21612-7", {"valueQuantity": {"value": 96}}),
            _component("8867-4", {"valueInteger": 98}),
            _component("30525-0", {"valueInteger": 89}),
        ],
    }
    (released,) = _release(profile, [panel])
    values = [c.get("valueInteger", c.get("valueQuantity")) for c in released["component"]]
    assert values == [
        90,
        {"value": 90, "system": UCUM, "code": "a", "unit": "a"},
        98,  # a heart rate is no age
        89,
    ]


# (the age as written, its years worked out here): a unit written as text is read as the unit it
# names, an unreadable one as years
AGES_IN_WORDS = [
    ({"value": 97, "unit": "months"}, 97 / 12),
    ({"value": 1200, "unit": "Months"}, 100.0),
    ({"value": 5000, "unit": "wks"}, 5000 / 52.1775),
    ({"value": 40000, "unit": "days"}, 40000 / 365.25),
    ({"value": 97, "unit": "Years"}, 97.0),
    ({"value": 97, "code": "yrs"}, 97.0),
    ({"value": 97, "unit": "lunar cycles"}, 97.0),
]


@pytest.mark.parametrize(("age", "years"), AGES_IN_WORDS)
def test_an_age_written_in_a_unit_of_words_is_capped_by_its_years(
    age: dict[str, Any], years: float
) -> None:
    """97 months is an 8-year-old: read as 97 years, it was released as 90 years old."""
    condition = {**AGES_WITHOUT_A_UCUM_TIME_UNIT[0], "onsetAge": age}
    (released,) = _release("research", [condition])
    if years >= 90:
        assert released["onsetAge"] == {"value": 90, "system": UCUM, "code": "a", "unit": "a"}
    else:
        assert released["onsetAge"] == {"value": age["value"]}


# days from birth to the 90th birthday: 22 leap days between (born 6 December 1936), and 21 when
# the span holds 1900, no leap year (born 1 March 1896)
NINETIETH_BIRTHDAYS = [
    (date(2026, 12, 6) - date(1936, 12, 6)).days,
    (date(1986, 3, 1) - date(1896, 3, 1)).days,
]


def _onset(age: dict[str, Any]) -> dict[str, Any]:
    return {**AGES_WITHOUT_A_UCUM_TIME_UNIT[0], "onsetAge": age}


@pytest.mark.parametrize("profile", ["research", "safe_harbor"])
@pytest.mark.parametrize("days", NINETIETH_BIRTHDAYS)
def test_an_age_of_90_counted_in_days_hours_or_minutes_is_released_as_90(
    profile: str, days: int
) -> None:
    """A patient on their 90th birthday is 32,872 days old (32,871 across 1900): read with the
    mean year of 365.25 days that was 89.9986 years, and the age was released as written, in
    days, hours and minutes alike, in both profiles. A day younger, it stays an age under 90:
    as written in research, in whole years in safe_harbor
    (tests/deid/test_safe_harbor_intervals.py)."""
    assert days in (32872, 32871)
    capped = {"value": 90, "system": UCUM, "code": "a", "unit": "a"}
    ages = [
        {"value": days, "system": UCUM, "code": "d", "unit": "d"},
        {"value": days * 24, "system": UCUM, "code": "h"},
        {"value": days * 24 * 60, "system": UCUM, "code": "min"},
        {"value": days, "unit": "days"},
    ]
    released = _release(profile, [_onset(age) for age in ages])
    assert [r["onsetAge"] for r in released] == [capped] * len(ages)
    younger = {"value": 32870, "system": UCUM, "code": "d", "unit": "d"}
    (kept,) = _release(profile, [_onset(younger)])
    in_years = {"value": 89, "system": UCUM, "code": "a", "unit": "a"}
    assert kept["onsetAge"] == (younger if profile == "research" else in_years)


@pytest.mark.parametrize("profile", ["research", "safe_harbor"])
@pytest.mark.parametrize(
    ("system", "code"),
    [
        (LOINC, "30972-4"),  # age at onset of adverse event (HL7's age-type LOINC value set)
        ("http://snomed.info/sct", "424144002"),  # current chronological age
        ("http://snomed.info/sct", "397669002"),  # age
        ("http://snomed.info/sct", "445518008"),  # age at onset: C-CDA's Age Observation
    ],
)
def test_an_observation_coded_as_an_age_by_other_codes_is_capped(
    profile: str, system: str, code: str
) -> None:
    """An age observation coded 30972-4, or by SNOMED CT (current chronological age, age, or age
    at onset, the code of C-CDA's Age Observation), was no age observation: its integer 97
    and its quantity of 96 "years" (no UCUM system, so released as the bare number 96) were
    released as written in both profiles."""
    base = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": PATIENT},
    }
    integer = {**base, "id": "integer", "valueInteger": 97}
    quantity = {**base, "id": "quantity", "valueQuantity": {"value": 96, "unit": "years"}}
    young = {**base, "id": "young", "valueInteger": 45}
    released_integer, released_quantity, released_young = _release(
        profile, [integer, quantity, young]
    )
    assert released_integer["valueInteger"] == 90
    assert released_quantity["valueQuantity"] == {
        "value": 90,
        "system": UCUM,
        "code": "a",
        "unit": "a",
    }
    assert released_young["valueInteger"] == 45


@pytest.mark.parametrize("profile", ["research", "safe_harbor"])
def test_an_observation_dated_by_effective_instant_keeps_its_date(profile: str) -> None:
    """``effectiveInstant`` was dropped by both profiles, so such a result had no time and was
    no lab feature; it is released as the profile releases a time: moved with the patient's
    shift to the midnight of that day (the day a date-only result of the same day moves to),
    or the year alone."""
    base = {
        "resourceType": "Observation",
        "status": "final",
        "subject": {"reference": PATIENT},
        "code": {"coding": [{"system": LOINC, "code": "4548-4"}]},
        "valueQuantity": {"value": 6.5},
    }
    timed = {**base, "id": "timed", "effectiveInstant": "2024-04-01T08:13:00.123Z"}
    dated = {**base, "id": "dated", "effectiveDateTime": "2024-04-01"}
    released_timed, released_dated = _release(profile, [timed, dated])
    if profile == "research":
        day = released_dated["effectiveDateTime"]
        assert released_timed["effectiveInstant"] == f"{day}T00:00:00Z"
        assert day != "2024-04-01"  # moved: the shift is never zero
    else:
        assert released_timed["effectiveInstant"] == released_dated["effectiveDateTime"] == "2024"


def test_partial_dates_move_with_the_patient() -> None:
    released = _release("research", CRAFTED)
    obs = next(r for r in released if "effectiveDateTime" in r)
    # 2020-03 moved by the patient's offset (within 50 days of mid-March), still a year-month
    assert obs["effectiveDateTime"] in {"2020-01", "2020-02", "2020-03", "2020-04", "2020-05"}
    safe = _release("safe_harbor", CRAFTED)
    assert next(r for r in safe if "effectiveDateTime" in r)["effectiveDateTime"] == "2020"


# -- property: a random string in an unnamed element never survives ---------------------------

BASES: dict[str, dict[str, Any]] = {r["resourceType"] + "/" + r["id"]: r for r in CRAFTED}
# elements no shipped profile names: at the top of a resource, and inside named elements
UNNAMED_TOP = {
    "Patient": ["name", "telecom", "photo", "contact", "link", "maritalStatus", "text", "language"],
    "Observation": ["note", "valueString", "specimen", "device", "focus", "bodySite.text", "text"],
    "Condition": ["note", "onsetString", "abatementString", "evidence", "stage", "asserter"],
    "Encounter": ["identifier", "text", "episodeOfCare", "account", "appointment"],
}
UNNAMED_INSIDE = [
    "code.text",
    "code.coding.display",
    "code.coding.userSelected",
    "subject.display",
    "subject.identifier",
    "subject.type",
    "meta.tag",
    "extension",
    "modifierExtension",
    "contained",
    "implicitRules",
    "id.extension",
]
SHAPES = ["string", "list", "object", "coding"]


def _shape(text: str, shape: str) -> Any:
    return {
        "string": text,
        "list": [text],
        "object": {"value": text, "display": text, "text": text},
        "coding": [{"coding": [{"system": "http://x.example", "code": "a", "display": text}]}],
    }[shape]


def _plant(resource: dict[str, Any], path: str, value: Any) -> None:
    node = resource
    keys = path.split(".")
    for key in keys[:-1]:
        child = node.get(key)
        if isinstance(child, list):
            child = child[0] if child and isinstance(child[0], dict) else None
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


BASE_BY_TYPE = {
    "Patient": CRAFTED[0],
    "Observation": CRAFTED[1],
    "Condition": CRAFTED[3],
    "Encounter": {
        "resourceType": "Encounter",
        "id": "e1",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": PATIENT},
        "period": {"start": "2020-01-01T10:00:00Z"},
    },
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rtype=st.sampled_from(sorted(UNNAMED_TOP)),
    where=st.data(),
    text=st.text(alphabet="abcdefghijklmnopqrstuvwxyz ", min_size=6, max_size=24),
    shape=st.sampled_from(SHAPES),
    profile=st.sampled_from(["research", "safe_harbor"]),
)
def test_random_text_in_an_unnamed_element_never_survives(
    rtype: str, where: st.DataObject, text: str, shape: str, profile: str
) -> None:
    secret = f"Qzx{text.strip()}Prop"
    path = where.draw(st.sampled_from(UNNAMED_TOP[rtype] + UNNAMED_INSIDE))
    resource = orjson.loads(orjson.dumps(BASE_BY_TYPE[rtype]))
    _plant(resource, path, _shape(secret, shape))
    released = _release(profile, [resource])
    assert secret.casefold() not in orjson.dumps(released).decode().casefold()


# -- the same patient through the vault and the batch stage -----------------------------------


@pytest.mark.parametrize("profile", ["research", "safe_harbor"])
def test_no_canary_reaches_the_release_tables_or_the_log(
    profile: str,
    tmp_path: Path,
    key_provider: FileKeyProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "crafted.ndjson").write_bytes(b"\n".join(orjson.dumps(r) for r in CRAFTED))
    wh = tmp_path / "w.duckdb"
    caplog.set_level(logging.DEBUG)
    ingest_batch(wh, "b", landing, key_provider, workers=1)
    con = warehouse.connect(wh)
    try:
        (in_vault,) = con.execute("SELECT count(*) FROM phi_vault").fetchone() or (0,)
        report = deidentify_batch(con, key_provider, "b", Policy.shipped(profile), today=TODAY)
        tables = [
            orjson.dumps(con.execute(f"SELECT * FROM {t}").fetchall(), default=str).decode()
            for t in ("deid_resources", "deid_errors")
        ]
    finally:
        con.close()
    assert in_vault >= 10 and report.released >= 10  # the crafted patient got through ingest
    text = ("\n".join(tables) + caplog.text + orjson.dumps(report.to_dict()).decode()).casefold()
    for kind in CANARIES:
        assert canary(kind).casefold() not in text, kind
    assert "2011-11-11" not in text


# -- every string-typed element of every released type --------------------------------------

_TEXT_TYPES = ("String", "Markdown", "Uri", "Url", "Canonical", "Id", "Base64Binary", "Code")


def _string_elements(resource_type: str) -> list[str]:
    """Top-level elements the R4B model types as a string kind (read here from the models, not
    from the engine's plan)."""
    from fhir.resources.R4B import get_fhir_model_class

    fields = get_fhir_model_class(resource_type).model_fields.values()
    return sorted(
        str(f.alias)
        for f in fields
        if f.alias and any(f"{kind}(" in str(f.annotation) for kind in _TEXT_TYPES)
    )


@pytest.mark.parametrize("profile", ["research", "safe_harbor"])
def test_text_in_any_string_element_of_a_released_type_never_survives(profile: str) -> None:
    policy = Policy.shipped(profile)
    assert policy.release is not None
    engine = Deidentifier(policy, DeidSecrets.derive(b"\x01" * 32, policy), today=TODAY)
    checked = 0
    for rtype in sorted(t for t in policy.release.resources if t != "*"):
        for element in _string_elements(rtype):
            if element in ("id", "resourceType"):
                continue
            secret = f"Qzx{rtype}{element}Free text"
            resource = {"resourceType": rtype, "id": "x", element: secret}
            try:
                released = engine.apply(resource, patient_scope="p").resource
            except ProcessingError:
                continue
            assert secret.casefold() not in orjson.dumps(released).decode().casefold(), (
                f"{rtype}.{element}"
            )
            checked += 1
    assert checked > 100  # every released type has some


SNOMED = "http://snomed.info/sct"
# born 10 March 1930: 96 on TODAY; the year that makes a patient 90 on TODAY is 1936
OVER_89 = "1930-03-10"
YEAR_OF_90 = f"{TODAY.year - 90:04d}"


def _observation(code: dict[str, str], **value: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [code]},
        "subject": {"reference": PATIENT},
        **value,
    }


def test_a_birth_date_over_89_years_ago_in_an_observation_is_its_year_of_90() -> None:
    """Research: ``Patient.birthDate`` over 89 years ago becomes the year that makes the patient
    90, but the same birth date recorded by an observation (LOINC 21112-8 "Birth date", SNOMED
    CT 184099003 "Date of birth", a panel's birth-date row, the start of a calculated age's
    period) was only shifted: a full date within the shift's window of the true one. A younger
    patient's birth date, and the period's end (the age's own date), are shifted as before."""
    birth_loinc = {"system": LOINC, "code": "21112-8"}
    released = _release(
        "research",
        [
            _observation(birth_loinc, valueDateTime=OVER_89),
            _observation({"system": SNOMED, "code": "184099003"}, valueDateTime=OVER_89),
            _observation(
                {"system": LOINC, "code": "8716-3"},
                component=[{"code": {"coding": [birth_loinc]}, "valueDateTime": OVER_89}],
            ),
            _observation(
                {"system": LOINC, "code": "30525-0"},
                valuePeriod={"start": OVER_89, "end": "2026-01-05"},
            ),
            _observation(birth_loinc, valueDateTime="2000-05-01"),
        ],
    )
    loinc, snomed, panel, period, young = released
    assert loinc["valueDateTime"] == snomed["valueDateTime"] == YEAR_OF_90
    assert panel["component"][0]["valueDateTime"] == YEAR_OF_90
    assert period["valuePeriod"]["start"] == YEAR_OF_90
    # shifted, to a day: not the year of 90
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", period["valuePeriod"]["end"])
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", young["valueDateTime"])
    assert young["valueDateTime"] != "2000-05-01"


def _with_contained_patient(code: str) -> dict[str, Any]:
    """A lab result carrying its patient inside it (subject ``#pt``), as a lab feed does for a
    patient the hospital's records do not hold, coded locally with ``code``."""
    return {
        "resourceType": "Observation",
        "id": "lab1",
        "status": "final",
        "contained": [
            {
                "resourceType": "Patient",
                "id": "pt",
                "name": [{"family": "Quillfeather", "given": ["Zephyrine"]}],
                "identifier": [{"system": "http://hospital.example/mrn", "value": "73519264"}],
            }
        ],
        "subject": {"reference": "#pt"},
        "code": {"coding": [{"system": "http://hospital.example/lab", "code": code}]},
    }


def _with_patient_by_identifier(code: str) -> dict[str, Any]:
    """A lab result naming its patient by identifier and display alone (no literal
    reference), for a patient no Patient resource holds, coded locally with ``code``."""
    record = _with_contained_patient(code)
    del record["contained"]
    record["subject"] = {
        "identifier": {"system": "http://hospital.example/mrn", "value": "73519264"},
        "display": "Zephyrine Quillfeather",
    }
    return record


@pytest.mark.parametrize("profile", ["research", "safe_harbor"])
@pytest.mark.parametrize("record", [_with_contained_patient, _with_patient_by_identifier])
@pytest.mark.parametrize("code", ["MRN73519264", "QUILLFEATHER", "ZephyrineQuillfeather"])
def test_a_record_naming_the_person_it_holds_is_withheld(
    profile: str, record: Callable[[str], dict[str, Any]], code: str
) -> None:
    """A person known only inside a record (a Patient it contains, or one its subject names by
    identifier and display alone) is dropped by the release, and is in no record the leak
    scan reads its canaries from: a local code holding their MRN or name was released, into
    views.observation too. Such a record is withheld (``contained_person_named``); one that
    does not name them is released without them."""
    policy = Policy.shipped(profile)
    engine = Deidentifier(policy, DeidSecrets.derive(b"\x01" * 32, policy), today=TODAY)
    with pytest.raises(ProcessingError) as raised:
        engine.apply(record(code))
    assert raised.value.code == "contained_person_named"
    assert code.casefold() not in str(raised.value).casefold()
    assert "73519264" not in str(raised.value)
    released = engine.apply(record("GLU")).resource
    assert released["code"]["coding"][0]["code"] == "GLU"
    assert "contained" not in released and "subject" not in released


_MRN = {"system": "http://hospital.example/mrn", "value": "73519264"}


def _with_contained_person(code: str) -> dict[str, Any]:
    """A lab result carrying, as a Person it contains, the person it is about (its focus)."""
    record = _with_contained_patient(code)
    record["contained"][0]["resourceType"] = "Person"
    del record["subject"]
    record["focus"] = [{"reference": "#pt"}]
    return record


def _with_performer_by_identifier(code: str) -> dict[str, Any]:
    """A lab result whose performer (a relative measuring at home) is named by identifier and
    display alone, outside the Patient compartment's elements."""
    record = _with_patient_by_identifier(code)
    record["subject"] = {"reference": "Patient/p1"}
    record["performer"] = [{"identifier": _MRN, "display": "Zephyrine Quillfeather"}]
    return record


def _with_participant_by_identifier(code: str) -> dict[str, Any]:
    """An encounter whose participant, in a backbone element, is named by identifier and
    display alone, coded locally with ``code``."""
    return {
        "resourceType": "Encounter",
        "id": "enc1",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "type": [{"coding": [{"system": "http://hospital.example/visit", "code": code}]}],
        "subject": {"reference": "Patient/p1"},
        "participant": [{"individual": {"identifier": _MRN, "display": "Zephyrine Quillfeather"}}],
    }


@pytest.mark.parametrize("profile", ["research", "safe_harbor"])
@pytest.mark.parametrize(
    "record",
    [_with_contained_person, _with_performer_by_identifier, _with_participant_by_identifier],
)
@pytest.mark.parametrize("code", ["MRN73519264", "QUILLFEATHER"])
def test_a_record_naming_a_person_it_refers_to_by_identifier_is_withheld(
    profile: str, record: Callable[[str], dict[str, Any]], code: str
) -> None:
    """A contained Person, and a person any reference of a record names by identifier alone
    (a performer, an encounter's participant), is known only inside the record as a contained
    Patient is: a local code holding their MRN or name is withheld with the record."""
    policy = Policy.shipped(profile)
    engine = Deidentifier(policy, DeidSecrets.derive(b"\x01" * 32, policy), today=TODAY)
    with pytest.raises(ProcessingError) as raised:
        engine.apply(record(code))
    assert raised.value.code == "contained_person_named"
    assert "73519264" not in str(raised.value)
    assert "quillfeather" not in str(raised.value).casefold()
    engine.apply(record("GLU"))  # one that names no one is released


@pytest.mark.parametrize(
    "display",
    ["Zephyrine Quillfeather", "Mrs. Zephyrine Quillfeather", "Quillfeather, Zephyrine, Jr"],
)
def test_a_record_naming_its_patient_by_display_alone_is_withheld(display: str) -> None:
    """A patient named by ``display`` alone (no identifier, no literal reference), also with a
    title or a suffix: a local code holding their full name glued was released when the
    title was read as the first name (``Mrs Quillfeather``)."""
    policy = Policy.shipped("research")
    engine = Deidentifier(policy, DeidSecrets.derive(b"\x01" * 32, policy), today=TODAY)
    record = _with_patient_by_identifier("ZEPHYRINEQUILLFEATHER")
    record["subject"] = {"display": display}
    with pytest.raises(ProcessingError) as raised:
        engine.apply(record)
    assert raised.value.code == "contained_person_named"
