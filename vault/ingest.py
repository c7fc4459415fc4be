"""Ingest one batch of FHIR files in a single streaming pass.

parse + validate (worker processes, both cores) → resolve references → seal under the patient's
data key → stage; then, in SQL over the staged batch: within-batch duplicates, dangling patient
references, version supersession against earlier batches, and the ledger that accounts for every
record. Memory is bounded by the in-flight window, never by the batch size.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from collections import Counter, deque
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from fhirlake.nested import folded_type
from fhirlake.readers import (
    FileNote,
    FileNotReadableError,
    RawRecord,
    SkippedFile,
    SourceFile,
    iter_records,
    list_batch_files,
)
from fhirlake.references import (
    classify,
    conditional_target,
    identifier_criteria,
    identifier_match_form,
    literal_target,
    local_target,
)
from fhirlake.validation import Checked, check_chunk, check_record
from fhirlake.viewdef import instant_sql
from vault import warehouse
from vault.clock import utcnow
from vault.clustered import sync_clustered
from vault.errors import SourceFileNotReadableError, VaultError
from vault.keys import KeyProvider
from vault.lifecycle import erase_earlier_compartments, tombstone
from vault.pseudonym import Pseudonymizer, stored_version_id
from vault.read import bind_pseudonym_key, quarantined_text, text_resources
from vault.sealing import SHARED_OWNER, DataKeyStore, seal

ERASED_SUBJECT = "erased_subject"
# keyed identifier criteria: the exact ``Type?system|value`` (what a conditional reference
# resolves through) and, for a Patient, its loose form (fhirlake.references.identifier_match_form)
CRITERIA_DOMAIN = "criteria"
LOOSE_CRITERIA_DOMAIN = "criteria-loose"


def loose_identifier_key(pseudo: Pseudonymizer, resource_type: str, criteria: str) -> str | None:
    """The keyed loose form of one ``system|value`` criteria of ``resource_type``, or None when
    its value has no letter or digit. It is a pseudonym of its own domain: it never equals an
    exact criteria key, so conditional references never resolve through it."""
    loose = identifier_match_form(criteria)
    if loose is None:
        return None
    return pseudo.token(LOOSE_CRITERIA_DOMAIN, f"{resource_type}?{loose}")


def criteria_holders_sql(criteria_keys: str) -> str:
    """SQL of ``(criteria_key, resource_key)``: the one resource each keyed criteria of
    ``criteria_keys`` (a trusted subquery) names in the identifier index. A conditional
    reference, or a logical one read as its conditional form, names a resource only when
    exactly one holds the identifier; when several do it names none of them, since picking one
    could give a resource another patient's pseudonym. One rule for the patient a resource is
    filed under at ingest and for the reference the release writes."""
    return (
        "SELECT criteria_key, min(resource_key) AS resource_key FROM identifier_index "
        f"WHERE criteria_key IN ({criteria_keys}) "
        "GROUP BY criteria_key HAVING count(DISTINCT resource_key) = 1"
    )


def identifier_keys(
    pseudo: Pseudonymizer, resource_type: str, criteria: Iterable[str]
) -> list[str]:
    """The keys a resource's identifiers are indexed under (``identifier_index``), and an
    erased patient's identifiers are tombstoned under: the exact criteria of every resource,
    and for a Patient the loose form too, so that the same person sent again with an
    identifier written differently (``731559012`` for ``731-55-9012``, under the same system)
    is still recognised."""
    keys: list[str] = []
    for one in criteria:
        keys.append(pseudo.token(CRITERIA_DOMAIN, f"{resource_type}?{one}"))
        if resource_type == "Patient":
            loose = loose_identifier_key(pseudo, resource_type, one)
            if loose is not None:
                keys.append(loose)
    return list(dict.fromkeys(keys))


CHUNK_RECORDS = 256
FLUSH_ROWS = 20_000
# Below this many records a worker pool costs more to start than it saves: starting two spawned
# workers (each importing the R4B models) takes about a second, while one process validates
# about 3,000 records a second (1,516 records: 1.3-1.6 s with a pool, 0.5 s without).
PARALLEL_AFTER = 5_000
# A chunk takes a tenth of a second (a de-identification chunk about a second): none back for
# this long means a worker stopped answering (stopped, swapped out, stuck on one record), and
# the pass fails rather than wait for good; deid.workers holds its pool to the same limit
STALLED_AFTER_SECONDS = 900.0
EXIT_GRACE_SECONDS = 30.0  # for idle workers to exit once every chunk came back
FHIR_BASE_ENV = "EHR_FHIR_BASE"


class WorkersStalledError(VaultError):
    """No chunk came back from the validation workers for :data:`STALLED_AFTER_SECONDS`."""


@dataclass
class IngestReport:
    """Per-batch counts. Holds no PHI: it is shown in the UI and written to run summaries."""

    batch_id: str
    files: int = 0
    skipped_files: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    records_in: int = 0
    accepted: int = 0
    quarantined: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    resources_by_type: dict[str, int] = field(default_factory=dict)
    patients: int = 0
    references: int = 0
    unresolved_references: int = 0
    unresolved_patient_references: int = 0
    external_references: int = 0  # absolute references to another server: never resolved
    seconds: float = 0.0
    workers: int = 1
    # resources the batch's previous ingest held that this one does not (a file removed from
    # the folder, a record rewritten into one that fails): re-ingesting a batch replaces what it
    # wrote, so they left the vault with it, unless another batch holds them too
    no_longer_in_batch: int = 0
    # files read to their end whose gzip trailer check failed (CRC or length) with nothing after
    # it: their records stand, unverified by the check; message -> files
    file_warnings: dict[str, int] = field(default_factory=dict)
    # records earlier batches stored for a Patient id this batch refused as an erased person
    # (her Patient sent under a new id after records naming that id alone): removed from the
    # vault, with the data key they were sealed under, and the warehouse rewritten
    erased_from_earlier_batches: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _size(path: Path) -> int:
    """A data file's size, 0 when it cannot be looked at (it then fails as one record)."""
    try:
        return path.lstat().st_size
    except OSError:
        return 0


def _sealed_context(prefix: bytes, *parts: str) -> bytes:
    return prefix + "|".join(parts).encode()


def _arrow_type(values: list[Any]) -> pa.DataType:
    """The Arrow type of a column, from its first value: explicit types make the conversion
    ten times faster than pyarrow's per-value inference."""
    sample = next((v for v in values if v is not None), None)
    if isinstance(sample, bytes):
        return pa.binary()
    if isinstance(sample, bool):
        return pa.bool_()
    if isinstance(sample, int):
        return pa.int64()
    if isinstance(sample, datetime):
        return pa.timestamp("us", tz="UTC")
    return pa.string()


class _Buffers:
    """Rows appended per record as tuples, written to DuckDB as Arrow tables in one insert per
    table and flush (a per-row INSERT would cost more than the whole record's validation)."""

    def __init__(self) -> None:
        self.columns: dict[str, tuple[str, ...]] = {}
        self.tables: dict[str, list[tuple[Any, ...]]] = {}
        self.count = 0

    def add(self, table: str, **row: Any) -> None:
        if table not in self.columns:
            self.columns[table] = tuple(row)
            self.tables[table] = []
        self.tables[table].append(tuple(row.values()))
        self.count += 1

    def rows(self) -> int:
        return self.count

    def mark(self) -> dict[str, int]:
        """Row counts per table, to undo what one record staged (:meth:`rollback`)."""
        return {table: len(rows) for table, rows in self.tables.items()}

    def rollback(self, mark: dict[str, int]) -> None:
        for table, rows in self.tables.items():
            keep = mark.get(table, 0)
            self.count -= len(rows) - keep
            del rows[keep:]

    def flush(self, con: duckdb.DuckDBPyConnection) -> None:
        for table, rows in self.tables.items():
            if not rows:
                continue
            names = self.columns[table]
            columns = [list(c) for c in zip(*rows, strict=True)]
            arrow = pa.table(
                {n: pa.array(c, _arrow_type(c)) for n, c in zip(names, columns, strict=True)}
            )
            con.register("_rows", arrow)
            try:
                cols = ", ".join(names)
                con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _rows")
            finally:
                con.unregister("_rows")
            rows.clear()
        self.count = 0


