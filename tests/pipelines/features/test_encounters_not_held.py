"""An encounter that did not take place (planned, cancelled, entered in error) is no visit, no
stay, no readmission and no data time, in the feature tables and the readmission label alike:
a planned appointment next month must not count in a window, make a readmission, or move the
data's end (and with it the label's follow-up horizon and the rows written) into the future. Nor
may a refuted diagnosis, a lab entered in error or a cancelled prescription, which no feature
counts, move the data end; and a medication only proposed is no prescription.

FHIR Encounters go through the shipped ViewDefinitions; the expected counts and labels are
worked out here in Python from the resources' own statuses and periods."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import pytest

from pipelines.models.labels import readmission_labels_with_counts
from tests.pipelines.features.crafted import features_from_fhir, value_at

NOT_HELD = {"planned", "cancelled", "entered-in-error"}


def _encounter(n: int, status: str, cls: str, start: str, end: str) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": f"e{n}",
        "status": status,
        "class": {"code": cls},
        "subject": {"reference": "Patient/p1"},
        "period": {"start": f"{start}T08:00:00Z", "end": f"{end}T16:00:00Z"},
    }


ENCOUNTERS = [
    _encounter(1, "finished", "AMB", "2024-01-10", "2024-01-10"),
    _encounter(2, "finished", "IMP", "2024-02-01", "2024-02-05"),  # the index stay
    _encounter(3, "entered-in-error", "EMER", "2024-02-10", "2024-02-10"),
    _encounter(4, "cancelled", "IMP", "2024-02-20", "2024-02-22"),  # not a readmission
    _encounter(5, "planned", "IMP", "2024-03-01", "2024-03-03"),  # never began
    _encounter(6, "finished", "AMB", "2024-06-01", "2024-06-01"),  # the last thing that happened
    _encounter(7, "planned", "AMB", "2024-12-01", "2024-12-01"),  # an appointment to come
    _encounter(8, "unknown", "AMB", "2024-04-01", "2024-04-01"),  # unknown: it may have
]
SUBJECT = {"reference": "Patient/p1"}
# facts that do not count, dated (by mistake) after everything that happened: none of them may
# move the data end either
NOT_COUNTED: list[dict[str, Any]] = [
    {
        "resourceType": "Condition",
        "id": "c1",
        "subject": SUBJECT,
        "verificationStatus": {"coding": [{"code": "refuted"}]},
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "E11.9"}]},
        "recordedDate": "2099-01-01T00:00:00Z",
    },
    {
        "resourceType": "Observation",
        "id": "o1",
        "status": "entered-in-error",
        "subject": SUBJECT,
        "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
        "valueQuantity": {"value": 7.1, "unit": "%"},
        "effectiveDateTime": "2099-01-01T00:00:00Z",
    },
    {
        "resourceType": "MedicationRequest",
        "id": "m1",
        "status": "cancelled",
        "intent": "order",
        "subject": SUBJECT,
        "medicationCodeableConcept": {
            "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "860975"}]
        },
        "authoredOn": "2099-01-01T00:00:00Z",
    },
]
# metformin proposed on 1 March (a suggestion, no order): never taken, never counted
PROPOSAL: dict[str, Any] = {
    "resourceType": "MedicationRequest",
    "id": "m2",
    "status": "active",
    "intent": "proposal",
    "subject": SUBJECT,
    "medicationCodeableConcept": {
        "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "860975"}]
    },
    "authoredOn": "2024-03-01T09:00:00Z",
}
RESOURCES: list[dict[str, Any]] = [
    {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1960-06-15"},
    *ENCOUNTERS,
    *NOT_COUNTED,
    PROPOSAL,
]


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


HELD = [e for e in ENCOUNTERS if e["status"] not in NOT_HELD]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> duckdb.DuckDBPyConnection:
    return features_from_fhir(RESOURCES, tmp_path_factory.mktemp("features"))


def _value_at(con: duckdb.DuckDBPyConnection, column: str, at: datetime) -> Any:
    return value_at(con, "patient_utilisation", column, at, "p1")


def _started_within(days: int, at: datetime, cls: str | None = None) -> int:
    return sum(
        1
        for e in HELD
        if at - timedelta(days=days) < _instant(e["period"]["start"]) <= at
        and (cls is None or e["class"]["code"] == cls)
    )


@pytest.mark.parametrize("at", ["2024-02-15T00:00:00Z", "2024-03-05T00:00:00Z"])
def test_windows_count_only_encounters_that_took_place(
    built: duckdb.DuckDBPyConnection, at: str
) -> None:
    moment = _instant(at)
    assert _value_at(built, "encounters_30d", moment) == _started_within(30, moment)
    assert _value_at(built, "emergency_visits_30d", moment) == _started_within(30, moment, "EMER")
    stays = sum(
        1
        for e in HELD
        if e["class"]["code"] == "IMP"
        and moment - timedelta(days=365) <= _instant(e["period"]["end"]) < moment
    )
    assert _value_at(built, "prior_inpatient_stays_365d", moment) == stays == 1


def test_no_row_after_the_last_encounter_that_took_place(built: duckdb.DuckDBPyConnection) -> None:
    last = max(_instant(e["period"]["end"]) for e in HELD)
    tables = [
        name
        for (name,) in built.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'features'"
        ).fetchall()
    ]
    assert len(tables) == 5
    for table in tables:
        ((latest,),) = built.execute(
            f"SELECT max(event_timestamp) FROM features.{table}"
        ).fetchall()
        assert latest is None or latest <= last, table  # no rows: nothing after it


def test_the_label_ignores_what_did_not_take_place(built: duckdb.DuckDBPyConnection) -> None:
    labels, counts = readmission_labels_with_counts(built)
    discharge = _instant(ENCOUNTERS[1]["period"]["end"])
    window = (discharge, discharge + timedelta(days=30))
    readmitted = any(
        e["class"]["code"] == "IMP" and window[0] < _instant(e["period"]["start"]) <= window[1]
        for e in HELD
    )
    assert counts.discharges == sum(1 for e in HELD if e["class"]["code"] == "IMP") == 1
    assert [(row.event_timestamp, row.label) for row in labels.itertuples()] == [
        (discharge, int(readmitted))
    ]
    assert readmitted is False  # the planned admission on 1 March is not a readmission


def test_a_proposed_medication_is_not_a_prescription(built: duckdb.DuckDBPyConnection) -> None:
    after = _instant(PROPOSAL["authoredOn"]) + timedelta(days=1)
    for column in ("on_metformin", "active_medication_count", "medications_180d"):
        value = value_at(built, "patient_medications", column, after, "p1")
        assert value in (False, 0), column


def test_a_stay_with_an_end_and_no_start_is_a_prior_stay(tmp_path: Any) -> None:
    """A stay whose start nobody recorded is an index discharge for the label; the features at
    the next discharge must count it as the prior stay too (worked out here: discharged 15 days
    before, so one stay in 30 days, discharged at its end, no length known)."""
    resources: list[dict[str, Any]] = [
        {"resourceType": "Patient", "id": "p1"},
        {
            "resourceType": "Encounter",
            "id": "s1",
            "status": "finished",
            "class": {"code": "IMP"},
            "subject": SUBJECT,
            "period": {"end": "2024-03-10T12:00:00Z"},
        },
        {
            "resourceType": "Encounter",
            "id": "s2",
            "status": "finished",
            "class": {"code": "IMP"},
            "subject": SUBJECT,
            "period": {"start": "2024-03-20T08:00:00Z", "end": "2024-03-25T12:00:00Z"},
        },
        _encounter(9, "finished", "AMB", "2024-09-01", "2024-09-01"),  # follow-up to here
    ]
    con = features_from_fhir(resources, tmp_path)
    first_end, second_start = _instant("2024-03-10T12:00:00Z"), _instant("2024-03-20T08:00:00Z")
    second_end = _instant("2024-03-25T12:00:00Z")
    labels, _ = readmission_labels_with_counts(con)
    label_of = {row.event_timestamp: row.label for row in labels.itertuples()}
    assert label_of[first_end] == int(first_end < second_start <= first_end + timedelta(days=30))
    assert _value_at(con, "prior_inpatient_stays_30d", second_end) == 1
    assert _value_at(con, "prior_discharge_at", second_end) == first_end
    assert _value_at(con, "prior_stay_length_days", second_end) is None
    # the stay without a start counts in no window of starts
    assert _value_at(con, "encounters_30d", second_start) == 1
