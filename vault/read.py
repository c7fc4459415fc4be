"""Reading the PHI vault back: the one place where vault rows are decrypted.

Every row is decrypted, authenticated, and checked to be the resource its row claims to be:
the AAD binds a ciphertext to its ``resource_key``, but a ciphertext moved together with its
AAD to another row of the same patient (same data key) still authenticates, so the decrypted
``resourceType``/``id`` are compared with the row too; and the content with the row's content
MAC (keyed by the pseudonym key), which ingest wrote beside it: an older version's ciphertext
put into a newer version's row (or into its clustered copy) names the same resource under the
same key, and only its content tells it apart. Only code holding the keys can read the vault;
views and features never do.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import ijson
import orjson
import pydantic_core

from fhirlake.content import content_digest
from fhirlake.nested import folded_type, held_resources
from fhirlake.readers import BOM, unmarked_wide_form
from vault.catalog import has_table
from vault.clustered import copied_rows, has_copies
from vault.errors import InvalidCiphertext, KeyDestroyedError
from vault.keys import KeyProvider
from vault.pseudonym import Pseudonymizer
from vault.sealing import SHARED_OWNER, DataKeyStore, sealed_key_id
from vault.warehouse import (
    AT_POSITIONS,
    HELD_PERSON,
    NEWEST_VERSION_FIRST,
    at_positions,
    check_pseudonym_key,
    pseudonym_key_mismatch,
    record_pseudonym_key_id,
    require_pseudonym_key,
)

CHUNK_ROWS = 2_000

_ROW_COLUMNS = "resource_key, resource_type, patient_key, batch_id, sealed, aad, content_mac"

# The key and position of each resource's newest version. Only narrow (position) rows are ranked
# and sorted, into a temporary table read a chunk of positions at a time, and the ciphertexts are
# fetched by those chunks, so memory stays bounded under the warehouse cap whatever the vault
# size (the positions of a read, fetched whole, took 98 bytes of Python memory each). A filter
# that holds for every version of a resource alike (its type, its own key) is applied before the
# ranking, so only those resources are ranked; one on the batch that wrote the newest version
# applies after it.
_CURRENT_ROWS = (
    "SELECT resource_key, ingest_seq FROM (SELECT resource_key, ingest_seq, batch_id, "
    f"row_number() OVER (PARTITION BY resource_key ORDER BY {NEWEST_VERSION_FIRST}) AS rn "
    "FROM phi_vault {before}) WHERE rn = 1 {after}"
)
_CURRENT_POSITIONS = f"SELECT ingest_seq FROM ({_CURRENT_ROWS}) ORDER BY ingest_seq"
# every version, current or not: no ranking
_VERSION_POSITIONS = "SELECT ingest_seq FROM phi_vault {before} ORDER BY ingest_seq"
_ROWS_AT_POSITIONS = (
    f"SELECT ingest_seq, {_ROW_COLUMNS} FROM phi_vault WHERE {AT_POSITIONS} ORDER BY ingest_seq"
)
_CURRENT_ROW_BY_KEY = f"SELECT {_ROW_COLUMNS} FROM phi_vault_current WHERE resource_key = ?"
# rows of no patient, sealed under the shared key (a condition without a parameter)
_SHARED_ROW = "patient_key IS NULL"
# resources any version of which held an identifier: the identifier index lists them (one row
# per identifier and batch, vault.ingest), without decrypting anything
_IDENTIFIED = "resource_key IN (SELECT resource_key FROM identifier_index)"
# resources holding a person inside them (a contained Patient), which ingest marks so
_HOLDING_PERSONS = (
    "resource_key IN (SELECT resource_key FROM identifier_index "
    f"WHERE criteria_key = '{HELD_PERSON}')"
)
# resources with a version written after an ingest position
_WRITTEN_AFTER = "resource_key IN (SELECT resource_key FROM phi_vault WHERE ingest_seq > ?)"
# Patients whose compartment a batch wrote to (any version, current or not).
_PATIENTS_OF_BATCH = (
    "resource_key IN (SELECT DISTINCT patient_key FROM phi_vault "
    "WHERE batch_id = ? AND patient_key IS NOT NULL)"
)


@dataclass(frozen=True)
class VaultRecord:
    """One decrypted and verified vault row: the resource and its row's pseudonymous columns."""

    resource_key: str
    resource_type: str
    patient_key: str | None
    batch_id: str
    resource: dict[str, Any]