def _checked_stream(
    records: Iterator[RawRecord], workers: int
) -> Generator[tuple[RawRecord, Checked | None], None, None]:
    """Pair every record with its check, in order; checks run in a process pool once the batch
    proves large enough, with a bounded number of chunks in flight."""
    pool: ProcessPoolExecutor | None = None
    inflight: deque[tuple[list[RawRecord], Future[list[Checked]]]] = deque()
    window = max(2, workers * 3)
    chunk: list[RawRecord] = []
    seen = 0

    def drain(limit: int) -> Iterator[tuple[RawRecord, Checked | None]]:
        while len(inflight) > limit:
            recs, fut = inflight.popleft()
            try:
                checks = fut.result(timeout=STALLED_AFTER_SECONDS)
            except TimeoutError:
                raise WorkersStalledError(
                    f"validation workers: no chunk came back for {STALLED_AFTER_SECONDS:g} s "
                    "(a worker process stopped answering); the batch is not marked ingested, "
                    "and the workers were ended"
                ) from None
            yield from zip(recs, checks, strict=True)

    def submit(batch: list[RawRecord]) -> Iterator[tuple[RawRecord, Checked | None]]:
        nonlocal pool
        raws = [r.raw or b"" for r in batch]
        if pool is None and workers > 1 and seen >= PARALLEL_AFTER:
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        if pool is None:
            yield from zip(batch, check_chunk(raws), strict=True)
            return
        inflight.append((batch, pool.submit(check_chunk, raws)))
        yield from drain(window)

    try:
        for record in records:
            seen += 1
            if record.error is not None:
                yield record, None
                continue
            chunk.append(record)
            if len(chunk) >= CHUNK_RECORDS:
                yield from submit(chunk)
                chunk = []
        if chunk:
            yield from submit(chunk)
        yield from drain(0)
    except BaseException:
        # the chunks still out are of no use: the workers are ended rather than waited for
        # (one that stopped answering would hold the shutdown for good)
        if pool is not None:
            end_workers(pool)
            pool = None
        raise
    finally:
        # closed early (GeneratorExit is raised at the yield) or done: idle workers given a
        # moment to exit, then ended
        if pool is not None:
            end_workers(pool, grace=EXIT_GRACE_SECONDS)


def end_workers(pool: ProcessPoolExecutor, grace: float = 0.0) -> None:
    """Shut the pool down, its worker processes given ``grace`` seconds to exit and killed
    then: a shutdown that joins them waits for the chunks they hold, and for good for a
    worker that stopped answering, whether it holds a chunk or not."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + grace
    for process in processes:
        with contextlib.suppress(OSError, ValueError):
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                process.kill()
                process.join(5)
    pool.shutdown(wait=True)


# -- the batch-level SQL steps of BatchIngestor.finalize, in order; $b is the batch id ----------

# A batch ingested again first removes what it wrote. A vault row it held may be the only copy of
# content another batch recorded as a repeat (ledger outcome `unchanged`, its own copy dropped):
# that row is handed over to the other batch (the earliest by seq, its first such record), with
# a position in that batch's range, so that the vault keeps the resource while a folder holds
# it. Only rows this batch accepted (not a staged row left by a pass that died), and only when
# no other batch's vault row has the same content. The other batch's record becomes `new`, or
# `updated` when a third batch holds another version: what ingesting it again would record.
_HANDOVER = """
CREATE OR REPLACE TEMP TABLE _handover AS
WITH held AS (
    SELECT v.resource_key, v.content_mac, v.ingest_seq FROM phi_vault v
    JOIN record_ledger a ON a.batch_id = v.batch_id AND a.file_index = v.file_index
                        AND a.position = v.position AND a.status = 'accepted'
    WHERE v.batch_id = $b AND NOT EXISTS (
        SELECT 1 FROM phi_vault o WHERE o.batch_id <> $b AND o.resource_key = v.resource_key
          AND o.content_mac = v.content_mac)
),
repeats AS (
    SELECT h.ingest_seq AS old_seq, h.resource_key, h.content_mac,
           l.batch_id, l.file_index, l.position,
           row_number() OVER (PARTITION BY h.ingest_seq
                              ORDER BY t.seq, l.file_index, l.position) AS pick
    FROM held h
    JOIN record_ledger l ON l.resource_key = h.resource_key AND l.content_mac = h.content_mac
    JOIN batches t ON t.batch_id = l.batch_id
    WHERE l.batch_id <> $b AND l.status = 'accepted' AND l.outcome = 'unchanged'
),
chosen AS (SELECT * FROM repeats WHERE pick = 1),
free AS (
    -- the first free position of each receiving batch: past its records and its vault rows
    SELECT t.batch_id, t.seq * 1000000000000 AS base, greatest(
        (SELECT count(*) FROM record_ledger l WHERE l.batch_id = t.batch_id),
        (SELECT coalesce(max(v.ingest_seq), 0) - t.seq * 1000000000000 FROM phi_vault v
         WHERE v.batch_id = t.batch_id)) AS used
    FROM batches t WHERE t.batch_id IN (SELECT batch_id FROM chosen)
)
SELECT c.old_seq, c.resource_key, c.content_mac, c.batch_id, c.file_index, c.position,
       f.base + f.used + row_number() OVER (PARTITION BY c.batch_id ORDER BY c.old_seq)
           AS new_seq
FROM chosen c JOIN free f USING (batch_id)
"""

_HAND_OVER_ROWS = (
    """
    UPDATE phi_vault v SET batch_id = h.batch_id, file_index = h.file_index,
        position = h.position, ingest_seq = h.new_seq
    FROM _handover h WHERE v.batch_id = $b AND v.ingest_seq = h.old_seq
    """,
    """
    UPDATE record_ledger l SET outcome = CASE
        WHEN EXISTS (SELECT 1 FROM phi_vault o WHERE o.resource_key = l.resource_key
                     AND o.batch_id NOT IN ($b, l.batch_id)) THEN 'updated' ELSE 'new' END
    FROM _handover h
    WHERE l.batch_id = h.batch_id AND l.file_index = h.file_index AND l.position = h.position
    """,
)

# Rows handed over at start() whose content this pass holds again (ranked `unchanged` against
# the handed row): given back, so that a batch ingested again unchanged keeps its outcomes.
_RETURNED = """
CREATE OR REPLACE TEMP TABLE _returned AS
SELECT h.* FROM _handover h WHERE EXISTS (
    SELECT 1 FROM _fate t JOIN phi_vault s ON s.batch_id = $b AND s.file_index = t.file_index
                                          AND s.position = t.position
    WHERE t.outcome = 'unchanged' AND s.resource_key = h.resource_key
      AND s.content_mac = h.content_mac)
"""

_GIVE_BACK = (
    """
    DELETE FROM phi_vault v USING _returned r
    WHERE v.batch_id = r.batch_id AND v.ingest_seq = r.new_seq
    """,
    """
    UPDATE record_ledger l SET outcome = 'unchanged' FROM _returned r
    WHERE l.batch_id = r.batch_id AND l.file_index = r.file_index AND l.position = r.position
    """,
)

# Rank this batch's rows of one resource: identical content repeats are harmless; different
# content under the same versionId, or without one under the same lastUpdated instant (or
# neither), is a conflict nobody can settle here, and so is a repeat of a conflict (its content is
# not kept: a repeat of it is no harmless one). Versions told apart by their versionId or,
# without one, by their lastUpdated instant are all kept, and the newest is current (the rule
# across batches: warehouse.NEWEST_VERSION_FIRST). Then compare with what earlier batches stored:
# content an earlier version holds is a repeat (`unchanged`), unless this record is newer than
# every earlier version and the current one holds other content. That is a resource set back to
# what it was (a consent active, then inactive, then active again, exported without versionId
# or lastUpdated): the export's latest word, a version of its own that becomes current. Not so
# a batch whose files are another batch's (the same fingerprint: a folder renamed, or copied
# with its times): the same delivery again, arriving late, is no later word.
_RANK_STAGED_ROWS = f"""
CREATE OR REPLACE TEMP TABLE _fate AS
WITH ranked AS (
    SELECT s.file_index, s.position, s.resource_key, s.content_mac,
           s.version_id, s.last_updated, s.ingest_seq,
           row_number() OVER (PARTITION BY s.resource_key, s.content_mac
                              ORDER BY s.file_index, s.position) AS content_rank,
           row_number() OVER (PARTITION BY s.resource_key, coalesce(
                                  'v:' || s.version_id,
                                  't:' || CAST({instant_sql("s.last_updated")} AS VARCHAR), '')
                              ORDER BY s.file_index, s.position) AS version_rank
    FROM phi_vault s WHERE s.batch_id = $b
),
-- whether the first record of each content was itself a conflict (its repeats are then too)
firsts AS (
    SELECT *, first_value(version_rank) OVER (
               PARTITION BY resource_key, content_mac ORDER BY file_index, position
           ) > 1 AS repeats_conflict
    FROM ranked
),
earlier AS (
    SELECT resource_key, content_mac, version_id, last_updated, ingest_seq FROM phi_vault
    WHERE batch_id <> $b AND resource_key IN (SELECT resource_key FROM ranked)
),
-- each record beside every earlier version of its resource, newest first: the first is the
-- version current once the record is kept
rivals AS (
    SELECT r.file_index, r.position, r.content_mac, r.version_id, r.last_updated,
           r.ingest_seq, TRUE AS staged
    FROM ranked r
    UNION ALL
    SELECT r.file_index, r.position, e.content_mac, e.version_id, e.last_updated,
           e.ingest_seq, FALSE AS staged
    FROM ranked r JOIN earlier e USING (resource_key)
),
newest AS (
    SELECT file_index, position, staged, content_mac,
           row_number() OVER (PARTITION BY file_index, position
                              ORDER BY {warehouse.NEWEST_VERSION_FIRST}) AS newness
    FROM rivals
),
-- records newer than every earlier version whose current one holds other content, in a batch
-- that is no delivery again of another batch's files ($redelivered: vault.landing's fingerprint)
sets_back AS (
    SELECT s.file_index, s.position FROM newest s
    JOIN newest c ON c.file_index = s.file_index AND c.position = s.position
    WHERE s.staged AND s.newness = 1 AND NOT c.staged AND c.newness = 2
      AND c.content_mac <> s.content_mac AND NOT $redelivered
)
SELECT r.file_index, r.position,
    CASE
        WHEN r.content_rank > 1 AND NOT r.repeats_conflict THEN 'duplicate_identical'
        WHEN r.version_rank > 1 THEN 'duplicate_conflict'
        WHEN EXISTS (SELECT 1 FROM earlier e WHERE e.resource_key = r.resource_key
                     AND e.content_mac = r.content_mac)
             AND NOT EXISTS (SELECT 1 FROM sets_back b WHERE b.file_index = r.file_index
                             AND b.position = r.position) THEN 'unchanged'
        WHEN EXISTS (SELECT 1 FROM earlier e
                     WHERE e.resource_key = r.resource_key) THEN 'updated'
        ELSE 'new'
    END AS outcome
