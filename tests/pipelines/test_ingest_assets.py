from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import orjson
from dagster import AssetCheckSeverity, DagsterInstance, materialize

from pipelines.assets.ingest import FINGERPRINT_TAG, PARENT_RUN_TAG
from pipelines.definitions import batch_assets, build_resources, release_assets
from vault import warehouse
from vault.landing import batch_source

CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"


def _landing(tmp_path: Path) -> Path:
    landing = tmp_path / "landing"
    batch = landing / "export-1"
    batch.mkdir(parents=True)
    lines = [
        orjson.dumps({"resourceType": "Patient", "id": "p1", "gender": "female"}),
        orjson.dumps(
            {
                "resourceType": "Condition",
                "id": "c1",
                "subject": {"reference": "Patient/p1"},
                "code": {"text": "x"},
                # released as the binding's "active", and counted
                "clinicalStatus": {"coding": [{"system": CLINICAL, "code": "Active"}]},
            }
        ),
        b'{"resourceType": "Patient", "id": ',
    ]
    (batch / "data.ndjson").write_bytes(b"\n".join(lines) + b"\n")
    return landing


def test_materialize_ingest_partition(
    tmp_path: Path, key_file: Path, materialize_batch: Callable[..., Any]
) -> None:
    landing = _landing(tmp_path)
    instance = DagsterInstance.ephemeral()
    result = materialize_batch(landing, "export-1", instance)
    assert result.success
    vault = result.asset_materializations_for_node("ingest")
    by_key = {m.asset_key.to_user_string(): m.metadata for m in vault}
    assert by_key["phi_vault"]["accepted"].value == 2
    assert by_key["quarantine"]["quarantined"].value == 1
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    # one record in three quarantined: above the 5% threshold, a warning
    assert checks == {
        "records_reconcile": True,
        "phi_leak_scan": True,
        "quarantine_rate": False,
        "batch_key_holds_no_identifier": True,
    }
    deid = result.asset_materializations_for_node("deid_resources")[0].metadata
    assert deid["released"].value == 2 and deid["policy"].value == "research"
    # what the allow-list withheld inside released resources is shown, by kind
    assert "| code_case_normalised | 1 |" in deid["release_counts"].value
    release = materialize(
        release_assets,
        instance=instance,
        resources=build_resources(str(tmp_path / "work"), str(landing), str(key_file), 1),
    )
    assert release.success
    evaluations = {
        f"{c.asset_key.to_user_string()}:{c.check_name}": c.passed
        for c in release.get_asset_check_evaluations()
    }
    assert evaluations.pop("released_patients:k_anonymity")
    assert evaluations.pop("views/patient:phi_leak_scan")
    # two patients are too few to train on: the model says so in a warning check
    assert evaluations.pop("readmission_model:auroc_beats_chance") is False
    assert evaluations and all(evaluations.values())
    con = warehouse.connect(tmp_path / "work" / "warehouse.duckdb", read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM phi_vault").fetchall()[0][0] == 2
    finally:
        con.close()


def test_a_batch_key_with_a_patients_name_is_a_warning(
    tmp_path: Path, materialize_batch: Callable[..., Any]
) -> None:
    """An export folder named after its patient: the batch is ingested, de-identified and
    published as any other, and the batch key check warns, naming the kind found and not
    the name."""
    key = "records_Larkspur_Odalys"
    batch = tmp_path / "landing" / key
    batch.mkdir(parents=True)
    patient = {"resourceType": "Patient", "id": "p1", "name": [{"family": "Larkspur"}]}
    (batch / "data.ndjson").write_bytes(orjson.dumps(patient) + b"\n")
    result = materialize_batch(tmp_path / "landing", key)
    assert result.success
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    warned = checks.pop("batch_key_holds_no_identifier")
    assert not warned.passed and warned.severity == AssetCheckSeverity.WARN
    assert warned.metadata["kinds_found"].value == ["name"]
    assert "Larkspur" not in str(warned.description) + str(warned.metadata)
    assert all(c.passed for c in checks.values())
    deid = result.asset_materializations_for_node("deid_resources")[0].metadata
    assert deid["published"].value is True


def test_the_release_finds_a_batch_key_naming_a_patient_of_another_batch(
    tmp_path: Path, key_file: Path, materialize_batch: Callable[..., Any]
) -> None:
    """A folder named after a patient its batch does not hold (one of an earlier batch, by
    surname or by source id): the batch's own check knows its own patients only and passes,
    and the release's check, over every patient of the vault, names the key and the kinds."""
    landing = tmp_path / "landing"
    patients = {
        "export-1": {"resourceType": "Patient", "id": "p4471x9", "name": [{"family": "Larkspur"}]},
        "records_Larkspur": {"resourceType": "Patient", "id": "p2", "name": [{"family": "Ode"}]},
        "chart-p4471x9": {"resourceType": "Patient", "id": "p3", "name": [{"family": "Quill"}]},
    }
    instance = DagsterInstance.ephemeral()
    for key, patient in patients.items():
        (landing / key).mkdir(parents=True)
        (landing / key / "data.ndjson").write_bytes(orjson.dumps(patient) + b"\n")
        result = materialize_batch(landing, key, instance)
        checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
        assert checks["batch_key_holds_no_identifier"] is True
    release = materialize(
        release_assets,
        selection=["released_patients"],
        instance=instance,
        resources=build_resources(str(tmp_path / "work"), str(landing), str(key_file), 1),
    )
    (check,) = [
        c
        for c in release.get_asset_check_evaluations()
        if c.check_name == "batch_keys_hold_no_identifier"
    ]
    assert not check.passed and check.severity == AssetCheckSeverity.WARN
    assert check.metadata["batch_keys_flagged"].value == 2
    assert check.metadata["kinds_found"].value == {
        "chart-p4471x9": ["id"],
        "records_Larkspur": ["name"],
    }


def test_a_first_batch_whose_leak_scan_fails_is_reported_not_published(
    tmp_path: Path, materialize_batch: Callable[..., Any]
) -> None:
    """The very first batch of a warehouse fails its leak scan (a patient's MRN sent as a local
    code): nothing is published, and the step says so (its materialisation, its failed check)
    instead of failing on a release table that does not exist yet."""
    mrn = "MRN88014417"
    records = [
        {
            "resourceType": "Patient",
            "id": "p1",
            "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.5", "value": mrn}],
        },
        {
            "resourceType": "Observation",
            "id": "o1",
            "status": "final",
            "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"system": "urn:oid:1.2.3", "code": mrn}]},
        },
    ]
    batch = tmp_path / "landing" / "b1"
    batch.mkdir(parents=True)
    (batch / "data.ndjson").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    result = materialize_batch(batch.parent, "b1", raise_on_error=False)
    failures = [e for e in result.all_events if e.is_step_failure]
    assert all("CatalogException" not in str(e.event_specific_data) for e in failures)
    deid = result.asset_materializations_for_node("deid_resources")[0].metadata
    assert deid["published"].value is False and deid["dagster/row_count"].value == 0
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["phi_leak_scan"] is False


