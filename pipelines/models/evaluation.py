"""Held-out evaluation: discrimination, calibration and the subgroup audit."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import brier_score_loss, roc_auc_score

from pipelines.models.frame import AGE_BANDS, UNKNOWN

MIN_SUBGROUP_SIZE = 30
CALIBRATION_BINS = 10
# Below this many positives in a test set an AUROC swings by tenths between resamples (one
# positive gives 0 or 1): it is reported as not estimable rather than as a number.
MIN_POSITIVES_FOR_AUROC = 20
# A reliability bin holds at least this many rows; fewer rows get fewer bins.
MIN_ROWS_PER_BIN = 20
BOOTSTRAP_RESAMPLES = 1000
CI_LEVEL = 0.95


@dataclass(frozen=True)
class CalibrationBin:
    """One bin of the reliability curve (bins hold equal numbers of held-out rows)."""

    lower: float
    upper: float
    n: int
    mean_predicted: float
    observed_rate: float


@dataclass(frozen=True)
class SubgroupResult:
    """Metrics of one subgroup of the held-out set. ``auroc`` is None when the group is too
    small (n < 30) or holds a single class; ``assessable`` says so."""

    attribute: str
    group: str
    n: int
    positives: int
    observed_rate: float
    predicted_rate: float
    calibration_gap: float
    auroc: float | None
    assessable: bool
    reason: str


@dataclass(frozen=True)
class SubgroupGap:
    """The widest difference of one metric between two assessable groups of one attribute."""

    attribute: str
    metric: str
    value: float
    best_group: str
    worst_group: str


def safe_auroc(y: np.ndarray, p: np.ndarray) -> float | None:
    """AUROC, or None when only one class is present."""
    if len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, p))


def calibration_bins(
    y: np.ndarray, p: np.ndarray, n_bins: int | None = None
) -> list[CalibrationBin]:
    """Reliability curve on quantile bins of the predicted risk (equal-count bins stay
    informative at a low prevalence where uniform bins would be almost empty). By default up to
    10 bins of at least 20 rows each: 10 bins of 2 rows say nothing."""
    if len(p) == 0:
        return []
    if n_bins is None:
        n_bins = max(1, min(CALIBRATION_BINS, len(p) // MIN_ROWS_PER_BIN))
    edges = np.unique(np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1)))
    if len(edges) < 2:
        edges = np.array([p.min(), p.max()])
    index = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, len(edges) - 2)
    bins: list[CalibrationBin] = []
    for b in range(len(edges) - 1):
        mask = index == b
        if not mask.any():
            continue
        bins.append(
            CalibrationBin(
                lower=float(edges[b]),
                upper=float(edges[b + 1]),
                n=int(mask.sum()),
                mean_predicted=float(p[mask].mean()),
                observed_rate=float(y[mask].mean()),
            )
        )
    return bins


def expected_calibration_error(bins: list[CalibrationBin]) -> float:
    """Count-weighted mean absolute difference between predicted and observed rates."""
    total = sum(b.n for b in bins)
    if not total:
        return 0.0
    return float(sum(b.n * abs(b.mean_predicted - b.observed_rate) for b in bins) / total)


def auroc_note(y: np.ndarray) -> str | None:
    """Why the AUROC of ``y`` is not reported, or None when it is."""
    positives = int(np.sum(y))
    if len(np.unique(y)) < 2:
        return "not estimable: the test set holds a single class"
    if positives < MIN_POSITIVES_FOR_AUROC:
        return (
            f"not estimable: {positives} positive(s) in the test set, fewer than "
            f"{MIN_POSITIVES_FOR_AUROC}; the rank of one positive alone moves it by up to "
            f"1/{positives}"
        )
    return None


def bootstrap_intervals(
    y: np.ndarray,
    p: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict[str, list[float] | None]:
    """Percentile bootstrap 95% intervals of the AUROC, the expected calibration error and the
    calibration-in-the-large (mean predicted minus observed). Resampling is by patient when
    ``groups`` is given (a patient's discharges are not independent); a resample with one class
    gives no AUROC and is skipped for it."""
    rng = np.random.default_rng(seed)
    keys = groups if groups is not None else np.arange(len(y))
    units, index = np.unique(keys, return_inverse=True)
    members = [np.flatnonzero(index == u) for u in range(len(units))]
    draws: dict[str, list[float]] = {"auroc": [], "ece": [], "calibration_in_the_large": []}
    for _ in range(resamples if len(y) else 0):
        rows = np.concatenate([members[u] for u in rng.integers(0, len(units), len(units))])
        yb, pb = y[rows], p[rows]
        if len(np.unique(yb)) == 2:
            draws["auroc"].append(float(roc_auc_score(yb, pb)))
        draws["ece"].append(expected_calibration_error(calibration_bins(yb, pb)))
        draws["calibration_in_the_large"].append(float(pb.mean() - yb.mean()))
    tail = (1 - CI_LEVEL) / 2 * 100
    return {
        name: [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))]
        if len(v) >= resamples // 2
        else None
        for name, v in draws.items()
    }


def overall_metrics(
    y: np.ndarray, p: np.ndarray, groups: np.ndarray | None = None, seed: int = 0
) -> dict[str, Any]:
    """AUROC (None, with ``auroc_note`` saying why, under 20 positives), Brier score,
    prevalence, mean prediction, the reliability curve and bootstrap 95% intervals."""
    bins = calibration_bins(y, p)
    note = auroc_note(y)
    intervals = bootstrap_intervals(y, p, groups, seed=seed)
    if note:
        intervals["auroc"] = None
    return {
        "auroc": safe_auroc(y, p) if note is None else None,
        "auroc_note": note,
        "positives": int(np.sum(y)),
        "n": len(y),
        "brier": float(brier_score_loss(y, p)) if len(y) else None,
        "prevalence": float(y.mean()) if len(y) else None,
        "mean_predicted": float(p.mean()) if len(p) else None,
        "calibration_in_the_large": float(p.mean() - y.mean()) if len(y) else None,
        "expected_calibration_error": expected_calibration_error(bins),
        "ci95": intervals,
        "calibration_bins": [asdict(b) for b in bins],
    }


def bounded_count(n: int, minimum: int = MIN_SUBGROUP_SIZE) -> int | str:
    """A count as shared in the card and metrics.json: below ``minimum`` only the bound."""
    return n if n >= minimum else f"<{minimum}"


def _group_order(group: object) -> tuple[int, str]:
    """Age bands in age order, other groups alphabetically, ``unknown`` last."""
    text = str(group)
    if text in AGE_BANDS:
        return (AGE_BANDS.index(text), text)
    return (len(AGE_BANDS) + (text == UNKNOWN), text)


def subgroup_audit(
    y: np.ndarray, p: np.ndarray, attributes: dict[str, pd.Series]
) -> list[SubgroupResult]:
    """Per group of each attribute: size, observed and predicted positive rate, calibration gap
    (mean predicted minus observed rate) and AUROC when the group can be assessed."""
    results: list[SubgroupResult] = []
    for attribute, groups in attributes.items():
        values = groups.to_numpy()
        for group in sorted(pd.unique(values), key=_group_order):
            mask = values == group
            yg, pg = y[mask], p[mask]
            n = int(mask.sum())
            positives = int(yg.sum())
            if n < MIN_SUBGROUP_SIZE:
                assessable, reason = False, f"n < {MIN_SUBGROUP_SIZE}"
            elif positives in (0, n):
                assessable, reason = False, "one class only"
            else:
                assessable, reason = True, ""
            observed = float(yg.mean()) if n else 0.0
            predicted = float(pg.mean()) if n else 0.0
            results.append(
                SubgroupResult(
                    attribute=attribute,
                    group=str(group),
                    n=n,
                    positives=positives,
                    observed_rate=observed,
                    predicted_rate=predicted,
                    calibration_gap=predicted - observed,
                    auroc=safe_auroc(yg, pg) if assessable else None,
                    assessable=assessable,
                    reason=reason,
                )
            )
    return results


def subgroup_gaps(results: list[SubgroupResult]) -> list[SubgroupGap]:
    """For each attribute, the AUROC gap (best minus worst assessable group) and the calibration
    gap (largest minus smallest mean-predicted-minus-observed), widest first."""
    gaps: list[SubgroupGap] = []
    for attribute in dict.fromkeys(r.attribute for r in results):
        rows = [r for r in results if r.attribute == attribute and r.assessable]
        if len(rows) < 2:
            continue
        scored = [r for r in rows if r.auroc is not None]
        if len(scored) >= 2:
            best = max(scored, key=lambda r: r.auroc or 0.0)
            worst = min(scored, key=lambda r: r.auroc or 0.0)
            gaps.append(
                SubgroupGap(
                    attribute,
                    "auroc",
                    float((best.auroc or 0.0) - (worst.auroc or 0.0)),
                    best.group,
                    worst.group,
                )
            )
        best_cal = min(rows, key=lambda r: abs(r.calibration_gap))
        worst_cal = max(rows, key=lambda r: abs(r.calibration_gap))
        gaps.append(
            SubgroupGap(
                attribute,
                "calibration_gap",
                float(abs(worst_cal.calibration_gap) - abs(best_cal.calibration_gap)),
                best_cal.group,
                worst_cal.group,
            )
        )
    return sorted(gaps, key=lambda g: g.value, reverse=True)


def largest_gap(gaps: list[SubgroupGap], metric: str = "auroc") -> SubgroupGap | None:
    """The widest gap of ``metric`` over all attributes, or None when nothing is assessable."""
    candidates = [g for g in gaps if g.metric == metric]
    return max(candidates, key=lambda g: g.value) if candidates else None
