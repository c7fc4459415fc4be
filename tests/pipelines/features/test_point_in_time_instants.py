"""Feast's answers at hard instants equal a plain computation from the released FHIR.

A hand-written cohort of three patients goes through the whole pipeline (``ehr run``'s
:func:`pipelines.run.run_pipeline`: ingest, the research release with its per-patient date
shift, the views, the feature tables, ``feast apply`` and the online store). Its facts carry
times in zones +14:00, -11:00, -05:00 and +01:00, dates alone and months alone; two visits lie
a day apart. The entity timestamps are taken on each patient's released time line, where a
model builder takes them from the views: every instant a fact becomes known, 30, 90, 180 and
365 days after it, a discharge, a birthday, a point between the two visits, before the
patient's first data, the data end and after it, and the 2024 DST changes, each one
microsecond before, at and after; once in UTC and once in ``America/New_York``.

Each expected value is worked out here from the released resources, by the features'
documented meaning (README "Features"), with ``datetime`` and ``calendar``: a fact with a time
is known at that instant, one dated to a day at the end of that day at UTC-12, to a month at
the end of the month at UTC-12 plus 16 days (the research release moves a month with its 15th
day); windows are (T - N days, T], prior stays discharged in [T - N days, T); a lab is known
when issued and the latest value is the one measured last; ages are whole years of the UTC
date; timestamp features are the whole second at or before; after the data end the values are
those at the data end, and before a patient's first data there are none. The online store
serves each patient's values at the data end."""

from __future__ import annotations

import calendar
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from itertools import pairwise
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pytest

from pipelines.assets.deid import K_ENV
from pipelines.features.feast_store import (
    FEAST_DATA_ENV,
    FEATURES_DIR_ENV,
    entity_timestamps,
    feature_store,
    online_features,
    with_declared_types,
)
from pipelines.run import run_pipeline
from pipelines.workdir import Workdir
from vault.keys import init_keyring

pytestmark = pytest.mark.e2e

ICD = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
LATEST_ZONE = timezone(timedelta(hours=-12))
MONTH_SLACK_DAYS = 16  # a month released under a 50-day shift ends up to 16 days early
YEAR_SLACK_DAYS = 50
US = timedelta(microseconds=1)
DAY = timedelta(days=1)
METFORMIN, INSULIN = "860975", "311041"
FLAGS = {
    "E11.9": "has_diabetes",
    "I50.9": "has_heart_failure",
    "C78.00": "has_cancer",
    "I10": "has_hypertension",
    "J44.9": "has_copd",
}
# Charlson group and weight (Quan 2011) of the codes used here; E11.9 has no complication
CHARLSON = {"E11.9": ("diab", 0), "I50.9": ("chf", 2), "C78.00": ("metacanc", 6)}
CHARLSON["J44.9"] = ("cpd", 1)
LABS = {"4548-4": "hba1c", "2339-0": "glucose", "2160-0": "creatinine"}
FEATURES = {
    "patient_demographics": ["age_years"],
    "patient_utilisation": [
        *(
            f"{name}_{days}d"
            for days in (30, 180, 365)
            for name in ("encounters", "emergency_visits", "prior_inpatient_stays")
        ),
        "prior_discharge_at",
        "prior_stay_length_days",
    ],
    "patient_comorbidities": [*FLAGS.values(), "charlson_index"],
    "patient_medications": [
        "active_medication_count",
        "medications_180d",
        "polypharmacy",
        "on_metformin",
        "on_insulin",
    ],
    "patient_labs_vitals": [
        f"{m}_{s}"
        for m in sorted(set(LABS.values()))
        for s in ("latest", "mean_365d", "measured_at")
    ],
}
NAMES = [name for names in FEATURES.values() for name in names]
REFS = [f"{view}:{name}" for view, names in FEATURES.items() for name in names]


# ---- the cohort, as sent -------------------------------------------------------------------


def _subject(pid: str) -> dict[str, str]:
    return {"reference": f"Patient/{pid}"}


def _encounter(rid: str, pid: str, cls: str, start: str, end: str) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": rid,
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": cls},
        "subject": _subject(pid),
        "period": {"start": start, "end": end},
    }


