from __future__ import annotations

import duckdb
import pytest

from deid.risk import GeneralisationStep, generalise_until, measure_k

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
