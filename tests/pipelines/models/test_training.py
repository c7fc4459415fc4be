from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.models.evaluation import subgroup_audit
from pipelines.models.training import (
    InsufficientTrainingDataError,
    bounded_subgroups,
    load_model,
    split_by_patient,
    train_readmission_model,
)

from .crafted import planted_frame


def test_patient_split_keeps_patients_on_one_side() -> None:
    frame = planted_frame()
    train, test = split_by_patient(frame, "label", seed=0)
    assert not set(frame["patient_id"].iloc[train]) & set(frame["patient_id"].iloc[test])
    assert len(train) + len(test) == len(frame)


def _clustered_frame(rng: np.random.Generator) -> pd.DataFrame:
    """200 patients with 1-4 discharges each; a fifth of the patients hold every positive, two
    in three of their discharges: the positives sit in few patients, as readmissions do."""
    rows = []
    for p in range(200):
        readmitter = p % 5 == 0
        for _ in range(int(rng.integers(1, 5))):
            label = int(readmitter and rng.random() < 2 / 3)
            rows.append({"patient_id": f"p{p:03d}", "label": label})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seed", range(10))
def test_patient_split_holds_its_share_of_the_positives(seed: int) -> None:
    rng = np.random.default_rng(seed)
    frame = _clustered_frame(rng)
    # the patients' pseudonyms are arbitrary: the split must not depend on their luck
    patients = frame["patient_id"].unique()
    renamed = dict(zip(patients, rng.permutation(len(patients)), strict=True))
    frame["patient_id"] = frame["patient_id"].map(lambda p: f"{renamed[p]:064x}")
    train, test = split_by_patient(frame, "label", seed=0)
    y = frame["label"].to_numpy()
    assert not set(frame["patient_id"].iloc[train]) & set(frame["patient_id"].iloc[test])
    assert len(train) + len(test) == len(frame)
    # computed here, not by the splitter: a quarter of the positives, within a patient's worth
    expected = y.sum() / 4
    assert abs(int(y[test].sum()) - expected) <= 4
    assert abs(len(test) / len(frame) - 0.25) < 0.06


def test_training_finds_planted_signal(tmp_path: Path) -> None:
    frame = planted_frame()
    report = train_readmission_model(frame, out_dir=tmp_path / "model", seed=0)
    assert report.auroc is not None and report.auroc > 0.7
    assert report.brier is not None and 0 < report.brier < 0.25
    assert report.n_train + report.n_test == len(frame)
    assert set(report.features) == {
        "age_years",
        "condition_burden",
        "lab_value",
        "noise_score",
        "gender",
        "race_code",
    }
    metrics = json.loads(report.metrics_path.read_text())
    attributes = {row["attribute"] for row in metrics["subgroups"]}
    assert attributes == {"sex", "age_band", "race"}
    bands = [r["group"] for r in metrics["subgroups"] if r["attribute"] == "age_band"]
    assert bands == ["<45", "45-64", "65-79", "80+"]
    assert metrics["largest_subgroup_gap"]["metric"] == "auroc"
    # the rare race code is reported but flagged as too small to assess
    rare = [r for r in metrics["subgroups"] if r["group"] == "1002-5"]
    assert rare and not rare[0]["assessable"] and rare[0]["auroc"] is None
    assert any("1002-5" in s for s in report.too_small_subgroups)
    top = [r["feature"] for r in metrics["permutation_importance"][:2]]
    assert "condition_burden" in top
    assert metrics["test"]["calibration_bins"]

    for path in report.plots.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(report.plots) == {
        "roc_curve",
        "calibration_curve",
        "subgroup_auroc",
        "feature_importance",
    }
    card = report.model_card_path.read_text()
    for heading in (
        "Intended use",
        "Data",
        "Label",
        "Features",
        "Metrics",
        "Subgroup audit",
        "Limitations",
        "Ethical considerations",
    ):
        assert f"## {heading}" in card
    assert "Largest AUROC gap" in card
    assert "| race | 1002-5 | <30 | - |" in card  # small cells as a bound, not a count
    assert frame["patient_id"].iloc[0] not in card

    model = load_model(report.model_path)
    risk = model.predict_proba(frame.drop(columns=["label"]).head(20))[:, 1]
    assert risk.shape == (20,) and np.all((risk > 0) & (risk < 1))


