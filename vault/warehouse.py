"""The DuckDB warehouse: one file holding the ingest ledger, the encrypted PHI vault, the
quarantine and the reference graph. Nothing in it is plaintext PHI: resources are sealed, ids
and file names are keyed pseudonyms, and messages are built from schema paths only.

The file is created readable by its owner only, carries a random warehouse id (the name the
keyring's registry and the audit anchor know it by), and :func:`rewrite` copies it into a fresh
file, so that rows deleted by an erasure do not survive in DuckDB's free pages.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from fhirlake.viewdef import instant_sql
from vault.clock import RandomBytes
from vault.errors import PseudonymKeyMismatchError
from vault.keys import KeyProvider, exclusive_lock, fsync_dir, key_fingerprint
from vault.pseudonym import Pseudonymizer
from vault.sealed_cache import SEALED_CACHE_DDL
from vault.sealing import DATA_KEYS_DDL

WAREHOUSE_META_DDL = """
CREATE TABLE IF NOT EXISTS warehouse_meta (
    key VARCHAR PRIMARY KEY,
    value VARCHAR NOT NULL
)"""

# The newest version of each resource: numeric versionId first, then the latest lastUpdated
# (the instant, not the text: exports write it in other zones and precisions), then the order it
# arrived in (the ranking of phi_vault_current and of vault.read's filtered reads).
NEWEST_VERSION_FIRST = (
    f"TRY_CAST(version_id AS BIGINT) DESC NULLS LAST, {instant_sql('last_updated')} DESC NULLS "
    "LAST, ingest_seq DESC"
)

# Vault rows at a chunk of sorted positions (``ingest_seq``), with :func:`at_positions`'s
# parameters: the range lets DuckDB skip the blocks outside it, the list picks the rows.
AT_POSITIONS = "ingest_seq BETWEEN ? AND ? AND ingest_seq IN (SELECT unnest(?::BIGINT[]))"


def at_positions(window: Sequence[int]) -> list[Any]:
    """The parameters of :data:`AT_POSITIONS` for ``window``, sorted positions."""
    return [window[0], window[-1], list(window)]


# The outcome of a record_ledger row (status 'erased') whose record was quarantined when its
# patient was erased: a batch's quarantine rate counts it still, so an erasure does not hide a
# batch's rejected records (the rows of accepted records erased have the outcome 'erased').
ERASED_FROM_QUARANTINE = "erased_from_quarantine"


# batch keys found naming an erased person, and the kinds found (see SCHEMA)
ERASED_BATCH_KEYS_TABLE = "erased_batch_key_kinds"

# The identifier index's row marking a vault resource that holds a person inside it (a lab
# result with its patient contained), as its criteria key and its type: no identifier's key
# (a keyed token) and no resource type is this, so no reference resolves to it and no Patient
# shares it. The release reads such resources for their canaries (deid.release).
HELD_PERSON = "held-person"

SCHEMA = [
    DATA_KEYS_DDL,
    SEALED_CACHE_DDL,
    """
    CREATE TABLE IF NOT EXISTS batches (
        batch_id VARCHAR PRIMARY KEY,
        seq BIGINT NOT NULL,
        ingested_at TIMESTAMPTZ,
        report JSON
    )""",
    """
    CREATE TABLE IF NOT EXISTS source_files (
        batch_id VARCHAR NOT NULL,
        file_index INTEGER NOT NULL,
        file_id VARCHAR NOT NULL,
        kind VARCHAR NOT NULL,
        bytes BIGINT NOT NULL,
        records BIGINT NOT NULL,
        PRIMARY KEY (batch_id, file_index)
    )""",
    # file names were once stored sealed under the shared key: exporters put patient names
    # in them, and a shared key is never destroyed by an erasure. Only file_id stays.
    "ALTER TABLE source_files DROP COLUMN IF EXISTS name_sealed",
    WAREHOUSE_META_DDL,
    # One row per erased patient (its pseudonym) and per identifier criteria of its resources
    # (keyed pseudonyms too): later records resolving to one are quarantined as erased_subject.
    """
    CREATE TABLE IF NOT EXISTS erased_subjects (
        subject_key VARCHAR PRIMARY KEY,
        kind VARCHAR NOT NULL,
        erased_at TIMESTAMPTZ NOT NULL
    )""",
    # the patient whose erasure took this one with it (another Patient resource of the same
    # person: it shared one of their identifiers), so that an erasure run again finds it
    "ALTER TABLE erased_subjects ADD COLUMN IF NOT EXISTS erased_with VARCHAR",
    # Batch keys (landing folder names) holding an identifier of an erased person, with the
    # kinds found: recorded by the erasure, the last step that knows the person's names, so
    # that every release's batch key check keeps flagging them (the vault no longer names her)
    f"""
    CREATE TABLE IF NOT EXISTS {ERASED_BATCH_KEYS_TABLE} (
        batch_id VARCHAR NOT NULL,
        kind VARCHAR NOT NULL,
        PRIMARY KEY (batch_id, kind)
    )""",
    # Records whose patient reference is conditional, waiting for the end of their batch to
    # learn their patient (the identifier may arrive later in the same batch).
    """
    CREATE TABLE IF NOT EXISTS pending_patient_refs (
        batch_id VARCHAR NOT NULL,
        file_index INTEGER NOT NULL,
        position BIGINT NOT NULL,
        resource_key VARCHAR NOT NULL,
        criteria_key VARCHAR NOT NULL
    )""",
    """
    CREATE TABLE IF NOT EXISTS record_ledger (
        batch_id VARCHAR NOT NULL,
        file_index INTEGER NOT NULL,
        position BIGINT NOT NULL,
        status VARCHAR NOT NULL,
        outcome VARCHAR NOT NULL,
        resource_type VARCHAR,
        resource_key VARCHAR
    )""",
    """
    CREATE TABLE IF NOT EXISTS phi_vault (
        resource_key VARCHAR NOT NULL,
        resource_type VARCHAR NOT NULL,
        patient_key VARCHAR,
        version_id VARCHAR,
        last_updated VARCHAR,
        content_mac VARCHAR NOT NULL,
        batch_id VARCHAR NOT NULL,
        file_index INTEGER NOT NULL,
        position BIGINT NOT NULL,
        ingest_seq BIGINT NOT NULL,
        sealed BLOB NOT NULL,
        aad BLOB NOT NULL
    )""",
    # copies of the vault rows of CLUSTERED_TYPES, side by side (vault.clustered)
    """
    CREATE TABLE IF NOT EXISTS phi_vault_clustered (
        ingest_seq BIGINT NOT NULL,
        resource_key VARCHAR NOT NULL,
        resource_type VARCHAR NOT NULL,
        patient_key VARCHAR,
        content_mac VARCHAR NOT NULL,
        batch_id VARCHAR NOT NULL,
        sealed BLOB NOT NULL,
        aad BLOB NOT NULL
    )""",
    """
    CREATE TABLE IF NOT EXISTS quarantine (
        batch_id VARCHAR NOT NULL,
        file_index INTEGER NOT NULL,
        file_id VARCHAR NOT NULL,
        position BIGINT NOT NULL,
        reason_code VARCHAR NOT NULL,
        message VARCHAR NOT NULL,
        resource_type VARCHAR,
        patient_key VARCHAR,
        sealed BLOB NOT NULL,
        aad BLOB NOT NULL,
        quarantined_at TIMESTAMPTZ NOT NULL
    )""",
    """
    CREATE TABLE IF NOT EXISTS resource_references (
        batch_id VARCHAR NOT NULL,
        resource_key VARCHAR NOT NULL,
        content_mac VARCHAR NOT NULL,
        path VARCHAR NOT NULL,
        ref_mac VARCHAR NOT NULL,
        kind VARCHAR NOT NULL,
        target_type VARCHAR,
        target_key VARCHAR NOT NULL,
        resolved BOOLEAN
    )""",
    """
    CREATE TABLE IF NOT EXISTS identifier_index (
        batch_id VARCHAR NOT NULL,
        criteria_key VARCHAR NOT NULL,
        resource_key VARCHAR NOT NULL,
        resource_type VARCHAR NOT NULL
    )""",
    # warehouses created before the column existed
    "ALTER TABLE resource_references ADD COLUMN IF NOT EXISTS ref_mac VARCHAR",
    # the content MAC of an accepted record (also of a repeat, which leaves no vault row): a
    # batch ingested again hands a vault row it held to the batch that recorded the same
    # content as a repeat (vault.ingest); NULL in rows written before the column existed
    "ALTER TABLE record_ledger ADD COLUMN IF NOT EXISTS content_mac VARCHAR",
    # the landing folder's fingerprint when the batch was read (vault.landing: its files' names,
    # sizes and modification times, hashed), so that a batch counts as done only while its
    # folder still has it; NULL for batches ingested before the column existed
    "ALTER TABLE batches ADD COLUMN IF NOT EXISTS source_fingerprint VARCHAR",
    f"""
    CREATE OR REPLACE VIEW phi_vault_current AS
    SELECT v.* FROM phi_vault v
    JOIN (
        -- rank narrow rows only: a window over the ciphertexts would hold every blob in
        -- memory at once, and the warehouse runs under a memory cap
        SELECT resource_key, ingest_seq FROM (
            SELECT resource_key, ingest_seq, row_number() OVER (
                PARTITION BY resource_key ORDER BY {NEWEST_VERSION_FIRST}
            ) AS rn
            FROM phi_vault
        ) WHERE rn = 1
    ) AS current USING (resource_key, ingest_seq)""",
]

BATCH_TABLES = (
    "source_files",
    "record_ledger",
    "phi_vault",
    "phi_vault_clustered",
    "quarantine",
    "resource_references",
    "identifier_index",
    "pending_patient_refs",
)

WAREHOUSE_ID_KEY = "warehouse_id"
# the id (vault.keys.key_fingerprint, not secret) of the pseudonym key the vault is written under
PSEUDONYM_KEY_ID_KEY = "pseudonym_key_id"
# present while the file owes a rewrite (:func:`owe_rewrite`): written in the transaction that
# destroys a data key or deletes an erased person's rows, removed by the rewrite itself
REWRITE_OWED_KEY = "rewrite_owed"

# A batch's state in the ``batches`` ledger as one value: its position, when its ingest completed
# and its report. A batch ingested again (other content at the same positions) has another; one
# being ingested (``ingested_at`` cleared when it starts) has NULL. Stages that keep per-batch
# bookkeeping (the de-identification ledger, the views' birth-date recheck) compare against it.
BATCH_DIGEST_SQL = "hash(seq, ingested_at, report)"


DEFAULT_MEMORY_LIMIT = "256MB"  # DuckDB spills beyond it; ingest memory must not scale with input


def connect(
    path: Path | str, read_only: bool = False, memory_limit: str = DEFAULT_MEMORY_LIMIT
) -> duckdb.DuckDBPyConnection:
    """Open the warehouse file, creating it (mode 0600) and its schema when writable."""
    in_memory = str(path) == ":memory:"  # tests and scratch work: no file to protect
    path = Path(path)
    if not read_only and not in_memory:
        private_folder(path.parent)
        if not path.exists():
            _create_private(path)
    target = ":memory:" if in_memory else str(path)
    con = duckdb.connect(target, read_only=read_only, config={"memory_limit": memory_limit})
    if not read_only:
        for ddl in SCHEMA:
            con.execute(ddl)
    return con


class WarehouseFolderError(PermissionError):
    """The warehouse's folder lets other users in and cannot be narrowed to its owner."""