def test_a_batch_changed_since_the_sensor_requested_it_is_not_ingested(
    tmp_path: Path, key_file: Path
) -> None:
    """The landing sensor requested the batch as its folder was; a new delivery into the same
    folder started while the run was queued: the run fails, nothing of the half-copied folder
    is ingested or published. A run requested for the folder as it is now ingests it, as does a
    re-execution from the UI (the folder may have been fixed since)."""
    landing = _landing(tmp_path)
    requested = batch_source(landing, "export-1").fingerprint
    patient = orjson.dumps({"resourceType": "Patient", "id": "p2", "gender": "male"})
    (landing / "export-1" / "more.ndjson").write_bytes(patient + b"\n")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("batches", ["export-1"])
    resources = build_resources(str(tmp_path / "work"), str(landing), str(key_file), 1)

    def run(tags: dict[str, str]) -> Any:
        return materialize(
            batch_assets,
            partition_key="export-1",
            instance=instance,
            resources=resources,
            tags=tags,
            raise_on_error=False,
        )

    stale = run({FINGERPRINT_TAG: requested})
    assert not stale.success
    assert not stale.asset_materializations_for_node("ingest")
    assert not stale.asset_materializations_for_node("deid_resources")
    assert "BatchChangedError" in str(stale.get_step_failure_events()[0].event_specific_data)
    reexecuted = run({FINGERPRINT_TAG: requested, PARENT_RUN_TAG: "0" * 36})
    assert reexecuted.success
    current = run({FINGERPRINT_TAG: batch_source(landing, "export-1").fingerprint})
    assert current.success
    vault = current.asset_materializations_for_node("ingest")[0].metadata
    assert vault["accepted"].value == 3