def test_missing_subgroup_class_and_unseen_categories(tmp_path: Path) -> None:
    frame = planted_frame(seed=7)
    frame["gender"] = "female"  # one sex only: no gap can be measured for sex
    frame.loc[frame.index[:40], "race_code"] = None  # missing race becomes its own group
    frame = frame.drop(columns=["age_years"])  # no age column: no age bands
    report = train_readmission_model(frame, out_dir=tmp_path / "m", seed=1)
    metrics = json.loads(report.metrics_path.read_text())
    assert {r["attribute"] for r in metrics["subgroups"]} == {"sex", "race"}
    assert [r["group"] for r in metrics["subgroups"] if r["attribute"] == "sex"] == ["female"]
    assert not any(g["attribute"] == "sex" for g in metrics["subgroup_gaps"])
    assert "unknown" in {r["group"] for r in metrics["subgroups"] if r["attribute"] == "race"}
    model = load_model(report.model_path)
    unseen = frame.drop(columns=["label"]).head(3).assign(gender="other", race_code="new")
    assert model.predict_proba(unseen).shape == (3, 2)


def test_single_class_frame_is_refused(tmp_path: Path) -> None:
    frame = planted_frame().assign(label=0)
    with pytest.raises(InsufficientTrainingDataError, match="single label class"):
        train_readmission_model(frame, out_dir=tmp_path)


