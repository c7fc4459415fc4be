"""Which landed batches the warehouse holds as their folders are now: the batch ledger (the
folder's fingerprint when it was read, and whether the batch was de-identified from that ingest)
and when a landed folder counts as complete. Read by the landing sensor (what to run), ``ehr
run`` (what to skip) and the release (which landed batches it does not hold yet)."""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

import duckdb

from deid.policy import Policy
from deid.staging import deidentified_batches, outdated_batches, refiled_batches, settings_digest
from fhirlake.readers import MAX_FOLDER_DEPTH, BatchListing
from pipelines.resources import LandingResource, WarehouseResource
from vault.landing import BatchSource, Landing, scan_landing


def changed_at(info: os.stat_result) -> float:
    """When a file last changed here: its inode's change time, which every write and every
    time set moves to the clock's now and no program can set otherwise. Not the modification
    time: a copy that keeps the source's times (``cp -p``, ``cp -a``, ``rsync -a``, ``tar``,
    ``unzip``) sets it to when the file was written at the source, earlier (a marker copied
    before the rest of the folder would count as written last) or later than here (a source
    whose clock runs ahead, a zip's local times from a zone east of here: the later of the two
    times made such a marker, copied first, count over the files copied after it)."""
    return info.st_ctime


def _tree_times(folder: Path, depth: int) -> list[float]:
    """When everything in ``folder`` and its sub-folders, ``depth`` levels down, last changed
    (:func:`changed_at`); symbolic links are not followed."""
    times = []
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):  # gone since it was listed
                info = entry.stat(follow_symlinks=False)
                times.append(changed_at(info))
                if depth > 1 and stat.S_ISDIR(info.st_mode):
                    times += _tree_times(Path(entry.path), depth - 1)
    return times


def newest_change(
    batch: BatchSource, listing: BatchListing | None = None, but: frozenset[Path] = frozenset()
) -> float:
    """When any file of the batch last changed (:func:`changed_at`; ``listing``, when the caller
    has walked it already), in its sub-folders too (data or not: a copy in progress may write a
    temporary name first, in a hidden or ``_`` sub-folder too, such as rsync's
    ``--temp-dir``, which are walked down to ``MAX_FOLDER_DEPTH`` levels, links not
    followed), and of its folders (a file removed or renamed changes its folder's own time;
    not the landing folder's, for ``root``). ``but``: entries left out."""
    listing = listing or batch.listing()
    paths = [f.path for f in listing.files] + [s.path for s in listing.skipped]
    paths += listing.folders if batch.nested else []
    times = []
    for path in paths:
        if path in but:
            continue
        with contextlib.suppress(OSError):  # gone since it was listed: the next tick sees it
            info = path.lstat()
            times.append(changed_at(info))
            if batch.nested and stat.S_ISDIR(info.st_mode) and path not in listing.folders:
                times += _tree_times(path, MAX_FOLDER_DEPTH)  # a folder the batch does not read
    return max(times, default=0.0)


def waiting_reason(batch: BatchSource, landing: LandingResource, now: float) -> str | None:
    """Why the batch is not complete yet, or None when it is: it holds the marker, written at
    or after the last change of everything else in its folder, or nothing in it changed for
    the quiet period. Changes are judged by :func:`changed_at`, not by modification times
    alone, which a copy keeping the source's times sets back."""
    marker = batch.path / landing.ready_marker
    try:
        marked: float | None = changed_at(marker.lstat())
    except OSError:
        marked = None
    # the marker is judged against what the folder holds, not the folder's own time: writing
    # the marker (created in place, or renamed into place as an atomic writer does) changes the
    # folder's time at or after the marker's own
    if marked is not None and marked >= newest_change(batch, but=frozenset({marker, batch.path})):
        return None
    quiet = now - newest_change(batch)
    if quiet >= landing.quiet_seconds:
        return None
    if marked is not None:
        return (
            f"batch {batch.key}: {landing.ready_marker} is older than a file changed since "
            f"(write it last, or touch it again after a new delivery); waiting for that or "
            f"{landing.quiet_seconds}s without changes ({quiet:.0f}s so far)"
        )
    return (
        f"batch {batch.key}: waiting for {landing.ready_marker} or "
        f"{landing.quiet_seconds}s without changes ({quiet:.0f}s so far)"
    )


