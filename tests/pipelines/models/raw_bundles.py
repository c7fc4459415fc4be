"""A quick readmission training frame read straight from generated FHIR Bundles with orjson.

It does not use the ViewDefinition engine or the feature store: the raw Encounter, Consent and
Patient resources are loaded into ``views.*``-shaped DuckDB tables so the label is computed by
the same :func:`readmission_labels`, and four features are computed as of each discharge here.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pandas as pd

from pipelines.models.labels import readmission_labels

from .crafted import CONSENT_DDL, ENCOUNTER_DDL, PATIENT_DDL

HBA1C = "4548-4"
RACE_URL = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"


def _ts(value: str | None) -> datetime | None:
    if not value:
        return None
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _pid(reference: dict[str, Any] | None) -> str | None:
    if not reference:
        return None
    return str(reference.get("reference", "")).rsplit(":", 1)[-1].rsplit("/", 1)[-1]


def _code(concept: dict[str, Any] | None) -> str | None:
    codings = (concept or {}).get("coding") or []
    return codings[0].get("code") if codings else None


def _race(patient: dict[str, Any]) -> str | None:
    for ext in patient.get("extension", []):
        if ext.get("url") == RACE_URL:
            for inner in ext.get("extension", []):
                if inner.get("url") == "ombCategory":
                    return str(inner["valueCoding"]["code"])
    return None


def load_bundles(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Resources of the bundle files in ``folder``, by resource type."""
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in sorted(folder.glob("[0-9]*.json")):
        for entry in orjson.loads(path.read_bytes()).get("entry", []):
            resource = entry["resource"]
            by_type[resource["resourceType"]].append(resource)
    return by_type


def _view_tables(con: duckdb.DuckDBPyConnection, res: dict[str, list[dict[str, Any]]]) -> None:
    con.execute("SET TimeZone = 'UTC'")
    con.execute("CREATE SCHEMA views")
    con.execute(ENCOUNTER_DDL)
    con.execute(CONSENT_DDL)
    con.execute(PATIENT_DDL)
    encounters = pd.DataFrame(
        [
            {
                "id": e["id"],
                "patient_id": _pid(e.get("subject")),
                "status": e.get("status"),
                "class_code": (e.get("class") or {}).get("code"),
                "period_start": _ts((e.get("period") or {}).get("start")),
                "period_end": _ts((e.get("period") or {}).get("end")),
                "discharge_disposition_code": _code(
                    (e.get("hospitalization") or {}).get("dischargeDisposition")
                ),
            }
            for e in res["Encounter"]
        ]
    )
    con.register("encounters_frame", encounters)
    con.execute(
        "INSERT INTO views.encounter (id, patient_id, status, class_code, period_start, "
        "period_end, discharge_disposition_code) SELECT * FROM encounters_frame"
    )
    consents = pd.DataFrame(
        [
            {
                "id": c["id"],
                "patient_id": _pid(c.get("patient")),
                "status": c.get("status"),
                "scope_code": _code(c.get("scope")),
                "policy_rule_code": _code(c.get("policyRule")),
                "provision_type": (c.get("provision") or {}).get("type"),
            }
            for c in res["Consent"]
        ],
        columns=["id", "patient_id", "status", "scope_code", "policy_rule_code", "provision_type"],
    )
    con.register("consents_frame", consents)
    con.execute(
        "INSERT INTO views.consent (id, patient_id, status, scope_code, policy_rule_code, "
        "provision_type) SELECT * FROM consents_frame"
    )
    patients = pd.DataFrame(
        [
            {"id": p["id"], "deceased_date_time": _ts(p.get("deceasedDateTime"))}
            for p in res["Patient"]
        ]
    )
    con.register("patients_frame", patients)
    con.execute("INSERT INTO views.patient (id, deceased_date_time) SELECT * FROM patients_frame")


def readmission_frame(folder: Path) -> pd.DataFrame:
    """Label rows of the generated data with age, sex, race, comorbidity count (conditions active
    at discharge), prior inpatient admissions in the 365 days before the admission and the latest
    HbA1c on or before discharge."""
    res = load_bundles(folder)
    con = duckdb.connect()
    _view_tables(con, res)
    labels = readmission_labels(con)
    con.close()

    births: dict[str, date] = {}
    sex: dict[str, str | None] = {}
    race: dict[str, str | None] = {}
    for p in res["Patient"]:
        births[p["id"]] = date.fromisoformat(p["birthDate"])
        sex[p["id"]] = p.get("gender")
        race[p["id"]] = _race(p)
    admissions: dict[str, list[datetime]] = defaultdict(list)
    stays: dict[tuple[str, datetime], datetime] = {}
    for e in res["Encounter"]:
        if (e.get("class") or {}).get("code") != "IMP":
            continue
        pid, start = _pid(e.get("subject")), _ts(e["period"].get("start"))
        end = _ts(e["period"].get("end"))
        if pid and start:
            admissions[pid].append(start)
            if end:
                stays[(pid, end)] = start
    for starts in admissions.values():
        starts.sort()
    conditions: dict[str, list[tuple[datetime, datetime | None, str]]] = defaultdict(list)
    for c in res["Condition"]:
        pid, onset = _pid(c.get("subject")), _ts(c.get("onsetDateTime") or c.get("recordedDate"))
        if pid and onset:
            conditions[pid].append((onset, _ts(c.get("abatementDateTime")), _code(c["code"]) or ""))
    hba1c: dict[str, list[tuple[datetime, float]]] = defaultdict(list)
    for o in res["Observation"]:
        if _code(o.get("code")) != HBA1C or "valueQuantity" not in o:
            continue
        pid, when = _pid(o.get("subject")), _ts(o.get("effectiveDateTime"))
        if pid and when:
            hba1c[pid].append((when, float(o["valueQuantity"]["value"])))
    for values in hba1c.values():
        values.sort()

    rows = []
    for row in labels.itertuples(index=False):
        pid, discharge = str(row.patient_id), row.event_timestamp.to_pydatetime()
        admit = stays.get((pid, discharge), discharge)
        starts = admissions[pid]
        prior = bisect.bisect_left(starts, admit) - bisect.bisect_left(
            starts, admit - timedelta(days=365)
        )
        active = {
            code
            for onset, abatement, code in conditions[pid]
            if onset <= discharge and (abatement is None or abatement > discharge)
        }
        labs = [value for when, value in hba1c[pid] if when <= discharge]
        birth = births[pid]
        age = (
            discharge.year
            - birth.year
            - ((discharge.month, discharge.day) < (birth.month, birth.day))
        )
        rows.append(
            {
                "patient_id": pid,
                "event_timestamp": row.event_timestamp,
                "label": int(row.label),
                "age": float(age),
                "sex": sex[pid],
                "race": race[pid],
                "comorbidity_count": len(active),
                "prior_admissions_365d": prior,
                "latest_hba1c": labs[-1] if labs else None,
            }
        )
    frame = pd.DataFrame(rows)
    frame["latest_hba1c"] = frame["latest_hba1c"].astype("float64")
    return frame
