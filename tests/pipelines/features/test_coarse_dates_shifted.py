"""A date coarser than a day, on the patient's shifted time line. The research release moves a
day whole, but a year-month with its 15th day and a year not at all, so the month or year it
releases can end before the patient's own month or year, shifted, does: a diagnosis recorded in
a month was seen by entity timestamps before the month was over on the patient's time line
(where every entity timestamp a model builder takes from the views lies).

The patient's FHIR goes through the real research de-identification; the shift is read from a
day-dated encounter as released, and the last instant each date stands for on the shifted time
line is worked out here with ``datetime`` and ``calendar`` (the end of the period at UTC-12,
shifted), then looked up in the published rows (the latest row at or before T)."""

from __future__ import annotations

import calendar
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import duckdb
import pytest

from fhirlake.viewdef import write_view_table
from pipelines.features.tables import build_feature_tables_report
from pipelines.resources import DeidSettings
from pipelines.views.tables import load_views
from tests.pipelines.features.crafted import released_pseudonyms, released_records, value_at

ICD = "http://hl7.org/fhir/sid/icd-10-cm"
TODAY = date(2025, 1, 1)
LATEST_ZONE = timezone(timedelta(hours=-12))
SHIFT_RANGE = 50  # the research profile's dateShiftRange
MS = timedelta(milliseconds=1)


def _subject() -> dict[str, str]:
    return {"reference": "Patient/p1"}


def _visit(rid: str, day: str) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": rid,
        "status": "finished",
        "class": {"code": "AMB"},
        "subject": _subject(),
        "period": {"start": day, "end": day},
    }


def _diagnosis(rid: str, code: str, recorded: str | None, **onset: Any) -> dict[str, Any]:
    condition = {
        "resourceType": "Condition",
        "id": rid,
        "subject": _subject(),
        "verificationStatus": {"coding": [{"code": "confirmed"}]},
        "code": {"coding": [{"system": ICD, "code": code}]},
        **onset,
    }
    if recorded is not None:
        condition["recordedDate"] = recorded
    return condition


