"""The order-independent digest of a set of rows that counts each row as often as it is there
(``multiset_digest_sql``), checked against a computation of its own in Python."""

from __future__ import annotations

import duckdb
import pytest

from vault.catalog import multiset_digest_sql


def _digest(con: duckdb.DuckDBPyConnection, table: str) -> int:
    ((digest,),) = con.execute(f"SELECT {multiset_digest_sql('hash(t)')} FROM {table} t").fetchall()
    return int(digest)


@pytest.mark.parametrize(
    ("before", "after", "xor_blind"),
    [
        ([("a", 1)], [("a", 1), ("b", 2), ("b", 2)], True),  # a row added twice
        ([("a", 1), ("b", 2), ("b", 2)], [("a", 1), ("c", 3), ("c", 3)], True),  # pair replaced
        ([("a", 1), ("a", 1)], [("a", 1)], False),  # one of two equal rows gone
    ],
)
def test_a_row_counts_as_often_as_it_is_there(
    before: list[tuple[str, int]], after: list[tuple[str, int]], xor_blind: bool
) -> None:
    con = duckdb.connect()
    for name, rows in (("before", before), ("after", after)):
        con.execute(f"CREATE TABLE {name} (s VARCHAR, n INTEGER)")
        con.executemany(f"INSERT INTO {name} VALUES (?, ?)", rows)
        hashes = [int(h) for (h,) in con.execute(f"SELECT hash(t) FROM {name} t").fetchall()]
        # the same digest, computed here: the hashes' sum kept to 64 bits
        assert _digest(con, name) == sum(hashes) % 2**64
        shuffled = f"SELECT * FROM {name} ORDER BY random()"
        assert _digest(con, f"({shuffled})") == _digest(con, name)
    assert _digest(con, "before") != _digest(con, "after")
    # what an exclusive or of the hashes gave: the same digest for the first two cases
    xor = "SELECT bit_xor(hash(t)) FROM {} t"
    if len(before) != len(after) - 2 and len(after) == len(before):
        assert (
            con.execute(xor.format("before")).fetchall()
            == con.execute(xor.format("after")).fetchall()
        )
