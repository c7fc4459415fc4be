"""The vectorised evaluation against plain, slow references kept here on purpose: the
one-resample-at-a-time bootstrap loop with sklearn's ``roc_auc_score`` (the implementation it
replaced) and sklearn's own ``permutation_importance``. The fast versions must give the same
numbers, up to floating-point rounding, on ties, one-class resamples and patient resampling."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.inspection import permutation_importance
from sklearn.metrics import roc_auc_score

from pipelines.models import evaluation
from pipelines.models.evaluation import (
    CI_LEVEL,
    auroc_rows,
    bootstrap_draws,
    bootstrap_intervals,
    calibration_bins,
    expected_calibration_error,
    permutation_importance_auroc,
)
from pipelines.models.frame import feature_columns
from pipelines.models.training import (
    IMPORTANCE_REPEATS,
    build_pipeline,
    evaluate_held_out,
    fit_on_patient_split,
    labelled_rows,
)

from .crafted import planted_frame

TOLERANCE = 1e-12


def reference_draws(
    y: np.ndarray, p: np.ndarray, groups: np.ndarray | None, seed: int, resamples: int
) -> dict[str, list[float]]:
    """The former bootstrap loop: resample the units, build the resampled frame, score it with
    sklearn (NaN where the resample holds one class)."""
    rng = np.random.default_rng(seed)
    keys = groups if groups is not None else np.arange(len(y))
    units, index = np.unique(keys, return_inverse=True)
    members = [np.flatnonzero(index == u) for u in range(len(units))]
    draws: dict[str, list[float]] = {"auroc": [], "ece": [], "calibration_in_the_large": []}
    for _ in range(resamples):
        rows = np.concatenate([members[u] for u in rng.integers(0, len(units), len(units))])
        yb, pb = y[rows], p[rows]
        one_class = len(np.unique(yb)) < 2
        draws["auroc"].append(np.nan if one_class else float(roc_auc_score(yb, pb)))
        draws["ece"].append(expected_calibration_error(calibration_bins(yb, pb)))
        draws["calibration_in_the_large"].append(float(pb.mean() - yb.mean()))
    return draws


def reference_intervals(
    draws: dict[str, list[float]], resamples: int
) -> dict[str, list[float] | None]:
    tail = (1 - CI_LEVEL) / 2 * 100
    out: dict[str, list[float] | None] = {}
    for name, values in draws.items():
        kept = [v for v in values if not np.isnan(v)]
        enough = len(kept) >= resamples // 2
        out[name] = (
            [float(np.percentile(kept, tail)), float(np.percentile(kept, 100 - tail))]
            if enough
            else None
        )
    return out


def patients(rng: np.random.Generator, n: int, largest: int) -> np.ndarray:
    """Patient ids for ``n`` rows, 1 to ``largest`` discharges each, in shuffled row order."""
    sizes = rng.integers(1, largest + 1, n)
    ids = np.repeat(np.arange(n), sizes)[:n]
    return rng.permutation(ids).astype(str)


def case(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Labels, predictions and (or not) patient ids for one kind of awkward test set."""
    rng = np.random.default_rng(CASES.index(name))
    n = {"tiny": 7, "straddles_bins": 57, "rare_positives": 80, "single_class": 40}.get(name, 160)
    y = (rng.random(n) < 0.25).astype(np.int64)
    p = np.round(rng.random(n), 1)  # ten distinct values: ties everywhere, also at bin edges
    groups: np.ndarray | None = None
    if name in ("patients", "straddles_bins", "rare_positives"):
        # patient resamples vary in size: 57 rows of up to 6 each straddle the 20-row bin steps
        groups = patients(rng, n, 6)
    if name == "rare_positives":
        y[:] = 0
        y[rng.choice(n, 2, replace=False)] = 1  # many resamples hold no positive
    if name == "single_class":
        y[:] = 0
    if name == "constant":
        p[:] = 0.3  # a single quantile edge
    if name == "continuous":
        p = rng.beta(2, 5, n)
    return y, p, groups


CASES = [
    "rows",
    "patients",
    "straddles_bins",
    "rare_positives",
    "single_class",
    "constant",
    "continuous",
    "tiny",
]


@pytest.mark.parametrize("name", CASES)
def test_bootstrap_draws_equal_the_resampling_loop(name: str) -> None:
    y, p, groups = case(name)
    fast = bootstrap_draws(y, p, groups, seed=5, resamples=300)
    slow = reference_draws(y, p, groups, seed=5, resamples=300)
    for metric, values in slow.items():
        np.testing.assert_allclose(fast[metric], values, rtol=0, atol=TOLERANCE, err_msg=metric)
    if name == "rare_positives":
        assert np.isnan(fast["auroc"]).sum() > 30
    if name == "single_class":
        assert np.isnan(fast["auroc"]).all()


@pytest.mark.parametrize("name", CASES)
def test_bootstrap_intervals_equal_the_resampling_loop(name: str) -> None:
    y, p, groups = case(name)
    fast = bootstrap_intervals(y, p, groups, seed=2, resamples=200)
    slow = reference_intervals(reference_draws(y, p, groups, seed=2, resamples=200), 200)
    assert fast.keys() == slow.keys()
    for metric, interval in slow.items():
        if interval is None:
            assert fast[metric] is None, metric
        else:
            np.testing.assert_allclose(fast[metric] or [], interval, rtol=0, atol=TOLERANCE)
    if name == "single_class":
        assert fast["auroc"] is None and fast["ece"] is not None


