from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

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


def test_a_patient_absent_from_the_patient_view_has_no_label() -> None:
    """A patient the release holds no Patient for (withheld, or their encounters came without
    their Patient resource: in no k-anonymity group) is in no feature table; their discharges
    gave training rows all the same, with every feature null, and the model was fitted to them."""
    con = duckdb.connect()
    crafted_views(con, with_patient=True)
    assert "readmit" in set(readmission_labels(con)["patient_id"])
    con.execute("DELETE FROM views.patient WHERE id = 'readmit'")
    labels = readmission_labels(con)
    assert "readmit" not in set(labels["patient_id"])
    assert "noreadmit" in set(labels["patient_id"])


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


def _inpatient(n: int, patient: str, start: str, end: str) -> dict[str, object]:
    return {
        "resourceType": "Encounter",
        "id": f"i{n}",
        "status": "finished",
        "class": {"code": "IMP"},
        "subject": {"reference": f"Patient/{patient}"},
        "period": {"start": start, "end": end},
    }


def _stays_in_views(
    rows: list[tuple[int, str, str, str]], tmp_path: Path
) -> duckdb.DuckDBPyConnection:
    """The views and feature tables of the patients of ``rows`` and their inpatient stays."""
    from tests.pipelines.features.crafted import features_from_fhir

    patients = sorted({p for _, p, _, _ in rows})
    resources = [{"resourceType": "Patient", "id": p} for p in patients]
    resources += [_inpatient(*row) for row in rows]
    return features_from_fhir(resources, tmp_path)


# (id, patient, start, end): the data end 30 days after p1's discharge, to the second
AT_THE_DATA_END = [
    (1, "p1", "2024-05-28T10:00:00Z", "2024-06-01T10:00:00Z"),
    (2, "p2", "2024-05-28T10:00:00Z", "2024-06-01T10:00:01Z"),  # a second later
    (3, "p3", "2024-06-28T10:00:00Z", "2024-07-01T10:00:00Z"),  # the data's end
]


def test_a_window_ending_at_the_data_end_is_labelled_and_one_a_second_later_is_censored(
    tmp_path: Path,
) -> None:
    """Worked out here: 1 June 10:00 plus 30 days is 1 July 10:00, the last instant in the
    data, so p1's window is seen whole (label 0); p2's ends a second after the data does, and
    p3's stay ends the data: both censored."""
    con = _stays_in_views(AT_THE_DATA_END, tmp_path)
    labels, counts = readmission_labels_with_counts(con)
    discharge = datetime(2024, 6, 1, 10, tzinfo=UTC)
    assert discharge + timedelta(days=30) == datetime(2024, 7, 1, 10, tzinfo=UTC)
    got = {
        (r.patient_id, r.event_timestamp.to_pydatetime()): int(r.label) for r in labels.itertuples()
    }
    assert got == {("p1", discharge): 0}
    assert counts.censored == 2


# (id, patient, start, end) as exported: times, dates, months
DATED = [
    (1, "p1", "2024-02-01T08:00:00Z", "2024-02-05T16:00:00Z"),
    (2, "p1", "2024-03", "2024-03"),  # may have begun 1-6 March: inside p1's window, or not
    (3, "p2", "2024-05-10", "2024-05-12"),  # dates: known to the day
    (4, "p2", "2024-05-20", "2024-05-22"),  # a readmission of 3
    (5, "p3", "2024-01-01T08:00:00Z", "2024-01-03T08:00:00Z"),
    (6, "p3", "2024-06", "2024-06"),  # months after 5's window: 5 is a 0
    (7, "p4", "2024-11-01T08:00:00Z", "2024-12-31T08:00:00Z"),  # the data's end
]


