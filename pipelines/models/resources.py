"""The Feast feature store behind a Dagster resource (a minimal stand-in until the feature
package ships its own; the fields match so the definitions can swap one for the other)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dagster import ConfigurableResource

if TYPE_CHECKING:
    from feast import FeatureStore


class FeastStoreResource(ConfigurableResource):
    """The Feast repository (``repo_path``) and the folder holding its feature Parquet files
    (``data_dir``; empty = whatever the repository's own configuration points at)."""

    repo_path: str = "feature_repo"
    data_dir: str = ""

    def store(self) -> FeatureStore:
        # Imported here: feast is slow to import and only the training-set asset needs it.
        from feast import FeatureStore

        return FeatureStore(repo_path=self.repo_path)
