"""What a release made on one day holds until: the first later day on which any resource of it
comes out otherwise (a date crossing the age limit, a new year for a value counted in years),
as the engine notes it (deid.methods.DayHorizon), checked against the engine's own output on
the days before and on it. The age limit counts calendar years, so that day is always a
1 January: recorded in clear beside the batch, it tells a year, never a birthday."""

from __future__ import annotations

import random
from datetime import date, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deid.engine import Deidentifier, DeidSecrets
from deid.methods import DayHorizon, age_limit_day, is_over_age_limit
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
    _patient("1936-12-08"),  # 90 tomorrow: over the limit since 1 January 2026
    _patient("1937-01-01"),  # 90 in 2027: over from 1 January 2027
    _patient("1937-12-31"),  # 90 on the last day of 2027: over from 1 January 2027 too
    _patient("1936-02-29"),  # over already
    _patient("1940-02-29"),  # over from 1 January 2030
    _patient("1937-06"),  # a month alone: from 1 January of its year
    _patient("1920-05-05"),  # over the limit: the year of 90, another each year
    _patient("1990-01-01"),
    _encounter("1937-12-20"),  # over the limit from 1 January 2027 (the year rule)
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


def _year_of_ninety(value: str) -> date:
    """The reference: a date is over the age limit from 1 January of the year it is 90 years
    before, whatever its month and day."""
    return date(int(value[:4]) + 90, 1, 1)


def _is_over(value: str, today: date) -> bool:
    return today.year - int(value[:4]) >= 90


def test_the_first_day_a_date_is_over_the_age_limit_is_a_new_year() -> None:
    for value in ("1936-12-08", "1936-02-29", "1936-12", "1936", "1936-12-08T10:00:00Z"):
        assert age_limit_day(value) == date(2026, 1, 1) == _year_of_ninety(value)
    assert age_limit_day("1936-02-30") is None
    assert age_limit_day("not a date") is None
    assert age_limit_day("9990-01-01") is None  # past the calendar's end


# birth dates of 1700-2200, written as a date, a year-month, a year or a date-time
_FORMS = st.sampled_from(["%Y-%m-%d", "%Y-%m", "%Y", "%Y-%m-%dT08:30:00Z"])
_BIRTHS = st.dates(date(1700, 1, 1), date(2200, 12, 31))
_DAYS = st.dates(date(1800, 1, 1), date(2300, 12, 31))


def _written(born: date, form: str) -> str:
    return f"{born.year:04d}" + born.strftime(form)[4:]


@settings(max_examples=2000, deadline=None)
@given(born=_BIRTHS, form=_FORMS, today=_DAYS)
def test_the_age_limit_counts_calendar_years(born: date, form: str, today: date) -> None:
    """Over the limit exactly when the year of ``today`` is 90 or more after the birth's; from
    1 January of the year of the 90th anniversary, never after the anniversary itself (the safe
    side of HIPAA's "over 89")."""
    value = _written(born, form)
    over = is_over_age_limit(value, today)
    assert over == _is_over(value, today)
    assert over == (age_limit_day(value) <= today)
    assert age_limit_day(value) == _year_of_ninety(value)
    exact_age = today.year - born.year - ((today.month, today.day) < (born.month, born.day))
    if exact_age >= 90:
        assert over


def test_a_day_horizon_other_than_a_new_year_is_refused() -> None:
    """The day is stored in clear beside the batch: a 90th birthday there would be a birth
    date."""
    horizon = DayHorizon(TODAY)
    with pytest.raises(ValueError, match="1 January"):
        horizon.note(date(2027, 3, 14))
    horizon.note(date(2028, 1, 1))
    horizon.note(date(2027, 1, 1))
    horizon.note(None)
    assert horizon.take() == date(2027, 1, 1)


def _reference_until(births: list[str], today: date, profile: str) -> date | None:
    """The first later day on which a birth date of them comes out otherwise: 1 January of
    its year of 90; for one over the limit already, the next 1 January under research (the
    year of 90 moves on), none under safe_harbor (withheld for good)."""
    days = [
        _year_of_ninety(born)
        if not _is_over(born, today)
        else (date(today.year + 1, 1, 1) if profile == "research" else None)
        for born in births
    ]
    return min((day for day in days if day is not None), default=None)


@pytest.mark.parametrize("profile", ["research", "safe_harbor"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    births=st.lists(st.tuples(_BIRTHS, _FORMS), min_size=1, max_size=4),
    today=st.dates(date(1990, 1, 1), date(2100, 12, 31)),
)
def test_what_a_batch_of_random_birth_dates_holds_until_is_a_new_year(
    profile: str, births: list[tuple[date, str]], today: date
) -> None:
    """For random birth dates (a Patient's and an observation of it), the day the engine notes
    is a 1 January, the one the plain reference gives, whatever the birthdays."""
    policy = Policy.shipped(profile)
    engine = Deidentifier(
        policy, DeidSecrets.derive(KEY, policy), today=today, rng=random.Random(0)
    )
    written = [_written(born, form) for born, form in births if 1800 <= born.year <= 2200]
    for n, (born, form) in enumerate(births):
        value = _written(born, form)
        patient = {**_patient(value), "id": f"p{n}"}
        observation = {**_birth_observation(value), "id": f"o{n}"}
        for resource in (patient, observation):
            engine.apply(resource, patient_scope=f"p{n}")
    until = engine.horizon.take()
    assert until is None or (until.month, until.day) == (1, 1)
    assert until == _reference_until(written, today, profile)


def test_the_age_bands_follow_the_age_limits_one_rule() -> None:
    """The release's 90+ band (deid.kanon, in SQL) is the age limit's rule itself
    (is_year_over_age_limit, read through year_over_age_limit_sql), on every side of it."""
    import duckdb

    from deid.methods import is_year_over_age_limit, year_over_age_limit_sql

    con = duckdb.connect()
    for today in (date(2026, 12, 31), date(2027, 1, 1)):
        for year in range(today.year - 95, today.year - 84):
            ((over,),) = con.execute(
                f"SELECT {year_over_age_limit_sql('b', today)} FROM (SELECT ? AS b)", [year]
            ).fetchall()
            assert over == is_year_over_age_limit(year, today), (year, today)