def test_a_discharge_or_readmission_dated_only_to_a_month_has_no_label(tmp_path: Path) -> None:
    """Worked out here: a bound is known to the day when it has a time or a full date; a
    discharge known to the day gets a label when no admission dated only to a month may have
    started in its window, unless one known to the day did."""
    con = _stays_in_views(DATED, tmp_path)
    labels, counts = readmission_labels_with_counts(con)

    def to_the_day(text: str) -> bool:
        return len(text) >= 10

    def bounds(text: str) -> tuple[datetime, datetime]:  # earliest and latest instant
        if "T" in text:
            at = datetime.fromisoformat(text)
            return at, at
        parts = [int(p) for p in text.split("-")]
        first = datetime(parts[0], parts[1], parts[2] if len(parts) > 2 else 1, tzinfo=UTC)
        days = 1 if len(parts) > 2 else calendar.monthrange(parts[0], parts[1])[1]
        return first, first + timedelta(days=days, hours=12) - timedelta(milliseconds=1)

    expected = {}
    for n, patient, _, end in DATED:
        if not to_the_day(end) or n == 7:  # 7 ends the data: censored
            continue
        discharge, labelled_at = bounds(end)  # labelled at the latest instant it stands for
        window_end = discharge + timedelta(days=30)
        others = [r for r in DATED if r[1] == patient and r[0] != n]
        known = any(
            to_the_day(s) and discharge < bounds(s)[0] <= window_end and labelled_at < bounds(s)[1]
            for _, _, s, _ in others
        )
        maybe = any(
            not to_the_day(s) and bounds(s)[1] > discharge and bounds(s)[0] <= window_end
            for _, _, s, _ in others
        )
        if known or not maybe:
            expected[(patient, labelled_at)] = int(known)
    got = {(r.patient_id, r.event_timestamp): int(r.label) for r in labels.itertuples()}
    assert got == expected
    assert got == {
        # a date is labelled at the end of its day in the latest zone (UTC-12)
        ("p2", datetime(2024, 5, 13, 11, 59, 59, 999000, tzinfo=UTC)): 1,
        ("p2", datetime(2024, 5, 23, 11, 59, 59, 999000, tzinfo=UTC)): 0,
        ("p3", datetime(2024, 1, 3, 8, tzinfo=UTC)): 0,
    }
    # dropped for their dates: p1's first stay (an admission of March may follow it) and the
    # two stays whose own end is known to the month only; p4's stay ends the data (censored)
    assert counts.imprecise == 3 and counts.censored == 1


def test_an_encounter_view_from_before_the_latest_columns_reads_as_dated_to_the_instant() -> None:
    """A ``views.encounter`` built before its ``period_*_latest`` columns existed: every bound
    is read as known to the instant, so the labels are those of the same rows with them."""
    con = duckdb.connect()
    crafted_views(con)
    with_columns = readmission_labels_with_counts(con)
    con.execute("ALTER TABLE views.encounter DROP COLUMN period_start_latest")
    con.execute("ALTER TABLE views.encounter DROP COLUMN period_end_latest")
    without = readmission_labels_with_counts(con)
    pd.testing.assert_frame_equal(without[0], with_columns[0])
    assert without[1] == with_columns[1] and without[1].imprecise == 0


def test_the_labels_do_not_depend_on_the_session_time_zone(tmp_path: Path) -> None:
    """Worked out here in UTC: a readmission 30 days and 30 minutes after a discharge (across
    the November daylight-saving change in New York) is outside the window; a death three
    hours after a discharge, on the next UTC date, keeps the stay with label 0."""
    from tests.pipelines.features.crafted import features_from_fhir

    stays = [
        (1, "p1", "2024-10-10T10:00:00Z", "2024-10-15T14:00:00Z"),
        (2, "p1", "2024-11-14T14:30:00Z", "2024-11-16T10:00:00Z"),
        (3, "p2", "2024-05-28T10:00:00Z", "2024-06-01T23:00:00Z"),
        (4, "p3", "2025-06-01T10:00:00Z", "2025-06-03T10:00:00Z"),  # the data's end
    ]
    resources: list[dict[str, object]] = [
        {"resourceType": "Patient", "id": "p1"},
        {"resourceType": "Patient", "id": "p2", "deceasedDateTime": "2024-06-02T02:00:00Z"},
        {"resourceType": "Patient", "id": "p3"},
    ]
    resources += [_inpatient(*row) for row in stays]

    def at(text: str) -> datetime:
        return datetime.fromisoformat(text)

    first_end, second_start = at(stays[0][3]), at(stays[1][2])
    assert second_start - first_end > timedelta(days=30)  # the hand count: outside the window
    expected = {("p1", first_end): 0, ("p1", at(stays[1][3])): 0, ("p2", at(stays[2][3])): 0}
    con = features_from_fhir(resources, tmp_path)
    for zone in ("America/New_York", "Asia/Tokyo", "UTC"):
        con.execute(f"SET TimeZone = '{zone}'")
        labels, counts = readmission_labels_with_counts(con)
        got = {
            (r.patient_id, r.event_timestamp.to_pydatetime()): int(r.label)
            for r in labels.itertuples()
        }
        assert got == expected, zone
        assert counts.died == 0, zone


