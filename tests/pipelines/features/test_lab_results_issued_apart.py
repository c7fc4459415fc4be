"""Results of one instant issued at different times: each counts from when it was issued.

A sample's preliminary result issued at 10:00 and its final one three days later, or two
results of one day issued a day apart (the research release keeps a day only, so every result
of a day is one instant), were one value known only when the last of them was issued: until
then the features served an older sample's value, or none, though a result of the later sample
was known. At T a measured instant stands for the results of it issued by T (the furthest
standing, averaged), and counts in the 365-day mean until 365 days after the last of those.

FHIR resources go through the shipped ViewDefinitions and the feature SQL; the expected values
are written here from the resources."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.pipelines.features.crafted import LAB_PATIENT, features_from_fhir, lab_result, value_at

HBA1C = "4548-4"
# (id, value, status, measured, issued)
RESULTS = [
    ("old", 6.0, "final", "2024-01-05T08:00:00Z", None),
    ("pre", 8.0, "preliminary", "2024-03-01T08:00:00Z", "2024-03-01T10:00:00Z"),
    ("fin", 8.4, "final", "2024-03-01T08:00:00Z", "2024-03-04T10:00:00Z"),
    ("a", 7.0, "final", "2024-05-01T08:00:00Z", "2024-05-01T09:00:00Z"),
    ("b", 9.0, "final", "2024-05-01T08:00:00Z", "2024-05-02T09:00:00Z"),
]
# T, the latest value, when it was measured, the 365-day mean (worked out from RESULTS)
EXPECTED = [
    ("2024-03-01T09:59:59Z", 6.0, "2024-01-05T08:00:00Z", 6.0),
    ("2024-03-01T10:00:00Z", 8.0, "2024-03-01T08:00:00Z", (6.0 + 8.0) / 2),
    ("2024-03-04T09:59:59Z", 8.0, "2024-03-01T08:00:00Z", (6.0 + 8.0) / 2),
    ("2024-03-04T10:00:00Z", 8.4, "2024-03-01T08:00:00Z", (6.0 + 8.4) / 2),
    ("2024-05-01T09:00:00Z", 7.0, "2024-05-01T08:00:00Z", (6.0 + 8.4 + 7.0) / 3),
    ("2024-05-02T09:00:00Z", 8.0, "2024-05-01T08:00:00Z", (6.0 + 8.4 + 8.0) / 3),
    # the old result has left the year; the instant of 1 March counts until 365 days after
    # its final result was issued
    ("2025-03-04T09:59:59Z", 8.0, "2024-05-01T08:00:00Z", (8.4 + 8.0) / 2),
    ("2025-03-04T10:00:00Z", 8.0, "2024-05-01T08:00:00Z", 8.0),
]


def _resources() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [LAB_PATIENT]
    for rid, value, status, measured, issued in RESULTS:
        out.append({**lab_result(rid, HBA1C, {"value": value}, measured, issued), "status": status})
    # a later fact, so that rows run past every T above
    out.append(lab_result("later", "2345-7", {"value": 100.0}, "2025-06-01T08:00:00Z"))
    return out


@pytest.fixture(scope="module")
def con(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return features_from_fhir(_resources(), Path(tmp_path_factory.mktemp("labs")))


@pytest.mark.parametrize(("at", "latest", "measured", "mean"), EXPECTED)
def test_a_result_counts_from_its_own_issue(
    con: Any, at: str, latest: float, measured: str, mean: float
) -> None:
    t = datetime.fromisoformat(at)
    assert value_at(con, "patient_labs_vitals", "hba1c_latest", t, "p1") == latest
    assert value_at(con, "patient_labs_vitals", "hba1c_measured_at", t, "p1") == (
        datetime.fromisoformat(measured)
    )
    got = value_at(con, "patient_labs_vitals", "hba1c_mean_365d", t, "p1")
    assert got == pytest.approx(mean, abs=1e-9)


def test_a_huge_value_leaves_the_mean_whole(tmp_path: Path) -> None:
    """The mean adds each instant's value when it is issued and takes it away when it leaves
    the year: a value of 1e30 (a unit typed as a value) gives the small ones back exactly."""
    values = [("huge", 1e30, "2024-01-05T08:00:00Z"), ("a", 5.1, "2024-06-01T08:00:00Z")]
    values.append(("b", 0.1, "2025-02-01T08:00:00Z"))
    resources: list[dict[str, Any]] = [LAB_PATIENT]
    resources += [lab_result(rid, HBA1C, {"value": v}, at) for rid, v, at in values]
    resources.append(lab_result("later", "2345-7", {"value": 100.0}, "2025-08-01T08:00:00Z"))
    con = features_from_fhir(resources, tmp_path)
    t = datetime.fromisoformat("2025-03-01T00:00:00Z")
    mean = value_at(con, "patient_labs_vitals", "hba1c_mean_365d", t, "p1")
    assert mean == pytest.approx((5.1 + 0.1) / 2, abs=1e-9)