class VaultReader:
    """Decrypts vault rows with the data keys they name and verifies each one."""

    def __init__(self, con: duckdb.DuckDBPyConnection, provider: KeyProvider) -> None:
        self._pseudo = require_pseudonym_key(con, provider)
        self._keys = DataKeyStore(con, provider)

    def prefetch_keys(self, rows: Sequence[Sequence[Any]]) -> None:
        """Unwrap the data keys a chunk of rows names, in one lookup. A malformed blob is
        skipped here: :meth:`record` refuses it when its row comes."""
        key_ids = []
        for row in rows:
            try:
                key_ids.append(sealed_key_id(bytes(row[4])))
            except InvalidCiphertext:
                continue
        self._keys.prefetch(key_ids)

    def record(self, row: Sequence[Any]) -> VaultRecord:
        """A row of :data:`_ROW_COLUMNS`, decrypted; InvalidCiphertext when it fails to
        authenticate, is sealed under another owner's data key than the row's patient (or
        ``_shared``), holds another resource than the row names, or other content than the
        row's content MAC records (the message names the row's pseudonym only)."""
        resource_key, resource_type, patient_key, batch_id, _, _, content_mac = row
        plaintext, resource = self._opened(row)
        if not self._names_row(resource, resource_key, resource_type):
            raise InvalidCiphertext(f"vault row {resource_key} holds a different resource")
        if not self._holds_content(plaintext, resource, str(content_mac)):
            raise InvalidCiphertext(
                f"vault row {resource_key} holds other content than its row records (another "
                "version's ciphertext, or a copy altered)"
            )
        return VaultRecord(resource_key, resource_type, patient_key, batch_id, resource)

    def _opened(self, row: Sequence[Any]) -> tuple[bytes, Any]:
        """The row's ciphertext decrypted, authenticated and parsed, not yet checked to be the
        resource the row names: its plaintext and the parsed value."""
        resource_key, _, patient_key, _, sealed, aad, _ = row
        try:
            plaintext = self._keys.open_owned(
                bytes(sealed), bytes(aad), patient_key or SHARED_OWNER
            )
        except InvalidCiphertext as exc:
            raise InvalidCiphertext(f"vault row {resource_key}: {exc}") from exc
        except KeyDestroyedError as exc:
            if self._keys.holds(sealed_key_id(bytes(sealed))):  # destroyed: an erasure
                raise KeyDestroyedError(f"vault row {resource_key}: {exc}") from exc
            # a key the warehouse never held: a changed blob, not an erased patient
            raise InvalidCiphertext(f"vault row {resource_key}: {exc}") from exc
        try:
            return plaintext, orjson.loads(plaintext)
        except orjson.JSONDecodeError as exc:
            raise InvalidCiphertext(f"vault row {resource_key} does not hold JSON") from exc

    def _holds_content(self, plaintext: bytes, resource: dict[str, Any], content_mac: str) -> bool:
        """Whether the decrypted record is the content its row's MAC was made of: the parsed
        record's digest (:func:`fhirlake.content.content_digest`), or, in a row written
        before ingest compared content as JSON, the digest of the bytes as received."""
        for digest in (content_digest(resource), hashlib.sha256(plaintext).digest()):
            if self._pseudo.token("content", digest.hex(), memoise=False) == content_mac:
                return True
        return False

    def names_its_row(self, row: Sequence[Any]) -> bool:
        """Whether the row's ciphertext, which authenticates, holds the resource its row
        names under this reader's pseudonym key (InvalidCiphertext when it does not
        authenticate)."""
        return self._names_row(self._opened(row)[1], str(row[0]), str(row[1]))

    def _names_row(self, resource: Any, resource_key: str, resource_type: str) -> bool:
        if not isinstance(resource, dict):
            return False
        rtype, rid = resource.get("resourceType"), resource.get("id")
        if not isinstance(rtype, str) or not isinstance(rid, str) or rtype != resource_type:
            return False
        # not memoised: every key is seen once here, and would evict the ones that repeat
        return self._pseudo.token("resource", f"{rtype}/{rid}", memoise=False) == resource_key


def _where(conditions: list[tuple[str, Any]]) -> str:
    return ("WHERE " + " AND ".join(c for c, _ in conditions)) if conditions else ""


def _current_positions(
    con: duckdb.DuckDBPyConnection,
    before: list[tuple[str, Any]],
    after: list[tuple[str, Any]],
    chunk_rows: int,
) -> Iterator[list[int]]:
    """Positions of the newest versions, ``chunk_rows`` at a time; ``before`` and ``after``
    are (condition, parameter) pairs applied before and after the ranking."""
    sql = _CURRENT_POSITIONS.format(
        before=_where(before), after="".join(f" AND {c}" for c, _ in after)
    )
    params = [p for _, p in before] + [p for _, p in after]
    return _position_chunks(con, sql, params, chunk_rows)


