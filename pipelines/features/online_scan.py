"""The Feast online store (SQLite) read and addressed as tables of rows: the PHI leak scan of
every stored feature value (or of the rows of some patients), and the deletion of patients'
rows (withheld, opted out or erased patients; see pipelines.erasure and
pipelines.features.online_sync)."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from deid.leakscan import CanarySet, LeakScanResult, scan_rows
from vault.catalog import quote_identifier as _quote
from vault.pseudonym import PSEUDONYM_HEX_CHARS

# feature_store.yaml's entity_key_serialization_version
ENTITY_KEY_VERSION = 3
# the patient entity's join key (feature_repo/entities.py, which Feast reads on its own)
JOIN_KEY = "patient_id"
# bound parameters per statement, well under SQLite's limit
_KEYS_PER_QUERY = 500
# entity keys read per statement (see _pages_by_key)
KEYS_PER_PAGE = 1_000


def feature_view_tables(db: sqlite3.Connection) -> list[tuple[str, str]]:
    """(name, quoted name) of the online store's feature view tables (entity_key, feature_name,
    value, ...), one per feature view; found in one statement of one row (see _pages_by_key)."""
    (found,) = db.execute(
        "SELECT json_group_array(m.name) FROM sqlite_master m WHERE m.type = 'table' AND "
        "(SELECT count(DISTINCT p.name) FROM pragma_table_info(m.name) p "
        "WHERE p.name IN ('entity_key', 'feature_name', 'value')) = 3"
    ).fetchone()
    return [(table, _quote(table)) for table in orjson.loads(found)]


def _serialized_key(pseudonym: str, version: int) -> bytes:
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    key = EntityKey(join_keys=[JOIN_KEY], entity_values=[Value(string_val=pseudonym)])
    return bytes(serialize_entity_key(key, entity_key_serialization_version=version))


@functools.lru_cache(maxsize=16)
def _key_prefix(length: int, version: int) -> bytes:
    """What precedes a value of ``length`` bytes in its serialised entity key (counts, the join
    key, the value's type and length): Feast's own serialisation of two such values, which must
    differ in their trailing value bytes only."""
    samples = ["0" * length, "1" * length]
    keys = [_serialized_key(sample, version) for sample in samples]
    prefix = keys[0][: len(keys[0]) - length]
    if any(key != prefix + sample.encode() for key, sample in zip(keys, samples, strict=True)):
        raise RuntimeError("Feast's entity key no longer ends with the entity value")
    return prefix


def online_entity_key(pseudonym: str, version: int = ENTITY_KEY_VERSION) -> bytes:
    """The ``entity_key`` under which Feast stores a patient's rows (serialised EntityKey):
    Feast's serialisation, made once per value length (a sync addresses every patient)."""
    value = pseudonym.encode("utf8")
    return _key_prefix(len(value), version) + value


def _pages_by_key(
    db: sqlite3.Connection,
    quoted: str,
    *,
    rows: bool,
    where: str = "1",
    params: Sequence[Any] = (),
    per_page: int = KEYS_PER_PAGE,
) -> Iterator[tuple[bytes, list[tuple[str, bytes]]]]:
    """Each entity key of a table that ``where`` selects rows of, with (when ``rows``) the
    (feature_name, value) of those rows; a NULL key or value comes back as empty bytes.
    ``per_page`` keys are read per statement, in the order of the primary key.

    A page comes back as one row of JSON text. SQLite's Python driver lets go of the
    interpreter lock while it steps to each row and takes it back after: with another thread
    busy in Python beside it (the training set's Feast retrieval runs beside the online sync),
    taking it back waits up to a switch interval, once per row. The keys of a 1,000-patient
    view took 0.32 s that way inside a release (5 ms alone), the rows of 40 patients 2.2 s
    beside a busy thread (5 ms alone); a page waits once."""
    values = "json_group_array(json_array(feature_name, hex(value)))" if rows else "NULL"
    after = ""
    bound: list[Any] = []
    while True:
        page, last, count = db.execute(
            "SELECT json_group_array(json_array(hex(k), json(r))), max(k), count(*) FROM "
            f"(SELECT entity_key AS k, {values} AS r FROM {quoted} WHERE ({where}){after} "
            f"GROUP BY entity_key ORDER BY entity_key LIMIT {int(per_page)})",
            [*params, *bound],
        ).fetchone()
        for key, found in orjson.loads(page):
            yield bytes.fromhex(key), [(str(n), bytes.fromhex(v)) for n, v in found or ()]
        if count < per_page:
            return
        # a NULL key comes first: a page of nothing else is followed by every other key
        after = " AND entity_key IS NOT NULL" if last is None else " AND entity_key > ?"
        bound = [] if last is None else [last]


def online_keys(db_path: Path, table: str, per_page: int = KEYS_PER_PAGE) -> set[bytes]:
    """The entity keys a feature view table holds (empty when the file or table is absent)."""
    if not Path(db_path).exists():
        return set()
    db = sqlite3.connect(db_path)
    try:
        tables = dict(feature_view_tables(db))
        if table not in tables:
            return set()
        return {key for key, _ in _pages_by_key(db, tables[table], rows=False, per_page=per_page)}
    finally:
        db.close()


def delete_online_entities(
    db_path: Path,
    keys: Collection[bytes],
    tables: Collection[str] | None = None,
    *,
    vacuum: bool = False,
) -> int:
    """Delete the rows of ``keys`` from the named feature view tables (default: all of them);
    returns rows removed. ``secure_delete`` overwrites the deleted values in place, so a
    withheld patient's values do not stay in free pages; ``vacuum`` also rebuilds the file
    (an erasure leaves nothing of the patient, not even page layout)."""
    if not Path(db_path).exists() or not keys:
        return 0
    removed = 0
    db = sqlite3.connect(db_path)
    try:
        db.execute("PRAGMA secure_delete = ON")
        for table, quoted in feature_view_tables(db):
            if tables is None or table in tables:
                for key in keys:
                    removed += db.execute(
                        f"DELETE FROM {quoted} WHERE entity_key = ?", [key]
                    ).rowcount
        db.commit()
        if vacuum:
            db.execute("VACUUM")
    finally:
        db.close()
    return removed


def _table_rows(
    db: sqlite3.Connection,
    quoted: str,
    keys: Collection[bytes] | None,
    per_page: int = KEYS_PER_PAGE,
) -> Iterator[tuple[bytes, str, bytes]]:
    """(entity_key, feature_name, value) of a table: every row, or the rows of ``keys`` (a
    NULL key or value comes back as empty bytes)."""
    if keys is None:
        chunks: list[list[bytes] | None] = [None]
    else:
        batch = list(keys)
        chunks = [batch[i : i + _KEYS_PER_QUERY] for i in range(0, len(batch), _KEYS_PER_QUERY)]
    for chunk in chunks:
        where = "1" if chunk is None else f"entity_key IN ({', '.join('?' for _ in chunk)})"
        pages = _pages_by_key(
            db, quoted, rows=True, where=where, params=chunk or (), per_page=per_page
        )
        for key, found in pages:
            for name, value in found:
                yield key, name, value


def _online_rows(
    db_path: Path, only: Mapping[str, Collection[bytes]] | None
) -> Iterator[tuple[str, Any, str | None]]:
    db = sqlite3.connect(db_path)
    try:
        for table, quoted in feature_view_tables(db):
            keys = None if only is None else only.get(table)
            if only is not None and not keys:
                continue
            for key, name, value in _table_rows(db, quoted, keys):
                # the serialised entity key ends with the patient pseudonym (a string value)
                tail = key[-PSEUDONYM_HEX_CHARS:]
                patient = tail.decode("ascii", "replace") if tail else None
                text = value.decode("utf-8", "replace")
                yield f"{table}:{name}", [str(name), text], patient
    finally:
        db.close()


def scan_online_store(
    db_path: Path, canaries: CanarySet, only: Mapping[str, Collection[bytes]] | None = None
) -> LeakScanResult:
    """Every value of every feature view table, as text (protobuf-encoded strings keep their
    UTF-8 bytes), searched for the release canaries. ``only`` (table -> entity keys) limits
    the scan to those patients' rows: the rows a sync has just written."""
    if not Path(db_path).exists():
        return LeakScanResult(canaries=len(canaries))
    return scan_rows(canaries, _online_rows(Path(db_path), only))
