"""Views are read through the withheld list, staged, scanned, and published only when clean."""

from __future__ import annotations

from pathlib import Path

import duckdb
import orjson
import pyarrow.parquet as pq

from deid.leakscan import CanarySet, LeakScanResult
from deid.release import DEID_DDL, scan_released_table
from fhirlake.viewdef import load_view
from pipelines.views.tables import VIEWS_DIR, run_view_over_release

VIEW = load_view(VIEWS_DIR / "patient.json")


def _warehouse(tmp_path: Path, states: dict[str, str]) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    con.execute(DEID_DDL)
    for pid, state in states.items():
        resource = {"resourceType": "Patient", "id": pid, "address": [{"state": state}]}
        con.execute(
            "INSERT INTO deid_resources (resource_type, id, patient_id, batch_id, resource) "
            "VALUES ('Patient', ?, ?, 'b', ?)",
            [pid, pid, orjson.dumps(resource).decode()],
        )
    return con


def _canaries() -> CanarySet:
    canaries = CanarySet()
    canaries.add_patient({"name": [{"family": "Quillfeather", "given": ["Marisol"]}]}, "p9")
    return canaries


def _scan(con: duckdb.DuckDBPyConnection, staging: str) -> LeakScanResult:
    return scan_released_table(con, _canaries(), staging)


def test_withheld_patients_are_not_in_the_view(tmp_path: Path) -> None:
    con = _warehouse(tmp_path, {"p1": "MA", "p2": "MA", "p3": "MA"})
    con.execute("CREATE TABLE withheld_patients AS SELECT 'p2' AS patient_id, 'k' AS reason")
    result = run_view_over_release(con, VIEW, tmp_path, check=_scan)
    assert result.published and result.rows == 2
    assert {r["id"] for r in pq.read_table(result.parquet).to_pylist()} == {"p1", "p3"}
    assert con.execute("SELECT count(*) FROM views.patient WHERE id = 'p2'").fetchone() == (0,)


def test_planted_leak_leaves_the_previous_view(tmp_path: Path) -> None:
    con = _warehouse(tmp_path, {"p1": "MA"})
    first = run_view_over_release(con, VIEW, tmp_path, check=_scan)
    assert first.published and first.check.passed
    parquet = first.parquet.read_bytes()
    leak = {"resourceType": "Patient", "address": [{"state": "QUILLFEATHER"}]}
    con.execute(
        "INSERT INTO deid_resources (resource_type, id, patient_id, batch_id, resource) "
        "VALUES ('Patient', 'p9', 'p9', 'b', ?)",
        [orjson.dumps(leak).decode()],
    )
    second = run_view_over_release(con, VIEW, tmp_path, check=_scan)
    assert not second.published and second.check.by_kind() == {"name": 1}
    assert con.execute("SELECT id FROM views.patient").fetchall() == [("p1",)]
    assert first.parquet.read_bytes() == parquet
    assert sorted(p.name for p in first.parquet.parent.iterdir()) == ["patient.parquet"]
    tables = {t for (t,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert tables == {"deid_resources", "patient"}