FROM firsts r
"""

# Conflicting repeats move, still sealed, to the quarantine ($now is the batch's time).
_QUARANTINE_CONFLICTS = """
INSERT INTO quarantine
SELECT s.batch_id, s.file_index, f.file_id, s.position, t.outcome,
       s.resource_type || ': same id as an earlier record of this batch, different content',
       s.resource_type, s.patient_key, s.sealed, s.aad, $now
FROM phi_vault s
JOIN _fate t ON t.file_index = s.file_index AND t.position = s.position
JOIN source_files f ON f.batch_id = s.batch_id AND f.file_index = s.file_index
WHERE s.batch_id = $b AND t.outcome = 'duplicate_conflict'
"""

# Only new resources and new versions stay in the vault.
_DROP_REPEATS = """
DELETE FROM phi_vault s USING _fate t
WHERE s.batch_id = $b AND t.file_index = s.file_index AND t.position = s.position
  AND t.outcome NOT IN ('new', 'updated')
"""

_SETTLE_LEDGER = """
UPDATE record_ledger l SET
    outcome = t.outcome,
    status = CASE WHEN t.outcome = 'duplicate_conflict' THEN 'quarantined' ELSE 'accepted' END
FROM _fate t
WHERE l.batch_id = $b AND l.status = 'staged'
  AND l.file_index = t.file_index AND l.position = t.position
"""

# A reference resolves when its target is in the vault by id, or, for a conditional reference,
# by one of its identifiers (this batch and every earlier one).
_RESOLVE_REFERENCES = """
UPDATE resource_references r SET resolved = (
    EXISTS (SELECT 1 FROM phi_vault v WHERE v.resource_key = r.target_key)
    OR EXISTS (SELECT 1 FROM identifier_index i WHERE i.criteria_key = r.target_key))
WHERE r.batch_id = $b
"""


# Pending conditional patient references of batch $b with the one Patient their criteria name
# (NULL when none or several do), with the staged ciphertext to re-seal. A ``Patient?`` criteria
# key is only ever a Patient's.
_PENDING_OWNERS = f"""
WITH owners AS (
    {criteria_holders_sql("SELECT criteria_key FROM pending_patient_refs WHERE batch_id = $b")}
)
SELECT p.file_index, p.position, p.resource_key, v.sealed, v.aad, o.resource_key,
       p.criteria_key
FROM pending_patient_refs p
JOIN phi_vault v ON v.batch_id = p.batch_id AND v.file_index = p.file_index
                AND v.position = p.position
LEFT JOIN owners o ON o.criteria_key = p.criteria_key
WHERE p.batch_id = $b
ORDER BY p.file_index, p.position
"""

_APPLY_OWNERS = """
UPDATE phi_vault SET patient_key = o.patient_key, sealed = o.sealed
FROM _owners o
WHERE phi_vault.batch_id = $b AND phi_vault.file_index = o.file_index
  AND phi_vault.position = o.position
"""

# Staged rows of an erased patient ($code): ledger and quarantine say so, the vault and the
# indexes forget them.
_UNSTORE_ERASED = (
    """
    UPDATE record_ledger l SET status = 'quarantined', outcome = $code, resource_key = NULL,
        content_mac = NULL
    FROM _erased e
    WHERE l.batch_id = $b AND l.file_index = e.file_index AND l.position = e.position
    """,
    """
    INSERT INTO quarantine
    SELECT v.batch_id, v.file_index, f.file_id, v.position, $code,
           v.resource_type || ': belongs to an erased patient; not stored',
           v.resource_type, NULL, ''::BLOB, ''::BLOB, $now
    FROM phi_vault v
    JOIN _erased e ON e.file_index = v.file_index AND e.position = v.position
    JOIN source_files f ON f.batch_id = v.batch_id AND f.file_index = v.file_index
    WHERE v.batch_id = $b
    """,
    """
    DELETE FROM resource_references WHERE batch_id = $b AND resource_key IN (
        SELECT v.resource_key FROM phi_vault v JOIN _erased e
          ON e.file_index = v.file_index AND e.position = v.position WHERE v.batch_id = $b)
    """,
    """
    DELETE FROM identifier_index WHERE batch_id = $b AND resource_key IN (
        SELECT v.resource_key FROM phi_vault v JOIN _erased e
          ON e.file_index = v.file_index AND e.position = v.position WHERE v.batch_id = $b)
    """,
    """
    DELETE FROM phi_vault v USING _erased e
    WHERE v.batch_id = $b AND v.file_index = e.file_index AND v.position = e.position
    """,
)


# Records of such a patient quarantined for another reason before it was read: unstored too.
# Staged records of no patient of a batch with a resolved reference to one of the given
# resources (records the batch refused as an erased person's): hers too.
_STAGED_ABOUT_REFUSED = """
SELECT DISTINCT v.file_index, v.position FROM phi_vault v
JOIN resource_references r ON r.batch_id = v.batch_id AND r.resource_key = v.resource_key
WHERE v.batch_id = ? AND v.patient_key IS NULL AND r.kind IN ('urn', 'relative', 'absolute')
  AND r.target_key IN (SELECT unnest(?::VARCHAR[]))
