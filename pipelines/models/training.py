"""Training and held-out evaluation of the 30-day readmission model on a generic training frame.

The frame is what Feast's ``get_historical_features`` returns for the label rows: ``patient_id``,
``event_timestamp``, the label, then feature columns whose names are read from the frame.

Model choice: L2-regularised logistic regression behind a ``ColumnTransformer`` (median
imputation with missing-indicators and standard scaling for numeric columns, one-hot encoding for
categorical ones). Readmission cohorts are small (hundreds to a few thousand discharges at
a prevalence of roughly 5-15%), so a gradient-boosted model has few positives to learn
interactions from and tends to overfit; logistic regression gives calibrated probabilities
without a separate calibration step (the Brier score and reliability curve are part of the
report), coefficients that a clinical reviewer can read, and stable results across seeds.
The regularisation strength is chosen by cross-validated log loss on patient-grouped,
class-stratified folds of the training side only (with ~40 features and a few hundred
discharges, the default C=1 overfits: held-out AUROC 0.56 against 0.67 at the chosen C on the
platform's 900-patient synthetic run). On the platform's generated data the boosted model scored
lower than this one on the same splits (0.62-0.70 against 0.74-0.79).
``estimator="hist_gradient_boosting"`` switches to ``HistGradientBoostingClassifier`` for larger
cohorts with non-linear signal.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import joblib
import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.inspection import permutation_importance
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

from pipelines.models.card import write_model_card
from pipelines.models.evaluation import (
    CalibrationBin,
    largest_gap,
    overall_metrics,
    subgroup_audit,
    subgroup_gaps,
)
from pipelines.models.frame import (
    FeatureColumns,
    as_category_strings,
    as_float,
    feature_columns,
    subgroup_attributes,
)
from pipelines.models.plots import (
    plot_calibration,
    plot_feature_importance,
    plot_roc,
    plot_subgroup_auroc,
)

Estimator = Literal["logistic_regression", "hist_gradient_boosting"]
MODEL_FILE = "readmission_model.joblib"
METRICS_FILE = "metrics.json"
MODEL_CARD_FILE = "model_card.md"
TEST_SIZE = 0.25
SPLIT_ATTEMPTS = 20
IMPORTANCE_REPEATS = 10
INNER_FOLDS = 5
C_GRID = tuple(float(c) for c in np.logspace(-3, 1, 9))


@dataclass(frozen=True)
class ModelReport:
    """Where a trained model and its evaluation were written, with the headline numbers."""

    out_dir: Path
    model_path: Path
    metrics_path: Path
    model_card_path: Path
    plots: dict[str, Path]
    estimator: str
    auroc: float | None
    brier: float | None
    prevalence: float | None
    n_train: int
    n_test: int
    n_train_patients: int
    n_test_patients: int
    features: tuple[str, ...]
    largest_subgroup_gap: dict[str, Any] | None
    too_small_subgroups: list[str] = field(default_factory=list)


class InsufficientTrainingDataError(ValueError):
    """Too few labelled discharges (or a single class) to train and evaluate a model."""


def inner_folds(
    y: np.ndarray, groups: np.ndarray, seed: int
) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Patient-grouped, class-stratified folds of the training rows for choosing C, or None
    when there are too few patients of either class for two folds."""
    positive_patients = len(np.unique(groups[y == 1]))
    negative_patients = len(np.unique(groups[y == 0]))
    k = min(INNER_FOLDS, positive_patients, negative_patients)
    if k < 2:
        return None
    folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(train, test) for train, test in folds.split(np.zeros(len(y)), y, groups)]


