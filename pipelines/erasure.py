"""Erasure beyond the warehouse tables: the released Parquet files (views, features, models),
the Feast online store, and references to the patient in other patients' released resources,
as the places :class:`pipelines.workdir.Workdir` lists for ``ehr forget``: after it nothing of
the patient is left in any file the platform publishes."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import orjson

from deid.release import erased_subjects
from deid.released_table import ensure_resource_digests, resource_digest_sql
from pipelines.features.online_scan import delete_online_entities, online_entity_key
from pipelines.publish import unfinished_temporaries
from vault.catalog import has_table, quote_identifier
from vault.keys import fsync_dir, fsync_file
from vault.lifecycle import check_pseudonym
from vault.pseudonym import PSEUDONYM_HEX_CHARS
from vault.warehouse import connect_when_free


def purge_released_parquet(folders: tuple[Path, ...], pseudonym: str) -> int:
    """Rewrite every released Parquet file that holds the patient without its rows; returns
    the number of rows removed."""
    check_pseudonym(pseudonym)  # inlined into COPY statements below: its own alphabet only
    return _purge_parquet_rows(folders, ("patient_id",), f"patient_id = '{pseudonym}'")


@contextmanager
def holding_warehouse(warehouse: Path | None) -> Iterator[None]:
    """The warehouse held open for writing for the length of the block, when it exists
    (waiting while another process has it, :func:`vault.warehouse.connect_when_free`). Every
    process that writes a released file holds it meanwhile (a run's publish, another erasure's
    purge), so one released file is rewritten by one of them at a time: two rewrites at once
    each start from the file as it was, and the later rename puts back the rows the other one
    removed (another erased patient's, or a run's withheld ones)."""
    con = None
    if warehouse is not None and Path(warehouse).exists():
        con = connect_when_free(warehouse)
    try:
        yield
    finally:
        if con is not None:
            con.close()


def remove_unfinished_publishes(folders: tuple[Path, ...], warehouse: Path | None = None) -> int:
    """Delete the temporary files that publishes killed before their rename left in ``folders``
    (:func:`pipelines.publish.unfinished_temporaries`): each holds every row its table had
    then, the erased patient's among them, and the purge of the published files does not read
    them. Holds ``warehouse`` open for writing meanwhile (:func:`holding_warehouse`; the caller
    may hold it instead and pass None), so that no other process is writing one (every
    publish writes its temporary file with the warehouse open); returns how many files were
    deleted."""
    with holding_warehouse(warehouse):
        removed = 0
        for folder in folders:
            for entry in unfinished_temporaries(folder):
                entry.unlink(missing_ok=True)
                removed += 1
        if removed:
            for folder in folders:
                if Path(folder).is_dir():
                    fsync_dir(Path(folder))
    return removed


def purge_released_parquet_resources(
    folders: tuple[Path, ...], resource_keys: tuple[str, ...]
) -> int:
    """Rewrite every released Parquet file that holds one of these resources of no patient (a
    view's row: ``id`` the resource key, ``patient_id`` NULL) without it; returns the number
    of rows removed."""
    for key in resource_keys:
        check_pseudonym(key)  # resource keys have the same shape
    if not resource_keys:
        return 0
    # looked up in a table rather than written into the statements: a re-run of an erasure
    # passes every resource the first run erased, hundreds for one patient
    return _purge_parquet_rows(
        folders,
        ("patient_id", "id"),
        "patient_id IS NULL AND CAST(id AS VARCHAR) IN (SELECT k FROM _erased_resources)",
        resource_keys,
    )


def _purge_parquet_rows(
    folders: tuple[Path, ...], needs: tuple[str, ...], erased: str, keys: tuple[str, ...] = ()
) -> int:
    """Rewrite every Parquet file of ``folders`` that has the columns ``needs`` and rows where
    ``erased`` holds (an SQL condition over them, which may read ``keys`` from the table
    ``_erased_resources (k)``) without those rows; returns how many."""
    removed = 0
    con = duckdb.connect()
    try:
        con.execute(
            "CREATE TEMP TABLE _erased_resources AS SELECT unnest(?::VARCHAR[]) AS k", [list(keys)]
        )
        for folder in folders:
            for path in sorted(Path(folder).glob("*.parquet")):
                source = "read_parquet('" + str(path).replace("'", "''") + "')"
                columns = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
                if not set(needs) <= columns:
                    continue
                found = con.execute(f"SELECT count(*) FROM {source} WHERE {erased}").fetchall()[0][
                    0
                ]
                if not found:
                    continue
                tmp = path.with_name(path.name + ".erasing")
                target = str(tmp).replace("'", "''")
                con.execute(
                    f"COPY (SELECT * FROM {source} WHERE ({erased}) IS NOT TRUE) "
                    f"TO '{target}' (FORMAT PARQUET)"
                )
                _replace_durably(tmp, path)
                removed += int(found)
    finally:
        con.close()
    return removed


def _replace_durably(new: Path, path: Path) -> None:
    """Put ``new`` in ``path``'s place so that a crash or power loss after the erasure is
    recorded can never bring the old file (the patient's rows) back: the new file's bytes are
    on disk before the rename, and the rename is on disk before the caller goes on."""
    fsync_file(new)
    new.replace(path)
    fsync_dir(path.parent)


def purge_online_store(db_path: Path, pseudonym: str) -> int:
    """Delete the patient's rows from every feature view table of the SQLite online store and
    vacuum the file, so the deleted pages do not keep the values; returns rows removed."""
    check_pseudonym(pseudonym)
    if not Path(db_path).exists():
        return 0
    return delete_online_entities(db_path, [online_entity_key(pseudonym)], vacuum=True)


def _without_reference(node: Any, keys: frozenset[str]) -> tuple[Any, int]:
    """``node`` with every Reference to one of ``keys`` (``<Type>/<key>``) removed (the whole
    Reference element: its display or identifier would describe what was erased), and how
    many were removed."""
    if isinstance(node, dict):
        if _names_erased(node.get("reference"), keys):
            return None, 1
        kept: dict[str, Any] = {}
        removed = 0
        for key, value in node.items():
            new, n = _without_reference(value, keys)
            removed += n
            if new is not None and new != [] and new != {}:
                kept[key] = new
        return kept, removed
    if isinstance(node, list):
        items = [_without_reference(item, keys) for item in node]
        return [v for v, _ in items if v is not None], sum(n for _, n in items)
    return node, 0


def _names_erased(reference: Any, keys: frozenset[str]) -> bool:
    if not isinstance(reference, str):
        return False
    parts = reference.split("/")
    return len(parts) == 2 and parts[1] in keys


# The keys released references name: "reference":"<Type>/<key>" in a released resource.
_REFERENCE_PATTERN = rf'"reference"\s*:\s*"[A-Za-z]+/([0-9a-f]{{{PSEUDONYM_HEX_CHARS}}})"'
# Released columns holding a reference's key (a view's encounter_id): named *_id, VARCHAR
_KEY_COLUMN = re.compile(r"[a-z0-9_]+_id")
_NOT_REFERENCES = ("id", "patient_id")
RELEASED_SCHEMAS = ("views", "features", "models")


def _stage_erased_keys(con: duckdb.DuckDBPyConnection, keys: frozenset[str]) -> None:
    """Temporary table ``_erased_keys (k)``: the keys the purge's statements look up."""
    con.execute("CREATE TEMP TABLE _erased_keys AS SELECT unnest(?::VARCHAR[]) AS k", [list(keys)])


def purge_released_references(
    warehouse_path: Path, pseudonym: str, folders: tuple[Path, ...] = ()
) -> int:
    """Remove references to the erased patient, and to every erased resource (its tombstones:
    another patient's Observation naming one of the erased patient's Encounters), from what
    stays released: the resources of ``deid_resources`` (a performer, a focus, an encounter),
    the key columns (``*_id``) of the released tables (views, features, models: set to NULL)
    and of the released Parquet files of ``folders``. The release must not keep naming the
    pseudonyms. Returns the number of references removed. Waits while another process has the
    warehouse open (:func:`vault.warehouse.connect_when_free`)."""
    check_pseudonym(pseudonym)
    if not Path(warehouse_path).exists():
        return 0
    con = connect_when_free(warehouse_path)
    try:
        # every tombstone: the patients' and resources' pseudonyms (an identifier criteria's
        # keyed token, in a domain of its own, names no released reference)
        keys = erased_subjects(con) | {pseudonym}
        _stage_erased_keys(con, keys)
        removed = _purge_resource_references(con, keys)
        removed += _null_key_columns(con)
        con.execute("CHECKPOINT")
        # with the warehouse still held: no other process rewrites a released file meanwhile
        # (holding_warehouse)
        removed += _null_parquet_key_columns(folders, keys)
    finally:
        con.close()
    return removed


def _purge_resource_references(con: duckdb.DuckDBPyConnection, keys: frozenset[str]) -> int:
    if not has_table(con, "deid_resources"):
        return 0
    ensure_resource_digests(con)  # a release written before the column: it is written below
    rows = con.execute(
        """
        SELECT rowid, resource::VARCHAR FROM deid_resources WHERE rowid IN (
            SELECT rid FROM (
                SELECT rowid AS rid, unnest(regexp_extract_all(resource::VARCHAR, ?, 1)) AS k
                FROM deid_resources)
            WHERE k IN (SELECT k FROM _erased_keys))
        """,
        [_REFERENCE_PATTERN],
    ).fetchall()
    removed = 0
    for rowid, text in rows:
        cleaned, n = _without_reference(orjson.loads(text), keys)
        if n:
            con.execute(
                "UPDATE deid_resources SET resource = $text::JSON, "
                f"digest = {resource_digest_sql('$text')} WHERE rowid = $row",
                {"text": orjson.dumps(cleaned).decode(), "row": rowid},
            )
            removed += n
    return removed


def _key_columns(con: duckdb.DuckDBPyConnection, source: str) -> list[str]:
    """The reference key columns of a table or Parquet file (``source`` as SQL)."""
    described = con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()
    return [
        str(name)
        for name, kind, *_ in described
        if kind == "VARCHAR" and name not in _NOT_REFERENCES and _KEY_COLUMN.fullmatch(name)
    ]


def _null_key_columns(con: duckdb.DuckDBPyConnection) -> int:
    """Set to NULL every released table's key column value naming an erased key."""
    tables = con.execute(
        "SELECT schema_name, table_name FROM duckdb_tables() "
        "WHERE database_name = current_database() AND schema_name IN (SELECT unnest(?)) "
        "ORDER BY 1, 2",
        [list(RELEASED_SCHEMAS)],
    ).fetchall()
    removed = 0
    for schema, table in tables:
        qualified = f"{quote_identifier(schema)}.{quote_identifier(table)}"
        for column in _key_columns(con, qualified):
            col = quote_identifier(column)
            ((n,),) = con.execute(
                f"UPDATE {qualified} SET {col} = NULL WHERE {col} IN (SELECT k FROM _erased_keys)"
            ).fetchall()
            removed += int(n)
    return removed


def _null_parquet_key_columns(folders: tuple[Path, ...], keys: frozenset[str]) -> int:
    """Rewrite every released Parquet file whose key columns name an erased key with those
    values set to NULL; returns how many values."""
    removed = 0
    con = duckdb.connect()
    try:
        _stage_erased_keys(con, keys)
        for folder in folders:
            for path in sorted(Path(folder).glob("*.parquet")):
                source = "read_parquet('" + str(path).replace("'", "''") + "')"
                columns = [quote_identifier(c) for c in _key_columns(con, source)]
                if not columns:
                    continue
                counted = " + ".join(
                    f"count(*) FILTER (WHERE {c} IN (SELECT k FROM _erased_keys))" for c in columns
                )
                ((found,),) = con.execute(f"SELECT {counted} FROM {source}").fetchall()
                if not found:
                    continue
                replaced = ", ".join(
                    f"CASE WHEN {c} IN (SELECT k FROM _erased_keys) THEN NULL ELSE {c} END AS {c}"
                    for c in columns
                )
                tmp = path.with_name(path.name + ".erasing")
                target = str(tmp).replace("'", "''")
                con.execute(
                    f"COPY (SELECT * REPLACE ({replaced}) FROM {source}) "
                    f"TO '{target}' (FORMAT PARQUET)"
                )
                _replace_durably(tmp, path)
                removed += int(found)
    finally:
        con.close()
    return removed


@dataclass(frozen=True)
class ReleasedReferences:
    """References to the patient and to the erased resources in what stays released: other
    patients' released resources (``deid_resources``), the key columns of the released tables
    and of the released Parquet files of ``folders``."""

    warehouse: Path
    folders: tuple[Path, ...] = ()
    name: str = "released_references"

    def purge(self, pseudonym: str) -> int:
        return purge_released_references(self.warehouse, pseudonym, self.folders)


@dataclass(frozen=True)
class ReleasedParquet:
    """The released Parquet files of a workdir (views, features, models), and the temporary
    files of publishes into them that a killed process left behind. Each purge holds the
    warehouse open for writing from before it reads a file until its rewrite is in place
    (:func:`holding_warehouse`), as every publish does: another erasure's purge, or a run's
    publish, of the same file waits for it."""

    folders: tuple[Path, ...]
    name: str = "released_parquet"
    # the warehouse every publish and purge holds open while it writes a file (waited for)
    warehouse: Path | None = None

    def purge(self, pseudonym: str) -> int:
        with holding_warehouse(self.warehouse):
            remove_unfinished_publishes(self.folders)
            return purge_released_parquet(self.folders, pseudonym)

    def purge_resources(self, resource_keys: tuple[str, ...]) -> int:
        with holding_warehouse(self.warehouse):
            return purge_released_parquet_resources(self.folders, resource_keys)


@dataclass(frozen=True)
class OnlineStore:
    """The Feast online store (SQLite) of a workdir."""

    path: Path
    name: str = "feast_online_store"

    def purge(self, pseudonym: str) -> int:
        return purge_online_store(self.path, pseudonym)


def purge_model_training_record(
    models_folder: Path, pseudonym: str, warehouse: Path | None = None
) -> int:
    """Delete the record of what a model was trained on (``trained_on.parquet`` and its JSON)
    wherever it names the patient: the model is then trained again, without them, by the next
    release refresh (:mod:`pipelines.models.retrain`). Returns the rows the record held for the
    patient.

    A model being fitted holds ``warehouse`` open until its files are published
    (``pipelines.assets.models``): the purge waits for it first, so that a fit which read the
    patient's rows before the erasure cannot publish its record after the purge, and holds the
    warehouse until it is done, so that no fit is writing meanwhile. The record a fit killed
    while writing it left in the folder of its unfinished publish (the temporary file of
    :func:`pipelines.publish.write_replacing`, the patients of that fit) is deleted too."""
    from pipelines.models.training import TRAINED_ON_ROWS_FILE, forget_trained_on
    from pipelines.publish import unfinished_temporaries

    check_pseudonym(pseudonym)
    holding = None
    if warehouse is not None and Path(warehouse).exists():
        # for writing: DuckDB lets readers in beside the fit's read-only connection
        holding = connect_when_free(warehouse)
    removed = 0
    seen: set[Path] = set()
    con = duckdb.connect()
    try:
        # no fit is running (the warehouse is held): every such temporary file is a killed fit's
        fits = sorted(p for p in Path(models_folder).glob("*") if p.is_dir() and not p.is_symlink())
        for path in (t for fit in fits for t in unfinished_temporaries(fit, TRAINED_ON_ROWS_FILE)):
            try:
                ((found,),) = con.execute(
                    "SELECT count(*) FROM read_parquet(?) WHERE patient_id = ?",
                    [str(path), pseudonym],
                ).fetchall()
            except duckdb.Error:  # cut short by the kill, or no patient column: nothing reads it
                found = 0
            path.unlink(missing_ok=True)
            removed += int(found)
        # a model's folder is a symlink to the hidden folder of its current set, which the glob
        # lists too (as it lists the folder of a publish a crash left unfinished): each once
        for path in sorted(Path(models_folder).glob(f"*/{TRAINED_ON_ROWS_FILE}")):
            real = path.resolve()
            if real in seen or not real.is_file():
                continue
            seen.add(real)
            source = "read_parquet('" + str(path).replace("'", "''") + "')"
            columns = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
            if "patient_id" not in columns:
                continue
            ((found,),) = con.execute(
                f"SELECT count(*) FROM {source} WHERE patient_id = ?", [pseudonym]
            ).fetchall()
            if found:
                forget_trained_on(path.parent, erased=True)
                removed += int(found)
    finally:
        con.close()
        if holding is not None:
            holding.close()
    return removed


@dataclass(frozen=True)
class ModelTrainingRecord:
    """The record beside each model of the rows it was trained on."""

    folder: Path
    name: str = "model_training_record"
    # the warehouse a model being fitted holds open until it is published (waited for)
    warehouse: Path | None = None

    def purge(self, pseudonym: str) -> int:
        return purge_model_training_record(self.folder, pseudonym, self.warehouse)
