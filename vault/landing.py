"""Batches: what arrives in the landing folder, one Dagster partition each.

Files lying directly in the landing folder form the batch ``root``; every sub-folder (an export
dropped as a folder, the usual way) is a batch of its own, keyed by its name, with the files of
its own sub-folders (an export's folders, such as Synthea's ``output/fhir``). Keys are
folder names chosen by whoever drops the export, never file names, which in some exports
(Synthea's, for one) carry patient names.

A key is the folder name when that is already a safe key (``synthetic``, ``2024-05-01``);
otherwise the name made safe and shortened, plus a digest of the exact name, so that two
names that read alike (``x y`` and ``x-y``, or long names with a common start) never share a
key. A safe key holds letters, digits, ``_``, ``-`` and ``.``, but never three dots in a row,
which Dagster reads as a range of partitions (``2024-01...2024-03``). Symbolic links and
special files are never followed: they are listed as skipped.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fhirlake.readers import (
    DATA_SUFFIXES,
    BatchListing,
    FolderNotReadableError,
    SkippedFile,
    error_type_and_errno,
    file_kind,
    not_regular,
    walk_batch,
)

ROOT_BATCH = "root"
MAX_KEY = 64
_DIGEST = 10  # hex characters of the name's digest: 40 bits
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")
# Dagster reads "a...b" as the range of partitions from a to b (the UI's partition selection,
# backfills): a key never holds three dots in a row
_RANGE_DOTS = re.compile(r"\.{3,}")


class BatchKeyCollisionError(ValueError):
    """Two landing folders map to one batch key; neither can be ingested until one is renamed."""


class BatchFolderNotReadableError(RuntimeError):
    """A batch's folder, or a folder it nests, could not be listed (permissions, I/O), or a
    data file it lists could not be inspected. The message names the batch key and the
    folder's depth, never a folder's or a file's name or path: the names below the batch's
    own folder are the exporter's, and can be patient names."""


class FileNotInspectableError(RuntimeError):
    """A data file of a batch was listed but could not be inspected (its size and time, for
    the batch's fingerprint). Named by the error's type and errno name only: the underlying
    error's text holds the file's path, which can carry a patient's name."""

    def __init__(self, cause: OSError) -> None:
        self.error_type, self.errno_name = error_type_and_errno(cause)
        super().__init__(
            f"a data file could not be inspected ({self.error_type}, {self.errno_name})"
        )


@dataclass(frozen=True)
class BatchSource:
    """A batch key, the folder it reads, and a fingerprint that changes when its files do.
    ``nested``: the batch's files include those of its folder's sub-folders (every batch but
    ``root``, whose folder's sub-folders are the other batches)."""

    key: str
    path: Path
    fingerprint: str
    nested: bool = True

    def listing(self) -> BatchListing:
        """The batch's data files, what it holds but does not read (with the reason), and the
        folders it reads."""
        return walk_batch(self.path, nested=self.nested)


@dataclass(frozen=True)
class IdleFolder:
    """A folder of the landing folder that is no batch: it holds no FHIR data file, in it or in
    its sub-folders (empty, the marker alone, files of other kinds). ``key`` is the batch key
    its name would have (``root`` for the landing folder's loose entries); ``not_read`` counts
    what it holds by the reason it is not read."""

    key: str
    not_read: dict[str, int]


def _held(not_read: dict[str, int], nothing: str) -> str:
    held = ", ".join(f"{reason}: {n}" for reason, n in sorted(not_read.items()))
    return f"(not read: {held})" if held else nothing


def describe_idle(folders: Sequence[IdleFolder]) -> list[str]:
    """Why the folders are no batch, and what they hold by reason: the landing folder's loose
    entries, then the other folders together, by count. Never a name: the files inside are
    the exporter's, and so is a folder's name, which can be a patient's (unlike a batch key,
    which the release checks against the patients, an idle folder's name meets no check, and
    the landing sensor would repeat it in every tick)."""
    suffixes = ", ".join(DATA_SUFFIXES)
    said = [
        f"the landing folder's loose entries: no FHIR data file ({suffixes}) to read, not a "
        f"batch {_held(folder.not_read, '(no file in it)')}"
        for folder in folders
        if folder.key == ROOT_BATCH
    ]
    others = [folder for folder in folders if folder.key != ROOT_BATCH]
    if others:
        held: Counter[str] = Counter()
        for folder in others:
            held.update(folder.not_read)
        one = len(others) == 1
        said.append(
            (
                "1 folder (its name not shown) holds"
                if one
                else f"{len(others)} folders (names not shown) hold"
            )
            + f" no FHIR data file ({suffixes}) to read, not a batch "
            + _held(dict(held), "(no file in it)" if one else "(no file in them)")
        )
    return said


@dataclass
class Landing:
    """What the landing folder holds: its batches, its folders that are none (``idle``), the
    batches whose folder could not be listed or a data file of it inspected (``unreadable``:
    each batch key's error, which names the key and the folder's depth, never a name below
    it), and what was not read (with the reason)."""

    batches: list[BatchSource] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    collisions: dict[str, int] = field(default_factory=dict)  # key → folders sharing it
    idle: list[IdleFolder] = field(default_factory=list)
    unreadable: dict[str, BatchFolderNotReadableError] = field(default_factory=dict)


