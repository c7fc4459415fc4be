"""The whole pipeline through `ehr run`: real Dagster runs in tmp_path, then a PHI scan of every
file the run wrote."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import duckdb
import pytest
from click.testing import CliRunner
from phi_canaries import (
    ciphertexts_spelling_canaries,
    patient_birth_dates,
    patient_canaries,
    released_birth_date_leaks,
    scan_for_canaries,
)

from deid import staging
from fhirlake.synthetic import generate
from pipelines import landing_ledger
from pipelines.bench.release import release_digests
from pipelines.cli import main
from pipelines.run import run_pipeline
from pipelines.workdir import Workdir

pytestmark = pytest.mark.e2e


# warns only (non-blocking): a release of a few dozen patients is too small to train on
ADVISORY_CHECKS = {"readmission_model:auroc_beats_chance"}


def _assert_accounted(summary: dict) -> None:
    for run in summary["runs"]:
        assert all(v for k, v in run["checks"].items() if k not in ADVISORY_CHECKS), run
    checks = {k for r in summary["runs"] for k in r["checks"]}
    assert "released_patients:k_anonymity" in checks
    assert "views/observation:phi_leak_scan" in checks
    assert "features/patient_labs_vitals:phi_leak_scan" in checks
    # the release run evaluates the online store's freshness after the store, as a release run
    # Dagster launches does (its result is in the loop above: passed)
    assert "feast_online_store:online_store_freshness" in checks
    assert summary["stages"]["views"]["patient"] > 0
    assert summary["stages"]["features"]["patient_demographics"] > 0
    deid = summary["stages"]["deid"]
    assert deid["released"] == summary["stages"]["ingest"]["vault_resources_current"]
    ingest = summary["stages"]["ingest"]
    assert ingest["records_in"] == ingest["accepted"] + ingest["quarantined"]
    for batch in ingest["batches"]:
        assert batch["reconciliation"]["passed"], batch["batch"]


def test_synthetic_with_defects_end_to_end(tmp_path: Path, key_file: Path) -> None:
    landing = tmp_path / "landing"
    gen = generate(landing / "bundles", 40, seed=11, fmt="bundle", defect_rate=0.03)
    generate(landing / "bulk", 40, seed=12, fmt="ndjson", defect_rate=0.03)
    workdir = tmp_path / "work"
    summary = run_pipeline(landing, workdir, workers=2)
    assert summary["success"]
    _assert_accounted(summary)
    ingest = summary["stages"]["ingest"]
    assert ingest["quarantined"] > 0
    assert ingest["vault_patients"] >= 80
    on_disk = json.loads((workdir / "run_summary.json").read_text())
    assert on_disk["stages"]["ingest"]["records_in"] == ingest["records_in"]
    assert gen.patients == 40

    # every writer of the release (staging, the Patients' generalisation) kept each row's
    # digest, which the views compare, equal to the hash of its text as it is now
    con = duckdb.connect(str(Workdir(workdir).warehouse), read_only=True)
    try:
        ((stale, rows),) = con.execute(
            "SELECT count(*) FILTER (WHERE digest IS DISTINCT FROM hash(resource)), count(*) "
            "FROM deid_resources"
        ).fetchall()
    finally:
        con.close()
    assert (stale, rows > 0) == (0, True)

    canaries = patient_canaries(landing)
    assert len(canaries) > 200
    births = patient_birth_dates(landing)
    chance = ciphertexts_spelling_canaries(Workdir(workdir).warehouse, key_file, canaries)
    assert scan_for_canaries(workdir, canaries, set(births.values()), chance) == {}
    assert released_birth_date_leaks(workdir, key_file, births) == []


def test_a_second_run_runs_only_the_batch_whose_files_changed(
    tmp_path: Path, key_file: Path
) -> None:
    landing, work = tmp_path / "landing", tmp_path / "work"
    generate(landing / "a", 8, seed=3)
    generate(landing / "b", 3, seed=4)
    first = run_pipeline(landing, work, workers=1)
    released = release_digests(Workdir(work).warehouse)
    # the generator numbers its Practitioners' NPIs from 9999000001 in every cohort, under new
    # ids: b brings a second holder of the NPIs a's references name, so a is released again in
    # the same run (its references now name no one, as b's do)
    assert first["success"] and [r["batch"] for r in first["runs"]] == ["a", "b", "a", None]

    # nothing changed: no batch run, the same figures (as the warehouse recorded them), and a
    # release run that finds nothing to do and leaves every released table as it was
    second = run_pipeline(landing, work, workers=1)
    assert second["success"] and [r["batch"] for r in second["runs"]] == [None]
    assert second["stages"]["ingest"]["batches_already_done"] == ["a", "b"]
    assert second["stages"]["ingest"]["batches"] == first["stages"]["ingest"]["batches"]
    for figure in ("records_in", "accepted", "vault_resources_current", "vault_patients"):
        assert second["stages"]["ingest"][figure] == first["stages"]["ingest"][figure]
    assert second["stages"]["deid"] == first["stages"]["deid"]
    assert release_digests(Workdir(work).warehouse) == released

    # a file of batch b written again (same content, newer time): b alone runs again, and a
    # batch ingested again from the same records gives the same outcomes and release
    newer = time.time() + 5
    for path in (landing / "b").iterdir():
        os.utime(path, (newer, newer))
    third = run_pipeline(landing, work, workers=1)
    assert third["success"] and [r["batch"] for r in third["runs"]] == ["b", None]
    assert third["stages"]["ingest"]["batches_already_done"] == ["a"]
    assert (
        third["stages"]["ingest"]["batches"][1]["outcomes"]
        == (first["stages"]["ingest"]["batches"][1]["outcomes"])
    )
    assert release_digests(Workdir(work).warehouse) == released


def test_synthea_sample_leaves_no_phi(tmp_path: Path, key_file: Path, shared_data: Path) -> None:
    landing = tmp_path / "landing"
    shutil.copytree(shared_data / "synthea_small", landing)  # tmp copy: file names carry names
    summary = run_pipeline(landing, tmp_path / "work", workers=2)
    assert summary["success"]
    _assert_accounted(summary)
    assert summary["stages"]["ingest"]["quarantined"] == 0
    canaries = patient_canaries(landing)
    assert any("Neomi684" in c for c in canaries)
    births = patient_birth_dates(landing)
    assert births["b2043822-8861-e93b-2374-b3c4f4dce1d8"] == "1977-07-27"
    chance = ciphertexts_spelling_canaries(Workdir(tmp_path / "work").warehouse, key_file, canaries)
    assert scan_for_canaries(tmp_path / "work", canaries, set(births.values()), chance) == {}
    assert released_birth_date_leaks(tmp_path / "work", key_file, births) == []


def test_run_pipeline_over_a_folder_without_data_names_what_it_found(tmp_path: Path) -> None:
    (tmp_path / "in" / "export").mkdir(parents=True)
    (tmp_path / "in" / "export" / "Patient.xml").write_bytes(b"<Patient/>")
    with pytest.raises(FileNotFoundError) as raised:
        run_pipeline(tmp_path / "in", tmp_path / "work")
    assert str(raised.value) == (
        "no FHIR data files (.json, .ndjson, .json.gz, .ndjson.gz) in the input folder; 1 folder "
        "(its name not shown) holds no FHIR data file (.json, .ndjson, .json.gz, .ndjson.gz) to "
        "read, not a batch (not read: not a FHIR data file extension: 1)"
    )
    assert not (tmp_path / "work").exists()


def _release_tables(warehouse: Path) -> dict[str, str]:
    """A content digest of every table of the release: the released and withheld resources,
    the released and withheld patients, the views, features and model tables."""
    digests = release_digests(warehouse)
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        for table in ("deid_resources", "deid_errors", "withheld_patients"):
            ((digest,),) = con.execute(
                f"SELECT count(*) || ':' || coalesce(sum(hash(t)), 0) FROM {table} t"
            ).fetchall()
            digests[table] = str(digest)
    finally:
        con.close()
    return digests


def _ingested_at(warehouse: Path) -> dict[str, object]:
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        return dict(con.execute("SELECT batch_id, ingested_at FROM batches").fetchall())
    finally:
        con.close()


def _view_batches(warehouse: Path) -> dict[str, set[tuple[str, int]]]:
    """Per view, the batches (and their digests) its last leak scan covered."""
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        rows = con.execute("SELECT view, batch_id, digest FROM release_state.view_batches")
        scanned: dict[str, set[tuple[str, int]]] = {}
        for view, batch, digest in rows.fetchall():
            scanned.setdefault(str(view), set()).add((str(batch), int(digest)))
        return scanned
    finally:
        con.close()


def _released_rows(warehouse: Path, batch: str) -> set[tuple[str, str]]:
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        rows = con.execute(
            "SELECT id, resource::VARCHAR FROM deid_resources WHERE batch_id = ?", [batch]
        ).fetchall()
        return {(str(key), str(resource)) for key, resource in rows}
    finally:
        con.close()


def test_a_batch_a_later_cohort_leaves_without_practitioners_is_only_deidentified_again(
    tmp_path: Path, key_file: Path
) -> None:
    """Two cohorts generated apart number their Practitioners' NPIs alike: b2 makes the NPIs
    b1's references name ambiguous, so b1's release changes (its references name no one). Its
    vault rows do not (an ingest files records by Patient references only): b1 is de-identified
    again, not ingested again, and the release equals one of both batches run at once."""
    landing, work = tmp_path / "landing", tmp_path / "work"
    generate(landing / "b1", 5, seed=3)
    assert run_pipeline(landing, work, workers=1)["success"]
    before = _ingested_at(Workdir(work).warehouse)
    b1_released = _released_rows(Workdir(work).warehouse, "b1")
    generate(landing / "b2", 2, seed=4)
    second = run_pipeline(landing, work, workers=1)
    assert second["success"] and [r["batch"] for r in second["runs"]] == ["b2", "b1", None]
    assert _ingested_at(Workdir(work).warehouse)["b1"] == before["b1"]
    assert second["stages"]["ingest"]["batches_deidentified_again"] == ["b1"]
    assert second["stages"]["ingest"]["batches"][0]["records_in"] > 0  # as recorded
    changed = b1_released - _released_rows(Workdir(work).warehouse, "b1")
    assert changed and all("Practitioner" in resource for _, resource in changed)
    released = _release_tables(Workdir(work).warehouse)

    at_once = tmp_path / "at_once"
    assert run_pipeline(landing, at_once, workers=1)["success"]
    assert _release_tables(Workdir(at_once).warehouse) == released


def test_a_batch_released_under_other_settings_is_deidentified_again_not_ingested_again(
    tmp_path: Path,
    key_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """A batch published under other de-identification settings (an earlier version of the
    platform whose leak scan had fewer rules) is de-identified again from its
    vault rows as they stand: its folder is as it was ingested, so a new ingest would write the
    same rows (the whole vault sealed again at an upgrade). After an
    erasure, that ingest refused the erased patient's records once more, and the batch counted
    them as quarantined, over the quarantine rate, where a fresh build counts none."""
    landing, work = tmp_path / "landing", tmp_path / "work"
    gen = generate(landing / "a", 6, seed=3)
    assert run_pipeline(landing, work, workers=1)["success"]
    warehouse = Workdir(work).warehouse
    con = duckdb.connect(str(warehouse))
    try:
        ((erased,),) = con.execute(
            "SELECT patient_key FROM phi_vault WHERE resource_type = 'Patient' LIMIT 1"
        ).fetchall()
    finally:
        con.close()
    assert gen.patients == 6
    result = CliRunner().invoke(
        main,
        ["forget", str(erased), "--pseudonym", "--reason", "REQ-1", "--workdir", str(work)],
    )
    assert result.exit_code == 0, result.output
    first = run_pipeline(landing, work, workers=1)
    assert first["success"] and [r["batch"] for r in first["runs"]] == [None]
    before = _ingested_at(warehouse)
    released = _release_tables(warehouse)
    scanned = _view_batches(warehouse)

    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        quarantined = con.execute("SELECT count(*) FROM quarantine").fetchone()
    finally:
        con.close()
    # an upgrade: other settings (a leak-scan rule added), as every reader of them sees them
    digest = staging.settings_digest

    def upgraded(*args: Any, **kwargs: Any) -> str:
        return digest(*args, **kwargs) + "+upgraded"

    monkeypatch.setattr(staging, "settings_digest", upgraded)
    monkeypatch.setattr(landing_ledger, "settings_digest", upgraded)
    landing_ledger.current_settings.cache_clear()
    request.addfinalizer(landing_ledger.current_settings.cache_clear)

    second = run_pipeline(landing, work, workers=1)
    assert second["success"] and [r["batch"] for r in second["runs"]] == ["a", None]
    assert second["stages"]["ingest"]["batches_deidentified_again"] == ["a"]
    assert _ingested_at(warehouse) == before
    assert second["stages"]["ingest"]["batches"] == first["stages"]["ingest"]["batches"]
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM quarantine").fetchone() == quarantined
    finally:
        con.close()
    assert _release_tables(warehouse) == released
    # the views searched the batch's patients' kept rows for their birth dates again, as after
    # a new ingest: the leak scan's rules are among the settings, which changed
    rescanned = _view_batches(warehouse)
    assert rescanned.keys() == scanned.keys() and all(
        rescanned[view] != scanned[view] for view in scanned
    )

    third = run_pipeline(landing, work, workers=1)
    assert third["success"] and [r["batch"] for r in third["runs"]] == [None]
    assert third["stages"]["ingest"]["batches_already_done"] == ["a"]