def test_a_batch_changed_during_its_read_fails_saying_its_read_is_in_the_vault(
    tmp_path: Path, key_file: Path, monkeypatch: Any
) -> None:
    """A new delivery into the folder while the ingest reads it: the run fails after the read,
    whose records are in the vault (the ledger counts them), and nothing is de-identified; the
    error says so rather than that nothing was ingested."""
    from pipelines.assets import ingest as ingest_assets

    landing = _landing(tmp_path)
    requested = batch_source(landing, "export-1").fingerprint
    real_ingest = ingest_assets.ingest_batch

    def ingest_then_delivered(*args: Any, **kwargs: Any) -> Any:
        report = real_ingest(*args, **kwargs)
        patient = orjson.dumps({"resourceType": "Patient", "id": "p2", "gender": "male"})
        (landing / "export-1" / "more.ndjson").write_bytes(patient + b"\n")
        return report

    monkeypatch.setattr(ingest_assets, "ingest_batch", ingest_then_delivered)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("batches", ["export-1"])
    resources = build_resources(str(tmp_path / "work"), str(landing), str(key_file), 1)
    result = materialize(
        batch_assets,
        partition_key="export-1",
        instance=instance,
        resources=resources,
        tags={FINGERPRINT_TAG: requested},
        raise_on_error=False,
    )
    assert not result.success
    assert not result.asset_materializations_for_node("deid_resources")
    failure = str(result.get_step_failure_events()[0].event_specific_data)
    assert "BatchChangedError" in failure and "while it was read" in failure
    assert "not ingested" not in failure and "in the vault but not de-identified" in failure
    con = duckdb.connect(str(tmp_path / "work" / "warehouse.duckdb"), read_only=True)
    try:
        (vault_rows,) = con.execute("SELECT count(*) FROM phi_vault").fetchone() or (0,)
    finally:
        con.close()
    assert vault_rows == 2  # the two records read before the new delivery


def test_a_file_gone_since_its_batch_was_listed_fails_nothing_naming_it(
    tmp_path: Path, materialize_batch: Callable[..., Any], monkeypatch: Any
) -> None:
    """A data file moved or removed from the folder between the batch's listing and the
    inventory of its sizes (an exporter still filling the folder) is counted with no bytes:
    no step fails with an error quoting its path, which Dagster would keep in its storage (the
    file's name can be a patient's); the ingest then fails the batch, the file gone when its
    read came to it, naming it by its pseudonym only."""
    from vault.landing import BatchSource

    landing = _landing(tmp_path)
    secret = landing / "export-1" / "Quillfeather_Marisol_MRN77123.ndjson"
    secret.write_bytes(orjson.dumps({"resourceType": "Patient", "id": "p9"}) + b"\n")
    real_listing = BatchSource.listing

    def listing_then_gone(self: BatchSource) -> Any:
        listed = real_listing(self)
        secret.unlink(missing_ok=True)
        return listed

    monkeypatch.setattr(BatchSource, "listing", listing_then_gone)
    instance = DagsterInstance.ephemeral()
    result = materialize_batch(landing, "export-1", instance, raise_on_error=False)
    inventory = result.asset_materializations_for_node("landing_batch")
    assert inventory and inventory[0].metadata["files"].value == 2
    events = " ".join(str(e) for e in instance.all_logs(result.run_id))
    assert "Quillfeather" not in events and "MRN77123" not in events


