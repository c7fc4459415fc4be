"""Stage, check, then publish: a failed check leaves the previous release as it was."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from pipelines.publish import all_checks, publish_checked, publish_table


@dataclass(frozen=True)
class Verdict:
    passed: bool
    rows_seen: int


def no_secret(con: duckdb.DuckDBPyConnection, staging: str) -> Verdict:
    ((rows, bad),) = con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE v = 'secret') FROM {staging}"
    ).fetchall()
    return Verdict(bad == 0, int(rows))


def test_passing_check_publishes(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    target = tmp_path / "out" / "t.parquet"
    outcome = publish_checked(con, "s.t", target, "SELECT 'ok' AS v", no_secret)
    assert outcome.published and outcome.rows == 1 and outcome.check.rows_seen == 1
    assert pq.read_table(target).to_pylist() == [{"v": "ok"}]


def test_failed_check_keeps_the_previous_release_and_shows_nothing_new(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    target = tmp_path / "out" / "t.parquet"
    publish_table(con, "s.t", target, "SELECT 'old' AS v")
    before = target.read_bytes()
    outcome = publish_checked(
        con, "s.t", target, "SELECT 'new' AS v UNION ALL SELECT 'secret'", no_secret
    )
    assert not outcome.published and outcome.rows == 2
    assert con.execute("SELECT v FROM s.t").fetchall() == [("old",)]
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["t.parquet"]  # no temp file
    tables = con.execute(
        "SELECT table_schema || '.' || table_name FROM information_schema.tables"
    ).fetchall()
    assert tables == [("s.t",)]  # no staging table


def test_failed_check_on_a_first_release_publishes_nothing(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    target = tmp_path / "out" / "t.parquet"
    outcome = publish_checked(con, "s.t", target, "SELECT 'secret' AS v", no_secret)
    assert not outcome.published and not target.exists()
    assert con.execute("SELECT count(*) FROM information_schema.tables").fetchall() == [(0,)]


def test_all_checks_must_pass(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    target = tmp_path / "out" / "t.parquet"

    def never(con: duckdb.DuckDBPyConnection, staging: str) -> Verdict:
        return Verdict(False, 0)

    clean = publish_checked(con, "s.t", target, "SELECT 'ok' AS v", all_checks(leak=no_secret))
    assert clean.published and clean.check.results["leak"].passed
    both = publish_checked(
        con, "s.t", target, "SELECT 'new' AS v", all_checks(leak=no_secret, opted_out=never)
    )
    assert not both.published and not both.check.results["opted_out"].passed
    assert con.execute("SELECT v FROM s.t").fetchall() == [("ok",)]
