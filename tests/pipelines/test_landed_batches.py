"""The release's landed batches check: a complete landed batch the release does not hold (not
ingested, its run failed, changed since its ingest, a folder that cannot be read) is a warning on
``released_patients``, evaluated by every release run and reported by the landing sensor when a
batch's run fails, since no release runs then."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest
from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetCheckSeverity,
    AssetKey,
    DagsterInstance,
    DagsterRunMetadataValue,
    DagsterRunStatus,
    materialize,
)

from pipelines.assets.deid import _landed_batches_result
from pipelines.definitions import build_resources, release_assets
from pipelines.landing_ledger import LandedBacklog, LedgerEntry, landed_backlog
from pipelines.resources import LandingResource
from pipelines.sensors import (
    ATTEMPT_TAG,
    BATCH_TAG,
    FINGERPRINT_TAG,
    PARTITION_TAG,
    LandingNotReadError,
    _load_cursor,
)
from tests.pipelines.test_sensors import PATIENT, _ingested, _record_run, _removed, _tick
from vault.landing import batch_key, scan_landing

CHECK = "landed_batches_released"


def _batch(landing: Path, key: str, ready: bool = True, patient: bytes = PATIENT) -> Path:
    folder = landing / key
    folder.mkdir(parents=True)
    (folder / "data.ndjson").write_bytes(patient)
    if ready:
        (folder / "_READY").write_bytes(b"")
    return folder


def test_the_backlog_names_each_landed_batch_the_ledger_does_not_hold_as_it_is_now(
    tmp_path: Path, refuse_listing: Any
) -> None:
    landing = tmp_path / "landing"
    for key in ("done", "new", "stopped", "changed", "locked", "x y", batch_key("x y")):
        _batch(landing, key)
    _batch(landing, "arriving", ready=False)  # no marker, written just now
    (landing / "locked" / "sub").mkdir()
    fingerprints = {b.key: b.fingerprint for b in scan_landing(landing).batches}
    ledger = {
        "done": LedgerEntry(time.time(), fingerprints["done"]),
        # ingested, its run stopped before its de-identification
        "stopped": LedgerEntry(time.time(), fingerprints["stopped"], published=False),
        # de-identified from an earlier version of its folder
        "changed": LedgerEntry(time.time(), "an earlier fingerprint"),
        # ingested and de-identified, but gone from the landing folder since: not counted
        "gone": LedgerEntry(time.time(), "whatever"),
        # ingested, not de-identified, its folder gone since: its partition holds the release
        "gone-stopped": LedgerEntry(time.time(), "whatever", published=False),
    }
    allow = refuse_listing(landing / "locked" / "sub")
    try:
        backlog = landed_backlog(LandingResource(path=str(landing)), ledger, time.time())
    finally:
        allow()
    shared = batch_key("x y")
    assert backlog == LandedBacklog(
        not_ingested=["new"],
        not_deidentified=["gone-stopped", "stopped"],
        changed=["changed"],
        not_readable=["locked"],
        key_shared=[shared],
        waiting=1,
    )
    assert backlog.keys == sorted(["changed", "gone-stopped", "locked", "new", "stopped", shared])
    # once complete (quiet for the period) the folder arriving is a batch not held, and so is
    # the folder that can be read again
    later = landed_backlog(LandingResource(path=str(landing)), ledger, time.time() + 120)
    assert later.not_ingested == ["arriving", "locked", "new"]
    assert later.waiting == 0 and later.not_readable == []


def _release(tmp_path: Path, landing: Path, key_file: Path, instance: DagsterInstance) -> Any:
    result = materialize(
        release_assets,
        selection=["released_patients"],
        instance=instance,
        resources=build_resources(str(tmp_path / "work"), str(landing), str(key_file), 1),
    )
    (check,) = [c for c in result.get_asset_check_evaluations() if c.check_name == CHECK]
    return check


def test_every_release_run_warns_of_the_landed_batches_it_does_not_hold(
    tmp_path: Path, key_file: Path, materialize_batch: Callable[..., Any]
) -> None:
    landing = tmp_path / "landing"
    instance = DagsterInstance.ephemeral()
    patient = {"resourceType": "Patient", "id": "p1", "gender": "female"}
    first = _batch(landing, "export-1", patient=orjson.dumps(patient) + b"\n")
    materialize_batch(landing, "export-1", instance)
    _batch(landing, "export-2", patient=orjson.dumps({**patient, "id": "p2"}) + b"\n")
    _batch(landing, "export-3", ready=False)  # still arriving: not counted, only said

    check = _release(tmp_path, landing, key_file, instance)
    assert not check.passed and check.severity == AssetCheckSeverity.WARN
    assert check.metadata["batches_not_released"].value == 1
    assert check.metadata["not_ingested"].value == ["export-2"]
    assert check.metadata["waiting_to_complete"].value == 1
    assert check.description and "export-2 (not ingested)" in check.description

    # export-2 ingested; export-1 given a file more (a new delivery, its marker written again)
    materialize_batch(landing, "export-2", instance)
    (first / "more.ndjson").write_bytes(orjson.dumps({**patient, "id": "p3"}) + b"\n")
    os.utime(first / "_READY")
    check = _release(tmp_path, landing, key_file, instance)
    assert not check.passed
    assert check.metadata["changed_since_ingest"].value == ["export-1"]
    assert check.metadata["not_ingested"].value == []

    materialize_batch(landing, "export-1", instance)
    shutil.rmtree(landing / "export-3")
    check = _release(tmp_path, landing, key_file, instance)
    assert check.passed and check.metadata["batches_not_released"].value == 0


def _events(result: Any) -> list[AssetCheckEvaluation]:
    return [e for e in result.asset_events if isinstance(e, AssetCheckEvaluation)]


def test_the_sensor_reports_a_failed_batch_at_once_and_clears_it_when_the_folder_is_gone(
    tmp_path: Path,
) -> None:
    """No release runs after a failed batch run: the sensor reports the warning, once per
    change, and clears it once the batch is gone and the release holds every landed batch."""
    instance = DagsterInstance.ephemeral()
    landing = tmp_path / "landing"
    _batch(landing, "export-1")
    first = _tick(tmp_path, instance)
    assert _events(first) == []  # requested, not failed
    cursor = first.cursor
    fingerprint = _load_cursor(cursor)["export-1"].fingerprint
    for attempt in (1, 2):
        tags = {BATCH_TAG: "export-1", FINGERPRINT_TAG: fingerprint, ATTEMPT_TAG: str(attempt)}
        _record_run(instance, {**tags, PARTITION_TAG: "export-1"}, DagsterRunStatus.FAILURE)
        failed_run = instance.get_runs(limit=1)[0].run_id
        retry = _tick(tmp_path, instance, cursor, retry_backoff_seconds=0)
        assert [r.tags[ATTEMPT_TAG] for r in retry.run_requests] == [str(attempt + 1)]
        (event,) = _events(retry)
        assert event.asset_key.path == ["released_patients"] and event.check_name == CHECK
        assert not event.passed and event.severity == AssetCheckSeverity.WARN
        assert event.metadata["runs_failed"].value == {"export-1": attempt}
        # the latest failed run, linked (the UI opens its logs), and named by its id's start
        link = event.metadata["latest_failed_run export-1"]
        assert isinstance(link, DagsterRunMetadataValue) and link.run_id == failed_run
        assert (
            event.description
            and (
                f"export-1 (its run failed {attempt} time{'s' if attempt > 1 else ''}; "
                f"latest {failed_run[:8]})"
            )
            in event.description
        )
        # the same failures are reported once: not again while the retry is queued
        assert _events(_tick(tmp_path, instance, retry.cursor)) == []
        cursor = retry.cursor

    shutil.rmtree(landing / "export-1")  # the operator gives up on it
    gone = _tick(tmp_path, instance, cursor)
    (cleared,) = _events(gone)
    assert cleared.passed and cleared.metadata["batches_not_released"].value == 0
    assert _events(_tick(tmp_path, instance, gone.cursor)) == []


def test_the_sensor_reports_a_folder_it_cannot_read(tmp_path: Path, refuse_listing: Any) -> None:
    instance = DagsterInstance.ephemeral()
    landing = tmp_path / "landing"
    locked = _batch(landing, "export-1") / "sub"
    locked.mkdir()
    allow = refuse_listing(locked)
    try:
        result = _tick(tmp_path, instance)
    finally:
        allow()
    (event,) = _events(result)
    assert not event.passed and event.metadata["not_readable"].value == ["export-1"]
    assert event.description and "export-1 (its folder cannot be read)" in event.description


def test_a_landing_folder_that_cannot_be_listed_is_a_warning_naming_no_path(
    tmp_path: Path, refuse_listing: Any
) -> None:
    landing = tmp_path / "landing_Quillfeather"
    _batch(landing, "export-1")
    allow = refuse_listing(landing)
    try:
        result = _landed_batches_result(
            LandingResource(path=str(landing)), duckdb.connect(":memory:")
        )
    finally:
        allow()
    assert not result.passed and result.severity == AssetCheckSeverity.WARN
    assert result.description == (
        "not known whether every landed batch is in the release: the landing folder could not "
        "be listed (PermissionError)"
    )
    assert "Quillfeather" not in str(result.metadata)


def _failed_once(tmp_path: Path, instance: DagsterInstance, key: str) -> Any:
    """The batch ``key`` landed, its first run failed, the failure reported (a retry an hour
    away); the tick."""
    first = _tick(tmp_path, instance)
    fingerprint = _load_cursor(first.cursor)[key].fingerprint
    tags = {BATCH_TAG: key, FINGERPRINT_TAG: fingerprint, ATTEMPT_TAG: "1"}
    _record_run(instance, tags, DagsterRunStatus.FAILURE)
    failed = _tick(tmp_path, instance, first.cursor, retry_backoff_seconds=3600)
    (event,) = _events(failed)
    assert not event.passed
    return failed


def test_a_failed_batch_delivered_again_stays_failing_until_it_is_run(tmp_path: Path) -> None:
    """A new file copied into the failed batch's folder, its marker not touched: the folder is
    incomplete (the quiet period), and its partition still holds the release back. The warning
    flipped to passing there, and back to failing once the new delivery failed too."""
    instance = DagsterInstance.ephemeral()
    folder = _batch(tmp_path / "landing", "export-1")
    failed = _failed_once(tmp_path, instance, "export-1")
    (folder / "more.ndjson").write_bytes(PATIENT)
    again = _tick(tmp_path, instance, failed.cursor, retry_backoff_seconds=3600)
    assert _events(again) == []  # still the failure reported: nothing new to say


def test_the_warning_is_not_cleared_while_a_batch_partition_holds_the_release_back(
    tmp_path: Path,
) -> None:
    """The failed batch was ingested, its de-identification failed, and its folder was removed:
    its partition is kept (the vault holds its rows), and the release waits for it for good.
    The sensor said passing there."""
    instance = DagsterInstance.ephemeral()
    landing = tmp_path / "landing"
    _batch(landing, "export-1")
    instance.add_dynamic_partitions("batches", ["export-1"])
    failed = _failed_once(tmp_path, instance, "export-1")
    _ingested(tmp_path, "export-1", published=False)
    shutil.rmtree(landing / "export-1")
    gone = _tick(tmp_path, instance, failed.cursor)
    assert _removed(gone) == []  # kept
    assert _events(gone) == []  # the warning stands
    assert _events(_tick(tmp_path, instance, gone.cursor)) == []


def test_a_release_not_published_does_not_say_it_holds_every_batch(
    tmp_path: Path,
    key_file: Path,
    materialize_batch: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    landing = tmp_path / "landing"
    instance = DagsterInstance.ephemeral()
    patient = {"resourceType": "Patient", "id": "p1", "gender": "female"}
    _batch(landing, "export-1", patient=orjson.dumps(patient) + b"\n")
    materialize_batch(landing, "export-1", instance)
    monkeypatch.setenv("EHR_DEID_K", "5")  # one patient: below k, nothing published
    monkeypatch.setenv("EHR_MAX_WITHHELD_SHARE", "0")
    result = materialize(
        release_assets,
        selection=["released_patients"],
        instance=instance,
        resources=build_resources(str(tmp_path / "work"), str(landing), str(key_file), 1),
        raise_on_error=False,
    )
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert not checks["k_anonymity"].passed
    assert not checks[CHECK].passed and checks[CHECK].description == (
        "not known whether every landed batch is in the release: this release was not "
        "published (k_anonymity)"
    )


def _check_history(instance: DagsterInstance) -> list[AssetCheckEvaluation]:
    """The landed batches check's evaluations, newest first."""
    key = AssetCheckKey(AssetKey("released_patients"), CHECK)
    records = instance.event_log_storage.get_asset_check_execution_history(key, limit=20)
    found = []
    for record in records:
        assert record.event is not None and record.event.dagster_event is not None
        found.append(record.event.dagster_event.event_specific_data)
    return found


