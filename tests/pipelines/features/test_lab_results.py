"""Which lab results the features read, and which one stands at an instant.

- The LOINC codes of one quantity by another method or equation are one measure: eGFR by
  CKD-EPI 2021 (98979-8), calculated LDL (13457-7), and an HbA1c sent as a component of a
  diabetes panel.
- Results of one instant sent as separate resources (two ids) with different statuses: a
  corrected or amended one replaces the final one, a final one the preliminary one, and a
  registered one is not yet a result; results of the same standing are averaged, as before.
- A registered result is not a result on its own either: alone at its instant, it is no
  latest value, no measurement time and no part of the mean.

FHIR resources go through the shipped ViewDefinitions and the feature SQL; the expected values
are written here from the resources, and read from the published rows by a point-in-time lookup
written here."""

from __future__ import annotations

from datetime import datetime
from statistics import mean
from typing import Any

import pytest

from tests.pipelines.features.crafted import LAB_PATIENT, features_from_fhir, lab_result, value_at

HBA1C, EGFR_2021, LDL_CALCULATED, DIABETES_PANEL = "4548-4", "98979-8", "13457-7", "55454-3"
# (id, code, value, status, measured): each instant's results, the one standing furthest last
STATUSES = [
    ("pre", HBA1C, 8.0, "preliminary", "2024-01-10T08:00:00Z"),
    ("fin", HBA1C, 8.4, "final", "2024-01-10T08:00:00Z"),
    ("fin2", HBA1C, 8.0, "final", "2024-02-10T08:00:00Z"),
    ("cor", HBA1C, 6.0, "corrected", "2024-02-10T08:00:00Z"),
    ("reg", HBA1C, 7.9, "registered", "2024-03-10T08:00:00Z"),
    ("fin3", HBA1C, 7.0, "final", "2024-03-10T08:00:00Z"),
    ("fin4", HBA1C, 8.0, "final", "2024-04-10T08:00:00Z"),
    ("fin5", HBA1C, 9.0, "final", "2024-04-10T08:00:00Z"),
]
# this test's own reading of each instant: the value that stands
STANDS = {
    "2024-01-10T08:00:00Z": 8.4,
    "2024-02-10T08:00:00Z": 6.0,
    "2024-03-10T08:00:00Z": 7.0,
    "2024-04-10T08:00:00Z": mean([8.0, 9.0]),
}


# a registered HbA1c with no other result of its instant, after every other HbA1c
REGISTERED_ALONE = "2024-07-10T08:00:00Z"


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _panel(rid: str, component_code: str, value: float, measured: str) -> dict[str, Any]:
    """A diabetes panel whose one component holds the result (the panel has no value)."""
    panel = lab_result(rid, DIABETES_PANEL, {"value": value}, measured)
    del panel["valueQuantity"]
    panel["component"] = [
        {
            "code": {"coding": [{"system": "http://loinc.org", "code": component_code}]},
            "valueQuantity": {"value": value},
        }
    ]
    return panel


def _resources() -> list[dict[str, Any]]:
    resources = [LAB_PATIENT]
    for rid, code, value, status, measured in STATUSES:
        resources.append({**lab_result(rid, code, {"value": value}, measured), "status": status})
    return [
        *resources,
        lab_result("egfr", EGFR_2021, {"value": 45.0}, "2024-05-10T08:00:00Z"),
        lab_result("ldl", LDL_CALCULATED, {"value": 130.0}, "2024-05-10T08:00:00Z"),
        _panel("panel", HBA1C, 7.5, "2024-06-10T08:00:00Z"),
        {**lab_result("alone", HBA1C, {"value": 5.1}, REGISTERED_ALONE), "status": "registered"},
    ]


@pytest.fixture(scope="module")
def con(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return features_from_fhir(_resources(), tmp_path_factory.mktemp("results"))


@pytest.mark.parametrize("measured", sorted(STANDS))
def test_the_result_standing_furthest_at_an_instant_is_its_value(con: Any, measured: str) -> None:
    latest = value_at(con, "patient_labs_vitals", "hba1c_latest", _at(measured), "p1")
    assert latest == pytest.approx(STANDS[measured])


def test_the_mean_counts_each_instant_once_at_its_standing_value(con: Any) -> None:
    at = _at("2024-04-11T00:00:00Z")
    got = value_at(con, "patient_labs_vitals", "hba1c_mean_365d", at, "p1")
    assert got == pytest.approx(mean(STANDS.values()))


@pytest.mark.parametrize(
    "column,value",
    [("egfr_latest", 45.0), ("ldl_latest", 130.0), ("hba1c_latest", 7.5)],
)
def test_other_codes_of_one_quantity_are_read(con: Any, column: str, value: float) -> None:
    at = _at("2024-06-11T00:00:00Z")
    assert value_at(con, "patient_labs_vitals", column, at, "p1") == pytest.approx(value)


@pytest.mark.parametrize(
    "column,expected",
    [
        ("hba1c_latest", 7.5),
        ("hba1c_mean_365d", mean([*STANDS.values(), 7.5])),
    ],
)
def test_a_registered_result_alone_at_its_instant_is_no_result(
    con: Any, column: str, expected: float
) -> None:
    got = value_at(con, "patient_labs_vitals", column, _at("2024-07-11T00:00:00Z"), "p1")
    assert got == pytest.approx(expected)


def test_a_registered_result_alone_at_its_instant_is_no_measurement(con: Any) -> None:
    got = value_at(con, "patient_labs_vitals", "hba1c_measured_at", _at(REGISTERED_ALONE), "p1")
    assert got == _at("2024-06-10T08:00:00Z")
