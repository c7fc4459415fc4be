"""Stage ``models``: 30-day readmission labels from the views, the training set through the Feast
feature service ``readmission_v2``, and the trained model with its evaluation and model card."""

# No `from __future__ import annotations`: Dagster compares the `context` annotation at runtime.
import json
from collections.abc import Iterator

import duckdb
import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from pipelines.assets.deid import FOLLOWS_THE_VIEWS, RELEASE_INPUT, built_from_upstream
from pipelines.assets.ingest import WAREHOUSE_POOL
from pipelines.assets.plots import card_metadata, image_metadata
from pipelines.features.cohort import release_known_by
from pipelines.models.labels import readmission_labels_with_counts
from pipelines.models.retrain import DEFAULT_MIN_CHANGED_SHARE, retrain_decision
from pipelines.models.storage import (
    LABELS_TABLE,
    MODEL_DIR,
    TRAINING_SET_TABLE,
    models_dir,
    parquet_path,
    write_table,
)
from pipelines.models.training import (
    InsufficientTrainingDataError,
    ModelReport,
    load_model_report,
    train_readmission_model,
    withdraw_model,
)
from pipelines.models.training_refresh import TrainingSetRefresh
from pipelines.models.training_set import (
    AUDIT_COLUMNS,
    FEATURE_SERVICE,
    with_audit_attributes,
)
from pipelines.publish import remove_unpublished_versions
from pipelines.resources import DeidSettings, WarehouseResource

GROUP = "models"
MIN_AUROC = 0.6
FEAST_REGISTRY = AssetKey("feast_registry")


def censor_margin_days(settings: DeidSettings) -> int:
    """Dates are shifted per patient by up to the policy's range either way, so a patient's own
    data can end up to twice that range before the dataset's latest timestamp."""
    return 2 * settings.date_shift_days()


@asset(
    group_name=GROUP,
    # views.patient only adds deaths recorded on the patient; the label works without it.
    deps=[
        RELEASE_INPUT,
        AssetKey(["views", "encounter"]),
        AssetKey(["views", "consent"]),
        AssetKey(["views", "patient"]),
    ],
    pool=WAREHOUSE_POOL,
    kinds={"duckdb", "parquet"},
    automation_condition=FOLLOWS_THE_VIEWS,
)
def readmission_labels(
    context: AssetExecutionContext, warehouse: WarehouseResource, deid_settings: DeidSettings
) -> MaterializeResult:
    """30-day inpatient readmission label per eligible discharge (censored, died, opted-out
    excluded)."""
    margin = censor_margin_days(deid_settings)
    con = warehouse.connect()
    try:
        known_by = release_known_by(con, deid_settings.date_shift_days())
        labels, counts = readmission_labels_with_counts(con, margin, known_by)
        path = write_table(con, labels, LABELS_TABLE, warehouse.workdir)
    finally:
        con.close()
    return MaterializeResult(
        tags=built_from_upstream(context, context.asset_key),
        metadata={
            "dagster/row_count": counts.labelled,
            "rows": counts.labelled,
            "positives": counts.positives,
            "prevalence": counts.prevalence,
            "patients": int(labels["patient_id"].nunique()),
            "inpatient_discharges": counts.discharges,
            "excluded_censored": counts.censored,
            "excluded_died": counts.died,
            "excluded_opted_out": counts.opted_out,
            "excluded_transferred": counts.transferred,
            "excluded_imprecise_dates": counts.imprecise,
            "censor_margin_days": margin,
            "table": f"models.{LABELS_TABLE}",
            "parquet": MetadataValue.path(str(path)),
        },
    )


TRAINING_SET = AssetKey(TRAINING_SET_TABLE)
# Feast's offline store reads the feature tables through the applied registry; the online store
# is not read, so the two are brought up to date side by side (pipelines.assets.serving)
TRAINING_SET_SPEC = AssetSpec(
    TRAINING_SET,
    group_name=GROUP,
    deps=[RELEASE_INPUT, readmission_labels, FEAST_REGISTRY],
    kinds={"feast", "parquet"},
    automation_condition=FOLLOWS_THE_VIEWS,
    description="Label rows joined point-in-time to the `readmission_v2` feature service "
    "(Feast's rule; changed patients by DuckDB).",
)


