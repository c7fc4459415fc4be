"""Held-out evaluation: discrimination, calibration and the subgroup audit."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

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
    small (n < 30) or holds a single class; ``assessable`` says so. ``suppressed``: nothing of
    the group but its name is shared (:func:`suppressed_groups`)."""

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
    suppressed: bool = False


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
    from sklearn.metrics import roc_auc_score  # on use: see pipelines.models.training

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


# Resamples are scored in blocks so that the (resamples x rows x bin edges) comparison of the
# calibration step stays near this many cells whatever the size of the test set.
_BLOCK_CELLS = 1 << 21


def auroc_rows(y: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """AUROC of every row of ``scores`` (shape (n,) or (k, n)) against the 0/1 labels ``y``,
    row ``i`` of the data counted ``weights[:, i]`` times when given (shape (k, n)); NaN for a
    row whose counted labels hold a single class.

    Mann-Whitney U: the share of (positive, negative) pairs in which the positive scores higher,
    a tie counting one half, which is what roc_auc_score's trapezoids add up to. Here it takes a
    few array operations for all rows instead of one sklearn call per row (the bootstrap and
    the permutation importance need hundreds). With whole-number weights every pair count is a
    whole or half number, exact in floating point, so only the final division rounds."""
    scores2 = np.atleast_2d(np.asarray(scores, dtype=float))
    n = scores2.shape[1]
    k = scores2.shape[0] if weights is None else max(scores2.shape[0], len(weights))
    order = np.broadcast_to(np.argsort(scores2, axis=1, kind="stable"), (k, n))
    ranked = np.take_along_axis(np.broadcast_to(scores2, (k, n)), order, axis=1)
    counted = np.ones((k, n)) if weights is None else np.asarray(weights, dtype=float)
    counted = np.take_along_axis(np.broadcast_to(counted, (k, n)), order, axis=1)
    positive_w = np.where((np.asarray(y) == 1)[order], counted, 0.0)
    negative_w = counted - positive_w
    # The first and last position of the run of tied scores each position belongs to.
    positions = np.arange(n)
    starts = np.ones((k, n), dtype=bool)
    starts[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    ends = np.ones((k, n), dtype=bool)
    ends[:, :-1] = starts[:, 1:]
    first = np.maximum.accumulate(np.where(starts, positions, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends, positions, n - 1)[:, ::-1], axis=1)[:, ::-1]
    negatives_through = np.cumsum(negative_w, axis=1)
    below_tie = np.take_along_axis(negatives_through - negative_w, first, axis=1)
    through_tie = np.take_along_axis(negatives_through, last, axis=1)
    # below + half of the tied = (below + below-and-tied) / 2
    wins = (positive_w * (below_tie + through_tie)).sum(axis=1) / 2
    pairs = positive_w.sum(axis=1) * negative_w.sum(axis=1)
    return np.divide(wins, pairs, out=np.full(k, np.nan), where=pairs > 0)


def resample_counts(n_units: int, resamples: int, seed: int) -> np.ndarray:
    """How many times each unit is drawn in each bootstrap resample, shape (resamples, n_units).

    One ``rng.integers(0, n_units, n_units)`` call per resample from ``default_rng(seed)``, as the
    former one-resample-at-a-time loop drew them, so the intervals stay draw-for-draw the same
    (a single large call is not guaranteed to consume the generator the same way)."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((resamples, n_units), dtype=np.int64)
    for r in range(resamples):
        counts[r] = np.bincount(rng.integers(0, n_units, n_units), minlength=n_units)
    return counts


def _same_size_ece(y: np.ndarray, p: np.ndarray, counts: np.ndarray, size: int) -> np.ndarray:
    """Expected calibration error of resamples that each hold ``size`` rows. ``y`` and ``p`` are
    sorted by ``p``; ``counts`` (k, n) says how often each row was drawn.

    The bins are the ones :func:`calibration_bins` would draw on each resample: the same bin
    count, np.quantile edges computed on the resample's own values (a sorted copy gives the same
    quantiles), and the same searchsorted-and-clip rule for the bin of a row."""
    k = len(counts)
    n_bins = max(1, min(CALIBRATION_BINS, size // MIN_ROWS_PER_BIN))
    resampled = np.repeat(np.tile(p, k), counts.ravel()).reshape(k, size)
    edges = np.sort(np.quantile(resampled, np.linspace(0.0, 1.0, n_bins + 1), axis=1).T, axis=1)
    distinct = np.ones(edges.shape, dtype=bool)
    distinct[:, 1:] = edges[:, 1:] != edges[:, :-1]
    # searchsorted(unique(edges), p, "right") is the number of distinct edges <= p
    at_or_below = ((edges[:, None, :] <= p[None, :, None]) & distinct[:, None, :]).sum(axis=2)
    top = np.maximum(distinct.sum(axis=1) - 2, 0)[:, None]
    index = (np.clip(at_or_below - 1, 0, top) + np.arange(k)[:, None] * n_bins).ravel()

    def per_bin(values: np.ndarray) -> np.ndarray:
        summed = np.bincount(index, weights=values.ravel(), minlength=k * n_bins)
        return summed.reshape(k, n_bins)

    n, predicted, observed = per_bin(counts * 1.0), per_bin(counts * p), per_bin(counts * y)
    total = np.zeros(k)
    for b in range(n_bins):  # bin after bin, in the order expected_calibration_error adds them
        filled = n[:, b] > 0
        rows = np.where(filled, n[:, b], 1.0)
        gap = rows * np.abs(predicted[:, b] / rows - observed[:, b] / rows)
        total += np.where(filled, gap, 0.0)
    return total / size


def _score_resamples(
    y: np.ndarray, p: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUROC (NaN for a one-class resample), ECE and calibration-in-the-large of each resample
    given as per-row draw counts (``y`` and ``p`` sorted by ``p``)."""
    sizes = counts.sum(axis=1)
    ece = np.empty(len(counts))
    for size in np.unique(sizes):  # patient resamples differ in size, hence in bins
        same = sizes == size
        ece[same] = _same_size_ece(y, p, counts[same], int(size))
    in_the_large = (counts @ p) / sizes - (counts @ y) / sizes
    return auroc_rows(y, p, counts), ece, in_the_large


def bootstrap_draws(
    y: np.ndarray,
    p: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict[str, np.ndarray]:
    """The AUROC (NaN for a one-class resample), expected calibration error and
    calibration-in-the-large of each bootstrap resample, resampling patients when ``groups`` is
    given and rows otherwise.

    A resample is held as how often each row was drawn, and all resamples are scored together
    on those counts: the numbers of scoring each resampled frame, at a fraction of the cost
    (this runs for the held-out test and again for the temporal validation)."""
    names = ("auroc", "ece", "calibration_in_the_large")
    if not (len(y) and resamples):
        return {name: np.empty(0) for name in names}
    keys = groups if groups is not None else np.arange(len(y))
    units, unit_of_row = np.unique(keys, return_inverse=True)
    order = np.argsort(p, kind="stable")
    y_sorted, p_sorted = y[order].astype(float), p[order].astype(float)
    # resamples x rows (sorted by p): how often each row was drawn
    counts = resample_counts(len(units), resamples, seed)[:, unit_of_row[order]]
    step = max(1, _BLOCK_CELLS // (len(y) * (CALIBRATION_BINS + 1)))
    blocks = [
        _score_resamples(y_sorted, p_sorted, counts[start : start + step])
        for start in range(0, resamples, step)
    ]
    return {name: np.concatenate(parts) for name, parts in zip(names, zip(*blocks), strict=True)}


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
    gives no AUROC and is skipped for it, and a metric with fewer than half the resamples
    scored gets no interval."""
    draws = bootstrap_draws(y, p, groups, seed=seed, resamples=resamples)
    draws["auroc"] = draws["auroc"][~np.isnan(draws["auroc"])]
    tail = (1 - CI_LEVEL) / 2 * 100
    return {
        name: [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))]
        if len(v) >= resamples // 2
        else None
        for name, v in draws.items()
    }


# Permuted copies of the test rows are scored in predict calls of at most this many rows.
IMPORTANCE_BATCH_ROWS = 1 << 17


def permutation_orders(n_rows: int, repeats: int, seed: int) -> list[np.ndarray]:
    """Which original row each row of a permuted column holds, at each repeat, as sklearn's
    ``permutation_importance(random_state=seed)`` shuffles: a RandomState seeded by one draw
    from ``RandomState(seed)``, restarted for every column (all columns see the same shuffles),
    each repeat shuffling the index and applying it to the already shuffled column."""
    column_seed = np.random.RandomState(seed).randint(np.iinfo(np.int32).max + 1)
    rng = np.random.RandomState(column_seed)
    shuffle, held = np.arange(n_rows), np.arange(n_rows)
    orders = []
    for _ in range(repeats):
        rng.shuffle(shuffle)
        held = held[shuffle]
        orders.append(held)
    return orders


def ranking_scores(model: Any, x: pd.DataFrame) -> np.ndarray:
    """The scores sklearn's ``roc_auc`` scorer ranks: the decision function when the model has
    one, else the predicted probability of the positive class (ties can differ between them)."""
    if hasattr(model, "decision_function"):
        return np.asarray(model.decision_function(x), dtype=float)
    return np.asarray(model.predict_proba(x)[:, 1], dtype=float)


def _score_copies(model: Any, x: pd.DataFrame, copies: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """Scores of the rows of ``x`` stacked once per copy, copy ``(column, order)`` holding
    ``x`` with that column's rows taken in ``order`` (column -1: ``x`` unchanged), shape
    (copies, rows). One predict call for all copies instead of one per copy."""
    n = len(x)
    columns: dict[Any, Any] = {}
    for position, name in enumerate(x.columns):
        rows = np.tile(np.arange(n), len(copies))
        for i, (column, order) in enumerate(copies):
            if column == position:
                rows[i * n : (i + 1) * n] = order
        # .array.take keeps the column's dtype (nullable booleans, integers, categories)
        columns[name] = x[name].array.take(rows)
    return ranking_scores(model, pd.DataFrame(columns)).reshape(len(copies), n)


def permutation_importance_auroc(
    model: Any, x: pd.DataFrame, y: np.ndarray, *, repeats: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation, per column of ``x``, of the drop in AUROC when that column
    is shuffled: sklearn's ``permutation_importance(scoring="roc_auc", n_repeats=repeats,
    random_state=seed)`` with the same shuffles, but with every shuffled copy scored in a few
    batched predict calls and ranked at once by :func:`auroc_rows`."""
    orders = permutation_orders(len(x), repeats, seed)
    copies = [(-1, np.arange(len(x)))]  # the baseline
    copies += [(column, order) for column in range(x.shape[1]) for order in orders]
    per_call = max(1, IMPORTANCE_BATCH_ROWS // max(len(x), 1))
    scores = np.concatenate(
        [
            _score_copies(model, x, copies[start : start + per_call])
            for start in range(0, len(copies), per_call)
        ]
    )
    auroc = auroc_rows(y, scores)
    drops = (auroc[0] - auroc[1:]).reshape(x.shape[1], repeats)
    return drops.mean(axis=1), drops.std(axis=1)


def overall_metrics(
    y: np.ndarray, p: np.ndarray, groups: np.ndarray | None = None, seed: int = 0
) -> dict[str, Any]:
    """AUROC (None, with ``auroc_note`` saying why, under 20 positives), Brier score,
    prevalence, mean prediction, the reliability curve and bootstrap 95% intervals."""
    from sklearn.metrics import brier_score_loss  # on use: see pipelines.models.training

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


# why a group of 30 or more is suppressed too
SUPPRESSED_BESIDE_SMALL = f"suppressed with a group under {MIN_SUBGROUP_SIZE}"


def suppressed_groups(results: list[SubgroupResult]) -> set[tuple[str, str]]:
    """The (attribute, group) pairs whose size, positives and rates are not shared: every group
    under 30 and, while the groups suppressed in an attribute hold fewer than 30 rows together,
    its next smallest group too. The groups of an attribute cover the held-out set, whose size
    and positives are shared, so one small group alone, or small groups summing under 30, would
    otherwise follow by subtraction from the totals and the groups shown (primary and
    complementary cell suppression)."""
    hidden: set[tuple[str, str]] = set()
    for attribute in dict.fromkeys(r.attribute for r in results):
        rows = sorted((r for r in results if r.attribute == attribute), key=lambda r: r.n)
        small = [r for r in rows if r.n < MIN_SUBGROUP_SIZE]
        if not small:
            continue
        chosen = len(small)
        while sum(r.n for r in rows[:chosen]) < MIN_SUBGROUP_SIZE and chosen < len(rows):
            chosen += 1
        hidden.update((r.attribute, r.group) for r in rows[:chosen])
    return hidden


def _suppressed(result: SubgroupResult) -> SubgroupResult:
    """``result`` with nothing to assess: a group under 30 keeps its reason."""
    reason = result.reason if result.n < MIN_SUBGROUP_SIZE else SUPPRESSED_BESIDE_SMALL
    return replace(result, auroc=None, assessable=False, reason=reason, suppressed=True)


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
    hidden = suppressed_groups(results)
    return [_suppressed(r) if (r.attribute, r.group) in hidden else r for r in results]


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
