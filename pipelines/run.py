"""Run the whole asset graph for an input folder in-process, as real Dagster runs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from dagster import DagsterInstance, materialize

from pipelines.assets.checks import RELEASE_CANARIES
from pipelines.dagster_storage import storage_overrides
from pipelines.definitions import batch_assets, build_resources, release_assets
from pipelines.partitions import batch_partitions
from pipelines.workdir import Workdir
from vault.landing import discover_batches


def open_instance(workdir: Workdir) -> DagsterInstance:
    """The instance in ``DAGSTER_HOME`` when set (so the UI shows these runs), otherwise a
    persistent one inside the workdir."""
    if os.environ.get("DAGSTER_HOME"):
        return DagsterInstance.get()
    return local_instance(workdir.dagster_home)


def local_instance(home: Path) -> DagsterInstance:
    """A persistent instance in ``home``, with the storage ``.dagster_home/dagster.yaml`` names
    (:mod:`pipelines.dagster_storage`)."""
    home.mkdir(parents=True, exist_ok=True)
    base = str(home.resolve())
    return DagsterInstance.local_temp(base, overrides=storage_overrides(base))


def run_pipeline(
    input_dir: Path,
    workdir: Workdir | Path,
    key_file: str | None = None,
    workers: int = 0,
) -> dict[str, Any]:
    """Materialise every asset for every batch found in ``input_dir``; write and return the
    run summary (counts only)."""
    started = time.perf_counter()
    workdir = workdir if isinstance(workdir, Workdir) else Workdir(Path(workdir))
    batches = discover_batches(input_dir)
    if not batches:
        raise FileNotFoundError("no FHIR data files (.json, .ndjson, .gz) in the input folder")
    workdir.root.mkdir(parents=True, exist_ok=True)
    resources = build_resources(str(workdir.root), str(input_dir), key_file, workers)
    runs = []
    batch_reports: dict[str, dict[str, dict[str, Any]]] = {}
    release: dict[str, dict[str, Any]] = {}
    with open_instance(workdir) as instance:
        existing = set(instance.get_dynamic_partitions(batch_partitions.name or "batches"))
        new = [b.key for b in batches if b.key not in existing]
        if new:
            instance.add_dynamic_partitions(batch_partitions.name or "batches", new)
        run_config = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
        for batch in batches:
            result = materialize(
                batch_assets,
                partition_key=batch.key,
                instance=instance,
                resources=resources,
                raise_on_error=False,
                tags={"ehr/entry": "ehr run"},
                run_config=run_config,
            )
            runs.append(_run_record(batch.key, result))
            batch_reports[batch.key] = stage_reports(result)
        # whole-release assets once, after every batch (a blocked batch blocks the release)
        if all(r["success"] for r in runs):
            result = materialize(
                release_assets,
                instance=instance,
                resources=resources,
                raise_on_error=False,
                tags={"ehr/entry": "ehr run"},
                run_config=run_config,
            )
            runs.append(_run_record(None, result))
            release = stage_reports(result)
    RELEASE_CANARIES.clear()  # PHI held in memory for the leak scans: not beyond the run
    summary = build_summary(workdir, batch_reports, release, runs)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    workdir.summary.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def _run_record(batch: str | None, result: Any) -> dict[str, Any]:
    checks = {
        f"{c.asset_key.to_user_string()}:{c.check_name}": c.passed
        for c in result.get_asset_check_evaluations()
    }
    return {"batch": batch, "run_id": result.run_id, "success": result.success, "checks": checks}


def _plain(value: Any) -> Any:
    """A metadata value as JSON: numbers, text, JSON documents; other kinds (tables, Markdown,
    paths) are left out of the summary."""
    raw = getattr(value, "value", value)
    return raw if isinstance(raw, int | float | str | bool | dict | list) else None


def _plain_all(metadata: dict[str, Any]) -> dict[str, Any]:
    plain = {key: _plain(value) for key, value in metadata.items()}
    return {key: value for key, value in plain.items() if value is not None}


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
    workdir: Workdir,
    batch_reports: dict[str, dict[str, dict[str, Any]]],
    release: dict[str, dict[str, Any]],
    runs: list[dict[str, Any]],
) -> dict[str, Any]:
    """The run summary from the stage reports of the batch runs and the release run."""
    batches = [_batch_summary(key, reports) for key, reports in batch_reports.items()]
    last = next(reversed(batch_reports.values()), {}) if batch_reports else {}
    vault = last.get("phi_vault", {})
    totals = {
        name: sum(int(b.get(name, 0)) for b in batches)
        for name in ("records_in", "accepted", "quarantined", "files", "bytes_read")
    }
    deid = dict(last.get("deid_resources", {}).get("release_totals", {}))
    if "released_patients" in release:
        deid["released_patients"] = release["released_patients"].get("dagster/row_count", 0)
    return {
        "success": all(r["success"] for r in runs),
        "runs": runs,
        "stages": {
            "ingest": {
                **totals,
                "vault_resources_current": int(vault.get("dagster/row_count", 0)),
                "vault_patients": int(vault.get("vault_patients", 0)),
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
                **_model_summary(workdir),
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