def private_folder(folder: Path) -> None:
    """Create ``folder`` with mode 0700, or narrow it to 0700 when it lets other users in.

    DuckDB writes the write-ahead log (``<file>.wal``) and its spill files (``<file>.tmp/``)
    beside the warehouse with the process umask, not the file's mode: they hold the same rows
    as the file for as long as a connection writes, and only the folder keeps others out. A
    shared folder (writable by all, or sticky, as ``/tmp``) or another user's is refused, not
    narrowed: the warehouse needs a folder of its own."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    found = folder.stat()
    mode = stat.S_IMODE(found.st_mode)
    if not mode & 0o077:
        return
    if mode & (stat.S_IWOTH | stat.S_ISVTX) or found.st_uid != os.getuid():
        raise _not_private(folder, mode)
    try:
        os.chmod(folder, mode & 0o700)
    except PermissionError as exc:
        raise _not_private(folder, mode) from exc


def _not_private(folder: Path, mode: int) -> WarehouseFolderError:
    return WarehouseFolderError(
        f"the warehouse folder {folder} has mode {mode:04o} and is not this user's own to "
        "narrow to 0700 (DuckDB writes the warehouse's write-ahead log there with the umask): "
        "use a folder of your own"
    )


def _private_tempdir(parent: Path) -> Path:
    """A fresh 0700 folder beside the warehouse: files made in it are never readable by others,
    whatever the umask, before they are narrowed to 0600 and renamed into place."""
    return Path(tempfile.mkdtemp(prefix=".warehouse-", dir=parent))


def _create_private(path: Path) -> None:
    """Create an empty warehouse at ``path`` with mode 0600 (DuckDB itself would use the
    umask); a file created meanwhile by another process is left alone."""
    tmpdir = _private_tempdir(path.parent)
    try:
        fresh = tmpdir / path.name
        duckdb.connect(str(fresh)).close()
        os.chmod(fresh, stat.S_IRUSR | stat.S_IWUSR)
        try:
            os.link(fresh, path)  # exclusive: never replaces a warehouse made meanwhile
        except FileExistsError:
            return
        except OSError:  # a filesystem without hard links: a rename, checked just before
            if path.exists():
                return
            os.rename(fresh, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _meta_value(con: duckdb.DuckDBPyConnection, key: str) -> str | None:
    """A value of ``warehouse_meta``; None when it is not there (or the table is not)."""
    try:
        rows = con.execute("SELECT value FROM warehouse_meta WHERE key = ?", [key]).fetchall()
    except duckdb.CatalogException:
        return None
    return str(rows[0][0]) if rows else None


def warehouse_id(con: duckdb.DuckDBPyConnection) -> str | None:
    """The warehouse's id, None for a warehouse that has none yet (or no schema)."""
    return _meta_value(con, WAREHOUSE_ID_KEY)


