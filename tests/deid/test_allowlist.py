"""The allow-list engine element by element: dates, bindings, codes and displays, ages, ZIP3,
references, profiles that cannot compile, Microsoft rules on top, and workers."""

from __future__ import annotations

import contextlib
import copy
import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
import unicodedata
from datetime import date, timedelta
from typing import Any

import orjson
import pytest

from deid import workers
from deid.allowlist import ProfileError, ReleaseProfile
from deid.engine import Deidentifier, DeidOutcome, DeidSecrets, ProcessingError
from deid.policy import Policy
from deid.terminology import US_STATES, Terminology, binding_code, system_code

TODAY = date(2026, 11, 28)
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
SNOMED = "http://snomed.info/sct"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
KEY = b"\x02" * 32


def _engine(
    profile: str = "research", terminology: Terminology | None = None, policy: Policy | None = None
) -> Deidentifier:
    policy = policy or Policy.shipped(profile)
    return Deidentifier(
        policy, DeidSecrets.derive(KEY, policy), today=TODAY, terminology=terminology
    )


def _obs(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": "o",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "8302-2", "display": "Body height"}]},
        "subject": {"reference": "Patient/p"},
        **extra,
    }


def _apply(resource: dict[str, Any], profile: str = "research", **kw: Any) -> DeidOutcome:
    return _engine(profile, **kw).apply(resource, patient_scope="p")


@pytest.mark.parametrize("value", ["0001-01-01", "9999-12-31T23:59:59Z", "2020-02-30", "soon"])
def test_dates_that_cannot_be_released_are_withheld_and_counted(value: str) -> None:
    for profile in ("research", "safe_harbor"):
        out = _apply(_obs(effectiveDateTime=value), profile)
        assert "effectiveDateTime" not in out.resource
        assert sum(out.release_counts.values()) == 1


def test_partial_dates_follow_the_date_rule() -> None:
    shift = _engine()._shift_days({}, "p")
    out = _apply(_obs(effectiveDateTime="2020-03", issued="2021"))
    moved = date(2020, 3, 15) + timedelta(days=shift)  # a year-month moves with its 15th
    assert out.resource["effectiveDateTime"] == f"{moved.year:04d}-{moved.month:02d}"
    assert out.resource["issued"] == "2021"
    full = _apply(_obs(effectiveDateTime="2020-03-10T08:30:00+01:00"))
    expected = (date(2020, 3, 10) + timedelta(days=shift)).isoformat()
    assert full.resource["effectiveDateTime"] == f"{expected}T00:00:00Z"
    safe = _apply(_obs(effectiveDateTime="2020-03-10T08:30:00+01:00"), "safe_harbor")
    assert safe.resource["effectiveDateTime"] == "2020"


@pytest.mark.parametrize(
    ("element", "value"),
    [
        ("onsetDateTime", "1933-06-07"),
        ("onsetDateTime", "1933-06"),
        ("onsetDateTime", "1933"),
        ("recordedDate", "1936-11-20T10:00:00Z"),
    ],
)
def test_an_event_date_more_than_89_years_ago_is_withheld_by_the_shift_rule(
    element: str, value: str
) -> None:
    """A patient's event more than 89 years ago dates their birth earlier still: research
    released a condition's onset of 7 June 1933 shifted (``1933-07-25``) beside the birth date
    it made the year of 90 (``1936``), which told an age of 93 or more, as an age of 85 in
    2015 would (withheld: ``age_withheld``). Safe Harbor withholds such a date too."""
    condition = {
        "resourceType": "Condition",
        "id": "c",
        "subject": {"reference": "Patient/p"},
        "code": {"coding": [{"system": SNOMED, "code": "38341003"}]},
        element: value,
    }
    for profile in ("research", "safe_harbor"):
        outcome = _apply(copy.deepcopy(condition), profile)
        assert element not in outcome.resource
        assert outcome.release_counts["date_withheld"] == 1
    recent = {**condition, element: "1937-01-02"}  # 89 years ago: shifted as any date is
    assert _apply(recent).resource[element] != "1937-01-02"
    assert _apply(recent).release_counts["date_withheld"] == 0


def test_the_dates_of_a_resource_of_no_patient_are_withheld_by_the_per_patient_shift() -> None:
    """A resource filed under no patient (a Provenance whose target is the patient's
    observation, an observation without a subject that names the patient's encounter) was
    shifted by an offset of its own, drawn for it alone: linked by its reference to a record
    shifted by the patient's offset, each such pair narrowed that offset, and forty of them
    gave it back within days, and with it every true date of the patient. Its dates are
    withheld (``date_no_patient``); a year alone, which no shift moves, stays."""
    engine = _engine()
    observation = _obs(effectiveDateTime="2024-03-10T08:00:00Z")
    provenance = {
        "resourceType": "Provenance",
        "id": "prov",
        "target": [{"reference": "Observation/o"}],
        "recorded": "2024-03-10T08:00:00Z",
    }
    released = engine.apply(provenance, patient_scope=None)
    assert "recorded" not in released.resource
    assert released.resource["target"]  # still joins the observation it is about
    assert released.release_counts["date_no_patient"] == 1
    unfiled = {**observation, "id": "o2", "issued": "2024", "effectivePeriod": {"end": "2024-03"}}
    unfiled.pop("effectiveDateTime")
    out = engine.apply(unfiled, patient_scope=None).resource
    assert out["issued"] == "2024" and "effectivePeriod" not in out
    # the patient's own records, and the research profile's shift under the year rule, as before
    assert engine.apply(observation, patient_scope="p").resource["effectiveDateTime"] != (
        "2024-03-10T08:00:00Z"
    )
    safe = _engine("safe_harbor").apply(provenance, patient_scope=None)
    assert safe.resource["recorded"] == "2024"


