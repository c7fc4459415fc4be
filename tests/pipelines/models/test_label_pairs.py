"""The readmission and transfer flags of every discharge against a stay-by-stay reading of the
rules, and work that grows with one patient's stays, not with their square."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import duckdb

from pipelines.models.labels import (
    READMISSION_WINDOW_DAYS,
    TRANSFER_DISPOSITIONS,
    _discharges_sql,
)
from tests.pipelines.models.crafted import CONSENT_DDL

DDL = """
CREATE TABLE views.encounter (
    id VARCHAR, patient_id VARCHAR, status VARCHAR, class_code VARCHAR,
    period_start TIMESTAMPTZ, period_end TIMESTAMPTZ, discharge_disposition_code VARCHAR,
    period_start_latest TIMESTAMPTZ, period_end_latest TIMESTAMPTZ
)"""


@dataclass(frozen=True)
class Stay:
    id: str
    patient: str
    start: datetime
    end: datetime | None
    start_latest: datetime
    end_latest: datetime | None
    disposition: str | None


def _bound(rng: random.Random, at: datetime) -> tuple[datetime, datetime]:
    """A bound dated to its day (00:00Z, known at the end of its day and the zones west of
    UTC) or to the instant."""
    if rng.random() < 0.4:
        day = at.replace(hour=0, minute=0, second=0, microsecond=0)
        return day, day + timedelta(hours=36) - timedelta(microseconds=1)
    return at, at


def _stays(rng: random.Random, patient: str, n: int) -> list[Stay]:
    stays, at = [], datetime(2020, 1, 1, 8, tzinfo=UTC)
    for i in range(n):
        # now and then on the same day, the next, or 30 days on: transfers and the window's edge
        at += rng.choice(
            [timedelta(hours=h) for h in (0, 3, 20, 30)] + [timedelta(days=d) for d in (12, 30)]
        ) + timedelta(days=30 * (i % 5 == 0))
        start, start_latest = _bound(rng, at)
        end_at = at + timedelta(hours=rng.choice([0, 5, 26, 72]))
        end, end_latest = _bound(rng, end_at)
        if rng.random() < 0.05:
            end = end_latest = None  # still in hospital
        disposition = rng.choice(["home", "home", TRANSFER_DISPOSITIONS[0], "02", None])
        stays.append(
            Stay(f"{patient}-{i}", patient, start, end, start_latest, end_latest, disposition)
        )
    return stays


def _write(con: duckdb.DuckDBPyConnection, stays: list[Stay]) -> None:
    con.execute("SET TimeZone = 'UTC'")
    con.execute("CREATE SCHEMA IF NOT EXISTS views")
    con.execute(DDL)
    con.execute(CONSENT_DDL)  # no consent: nobody opted out
    con.executemany(
        "INSERT INTO views.encounter VALUES (?, ?, 'finished', 'IMP', ?, ?, ?, ?, ?)",
        [
            [s.id, s.patient, s.start, s.end, s.disposition, s.start_latest, s.end_latest]
            for s in stays
        ],
    )


def _dated_to_the_day(value: datetime, latest: datetime) -> bool:
    return latest < value + timedelta(days=2)


def _expected(d: Stay, stays: list[Stay]) -> tuple[bool, bool]:
    """Whether the discharge ``d`` was followed by a readmission and ended in a transfer, read
    stay by stay from the rules of :mod:`pipelines.models.labels`."""
    assert d.end is not None and d.end_latest is not None
    window = timedelta(days=READMISSION_WINDOW_DAYS)
    others = [
        r
        for r in stays
        if r.patient == d.patient and r.id != d.id and _dated_to_the_day(r.start, r.start_latest)
    ]
    readmitted = any(
        d.end < r.start <= d.end + window and r.start_latest > d.end_latest for r in others
    )
    received = any(
        r.start.date() in (d.end.date(), d.end.date() + timedelta(days=1))
        and (r.end is None or r.end > d.end)
        for r in others
    )
    return readmitted, d.disposition in TRANSFER_DISPOSITIONS and received


def test_each_discharge_is_flagged_as_a_stay_by_stay_reading_of_the_rules() -> None:
    rng = random.Random(5)
    stays = [s for p in ("pa", "pb", "pc") for s in _stays(rng, p, 60)]
    con = duckdb.connect()
    _write(con, stays)
    flagged = con.execute(_discharges_sql(con, 0, None)).df()
    discharges = [s for s in stays if s.end is not None]
    assert len(flagged) == len(discharges)
    # keyed by patient and label time; two discharges at one latest instant are one label,
    # which keeps either's outcome
    found: dict[tuple[str, datetime], tuple[bool, bool]] = {}
    for row in flagged.itertuples():
        key = (str(row.patient_id), row.event_timestamp.to_pydatetime())
        before = found.get(key, (False, False))
        found[key] = (before[0] or bool(row.readmitted), before[1] or bool(row.transferred))
    expected: dict[tuple[str, datetime], tuple[bool, bool]] = {}
    for d in discharges:
        assert d.end_latest is not None
        key = (d.patient, d.end_latest)
        before = expected.get(key, (False, False))
        readmitted, transferred = _expected(d, stays)
        expected[key] = (before[0] or readmitted, before[1] or transferred)
    assert sum(r for r, _ in expected.values()) > 20
    assert sum(t for _, t in expected.values()) > 5
    assert found == expected


def _join_conditions(con: duckdb.DuckDBPyConnection) -> list[list[str]]:
    """The conditions of every inner hash join of the last query's plan."""
    profile = json.loads(con.get_profiling_information(format="json"))
    found, stack = [], list(profile.get("operator", []))
    while stack:
        node = stack.pop()
        info = node.get("extra_info", {})
        if node.get("type") == "HASH_JOIN" and info.get("Join Type") == "INNER":
            conditions = info.get("Conditions", [])
            found.append([conditions] if isinstance(conditions, str) else list(conditions))
        stack.extend(node.get("children", []))
    return found