def _condition(rid: str, pid: str, code: str, recorded: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": rid,
        "subject": _subject(pid),
        "verificationStatus": {"coding": [{"code": "confirmed"}]},
        "code": {"coding": [{"system": ICD, "code": code}]},
        "recordedDate": recorded,
    }


def _lab(
    rid: str, pid: str, code: str, value: float, unit: str, at: str, issued: str | None = None
) -> dict[str, Any]:
    lab: dict[str, Any] = {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "subject": _subject(pid),
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
        "effectiveDateTime": at,
    }
    if issued is not None:
        lab["issued"] = issued
    return lab


def _prescription(rid: str, pid: str, code: str, status: str, authored: str) -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "id": rid,
        "status": status,
        "intent": "order",
        "subject": _subject(pid),
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": code}]},
        "authoredOn": authored,
    }


def _patient(pid: str, born: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": born}


COHORT: list[dict[str, Any]] = [
    _patient("p1", "1970-02-20"),
    _encounter("e11", "p1", "AMB", "2024-03-10T09:00:00Z", "2024-03-10T10:00:00Z"),
    _encounter("e12", "p1", "EMER", "2024-03-11T09:00:00Z", "2024-03-11T13:00:00Z"),  # a day on
    # stays admitted in one zone and discharged in another: their length counts the dates as
    # written (4 and 3 days as released), not those of UTC (5 and 2)
    _encounter("e13", "p1", "IMP", "2024-04-01T08:00:00+14:00", "2024-04-05T18:00:00-11:00"),
    _encounter("e14", "p1", "AMB", "2024-07-01", "2024-07-01"),  # dated to a day
    _encounter("e15", "p1", "IMP", "2024-09-02T23:30:00-11:00", "2024-09-05T00:15:00+14:00"),
    _lab("o11", "p1", "4548-4", 7.5, "%", "2024-03-10T09:30:00Z", "2024-03-10T15:00:00Z"),
    _lab("o12", "p1", "4548-4", 6.9, "%", "2023-09-01"),  # dated to a day
    _lab("o13", "p1", "4548-4", 8.1, "%", "2024-05-20T12:00:00+14:00"),
    _lab("o14", "p1", "2160-0", 1.1, "mg/dL", "2024-04-02T06:00:00-11:00"),
    _condition("c11", "p1", "E11.9", "2024-03-11"),  # dated to a day
    _condition("c12", "p1", "I50.9", "2024-02"),  # dated to a month
    _condition("c13", "p1", "C78.00", "2024-06-01T10:00:00+14:00"),
    _prescription("m11", "p1", METFORMIN, "active", "2024-03-10T09:00:00Z"),
    _prescription("m12", "p1", "617312", "completed", "2024-01"),  # atorvastatin, a month
    _prescription("m13", "p1", "314076", "stopped", "2024-03-11T12:00:00-11:00"),
    _prescription("m14", "p1", "855332", "active", "2024-05-01"),  # warfarin, a day
    _patient("p2", "1985-11-02"),
    _encounter("e21", "p2", "AMB", "2024-02-10T11:00:00-05:00", "2024-02-10T12:00:00-05:00"),
    _encounter("e22", "p2", "IMP", "2024-10-01T14:00:00+01:00", "2024-10-03T09:00:00+01:00"),
    _encounter("e23", "p2", "IMP", "2024-10-20T14:00:00Z", "2024-10-23T09:00:00Z"),
    _lab("o21", "p2", "2339-0", 110.0, "mg/dL", "2024-02-10T11:30:00-05:00"),
    _lab("o22", "p2", "2339-0", 95.0, "mg/dL", "2024-10-02T08:00:00+01:00"),
    _condition("c21", "p2", "I10", "2024-02-10T11:00:00-05:00"),
    _condition("c22", "p2", "J44.9", "2024-10"),  # dated to a month
    _prescription("m21", "p2", METFORMIN, "active", "2024-02-10"),
    _prescription("m22", "p2", INSULIN, "completed", "2024-10-03T09:00:00+01:00"),
    _patient("p3", "1930-05-05"),  # over 89: released as the year that makes them 90
    _encounter("e31", "p3", "AMB", "2024-11-15T10:00:00+14:00", "2024-11-15T11:00:00+14:00"),
    _encounter("e32", "p3", "EMER", "2024-11-16T10:00:00-11:00", "2024-11-16T12:00:00-11:00"),
    _lab("o31", "p3", "4548-4", 6.2, "%", "2024-11-16T11:00:00-11:00"),
    _condition("c31", "p3", "I50.9", "2024-11-16"),
    _prescription("m31", "p3", METFORMIN, "active", "2024-11"),  # dated to a month
]


# ---- the released record, read plainly -------------------------------------------------------


def known_at(value: str) -> datetime:
    """The last instant a released FHIR date can stand for on the shifted time line."""
    if "T" in value:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
    parts = [int(p) for p in value.split("-")]
    year, month = parts[0], parts[1] if len(parts) > 1 else 12
    day = parts[2] if len(parts) > 2 else calendar.monthrange(year, month)[1]
    end = datetime(year, month, day, 23, 59, 59, 999_000, tzinfo=LATEST_ZONE).astimezone(UTC)
    slack = {1: YEAR_SLACK_DAYS, 2: MONTH_SLACK_DAYS}.get(len(parts), 0)
    return end + timedelta(days=slack)


@dataclass
class Person:
    pid: str
    birth: str | None
    # class, start and end (each known at, or None), the dates as sent
    stays: list[tuple[str, datetime | None, datetime | None, str, str]] = field(
        default_factory=list
    )
    conditions: list[tuple[datetime, str]] = field(default_factory=list)
    labs: list[tuple[str, datetime, datetime, float]] = field(default_factory=list)
    prescriptions: list[tuple[datetime, str, str]] = field(default_factory=list)

    def times(self) -> list[datetime]:
        times = [t for _, start, end, _, _ in self.stays for t in (start, end) if t is not None]
        times += [t for t, _ in self.conditions] + [lab[2] for lab in self.labs]
        return times + [t for t, _, _ in self.prescriptions]


def people(resources: list[dict[str, Any]]) -> dict[str, Person]:
    out = {r["id"]: Person(r["id"], r.get("birthDate")) for r in resources if "birthDate" in r}
    for r in resources:
        kind = r["resourceType"]
        if kind == "Patient":
            continue
        person = out[r["subject"]["reference"].removeprefix("Patient/")]
        if kind == "Encounter":
            start, end = r["period"]["start"], r["period"]["end"]
            person.stays.append((r["class"]["code"], known_at(start), known_at(end), start, end))
        elif kind == "Condition":
            person.conditions.append((known_at(r["recordedDate"]), r["code"]["coding"][0]["code"]))
        elif kind == "Observation":
            measured = known_at(r["effectiveDateTime"])
            known = max(measured, known_at(r["issued"])) if "issued" in r else measured
            measure = LABS[r["code"]["coding"][0]["code"]]
            person.labs.append((measure, measured, known, r["valueQuantity"]["value"]))
        elif kind == "MedicationRequest":
            code = r["medicationCodeableConcept"]["coding"][0]["code"]
            person.prescriptions.append((known_at(r["authoredOn"]), code, r["status"]))
    return out


def _age(birth: str | None, at: datetime) -> int | None:
    if birth is None:
        return None
    parts = [int(p) for p in birth.split("-")] + [1, 1]
    born, day = date(parts[0], parts[1], parts[2]), at.astimezone(UTC).date()
    years = day.year - born.year - ((day.month, day.day) < (born.month, born.day))
    return min(years, 90) if years >= 0 else None


def _second(at: datetime) -> datetime:
    return at.replace(microsecond=0)


def values_at(p: Person, at: datetime) -> dict[str, Any]:
    out: dict[str, Any] = {"age_years": _age(p.birth, at)}
    for days in (30, 180, 365):
        since = at - timedelta(days=days)
        started = [cls for cls, start, _, _, _ in p.stays if start and since < start <= at]
        out[f"encounters_{days}d"] = len(started)
        out[f"emergency_visits_{days}d"] = started.count("EMER")
        out[f"prior_inpatient_stays_{days}d"] = sum(
            cls == "IMP" and end is not None and since <= end < at for cls, _, end, _, _ in p.stays
        )
    prior = [s for s in p.stays if s[0] == "IMP" and s[2] is not None and s[2] < at]
    last = max(prior, key=lambda s: s[2] or at, default=None)
    out["prior_discharge_at"] = _second(last[2]) if last and last[2] else None
    out["prior_stay_length_days"] = (
        (date.fromisoformat(last[4][:10]) - date.fromisoformat(last[3][:10])).days if last else None
    )
    known = {code for t, code in p.conditions if t <= at}
    for code, flag in FLAGS.items():
        out[flag] = code in known
    out["charlson_index"] = sum(dict(CHARLSON[c] for c in known if c in CHARLSON).values())
    active = {
        code
        for t, code, status in p.prescriptions
        if t <= at and (status in ("active", "on-hold") or t > at - timedelta(days=90))
    }
    out["active_medication_count"] = len(active)
    out["medications_180d"] = len(
        {code for t, code, _ in p.prescriptions if at - timedelta(days=180) < t <= at}
    )
    out["polypharmacy"] = len(active) >= 5
    out["on_metformin"], out["on_insulin"] = METFORMIN in active, INSULIN in active
    for measure in sorted(set(LABS.values())):
        seen = [lab for lab in p.labs if lab[0] == measure and lab[2] <= at]
        latest = max(seen, key=lambda lab: lab[1], default=None)
        recent = [lab[3] for lab in seen if lab[2] > at - timedelta(days=365)]
        out[f"{measure}_latest"] = latest[3] if latest else None
        out[f"{measure}_measured_at"] = _second(latest[1]) if latest else None
        out[f"{measure}_mean_365d"] = sum(recent) / len(recent) if recent else None
    return out


def expected(p: Person, at: datetime, data_end: datetime) -> dict[str, Any]:
    first = min(p.times())
    if at < first:
        return dict.fromkeys(NAMES)  # no row before the patient's first data
    return values_at(p, min(at, data_end))  # nothing after the data end is known


def hard_instants(p: Person, data_end: datetime) -> list[datetime]:
    """Each instant a value may change at, one microsecond before, at and after it."""
    marks = {t + timedelta(days=d) for t in p.times() for d in (0, 30, 90, 180, 365)}
    marks |= {end + US for _, _, end, _, _ in p.stays if end is not None}
    starts = sorted(start for _, start, _, _, _ in p.stays if start is not None)
    marks |= {a + (b - a) / 2 for a, b in pairwise(starts)}
    if p.birth:
        year, month, day = ([int(x) for x in p.birth.split("-")] + [1, 1])[:3]
        marks |= {datetime(year + k, month, day, tzinfo=UTC) for k in range(40, 95)}
    marks |= {min(p.times()) - DAY, data_end, data_end + timedelta(days=30)}
    # the 2024 DST changes in the United States and the European Union
    marks |= {datetime(2024, 3, 10, 7, tzinfo=UTC), datetime(2024, 3, 31, 1, tzinfo=UTC)}
    marks |= {datetime(2024, 10, 27, 1, tzinfo=UTC), datetime(2024, 11, 3, 6, tzinfo=UTC)}
    lo, hi = datetime(2023, 1, 1, tzinfo=UTC), data_end + timedelta(days=31)
    return sorted({m + e for m in marks for e in (-US, timedelta(0), US) if lo <= m + e <= hi})


# ---- the run and the store -----------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    work: Path
    people: dict[str, Person]
    data_end: datetime
    released: list[dict[str, Any]]


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    root = tmp_path_factory.mktemp("pit_instants")
    landing = root / "landing" / "b1"
    landing.mkdir(parents=True)
    (landing / "cohort.ndjson").write_text("".join(json.dumps(r) + "\n" for r in COHORT))
    key_file = root / "keys" / "keyring.json"
    init_keyring(key_file)
    saved = {k: os.environ.get(k) for k in (FEAST_DATA_ENV, FEATURES_DIR_ENV)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EHR_KEY_FILE", str(key_file))
        mp.delenv("EHR_KEK", raising=False)
        mp.delenv("EHR_PSEUDONYM_KEY", raising=False)
        mp.delenv("DAGSTER_HOME", raising=False)
        mp.setenv(K_ENV, "1")  # three patients: the release's k is not what this is about
        summary = run_pipeline(root / "landing", root / "work", workers=1)
        assert summary["success"], summary
        con = duckdb.connect(str(Workdir(root / "work").warehouse), read_only=True)
        try:
            released = [
                json.loads(r)
                for (r,) in con.execute("SELECT resource FROM deid_resources").fetchall()
            ]
        finally:
            con.close()
        cohort = people(released)
        data_end = max(t for p in cohort.values() for t in p.times())
        yield Release(root / "work", cohort, data_end, released)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _same(got: Any, want: Any) -> bool:
    if want is None:
        return got is None or bool(pd.isna(got))
    if got is None or pd.isna(got):
        return False
    if isinstance(want, datetime):
        return bool(pd.Timestamp(got).tz_convert("UTC") == pd.Timestamp(want))
    if isinstance(want, bool):
        return bool(got) == want
    return abs(float(got) - float(want)) < 1e-9


def test_the_release_moved_the_dates_and_dropped_the_zones(release: Release) -> None:
    sent = {r["period"]["start"] for r in COHORT if r["resourceType"] == "Encounter"}
    starts = [r["period"]["start"] for r in release.released if r["resourceType"] == "Encounter"]
    assert len(starts) == len(sent) == 10 and not sent & set(starts)
    assert any(s.endswith(("+14:00", "-11:00")) for s in sent)
    # a zone beside a shifted date would tell summer time, and with it the offset
    assert all(len(s) == 10 or s.endswith("T00:00:00Z") for s in starts)
    # a day, a month and a year (the birth date of a patient over 89) are still there
    authored = {r.get("authoredOn") for r in release.released}
    assert any(a and len(a) == 7 for a in authored) and any(a and len(a) == 10 for a in authored)
    assert {len(p.birth or "") for p in release.people.values()} <= {4, 10}


def test_feast_at_hard_instants_agrees_with_a_plain_computation(release: Release) -> None:
    pairs = [
        (pid, at) for pid, p in release.people.items() for at in hard_instants(p, release.data_end)
    ]
    frame = pd.DataFrame(pairs, columns=["patient_id", "event_timestamp"])
    frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True)
    # the same instants given in a zone with DST
    zoned = frame.assign(event_timestamp=frame["event_timestamp"].dt.tz_convert("America/New_York"))
    store = feature_store("feature_repo", release.work / "feast", release.work / "features")
    mismatches = []
    for label, entities in (("utc", frame), ("new_york", zoned)):
        got = with_declared_types(
            store,
            store.get_historical_features(
                entity_df=entity_timestamps(entities), features=REFS
            ).to_df(),
        )
        assert len(got) == len(entities)
        for row in got.to_dict("records"):
            at = row["event_timestamp"].to_pydatetime()
            want = expected(release.people[row["patient_id"]], at, release.data_end)
            mismatches += [
                (label, row["patient_id"][:8], at.isoformat(), n, row[n], want[n])
                for n in NAMES
                if not _same(row[n], want[n])
            ]
    assert not mismatches, f"{len(mismatches)} values differ: {mismatches[:10]}"
    # the instants reach what they are meant to: no value, values, the data end and after
    before = [expected(release.people[p], at, release.data_end) for p, at in pairs]
    assert sum(v["age_years"] is None for v in before) >= 3
    assert sum(at > release.data_end for _, at in pairs) >= 3
    assert {v["encounters_30d"] for v in before} >= {0, 1, 2}
    assert {v["prior_inpatient_stays_30d"] for v in before} >= {0, 1}


def test_the_online_store_serves_the_values_at_the_data_end(release: Release) -> None:
    store = feature_store("feature_repo", release.work / "feast", release.work / "features")
    answer = online_features(store, REFS, list(release.people))
    assert answer.unknown == []
    mismatches = [
        (pid[:8], n, answer.values[n][i], want[n])
        for i, pid in enumerate(release.people)
        for want in [expected(release.people[pid], release.data_end, release.data_end)]
        for n in NAMES
        if not _same(answer.values[n][i], want[n])
    ]
    assert not mismatches, mismatches
