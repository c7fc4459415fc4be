"""Run the whole asset graph for an input folder in-process, as real Dagster runs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from dagster import DagsterInstance, materialize

from pipelines.definitions import batch_assets, build_resources, release_assets
from pipelines.partitions import batch_partitions
from pipelines.workdir import Workdir
from vault import warehouse
from vault.ingest import reconcile_batch
from vault.landing import discover_batches


def open_instance(workdir: Workdir) -> DagsterInstance:
    """The instance in ``DAGSTER_HOME`` when set (so the UI shows these runs), otherwise a
    persistent one inside the workdir."""
    if os.environ.get("DAGSTER_HOME"):
        return DagsterInstance.get()
    home = workdir.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    return DagsterInstance.local_temp(str(home.resolve()))


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
    summary = build_summary(workdir, [b.key for b in batches], runs)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    workdir.summary.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def _run_record(batch: str | None, result: Any) -> dict[str, Any]:
    checks = {
        f"{c.asset_key.to_user_string()}:{c.check_name}": c.passed
        for c in result.get_asset_check_evaluations()
    }
    return {"batch": batch, "run_id": result.run_id, "success": result.success, "checks": checks}


def build_summary(
    workdir: Workdir, batch_keys: list[str], runs: list[dict[str, Any]]
) -> dict[str, Any]:
    con = warehouse.connect(workdir.warehouse, read_only=True)
    try:
        reports = {
            key: json.loads(report)
            for key, report in con.execute(
                "SELECT batch_id, report FROM batches WHERE report IS NOT NULL"
            ).fetchall()
        }
        batches = []
        for key in batch_keys:
            report = reports.get(key, {})
            batches.append(
                {
                    **{k: v for k, v in report.items() if k != "batch_id"},
                    "batch": key,
                    "reconciliation": reconcile_batch(con, key).to_dict(),
                }
            )
        vault_row = con.execute(
            "SELECT count(*), count(DISTINCT patient_key) FROM phi_vault_current"
        ).fetchall()[0]
        deid = _deid_summary(con)
        released = {schema: _schema_rows(con, schema) for schema in ("views", "features", "models")}
    finally:
        con.close()
    ingest_totals = {
        name: sum(int(b.get(name, 0)) for b in batches)
        for name in ("records_in", "accepted", "quarantined", "files", "bytes_read")
    }
    return {
        "success": all(r["success"] for r in runs),
        "runs": runs,
        "stages": {
            "ingest": {
                **ingest_totals,
                "vault_resources_current": int(vault_row[0]),
                "vault_patients": int(vault_row[1]),
                "batches": batches,
            },
            "deid": deid,
            "views": released["views"],
            "features": released["features"],
            "models": {**released["models"], **_model_summary(workdir)},
        },
    }


def _schema_rows(con: Any, schema: str) -> dict[str, int]:
    """Row count of every table of a schema (views, features, models)."""
    tables = [
        r[0]
        for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = ? ORDER BY 1", [schema]
        ).fetchall()
    ]
    return {
        t: int(con.execute(f'SELECT count(*) FROM {schema}."{t}"').fetchall()[0][0]) for t in tables
    }


def _model_summary(workdir: Workdir) -> dict[str, Any]:
    """Headline figures of the readmission model, when it was trained."""
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


def _deid_summary(con: Any) -> dict[str, Any]:
    tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    if "deid_resources" not in tables:
        return {}
    released = dict(
        con.execute(
            "SELECT resource_type, count(*) FROM deid_resources GROUP BY 1 ORDER BY 1"
        ).fetchall()
    )
    withheld = dict(
        con.execute("SELECT reason_code, count(*) FROM deid_errors GROUP BY 1").fetchall()
    )
    out: dict[str, Any] = {
        "released": sum(released.values()),
        "released_by_type": released,
        "withheld": withheld,
    }
    if "released_patients" in tables:
        out["released_patients"] = con.execute("SELECT count(*) FROM released_patients").fetchall()[
            0
        ][0]
    return out