def build_pipeline(
    columns: FeatureColumns,
    estimator: Estimator,
    seed: int,
    folds: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> Pipeline:
    """Preprocessing plus classifier, fitted as one object so the saved model takes raw rows.

    With ``folds``, logistic regression picks C from ``C_GRID`` by cross-validated log loss."""
    numeric = Pipeline(
        [
            ("to_float", FunctionTransformer(as_float)),
            # The indicator keeps "not measured" as signal (e.g. no HbA1c on file).
            # keep_empty_features: a column empty on the training side stays a (constant) column.
            (
                "impute",
                SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True),
            ),
            ("scale", StandardScaler()),
        ]
    )
    categorical = Pipeline(
        [
            ("to_str", FunctionTransformer(as_category_strings)),
            ("onehot", OneHotEncoder(handle_unknown="ignore", min_frequency=5)),
        ]
    )
    transformers: list[tuple[str, Any, list[str]]] = []
    if columns.numeric:
        transformers.append(("numeric", numeric, list(columns.numeric)))
    if columns.categorical:
        transformers.append(("categorical", categorical, list(columns.categorical)))
    classifier: Any
    if estimator == "logistic_regression":
        if folds:
            classifier = LogisticRegressionCV(
                Cs=list(C_GRID),
                cv=folds,
                scoring="neg_log_loss",
                l1_ratios=(0.0,),  # pure L2
                use_legacy_attributes=False,
                max_iter=2000,
            )
        else:
            classifier = LogisticRegression(C=1.0, max_iter=2000)
    else:
        classifier = HistGradientBoostingClassifier(
            max_iter=200,
            learning_rate=0.05,
            max_leaf_nodes=15,
            l2_regularization=1.0,
            random_state=seed,
        )
    preprocess = ColumnTransformer(transformers, remainder="drop", sparse_threshold=0.0)
    return Pipeline([("preprocess", preprocess), ("model", classifier)])