BASE = [
    {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1960-06-15"},
    _visit("e1", "2023-01-02"),
    _visit("e2", "2024-09-01"),  # the data end lies well after every date below
]


def _shift(key: bytes) -> int:
    """The patient's shift under ``key``, read from the released first visit."""
    (released,) = released_records({"p1": BASE[:2]}, key, TODAY).values()
    start = next(r for r in released if r["resourceType"] == "Encounter")["period"]["start"]
    return (date.fromisoformat(start) - date(2023, 1, 2)).days


def _month_end(year: int, month: int) -> date:
    return date(year, month, calendar.monthrange(year, month)[1])


def _released_month_end(year: int, month: int, shift: int) -> date:
    """The end of the month the release gives ``year-month`` (moved with its 15th day)."""
    moved = date(year, month, 15) + timedelta(days=shift)
    return _month_end(moved.year, moved.month)


def _end_on_time_line(last_day: date, shift: int) -> datetime:
    """The last instant a date ending on ``last_day`` stands for, on the shifted time line."""
    end = datetime.combine(last_day, datetime.max.time(), LATEST_ZONE).replace(microsecond=999000)
    return end + timedelta(days=shift)


# a key whose shift is forward, and the month of 2023 whose end it moves furthest past the end
# of the month released (a year's end then moves past the year released by the whole shift)
KEY, SHIFT = next((k, s) for k in (bytes([i]) * 32 for i in range(64)) if (s := _shift(k)) > 0)
MONTH = max(
    range(1, 13),
    key=lambda m: _month_end(2023, m) + timedelta(days=SHIFT) - _released_month_end(2023, m, SHIFT),
)

# An onset period that starts on a day and ends in a month, within that month (the onset began
# on the day and was over by the month's end): the release moves the day whole and the month
# with its 15th day, so a start late in the month can land after the month released ends. The
# released period is then inverted, its start after its end, and the span from the start to the
# end's last instant is no longer that of a month.
ONSET_START = max(
    (date(2023, m, d) for m in range(1, 13) for d in range(1, _month_end(2023, m).day + 1)),
    key=lambda day: day + timedelta(days=SHIFT) - _released_month_end(day.year, day.month, SHIFT),
)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[duckdb.DuckDBPyConnection, str]:
    records = [
        *BASE,
        _diagnosis("c1", "I50.9", "2023"),  # heart failure, recorded in a year
        _diagnosis("c2", "E11.9", f"2023-{MONTH:02d}"),  # diabetes, recorded in a month
        _diagnosis("c3", "J44.9", "2023-08-20"),  # COPD, recorded on a day
        _diagnosis(  # asthma, begun on a day, over by the end of that month
            "c4",
            "J45.909",
            None,
            onsetPeriod={"start": ONSET_START.isoformat(), "end": ONSET_START.isoformat()[:7]},
        ),
    ]
    released = released_records({"p1": records}, KEY, TODAY)
    con = duckdb.connect()
    for view in load_views():
        mine = [r for r in released["p1"] if r["resourceType"] == view.resource]
        write_view_table(con, view, mine, f"views.{view.name}")
    out = Path(tmp_path_factory.mktemp("features"))
    build_feature_tables_report(con, out, shift_days=SHIFT_RANGE)
    return con, released_pseudonyms(released)["p1"]


def _flag(published: tuple[duckdb.DuckDBPyConnection, str], column: str, at: datetime) -> Any:
    con, patient = published
    return value_at(con, "patient_comorbidities", column, at, patient)


def test_the_month_released_ends_before_the_patients_own() -> None:
    # the case the tests below need: without it they would prove nothing
    assert _released_month_end(2023, MONTH, SHIFT) < _month_end(2023, MONTH) + timedelta(days=SHIFT)


def test_a_year_is_not_known_before_it_ends_on_the_time_line(
    published: tuple[duckdb.DuckDBPyConnection, str],
) -> None:
    over = _end_on_time_line(date(2023, 12, 31), SHIFT)
    assert _flag(published, "has_heart_failure", over - MS) is False
    assert _flag(published, "has_heart_failure", over + timedelta(days=SHIFT_RANGE)) is True


def test_a_month_is_not_known_before_it_ends_on_the_time_line(
    published: tuple[duckdb.DuckDBPyConnection, str],
) -> None:
    over = _end_on_time_line(_month_end(2023, MONTH), SHIFT)
    assert _flag(published, "has_diabetes", over - MS) is False
    assert _flag(published, "has_diabetes", over + timedelta(days=16)) is True


def test_the_release_can_end_an_onset_period_before_it_starts() -> None:
    # the case the test below needs: the start as released after the end of the month released
    released_start = ONSET_START + timedelta(days=SHIFT)
    assert released_start > _released_month_end(ONSET_START.year, ONSET_START.month, SHIFT)


def test_an_onset_period_inverted_by_the_release_is_not_known_before_it_ends(
    published: tuple[duckdb.DuckDBPyConnection, str],
) -> None:
    # The end released is a month, read from its last instant; the span from the period's
    # start to it (the start released after that month's end) read as a day's, so the
    # diagnosis counted from the end of the month released: before the onset period had even
    # begun on the time line, and days before the patient's own month was over.
    over = _end_on_time_line(_month_end(ONSET_START.year, ONSET_START.month), SHIFT)
    began = _end_on_time_line(ONSET_START, SHIFT)
    assert _flag(published, "has_asthma", began - MS) is False
    assert _flag(published, "has_asthma", over - MS) is False
    released_end = _end_on_time_line(
        _released_month_end(ONSET_START.year, ONSET_START.month, SHIFT), 0
    )
    assert _flag(published, "has_asthma", released_end + timedelta(days=SHIFT_RANGE)) is True


def test_a_day_is_known_when_it_ends(published: tuple[duckdb.DuckDBPyConnection, str]) -> None:
    over = _end_on_time_line(date(2023, 8, 20), SHIFT)
    assert _flag(published, "has_copd", over - MS) is False
    assert _flag(published, "has_copd", over) is True


def test_only_a_profile_that_shifts_dates_moves_the_time_line() -> None:
    assert DeidSettings(profile="research").time_line_shift_days() == SHIFT_RANGE
    assert DeidSettings(profile="safe_harbor").time_line_shift_days() == 0


# a key whose shift is forward by more than a month's slack, and an onset period that starts on
# the day the release moves onto the last day of 2023 and ends in 2023 (a year kept as it is)
KEY_YEAR, SHIFT_YEAR = next(
    (k, s) for k in (bytes([i]) * 32 for i in range(64)) if (s := _shift(k)) > 16
)
YEAR_ONSET_START = date(2023, 12, 31) - timedelta(days=SHIFT_YEAR)


@pytest.fixture(scope="module")
def published_year(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[duckdb.DuckDBPyConnection, str]:
    records = [
        *BASE,
        _diagnosis(  # asthma, begun on a day of 2023, over by the end of 2023
            "c4",
            "J45.909",
            None,
            onsetPeriod={"start": YEAR_ONSET_START.isoformat(), "end": "2023"},
        ),
    ]
    released = released_records({"p1": records}, KEY_YEAR, TODAY)
    con = duckdb.connect()
    for view in load_views():
        mine = [r for r in released["p1"] if r["resourceType"] == view.resource]
        write_view_table(con, view, mine, f"views.{view.name}")
    out = Path(tmp_path_factory.mktemp("features"))
    build_feature_tables_report(con, out, shift_days=SHIFT_RANGE)
    return con, released_pseudonyms(released)["p1"]


def test_an_onset_period_ending_in_a_year_is_not_known_before_the_year_ends(
    published_year: tuple[duckdb.DuckDBPyConnection, str],
) -> None:
    # The start released on 31 December, one day before the year's last instant: the span read
    # as a day's, and the diagnosis counted from the end of 2023 as released, a whole shift
    # before the patient's own 2023 was over on the time line.
    over = _end_on_time_line(date(2023, 12, 31), SHIFT_YEAR)
    con, patient = published_year
    assert value_at(con, "patient_comorbidities", "has_asthma", over - MS, patient) is False
    known = _end_on_time_line(date(2023, 12, 31), SHIFT_RANGE)  # a year's end plus the range
    assert value_at(con, "patient_comorbidities", "has_asthma", known - MS, patient) is False
    assert value_at(con, "patient_comorbidities", "has_asthma", known, patient) is True
