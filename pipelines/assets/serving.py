"""One step for what model builders read once the feature tables are published: the Feast online
store (stage ``feast``) and the readmission training set (stage ``models``).

Both read the applied registry and the feature tables and neither reads the other: the online
store is synced from the feature tables, the training set joins them point-in-time (Feast's
offline store for a full build, one DuckDB statement of the same rule for the changed
patients). Each is part Python (the leak scan of the rows written; ibis compiling Feast's join)
and part DuckDB, so they run side by side, each on a cursor of its own
(:func:`pipelines.parallel.on_cursors`): after a small batch they are the two longest pieces of a
release refresh after the features. Selected alone (the asset page's "Materialize"), each runs
by itself. The assets keep their keys, groups, kinds and checks."""

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
from dagster import AssetCheckResult, AssetExecutionContext, MaterializeResult, multi_asset

from pipelines.assets.deid import built_from_upstream
from pipelines.assets.feast import (
    ONLINE_STORE,
    ONLINE_STORE_SCAN,
    ONLINE_STORE_SPEC,
    OnlineStoreRefresh,
    online_store_results,
    refresh_online_store,
)
from pipelines.assets.ingest import WAREHOUSE_POOL
from pipelines.assets.models import (
    TRAINING_SET,
    TRAINING_SET_SPEC,
    training_set_result,
)
from pipelines.features.resources import FeastStoreResource
from pipelines.models.training_refresh import refresh_training_set
from pipelines.parallel import on_cursors
from pipelines.resources import KeyProviderResource, WarehouseResource


@multi_asset(
    name="online_store_and_training_set",
    specs=[ONLINE_STORE_SPEC, TRAINING_SET_SPEC],
    check_specs=[ONLINE_STORE_SCAN],
    can_subset=True,
    # writes the warehouse (the snapshot of what is online, the training set and their
    # bookkeeping): never beside another writer
    pool=WAREHOUSE_POOL,
)
def online_store_and_training_set(
    context: AssetExecutionContext,
    warehouse: WarehouseResource,
    feast_store: FeastStoreResource,
    keys: KeyProviderResource,
) -> Iterator[MaterializeResult | AssetCheckResult]:
    """Sync the Feast online store and refresh the training set, side by side."""
    selected = context.selected_asset_keys
    workdir = warehouse.workdir
    pieces: list[Callable[[duckdb.DuckDBPyConnection], Any]] = []
    if ONLINE_STORE in selected:
        provider = keys.provider()
        run_id = context.run.run_id
        sealed = keys.seal_canaries
        pieces.append(
            lambda cursor: refresh_online_store(
                cursor, workdir, feast_store, provider, run_id, sealed
            )
        )
    if TRAINING_SET in selected:
        # made here, not in the thread: making a store sets Feast's variables in os.environ
        store = feast_store.store(workdir)
        pieces.append(lambda cursor: refresh_training_set(cursor, store, Path(workdir)))
    con = warehouse.connect()
    try:
        for _, refresh in on_cursors(con, lambda cursor, piece: piece(cursor), pieces):
            if isinstance(refresh, OnlineStoreRefresh):
                yield from online_store_results(context, refresh)
            else:
                yield training_set_result(
                    refresh, workdir, built_from_upstream(context, TRAINING_SET)
                )
    finally:
        con.close()
