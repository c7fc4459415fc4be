"""An encounter part of another encounter of the same patient in the data (``Encounter.partOf``:
an ICU or ward segment of a hospitalisation) is no stay or visit of its own, in the readmission
label and the feature tables alike: a hospitalisation split into an ICU and a ward segment is
one index discharge, at its real end, with no prior stay, and one encounter in the counts. A
sub-encounter whose parent is not in the data, or is another patient's, counts as its own, and
so does a stay filed under an emergency visit (an admission from the emergency department): a
segment is part of an inpatient stay or of an encounter of its own class.

FHIR Encounters go through the shipped ViewDefinitions; the expected labels and feature values
are worked out here in Python from the encounters' classes, periods and parents."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from pipelines.features.refresh import refresh_feature_tables
from pipelines.models.labels import readmission_labels_with_counts
from tests.pipelines.features.crafted import features_from_fhir, value_at

INPATIENT = {"IMP", "ACUTE", "NONAC"}
WINDOW = timedelta(days=30)

# (id, patient, class, start, end, part of), all with times (UTC)
ENCOUNTERS: list[tuple[str, str, str, str, str, str | None]] = [
    # one hospitalisation: the ICU until 04-08 23:30, then the ward from 04-09 00:10
    ("h", "p1", "IMP", "2024-04-01T08:00:00Z", "2024-04-20T12:00:00Z", None),
    ("h-icu", "p1", "IMP", "2024-04-01T08:00:00Z", "2024-04-08T23:30:00Z", "h"),
    ("h-ward", "p1", "IMP", "2024-04-09T00:10:00Z", "2024-04-20T12:00:00Z", "h"),
    # a segment whose hospitalisation is not in the data: the only record of that stay
    ("s1", "p2", "IMP", "2024-05-01T08:00:00Z", "2024-05-05T12:00:00Z", "absent"),
    ("s2", "p2", "IMP", "2024-05-20T08:00:00Z", "2024-05-25T12:00:00Z", None),
    # part of another patient's encounter: not a segment of any stay of p3's
    ("x1", "p3", "ACUTE", "2024-06-01T08:00:00Z", "2024-06-03T12:00:00Z", "h"),
    ("x2", "p3", "AMB", "2024-12-01T08:00:00Z", "2024-12-01T09:00:00Z", None),  # the data's end
    # admitted from the emergency department, each stay filed under its visit: two stays (the
    # second a readmission) and two visits; a consult during the first stay is part of it, and
    # a triage encounter of the second visit part of that visit
    ("er1", "p4", "EMER", "2024-07-01T02:00:00Z", "2024-07-01T09:00:00Z", None),
    ("er1-stay", "p4", "IMP", "2024-07-01T09:00:00Z", "2024-07-06T12:00:00Z", "er1"),
    ("er1-consult", "p4", "AMB", "2024-07-03T10:00:00Z", "2024-07-03T11:00:00Z", "er1-stay"),
    ("er2", "p4", "EMER", "2024-07-20T02:00:00Z", "2024-07-20T06:00:00Z", None),
    ("er2-triage", "p4", "EMER", "2024-07-20T02:00:00Z", "2024-07-20T02:30:00Z", "er2"),
    ("er2-stay", "p4", "ACUTE", "2024-07-20T06:00:00Z", "2024-07-24T12:00:00Z", "er2"),
    # two records of one stay naming each other as parent (a data error): one stay
    ("loop-a", "p5", "IMP", "2024-08-01T08:00:00Z", "2024-08-05T12:00:00Z", "loop-b"),
    ("loop-b", "p5", "IMP", "2024-08-01T08:00:00Z", "2024-08-05T12:00:00Z", "loop-a"),
]


def _encounter(
    eid: str, patient: str, cls: str, start: str, end: str, part_of: str | None
) -> dict[str, Any]:
    encounter: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "class": {"code": cls},
        "subject": {"reference": f"Patient/{patient}"},
        "period": {"start": start, "end": end},
    }
    if part_of is not None:
        encounter["partOf"] = {"reference": f"Encounter/{part_of}"}
    return encounter


def _resources() -> list[dict[str, Any]]:
    patients = sorted({row[1] for row in ENCOUNTERS})
    resources: list[dict[str, Any]] = [{"resourceType": "Patient", "id": p} for p in patients]
    return resources + [_encounter(*row) for row in ENCOUNTERS]


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _own(rows: list[tuple[str, str, str, str, str, str | None]]) -> list[tuple[Any, ...]]:
    """The encounters that are no segment of another of the same patient's encounters in
    ``rows``: one whose parent is an inpatient stay, or of its own class."""
    classes = {(eid, patient): cls for eid, patient, cls, *_ in rows}

    parents = {(eid, patient): part_of for eid, patient, *_, part_of in rows}

    def segment(row: tuple[str, str, str, str, str, str | None]) -> bool:
        parent = classes.get((row[5], row[1])) if row[5] is not None else None
        if parent is None or not (parent in INPATIENT or parent == row[2]):
            return False
        # of two naming each other, the first listed counts (the two are alike here)
        looped = parents.get((row[5], row[1])) == row[0]
        return not looped or rows.index(row) > [r[0] for r in rows].index(row[5])

    return [row for row in rows if not segment(row)]


def _expected_labels(counted: list[tuple[Any, ...]]) -> dict[tuple[str, datetime], int]:
    last = max(_at(t) for *_, s, e, _ in ENCOUNTERS for t in (s, e))
    stays = [row for row in counted if row[2] in INPATIENT]
    expected = {}
    for eid, patient, _, _, end, _ in stays:
        discharge = _at(end)
        if discharge + WINDOW > last:
            continue
        readmitted = any(
            discharge < _at(start) <= discharge + WINDOW
            for other_id, other, _, start, _, _ in stays
            if other == patient and other_id != eid
        )
        # two discharges at one instant are one row, a readmission of either its label
        key = (patient, discharge)
        expected[key] = max(expected.get(key, 0), int(readmitted))
    return expected


def _labels(con: duckdb.DuckDBPyConnection) -> dict[tuple[str, datetime], int]:
    labels, _ = readmission_labels_with_counts(con)
    return {
        (r.patient_id, r.event_timestamp.to_pydatetime()): int(r.label) for r in labels.itertuples()
    }


def test_segments_of_a_stay_in_the_data_are_no_stays_or_visits(tmp_path: Path) -> None:
    con = features_from_fhir(_resources(), tmp_path)
    own = _own(ENCOUNTERS)
    stays_and_visits = {"h", "s1", "s2", "x1", "x2", "er1", "er1-stay", "er2", "er2-stay"}
    assert {row[0] for row in own} == stays_and_visits | {"loop-a"}

    got = _labels(con)
    assert got == _expected_labels(own)
    discharge = _at("2024-04-20T12:00:00Z")
    assert [key for key in got if key[0] == "p1"] == [("p1", discharge)]
    assert got[("p1", discharge)] == 0  # the patient never left hospital before this
    assert got[("p2", _at("2024-05-05T12:00:00Z"))] == 1  # its parent absent: a stay

    for patient, at in got:  # the features at each label's time
        mine = [row for row in own if row[1] == patient]
        before = [r for r in mine if r[2] in INPATIENT and _at(r[4]) < at]
        latest = max(before, key=lambda r: _at(r[4]), default=None)
        started = sum(1 for r in mine if at - WINDOW < _at(r[3]) <= at)
        expect = {
            "prior_inpatient_stays_30d": sum(1 for r in before if at - WINDOW <= _at(r[4])),
            "encounters_30d": started,
            "prior_discharge_at": None if latest is None else _at(latest[4]),
            # calendar days from admission to discharge
            "prior_stay_length_days": None
            if latest is None
            else (_at(latest[4]).date() - _at(latest[3]).date()).days,
        }
        for column, value in expect.items():
            assert value_at(con, "patient_utilisation", column, at, patient) == value, (
                patient,
                column,
            )
    # the stays filed under emergency visits are stays: the first one's discharge an index
    # readmitted 14 days later, the second one's with the first as its prior stay
    assert got[("p4", _at("2024-07-06T12:00:00Z"))] == 1
    second = _at("2024-07-24T12:00:00Z")
    assert value_at(con, "patient_utilisation", "prior_inpatient_stays_30d", second, "p4") == 1
    # the looped pair is one stay: one index discharge, one encounter in the window
    loop_end = _at("2024-08-05T12:00:00Z")
    assert [key for key in got if key[0] == "p5"] == [("p5", loop_end)]
    assert value_at(con, "patient_utilisation", "encounters_30d", loop_end, "p5") == 1
    p1 = ("p1", discharge)
    assert value_at(con, "patient_utilisation", "encounters_30d", p1[1], "p1") == 1
    assert value_at(con, "patient_utilisation", "prior_inpatient_stays_30d", p1[1], "p1") == 0


def test_an_encounter_view_built_before_part_of_counts_every_encounter(tmp_path: Path) -> None:
    """A ``views.encounter`` from before its ``part_of_id`` column: the features refresh and the
    label runs, every encounter counted on its own, as they were read then."""
    con = features_from_fhir(_resources(), tmp_path / "first")
    con.execute("ALTER TABLE views.encounter DROP COLUMN part_of_id")
    refresh = refresh_feature_tables(con, tmp_path / "features")
    assert refresh.build.rows["patient_utilisation"] > 0
    assert _labels(con) == _expected_labels(ENCOUNTERS)
    at = _at("2024-04-20T12:00:00Z")
    assert value_at(con, "patient_utilisation", "prior_inpatient_stays_30d", at, "p1") == 1
