"""The medication features counted from each request's spans: the values of a row-by-row reading
of the rule (a request authored at t is active from t for good while its status is active or
on-hold, else until t + 90 days; recent until t + 180 days), and work that grows with one
patient's requests, not with their square."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from pipelines.features.tables import (
    ACTIVE_DAYS,
    POLYPHARMACY_MIN,
    RECENT_DAYS,
    RXNORM,
    build_feature_tables_report,
    medications_sql,
)
from pipelines.features.valuesets import load_valuesets
from tests.pipelines.features.crafted import ts, write_views

CODES = ["860975", "311041", "314076", "197361", "617314", "999001", "999002"]
STATUSES = ["active", "on-hold", "completed", "stopped", "ACTIVE", None]


def _patient(pid: str) -> dict[str, Any]:
    return {"id": pid, "gender": "female", "birth_date": ts(1960, 1, 1).date()}


def _requests(rng: random.Random, pid: str, n: int) -> list[dict[str, Any]]:
    start = ts(2020, 1, 1)
    rows = []
    for i in range(n):
        # days apart by 0, 90 or 180 now and then: ties and window edges
        when = start + timedelta(days=rng.choice([0, 1, 30, 90, 180, 200]) * (i % 3))
        start = when
        rows.append(
            {
                "id": f"{pid}-m{i}",
                "patient_id": pid,
                "status": rng.choice(STATUSES),
                "authored_on": when,
                "medication_system": RXNORM,
                "medication_code": rng.choice(CODES),
            }
        )
    return rows


def _expected(
    row_time: datetime, requests: list[dict[str, Any]], classes: dict[str, set[str]]
) -> tuple[int, int, bool, dict[str, bool]]:
    """The features at ``row_time`` read request by request."""
    active: set[str] = set()
    recent: set[str] = set()
    for r in requests:
        at = r["authored_on"]
        if at > row_time:
            continue
        lasting = (r["status"] or "").lower() in ("active", "on-hold")
        if lasting or at > row_time - timedelta(days=ACTIVE_DAYS):
            active.add(r["medication_code"])
        if at > row_time - timedelta(days=RECENT_DAYS):
            recent.add(r["medication_code"])
    flags = {column: bool(active & codes) for column, codes in classes.items()}
    return len(active), len(recent), len(active) >= POLYPHARMACY_MIN, flags


def test_each_row_counts_the_requests_active_and_recent_at_its_time(tmp_path: Path) -> None:
    rng = random.Random(11)
    con = duckdb.connect()
    requests = {pid: _requests(rng, pid, 40) for pid in ("pa", "pb", "pc")}
    write_views(
        con,
        {
            "patient": [_patient(pid) for pid in requests],
            "medication_request": [r for rows in requests.values() for r in rows],
        },
    )
    build_feature_tables_report(con, tmp_path, tables=("patient_medications",))
    classes: dict[str, set[str]] = {}
    for column, system, code in con.execute(
        "SELECT column_name, system, code FROM valueset_codes"
    ).fetchall():
        if system == RXNORM:
            classes.setdefault(column, set()).add(code)
    names = [c for c in classes if c in _columns(con)]
    assert names  # the drug classes of the value sets are columns of the table
    rows = con.execute(
        "SELECT patient_id, event_timestamp, active_medication_count, medications_180d, "
        f"polypharmacy, {', '.join(names)} FROM features.patient_medications"
    ).fetchall()
    assert len(rows) > 100
    for pid, when, active, recent, poly, *flags in rows:
        want_active, want_recent, want_poly, want_flags = _expected(
            when, requests[pid], {c: classes[c] for c in names}
        )
        assert (active, recent, poly) == (want_active, want_recent, want_poly), (pid, when)
        assert dict(zip(names, flags, strict=True)) == want_flags, (pid, when)


def _columns(con: duckdb.DuckDBPyConnection) -> set[str]:
    described = con.execute("DESCRIBE features.patient_medications").fetchall()
    return {str(name) for name, *_ in described}


def _largest_intermediate(con: duckdb.DuckDBPyConnection) -> int:
    """The most rows any operator of the last query produced."""
    profile = json.loads(con.get_profiling_information(format="json"))
    most, stack = 0, list(profile.get("operator", []))
    while stack:
        node = stack.pop()
        most = max(most, int(node.get("operator_cardinality", node.get("intermediate_rows", 0))))
        stack.extend(node.get("children", []))
    return most


def test_one_patients_active_requests_cost_rows_in_proportion(tmp_path: Path) -> None:
    """400 requests, active for good, of one patient on days apart: each spine row saw every
    earlier active request, ~200,000 joined rows; the spans give a few rows per request."""
    n = 400
    con = duckdb.connect()
    write_views(
        con,
        {
            "patient": [_patient("pa")],
            "medication_request": [
                {
                    "id": f"m{i}",
                    "patient_id": "pa",
                    "status": "active",
                    "authored_on": ts(2020, 1, 1) + timedelta(days=i),
                    "medication_system": RXNORM,
                    "medication_code": CODES[i % len(CODES)],
                }
                for i in range(n)
            ],
        },
    )
    build_feature_tables_report(con, tmp_path, tables=("patient_medications",))
    sql = medications_sql(ts(2026, 1, 1), load_valuesets())
    con.execute("PRAGMA enable_profiling = 'no_output'")
    ((rows,),) = con.execute(f"SELECT count(*) FROM ({sql})").fetchall()
    largest = _largest_intermediate(con)
    con.execute("PRAGMA disable_profiling")
    assert rows >= n
    assert largest <= 20 * n, largest  # ~80,000 before
