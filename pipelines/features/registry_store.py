"""Feast's file registry store, refusing to open while ``EHR_FEAST_DATA`` is unset or relative.

``feature_repo/feature_store.yaml`` names this class (``registry_store_type``), so every way of
opening the store checks the data folder first: ``feast serve``, ``feast materialize`` and
``feast feature-services list`` too, which import none of the repo's modules (the check in
``feature_repo/repo_env.py`` runs on ``feast apply`` only). Without it they created a folder
literally named ``${EHR_FEAST_DATA}`` in the working directory and served an empty registry.
"""

from __future__ import annotations

from pathlib import Path

from feast.infra.registry.file import FileRegistryStore
from feast.repo_config import RegistryConfig

from pipelines.features.feast_store import feast_data_from_env


class DataFolderFileRegistryStore(FileRegistryStore):
    """A :class:`FileRegistryStore` opened only once ``EHR_FEAST_DATA`` names an absolute
    folder (:func:`pipelines.features.feast_store.feast_data_from_env`'s error, with the fix,
    otherwise); the registry file itself is Feast's own."""

    def __init__(self, registry_config: RegistryConfig, repo_path: Path) -> None:
        feast_data_from_env()
        super().__init__(registry_config, repo_path)
