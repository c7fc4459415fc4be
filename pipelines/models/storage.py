"""Where the model stage keeps its tables: DuckDB schema ``models`` and ``WORKDIR/models/``."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd

from pipelines.publish import publish_table

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
    """Replace ``models.<table>`` with ``frame`` and write the same rows to Parquet, both
    atomically (a reader never sees half of either).

    The Parquet file is written from the DuckDB table, so the two hold the same column types;
    pandas' nullable and string dtypes read back as their NumPy counterparts, which the trainer
    reads by kind (:func:`pipelines.models.frame.feature_columns`)."""
    path = parquet_path(workdir, table)
    publish_table(con, f"{MODELS_SCHEMA}.{table}", path, con.from_df(frame))
    return path
