"""The crafted patient (a canary in every element kind where PHI was seen surviving a block-list
release) through the whole platform: no canary in any released table, Parquet file, the Feast
online store, the run summary, Dagster's run storage or the logs."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import duckdb
import orjson
import pytest

from fhirlake.synthetic import generate
from pipelines.run import run_pipeline
from pipelines.workdir import Workdir
from tests.deid.test_allowlist_crafted import CANARIES, CRAFTED, canary

pytestmark = pytest.mark.e2e

# the vault's own tables hold ciphertexts (and pseudonymous ledgers), not released text
VAULT_TABLES = {"phi_vault", "phi_vault_clustered", "quarantine", "data_keys", "sealed_cache"}


def _released_text(workdir: Workdir) -> str:
    """Every row of every table in the warehouse outside the vault, and every Parquet file."""
    parts: list[str] = []
    con = duckdb.connect(str(workdir.warehouse), read_only=True)
    try:
        tables = con.execute(
            "SELECT schema_name, table_name FROM duckdb_tables() WHERE NOT internal"
        ).fetchall()
        for schema, table in tables:
            if table in VAULT_TABLES:
                continue
            rows = con.execute(f'SELECT * FROM "{schema}"."{table}"').fetchall()
            parts.append(orjson.dumps(rows, default=str).decode())
        for parquet in workdir.root.rglob("*.parquet"):
            rows = con.execute("SELECT * FROM read_parquet(?)", [str(parquet)]).fetchall()
            parts.append(orjson.dumps(rows, default=str).decode())
    finally:
        con.close()
    return "\n".join(parts)


def _online_store_text(path: Path) -> str:
    db = sqlite3.connect(path)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        rows = [db.execute(f'SELECT * FROM "{t}"').fetchall() for t in tables]
    finally:
        db.close()
    return repr(rows)


def _other_files_text(workdir: Workdir) -> str:
    """Raw bytes of every other file: Dagster's run storage and compute logs, the summary."""
    skip = {".duckdb", ".parquet", ".wal"}
    return "\n".join(
        p.read_bytes().decode("utf-8", "replace")
        for p in workdir.root.rglob("*")
        if p.is_file() and p.suffix not in skip and p != workdir.online_store
    )


def test_no_canary_leaves_the_platform(
    tmp_path: Path,
    key_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)  # the runs' storage lands in the workdir
    landing = tmp_path / "landing"
    generate(landing / "cohort", 12, seed=21)
    (landing / "crafted").mkdir()
    (landing / "crafted" / "crafted.ndjson").write_bytes(
        b"\n".join(orjson.dumps(r) for r in CRAFTED)
    )
    workdir = Workdir(tmp_path / "work")
    summary = run_pipeline(landing, workdir, workers=1)
    assert summary["success"], summary["runs"]
    assert summary["stages"]["ingest"]["accepted"] >= len(CRAFTED)
    assert summary["stages"]["views"]["patient"] >= 13  # the crafted patient was released

    text = "\n".join(
        [
            _released_text(workdir),
            _online_store_text(workdir.online_store),
            _other_files_text(workdir),
            caplog.text,
        ]
    ).casefold()
    # the scan sees what was released (a control: released codes and pseudonyms are in it)
    assert "http://loinc.org" in text and "event_timestamp" in text
    leaked = [kind for kind in CANARIES if canary(kind).casefold() in text]
    assert leaked == []