def test_a_conditions_onset_period_is_released_with_its_dates_shifted() -> None:
    """The feature tables date a diagnosis without a recorded date by its onset period: both
    ends leave the release, moved as every other date of the patient."""
    shift = _engine()._shift_days({}, "p")
    condition = {
        "resourceType": "Condition",
        "id": "c",
        "subject": {"reference": "Patient/p"},
        "onsetPeriod": {"start": "2023-02-01", "end": "2023-04-15T08:30:00Z"},
    }
    out = _apply(condition)
    start = (date(2023, 2, 1) + timedelta(days=shift)).isoformat()
    end = (date(2023, 4, 15) + timedelta(days=shift)).isoformat()
    assert out.resource["onsetPeriod"] == {"start": start, "end": f"{end}T00:00:00Z"}
    safe = _apply(condition, "safe_harbor")
    assert safe.resource["onsetPeriod"] == {"start": "2023", "end": "2023"}


def test_a_consents_nested_provisions_keep_their_type_and_purpose_four_levels_deep() -> None:
    """A research opt-out is often an exception (provision.provision) of a permit: its type
    and purpose leave the release at each of the four levels the profiles name
    (deid.terminology.CONSENT_PROVISION_LEVELS), a type in another case as its binding's code;
    a fifth level is not released, and the Consent is counted (consent_provisions_too_deep)."""
    purpose = [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH"}]
    fifth = {"type": "deny", "purpose": purpose}
    fourth = {"type": "Deny", "purpose": purpose, "provision": [fifth]}
    third = {"type": "permit", "provision": [fourth]}
    second = {"type": "deny", "purpose": purpose, "actor": [{"role": {"text": "Dr X"}}]}
    consent = {
        "resourceType": "Consent",
        "id": "k",
        "status": "active",
        "patient": {"reference": "Patient/p"},
        "provision": {
            "type": "permit",
            "provision": [second, {"type": "permit", "provision": [third]}],
        },
    }
    for profile in ("research", "safe_harbor"):
        outcome = _apply(copy.deepcopy(consent), profile)
        nested = outcome.resource["provision"]["provision"]
        assert nested[0] == {"type": "deny", "purpose": purpose}
        assert nested[1]["provision"][0]["provision"] == [{"type": "deny", "purpose": purpose}]
        # the fifth level is not released, and that is counted: an opt-out there is lost
        assert outcome.release_counts["consent_provisions_too_deep"] == 1
    fourth.pop("provision")  # four levels: all released, nothing counted
    assert _apply(copy.deepcopy(consent)).release_counts["consent_provisions_too_deep"] == 0


def test_codes_outside_their_binding_are_nulled_and_counted() -> None:
    out = _apply(_obs(status="final Smith"))
    assert "status" not in out.resource and out.release_counts["code_not_in_binding"] == 1
    encounter = {
        "resourceType": "Encounter",
        "id": "e",
        "status": "finished",
        "class": {"system": "x", "code": "John"},
    }
    released = _apply(encounter).resource
    assert released["status"] == "finished" and "class" not in released


def test_a_code_differing_from_its_bindings_code_in_case_alone_is_released_as_that_code() -> None:
    consent = {
        "resourceType": "Consent",
        "id": "k",
        "status": "Active",
        "patient": {"reference": "Patient/p"},
        "provision": {"type": "Deny"},
    }
    out = _apply(consent)
    assert out.resource["status"] == "active"
    assert out.resource["provision"] == {"type": "deny"}
    assert out.release_counts["code_case_normalised"] == 2
    assert out.release_counts["code_not_in_binding"] == 0
    encounter = {
        "resourceType": "Encounter",
        "id": "e",
        "status": "CANCELLED",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "imp"},
    }
    released = _apply(encounter).resource
    assert released["status"] == "cancelled" and released["class"]["code"] == "IMP"
    sex = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex"
    patient = {
        "resourceType": "Patient",
        "id": "p",
        "gender": "Female",
        "extension": [{"url": sex, "valueCode": "f"}],
    }
    released = _apply(patient).resource
    assert released["gender"] == "female"
    assert released["extension"] == [{"url": sex, "valueCode": "F"}]


@pytest.mark.parametrize("status", ["Final Smith", "finale", " final", "f\u0131nal"])
def test_a_code_matching_no_code_of_its_binding_in_any_case_stays_withheld(status: str) -> None:
    out = _apply(_obs(status=status))
    assert "status" not in out.resource
    assert out.release_counts["code_not_in_binding"] == 1
    assert out.release_counts["code_case_normalised"] == 0


def test_a_value_matching_several_codes_of_a_binding_without_case_matches_none() -> None:
    binding = frozenset({"Ab", "aB", "c"})
    assert binding_code(binding, "aB") == "aB"  # as written: itself
    assert binding_code(binding, "AB") is None  # two codes it could be: neither is chosen
    assert binding_code(binding, "C") == "c"


def test_a_code_that_does_not_look_like_its_systems_code_is_dropped() -> None:
    out = _apply(_obs(code={"coding": [{"system": LOINC, "code": "Jane Roe"}]}))
    assert "code" not in out.resource and out.release_counts["code_malformed"] == 1


@pytest.mark.parametrize(
    ("system", "code", "expected"),
    [
        # ICD-10-CM and ICD-10 codes do not depend on case: lower case is the upper-case code
        (ICD10CM, "i50.9", "I50.9"),
        (ICD10CM, "i509", "I509"),
        (ICD10CM, "s72.001a", "S72.001A"),
        (ICD10CM, "e11.9", "E11.9"),
        (ICD10, "i21.0", "I21.0"),
        (ICD10CM, "I50.9", "I50.9"),  # as written: itself
        # still no code once upper-cased
        (ICD10CM, "i50.9x1234", None),
        (ICD10CM, "heart failure", None),
        (ICD10CM, "\u0131" + "50.9", None),  # the dotless i is upper case I only outside ASCII
        (ICD10CM, " i50.9", None),
        # LOINC codes are not case sensitive either: its answer and part codes in upper case
        (LOINC, "la6576-8", "LA6576-8"),
        (LOINC, "lp14082-9", "LP14082-9"),
        (LOINC, "LA6576-8", "LA6576-8"),
        (LOINC, "2345-7", "2345-7"),
        (LOINC, "la6576-8 never smoker", None),
        # every other system keeps the case it was written in
        (SNOMED, "84114007", "84114007"),
        (UCUM, "Mm", "Mm"),
        (UCUM, "mm", "mm"),
        (ACT, "imp", "imp"),
        ("urn:oid:1.2.840.99999.1", "i50.9", "i50.9"),
        (None, "i50.9", "i50.9"),
    ],
)
def test_a_code_is_upper_cased_only_in_a_system_whose_codes_do_not_depend_on_case(
    system: str | None, code: str, expected: str | None
) -> None:
    assert system_code(system, code) == expected


