"""A diagnosis without a recorded date counts from its onset, whichever form the onset takes.
A Condition dated by ``onsetPeriod`` alone (the onset known to lie within a period) was read as
undated: ``views.condition`` took the onset from ``onsetDateTime`` only, so the heart failure
below never counted and the Charlson index stayed 0 at every T.

The onset now stands for the whole period: the view's ``onset_date_time`` is its start (the
earliest the condition can have begun) and ``onset_date_time_latest`` its end (the latest
instant the onset can stand for, so the diagnosis counts only once the period is over), or its
start when the period has no end. A recorded date still wins over any onset. An ``onsetAge``
gives no date (it needs the birth date, which the release may generalise or cap): such a
diagnosis stays uncounted.

FHIR resources go through the shipped ViewDefinitions and the feature SQL; the instants and the
values at each T are written here."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import duckdb
import pytest

from tests.pipelines.features.crafted import features_from_fhir, value_at

SNOMED = "http://snomed.info/sct"
LATEST_ZONE = timezone(timedelta(hours=-12))
MS = timedelta(milliseconds=1)


def _subject() -> dict[str, str]:
    return {"reference": "Patient/p1"}


def _condition(cid: str, code: str, **dates: Any) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": cid,
        "subject": _subject(),
        "verificationStatus": {"coding": [{"code": "confirmed"}]},
        "code": {"coding": [{"system": SNOMED, "code": code}]},
        **dates,
    }


def _encounter(eid: str, start: str, end: str) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "class": {"code": "AMB"},
        "subject": _subject(),
        "period": {"start": start, "end": end},
    }


RESOURCES: list[dict[str, Any]] = [
    {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1960-06-15"},
    _encounter("e1", "2022-01-10T09:00:00Z", "2022-01-10T10:00:00Z"),
    _encounter("e2", "2025-06-02T09:00:00Z", "2025-06-02T10:00:00Z"),
    # heart failure (Charlson 2): began between 1 February and 15 April 2023
    _condition("c1", "84114007", onsetPeriod={"start": "2023-02-01", "end": "2023-04-15"}),
    # COPD (Charlson 1): began in September 2023, no end given
    _condition("c2", "13645005", onsetPeriod={"start": "2023-09"}),
    # chronic kidney disease (Charlson 1): onset in 2020, recorded in 2024
    _condition(
        "c3",
        "709044004",
        onsetPeriod={"start": "2020-01-01", "end": "2020-06-30"},
        recordedDate="2024-01-10",
    ),
    # diabetes at the age of 50: no date can be given
    _condition("c4", "44054006", onsetAge={"value": 50, "unit": "a", "code": "a"}),
]

# The instants worked out here: a date's last millisecond in the latest time zone (UTC-12)
HF_BEGUN = datetime(2023, 2, 1, tzinfo=UTC)
HF_KNOWN = datetime(2023, 4, 15, 23, 59, 59, 999_000, tzinfo=LATEST_ZONE)
COPD_BEGUN = datetime(2023, 9, 1, tzinfo=UTC)
COPD_KNOWN = datetime(2023, 9, 30, 23, 59, 59, 999_000, tzinfo=LATEST_ZONE)
CKD_KNOWN = datetime(2024, 1, 10, 23, 59, 59, 999_000, tzinfo=LATEST_ZONE)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> duckdb.DuckDBPyConnection:
    return features_from_fhir(RESOURCES, tmp_path_factory.mktemp("features"))


def test_the_view_reads_an_onset_period(built: duckdb.DuckDBPyConnection) -> None:
    rows = built.execute(
        "SELECT id, onset_date_time, onset_date_time_latest FROM views.condition ORDER BY id"
    ).fetchall()
    assert rows == [
        ("c1", HF_BEGUN, HF_KNOWN),
        ("c2", COPD_BEGUN, COPD_KNOWN),
        (
            "c3",
            datetime(2020, 1, 1, tzinfo=UTC),
            datetime(2020, 6, 30, 23, 59, 59, 999_000, tzinfo=LATEST_ZONE),
        ),
        ("c4", None, None),
    ]


def _at(built: duckdb.DuckDBPyConnection, column: str, at: datetime) -> Any:
    return value_at(built, "patient_comorbidities", column, at, "p1")


@pytest.mark.parametrize(
    ("at", "heart_failure", "copd", "ckd", "charlson"),
    [
        (datetime(2022, 6, 1, tzinfo=UTC), False, False, False, 0),
        # the heart failure may have begun, but the period it is dated to is not over
        (datetime(2023, 2, 2, 12, tzinfo=UTC), False, False, False, 0),
        (HF_KNOWN - MS, False, False, False, 0),
        (HF_KNOWN, True, False, False, 2),
        (COPD_KNOWN - MS, True, False, False, 2),
        (COPD_KNOWN, True, True, False, 3),
        # the kidney disease counts from its recorded date, not its 2020 onset
        (CKD_KNOWN - MS, True, True, False, 3),
        (CKD_KNOWN, True, True, True, 4),
        (datetime(2025, 6, 2, 10, tzinfo=UTC), True, True, True, 4),
    ],
)
def test_a_diagnosis_dated_by_an_onset_period_counts_once_the_period_is_over(
    built: duckdb.DuckDBPyConnection,
    at: datetime,
    heart_failure: bool,
    copd: bool,
    ckd: bool,
    charlson: int,
) -> None:
    assert _at(built, "has_heart_failure", at) is heart_failure
    assert _at(built, "has_copd", at) is copd
    assert _at(built, "has_ckd", at) is ckd
    assert _at(built, "charlson_index", at) == charlson


def test_a_diagnosis_dated_by_an_age_alone_never_counts(
    built: duckdb.DuckDBPyConnection,
) -> None:
    for at in (datetime(2022, 6, 1, tzinfo=UTC), datetime(2025, 6, 2, 10, tzinfo=UTC)):
        assert _at(built, "has_diabetes", at) is False
