from __future__ import annotations

import hashlib
import hmac
import time
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import pytest

from deid.methods import (
    crypto_hash,
    date_shift_days,
    decrypt_value,
    encrypt_value,
    perturb_number,
    redact_date_partially,
    redact_zip_partially,
    shift_date,
    today_utc,
)

TODAY = date(2026, 11, 28)
RESTRICTED = frozenset({"036", "059"})


def test_crypto_hash_known_answer() -> None:
    # the Microsoft anonymizer's own output for Patient.id "example" under key "123"
    assert crypto_hash("example", b"123") == (
        "698d54f0494528a759f19c8e87a9f99e75a5881b9267ee3926bcf62c992d84ba"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2000-01-01", "2000"),
        ("2000-01", "2000"),
        ("1937-01-01", "1937"),  # 90 next year: kept as a year
        ("1936-12-31", None),  # 89 today, 90 this year: over the limit since 1 January
        ("1936-11-28", None),  # 90 today: nothing left
        ("1936-01", None),
        ("1936", None),
        ("1930-05-01", None),
        ("2010-03-04T10:00:00Z", "2010"),
    ],
)
def test_partial_date_redaction(value: str, expected: str | None) -> None:
    assert redact_date_partially(value, TODAY) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("12345", "12300"), ("03601", "00000"), ("05901-1234", "00000"), ("98052-6399", "98000")],
)
def test_partial_zip(value: str, expected: str) -> None:
    assert redact_zip_partially(value, RESTRICTED) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2139", "02100"),  # 02139: its first three digits gave 2130, four digits of the ZIP
        ("2139-4307", "02100"),
        ("21394307", "02100"),
        ("3601", "00000"),  # 03601, in the restricted area 036: its first three gave 3600
        ("6390", "06300"),  # 06390: its first three digits gave 6390, the ZIP as written
        (" 5901 ", "00000"),  # 05901, in the restricted area 059
    ],
)
def test_a_zip_without_its_leading_zero_is_read_with_it(value: str, expected: str) -> None:
    """Spreadsheets drop a ZIP's leading zero (New England, New Jersey, Puerto Rico): a ZIP of
    four digits is a five-digit ZIP without it, and its ZIP3 starts with the zero."""
    assert redact_zip_partially(value, RESTRICTED) == expected


def test_date_shift_offsets_are_secret_stable_and_in_range() -> None:
    offsets = {date_shift_days(b"k" * 32, f"patient-{i}") for i in range(2000)}
    assert 0 not in offsets
    assert min(offsets) == -50 and max(offsets) == 50
    assert date_shift_days(b"k" * 32, "p") == date_shift_days(b"k" * 32, "p")
    other_key = [date_shift_days(b"j" * 32, f"patient-{i}") for i in range(50)]
    assert other_key != [date_shift_days(b"k" * 32, f"patient-{i}") for i in range(50)]
    with pytest.raises(ValueError, match="max_days"):
        date_shift_days(b"k", "p", 0)


def test_date_shift_known_answers() -> None:
    """The offset is the first 8 bytes of HMAC-SHA256(key, tag NUL scope), big-endian, modulo
    2 x max, laid over -max..-1 then 1..max. It must not move between versions: a patient's
    dates released again under another offset would tell how far the two shifts are apart."""
    key = b"k" * 32
    for scope, max_days, expected in [
        ("patient:p", 50, 39),  # draw 88: 88 - 50 + 1
        ("patient:q", 50, -50),  # draw 0: the lowest offset
        ("Observation/o", 50, -41),  # draw 9: 9 - 50
        ("patient:p", 3, -1),  # draw 2: the highest below zero
        ("patient:q", 3, 2),  # draw 4: 4 - 3 + 1, zero passed over
    ]:
        message = b"ehr-date-shift/1\x00" + scope.encode()
        draw = int.from_bytes(hmac.digest(key, message, hashlib.sha256)[:8], "big")
        draw %= 2 * max_days
        assert (draw - max_days if draw < max_days else draw - max_days + 1) == expected
        assert date_shift_days(key, scope, max_days) == expected


@pytest.mark.parametrize(
    ("value", "days", "expected"),
    [
        ("2000-01-01", 41, "2000-02-11"),
        ("2000-01-01T01:01:01-01:00", 41, "2000-02-11T00:00:00Z"),  # the zone dropped too
        ("2016-02-29T23:59:59.123Z", -1, "2016-02-28T00:00:00Z"),
        ("2002", 10, "2002"),
        ("2002-07", 10, "2002-07"),
    ],
)
def test_shift_date(value: str, days: int, expected: str) -> None:
    assert shift_date(value, days) == expected


