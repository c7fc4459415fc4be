"""Batches: what arrives in the landing folder, one Dagster partition each.

Files lying directly in the landing folder form the batch ``root``; every sub-folder (an export
dropped as a folder, the usual way) is a batch of its own, keyed by its name. Keys are
folder names chosen by whoever drops the export, never file names, which in some exports
(Synthea's, for one) carry patient names.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from fhirlake.readers import file_kind

ROOT_BATCH = "root"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


@dataclass(frozen=True)
class BatchSource:
    """A batch key, the folder it reads, and a fingerprint that changes when its files do."""

    key: str
    path: Path
    fingerprint: str


def batch_key(name: str) -> str:
    key = _UNSAFE.sub("-", name).strip("-.") or "batch"
    return key[:64]


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and file_kind(p) is not None)


def _fingerprint(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}\x00{stat.st_size}\x00{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def discover_batches(landing: Path) -> list[BatchSource]:
    """Batches in ``landing``: ``root`` for loose files, then each sub-folder, sorted by name."""
    if not landing.is_dir():
        return []
    batches = []
    root_files = _data_files(landing)
    if root_files:
        batches.append(BatchSource(ROOT_BATCH, landing, _fingerprint(root_files)))
    for folder in sorted(p for p in landing.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _data_files(folder)
        if files:
            batches.append(BatchSource(batch_key(folder.name), folder, _fingerprint(files)))
    return batches


def batch_source(landing: Path, key: str) -> BatchSource:
    """The batch with this key; a clear error when it is not (or no longer) in landing."""
    for batch in discover_batches(landing):
        if batch.key == key:
            return batch
    raise FileNotFoundError(f"batch {key!r} is not in the landing folder")
