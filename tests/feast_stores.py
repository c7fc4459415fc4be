"""A throw-away Feast store for tests: a local registry, the DuckDB offline store and a SQLite
online store in one temporary folder, with the given objects applied; and what a SQLite online
store holds, read directly (not through Feast)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any


def throwaway_store(tmp_path: Path, project: str, objects: list[Any]) -> Any:
    import feast
    from feast.repo_config import RegistryConfig, RepoConfig

    config = RepoConfig(
        project=project,
        provider="local",
        registry=RegistryConfig(path=str(tmp_path / "registry.db")),
        offline_store={"type": "duckdb"},
        online_store={"type": "sqlite", "path": str(tmp_path / "online.db")},
        entity_key_serialization_version=3,
        repo_path=str(tmp_path),
    )
    store = feast.FeatureStore(config=config)
    store.apply(objects)
    return store


def stored_rows(db: Path) -> dict[str, set[tuple[Any, ...]]]:
    """What the SQLite store holds per table (the value bytes and event time of each feature;
    created_ts, the build time of the feature tables, is not served)."""
    con = sqlite3.connect(db)
    try:
        tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {
            t: set(con.execute(f'SELECT entity_key, feature_name, value, event_ts FROM "{t}"'))
            for t in tables
        }
    finally:
        con.close()