def test_shift_date_rejects_non_dates() -> None:
    with pytest.raises(ValueError, match="not a FHIR date"):
        shift_date("yesterday", 3)


@pytest.mark.parametrize(
    ("value", "days"),
    [("9999-12-31", 30), ("9999-12-31T10:00:00Z", 1), ("0001-01-01", -30)],
)
def test_a_date_shifted_past_the_calendar_is_a_value_error(value: str, days: int) -> None:
    """Sentinels moved past the calendar's ends raise what every caller handles (a value
    withheld), not the OverflowError the date arithmetic raises."""
    with pytest.raises(ValueError, match="ends of the calendar"):
        shift_date(value, days)


def test_a_rules_policy_removes_a_sentinel_date_it_cannot_shift() -> None:
    """A policy of the Microsoft anonymizer's rules alone (no release profile) shifting
    ``9999-12-31`` forward failed the whole batch with an OverflowError; the value is
    removed, redacted, as the release profile withholds it."""
    from deid.engine import Deidentifier, DeidSecrets
    from deid.policy import Policy

    removed = 0
    for seed in range(8):  # offsets both ways: some move the sentinel forward
        config = {
            "fhirPathRules": [{"path": "nodesByType('date')", "method": "dateshift"}],
            "parameters": {"dateShiftKey": f"key-{seed}", "dateShiftRange": 50},
        }
        policy = Policy.from_dict(config)
        engine = Deidentifier(policy, DeidSecrets.derive(bytes([seed]) * 32, policy))
        patient = {"resourceType": "Patient", "id": "p1", "birthDate": "9999-12-31"}
        released = engine.apply(patient, patient_scope="p1").resource
        if "birthDate" in released:
            assert "9999-11-10" <= released["birthDate"] < "9999-12-31"
        else:
            removed += 1
            codes = {label["code"] for label in released["meta"]["security"]}
            assert "REDACTED" in codes
    assert 0 < removed < 8


def test_encrypt_is_authenticated() -> None:
    key = bytes(range(32))
    token = encrypt_value("MRN-778812", key, aad=b"Patient/1", random_bytes=lambda n: b"\0" * n)
    assert "MRN" not in token
    assert decrypt_value(token, key, aad=b"Patient/1") == "MRN-778812"
    with pytest.raises(Exception):
        decrypt_value(token, key, aad=b"Patient/2")
    tampered = token[:-4] + ("AAAA" if token[-4:] != "AAAA" else "BBBB")
    with pytest.raises(Exception):
        decrypt_value(tampered, key, aad=b"Patient/1")


def test_perturb_stays_in_span() -> None:
    assert perturb_number(100.0, 10.0, "fixed", 0, lambda lo, hi: hi) == 105.0
    assert perturb_number(100.0, 0.1, "proportional", 1, lambda lo, hi: lo) == 95.0
    with pytest.raises(ValueError, match="rangeType"):
        perturb_number(1.0, 1.0, "bogus", 0, lambda lo, hi: 0.0)


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (datetime(2026, 12, 31, 20, 0, tzinfo=ZoneInfo("America/New_York")), date(2027, 1, 1)),
        (datetime(2027, 1, 1, 9, 0, tzinfo=ZoneInfo("Pacific/Kiritimati")), date(2026, 12, 31)),
        (datetime(2026, 6, 1, 12, 0, tzinfo=UTC), date(2026, 6, 1)),
    ],
)
def test_today_is_the_utc_date(now: datetime, expected: date) -> None:
    assert today_utc(lambda: now) == expected


def test_today_does_not_follow_the_local_time_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two servers 26 hours apart in local time are never on the same local date; the day the
    age limit is counted from must be the same on both."""
    days = []
    try:
        for zone in ("Etc/GMT-14", "Etc/GMT+12"):  # UTC+14 and UTC-12 (POSIX signs)
            monkeypatch.setenv("TZ", zone)
            time.tzset()
            days.append((today_utc(), datetime.now(UTC).date()))
    finally:
        monkeypatch.undo()
        time.tzset()
    # computed apart: the UTC date at each call (a call pair straddling midnight UTC aside)
    assert [d for d, _ in days] == [utc for _, utc in days]
    assert days[0][0] == days[1][0] or days[0][1] != days[1][1]