def test_bootstrap_in_small_blocks_gives_the_same_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    y, p, groups = case("patients")
    whole = bootstrap_draws(y, p, groups, seed=1, resamples=50)
    monkeypatch.setattr(evaluation, "_BLOCK_CELLS", 3 * len(y) * 11)  # blocks of 3 resamples
    blocked = bootstrap_draws(y, p, groups, seed=1, resamples=50)
    for metric, values in whole.items():
        np.testing.assert_allclose(blocked[metric], values, rtol=0, atol=TOLERANCE)


def test_empty_test_set_has_no_intervals() -> None:
    empty = np.array([], dtype=float)
    assert bootstrap_intervals(empty, empty) == {
        "auroc": None,
        "ece": None,
        "calibration_in_the_large": None,
    }


def test_auroc_rows_equals_roc_auc_score_with_ties_and_counts() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(90) < 0.3).astype(np.int64)
    scores = np.round(rng.normal(size=(25, 90)), 1)  # many ties within each row
    fast = auroc_rows(y, scores)
    assert fast.shape == (25,)
    for row, value in zip(scores, fast, strict=True):
        assert abs(value - roc_auc_score(y, row)) <= TOLERANCE
    # one score vector, rows counted 0, 1, 2 ... times: the AUROC of the repeated rows
    counts = rng.integers(0, 4, (40, 90))
    counts[0] = np.where(y == 1, counts[0], 0)  # positives only
    weighted = auroc_rows(y, scores[0], counts)
    assert np.isnan(weighted[0])
    for row, value in zip(counts[1:], weighted[1:], strict=True):
        repeated = np.repeat(np.arange(90), row)
        assert abs(value - roc_auc_score(y[repeated], scores[0][repeated])) <= TOLERANCE


def mixed_frame(n: int, seed: int) -> pd.DataFrame:
    """Features of every kind the trainer takes (missing values, nullable integers and booleans,
    strings), coarse enough that many rows share a score."""
    rng = np.random.default_rng(seed)
    burden = rng.integers(0, 4, n)
    lab = np.round(rng.normal(6, 1, n), 0)
    lab[rng.random(n) < 0.2] = np.nan
    logit = -1.5 + 0.8 * burden + 0.5 * np.nan_to_num(lab - 6)
    flag = np.where(rng.random(n) < 0.2, None, rng.random(n) < 0.5)
    return pd.DataFrame(
        {
            "patient_id": [f"p{i // 2}" for i in range(n)],
            "label": (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64),
            "burden": pd.array(burden, dtype="Int64"),
            "lab": lab,
            "flag": pd.array(flag, dtype="boolean"),
            "sex": pd.array(rng.choice(["female", "male", None], n), dtype="string"),
            "unit": rng.choice(["a", "b", "c"], n).astype(object),
        }
    )


def sklearn_importance(model: Any, x: pd.DataFrame, y: np.ndarray, seed: int) -> Any:
    return permutation_importance(
        model, x, y, scoring="roc_auc", n_repeats=IMPORTANCE_REPEATS, random_state=seed, n_jobs=1
    )


@pytest.mark.parametrize("estimator", ["logistic_regression", "hist_gradient_boosting"])
@pytest.mark.parametrize("batch_rows", [evaluation.IMPORTANCE_BATCH_ROWS, 250])
def test_permutation_importance_equals_sklearn(
    estimator: Any, batch_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 250 rows per call: copies of the 80 test rows split over many calls, not at a column edge
    monkeypatch.setattr(evaluation, "IMPORTANCE_BATCH_ROWS", batch_rows)
    frame = mixed_frame(320, seed=4)
    columns = feature_columns(frame, "label")
    x, y = frame[list(columns.all)], frame["label"].to_numpy()
    model = build_pipeline(columns, estimator, seed=0).fit(x[:240], y[:240])
    x_test, y_test = x[240:], y[240:]
    assert len(np.unique(model.decision_function(x_test))) < len(x_test)  # tied scores
    for seed in (0, 9):
        means, stds = permutation_importance_auroc(
            model, x_test, y_test, repeats=IMPORTANCE_REPEATS, seed=seed
        )
        reference = sklearn_importance(model, x_test, y_test, seed)
        np.testing.assert_allclose(means, reference.importances_mean, rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose(stds, reference.importances_std, rtol=0, atol=TOLERANCE)


def test_held_out_evaluation_reports_what_the_slow_path_reports() -> None:
    """The trainer's intervals and importance equal the loop and sklearn on its held-out rows."""
    frame = labelled_rows(planted_frame(n_patients=300), "label")
    columns = feature_columns(frame, "label")
    fitted = fit_on_patient_split(frame, "label", columns, "logistic_regression", seed=0)
    result = evaluate_held_out(fitted, frame, (), seed=0)
    test_patients = frame["patient_id"].astype(str).to_numpy()[fitted.test_idx]
    resamples = evaluation.BOOTSTRAP_RESAMPLES
    draws = reference_draws(fitted.y_test, fitted.p_test, test_patients, 0, resamples)
    for metric, interval in reference_intervals(draws, resamples).items():
        reported = result.metrics["ci95"][metric]
        if interval is None or (metric == "auroc" and result.metrics["auroc_note"]):
            assert reported is None
        else:
            np.testing.assert_allclose(reported, interval, rtol=0, atol=TOLERANCE)
    reference = sklearn_importance(fitted.model, fitted.x_test, fitted.y_test, 0)
    expected = dict(zip(fitted.x_test.columns, reference.importances_mean, strict=True))
    for row in result.importance:
        assert abs(float(row["importance_mean"]) - expected[str(row["feature"])]) <= TOLERANCE