def test_the_features_at_a_discharge_dated_to_its_day_know_the_stay(tmp_path: Path) -> None:
    """A first stay dated 9 to 10 March (dates, no times), with an HbA1c of 9 March: at the
    label's time the features know the stay, the patient's age and the HbA1c (worked out here:
    the label is at the end of 10 March in the latest zone, every fact of those days is
    known by then). An admission the features see at that time is not the readmission."""
    from tests.pipelines.features.crafted import features_from_fhir, value_at

    resources: list[dict[str, object]] = [
        {"resourceType": "Patient", "id": "p1", "birthDate": "1960-06-15"},
        _inpatient(1, "p1", "2024-03-09", "2024-03-10"),
        # a timed admission early on 11 March UTC: still 10 March somewhere
        _inpatient(2, "p1", "2024-03-11T08:00:00Z", "2024-03-12T08:00:00Z"),
        {
            "resourceType": "Observation",
            "id": "o1",
            "status": "final",
            "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
            "valueQuantity": {"value": 8.0},
            "effectiveDateTime": "2024-03-09",
        },
        _inpatient(3, "p1", "2024-09-01T08:00:00Z", "2024-09-02T08:00:00Z"),  # data to here
    ]
    con = features_from_fhir(resources, tmp_path)
    labels, _ = readmission_labels_with_counts(con)
    end_of_day = datetime(2024, 3, 11, 11, 59, 59, 999000, tzinfo=UTC)  # 10 March, UTC-12
    first = labels[labels["patient_id"] == "p1"].iloc[0]
    assert first.event_timestamp.to_pydatetime() == end_of_day
    at = end_of_day
    age = 2024 - 1960 - ((3, 10) < (6, 15))
    assert value_at(con, "patient_demographics", "age_years", at, "p1") == age == 63
    assert value_at(con, "patient_utilisation", "encounters_30d", at, "p1") == 2
    assert value_at(con, "patient_labs_vitals", "hba1c_latest", at, "p1") == 8.0
    # the 08:00Z admission is before the label's time: a feature there, so not the outcome
    assert first.label == 0


# (id, patient, start, end): dates and times, as exported
NEXT_DAY = [
    (1, "p1", "2024-05-01", "2024-05-05"),
    (2, "p1", "2024-05-06", "2024-05-10"),  # the next day: a readmission of 1
    (3, "p2", "2024-06-01", "2024-06-05"),
    (4, "p2", "2024-06-05", "2024-06-08"),  # the same day: a transfer, not a readmission
    (5, "p3", "2024-07-01", "2024-07-03"),
    (6, "p3", "2024-07-04T08:00:00Z", "2024-07-06T08:00:00Z"),  # still 3 July west of UTC
    (7, "p4", "2024-08-01T08:00:00Z", "2024-08-03T10:00:00Z"),
    (8, "p4", "2024-08-03", "2024-08-05"),  # the discharge's day
    (9, "p5", "2024-08-01T08:00:00Z", "2024-08-03T10:00:00Z"),
    (10, "p5", "2024-08-04", "2024-08-05"),  # the next day
    (11, "p6", "2024-11-01T08:00:00Z", "2024-12-31T08:00:00Z"),  # the data's end
]


