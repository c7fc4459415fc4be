"""Run the whole asset graph for an input folder in-process, as real Dagster runs.

A batch already done is not run again: ingested after its files last changed (the warehouse's
batch ledger, as the landing sensor reads it) and de-identified from that ingest under the
current settings, its rows holding today (the de-identification ledger,
:func:`deid.staging.deidentified_batches`). Its figures in the summary are the ones the warehouse
recorded. A batch ingested from its folder as it is now but not published from that ingest
under the current settings, or published but changed by the day (an earlier version of the
platform, a date of it crossing the age limit since or a new year:
:func:`deid.staging.day_changed_batches`, a run stopped before its de-identification) is
de-identified again from its vault rows, not ingested again (:func:`released_otherwise`). A
batch a later one took out of the de-identification ledger during the run is de-identified
again, and ingested again only when that would change its vault rows (:func:`ingest_again`).
A batch the warehouse holds whose folder is gone since its ingest (a landing folder cleaned
once ingested) is de-identified again alone, from the vault, when it is out of date or not
published from its ingest (:func:`kept_without_folder`): its rows follow the day as any
other batch's.
The release then runs as after any batch: incrementally, and with nothing to do when nothing
changed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from dagster import AssetsDefinition, DagsterInstance, materialize

from deid.release import release_totals
from deid.staging import deidentified_batches
from fhirlake.readers import DATA_SUFFIXES
from pipelines.assets.checks import RELEASE_CANARIES
from pipelines.assets.deid import deid_resources
from pipelines.assets.ingest import reconciliation_metadata
from pipelines.dagster_storage import storage_overrides
from pipelines.definitions import batch_assets, build_resources, release_run
from pipelines.landing_ledger import (
    LedgerEntry,
    current_settings,
    deidentification_alone,
    done_in_ledger,
    ingested_batches,
)
from pipelines.partitions import batch_partitions
from pipelines.publish import write_replacing
from pipelines.resources import DeidSettings, WarehouseResource
from pipelines.workdir import Workdir
from vault import warehouse
from vault.catalog import has_table
from vault.ingest import reconcile_batch, vault_totals
from vault.landing import BatchSource, describe_idle, discover_landing


class NoBatchError(FileNotFoundError):
    """The input folder holds no batch: no FHIR data file in it or its folders (the message
    says what it holds, by reason and count, never a name)."""


def open_instance(workdir: Workdir) -> DagsterInstance:
    """The instance in ``DAGSTER_HOME`` when set (so the UI shows these runs), otherwise a
    persistent one inside the workdir."""
    if os.environ.get("DAGSTER_HOME"):
        return DagsterInstance.get()
    return local_instance(workdir.dagster_home)


def local_instance(home: Path) -> DagsterInstance:
    """A persistent instance in ``home``, with the storage ``.dagster_home/dagster.yaml`` names
    (:mod:`pipelines.dagster_storage`) and, as there, no telemetry: Dagster would otherwise
    append a line per run event to ``$DAGSTER_HOME/logs`` or ``~/.dagster/logs`` (about 0.2 s
    of a release run after a small batch), and a hospital's platform keeps no usage records."""
    home.mkdir(parents=True, exist_ok=True)
    base = str(home.resolve())
    overrides = {**storage_overrides(base), "telemetry": {"enabled": False}}
    return DagsterInstance.local_temp(base, overrides=overrides)


