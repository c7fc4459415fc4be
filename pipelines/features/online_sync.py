"""The Feast online store kept equal to the release with work in proportion to what changed.

What each patient should have online, per feature view, is the latest row at or before the
release's data end (the rule of :func:`pipelines.features.feast_store.materialize_latest`). A
sync computes it in DuckDB from the view's Parquet source (the file Feast materialises from),
compares it with the snapshot of what was last written (``release_state.online_rows``: a digest
per feature view and patient; erased by patient_id like the rest of ``release_state``) and:

- writes the rows new or changed since, and those of patients the store lacks, with
  ``FeatureStore.write_to_online_store`` (the same protobuf values a materialisation stores);
- deletes every patient the store holds and the release no longer has (withheld, opted out,
  erased), read from the online store itself, so no crash can leave one served;
- records the snapshot only after the store is written: a kill in between makes the next sync
  write the same rows again, never miss one.

A first run, a snapshot that cannot be read, a registry applied since the last sync (a new
generation in the apply record, see :func:`pipelines.features.feast_store.apply_repo`; a
missing online store is applied again, which recreates its tables), another online store or a
materialisation the sync did not make (``feast materialize`` from a shell, recorded in the
registry, which writes the rows of its own end over the release's) take the full path
instead: Feast's full materialisation, the same deletions, a new snapshot.

A row's digest leaves ``created`` out: it is the feature tables' build time, new at every
release, and Feast stores it as the row's created_ts but serves nothing derived from it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd
from feast import FeatureStore, FeatureView, FileSource

from pipelines.features.feast_store import (
    HISTORY_START,
    data_end,
    materialize_latest,
    materialize_view,
    missing_online_tables,
    online_entity_counts,
    online_store_path,
    online_table,
    registry_generation,
    registry_materialisations,
)
from pipelines.features.online_scan import (
    JOIN_KEY,
    delete_online_entities,
    online_entity_key,
    online_keys,
)
from pipelines.workdir import RELEASE_STATE_SCHEMA
from vault.catalog import quote_identifier as _quote

# the schema the erasure plan purges by patient_id (pipelines.workdir)
STATE_SCHEMA = RELEASE_STATE_SCHEMA
ROWS = f"{STATE_SCHEMA}.online_rows"
META = f"{STATE_SCHEMA}.online_sync"
# Bumped when a row's digest changes meaning: the next sync then reloads in full.
SYNC_VERSION = "1"
# Temporary tables of one sync: one view's wanted rows, and (view, patient, digest) of all views.
_WANTED = "online_wanted"
_WANTED_ALL = "online_wanted_all"


@dataclass
class OnlineSyncReport:
    """What a sync did. Rows are (feature view, patient) rows, as Feast writes them."""

    mode: str  # "full" or "incremental"
    reason: str
    end: datetime
    seconds: float = 0.0
    rows_written: int = 0
    rows_deleted: int = 0
    rows_unchanged: int = 0
    # online table -> entity keys written by this sync (the leak scan's scope); None: all
    written: dict[str, list[bytes]] | None = None
    entities_online: dict[str, int] = field(default_factory=dict)


class OnlineStoreMissingError(RuntimeError):
    """The online store's tables do not exist: ``feast apply`` (apply_repo) creates them."""


def ensure_state_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {STATE_SCHEMA}")
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {ROWS} (feature_view VARCHAR NOT NULL, "
        "patient_id VARCHAR NOT NULL, event_timestamp TIMESTAMPTZ, digest VARCHAR NOT NULL)"
    )
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {META} (online_store VARCHAR, generation VARCHAR, "
        "version VARCHAR, data_end TIMESTAMPTZ, synced_at TIMESTAMPTZ, materialised VARCHAR)"
    )


def forget_snapshot(con: duckdb.DuckDBPyConnection) -> None:
    """Make the next sync take the full path: something else (Feast's own incremental run)
    wrote the store, so the snapshot no longer says what it holds."""
    ensure_state_tables(con)
    con.execute(f"DELETE FROM {META}")


