"""When a fact becomes known to the features. A fact dated without a time of day (a
``recordedDate`` of ``2024-03-15``, an ``authoredOn`` of ``2024-04``) is known only once that
whole period is over, wherever it was written: an entity timestamp inside the day must not see
a diagnosis recorded later that day. A lab result is known once it is issued, not when its
sample was drawn.

FHIR resources go through the shipped ViewDefinitions and the feature SQL; the instants expected
are worked out here with ``datetime`` and ``calendar`` (the last millisecond of the period in the
latest time zone, UTC-12, as FHIRPath's ``highBoundary()`` defines it), and the value at T is read
from the published rows by a lookup written here (the latest row at or before T)."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import duckdb
import pytest

from tests.pipelines.features.crafted import features_from_fhir, value_at

ICD = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LATEST_ZONE = timezone(timedelta(hours=-12))


def _subject() -> dict[str, str]:
    return {"reference": "Patient/p1"}


RESOURCES: list[dict[str, Any]] = [
    {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1960-06-15"},
    {
        "resourceType": "Encounter",
        "id": "e1",
        "status": "finished",
        "class": {"code": "AMB"},
        "subject": _subject(),
        "period": {"start": "2022-03-01T09:00:00Z", "end": "2022-03-01T10:00:00Z"},
    },
    {  # a visit on a day
        "resourceType": "Encounter",
        "id": "e2",
        "status": "finished",
        "class": {"code": "AMB"},
        "subject": _subject(),
        "period": {"start": "2024-07-01", "end": "2024-07-01"},
    },
    {  # diabetes, recorded on a day
        "resourceType": "Condition",
        "id": "c1",
        "subject": _subject(),
        "verificationStatus": {"coding": [{"code": "confirmed"}]},
        "code": {"coding": [{"system": ICD, "code": "E11.9"}]},
        "recordedDate": "2024-03-15",
    },
    {  # heart failure: no recorded date, an onset known to the year only
        "resourceType": "Condition",
        "id": "c2",
        "subject": _subject(),
        "verificationStatus": {"coding": [{"code": "confirmed"}]},
        "code": {"coding": [{"system": ICD, "code": "I50.9"}]},
        "onsetDateTime": "2023",
    },
    {  # HbA1c on a day
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "subject": _subject(),
        "code": {"coding": [{"system": LOINC, "code": "4548-4"}]},
        "valueQuantity": {"value": 7.1, "unit": "%"},
        "effectiveDateTime": "2024-03-15",
    },
    {  # glucose with a time and an offset: known at that instant
        "resourceType": "Observation",
        "id": "o2",
        "status": "final",
        "subject": _subject(),
        "code": {"coding": [{"system": LOINC, "code": "2339-0"}]},
        "valueQuantity": {"value": 98.0, "unit": "mg/dL"},
        "effectiveDateTime": "2024-03-15T10:00:00+05:00",
    },
    {  # creatinine drawn at 10:00, resulted at 18:00: known from 18:00
        "resourceType": "Observation",
        "id": "o3",
        "status": "final",
        "subject": _subject(),
        "code": {"coding": [{"system": LOINC, "code": "2160-0"}]},
        "valueQuantity": {"value": 1.4, "unit": "mg/dL"},
        "effectiveDateTime": "2024-05-02T10:00:00Z",
        "issued": "2024-05-02T18:00:00.000Z",
    },
    {  # metformin, authored in a month
        "resourceType": "MedicationRequest",
        "id": "m1",
        "status": "active",
        "intent": "order",
        "subject": _subject(),
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "860975"}]},
        "authoredOn": "2024-04",
    },
]


def _known_by(value: str) -> datetime:
    """The latest instant a FHIR dateTime can stand for, worked out here."""
    if "T" in value:
        return datetime.fromisoformat(value).astimezone(UTC)
    parts = [int(p) for p in value.split("-")]
    year, month = parts[0], parts[1] if len(parts) > 1 else 12
    day = parts[2] if len(parts) > 2 else calendar.monthrange(year, month)[1]
    return datetime(year, month, day, 23, 59, 59, 999_000, tzinfo=LATEST_ZONE).astimezone(UTC)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> duckdb.DuckDBPyConnection:
    return features_from_fhir(RESOURCES, tmp_path_factory.mktemp("features"))


def test_the_views_give_the_latest_instant_of_each_value(
    built: duckdb.DuckDBPyConnection,
) -> None:
    got = dict(
        built.execute(
            "SELECT id, recorded_date_latest FROM views.condition WHERE id = 'c1' UNION ALL "
            "SELECT id, onset_date_time_latest FROM views.condition WHERE id = 'c2' UNION ALL "
            "SELECT id, effective_date_time_latest FROM views.observation UNION ALL "
            "SELECT id, authored_on_latest FROM views.medication_request"
        ).fetchall()
    )
    expected = {
        "c1": _known_by("2024-03-15"),
        "c2": _known_by("2023"),
        "o1": _known_by("2024-03-15"),
        "o2": _known_by("2024-03-15T10:00:00+05:00"),
        "o3": _known_by("2024-05-02T10:00:00Z"),
        "m1": _known_by("2024-04"),
    }
    assert got == expected
    assert expected["c1"] == datetime(2024, 3, 16, 11, 59, 59, 999_000, tzinfo=UTC)
    # the views' own columns still give the start of the period
    ((recorded,),) = built.execute(
        "SELECT recorded_date FROM views.condition WHERE id = 'c1'"
    ).fetchall()
    assert recorded == datetime(2024, 3, 15, tzinfo=UTC)


def _value_at(con: duckdb.DuckDBPyConnection, table: str, column: str, at: datetime) -> Any:
    return value_at(con, table, column, at, "p1")


MS = timedelta(milliseconds=1)


@pytest.mark.parametrize(
    ("table", "column", "value_text", "before", "after"),
    [
        ("patient_comorbidities", "has_diabetes", "2024-03-15", False, True),
        ("patient_comorbidities", "has_heart_failure", "2023", False, True),
        ("patient_labs_vitals", "hba1c_latest", "2024-03-15", None, 7.1),
        ("patient_labs_vitals", "glucose_latest", "2024-03-15T10:00:00+05:00", None, 98.0),
        ("patient_medications", "on_metformin", "2024-04", False, True),
        ("patient_utilisation", "encounters_30d", "2024-07-01", 0, 1),
    ],
)
def test_a_fact_counts_from_the_end_of_the_period_it_is_dated_to(
    built: duckdb.DuckDBPyConnection,
    table: str,
    column: str,
    value_text: str,
    before: Any,
    after: Any,
) -> None:
    known = _known_by(value_text)
    assert _value_at(built, table, column, known - MS) == before
    assert _value_at(built, table, column, known) == after


def test_an_entity_inside_the_day_does_not_see_what_that_day_recorded(
    built: duckdb.DuckDBPyConnection,
) -> None:
    # a discharge at 10:00 UTC on the day the diagnosis was recorded, at an unknown hour
    at = datetime(2024, 3, 15, 10, tzinfo=UTC)
    assert _value_at(built, "patient_comorbidities", "has_diabetes", at) is False
    assert _value_at(built, "patient_labs_vitals", "hba1c_latest", at) is None
    # the glucose measured at 05:00 UTC that day is known
    assert _value_at(built, "patient_labs_vitals", "glucose_latest", at) == 98.0


def test_a_result_counts_from_when_it_was_issued(built: duckdb.DuckDBPyConnection) -> None:
    """A lab is known once its result is made available (``issued``), not when the sample was
    taken: a discharge between the two must not see it. Its ``measured_at`` stays the sample's
    time."""
    drawn, issued = _known_by("2024-05-02T10:00:00Z"), _known_by("2024-05-02T18:00:00.000Z")
    between = drawn + (issued - drawn) / 2
    assert _value_at(built, "patient_labs_vitals", "creatinine_latest", between) is None
    assert _value_at(built, "patient_labs_vitals", "creatinine_latest", issued - MS) is None
    assert _value_at(built, "patient_labs_vitals", "creatinine_latest", issued) == 1.4
    assert _value_at(built, "patient_labs_vitals", "creatinine_measured_at", issued) == drawn
    assert _value_at(built, "patient_labs_vitals", "creatinine_mean_365d", issued) == 1.4