def _recorded_reports(con: Any, batch_id: str, report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A done batch's reports as its run gave them: the ingest report the warehouse kept and
    the reconciliation counted again from the warehouse's tables."""
    rec = reconciliation_metadata(report, reconcile_batch(con, batch_id))
    return {"phi_vault": {"ingest_report": report}, "phi_vault:records_reconcile": rec}


def _batch_ledger(workdir: Workdir, settings: str | None = None) -> dict[str, LedgerEntry]:
    """The batch ledger as the landing sensor reads it (published under ``settings``, when
    given); while another process has the warehouse open (an erasure, another run), read once
    it is free, as the run's steps wait their turn: a ledger read as empty would ingest every
    batch of the folder again."""
    resource = WarehouseResource(workdir=str(workdir.root))
    ledger = ingested_batches(resource, settings)
    if ledger is None:
        warehouse.connect_when_free(workdir.warehouse, read_only=True).close()
        ledger = ingested_batches(resource, settings)
    return ledger or {}


def settled_batches(
    workdir: Workdir, batches: list[BatchSource], profile: str
) -> dict[str, dict[str, dict[str, Any]]]:
    """The batches a run need not touch again (see the module), with their recorded reports:
    done as the landing sensor judges it, and de-identified under the current settings."""
    ledger = _batch_ledger(workdir)
    fresh = [b.key for b in batches if done_in_ledger(b, ledger)]
    if not fresh:
        return {}
    settings = current_settings(profile)
    con = warehouse.connect_when_free(workdir.warehouse, read_only=True)
    try:
        done = deidentified_batches(con, settings)
        return _recorded(con, [key for key in fresh if key in done])
    finally:
        con.close()


def _recorded(con: Any, keys: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """The recorded reports of the batches ``keys`` (:func:`_recorded_reports`)."""
    reports = dict(
        con.execute(
            "SELECT batch_id, report FROM batches WHERE batch_id IN (SELECT unnest(?))", [keys]
        ).fetchall()
    )
    return {key: _recorded_reports(con, key, json.loads(report)) for key, report in reports.items()}


def _recorded_when_free(workdir: Workdir, keys: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """:func:`_recorded`, read once the warehouse is free; nothing opened for no key."""
    if not keys:
        return {}
    con = warehouse.connect_when_free(workdir.warehouse, read_only=True)
    try:
        return _recorded(con, keys)
    finally:
        con.close()


def released_otherwise(
    workdir: Workdir, batches: list[BatchSource], settled: set[str]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Of ``batches`` not ``settled``, the ones whose de-identification alone brings them up to
    date (:func:`pipelines.landing_ledger.deidentification_alone`), with their recorded
    reports: published from their ingest under other settings (an earlier version of the
    platform, whose leak scan or release rules differ: ``settings_digest``) or with a value
    the day now releases otherwise (``stable_until``), or not published from it yet. Their
    vault rows are what a new ingest of their folder would write; ingesting them again would
    seal the whole vault again, and refuse an erased patient's records once more as
    quarantined ones."""
    ledger = _batch_ledger(workdir)
    alone = [b.key for b in batches if b.key not in settled and deidentification_alone(b, ledger)]
    return _recorded_when_free(workdir, alone)


def kept_without_folder(
    workdir: Workdir, found: set[str], profile: str
) -> dict[str, dict[str, dict[str, Any]]]:
    """The batches the warehouse holds ingested whose folder is no longer in the input
    (``found``: the keys of the folders listed, readable or not) and that are not published
    from their ingest under the current settings with their rows holding today (a new year,
    another profile, an earlier version's rules, a run stopped before its de-identification),
    with their recorded reports. A landing folder is often cleaned once ingested: the vault
    holds the batch's rows, and its de-identification alone, from them, brings its release up
    to date, as for a batch whose folder is as ingested (:func:`released_otherwise`). One
    whose Patient references name another patient since (``refiled``) would need its folder
    to be ingested again, and is left as it is."""
    if not workdir.warehouse.exists():
        return {}
    ledger = _batch_ledger(workdir, current_settings(profile))
    gone = sorted(
        key
        for key, entry in ledger.items()
        if key not in found and not entry.published and not entry.refiled
    )
    return _recorded_when_free(workdir, gone)


def ingest_again(workdir: Workdir, batches: list[BatchSource]) -> set[str]:
    """Of ``batches``, taken out of the de-identification ledger by a later batch, the ones to
    ingest again too, not de-identify again only
    (:func:`pipelines.landing_ledger.deidentification_alone`)."""
    ledger = _batch_ledger(workdir)
    return {b.key for b in batches if not deidentification_alone(b, ledger)}


def _warehouse_totals(workdir: Workdir) -> dict[str, Any]:
    """The vault's and the release's totals after the run (none when no run made the
    warehouse: a first batch whose run failed before its ingest wrote anything)."""
    if not workdir.warehouse.exists():
        return {"vault_resources_current": 0, "vault_patients": 0, "release": {}}
    con = warehouse.connect_when_free(workdir.warehouse, read_only=True)
    try:
        current, patients = vault_totals(con)
        released = release_totals(con) if has_table(con, "deid_resources") else {}
    finally:
        con.close()
    return {"vault_resources_current": current, "vault_patients": patients, "release": released}


def run_pipeline(
    input_dir: Path,
    workdir: Workdir | Path,
    key_file: str | None = None,
    workers: int = 0,
) -> dict[str, Any]:
    """Materialise every asset for every batch found in ``input_dir`` that is not done yet, then
    the release; write and return the run summary (counts only). A batch whose folder cannot be
    read is left for the next run and named in the summary (``batches_not_read``), which then
    does not succeed; the other batches and the release run as without it."""
    started = time.perf_counter()
    workdir = workdir if isinstance(workdir, Workdir) else Workdir(Path(workdir))
    found = discover_landing(input_dir)
    batches = found.batches
    if not batches and found.unreadable:
        raise next(iter(found.unreadable.values()))
    if not batches:
        idle = "".join(f"; {said}" for said in describe_idle(found.idle))
        raise NoBatchError(
            f"no FHIR data files ({', '.join(DATA_SUFFIXES)}) in the input folder{idle}"
        )
    warehouse.private_folder(workdir.root)
    resources = build_resources(str(workdir.root), str(input_dir), key_file, workers)
    runs = []
    deidentified_again: list[str] = []
    batch_reports: dict[str, dict[str, dict[str, Any]]] = {}
    release: dict[str, dict[str, Any]] = {}
    deid_settings = resources["deid_settings"]
    assert isinstance(deid_settings, DeidSettings)
    settled = settled_batches(workdir, batches, deid_settings.profile)
    recorded = released_otherwise(workdir, batches, set(settled))
    listed = {b.key for b in batches} | set(found.unreadable)
    kept = kept_without_folder(workdir, listed, deid_settings.profile)
    with open_instance(workdir) as instance:
        existing = set(instance.get_dynamic_partitions(batch_partitions.name or "batches"))
        new = [key for key in [*(b.key for b in batches), *kept] if key not in existing]
        if new:
            instance.add_dynamic_partitions(batch_partitions.name or "batches", new)

        def run_batch(key: str, selection: list[AssetsDefinition] | None = None) -> None:
            result = materialize(
                batch_assets,
                selection=selection,
                partition_key=key,
                instance=instance,
                resources=resources,
                raise_on_error=False,
                tags={"ehr/entry": "ehr run"},
                run_config=_RUN_CONFIG,
            )
            runs.append(_run_record(key, result))
            # a batch de-identified again only keeps the ingest figures it had
            batch_reports[key] = {**batch_reports.get(key, {}), **stage_reports(result)}

        for batch in batches:
            if batch.key in settled:
                batch_reports[batch.key] = settled[batch.key]
                continue
            if batch.key in recorded:  # its ingest stands: de-identified again from it
                batch_reports[batch.key] = recorded[batch.key]
                run_batch(batch.key, [deid_resources])
                deidentified_again.append(batch.key)
                continue
            run_batch(batch.key)
        # a batch whose folder is gone since its ingest: de-identified again from the vault
        for key, reports in kept.items():
            batch_reports[key] = reports
            run_batch(key, [deid_resources])
            deidentified_again.append(key)
        # a batch ingested again can hand a vault row over to a settled batch that recorded
        # the same content as a repeat (vault.ingest), and a later batch can change what an
        # earlier one's conditional references name (deid.staging._unsettle_changed_targets):
        # that batch's ledger changed, and it is run again here, so that the release holds
        # what the vault holds now in this run already: de-identified again, and ingested
        # again only when that changes its vault rows (ingest_again)
        if runs:
            published = {key for key, reports in batch_reports.items() if _published(reports)}
            current = set(settled_batches(workdir, batches, deid_settings.profile))
            unsettled = [b for b in batches if b.key in (set(settled) | published) - current]
            ingest = ingest_again(workdir, unsettled) if unsettled else set()
            for batch in unsettled:
                settled.pop(batch.key, None)
                run_batch(batch.key, None if batch.key in ingest else [deid_resources])
                if batch.key not in ingest and batch.key not in deidentified_again:
                    deidentified_again.append(batch.key)
        # whole-release assets once, after every batch (a blocked batch blocks the release)
        if all(r["success"] for r in runs):
            result = _materialize_release(instance, resources, "ehr run")
            runs.append(_run_record(None, result))
            release = stage_reports(result)
    RELEASE_CANARIES.clear()  # PHI held in memory for the leak scans: not beyond the run
    summary = build_summary(
        batch_reports, release, runs, _warehouse_totals(workdir), _model_summary(workdir)
    )
    summary["stages"]["ingest"]["batches_already_done"] = sorted(settled)
    summary["stages"]["ingest"]["batches_deidentified_again"] = deidentified_again
    # a batch whose folder could not be read waits (the others ran) and fails the run
    summary["stages"]["ingest"]["batches_not_read"] = {
        key: str(error) for key, error in sorted(found.unreadable.items())
    }
    summary["success"] = summary["success"] and not found.unreadable
    summary["seconds"] = round(time.perf_counter() - started, 2)
    write_summary(workdir, summary)
    return summary


def write_summary(workdir: Workdir, summary: dict[str, Any]) -> None:
    """``run_summary.json`` replaced whole (a temporary file renamed over it): written in place,
    a run killed mid-write left a cut summary until the next run."""
    text = json.dumps(summary, indent=2)
    write_replacing(workdir.summary, lambda path: path.write_text(text, encoding="utf-8"))


# the run's log lines at INFO on the console (Dagster's default is DEBUG: every event)
_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def _materialize_release(instance: DagsterInstance, resources: dict[str, Any], entry: str) -> Any:
    """One run of the release assets (every asset over the whole release) and of the online
    store's freshness check after them, as a release run Dagster launches has them, tagged
    with the command that asked for it; its result, failed or not."""
    return materialize(
        release_run,
        instance=instance,
        resources=resources,
        raise_on_error=False,
        tags={"ehr/entry": entry},
        run_config=_RUN_CONFIG,
    )


def run_release(workdir: Workdir, key_file: str | None, entry: str) -> dict[str, Any]:
    """The release run alone, as ``ehr run`` runs it after its batches: k-anonymity over
    everyone released, the views, features, Feast and the model brought up to date with the
    warehouse. ``ehr forget`` runs it after an erasure, whose patient's group may have fallen
    below k. Returns the run's record (success, failed steps, check results; no values)."""
    resources = build_resources(str(workdir.root), None, key_file)
    with open_instance(workdir) as instance:
        result = _materialize_release(instance, resources, entry)
    RELEASE_CANARIES.clear()  # PHI held in memory for the leak scans: not beyond the run
    return _run_record(None, result)


def _run_record(batch: str | None, result: Any) -> dict[str, Any]:
    checks = {
        f"{c.asset_key.to_user_string()}:{c.check_name}": c.passed
        for c in result.get_asset_check_evaluations()
    }
    return {
        "batch": batch,
        "run_id": result.run_id,
        "success": result.success,
        "checks": checks,
        "failed_steps": failed_steps(result),
    }


def failed_steps(result: Any) -> dict[str, str]:
    """Each failed step of a run and the class of its error: the step and the kind of failure,
    never the error's text (the run's event log in the UI has the rest)."""
    failed: dict[str, str] = {}
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE" and event.step_key is not None:
            error = event.step_failure_data.error
            failed[event.step_key] = _root_cause(error).cls_name if error is not None else "?"
    return failed


# the text of a worker process's traceback, which concurrent.futures chains to the error it
# raises again in the caller: that error is the one to name
_WORKER_TRACEBACK = "_RemoteTraceback"


def _root_cause(error: Any) -> Any:
    """The error the step raised: Dagster's own errors wrapping it unwrapped, but not the
    causes the platform chained to its own error (a tampered row's ``InvalidCiphertext``,
    raised from cryptography's ``InvalidTag``, was named ``InvalidTag``); for an error raised
    on a worker process, the error the worker raised."""
    while getattr(error, "cause", None) is not None and _dagster_wrapper(error):
        if getattr(error.cause, "cls_name", None) == _WORKER_TRACEBACK:
            break
        error = error.cause
    return error


def _dagster_wrapper(error: Any) -> bool:
    """An error of Dagster's (``DagsterExecutionStepExecutionError``), which wraps the one an
    asset raised."""
    return str(getattr(error, "cls_name", "")).startswith("Dagster")


def _plain(value: Any) -> Any:
    """A metadata value as JSON: numbers, text, JSON documents; other kinds (tables, Markdown,
    paths) are left out of the summary."""
    raw = getattr(value, "value", value)
    return raw if isinstance(raw, int | float | str | bool | dict | list) else None


def _plain_all(metadata: dict[str, Any]) -> dict[str, Any]:
    plain = {key: _plain(value) for key, value in metadata.items()}
    return {key: value for key, value in plain.items() if value is not None}


def _published(reports: dict[str, dict[str, Any]]) -> bool:
    """Whether a batch run's reports show its batch published (a batch whose leak scan failed
    is not, and is not run again in the same ``ehr run``)."""
    return bool(reports.get("deid_resources", {}).get("published"))


def stage_reports(result: Any) -> dict[str, dict[str, Any]]:
    """What each asset of a run reported: asset key → its materialisation metadata; check
    metadata under ``asset:check``."""
    reports: dict[str, dict[str, Any]] = {}
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        reports[materialization.asset_key.to_user_string()] = _plain_all(materialization.metadata)
    for check in result.get_asset_check_evaluations():
        name = f"{check.asset_key.to_user_string()}:{check.check_name}"
        reports[name] = {"passed": check.passed, **_plain_all(check.metadata)}
    return reports


def _rows(reports: dict[str, dict[str, Any]], prefix: str) -> dict[str, int]:
    return {
        key.removeprefix(prefix): int(report["dagster/row_count"])
        for key, report in sorted(reports.items())
        if key.startswith(prefix) and ":" not in key and "dagster/row_count" in report
    }


def _batch_summary(batch: str, reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ingest = dict(reports.get("phi_vault", {}).get("ingest_report", {}))
    ingest.pop("batch_id", None)
    reconciliation = dict(reports.get("phi_vault:records_reconcile", {}))
    return {**ingest, "batch": batch, "reconciliation": reconciliation}


def build_summary(
    batch_reports: dict[str, dict[str, dict[str, Any]]],
    release: dict[str, dict[str, Any]],
    runs: list[dict[str, Any]],
    warehouse_totals: dict[str, Any],
    model: dict[str, Any],
) -> dict[str, Any]:
    """The run summary from the stage reports of the batches (their runs', or the warehouse's
    for batches already done) and the release run, and the warehouse's totals after it."""
    batches = [_batch_summary(key, reports) for key, reports in batch_reports.items()]
    totals = {
        name: sum(int(b.get(name, 0)) for b in batches)
        for name in ("records_in", "accepted", "quarantined", "files", "bytes_read")
    }
    deid = dict(warehouse_totals["release"])
    if "released_patients" in release:
        patients = release["released_patients"]
        deid["released_patients"] = patients.get("dagster/row_count", 0)
        # the patients of groups still below k, withheld from everything the release publishes
        deid["withheld_patients"] = patients.get("withheld", 0)
    return {
        "success": all(r["success"] for r in runs),
        "runs": runs,
        "stages": {
            "ingest": {
                **totals,
                "vault_resources_current": warehouse_totals["vault_resources_current"],
                "vault_patients": warehouse_totals["vault_patients"],
                "batches": batches,
            },
            "deid": deid,
            "views": _rows(release, "views/"),
            "features": _rows(release, "features/"),
            "models": {
                **{
                    f"readmission_{k}": v
                    for k, v in _rows(release, "readmission_").items()
                    if k != "model"
                },
                **model,
            },
        },
    }


def _model_summary(workdir: Workdir) -> dict[str, Any]:
    """Headline figures of the readmission model (its metrics document), when it was trained."""
    metrics_file = workdir.models / "readmission" / "metrics.json"
    if not metrics_file.exists():
        return {}
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    test = metrics.get("test") or {}
    return {
        "model": metrics.get("estimator"),
        "n_train": metrics.get("n_train"),
        "n_test": metrics.get("n_test"),
        "test_auroc": test.get("auroc"),
        "test_brier": test.get("brier"),
        "largest_subgroup_gap": metrics.get("largest_subgroup_gap"),
        "model_card": str(metrics_file.parent / "model_card.md"),
    }