def test_a_patients_stays_are_paired_by_day_or_span_not_by_patient_alone() -> None:
    """2,000 stays of one patient, three days apart: each discharge was paired with every other
    stay of the patient to find its readmission and its receiving stay (the joins matched on the
    patient alone: 2,000 stays took 1.7 s, 8,000 took 17 s), now with the stays of the two
    spans of 31 days or the two days they can start in (8,000: 0.3 s). The work of a join
    whose rows the query does not keep shows in no row count, so the joins are read from the
    plan."""
    n = 2000
    start = datetime(2000, 1, 1, 10, tzinfo=UTC)
    stays = [
        Stay(f"e{i}", "pa", *(start + timedelta(days=3 * i + d) for d in (0, 1, 0, 1)), "home")
        for i in range(n)
    ]
    con = duckdb.connect()
    _write(con, stays)
    con.execute("PRAGMA enable_profiling = 'no_output'")
    flagged = con.execute(_discharges_sql(con, 0, None)).df()
    joins = _join_conditions(con)
    con.execute("PRAGMA disable_profiling")
    assert len(flagged) == n and int(flagged.readmitted.sum()) == n - 1
    readmissions = [c for c in joins if _mentions(c, "start_latest", "end_latest")]
    receiving = [c for c in joins if _mentions(c, "COALESCE((period_end")]
    assert readmissions and receiving, joins
    for conditions in readmissions + receiving:
        assert any(_matches_on(x, "span") or _matches_on(x, "day") for x in conditions), conditions


def _mentions(conditions: list[str], *words: str) -> bool:
    return any(all(w in x for w in words) for x in conditions)


def _matches_on(condition: str, word: str) -> bool:
    """Whether ``condition`` is an equality of a start's and an end's ``word`` (either side)."""
    sides = condition.split(" = ")
    return len(sides) == 2 and all(word in side for side in sides)