def ensure_warehouse_id(
    con: duckdb.DuckDBPyConnection, random_bytes: RandomBytes = os.urandom, *, renew: bool = False
) -> str:
    """The warehouse's id, generated on first use: random, so it says nothing of the
    warehouse's path or contents. ``renew`` gives a copied warehouse an id of its own."""
    existing = warehouse_id(con)
    if existing is not None and not renew:
        return existing
    new_id = "wh-" + random_bytes(16).hex()
    con.execute(WAREHOUSE_META_DDL)
    con.execute(
        "INSERT INTO warehouse_meta (key, value) VALUES (?, ?) "
        "ON CONFLICT DO UPDATE SET value = excluded.value",
        [WAREHOUSE_ID_KEY, new_id],
    )
    found = warehouse_id(con)
    assert found is not None
    return found


def recorded_pseudonym_key_id(con: duckdb.DuckDBPyConnection) -> str | None:
    """The id of the pseudonym key the warehouse records it was built with; None for a
    warehouse with no such record (new, or written before the record existed)."""
    return _meta_value(con, PSEUDONYM_KEY_ID_KEY)


def record_pseudonym_key_id(con: duckdb.DuckDBPyConnection, key_id: str) -> None:
    """Record the id of the warehouse's pseudonym key (a writable connection)."""
    con.execute(WAREHOUSE_META_DDL)
    con.execute(
        "INSERT INTO warehouse_meta (key, value) VALUES (?, ?) ON CONFLICT DO NOTHING",
        [PSEUDONYM_KEY_ID_KEY, key_id],
    )