def full_sync_reason(con: duckdb.DuckDBPyConnection, store: FeatureStore) -> str | None:
    """Why this sync must reload the store in full, or None when the snapshot describes it."""
    path = online_store_path(store)
    try:
        meta = con.execute(
            f"SELECT online_store, generation, version, materialised FROM {META}"
        ).fetchall()
        con.execute(f"SELECT feature_view, patient_id, event_timestamp, digest FROM {ROWS} LIMIT 0")
    except duckdb.Error:
        return "snapshot unreadable"
    if len(meta) != 1:
        return "no snapshot" if not meta else "snapshot unreadable"
    online_store, generation, version, materialised = meta[0]
    if version != SYNC_VERSION:
        return "snapshot of another sync version"
    if online_store != str(path):
        return "snapshot of another online store"
    current = registry_generation(store)
    if current is None:
        return "registry not applied by apply_repo"
    if generation != current:
        return "registry applied since the last sync"
    if materialised != registry_materialisations(store):
        return "online store materialised outside the release"
    return None


def _digest_fields(con: duckdb.DuckDBPyConnection, path: str, columns: list[str]) -> str:
    """``struct_pack`` arguments of a row's digest; timestamps as epoch microseconds, since
    their text form depends on the session's time zone."""
    described = con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [path]).fetchall()
    types = {str(r[0]): str(r[1]) for r in described}
    fields = []
    for column in columns:
        value = _quote(column)
        if types[column].startswith("TIMESTAMP"):
            value = f"epoch_us({value})"
        fields.append(f"{_quote(column)} := {value}")
    return ", ".join(fields)


def _stage_wanted(con: duckdb.DuckDBPyConnection, view: FeatureView, stop: datetime) -> list[str]:
    """Temporary table ``_WANTED``: each patient's latest row of the view's source at or
    before ``stop`` (ties broken by the later ``created``, as Feast's dedup does) and its
    digest, also appended to ``_WANTED_ALL``. Returns the patients, in no order."""
    source = view.batch_source
    if not isinstance(source, FileSource):
        raise TypeError(f"{view.name}: the online sync reads Parquet file sources only")
    ts, created = source.timestamp_field, source.created_timestamp_column
    features = [f.name for f in view.features]
    columns = [JOIN_KEY, ts, *([created] if created else []), *features]
    parquet = "read_parquet(?)"
    packed = _digest_fields(con, source.path, [ts, *features])
    order = f"{_quote(ts)} DESC" + (f", {_quote(created)} DESC" if created else "")
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {_WANTED} AS "
        f"SELECT {', '.join(_quote(c) for c in columns)}, "
        f"md5(CAST(struct_pack({packed}) AS VARCHAR)) AS _digest FROM {parquet} "
        f"WHERE {JOIN_KEY} IS NOT NULL AND {_quote(ts)} >= ? AND {_quote(ts)} <= ? "
        f"QUALIFY row_number() OVER (PARTITION BY {JOIN_KEY} ORDER BY {order}) = 1",
        [source.path, HISTORY_START, stop],
    )
    con.execute(
        f"INSERT INTO {_WANTED_ALL} SELECT ?, {JOIN_KEY}, {_quote(ts)}, _digest FROM {_WANTED}",
        [view.name],
    )
    return [p for (p,) in con.execute(f"SELECT {JOIN_KEY} FROM {_WANTED}").fetchall()]


def _changed_rows(
    con: duckdb.DuckDBPyConnection, view: FeatureView, absent: list[str]
) -> pd.DataFrame:
    """Wanted rows whose digest the snapshot does not hold for the patient, and the rows of
    the patients the store lacks; Arrow-typed, as Feast's own materialisation reads them (a
    nullable integer stays an integer)."""
    table = con.sql(
        f"SELECT * EXCLUDE (_digest) FROM {_WANTED} w WHERE NOT EXISTS (SELECT 1 FROM {ROWS} s "
        f"WHERE s.feature_view = ? AND s.patient_id = w.{JOIN_KEY} AND s.digest = w._digest) "
        f"OR list_contains(?::VARCHAR[], w.{JOIN_KEY})",
        params=[view.name, absent],
    ).to_arrow_table()
    assert table is not None
    frame: pd.DataFrame = table.to_pandas(types_mapper=pd.ArrowDtype)
    return frame


