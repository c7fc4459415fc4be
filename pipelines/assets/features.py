"""Stage ``features``: the clinical feature tables (schema ``features`` and Parquet under
WORKDIR/features, the Feast offline sources), each guarded by a PHI leak scan and by a check
that no patient who opted out of research appears."""

from collections.abc import Iterator
from pathlib import Path

import duckdb
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    AutomationCondition,
    MaterializeResult,
    MetadataValue,
    multi_asset,
)

from deid.leakscan import LeakScanResult
from pipelines.assets.checks import RELEASE_CANARIES, column_metadata, leak_scan_result
from pipelines.assets.deid import RELEASE_INPUT
from pipelines.assets.ingest import WAREHOUSE_POOL
from pipelines.assets.plots import image_metadata
from pipelines.features.checks import TableShape, opted_out_rows, scan_feature_table, table_shape
from pipelines.features.refresh import REFRESHED, refresh_feature_tables
from pipelines.features.stats import null_rates, plot_distributions
from pipelines.features.tables import FEATURE_TABLES, FEATURES_SCHEMA, parquet_path
from pipelines.parallel import on_cursors
from pipelines.resources import KeyProviderResource, WarehouseResource

# a feature table's shape, leak scan, opted-out rows (found, known), null rates and plot
_TableReport = tuple[TableShape, LeakScanResult, tuple[int, int], dict[str, float], Path]


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
            automation_condition=AutomationCondition.eager(),
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
    context: AssetExecutionContext, warehouse: WarehouseResource, keys: KeyProviderResource
) -> Iterator[MaterializeResult | AssetCheckResult]:
    """Build every feature table from the views, then scan each for PHI and opted-out patients."""
    out_dir = Path(warehouse.workdir) / "features"
    # aggregate plots only; kept out of the features folder, which holds the Feast sources
    stats_dir = Path(warehouse.workdir) / "feature_stats"
    con = warehouse.connect()
    try:
        refresh = refresh_feature_tables(con, out_dir)
        build = refresh.build
        canaries = RELEASE_CANARIES.get(con, keys.provider())
        canaries.compile()
        # a full build is scanned in full; a refresh, the patients it computed again in full
        # (and the distinct values of every row)
        refreshed = None if refresh.mode == "full" else REFRESHED

        def report(cursor: duckdb.DuckDBPyConnection, name: str) -> _TableReport:
            return (
                table_shape(cursor, name),
                scan_feature_table(cursor, canaries, name, refreshed=refreshed),
                opted_out_rows(cursor, name),
                null_rates(cursor, name),
                plot_distributions(cursor, name, stats_dir / f"{name}.png"),
            )

        # the tables are published: each one's statistics and scans read it side by side
        results = dict(on_cursors(con, report, list(FEATURE_TABLES)))
    finally:
        con.close()
    context.log.info(
        f"features ({refresh.mode}): {sum(build.rows.values())} rows in {len(build.rows)} "
        f"tables, {refresh.patients_changed} patients computed again, "
        f"{refresh.patients_removed} removed, {build.opted_out} opted-out patients excluded, "
        f"{build.seconds:.1f}s"
    )
    for name, (shape, scan, (opted_rows, opted_known), nulls, plot) in results.items():
        key = feature_asset_key(name)
        yield MaterializeResult(
            asset_key=key,
            metadata={
                "dagster/row_count": shape.rows,
                "rows": shape.rows,
                "patients": shape.patients,
                **column_metadata(shape.columns),
                "table": f"{FEATURES_SCHEMA}.{name}",
                "parquet": MetadataValue.path(str(parquet_path(out_dir, name))),
                "opted_out_excluded": build.opted_out,
                "build_seconds": build.seconds,
                "refresh": refresh.mode,
                "patients_changed": refresh.patients_changed,
                "patients_removed": refresh.patients_removed,
                "null_rate": MetadataValue.json(nulls),
                "distributions": image_metadata(plot),
            },
        )
        yield leak_scan_result(key, scan)
        yield AssetCheckResult(
            check_name="no_opted_out_patients",
            asset_key=key,
            passed=opted_rows == 0,
            severity=AssetCheckSeverity.ERROR,
            metadata={"opted_out_rows": opted_rows, "opted_out_patients": opted_known},
        )