def owe_rewrite(con: duckdb.DuckDBPyConnection, why: str) -> None:
    """Record that the file owes a rewrite (:func:`rewrite`): call it in the transaction that
    destroys a data key or deletes rows an erasure removes, so that the record is durable
    exactly when what it promises to wipe is. Until the rewrite, those rows stay in freed
    pages; a process killed before its rewrite leaves the record, and the next writer that
    checks it (:func:`rewrite_if_owed`: ingest, every pipeline step that wrote, an erasure)
    rewrites the file. ``why`` says what was removed (never a key, pseudonym or value)."""
    con.execute(WAREHOUSE_META_DDL)
    con.execute(
        "INSERT INTO warehouse_meta (key, value) VALUES (?, ?) "
        "ON CONFLICT DO UPDATE SET value = excluded.value",
        [REWRITE_OWED_KEY, why],
    )


def rewrite_owed(con: duckdb.DuckDBPyConnection) -> bool:
    """The file records that it owes a rewrite (:func:`owe_rewrite`)."""
    return _meta_value(con, REWRITE_OWED_KEY) is not None


def pseudonym_key_mismatch(given: str, why: str) -> PseudonymKeyMismatchError:
    """The error for a pseudonym key that is not the warehouse's: key ids only, never a key."""
    return PseudonymKeyMismatchError(
        f"the pseudonym key given (key id {given}) is not the one this warehouse was built with "
        f"({why}): the vault's resource keys and content checks, and the release's pseudonyms "
        "and date shifts, all depend on it, so nothing was read or written; use the "
        "warehouse's own pseudonym key (a lost key cannot be replaced: start a new work "
        "directory and ingest the exports again)"
    )


