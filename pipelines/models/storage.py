"""Where the model stage keeps its tables: DuckDB schema ``models`` and ``WORKDIR/models/``."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd

from pipelines.publish import publish_table
from vault.catalog import quote_identifier

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
    reads by kind (:func:`pipelines.models.frame.feature_columns`).

    A column DuckDB reads no type from (an object column of no rows: the training set of a
    first release without a label row) is written as VARCHAR, the type its strings take once
    there are rows; typed NULL, the table refused every row a later refresh inserted."""
    path = parquet_path(workdir, table)
    rows = con.from_df(frame)
    if any(str(kind) == '"NULL"' for kind in rows.types):
        rows = rows.project(
            ", ".join(
                f"CAST({quote_identifier(name)} AS VARCHAR) AS {quote_identifier(name)}"
                if str(kind) == '"NULL"'
                else quote_identifier(name)
                for name, kind in zip(rows.columns, rows.types, strict=True)
            )
        )
    publish_table(con, f"{MODELS_SCHEMA}.{table}", path, rows)
    return path