"""
_REFUSE_ERASED_QUARANTINE = (
    "UPDATE quarantine SET reason_code = $1, patient_key = NULL, sealed = ''::BLOB, "
    "aad = ''::BLOB, message = coalesce(resource_type, 'record') || "
    "': belongs to an erased patient; not stored' "
    "WHERE batch_id = $2 AND patient_key IN (SELECT unnest($3::VARCHAR[]))"
)


class BatchIngestor:
    """Streams one batch into the warehouse. Use :func:`ingest_batch`."""

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        provider: KeyProvider,
        batch_id: str,
        workers: int,
        server_base: str | None = None,
        fingerprint: str | None = None,
    ) -> None:
        self.con = con
        self.batch_id = batch_id
        self.workers = workers
        self.server_base = server_base
        # the folder's fingerprint (vault.landing): another batch's is the same files again
        self.fingerprint = fingerprint
        # refused before anything is written when the key is not the vault's own
        self.pseudo = bind_pseudonym_key(con, provider)
        self.keys = DataKeyStore(con, provider)
        self.keys.require_every_kek()
        # tombstones (patients, and the keyed identifier criteria of their Patient) and owners
        # whose key was destroyed by an erasure from before tombstones existed
        self.erased: set[str] = {
            str(k) for (k,) in con.execute("SELECT subject_key FROM erased_subjects").fetchall()
        } | self.keys.destroyed_owners
        # Patients of this batch refused as an erased person (under a new id, by an identifier)
        self.erased_in_batch: set[str] = set()
        # the keyed identifier criteria of those Patients: tombstoned at the end of the batch
        self.erased_criteria_in_batch: set[str] = set()
        # resources this pass refused as an erased person's: still in the batch's files, so not
        # "no longer in batch" when a killed pass left them staged (count_no_longer_in_batch)
        self.refused_as_erased: set[str] = set()
        # a data key or records of an earlier batch were erased: the file is rewritten after
        self.needs_rewrite = False
        # Patients this pass accepted: the new data keys of any other patient are written only
        # at the end of the batch (:meth:`_awaits_its_patient`)
        self.patients_read: set[str] = set()
        # for each Patient this pass accepted, the keys its ``link`` names (resource keys, and
        # identifier criteria exact and loose) and its own identifier criteria: a Patient
        # refused later in the batch takes the ones linked to it or sharing one of its
        # identifiers with it (:meth:`_refuse_the_same_person`)
        self.patient_ties: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
        # what the ``link`` of a Patient refused as an erased person names (resource keys, and
        # identifier criteria exact and loose): a link says both records are one person either
        # way round (``same_person``), so a Patient of the batch it names is refused too
        self.refused_links: set[str] = set()
        self.buffers = _Buffers()
        self.report = IngestReport(batch_id=batch_id, workers=workers)
        self.now = utcnow()
        self.file_ids: dict[int, str] = {}
        self.records_per_file: Counter[int] = Counter()
        self.file_sizes: dict[int, int] = {}
        self.seq_base = 0
        self._memo: dict[str, tuple[str, str, str] | bool | None] = {}
        self._memo_bundle: object = None

    # -- set-up ---------------------------------------------------------------------------
    def start(self) -> None:
        """Remove what the batch wrote before, in one transaction with the handing over of the
        rows other batches still hold (``_HANDOVER``): a pass that dies part-way leaves either
        the old state or the new one, never a resource that left the vault meanwhile."""
        self.con.execute("BEGIN TRANSACTION")
        try:
            self._start()
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

    def withdraw(self) -> None:
        """Take out what this pass wrote, for a pass that stops with nothing of the batch
        accounted for (a file it may not read). Every flush commits, so the records read before
        were in the vault: kept, they would stay there under a batch never marked ingested, and
        so never de-identified, while a later batch holding the same records (its folder
        renamed, dropped again) recorded them as repeats of those rows and released none of
        them. The same removal as a re-run's start; the batch stays unfinished."""
        self.start()

    def _start(self) -> None:
        # what the batch held before this pass replaces it: counted against the new pass at
        # the end (:meth:`count_no_longer_in_batch`)
        self.con.execute(
            "CREATE OR REPLACE TEMP TABLE _previous_keys AS SELECT DISTINCT resource_key "
            "FROM record_ledger WHERE batch_id = ? AND resource_key IS NOT NULL",
            [self.batch_id],
        )
        self._withdraw_unfinished_batches()
        batch = {"b": self.batch_id}
        self.con.execute(_HANDOVER, batch)
        # the receiving batches' reports as they were, restored when every row comes back
        self.con.execute(
            "CREATE OR REPLACE TEMP TABLE _handover_reports AS SELECT batch_id, report "
            "FROM batches WHERE batch_id IN (SELECT batch_id FROM _handover)"
        )
        self._remove_rows_of(self.batch_id)
        rows = self.con.execute(
            "SELECT seq FROM batches WHERE batch_id = ?", [self.batch_id]
        ).fetchall()
        if not rows:
            seq_row = self.con.execute("SELECT coalesce(max(seq), 0) + 1 FROM batches").fetchall()
            seq = int(seq_row[0][0])
            self.con.execute(
                "INSERT INTO batches (batch_id, seq) VALUES (?, ?)", [self.batch_id, seq]
            )
        else:
            seq = int(rows[0][0])
            # not ingested until this pass completes: a pass that dies part-way leaves the batch
            # marked unfinished, for the landing sensor, ``ehr run`` and the views to see
            self.con.execute(
                "UPDATE batches SET ingested_at = NULL, report = NULL, source_fingerprint = NULL "
                "WHERE batch_id = ?",
                [self.batch_id],
            )
        self.seq_base = seq * 10**12

    def _remove_rows_of(self, batch_id: str) -> None:
        """Hand over the rows of ``batch_id`` that other batches hold again (``_HANDOVER``,
        made for it just before), then delete what it wrote."""
        for sql in _HAND_OVER_ROWS:
            self.con.execute(sql, {"b": batch_id})
        self._recount_receivers("SELECT DISTINCT batch_id FROM _handover")
        for table in warehouse.BATCH_TABLES:
            self.con.execute(f"DELETE FROM {table} WHERE batch_id = ?", [batch_id])

    def _withdraw_unfinished_batches(self) -> None:
        """Take out what the passes of other batches left unfinished wrote: a pass killed
        (SIGKILL, a power cut) keeps the rows it flushed under a batch never marked ingested,
        and so never released. Its folder renamed before its retry, the same records arrived
        under another batch, which recorded them as repeats of those rows (``unchanged``) and
        released none of them. No pass of theirs is running: a pass holds the warehouse open
        for writing from its start to its end. A retry of theirs reads them again."""
        unfinished = self.con.execute(
            "SELECT batch_id FROM batches WHERE ingested_at IS NULL AND batch_id <> ? ORDER BY seq",
            [self.batch_id],
        ).fetchall()
        for (batch_id,) in unfinished:
            self.con.execute(_HANDOVER, {"b": batch_id})
            self._remove_rows_of(batch_id)

    def register_files(self, files: list[SourceFile], skipped: list[SkippedFile]) -> None:
        self.report.files = len(files)
        self.report.skipped_files = len(skipped)
        self.report.skipped_reasons = dict(Counter(s.reason for s in skipped))
        for source in files:
            # the name within the batch: two sub-folders' files of one name stay apart
            self.file_ids[source.index] = self.pseudo.token("file", source.name)
            self.file_sizes[source.index] = _size(source.path)
            self.report.bytes_read += self.file_sizes[source.index]

    # -- per record ------------------------------------------------------------------------
    def _quarantine(
        self,
        record: RawRecord,
        code: str,
        message: str,
        resource_type: str | None,
        owner: str | None,
    ) -> None:
        file_id = self.file_ids[record.file_index]
        aad = _sealed_context(b"ehr-quarantine/1|", self.batch_id, file_id, str(record.position))
        key = self.keys.for_owner(owner or SHARED_OWNER)
        self.buffers.add(
            "quarantine",
            batch_id=self.batch_id,
            file_index=record.file_index,
            file_id=file_id,
            position=record.position,
            reason_code=code,
            message=message,
            resource_type=resource_type,
            patient_key=owner,
            sealed=seal(key, record.raw or b"", aad),
            aad=aad,
            quarantined_at=self.now,
        )
        self._ledger(record, "quarantined", code, resource_type, None)

    def _quarantine_erased(self, record: RawRecord, resource_type: str | None) -> None:
        """A record of an erased patient: counted, never stored. Sealing it under a key
        destroyed at once would leave the same nothing, plus ciphertext bytes in the file."""
        self.buffers.add(
            "quarantine",
            batch_id=self.batch_id,
            file_index=record.file_index,
            file_id=self.file_ids[record.file_index],
            position=record.position,
            reason_code=ERASED_SUBJECT,
            message=f"{resource_type or 'record'}: belongs to an erased patient; not stored",
            resource_type=resource_type,
            patient_key=None,
            sealed=b"",
            aad=b"",
            quarantined_at=self.now,
        )
        self._ledger(record, "quarantined", ERASED_SUBJECT, resource_type, None)

    def _ledger(
        self,
        record: RawRecord,
        status: str,
        outcome: str,
        resource_type: str | None,
        resource_key: str | None,
        content_mac: str | None = None,
    ) -> None:
        self.buffers.add(
            "record_ledger",
            batch_id=self.batch_id,
            file_index=record.file_index,
            position=record.position,
            status=status,
            outcome=outcome,
            resource_type=resource_type,
            resource_key=resource_key,
            content_mac=content_mac,
        )

    def _target(self, record: RawRecord, value: str) -> tuple[str, str, str] | bool | None:
        """(kind, target_type, target_key); None when not a resolvable kind; False when a
        urn:uuid names no entry of its Bundle (a dangling reference). Memoised per Bundle:
        every resource of a patient names the same patient, encounter and practitioners."""
        if record.bundle is not self._memo_bundle or len(self._memo) > 50_000:
            self._memo_bundle = record.bundle
            self._memo.clear()
        found = self._memo.get(value)
        if found is None:
            found = self._memo[value] = self._resolve(record, value)
        return found

    def _resolve(self, record: RawRecord, value: str) -> tuple[str, str, str] | bool | None:
        kind = classify(value)
        if kind == "urn":
            if record.bundle is None:
                return None  # outside a Bundle a urn names nothing we can look up
            target = record.bundle.urn_map.get(value)
            if target is None:
                return False
            return kind, target[0], self.pseudo.resource_key(*target)
        if kind in ("relative", "absolute"):
            return self._resolve_literal(record, kind, value)
        if kind == "conditional":
            cond = conditional_target(value)
            if cond is None:
                return None
            return kind, cond[0], self.pseudo.token(CRITERIA_DOMAIN, f"{cond[0]}?{cond[1]}")
        return None

    def _resolve_literal(
        self, record: RawRecord, kind: str, value: str
    ) -> tuple[str, str, str] | None:
        """A relative reference, or an absolute one naming an entry of its Bundle or a resource
        under this server's base. Any other absolute URL is another server's resource: kept,
        never resolved, flagged as ``external`` (a target key no local resource can have)."""
        in_bundle = record.bundle.urn_map.get(value) if record.bundle is not None else None
        if in_bundle is not None:
            return kind, in_bundle[0], self.pseudo.resource_key(*in_bundle)
        local = local_target(value, self.server_base)
        if local is not None:
            return kind, local[0], self.pseudo.resource_key(*local)
        literal = literal_target(value)
        if literal is None:
            return None
        return "external", literal[0], self.pseudo.token("external", value)

    def _owner(self, record: RawRecord, checked: Checked) -> tuple[str | None, bool]:
        """The patient pseudonym owning this resource, and whether its patient ref dangles."""
        if checked.resource_type == "Patient" and checked.resource_id:
            return self.pseudo.resource_key("Patient", checked.resource_id), False
        for value in checked.patient_refs:
            target = self._target(record, value)
            if target is False:
                return None, True
            if (
                isinstance(target, tuple)
                and target[1] == "Patient"
                and target[0] not in ("conditional", "external")
            ):
                return target[2], False
        return None, False

    def _names_erased_patient(self, checked: Checked) -> bool:
        """A Patient sent again under another id but with an identifier of an erased one,
        exactly or written differently (its loose form, same system); or any record that
        contains such a Patient (an Observation whose subject is ``#p``, a Patient inside it)."""
        if not self.erased:
            return False  # nothing erased: no keyed identifier to compute
        identifiers = checked.contained_patient_identifiers
        if checked.resource_type == "Patient":
            identifiers = (*checked.identifiers, *identifiers)
        return any(
            key in self.erased for key in identifier_keys(self.pseudo, "Patient", identifiers)
        )

    def _unreadable_names_erased(self, record: RawRecord) -> bool:
        """A record refused before it could be read as FHIR (two documents in one file, a
        Bundle whose ``entry`` is one object, text in Latin-1) holding a Patient of an erased
        person, by her id or an identifier (exactly or written differently), read as the
        release's canaries read such a record (:func:`vault.read.text_resources`). It is not
        stored: sealed under the shared key, which no erasure destroys, a re-sent export put
        her name and identifiers back into the warehouse."""
        if not self.erased or not record.raw:
            return False
        for resource in text_resources(quarantined_text(record.raw)):
            if folded_type(resource.get("resourceType")) != "patient":
                continue
            rid = resource.get("id")
            if isinstance(rid, str) and self.pseudo.resource_key("Patient", rid) in self.erased:
                return True
            criteria = identifier_criteria(resource)
            if any(k in self.erased for k in identifier_keys(self.pseudo, "Patient", criteria)):
                return True
        return False

    def _links_erased_patient(self, record: RawRecord, checked: Checked) -> bool:
        """A Patient whose ``link`` names an erased patient (by id, or by one of their
        identifiers, as a conditional reference or a logical one, exactly or written
        differently): every link type says both records are one person, so this is the erased
        person under a new record, as an erasure's own rule reads it (``same_person``)."""
        if not self.erased or checked.resource_type != "Patient":
            return False
        for path, value in checked.references:
            if path != "link.other":
                continue
            target = self._target(record, value)
            if isinstance(target, tuple) and target[1] == "Patient" and target[2] in self.erased:
                return True
            if self._loosely_names_erased(value):
                return True
        return False

    def _points_at_erased(self, record: RawRecord, checked: Checked) -> bool:
        """A record of no patient that points at an erased resource (an Observation with no
        subject filed under her Encounter, a Provenance of her Observation): it is about the
        erased person, as an erasure reads it (``vault.lifecycle.shared_records_about``), so
        storing it under the shared key, which no erasure destroys, would bring her back."""
        if not self.erased:
            return False
        for _path, value in checked.references:
            target = self._target(record, value)
            if (
                isinstance(target, tuple)
                and target[0] in ("urn", "relative", "absolute")
                and target[2] in self.erased
            ):
                return True
        return False

    def _ties(self, record: RawRecord, checked: Checked) -> tuple[frozenset[str], frozenset[str]]:
        """What makes an accepted Patient one person with another (the rule of
        ``vault.lifecycle.same_person``): the keys its links name, and its identifier criteria."""
        linked: set[str] = set()
        for path, value in checked.references:
            if path != "link.other":
                continue
            target = self._target(record, value)
            if isinstance(target, tuple):
                linked.add(target[2])
            cond = conditional_target(value) if classify(value) == "conditional" else None
            if cond is not None and cond[0] == "Patient":
                loose = loose_identifier_key(self.pseudo, "Patient", cond[1])
                if loose is not None:
                    linked.add(loose)
        own = identifier_keys(self.pseudo, "Patient", checked.identifiers)
        return frozenset(linked), frozenset(own)

    def _refuse_the_same_person(self) -> None:
        """The Patients this batch accepted before it refused one as an erased person, that
        are the same person as a refused one: linked to it (by id or by one of its
        identifiers), named by its link, or sharing an identifier with it, directly or through
        each other. They are refused with their compartments, as the refused one is, before
        any key of theirs is written (:meth:`finalize`). Before, a Patient linked to the
        refused one and read first was stored and released: the erased person back under a
        new pseudonym."""
        changed = bool(self.erased_in_batch)
        while changed:
            changed = False
            for key, (linked, own) in self.patient_ties.items():
                if key in self.erased_in_batch:
                    continue
                if (
                    key in self.refused_links
                    or linked & (self.erased_in_batch | self.erased_criteria_in_batch)
                    or own & (self.erased_criteria_in_batch | self.refused_links)
                ):
                    self.erased_in_batch.add(key)
                    self.erased.add(key)
                    self.erased_criteria_in_batch.update(own)
                    self.erased.update(own)
                    self.refused_links.update(linked)
                    changed = True

    def _loosely_names_erased(self, value: str) -> bool:
        """A conditional reference (``Patient?identifier=``) whose identifier is an erased
        patient's written differently (its loose form, same system)."""
        cond = conditional_target(value) if classify(value) == "conditional" else None
        if cond is None or cond[0] != "Patient":
            return False
        loose = loose_identifier_key(self.pseudo, "Patient", cond[1])
        return loose is not None and loose in self.erased

    def _conditionally_names_erased(self, checked: Checked) -> bool:
        """A conditional patient reference (``Patient?identifier=``) whose identifier is an
        erased patient's written differently: the exact criteria are compared by the caller;
        the reference itself still resolves through the exact token only."""
        if not self.erased:
            return False
        return any(self._loosely_names_erased(value) for value in checked.patient_refs)

    def _conditional_owner(self, record: RawRecord, checked: Checked) -> str | None:
        """The keyed criteria of a conditional patient reference (``Patient?identifier=``) of
        a resource with no literal one: resolved at the end of the batch, once every Patient
        of the batch is in the identifier index."""
        for value in checked.patient_refs:
            target = self._target(record, value)
            if isinstance(target, tuple) and target[0] == "conditional" and target[1] == "Patient":
                return target[2]
        return None

    def accept(self, record: RawRecord, checked: Checked) -> None:
        assert checked.resource_type and checked.resource_id  # valid records have both
        rtype = checked.resource_type
        owner, owner_dangles = self._owner(record, checked)
        criteria = None if owner else self._conditional_owner(record, checked)
        resource_key = self.pseudo.resource_key(rtype, checked.resource_id)
        if (
            owner in self.erased
            or resource_key in self.erased
            or criteria in self.erased
            or self._names_erased_patient(checked)
            or self._links_erased_patient(record, checked)
            or (owner is None and self._conditionally_names_erased(checked))
            or (owner is None and criteria is None and self._points_at_erased(record, checked))
            or (rtype == "Patient" and self._linked_from_refused(resource_key, checked))
        ):
            if rtype == "Patient":  # under a new id: its compartment is refused too
                self._refuse_patient(record, resource_key, checked)
            self.refused_as_erased.add(resource_key)
            self._quarantine_erased(record, rtype)
            return
        if rtype == "Patient":
            self.patients_read.add(resource_key)
            self.patient_ties[resource_key] = self._ties(record, checked)
        if owner_dangles:
            self._quarantine(
                record,
                "dangling_reference",
                f"{rtype}: patient reference names no entry",
                rtype,
                None,
            )
            return
        content_mac = self.pseudo.token("content", checked.content_digest.hex(), memoise=False)
        refs: list[tuple[str, str, str, str, str]] = []
        for path, value in checked.references:
            target = self._target(record, value)
            if target is False:
                self._quarantine(
                    record,
                    "dangling_reference",
                    f"{rtype}.{path}: urn:uuid reference names no Bundle entry",
                    rtype,
                    owner,
                )
                return
            if isinstance(target, tuple):
                # the reference text, keyed: de-identification maps it to its target later,
                # when the Bundle that gave a urn:uuid its meaning is long gone
                refs.append((path, self.pseudo.token("reference", value), *target))
        self._index(checked, resource_key, content_mac, refs)
        if criteria is not None:
            self.buffers.add(
                "pending_patient_refs",
                batch_id=self.batch_id,
                file_index=record.file_index,
                position=record.position,
                resource_key=resource_key,
                criteria_key=criteria,
            )
        aad = _sealed_context(b"ehr-vault/1|", resource_key)
        key = self.keys.for_owner(owner or SHARED_OWNER)
        # written straight into the vault; finalize() removes what turns out to be a repeat
        self.buffers.add(
            "phi_vault",
            resource_key=resource_key,
            resource_type=rtype,
            patient_key=owner,
            version_id=stored_version_id(self.pseudo, checked.version_id),
            last_updated=checked.last_updated,
            content_mac=content_mac,
            batch_id=self.batch_id,
            file_index=record.file_index,
            position=record.position,
            ingest_seq=self.seq_base + self.report.records_in,
            sealed=seal(key, checked.assigned_raw or record.raw or b"", aad),
            aad=aad,
        )
        self._ledger(record, "staged", "staged", rtype, resource_key, content_mac)

    def _linked_from_refused(self, resource_key: str, checked: Checked) -> bool:
        """A Patient that the ``link`` of a Patient refused earlier in the batch names, by id
        or by one of its identifiers: the same person as the refused one."""
        if not self.refused_links:
            return False
        if resource_key in self.refused_links:
            return True
        own = identifier_keys(self.pseudo, "Patient", checked.identifiers)
        return any(key in self.refused_links for key in own)

    def _refuse_patient(self, record: RawRecord, resource_key: str, checked: Checked) -> None:
        """A Patient refused as an erased person: its compartment is refused with it, and so
        are the records naming it by one of its identifiers alone (a logical or conditional
        reference): after it in the batch as they come, before it when the batch settles them
        (:meth:`_settle_conditional_owners`), in later batches by the tombstone
        (:meth:`_refuse_erased_compartments`). An erasure of a Patient the vault never held (a
        pass killed before reading it) tombstones its id alone, knowing none of its
        identifiers: before this, such records stayed under the shared key, readable."""
        self.erased_in_batch.add(resource_key)
        self.erased.add(resource_key)
        self.refused_links.update(self._ties(record, checked)[0])
        criteria = identifier_keys(self.pseudo, "Patient", checked.identifiers)
        self.erased_criteria_in_batch.update(criteria)
        self.erased.update(criteria)

    def _index(
        self,
        checked: Checked,
        resource_key: str,
        content_mac: str,
        refs: list[tuple[str, str, str, str, str]],
    ) -> None:
        """The accepted resource's rows in the reference graph and the identifier index. A
        reference to an erased patient or resource (a tombstone) is not indexed."""
        for path, ref_mac, kind, target_type, target_key in refs:
            if target_key in self.erased:
                continue
            self.buffers.add(
                "resource_references",
                batch_id=self.batch_id,
                resource_key=resource_key,
                content_mac=content_mac,
                path=path,
                ref_mac=ref_mac,
                kind=kind,
                target_type=target_type,
                target_key=target_key,
            )
        rtype = checked.resource_type or ""
        for criteria_key in identifier_keys(self.pseudo, rtype, checked.identifiers):
            self.buffers.add(
                "identifier_index",
                batch_id=self.batch_id,
                criteria_key=criteria_key,
                resource_key=resource_key,
                resource_type=rtype,
            )
        if checked.holds_person:  # read for the release's canaries without reading every record
            self.buffers.add(
                "identifier_index",
                batch_id=self.batch_id,
                criteria_key=warehouse.HELD_PERSON,
                resource_key=resource_key,
                resource_type=warehouse.HELD_PERSON,
            )

    def consume(self, stream: Iterable[tuple[RawRecord, Checked | None]]) -> None:
        for record, checked in stream:
            self.report.records_in += 1
            self.records_per_file[record.file_index] += 1
            mark = self.buffers.mark()
            try:
                self._one(record, checked)
            except MemoryError:  # says nothing of the record: the pass fails, to run again
                raise
            except Exception as exc:  # one record must never stop the batch
                # drop the rows this record had staged, then account for it in the quarantine;
                # the exception's type only, as its text may quote the record
                self.buffers.rollback(mark)
                rtype = checked.resource_type if checked is not None else None
                message = f"ingest raised {type(exc).__name__}"
                self._quarantine(record, "internal_error", message, rtype, None)
            if self.buffers.rows() >= FLUSH_ROWS:
                self.flush()

    def _one(self, record: RawRecord, checked: Checked | None) -> None:
        if checked is None:
            if self._unreadable_names_erased(record):
                self._quarantine_erased(record, None)
                return
            code, message = record.error or ("unreadable", "record could not be read")
            self._quarantine(record, code, message, None, None)
        elif checked.code is not None:
            owner, _ = self._owner(record, checked) if checked.resource_type else (None, False)
            criteria, loosely = None, False
            if checked.resource_type and owner is None:
                criteria = self._conditional_owner(record, checked)
                loosely = self._conditionally_names_erased(checked)
            if (
                owner in self.erased
                or criteria in self.erased
                or loosely
                or self._names_erased_patient(checked)
            ):
                self._quarantine_erased(record, checked.resource_type)
                return
            self._quarantine(record, checked.code, checked.message, checked.resource_type, owner)
        else:
            self.accept(record, checked)

    def flush(self) -> None:
        # keys before the ciphertexts that need them, but those awaiting their Patient
        self.keys.flush(hold=self._awaits_its_patient)
        self.buffers.flush(self.con)

    def _awaits_its_patient(self, owner: str) -> bool:
        """A patient whose Patient this pass has not read (yet): records of their compartment
        come first in a Bulk Data export (``Condition.ndjson`` before ``Patient.ndjson``), and
        the Patient may turn out to be an erased person under a new id. Their new data key stays
        in memory until the Patient is accepted, or the end of the batch, which writes it
        unless the Patient was refused (:meth:`finalize`): a key written meanwhile would reach
        the file at DuckDB's next checkpoint and stay in a freed page after the refusal,
        unwrapped by the keyring, beside the ciphertexts it opens."""
        return owner != SHARED_OWNER and owner not in self.patients_read

    # -- batch-level resolution -------------------------------------------------------------
    def count_no_longer_in_batch(self) -> None:
        """How many resources the batch's previous ingest held that this pass does not. Those
        it refused as an erased person's are still in its files: a pass killed before it read
        their Patient left them staged, keyed, and this pass's ledger rows hold no key."""
        ((count,),) = self.con.execute(
            "SELECT count(*) FROM _previous_keys p WHERE NOT EXISTS (SELECT 1 FROM record_ledger "
            "l WHERE l.batch_id = ? AND l.resource_key = p.resource_key) "
            "AND p.resource_key NOT IN (SELECT unnest(?::VARCHAR[]))",
            [self.batch_id, sorted(self.refused_as_erased)],
        ).fetchall()
        self.report.no_longer_in_batch = int(count)
        self.con.execute("DROP TABLE IF EXISTS _previous_keys")

    def finalize(self, files: list[SourceFile]) -> None:
        """Settle the staged batch in SQL: rank repeats, quarantine conflicts, keep only new
        versions in the vault, account for every record in the ledger, resolve references,
        and copy the batch's Patients (and relatives) beside the others (vault.clustered).
        The data keys made for the Patients refused as an erased person are dropped unwritten,
        and every other key held back (:meth:`_awaits_its_patient`) is written."""
        self._refuse_the_same_person()
        self.keys.discard(self.erased_in_batch)
        self.keys.flush()
        self.flush()
        self._record_source_files(files)
        self.flush()
        self._settle_conditional_owners()
        self._refuse_erased_compartments()
        self._refuse_records_about_refused()
        batch = {"b": self.batch_id}
        self.con.execute(_RANK_STAGED_ROWS, self._ranking())
        ((handed,),) = self.con.execute("SELECT count(*) FROM _handover").fetchall()
        if handed:
            # the rows given back and this batch's ledger settle together: a pass dying
            # between the two would leave the content in neither batch
            self.con.execute("BEGIN TRANSACTION")
            try:
                self._give_back()
                self._settle_fate()
            except BaseException:
                self.con.execute("ROLLBACK")
                raise
            self.con.execute("COMMIT")
        else:
            self._settle_fate()
        self.con.execute(_RESOLVE_REFERENCES, batch)
        sync_clustered(self.con)
        self._summarise()

    def _ranking(self) -> dict[str, object]:
        """The parameters of ``_RANK_STAGED_ROWS``: the batch, and whether its files are those
        of another batch (the same folder fingerprint), whose records set nothing back."""
        ((redelivered,),) = self.con.execute(
            "SELECT count(*) > 0 FROM batches WHERE batch_id <> ? AND source_fingerprint = ?",
            [self.batch_id, self.fingerprint],
        ).fetchall()
        return {"b": self.batch_id, "redelivered": bool(redelivered)}

    def _settle_fate(self) -> None:
        batch = {"b": self.batch_id}
        self.con.execute(_QUARANTINE_CONFLICTS, {**batch, "now": self.now})
        self.con.execute(_DROP_REPEATS, batch)
        self.con.execute(_SETTLE_LEDGER, batch)

    def _give_back(self) -> None:
        """Rows handed over at :meth:`start` whose content this pass holds again go back to
        this batch: the receiving batch's record is a repeat again, its report as before."""
        batch = {"b": self.batch_id}
        self.con.execute(_RETURNED, batch)
        ((returned,),) = self.con.execute("SELECT count(*) FROM _returned").fetchall()
        if not returned:
            return
        for sql in _GIVE_BACK:
            self.con.execute(sql)
        self.con.execute(_RANK_STAGED_ROWS, self._ranking())  # `new` or `updated`, as before
        # a batch that got every handed row back gets its report back as it was (the
        # de-identification ledger keys on it: nothing of that batch changed)
        self.con.execute(
            "UPDATE batches b SET report = r.report FROM _handover_reports r "
            "WHERE b.batch_id = r.batch_id AND NOT EXISTS (SELECT 1 FROM _handover h "
            "WHERE h.batch_id = r.batch_id AND h.old_seq NOT IN "
            "(SELECT old_seq FROM _returned))"
        )
        self._recount_receivers(
            "SELECT DISTINCT h.batch_id FROM _handover h WHERE h.old_seq NOT IN "
            "(SELECT old_seq FROM _returned)"
        )

    def _recount_receivers(self, batches_sql: str) -> None:
        """The outcome counts in the reports of batches that received (or kept) handed rows:
        their ledger changed, so does their report, and with it the state the
        de-identification ledger recorded (``BATCH_DIGEST_SQL``): they are de-identified again."""
        rows = self.con.execute(
            f"SELECT batch_id, report FROM batches WHERE report IS NOT NULL "
            f"AND batch_id IN ({batches_sql})"
        ).fetchall()
        for batch_id, text in rows:
            report = orjson.loads(text)
            counts = self.con.execute(
                "SELECT outcome, count(*) FROM record_ledger WHERE batch_id = ? "
                "AND status = 'accepted' GROUP BY 1 ORDER BY 1",
                [batch_id],
            ).fetchall()
            report["outcomes"] = {str(outcome): int(count) for outcome, count in counts}
            self.con.execute(
                "UPDATE batches SET report = ? WHERE batch_id = ?",
                [orjson.dumps(report).decode(), batch_id],
            )

    def _settle_conditional_owners(self) -> None:
        """Records whose patient reference was conditional get their patient now that every
        Patient of the batch is indexed: re-sealed under the patient's data key (so erasing
        the patient destroys them, and de-identification shifts their dates with the
        patient's); those of an erased patient leave the vault for the quarantine, unstored.
        A criteria matching no Patient, or several, leaves the record under ``_shared``."""
        # a cursor of its own: the loop writes through the main connection meanwhile
        cur = self.con.cursor()
        cur.execute(_PENDING_OWNERS, {"b": self.batch_id})
        erased: list[tuple[int, int]] = []
        while rows := cur.fetchmany(1_000):
            resealed: list[tuple[int, int, str, bytes]] = []
            for file_index, position, resource_key, sealed, aad, patient, criteria in rows:
                if patient in self.erased or criteria in self.erased:
                    erased.append((file_index, position))
                    continue
                if patient is None:
                    continue
                plain = self.keys.open(bytes(sealed), bytes(aad))
                blob = seal(self.keys.for_owner(patient), plain, bytes(aad))
                resealed.append((file_index, position, patient, blob))
            self.keys.flush()  # the patients' new keys before the ciphertexts that need them
            if resealed:
                self._apply_owners(resealed)
        cur.close()
        if erased:
            # sealed under the shared key, which no erasure destroys, and committed by a flush
            # (or by a killed pass of this batch, whose rows start() deleted): a checkpoint may
            # have put their ciphertexts in the file, where a freed page keeps them readable.
            # Owed before they leave, so a pass killed in between still has the file rewritten.
            warehouse.owe_rewrite(self.con, "an ingest refused an erased person's records")
            self.needs_rewrite = True
            self._unstore_erased(erased)
        self.con.execute("DELETE FROM pending_patient_refs WHERE batch_id = ?", [self.batch_id])

    def _refuse_erased_compartments(self) -> None:
        """The compartments of the Patients this batch refused as an erased person: their
        records staged before the Patient was read leave the vault unstored (sealed under a
        data key never written: :meth:`finalize`; one written all the same is destroyed here),
        and the Patients are tombstoned (later batches refuse their records too). Records
        after it in the batch were refused as they came."""
        if not self.erased_in_batch:
            return
        patients = sorted(self.erased_in_batch)
        rows = self.con.execute(
            "SELECT file_index, position FROM phi_vault WHERE batch_id = ? "
            "AND patient_key IN (SELECT unnest(?::VARCHAR[]))",
            [self.batch_id, patients],
        ).fetchall()
        if rows:
            self._unstore_erased([(int(f), int(p)) for f, p in rows])
        self.con.execute(_REFUSE_ERASED_QUARANTINE, [ERASED_SUBJECT, self.batch_id, patients])
        self.con.execute("BEGIN TRANSACTION")
        try:
            ((destroyed,),) = self.con.execute(
                "UPDATE data_keys SET wrapped = NULL, destroyed_at = ? WHERE destroyed_at IS NULL "
                "AND owner IN (SELECT unnest(?::VARCHAR[]))",
                [self.now, patients],
            ).fetchall()
            tombstone(self.con, patients, self.now, kind="patient")
            # their identifiers are hers: a later record naming her by one alone is refused
            tombstone(self.con, sorted(self.erased_criteria_in_batch), self.now, kind="criteria")
            # what earlier batches stored for the same ids is hers too: erased with them
            earlier = erase_earlier_compartments(self.con, patients, self.batch_id, self.now)
            if destroyed or earlier:
                # durable with the destruction: a process killed before the rewrite at the
                # end of the batch leaves it to the next writer (warehouse.rewrite_if_owed)
                warehouse.owe_rewrite(self.con, "an ingest refused an erased person")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")
        self.report.erased_from_earlier_batches = earlier
        # a key written before this batch reached the file: its freed page keeps it
        self.needs_rewrite = self.needs_rewrite or bool(destroyed or earlier)

    def _refuse_records_about_refused(self) -> None:
        """The records of no patient this batch staged that point at a record it refused as an
        erased person's (an Observation with no subject filed under the Encounter of a Patient
        refused as her, a Provenance of a record refused so), and those pointing at them in
        turn, whichever came first: they are hers as :meth:`_points_at_erased` reads a record
        pointing at a tombstone. Stored, they sat under the shared key pointing at a record
        the vault never held, where no later erasure could find them."""
        while self.refused_as_erased:
            rows = self.con.execute(
                _STAGED_ABOUT_REFUSED, [self.batch_id, sorted(self.refused_as_erased)]
            ).fetchall()
            if not rows:
                return
            self._unstore_erased([(int(f), int(p)) for f, p in rows])

    def _apply_owners(self, rows: list[tuple[int, int, str, bytes]]) -> None:
        columns = list(zip(*rows, strict=True))
        table = pa.table(
            {
                "file_index": pa.array(columns[0], pa.int64()),
                "position": pa.array(columns[1], pa.int64()),
                "patient_key": pa.array(columns[2], pa.string()),
                "sealed": pa.array(columns[3], pa.binary()),
            }
        )
        self.con.register("_owners", table)
        try:
            self.con.execute(_APPLY_OWNERS, {"b": self.batch_id})
        finally:
            self.con.unregister("_owners")

    def _unstore_erased(self, rows: list[tuple[int, int]]) -> None:
        """Move staged records of an erased patient to the quarantine, without their bytes."""
        columns = list(zip(*rows, strict=True))
        table = pa.table(
            {
                "file_index": pa.array(columns[0], pa.int64()),
                "position": pa.array(columns[1], pa.int64()),
            }
        )
        params = {"b": self.batch_id, "now": self.now, "code": ERASED_SUBJECT}
        self.con.register("_erased", table)
        try:
            self.refused_as_erased.update(
                str(key)
                for (key,) in self.con.execute(
                    "SELECT v.resource_key FROM phi_vault v JOIN _erased e ON "
                    "e.file_index = v.file_index AND e.position = v.position WHERE v.batch_id = ?",
                    [self.batch_id],
                ).fetchall()
            )
            for sql in _UNSTORE_ERASED:  # DuckDB refuses a parameter a statement does not use
                self.con.execute(sql, warehouse.used_parameters(params, sql))
        finally:
            self.con.unregister("_erased")

    def _record_source_files(self, files: list[SourceFile]) -> None:
        """One ``source_files`` row per file: its keyed pseudonym and counts. The name itself
        is not kept, not even sealed: exporters put patient names in file names, and a file
        holds many patients, so no patient's erasure could destroy the key it was sealed under."""
        for source in files:
            file_id = self.file_ids[source.index]
            self.buffers.add(
                "source_files",
                batch_id=self.batch_id,
                file_index=source.index,
                file_id=file_id,
                kind=source.kind,
                bytes=self.file_sizes[source.index],
                records=self.records_per_file[source.index],
            )

    def _summarise(self) -> None:
        con, batch, report = self.con, self.batch_id, self.report
        rows = con.execute(
            "SELECT status, outcome, count(*) FROM record_ledger WHERE batch_id = ? GROUP BY ALL",
            [batch],
        ).fetchall()
        for status, outcome, count in rows:
            if status == "accepted":
                report.accepted += count
                report.outcomes[outcome] = report.outcomes.get(outcome, 0) + count
            else:
                report.quarantined += count
                report.quarantine_reasons[outcome] = count
        report.resources_by_type = dict(
            con.execute(
                "SELECT resource_type, count(*) FROM record_ledger WHERE batch_id = ? "
                "AND status = 'accepted' GROUP BY 1 ORDER BY 1",
                [batch],
            ).fetchall()
        )
        report.patients = report.resources_by_type.get("Patient", 0)
        ref_row = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE NOT resolved), "
            "count(*) FILTER (WHERE NOT resolved AND target_type = 'Patient'), "
            "count(*) FILTER (WHERE kind = 'external') "
            "FROM resource_references WHERE batch_id = ?",
            [batch],
        ).fetchall()
        report.references = int(ref_row[0][0])
        report.unresolved_references = int(ref_row[0][1])
        report.unresolved_patient_references = int(ref_row[0][2])
        report.external_references = int(ref_row[0][3])


