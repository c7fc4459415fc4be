"""A throw-away Feast store for tests: a local registry, the DuckDB offline store and a SQLite
online store in one temporary folder, with the given objects applied."""

from __future__ import annotations

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
