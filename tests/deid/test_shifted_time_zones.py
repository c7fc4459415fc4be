"""A patient's date shift stays secret when the source writes local times with their zone.

A US server exports its times in local time, with the zone of the day (``-05:00`` in winter,
``-04:00`` in summer in New York). The research release shifts each date by the patient's
secret offset and sets the time to midnight; it kept the zone, so every released date said
whether its true date was in summer time, and a patient's events around the clock changes gave
the offset back within days. The attack is worked out here: the offsets in the documented
window that agree with every released zone."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from deid.engine import Deidentifier, DeidSecrets
from deid.policy import Policy

NEW_YORK = ZoneInfo("America/New_York")
WINDOW = 50  # the research profile's dateShiftRange
SUMMER, WINTER = "-04:00", "-05:00"


def _local(day: date) -> str:
    """10:00 on ``day`` in New York, as such an export writes it."""
    return datetime(day.year, day.month, day.day, 10, tzinfo=NEW_YORK).isoformat()


def _observations() -> list[dict[str, object]]:
    """One observation a week for two years, dated in New York local time."""
    first = date(2022, 1, 3)
    return [
        {
            "resourceType": "Observation",
            "id": f"o{n}",
            "status": "final",
            "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "effectiveDateTime": _local(first + timedelta(weeks=n)),
        }
        for n in range(104)
    ]


def _in_summer_time(day: date) -> bool | None:
    """Whether New York is on summer time all of ``day`` (None on a day the clocks change)."""
    starts = datetime(day.year, day.month, day.day, tzinfo=NEW_YORK).utcoffset()
    ends = datetime(day.year, day.month, day.day, 23, 59, tzinfo=NEW_YORK).utcoffset()
    return None if starts != ends else starts == timedelta(hours=-4)


def _offsets_agreeing(released: list[str]) -> list[int]:
    """The offsets of the window that agree with the zone of every released date-time."""
    told = [
        (date.fromisoformat(value[:10]), value.endswith(SUMMER))
        for value in released
        if value.endswith((SUMMER, WINTER))
    ]
    return [
        offset
        for offset in range(-WINDOW, WINDOW + 1)
        if offset
        and all(
            _in_summer_time(day - timedelta(days=offset)) in (None, summer) for day, summer in told
        )
    ]


def test_released_zones_leave_every_offset_of_the_window_possible() -> None:
    policy = Policy.shipped("research")
    engine = Deidentifier(policy, DeidSecrets.derive(bytes(32), policy), today=date(2026, 1, 1))
    sent = _observations()
    released = [engine.apply(r, patient_scope="p1").resource["effectiveDateTime"] for r in sent]
    # the dates are still shifted by one offset, the interval between them kept
    offsets = {
        (date.fromisoformat(out[:10]) - date.fromisoformat(str(r["effectiveDateTime"])[:10])).days
        for r, out in zip(sent, released, strict=True)
    }
    assert len(offsets) == 1 and 0 < abs(offsets.pop()) <= WINDOW
    assert all(value.endswith("T00:00:00Z") for value in released)
    # with the zones kept, 8 of the 100 offsets agreed with them (the true one, -5, among them)
    assert len(_offsets_agreeing(released)) == 2 * WINDOW