_BATCH_COLUMNS = (
    "SELECT column_name FROM duckdb_columns() WHERE schema_name = 'main' AND table_name = 'batches'"
)


@dataclass(frozen=True)
class LedgerEntry:
    """A batch the warehouse shows ingested: when its ingest completed, the fingerprint its
    folder had when it was read (None for batches ingested before fingerprints were recorded),
    how many data files it read, whether it was then de-identified from that ingest
    (``published``: a batch whose run stopped between the two is not done), and, for one that
    is not, whether a reference of it by which ingest filed records (a conditional or logical
    reference to a Patient) names another patient, or none, since its release (``refiled``,
    :func:`deid.staging.refiled_batches`), and whether it was published from that ingest but is
    out of date (``outdated``, :func:`deid.staging.outdated_batches`): under other settings (an
    earlier version's leak-scan or release rules, another profile) or with a value released
    otherwise today, which its de-identification alone, from the vault, brings up to date."""

    ingested_at: float
    fingerprint: str | None
    files: int = 0
    published: bool = True
    refiled: bool = False
    outdated: bool = False


@cache
def current_settings(profile: str) -> str:
    """The digest of the de-identification settings a batch is published under today
    (:func:`deid.staging.settings_digest`) for ``profile``: what ``ehr run`` and the landing
    sensor compare each batch's ledger row with."""
    from pipelines.features.valuesets import release_terminology

    return settings_digest(Policy.shipped(profile), terminology=release_terminology())


def ingested_batches(
    warehouse: WarehouseResource, settings: str | None = None
) -> dict[str, LedgerEntry] | None:
    """Batch key -> its ledger entry, for the batches the warehouse's batch ledger shows
    ingested, each marked published when de-identified from that ingest (under ``settings``,
    :func:`current_settings`, when given: under any settings otherwise); None when another
    process holds the warehouse (DuckDB admits one writer and no reader beside it)."""
    if not warehouse.path.exists():
        return {}
    try:
        con = warehouse.connect(read_only=True)
    except duckdb.Error:
        return None
    try:
        return read_ledger(con, settings)
    finally:
        con.close()


def read_ledger(
    con: duckdb.DuckDBPyConnection, settings: str | None = None
) -> dict[str, LedgerEntry]:
    """:func:`ingested_batches`, over a connection the caller holds."""
    try:
        # a warehouse not opened for writing since the column was added has none
        recorded = "source_fingerprint" in {
            name for (name,) in con.execute(_BATCH_COLUMNS).fetchall()
        }
        fingerprint = "source_fingerprint" if recorded else "NULL"
        rows = con.execute(
            f"SELECT batch_id, epoch(ingested_at), {fingerprint}, "
            "(SELECT count(*) FROM source_files f WHERE f.batch_id = b.batch_id) "
            "FROM batches b WHERE ingested_at IS NOT NULL"
        ).fetchall()
        published = deidentified_batches(con, settings)
        # read only when some batch waits for its de-identification: the others are done
        waiting = any(r[0] not in published for r in rows)
        refiled = refiled_batches(con) if waiting else set()
        outdated = outdated_batches(con, settings) if waiting else set()
    except duckdb.CatalogException:
        return {}  # a warehouse created before any batch
    return {
        str(key): LedgerEntry(
            float(at),
            None if seen is None else str(seen),
            int(files),
            key in published,
            key not in published and key in refiled,
            key not in published and key in outdated,
        )
        for key, at, seen, files in rows
    }


