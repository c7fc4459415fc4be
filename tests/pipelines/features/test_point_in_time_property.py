"""Property test: Feast's point-in-time join agrees with a plain computation from the views.

Random patients are written as ``views.*`` tables (the de-identified FHIR, flattened); the
feature tables are built, applied to a real Feast store, and read with
``get_historical_features`` at random (patient, T) pairs, many of them one microsecond before,
at and after an event or a window edge. Each answer is compared with a computation written
plainly here, in Python over the same rows (not the production SQL): windowed counts, age,
latest lab values, the 365-day mean and the Charlson index agree on every row, and a value
planted after every requested T never appears.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pytest
from feast import FeatureStore

from pipelines.features.feast_store import (
    FEAST_DATA_ENV,
    FEATURES_DIR_ENV,
    apply_repo,
    feature_store,
)
from pipelines.features.tables import build_feature_tables
from pipelines.features.valuesets import load_valuesets, of_kind
from tests.pipelines.features.crafted import ICD, SNOMED, write_views

SEED = 11
PATIENTS = 40
PAIRS = 500
US = timedelta(microseconds=1)
DAY = timedelta(days=1)
WINDOWS = (30, 180, 365)
LABS = {"hba1c": "4548-4", "creatinine": "2160-0"}
CHARLSON = of_kind(load_valuesets(), "charlson")
REPLACED_BY = {"charlson_diab": "charlson_diabwc", "charlson_canc": "charlson_metacanc"}
REPLACED_BY["charlson_mld"] = "charlson_msld"
PLANTED_VALUE = 99.0
VALUE_NAMES = [
    "age_years",
    "charlson_index",
    *[
        f"{n}_{d}d"
        for d in WINDOWS
        for n in ("encounters", "emergency_visits", "prior_inpatient_stays")
    ],
    *[f"{m}_{s}" for m in LABS for s in ("latest", "mean_365d")],
]


def _moment(rng: random.Random, start: datetime, end: datetime) -> datetime:
    """A random time; half of them at midnight, as date-shifted data is."""
    at = start + (end - start) * rng.random()
    at = at.replace(microsecond=0)
    return at.replace(hour=0, minute=0, second=0) if rng.random() < 0.5 else at


def _condition_code(rng: random.Random) -> tuple[str, str]:
    group = rng.choice(CHARLSON)
    if group.snomed and (not group.icd10_prefixes or rng.random() < 0.4):
        return SNOMED, rng.choice(sorted(group.snomed))
    prefix = rng.choice(sorted(group.icd10_prefixes))
    code = prefix + "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 2)))
    return ICD, code[:3] + ("." + code[3:] if len(code) > 3 else "")


def _patient(rng: random.Random, n: int) -> dict[str, list[dict[str, Any]]]:
    pid = f"{n:032x}"
    born = date(2000, 2, 29) if n == 0 else date(1925, 1, 1) + timedelta(days=rng.randint(0, 30000))
    first = datetime(2014, 1, 1, tzinfo=UTC)
    last = datetime(2024, 6, 30, tzinfo=UTC)
    rows: dict[str, list[dict[str, Any]]] = {"patient": [], "encounter": []}
    rows["patient"].append(
        {"id": pid, "gender": rng.choice(["female", "male"]), "birth_date": born}
    )
    for k in range(rng.randint(0, 14)):
        start = _moment(rng, first, last)
        cls = rng.choice(["AMB", "AMB", "EMER", "IMP"])
        end = start + (DAY * rng.randint(1, 9) if cls == "IMP" else timedelta(hours=2))
        end = None if rng.random() < 0.05 else end
        rows["encounter"].append(
            {
                "id": f"e{n}-{k}",
                "patient_id": pid,
                "class_code": cls,
                "period_start": start,
                "period_end": end,
            }
        )
    rows["condition"] = []
    for k in range(rng.randint(0, 6)):
        system, code = _condition_code(rng)
        onset = _moment(rng, datetime(2000, 1, 1, tzinfo=UTC), last)
        recorded = None if rng.random() < 0.3 else onset + DAY * rng.randint(0, 3000)
        rows["condition"].append(
            {
                "id": f"c{n}-{k}",
                "patient_id": pid,
                "verification_status": rng.choice(["confirmed", "confirmed", "refuted"]),
                "onset_date_time": onset,
                "recorded_date": recorded,
                "code_system": system,
                "code": code,
            }
        )
    rows["observation"] = [
        {
            "id": f"o{n}-{k}",
            "patient_id": pid,
            "status": "final",
            "code": LABS[measure],
            "value_quantity": round(rng.uniform(4, 12), 1),
            "effective_date_time": _moment(rng, first, last),
        }
        for k, measure in enumerate(rng.choice(list(LABS)) for _ in range(rng.randint(0, 8)))
    ]
    return rows


def random_views(seed: int) -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(seed)
    rows: dict[str, list[dict[str, Any]]] = {}
    for n in range(PATIENTS):
        for view, data in _patient(rng, n).items():
            rows.setdefault(view, []).extend(data)
    return rows


# ---- the plain computation at T, from the rows above -------------------------------------


def age_at(born: date, at: datetime) -> int | None:
    day = at.astimezone(UTC).date()
    years = day.year - born.year - ((day.month, day.day) < (born.month, born.day))
    return min(years, 90) if years >= 0 else None


def counts_at(encounters: list[dict[str, Any]], at: datetime) -> dict[str, int]:
    out = {}
    for d in WINDOWS:
        since = at - timedelta(days=d)
        started = [e for e in encounters if since < e["period_start"] <= at]
        out[f"encounters_{d}d"] = len(started)
        out[f"emergency_visits_{d}d"] = sum(e["class_code"] == "EMER" for e in started)
        out[f"prior_inpatient_stays_{d}d"] = sum(
            e["class_code"] == "IMP"
            and e["period_end"] is not None
            and since <= e["period_end"] < at
            for e in encounters
        )
    return out


def labs_at(observations: list[dict[str, Any]], at: datetime) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for measure, code in LABS.items():
        seen = sorted(
            (o["effective_date_time"], o["value_quantity"])
            for o in observations
            if o["code"] == code and o["effective_date_time"] <= at
        )
        recent = [v for t, v in seen if t > at - timedelta(days=365)]
        out[f"{measure}_latest"] = seen[-1][1] if seen else None
        out[f"{measure}_mean_365d"] = sum(recent) / len(recent) if recent else None
    return out


def _in_group(system: str, code: str, group: Any) -> bool:
    key = code.replace(".", "").upper()
    if system == SNOMED:
        return code in group.snomed
    return any(key[:n] in group.icd10_prefixes for n in range(3, min(len(key), 8) + 1))


def charlson_at(conditions: list[dict[str, Any]], at: datetime) -> int:
    known = [
        c
        for c in conditions
        if c["verification_status"] != "refuted"
        and (c["recorded_date"] or c["onset_date_time"]) <= at
    ]
    present = {
        g.column for g in CHARLSON for c in known if _in_group(c["code_system"], c["code"], g)
    }
    return sum(
        g.charlson_weight or 0
        for g in CHARLSON
        if g.column in present and REPLACED_BY.get(g.column) not in present
    )


def expected(rows: dict[str, list[dict[str, Any]]], pid: str, at: datetime) -> dict[str, Any]:
    def mine(view: str) -> list[dict[str, Any]]:
        return [r for r in rows[view] if r["patient_id"] == pid]

    (patient,) = [p for p in rows["patient"] if p["id"] == pid]
    first = min(patient_times(rows, pid), default=None)
    if first is None or at < first:
        # a patient has no row (no value at all) before their first data
        return dict.fromkeys(VALUE_NAMES)
    return {
        "age_years": age_at(patient["birth_date"], at),
        **counts_at(mine("encounter"), at),
        **labs_at(mine("observation"), at),
        "charlson_index": charlson_at(mine("condition"), at),
    }


# ---- the pairs and the store ---------------------------------------------------------------


def patient_times(rows: dict[str, list[dict[str, Any]]], pid: str | None = None) -> list[datetime]:
    """Every data time (of one patient, or of all): the times of the facts the tables count (a
    refuted diagnosis is none)."""

    def mine(view: str) -> list[dict[str, Any]]:
        return [r for r in rows[view] if pid is None or r["patient_id"] == pid]

    times = [e["period_start"] for e in mine("encounter")]
    times += [e["period_end"] for e in mine("encounter") if e["period_end"]]
    times += [o["effective_date_time"] for o in mine("observation")]
    times += [
        c["recorded_date"] or c["onset_date_time"]
        for c in mine("condition")
        if c["verification_status"] != "refuted"
    ]
    return times


def data_end(rows: dict[str, list[dict[str, Any]]]) -> datetime:
    return max(patient_times(rows))


def edges(rows: dict[str, list[dict[str, Any]]], pid: str) -> list[datetime]:
    """Times where a value changes, for T just before, at and just after them."""
    out = []
    for e in rows["encounter"]:
        if e["patient_id"] == pid:
            out += [e["period_start"] + timedelta(days=d) for d in (0, *WINDOWS)]
            if e["period_end"]:
                out += [e["period_end"] + timedelta(days=d) for d in (0, *WINDOWS)]
    for o in rows["observation"]:
        if o["patient_id"] == pid:
            out += [o["effective_date_time"], o["effective_date_time"] + timedelta(days=365)]
    for c in rows["condition"]:
        if c["patient_id"] == pid:
            out.append(c["recorded_date"] or c["onset_date_time"])
    (born,) = [p["birth_date"] for p in rows["patient"] if p["id"] == pid]
    out += [datetime(born.year + k, 3, 1, tzinfo=UTC) for k in range(0, 90, 7)]
    return out


def random_pairs(rows: dict[str, list[dict[str, Any]]], seed: int) -> pd.DataFrame:
    rng = random.Random(seed)
    end = data_end(rows)
    pairs = []
    while len(pairs) < PAIRS:
        patient = rng.choice(rows["patient"])
        pid, born = patient["id"], patient["birth_date"]
        start = datetime(born.year, born.month, born.day, tzinfo=UTC)
        candidates = edges(rows, pid)
        if candidates and rng.random() < 0.7:
            at = rng.choice(candidates) + rng.choice([-US, timedelta(0), US])
        else:
            at = _moment(rng, start, end)
        if start <= at <= end:
            pairs.append((pid, at))
    return pd.DataFrame(pairs, columns=["patient_id", "event_timestamp"])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FeatureStore, Any]]:
    saved = {k: os.environ.get(k) for k in (FEAST_DATA_ENV, FEATURES_DIR_ENV)}
    root = tmp_path_factory.mktemp("pit")
    rows = random_views(SEED)
    # planted after every requested T (the data end is moved by it, the pairs are not)
    planted = dict(rows["observation"][0], id="planted", value_quantity=PLANTED_VALUE)
    planted["effective_date_time"] = data_end(rows) + DAY * 10
    with_planted = {**rows, "observation": [*rows["observation"], planted]}
    con = duckdb.connect()
    write_views(con, with_planted)
    build_feature_tables(con, root / "features")
    apply_repo("feature_repo", root / "feast", root / "features")
    yield feature_store("feature_repo", root / "feast", root / "features"), rows
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _same(got: Any, want: Any) -> bool:
    if want is None:
        return bool(pd.isna(got))
    return not pd.isna(got) and abs(float(got) - float(want)) < 1e-9


def test_feast_agrees_with_plain_computation_at_random_times(world: Any) -> None:
    store, rows = world
    pairs = random_pairs(rows, SEED + 1)
    names = ["age_years", "charlson_index"]
    names += [
        f"{n}_{d}d"
        for d in WINDOWS
        for n in ("encounters", "emergency_visits", "prior_inpatient_stays")
    ]
    names += [f"{m}_{s}" for m in LABS for s in ("latest", "mean_365d")]
    refs = [
        f"{view}:{name}"
        for view, group in (
            ("patient_demographics", ["age_years"]),
            ("patient_comorbidities", ["charlson_index"]),
            (
                "patient_utilisation",
                [
                    n
                    for n in names
                    if n.endswith("d") and "_" in n and not n.startswith(tuple(LABS))
                ],
            ),
            ("patient_labs_vitals", [n for n in names if n.startswith(tuple(LABS))]),
        )
        for name in group
    ]
    got = store.get_historical_features(entity_df=pairs, features=refs).to_df()
    assert len(got) == len(pairs)
    mismatches = []
    for row in got.itertuples(index=False):
        at = row.event_timestamp.to_pydatetime()
        want = expected(rows, row.patient_id, at)
        for name in names:
            if not _same(getattr(row, name), want[name]):
                mismatches.append((name, at.isoformat(), getattr(row, name), want[name]))
    assert not mismatches, f"{len(mismatches)} of {len(got) * len(names)} values differ: " + str(
        mismatches[:10]
    )
    assert PLANTED_VALUE not in set(got["hba1c_latest"]) | set(got["creatinine_latest"])


def test_pairs_cover_edges_and_every_count_is_a_number(world: Any) -> None:
    store, rows = world
    pairs = random_pairs(rows, SEED + 1)
    assert pairs["patient_id"].nunique() > PATIENTS // 2
    got = store.get_historical_features(
        entity_df=pairs, features=["patient_utilisation:encounters_365d"]
    ).to_df()
    # counts are 0, never null, at any T from the patient's first data to the data end
    firsts = {p["id"]: min(patient_times(rows, p["id"]), default=None) for p in rows["patient"]}
    known = [
        firsts[r.patient_id] is not None and r.event_timestamp >= firsts[r.patient_id]
        for r in got.itertuples()
    ]
    assert got.loc[known, "encounters_365d"].notna().all() and sum(known) > len(got) // 2
    _ = Path  # the store's files live under tmp_path_factory