@pytest.mark.parametrize(
    ("system", "code"),
    [
        (SNOMED, "84114007\n"),
        (LOINC, "2345-7\n"),
        (ICD10CM, "i50.9\n"),
        (UCUM, "mg/dL\n"),
        ("urn:oid:1.2.840.99999.1", "local-7\n"),
        (None, "abc\n"),
    ],
)
def test_a_code_with_a_line_break_after_it_is_no_code(system: str | None, code: str) -> None:
    """``$`` also matches before a final newline: such a code was released with its newline."""
    assert system_code(system, code) is None


def test_a_lower_case_icd10_code_is_released_upper_cased_and_counted() -> None:
    condition = {
        "resourceType": "Condition",
        "id": "c",
        "subject": {"reference": "Patient/p"},
        "code": {
            "coding": [
                {"system": ICD10CM, "code": "i50.9"},
                {"system": ICD10, "code": "I50.9"},
                {"system": "urn:oid:1.2.840.99999.1", "code": "hf"},
            ]
        },
    }
    out = _apply(condition)
    assert out.resource["code"]["coding"] == [
        {"system": ICD10CM, "code": "I50.9"},
        {"system": ICD10, "code": "I50.9"},
        {"system": "urn:oid:1.2.840.99999.1", "code": "hf"},
    ]
    assert out.release_counts["code_case_normalised"] == 1
    assert out.release_counts["code_malformed"] == 0
    # LOINC codes are not case sensitive: an answer code in lower case is released upper-cased
    lab = _apply(_obs(code={"coding": [{"system": LOINC, "code": "la6576-8"}]}))
    assert lab.resource["code"]["coding"] == [{"system": LOINC, "code": "LA6576-8"}]
    assert lab.release_counts["code_case_normalised"] == 1
    # a system that tells codes apart by case keeps withholding what is no code of it
    snomed = _apply(_obs(code={"coding": [{"system": SNOMED, "code": "abc"}]}))
    assert "code" not in snomed.resource and snomed.release_counts["code_malformed"] == 1


def test_display_only_from_the_terminology() -> None:
    assert "display" not in _apply(_obs()).resource["code"]["coding"][0]
    terms = Terminology({(LOINC, "8302-2"): "Body height (terminology)"})
    coding = _apply(_obs(), terminology=terms).resource["code"]["coding"][0]
    assert coding == {"system": LOINC, "code": "8302-2", "display": "Body height (terminology)"}


def test_terminology_from_value_sets_lists_explicit_concepts() -> None:
    vs = {
        "compose": {
            "include": [
                {"system": "http://snomed.info/sct", "concept": [{"code": "1", "display": "One"}]},
                {"system": "http://snomed.info/sct", "filter": [{"op": "is-a", "value": "2"}]},
            ]
        }
    }
    terms = Terminology.from_valuesets([vs])
    assert terms.display("http://snomed.info/sct", "1") == "One"
    assert terms.display("http://snomed.info/sct", "2") is None


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        ({"value": 1100, "system": UCUM, "code": "mo"}, 90),  # 91.7 years
        ({"value": 89.9, "system": UCUM, "code": "a"}, 89.9),
        ({"value": 33000, "system": UCUM, "code": "d"}, 90),
        ({"value": 120, "system": UCUM, "code": "min"}, 120),
        ({"value": 150, "system": UCUM, "code": "kg"}, 150),
    ],
)
def test_ages_of_90_or_more_in_time_units_are_capped(
    quantity: dict[str, Any], expected: float
) -> None:
    released = _apply(_obs(valueQuantity=quantity)).resource["valueQuantity"]
    assert released["value"] == expected


@pytest.mark.parametrize(
    "code",
    ["%", "mm[Hg]", "/min", "{beats}/min", "mL/min/{1.73_m2}", "10*3/uL", "kg/m2", "mg/dL", "1"],
)
def test_ucum_units_are_released_in_ucum_syntax(code: str) -> None:
    """UCUM writes units with ``%``, ``[...]``, ``{...}``, ``*`` and a leading ``/``: an HbA1c
    in ``%``, a blood pressure in ``mm[Hg]``, a heart rate in ``/min`` lost their unit, and the
    features read them as results stating none."""
    quantity = {"value": 7.1, "system": UCUM, "code": code, "unit": code}
    released = _apply(_obs(valueQuantity=quantity)).resource["valueQuantity"]
    assert released == quantity


@pytest.mark.parametrize(
    "code",
    ["mg dL", "{John Smith}/min", "\u00b5mol/L", "{a{b}}", "mg/dL\n", "x" * 65, "{", ""],
)
def test_a_unit_not_in_ucum_syntax_is_withheld(code: str) -> None:
    quantity = {"value": 7.1, "system": UCUM, "code": code, "unit": code}
    released = _apply(_obs(valueQuantity=quantity)).resource["valueQuantity"]
    assert released == {"value": 7.1}


