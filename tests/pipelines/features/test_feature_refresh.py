"""Feature tables refreshed after changes equal tables built from scratch over the same views.

The oracle is ``build_feature_tables_report`` over the same view rows in a second, fresh
warehouse (every patient computed, no bookkeeping); the refresh must also say what it did:
only the changed patients computed again while the definitions stay (with, when the data end
moves, the patients it moves past), in full when a definition changes."""

from __future__ import annotations

import copy
import os
import random
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest

from pipelines.features.refresh import FeatureRefresh, refresh_feature_tables
from pipelines.features.tables import FEATURE_TABLES, build_feature_tables_report
from tests.pipelines.features.crafted import A, B, D, crafted_rows, ts, write_views
from tests.pipelines.features.test_point_in_time_property import random_views


def _table_rows(con: duckdb.DuckDBPyConnection, name: str) -> list[tuple[Any, ...]]:
    columns = [
        f'round("{c}", 9)' if t == "DOUBLE" else f'"{c}"'
        for c, t, *_ in con.execute(f"DESCRIBE features.{name}").fetchall()
        if c != "created"
    ]
    return sorted(
        con.execute(f"SELECT {', '.join(columns)} FROM features.{name}").fetchall(), key=repr
    )


def _oracle(tmp: Path, rows: dict[str, list[dict[str, Any]]]) -> dict[str, list[Any]]:
    path = tmp / "oracle.duckdb"
    path.unlink(missing_ok=True)
    con = duckdb.connect(str(path))
    try:
        write_views(con, rows)
        build_feature_tables_report(con, tmp / "oracle_features")
        return {name: _table_rows(con, name) for name in FEATURE_TABLES}
    finally:
        con.close()


def _encounter(pid: str, n: int, start: Any) -> dict[str, Any]:
    return {
        "id": f"x{n}",
        "patient_id": pid,
        "class_code": "AMB",
        "period_start": start,
        "period_end": start,
    }


def _refreshed_as_from_scratch(
    con: duckdb.DuckDBPyConnection, out: Path, tmp: Path, rows: dict[str, list[dict[str, Any]]]
) -> FeatureRefresh:
    """The views written from ``rows`` and the feature tables refreshed; they must equal the
    tables a build from scratch gives over the same rows (:func:`_oracle`)."""
    write_views(con, rows)
    refresh = refresh_feature_tables(con, out)
    assert {n: _table_rows(con, n) for n in FEATURE_TABLES} == _oracle(tmp, rows)
    return refresh


def test_refresh_after_each_change_equals_a_build_from_scratch(tmp_path: Path) -> None:
    rows = crafted_rows()
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    out = tmp_path / "features"
    steps: list[tuple[str, int, int]] = []

    def refresh_and_compare() -> None:
        refresh = _refreshed_as_from_scratch(con, out, tmp_path, rows)
        steps.append((refresh.mode, refresh.patients_changed, refresh.patients_removed))
        for name in FEATURE_TABLES:
            parquet = con.execute(f"SELECT count(*) FROM '{out / name}.parquet'").fetchone()
            assert parquet == (refresh.build.rows[name],)

    refresh_and_compare()
    # a new visit of D inside the release's time line
    rows["encounter"].append(_encounter(D, 1, ts(2024, 6, 1)))
    refresh_and_compare()
    # D opts out of research
    rows["consent"][2]["status"] = "active"
    refresh_and_compare()
    # B leaves the release (withheld, erased)
    rows = {view: [r for r in rs if B not in r.values()] for view, rs in rows.items()}
    refresh_and_compare()
    refresh_and_compare()
    # A's visit after the data end: the data end moves, and with it the rows of A alone (the
    # others have no window edge, birthday or heartbeat before the new end)
    rows = copy.deepcopy(rows)
    rows["encounter"].append(_encounter(A, 2, ts(2025, 9, 1)))
    refresh_and_compare()
    assert steps == [
        ("full", 4, 0),
        ("incremental", 1, 0),
        ("incremental", 1, 0),
        ("incremental", 0, 1),
        ("unchanged", 0, 0),
        ("incremental", 1, 0),
    ]


