"""The model card (Markdown) of a trained readmission model, written from its metrics document."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _subgroup_table(subgroups: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| attribute | group | n | positives | observed rate | predicted rate | "
        "calibration gap | AUROC | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in subgroups:
        # a suppressed group comes from metrics.json with its size bounded ("<30", ">=30") and
        # no count or rate, the same in both places
        positives = "-" if r["positives"] is None else str(r["positives"])
        gap = "-" if r["calibration_gap"] is None else f"{r['calibration_gap']:+.3f}"
        lines.append(
            f"| {r['attribute']} | {r['group']} | {r['n']} | {positives} | "
            f"{_rate(r['observed_rate'])} | {_rate(r['predicted_rate'])} | "
            f"{gap} | {_fmt(r['auroc'])} | {r['reason'] or ''} |"
        )
    return lines


def _with_ci(value: float | None, interval: list[float] | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if not interval:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} (95% CI {interval[0]:.{digits}f} to {interval[1]:.{digits}f})"


def metrics_rows(test: dict[str, Any]) -> list[str]:
    """The headline table: AUROC (or why it is not estimable) and calibration, with bootstrap
    95% intervals resampled by patient."""
    ci = test.get("ci95") or {}
    auroc = test.get("auroc_note") or _with_ci(test["auroc"], ci.get("auroc"))
    return [
        "| metric | value |",
        "|---|---:|",
        f"| test rows (positives) | {test.get('n', 'n/a')} ({test.get('positives', 'n/a')}) |",
        f"| AUROC | {auroc} |",
        f"| Brier score | {_fmt(test['brier'], 4)} |",
        f"| prevalence (observed) | {_fmt(test['prevalence'])} |",
        f"| mean predicted risk | {_fmt(test['mean_predicted'])} |",
        "| calibration in the large (predicted - observed) | "
        f"{_with_ci(test.get('calibration_in_the_large'), ci.get('calibration_in_the_large'))} |",
        "| expected calibration error | "
        f"{_with_ci(test['expected_calibration_error'], ci.get('ece'), 4)} |",
    ]


def temporal_section(temporal: dict[str, Any] | None) -> list[str]:
    lines = ["## Temporal validation (earlier discharges -> later discharges)"]
    if not temporal or not temporal.get("estimable"):
        reason = (temporal or {}).get("reason", "not run")
        return [*lines, f"Not estimable: {reason}.", ""]
    return [
        *lines,
        f"Trained on the earliest {temporal['train_share']:.0%} of discharge times (rows whose",
        "30-day window closed before the cut), tested on the later discharges:",
        f"{temporal['n_train']} training and {temporal['n_test']} test rows.",
        "",
        *metrics_rows(temporal["test"]),
        "",
    ]


def _closing_lines(plots: dict[str, Path]) -> list[str]:
    """Plots, limitations and ethical considerations."""
    return [
        "## Plots",
        *[f"- {name}: `{path.name}`" for name, path in plots.items()],
        "",
        "## Limitations",
        "- Synthetic data by default: performance on real records is unknown and likely lower.",
        "- Readmissions to other health systems are invisible; the label undercounts them.",
        "- Planned readmissions are not separated from unplanned ones.",
        "- Date shifting drops the time of day, so same-day transfers are not readmissions and",
        "  the censoring horizon is blurred by the shift range.",
        "- Deaths after discharge are kept as label 0 (competing risk not modelled).",
        "- Subgroup estimates on small held-out groups are noisy; intervals are given for the",
        "  overall metrics only.",
        "- Sex and age come from the features; race and ethnicity for the audit come from the",
        "  patient view when it is available. Missing values form an `unknown` group.",
        "",
        "## Ethical considerations",
        "- Readmission risk reflects access to care as well as illness; using scores to allocate",
        "  resources can entrench existing disparities. Review the subgroup table before use.",
        "- Demographic attributes are used as features only to the extent the feature service",
        "  provides them; consider a model without them and compare subgroup calibration.",
        "- Patients who opted out of research are excluded from training and evaluation.",
        "- No identifiers or protected health information are stored in the model or this card.",
        "",
    ]


def _gap_text(metrics: dict[str, Any]) -> str:
    """The largest AUROC gap and calibration spread between subgroups, in a sentence each."""
    gap = metrics.get("largest_subgroup_gap")
    cal_gap = metrics.get("largest_calibration_gap")
    if gap:
        text = (
            f"**Largest AUROC gap: {gap['attribute']}**, {gap['value']:.3f} between "
            f"`{gap['best_group']}` (best) and `{gap['worst_group']}` (worst)."
        )
    else:
        text = "**Largest AUROC gap:** not assessable (fewer than two assessable groups)."
    if cal_gap:
        text += (
            f" Largest calibration spread: {cal_gap['attribute']}, `{cal_gap['worst_group']}` "
            f"is {cal_gap['value']:.3f} further from calibrated than `{cal_gap['best_group']}`."
        )
    return text


def render_model_card(metrics: dict[str, Any], plots: dict[str, Path]) -> str:
    """Markdown text of the card: intended use, data, label, features, metrics, subgroups,
    limitations and ethical considerations."""
    test = metrics["test"]
    features = metrics["features"]
    gap_text = _gap_text(metrics)
    not_assessable = metrics.get("subgroups_not_assessable") or []
    chosen_c = metrics.get("regularisation_c")
    c_text = f" (L2, C={chosen_c:.3g} chosen on grouped inner folds)" if chosen_c else ""
    importance = metrics.get("permutation_importance") or []
    top_features = ", ".join(
        f"`{r['feature']}` ({r['importance_mean']:+.3f})" for r in importance[:8]
    )
    lines = [
        "# Model card: 30-day inpatient readmission risk",
        "",
        "## Intended use",
        "Estimate, at the moment of an inpatient discharge, the probability that the patient is",
        "admitted again as an inpatient within 30 days. Intended for research on the platform's",
        "de-identified data and for prioritising transitional-care follow-up in aggregate",
        "analyses. It is not a medical device, has not been validated prospectively, and must not",
        "be used to deny, ration or delay care for an individual.",
        "",
        "## Data",
        "De-identified FHIR R4 resources flattened by SQL-on-FHIR views: identifiers are keyed",
        "pseudonyms, dates are shifted per patient (time of day dropped), free text and",
        "direct identifiers are removed. Patients who opted out of research are excluded. By",
        "default the data are synthetic (the platform's Synthea-shaped generator), so the metrics",
        "describe the generator's outcome model, not any real population.",
        f"Training rows: {metrics['n_train']} discharges of {metrics['n_train_patients']} "
        f"patients; held-out rows: {metrics['n_test']} discharges of "
        f"{metrics['n_test_patients']} patients (split by patient, stratified by label, no "
        "patient on both sides).",
        "",
        "## Label",
        "One row per inpatient (class IMP, ACUTE or NONAC) discharge with an end time; an ICU",
        "or ward segment of a hospitalisation in the data (Encounter.partOf) is part of its",
        "stay, not a stay of its own. Label 1 when another inpatient admission starts within",
        "(discharge, discharge + 30 days], else 0. Excluded: discharges whose 30-day window",
        "runs past the last data timestamp (censoring), stays at which the patient died, stays",
        "ending in a transfer to another hospital (the episode is labelled at its last",
        "discharge), and all discharges of patients who opted out of research.",
        "",
        "## Features",
        f"Estimator: `{metrics['estimator']}`{c_text} in a scikit-learn pipeline",
        "(median imputation with missing indicators and standard scaling for numeric columns,",
        "one-hot encoding for categorical ones). Features are read point-in-time as of the",
        "discharge from the feature store.",
        f"- numeric: {', '.join(f'`{c}`' for c in features['numeric']) or 'none'}",
        f"- categorical: {', '.join(f'`{c}`' for c in features['categorical']) or 'none'}",
    ]
    if features.get("dropped"):
        lines.append(
            f"- ignored (date/time or empty): {', '.join(f'`{c}`' for c in features['dropped'])}"
        )
    lines += [
        f"- most important on held-out data (drop in AUROC when permuted): {top_features}",
        "",
        "## Metrics (held-out patients)",
        "Intervals: percentile bootstrap (1,000 resamples of test patients). An AUROC is not",
        "reported from fewer than 20 test positives.",
        "",
        *metrics_rows(test),
        "",
        "Reliability curve (quantile bins):",
        "",
        "| bin | n | mean predicted | observed |",
        "|---:|---:|---:|---:|",
    ]
    for i, b in enumerate(test["calibration_bins"], start=1):
        lines.append(f"| {i} | {b['n']} | {b['mean_predicted']:.3f} | {b['observed_rate']:.3f} |")
    lines += [
        "",
        "## Subgroup audit (held-out patients)",
        "Calibration gap = mean predicted risk minus observed rate. Groups with n < 30 or a",
        "single class are reported but not assessed. A group under 30 shows only that bound,",
        "with no count or rate; so does the next smallest group of its attribute (>=30) when",
        "the groups hidden would otherwise follow from the totals.",
        "",
        *_subgroup_table(metrics["subgroups"]),
        "",
        gap_text,
        "",
    ]
    if not_assessable:
        lines.append("Too small or single-class to assess: " + "; ".join(not_assessable) + ".")
        lines.append("")
    lines += temporal_section(metrics.get("temporal_validation"))
    lines += _closing_lines(plots)
    return "\n".join(lines)


def write_model_card(metrics: dict[str, Any], plots: dict[str, Path], path: Path) -> Path:
    """Write the card next to the model and return its path."""
    path.write_text(render_model_card(metrics, plots))
    return path
