"""The platform's Feast registry store replaces the registry file whole: a write that dies part
way (a process killed once Feast had opened the file for writing) leaves the old registry, not
an empty file that Feast reads as a registry of no feature view."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto
from feast.repo_config import RegistryConfig
from google.protobuf.timestamp_pb2 import Timestamp

from pipelines.features.feast_store import FEAST_DATA_ENV
from pipelines.features.registry_store import DataFolderFileRegistryStore


class _DiesWhileWritten:
    """A registry whose bytes are never produced: the write stops where a process killed after
    the registry file was opened for writing stops."""

    def __init__(self) -> None:
        self.version_id = ""
        self.last_updated = Timestamp()

    def SerializeToString(self) -> bytes:  # noqa: N802 (protobuf's name)
        raise KeyboardInterrupt("killed")


def _store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DataFolderFileRegistryStore:
    monkeypatch.setenv(FEAST_DATA_ENV, str(tmp_path))
    config = RegistryConfig(path=str(tmp_path / "registry.db"))
    return DataFolderFileRegistryStore(config, tmp_path)


def _registry(project: str) -> RegistryProto:
    proto = RegistryProto()
    proto.project_metadata.add(project=project)
    return proto


def test_a_registry_write_that_dies_leaves_the_old_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(tmp_path, monkeypatch)
    store.update_registry_proto(_registry("first"))
    before = (tmp_path / "registry.db").read_bytes()
    with pytest.raises(KeyboardInterrupt):
        store.update_registry_proto(_DiesWhileWritten())  # type: ignore[arg-type]
    assert (tmp_path / "registry.db").read_bytes() == before
    assert [m.project for m in store.get_registry_proto().project_metadata] == ["first"]


def test_a_registry_write_replaces_the_file_and_leaves_no_temporary_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(tmp_path, monkeypatch)
    store.update_registry_proto(_registry("first"))
    store.update_registry_proto(_registry("second"))
    assert [m.project for m in store.get_registry_proto().project_metadata] == ["second"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry.db"]

    def no_rename(source: object, target: object) -> None:
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="rename failed"):
        store.update_registry_proto(_registry("third"))
    assert [m.project for m in store.get_registry_proto().project_metadata] == ["second"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry.db"]
