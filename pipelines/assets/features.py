"""Stage ``features``: the clinical feature tables (schema ``features`` and Parquet under
WORKDIR/features, the Feast offline sources), each guarded by a PHI leak scan and by a check
that no patient who opted out of research appears."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    MaterializeResult,
    MetadataValue,
    multi_asset,
)
from feast import FeatureStore

from deid.leakscan import LeakScanResult
from deid.release import merged_scans
from pipelines.assets.checks import RELEASE_CANARIES, column_metadata, leak_scan_result
from pipelines.assets.deid import (
    FOLLOWS_THE_VIEWS,
    RELEASE_INPUT,
    built_from_upstream,
    k_anonymity_settings,
)
from pipelines.assets.ingest import WAREHOUSE_POOL
from pipelines.assets.plots import image_metadata
from pipelines.features.checks import (
    FeatureRowsCheck,
    TableShape,
    check_feature_rows,
    check_published_table,
    opted_out_known,
    table_shape,
)
from pipelines.features.cohort import release_known_by
from pipelines.features.online_sync import withdraw_online_views
from pipelines.features.refresh import refresh_feature_tables, withdraw_feature_tables
from pipelines.features.resources import FeastStoreResource
from pipelines.features.stats import null_rates, plot_distributions
from pipelines.features.tables import (
    FEATURE_TABLES,
    FEATURES_SCHEMA,
    LabUnitCounts,
    parquet_path,
)
from pipelines.parallel import on_cursors
from pipelines.resources import DeidSettings, KeyProviderResource, WarehouseResource
from vault.catalog import has_table

# a published feature table's check after the refresh (None when it was not checked again)
# and its shape, null rates and plot (None when no table is published)
_TableReport = tuple[FeatureRowsCheck | None, tuple[TableShape, dict[str, float], Path] | None]


# the feature table that reads lab and vital results (see pipelines.features.tables.LAB_UNITS)
LABS_TABLE = "patient_labs_vitals"


def _lab_unit_metadata(counts: LabUnitCounts) -> dict[str, MetadataValue[Any]]:
    """How many results were left out for their unit, and how many stated none, per measure."""
    return {
        "lab_results_unit_not_read": MetadataValue.json(counts.unread),
        "lab_results_without_unit": MetadataValue.json(counts.without_unit),
    }


def feature_asset_key(name: str) -> AssetKey:
    return AssetKey([FEATURES_SCHEMA, name])


FEATURE_ASSET_KEYS: list[AssetKey] = [feature_asset_key(name) for name in FEATURE_TABLES]


@multi_asset(
    name="feature_tables",
    specs=[
        AssetSpec(
            feature_asset_key(name),
            group_name="features",
            deps=[RELEASE_INPUT, *(AssetKey(["views", view]) for view in views)],
            description=f"Feature table `{FEATURES_SCHEMA}.{name}`: a row wherever a patient's "
            "value changes (events, window edges, birthdays), exact at any time (Parquet for "
            "Feast).",
            kinds={"duckdb", "parquet"},
            automation_condition=FOLLOWS_THE_VIEWS,
        )
        for name, views in FEATURE_TABLES.items()
    ],
    check_specs=[
        spec
        for name in FEATURE_TABLES
        for spec in (
            AssetCheckSpec(
                "phi_leak_scan",
                asset=feature_asset_key(name),
                blocking=True,
                description="No name, identifier, address, phone or email of any patient, and "
                "no patient's own birth date, appears in the table.",
            ),
            AssetCheckSpec(
                "no_opted_out_patients",
                asset=feature_asset_key(name),
                blocking=True,
                description="No patient with an active research Consent that denies appears.",
            ),
        )
    ],
    pool=WAREHOUSE_POOL,
)
def feature_tables(
    context: AssetExecutionContext,
    warehouse: WarehouseResource,
    keys: KeyProviderResource,
    feast_store: FeastStoreResource,
    deid_settings: DeidSettings,
) -> Iterator[MaterializeResult | AssetCheckResult]:
    """Build the feature tables from the views; publish only rows that pass their checks."""
    out_dir = Path(warehouse.workdir) / "features"
    # aggregate plots only; kept out of the features folder, which holds the Feast sources
    stats_dir = Path(warehouse.workdir) / "feature_stats"
    # the plots show no group smaller than the release's own k
    k, _ = k_anonymity_settings(deid_settings)
    con = warehouse.connect()
    try:
        canaries = RELEASE_CANARIES.get(
            con, keys.provider(), context.run.run_id, sealed=keys.seal_canaries
        )
        canaries.compile()
        refresh = refresh_feature_tables(
            con,
            out_dir,
            check=lambda cursor, rows: check_feature_rows(cursor, canaries, rows),
            known_by=release_known_by(con, deid_settings.date_shift_days()),
            shift_days=deid_settings.time_line_shift_days(),
        )
        build = refresh.build
        # a full build's published rows were checked in full against the same canaries; after
        # a refresh that kept rows (or a build that kept an old table), the published table is
        # checked again: a patient new to the release may be named in a kept row
        recheck = refresh.mode != "full"

        def report(cursor: duckdb.DuckDBPyConnection, name: str) -> _TableReport:
            if not has_table(cursor, name, FEATURES_SCHEMA):
                return None, None
            after = None
            if recheck or name in build.unpublished:
                after = check_published_table(cursor, canaries, name)
                if not after.passed:  # withdrawn below; nothing of it described, not even a plot
                    return after, None
            stats = (
                table_shape(cursor, name),
                null_rates(cursor, name),
                plot_distributions(cursor, name, stats_dir / f"{name}.png", k),
            )
            return after, stats

        # the tables are published: each one's checks and statistics read it side by side
        results = dict(on_cursors(con, report, list(FEATURE_TABLES)))
        withdrawn = [n for n, (after, _) in results.items() if after and not after.passed]
        online_withdrawn = (
            _withdraw(con, feast_store.store(warehouse.workdir), out_dir, stats_dir, withdrawn)
            if withdrawn
            else {}
        )
        known = opted_out_known(con)
    finally:
        con.close()
    context.log.info(
        f"features ({refresh.mode}): {sum(build.rows.values())} rows in {len(build.rows)} "
        f"tables, {refresh.patients_changed} patients computed again "
        f"({refresh.patients_data_end_moved} of them for the moved data end), "
        f"{refresh.patients_removed} removed, {build.opted_out} opted-out patients excluded, "
        f"{build.seconds:.1f}s"
    )
    if build.dated_after_arrival:
        context.log.warning(
            f"{build.dated_after_arrival} fact times are dated after the newest batch's arrival "
            "(beyond the date shift and a day's span): left out of the data end, so they move "
            "no patient's rows; check the source's dates"
        )
    unread = build.lab_units.unread
    if unread:
        context.log.warning(
            f"{sum(unread.values())} lab and vital results in units the features do not read "
            f"({', '.join(f'{m} {n}' for m, n in sorted(unread.items()))}): left out of "
            "patient_labs_vitals; the units each measure reads are pipelines.features.tables."
            "LAB_UNITS"
        )
    held_back = refresh.held_back
    for name, (after, stats) in results.items():
        key = feature_asset_key(name)
        checked = [c for c in (build.checks.get(name), after) if isinstance(c, FeatureRowsCheck)]
        # what stands: the table as published now (an older one when this run's rows were
        # held back), or nothing (never built, or withdrawn)
        standing = stats is not None and name not in withdrawn
        shape, nulls, plot = stats if stats is not None else (TableShape(0, 0, []), {}, None)
        yield MaterializeResult(
            asset_key=key,
            tags=built_from_upstream(context, key),
            metadata={
                "dagster/row_count": shape.rows if standing else 0,
                "published": standing and name not in held_back,
                "withdrawn": name in withdrawn,
                **({"online_rows_withdrawn": online_withdrawn[name]} if name in withdrawn else {}),
                "rows": shape.rows if standing else 0,
                "patients": shape.patients if standing else 0,
                **column_metadata(shape.columns),
                "table": f"{FEATURES_SCHEMA}.{name}",
                "parquet": MetadataValue.path(str(parquet_path(out_dir, name))),
                "opted_out_excluded": build.opted_out,
                "dates_after_arrival": build.dated_after_arrival,
                **(_lab_unit_metadata(build.lab_units) if name == LABS_TABLE else {}),
                "build_seconds": build.seconds,
                "refresh": refresh.mode,
                "patients_changed": refresh.patients_changed,
                "patients_data_end_moved": refresh.patients_data_end_moved,
                "patients_removed": refresh.patients_removed,
                "null_rate": MetadataValue.json(nulls if standing else {}),
                **({"distributions": image_metadata(plot)} if standing and plot else {}),
            },
        )
        # a table neither checked nor published (it could not be built) fails its checks
        scan = merged_scans(*(c.scan for c in checked)) if checked else LeakScanResult()
        opted_rows = sum(c.opted_out_rows for c in checked)
        yield leak_scan_result(key, scan) if checked else _not_checked(key, "phi_leak_scan")
        yield AssetCheckResult(
            check_name="no_opted_out_patients",
            asset_key=key,
            passed=bool(checked) and opted_rows == 0,
            severity=AssetCheckSeverity.ERROR,
            metadata={"opted_out_rows": opted_rows, "opted_out_patients": known},
        )


def _withdraw(
    con: duckdb.DuckDBPyConnection,
    store: FeatureStore,
    out_dir: Path,
    stats_dir: Path,
    names: list[str],
) -> dict[str, int]:
    """Withdraw the named feature tables (see :func:`withdraw_feature_tables`), their plots
    (a code's label may be what the scan found) and their feature views' online rows; the
    online rows deleted, per table."""
    withdraw_feature_tables(con, out_dir, names)
    for name in names:
        (stats_dir / f"{name}.png").unlink(missing_ok=True)
    files = {name: parquet_path(out_dir, name) for name in names}
    removed = withdraw_online_views(con, store, list(files.values()))
    return {name: removed[file] for name, file in files.items()}


def _not_checked(key: AssetKey, check_name: str) -> AssetCheckResult:
    return AssetCheckResult(
        check_name=check_name,
        asset_key=key,
        passed=False,
        severity=AssetCheckSeverity.ERROR,
        metadata={"reason": "the table is not published and no rows were checked"},
    )
