"""The example's entity rows are the discharges the readmission label indexes: every inpatient
class the platform reads as a stay (IMP, ACUTE, NONAC), a hospitalisation once (not its ICU or
ward segments), no encounter that did not take place, at the instant the features first know
the stay ended (``period_end_latest``)."""

from __future__ import annotations

import importlib.util
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import duckdb

REPO_ROOT = Path(__file__).resolve().parents[2]


def _example() -> ModuleType:
    path = REPO_ROOT / "examples" / "readmission_training_set.py"
    spec = importlib.util.spec_from_file_location("readmission_training_set_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _at(day: int, hour: int = 0) -> datetime:
    return datetime(2024, 5, day, hour, tzinfo=UTC)


def test_entity_rows_are_the_discharges_the_label_indexes(tmp_path: Path) -> None:
    path = tmp_path / "warehouse.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE SCHEMA views; CREATE SCHEMA features")
    con.execute(
        "CREATE TABLE views.encounter (id VARCHAR, patient_id VARCHAR, part_of_id VARCHAR, "
        "status VARCHAR, class_code VARCHAR, period_end TIMESTAMPTZ, "
        "period_end_latest TIMESTAMPTZ)"
    )
    day_end = datetime(2024, 5, 20, 23, 59, 59, 999000, tzinfo=UTC)
    rows = [
        ("stay", "a", None, "finished", "IMP", _at(3, 10), _at(3, 10)),
        ("icu", "a", "stay", "finished", "IMP", _at(2, 9), _at(2, 9)),  # a segment of "stay"
        ("acute", "a", None, "finished", "ACUTE", _at(10, 8), _at(10, 8)),
        ("nonac", "b", None, "finished", "NONAC", _at(12, 8), _at(12, 8)),
        ("planned", "b", None, "planned", "IMP", _at(28), _at(28)),
        ("dated", "b", None, "finished", "IMP", _at(20), day_end),  # a discharge with no time
        ("visit", "b", None, "finished", "AMB", _at(5), _at(5)),
        ("out", "c", None, "finished", "IMP", _at(6), _at(6)),  # not in the feature tables
    ]
    con.executemany("INSERT INTO views.encounter VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    con.execute("CREATE TABLE features.patient_demographics AS SELECT 'a' AS patient_id")
    con.execute("INSERT INTO features.patient_demographics VALUES ('b')")
    con.close()
    got = _example().discharges(path)
    assert list(got.columns) == ["patient_id", "event_timestamp"]
    assert [(p, t.to_pydatetime()) for p, t in zip(got["patient_id"], got["event_timestamp"])] == [
        ("a", _at(3, 10)),
        ("a", _at(10, 8)),
        ("b", _at(12, 8)),
        ("b", day_end),
    ]
