"""Dagster resources: every external system behind a ConfigurableResource with a local default."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
from dagster import ConfigurableResource

from vault import warehouse
from vault.keys import KeyProvider, load_key_provider

DEFAULT_WORKDIR = "data/work"
DEFAULT_LANDING = "data/landing"


def default_workdir() -> str:
    return os.environ.get("EHR_WORKDIR", DEFAULT_WORKDIR)


def default_landing() -> str:
    return os.environ.get("EHR_LANDING", DEFAULT_LANDING)


class WarehouseResource(ConfigurableResource):
    """The DuckDB warehouse file and the folder that holds released files."""

    workdir: str = DEFAULT_WORKDIR

    @property
    def path(self) -> Path:
        return Path(self.workdir) / "warehouse.duckdb"

    def connect(self, read_only: bool = False) -> duckdb.DuckDBPyConnection:
        return warehouse.connect(self.path, read_only=read_only)


class LandingResource(ConfigurableResource):
    """The folder FHIR exports are dropped into."""

    path: str = DEFAULT_LANDING


class KeyProviderResource(ConfigurableResource):
    """Key material: ``EHR_KEK``/``EHR_PSEUDONYM_KEY`` when set, else a key file (``key_file``,
    ``EHR_KEY_FILE``, or ``~/.ehr/keyring.json``). A KMS provider plugs in here."""

    key_file: str | None = None

    def provider(self) -> KeyProvider:
        return load_key_provider(self.key_file)


class IngestSettings(ConfigurableResource):
    """Tuning for the ingest pass: worker processes for validation (0 = one per core)."""

    workers: int = 0

    def worker_count(self) -> int:
        return self.workers or (os.cpu_count() or 1)


class DeidSettings(ConfigurableResource):
    """The de-identification profile (``research`` or ``safe_harbor``) and the k of the
    released patient table."""

    profile: str = "research"
    k: int = 5