def _staged_chunks(
    con: duckdb.DuckDBPyConnection, select: str, params: list[Any], fetch: str, chunk_rows: int
) -> Iterator[list[tuple[Any, ...]]]:
    """The rows ``fetch`` reads, ``chunk_rows`` at a time, of what ``select`` stages: a key
    ``k`` and its place ``n`` (1, 2, ...) in a temporary table of ``con`` when the read starts
    (what it reads is fixed then), ``fetch`` reading the table as ``{staged}`` with ``n``
    between its two parameters; so that no more than a chunk is ever held."""
    table = f"_read_staged_{uuid.uuid4().hex}"
    con.execute(f"CREATE TEMP TABLE {table} AS {select}", params)
    try:
        start = 0
        while chunk := con.execute(
            fetch.format(staged=table), [start, start + chunk_rows]
        ).fetchall():
            start += chunk_rows
            yield chunk
    finally:
        # a failed transaction of the caller's, or a closed connection, ends the table anyway
        with contextlib.suppress(duckdb.Error):
            con.execute(f"DROP TABLE IF EXISTS {table}")


def _position_chunks(
    con: duckdb.DuckDBPyConnection, sql: str, params: list[Any], chunk_rows: int
) -> Iterator[list[int]]:
    """The positions ``sql`` selects, ascending, ``chunk_rows`` at a time
    (:func:`_staged_chunks`)."""
    select = (
        "SELECT ingest_seq AS k, row_number() OVER (ORDER BY ingest_seq) AS n "
        f"FROM ({sql}) ORDER BY n"
    )
    fetch = "SELECT k FROM {staged} WHERE n > ? AND n <= ? ORDER BY n"
    for chunk in _staged_chunks(con, select, params, fetch, chunk_rows):
        yield [int(seq) for (seq,) in chunk]


def _resource_filters(
    resource_type: str | None, patients_of_batch: str | None, resource_key: str | None
) -> list[tuple[str, Any]]:
    """(condition, parameter) pairs that hold for every version of a resource alike."""
    return [
        (condition, value)
        for value, condition in (
            (resource_type, "resource_type = ?"),
            (patients_of_batch, _PATIENTS_OF_BATCH),
            (resource_key, "resource_key = ?"),
        )
        if value is not None
    ]


def current_rows_sql(batch: str) -> str:
    """SQL of ``(resource_key, ingest_seq)``: the key and position of the newest version of
    each resource whose newest version the batch ``batch`` (trusted SQL: a parameter such as
    ``$batch``) wrote. These are the rows :func:`iter_current_records` and
    :func:`iter_current_chunks` read with that ``batch_id``, by the same rule."""
    return _CURRENT_ROWS.format(before="", after=f" AND batch_id = {batch}")


def _chunks_at(
    con: duckdb.DuckDBPyConnection,
    provider: KeyProvider,
    positions: Iterator[list[int]],
    resource_type: str | None,
) -> Iterator[tuple[list[int], Iterator[VaultRecord]]]:
    """The rows at each chunk of ``positions`` (sorted): the chunk's positions, and its rows
    (fetched whole) decrypted and verified as they are taken."""
    reader = VaultReader(con, provider)
    clustered = has_copies(con, resource_type)
    for window in positions:
        rows = _rows_at(con, window, clustered)
        reader.prefetch_keys(rows)
        yield window, map(reader.record, rows)


def _records_at(
    con: duckdb.DuckDBPyConnection,
    provider: KeyProvider,
    positions: Iterator[list[int]],
    resource_type: str | None,
) -> Iterator[VaultRecord]:
    """The rows at each chunk of ``positions`` (sorted), decrypted and verified, a chunk
    fetched whole at a time."""
    for _, records in _chunks_at(con, provider, positions, resource_type):
        yield from records


def _rows_at(
    con: duckdb.DuckDBPyConnection, window: list[int], clustered: bool
) -> list[tuple[Any, ...]]:
    """The rows (:data:`_ROW_COLUMNS`) at ``window``, sorted positions, in that order. With
    ``clustered``, each from its copy in :mod:`vault.clustered` where one stands for it, the
    others from ``phi_vault``: the same rows either way, fewer blocks read."""
    copied = copied_rows(con, window) if clustered else []
    found = {row[0] for row in copied}
    missing = [seq for seq in window if seq not in found]
    rest = con.execute(_ROWS_AT_POSITIONS, at_positions(missing)).fetchall() if missing else []
    return [tuple(row[1:]) for row in sorted([*copied, *rest], key=lambda row: row[0])]