@pytest.mark.parametrize(
    ("code", "value"),
    [
        ("a_j", 93),  # the mean Julian year
        ("a_g", 94),  # the mean Gregorian year
        ("a_t", 95),  # the tropical year
        ("mo_j", 1130),  # 94 years in mean Julian months
        ("mo_g", 1130),
        ("mo_s", 1150),  # 93 years in synodal months
        ("s", 3_000_000_000),  # 95 years in seconds
        ("a{age}", 93),  # a year with an annotation
        ("mo{corrected}", 1130),
    ],
)
def test_an_age_in_any_ucum_time_unit_is_capped(code: str, value: float) -> None:
    """UCUM names years and months several ways (the Julian, Gregorian and tropical year, the
    synodal, Julian and Gregorian month), and a unit may carry an annotation: an observation
    not coded as an age with 93 ``a_j`` was released as written, and reached
    ``views.observation`` (value 93, unit a_j), where 93 ``a`` became 90."""
    quantity = {"value": value, "system": UCUM, "code": code, "unit": code}
    component = {"code": {"coding": [{"system": LOINC, "code": "8302-2"}]}}
    local = _obs(
        code={"coding": [{"system": "http://hospital.example.org/obs", "code": "AGEYRS"}]},
        valueQuantity=quantity,
        component=[{**component, "valueQuantity": quantity}],
    )
    for profile in ("research", "safe_harbor"):
        outcome = _apply(copy.deepcopy(local), profile)
        capped = {"value": 90, "system": UCUM, "code": "a", "unit": "a"}
        assert outcome.resource["valueQuantity"] == capped
        assert outcome.resource["component"][0]["valueQuantity"] == capped
        assert outcome.release_counts["age_capped"] == 2


@pytest.mark.parametrize(
    ("code", "value"),
    [
        ("yr", 95),
        ("yrs", 93),
        ("years", 91),
        ("Year", 90),
        ("month", 1100),
        ("days", 33000),
        ("{yr}", 95),  # an annotation alone: UCUM's unity, written for years
        ("{Years}", 94),
    ],
)
def test_an_age_in_a_time_unit_written_in_words_under_ucums_system_is_capped(
    code: str, value: float
) -> None:
    """Sources write years as ``yr``, ``years`` or ``{yr}`` under UCUM's system (UCUM's year
    is ``a``): the code passes UCUM's syntax and was released with its value, 95 ``yr`` in an
    observation not coded as an age reaching ``views.observation`` as written, where 95 ``a``
    became 90."""
    quantity = {"value": value, "system": UCUM, "code": code, "unit": code}
    local = _obs(
        code={"coding": [{"system": "http://hospital.example.org/obs", "code": "AGEYRS"}]},
        valueQuantity=quantity,
    )
    for profile in ("research", "safe_harbor"):
        released = _apply(copy.deepcopy(local), profile).resource["valueQuantity"]
        assert released == {"value": 90, "system": UCUM, "code": "a", "unit": "a"}


@pytest.mark.parametrize("code", ["yo", "YO", "{yo}"])
def test_an_age_in_years_old_under_ucums_system_is_capped(code: str) -> None:
    """Clinical text and some feeds write an age as ``95 YO`` (years old): the code passes
    UCUM's syntax, and in an observation not coded as an age it was released as written, 95
    ``YO`` reaching ``views.observation`` where 95 ``yr`` became 90."""
    quantity = {"value": 95, "system": UCUM, "code": code, "unit": code}
    local = _obs(
        code={"coding": [{"system": "http://hospital.example.org/obs", "code": "AGE"}]},
        valueQuantity=quantity,
    )
    for profile in ("research", "safe_harbor"):
        released = _apply(copy.deepcopy(local), profile).resource["valueQuantity"]
        assert released == {"value": 90, "system": UCUM, "code": "a", "unit": "a"}


@pytest.mark.parametrize(("code", "value"), [("ds", 40000), ("as", 95), ("ms", 40000)])
def test_a_ucum_unit_that_is_no_time_unit_in_words_is_not_read_as_one(
    code: str, value: float
) -> None:
    """Deciseconds, attoseconds and milliseconds are no days or years: a plural ``s`` is read
    off words of three letters or more only."""
    quantity = {"value": value, "system": UCUM, "code": code, "unit": code}
    released = _apply(_obs(valueQuantity=quantity)).resource["valueQuantity"]
    assert released == quantity


@pytest.mark.parametrize(
    ("code", "value", "years"),
    [("mo_j", 30, 2), ("mo_g", 1000, 83), ("a_j", 45.5, 45), ("mo{corrected}", 14, 1)],
)
def test_an_age_in_a_ucum_time_unit_is_read_in_that_unit(
    code: str, value: float, years: int
) -> None:
    """A condition's onset at 30 ``mo_j`` (two and a half years) was read as 30 years, and
    Safe Harbor released it as 30 years; 1,000 ``mo_g`` (83 years) was capped at 90."""
    condition = {
        "resourceType": "Condition",
        "id": "c",
        "subject": {"reference": "Patient/p"},
        "recordedDate": "2024-05-06",
        "onsetAge": {"value": value, "system": UCUM, "code": code, "unit": code},
    }
    released = _apply(condition, "safe_harbor").resource["onsetAge"]
    assert released == {"value": years, "system": UCUM, "code": "a", "unit": "a"}


