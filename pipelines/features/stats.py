"""Statistics of a built feature table for its Dagster metadata: the null rate of every feature
and one PNG of their distributions (aggregates only, never a row).

Both are taken over each patient's latest row (the value the online store serves): the change
point rows repeat a patient's values many times, which would weigh long records more."""

from __future__ import annotations

from pathlib import Path

import duckdb
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from pipelines.features.tables import FEATURES_SCHEMA

KEY_COLUMNS = ("patient_id", "event_timestamp", "created")
GRID_COLUMNS = 4


def latest_rows(con: duckdb.DuckDBPyConnection, name: str) -> pd.DataFrame:
    """Each patient's latest row of ``features.<name>``, without the key columns."""
    frame = con.execute(
        f"SELECT * EXCLUDE (patient_id, created) FROM {FEATURES_SCHEMA}.{name} "
        "QUALIFY row_number() OVER (PARTITION BY patient_id ORDER BY event_timestamp DESC) = 1"
    ).df()
    return frame.drop(columns=["event_timestamp"])


def null_rates(con: duckdb.DuckDBPyConnection, name: str) -> dict[str, float]:
    """Share of null values per feature over all rows (rounded to 4 places)."""
    columns = [
        str(c)
        for c, *_ in con.execute(f"DESCRIBE {FEATURES_SCHEMA}.{name}").fetchall()
        if c not in KEY_COLUMNS
    ]
    if not columns:
        return {}
    select = ", ".join(f'avg(("{c}" IS NULL)::INT) AS "{c}"' for c in columns)
    row = con.execute(f"SELECT {select} FROM {FEATURES_SCHEMA}.{name}").fetchone() or ()
    return {c: round(float(v or 0.0), 4) for c, v in zip(columns, row, strict=True)}


def _draw(ax: plt.Axes, name: str, values: pd.Series) -> None:
    present = values.dropna()
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        ax.hist(present.dt.year if len(present) else [], bins=20, color="#4477aa")
    elif pd.api.types.is_bool_dtype(values.dtype) or (
        values.dtype == object and present.map(lambda v: isinstance(v, bool)).all()
    ):
        share = float(present.astype(bool).mean()) if len(present) else 0.0
        ax.bar(["false", "true"], [1 - share, share], color=["#999999", "#4477aa"])
    elif pd.api.types.is_numeric_dtype(values.dtype):
        ax.hist(present.astype(float), bins=20, color="#4477aa")
    else:
        counts = present.astype(str).value_counts().head(8)
        ax.barh(list(counts.index), list(counts.to_numpy()), color="#4477aa")
    missing = 1 - len(present) / len(values) if len(values) else 0.0
    ax.set_title(f"{name} (null {missing:.0%})", fontsize=8)
    ax.tick_params(labelsize=6)


def plot_distributions(con: duckdb.DuckDBPyConnection, name: str, path: Path) -> Path:
    """One histogram (bars for flags and codes) per feature of the latest rows, as a PNG."""
    frame = latest_rows(con, name)
    columns = list(frame.columns) or ["(no features)"]
    rows = int(np.ceil(len(columns) / GRID_COLUMNS))
    fig, axes = plt.subplots(rows, GRID_COLUMNS, figsize=(3 * GRID_COLUMNS, 2.2 * rows))
    flat = np.atleast_1d(axes).ravel()
    for ax, column in zip(flat, columns, strict=False):
        if column in frame.columns:
            _draw(ax, column, frame[column])
    for ax in flat[len(columns) :]:
        ax.axis("off")
    fig.suptitle(f"{name}: each patient's latest values", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