def done_in_ledger(batch: BatchSource, ledger: dict[str, LedgerEntry]) -> bool:
    """Whether ``ledger`` (:func:`ingested_batches`) shows the batch done as its folder is now:
    the fingerprint recorded when it was read equals the folder's (names, sizes and modification
    times of its files: a file replaced by one carrying an older time, as ``cp -p``, ``tar`` and
    ``unzip`` write them, changes it). A batch ingested before fingerprints were recorded is done
    when its ingest completed after its files last changed and it read as many data files as
    its folder holds now (a sub-folder's files, read since, count)."""
    entry = ledger.get(batch.key)
    if entry is None or not entry.published:
        return False
    if entry.fingerprint is not None:
        return entry.fingerprint == batch.fingerprint
    listing = batch.listing()
    return entry.files == len(listing.files) and entry.ingested_at >= newest_change(batch, listing)


def deidentification_alone(batch: BatchSource, ledger: dict[str, LedgerEntry]) -> bool:
    """Whether the batch's de-identification alone (``deid_resources`` of its partition, from
    the vault) brings it up to date, not a new ingest: the ledger holds its ingest as its folder
    is now, and no reference of it by which ingest filed records names another patient since
    (``refiled``). So it is for a batch a later one took out of the de-identification ledger
    by changing what its Practitioner references name (cohorts that number their NPIs alike,
    ``deid.staging``) or by handing it a vault row (``vault.ingest``): its vault rows are what
    a new ingest would write, the release resolves the rest. Read by ``ehr run`` and the
    landing sensor."""
    entry = ledger.get(batch.key)
    if entry is None or entry.refiled:
        return False
    return done_in_ledger(batch, {batch.key: replace(entry, published=True)})


@dataclass(frozen=True)
class LandedBacklog:
    """The batches the release input does not hold as their folders are now, by why: a complete
    landed batch never ingested (its run queued, going or failed), one ingested but not
    de-identified from that ingest (its run failed or stopped in between: its folder may be gone
    since, and its partition then holds the release back), one de-identified from an earlier
    version of its folder, a folder that cannot be read, and a key two folders share. Batch keys
    only, which the UI shows as partition keys already; and how many folders not in it are not
    complete yet (no marker, and changed within the quiet period)."""

    not_ingested: list[str] = field(default_factory=list)
    not_deidentified: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    not_readable: list[str] = field(default_factory=list)
    key_shared: list[str] = field(default_factory=list)
    waiting: int = 0

    @property
    def keys(self) -> list[str]:
        return sorted(
            {
                *self.not_ingested,
                *self.not_deidentified,
                *self.changed,
                *self.not_readable,
                *self.key_shared,
            }
        )


def landed_backlog(
    landing: LandingResource,
    ledger: dict[str, LedgerEntry],
    now: float,
    found: Landing | None = None,
) -> LandedBacklog:
    """The batches ``ledger`` (:func:`ingested_batches`) does not show de-identified as their
    landed folders are now, and those it shows ingested and not de-identified, landed or not
    (:class:`LandedBacklog`); ``found``: the landing folder as the caller has just listed it
    (listed here otherwise). A landing folder that cannot itself be listed raises ``OSError``."""
    found = found if found is not None else scan_landing(Path(landing.path))
    not_ingested: list[str] = []
    changed: list[str] = []
    arriving: set[str] = set()
    for batch in found.batches:
        if done_in_ledger(batch, ledger):
            continue
        if waiting_reason(batch, landing, now) is not None:
            arriving.add(batch.key)
            continue
        entry = ledger.get(batch.key)
        if entry is None:
            not_ingested.append(batch.key)
        elif entry.published:
            changed.append(batch.key)
    not_deidentified = sorted(
        key for key, entry in ledger.items() if not entry.published and key not in arriving
    )
    return LandedBacklog(
        not_ingested,
        not_deidentified,
        changed,
        sorted(found.unreadable),
        sorted(found.collisions),
        len(arriving),
    )
