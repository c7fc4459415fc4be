"""Lab and vital results are read in the unit their feature names. A result stated in another
unit of the same quantity (mg/L, g/L for a mass concentration in mg/dL) is converted; one in a
unit of another quantity (a glucose in mmol/L, a creatinine in umol/L under their mass LOINC
codes) is left out and counted, never averaged with the rest; one stating no unit is read in
the feature's unit and counted.

FHIR resources go through the shipped ViewDefinitions and the feature SQL; the expected values
are worked out here from the resources with this file's own table of factors (written from the
UCUM definitions: 1 g/L = 100 mg/dL, 1 mg/L = 0.1 mg/dL), and read from the published rows by
a point-in-time lookup written here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from statistics import mean
from typing import Any

import duckdb
import pytest

from fhirlake.viewdef import write_view_table
from pipelines.features.feast_store import feast_env, resolve_repo
from pipelines.features.tables import LAB_UNITS, build_feature_tables_report
from pipelines.views.tables import load_views
from tests.pipelines.features.crafted import LAB_PATIENT, lab_result, value_at

GLUCOSE, CREATININE = "2339-0", "2160-0"
UCUM = "http://unitsofmeasure.org"
# (id, code, value, UCUM code or None, measured)
RESULTS = [
    ("g1", GLUCOSE, 100.0, "mg/dL", "2024-01-01T08:00:00Z"),
    ("g2", GLUCOSE, 0.9, "g/L", "2024-02-01T08:00:00Z"),
    ("g3", GLUCOSE, 1100.0, "mg/L", "2024-03-01T08:00:00Z"),
    # a glucose in mmol/L under the mass code: 5.5 mmol/L is about 99 mg/dL, not 5.5
    ("g4", GLUCOSE, 5.5, "mmol/L", "2024-04-01T08:00:00Z"),
    ("g5", GLUCOSE, 120.0, None, "2024-05-01T08:00:00Z"),
    ("g6", GLUCOSE, 95.0, "mg/dl", "2024-06-01T08:00:00Z"),
    ("c1", CREATININE, 1.2, "mg/dL", "2024-01-10T08:00:00Z"),
    # a creatinine in umol/L under the mass code: 88 umol/L is about 1.0 mg/dL
    ("c2", CREATININE, 88.0, "umol/L", "2024-01-20T08:00:00Z"),
]
# this test's own reading of each stated unit: the factor to mg/dL, or None (left out)
TO_MG_PER_DL: dict[str | None, float | None] = {
    "mg/dL": 1.0,
    "mg/dl": 1.0,
    "g/L": 100.0,
    "mg/L": 0.1,
    None: 1.0,
    "mmol/L": None,
    "umol/L": None,
}
TIMES = [
    "2024-01-15T00:00:00Z",
    "2024-01-25T00:00:00Z",
    "2024-02-02T00:00:00Z",
    "2024-03-02T00:00:00Z",
    "2024-04-02T00:00:00Z",
    "2024-05-02T00:00:00Z",
    "2024-06-02T00:00:00Z",
]


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _quantity(value: float, unit: str | None) -> dict[str, Any]:
    if unit is None:
        return {"value": value}
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def _resources() -> list[dict[str, Any]]:
    return [
        LAB_PATIENT,
        *(
            lab_result(rid, code, _quantity(value, unit), measured)
            for rid, code, value, unit, measured in RESULTS
        ),
    ]


def _readable(code: str) -> list[tuple[datetime, float]]:
    """The results of ``code`` this test reads, in mg/dL."""
    out = []
    for _, c, value, unit, measured in RESULTS:
        factor = TO_MG_PER_DL[unit]
        if c == code and factor is not None:
            out.append((_at(measured), value * factor))
    return out


def _expected(code: str, at: datetime) -> tuple[float | None, float | None]:
    known = [(m, v) for m, v in _readable(code) if m <= at]
    if not known:
        return None, None
    in_year = [v for m, v in known if at - timedelta(days=365) < m]
    return max(known)[1], mean(in_year)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Any:
    con = duckdb.connect()
    resources = _resources()
    for view in load_views():
        mine = [r for r in resources if r["resourceType"] == view.resource]
        write_view_table(con, view, mine, f"views.{view.name}")
    build = build_feature_tables_report(con, Path(tmp_path_factory.mktemp("units")))
    return con, build


@pytest.mark.parametrize("measure,code", [("glucose", GLUCOSE), ("creatinine", CREATININE)])
@pytest.mark.parametrize("at", TIMES)
def test_a_result_is_read_in_the_features_unit_or_left_out(
    built: Any, measure: str, code: str, at: str
) -> None:
    con, _ = built
    latest, mean_365d = _expected(code, _at(at))
    table = "patient_labs_vitals"
    got_latest = value_at(con, table, f"{measure}_latest", _at(at), "p1")
    got_mean = value_at(con, table, f"{measure}_mean_365d", _at(at), "p1")
    assert got_latest == (pytest.approx(latest) if latest is not None else None)
    assert got_mean == (pytest.approx(mean_365d) if mean_365d is not None else None)


def test_results_left_out_and_without_a_unit_are_counted(built: Any) -> None:
    _, build = built
    assert build.lab_units.unread == {"glucose": 1, "creatinine": 1}
    assert build.lab_units.without_unit == {"glucose": 1}


def test_the_worked_values() -> None:
    """The hand computation itself: after the mmol/L glucose the latest is still the mg/L one
    (1100 mg/L = 110 mg/dL) and the mean is (100 + 90 + 110) / 3; the umol/L creatinine does
    not replace 1.2 mg/dL."""
    assert _expected(GLUCOSE, _at("2024-04-02T00:00:00Z")) == (
        pytest.approx(110.0),
        pytest.approx(100.0),
    )
    assert _expected(CREATININE, _at("2024-01-25T00:00:00Z")) == (1.2, 1.2)


# prints every field's unit tag of the repo in the working folder, parsed as `feast apply` does
_READ_UNITS = (
    "import json, sys; from pathlib import Path; from feast.repo_operations import parse_repo; "
    "sys.path.insert(0, '.'); repo = parse_repo(Path('.').resolve()); "
    "print(json.dumps({f.name: f.tags.get('unit') for v in repo.feature_views for f in v.schema}))"
)


def test_each_feature_is_in_the_unit_its_tag_names(tmp_path: Path) -> None:
    """The feature repo's ``unit`` tags and the unit the SQL brings results to are one: each
    tag's unit is read with a factor of 1 (the repo is declarative and imports no platform
    code, so the two are held together here). The repo is parsed in a process of its own, as
    ``feast apply`` parses it; nothing is applied."""
    env = {**os.environ, **feast_env(tmp_path / "feast", tmp_path / "features")}
    out = subprocess.run(
        [sys.executable, "-c", _READ_UNITS],
        cwd=resolve_repo(None), env=env, capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    units = json.loads(out.stdout.strip().splitlines()[-1])
    for measure, accepted in LAB_UNITS.items():
        for suffix in ("latest", "mean_365d"):
            unit = units[f"{measure}_{suffix}"]
            assert accepted.get(unit) == 1.0, (measure, unit)