@dataclass(frozen=True)
class PseudonymKeyCheck:
    """A pseudonym key held against the warehouse's record: its pseudonymizer, its id, and
    whether the warehouse records a key id at all (when it does, it is this key's)."""

    pseudonymizer: Pseudonymizer
    key_id: str
    recorded: bool


def check_pseudonym_key(con: duckdb.DuckDBPyConnection, provider: KeyProvider) -> PseudonymKeyCheck:
    """``provider``'s pseudonym key, refused (:class:`PseudonymKeyMismatchError`) when the
    warehouse records another. A vault under two keys would hold a re-sent patient twice under
    unrelated pseudonyms, with neither key verifying the other's rows. A warehouse without the
    record passes here (see :func:`vault.read.bind_pseudonym_key`)."""
    key = provider.pseudonym_key()
    recorded = recorded_pseudonym_key_id(con)
    given = key_fingerprint(key)
    if recorded is not None and recorded != given:
        raise pseudonym_key_mismatch(given, f"key id {recorded}")
    return PseudonymKeyCheck(Pseudonymizer(key), given, recorded is not None)


def require_pseudonym_key(con: duckdb.DuckDBPyConnection, provider: KeyProvider) -> Pseudonymizer:
    """The pseudonymizer of ``provider``'s pseudonym key, once the warehouse's record says it is
    the key the vault is written under (:func:`check_pseudonym_key`)."""
    return check_pseudonym_key(con, provider).pseudonymizer


def is_copy(registered: Mapping[str, str], warehouse_id: str | None, path: Path) -> bool:
    """The registry holds ``warehouse_id`` at another path whose file still exists: the
    warehouse at ``path`` is a copy of that one (a moved warehouse leaves no file behind)."""
    known = registered.get(warehouse_id) if warehouse_id else None
    if not known or known == str(Path(path).resolve()):
        return False
    other = Path(known)
    try:
        return other.exists() and not other.samefile(path)
    except OSError:
        return False


def claim_id(
    con: duckdb.DuckDBPyConnection,
    registered: Mapping[str, str],
    random_bytes: RandomBytes = os.urandom,
) -> str:
    """The id of the warehouse behind a writable connection, renewed when it is a copy of a
    registered warehouse (``cp -r`` of a work directory): two live warehouses sharing an id
    would share a registry entry and an audit anchor."""
    wid = ensure_warehouse_id(con, random_bytes)
    path = database_path(con)
    if path is not None and is_copy(registered, wid, path):
        wid = ensure_warehouse_id(con, random_bytes, renew=True)
    return wid


def database_path(con: duckdb.DuckDBPyConnection) -> Path | None:
    """The file behind a connection (None for an in-memory database)."""
    row = con.execute(
        "SELECT path FROM duckdb_databases() WHERE database_name = current_database()"
    ).fetchall()
    return Path(row[0][0]) if row and row[0][0] else None


# How long a step of an erasure (its reads, its transaction, a purge, the rewrite) waits for
# another process to close the warehouse (another erasure's step, a run) before it gives up
BUSY_WAIT_SECONDS = 300.0
# the flock rewrites of the warehouses in one folder take (they share its temporary folders);
# not named like one (``.warehouse-*``), which a rewrite removes as stale
REWRITE_LOCK = ".rewrite.lock"


class WarehouseBusyError(duckdb.IOException):
    """The warehouse stayed open in another process for the whole wait."""


def connect_when_free(
    path: Path | str,
    read_only: bool = False,
    *,
    wait_seconds: float | None = None,
    memory_limit: str = DEFAULT_MEMORY_LIMIT,
) -> duckdb.DuckDBPyConnection:
    """:func:`connect`, waiting with backoff while another process has the file open in a way
    that excludes this connection (DuckDB's lock: one writing process, or readers only), up to
    ``wait_seconds`` (:data:`BUSY_WAIT_SECONDS`, read at the call, when None); then
    :class:`WarehouseBusyError`."""
    wait = BUSY_WAIT_SECONDS if wait_seconds is None else wait_seconds
    deadline = time.monotonic() + wait
    pause = 0.05
    while True:
        try:
            return connect(path, read_only=read_only, memory_limit=memory_limit)
        except duckdb.IOException as exc:
            if not _is_lock_conflict(exc):
                raise  # another error (a full disk, a damaged file): waiting will not mend it
            if time.monotonic() + pause > deadline:
                raise WarehouseBusyError(
                    f"the warehouse at {path} stayed open in another process for {wait:.0f} s"
                ) from exc
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