def test_an_admission_the_day_after_a_discharge_dated_to_its_day_is_a_readmission(
    tmp_path: Path,
) -> None:
    """Worked out here by calendar days: an admission dated to a day after the discharge's day
    is a readmission; one on the discharge's day is a transfer; a timed admission counts once
    the discharge's day has ended in every zone (12:00Z the next day), before which the features
    already see it at the label's time."""
    con = _stays_in_views(NEXT_DAY, tmp_path)
    labels, _ = readmission_labels_with_counts(con)

    def day(text: str) -> datetime:
        return datetime.fromisoformat(text[:10]).replace(tzinfo=UTC)

    def readmission(discharge: str, admission: str) -> bool:
        if "T" in admission and "T" in discharge:
            gap = datetime.fromisoformat(admission) - datetime.fromisoformat(discharge)
        elif "T" in admission:  # after the discharge's day has ended everywhere
            gap = datetime.fromisoformat(admission) - (day(discharge) + timedelta(hours=36))
        else:  # days only: a later day
            gap = day(admission) - day(discharge)
        return gap > timedelta(0) and day(admission) <= day(discharge) + timedelta(days=30)

    def labelled_at(end: str) -> datetime:
        if "T" in end:
            return datetime.fromisoformat(end)
        return day(end) + timedelta(hours=36) - timedelta(milliseconds=1)

    expected = {
        (patient, labelled_at(end)): int(
            any(readmission(end, s) for m, p, s, _ in NEXT_DAY if p == patient and m != n)
        )
        for n, patient, _, end in NEXT_DAY
        if n != 11  # censored
    }
    got = {
        (r.patient_id, r.event_timestamp.to_pydatetime()): int(r.label) for r in labels.itertuples()
    }
    assert got == expected
    assert got[("p1", datetime(2024, 5, 6, 11, 59, 59, 999000, tzinfo=UTC))] == 1
    assert got[("p2", datetime(2024, 6, 6, 11, 59, 59, 999000, tzinfo=UTC))] == 0
    assert got[("p5", datetime(2024, 8, 3, 10, tzinfo=UTC))] == 1


# (id, patient, start, end, discharge disposition), times in UTC
TRANSFERS = [
    # discharged to another hospital at 23:50, admitted there at 00:20: one episode
    (1, "p1", "2024-03-01T08:00:00Z", "2024-03-05T23:50:00Z", "other-hcf"),
    (2, "p1", "2024-03-06T00:20:00Z", "2024-03-10T12:00:00Z", "home"),
    # a same-day transfer (UB-04 02), then a readmission of the episode 12 days after its end
    (3, "p2", "2024-04-01T08:00:00Z", "2024-04-04T10:00:00Z", "02"),
    (4, "p2", "2024-04-04T15:00:00Z", "2024-04-08T10:00:00Z", "home"),
    (5, "p2", "2024-04-20T08:00:00Z", "2024-04-22T10:00:00Z", "home"),
    # a transfer disposition, but the next admission two days later: a readmission
    (6, "p3", "2024-05-01T08:00:00Z", "2024-05-03T10:00:00Z", "other-hcf"),
    (7, "p3", "2024-05-05T10:00:00Z", "2024-05-07T10:00:00Z", "home"),
    # sent home, admitted again the next day: a readmission
    (8, "p4", "2024-06-01T08:00:00Z", "2024-06-03T23:50:00Z", "home"),
    (9, "p4", "2024-06-04T00:20:00Z", "2024-06-06T10:00:00Z", "home"),
    # discharged to a nursing facility, admitted the next day: no transfer to a hospital
    (10, "p5", "2024-07-01T08:00:00Z", "2024-07-03T10:00:00Z", "snf"),
    (11, "p5", "2024-07-04T10:00:00Z", "2024-07-06T10:00:00Z", "home"),
    (12, "p6", "2024-11-01T08:00:00Z", "2024-12-31T08:00:00Z", "home"),  # the data's end
]


def _discharged(n: int, patient: str, start: str, end: str, disposition: str) -> dict[str, object]:
    stay = _inpatient(n, patient, start, end)
    coding = {
        "system": "http://terminology.hl7.org/CodeSystem/discharge-disposition",
        "code": disposition,
    }
    stay["hospitalization"] = {"dischargeDisposition": {"coding": [coding]}}
    return stay