def split_by_patient(
    frame: pd.DataFrame, label: str, seed: int, test_size: float = TEST_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of train and test sets with no patient in both.

    The split is redrawn (seed, seed+1, ...) until both sides hold both classes, because one
    class alone can neither be fitted nor scored.
    """
    groups = frame["patient_id"].astype(str).to_numpy()
    y = frame[label].to_numpy()
    if len(np.unique(y)) < 2:
        raise InsufficientTrainingDataError("the training frame holds a single label class")
    for attempt in range(SPLIT_ATTEMPTS):
        splitter = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed + attempt)
        train, test = next(splitter.split(frame, y, groups))
        if len(np.unique(y[train])) == 2 and len(np.unique(y[test])) == 2:
            return train, test
    raise InsufficientTrainingDataError(
        f"no patient split with both classes on each side in {SPLIT_ATTEMPTS} tries"
    )


def _importance(
    model: Pipeline, x_test: pd.DataFrame, y_test: np.ndarray, seed: int
) -> list[dict[str, float | str]]:
    """Permutation importance on the held-out rows, scored by AUROC, largest first."""
    result = permutation_importance(
        model,
        x_test,
        y_test,
        scoring="roc_auc",
        n_repeats=IMPORTANCE_REPEATS,
        random_state=seed,
        n_jobs=1,
    )
    rows: list[dict[str, float | str]] = [
        {
            "feature": str(name),
            "importance_mean": float(mean),
            "importance_std": float(std),
        }
        for name, mean, std in zip(
            x_test.columns, result.importances_mean, result.importances_std, strict=True
        )
    ]
    return sorted(rows, key=lambda r: float(r["importance_mean"]), reverse=True)


def train_readmission_model(
    training: pd.DataFrame,
    label: str = "label",
    *,
    out_dir: Path,
    seed: int = 0,
    estimator: Estimator = "logistic_regression",
    exclude: tuple[str, ...] = (),
    audit_columns: tuple[str, ...] = (),
) -> ModelReport:
    """Fit the readmission model on a patient-grouped split, evaluate it on held-out patients,
    audit subgroups and write ``readmission_model.joblib``, ``metrics.json``, ``model_card.md``
    and four PNG plots into ``out_dir``.

    ``training`` needs ``patient_id``, ``event_timestamp`` and ``label``; every other column
    (minus ``exclude``, ``audit_columns`` and date/time columns) is a feature. ``audit_columns``
    (e.g. race and ethnicity joined from the patient view) only define subgroups for the audit;
    an attribute found there wins over a feature column describing the same attribute.
    """
    for required in ("patient_id", label):
        if required not in training.columns:
            raise ValueError(f"the training frame has no {required!r} column")
    frame = training[training[label].notna()].reset_index(drop=True)
    if frame.empty:
        raise InsufficientTrainingDataError("the training frame has no labelled rows")
    y_all = frame[label].astype("int64").to_numpy()
    columns = feature_columns(frame, label, (*exclude, *audit_columns))
    if not columns.all:
        raise InsufficientTrainingDataError("the training frame has no feature with a value")
    train_idx, test_idx = split_by_patient(frame, label, seed)
    x = frame[list(columns.all)]
    x_train, x_test = x.iloc[train_idx], x.iloc[test_idx]
    y_train, y_test = y_all[train_idx], y_all[test_idx]

    groups_train = frame["patient_id"].astype(str).to_numpy()[train_idx]
    model = build_pipeline(columns, estimator, seed, inner_folds(y_train, groups_train, seed))
    model.fit(x_train, y_train)
    chosen_c = getattr(model[-1], "C_", None)
    p_test = model.predict_proba(x_test)[:, 1]

    metrics = overall_metrics(y_test, p_test)
    audit = [c for c in audit_columns if c in frame.columns]
    found = subgroup_attributes(frame.drop(columns=audit))
    found.update(subgroup_attributes(frame[audit]))
    attributes = {
        name: groups.iloc[test_idx].reset_index(drop=True) for name, groups in found.items()
    }
    subgroups = subgroup_audit(y_test, p_test, attributes)
    gaps = subgroup_gaps(subgroups)
    worst_auroc_gap = largest_gap(gaps, "auroc")
    worst_calibration_gap = largest_gap(gaps, "calibration_gap")
    importance = _importance(model, x_test, y_test, seed)
    too_small = [f"{r.attribute}={r.group} ({r.reason})" for r in subgroups if not r.assessable]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / MODEL_FILE
    joblib.dump(model, model_path)
    plots = {
        "roc_curve": plot_roc(y_test, p_test, metrics["auroc"], out_dir / "roc_curve.png"),
        "calibration_curve": plot_calibration(
            [CalibrationBin(**b) for b in metrics["calibration_bins"]],
            out_dir / "calibration_curve.png",
        ),
        "subgroup_auroc": plot_subgroup_auroc(
            subgroups, metrics["auroc"], out_dir / "subgroup_auroc.png"
        ),
        "feature_importance": plot_feature_importance(
            importance, out_dir / "feature_importance.png"
        ),
    }
    document: dict[str, Any] = {
        "estimator": estimator,
        "regularisation_c": float(chosen_c) if chosen_c is not None else None,
        "seed": seed,
        "label": label,
        "n_train": len(train_idx),
        "n_test": len(test_idx),
        "n_train_patients": int(frame["patient_id"].iloc[train_idx].nunique()),
        "n_test_patients": int(frame["patient_id"].iloc[test_idx].nunique()),
        "train_prevalence": float(y_train.mean()),
        "features": {
            "numeric": list(columns.numeric),
            "categorical": list(columns.categorical),
            "dropped": list(columns.dropped),
        },
        "test": metrics,
        "subgroups": [asdict(r) for r in subgroups],
        "subgroup_gaps": [asdict(g) for g in gaps],
        "largest_subgroup_gap": asdict(worst_auroc_gap) if worst_auroc_gap else None,
        "largest_calibration_gap": (
            asdict(worst_calibration_gap) if worst_calibration_gap else None
        ),
        "subgroups_not_assessable": too_small,
        "permutation_importance": importance,
    }
    metrics_path = out_dir / METRICS_FILE
    metrics_path.write_text(json.dumps(document, indent=2, sort_keys=False))
    card_path = write_model_card(document, plots, out_dir / MODEL_CARD_FILE)
    return ModelReport(
        out_dir=out_dir,
        model_path=model_path,
        metrics_path=metrics_path,
        model_card_path=card_path,
        plots=plots,
        estimator=estimator,
        auroc=metrics["auroc"],
        brier=metrics["brier"],
        prevalence=metrics["prevalence"],
        n_train=len(train_idx),
        n_test=len(test_idx),
        n_train_patients=document["n_train_patients"],
        n_test_patients=document["n_test_patients"],
        features=columns.all,
        largest_subgroup_gap=document["largest_subgroup_gap"],
        too_small_subgroups=too_small,
    )


def load_model(path: Path) -> Pipeline:
    """A model written by :func:`train_readmission_model`."""
    model: Pipeline = joblib.load(path)
    return model
