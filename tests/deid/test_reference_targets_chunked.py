"""The resolved references a batch's release needs are read a chunk of resources at a time, from
a temporary table of the connection, not held for the whole batch in a Python dict: that dict
(three references a resource in a Synthea-shaped export) was the one part of a run's memory that
grew with the input (de-identification's peak RSS 662 → 845 → 1,071 → 1,482 MiB at 500, 1,000,
2,000 and 4,000 patients; 575 → 599 MiB at 2,000 → 4,000 without it)."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import pytest

import deid.release as release
from deid.policy import Policy
from deid.staging import publish_batch
from vault import warehouse
from vault.catalog import has_table
from vault.ingest import ingest_batch
from vault.keys import FileKeyProvider
from vault.pseudonym import Pseudonymizer

TODAY = date(2026, 11, 28)


def _bundle(pid: str) -> dict[str, Any]:
    patient, encounter = f"urn:uuid:{pid}-0000", f"urn:uuid:{pid}-0001"
    resources = [
        (patient, {"resourceType": "Patient", "id": pid, "gender": "male"}),
        (
            encounter,
            {
                "resourceType": "Encounter",
                "id": f"{pid}-e",
                "status": "finished",
                "class": {"code": "AMB"},
                "subject": {"reference": patient},
            },
        ),
        (
            f"urn:uuid:{pid}-0002",
            {
                "resourceType": "Observation",
                "id": f"{pid}-o",
                "status": "final",
                "code": {"text": "heart rate"},
                "subject": {"reference": patient},
                "encounter": {"reference": encounter},
            },
        ),
    ]
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": url, "resource": r, "request": {"method": "PUT", "url": r["resourceType"]}}
            for url, r in resources
        ],
    }


def test_references_are_looked_up_a_chunk_at_a_time_and_all_resolve(
    tmp_path: Path, key_provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "landing" / "b1"
    folder.mkdir(parents=True)
    patients = [f"p{i}" for i in range(5)]
    for pid in patients:
        (folder / f"{pid}.json").write_text(json.dumps(_bundle(pid)))
    report = ingest_batch(tmp_path / "w.duckdb", "b1", folder, key_provider, workers=1)
    assert report.accepted == 15
    looked_up: list[int] = []
    real = release._reference_targets

    def spy(con: Any, keys: list[str]) -> Any:
        looked_up.append(len(keys))
        return real(con, keys)

    monkeypatch.setattr(release, "_DEID_CHUNK", 4)
    monkeypatch.setattr(release, "_reference_targets", spy)
    con = warehouse.connect(tmp_path / "w.duckdb")
    try:
        batch = publish_batch(
            con, key_provider, "b1", Policy.shipped("research"), today=TODAY, workers=1
        )
        assert batch.published
        # the staged references leave with the batch's de-identification
        assert not has_table(con, release._TARGETS_TABLE)
        rows = con.execute(
            "SELECT resource_type, resource, patient_id FROM deid_resources"
        ).fetchall()
    finally:
        con.close()
    assert looked_up == [4, 4, 4, 3]  # every resource once, never the whole batch at a time
    key = Pseudonymizer(key_provider.pseudonym_key()).resource_key
    released = {orjson.loads(text)["id"]: orjson.loads(text) for _, text, _ in rows}
    for pid in patients:
        observation = released[key("Observation", f"{pid}-o")]
        assert observation["subject"] == {"reference": f"Patient/{key('Patient', pid)}"}
        assert observation["encounter"] == {
            "reference": f"Encounter/{key('Encounter', f'{pid}-e')}"
        }
    assert {pid for _, _, pid in rows} == {key("Patient", p) for p in patients}
