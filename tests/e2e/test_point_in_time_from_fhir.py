"""A feature value at time T is what was known at T, from hand-written FHIR through a real run to
Feast's ``get_historical_features``.

The FHIR below dates its facts in every shape a source sends: a day, a month, a year, times with
offsets from -12:00 to +14:00 (and ``-00:00``, ``+05:45``), ``Z``, fractional seconds, a leap
day, a stay whose end comes before its start or is missing, and onset periods. The answers are
compared, at T one microsecond and one millisecond either side of every instant a fact becomes
known and of every window edge, at year ends, before a patient's first fact and after the data
end, with a computation written plainly here from the same records and the documented rules:
the research release moves a day whole by the patient's shift and sets a time to midnight UTC
of its date as written (the zone dropped), moves a month with its 15th day and keeps a year; a
date is known at its last instant in the latest zone (UTC-12), a month 16 days and a year 50
days later on the shifted time line; windows are (T - N days, T], prior stays [T - N days, T);
an age counts from the birth year the release carries. The shift is read from each patient's
day-dated anchor visit as released. Entity timestamps are given in four forms (aware in UTC,
ISO text in other zones, naive, nanoseconds): every form gets the same answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pandas as pd
import pytest

from pipelines.assets.deid import K_ENV
from pipelines.features.feast_store import entity_timestamps, feature_store
from pipelines.run import run_pipeline
from pipelines.workdir import Workdir
from vault.keys import init_keyring

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2] / "feature_repo"
US = timedelta(microseconds=1)
MS = timedelta(milliseconds=1)
WINDOWS = (30, 180, 365)
INPATIENT = ("IMP", "ACUTE", "NONAC")
ANCHOR_CLASS = "HH"  # one home visit per patient, dated to its day: where its shift is read
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"

# (id, class, start, end)
ENCOUNTERS: dict[str, list[tuple[str, str, str | None, str | None]]] = {
    "p1": [
        ("a1", ANCHOR_CLASS, "2019-06-10", None),
        ("e1", "AMB", "2020-03-01", None),
        ("e2", "EMER", "2020-03-01T23:30:00+14:00", "2020-03-02T01:00:00+14:00"),
        ("e3", "IMP", "2020-06-10T08:00:00.123456Z", "2020-06-15T10:00:00-12:00"),
        ("e4", "AMB", "2020-03", None),
        ("e5", "AMB", "2019", None),
        ("e6", "IMP", "2021-01-10", "2021-01-05"),  # ends before it starts
        ("e7", "IMP", "2021-02-01T00:00:00Z", None),  # no end
        ("e8", "EMER", "2021-03-14T02:30:00-05:00", "2021-03-14T05:00:00-04:00"),  # DST
        ("e9", "AMB", "2021-03-28T01:30:00+01:00", None),
        ("e10", "IMP", "2020-02-29", "2020-03-01"),
    ],
    "p2": [
        ("a2", ANCHOR_CLASS, "2021-09-10", None),
        ("f1", "EMER", "2022-12-31T23:59:59.999-12:00", "2023-01-01T00:00:00Z"),
        ("f2", "IMP", "2023-01-31T00:00:00.5Z", "2023-02-28"),
        ("f3", "AMB", "2023-02", None),
        ("f4", "ACUTE", None, "2022-06-05T10:00:00+05:45"),  # a stay known by its end alone
    ],
    "p3": [
        ("a3", ANCHOR_CLASS, "2017-01-10", None),
        ("g1", "AMB", "2018-07-01T12:00:00-12:00", None),
        ("g2", "AMB", "2018-07-31T12:00:00+14:00", None),
        ("g3", "IMP", "2018-08-01", "2018-08-04T23:00:00-12:00"),
        ("g4", "EMER", "2018-08-10T00:00:00-00:00", "2018-08-10T06:00:00-00:00"),
    ],
}
BIRTHS = {"p1": "2000-02-29", "p2": "1990-06-15", "p3": "1985-12-31"}
# HbA1c results: (id, effective (a dateTime, or a period's start and end), issued, value)
LABS: dict[str, list[tuple[str, Any, str | None, float]]] = {
    "p1": [
        ("o1", "2020-03-01T10:00:00+14:00", "2020-03-01T18:00:00+14:00", 7.0),
        ("o2", "2020-03-01", None, 8.0),
        ("o3", "2020-03", None, 9.0),
        ("o4", "2020-06-10T08:00:00.5Z", "2020-06-20T00:00:00Z", 6.5),
        ("o5", ("2020-06-12T00:00:00Z", "2020-06-13T00:00:00Z"), None, 6.9),
    ],
    "p2": [
        ("q1", "2022-12-31T23:59:59.999-12:00", "2023-01-01T00:00:00.001+14:00", 5.5),
        ("q2", "2023", None, 6.1),
    ],
    "p3": [],
}
# heart failure diagnoses (Charlson weight 2): (id, recordedDate, onsetDateTime or onsetPeriod)
CONDITIONS: dict[str, list[tuple[str, str | None, Any]]] = {
    "p1": [("c1", "2020-03", None)],
    "p2": [("d1", None, ("2022-11-20", "2022-12"))],
    "p3": [("k1", None, "2018-07-31T12:00:00+14:00")],
}
# prescriptions: (id, authoredOn, status, RxNorm code)
MEDICATIONS: dict[str, list[tuple[str, str, str, str]]] = {
    "p1": [
        ("m1", "2020-03-01", "completed", "860975"),
        ("m2", "2020-03", "active", "197361"),
        ("m3", "2021-02-28T23:00:00-12:00", "stopped", "860975"),
    ],
    "p2": [("n1", "2022-12-31T23:59:59.999-12:00", "completed", "314076")],
    "p3": [("r1", "2018", "completed", "197361")],
}


def _fhir() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for pid, birth in BIRTHS.items():
        subject = {"reference": f"Patient/{pid}"}
        out.append({"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": birth})
        for eid, cls, start, end in ENCOUNTERS[pid]:
            period = {k: v for k, v in (("start", start), ("end", end)) if v}
            out.append(
                {
                    "resourceType": "Encounter",
                    "id": eid,
                    "status": "finished",
                    "class": {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                        "code": cls,
                    },
                    "subject": subject,
                    "period": period,
                }
            )
        for oid, effective, issued, value in LABS[pid]:
            lab: dict[str, Any] = {
                "resourceType": "Observation",
                "id": oid,
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
                "subject": subject,
                "valueQuantity": {
                    "value": value,
                    "system": "http://unitsofmeasure.org",
                    "code": "%",
                },
            }
            if isinstance(effective, tuple):
                lab["effectivePeriod"] = {"start": effective[0], "end": effective[1]}
            else:
                lab["effectiveDateTime"] = effective
            if issued:
                lab["issued"] = issued
            out.append(lab)
        for cid, recorded, onset in CONDITIONS[pid]:
            condition: dict[str, Any] = {
                "resourceType": "Condition",
                "id": cid,
                "code": {
                    "coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I50.9"}]
                },
                "subject": subject,
            }
            if recorded:
                condition["recordedDate"] = recorded
            if isinstance(onset, tuple):
                condition["onsetPeriod"] = {"start": onset[0], "end": onset[1]}
            elif onset:
                condition["onsetDateTime"] = onset
            out.append(condition)
        for mid, authored, status, code in MEDICATIONS[pid]:
            out.append(
                {
                    "resourceType": "MedicationRequest",
                    "id": mid,
                    "status": status,
                    "intent": "order",
                    "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": code}]},
                    "subject": subject,
                    "authoredOn": authored,
                }
            )
    return out


def _month_after(first: date) -> date:
    return (first + timedelta(days=32)).replace(day=1)


def released(text: str, shift: int) -> tuple[datetime, date]:
    """When a FHIR date or dateTime is known on the shifted time line, and the date the release
    writes (a month or a year: its first day)."""
    end_of_day = time(11, 59, 59, 999000)  # 23:59:59.999 at UTC-12, the next day in UTC
    if len(text) > 10:  # a time: the shifted day as written, at midnight UTC (no zone kept)
        day = date.fromisoformat(text[:10]) + timedelta(days=shift)
        return datetime.combine(day, time(), UTC), day
    if len(text) == 10:
        day = date.fromisoformat(text) + timedelta(days=shift)
        return datetime.combine(day + timedelta(days=1), end_of_day, UTC), day
    if len(text) == 7:  # moved with its 15th day; known 16 days after the month released ends
        first = (date(int(text[:4]), int(text[5:7]), 15) + timedelta(days=shift)).replace(day=1)
        return datetime.combine(_month_after(first), end_of_day, UTC) + timedelta(days=16), first
    year = int(text)  # kept; known 50 days (the shift range) after it ends
    return datetime(year + 1, 1, 1, 11, 59, 59, 999000, UTC) + timedelta(days=50), date(year, 1, 1)


class Reference:
    """The feature values of one patient, computed from the FHIR above."""

    def __init__(self, pid: str, shift: int, birth_year: int) -> None:
        self.birth = date(birth_year, 1, 1)
        self.encounters = [
            (
                cls,
                *(released(start, shift) if start else (None, None)),
                *(released(end, shift) if end else (None, None)),
            )
            for _, cls, start, end in ENCOUNTERS[pid]
        ]
        self.labs = []
        for _, effective, issued, value in LABS[pid]:
            measured = released(effective[1] if isinstance(effective, tuple) else effective, shift)[
                0
            ]
            known = max(measured, released(issued, shift)[0]) if issued else measured
            self.labs.append((known, measured, value))
        self.diagnoses = [
            released(recorded or (onset[1] if isinstance(onset, tuple) else onset), shift)[0]
            for _, recorded, onset in CONDITIONS[pid]
        ]
        self.prescriptions = [
            (released(authored, shift)[0], status, code)
            for _, authored, status, code in MEDICATIONS[pid]
        ]
        self.times = [t for _, s, _d, e, _f in self.encounters for t in (s, e) if t]
        self.times += [known for known, _, _ in self.labs] + self.diagnoses
        self.times += [known for known, _, _ in self.prescriptions]

    def at(self, t: datetime, data_end: datetime) -> dict[str, Any] | None:
        if t < min(self.times):
            return None  # no row before the patient's first fact
        t = min(t, data_end)
        out: dict[str, Any] = {}
        for n in WINDOWS:
            since = t - timedelta(days=n)
            starts = [(cls, s) for cls, s, *_ in self.encounters if s and since < s <= t]
            out[f"encounters_{n}d"] = len(starts)
            out[f"emergency_visits_{n}d"] = sum(cls == "EMER" for cls, _ in starts)
            out[f"prior_inpatient_stays_{n}d"] = sum(
                cls in INPATIENT and e is not None and since <= e < t
                for cls, _, _, e, _ in self.encounters
            )
        stays = sorted(
            (e, s_day, e_day)
            for cls, _, s_day, e, e_day in self.encounters
            if cls in INPATIENT and e is not None and e < t
        )
        last = stays[-1] if stays else None
        out["prior_discharge_at"] = last[0].replace(microsecond=0) if last else None
        out["prior_stay_length_days"] = (last[2] - last[1]).days if last and last[1] else None
        day = t.astimezone(UTC).date()
        age = day.year - self.birth.year - ((day.month, day.day) < (1, 1))
        out["age_years"] = min(age, 90) if age >= 0 else None
        known = [lab for lab in self.labs if lab[0] <= t]
        latest = max(known, key=lambda lab: lab[1]) if known else None
        out["hba1c_latest"] = latest[2] if latest else None
        out["hba1c_measured_at"] = latest[1].replace(microsecond=0) if latest else None
        year = [v for k, _, v in self.labs if t - timedelta(days=365) < k <= t]
        out["hba1c_mean_365d"] = round(sum(year) / len(year), 9) if year else None
        out["charlson_index"] = 2 if any(k <= t for k in self.diagnoses) else 0
        out["active_medication_count"] = len(
            {
                code
                for k, status, code in self.prescriptions
                if k <= t and (status in ("active", "on-hold") or k > t - timedelta(days=90))
            }
        )
        out["medications_180d"] = len(
            {code for k, _, code in self.prescriptions if t - timedelta(days=180) < k <= t}
        )
        return out


FEATURES = [
    *(
        f"patient_utilisation:{name}_{n}d"
        for n in WINDOWS
        for name in ("encounters", "emergency_visits", "prior_inpatient_stays")
    ),
    "patient_utilisation:prior_discharge_at",
    "patient_utilisation:prior_stay_length_days",
    "patient_demographics:age_years",
    "patient_labs_vitals:hba1c_latest",
    "patient_labs_vitals:hba1c_measured_at",
    "patient_labs_vitals:hba1c_mean_365d",
    "patient_comorbidities:charlson_index",
    "patient_medications:active_medication_count",
    "patient_medications:medications_180d",
]


def _identities(warehouse: Path) -> dict[str, tuple[str, int, int]]:
    """Each source patient's pseudonym, shift (its anchor visit's date as released minus as
    written) and the birth year its released Patient carries."""
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        anchors = con.execute(
            "SELECT patient_id, period_start_date FROM views.encounter WHERE class_code = ?",
            [ANCHOR_CLASS],
        ).fetchall()
        births = {
            pseudonym: int(json.loads(resource)["birthDate"][:4])
            for pseudonym, resource in con.execute(
                "SELECT patient_id, resource FROM deid_resources WHERE resource_type = 'Patient'"
            ).fetchall()
        }
    finally:
        con.close()
    out = {}
    for pid, encounters in ENCOUNTERS.items():
        written = date.fromisoformat(next(e[2] for e in encounters if e[1] == ANCHOR_CLASS) or "")
        (pseudonym, day), *others = [a for a in anchors if abs((a[1] - written).days) <= 50]
        assert not others, "anchor visits must lie more than the shift range apart"
        out[pid] = (pseudonym, (day - written).days, births[pseudonym])
    return out


def _instants(reference: Reference) -> set[datetime]:
    around = {-MS, -US, timedelta(0), US, MS}
    edges = set()
    for t in reference.times + [measured for _, measured, _ in reference.labs]:
        for edge in (t, *(t + timedelta(days=n) for n in (30, 90, 180, 365))):
            edges |= {edge + d for d in around}
    for year in range(2017, 2025):
        edges |= {datetime(year, 1, 1, tzinfo=UTC) + d for d in around}
    return edges | {min(reference.times) - US}


def _plain(value: Any) -> Any:
    if value is None or value is pd.NaT or (isinstance(value, float) and pd.isna(value)):
        return None
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    return int(value) if isinstance(value, float) and value.is_integer() else value


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A keyring and k = 1 for the module's one run (the function-scoped fixtures cannot serve
    a module's)."""
    patch = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("keys") / "keyring.json"
    init_keyring(path)
    patch.setenv("EHR_KEY_FILE", str(path))
    patch.delenv("EHR_KEK", raising=False)
    patch.delenv("EHR_PSEUDONYM_KEY", raising=False)
    patch.delenv("DAGSTER_HOME", raising=False)
    patch.setenv(K_ENV, "1")
    yield path
    patch.undo()


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory, keys: Path) -> Answers:
    """Feast's answers at every T of every patient, and the plain computation's."""
    root = tmp_path_factory.mktemp("pit")
    landing = root / "landing" / "cohort"
    landing.mkdir(parents=True)
    (landing / "records.ndjson").write_bytes(b"\n".join(orjson.dumps(r) for r in _fhir()))
    workdir = Workdir(root / "work")
    run_pipeline(root / "landing", workdir, workers=1)
    identities = _identities(workdir.warehouse)
    references = {pid: Reference(pid, shift, born) for pid, (_, shift, born) in identities.items()}
    data_end = max(t for r in references.values() for t in r.times)
    rows = [
        (identities[pid][0], t, pid)
        for pid, reference in references.items()
        for t in sorted(_instants(reference))
        # a table's values turn null 36 to 400 days after the data end (the TTL, documented)
        if t <= data_end + timedelta(days=30)
    ]
    entity = pd.DataFrame(
        {
            "patient_id": [r[0] for r in rows],
            "event_timestamp": pd.to_datetime([r[1] for r in rows], utc=True),
            "row": range(len(rows)),
        }
    )
    store = feature_store(REPO, workdir.feast, workdir.features)
    given = {
        "aware": entity["event_timestamp"],
        "text in other zones": pd.Series(
            [
                t.tz_convert(timezone(timedelta(hours=14 if i % 2 else -12))).isoformat()
                for i, t in enumerate(entity["event_timestamp"])
            ]
        ),
        "naive": entity["event_timestamp"].dt.tz_localize(None),
        # 999 ns after the instant: floored to it, as Feast's rows are stamped to the us
        "nanoseconds": entity["event_timestamp"].astype("datetime64[ns, UTC]")
        + pd.Timedelta(nanoseconds=999),
    }
    names = [f.split(":")[1] for f in FEATURES]
    got = {}
    for form, column in given.items():
        frame = entity_timestamps(entity.assign(event_timestamp=column.to_numpy()))
        answer = store.get_historical_features(entity_df=frame, features=FEATURES).to_df()
        answer = answer.sort_values("row").reset_index(drop=True)
        got[form] = [{n: _plain(row[n]) for n in names} for _, row in answer.iterrows()]
    expected = [references[pid].at(t, data_end) for _, t, pid in rows]
    return Answers([(r[2], r[1]) for r in rows], expected, got)


@dataclass
class Answers:
    rows: list[tuple[str, datetime]]
    expected: list[dict[str, Any] | None]
    got: dict[str, list[dict[str, Any]]]


def _mismatches(answers: Answers, form: str) -> list[str]:
    out = []
    for (pid, t), expected, got in zip(answers.rows, answers.expected, answers.got[form]):
        for name, value in got.items():
            want = None if expected is None else expected[name]
            if value != want:
                out.append(f"{pid} at {t.isoformat()}: {name} {value!r}, expected {want!r}")
    return out


def test_every_feature_at_every_t_is_what_was_known_at_t(answers: Answers) -> None:
    assert len(answers.rows) > 500
    assert _mismatches(answers, "aware") == []


@pytest.mark.parametrize("form", ["text in other zones", "naive", "nanoseconds"])
def test_every_form_of_entity_timestamp_gets_the_same_answers(answers: Answers, form: str) -> None:
    assert answers.got[form] == answers.got["aware"]
