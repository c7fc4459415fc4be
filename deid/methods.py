"""De-identification methods on single values, as the Microsoft FHIR anonymizer defines them,
with our authenticated ``encrypt`` (AES-256-GCM instead of unauthenticated AES-CBC).

Each function is pure: keys, randomness and the reference date come in as arguments, so every
method has known-answer tests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Callable
from datetime import UTC, date, timedelta

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vault.clock import Clock, RandomBytes, utcnow

AGE_LIMIT = 89  # HIPAA: ages over 89 are aggregated into "90 or older"
DEFAULT_DATE_SHIFT_DAYS = 50
_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")
# a US ZIP (or ZIP+4) written without its leading zero: four digits, then optionally four more
_ZIP_WITHOUT_LEADING_ZERO = re.compile(r"^\d{4}(?:[- ]?\d{4})?$", re.ASCII)
_DATETIME = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?$"
)


def _parse_partial(value: str) -> tuple[int, int | None, int | None] | None:
    match = _DATE.match(value) or _DATETIME.match(value)
    if match is None:
        return None
    year, month, day = match.group(1), match.group(2), match.group(3)
    return int(year), int(month) if month else None, int(day) if day else None


def _year_of(value: str) -> int | None:
    """The year of a (partial) date, date-time or instant; None when it is not one. A day that
    does not exist (2020-02-30) raises ValueError: it is no date."""
    parts = _parse_partial(value)
    if parts is None:
        return None
    year, month, day = parts
    date(year, month or 1, day or 1)
    return year


def is_year_over_age_limit(year: int, today: date) -> bool:
    """The age limit, counted in calendar years as the release's age bands are: a birth in
    ``year`` is over it from 1 January of the year of its 90th anniversary (``today.year -
    year >= 90``), every day of that year alike. It aggregates up to a year before the
    birthday, never after it (the safe side of HIPAA's "over 89"), and it reads the year
    alone: the rules of the release change on 1 January only, so what a batch records of when
    it next changes (``deid_batches.stable_until``, in clear) tells a year, never a birthday.
    The one rule every date and age rule of the release follows."""
    return today.year - year > AGE_LIMIT


def year_over_age_limit_sql(year: str, today: date) -> str:
    """:func:`is_year_over_age_limit` as a SQL condition on the birth year ``year`` (a trusted
    column or expression), for the release's age bands (``deid.kanon``): the one rule, not a
    copy of it."""
    return f"({today.year} - ({year}) > {AGE_LIMIT})"


def is_over_age_limit(value: str, today: date) -> bool:
    """True when a (birth) date lies in a year 90 or more years before ``today``'s
    (:func:`is_year_over_age_limit`): 1936-12-31 is over the limit from 1 January 2026."""
    year = _year_of(value)
    return year is not None and is_year_over_age_limit(year, today)


def aggregated_birth_year(this_year: int) -> int:
    """The year a birth date over the age limit is released as (HIPAA's "90 or older"): the
    year that makes a patient 90 this year, the birth year of the age bands' "90+" too."""
    return this_year - AGE_LIMIT - 1


def age_limit_new_year(year: int) -> date | None:
    """1 January of the year from which a birth in ``year`` is over the age limit
    (:func:`is_year_over_age_limit`); None past the calendar's end."""
    first = year + AGE_LIMIT + 1
    return date(first, 1, 1) if first <= date.max.year else None


def age_limit_day(value: str) -> date | None:
    """The first day on which a (birth) date is over the age limit (:func:`is_over_age_limit`):
    1 January of the year of its 90th anniversary, whatever its month and day. None when it is
    not a date or that day is past the calendar's end."""
    try:
        year = _year_of(value)
    except ValueError:
        return None
    return None if year is None else age_limit_new_year(year)


def next_new_year(today: date) -> date | None:
    """1 January after ``today`` (None past the calendar's end)."""
    return date(today.year + 1, 1, 1) if today.year < date.max.year else None


class DayHorizon:
    """The first day after ``today`` on which what is de-identified today could come out
    otherwise: a date crossing the age limit (:func:`age_limit_day`), or a new year for a
    value counted in calendar years (a birth date over the limit released as the year of 90,
    an age whose birth year nears the limit). Each rule that reads the day notes when its
    outcome changes next; a release made today holds until the earliest of them (None: no
    value of it depends on the day).

    Every such day is a 1 January (the age limit counts calendar years:
    :func:`is_year_over_age_limit`), and any other is refused: the day is recorded in clear
    beside the batch (``deid_batches.stable_until``), where a 90th birthday would be a birth
    date."""

    def __init__(self, today: date) -> None:
        self.today = today
        self.until: date | None = None

    def note(self, day: date | None) -> None:
        if day is not None and (day.month, day.day) != (1, 1):
            raise ValueError("a day-horizon is a 1 January")  # the day itself not repeated
        if day is not None and day > self.today and (self.until is None or day < self.until):
            self.until = day

    def take(self) -> date | None:
        """The earliest day noted since the last take, forgotten after."""
        until, self.until = self.until, None
        return until


def earliest(*days: date | None) -> date | None:
    """The earliest of ``days`` that are known (None when none is)."""
    known = [day for day in days if day is not None]
    return min(known, default=None)


def redact_date_partially(value: str, today: date) -> str | None:
    """Keep the year only; nothing at all when the date is over the age limit (its year 90 or
    more years before today's: :func:`is_over_age_limit`)."""
    parts = _parse_partial(value)
    if parts is None or is_over_age_limit(value, today):
        return None
    return f"{parts[0]:04d}"


def redact_zip_partially(value: str, restricted_zip3: frozenset[str]) -> str:
    """ZIP to its first three digits ("12345" → "12300"); restricted three-digit areas (fewer
    than 20,000 people, per HIPAA) become "00000".

    A ZIP of four digits (or a ZIP+4 of four and four) is a five-digit ZIP whose leading zero was
    lost, as spreadsheets drop it (New England, New Jersey, Puerto Rico): it is read with the zero
    put back. Its first three digits were the ZIP's first four: "2139" (02139) gave "2130", and
    "6390" (06390, in the restricted area 063) "6390", which the release's ZIP3 read as 639: beside
    the state (NY has no ZIP3 639), four digits of a ZIP in a restricted area."""
    text = value.strip()
    if _ZIP_WITHOUT_LEADING_ZERO.match(text):
        text = "0" + text
    digits = re.sub(r"\D", "", text)
    if len(digits) < 3:
        return "0" * len(value)
    zip3 = digits[:3]
    if zip3 in restricted_zip3:
        return "0" * 5
    return zip3 + "0" * (min(len(digits), 5) - 3)


def redact_age_partially(value: float) -> bool:
    """Whether an age value may be kept (ages over 89 are redacted)."""
    return value <= AGE_LIMIT


def date_shift_days(key: bytes, scope: str, max_days: int = DEFAULT_DATE_SHIFT_DAYS) -> int:
    """A secret, stable offset in [-max_days, max_days] \\ {0} for one scope (a patient, a
    resource): HMAC-SHA256 of the scope under the date-shift key."""
    if max_days < 1:
        raise ValueError(f"max_days must be at least 1, got {max_days}")
    digest = hmac.digest(key, b"ehr-date-shift/1\x00" + scope.encode(), hashlib.sha256)
    # zero is excluded: a shift of nothing would reveal the date
    draw = int.from_bytes(digest[:8], "big") % (2 * max_days)
    return draw - max_days if draw < max_days else draw - max_days + 1


def shift_date(value: str, days: int) -> str:
    """Shift a date, dateTime or instant by ``days``. Partial dates (year, year-month) carry
    too little to shift and are kept; a time of day is dropped to midnight (as the Microsoft
    anonymizer does), since hours and minutes also identify an event, and so is its zone: the
    shifted date as written is released at midnight UTC. A zone kept beside a shifted date
    tells whether the true date was in summer time (-04:00 or -05:00 in New York), so a
    patient's events around the clock changes gave their secret offset back within days.
    Raises ValueError for a value that is no date, a day that does not exist, or one shifted
    past the calendar's ends (a sentinel such as 9999-12-31 moved forward)."""
    try:
        return _shifted(value, days)
    except OverflowError as exc:
        raise ValueError("shifted past the ends of the calendar") from exc


def _shifted(value: str, days: int) -> str:
    match = _DATETIME.match(value)
    if match is not None:
        year, month, day = int(match.group(1)), int(match.group(2)), int(match.group(3))
        shifted = date(year, month, day) + timedelta(days=days)
        return f"{shifted.isoformat()}T00:00:00Z"
    zoned = re.match(r"^(\d{4}-\d{2}-\d{2})(?:Z|[+-]\d{2}:\d{2})$", value)
    if zoned is not None:  # a date with a zone but no time: the zone means nothing left
        return (date.fromisoformat(zoned.group(1)) + timedelta(days=days)).isoformat()
    match = _DATE.match(value)
    if match is None:
        raise ValueError("not a FHIR date, dateTime or instant")
    if match.group(3) is None:
        return value
    shifted = date(int(match.group(1)), int(match.group(2)), int(match.group(3)))
    return (shifted + timedelta(days=days)).isoformat()


def crypto_hash(value: str, key: bytes) -> str:
    """HMAC-SHA256 of the value, lower-case hex (the Microsoft anonymizer's cryptoHash)."""
    return hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()


def encrypt_value(
    value: str, key: bytes, aad: bytes = b"", random_bytes: RandomBytes = os.urandom
) -> str:
    """AES-256-GCM, base64 of ``nonce || ciphertext || tag``: authenticated, unlike the
    anonymizer's AES-CBC, so a changed value is detected on decryption."""
    if len(key) != 32:
        raise ValueError(f"encrypt key must be 32 bytes, got {len(key)}")
    nonce = random_bytes(12)
    sealed = AESGCM(key).encrypt(nonce, value.encode("utf-8"), b"ehr-field/1|" + aad)
    return base64.b64encode(nonce + sealed).decode()


def decrypt_value(token: str, key: bytes, aad: bytes = b"") -> str:
    """Inverse of :func:`encrypt_value`; raises on any change of the token or the context."""
    raw = base64.b64decode(token, validate=True)
    return AESGCM(key).decrypt(raw[:12], raw[12:], b"ehr-field/1|" + aad).decode("utf-8")


def perturb_number(
    value: float,
    span: float,
    range_type: str,
    round_to: int,
    uniform: Callable[[float, float], float],
) -> float:
    """Add uniform noise: ``fixed`` within ±span/2, ``proportional`` within ±value·span/2."""
    if span < 0:
        raise ValueError("span must not be negative")
    if range_type not in ("fixed", "proportional"):
        raise ValueError(f"rangeType must be 'fixed' or 'proportional', got {range_type!r}")
    half = span / 2 if range_type == "fixed" else abs(value) * span / 2
    noisy = value + uniform(-half, half)
    return round(noisy, round_to) if round_to > 0 else float(round(noisy))


def today_utc(clock: Clock | None = None) -> date:
    """Today's date in UTC, the day the release's age limit and age bands are counted from:
    the server's local date would move them by a day around midnight, and by a year around
    New Year, against the UTC schedule that rebuilds the release each year. ``clock``: by
    default :func:`utcnow`, looked up when called (the one seam every stage's day follows)."""
    return (clock or utcnow)().astimezone(UTC).date()
