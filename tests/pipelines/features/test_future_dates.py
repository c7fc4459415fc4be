"""A fact dated after everything the release can know (2205 typed for 2025) is no fact yet: it
moves no patient's feature rows and not the label's horizon.

Before, one such Observation of one patient moved the release's data end to 2205, so every
patient's rows ran on to 2205: yearly heartbeats for 180 years, windows emptied, ages capped at 90,
and the online store (which serves each patient's latest row) served those values for everyone;
and no discharge was censored any more. The expectation here is worked out without the platform's
rules: the build with the mistaken facts must equal the build without them, row for row."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pytest
from dagster import AssetKey, materialize

from fhirlake.viewdef import write_view_table
from pipelines.assets.models import readmission_labels
from pipelines.features.cohort import DATE_SPAN, release_known_by
from pipelines.features.tables import FEATURE_TABLES, build_feature_tables_report
from pipelines.models.labels import readmission_labels_with_counts
from pipelines.resources import DeidSettings, WarehouseResource
from pipelines.views.tables import load_views
from tests.pipelines.features.crafted import A, crafted_rows
from tests.pipelines.features.test_assets import FEAST_ASSETS, FEAST_SELECTION, _work, _write_views

P1, P2 = {"reference": "Patient/p1"}, {"reference": "Patient/p2"}
LOINC, RXNORM = "http://loinc.org", "http://www.nlm.nih.gov/research/umls/rxnorm"
# the newest batch arrived on 5 January 2026; the profile shifts dates by up to 50 days
ARRIVED = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)
SHIFT_DAYS = 50
KNOWN_BY = ARRIVED + timedelta(days=SHIFT_DAYS) + DATE_SPAN


def _patient(pid: str, born: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": born}


def _encounter(n: int, subject: dict[str, str], cls: str, start: str, end: str) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": f"e{n}",
        "status": "finished",
        "class": {"code": cls},
        "subject": subject,
        "period": {"start": start, "end": end},
    }


def _hba1c(n: int, subject: dict[str, str], at: str, value: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"o{n}",
        "status": "final",
        "subject": subject,
        "code": {"coding": [{"system": LOINC, "code": "4548-4"}]},
        "valueQuantity": {"value": value, "unit": "%"},
        "effectiveDateTime": at,
    }


BASE = [
    _patient("p1", "1960-05-01"),
    _patient("p2", "1971-08-20"),
    _encounter(1, P1, "AMB", "2025-03-01T08:00:00Z", "2025-03-01T09:00:00Z"),
    _encounter(2, P1, "IMP", "2025-06-01T08:00:00Z", "2025-06-04T12:00:00Z"),
    _encounter(3, P1, "IMP", "2025-06-20T08:00:00Z", "2025-06-22T12:00:00Z"),  # readmitted
    _encounter(4, P2, "IMP", "2025-09-01T08:00:00Z", "2025-09-03T12:00:00Z"),
    # the last thing that happened: 30 days after p2's second stay have not passed by then
    _encounter(5, P2, "IMP", "2025-12-10T08:00:00Z", "2025-12-12T12:00:00Z"),
    _encounter(6, P2, "AMB", "2025-12-28T08:00:00Z", "2025-12-28T09:00:00Z"),
    _hba1c(1, P1, "2025-06-02T09:00:00Z", 7.2),
    _hba1c(2, P2, "2025-09-02T09:00:00Z", 6.4),
]
# facts dated, even at their earliest, after the newest batch arrived and beyond every shift
MISTAKEN = [
    _hba1c(9, P2, "2205-03-01T09:00:00Z", 11.0),
    _encounter(9, P1, "IMP", "2205-01-10", "2205-01-12"),  # dates alone
    {
        "resourceType": "Condition",
        "id": "c9",
        "subject": P1,
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "E11.9"}]},
        "recordedDate": "2099",  # a year alone: its earliest instant is still far beyond
    },
    {
        "resourceType": "MedicationRequest",
        "id": "m9",
        "status": "active",
        "intent": "order",
        "subject": P2,
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "860975"}]},
        "authoredOn": "2126-02-01",
    },
]
MISTAKEN_TIMES = 5  # the Observation, both ends of the stay, the diagnosis, the prescription


def _views(
    resources: list[dict[str, Any]], con: duckdb.DuckDBPyConnection | None = None
) -> duckdb.DuckDBPyConnection:
    con = con or duckdb.connect()
    for view in load_views():
        mine = [r for r in resources if r["resourceType"] == view.resource]
        write_view_table(con, view, mine, f"views.{view.name}")
    return con


def _tables(con: duckdb.DuckDBPyConnection) -> dict[str, pd.DataFrame]:
    """Every feature table, without the build time, in one order."""
    return {
        name: con.execute(f"SELECT * EXCLUDE (created) FROM features.{name} ORDER BY ALL").df()
        for name in FEATURE_TABLES
    }


def _build(
    resources: list[dict[str, Any]], out: Path, known_by: datetime | None
) -> tuple[duckdb.DuckDBPyConnection, int]:
    con = _views(resources)
    build = build_feature_tables_report(con, out, known_by=known_by)
    return con, build.dated_after_arrival


def test_facts_dated_after_arrival_move_no_feature_row(tmp_path: Path) -> None:
    base, _ = _build(BASE, tmp_path / "base", KNOWN_BY)
    mistaken, left_out = _build(BASE + MISTAKEN, tmp_path / "mistaken", KNOWN_BY)
    expected, got = _tables(base), _tables(mistaken)
    for name in FEATURE_TABLES:
        pd.testing.assert_frame_equal(got[name], expected[name], obj=name)
    assert left_out == MISTAKEN_TIMES
    # the latest rows, which the online store serves, stop where the real data stops
    (latest,) = mistaken.execute(
        "SELECT max(event_timestamp) FROM features.patient_utilisation"
    ).fetchone() or (None,)
    assert latest is not None and latest < KNOWN_BY


def test_without_a_bound_the_mistaken_dates_run_every_patient_on(tmp_path: Path) -> None:
    """What the bound prevents, shown on the same data: p1's latest row (what the online store
    serves) in the year of p2's mistaken result, aged 90, with no visit in any window."""
    con, _ = _build(BASE + MISTAKEN, tmp_path / "unbounded", None)
    ((latest, age),) = con.execute(
        "SELECT event_timestamp, age_years FROM features.patient_demographics "
        "WHERE patient_id = (SELECT min(id) FROM views.patient) "
        "ORDER BY event_timestamp DESC LIMIT 1"
    ).fetchall()
    assert latest.year > 2200 and age == 90


