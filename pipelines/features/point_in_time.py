"""A feature service's point-in-time join, computed in DuckDB from the Parquet files Feast reads.

Feast's DuckDB offline store builds the join as an ibis expression and compiles it to SQL on
every ``get_historical_features`` call: 0.3-0.6 s of Python whatever the number of entity rows,
which is most of the cost when a refresh joins a handful of patients. This module states the
same rule as one SQL statement, for the feature services it can state it for:

- per entity row (join key, ``event_timestamp`` T) and feature view, the view's rows of that key
  with ``timestamp <= T`` and ``timestamp + ttl >= T`` (no bound without a TTL);
- of those, the one with the latest timestamp, ties broken by the later ``created``;
- no such row: the view's features are null (a left join); entity rows keep their order.

Timestamps compare as instants and a TTL is added as an exact duration, as in Feast's query (it
runs in UTC, where a day is 86,400 s). What else Feast can join (a projection with an alias or a
join key map, field mappings, sources other than Parquet files, on-demand views) is not stated
here: :class:`UnsupportedJoinError` names it and the caller asks Feast. Feast's retrieval is the
reference; the tests hold the two equal, boundaries included.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import duckdb
import pandas as pd

from vault.catalog import quote_identifier as _quote

if TYPE_CHECKING:
    from feast import FeatureService, FeatureStore

ENTITY_TIMESTAMP = "event_timestamp"
# The entity frame as the statement sees it (registered on a cursor of its own).
_ENTITIES = "pit_entities"
_ROW = "_pit_row"


@dataclass(frozen=True)
class _ViewJoin:
    """What the statement needs of one feature view of the service."""

    path: str
    join_key: str
    timestamp: str
    created: str | None
    ttl: timedelta | None
    features: tuple[str, ...]


class UnsupportedJoinError(ValueError):
    """The feature service uses something the DuckDB statement does not state (the message
    names it); ask Feast's ``get_historical_features`` instead."""


def _view_joins(store: FeatureStore, service: FeatureService) -> list[_ViewJoin]:
    from feast import FileSource

    if store.list_on_demand_feature_views():
        raise UnsupportedJoinError("the registry has on-demand feature views")
    joins = []
    for projection in service.feature_view_projections:
        view = store.get_feature_view(projection.name)
        source = view.batch_source
        if projection.name_alias or projection.join_key_map:
            raise UnsupportedJoinError(f"{projection.name}: an alias or a join key map")
        if not isinstance(source, FileSource) or source.field_mapping:
            raise UnsupportedJoinError(f"{projection.name}: not a plain Parquet file source")
        if len(view.entity_columns) != 1:
            raise UnsupportedJoinError(f"{projection.name}: not exactly one join key")
        joins.append(
            _ViewJoin(
                path=source.path,
                join_key=view.entity_columns[0].name,
                timestamp=source.timestamp_field,
                created=source.created_timestamp_column or None,
                ttl=view.ttl or None,
                features=tuple(f.name for f in projection.features),
            )
        )
    return joins


def _latest_rows(index: int, join: _ViewJoin) -> str:
    """Named step: each entity row's latest row of one view within its TTL, as (row, features)."""
    ts = f"f.{_quote(join.timestamp)}"
    at = f"e.{ENTITY_TIMESTAMP}"
    within = f"{ts} <= {at}"
    if join.ttl is not None:
        micros = join.ttl // timedelta(microseconds=1)
        within += f" AND {ts} + to_microseconds({micros}) >= {at}"
    order = f"{ts} DESC" + (f", f.{_quote(join.created)} DESC" if join.created else "")
    features = ", ".join(f"f.{_quote(name)}" for name in join.features)
    return (
        f"v{index} AS (SELECT e.{_ROW}, {features} FROM {_ENTITIES} e "
        f"JOIN read_parquet(?) f ON f.{_quote(join.join_key)} = e.{_quote(join.join_key)} "
        f"AND {within} "
        f"QUALIFY row_number() OVER (PARTITION BY e.{_ROW} ORDER BY {order}) = 1)"
    )


def _statement(entity_columns: list[str], joins: list[_ViewJoin]) -> str:
    steps = [_latest_rows(i, join) for i, join in enumerate(joins)]
    selected = [f"e.{_quote(c)}" for c in entity_columns if c != _ROW]
    for i, join in enumerate(joins):
        selected += [f"v{i}.{_quote(name)}" for name in join.features]
    joined = " ".join(f"LEFT JOIN v{i} USING ({_ROW})" for i in range(len(joins)))
    return (
        f"WITH {', '.join(steps)} SELECT {', '.join(selected)} FROM {_ENTITIES} e {joined} "
        f"ORDER BY e.{_ROW}"
    )


def historical_features(
    con: duckdb.DuckDBPyConnection,
    store: FeatureStore,
    entities: pd.DataFrame,
    service_name: str,
) -> pd.DataFrame:
    """``entities`` (the join key and ``event_timestamp`` as UTC datetimes, other columns kept)
    with ``service_name``'s features as of each row, in the frame's row order: the rows and
    values of Feast's ``get_historical_features(...).to_df()``. ``con`` only runs the statement
    (a cursor of its own, in UTC); the rows come from the views' Parquet files.
    Raises :class:`UnsupportedJoinError` for a service the statement cannot state."""
    joins = _view_joins(store, store.get_feature_service(service_name))
    frame = entities.reset_index(drop=True).copy()
    frame[ENTITY_TIMESTAMP] = pd.to_datetime(frame[ENTITY_TIMESTAMP], utc=True)
    frame[_ROW] = range(len(frame))
    cursor = con.cursor()
    try:
        cursor.execute("SET TimeZone = 'UTC'")
        cursor.register(_ENTITIES, frame)
        table = cursor.sql(
            _statement(list(frame.columns), joins), params=[j.path for j in joins]
        ).to_arrow_table()
    finally:
        cursor.close()
    joined: pd.DataFrame = table.to_pandas()
    return joined
