from __future__ import annotations

from pathlib import Path

import pytest

from fhirlake.fhirpath import FhirPathError, compile_path, evaluate

PATIENT = {
    "resourceType": "Patient",
    "id": "p1",
    "name": [
        {"use": "official", "family": "Quill", "given": ["Mara", "Jo"]},
        {"use": "nickname", "given": ["M"]},
    ],
    "birthDate": "1948-02-29",
    "_birthDate": {
        "extension": [{"url": "http://x/birthTime", "valueDateTime": "1948-02-29T10:00:00Z"}]
    },
    "address": [{"use": "home", "city": "Springfield", "postalCode": "12345"}],
    "deceasedDateTime": "2020-01-01T00:00:00Z",
    "managingOrganization": {"reference": "Organization/o9"},
    "extension": [{"url": "http://x/race", "valueString": "r"}],
}
OBS = {
    "resourceType": "Observation",
    "id": "o1",
    "status": "final",
    "code": {"text": "x"},
    "subject": {"reference": "Patient/p1"},
    "valueQuantity": {"value": 7.2, "unit": "%"},
}


def test_navigation_choice_types_and_where() -> None:
    assert evaluate(PATIENT, "Patient.name.given") == ["Mara", "Jo", "M"]
    assert evaluate(PATIENT, "Patient.name.where(use = 'official').family") == ["Quill"]
    assert evaluate(OBS, "Observation.value.ofType(Quantity).value") == [7.2]
    assert evaluate(OBS, "Observation.value.unit") == ["%"]
    assert evaluate(PATIENT, "Observation.status") == []  # leading type filters the root
    assert evaluate(PATIENT, "Patient.deceased") == ["2020-01-01T00:00:00Z"]


def test_functions() -> None:
    assert evaluate(PATIENT, "Patient.name.first().given.count()") == [2]
    assert evaluate(PATIENT, "Patient.name.given.join(',')") == ["Mara,Jo,M"]
    assert evaluate(PATIENT, "Patient.name.exists(use = 'nickname')") == [True]
    assert evaluate(PATIENT, "Patient.photo.empty()") == [True]
    assert evaluate(PATIENT, "getResourceKey()") == ["p1"]
    assert evaluate(PATIENT, "managingOrganization.getReferenceKey(Organization)") == ["o9"]
    assert evaluate(PATIENT, "managingOrganization.getReferenceKey(Patient)") == []
    assert evaluate(PATIENT, "extension('http://x/race').value") == ["r"]  # value[x]
    assert evaluate(PATIENT, "extension('http://x/race').valueString") == ["r"]


def test_repeat_finds_nested_elements_at_any_depth() -> None:
    consent = {
        "resourceType": "Consent",
        "provision": {
            "type": "permit",
            "provision": [
                {"type": "deny", "provision": [{"type": "permit", "provision": [{"type": "x"}]}]},
                {"type": "permit"},
            ],
        },
    }
    nested = "provision.repeat(provision).type"
    assert sorted(evaluate(consent, nested)) == ["deny", "permit", "permit", "x"]
    everywhere = "(provision | provision.repeat(provision)).where(type = 'deny').exists()"
    assert evaluate(consent, everywhere) == [True]
    assert evaluate(consent, "provision.provision.repeat(provision).type") == ["permit", "x"]
    assert evaluate(PATIENT, "repeat($this).count()") == [1]  # an item found again ends it
    assert evaluate(PATIENT, "name.repeat(given)") == evaluate(PATIENT, "name.given")


def test_a_boolean_is_never_an_integer() -> None:
    """Python's ``1 == True`` is no FHIRPath equality: ``=`` and ``repeat``'s duplicates keep a
    Boolean and an Integer apart, in complex values too."""
    obs = {
        "resourceType": "Observation",
        "component": [{"valueInteger": 1}, {"valueBoolean": True}, {"valueInteger": 1}],
        "extension": [
            {"url": "http://x/a", "valueInteger": 1},
            {"url": "http://x/a", "valueBoolean": True},
        ],
    }
    assert evaluate(obs, "1 = true") == [False]
    assert evaluate(obs, "component.value.count()") == [3]
    assert evaluate(obs, "component.repeat(value).count()") == [2]  # 1 once, true once
    assert evaluate(obs, "extension.repeat($this).count()") == [2]
    assert evaluate(obs, "component[0].value = component[2].value") == [True]


def test_operators_and_literals() -> None:
    assert evaluate("12345", "$this.startsWith('123') and $this.length() = 5") == [True]
    assert evaluate("12345", "$this.substring(0, 3) + '**'") == ["123**"]
    assert evaluate("1995-05-05", "$this >= @1990-01-01 and $this <= @2020-01-01") == [True]
    assert evaluate("en-US", "$this in ('en-GB' | 'en-US')") == [True]
    assert evaluate(PATIENT, "1 + 2 * 3") == [7]
    assert evaluate(PATIENT, "(Patient.name | Patient.address).count()") == [3]
    with pytest.raises(FhirPathError, match="cannot compare"):
        evaluate("Quill", "$this > 3")


def test_nodes_by_type_and_name_follow_the_r4_model() -> None:
    names = compile_path("nodesByType('HumanName')").evaluate(PATIENT)
    assert len(names) == 2 and all(n.fhir_type == "HumanName" for n in names)
    assert evaluate(PATIENT, "nodesByType('date')") == ["1948-02-29"]
    assert "2020-01-01T00:00:00Z" in evaluate(PATIENT, "nodesByType('dateTime')")
    assert [n.value["url"] for n in compile_path("nodesByType('Extension')").evaluate(PATIENT)] == [
        "http://x/birthTime",
        "http://x/race",
    ]
    assert evaluate(PATIENT, "nodesByType('Reference').reference") == ["Organization/o9"]
    assert evaluate(PATIENT, "nodesByName('postalCode')") == ["12345"]


def test_nodes_change_in_place() -> None:
    patient = {"resourceType": "Patient", "name": [{"given": ["A"]}, {"given": ["B"]}]}
    first = compile_path("Patient.name").evaluate(patient)[0]
    first.remove()
    assert patient["name"] == [{"given": ["B"]}]
    compile_path("Patient.name").evaluate(patient)[0].remove()
    assert "name" not in patient  # no empty arrays left behind
    gender = {"resourceType": "Patient", "gender": "male"}
    compile_path("Patient.gender").evaluate(gender)[0].replace("unknown")
    assert gender["gender"] == "unknown"


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("Patient.name.where(", "position"),
        ("Patient..name", "position"),
        ("nope()", "unknown function"),
    ],
)
def test_syntax_errors_at_compile_time(expr: str, message: str) -> None:
    with pytest.raises(FhirPathError, match=message):
        compile_path(expr)


def test_every_anonymizer_path_compiles(shared_data: Path) -> None:
    import json

    paths = set()
    for config in (shared_data / "ms_anonymizer").rglob("*.json"):
        try:
            doc = json.loads(config.read_text(encoding="utf-8-sig"))
        except ValueError:
            continue
        if isinstance(doc, dict):
            for rule in doc.get("fhirPathRules") or []:
                if isinstance(rule, dict) and isinstance(rule.get("path"), str):
                    paths.add(rule["path"])
    failed = []
    for path in sorted(paths):
        try:
            compile_path(path)
        except FhirPathError:
            failed.append(path)
    print(f"\nanonymizer paths compiled: {len(paths) - len(failed)}/{len(paths)}")
    assert len(paths) > 50
    assert len(failed) / len(paths) < 0.05, failed