def test_a_date_shifted_forward_within_the_range_still_counts(tmp_path: Path) -> None:
    """A visit dated within the date shift after the arrival is a real visit, shifted: it stays
    a fact and the data end moves to it."""
    shifted = ARRIVED + timedelta(days=SHIFT_DAYS - 1)
    visit = _encounter(
        7, P1, "AMB", f"{shifted:%Y-%m-%dT%H:%M:%SZ}", f"{shifted:%Y-%m-%dT%H:%M:%SZ}"
    )
    con, left_out = _build([*BASE, visit], tmp_path / "shifted", KNOWN_BY)
    assert left_out == 0
    ((end,),) = con.execute("SELECT data_end FROM feature_data_end").fetchall()
    assert end == shifted


def test_a_year_alone_of_the_arrival_year_still_counts(tmp_path: Path) -> None:
    """A date known only to its year (Safe Harbor keeps years) stands for the whole year: the
    current year is not in the future, even though its last instant is. It is not left out as
    a fact dated after the arrival; known only from the year's end, it moves the data end no
    further than the release's bound (``release_known_by``)."""
    diagnosis = dict(MISTAKEN[2], id="c8", recordedDate=str(ARRIVED.year))
    con, left_out = _build([*BASE, diagnosis], tmp_path / "year", KNOWN_BY)
    assert left_out == 0
    ((end,),) = con.execute("SELECT data_end FROM feature_data_end").fetchall()
    assert end == KNOWN_BY


def test_facts_dated_after_arrival_move_no_label(tmp_path: Path) -> None:
    base = _views(BASE)
    expected, expected_counts = readmission_labels_with_counts(base, 0, KNOWN_BY)
    # p2's second stay ends 18 days before the last data: its 30 days are not over, censored
    assert expected_counts.censored == 1 and expected_counts.labelled == 3
    mistaken = _views(BASE + MISTAKEN)
    got, counts = readmission_labels_with_counts(mistaken, 0, KNOWN_BY)
    pd.testing.assert_frame_equal(got, expected)
    # the mistaken stay ends far beyond the horizon: censored too, never labelled
    assert counts.censored == expected_counts.censored + 1
    assert counts.labelled == expected_counts.labelled
    # unbounded, the mistaken stay made 2205 the horizon: p2's recent stay was labelled 0
    _, unbounded = readmission_labels_with_counts(mistaken, 0, None)
    assert unbounded.labelled == expected_counts.labelled + 1