def _write_rows(store: FeatureStore, view: FeatureView, rows: pd.DataFrame, stop: datetime) -> bool:
    """Write ``rows`` to the view's online table; False when the whole view was materialised
    instead. ``write_to_online_store`` drops a frame without a single feature value (with a
    warning), yet such rows must still replace what the store holds: materialising the view
    writes them."""
    features = [f.name for f in view.features]
    if rows[features].isna().all().all():
        materialize_view(store, view.name, HISTORY_START, stop)
        return False
    store.write_to_online_store(view.name, rows)
    return True


def _entity_keys(store: FeatureStore, patients: list[str]) -> dict[str, bytes]:
    version = store.config.entity_key_serialization_version
    return {p: online_entity_key(p, version) for p in patients}


def _delete_stale(
    store: FeatureStore, view: FeatureView, keys: dict[str, bytes], online: set[bytes]
) -> int:
    """Delete the patients the view's online table holds and the release does not want."""
    stale = online - set(keys.values())
    delete_online_entities(online_store_path(store), stale, [online_table(store, view.name)])
    return len(stale)


def _sync_view(
    con: duckdb.DuckDBPyConnection,
    store: FeatureStore,
    view: FeatureView,
    stop: datetime,
    report: OnlineSyncReport,
) -> None:
    """One view of an incremental sync: delete the patients the release no longer has, then
    write what changed or is missing. Deleted first, so that a sync killed between the two
    leaves no withheld, erased or opted-out patient served beside the new rows (the next
    sync writes what was missed)."""
    table = online_table(store, view.name)
    keys = _entity_keys(store, _stage_wanted(con, view, stop))
    online = online_keys(online_store_path(store), table)
    report.rows_deleted += _delete_stale(store, view, keys, online)
    absent = [p for p, key in keys.items() if key not in online]
    rows = _changed_rows(con, view, absent)
    if rows.empty:
        written: list[str] = []
    elif _write_rows(store, view, rows, stop):
        written = list(dict.fromkeys(rows[JOIN_KEY].astype(str)))
    else:
        written = list(keys)  # the whole view was materialised
    report.rows_written += len(written)
    report.rows_unchanged += len(keys) - len(written)
    assert report.written is not None
    report.written[table] = [keys[p] for p in written]


def _full_sync(
    con: duckdb.DuckDBPyConnection,
    store: FeatureStore,
    end: datetime,
    stop: datetime,
    report: OnlineSyncReport,
) -> None:
    """The full path: the patients the release no longer has deleted, the latest row of every
    patient materialised by Feast, then any patient it wrote that the release does not have
    deleted too. Deleted first, so that a sync killed while Feast materialises leaves no
    withheld or opted-out patient served beside the new rows."""
    wanted = {v.name: (v, _stage_wanted(con, v, stop)) for v in store.list_feature_views()}
    _delete_all_stale(store, wanted, report)
    materialize_latest(store, end)
    _delete_all_stale(store, wanted, report)
    report.rows_written += sum(len(patients) for _, patients in wanted.values())


def _delete_all_stale(
    store: FeatureStore, wanted: dict[str, tuple[FeatureView, list[str]]], report: OnlineSyncReport
) -> None:
    """Delete, from every view's online table, the patients the release does not want."""
    for view, patients in wanted.values():
        keys = _entity_keys(store, patients)
        online = online_keys(online_store_path(store), online_table(store, view.name))
        report.rows_deleted += _delete_stale(store, view, keys, online)