def training_set_result(
    refresh: TrainingSetRefresh, workdir: str, tags: dict[str, str] | None = None
) -> MaterializeResult:
    """The training set's materialisation: counts, the feature columns and what is missing
    (``tags``: :func:`built_from_upstream`)."""
    training = refresh.frame
    path = parquet_path(workdir, TRAINING_SET_TABLE)
    features = [c for c in training.columns if c not in ("patient_id", "event_timestamp", "label")]
    return MaterializeResult(
        asset_key=TRAINING_SET,
        tags=tags,
        metadata={
            "dagster/row_count": len(training),
            "rows": len(training),
            "patients": int(training["patient_id"].nunique()),
            "feature_service": FEATURE_SERVICE,
            "refresh": refresh.mode,
            "patients_changed": refresh.patients_changed,
            "patients_removed": refresh.patients_removed,
            "features": MetadataValue.json(features),
            "missing_by_feature": MetadataValue.json(
                {c: int(training[c].isna().sum()) for c in features}
            ),
            "table": f"models.{TRAINING_SET_TABLE}",
            "parquet": MetadataValue.path(str(path)),
        },
    )


def model_metadata(report: ModelReport) -> dict[str, MetadataValue]:
    """Dagster metadata of a trained model: headline metrics, the model card as Markdown and
    the plots as images shown inline."""
    gap = report.largest_subgroup_gap
    gap_text = (
        f"{gap['attribute']} AUROC {gap['value']:.3f} ({gap['best_group']} vs {gap['worst_group']})"
        if gap
        else "not assessable"
    )
    nan = float("nan")
    metadata: dict[str, MetadataValue] = {
        "estimator": MetadataValue.text(report.estimator),
        "auroc": MetadataValue.float(report.auroc if report.auroc is not None else nan),
        "brier": MetadataValue.float(report.brier if report.brier is not None else nan),
        "prevalence": MetadataValue.float(
            report.prevalence if report.prevalence is not None else nan
        ),
        "n_train": MetadataValue.int(report.n_train),
        "n_test": MetadataValue.int(report.n_test),
        "largest_subgroup_gap": MetadataValue.text(gap_text),
        "subgroups_not_assessable": MetadataValue.json(report.too_small_subgroups),
        "features": MetadataValue.json(list(report.features)),
        "model": MetadataValue.path(str(report.model_path)),
        "metrics": MetadataValue.path(str(report.metrics_path)),
        "model_card_file": MetadataValue.path(str(report.model_card_path)),
        "model_card": card_metadata(report.model_card_path, report.plots),
    }
    # the honest headline: interval, or why there is no AUROC, and the temporal validation
    document = json.loads(report.metrics_path.read_text())
    test = document["test"]
    metadata["auroc_ci95"] = MetadataValue.json((test.get("ci95") or {}).get("auroc") or [])
    metadata["auroc_note"] = MetadataValue.text(test.get("auroc_note") or "")
    temporal = document.get("temporal_validation") or {}
    metadata["temporal_validation"] = MetadataValue.json(
        {
            key: (temporal.get("test") or {}).get(key)
            for key in ("auroc", "auroc_note", "brier", "n", "positives")
        }
        if temporal.get("estimable")
        else {"estimable": False, "reason": temporal.get("reason", "not run")}
    )
    for name, path in report.plots.items():
        metadata[f"plot_{name}"] = image_metadata(path)
    return metadata


class ModelRefreshConfig(Config):
    """How a refresh of the readmission model decides to train again."""

    retrain_min_changed_share: float = Field(
        default=DEFAULT_MIN_CHANGED_SHARE,
        description=(
            "Train again when at least this share of the training rows changed since the model "
            "on disk was trained (rows added plus rows removed, over the rows trained on); a "
            "change of columns or of the training code, or no model on disk, always retrains. "
            "0 retrains on every refresh."
        ),
    )