def test_a_transfer_to_another_hospital_is_one_episode_indexed_at_its_last_discharge(
    tmp_path: Path,
) -> None:
    """Worked out here: a stay discharged to another hospital (other-hcf, UB-04 02) with an
    admission on the same or the next UTC day is no index; every other discharge is labelled 1
    when an admission follows it within 30 days."""
    from tests.pipelines.features.crafted import features_from_fhir

    patients = sorted({row[1] for row in TRANSFERS})
    resources: list[dict[str, object]] = [{"resourceType": "Patient", "id": p} for p in patients]
    resources += [_discharged(*row) for row in TRANSFERS]
    con = features_from_fhir(resources, tmp_path)
    labels, counts = readmission_labels_with_counts(con)

    def at(text: str) -> datetime:
        return datetime.fromisoformat(text)

    def admissions_after(n: int, patient: str) -> list[datetime]:
        return [at(s) for m, p, s, _, _ in TRANSFERS if p == patient and m != n]

    expected, transfers = {}, 0
    for n, patient, _, end, disposition in TRANSFERS:
        discharge = at(end)
        next_days = {discharge.date(), discharge.date() + timedelta(days=1)}
        if disposition in {"other-hcf", "02"} and any(
            a.date() in next_days for a in admissions_after(n, patient)
        ):
            transfers += 1
            continue
        if n == 12:  # censored
            continue
        expected[(patient, discharge)] = int(
            any(
                timedelta(0) < a - discharge <= timedelta(days=30)
                for a in admissions_after(n, patient)
            )
        )
    got = {
        (r.patient_id, r.event_timestamp.to_pydatetime()): int(r.label) for r in labels.itertuples()
    }
    assert got == expected
    assert ("p1", at(TRANSFERS[0][3])) not in got and got[("p1", at(TRANSFERS[1][3]))] == 0
    assert got[("p2", at(TRANSFERS[3][3]))] == 1
    assert counts.transferred == transfers == 2


# (patient, discharge, death) as exported: every stay starts five days before its discharge
DEATHS = [
    ("p1", "2024-06-10T10:00:00+10:00", "2024-06-10"),  # died on the discharge's day, UTC+10
    ("p2", "2024-06-10T00:00:00+10:00", "2024-06-10"),  # the same, as released: no time
    ("p3", "2024-06-10T00:00:00+10:00", "2024-06-11"),  # died the next day
    ("p4", "2024-06-10T22:00:00-05:00", "2024-06-10"),  # 11 June UTC: died that day
    ("p5", "2024-06-10T10:00:00Z", "2024-06-12"),  # two days later
    ("p6", "2024-06-01T23:00:00Z", "2024-06-02T02:00:00Z"),  # three hours later, a time
]


def test_a_death_dated_to_the_discharge_day_in_any_zone_is_a_death_at_the_stay(
    tmp_path: Path,
) -> None:
    """Worked out here over every zone: a death dated to its day only is at the stay when the
    discharge falls on that day or later in some zone from UTC-12 to UTC+14; a death with a
    time, when its UTC date is on or before the discharge's."""
    from tests.pipelines.features.crafted import features_from_fhir

    resources: list[dict[str, object]] = []
    for n, (patient, end, death) in enumerate(DEATHS, start=1):
        start = (datetime.fromisoformat(end) - timedelta(days=5)).isoformat()
        resources.append({"resourceType": "Patient", "id": patient, "deceasedDateTime": death})
        resources.append(_inpatient(n, patient, start, end))
    resources.append({"resourceType": "Patient", "id": "last"})
    resources.append(_inpatient(99, "last", "2024-12-01T08:00:00Z", "2024-12-31T08:00:00Z"))
    con = features_from_fhir(resources, tmp_path)
    labels, counts = readmission_labels_with_counts(con)

    def died_at_stay(end: str, death: str) -> bool:
        discharge = datetime.fromisoformat(end)
        if "T" in death:
            return (
                datetime.fromisoformat(death).astimezone(UTC).date()
                <= discharge.astimezone(UTC).date()
            )
        zones = [timezone(timedelta(hours=h)) for h in range(-12, 15)]
        return any(
            datetime.fromisoformat(death).date() <= discharge.astimezone(z).date() for z in zones
        )

    expected = {
        (patient, datetime.fromisoformat(end)): 0
        for patient, end, death in DEATHS
        if not died_at_stay(end, death)
    }
    got = {
        (r.patient_id, r.event_timestamp.to_pydatetime()): int(r.label) for r in labels.itertuples()
    }
    assert got == expected
    assert {p for p, _ in got} == {"p3", "p5", "p6"}
    assert counts.died == len(DEATHS) - len(expected) == 3
