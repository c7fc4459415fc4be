"""Feast's file registry store, refusing to open while ``EHR_FEAST_DATA`` is unset or relative,
and replacing the registry file whole at each write.

``feature_repo/feature_store.yaml`` names this class (``registry_store_type``), so every way of
opening the store checks the data folder first: ``feast serve``, ``feast materialize`` and
``feast feature-services list`` too, which import none of the repo's modules (the check in
``feature_repo/repo_env.py`` runs on ``feast apply`` only). Without it they created a folder
literally named ``${EHR_FEAST_DATA}`` in the working directory and served an empty registry.

Feast's own store rewrites the registry in place (``open(path, "wb")``, then the bytes) at every
apply and every materialisation: a process killed between the two left an empty file, which
Feast reads as a registry of no feature view, so a model builder's retrieval failed until the
next release re-applied the repo. This store writes the new registry to a temporary file beside
it, flushed to disk, then renames it over the old one: a reader finds the old registry or the
new one, never an empty or cut-short one.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from feast.infra.registry.file import FileRegistryStore
from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto
from feast.repo_config import RegistryConfig
from feast.utils import _utc_now

from pipelines.features.feast_store import feast_data_from_env
from pipelines.publish import new_temporary
from vault.keys import fsync_dir


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb", buffering=0) as handle:
        handle.write(data)
        os.fsync(handle.fileno())


def replace_registry_file(path: Path, data: bytes) -> None:
    """Replace the registry file ``path`` with ``data`` through a temporary file of its own
    beside it (:func:`pipelines.publish.new_temporary`: a name no other writer has, since Feast's
    CLI materialising beside a run wrote through the same temporary file and truncated the
    other's, and the registry's mode), flushed to disk before the rename and the rename made
    durable after it. A write that fails leaves the old file; two at once leave one whole."""
    path.parent.mkdir(exist_ok=True)
    tmp = new_temporary(path)
    try:
        _write_durably(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class DataFolderFileRegistryStore(FileRegistryStore):
    """A :class:`FileRegistryStore` opened only once ``EHR_FEAST_DATA`` names an absolute
    folder (:func:`pipelines.features.feast_store.feast_data_from_env`'s error, with the fix,
    otherwise), whose writes replace the registry file whole (:func:`replace_registry_file`)."""

    def __init__(self, registry_config: RegistryConfig, repo_path: Path) -> None:
        feast_data_from_env()
        super().__init__(registry_config, repo_path)

    def _write_registry(self, registry_proto: RegistryProto) -> None:
        # as Feast's own write: a new version id and update time, then the bytes
        registry_proto.version_id = str(uuid.uuid4())
        registry_proto.last_updated.FromDatetime(_utc_now())
        replace_registry_file(Path(self._filepath), registry_proto.SerializeToString())
