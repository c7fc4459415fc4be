"""A patient's name or number in a local code, written the way a code must write it (ASCII
letters and digits, no apostrophe, no accent), reaches no released table, view or Parquet file;
nor does an identifier of theirs that another of their records holds (a health plan's member
number, an account number).

A code holds ASCII only (``deid.terminology.ANY_CODE``), so a name spelled with an apostrophe
or an accent can only be released spelled without it (``O'Quarrigan`` as ``OQUARRIGAN``,
``Brontëwald`` as ``BRONTEWALD``), one part of a double surname as that part alone, and an SSN
the source wrote in full-width digits in ASCII digits. The leak scan is what keeps such a
code back; each case below is a code the shipped profile releases as written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest

from deid.release import release_canaries
from fhirlake.synthetic import generate
from pipelines.run import run_pipeline
from pipelines.workdir import Workdir
from vault.keys import FileKeyProvider

pytestmark = pytest.mark.e2e

LOCAL = "http://hospital.example/CodeSystem/local-lab"


def _patient(pid: str, **fields: Any) -> dict[str, Any]:
    patient = {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1961-07-23"}
    return {**patient, **fields}


def _observation(pid: str, code: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"o-{pid}",
        "status": "final",
        "code": {"coding": [{"system": LOCAL, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": "2020-03-04T10:00:00Z",
    }


def _named(given: str, family: str) -> dict[str, Any]:
    return {"name": [{"given": [given], "family": family}]}


# 999-41-7733 typed in full-width digits (U+FF10 to U+FF19), as an East Asian input method does
FULL_WIDTH_SSN = "999-41-7733".translate({ord(d): 0xFF10 + int(d) for d in "0123456789"})

# case: (the Patient's own fields, the code its Observation carries)
CASES: dict[str, tuple[dict[str, Any], str]] = {
    "apostrophe": (_named("Siobhan", "O'Quarrigan"), "OQUARRIGAN"),
    "accent": (_named("Renée", "Brontëwald"), "BRONTEWALD"),
    "double_surname_part": (_named("Anouk", "Pemberly-Quasht"), "PEMBERLY"),
    "full_width_ssn": (
        {
            **_named("Ulrik", "Threnodyx"),
            "identifier": [{"system": "http://hl7.org/fhir/sid/us-ssn", "value": FULL_WIDTH_SSN}],
        },
        "SSN999417733",
    ),
    "name_as_text": ({"name": [{"text": "Ivo Zanderquist"}]}, "IvoZanderquist"),
    # the source's id of the Patient, which released rows hold a pseudonym in place of
    "source_id": ({"id": "pt-55190377"}, "pt-55190377"),
    # the Patient is quarantined (a birth date written day first): its other records come in
    "patient_quarantined": (
        {**_named("Ottoline", "Vexbridge"), "birthDate": "23/07/1961"},
        "VEXBRIDGE",
    ),
}
# case: (a record of the patient holding an identifier of theirs, the code holding it): a health
# plan's member number and a hospital account number are identifiers of the patient too
OWN_RECORDS: dict[str, tuple[dict[str, Any], str]] = {
    "member_number": (
        {
            "resourceType": "Coverage",
            "status": "active",
            "subscriberId": "ZQW88127734",
            "payor": [{"display": "Quillfeather Health Plan"}],
        },
        "ZQW88127734",
    ),
    # a Coverage with no payor is refused by validation: the quarantine holds its number
    "member_number_quarantined": (
        {"resourceType": "Coverage", "status": "active", "subscriberId": "ZQW55190266"},
        "ZQW55190266",
    ),
    "account_number": (
        {
            "resourceType": "Account",
            "status": "active",
            "identifier": [{"system": "http://hospital.example/account", "value": "ACCT77310452"}],
        },
        "ACCT77310452",
    ),
}


def test_a_name_or_number_written_as_a_code_holds_the_batch_back(
    tmp_path: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    landing = tmp_path / "landing"
    generate(landing / "cohort", 12, seed=21)
    records: list[dict[str, Any]] = []
    for case, (fields, code) in CASES.items():
        pid = str(fields.get("id") or f"pt-{case.replace('_', '-')}")
        records += [_patient(pid, **fields), _observation(pid, code)]
    for case, (record, code) in OWN_RECORDS.items():
        pid = f"pt-{case.replace('_', '-')}"
        ref = {"reference": f"Patient/{pid}"}
        whose = {"beneficiary": ref} if record["resourceType"] == "Coverage" else {"subject": [ref]}
        own = {**record, "id": f"r-{pid}", **whose}
        records += [_patient(pid, **_named("Hedda", "Quorrington")), own, _observation(pid, code)]
    (landing / "crafted").mkdir()
    (landing / "crafted" / "crafted.ndjson").write_bytes(
        b"\n".join(orjson.dumps(r) for r in records)
    )
    workdir = Workdir(tmp_path / "work")
    summary = run_pipeline(landing, workdir, workers=1)

    con = duckdb.connect(str(workdir.warehouse), read_only=True)
    try:
        released = {
            "deid_resources": orjson.dumps(
                con.execute("SELECT resource FROM deid_resources").fetchall()
            ).decode(),
            "views": orjson.dumps(
                [
                    con.execute(f'SELECT * FROM views."{table}"').fetchall()
                    for (table,) in con.execute(
                        "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'views'"
                    ).fetchall()
                ],
                default=str,
            ).decode(),
            "parquet": orjson.dumps(
                [
                    con.execute("SELECT * FROM read_parquet(?)", [str(p)]).fetchall()
                    for p in workdir.root.rglob("*.parquet")
                ],
                default=str,
            ).decode(),
        }
        # each case on its own: the canaries the vault gives (its Patient versions, the
        # quarantined Patient, the Coverage and the Account) find the code as released
        canaries = release_canaries(con, FileKeyProvider.load(key_file))
        refused = con.execute(
            "SELECT resource_type, count(*) FROM quarantine GROUP BY 1 ORDER BY 1"
        ).fetchall()
    finally:
        con.close()
    missed = [
        case
        for case, (_, code) in {**CASES, **OWN_RECORDS}.items()
        if not canaries.scan_value(_observation("x", code))
    ]
    assert missed == []
    assert refused == [("Coverage", 1), ("Patient", 1)]  # the two cases the quarantine holds
    # the crafted batch is held back by its leak scan; the cohort's batch is released
    runs = {run["batch"]: run for run in summary["runs"]}
    assert runs["cohort"]["success"] and not runs["crafted"]["success"]
    assert runs["crafted"]["checks"]["deid_resources:phi_leak_scan"] is False
    assert released["deid_resources"] != "[]"
    leaked = {
        case: sorted(where for where, text in released.items() if code in text)
        for case, (_, code) in {**CASES, **OWN_RECORDS}.items()
    }
    assert {case: where for case, where in leaked.items() if where} == {}
