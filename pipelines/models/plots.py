"""PNG plots of a readmission model's held-out evaluation (matplotlib, Agg backend: no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import roc_curve

from pipelines.models.evaluation import MIN_SUBGROUP_SIZE, CalibrationBin, SubgroupResult


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_roc(y: np.ndarray, p: np.ndarray, auroc: float | None, path: Path) -> Path:
    """ROC curve with the chance diagonal."""
    fig, ax = plt.subplots(figsize=(5, 5))
    if auroc is not None:
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"model (AUROC {auroc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title("ROC curve (held-out patients)")
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_calibration(bins: list[CalibrationBin], path: Path) -> Path:
    """Reliability curve: observed readmission rate against mean predicted risk per bin."""
    fig, ax = plt.subplots(figsize=(5, 5))
    predicted = [b.mean_predicted for b in bins]
    observed = [b.observed_rate for b in bins]
    top = max([*predicted, *observed, 0.05]) * 1.1
    ax.plot([0, top], [0, top], linestyle="--", color="grey", label="perfect calibration")
    ax.plot(predicted, observed, marker="o", label="model")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("Mean predicted risk")
    ax.set_ylabel("Observed readmission rate")
    ax.set_title("Calibration (quantile bins)")
    ax.legend(loc="upper left")
    return _save(fig, path)


def _shown_size(result: SubgroupResult) -> str:
    if result.n < MIN_SUBGROUP_SIZE:
        return f"n<{MIN_SUBGROUP_SIZE}"
    return f"n>={MIN_SUBGROUP_SIZE}" if result.suppressed else f"n={result.n}"


def plot_subgroup_auroc(results: list[SubgroupResult], overall: float | None, path: Path) -> Path:
    """Horizontal bars of AUROC per subgroup; groups too small to assess are shown hatched at 0."""
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.35 * len(results) + 1)))
    # suppressed groups are shown as a bound, not a count (as in metrics.json and the card)
    sizes = [_shown_size(r) for r in results]
    labels = [f"{r.attribute}: {r.group} ({size})" for r, size in zip(results, sizes, strict=True)]
    values = [r.auroc if r.auroc is not None else 0.0 for r in results]
    colors = ["tab:blue" if r.assessable else "lightgrey" for r in results]
    bars = ax.barh(range(len(results)), values, color=colors)
    for bar, r in zip(bars, results, strict=True):
        if not r.assessable:
            bar.set_hatch("//")
            ax.text(0.01, bar.get_y() + bar.get_height() / 2, r.reason, va="center", fontsize=7)
    if overall is not None:
        ax.axvline(overall, color="black", linestyle=":", label=f"overall {overall:.3f}")
        ax.legend(loc="lower right")
    ax.axvline(0.5, color="grey", linestyle="--")
    ax.set_yticks(range(len(results)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("AUROC")
    ax.set_title("AUROC by subgroup (held-out)")
    return _save(fig, path)


def plot_feature_importance(importance: list[dict[str, float | str]], path: Path) -> Path:
    """Permutation importance (mean drop in AUROC, with its standard deviation) per feature."""
    shown = importance[:20]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.35 * len(shown) + 1)))
    names = [str(row["feature"]) for row in shown]
    means = [float(row["importance_mean"]) for row in shown]
    stds = [float(row["importance_std"]) for row in shown]
    ax.barh(range(len(shown)), means, xerr=stds, color="tab:green")
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("Mean decrease in AUROC when permuted")
    ax.set_title("Permutation feature importance (held-out)")
    return _save(fig, path)
