from __future__ import annotations

from collections import Counter

import duckdb
import pytest

from deid.risk import SUPPRESSED, GeneralisationStep, generalise_until, measure_k

QIS = ["age_band", "sex", "zip3"]


def table(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(
        "CREATE TABLE rel (patient_id VARCHAR, age_band VARCHAR, sex VARCHAR, zip3 VARCHAR)"
    )
    rows = []
    for i in range(60):
        rows.append((f"p{i}", ["40-44", "45-49"][i % 2], "female", "021"))
    rows += [
        ("u1", "90+", "male", "021"),
        ("u2", "70-74", "male", "990"),
        ("u3", "20-24", "other", "021"),
    ]
    con.executemany("INSERT INTO rel VALUES (?, ?, ?, ?)", rows)


def test_measure_k_counts_small_groups() -> None:
    con = duckdb.connect()
    table(con)
    report = measure_k(con, "rel", QIS, 5)
    assert (report.records, report.groups, report.min_group, report.records_below_k) == (
        63,
        5,
        1,
        3,
    )
    assert not report.passed and round(report.share_below_k, 3) == 0.048
    with pytest.raises(ValueError, match="identifier"):
        measure_k(con, "rel; drop table rel", QIS, 5)


def _reference(rows: list[tuple[str, ...]], k: int) -> tuple[int, int, int, int, int]:
    """(records, suppressed, groups, smallest group, records below k), worked out in Python:
    a record is fully suppressed when every quasi-identifier is ``*`` or missing, and only
    those stand apart; a record with some of its values suppressed is grouped as it reads."""
    kept = [row[1:] for row in rows if not all(v in (None, SUPPRESSED) for v in row[1:])]
    sizes = Counter(kept)
    below = sum(n for n in sizes.values() if n < k)
    return len(rows), len(rows) - len(kept), len(sizes), min(sizes.values()), below


def test_only_fully_suppressed_records_stand_apart_from_the_groups() -> None:
    """Fully suppressed records match every group: counted apart, never a small group. A
    record with one value suppressed still has a group (here of two), which is below k; were
    it set apart too, a ladder step blanking one column for everybody (``state removed``)
    would empty every group and report any table as k-anonymous."""
    con = duckdb.connect()
    table(con)
    extra = [
        ("s1", SUPPRESSED, SUPPRESSED, SUPPRESSED),
        ("s2", None, None, None),
        ("s3", SUPPRESSED, None, SUPPRESSED),
        ("h1", "40-44", "male", SUPPRESSED),
        ("h2", "40-44", "male", SUPPRESSED),
    ]
    con.executemany("INSERT INTO rel VALUES (?, ?, ?, ?)", extra)
    rows = con.execute("SELECT * FROM rel").fetchall()
    r = measure_k(con, "rel", QIS, 5)
    got = (r.records, r.suppressed_records, r.groups, r.min_group, r.records_below_k)
    assert got == _reference(rows, 5) == (68, 3, 6, 1, 5)


def test_generalises_until_few_enough_are_below_k() -> None:
    con = duckdb.connect()
    table(con)
    ladder = [
        GeneralisationStep(
            "age to 10-year bands",
            "age_band = CASE WHEN age_band IN ('90+', '*') THEN age_band "
            "ELSE (CAST(split_part(age_band, '-', 1) AS INT) // 10 * 10)::VARCHAR || '-' || "
            "(CAST(split_part(age_band, '-', 1) AS INT) // 10 * 10 + 9)::VARCHAR END",
        )
    ]
    after, applied = generalise_until(con, "rel", QIS, 5, ladder, max_share_below_k=0.01)
    assert applied == ["age to 10-year bands"]
    assert after.records_below_k == 3  # left for the caller to withhold
    assert con.execute("SELECT count(*) FROM rel").fetchall()[0][0] == 63  # nobody dropped
    with pytest.raises(ValueError, match="within"):
        generalise_until(con, "rel", QIS, 5, ladder, max_share_below_k=1.5)
