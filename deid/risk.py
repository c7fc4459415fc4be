"""Re-identification risk of a released table: k-anonymity over its quasi-identifiers, and a
generalise-then-suppress step that brings the table to k.

Computed in DuckDB (a GROUP BY is all k-anonymity needs; no extra library): the release lives
there already, and the same SQL runs on a table of any size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
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


def measure_k(
    con: duckdb.DuckDBPyConnection, table: str, quasi_identifiers: list[str], k: int
) -> KAnonymityReport:
    """Group sizes over the quasi-identifiers. Fully suppressed records match every group, so
    they are counted apart and never make a group small."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not quasi_identifiers:
        raise ValueError("at least one quasi-identifier is needed")
    cols = [_ident(c) for c in quasi_identifiers]
    all_suppressed = " AND ".join(f"coalesce({c}, '{SUPPRESSED}') = '{SUPPRESSED}'" for c in cols)
    row = con.execute(
        f"""
        WITH g AS (
            SELECT count(*) AS n FROM {_ident(table)} WHERE NOT ({all_suppressed})
            GROUP BY {", ".join(cols)}
        )
        SELECT
            (SELECT count(*) FROM {_ident(table)}),
            (SELECT count(*) FROM {_ident(table)} WHERE {all_suppressed}),
            (SELECT count(*) FROM g),
            (SELECT coalesce(min(n), 0) FROM g),
            (SELECT coalesce(sum(n) FILTER (WHERE n < {int(k)}), 0) FROM g)
        """
    ).fetchall()[0]
    return KAnonymityReport(k, tuple(cols), *(int(v) for v in row))


@dataclass(frozen=True)
class GeneralisationStep:
    """One full-domain generalisation: a name and the SQL SET clause that applies it."""

    name: str
    set_clause: str


@dataclass
class EnforcementReport:
    before: KAnonymityReport
    after: KAnonymityReport
    steps_applied: list[str] = field(default_factory=list)
    suppressed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "steps_applied": self.steps_applied,
            "suppressed": self.suppressed,
        }


def enforce_k(
    con: duckdb.DuckDBPyConnection,
    table: str,
    quasi_identifiers: list[str],
    k: int,
    ladder: list[GeneralisationStep],
    max_suppression: float = 0.05,
) -> EnforcementReport:
    """Generalise step by step while more than ``max_suppression`` of the records sit in groups
    smaller than k; then suppress (set to ``*``) the quasi-identifiers of those still below k."""
    if not 0.0 <= max_suppression <= 1.0:
        raise ValueError("max_suppression must be within [0, 1]")
    before = measure_k(con, table, quasi_identifiers, k)
    report = EnforcementReport(before, before)
    current = before
    for step in ladder:
        if current.share_below_k <= max_suppression:
            break
        con.execute(f"UPDATE {_ident(table)} SET {step.set_clause}")
        report.steps_applied.append(step.name)
        current = measure_k(con, table, quasi_identifiers, k)
    if not current.passed:
        cols = [_ident(c) for c in quasi_identifiers]
        key = ", ".join(cols)
        small = con.execute(
            f"""
            UPDATE {_ident(table)} SET {", ".join(f"{c} = '{SUPPRESSED}'" for c in cols)}
            WHERE ({key}) IN (
                SELECT ({key}) FROM {_ident(table)} GROUP BY {key} HAVING count(*) < {int(k)}
            )
            """
        ).fetchall()
        report.suppressed = int(small[0][0]) if small else 0
        current = measure_k(con, table, quasi_identifiers, k)
    report.after = current
    return report
