"""``prior_stay_length_days``: the length in days of the latest stay discharged before T, from
the admission's date to the discharge's.

A stay whose admission is dated to its day (no time) and whose discharge has a time (a source
that stamps discharges only, or the research release, which writes a time of day, midnight UTC)
took its length from the admission's *latest* instant (the end of that day at UTC-12, the time
the features first know of the admission) to the discharge itself: a same-day stay was -1 day
long, a stay from 1 to 3 June one day. The expected lengths are counted here in calendar days
from the dates as sent."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

import pytest

from pipelines.features.tables import build_feature_tables
from tests.pipelines.features.crafted import released_records
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


def _latest_stay_length(tmp_path: Path, start: str, end: str) -> int:
    """The prior stay's length at the data end, for one stay from ``start`` to ``end``."""
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
    return int(length)


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
    assert _latest_stay_length(tmp_path, start, end) == days


@pytest.mark.parametrize(
    ("start", "end", "days"),
    [
        # a discharge in a zone ahead of UTC early in the day lies on the day before in UTC:
        # a same-day stay was -1 day long
        ("2025-06-01", "2025-06-01T01:30:00+02:00", 0),
        ("2025-06-01T00:30:00+02:00", "2025-06-03", 2),  # was 3: the admission on 31 May UTC
        ("2025-06-01T22:00:00-05:00", "2025-06-03T10:00:00Z", 2),  # was 1: 2 June in UTC
        ("2025-06-01T00:00:00+14:00", "2025-06-05T00:00:00-11:00", 4),  # was 5
    ],
)
def test_stay_length_counts_the_dates_in_the_zones_they_were_written_in(
    tmp_path: Path, start: str, end: str, days: int
) -> None:
    assert _latest_stay_length(tmp_path, start, end) == days


def test_a_released_same_day_stay_in_a_zone_ahead_of_utc_lasts_no_days(tmp_path: Path) -> None:
    """The research release sets a discharge's time to midnight UTC of its date as written: a
    stay of one day in Berlin, admitted on a day and discharged at 15:00+02:00, is released as
    a day and that day's midnight (when the release kept the zone, midnight at +02:00, 22:00
    UTC the day before)."""
    records = [
        {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1960-05-01"},
        _stay("e1", "2025-06-01", "2025-06-01T15:00:00+02:00"),
        _stay("e2", "2025-08-01T08:00:00Z", "2025-08-01T09:00:00Z", "AMB"),
    ]
    released = released_records({"p1": records}, bytes(32), date(2026, 1, 1))["p1"]
    (stay,) = [r for r in released if r.get("class", {}).get("code") == "IMP"]
    assert stay["period"]["end"].endswith("T00:00:00Z")
    assert stay["period"]["start"] == stay["period"]["end"][:10]
    con = _views(released)
    build_feature_tables(con, tmp_path)
    ((length,),) = con.execute(
        "SELECT prior_stay_length_days FROM features.patient_utilisation "
        "ORDER BY event_timestamp DESC LIMIT 1"
    ).fetchall()
    assert length == 0


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("2025-06-01", "2025-06-10"), ("2025-06-08", "2025-06-10")),  # one discharge day
        (("2025-06-01T10:00:00Z", "2025-06-03T10:00:00Z"), ("2025-06-02", "2025-06-03T10:00Z")),
    ],
)
def test_stays_discharged_at_one_instant_give_the_longest_whatever_their_order(
    tmp_path: Path, first: tuple[str, str], second: tuple[str, str]
) -> None:
    """Two stays discharged at the same instant (the research release dates both to one day):
    the prior stay's length is the longer one's, in whichever order the records come. It was
    the one the ASOF join met first in storage, so the same records sent in another order gave
    another length (9 days or 2)."""
    expected = (date.fromisoformat(second[1][:10]) - date.fromisoformat(first[0][:10])).days
    lengths = set()
    for order in ((first, second), (second, first)):
        patient = {"resourceType": "Patient", "id": "p1", "gender": "female"}
        stays = [_stay(f"s{i}", start, end) for i, (start, end) in enumerate(order)]
        con = _views([patient, *stays, _stay("e2", "2025-08-01", "2025-08-01", "AMB")])
        build_feature_tables(con, tmp_path / str(len(lengths)))
        lengths |= {
            length
            for (length,) in con.execute(
                "SELECT prior_stay_length_days FROM features.patient_utilisation "
                "WHERE prior_discharge_at IS NOT NULL"
            ).fetchall()
        }
    assert lengths == {expected}