def test_a_moved_data_end_computes_again_the_patients_it_moves_past_and_no_other(
    tmp_path: Path,
) -> None:
    """The data end moves with each new latest fact (D's visits here). The patients whose rows
    change with it are computed again with D: those with a row (window edge, birthday,
    heartbeat) between the two ends, or all of them when it moves past the horizon their next
    change was known to, or those with a row after it when it moves back. After every step
    the tables equal a build from scratch in a fresh warehouse. The crafted record's data end
    is 2025-01-05; A's rows next change on 2025-03-01, B's on 2025-05-01 (C opted out)."""
    rows = crafted_rows()
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    out = tmp_path / "features"
    steps: list[tuple[str, int, int]] = []

    def refresh_and_compare() -> None:
        refresh = _refreshed_as_from_scratch(con, out, tmp_path, rows)
        steps.append((refresh.mode, refresh.patients_changed, refresh.patients_data_end_moved))

    refresh_and_compare()
    rows["encounter"].append(_encounter(D, 11, ts(2025, 2, 10)))  # past no one's next change
    refresh_and_compare()
    rows["encounter"].append(_encounter(D, 12, ts(2025, 3, 10)))  # past A's (2025-03-01)
    refresh_and_compare()
    rows["encounter"].append(_encounter(D, 13, ts(2026, 6, 1)))  # past every horizon
    refresh_and_compare()
    rows["encounter"] = [e for e in rows["encounter"] if e["id"] != "x13"]  # back to 2025-03-10
    refresh_and_compare()
    assert steps == [
        ("full", 4, 0),
        ("incremental", 1, 0),  # D
        ("incremental", 2, 1),  # D, and A
        ("incremental", 4, 3),  # D, and A, B and C (C opted out: computed, no rows)
        ("incremental", 3, 2),  # D, and A and B: rows after 2025-03-10 taken away
    ]


def _hba1c_at(con: duckdb.DuckDBPyConnection, pid: str, at: Any) -> Any:
    """The published ``hba1c_latest`` of ``pid`` at ``at``: the latest row at or before it."""
    found = con.execute(
        "SELECT hba1c_latest FROM features.patient_labs_vitals "
        "WHERE patient_id = ? AND event_timestamp <= ? ORDER BY event_timestamp DESC LIMIT 1",
        [pid, at],
    ).fetchall()
    return found[0][0] if found else None


def test_rows_sent_twice_are_computed_again(tmp_path: Path) -> None:
    """Two results of one content sent as two resources give two equal view rows (the
    observation view's columns the features read hold no resource id). Both arriving in a
    later batch, or both corrected alike, change the patient's features; a digest that
    cancelled equal rows (an exclusive or of their hashes) left the patient as they were."""
    rows = crafted_rows()
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    out = tmp_path / "features"
    write_views(con, rows)
    refresh_feature_tables(con, out)
    result = {
        "patient_id": D,
        "status": "final",
        "code": "4548-4",
        "component_code": None,
        "value_quantity": 9.5,
        "value_unit": "%",
        "effective_date_time": ts(2024, 5, 1),
        "issued": ts(2024, 5, 1),
    }
    # D had no HbA1c; the same result arrives twice, inside the release's time line
    rows["observation"] += [{**result, "id": "r1"}, {**result, "id": "r2"}]
    write_views(con, rows)
    refresh = refresh_feature_tables(con, out)
    assert (refresh.mode, refresh.patients_changed) == ("incremental", 1)
    assert _hba1c_at(con, D, ts(2024, 6, 1)) == 9.5
    assert {n: _table_rows(con, n) for n in FEATURE_TABLES} == _oracle(tmp_path, rows)
    # both corrected to the same value: one pair of equal rows replaced by another
    for row in rows["observation"]:
        if row.get("id") in ("r1", "r2"):
            row.update(status="corrected", value_quantity=8.1)
    write_views(con, rows)
    refresh = refresh_feature_tables(con, out)
    assert (refresh.mode, refresh.patients_changed) == ("incremental", 1)
    assert _hba1c_at(con, D, ts(2024, 6, 1)) == 8.1
    assert {n: _table_rows(con, n) for n in FEATURE_TABLES} == _oracle(tmp_path, rows)


