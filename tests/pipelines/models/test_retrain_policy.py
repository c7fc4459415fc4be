"""The retrain rule: the model on disk is kept while its training set barely changed."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from dagster import materialize

from pipelines.assets.models import readmission_model
from pipelines.erasure import purge_model_training_record
from pipelines.models.retrain import retrain_decision
from pipelines.models.storage import MODEL_DIR, TRAINING_SET_TABLE, models_dir, parquet_path
from pipelines.models.training import (
    METRICS_FILE,
    MODEL_FILE,
    TRAINED_ON_ERASED_FILE,
    TRAINED_ON_FILE,
    TRAINED_ON_ROWS_FILE,
    InsufficientTrainingDataError,
    forget_trained_on,
    load_model_report,
    train_readmission_model,
)
from pipelines.resources import WarehouseResource

from .crafted import planted_frame

THRESHOLD = 0.05
# what the model reads of a planted frame, with the row's keys and label
COLUMNS = [
    "patient_id",
    "event_timestamp",
    "label",
    "age_years",
    "condition_burden",
    "lab_value",
    "noise_score",
    "gender",
    "race_code",
]


def _rows(frame: pd.DataFrame) -> Counter[tuple[Any, ...]]:
    """The rows as a multiset of tuples, missing values as None (NaN is not equal to itself)."""
    values = frame[COLUMNS].astype(object)
    values = values.where(values.notna(), None)
    return Counter(values.itertuples(index=False, name=None))


def _changed(before: pd.DataFrame, after: pd.DataFrame) -> int:
    """Rows added plus rows removed, computed from the rows themselves."""
    old, new = _rows(before), _rows(after)
    return sum((old - new).values()) + sum((new - old).values())


def _replace_share(frame: pd.DataFrame, share: float, seed: int = 7) -> pd.DataFrame:
    """``frame`` with ``share`` of its rows given another noise score."""
    rng = np.random.default_rng(seed)
    changed = frame.copy()
    rows = rng.choice(len(frame), size=round(share * len(frame)), replace=False)
    changed.loc[rows, "noise_score"] = changed.loc[rows, "noise_score"] + 10.0
    return changed


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    frame = planted_frame(n_patients=400)
    out_dir = tmp_path_factory.mktemp("retrain") / "model"
    train_readmission_model(frame, out_dir=out_dir)
    return frame, out_dir


def test_fit_records_what_it_was_trained_on(trained: tuple[pd.DataFrame, Path]) -> None:
    frame, out_dir = trained
    document = json.loads((out_dir / TRAINED_ON_FILE).read_text())
    assert document["columns"] == COLUMNS and document["rows"] == len(frame)
    assert isinstance(document["training_version"], int)
    digests = pd.read_parquet(out_dir / TRAINED_ON_ROWS_FILE)
    assert list(digests.columns) == ["row_digest", "patient_id"]
    assert str(digests["row_digest"].dtype) == "uint64"
    assert len(digests) == len(frame)
    # equal rows have equal digests: as many distinct digests as distinct rows
    assert digests["row_digest"].nunique() == len(_rows(frame))
    decision = retrain_decision(frame, out_dir, THRESHOLD)
    assert not decision.retrain and decision.changed_rows == 0
    assert decision.rows_at_fit == len(frame)


def test_report_reloaded_from_disk_equals_the_fit(tmp_path: Path) -> None:
    frame = planted_frame(n_patients=200, seed=5)
    report = train_readmission_model(frame, out_dir=tmp_path / "model")
    assert load_model_report(tmp_path / "model") == report


def test_row_order_does_not_matter(trained: tuple[pd.DataFrame, Path]) -> None:
    frame, out_dir = trained
    shuffled = frame.sample(frac=1.0, random_state=1).reset_index(drop=True)
    decision = retrain_decision(shuffled, out_dir, THRESHOLD)
    assert not decision.retrain and decision.changed_rows == 0


def test_one_percent_replaced_keeps_the_model(trained: tuple[pd.DataFrame, Path]) -> None:
    frame, out_dir = trained
    changed = _replace_share(frame, 0.01)
    expected = _changed(frame, changed)
    assert expected == 2 * round(0.01 * len(frame))  # each replaced row: one out, one in
    decision = retrain_decision(changed, out_dir, THRESHOLD)
    assert not decision.retrain
    assert decision.changed_rows == expected
    assert decision.changed_share == pytest.approx(expected / len(frame))
    assert decision.rows_at_fit == len(frame) and decision.rows_now == len(frame)


def test_ten_percent_replaced_retrains(trained: tuple[pd.DataFrame, Path]) -> None:
    frame, out_dir = trained
    changed = _replace_share(frame, 0.10)
    decision = retrain_decision(changed, out_dir, THRESHOLD)
    assert decision.retrain
    assert decision.changed_rows == _changed(frame, changed)
    assert decision.changed_share >= THRESHOLD


def test_removed_and_duplicated_rows_count(trained: tuple[pd.DataFrame, Path]) -> None:
    frame, out_dir = trained
    # one row each of 20 patients who keep another row
    repeat_patients = frame.groupby("patient_id").filter(lambda g: len(g) > 1)
    dropped = repeat_patients.drop_duplicates("patient_id").index[:20]
    removed = frame.drop(index=dropped).reset_index(drop=True)
    decision = retrain_decision(removed, out_dir, THRESHOLD)
    assert decision.changed_rows == _changed(frame, removed) == 20
    assert not decision.retrain  # 20 rows of about 800, every patient still there
    # a repeated row is one more row of a multiset
    repeated = pd.concat([frame, frame.iloc[:3]], ignore_index=True)
    assert retrain_decision(repeated, out_dir, THRESHOLD).changed_rows == 3
    # a third of the patients gone: retrain
    patients = frame["patient_id"].unique()
    most = frame[~frame["patient_id"].isin(patients[::3])].reset_index(drop=True)
    decision = retrain_decision(most, out_dir, THRESHOLD)
    assert decision.retrain and decision.changed_rows == _changed(frame, most)
    assert decision.changed_share == pytest.approx(decision.changed_rows / len(frame))


def test_a_patient_leaving_the_training_set_retrains(trained: tuple[pd.DataFrame, Path]) -> None:
    frame, out_dir = trained
    gone = str(frame["patient_id"].iloc[0])
    without = frame[frame["patient_id"].astype(str) != gone].reset_index(drop=True)
    expected = _changed(frame, without)
    assert 0 < expected / len(frame) < THRESHOLD  # few rows: the share alone would keep it
    decision = retrain_decision(without, out_dir, THRESHOLD)
    assert decision.retrain and decision.changed_rows == expected
    assert "1 patients the model was trained on left" in decision.reason


def test_forget_deletes_the_record_that_names_the_patient(tmp_path: Path) -> None:
    frame = planted_frame(n_patients=200, seed=11)
    # pseudonyms of the platform's shape (the erasure refuses anything else)
    codes = {p: f"{i:032x}" for i, p in enumerate(frame["patient_id"].unique())}
    frame["patient_id"] = frame["patient_id"].map(codes)
    out_dir = tmp_path / "models" / MODEL_DIR
    train_readmission_model(frame, out_dir=out_dir)
    patient = str(frame["patient_id"].iloc[0])
    rows = int((frame["patient_id"].astype(str) == patient).sum())
    assert purge_model_training_record(tmp_path / "models", "f" * 32) == 0
    assert (out_dir / TRAINED_ON_ROWS_FILE).exists()
    assert purge_model_training_record(tmp_path / "models", patient) == rows
    assert not (out_dir / TRAINED_ON_ROWS_FILE).exists()
    assert not (out_dir / TRAINED_ON_FILE).exists()
    assert retrain_decision(frame, out_dir, THRESHOLD).retrain


def test_changed_columns_retrain(trained: tuple[pd.DataFrame, Path]) -> None:
    frame, out_dir = trained
    variants = {
        "added": frame.assign(new_feature=1.0),
        "removed": frame.drop(columns=["noise_score"]),
        "renamed": frame.rename(columns={"lab_value": "lab_latest"}),
        "reordered": frame[[*frame.columns[:3], *reversed(frame.columns[3:])]],
    }
    for name, variant in variants.items():
        decision = retrain_decision(variant, out_dir, THRESHOLD)
        assert decision.retrain, name
        assert "columns" in decision.reason, name
    # a column the model does not read (an empty one, an excluded audit column) changes nothing
    assert not retrain_decision(frame.assign(empty=np.nan), out_dir, THRESHOLD).retrain
    audited = frame.assign(audit_race="2106-3")
    assert not retrain_decision(audited, out_dir, THRESHOLD, exclude=("audit_race",)).retrain


@pytest.mark.parametrize(
    "missing", [MODEL_FILE, METRICS_FILE, "model_card.md", TRAINED_ON_FILE, TRAINED_ON_ROWS_FILE]
)
def test_missing_files_retrain(
    trained: tuple[pd.DataFrame, Path], tmp_path: Path, missing: str
) -> None:
    frame, out_dir = trained
    copy = shutil.copytree(out_dir, tmp_path / "model")
    (copy / missing).unlink()
    decision = retrain_decision(frame, copy, THRESHOLD)
    assert decision.retrain and decision.changed_rows == 0
    assert not retrain_decision(frame, out_dir, THRESHOLD).retrain
    assert retrain_decision(frame, tmp_path / "never_trained", THRESHOLD).retrain


def test_training_version_change_retrains(
    trained: tuple[pd.DataFrame, Path], tmp_path: Path
) -> None:
    frame, out_dir = trained
    copy = shutil.copytree(out_dir, tmp_path / "model")
    document = json.loads((copy / TRAINED_ON_FILE).read_text())
    document["training_version"] -= 1
    (copy / TRAINED_ON_FILE).write_text(json.dumps(document))
    decision = retrain_decision(frame, copy, THRESHOLD)
    assert decision.retrain and "training_version" in decision.reason


@pytest.mark.parametrize("threshold", [0.0, -1.0])
def test_threshold_zero_always_retrains(
    trained: tuple[pd.DataFrame, Path], threshold: float
) -> None:
    frame, out_dir = trained
    decision = retrain_decision(frame, out_dir, threshold)
    assert decision.retrain and decision.changed_rows == 0


def test_attempt_without_enough_data_forgets_the_record(
    trained: tuple[pd.DataFrame, Path], tmp_path: Path
) -> None:
    frame, out_dir = trained
    copy = shutil.copytree(out_dir, tmp_path / "model")
    with pytest.raises(InsufficientTrainingDataError):
        train_readmission_model(frame.assign(label=0), out_dir=copy)
    assert not (copy / TRAINED_ON_FILE).exists()
    assert retrain_decision(frame, copy, THRESHOLD).retrain


# The asset, materialised by Dagster over a training-set Parquet file


def _workdir(tmp_path: Path, frame: pd.DataFrame) -> tuple[WarehouseResource, Path]:
    workdir = tmp_path / "work"
    path = parquet_path(workdir, TRAINING_SET_TABLE)
    path.parent.mkdir(parents=True)
    frame.to_parquet(path, index=False)
    warehouse = WarehouseResource(workdir=str(workdir))
    warehouse.connect().close()
    return warehouse, path


def _materialize(
    warehouse: WarehouseResource, run_config: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, bool]]:
    result = materialize(
        [readmission_model], resources={"warehouse": warehouse}, run_config=run_config
    )
    assert result.success
    metadata = result.asset_materializations_for_node("readmission_model")[0].metadata
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    return {k: v.value for k, v in metadata.items()}, checks


def test_asset_keeps_the_model_after_a_small_change(tmp_path: Path) -> None:
    frame = planted_frame(n_patients=400)
    warehouse, training_path = _workdir(tmp_path, frame)
    model_path = models_dir(warehouse.workdir) / MODEL_DIR / MODEL_FILE

    first, first_checks = _materialize(warehouse)
    assert first["retrained"] is True and "no trained model" in first["retrain_reason"]
    assert first["rows_at_fit"] is None and first["rows_now"] == len(frame)
    assert first_checks == {"auroc_beats_chance": True}
    fitted = model_path.stat().st_mtime_ns, model_path.read_bytes()

    changed = _replace_share(frame, 0.01)
    changed.to_parquet(training_path, index=False)
    kept, kept_checks = _materialize(warehouse)
    assert kept["retrained"] is False
    assert kept["changed_rows"] == _changed(frame, changed)
    assert kept["changed_share"] == pytest.approx(kept["changed_rows"] / len(frame))
    assert kept["retrain_min_changed_share"] == THRESHOLD
    assert kept["rows_at_fit"] == kept["rows_now"] == len(frame)
    assert (model_path.stat().st_mtime_ns, model_path.read_bytes()) == fitted
    # the kept model's metadata and check, rebuilt from its files
    for key in ("auroc", "brier", "n_train", "n_test", "features", "auroc_ci95", "model"):
        assert kept[key] == first[key], key
    assert "roc_curve" in str(kept["plot_roc_curve"]) and kept["model_card"] == first["model_card"]
    assert kept_checks == first_checks

    forced, _ = _materialize(
        warehouse, {"ops": {"readmission_model": {"config": {"retrain_min_changed_share": 0.0}}}}
    )
    assert forced["retrained"] is True and forced["changed_rows"] == kept["changed_rows"]
    assert model_path.stat().st_mtime_ns != fitted[0]
    # trained on the changed rows now: nothing changed since
    again, _ = _materialize(warehouse)
    assert again["retrained"] is False and again["changed_rows"] == 0


def test_asset_retrains_after_an_attempt_without_a_model(tmp_path: Path) -> None:
    frame = planted_frame(n_patients=400)
    warehouse, training_path = _workdir(tmp_path, frame)
    first, _ = _materialize(warehouse)
    assert first["retrained"] is True
    # a release with one class only: not trained, and the earlier model is not kept either
    frame.assign(label=0).to_parquet(training_path, index=False)
    not_trained, checks = _materialize(warehouse)
    assert not_trained["trained"] is False and checks == {"auroc_beats_chance": False}
    frame.to_parquet(training_path, index=False)
    again, checks = _materialize(warehouse)
    assert again["retrained"] is True and checks == {"auroc_beats_chance": True}


def test_a_model_that_cannot_be_trained_again_is_withdrawn_whole(tmp_path: Path) -> None:
    """Patients leave the training set (opted out, say) until too few are left to train: the
    model fitted with them must not stay on disk, nor its metrics, plots or record of training
    rows; a card alone says why there is no model. Checked on the files themselves: every file
    the models folder holds after the failed refresh, hidden version folders included."""
    frame = planted_frame(n_patients=400)
    warehouse, training_path = _workdir(tmp_path, frame)
    first, _ = _materialize(warehouse)
    assert first["retrained"] is True
    folder = models_dir(warehouse.workdir)
    fitted = {p.name for p in folder.rglob("*") if p.is_file()}
    assert {"readmission_model.joblib", "metrics.json", "model_card.md"} <= fitted
    # all but three patients leave: too few to split into train and test
    kept_patients = sorted(frame["patient_id"].unique())[:3]
    frame[frame["patient_id"].isin(kept_patients)].to_parquet(training_path, index=False)
    not_trained, checks = _materialize(warehouse)
    assert not_trained["trained"] is False and checks == {"auroc_beats_chance": False}
    left = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    # the card of the withdrawn set, through the link and in its version folder; nothing else
    # of the model (the training set's own Parquet file sits beside, in the models folder)
    assert [name for name in left if name.endswith(".joblib") or "trained_on" in name] == []
    assert [name for name in left if name.endswith(("metrics.json", ".png"))] == []
    card = (folder / MODEL_DIR / "model_card.md").read_text()
    assert "No model is published" in card and "No model is published" in not_trained["model_card"]


def test_an_erasure_that_deleted_the_record_is_the_reason_given(
    trained: tuple[pd.DataFrame, Path], tmp_path: Path
) -> None:
    frame, out_dir = trained
    copy = shutil.copytree(out_dir, tmp_path / "model")
    forget_trained_on(copy, erased=True)
    assert not (copy / TRAINED_ON_FILE).exists() and not (copy / TRAINED_ON_ROWS_FILE).exists()
    decision = retrain_decision(frame, copy, THRESHOLD)
    assert decision.retrain and decision.reason.startswith(
        "a patient the model was trained on was erased"
    )
    # the record missing for another reason (a copy without it) says only that
    (copy / TRAINED_ON_ERASED_FILE).unlink()
    decision = retrain_decision(frame, copy, THRESHOLD)
    assert decision.reason == "no record of the rows the model was trained on"
    # the next fit publishes a set of its own: no marker in it
    train_readmission_model(frame, out_dir=tmp_path / "refit")
    assert not (tmp_path / "refit" / TRAINED_ON_ERASED_FILE).exists()
    assert not retrain_decision(frame, tmp_path / "refit", THRESHOLD).retrain