def ingest_batch(
    warehouse_path: Path,
    batch_id: str,
    source: Path,
    provider: KeyProvider,
    workers: int | None = None,
    server_base: str | None = None,
    fingerprint: str | None = None,
    nested: bool = False,
) -> IngestReport:
    """Ingest the files of ``source`` (a folder or one file) as batch ``batch_id``.

    Re-ingesting a batch replaces what it wrote before, and a resource already in the vault
    with the same content is recorded as unchanged, so running twice changes nothing.
    ``server_base`` (default ``EHR_FHIR_BASE``) is this server's FHIR base URL: absolute
    references under it resolve like relative ones; those to any other server never do.
    ``fingerprint`` (:attr:`vault.landing.BatchSource.fingerprint`, taken before the files are
    read) is recorded with the batch: a folder whose fingerprint differs later has changed.
    ``nested``: the files of ``source``'s sub-folders are the batch's too (a landing batch).
    """
    started = time.perf_counter()
    workers = workers if workers is not None else (os.cpu_count() or 1)
    server_base = server_base if server_base is not None else os.environ.get(FHIR_BASE_ENV)
    files, skipped = list_batch_files(source, nested=nested)
    # another process (an erasure, a CLI command) may have the file open: wait its turn
    con = warehouse.connect_when_free(warehouse_path)
    # No batch-wide transaction: DuckDB holds uncommitted rows in memory, so memory would grow
    # with the batch. Each flush commits; a failed batch is re-run, and start() first removes
    # whatever that batch wrote, so the retry lands on a clean slate.
    try:
        ingestor = BatchIngestor(
            con, provider, batch_id, workers, server_base or None, fingerprint=fingerprint
        )
        ingestor.start()
        ingestor.register_files(files, skipped)
        notes: list[FileNote] = []
        records = (rec for f in files for rec in iter_records(f, notes=notes))
        # closed when the consumer stops (a run terminated, a write that fails): its pool of
        # workers is shut down then, not when the generator is collected, which a kept
        # traceback delays; a run process (a multiprocessing child) joined the idle workers
        # at its exit and waited for them for good
        try:
            with contextlib.closing(_checked_stream(records, workers)) as checked:
                ingestor.consume(checked)
        except FileNotReadableError as exc:
            ingestor.withdraw()
            raise _not_readable(ingestor, exc) from None
        ingestor.report.file_warnings = dict(Counter(note.message for note in notes))
        ingestor.finalize(files)
        ingestor.count_no_longer_in_batch()
        report = ingestor.report
        report.seconds = round(time.perf_counter() - started, 3)
        con.execute(
            "UPDATE batches SET ingested_at = ?, report = ?, source_fingerprint = ? "
            "WHERE batch_id = ?",
            [utcnow(), orjson.dumps(report.to_dict()).decode(), fingerprint, batch_id],
        )
        # this batch's refusals, or an earlier process's erasure or refusal killed before its
        # rewrite (warehouse.owe_rewrite): the destroyed data keys, written by an earlier
        # batch, and the ciphertexts they opened, stay in freed pages until the file is new
        owed = ingestor.needs_rewrite or warehouse.rewrite_owed(con)
    finally:
        con.close()
    if owed:
        warehouse.rewrite(warehouse_path)
    return report


