"""A view written before its rows were put in the order of the pseudonyms (in the source's
order) is rebuilt once, in full, by the next refresh: its rows are the same, so an incremental
refresh kept every row where it stood, and the order of the export with it."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from deid.policy import Policy
from deid.release import build_released_patients, release_canaries
from deid.staging import publish_batch
from fhirlake.synthetic import generate
from fhirlake.viewdef import load_view
from pipelines.views import refresh
from pipelines.views.refresh import refresh_view
from pipelines.views.tables import VIEWS_DIR
from vault import warehouse
from vault.ingest import ingest_batch
from vault.keys import FileKeyProvider

TODAY = date(2026, 11, 28)
PATIENT_VIEW = load_view(VIEWS_DIR / "patient.json")


def _put_in_reverse_order(con: duckdb.DuckDBPyConnection, parquet: Path) -> None:
    """The view's table and file with their rows in reverse pseudonym order, as a runner that
    kept the source's order could have written them."""
    con.execute("CREATE TEMP TABLE kept AS SELECT * FROM views.patient")
    con.execute("DELETE FROM views.patient")
    con.execute("INSERT INTO views.patient SELECT * FROM kept ORDER BY patient_id DESC")
    con.execute(f"COPY (SELECT * FROM views.patient) TO '{parquet}' (FORMAT parquet)")


def test_a_view_in_the_source_order_is_rebuilt_in_the_pseudonyms_order(
    tmp_path: Path, key_provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    landing, wh, work = tmp_path / "b1", tmp_path / "w.duckdb", tmp_path / "work"
    generate(landing, 6, seed=5)
    ingest_batch(wh, "b1", landing, key_provider, workers=1)
    con = warehouse.connect(wh)
    try:
        assert publish_batch(con, key_provider, "b1", Policy.shipped("research"), today=TODAY)
        canaries = release_canaries(con, key_provider)
        assert build_released_patients(con, 1, canaries=canaries).published
        with monkeypatch.context() as before:
            before.setattr(refresh, "RUNNER_VERSION", "1")  # the runner before the row order
            assert refresh_view(con, PATIENT_VIEW, work, canaries).mode == "full"
            parquet = work / "views" / "patient.parquet"
            _put_in_reverse_order(con, parquet)
            assert refresh_view(con, PATIENT_VIEW, work, canaries).mode == "unchanged"
        assert refresh_view(con, PATIENT_VIEW, work, canaries).mode == "full"
        rows = con.execute("SELECT patient_id FROM views.patient").fetchall()
    finally:
        con.close()
    in_table = [p for (p,) in rows]
    in_file = pq.read_table(parquet).column("patient_id").to_pylist()
    assert in_table == in_file == sorted(in_table)
    assert len(in_table) == 6