def auroc_check(report: ModelReport) -> AssetCheckResult:
    """The warning check on a model's held-out AUROC."""
    return AssetCheckResult(
        check_name="auroc_beats_chance",
        passed=report.auroc is not None and report.auroc > MIN_AUROC,
        severity=AssetCheckSeverity.WARN,
        metadata={"auroc": report.auroc or 0.0, "threshold": MIN_AUROC},
    )


@asset(
    group_name=GROUP,
    deps=[RELEASE_INPUT, TRAINING_SET, AssetKey(["views", "patient"])],
    kinds={"sklearn"},
    automation_condition=FOLLOWS_THE_VIEWS,
    pool=WAREHOUSE_POOL,
    check_specs=[
        AssetCheckSpec(
            "auroc_beats_chance",
            asset="readmission_model",
            blocking=False,
            description=f"Held-out AUROC is above {MIN_AUROC}, clearly better than chance.",
        )
    ],
)
def readmission_model(
    context: AssetExecutionContext, warehouse: WarehouseResource, config: ModelRefreshConfig
) -> Iterator[MaterializeResult | AssetCheckResult]:
    """30-day readmission model trained on a patient split, with evaluation, plots and card;
    kept as it is when the training set barely changed (`pipelines.models.retrain`)."""
    # The warehouse stays open from before the training set is read until the model's files
    # are published. An erasure needs it for writing, so it waits for the fit, and purges
    # the record of the rows the published model was trained on (``ehr forget``'s
    # ``model_training_record``) after it: a fit that read the patient's rows before the
    # erasure can no longer publish its record once the erasure has purged the last one.
    con = warehouse.connect(read_only=True)
    try:
        results = list(_refresh_model(context, warehouse, config, con))
    finally:
        con.close()
    yield from results


def _refresh_model(
    context: AssetExecutionContext,
    warehouse: WarehouseResource,
    config: ModelRefreshConfig,
    con: duckdb.DuckDBPyConnection,
) -> Iterator[MaterializeResult | AssetCheckResult]:
    built_from = built_from_upstream(context, context.asset_key)
    training = pd.read_parquet(parquet_path(warehouse.workdir, TRAINING_SET_TABLE))
    training = with_audit_attributes(con, training)
    out_dir = models_dir(warehouse.workdir) / MODEL_DIR
    threshold = config.retrain_min_changed_share
    decision = retrain_decision(training, out_dir, threshold, exclude=AUDIT_COLUMNS)
    refresh = decision.as_metadata(threshold)
    if not decision.retrain:
        context.log.info(f"readmission model kept: {decision.reason}")
        # what a publish killed after its switch left beside the model (an older training
        # record among it) goes now, not at the next retraining
        remove_unpublished_versions(out_dir)
        kept = load_model_report(out_dir)
        yield MaterializeResult(metadata={**model_metadata(kept), **refresh}, tags=built_from)
        yield auroc_check(kept)
        return
    try:
        report = train_readmission_model(training, out_dir=out_dir, audit_columns=AUDIT_COLUMNS)
    except InsufficientTrainingDataError as exc:
        # a small release (a test batch, a clinic's first export) is not an error of the
        # pipeline: say why there is no model, and withdraw an earlier one whole (fitted to a
        # training set that is gone, perhaps to patients who have left it since)
        card = withdraw_model(out_dir, str(exc))
        context.log.warning(f"readmission model not trained, any earlier one withdrawn: {exc}")
        yield MaterializeResult(
            tags=built_from,
            metadata={
                "trained": False,
                "reason": str(exc),
                "rows": len(training),
                "model_card": MetadataValue.md(card.read_text()),
            },
        )
        yield AssetCheckResult(
            check_name="auroc_beats_chance",
            passed=False,
            severity=AssetCheckSeverity.WARN,
            metadata={"trained": False, "reason": str(exc)},
        )
        return
    context.log.info(
        f"readmission model retrained ({decision.reason}): AUROC {report.auroc}, "
        f"{report.n_train} train / {report.n_test} test rows"
    )
    yield MaterializeResult(metadata={**model_metadata(report), **refresh}, tags=built_from)
    yield auroc_check(report)