def _record_snapshot(
    con: duckdb.DuckDBPyConnection, store: FeatureStore, end: datetime, *, replace: bool
) -> None:
    """Make the snapshot the rows just made online, in one transaction, after the store was
    written. Incremental: only the rows that differ are deleted and inserted. Full: rebuilt
    (which also repairs an unreadable one)."""
    match = (
        "s.feature_view = w.feature_view AND s.patient_id = w.patient_id AND s.digest = w.digest"
    )
    con.begin()
    try:
        if replace:
            con.execute(f"DROP TABLE IF EXISTS {ROWS}")
            con.execute(f"DROP TABLE IF EXISTS {META}")
            ensure_state_tables(con)
        con.execute(
            f"DELETE FROM {ROWS} s WHERE NOT EXISTS (SELECT 1 FROM {_WANTED_ALL} w WHERE {match})"
        )
        con.execute(
            f"INSERT INTO {ROWS} SELECT w.feature_view, w.patient_id, w.event_timestamp, w.digest "
            f"FROM {_WANTED_ALL} w WHERE NOT EXISTS (SELECT 1 FROM {ROWS} s WHERE {match})"
        )
        con.execute(f"DELETE FROM {META}")
        con.execute(
            f"INSERT INTO {META} VALUES (?, ?, ?, ?, ?, ?)",
            [
                str(online_store_path(store)),
                registry_generation(store),
                SYNC_VERSION,
                end,
                datetime.now(UTC),
                # after this sync's own materialisations: only a later one differs
                registry_materialisations(store),
            ],
        )
        con.commit()
    except BaseException:
        con.rollback()
        raise


def sync_online_store(
    con: duckdb.DuckDBPyConnection,
    store: FeatureStore,
    end: datetime | None = None,
    *,
    full: bool = False,
) -> OnlineSyncReport:
    """Bring the online store to the latest row of every released patient up to ``end``
    (default: the release's data end) per feature view, writing only what changed unless the
    snapshot cannot be trusted (see the module doc) or ``full`` is set. ``con`` is the
    warehouse, opened for writing (the snapshot lives in ``release_state``)."""
    started = time.perf_counter()
    end = end or data_end(store) or datetime.now(UTC)
    # as materialize_latest: a row stamped exactly at the data end is kept
    stop = end + timedelta(microseconds=1)
    missing = missing_online_tables(store)
    if missing:
        raise OnlineStoreMissingError(
            f"online store tables missing for {', '.join(missing)}: apply the repo first"
        )
    ensure_state_tables(con)
    reason = "full sync requested" if full else full_sync_reason(con, store)
    report = OnlineSyncReport(
        mode="full" if reason else "incremental",
        reason=reason or "snapshot matches the registry and the online store",
        end=end,
        written=None if reason else {},
    )
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {_WANTED_ALL} (feature_view VARCHAR, patient_id VARCHAR, "
        "event_timestamp TIMESTAMPTZ, digest VARCHAR)"
    )
    try:
        if reason:
            _full_sync(con, store, end, stop, report)
        else:
            for view in store.list_feature_views():
                _sync_view(con, store, view, stop, report)
        _record_snapshot(con, store, end, replace=reason is not None)
    finally:
        for table in (_WANTED, _WANTED_ALL):
            con.execute(f"DROP TABLE IF EXISTS {table}")
    report.entities_online = online_entity_counts(store)
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def withdraw_online_views(
    con: duckdb.DuckDBPyConnection, store: FeatureStore, parquet_files: list[Path]
) -> dict[Path, int]:
    """Delete every online row of the feature views read from ``parquet_files`` (their feature
    tables were withdrawn: a value they held may name a patient), and forget the sync's
    snapshot, so the next sync reloads the store in full once the tables pass their checks
    again. Returns the rows deleted per file."""
    path = online_store_path(store)
    removed = {Path(p): 0 for p in parquet_files}
    if path.exists():
        by_source = {Path(p).resolve(): Path(p) for p in parquet_files}
        for view in store.list_feature_views():
            source = view.batch_source
            if not isinstance(source, FileSource):
                continue
            withdrawn = by_source.get(Path(source.path).resolve())
            if withdrawn is not None:
                table = online_table(store, view.name)
                removed[withdrawn] += delete_online_entities(
                    path, online_keys(path, table), [table]
                )
    forget_snapshot(con)
    return removed
