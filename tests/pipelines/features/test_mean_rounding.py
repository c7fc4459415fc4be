"""A mean of lab values is the same number whatever order the sum is taken in: rounded to
``MEAN_DIGITS`` decimals. Two builds of one input gave 7.75 and 7.750000000000001 (a double
sum depends on its order), and the online store saw a changed row where nothing changed.

The expectation is the exact mean of the values (``fractions.Fraction``), as a double."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from tests.pipelines.features.crafted import features_from_fhir

SUBJECT = {"reference": "Patient/p1"}
# three results whose double sum in time order is 0.6000000000000001, not 0.6
VALUES = (0.1, 0.2, 0.3)


def _hba1c(n: int, day: int, value: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"o{n}",
        "status": "final",
        "subject": SUBJECT,
        "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
        "valueQuantity": {"value": value, "unit": "%"},
        "effectiveDateTime": f"2025-03-{day:02d}T09:00:00Z",
    }


@pytest.mark.parametrize("same_instant", [False, True])
def test_a_mean_of_lab_values_is_their_exact_mean(tmp_path: Path, same_instant: bool) -> None:
    patient = {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1960-01-01"}
    labs = [_hba1c(n, 1 if same_instant else n + 1, v) for n, v in enumerate(VALUES)]
    con = features_from_fhir([patient, *labs], tmp_path)
    ((latest, mean),) = con.execute(
        "SELECT hba1c_latest, hba1c_mean_365d FROM features.patient_labs_vitals "
        "ORDER BY event_timestamp DESC LIMIT 1"  # at the last result: the data end
    ).fetchall()
    exact = float(sum(Fraction(v) for v in VALUES) / len(VALUES))
    assert sum(VALUES) / len(VALUES) != exact  # the double sum is off by one ulp
    assert mean == exact
    # results of one instant count as one, their mean: the latest value is that mean too
    assert latest == (exact if same_instant else VALUES[-1])