def test_the_bound_is_the_newest_arrival_plus_the_shift_and_a_day_span() -> None:
    con = duckdb.connect()
    assert release_known_by(con, SHIFT_DAYS) is None  # views alone: no ledger, no bound
    con.execute("CREATE TABLE batches (batch_id VARCHAR, ingested_at TIMESTAMPTZ)")
    assert release_known_by(con, SHIFT_DAYS) is None  # nothing arrived yet
    con.executemany(
        "INSERT INTO batches VALUES (?, ?)",
        [("a", ARRIVED - timedelta(days=30)), ("b", ARRIVED), ("c", None)],  # c: being ingested
    )
    assert release_known_by(con, SHIFT_DAYS) == ARRIVED + timedelta(days=52)
    assert release_known_by(con, 0) == ARRIVED + timedelta(days=2)
    with pytest.raises(ValueError):
        release_known_by(con, -1)


def _labels_metadata(work: Path, resources: list[dict[str, Any]]) -> dict[str, Any]:
    """The label asset's metadata over views of ``resources`` in a warehouse whose newest batch
    arrived at ``ARRIVED`` (the research profile: dates shifted by up to 50 days)."""
    warehouse = WarehouseResource(workdir=str(work))
    con = warehouse.connect()
    try:
        con.execute(
            "INSERT INTO batches (batch_id, seq, ingested_at) VALUES ('export-1', 1, ?)", [ARRIVED]
        )
        _views(resources, con)
    finally:
        con.close()
    result = materialize(
        [readmission_labels], resources={"warehouse": warehouse, "deid_settings": DeidSettings()}
    )
    assert result.success
    metadata = result.asset_materializations_for_node("readmission_labels")[0].metadata
    return {key: value.value for key, value in metadata.items()}


def test_the_label_asset_bounds_the_horizon_by_the_arrival(tmp_path: Path) -> None:
    expected = _labels_metadata(tmp_path / "base", BASE)
    got = _labels_metadata(tmp_path / "mistaken", BASE + MISTAKEN)
    assert got["rows"] == expected["rows"] and got["positives"] == expected["positives"]
    assert got["excluded_censored"] == expected["excluded_censored"] + 1  # the mistaken stay


@pytest.mark.usefixtures("key_file")
def test_the_feature_asset_leaves_out_what_is_dated_after_the_arrival(
    tmp_path: Path, key_file: Path
) -> None:
    """Through Dagster on a vault whose batch arrived now: a result dated 2205 is counted in
    the metadata and moves no row past today."""
    instance, resources = _work(tmp_path, key_file)
    rows = crafted_rows()
    rows["observation"].append(
        dict(
            rows["observation"][0],
            id="o-2205",
            effective_date_time=datetime(2205, 3, 1, tzinfo=UTC),
        )
    )
    _write_views(tmp_path, rows)
    result = materialize(
        FEAST_ASSETS, selection=FEAST_SELECTION, instance=instance, resources=resources
    )
    assert result.success
    by_key = {
        m.asset_key: m.metadata for m in result.asset_materializations_for_node("feature_tables")
    }
    assert by_key[AssetKey(["features", "patient_labs_vitals"])]["dates_after_arrival"].value == 1
    con = duckdb.connect(str(tmp_path / "work" / "warehouse.duckdb"), read_only=True)
    try:
        ((latest,),) = con.execute(
            "SELECT max(event_timestamp) FROM features.patient_labs_vitals WHERE patient_id = ?",
            [A],
        ).fetchall()
    finally:
        con.close()
    assert latest < datetime.now(UTC)


def test_a_year_alone_of_the_arrival_year_runs_no_patient_past_the_bound(tmp_path: Path) -> None:
    """The same diagnosis under the research profile's shift: known, on the patient's line, only
    from the year's end plus the shift (20 February 2027). It moved the data end there, 13
    months after the arrival, and every patient's rows with it: p1 (born 1 May 1960, 65 at the
    arrival and at the bound) had a latest row, the one the online store serves, aged 66 from
    May 2026, and p2 a yearly repeat in December 2026. No fact of the release can stand for an
    instant after the bound (:func:`release_known_by`)."""
    diagnosis = dict(MISTAKEN[2], id="c8", recordedDate=str(ARRIVED.year))
    con = _views([*BASE, diagnosis])
    build_feature_tables_report(con, tmp_path, known_by=KNOWN_BY, shift_days=SHIFT_DAYS)
    for name in FEATURE_TABLES:
        ((latest,),) = con.execute(f"SELECT max(event_timestamp) FROM features.{name}").fetchall()
        assert latest <= KNOWN_BY, name
    ((age,),) = con.execute(
        "SELECT age_years FROM features.patient_demographics d "
        "JOIN views.patient p ON p.id = d.patient_id WHERE p.birth_date = DATE '1960-05-01' "
        "ORDER BY event_timestamp DESC LIMIT 1"
    ).fetchall()
    assert age == 65
