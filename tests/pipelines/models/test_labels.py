from __future__ import annotations

import duckdb
import pandas as pd

from pipelines.models.labels import readmission_labels, readmission_labels_with_counts

from .crafted import crafted_views


def _by_key(labels: pd.DataFrame) -> dict[tuple[str, str], int]:
    return {
        (row.patient_id, row.event_timestamp.strftime("%Y-%m-%d")): int(row.label)
        for row in labels.itertuples()
    }


def test_labels_on_crafted_views() -> None:
    con = duckdb.connect()
    crafted_views(con)
    labels = readmission_labels(con)
    assert list(labels.columns) == ["patient_id", "event_timestamp", "label"]
    assert _by_key(labels) == {
        ("readmit", "2024-01-10"): 1,
        ("readmit", "2024-02-05"): 0,
        ("noreadmit", "2024-03-04"): 0,
        ("noreadmit", "2024-05-06"): 0,
        ("boundary_in", "2024-04-02"): 1,
        ("boundary_in", "2024-05-03"): 0,
        ("boundary_out", "2024-04-02"): 0,
        ("boundary_out", "2024-05-04"): 0,
        ("inactive_optout", "2024-06-03"): 0,
    }
    assert str(labels["event_timestamp"].dt.tz) == "UTC"


def test_exclusions_are_counted() -> None:
    con = duckdb.connect()
    crafted_views(con)
    labels, counts = readmission_labels_with_counts(con)
    assert counts.discharges == 13
    assert (counts.censored, counts.died, counts.opted_out) == (1, 1, 2)
    assert counts.labelled == len(labels) == 9
    assert counts.positives == 2
    excluded = {"optout", "optout_rule", "died", "censored", "inpatient_now"}
    assert not excluded & set(labels["patient_id"])


def test_death_recorded_on_patient_excludes_that_stay() -> None:
    con = duckdb.connect()
    crafted_views(con, with_patient=True)
    labels, counts = readmission_labels_with_counts(con)
    keys = _by_key(labels)
    assert ("noreadmit", "2024-05-06") not in keys
    assert keys[("noreadmit", "2024-03-04")] == 0
    assert counts.died == 2


def test_same_day_discharges_collapse_to_one_row() -> None:
    con = duckdb.connect()
    crafted_views(con)
    con.execute(
        "INSERT INTO views.encounter VALUES ('x1', 'twice', 'finished', 'IMP', NULL, NULL, NULL,"
        " '2024-07-01', '2024-07-05', 'home'), ('x2', 'twice', 'finished', 'IMP', NULL,"
        " NULL, NULL, '2024-07-04', '2024-07-05', 'home'), ('x3', 'twice', 'finished',"
        " 'IMP', NULL, NULL, NULL, '2024-07-20', '2024-07-22', 'home')"
    )
    labels = readmission_labels(con)
    twice = labels[labels["patient_id"] == "twice"]
    assert len(twice) == 2
    assert twice["label"].tolist() == [1, 0]


def test_censor_margin_moves_the_cut_earlier() -> None:
    con = duckdb.connect()
    crafted_views(con)
    labels, counts = readmission_labels_with_counts(con, censor_margin_days=190)
    # last data 2024-12-31: discharges after 2024-05-25 (31 Dec - 190 days - 30 days) drop out
    assert counts.censored == 3
    assert ("inactive_optout", "2024-06-03") not in _by_key(labels)
    assert ("boundary_out", "2024-05-04") in _by_key(labels)