def test_a_crash_before_the_bookkeeping_redoes_the_same_patients(tmp_path: Path) -> None:
    rows = crafted_rows()
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    out = tmp_path / "features"
    write_views(con, rows)
    refresh_feature_tables(con, out)
    before = con.execute("SELECT * FROM release_state.feature_sources").fetchall()
    rows["encounter"].append(_encounter(D, 1, ts(2024, 6, 1)))
    write_views(con, rows)
    refresh_feature_tables(con, out)
    # as if killed after the tables were published and before the bookkeeping was written
    con.execute("DELETE FROM release_state.feature_sources")
    con.executemany("INSERT INTO release_state.feature_sources VALUES (?, ?)", before)
    redo = refresh_feature_tables(con, out)
    assert (redo.mode, redo.patients_changed) == ("incremental", 1)
    assert {n: _table_rows(con, n) for n in FEATURE_TABLES} == _oracle(tmp_path, rows)


def test_the_definitions_digest_is_the_same_in_every_process() -> None:
    """Each Dagster run is a new process: a digest that followed the string hash seed (a
    frozenset's order) made every refresh a full build."""

    script = (
        "from pipelines.features.refresh import definitions_digest\n"
        "from pipelines.features.valuesets import load_valuesets\n"
        "print(definitions_digest(load_valuesets()))"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2", "3")
    }
    assert len(digests) == 1


@pytest.mark.parametrize("seed", [3, 8])
def test_random_batches_moving_the_data_end_refresh_as_a_build_from_scratch(
    tmp_path: Path, seed: int
) -> None:
    """Forty random patients (the point-in-time property test's), then batches of new visits
    and results for a few of them, each moving the data end on by a day to a few months (once
    by more than the horizon), and one taken back. After every batch the refreshed tables
    equal a build from scratch in a fresh warehouse, and the refresh computed fewer patients
    again than the cohort holds."""
    rng = random.Random(seed)
    rows = copy.deepcopy(random_views(seed))
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    out = tmp_path / "features"
    patients = [p["id"] for p in rows["patient"]]
    write_views(con, rows)
    assert refresh_feature_tables(con, out).mode == "full"
    ((recorded,),) = con.execute(
        "SELECT value FROM release_state.feature_builds WHERE key = 'data_end'"
    ).fetchall()
    end = datetime.fromisoformat(recorded)  # a condition recorded years after its onset
    moved: list[int] = []
    for step, days in enumerate([1, 1, 3, 17, 45, 2, 420, 1]):
        end += timedelta(days=days)
        for who in rng.sample(patients, 2):
            rows["encounter"].append(
                _encounter(who, 100 + step, end - timedelta(hours=rng.randint(0, 30)))
            )
            rows["observation"].append(
                {
                    "id": f"o-new-{step}-{who[-4:]}",
                    "patient_id": who,
                    "status": "final",
                    "code": "4548-4",
                    "value_quantity": round(rng.uniform(4, 12), 1),
                    "effective_date_time": end - timedelta(days=rng.randint(0, 40)),
                }
            )
        refresh = _refreshed_as_from_scratch(con, out, tmp_path, rows)
        assert refresh.mode == "incremental"
        moved.append(refresh.patients_data_end_moved)
    # the latest batch taken back (its patients erased from it): the data end moves back
    rows["encounter"] = [e for e in rows["encounter"] if e["id"] != f"x{100 + step}"]
    rows["observation"] = [
        o for o in rows["observation"] if not o["id"].startswith(f"o-new-{step}-")
    ]
    _refreshed_as_from_scratch(con, out, tmp_path, rows)
    # a day's move recomputes a few patients; the move past the horizon, nearly all of them
    assert min(moved) < len(patients) // 2 and max(moved) > len(patients) // 2, moved
