"""deidentify_batch writes into the table it is given, so a batch can be staged first."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from deid.policy import Policy
from deid.release import deidentify_batch
from fhirlake.synthetic import generate
from vault import warehouse
from vault.ingest import ingest_batch
from vault.keys import FileKeyProvider

TODAY = date(2026, 11, 28)


def test_batch_goes_to_the_named_tables_only(tmp_path: Path, key_provider: FileKeyProvider) -> None:
    generate(tmp_path / "landing", 2, seed=5)
    wh = tmp_path / "w.duckdb"
    ingest_batch(wh, "b", tmp_path / "landing", key_provider, workers=1)
    con = warehouse.connect(wh)
    try:
        report = deidentify_batch(
            con,
            key_provider,
            "b",
            Policy.shipped("research"),
            today=TODAY,
            target="staged_resources",
            errors_target="staged_errors",
        )
        (staged,) = con.execute("SELECT count(*) FROM staged_resources").fetchone()
        tables = {t for (t,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    finally:
        con.close()
    assert staged == report.released > 0
    assert "staged_errors" in tables and "deid_resources" not in tables


def test_a_target_that_is_not_a_table_name_is_refused(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    con = warehouse.connect(tmp_path / "w.duckdb")
    try:
        with pytest.raises(ValueError, match="not a table name"):
            deidentify_batch(
                con, key_provider, "b", Policy.shipped("research"), target="x; DROP TABLE y"
            )
    finally:
        con.close()


def test_every_worker_counts_ages_from_the_day_the_caller_read(
    tmp_path: Path, key_provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given no day, each worker process read today's date when it started (and the calling
    process when it de-identified a batch's first chunks itself): across midnight UTC one
    batch held ages and 90-or-older years counted from two days. The day is read once, by
    the caller, and sent to every worker."""
    from deid import release

    generate(tmp_path / "landing", 2, seed=5)
    wh = tmp_path / "w.duckdb"
    ingest_batch(wh, "b", tmp_path / "landing", key_provider, workers=1)
    sent: list[date | None] = []

    def capture(items: object, setup: release.WorkerSetup, *args: object, **kw: object) -> None:
        sent.append(setup.today)

    monkeypatch.setattr(release, "deidentify_items", capture)
    monkeypatch.setattr(release, "today_utc", lambda: TODAY, raising=False)
    con = warehouse.connect(wh)
    try:
        deidentify_batch(con, key_provider, "b", Policy.shipped("research"))
    finally:
        con.close()
    assert sent == [TODAY]
