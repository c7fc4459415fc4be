"""The second model's labels follow the readmission label's rules: visits and admissions that
took place, an inpatient stay of any inpatient class and a hospitalisation once, a follow-up
horizon set by encounters dated no later than the release can know, less twice the date-shift
range, and each visit at the instant the features first know it ended."""

from __future__ import annotations

import importlib.util
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import duckdb

REPO_ROOT = Path(__file__).resolve().parents[2]
DAY_END = timedelta(hours=35, minutes=59, seconds=59, milliseconds=999)  # to 11:59:59.999Z


def _example() -> ModuleType:
    path = REPO_ROOT / "examples" / "admission_90d_model.py"
    spec = importlib.util.spec_from_file_location("admission_90d_model_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _at(year: int, month: int, day: int, hour: int = 0) -> datetime:
    return datetime(year, month, day, hour, tzinfo=UTC)


def _encounter(
    eid: str,
    patient: str,
    cls: str,
    start: datetime,
    end: datetime | None = None,
    status: str = "finished",
    part_of: str | None = None,
    dated: bool = False,
) -> tuple[object, ...]:
    """A views.encounter row; ``dated``: the end is a date without a time (its latest instant
    is the end of that day at UTC-12)."""
    end = end or start
    return (
        eid,
        patient,
        part_of,
        status,
        cls,
        start,
        end,
        start,
        end + DAY_END if dated else end,
    )


def _warehouse(path: Path, rows: list[tuple[object, ...]], arrived: datetime) -> None:
    con = duckdb.connect(str(path))
    con.execute("CREATE SCHEMA views")
    con.execute(
        "CREATE TABLE views.encounter (id VARCHAR, patient_id VARCHAR, part_of_id VARCHAR, "
        "status VARCHAR, class_code VARCHAR, period_start TIMESTAMPTZ, period_end TIMESTAMPTZ, "
        "period_start_latest TIMESTAMPTZ, period_end_latest TIMESTAMPTZ)"
    )
    con.executemany("INSERT INTO views.encounter VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    con.execute("CREATE TABLE views.patient AS SELECT * FROM (VALUES ('a'), ('b')) t(id)")
    con.execute("CREATE TABLE batches (ingested_at TIMESTAMPTZ)")
    con.execute("INSERT INTO batches VALUES (?)", [arrived])
    con.close()


def _labels(path: Path) -> list[tuple[str, datetime, int]]:
    got = _example().admission_labels(path)
    return [
        (str(p), t.to_pydatetime(), int(label))
        for p, t, label in zip(got["patient_id"], got["event_timestamp"], got["label"])
    ]


def test_labels_count_only_admissions_that_took_place_of_any_inpatient_class(
    tmp_path: Path,
) -> None:
    path = tmp_path / "warehouse.duckdb"
    rows = [
        _encounter("v1", "a", "AMB", _at(2023, 11, 10, 10)),
        # entered in error: no admission, so no outcome of v1
        _encounter("x1", "a", "IMP", _at(2023, 12, 1), _at(2023, 12, 3), status="entered-in-error"),
        _encounter("v2", "a", "EMER", _at(2024, 3, 1, 10)),
        _encounter("s2", "a", "ACUTE", _at(2024, 3, 20), _at(2024, 3, 25)),  # a stay
        _encounter("w2", "a", "IMP", _at(2024, 3, 22), _at(2024, 3, 25), part_of="s2"),
        _encounter("v0", "a", "AMB", _at(2023, 11, 5), status="cancelled"),  # no visit
        _encounter("v3", "b", "AMB", _at(2024, 6, 1, 9)),
        _encounter("end", "b", "AMB", _at(2025, 6, 1, 9)),  # the last encounter held
    ]
    _warehouse(path, rows, arrived=_at(2025, 6, 5))
    assert _labels(path) == [
        ("a", _at(2023, 11, 10, 10), 0),
        ("a", _at(2024, 3, 1, 10), 1),
        ("b", _at(2024, 6, 1, 9), 0),
    ]


def test_follow_up_ends_at_the_data_the_release_can_know_less_the_shift_range(
    tmp_path: Path,
) -> None:
    """A planned admission next year and a finished visit typed 2105 for 2025 moved the
    horizon past every visit, which were then labelled 0 with their 90 days unseen; and a
    patient's own data can end up to twice the shift range (100 days) before the latest."""
    path = tmp_path / "warehouse.duckdb"
    rows = [
        _encounter("v1", "a", "AMB", _at(2024, 11, 1, 9)),  # 90 days end 110 days before
        _encounter("v2", "a", "AMB", _at(2025, 1, 20, 9)),  # within the margin: censored
        _encounter("v3", "a", "AMB", _at(2025, 5, 1, 9)),  # window past the data: censored
        _encounter("end", "b", "AMB", _at(2025, 6, 1, 9)),
        _encounter("p", "b", "IMP", _at(2026, 1, 1), _at(2026, 1, 4), status="planned"),
        _encounter("typo", "b", "AMB", _at(2105, 5, 1, 9)),
    ]
    _warehouse(path, rows, arrived=_at(2025, 6, 5))
    assert _labels(path) == [("a", _at(2024, 11, 1, 9), 0)]


def test_a_visit_dated_to_its_day_is_labelled_where_the_features_know_it(tmp_path: Path) -> None:
    """At the end of the visit's day in the latest zone (``period_end_latest``), as the
    features count it; an admission timed within that day is already known to the features
    there, so it is not the visit's outcome, and one the next day is."""
    path = tmp_path / "warehouse.duckdb"
    rows = [
        _encounter("v1", "a", "AMB", _at(2024, 3, 1), dated=True),
        _encounter("s1", "a", "IMP", _at(2024, 3, 1, 20), _at(2024, 3, 4)),
        _encounter("v2", "b", "AMB", _at(2024, 3, 1), dated=True),
        _encounter("s2", "b", "IMP", _at(2024, 3, 2, 13), _at(2024, 3, 4)),
        _encounter("end", "b", "AMB", _at(2025, 6, 1, 9)),
    ]
    _warehouse(path, rows, arrived=_at(2025, 6, 5))
    assert _labels(path) == [
        ("a", _at(2024, 3, 1) + DAY_END, 0),
        ("b", _at(2024, 3, 1) + DAY_END, 1),
    ]