def test_nullable_and_empty_feature_columns(tmp_path: Path) -> None:
    frame = planted_frame(seed=11)
    n = len(frame)
    frame["never_measured"] = np.nan
    frame["flag"] = pd.array(
        np.where(np.arange(n) % 3 == 0, None, np.arange(n) % 2 == 0), dtype="boolean"
    )
    frame["age_years"] = pd.array(frame["age_years"].astype(int), dtype="Int64")
    # what Feast returns for a boolean feature with missing rows
    frame["object_flag"] = pd.Series(list(frame["flag"].astype(object)), dtype=object).where(
        frame["flag"].notna(), None
    )
    frame["recorded_at"] = frame["event_timestamp"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = train_readmission_model(frame, out_dir=tmp_path, seed=0)
    assert "flag" in report.features and "age_years" in report.features
    assert "object_flag" in metrics_numeric(report.metrics_path)
    assert "never_measured" not in report.features and "recorded_at" not in report.features
    metrics = json.loads(report.metrics_path.read_text())
    assert set(metrics["features"]["dropped"]) == {"never_measured", "recorded_at"}


def metrics_numeric(path: Path) -> list[str]:
    return list(json.loads(path.read_text())["features"]["numeric"])


def test_card_and_metrics_bound_small_groups_the_same_way(tmp_path: Path) -> None:
    report = train_readmission_model(planted_frame(), out_dir=tmp_path / "model", seed=0)
    metrics = json.loads(report.metrics_path.read_text())
    card = report.model_card_path.read_text()
    for row in metrics["subgroups"]:
        # a group of 30 or more suppressed beside a small one shows only its bound too
        assert (isinstance(row["n"], int) and row["n"] >= 30) or row["n"] in ("<30", ">=30")
        assert f"| {row['attribute']} | {row['group']} | {row['n']} |" in card
    rare = next(r for r in metrics["subgroups"] if r["group"] == "1002-5")
    assert rare["n"] == "<30" and rare["positives"] is None


def test_card_reports_intervals_and_temporal_validation(tmp_path: Path) -> None:
    frame = planted_frame()
    report = train_readmission_model(frame, out_dir=tmp_path / "model", seed=0)
    metrics = json.loads(report.metrics_path.read_text())
    low, high = metrics["test"]["ci95"]["auroc"]
    assert low <= metrics["test"]["auroc"] <= high
    assert metrics["test"]["ci95"]["ece"] is not None
    temporal = metrics["temporal_validation"]
    assert temporal["estimable"] and temporal["n_test"] > 0
    card = report.model_card_path.read_text()
    assert "95% CI" in card and "## Temporal validation" in card


def test_auroc_not_estimable_below_twenty_positives(tmp_path: Path) -> None:
    frame = planted_frame()
    positives = frame.index[frame["label"] == 1]
    # keep 24 positives in all: the held-out quarter holds fewer than 20
    frame = frame.drop(positives[24:]).reset_index(drop=True)
    report = train_readmission_model(frame, out_dir=tmp_path / "model", seed=0)
    metrics = json.loads(report.metrics_path.read_text())
    assert report.auroc is None and metrics["test"]["auroc"] is None
    assert metrics["test"]["auroc_note"].startswith("not estimable")
    assert "not estimable" in report.model_card_path.read_text()


def test_patient_split_of_few_positives_warns_nothing() -> None:
    """Three positives cannot be stratified over four folds: the split still holds both
    classes on each side, without sklearn's warning reaching the run's log."""
    frame = pd.DataFrame(
        {"patient_id": [f"{p:064x}" for p in range(40)], "label": [1, 1, 1] + [0] * 37}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train, test = split_by_patient(frame, "label", seed=0)
    y = frame["label"].to_numpy()
    assert set(y[train]) == {0, 1} and set(y[test]) == {0, 1}


def _published_remainders(
    rows: list[dict], n_total: int, positives_total: int
) -> dict[str, tuple[int, int]]:
    """What an attacker gets by subtraction: per attribute, the rows and positives of the
    held-out set that no group shown with an exact count accounts for."""
    left: dict[str, tuple[int, int]] = {}
    for attribute in dict.fromkeys(r["attribute"] for r in rows):
        shown = [r for r in rows if r["attribute"] == attribute and isinstance(r["n"], int)]
        left[attribute] = (
            n_total - sum(r["n"] for r in shown),
            positives_total - sum(r["positives"] for r in shown),
        )
    return left


@pytest.mark.parametrize(
    "race_sizes",
    [
        {"A": 200, "B": 60, "C": 3},  # one small group: its size would follow from the totals
        {"A": 200, "B": 40, "C": 3, "D": 9},  # two small groups summing under 30
        {"A": 200, "B": 40, "C": 25, "D": 12},  # two small groups summing over 30
    ],
)
def test_no_suppressed_group_follows_from_the_totals(race_sizes: dict[str, int]) -> None:
    rng = np.random.default_rng(3)
    race = np.concatenate([[g] * n for g, n in race_sizes.items()])
    n_total = len(race)
    # the small groups' outcomes are the ones to hide: nobody in C is readmitted
    y = np.where(race == "C", 0, rng.integers(0, 2, n_total))
    p = rng.uniform(0.05, 0.95, n_total)
    sex = np.where(np.arange(n_total) < n_total - 7, "female", "other")
    rows = bounded_subgroups(subgroup_audit(y, p, {"race": pd.Series(race), "sex": pd.Series(sex)}))
    # counted here from the arrays: the groups under 30 of each attribute
    small = {
        (attribute, str(g))
        for attribute, values in (("race", race), ("sex", sex))
        for g in set(values)
        if int(np.sum(values == g)) < 30
    }
    for row in rows:
        if (row["attribute"], row["group"]) in small:
            assert row["n"] == "<30"
        if not isinstance(row["n"], int):  # nothing of a suppressed group but a bound
            assert [row[k] for k in ("positives", "observed_rate", "predicted_rate")] == [None] * 3
            assert (row["calibration_gap"], row["auroc"]) == (None, None)
    remainders = _published_remainders(rows, n_total, int(y.sum()))
    for attribute, (rest, _) in remainders.items():
        # whatever no exact group accounts for is nothing, or 30 rows or more together
        assert rest == 0 or rest >= 30, (attribute, rest)
    assert remainders["race"][0] > 0 and remainders["sex"][0] > 0
