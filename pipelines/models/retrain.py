"""When the readmission model is trained again: the retrain rule.

A fit (with its bootstrap, permutation importance and plots) costs the same whatever changed, and
after a small batch the training set is nearly the one the model was trained on. The model on
disk is kept unless one of these holds:

- there is no complete model on disk (no model, ``metrics.json`` or model card: never trained,
  the last attempt had too few rows, or a fit was interrupted before its record was written);
- there is no record of what it was trained on (``trained_on.json`` and ``trained_on.parquet``,
  written by :func:`pipelines.models.training.write_trained_on` after the model's files);
- the training code's version (``TRAINING_VERSION``) or scikit-learn's changed;
- the columns changed (a feature added, removed, renamed, or a column gaining its first value);
- a patient the model was trained on is no longer in the training set (erased, opted out of
  research, withheld): a model must not go on being one fitted to their data;
- at least ``min_changed_share`` of the rows changed: the rows added plus the rows removed (a
  row whose values changed counts twice) over the rows the model was trained on. Rows are
  compared by their digests as multisets, so their order does not matter.

``min_changed_share <= 0`` retrains every time.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.models.frame import feature_columns
from pipelines.models.training import (
    METRICS_FILE,
    MODEL_CARD_FILE,
    MODEL_FILE,
    TRAINED_ON_ERASED_FILE,
    TRAINED_ON_FILE,
    TRAINED_ON_ROWS_FILE,
    InsufficientTrainingDataError,
    labelled_rows,
    row_digests,
    trained_on_columns,
    training_environment,
)

DEFAULT_MIN_CHANGED_SHARE = 0.05


@dataclass(frozen=True)
class RetrainDecision:
    """Whether to train again, why, and how much of the training set changed since the fit
    (``rows_at_fit`` is None without a record of it)."""

    retrain: bool
    reason: str
    changed_rows: int
    changed_share: float
    rows_at_fit: int | None
    rows_now: int = 0

    def as_metadata(self, min_changed_share: float) -> dict[str, Any]:
        """Counts and shares only (no row, pseudonym or value), as asset metadata."""
        fields = asdict(self)
        return {
            "retrained": fields.pop("retrain"),
            "retrain_reason": fields.pop("reason"),
            **fields,
            "retrain_min_changed_share": min_changed_share,
        }


def changed_rows(before: np.ndarray, after: np.ndarray) -> int:
    """Rows added plus rows removed between two multisets of row digests."""
    counts = pd.Series(before).value_counts().sub(pd.Series(after).value_counts(), fill_value=0)
    return int(counts.abs().sum())


def _read_record(out_dir: Path) -> tuple[dict[str, Any], np.ndarray, set[str]] | None:
    """The record of the model's training rows, or None when it is missing or incomplete."""
    document_path = out_dir / TRAINED_ON_FILE
    rows_path = out_dir / TRAINED_ON_ROWS_FILE
    if not document_path.is_file() or not rows_path.is_file():
        return None
    try:
        document = json.loads(document_path.read_text(encoding="utf-8"))
        rows = pd.read_parquet(rows_path, columns=["row_digest", "patient_id"])
    except (OSError, ValueError, KeyError):
        return None
    digests = rows["row_digest"].to_numpy(dtype="uint64")
    if not isinstance(document, dict) or document.get("rows") != len(digests):
        return None
    return document, digests, set(rows["patient_id"].astype(str))


def retrain_decision(
    training: pd.DataFrame,
    out_dir: Path,
    min_changed_share: float,
    *,
    label: str = "label",
    exclude: tuple[str, ...] = (),
) -> RetrainDecision:
    """Compare ``training`` (the frame the trainer would be given, with ``exclude`` naming the
    columns that are not features, as in :func:`train_readmission_model`) with what the model
    in ``out_dir`` was trained on, and apply the retrain rule of this module."""
    # the files of one published set: those of the folder ``out_dir`` points to now
    out_dir = Path(out_dir).resolve()

    def retrain(
        reason: str, changed: int = 0, share: float = 0.0, at_fit: int | None = None
    ) -> RetrainDecision:
        return RetrainDecision(True, reason, changed, share, at_fit, len(training))

    missing = [
        f for f in (MODEL_FILE, METRICS_FILE, MODEL_CARD_FILE) if not (out_dir / f).is_file()
    ]
    if missing:
        return retrain(f"no trained model on disk (missing {', '.join(missing)})")
    record = _read_record(out_dir)
    if record is None:
        if (out_dir / TRAINED_ON_ERASED_FILE).is_file():
            return retrain(
                "a patient the model was trained on was erased (ehr forget deleted the record "
                "of its training rows, which named them): trained again without them"
            )
        return retrain("no record of the rows the model was trained on")
    document, digests_at_fit, patients_at_fit = record
    rows_at_fit = len(digests_at_fit)
    environment = training_environment()
    changed_environment = [k for k, v in environment.items() if document.get(k) != v]
    if changed_environment:
        return retrain(
            f"changed since the fit: {', '.join(changed_environment)}", 0, 0.0, rows_at_fit
        )
    try:
        frame = labelled_rows(training, label)
    except (InsufficientTrainingDataError, ValueError) as exc:
        return retrain(f"the training set cannot be compared: {exc}", 0, 0.0, rows_at_fit)
    columns = trained_on_columns(frame, label, feature_columns(frame, label, exclude))
    if columns != document.get("columns"):
        return retrain("the training set's columns changed", 0, 0.0, rows_at_fit)
    changed = changed_rows(digests_at_fit, row_digests(frame, columns))
    share = changed / max(rows_at_fit, 1)
    counts = f"{changed} of {rows_at_fit} rows changed ({share:.2%})"
    left = len(patients_at_fit - set(frame["patient_id"].astype(str)))
    if left:
        reason = f"{counts}; {left} patients the model was trained on left the training set"
        return retrain(reason, changed, share, rows_at_fit)
    if min_changed_share <= 0:
        return retrain(f"{counts}; retraining on every refresh", changed, share, rows_at_fit)
    if share >= min_changed_share:
        return retrain(f"{counts}, at least {min_changed_share:.2%}", changed, share, rows_at_fit)
    return RetrainDecision(
        retrain=False,
        reason=f"{counts}, under {min_changed_share:.2%}",
        changed_rows=changed,
        changed_share=share,
        rows_at_fit=rows_at_fit,
        rows_now=len(training),
    )
