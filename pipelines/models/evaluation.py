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
    y: np.ndarray, p: np.ndarray, n_bins: int = CALIBRATION_BINS
) -> list[CalibrationBin]:
    """Reliability curve on quantile bins of the predicted risk (equal-count bins stay
    informative at a low prevalence where uniform bins would be almost empty)."""
    if len(p) == 0:
        return []
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


def overall_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """AUROC, Brier score, prevalence, mean prediction and the reliability curve."""
    bins = calibration_bins(y, p)
    return {
        "auroc": safe_auroc(y, p),
        "brier": float(brier_score_loss(y, p)) if len(y) else None,
        "prevalence": float(y.mean()) if len(y) else None,
        "mean_predicted": float(p.mean()) if len(p) else None,
        "expected_calibration_error": expected_calibration_error(bins),
        "calibration_bins": [asdict(b) for b in bins],
    }


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
