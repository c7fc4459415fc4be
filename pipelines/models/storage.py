"""Where the model stage keeps its tables: DuckDB schema ``models`` and ``WORKDIR/models/``."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd

MODELS_SCHEMA = "models"
LABELS_TABLE = "readmission_labels"
TRAINING_SET_TABLE = "readmission_training_set"
MODEL_DIR = "readmission"


def models_dir(workdir: str | Path) -> Path:
    return Path(workdir) / MODELS_SCHEMA


def parquet_path(workdir: str | Path, table: str) -> Path:
    return models_dir(workdir) / f"{table}.parquet"


def write_table(
    con: duckdb.DuckDBPyConnection, frame: pd.DataFrame, table: str, workdir: str | Path
) -> Path:
    """Replace ``models.<table>`` with ``frame`` and write the same rows to Parquet."""
    path = parquet_path(workdir, table)
    path.parent.mkdir(parents=True, exist_ok=True)
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {MODELS_SCHEMA}")
    con.register("_models_frame", frame)
    try:
        con.execute(
            f"CREATE OR REPLACE TABLE {MODELS_SCHEMA}.{table} AS SELECT * FROM _models_frame"
        )
    finally:
        con.unregister("_models_frame")
    # Parquet from pandas keeps the exact dtypes Feast and the trainer read back.
    frame.to_parquet(path, index=False)
    return path
