"""Re-identification risk of a released table: k-anonymity over its quasi-identifiers, and a
generalise-then-suppress step that brings the table to k.

Computed in DuckDB (a GROUP BY is all k-anonymity needs; no extra library): the release lives
there already, and the same SQL runs on a table of any size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import duckdb

SUPPRESSED = "*"
_IDENT = "abcdefghijklmnopqrstuvwxyz_0123456789"


def _ident(name: str) -> str:
    if not name or any(c not in _IDENT for c in name.lower()):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return name


@dataclass(frozen=True)
class KAnonymityReport:
    k: int
    quasi_identifiers: tuple[str, ...]
    records: int
    suppressed_records: int
    groups: int
    min_group: int
    records_below_k: int

    @property
    def share_below_k(self) -> float:
        return self.records_below_k / self.records if self.records else 0.0

    @property
    def passed(self) -> bool:
        return self.records_below_k == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "share_below_k": round(self.share_below_k, 4),
            "passed": self.passed,
        }


def group_size_sql(person: str | None = None) -> str:
    """SQL for the size of a group: its records, or with ``person`` (a column naming whom each
    record is about) the distinct people in it. A person sent under several records (one MRN
    under two Patient ids) is one member of a group however many records they have: a group
    of five records of two people is a group of two."""
    return f"count(DISTINCT {_ident(person)})" if person else "count(*)"


def measure_k(
    con: duckdb.DuckDBPyConnection,
    table: str,
    quasi_identifiers: list[str],
    k: int,
    person: str | None = None,
) -> KAnonymityReport:
    """Group sizes over the quasi-identifiers, in records or, with ``person``, in people
    (:func:`group_size_sql`); ``records`` and ``records_below_k`` count records either way.
    Fully suppressed records match every group, so they are counted apart and never make a
    group small."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not quasi_identifiers:
        raise ValueError("at least one quasi-identifier is needed")
    cols = [_ident(c) for c in quasi_identifiers]
    all_suppressed = " AND ".join(f"coalesce({c}, '{SUPPRESSED}') = '{SUPPRESSED}'" for c in cols)
    row = con.execute(
        f"""
        WITH g AS (
            SELECT {group_size_sql(person)} AS n, count(*) AS records FROM {_ident(table)}
            WHERE NOT ({all_suppressed})
            GROUP BY {", ".join(cols)}
        )
        SELECT
            (SELECT count(*) FROM {_ident(table)}),
            (SELECT count(*) FROM {_ident(table)} WHERE {all_suppressed}),
            (SELECT count(*) FROM g),
            (SELECT coalesce(min(n), 0) FROM g),
            (SELECT coalesce(sum(records) FILTER (WHERE n < {int(k)}), 0) FROM g)
        """
    ).fetchall()[0]
    return KAnonymityReport(k, tuple(cols), *(int(v) for v in row))


@dataclass(frozen=True)
class GeneralisationStep:
    """One full-domain generalisation: a name and the SQL SET clause that applies it."""

    name: str
    set_clause: str


def generalise_until(
    con: duckdb.DuckDBPyConnection,
    table: str,
    quasi_identifiers: list[str],
    k: int,
    ladder: list[GeneralisationStep],
    max_share_below_k: float,
    measured: KAnonymityReport | None = None,
    person: str | None = None,
) -> tuple[KAnonymityReport, list[str]]:
    """Full-domain generalisation: apply the ladder's steps in order while more than
    ``max_share_below_k`` of the records sit in groups smaller than k. Returns the measure after
    the last step applied and the names of the steps applied; what to do with the records still
    below k is the caller's decision. ``measured``: the table's measure already taken by the
    caller (over the same quasi-identifiers and k), not taken again. ``person``: groups are
    counted in people (:func:`measure_k`)."""
    if not 0.0 <= max_share_below_k <= 1.0:
        raise ValueError("max_share_below_k must be within [0, 1]")
    current = measured or measure_k(con, table, quasi_identifiers, k, person)
    applied: list[str] = []
    for step in ladder:
        if current.share_below_k <= max_share_below_k:
            break
        con.execute(f"UPDATE {_ident(table)} SET {step.set_clause}")
        applied.append(step.name)
        current = measure_k(con, table, quasi_identifiers, k, person)
    return current, applied