def _is_lock_conflict(exc: duckdb.IOException) -> bool:
    """DuckDB could not lock the file: another process has it open."""
    return "could not set lock" in str(exc).lower()


def rewrite(
    path: Path,
    memory_limit: str = DEFAULT_MEMORY_LIMIT,
    *,
    wait_seconds: float | None = None,
    only_if_owed: bool = False,
) -> bool:
    """Copy the warehouse into a fresh file and atomically put it in the old one's place;
    returns whether it was rewritten.

    DuckDB reuses freed pages but does not wipe them: rows deleted by an erasure (wrapped data
    keys, ciphertexts, released rows) stay readable in the file until overwritten. The copy
    holds live rows only, without the record that the file owes a rewrite
    (:func:`owe_rewrite`). A crash leaves either the old file, record included, or the new
    one (and a stale temporary folder, removed by the next rewrite). ``only_if_owed``: only
    when the file holds that record (:func:`rewrite_if_owed`).

    One rewrite at a time in the warehouse's folder (an flock, :data:`REWRITE_LOCK`): a second
    one waits, and only the one holding the lock removes stale temporary folders, never a live
    one's. The old file is held open for writing from before the copy until after the new one
    is in its place, so no other process commits into it meanwhile (a commit the copy would
    not hold); while another process has it open, the rewrite waits for it
    (:func:`connect_when_free`)."""
    path = Path(path)
    if only_if_owed and not path.exists():
        return False
    with exclusive_lock(path.parent / REWRITE_LOCK):
        for stale in path.parent.glob(".warehouse-*"):
            shutil.rmtree(stale, ignore_errors=True)
        source = connect_when_free(path, wait_seconds=wait_seconds, memory_limit=memory_limit)
        try:
            if only_if_owed and not rewrite_owed(source):
                return False
            source.execute("CHECKPOINT")  # the WAL into the file
            tmpdir = _private_tempdir(path.parent)
            try:
                fresh = tmpdir / path.name
                _copy_live_rows(source, fresh)
                os.replace(fresh, path)
                fsync_dir(path.parent)
            finally:
                shutil.rmtree(tmpdir, ignore_errors=True)
        finally:
            # closed after the new file is in place: a process opening the path meanwhile
            # found the old file locked, and now finds the new one
            source.close()
    return True


def rewrite_if_owed(path: Path, *, wait_seconds: float | None = None) -> bool:
    """:func:`rewrite` when the file records that it owes one (:func:`owe_rewrite`: an
    erasure, or an ingest refusing an erased person, committed and was killed before its own
    rewrite); returns whether it was rewritten. Call it with no connection of this process
    open on the file."""
    return rewrite(path, wait_seconds=wait_seconds, only_if_owed=True)


def _copy_live_rows(source: duckdb.DuckDBPyConnection, fresh: Path) -> None:
    """Every live row of ``source``'s database into a new file ``fresh`` (mode 0600, synced)."""
    ((name,),) = source.execute("SELECT current_database()").fetchall()
    source.execute("ATTACH ? AS rewrite_dst", [str(fresh)])
    try:
        source.execute(f'COPY FROM DATABASE "{name}" TO rewrite_dst')
        # the new file owes nothing: its freed pages hold none of the old file's rows
        source.execute("DELETE FROM rewrite_dst.warehouse_meta WHERE key = ?", [REWRITE_OWED_KEY])
    finally:
        source.execute("DETACH rewrite_dst")
    os.chmod(fresh, stat.S_IRUSR | stat.S_IWUSR)
    fd = os.open(fresh, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def used_parameters(named: dict[str, Any], sql: str) -> dict[str, Any]:
    """The named parameters (``$name``) that ``sql`` uses: DuckDB refuses one it does not."""
    return {k: v for k, v in named.items() if f"${k}" in sql}
