"""The Feast store of the feature tables: environment, ``feast apply``, incremental
materialisation into the online store, and what each of those did (counts only).

``feature_repo/feature_store.yaml`` names its paths through environment variables, which Feast
expands with ``os.path.expandvars`` when it loads the file (an unset variable stays literal):

- ``EHR_FEAST_DATA``: registry, online store (SQLite) and offline staging folder;
- ``EHR_FEATURES_DIR``: the feature Parquet files (read by ``feature_repo/data_sources.py`` at
  apply time and stored in the registry; default ``EHR_WORKDIR/features``).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from feast import FeatureStore

from pipelines.content import feature_repo_dir

DEFAULT_REPO = feature_repo_dir()
FEAST_DATA_ENV = "EHR_FEAST_DATA"
FEATURES_DIR_ENV = "EHR_FEATURES_DIR"


class FeastCommandError(RuntimeError):
    """A feast command failed; the message holds its exit code and output tail (object names
    and paths, never feature values)."""


def resolve_repo(repo_dir: Path | str | None = None) -> Path:
    """The Feast repo folder: as given when it exists, else the one shipped with the package
    (``feature_repo``, package data)."""
    path = Path(repo_dir) if repo_dir else DEFAULT_REPO
    if not path.exists() and path.name == DEFAULT_REPO.name:
        path = DEFAULT_REPO
    return path.resolve()


def feast_env(data_dir: Path | str, features_dir: Path | str | None = None) -> dict[str, str]:
    """The variables feature_store.yaml and data_sources.py read, as absolute paths."""
    env = {FEAST_DATA_ENV: str(Path(data_dir).resolve())}
    if features_dir is not None:
        env[FEATURES_DIR_ENV] = str(Path(features_dir).resolve())
    return env


class FeastDataNotSetError(RuntimeError):
    """EHR_FEAST_DATA is missing or relative; the message says how to fix it."""


def feast_data_from_env() -> Path:
    """``EHR_FEAST_DATA`` as an absolute path, or a :class:`FeastDataNotSetError` with the fix.

    Feast leaves an unset variable literal (and creates a folder named ``${EHR_FEAST_DATA}``)
    and resolves a relative one against the repo folder, not the working directory."""
    value = os.environ.get(FEAST_DATA_ENV, "")
    if not value:
        raise FeastDataNotSetError(
            f"{FEAST_DATA_ENV} is not set. Fix: export {FEAST_DATA_ENV}=$PWD/data/work/feast, "
            "or call feature_store(repo, data_dir, features_dir) with the folders."
        )
    if not Path(value).is_absolute():
        raise FeastDataNotSetError(
            f"{FEAST_DATA_ENV}={value!r} is relative and Feast would resolve it against the "
            f'feature repo. Fix: export {FEAST_DATA_ENV}="$(realpath {value})".'
        )
    return Path(value)


def feature_store(
    repo_dir: Path | str | None = None,
    data_dir: Path | str | None = None,
    features_dir: Path | str | None = None,
) -> FeatureStore:
    """A FeatureStore over ``repo_dir`` with its registry and online store in ``data_dir``
    (default: ``EHR_FEAST_DATA``, which must then be set and absolute).

    Sets the variables in this process's environment first: Feast expands them when it reads
    feature_store.yaml (here) and again whenever it reloads the config."""
    env = feast_env(data_dir if data_dir is not None else feast_data_from_env(), features_dir)
    os.environ.update(env)
    Path(env[FEAST_DATA_ENV]).mkdir(parents=True, exist_ok=True)
    return FeatureStore(repo_path=str(resolve_repo(repo_dir)))


@dataclass
class ApplyReport:
    entities: int
    feature_views: int
    feature_services: int
    features: int
    seconds: float


def _feast(
    args: list[str], repo_dir: Path, env: dict[str, str], timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run the feast CLI in a child process: ``feast apply`` imports every .py of the repo as a
    top-level module and changes directory, which must not happen inside a Dagster process."""
    command = [sys.executable, "-c", "from feast.cli.cli import cli; cli()", *args]
    done = subprocess.run(
        command,
        cwd=repo_dir,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise FeastCommandError(f"feast {args[0]} exited {done.returncode}: " + " | ".join(tail))
    return done


def apply_repo(repo_dir: Path | str, data_dir: Path | str, features_dir: Path | str) -> ApplyReport:
    """``feast apply`` of the repo against the registry in ``data_dir``, with the data sources
    pointing at ``features_dir``; counts what the registry then holds."""
    started = time.perf_counter()
    repo = resolve_repo(repo_dir)
    env = feast_env(data_dir, features_dir)
    Path(env[FEAST_DATA_ENV]).mkdir(parents=True, exist_ok=True)
    _feast(["apply"], repo, env)
    store = feature_store(repo, data_dir, features_dir)
    store.refresh_registry()
    views = store.list_feature_views()
    return ApplyReport(
        entities=len(store.list_entities()),
        feature_views=len(views),
        feature_services=len(store.list_feature_services()),
        features=sum(len(v.features) for v in views),
        seconds=round(time.perf_counter() - started, 3),
    )


@dataclass
class MaterializeReport:
    end: datetime
    seconds: float
    entities_online: dict[str, int] = field(default_factory=dict)


def online_entity_counts(store: FeatureStore) -> dict[str, int]:
    """Entities (patients) held per feature view in the SQLite online store."""
    path = Path(store.config.online_store.path)
    if not path.is_absolute():
        path = Path(store.repo_path) / path
    counts: dict[str, int] = {}
    if not path.exists():
        return counts
    with sqlite3.connect(path) as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        for view in store.list_feature_views():
            table = f"{store.project}_{view.name}"
            if table in tables:
                (n,) = db.execute(f'SELECT count(DISTINCT entity_key) FROM "{table}"').fetchone()
                counts[view.name] = int(n)
    return counts


def materialize_window(
    store: FeatureStore, end: datetime | None = None, days: int | None = None
) -> MaterializeReport:
    """Reload the online store, per feature view, from ``end`` minus its TTL (or ``days``) to
    ``end``. Needed when a rebuild brought rows with event timestamps older than the last
    incremental run (a late batch on a patient's past time line), which incremental runs skip."""
    end = end or datetime.now(UTC)
    started = time.perf_counter()
    for view in store.list_feature_views():
        span = timedelta(days=days) if days is not None else view.ttl or timedelta(days=3650)
        store.materialize(start_date=end - span, end_date=end, feature_views=[view.name])
    seconds = round(time.perf_counter() - started, 3)
    return MaterializeReport(end=end, seconds=seconds, entities_online=online_entity_counts(store))


def materialize_incremental(store: FeatureStore, end: datetime | None = None) -> MaterializeReport:
    """Load the online store with every feature row newer than the last run (or than the
    view's TTL on the first run) up to ``end`` (default now)."""
    end = end or datetime.now(UTC)
    started = time.perf_counter()
    store.materialize_incremental(end_date=end)
    seconds = round(time.perf_counter() - started, 3)
    return MaterializeReport(end=end, seconds=seconds, entities_online=online_entity_counts(store))


# Materialisation starts before any plausible record (birth dates of the oldest patients).
HISTORY_START = datetime(1900, 1, 1, tzinfo=UTC)


def data_end(store: FeatureStore) -> datetime | None:
    """The latest ``event_timestamp`` over the feature views' Parquet sources: the release's
    data end, since the feature tables write no row after it."""
    import duckdb

    sources = [v.batch_source for v in store.list_feature_views()]
    paths = [getattr(s, "path", None) for s in sources]
    paths = [p for p in paths if p and Path(p).exists()]
    if not paths:
        return None
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        ((end,),) = con.execute(
            "SELECT max(event_timestamp) FROM read_parquet(?, union_by_name = true)", [paths]
        ).fetchall()
    finally:
        con.close()
    return end.astimezone(UTC) if end is not None else None


def materialize_latest(store: FeatureStore, end: datetime | None = None) -> MaterializeReport:
    """Load the online store with the latest row per patient and view, however old, up to
    ``end`` (default: the release's data end, see :func:`data_end`).

    Incremental materialisation loads [now - TTL, now] only, while a de-identified release ends
    months before now and a patient's latest row can be years old: most patients would have
    nothing online. Every row of a feature table is valid until the patient's next row, so the
    latest row at or before the data end is the patient's value now (as far as the release
    knows)."""
    end = end or data_end(store) or datetime.now(UTC)
    started = time.perf_counter()
    # Feast's end bound is exclusive of nothing but its own rounding; a microsecond margin
    # keeps a row stamped exactly at the data end
    stop = end + timedelta(microseconds=1)
    for view in store.list_feature_views():
        store.materialize(start_date=HISTORY_START, end_date=stop, feature_views=[view.name])
    seconds = round(time.perf_counter() - started, 3)
    return MaterializeReport(end=end, seconds=seconds, entities_online=online_entity_counts(store))


class UnknownEntityError(KeyError):
    """Patients the online store holds no value for (never released, opted out, or erased)."""


@dataclass
class OnlineAnswer:
    """Online feature values per requested patient, and the patients the store does not know
    (whose values would otherwise come back as silent nulls)."""

    values: dict[str, list[Any]]
    unknown: list[str]


def online_features(
    store: FeatureStore, features: Any, patient_ids: list[str], *, strict: bool = False
) -> OnlineAnswer:
    """``get_online_features`` for ``patient_ids`` that says which patients are unknown: a
    patient is unknown when no requested feature view holds a row for them. ``strict`` raises
    :class:`UnknownEntityError` naming how many (pseudonyms are in ``.args[1]``)."""
    response = store.get_online_features(
        features=features, entity_rows=[{"patient_id": p} for p in patient_ids]
    )
    values = response.to_dict(include_event_timestamps=True)
    # a feature's "__ts" is its row's event time, 0 (or None) when the store has no row
    stamps = [k for k in values if k.endswith("__ts") and k != "patient_id__ts"]
    unknown = [pid for i, pid in enumerate(patient_ids) if not any(values[k][i] for k in stamps)]
    stamps.append("patient_id__ts")
    values = {k: v for k, v in values.items() if k not in stamps}
    if strict and unknown:
        raise UnknownEntityError(f"{len(unknown)} patient(s) unknown to the online store", unknown)
    return OnlineAnswer(values=values, unknown=unknown)


# pandas dtypes that keep a Feast type with missing values (NumPy would give float/object)
_PANDAS_DTYPES = {"Int64": "Int64", "Int32": "Int64", "Bool": "boolean", "String": "string"}


def declared_types(store: FeatureStore) -> dict[str, str]:
    """Feature name -> Feast type name (``Int64``, ``Bool``, ...) from the registry."""
    return {f.name: str(f.dtype) for v in store.list_feature_views() for f in v.features}


def with_declared_types(store: FeatureStore, frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (from ``get_historical_features``) with Int64 and Bool features as pandas'
    nullable ``Int64`` and ``boolean``: Feast returns an integer column holding a null as float
    and a boolean one as object."""
    out = frame.copy()
    for name, dtype in declared_types(store).items():
        target = _PANDAS_DTYPES.get(dtype)
        if name in out.columns and target:
            out[name] = out[name].astype(target)
    return out