def batch_key(name: str) -> str:
    """The batch key of a folder name: the name itself when it is a safe key, else a safe
    slug with a digest of the exact name (undecodable bytes included)."""
    slug = _RANGE_DOTS.sub("-", _UNSAFE.sub("-", name)).strip("-.") or "batch"
    if slug == name and len(name) <= MAX_KEY and name != ROOT_BATCH:
        return name
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:_DIGEST]
    return f"{slug[: MAX_KEY - _DIGEST - 1]}-{digest}"


def _fingerprint(folder: Path, files: list[Path]) -> str:
    """A digest of ``files``' names, sizes and modification times. A file gone between the
    folder's listing and its ``lstat`` (renamed or removed meanwhile, as an exporter or rsync
    does) is left out: the folder no longer holds it. Any other failure raises
    :class:`FileNotInspectableError`, which names no path: file names can carry patient
    names, and the error of a run or a sensor tick is kept in Dagster's storage."""
    digest = hashlib.sha256()
    for path in files:
        try:
            stat = path.lstat()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise FileNotInspectableError(exc) from None
        name = path.relative_to(folder).as_posix()  # a file's name for one directly in it
        digest.update(os.fsencode(name) + f"\x00{stat.st_size}\x00{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _batch(key: str, folder: Path, landing: Landing) -> BatchSource | None:
    """A folder's batch when it holds a data file (in a sub-folder too, but for ``root``); what
    it skipped goes to ``landing``."""
    nested = key != ROOT_BATCH
    try:
        listing = walk_batch(folder, nested=nested)
    except FolderNotReadableError as exc:
        raise BatchFolderNotReadableError(f"batch {key}: {exc}") from None
    landing.skipped.extend(listing.skipped)
    # every regular file with a data extension, export metadata included (what changes a batch)
    fingerprinted = sorted(
        [f.path for f in listing.files]
        + [s.path for s in listing.skipped if not_regular(s.path) is None and file_kind(s.path)]
    )
    if not fingerprinted:
        # the landing folder's own loose entries only when there are some: its sub-folders
        # are batches of their own, and a landing folder holding only them is the usual one
        if nested or listing.skipped:
            landing.idle.append(IdleFolder(key, dict(Counter(s.reason for s in listing.skipped))))
        return None
    try:
        fingerprint = _fingerprint(folder, fingerprinted)
    except FileNotInspectableError as exc:
        raise BatchFolderNotReadableError(f"batch {key}: {exc}") from None
    return BatchSource(key, folder, fingerprint, nested)


def scan_landing(landing_dir: Path) -> Landing:
    """Batches in ``landing_dir``: ``root`` for loose files, then each sub-folder, sorted by
    name; links and special files listed as skipped; keys shared by two folders counted; a
    batch whose folder cannot be listed (or a data file of it inspected) set aside with its
    error, so that one folder an exporter left unreadable holds back no other batch. A landing
    folder that cannot itself be listed raises ``OSError``."""
    landing = Landing()
    if not landing_dir.is_dir():
        return landing
    folders = [(ROOT_BATCH, landing_dir)] + [
        (batch_key(entry.name), entry)
        for entry in sorted(landing_dir.iterdir())
        # files were listed with the root batch; links and the like skipped there
        if not entry.name.startswith(".") and not_regular(entry) == ""
    ]
    found = []
    for key, folder in folders:
        try:
            batch = _batch(key, folder, landing)
        except BatchFolderNotReadableError as exc:  # that batch alone waits: the others are read
            landing.unreadable[key] = exc
            continue
        if batch is not None:
            found.append(batch)
    counts = Counter([batch.key for batch in found] + list(landing.unreadable))
    landing.collisions = {key: n for key, n in counts.items() if n > 1}
    landing.batches = [b for b in found if b.key not in landing.collisions]
    return landing


def discover_batches(landing: Path) -> list[BatchSource]:
    """Batches in ``landing``; refuses (:class:`BatchKeyCollisionError`) when two folders
    would share a key, since one of them would silently never be ingested, and raises the
    first unreadable batch's :class:`BatchFolderNotReadableError` (every batch or none; see
    :func:`discover_landing` for the batches that could be read)."""
    found = discover_landing(landing)
    for error in found.unreadable.values():
        raise error
    return found.batches


def discover_landing(landing: Path) -> Landing:
    """What ``landing`` holds (:func:`scan_landing`); refuses as :func:`discover_batches`
    does when two folders would share a key."""
    found = scan_landing(landing)
    if found.collisions:
        # keys only: folder names can carry whatever the sender typed, patient names included
        shared = ", ".join(sorted(found.collisions))
        folders = sum(found.collisions.values())
        raise BatchKeyCollisionError(
            f"{folders} landing folders share the batch key(s) {shared}: rename them so each "
            "folder has a key of its own"
        )
    return found


def batch_source(landing: Path, key: str) -> BatchSource:
    """The batch with this key; a clear error when it is not (or no longer) in landing, or
    when two folders share it (other batches stay readable)."""
    found = scan_landing(landing)
    if key in found.collisions:
        raise BatchKeyCollisionError(
            f"{found.collisions[key]} landing folders share the batch key {key}: rename them"
        )
    if key in found.unreadable:
        raise found.unreadable[key]
    for batch in found.batches:
        if batch.key == key:
            return batch
    raise FileNotFoundError(f"batch {key!r} is not in the landing folder")