@pytest.mark.parametrize("cause", ["not listable", "a key shared"])
def test_a_landing_folder_the_sensor_cannot_read_fails_its_tick_and_the_check_says_why(
    tmp_path: Path, refuse_listing: Any, cause: str
) -> None:
    """The tick fails (Dagster shows the sensor's error), and the release's check, which
    would otherwise keep what it last said of batches the sensor can no longer see, says the
    landing folder could not be read: once, not at every failing tick, naming no path (the
    error's type) or the keys two folders share (never the folders). Cleared once the folder
    can be read and the release holds every landed batch."""
    instance = DagsterInstance.ephemeral()
    landing = tmp_path / "landing"
    landing.mkdir()
    assert _events(_tick(tmp_path, instance)) == []
    shared = batch_key("x y")  # a folder literally named like the other's key
    if cause == "not listable":
        allow = refuse_listing(landing)
        why = "the landing folder could not be listed (PermissionError)"
    else:
        _batch(landing, "x y")
        _batch(landing, shared)

        def allow() -> None:
            for name in ("x y", shared):
                shutil.rmtree(landing / name)

        why = f"2 landing folders share the batch key(s) {shared}: rename them"
    try:
        for _ in range(2):
            with pytest.raises(LandingNotReadError):
                _tick(tmp_path, instance)
    finally:
        allow()
    (reported,) = _check_history(instance)
    assert not reported.passed and reported.severity == AssetCheckSeverity.WARN
    assert reported.description and reported.description.startswith(
        f"not known whether every landed batch is in the release: {why}"
    )
    shown = f"{reported.description} {reported.metadata}"
    assert str(tmp_path) not in shown and "x y" not in shown
    cleared = _tick(tmp_path, instance)
    (event,) = _events(cleared)
    assert event.passed and event.metadata["batches_not_released"].value == 0
    instance.report_runless_asset_event(event)  # as the daemon records a tick's events
    assert _events(_tick(tmp_path, instance, cleared.cursor)) == []
    assert [e.passed for e in _check_history(instance)] == [True, False]