@pytest.mark.parametrize(
    "system",
    [
        None,
        "urn:oid:2.16.840.1.113883.6.1",
        "http://loinc.org/",
        "LN",
        "http://hospital.example.org",
    ],
)
@pytest.mark.parametrize("profile", ["research", "safe_harbor"])
def test_an_age_code_under_another_system_or_none_is_an_age_observation(
    system: str | None, profile: str
) -> None:
    """An observation coded 30525-0 (Age) without LOINC's URL (none at all, LOINC's OID, a URL
    with a slash after it, HL7 v2's ``LN``) released 95 as written, and one coded 21112-8
    (Birth date) released a birth date 95 years ago shifted (research: ``1931-01-02`` for
    1931-02-03): the views read a coding without a system as the observation's code, so
    ``views.observation`` showed code 30525-0 with 95."""
    coding = {"code": "30525-0"} if system is None else {"system": system, "code": "30525-0"}
    age = _obs(code={"coding": [coding]}, effectiveDateTime="2025-01-02", valueInteger=95)
    assert _apply(copy.deepcopy(age), profile).resource["valueInteger"] == 90
    age = _obs(code={"coding": [coding]}, valueQuantity={"value": 93, "unit": "years"})
    assert _apply(copy.deepcopy(age), profile).resource["valueQuantity"]["value"] == 90
    birth = {**coding, "code": "21112-8"}
    born = _obs(code={"coding": [birth]}, effectiveDateTime="2025-01-02")
    born["valueDateTime"] = "1931-02-03"
    released = _apply(born, profile).resource.get("valueDateTime")
    assert released == ("1936" if profile == "research" else None)
    snomed = {**coding, "code": "424144002"}
    age = _obs(code={"coding": [snomed]}, valueQuantity={"value": 97, "unit": "yrs"})
    assert _apply(age, profile).resource["valueQuantity"]["value"] == 90


def test_age_observation_without_ucum_is_read_as_years() -> None:
    age = _obs(code={"coding": [{"system": LOINC, "code": "21612-7"}]})
    age["valueQuantity"] = {"value": 101, "unit": "years"}
    assert _apply(age).resource["valueQuantity"]["value"] == 90


def test_zip3_and_restricted_areas() -> None:
    patient = {
        "resourceType": "Patient",
        "id": "p",
        "address": [{"postalCode": "03601", "city": "X"}, {"postalCode": "02139-1234"}],
    }
    released = _apply(patient).resource
    assert released["address"] == [{"postalCode": "00000"}, {"postalCode": "02100"}]


@pytest.mark.parametrize("profile", ["research", "safe_harbor"])
def test_a_zip_written_without_its_leading_zero_is_released_as_its_zip3(profile: str) -> None:
    """06390 (Fishers Island, in the restricted area 063) written 6390 was released as 6390, and
    02139 written 2139 as 2130: four digits of the ZIP (the release's ZIP3 read them as 639 and
    213, beside states whose ZIPs start with 0), and no restricted area recognised."""
    policy = Policy.shipped(profile)
    engine = Deidentifier(policy, DeidSecrets.derive(b"\x01" * 32, policy), today=TODAY)
    patient = {
        "resourceType": "Patient",
        "id": "p",
        "address": [{"postalCode": "6390"}, {"postalCode": "2139"}, {"postalCode": "2139-4307"}],
    }
    released = engine.apply(patient, patient_scope="p").resource
    assert [a["postalCode"] for a in released["address"]] == ["00000", "02100", "02100"]


def test_references_are_pseudonymised_or_dropped() -> None:
    obs = _obs(
        hasMember=[{"reference": "MolecularSequence/s", "display": "a name"}],
        derivedFrom=[{"reference": "#c"}],
        specimen={"reference": "Specimen/s"},  # not named by the profile
    )
    out = _apply(obs)
    (member,) = out.resource["hasMember"]
    assert set(member) == {"reference"} and member["reference"].startswith("MolecularSequence/")
    assert member["reference"] != "MolecularSequence/s"
    assert "derivedFrom" not in out.resource  # contained: its target is not released
    assert "specimen" not in out.resource
    assert out.resource["subject"]["reference"] != "Patient/p"


def test_a_contained_medication_is_released_by_its_own_paths_under_a_new_local_id() -> None:
    rxnorm = "http://www.nlm.nih.gov/research/umls/rxnorm"
    drug = {"coding": [{"system": rxnorm, "code": "197361"}], "text": "for J. Doe"}
    request = {
        "resourceType": "MedicationRequest",
        "id": "r",
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/p"},
        "contained": [
            {"resourceType": "Patient", "id": "pt", "name": [{"family": "Doe"}]},
            {"resourceType": "Medication", "id": "twin", "code": drug},
            {"resourceType": "Medication", "id": "twin", "code": drug},
            {"resourceType": "Medication", "id": "jdoe-med", "code": drug, "identifier": [{}]},
        ],
        "medicationReference": {"reference": "#jdoe-med", "display": "for J. Doe"},
        "reasonReference": [{"reference": "#pt"}, {"reference": "#twin"}],
    }
    for profile in ("research", "safe_harbor"):
        out = _apply(copy.deepcopy(request), profile)
        # a contained Patient never leaves, nor do two Medications one id would name
        assert out.resource["contained"] == [
            {"resourceType": "Medication", "id": "c3", "code": {"coding": drug["coding"]}}
        ]
        assert out.resource["medicationReference"] == {"reference": "#c3"}
        assert "reasonReference" not in out.resource
        assert out.release_counts["contained_withheld"] == 3
        assert out.release_counts["reference_withheld"] == 2


def test_types_outside_the_profile_release_their_pseudonym_only() -> None:
    basic = {"resourceType": "Basic", "id": "b", "code": {"text": "free text"}, "created": "2020"}
    out = _apply(basic)
    assert set(out.resource) == {"resourceType", "id", "meta"} and out.resource["id"] != "b"
    assert out.release_counts["type_not_in_profile"] == 1
    with pytest.raises(ProcessingError) as info:
        _apply({"resourceType": "MedicinalProduct", "id": "m"})  # R4, not in R4B
    assert info.value.code == "unknown_resource_type"


