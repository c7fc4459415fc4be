"""Which lab result is the latest at T when results are issued out of order. The latest value
at T is the one measured last among the results issued by T; results measured at different
instants but issued together are each a result of their own (never averaged into one), and
each counts once in the 365-day mean.

FHIR resources go through the shipped ViewDefinitions and the feature SQL; the expected values
are worked out here from the resources (which results are issued by T, the one measured last,
the plain mean of those issued within 365 days), and read from the published rows by a lookup
written here (the latest row at or before T)."""

from __future__ import annotations

from datetime import datetime, timedelta
from statistics import mean
from typing import Any

import pytest

from tests.pipelines.features.crafted import LAB_PATIENT, features_from_fhir, lab_result, value_at

GLUCOSE, HBA1C = "2339-0", "4548-4"
# (id, code, value, measured, issued)
RESULTS = [
    ("g0", GLUCOSE, 90.0, "2024-02-01T08:00:00Z", "2024-02-01T09:00:00Z"),
    # two glucoses of one day, loaded together in the evening
    ("g1", GLUCOSE, 100.0, "2024-03-01T08:00:00Z", "2024-03-01T18:00:00Z"),
    ("g2", GLUCOSE, 200.0, "2024-03-01T16:00:00Z", "2024-03-01T18:00:00Z"),
    # an HbA1c resulted nine days after its sample, after a later one was resulted
    ("h1", HBA1C, 6.0, "2024-01-01T08:00:00Z", "2024-01-10T08:00:00Z"),
    ("h2", HBA1C, 7.0, "2024-01-05T08:00:00Z", "2024-01-05T12:00:00Z"),
]
TIMES = [
    "2024-01-04T00:00:00Z",
    "2024-01-06T00:00:00Z",
    "2024-01-11T00:00:00Z",
    "2024-03-01T17:00:00Z",
    "2024-03-01T18:00:00Z",
    "2024-03-02T00:00:00Z",
]


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _resources() -> list[dict[str, Any]]:
    return [
        LAB_PATIENT,
        *(
            lab_result(rid, code, {"value": value}, measured, issued)
            for rid, code, value, measured, issued in RESULTS
        ),
    ]


def _expected(code: str, at: datetime) -> tuple[float | None, datetime | None, float | None]:
    known = [(_at(m), v) for _, c, v, m, i in RESULTS if c == code and _at(i) <= at]
    if not known:
        return None, None, None
    measured, value = max(known)
    in_year = [
        v for _, c, v, _, i in RESULTS if c == code and at - timedelta(days=365) < _at(i) <= at
    ]
    return value, measured, mean(in_year) if in_year else None


@pytest.fixture(scope="module")
def con(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return features_from_fhir(_resources(), tmp_path_factory.mktemp("labs"))


@pytest.mark.parametrize("measure,code", [("glucose", GLUCOSE), ("hba1c", HBA1C)])
@pytest.mark.parametrize("at", TIMES)
def test_the_latest_lab_is_the_one_measured_last_among_those_issued(
    con: Any, measure: str, code: str, at: str
) -> None:
    value, measured, mean_365d = _expected(code, _at(at))
    table = "patient_labs_vitals"
    assert value_at(con, table, f"{measure}_latest", _at(at), "p1") == value
    assert value_at(con, table, f"{measure}_measured_at", _at(at), "p1") == measured
    got_mean = value_at(con, table, f"{measure}_mean_365d", _at(at), "p1")
    assert got_mean == pytest.approx(mean_365d) if mean_365d is not None else got_mean is None


def test_the_worked_values() -> None:
    """The hand computation itself, spelt out: the two glucoses issued together are 200 (the
    later sample) and a mean of (90 + 100 + 200) / 3; the HbA1c resulted late does not replace
    the later sample's 7.0."""
    assert _expected(GLUCOSE, _at("2024-03-02T00:00:00Z")) == (
        200.0,
        _at("2024-03-01T16:00:00Z"),
        130.0,
    )
    assert _expected(HBA1C, _at("2024-01-11T00:00:00Z"))[:2] == (7.0, _at("2024-01-05T08:00:00Z"))
