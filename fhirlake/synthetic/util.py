"""Seed derivation, deterministic ids and date formatting."""

from __future__ import annotations

import uuid
from datetime import date, datetime, timedelta
from random import Random

# The generated history ends here rather than at today's date, so output never depends on
# when it was generated.
REFERENCE_DATE = datetime(2025, 12, 31, 23, 59, 0)

_SEED_STRIDE = 1_000_003
_STREAMS = 16

STREAM_PATIENT = 0
STREAM_DEFECTS = 1
STREAM_FAKER = 2
STREAM_DIRECTORY = 15


def derive_seed(seed: int, index: int, stream: int) -> int:
    """Integer seed for one patient and one random stream (no ``hash()``: it is salted)."""
    return (seed * _SEED_STRIDE + index) * _STREAMS + stream


def new_id(rng: Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def iso(dt: datetime) -> str:
    """FHIR dateTime in UTC (naive datetimes are UTC throughout)."""
    return dt.isoformat(timespec="seconds") + "Z"


def iso_date(d: date) -> str:
    return d.strftime("%Y-%m-%d")


def age_at(birth: date, when: date) -> int:
    years = when.year - birth.year
    if (when.month, when.day) < (birth.month, birth.day):
        years -= 1
    return years


def add_years(d: date, years: int) -> date:
    try:
        return d.replace(year=d.year + years)
    except ValueError:  # 29 February in a non-leap year
        return d.replace(year=d.year + years, day=28)


def random_datetime(rng: Random, start: datetime, end: datetime) -> datetime:
    """A whole-minute time uniformly between start and end."""
    span = max(0, int((end - start).total_seconds() // 60))
    return start + timedelta(minutes=rng.randint(0, span))


def clinic_time(rng: Random, day: datetime) -> datetime:
    """A time of day during clinic hours on the given day."""
    return day.replace(hour=rng.randint(8, 16), minute=rng.choice((0, 15, 30, 45)), second=0)