def _not_readable(ingestor: BatchIngestor, exc: FileNotReadableError) -> SourceFileNotReadableError:
    """The batch's error for a file it could not read: the file's pseudonym (``file_id``) and
    number in the batch, never its name or path (names can hold PHI)."""
    cause = (
        "gone since the batch was listed (removed, or its folder renamed, while the batch was "
        "read), so none of its records can be accounted for; nothing of the batch is marked "
        "ingested: drop the batch again once complete (the landing sensor requests it again)"
        if exc.gone
        else "an error of the environment (permissions, storage), not of the file's content, so "
        "none of its records can be accounted for; nothing of the batch is marked ingested: make "
        "the file readable and ingest the batch again (the landing sensor retries it)"
    )
    return SourceFileNotReadableError(
        f"batch {ingestor.batch_id}: data file {ingestor.file_ids[exc.file_index]} (file_id; "
        f"file {exc.file_index + 1} of {ingestor.report.files}) could not be read "
        f"({exc.error_type}, {exc.errno_name}): {cause}"
    )


@dataclass(frozen=True)
class Reconciliation:
    """Every record that came in is accounted for: in = accepted + quarantined + erased, and
    each side matches the table that holds it (``erased``: records an erasure removed since,
    kept in the ledger without their resource, status ``erased``)."""

    batch_id: str
    records_in: int
    ledger_rows: int
    accepted: int
    quarantined: int
    quarantine_rows: int
    vault_rows: int
    accepted_without_new_version: int
    erased: int = 0

    @property
    def passed(self) -> bool:
        return (
            self.records_in == self.ledger_rows == self.accepted + self.quarantined + self.erased
            and self.quarantined == self.quarantine_rows
            and self.accepted == self.vault_rows + self.accepted_without_new_version
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def vault_totals(con: duckdb.DuckDBPyConnection) -> tuple[int, int]:
    """Current resources in the vault and the patients they belong to (``_shared`` excluded
    from neither: it is one owner key)."""
    row = con.execute(
        "SELECT count(*), count(DISTINCT patient_key) FROM phi_vault_current"
    ).fetchall()[0]
    return int(row[0]), int(row[1])


def quarantine_counts(con: duckdb.DuckDBPyConnection) -> dict[str, tuple[int, int]]:
    """Each batch of the record ledger as it stands (a batch run again counts as its last
    pass): the records read and how many of them were quarantined, those whose patient was
    erased since included (an erasure does not hide a batch's rejected records). A batch
    ingested that read no record has no row in the record ledger: it is listed too, with
    (0, 0)."""
    rows = con.execute(
        "SELECT k.batch_id, count(l.status), count(l.status) FILTER (WHERE l.status = "
        "'quarantined' OR l.outcome = ?) FROM (SELECT batch_id FROM batches WHERE ingested_at "
        "IS NOT NULL UNION SELECT batch_id FROM record_ledger) k "
        "LEFT JOIN record_ledger l ON l.batch_id = k.batch_id GROUP BY k.batch_id",
        [warehouse.ERASED_FROM_QUARANTINE],
    ).fetchall()
    return {str(batch): (int(records), int(quarantined)) for batch, records, quarantined in rows}


def reconcile_batch(con: duckdb.DuckDBPyConnection, batch_id: str) -> Reconciliation:
    """Count a batch from three independent places: the files' record counts taken while
    reading, the ledger, and the vault and quarantine tables."""
    row = con.execute(
        """
        SELECT
          (SELECT coalesce(sum(records), 0) FROM source_files WHERE batch_id = $b),
          (SELECT count(*) FROM record_ledger WHERE batch_id = $b),
          (SELECT count(*) FROM record_ledger WHERE batch_id = $b AND status = 'accepted'),
          (SELECT count(*) FROM record_ledger WHERE batch_id = $b AND status = 'quarantined'),
          (SELECT count(*) FROM quarantine WHERE batch_id = $b),
          (SELECT count(*) FROM phi_vault WHERE batch_id = $b),
          (SELECT count(*) FROM record_ledger WHERE batch_id = $b AND status = 'accepted'
             AND outcome IN ('unchanged', 'duplicate_identical')),
          (SELECT count(*) FROM record_ledger WHERE batch_id = $b AND status = 'erased')
        """,
        {"b": batch_id},
    ).fetchall()[0]
    return Reconciliation(batch_id, *(int(v) for v in row))


__all__ = [
    "IngestReport",
    "Reconciliation",
    "check_record",
    "ingest_batch",
    "reconcile_batch",
]
