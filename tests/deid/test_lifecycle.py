from __future__ import annotations

import json
from pathlib import Path

import pytest

from deid.audit import AuditLog, audit_key
from deid.errors import KeyDestroyedError
from deid.keys import FileKeyProvider
from deid.lifecycle import ERASURE_HOOKS, forget_patient, reidentify, rotate_kek
from deid.pseudonym import Pseudonymizer
from fhirlake import warehouse
from fhirlake.ingest import ingest_batch
from fhirlake.vault_access import iter_current_resources, read_resource


def _patients(folder: Path) -> None:
    folder.mkdir(parents=True)
    for pid, family in (("p1", "Quillfeather"), ("p2", "Oddsock")):
        (folder / f"{pid}.json").write_text(
            json.dumps(
                {
                    "resourceType": "Bundle",
                    "type": "collection",
                    "entry": [
                        {
                            "resource": {
                                "resourceType": "Patient",
                                "id": pid,
                                "name": [{"family": family, "given": ["Ann"]}],
                                "identifier": [{"system": "urn:mrn", "value": f"MRN-{pid}"}],
                            }
                        },
                        {
                            "resource": {
                                "resourceType": "Condition",
                                "id": f"c-{pid}",
                                "subject": {"reference": f"Patient/{pid}"},
                                "code": {"text": "x"},
                            }
                        },
                    ],
                }
            )
        )


@pytest.fixture
def setup(tmp_path: Path, key_file: Path):
    _patients(tmp_path / "land")
    provider = FileKeyProvider.load(key_file)
    wh = tmp_path / "w.duckdb"
    ingest_batch(wh, "b", tmp_path / "land", provider, workers=1)
    audit = AuditLog(tmp_path / "audit" / "audit.log", audit_key(provider.pseudonym_key()))
    return wh, provider, audit


def test_rotation_rewraps_and_retires(setup, key_file: Path) -> None:
    wh, provider, audit = setup
    old = provider.active_kek_id()
    con = warehouse.connect(wh)
    try:
        report = rotate_kek(key_file, con, audit)
        rotated = FileKeyProvider.load(key_file)
        assert rotated.active_kek_id() == report.new_kek_id != old
        assert rotated.kek_ids() == [report.new_kek_id]  # old material gone
        assert report.retired_kek_ids == [old] and report.rewrapped >= 3
        assert {k for (k,) in con.execute("SELECT DISTINCT kek_id FROM data_keys").fetchall()} == {
            report.new_kek_id
        }
        assert len(list(iter_current_resources(con, rotated))) == 4  # still readable
    finally:
        con.close()
    assert json.loads(key_file.read_text())["retired_keks"][old]
    assert [e["action"] for e in audit.entries()] == ["rotate_keys"] and audit.verify().ok


def test_forget_shreds_one_patient_everywhere(setup) -> None:
    wh, provider, audit = setup
    pseudo = Pseudonymizer(provider.pseudonym_key())
    p1, p2 = pseudo.resource_key("Patient", "p1"), pseudo.resource_key("Patient", "p2")
    called: list[str] = []

    def online_store(pseudonym: str) -> int:
        called.append(pseudonym)
        return 1

    ERASURE_HOOKS.append(online_store)
    con = warehouse.connect(wh)
    try:
        con.execute("CREATE TABLE deid_patient (patient_id VARCHAR, x INT)")
        con.execute("INSERT INTO deid_patient VALUES (?, 1), (?, 2)", [p1, p2])
        report = forget_patient(con, provider, "p1", audit, "erasure request 42")
        assert report.data_keys_destroyed == 1
        assert report.rows_deleted["phi_vault"] == 2 and report.rows_deleted["deid_patient"] == 1
        assert read_resource(con, provider, "Patient", "p1") is None
        assert read_resource(con, provider, "Patient", "p2") is not None
        assert con.execute("SELECT patient_id FROM deid_patient").fetchall() == [(p2,)]
        with pytest.raises(KeyDestroyedError):
            reidentify(con, provider, p1, audit, "check")
    finally:
        ERASURE_HOOKS.remove(online_store)
        con.close()
    assert called == [p1]
    assert [e["action"] for e in audit.entries()] == ["forget", "reidentify"]
    assert "p1" not in audit.path.read_text() and "Quillfeather" not in audit.path.read_text()


def test_reidentify_is_audited_first(setup) -> None:
    wh, provider, audit = setup
    p2 = Pseudonymizer(provider.pseudonym_key()).resource_key("Patient", "p2")
    con = warehouse.connect(wh, read_only=True)
    try:
        with pytest.raises(ValueError, match="reason"):
            reidentify(con, provider, p2, audit, "  ")
        found = reidentify(con, provider, p2, audit, "adverse event follow-up", actor="dpo")
    finally:
        con.close()
    assert found["id"] == "p2" and found["name"][0]["family"] == "Oddsock"
    assert found["identifier"] == [{"system": "urn:mrn", "value": "MRN-p2"}]
    (entry,) = audit.entries()
    assert (entry["action"], entry["subject"], entry["actor"]) == ("reidentify", p2, "dpo")
