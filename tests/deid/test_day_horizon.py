"""What a release made on one day holds until: the first later day on which any resource of it
comes out otherwise (a date crossing the age limit, a new year for a value counted in years),
as the engine notes it (deid.methods.DayHorizon), checked against the engine's own output on
the days before and on it."""

from __future__ import annotations

import random
from datetime import date, timedelta
from typing import Any

import pytest

from deid.engine import Deidentifier, DeidSecrets
from deid.methods import age_limit_day
from deid.policy import Policy

TODAY = date(2026, 12, 7)
KEY = b"\x02" * 32


def _patient(born: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": born}


def _encounter(start: str) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": "e1",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": "Patient/p1"},
        "period": {"start": start, "end": start},
    }


def _birth_observation(born: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "21112-8"}]},
        "subject": {"reference": "Patient/p1"},
        "valueDateTime": born,
    }


def _age_observation(effective: str, years: int) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": "o2",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "30525-0"}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": effective,
        "valueQuantity": {"value": years, "unit": "a", "system": "http://unitsofmeasure.org"},
    }


RESOURCES = [
    _patient("1936-12-08"),  # 90 tomorrow
    _patient("1937-03-01"),
    _patient("1936-02-29"),  # 90 on 1 March 2026: over already
    _patient("1940-02-29"),  # 90 on 1 March 2030
    _patient("1936-12"),  # a month alone: from its first day
    _patient("1920-05-05"),  # over the limit: the year of 90, another each year
    _patient("1990-01-01"),
    _encounter("1936-12-20"),  # more than 89 years ago from 20 December (the year rule)
    _birth_observation("1937-01-15"),
    _age_observation("2012-06-01", 75),  # born 1937 at the latest: 90 in 2027
]


def _released(profile: str, resource: dict[str, Any], day: date) -> tuple[Any, Deidentifier]:
    policy = Policy.shipped(profile)
    engine = Deidentifier(policy, DeidSecrets.derive(KEY, policy), today=day, rng=random.Random(0))
    return engine.apply(resource, patient_scope="p1").resource, engine


def _days_before(until: date) -> list[date]:
    """Every day from TODAY to the day before ``until``, within four years (then a sample)."""
    days = (until - TODAY).days
    if days <= 4 * 366:
        return [TODAY + timedelta(days=n) for n in range(days)]
    return [TODAY + timedelta(days=n) for n in range(0, days, 97)] + [until - timedelta(days=1)]


@pytest.mark.parametrize("profile", ["research", "safe_harbor"])
@pytest.mark.parametrize("resource", RESOURCES, ids=lambda r: f"{r['resourceType']}")
def test_a_release_holds_until_the_day_it_notes_and_no_longer(
    profile: str, resource: dict[str, Any]
) -> None:
    today, engine = _released(profile, resource, TODAY)
    until = engine.horizon.take()
    if until is None:  # no value of it depends on the day
        for day in (TODAY + timedelta(days=n) for n in range(0, 40 * 366, 365)):
            assert _released(profile, resource, day)[0] == today
        return
    assert until > TODAY
    for day in _days_before(until):
        assert _released(profile, resource, day)[0] == today, day
    assert _released(profile, resource, until)[0] != today


def test_the_first_day_a_date_lies_more_than_89_years_back() -> None:
    assert age_limit_day("1936-12-08") == date(2026, 12, 8)
    assert age_limit_day("1936-02-29") == date(2026, 3, 1)
    assert age_limit_day("1936-12") == date(2026, 12, 1)
    assert age_limit_day("1936") == date(2026, 1, 1)
    assert age_limit_day("1936-12-08T10:00:00Z") == date(2026, 12, 8)
    assert age_limit_day("1936-02-30") is None
    assert age_limit_day("not a date") is None
