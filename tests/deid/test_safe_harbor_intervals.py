"""Safe Harbor keeps the year of a patient's dates and nothing finer: neither an age counted in a
unit finer than a year nor an encounter's stated length may tell more.

Each test works out, from the released values alone and with ``datetime`` only, which birth
dates (or admission instants) are still consistent with what was released: under the year rule
that must be a span of about a year, never a day."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from deid.engine import Deidentifier, DeidSecrets
from deid.policy import Policy

TODAY = date(2026, 11, 28)
PATIENT = "Patient/p1"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
BORN = date(1950, 3, 10)
# an event on the last day of a year and one on the first day of the next
EVENTS = [date(2024, 12, 31), date(2025, 1, 1)]


def _release(profile: str, resources: list[dict[str, Any]]) -> list[Any]:
    policy = Policy.shipped(profile)
    engine = Deidentifier(policy, DeidSecrets.derive(b"\x01" * 32, policy), today=TODAY)
    return [engine.apply(r, patient_scope="p1") for r in resources]


def _age_observation(index: int, when: date, quantity: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"age{index}",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "30525-0"}]},
        "subject": {"reference": PATIENT},
        "effectiveDateTime": when.isoformat(),
        "valueQuantity": quantity,
    }


def _completed_months(born: date, on: date) -> int:
    months = (on.year - born.year) * 12 + on.month - born.month
    return months - (on.day < born.day)


def _age_in(unit: str, born: date, on: date) -> int:
    """The age at ``on`` of someone born on ``born``, in whole units (the calendar's years and
    months, days and weeks counted)."""
    if unit == "d":
        return (on - born).days
    if unit == "wk":
        return (on - born).days // 7
    if unit == "mo":
        return _completed_months(born, on)
    if unit == "a":
        return _completed_months(born, on) // 12
    raise AssertionError(unit)


def _consistent_births(released: list[tuple[int, float, str]]) -> list[date]:
    """Birth dates between 1945 and 1955 for which every released (event year, age, unit) can
    be true: some day of that year at which the age, in that unit, is the value (ages only
    grow, so it is enough that the value lies between the ages on 1 January and 31 December)."""
    found = []
    born = date(1945, 1, 1)
    while born < date(1956, 1, 1):
        if all(
            _age_in(unit, born, date(year, 1, 1))
            <= value
            <= _age_in(unit, born, date(year, 12, 31))
            for year, value, unit in released
        ):
            found.append(born)
        born += timedelta(days=1)
    return found


def _released_ages(outcomes: list[Any]) -> list[tuple[int, float, str]]:
    out = []
    for outcome in outcomes:
        resource = outcome.resource
        quantity = resource["valueQuantity"]
        out.append((int(resource["effectiveDateTime"][:4]), quantity["value"], quantity["code"]))
    return out


@pytest.mark.parametrize("unit", ["d", "wk", "mo"])
def test_ages_in_days_weeks_or_months_do_not_pin_the_birth_date(unit: str) -> None:
    """The patient's age in days on 31 December 2024 and on 1 January 2025, released with the
    years of those days: released as written, they left one birth date, the true one (a day's
    age more across the year's end: born exactly that many days before 1 January). In whole
    years, every birth date of a span of about a year fits."""
    ages = [
        _age_observation(
            i, when, {"value": _age_in(unit, BORN, when), "system": UCUM, "code": unit}
        )
        for i, when in enumerate(EVENTS)
    ]
    outcomes = _release("safe_harbor", ages)
    released = _released_ages(outcomes)
    assert [value for _, value, _ in released] == [_age_in("a", BORN, when) for when in EVENTS]
    assert {code for _, _, code in released} == {"a"}
    births = _consistent_births(released)
    assert BORN in births
    assert len(births) >= 300, (len(births), births[:1], births[-1:])
    assert all(o.release_counts["age_in_years"] == 1 for o in outcomes)


def test_the_research_profile_keeps_an_age_as_written() -> None:
    """Shifted dates keep a patient's intervals anyway (an Expert Determination's matter)."""
    days = _age_in("d", BORN, EVENTS[0])
    (outcome,) = _release(
        "research", [_age_observation(0, EVENTS[0], {"value": days, "system": UCUM, "code": "d"})]
    )
    assert outcome.resource["valueQuantity"] == {"value": days, "system": UCUM, "code": "d"}


@pytest.mark.parametrize(
    ("age", "expected"),
    [
        # a FHIR Age in months, in years with a fraction, in days written in words
        ({"value": 897, "system": UCUM, "code": "mo"}, {"value": 74}),
        ({"value": 74.8, "system": UCUM, "code": "a"}, {"value": 74}),
        ({"value": 400, "unit": "days"}, {"value": 1}),
        # a comparison stays true: under six months is under one year, over 400 days over one
        (
            {"value": 6, "comparator": "<", "system": UCUM, "code": "mo"},
            {"value": 1, "comparator": "<"},
        ),
        (
            {"value": 400, "comparator": ">", "system": UCUM, "code": "d"},
            {"value": 1, "comparator": ">"},
        ),
        # already whole years: as written
        ({"value": 74, "system": UCUM, "code": "a", "unit": "a"}, None),
        # 90 years and more: 90, as before
        ({"value": 32872, "system": UCUM, "code": "d"}, {"value": 90}),
    ],
)
def test_a_condition_onset_age_is_released_in_whole_years(
    age: dict[str, Any], expected: dict[str, Any] | None
) -> None:
    condition = {
        "resourceType": "Condition",
        "id": "onset",
        "subject": {"reference": PATIENT},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
        "recordedDate": "2025-01-01",
        "onsetAge": age,
    }
    (outcome,) = _release("safe_harbor", [condition])
    whole = age if expected is None else {**expected, "system": UCUM, "code": "a", "unit": "a"}
    assert outcome.resource["onsetAge"] == whole


def test_an_encounter_length_does_not_pin_its_dates() -> None:
    """A stay from 31 December 2024, 20:00 to 3 January 2025, 06:00 (UTC-5), 58 hours. Released
    with the years of its start and end and its length, it put the admission within the last
    58 hours of 2024 (its start year ends before the end's year starts, and the end follows 58
    hours after it). Safe Harbor releases its years only."""
    start = datetime(2025, 1, 1, 1, 0, tzinfo=UTC)  # 2024-12-31T20:00-05:00
    end = start + timedelta(hours=58)
    encounter = {
        "resourceType": "Encounter",
        "id": "stay",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
        "subject": {"reference": PATIENT},
        "period": {"start": "2024-12-31T20:00:00-05:00", "end": "2025-01-03T06:00:00-05:00"},
        "length": {"value": 58, "unit": "h", "system": UCUM, "code": "h"},
    }
    (released,) = _release("safe_harbor", [encounter])
    resource = released.resource
    assert resource["period"] == {"start": "2024", "end": "2025"}
    assert "length" not in resource

    # what a stated length would have told: every hour of 2024 (local time) at which the stay
    # can have begun, given the years of its start and end
    hours = 58
    admissions = [
        datetime(2024, 1, 1) + timedelta(hours=h)
        for h in range(366 * 24)
        if (datetime(2024, 1, 1) + timedelta(hours=h + hours)).year == 2025
    ]
    assert len(admissions) == hours and (end - start) == timedelta(hours=hours)

    (research,) = _release("research", [encounter])
    assert research.resource["length"] == {"value": 58, "unit": "h", "system": UCUM, "code": "h"}


def _age_in_years_at(born: date, on: date) -> int:
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


@pytest.mark.parametrize("written", ["quantity", "integer", "onset"])
def test_an_age_under_90_that_dates_a_birth_over_89_years_ago_is_withheld(written: str) -> None:
    """A patient born 3 March 1930, 96 years old today: the release withholds their birth date,
    but their age of 85 in 2015 was released with its year, and 2015 - 85 puts the birth in
    1930 at the latest: 95 or older today, a year indicative of an age over 89."""
    born, on = date(1930, 3, 3), date(2015, 6, 1)
    age = _age_in_years_at(born, on)
    assert (age, _age_in_years_at(born, TODAY)) == (85, 96)
    resource: dict[str, Any]
    if written == "onset":
        resource = {
            "resourceType": "Condition",
            "id": "onset",
            "subject": {"reference": PATIENT},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
            "recordedDate": on.isoformat(),
            "onsetAge": {"value": age, "system": UCUM, "code": "a", "unit": "a"},
        }
        key = "onsetAge"
    else:
        resource = _age_observation(0, on, {"value": age, "system": UCUM, "code": "a"})
        if written == "integer":
            resource["valueInteger"] = resource.pop("valueQuantity")["value"]
        key = "valueQuantity" if written == "quantity" else "valueInteger"
    patient = {"resourceType": "Patient", "id": "p1", "birthDate": born.isoformat()}
    released, released_patient = _release("safe_harbor", [resource, patient])
    assert "birthDate" not in released_patient.resource
    assert key not in released.resource
    assert released.release_counts["age_withheld"] == 1
    # the research profile makes that birth date the year of 90 (1936), and withholds the age
    # that would give 1930 back; an age of one born ten years later (86 today) is kept
    research, research_patient = _release("research", [resource, patient])
    assert research_patient.resource["birthDate"] == str(TODAY.year - 90)
    assert key not in research.resource
    assert research.release_counts["age_withheld"] == 1
    younger = json.loads(json.dumps(resource).replace(str(age), str(age - 10)))
    (kept,) = _release("research", [younger])
    assert key in kept.resource


@pytest.mark.parametrize(("age", "kept"), [(88, True), (89, False)])
def test_an_age_is_withheld_as_a_birth_year_is(age: int, kept: bool) -> None:
    """An age in 2025 gives the birth year 2025 - age at the latest; the year rule withholds a
    birth year 90 or more years before this one (2026 - 1936 = 90) and keeps a later one."""
    latest_birth_year = 2025 - age
    assert (TODAY.year - latest_birth_year <= 89) is kept
    observation = _age_observation(0, date(2025, 6, 1), {"value": age, "system": UCUM, "code": "a"})
    patient = {"resourceType": "Patient", "id": "p1", "birthDate": f"{latest_birth_year}"}
    released, released_patient = _release("safe_harbor", [observation, patient])
    assert ("valueQuantity" in released.resource) is kept
    assert ("birthDate" in released_patient.resource) is kept
