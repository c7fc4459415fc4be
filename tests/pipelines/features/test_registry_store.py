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


def test_two_writers_at_once_leave_one_registry_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes writing the registry at once (``feast materialize-incremental`` beside a
    run's materialisation): both wrote through one temporary file, so the second truncated the
    first's, renamed it into place, and the first wrote the rest of its bytes into the registry
    then in use, which no longer read as either."""
    import threading

    from pipelines.features import registry_store

    real_write = registry_store._write_durably
    half_written, second_done = threading.Event(), threading.Event()
    first = _registry("first" * 2000)
    failures: list[BaseException] = []

    def interleaved(path: Path, data: bytes) -> None:
        if threading.current_thread().name != "first":
            real_write(path, data)
            return
        with open(path, "wb", buffering=0) as handle:
            handle.write(data[: len(data) // 2])
            half_written.set()
            second_done.wait(30)
            handle.write(data[len(data) // 2 :])

    def write_first() -> None:
        try:
            _store(tmp_path, monkeypatch).update_registry_proto(first)
        except BaseException as exc:  # reported below
            failures.append(exc)

    monkeypatch.setattr(registry_store, "_write_durably", interleaved)
    thread = threading.Thread(target=write_first, name="first")
    thread.start()
    assert half_written.wait(30)
    _store(tmp_path, monkeypatch).update_registry_proto(_registry("second"))
    second_done.set()
    thread.join(30)
    assert failures == []
    got = RegistryProto.FromString((tmp_path / "registry.db").read_bytes())
    assert [m.project for m in got.project_metadata] in (["first" * 2000], ["second"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry.db"]


def test_a_registry_write_keeps_the_registrys_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Feast rewrote the registry in place, keeping its mode; replaced through a new file, it
    took the process's umask, and a registry an operator had restricted was readable again."""
    store = _store(tmp_path, monkeypatch)
    store.update_registry_proto(_registry("first"))
    (tmp_path / "registry.db").chmod(0o640)
    store.update_registry_proto(_registry("second"))
    assert (tmp_path / "registry.db").stat().st_mode & 0o777 == 0o640
