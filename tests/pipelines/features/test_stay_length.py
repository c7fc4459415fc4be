"""``prior_stay_length_days``: the length in days of the latest stay discharged before T, from
the admission's date to the discharge's.

A stay whose admission is dated to its day (no time) and whose discharge has a time (a source
that stamps discharges only, or the research release, which keeps a zone with a time of day)
took its length from the admission's *latest* instant (the end of that day at UTC-12, the time
the features first know of the admission) to the discharge itself: a same-day stay was -1 day
long, a stay from 1 to 3 June one day. The expected lengths are counted here in calendar days
from the dates as sent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipelines.features.tables import build_feature_tables
from tests.pipelines.features.test_future_dates import _views

P1 = {"reference": "Patient/p1"}


def _stay(rid: str, start: str, end: str, cls: str = "IMP") -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": rid,
        "status": "finished",
        "class": {"code": cls},
        "subject": P1,
        "period": {"start": start, "end": end},
    }


@pytest.mark.parametrize(
    ("start", "end", "days"),
    [
        ("2025-06-01", "2025-06-01T18:00:00Z", 0),  # admitted and discharged on 1 June
        ("2025-06-01", "2025-06-03T10:00:00Z", 2),
        ("2025-06-01", "2025-06-03", 2),  # both dated alone: right already
    ],
)
def test_stay_length_from_a_day_dated_admission(
    tmp_path: Path, start: str, end: str, days: int
) -> None:
    con = _views(
        [
            {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1960-05-01"},
            _stay("e1", start, end),
            _stay("e2", "2025-08-01T08:00:00Z", "2025-08-01T09:00:00Z", "AMB"),  # the data end
        ]
    )
    build_feature_tables(con, tmp_path)
    ((length,),) = con.execute(
        "SELECT prior_stay_length_days FROM features.patient_utilisation "
        "ORDER BY event_timestamp DESC LIMIT 1"
    ).fetchall()
    assert length == days