def iter_current_records(
    con: duckdb.DuckDBPyConnection,
    provider: KeyProvider,
    *,
    batch_id: str | None = None,
    resource_type: str | None = None,
    patients_of_batch: str | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[VaultRecord]:
    """The newest version of every resource, in ingest order, decrypted and verified.

    Filters: ``batch_id`` keeps the resources whose newest version that batch wrote;
    ``resource_type`` one type; ``patients_of_batch`` the Patients whose compartment that batch
    wrote to. Each chunk is fetched whole before its rows are yielded, so the caller may use
    ``con`` for its own statements between rows.
    """
    before = _resource_filters(resource_type, patients_of_batch, None)
    after = [("batch_id = ?", batch_id)] if batch_id is not None else []
    positions = _current_positions(con, before, after, chunk_rows)
    yield from _records_at(con, provider, positions, resource_type)


def iter_current_chunks(
    con: duckdb.DuckDBPyConnection,
    provider: KeyProvider,
    *,
    batch_id: str | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[tuple[list[int], Iterator[VaultRecord]]]:
    """:func:`iter_current_records` (filtered by ``batch_id`` alone) a chunk at a time: each
    chunk's positions (``ingest_seq`` of its rows, ascending) with its records in that order,
    decrypted and verified as they are taken. A caller that keeps something per row, staged
    with the row's position (:func:`current_rows_sql`), finds a chunk's share of it between
    the chunk's first and last positions, without sending its keys."""
    after = [("batch_id = ?", batch_id)] if batch_id is not None else []
    positions = _current_positions(con, [], after, chunk_rows)
    yield from _chunks_at(con, provider, positions, None)


def iter_every_version(
    con: duckdb.DuckDBPyConnection,
    provider: KeyProvider,
    *,
    resource_type: str | None = None,
    patients_of_batch: str | None = None,
    resource_key: str | None = None,
    shared_only: bool = False,
    identified_only: bool = False,
    holding_persons: bool = False,
    written_after: int | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[VaultRecord]:
    """Every version the vault holds of every resource (the current one and those it
    replaced), in ingest order, decrypted and verified: what once named a patient (a name
    before a marriage, a corrected phone) still names them. Filters as
    :func:`iter_current_records`, ``resource_key`` one resource, ``shared_only`` the rows
    of no patient (sealed under the shared key), ``identified_only`` the resources the
    identifier index lists (a version of which held an identifier), ``holding_persons`` those
    it marks as holding a person inside them (``warehouse.HELD_PERSON``), and ``written_after``
    the resources with a version written after that ingest position (every version of
    each, those before it too)."""
    before = _resource_filters(resource_type, patients_of_batch, resource_key)
    if written_after is not None:
        before.append((_WRITTEN_AFTER, written_after))
    params = [p for _, p in before]
    if shared_only:
        before.append((_SHARED_ROW, None))  # no parameter
    if identified_only or holding_persons:
        if not has_table(con, "identifier_index"):
            return
        before.append((_HOLDING_PERSONS if holding_persons else _IDENTIFIED, None))
    sql = _VERSION_POSITIONS.format(before=_where(before))
    positions = _position_chunks(con, sql, params, chunk_rows)
    yield from _records_at(con, provider, positions, resource_type)


def iter_current_resources(
    con: duckdb.DuckDBPyConnection,
    provider: KeyProvider,
    batch_id: str | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[dict[str, Any]]:
    """The newest version of every resource (optionally only those last written by one batch),
    decrypted, in chunks so memory stays bounded."""
    for record in iter_current_records(con, provider, batch_id=batch_id, chunk_rows=chunk_rows):
        yield record.resource


def read_current(
    con: duckdb.DuckDBPyConnection,
    provider: KeyProvider,
    resource_key: str,
    resource_type: str | None = None,
) -> VaultRecord | None:
    """The current version of the resource with this pseudonym (and, when given, this type),
    or None when the vault does not hold it."""
    sql, params = _CURRENT_ROW_BY_KEY, [resource_key]
    if resource_type is not None:
        sql, params = sql + " AND resource_type = ?", [resource_key, resource_type]
    rows = con.execute(sql, params).fetchall()
    if not rows:
        return None
    return VaultReader(con, provider).record(rows[0])


def read_resource(
    con: duckdb.DuckDBPyConnection, provider: KeyProvider, resource_type: str, resource_id: str
) -> dict[str, Any] | None:
    """The current version of one resource, or None when the vault does not hold it."""
    resource_key = bind_pseudonym_key(con, provider, record=False).resource_key(
        resource_type, resource_id
    )
    # no type filter: a row under this key whose type column disagrees is a tampered row, to be
    # reported as such rather than passed over as absent
    record = read_current(con, provider, resource_key)
    return record.resource if record is not None else None


# the first vault row whose data key still exists (an erased patient's key is destroyed)
_FIRST_READABLE_ROW = (
    f"SELECT {_ROW_COLUMNS} FROM phi_vault WHERE patient_key IS NULL OR patient_key NOT IN "
    "(SELECT owner FROM data_keys WHERE destroyed_at IS NOT NULL) ORDER BY ingest_seq LIMIT 1"
)


def bind_pseudonym_key(
    con: duckdb.DuckDBPyConnection, provider: KeyProvider, *, record: bool = True
) -> Pseudonymizer:
    """The pseudonymizer of ``provider``'s pseudonym key, for code that turns an original id
    into a vault key (an ingest, an erasure, a look-up): refused
    (:class:`~vault.errors.PseudonymKeyMismatchError`) unless the key is the warehouse's own.

    The warehouse records its key's id (``warehouse_meta``); one without that record (empty, or
    written before the record existed) is checked against its first vault row, which must hold
    the resource its row names under this key, and with ``record`` (a writable connection) the
    key's id is recorded then. A refused key has read one row and written nothing."""
    checked = check_pseudonym_key(con, provider)
    if checked.recorded:
        return checked.pseudonymizer
    rows = con.execute(_FIRST_READABLE_ROW).fetchall() if has_table(con, "phi_vault") else []
    if rows and not VaultReader(con, provider).names_its_row(rows[0]):
        raise pseudonym_key_mismatch(
            checked.key_id, "the vault's first record does not verify under it"
        )
    if record:
        record_pseudonym_key_id(con, checked.key_id)
    return checked.pseudonymizer


# Records refused by validation (a schema violation), sealed under their patient's key; of
# every type when the resources they hold are read (any may hold a contained Patient)
_QUARANTINED_OWNED = "patient_key IS NOT NULL AND octet_length(sealed) > 0 {only}"


# a quarantined record's place, which names it in an error (:func:`open_quarantined`)
_PLACE = "q.batch_id, q.file_index, q.position"
# the records the quarantine holds of no patient (sealed under the shared key)
_QUARANTINED_UNATTRIBUTED = "patient_key IS NULL AND octet_length(sealed) > 0"


def _quarantine_chunks(
    con: duckdb.DuckDBPyConnection,
    columns: str,
    where: str,
    params: list[Any],
    chunk_rows: int,
) -> Iterator[list[tuple[Any, ...]]]:
    """``columns`` (of ``q``, the quarantine) of the rows ``where`` selects, in their order in
    the batches, ``chunk_rows`` at a time: their row ids staged as the vault's positions are
    (:func:`_staged_chunks`), so that no more than a chunk of sealed records is held (a whole
    export refused, or lines of no JSON, can fill the quarantine)."""
    select = (
        "SELECT rowid AS k, row_number() OVER (ORDER BY batch_id, file_index, position) AS n "
        f"FROM quarantine WHERE {where}"
    )
    fetch = (
        f"SELECT {columns} FROM {{staged}} t JOIN quarantine q ON q.rowid = t.k "
        "WHERE t.n > ? AND t.n <= ? ORDER BY t.n"
    )
    return _staged_chunks(con, select, params, fetch, chunk_rows)


def open_quarantined(
    store: DataKeyStore, sealed: bytes, aad: bytes, owner: str, place: Sequence[Any]
) -> bytes:
    """A quarantined record's sealed blob, opened under ``owner``'s data key; a blob that does
    not open (changed, moved, or under a key missing or destroyed) raises its error naming the
    quarantine row by its ``place`` (batch, file index, position), never its content."""
    try:
        return store.open_owned(sealed, aad, owner)
    except (InvalidCiphertext, KeyDestroyedError) as exc:
        batch_id, file_index, position = place
        raise type(exc)(
            f"quarantine row of batch {batch_id!r}, file {file_index}, position {position}: {exc}"
        ) from exc


# the byte-order marks of the wide Unicode forms, each with its codec (UTF-32's first: UTF-32 LE
# opens with UTF-16 LE's mark): an export re-saved by a Windows tool (PowerShell's Out-File) is
# UTF-16, and the reader refuses such a file whole, one record of no patient
_WIDE_FORMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def quarantined_text(raw: bytes) -> str:
    """The text of a record the quarantine holds (:func:`_decoded`), without the zero bytes it
    ends in: a file cut off by a crash or copied while it was written ends in zeros where its
    blocks were allocated and never written, and a document so cut read as no JSON rather than
    cut short, so its Patient gave no canary (JSON allows no zero byte, so they hold nothing)."""
    return _decoded(raw).rstrip("\0")


def _decoded(raw: bytes) -> str:
    """The text of a record the quarantine holds, read as its exporter wrote it: after the UTF-8
    byte-order marks it starts with (a line of NDJSON files joined end to end, each with its
    mark: the reader drops the first line's only), in UTF-16 or UTF-32 when it opens with
    their mark (a character cut short dropped), else in UTF-8 (a character cut short dropped
    too: read in Windows-1252, Zéphyrine was ZÃ©phyrine), and text that is no UTF-8 in
    Windows-1252 (Latin-1 where Windows-1252 has no character: an export in a legacy
    encoding, whose records with a letter outside ASCII, a Patient named Brontëwald, are no
    UTF-8 while the others are)."""
    while raw.startswith(BOM):
        raw = raw[len(BOM) :]
    for mark, codec in _WIDE_FORMS:
        if raw.startswith(mark):
            # a file cut short (the reader keeps what it read of it) ends in half a character
            return raw.decode(codec, "ignore")
    unmarked = unmarked_wide_form(raw)
    if unmarked is not None:
        return raw.decode(unmarked, "ignore")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.end == len(raw) and exc.reason == "unexpected end of data":
            # UTF-8 cut short within its last character: that half character dropped
            return raw[: exc.start].decode("utf-8")
        try:
            return raw.decode("cp1252")
        except UnicodeDecodeError:
            return raw.decode("latin-1")


def _text_json(text: str) -> Any:
    """The JSON value ``text`` reads as, ``NaN`` and ``Infinity`` as numbers; nested deeper
    than orjson and Python's json module read, its values below :data:`_DEEPEST_KEPT` levels
    dropped (:func:`_shallow_json`); None when it reads as none."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(text)
    except RecursionError:
        pass
    except ValueError:
        return None
    try:
        return _shallow_json(text.encode("utf-8", "surrogatepass"))
    except (ijson.JSONError, UnicodeEncodeError):
        return None


# the levels of a record nested too deep for orjson that are read: a person's names and
# identifiers lie within the first ten; built whole, a line of 64 MB of "[" took over 20 GB
_DEEPEST_KEPT = 100
_OPENING = ("start_map", "start_array")
_CLOSING = ("end_map", "end_array")


def _shallow_json(data: bytes) -> Any:
    """The JSON value ``data`` reads as (from ijson's events, without recursing), each object
    or array nested below :data:`_DEEPEST_KEPT` levels left out."""
    stack: list[Any] = []
    keys: list[Any] = []
    skipped = 0  # the depth within a value being left out
    for event, value in ijson.basic_parse(data, use_float=True):
        if skipped:
            skipped += (event in _OPENING) - (event in _CLOSING)
        elif event == "map_key":
            keys[-1] = value
        elif event in _CLOSING:
            node = stack.pop()
            keys.pop()
            if not stack:
                return node
        elif event in _OPENING and len(stack) >= _DEEPEST_KEPT:
            skipped = 1
        else:
            node = ({} if event == "start_map" else []) if event in _OPENING else value
            if not stack and event not in _OPENING:
                return node
            if stack:
                _put(stack[-1], keys[-1], node)
            if event in _OPENING:
                stack.append(node)
                keys.append(None)
    return None


def _put(parent: Any, key: Any, node: Any) -> None:
    if isinstance(parent, dict):
        parent[key] = node
    else:
        parent.append(node)


def json_read_so_far(text: str) -> Any:
    """``text`` cut short (a line the exporter or a copy cut off: the quarantine keeps it as it
    came) read as the value it had begun, holding each value complete before the cut
    (pydantic-core's partial JSON mode: a string cut short is left out, never read as a
    shorter word), ``NaN`` and ``Infinity`` as numbers. None when it reads as no JSON, or
    nests deeper than that parser reads."""
    try:
        return pydantic_core.from_json(text, allow_inf_nan=True, allow_partial=True)
    except ValueError:
        return None


def _one_value_cut_short(text: str) -> bool:
    """Whether ``text`` ends within the one JSON value it begins, rather than holding values one
    after another (NDJSON's lines: those are read a line at a time) or something that reads
    as no JSON."""
    try:
        pydantic_core.from_json(text, allow_inf_nan=True)
    except ValueError as exc:
        return str(exc).startswith("EOF while parsing")
    return False


def _line_json(text: str) -> Any:
    """The JSON value ``text`` reads as (:func:`_text_json`), or, cut short, as far as its last
    whole value (:func:`json_read_so_far`)."""
    value = _text_json(text)
    return json_read_so_far(text) if value is None else value


def quarantined_json(raw: bytes) -> Any:
    """The JSON value a record the quarantine holds still reads as (its text as
    :func:`quarantined_text` reads it), with ``NaN`` or ``Infinity`` (which Python's json
    module writes for such a float) as numbers, nested however deep, and cut short as far as
    its last whole value. None when it reads as no JSON."""
    return _line_json(quarantined_text(raw))


def text_resources(text: str) -> Iterator[dict[str, Any]]:
    """The resources a quarantined record's text still reads as: its JSON object, or, when it
    is none, that of each of its lines (a whole NDJSON file the reader refused as one record,
    in UTF-16), a line cut short as far as its last whole value (:func:`_line_json`), each
    Bundle among them as the resources of its entries, at any depth, and an array as its
    objects (a Bundle line in Latin-1 carries its Patient, and so does a JSON array). Its lines
    are read one at a time, each value let go once its resources are yielded: a record of a
    million lines of ``[[[`` held a million nested lists at once (gigabytes)."""
    value = _text_json(text)
    if value is None and _one_value_cut_short(text):
        # a document of many lines cut off (a Bundle written indented, as Synthea writes
        # one): read line by line, no line of it is a resource, and its Patient gave none
        value = json_read_so_far(text)
    if value is not None:
        yield from _resources_in(value)
        return
    at = 0
    for value, at in _values_one_after_another(text):
        yield from _resources_in(value)
    if at:
        # documents written one after another (two indented resources in one file, refused
        # as invalid JSON): the first read whole, no line of them a resource, and no Patient
        # of them gave a canary; what follows the last one read is read as any text is
        yield from text_resources(text[at:])
        return
    whole = text.strip()
    for line in _text_lines(text):
        # a text of one line was read whole just above
        for line_value in _line_values(line, read_whole=line == whole):
            yield from _resources_in(line_value)


# a JSON decoder reading one value at a position; what may stand between two values of a line
_DECODER = json.JSONDecoder()
_BETWEEN_VALUES = re.compile(r"[\s\ufeff]*")
_JOINED_OBJECTS = re.compile(r"\}[\s\ufeff]*\{")


def _values_one_after_another(text: str) -> Iterator[tuple[Any, int]]:
    """Each JSON value ``text`` holds from its start while one follows another with only
    spaces (line breaks too) between them, each with the position after it and the spaces
    that follow, yielded before the next is read; none when ``text`` holds no closed object
    followed by another (a record of a million lines of ``[[[`` is not decoded again)."""
    if not _JOINED_OBJECTS.search(text):
        return
    between = _BETWEEN_VALUES.match(text)
    at = between.end() if between else 0
    while at < len(text):
        try:
            value, end = _DECODER.raw_decode(text, at)
        except (ValueError, RecursionError):
            return
        between = _BETWEEN_VALUES.match(text, end)
        at = between.end() if between else end
        yield value, at


def _line_values(line: str, read_whole: bool) -> Iterator[Any]:
    """The JSON values ``line`` holds (:func:`_text_json`; not again when ``read_whole``), one
    after another when it holds several (NDJSON files joined where one did not end in a line
    feed: ``{...}{...}``, whose values after the first were not read), the last cut short as
    far as its last whole value (:func:`json_read_so_far`). Each is yielded before the next
    is read."""
    value = None if read_whole else _text_json(line)
    if value is not None:
        yield value
        return
    at = 0
    # only a line with an object closed before another opens holds values joined: no other is
    # decoded a second time (a record of a million lines of nested brackets)
    while at < len(line) and _JOINED_OBJECTS.search(line, at):
        try:
            value, end = _DECODER.raw_decode(line, at)
        except (ValueError, RecursionError):
            break
        yield value
        between = _BETWEEN_VALUES.match(line, end)
        at = between.end() if between else end
    rest = json_read_so_far(line[at:]) if at < len(line) else None
    if rest is not None:
        yield rest


# the breaks :meth:`str.splitlines` knows that JSON holds only escaped (control characters), not
# U+0085, U+2028 and U+2029, which a JSON string may hold as they are (a narrative's text): a
# line cut there lost the Patient's name after it, and the name gave no canary
_LINE_BREAKS = re.compile("[\r\x0b\x0c\x1c-\x1e]")


def _text_lines(text: str) -> Iterator[str]:
    """The lines of ``text`` that hold anything (split at :data:`_LINE_BREAKS`), stripped of
    spaces and byte-order marks, one at a time: no list of a million lines."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        for line in _LINE_BREAKS.split(text[start:end]):
            stripped = line.strip().lstrip("\ufeff")
            if stripped:
                yield stripped
        start = end + 1


def _resources_in(value: Any) -> Iterator[dict[str, Any]]:
    """The resources ``value`` holds: itself when an object, and when an array (a file written
    as a JSON array of resources, refused whole as no resource) its objects, each with every
    resource it holds inside it (:func:`fhirlake.nested.held_resources`: its contained
    resources, a Parameters' resources, a Bundle's entries' at any depth, its ``entry``
    written as one object too), a Bundle as those alone. An array within the array is no
    resource. Before, a Patient contained in a refused lab result, sent as ``Parameters`` or in
    a Bundle whose ``entry`` is one object gave no canary."""
    for item in value if isinstance(value, list) else [value]:
        if not isinstance(item, dict):
            continue
        if not _is_bundle(item.get("resourceType")):
            yield item
        yield from held_resources(item)


def _is_bundle(named: Any) -> bool:
    """Whether a ``resourceType`` names a Bundle, in any case and with spaces around it, as
    the Patients its entries hold are read (``bundle``: refused whole as no resource type, its
    Patient gave no canary)."""
    return folded_type(named) == "bundle"


def iter_unattributed_quarantined_records(
    con: duckdb.DuckDBPyConnection,
    provider: KeyProvider,
    resource_types: Sequence[str],
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[dict[str, Any]]:
    """The records of ``resource_types`` among those the quarantine holds under no patient
    (refused before they could be read as FHIR: no JSON, nested too deep, a whole file in
    UTF-16, a type written in another case: ``patient``, refused as no resource type),
    decrypted and read as :func:`text_resources` reads their text
    (:func:`iter_unattributed_quarantine_texts`), each under its type as FHIR writes it: a
    Patient refused so names its patient while the patient's other records are accepted and
    released."""
    types = {t.casefold(): t for t in resource_types}
    for _, text in iter_unattributed_quarantine_texts(con, provider, chunk_rows):
        for record in text_resources(text):
            rtype = types.get(folded_type(record.get("resourceType")) or "")
            if rtype is not None:
                yield {**record, "resourceType": rtype}


def iter_unattributed_quarantine_texts(
    con: duckdb.DuckDBPyConnection, provider: KeyProvider, chunk_rows: int = CHUNK_ROWS
) -> Iterator[tuple[tuple[str, int, int], str]]:
    """Every record the quarantine holds sealed under no patient, decrypted, with its place
    (batch id, file index, position), as text read as its exporter wrote it
    (:func:`quarantined_text`), a chunk at a time. An erased subject's record sent again holds
    nothing sealed: passed over."""
    if not has_table(con, "quarantine"):
        return
    store = DataKeyStore(con, provider)
    columns = _PLACE + ", q.sealed, q.aad"
    for chunk in _quarantine_chunks(con, columns, _QUARANTINED_UNATTRIBUTED, [], chunk_rows):
        for batch_id, file_index, position, sealed, aad in chunk:
            place = (str(batch_id), int(file_index), int(position))
            plaintext = open_quarantined(store, bytes(sealed), bytes(aad), SHARED_OWNER, place)
            yield place, quarantined_text(plaintext)


def iter_quarantined_records(
    con: duckdb.DuckDBPyConnection,
    provider: KeyProvider,
    resource_types: Sequence[str],
    patient_key: str | None = None,
    *,
    skip_destroyed: bool = False,
    with_held: bool = False,
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The records of ``resource_types`` the quarantine holds under a patient's key (refused by
    validation: no vault row holds them), of one patient or of all, with their patient's
    pseudonym, decrypted: the identifiers they hold are the person's all the same, and the
    patient's other records may be in the vault and released. With ``with_held``, the
    resources any refused record holds inside it are among them
    (:func:`fhirlake.nested.held_resources`: a Patient contained in a refused lab result named
    its patient and gave no canary); without, only the records themselves (an erasure reads
    its patient's Patient records so, and a mother's Patient contained in her child's lab
    result is not the child). A record that is no JSON object of the type its row names is
    passed over. A record sealed under a destroyed key (an
    erasure cut short) raises :class:`vault.errors.KeyDestroyedError`, or is passed over with
    ``skip_destroyed``: its patient is erased."""
    if not has_table(con, "quarantine"):
        return
    store = DataKeyStore(con, provider)
    only = "" if patient_key is None else "AND patient_key = ?"
    if not with_held:
        only += " AND list_contains(?, resource_type)"
    params: list[Any] = [] if patient_key is None else [patient_key]
    params += [] if with_held else [list(resource_types)]
    where = _QUARANTINED_OWNED.format(only=only)
    columns = (
        "q.patient_key, q.resource_type, q.sealed, q.aad, q.batch_id, q.file_index, q.position"
    )
    chunks = _quarantine_chunks(con, columns, where, params, chunk_rows)
    rows = (row for chunk in chunks for row in chunk)
    for owner, rtype, sealed, aad, *place in rows:
        try:
            opened = open_quarantined(store, bytes(sealed), bytes(aad), str(owner), place)
            record = orjson.loads(opened)
        except orjson.JSONDecodeError:
            continue
        except KeyDestroyedError:
            if skip_destroyed:
                continue
            raise
        if not isinstance(record, dict) or record.get("resourceType") != rtype:
            continue
        held = held_resources(record) if with_held else ()
        for resource in (record, *held):
            if resource.get("resourceType") in resource_types:
                yield str(owner), resource