@pytest.mark.parametrize(
    ("paths", "message"),
    [
        ({"nickname": "keep"}, "no element 'nickname'"),
        ({"language": "keep"}, "needs a binding"),
        ({"name": "keep"}, "naming its elements"),
        ({"gender": "shout"}, "unknown method"),
        ({"gender": "year"}, "dates only"),
    ],
)
def test_profiles_that_cannot_compile(paths: dict[str, str], message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        ReleaseProfile.from_dict({"resources": {"Patient": paths}})


def test_microsoft_rules_run_on_top_and_cannot_add_back() -> None:
    config = {
        "fhirPathRules": [
            {"path": "Observation.status", "method": "redact"},
            {"path": "Observation.valueString", "method": "keep"},
        ]
    }
    policy = Policy.layered(config, name="mine")
    assert policy.release is not None and policy.parameters.restricted_zip3
    out = _engine(policy=policy).apply(_obs(valueString="free text"), patient_scope="p")
    assert "status" not in out.resource and "valueString" not in out.resource
    assert out.resource["code"]["coding"][0]["code"] == "8302-2"


def test_the_input_is_not_changed() -> None:
    resource = _obs(valueString="x", effectiveDateTime="2020-01-01")
    before = copy.deepcopy(resource)
    _apply(resource)
    assert resource == before


def test_workers_release_what_one_process_releases(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = Policy.shipped("research")
    items = [
        (
            f"k{i}",
            "Observation",
            "p",
            orjson.dumps(_obs(id=f"o{i}", effectiveDateTime="2020-01-02")),
            None,
        )
        for i in range(40)
    ] + [("b", "NotAType", "p", orjson.dumps({"resourceType": "NotAType", "id": "b"}), None)]
    setup = workers.WorkerSetup(policy.source, policy.name, KEY, TODAY, {})
    results: dict[int, list[workers.ChunkResult]] = {1: [], 2: []}
    monkeypatch.setattr(workers, "CHUNK_RECORDS", 7)
    monkeypatch.setattr(workers, "PARALLEL_FROM", 7)
    for count in (1, 2):
        workers.deidentify_items(items, setup, results[count].append, workers=count)
    one, two = results[1], results[2]
    assert [r.released for r in one] == [r.released for r in two]
    released = [row for r in two for row in r.released]
    assert len(released) == 40 and [row[1] for row in released] == [f"k{i}" for i in range(40)]
    assert sum(r.reasons["unknown_resource_type"] for r in two) == 1


def _full_width(text: str) -> str:
    """``text`` with its ASCII digits and letters in their full-width forms (U+FF10...)."""
    return "".join(chr(ord(c) + 0xFEE0) if c.isascii() and c.isalnum() else c for c in text)


@pytest.mark.parametrize("system", [SNOMED, "http://www.nlm.nih.gov/research/umls/rxnorm", LOINC])
def test_a_code_in_full_width_digits_is_no_code_of_its_system(system: str) -> None:
    """Python's ``\\d`` matches every script's digits: an SSN written in full-width digits
    looked like a SNOMED or RxNorm code and was released as one (the leak scan, comparing
    ASCII canaries, did not see it either). Codes are read in ASCII only."""
    written = _full_width("731559012") if system != LOINC else _full_width("8302-2")
    out = _apply(_obs(code={"coding": [{"system": system, "code": written}]}))
    assert "code" not in out.resource and out.release_counts["code_malformed"] == 1


NOT_GIVEN = {"url": "http://hospital.example.org/fhir/StructureDefinition/not-given"}


@pytest.mark.parametrize("profile", ["research", "safe_harbor"])
def test_a_modifier_extension_on_an_element_the_release_keeps_withholds_the_resource(
    profile: str,
) -> None:
    """A modifierExtension changes the meaning of the element holding it: on a dosage, a
    Consent's provision (nested or not) or a contained Medication it was dropped, and the
    element released as if it meant what it says (a deny its modifier negates, a dose not
    given). Such a resource is withheld, as one with the modifier at its top is; one on an
    element the release drops (a Patient's contact) changes nothing released."""
    rxnorm = "http://www.nlm.nih.gov/research/umls/rxnorm"
    modifier = {**NOT_GIVEN, "valueBoolean": True}
    request = {
        "resourceType": "MedicationRequest",
        "id": "r",
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/p"},
        "medicationCodeableConcept": {"coding": [{"system": rxnorm, "code": "860975"}]},
        "dosageInstruction": [{"sequence": 1, "modifierExtension": [modifier]}],
    }
    contained = {
        **{k: v for k, v in request.items() if k not in ("dosageInstruction",)},
        "contained": [
            {
                "resourceType": "Medication",
                "id": "m",
                "code": {"coding": [{"system": rxnorm, "code": "860975"}]},
                "modifierExtension": [modifier],
            }
        ],
        "medicationReference": {"reference": "#m"},
    }
    deny = {"type": "deny", "modifierExtension": [modifier]}
    consent = {
        "resourceType": "Consent",
        "id": "c",
        "status": "active",
        "scope": {"coding": [{"code": "research"}]},
        "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
        "patient": {"reference": "Patient/p"},
        "provision": deny,
    }
    nested = {**consent, "provision": {"type": "permit", "provision": [deny]}}
    for resource in (request, contained, consent, nested):
        with pytest.raises(ProcessingError) as raised:
            _apply(copy.deepcopy(resource), profile)
        assert raised.value.code == "unknown_modifier_extension"
        assert "not-given" not in str(raised.value)  # the message names no URL
    patient = {
        "resourceType": "Patient",
        "id": "p",
        "gender": "female",
        "contact": [{"modifierExtension": [modifier], "gender": "male"}],
    }
    assert _apply(patient, profile).resource["gender"] == "female"


@pytest.mark.parametrize("profile", ["research", "safe_harbor"])
@pytest.mark.parametrize("state", ["02035", "Foxborough", "MA 03601", "Norfolk County", "Ontario"])
@pytest.mark.parametrize("resource_type", ["Patient", "Location", "Organization"])
def test_a_state_holding_the_patients_zip_or_city_is_not_released(
    profile: str, state: str, resource_type: str
) -> None:
    """A source that put the ZIP or the city in ``address.state`` released it as written, and
    ``ehr run`` published it in deid_resources, views.patient.state (and its Parquet),
    released_patients.state and release_quasi_identifiers.state: the full ZIP beside its
    ZIP3, and a place smaller than a state, which Safe Harbor removes. The leak scan does not
    hold a city or a ZIP alone (common text), so nothing blocks it. A state is released only
    when it is one (a USPS code or name); a region of another country is withheld too."""
    resource = {
        "resourceType": resource_type,
        "id": "p",
        "address": [{"city": "Foxborough", "state": state, "postalCode": "02035"}],
    }
    if resource_type != "Patient":
        resource["address"] = resource["address"][0]  # Location has one address
        if resource_type == "Organization":
            resource["address"] = [resource["address"]]
    released = _apply(resource, profile)
    addresses = released.resource.get("address", [])
    for address in addresses if isinstance(addresses, list) else [addresses]:
        assert address.get("state") != state
    assert released.release_counts["state_withheld"] == 1


@pytest.mark.parametrize("profile", ["research", "safe_harbor"])
def test_a_state_written_as_its_code_or_name_is_released_as_its_code(profile: str) -> None:
    """Every USPS code and name, in any case and spacing, against a plain list written here,
    is released as its code: a source's own writing (``M.A.``, ``ma``) was released as
    written, telling sources apart and splitting one state into several k-anonymity groups."""
    plain = {"MA": "Massachusetts", "NY": "New York", "DC": "District of Columbia"}
    plain |= {"PR": "Puerto Rico", "WV": "West Virginia", "AE": "Armed Forces Europe"}
    written = {form: code for code, name in plain.items() for form in (code, name)}
    written |= {"ma": "MA", "new  york": "NY", "D.C.": "DC", "puerto rico": "PR"}
    written |= {"Washington DC": "DC", "MA.": "MA", "n.y.": "NY", " West  Virginia ": "WV"}
    for state, code in written.items():
        patient = {"resourceType": "Patient", "id": "p", "address": [{"state": state}]}
        released = _apply(patient, profile)
        assert released.resource["address"] == [{"state": code}], state
        assert released.release_counts.get("state_withheld", 0) == 0
    # 50 states, DC, 9 territories and freely associated states, 3 armed forces codes
    assert len(US_STATES) == 63 and all(len(code) == 2 for code in US_STATES)


@pytest.mark.parametrize("profile", ["research", "safe_harbor"])
def test_a_country_is_released_only_when_it_is_one(profile: str) -> None:
    """``address.country`` was released as written, as free text: a city, a street or a
    postcode written there reached the release. Kept: ISO 3166-1 codes and names, in any case
    (a plain list written here); withheld and counted: anything else."""
    kept = {"US": "US", "usa": "US", "United States": "US", "United States of America": "US"}
    kept |= {"DE": "DE", "Germany": "DE", "fra": "FR", "U.S.A.": "US", "U.S.": "US"}
    kept |= {"Türkiye": "TR", "Turkiye": "TR", "cote d'ivoire": "CI", "  new zealand": "NZ"}
    withheld = ["Foxborough", "02035", "12 Elm Street", "Mass.", "New England", "U.S.A...x"]
    for country in [*kept, *withheld]:
        patient = {"resourceType": "Patient", "id": "p", "address": [{"country": country}]}
        released = _apply(patient, profile)
        if country in kept:
            # released as its ISO 3166-1 alpha-2 code, as a state is as its USPS code
            assert released.resource["address"] == [{"country": kept[country]}], country
            assert released.release_counts.get("country_withheld", 0) == 0
        else:
            assert "address" not in released.resource or released.resource["address"] in (
                [],
                [{}],
            ), country
            assert released.release_counts["country_withheld"] == 1


def test_a_worker_error_names_the_resource_by_type_and_key_never_its_content(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exception the engine did not expect (a bug, a value a library refuses) ended the
    batch with its own text, which quoted the record (``... born 1946-02-19``): Dagster kept
    it in its event log and `ehr run` printed it. The error names the resource's type, its
    key (a pseudonym) and the exception's type only, with nothing chained that holds its
    text, in one process and on worker processes alike."""
    policy = Policy.shipped("research")
    setup = workers.WorkerSetup(policy.source, policy.name, KEY, TODAY, {})
    secret = "Barajas born 1946-02-19"

    def broken(self: Deidentifier, resource: dict[str, Any], **_: Any) -> DeidOutcome:
        raise ValueError(f"cannot parse name {secret}")

    monkeypatch.setattr(Deidentifier, "apply", broken)
    item = ("key1", "Patient", "p", orjson.dumps({"resourceType": "Patient", "id": "x"}), None)
    with pytest.raises(workers.RecordNotDeidentifiedError) as raised:
        workers.deidentify_items([item], setup, lambda _: None, workers=1)
    shown = "".join(traceback.format_exception(raised.value))
    assert secret not in shown and "cannot parse" not in shown
    assert "Patient" in str(raised.value) and "key1" in str(raised.value)
    assert "ValueError" in str(raised.value)
    # what a worker process sends back: the error pickled, its context dropped
    again = pickle.loads(pickle.dumps(raised.value))
    assert str(again) == str(raised.value) and raised.value.__suppress_context__


def _stop_the_workers(consume: Any) -> tuple[list[int], Any]:
    """A consumer that stops the worker processes (SIGSTOP) once it is given the first chunk,
    and the pids it stopped."""
    stopped: list[int] = []

    def take(result: workers.ChunkResult) -> None:
        if not stopped:
            for child in multiprocessing.active_children():
                assert child.pid is not None
                os.kill(child.pid, signal.SIGSTOP)
                stopped.append(child.pid)
        consume(result)

    return stopped, take


def test_a_stalled_worker_fails_the_batch_in_bounded_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker processes that stop answering (stopped, swapped out, stuck on a record) held the
    caller for good: it waited on their chunks with no end, and on leaving, on the pool's
    shutdown joining them. The batch fails once no chunk came back for
    ``STALLED_AFTER_SECONDS``, naming that, with every worker process ended. (Run on a thread
    the test gives a minute: a hang fails the test, its stopped worker killed.)"""
    policy = Policy.shipped("research")
    setup = workers.WorkerSetup(policy.source, policy.name, KEY, TODAY, {})
    items = [
        (f"k{i}", "Observation", "p", orjson.dumps(_obs(id=f"o{i}")), None) for i in range(400)
    ]
    monkeypatch.setattr(workers, "CHUNK_RECORDS", 5)
    monkeypatch.setattr(workers, "PARALLEL_FROM", 5)
    monkeypatch.setattr(workers, "STALLED_AFTER_SECONDS", 5.0, raising=False)
    before = set(multiprocessing.active_children())
    stopped, take = _stop_the_workers(lambda _: None)
    raised: list[BaseException] = []

    def run() -> None:
        try:
            workers.deidentify_items(items, setup, take, workers=2, expected=len(items))
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    hung = thread.is_alive()
    for pid in stopped:  # nothing left stopped behind the test, whatever the outcome
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    thread.join(60)
    assert not hung, "the caller still waited on the stopped worker after a minute"
    assert len(raised) == 1 and isinstance(raised[0], workers.WorkersStalledError)
    assert "no chunk came back" in str(raised[0])
    # every worker ended: a process killed a moment ago can still be leaving under load (the
    # test's own kill of the stopped ones, just above), so its end is waited for, boundedly
    left = set(multiprocessing.active_children()) - before
    deadline = time.monotonic() + 30
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = set(multiprocessing.active_children()) - before
    assert left == set()


@pytest.mark.parametrize("garbage", ["dropped", "foreign"])
def test_a_chunk_not_accounted_for_fails_the_batch(
    monkeypatch: pytest.MonkeyPatch, garbage: str
) -> None:
    """What a worker sends back was counted as the batch's resources (``resources_in`` summed
    the chunks' released and withheld rows): a chunk short of a record, or naming a resource
    it was not sent, was published so, the record lost and the counts agreeing. Every chunk's
    rows are its records, in order, one each, or the batch fails."""
    policy = Policy.shipped("research")
    setup = workers.WorkerSetup(policy.source, policy.name, KEY, TODAY, {})
    items = [(f"k{i}", "Observation", "p", orjson.dumps(_obs(id=f"o{i}")), None) for i in range(9)]
    run = workers._Worker.run

    def bad(self: Any, chunk: list[workers.Item]) -> workers.ChunkResult:
        result = run(self, chunk)
        if garbage == "dropped":
            result.released.pop()
        else:
            rtype, _, patient, text = result.released[0]
            result.released[0] = (rtype, "elsewhere", patient, text)
        return result

    monkeypatch.setattr(workers._Worker, "run", bad)
    monkeypatch.setattr(workers, "CHUNK_RECORDS", 4)
    taken: list[workers.ChunkResult] = []
    with pytest.raises(workers.ChunkNotAccountedError, match="4 records"):
        workers.deidentify_items(items, setup, taken.append, workers=1)
    assert taken == []


@pytest.mark.parametrize("profile", ["research", "safe_harbor"])
@pytest.mark.parametrize(
    "state", [".....M.A.....", "Ma" + "." * 5_000, "MA..", "MA" + " " * 100, "N.e.w Y.o.r.k"]
)
def test_a_state_padded_with_dots_or_spaces_past_its_own_forms_is_withheld(
    profile: str, state: str
) -> None:
    """Only a state's own forms may pass: dots folded away anywhere let any run of them
    through (``Ma`` and 5,000 dots reached the release when a state was released as written),
    and so did whitespace of any length. Abbreviation dots and a fixed-width export's padding
    pass, released as the code."""
    patient = {"resourceType": "Patient", "id": "p", "address": [{"state": state}]}
    released = _apply(patient, profile)
    assert state not in str(released.resource)
    assert released.release_counts["state_withheld"] == 1
    kept = {"D.C.": "DC", "N.Y.": "NY", "MA.": "MA", "m.a.": "MA", "Washington D.C.": "DC"}
    kept["MA" + " " * 18] = "MA"
    for written, code in kept.items():
        patient = {"resourceType": "Patient", "id": "p", "address": [{"state": written}]}
        assert _apply(patient, profile).resource["address"] == [{"state": code}], written


@pytest.mark.parametrize("profile", ["research", "safe_harbor"])
def test_a_country_padded_past_any_countrys_name_is_withheld(profile: str) -> None:
    """``US`` followed by 500 spaces passed as a country (its spaces folded) and reached the
    release whole when a country was released as written. Padding within 96 characters
    passes, released as the code."""
    padded = "US" + " " * 500
    patient = {"resourceType": "Patient", "id": "p", "address": [{"country": padded}]}
    released = _apply(patient, profile)
    assert padded not in str(released.resource)
    assert released.release_counts["country_withheld"] == 1
    kept = "US" + " " * 18
    patient = {"resourceType": "Patient", "id": "p", "address": [{"country": kept}]}
    assert _apply(patient, profile).resource["address"] == [{"country": "US"}]


@pytest.mark.parametrize("profile", ["research", "safe_harbor"])
def test_a_country_name_in_either_unicode_form_or_with_accents_is_its_code(profile: str) -> None:
    """A country name sent decomposed (``u`` and a combining diaeresis, as some exports write
    text) or with accents pycountry does not write (``São Tomé and Príncipe``) was withheld,
    where the same name composed, or without its accents, was released as its code. A
    full-width or look-alike spelling is still withheld."""
    kept = {
        unicodedata.normalize("NFD", "Türkiye"): "TR",
        unicodedata.normalize("NFD", "Réunion"): "RE",
        "São Tomé and Príncipe": "ST",
        "Sao Tome and Principe": "ST",
    }
    full_width = "".join(chr(ord(c) + 0xFEE0) for c in "Germany")
    withheld = [full_width, "G\u0435rmany"]  # full-width letters; a Cyrillic e
    for country in [*kept, *withheld]:
        patient = {"resourceType": "Patient", "id": "p", "address": [{"country": country}]}
        released = _apply(patient, profile)
        if country in kept:
            assert released.resource["address"] == [{"country": kept[country]}], country
        else:
            assert released.release_counts["country_withheld"] == 1, country
