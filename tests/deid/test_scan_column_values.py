"""The distinct-value scan of a released table against a plain oracle: every distinct non-null
value of every text column (but the skipped ones) scanned on its own."""

from __future__ import annotations

import duckdb

from deid.leakscan import CanarySet
from deid.release import scan_column_values


def _canaries() -> CanarySet:
    c = CanarySet()
    c.add_patient(
        {
            "name": [{"family": "Quillfeather", "given": ["Marisol"]}],
            "telecom": [{"system": "phone", "value": "(555) 013-4477"}],
            "identifier": [{"value": "MRN778812"}],
        },
        "p1",
    )
    c.add_patient({"name": [{"family": "Black", "given": ["Anna"]}]}, "p2")
    return c


def _table(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(
        "CREATE TABLE t (id VARCHAR, patient_id VARCHAR, note VARCHAR, race_display VARCHAR, "
        "codes VARCHAR[], value DOUBLE, seen_at TIMESTAMP, flag BOOLEAN)"
    )
    con.executemany(
        "INSERT INTO t VALUES (?, ?, ?, ?, ?, 1.5, TIMESTAMP '2024-01-01', true)",
        [
            ["MRN778812", "p1", "seen by quillfeather", "Black", ["a", "b"]],
            ["r2", "p2", "seen by quillfeather", "Black", None],  # a repeated value
            ["r3", "p1", None, "White", ["555 013 4477"]],
            ["r4", "p2", "Anna Black called", None, []],
            ["r5", None, "final", "Black or African American", ["final"]],
        ],
    )


def _text_columns(con: duckdb.DuckDBPyConnection, skip: tuple[str, ...]) -> list[str]:
    described = con.execute("DESCRIBE t").fetchall()
    return [n for n, type_, *_ in described if type_ in ("VARCHAR", "VARCHAR[]") and n not in skip]


def _distinct(con: duckdb.DuckDBPyConnection, column: str) -> list[str]:
    values = {v for (v,) in con.execute(f'SELECT CAST("{column}" AS VARCHAR) FROM t').fetchall()}
    return sorted(v for v in values if v is not None)


def _oracle(con: duckdb.DuckDBPyConnection, canaries: CanarySet, skip: tuple[str, ...]) -> list:
    hits = []
    for name in _text_columns(con, skip):
        for value in _distinct(con, name):
            scanned = (
                {"system": "", "code": "", "display": value} if name.endswith("_display") else value
            )
            hits += [(kind, f"{name}:distinct") for kind in canaries.scan_value([scanned])]
    return sorted(hits)


def test_one_statement_finds_what_a_scan_per_column_finds() -> None:
    with duckdb.connect() as con:
        _table(con)
        for skip in (("id", "patient_id"), ("id", "patient_id", "note"), ()):
            result = scan_column_values(con, _canaries(), "t", skip_columns=skip)
            assert sorted((h.kind, h.row) for h in result.hits) == _oracle(con, _canaries(), skip)
            expected_rows = sum(len(_distinct(con, c)) for c in _text_columns(con, skip))
            assert result.scanned_rows == expected_rows
        rows = {h.row for h in scan_column_values(con, _canaries(), "t").hits}
        # the surname in a category's display is terminology; in free text it is a name
        assert rows == {"note:distinct", "codes:distinct"}


def test_a_table_with_no_text_column_left_scans_nothing() -> None:
    with duckdb.connect() as con:
        con.execute("CREATE TABLE t (id VARCHAR, patient_id VARCHAR, value DOUBLE)")
        con.execute("INSERT INTO t VALUES ('MRN778812', 'p1', 1.0)")
        result = scan_column_values(con, _canaries(), "t")
        assert result.passed and result.scanned_rows == 0
