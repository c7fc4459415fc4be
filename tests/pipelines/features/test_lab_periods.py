"""A result measured over a period (``effectivePeriod``: a 24-hour urine collection, a reading
averaged over a night) stands at the period's end, and one dated by ``effectiveInstant`` at
that instant, as a result with ``effectiveDateTime`` stands at its time. The observation view
read ``effectiveDateTime`` only, so such a result was no lab feature at all, and nothing
counted it.

FHIR resources go through the shipped ViewDefinitions and the feature SQL; the expected values
are written here from the resources, and read from the published rows by a point-in-time lookup
written here."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.pipelines.features.crafted import LAB_PATIENT, features_from_fhir, lab_result, value_at

HBA1C = "4548-4"
COLLECTION_END = datetime(2024, 3, 2, 8, tzinfo=UTC)
# a date-only end stands for its whole day: known at its end in the latest zone (UTC-12)
DAY_END = datetime(2024, 3, 6, 11, 59, 59, 999000, tzinfo=UTC)
INSTANT = datetime(2024, 4, 1, 8, tzinfo=UTC)


def _over(rid: str, value: float, period: dict[str, str]) -> dict[str, Any]:
    result = lab_result(rid, HBA1C, {"value": value}, "")
    del result["effectiveDateTime"]
    return {**result, "effectivePeriod": period}


def _resources() -> list[dict[str, Any]]:
    return [
        LAB_PATIENT,
        lab_result("first", HBA1C, {"value": 6.0}, "2024-02-01T08:00:00Z"),
        _over("night", 7.0, {"start": "2024-03-01T08:00:00Z", "end": "2024-03-02T08:00:00Z"}),
        _over("days", 8.0, {"start": "2024-03-04", "end": "2024-03-05"}),
        # still running when sent: no time it was measured by
        _over("open", 9.0, {"start": "2024-03-10T08:00:00Z"}),
        _at_instant("instant", 6.5, "2024-04-01T08:00:00.000Z"),
    ]


def _at_instant(rid: str, value: float, instant: str) -> dict[str, Any]:
    result = lab_result(rid, HBA1C, {"value": value}, "")
    del result["effectiveDateTime"]
    return {**result, "effectiveInstant": instant}


@pytest.fixture(scope="module")
def con(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return features_from_fhir(_resources(), tmp_path_factory.mktemp("periods"))


def test_the_view_dates_a_period_result_at_its_end(con: Any) -> None:
    rows = dict(
        con.execute(
            "SELECT id, (effective_date_time, effective_date_time_latest) FROM views.observation"
        ).fetchall()
    )
    assert rows["night"] == (COLLECTION_END, COLLECTION_END)
    assert rows["days"][1] == DAY_END
    assert rows["open"] == (None, None)
    assert rows["instant"] == (INSTANT, INSTANT)


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        (COLLECTION_END - timedelta(microseconds=1), 6.0),  # collecting: the earlier result
        (COLLECTION_END, 7.0),
        (DAY_END - timedelta(microseconds=1), 7.0),
        (DAY_END, 8.0),
        (datetime(2024, 3, 20, tzinfo=UTC), 8.0),  # the open period's 9.0 is never read
        (INSTANT - timedelta(microseconds=1), 8.0),
        (INSTANT, 6.5),  # a result dated by effectiveInstant stands at it
    ],
)
def test_a_period_result_is_the_latest_value_from_its_end(
    con: Any, at: datetime, expected: float
) -> None:
    assert value_at(con, "patient_labs_vitals", "hba1c_latest", at, "p1") == pytest.approx(expected)
