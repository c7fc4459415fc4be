"""After ``ehr forget`` no table or released file names the person's resources: the record
ledger keeps a row for each of their records (the batch still reconciles) but not their
pseudonyms, and other patients' records that pointed at one of their resources (an Observation
filed under their Encounter) lose the reference, in the release as it is and in every later
one. The pseudonyms searched for are computed here from the records sent, with the key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pytest
from click.testing import CliRunner

from deid.leakscan import CanarySet
from deid.policy import Policy
from deid.release import deidentify_batch
from pipelines.cli.privacy import audit_verify, forget
from pipelines.run import open_instance
from pipelines.views.refresh import refresh_view
from pipelines.views.tables import load_views
from pipelines.workdir import Workdir
from vault import warehouse
from vault.ingest import ingest_batch, reconcile_batch
from vault.keys import FileKeyProvider
from vault.pseudonym import Pseudonymizer

pytestmark = pytest.mark.e2e

CODE = {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}
# kept by design (docs/keys-and-erasure.md): the tombstones and the destroyed keys' owners
KEPT_BY_DESIGN = {("main", "erased_subjects"), ("main", "data_keys")}


def _patient(pid: str, family: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "name": [{"family": family}]}


def _encounter(eid: str, patient: str) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "class": {"code": "AMB"},
        "subject": {"reference": f"Patient/{patient}"},
        "period": {"start": "2021-04-01T09:00:00Z", "end": "2021-04-01T11:00:00Z"},
    }


def _obs(oid: str, patient: str, encounter: str | None = None) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": CODE,
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": "2021-04-01T10:00:00Z",
        "valueQuantity": {"value": 72, "unit": "/min"},
    }
    if encounter is not None:
        obs["encounter"] = {"reference": f"Encounter/{encounter}"}
    return obs


# hers: a Patient, an Encounter, an Observation in it, and one quarantined record (an empty
# array is a schema violation: quarantined under her key)
SSN_SYSTEM = "http://hl7.org/fhir/sid/us-ssn"
HERS = [
    {
        **_patient("pz", "Quorvalent"),
        "identifier": [{"system": SSN_SYSTEM, "value": "731-55-9012"}],
    },
    _encounter("enc-pz", "pz"),
    _obs("pz-pulse", "pz", "enc-pz"),
]
HER_QUARANTINED = {**_obs("pz-bad", "pz", "enc-pz"), "category": []}
# another patient's: an Observation filed under her Encounter (a newborn's, under the mother's)
OTHERS = [
    _patient("p-other", "Oddsock"),
    _encounter("enc-other", "p-other"),
    _obs("other-pulse", "p-other", "enc-other"),
    _obs("other-in-her-encounter", "p-other", "enc-pz"),
]


def _write(folder: Path, records: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "records.ndjson").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return folder


def _release(workdir: Workdir, provider: FileKeyProvider, batches: list[str]) -> None:
    con = warehouse.connect(workdir.warehouse)
    try:
        for batch in batches:
            deidentify_batch(con, provider, batch, Policy.shipped("research"), workers=1)
        for view in load_views():
            if view.name in ("patient", "observation", "encounter"):
                refresh_view(con, view, workdir.root, CanarySet())
        con.execute("CHECKPOINT")
    finally:
        con.close()


@pytest.fixture
def world(tmp_path: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.delenv("EHR_AUDIT_ANCHOR", raising=False)
    provider = FileKeyProvider.load(key_file)
    landing = _write(tmp_path / "landing" / "b1", [*HERS, HER_QUARANTINED, *OTHERS])
    workdir = Workdir(tmp_path / "work")
    report = ingest_batch(workdir.warehouse, "b1", landing, provider, workers=1)
    assert (report.accepted, report.quarantined) == (len(HERS) + len(OTHERS), 1)
    _release(workdir, provider, ["b1"])
    key = Pseudonymizer(provider.pseudonym_key()).resource_key
    hers = {key(r["resourceType"], r["id"]) for r in [*HERS, HER_QUARANTINED]}
    return {
        "provider": provider,
        "workdir": workdir,
        "key_file": key_file,
        "key": key,
        "hers": hers,
        "encounter": key("Encounter", "enc-pz"),
    }


def _forget(world: dict[str, Any]) -> dict[str, Any]:
    common = ["--workdir", str(world["workdir"].root), "--key-file", str(world["key_file"])]
    result = CliRunner().invoke(forget, ["pz", "--reason", "ticket 4711", *common])
    assert result.exit_code == 0, result.output
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def _naming(world: dict[str, Any], keys: set[str]) -> dict[str, int]:
    """Where any of ``keys`` is found: every table of the warehouse (but the tombstones and the
    destroyed keys' owners) and every Parquet file of the work directory, read as text; how
    many rows each."""
    found: dict[str, int] = {}
    workdir = world["workdir"]
    con = duckdb.connect(str(workdir.warehouse), read_only=True)
    try:
        tables = con.execute(
            "SELECT schema_name, table_name FROM duckdb_tables() WHERE NOT internal"
        ).fetchall()
        for schema, table in tables:
            if (schema, table) in KEPT_BY_DESIGN:
                continue
            rows = con.execute(f'SELECT * FROM "{schema}"."{table}"').fetchall()
            hits = sum(1 for row in rows if any(k in str(row) for k in keys))
            if hits:
                found[f"{schema}.{table}"] = hits
    finally:
        con.close()
    reader = duckdb.connect()
    try:
        for path in sorted(workdir.root.rglob("*.parquet")):
            rows = reader.execute("SELECT * FROM read_parquet(?)", [str(path)]).fetchall()
            hits = sum(1 for row in rows if any(k in str(row) for k in keys))
            if hits:
                found[str(path.relative_to(workdir.root))] = hits
    finally:
        reader.close()
    return found


def test_the_record_ledger_keeps_her_records_counted_but_not_named(world: dict[str, Any]) -> None:
    hers = world["hers"]
    assert "main.record_ledger" in _naming(world, hers)  # the search sees them before
    con = duckdb.connect(str(world["workdir"].warehouse), read_only=True)
    try:
        ledger_rows = con.execute("SELECT count(*) FROM record_ledger").fetchall()[0][0]
    finally:
        con.close()

    report = _forget(world)

    assert _naming(world, hers) == {}
    assert report["ledger_rows_erased"] == len(HERS) + 1
    con = warehouse.connect(world["workdir"].warehouse, read_only=True)
    try:
        # every record still accounted for, hers as erased, and the batch still reconciles
        statuses = dict(
            con.execute("SELECT status, count(*) FROM record_ledger GROUP BY 1").fetchall()
        )
        assert sum(statuses.values()) == ledger_rows
        assert statuses == {"accepted": len(OTHERS), "erased": len(HERS) + 1}
        assert (
            con.execute(
                "SELECT count(*) FROM record_ledger WHERE status = 'erased' "
                "AND (resource_key IS NOT NULL OR resource_type IS NOT NULL)"
            ).fetchall()[0][0]
            == 0
        )
        assert reconcile_batch(con, "b1").passed
    finally:
        con.close()

    # the same batch ingested again: her records quarantined unstored, the rest unchanged
    again = ingest_batch(
        world["workdir"].warehouse,
        "b1",
        world["workdir"].root.parent / "landing" / "b1",
        world["provider"],
        workers=1,
    )
    assert again.quarantine_reasons == {"erased_subject": len(HERS) + 1}
    assert _naming(world, hers) == {}
    con = warehouse.connect(world["workdir"].warehouse, read_only=True)
    try:
        assert reconcile_batch(con, "b1").passed
    finally:
        con.close()


def test_references_to_her_resources_leave_other_patients_records(world: dict[str, Any]) -> None:
    encounter = world["encounter"]
    before = _naming(world, {encounter})
    # her Encounter is named by the other patient's Observation: released, indexed, viewed
    assert {"main.deid_resources", "main.resource_references", "views.observation"} <= set(
        before
    ) and "views/observation.parquet" in before

    _forget(world)

    assert _naming(world, world["hers"]) == {}
    con = duckdb.connect(str(world["workdir"].warehouse), read_only=True)
    try:
        (text,) = con.execute(
            "SELECT resource::VARCHAR FROM deid_resources WHERE id = ?",
            [world["key"]("Observation", "other-in-her-encounter")],
        ).fetchall()[0]
        # the purge wrote the row's digest with its text: the views see the row as changed
        ((stale,),) = con.execute(
            "SELECT count(*) FROM deid_resources WHERE digest IS DISTINCT FROM hash(resource)"
        ).fetchall()
    finally:
        con.close()
    assert stale == 0
    released = json.loads(text)
    assert "encounter" not in released and released["subject"]["reference"].startswith("Patient/")

    # a later release, of this batch again and of a new one naming her Encounter, names it not
    landing = world["workdir"].root.parent / "landing" / "b2"
    her_encounter_again = {k: v for k, v in _encounter("enc-pz", "pz").items() if k != "subject"}
    _write(landing, [_obs("other-later", "p-other", "enc-pz"), her_encounter_again])
    report = ingest_batch(world["workdir"].warehouse, "b2", landing, world["provider"], workers=1)
    # her Encounter sent again without its patient is refused by its own tombstone
    assert (report.accepted, report.quarantine_reasons) == (1, {"erased_subject": 1})
    _release(world["workdir"], world["provider"], ["b1", "b2"])
    assert _naming(world, world["hers"]) == {}
    con = duckdb.connect(str(world["workdir"].warehouse), read_only=True)
    try:
        ids = {str(i) for (i,) in con.execute("SELECT id FROM views.observation").fetchall()}
    finally:
        con.close()
    # the other patient's records stay released, without the reference
    assert {
        world["key"]("Observation", "other-in-her-encounter"),
        world["key"]("Observation", "other-later"),
    } <= ids


def test_the_compartment_of_a_patient_refused_as_her_is_refused_too(world: dict[str, Any]) -> None:
    """A Patient under a new id carrying her SSN written another way is quarantined as her; the
    records in its compartment, before and after it in the batch, and in a later batch, are
    not stored or released either."""
    _forget(world)
    key = world["key"]
    landing = world["workdir"].root.parent / "landing" / "b2"
    new_patient = {**_patient("pt-new", "Quorvalent"), "identifier": [
        {"system": SSN_SYSTEM, "value": " 731 55 9012"}]}  # fmt: skip
    _write(landing, [_obs("before", "pt-new"), new_patient, _obs("after", "pt-new")])
    report = ingest_batch(world["workdir"].warehouse, "b2", landing, world["provider"], workers=1)
    assert (report.accepted, report.quarantine_reasons) == (0, {"erased_subject": 3})
    later = world["workdir"].root.parent / "landing" / "b3"
    _write(later, [_obs("later", "pt-new"), _obs("other-b3", "p-other")])
    report = ingest_batch(world["workdir"].warehouse, "b3", later, world["provider"], workers=1)
    assert (report.accepted, report.quarantine_reasons) == (1, {"erased_subject": 1})
    _release(world["workdir"], world["provider"], ["b1", "b2", "b3"])

    new = {key("Patient", "pt-new"), *(key("Observation", o) for o in ("before", "after", "later"))}
    assert _naming(world, new | world["hers"]) == {}
    con = warehouse.connect(world["workdir"].warehouse, read_only=True)
    try:
        live = con.execute(
            "SELECT count(*) FROM data_keys WHERE owner = ? AND wrapped IS NOT NULL",
            [key("Patient", "pt-new")],
        ).fetchall()[0][0]
        assert live == 0
        for batch in ("b1", "b2", "b3"):
            assert reconcile_batch(con, batch).passed, batch
    finally:
        con.close()


def _erased_bytes(world: dict[str, Any], patient_id: str) -> list[bytes]:
    """The patient's wrapped data key and the first 64 bytes of each of their ciphertexts."""
    pseudonym = world["key"]("Patient", patient_id)
    con = duckdb.connect(str(world["workdir"].warehouse), read_only=True)
    try:
        wrapped = con.execute("SELECT wrapped FROM data_keys WHERE owner = ?", [pseudonym])
        keys = [bytes(w) for (w,) in wrapped.fetchall()]
        sealed = con.execute("SELECT sealed FROM phi_vault WHERE patient_key = ?", [pseudonym])
        return keys + [bytes(s)[:64] for (s,) in sealed.fetchall()]
    finally:
        con.close()


def test_two_erasures_started_together_both_finish(world: dict[str, Any]) -> None:
    """Two ``ehr forget`` processes at once, as two operators would: each waits its turn for the
    warehouse, both exit 0, the audit log holds both completed, and the file holds no byte of
    either patient's wrapped key or ciphertexts (read from the raw file, freed pages included).
    Before, the second one failed as "in use" or, later, removed the first one's rewrite folder,
    and the file kept both patients' bytes."""
    before = {pid: _erased_bytes(world, pid) for pid in ("pz", "p-other")}
    assert all(before.values())
    with open_instance(world["workdir"]):
        pass  # the work directory's Dagster instance, as the runs that released it made it
    common = ["--workdir", str(world["workdir"].root), "--key-file", str(world["key_file"])]
    script = "import sys; from pipelines.cli import main; sys.argv[0] = 'ehr'; main()"
    erasures = [
        subprocess.Popen(
            [sys.executable, "-c", script, "forget", pid, "--reason", f"ticket {n}", *common],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n, pid in enumerate(("pz", "p-other"))
    ]
    outcomes = [p.communicate(timeout=600) for p in erasures]
    assert [p.returncode for p in erasures] == [0, 0], [err[-600:] for _, err in outcomes]
    raw = world["workdir"].warehouse.read_bytes()
    assert not [b for found in before.values() for b in found if b in raw]
    verify = CliRunner().invoke(audit_verify, common)
    assert verify.exit_code == 0, verify.output