def _batch(landing: Path, key: str, good: bool) -> None:
    """A batch of two records: a Patient and a Condition when ``good``, two lines of broken
    JSON otherwise (every record quarantined)."""
    folder = landing / key
    folder.mkdir(parents=True, exist_ok=True)
    patient = f"p-{key}"
    lines = (
        [
            orjson.dumps({"resourceType": "Patient", "id": patient, "gender": "female"}),
            orjson.dumps(
                {
                    "resourceType": "Condition",
                    "id": f"c-{key}",
                    "subject": {"reference": f"Patient/{patient}"},
                    "code": {"text": "x"},
                }
            ),
        ]
        if good
        else [b'{"resourceType": "Patient", "id": ', b'{"resourceType": ']
    )
    (folder / "data.ndjson").write_bytes(b"\n".join(lines) + b"\n")


def _quarantine_rate(result: Any) -> Any:
    checks = result.get_asset_check_evaluations()
    (check,) = [c for c in checks if c.check_name == "quarantine_rate"]
    return check


def test_a_rejected_batch_keeps_the_warning_until_it_is_run_again_fixed(
    tmp_path: Path, materialize_batch: Callable[..., Any]
) -> None:
    """Dagster keeps one status per check, not per partition: a good batch after a rejected one
    still warns, naming the rejected batch, until that batch is run again with its records
    accepted."""
    landing = tmp_path / "landing"
    instance = DagsterInstance.ephemeral()
    _batch(landing, "broken", good=False)
    first = _quarantine_rate(materialize_batch(landing, "broken", instance))
    assert not first.passed and first.severity == AssetCheckSeverity.WARN
    _batch(landing, "fine", good=True)
    second = _quarantine_rate(materialize_batch(landing, "fine", instance))
    assert not second.passed
    assert second.metadata["rate"].value == 0.0  # the batch itself is fine
    assert second.metadata["other_batches_over_max_rate"].value == {"broken": 1.0}
    assert "broken (100%)" in (second.description or "")
    # the broken export sent again, fixed: its run passes, and so does the next batch's
    _batch(landing, "broken", good=True)
    assert _quarantine_rate(materialize_batch(landing, "broken", instance)).passed
    _batch(landing, "later", good=True)
    third = _quarantine_rate(materialize_batch(landing, "later", instance))
    assert third.passed and third.metadata["other_batches_over_max_rate"].value == {}


def test_a_batch_that_read_no_record_keeps_the_warning_in_later_batches(
    tmp_path: Path, materialize_batch: Callable[..., Any]
) -> None:
    """A batch ingested that read nothing (no record in the ledger) is over the rate too: a
    later good batch's check keeps warning and names it, until it is sent again with records."""
    landing = tmp_path / "landing"
    instance = DagsterInstance.ephemeral()
    (landing / "empty").mkdir(parents=True)
    (landing / "empty" / "data.ndjson").write_bytes(b"")
    assert not _quarantine_rate(materialize_batch(landing, "empty", instance)).passed
    _batch(landing, "fine", good=True)
    second = _quarantine_rate(materialize_batch(landing, "fine", instance))
    assert not second.passed
    assert second.metadata["other_batches_over_max_rate"].value == {"empty": 1.0}
    _batch(landing, "empty", good=True)
    assert _quarantine_rate(materialize_batch(landing, "empty", instance)).passed
